//! `kubectl bitsmith`: the real binary as a kubectl plugin (a `kubectl-bitsmith` symlink on the PATH), run by the
//! real kubectl with a ServiceAccount's kubeconfig, against the real control plane and a controller that serves
//! the API. Bytes on the wire are counted by a loopback proxy in front of the API.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest;

use crate::api::zip_contents;
use crate::support::data;
use crate::support::kube::{
    install_crds, kube_ok, kubeconfig, kubeconfig_with_token, namespace, service_account_with_role, wait_for,
};
use crate::support::ports::free_port;
use crate::support::process::Process;
use crate::support::proxy::Proxy;

struct Setup {
    ns: String,
    dir: tempfile::TempDir,
    /// Where `kubectl-bitsmith` is.
    bin: PathBuf,
    uploader: PathBuf,
    viewer: PathBuf,
    /// The API through a proxy that counts the bytes clients send.
    api: String,
    sent: Arc<AtomicU64>,
    _controller: Process,
}

async fn setup(test: &str) -> Setup {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace(test));
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--leader-election-namespace", &ns, "--instance", "controller-0", "--listen", &listen];
    let controller = Process::spawn("controller", &ns, &store, &args);
    controller.ready().await;
    let proxy = Proxy::start(port, None).await;
    let (api, sent) = (proxy.url(), proxy.sent.clone());

    let kubeconfigs = tokio::task::block_in_place(|| {
        [("uploader", "bitsmith-uploader"), ("viewer", "bitsmith-viewer")].map(|(name, role)| {
            let token = service_account_with_role(&ns, name, role);
            let path = dir.path().join(format!("{name}.kubeconfig"));
            kubeconfig_with_token(&kubeconfig(), &token, &path);
            path
        })
    });
    let [uploader, viewer] = kubeconfigs;
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bitsmith"), bin.join("kubectl-bitsmith")).unwrap();
    Setup { ns, dir, bin, uploader, viewer, api, sent, _controller: controller }
}

impl Setup {
    /// `kubectl bitsmith <args> -n <ns> --api-url <proxy>` as the user of `kubeconfig`.
    fn kubectl_bitsmith(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap_or_default());
        tokio::task::block_in_place(|| {
            std::process::Command::new("kubectl")
                .env("PATH", path)
                .env("KUBECONFIG", kubeconfig)
                .env("XDG_CACHE_HOME", self.dir.path().join("records"))
                .arg("bitsmith")
                .args(args)
                .args(["-n", &self.ns, "--api-url", &self.api])
                .output()
                .unwrap()
        })
    }

    /// As [`Setup::kubectl_bitsmith`], requiring success; returns stdout and stderr.
    fn ok(&self, kubeconfig: &Path, args: &[&str]) -> (String, String) {
        let out = self.kubectl_bitsmith(kubeconfig, args);
        let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
        assert!(out.status.success(), "kubectl bitsmith {args:?}: {stderr}");
        (stdout, stderr)
    }

    /// As [`Setup::kubectl_bitsmith`], requiring failure with exit code 1 and one line on stderr, which is returned.
    fn fails(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let out = self.kubectl_bitsmith(kubeconfig, args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "kubectl bitsmith {args:?} should fail: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("kubectl bitsmith: "), "{stderr}");
        stderr
    }

    fn get(&self, object: &str, path: &str) -> String {
        kube_ok(&["get", object, "-n", &self.ns, "-o", &format!("jsonpath={path}")], None)
    }
}

/// An app with nested, empty and unicode-named files, two files big enough for the resource cache, a symlink,
/// a `.cfignore`, and files the cf CLI never pushes.
fn app(root: &Path) -> Vec<String> {
    let write = |path: &str, bytes: &[u8]| {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, bytes).unwrap();
    };
    let big = data::bytes(501, 2 << 20);
    let deep = data::bytes(502, 1 << 20);
    write("index.js", b"require('./lib')\n");
    write("lib/big.bin", &big);
    write("lib/nested/deep/data.bin", &deep);
    write("empty.txt", b"");
    write("naïve-ünïcode.txt", "héllo".as_bytes());
    write(".cfignore", b"*.log\nsecret/\n");
    write("debug.log", b"noise");
    write("secret/key.pem", b"-----BEGIN-----");
    write(".git/HEAD", b"ref: refs/heads/main");
    write("manifest.yml", b"applications: []");
    std::fs::create_dir_all(root.join("assets/empty")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("link")).unwrap();
    let sha1 = |bytes: &[u8]| bitsmith::digest::to_hex(&sha1::Sha1::digest(bytes));
    let mut want = vec![
        "assets/".to_string(),
        "assets/empty/".to_string(),
        format!("empty.txt:{}", sha1(b"")),
        format!("index.js:{}", sha1(b"require('./lib')\n")),
        "lib/".to_string(),
        format!("lib/big.bin:{}", sha1(&big)),
        "lib/nested/".to_string(),
        "lib/nested/deep/".to_string(),
        format!("lib/nested/deep/data.bin:{}", sha1(&deep)),
        format!("naïve-ünïcode.txt:{}", sha1("héllo".as_bytes())),
    ];
    want.sort();
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_is_pushed_downloaded_and_pushed_again_from_the_cache() {
    let s = setup("plugin").await;
    let root = s.dir.path().join("app");
    let want = app(&root);
    let root = root.to_str().unwrap();

    let (stdout, stderr) = s.ok(&s.uploader, &["push", root, "first", "--create", "--app", "web"]);
    let sha256 = stdout.trim();
    assert_eq!(sha256.len(), 64, "{stdout}");
    assert_eq!(s.get("pkg/first", "{.status.state}"), "READY");
    assert_eq!(s.get("pkg/first", "{.status.checksum.value}"), sha256);
    assert_eq!(s.get("pkg/first", "{.spec.appRef.name}"), "web");
    assert!(stderr.contains("skipping link"), "the symlink is dropped, and said so: {stderr}");
    let first_sent = s.sent.swap(0, Ordering::Relaxed);

    let out = s.dir.path().join("first.zip");
    s.ok(&s.uploader, &["download", "first", "-o", out.to_str().unwrap()]);
    let zip = std::fs::read(&out).unwrap();
    assert_eq!(bitsmith::digest::to_hex(&sha2::Sha256::digest(&zip)), sha256);
    assert_eq!(zip_contents(&zip), want, "what .cfignore and the defaults leave in, nothing else");
    s.sent.store(0, Ordering::Relaxed);

    // The same app again, to a new Package: the big files come from the server's cache.
    let (_, stderr) = s.ok(&s.uploader, &["push", root, "second", "--create", "--quiet"]);
    assert!(!stderr.contains("MiB") && !stderr.contains("uploading"), "--quiet: no progress: {stderr}");
    assert!(stderr.contains("skipping link"), "but what is left out is still said: {stderr}");
    let second_sent = s.sent.swap(0, Ordering::Relaxed);
    assert!(first_sent > 3 << 20, "the first push sent the app: {first_sent} bytes");
    assert!(second_sent < first_sent / 50, "the second push sent {second_sent} bytes, the first {first_sent}");
    let out = s.dir.path().join("second.zip");
    s.ok(&s.uploader, &["download", "second", "-o", out.to_str().unwrap()]);
    assert_eq!(zip_contents(&std::fs::read(&out).unwrap()), want, "the cached files are in the package");

    // One file changed and one removed: the next push sends the changed file alone, and takes the rest out of the
    // last push's package, small files too; without hashing again what did not change.
    std::fs::write(s.dir.path().join("app/index.js"), b"require('./lib2')\n").unwrap();
    std::fs::remove_file(s.dir.path().join("app/empty.txt")).unwrap();
    let mut want_next: Vec<String> =
        want.iter().filter(|l| !l.starts_with("empty.txt:") && !l.starts_with("index.js:")).cloned().collect();
    want_next.push(format!("index.js:{}", crate::api::sha1_hex(b"require('./lib2')\n")));
    want_next.sort();
    let (_, stderr) = s.ok(&s.uploader, &["push", root, "fourth", "--create"]);
    assert!(stderr.contains("uploading 1 files (18 bytes); 3 files"), "{stderr}");
    let out = s.dir.path().join("fourth.zip");
    s.ok(&s.uploader, &["download", "fourth", "-o", out.to_str().unwrap()]);
    assert_eq!(zip_contents(&std::fs::read(&out).unwrap()), want_next);

    // A record that claims what the last package does not hold: the API refuses to take that file from it, and
    // the push sends the files again instead.
    let deep = s.dir.path().join("app/lib/nested/deep/data.bin");
    let changed = data::bytes(503, 1 << 20);
    std::fs::write(&deep, &changed).unwrap();
    let records = s.dir.path().join("records/bitsmith/pushes");
    let record = std::fs::read_dir(&records).unwrap().next().unwrap().unwrap().path();
    let lines: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|line| match serde_json::from_str::<serde_json::Value>(line) {
            Ok(mut entry) if entry[0] == "lib/nested/deep/data.bin" => {
                entry[4] = crate::api::sha1_hex(&changed).into();
                entry.to_string()
            }
            _ => line.to_string(),
        })
        .collect();
    std::fs::write(&record, lines.join("\n") + "\n").unwrap();
    let (_, stderr) = s.ok(&s.uploader, &["push", root, "fifth", "--create", "--quiet"]);
    assert!(stderr.contains("could not be reused") && stderr.contains("does not have sha1"), "{stderr}");
    let out = s.dir.path().join("fifth.zip");
    s.ok(&s.uploader, &["download", "fifth", "-o", out.to_str().unwrap()]);
    let want_fifth: Vec<String> = want_next
        .iter()
        .map(|l| {
            if l.starts_with("lib/nested/deep/data.bin:") {
                format!("lib/nested/deep/data.bin:{}", crate::api::sha1_hex(&changed))
            } else {
                l.clone()
            }
        })
        .collect();
    assert_eq!(zip_contents(&std::fs::read(&out).unwrap()), want_fifth);

    // A zip is pushed as it is; `bitsmith wait` is the same command without kubectl.
    s.ok(&s.uploader, &["push", out.to_str().unwrap(), "third", "--create", "--quiet"]);
    let waited = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["wait", "third", "-n", &s.ns, "--kubeconfig", s.uploader.to_str().unwrap()])
            .output()
            .unwrap()
    });
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    assert_eq!(String::from_utf8(waited.stdout).unwrap().trim(), s.get("pkg/third", "{.status.checksum.value}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_one_line_and_a_failing_exit() {
    let s = setup("plugin-errors").await;
    let root = s.dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.js"), b"1").unwrap();
    let root = root.to_str().unwrap();

    let missing = s.fails(&s.uploader, &["push", root, "missing", "--quiet"]);
    assert!(missing.contains("not found") && missing.contains("--create"), "{missing}");

    s.ok(&s.uploader, &["push", root, "done", "--create", "--quiet"]);
    let twice = s.fails(&s.uploader, &["push", root, "done", "--quiet"]);
    assert!(twice.contains("is READY, not AWAITING_UPLOAD"), "{twice}");

    // A viewer may read the Package but not upload to it.
    kube_ok(&["apply", "-n", &s.ns, "-f", "-"], Some(&crate::support::kube::awaiting_packages(&["theirs"])));
    wait_for(&s.ns, "pkg/theirs", "{.status.state}", "AWAITING_UPLOAD").await;
    let refused = s.fails(&s.viewer, &["push", root, "theirs", "--quiet"]);
    // Refused by kube-apiserver (no upload token for a viewer) when the aggregated API is registered, else by
    // bitsmith's API itself.
    assert!(
        refused.contains("403") && (refused.contains("CF-NotAuthorized") || refused.contains("forbidden")),
        "{refused}"
    );
    let not_ready = s.fails(&s.viewer, &["download", "theirs", "-o", "/dev/null"]);
    assert!(not_ready.contains("not READY"), "{not_ready}");
    let no_such_dir = s.fails(&s.uploader, &["push", "/nonexistent/app", "theirs", "--quiet"]);
    assert!(no_such_dir.contains("/nonexistent/app"), "{no_such_dir}");

    // A Package deleted while `wait` watches it ends the wait at once.
    kube_ok(&["apply", "-n", &s.ns, "-f", "-"], Some(&crate::support::kube::awaiting_packages(&["vanishing"])));
    wait_for(&s.ns, "pkg/vanishing", "{.status.state}", "AWAITING_UPLOAD").await;
    let started = std::time::Instant::now();
    let waiting = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["wait", "vanishing", "--timeout", "120s", "-n", &s.ns, "--kubeconfig", s.uploader.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    kube_ok(&["delete", "pkg", "vanishing", "-n", &s.ns, "--wait=false"], None);
    let waited = tokio::task::block_in_place(|| waiting.wait_with_output().unwrap());
    let stderr = String::from_utf8(waited.stderr).unwrap();
    assert_eq!(waited.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"vanishing\" was deleted"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "ended by the deletion, not the timeout");

    // A Package that fails: `wait` says why.
    let invalid = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: broken\nspec:\n  type: bits\n  source:\n    http: {url: 'ftp://127.0.0.1/app.zip'}\n";
    kube_ok(&["apply", "-n", &s.ns, "-f", "-"], Some(invalid));
    let failed = s.fails(&s.uploader, &["wait", "broken", "--timeout", "60s"]);
    assert!(failed.contains("FAILED") && failed.contains("http"), "{failed}");
}

/// A user with a client certificate (no bearer token: nothing bitsmith's API could check) pushes through a
/// kube-apiserver whose request timeout is 5 s, over a link of 1 MiB/s: the push gets an upload token through the
/// aggregated API and sends its 8 MiB straight to bitsmith, while the same bytes through `kubectl create --raw`
/// are cut at the timeout. The token is good for its object's upload only, and not after it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_outlasts_the_api_servers_request_timeout_with_an_upload_token() {
    use crate::support::kube::OwnControlPlane;
    let plane = tokio::task::block_in_place(|| OwnControlPlane::start_with("--request-timeout=5s"));
    let ns = "push";
    let admin = |args: &[&str], stdin: Option<&str>| tokio::task::block_in_place(|| plane.kubectl_ok(args, stdin));
    let root = env!("CARGO_MANIFEST_DIR");
    admin(&["apply", "-f", &format!("{root}/crds"), "-f", &format!("{root}/config/rbac/user-roles.yaml")], None);
    admin(&["wait", "--for=condition=established", "--timeout=60s", "crd/packages.bitsmith.dev"], None);
    admin(&["create", "namespace", ns], None);

    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) =
        crate::api::serving_certificate(dir.path(), &[&format!("bitsmith-api.{ns}.svc"), "localhost"]);
    let token_key = dir.path().join("token.key");
    std::fs::write(&token_key, data::bytes(9, 32)).unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let port = free_port();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--leader-election-namespace",
        ns,
        "--instance",
        "controller-0",
        "--listen",
        &listen,
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--upload-token-key-file",
        &path(&token_key),
        "--upload-token-ttl",
        "6s",
    ];
    let controller = Process::spawn_at(&plane.kubeconfig, "controller", ns, &store, &args);
    controller.ready().await;
    // Both ways in pass the same slow link: the aggregator's, and the plugin's own.
    let proxy_port = Proxy::start(port, Some(1 << 20)).await.port;
    let registration = crate::support::kube::api_service(ns, proxy_port, &std::fs::read(&ca).unwrap());
    admin(&["apply", "-f", "-"], Some(&registration));
    admin(&["wait", "--for=condition=Available", "--timeout=90s", "apiservice/v1alpha1.api.bitsmith.dev"], None);

    // alice: a client certificate from the cluster's CA, allowed to upload in the namespace.
    let alice =
        crate::support::pki::issue(dir.path(), &plane.client_ca(), "alice", "alice", "extendedKeyUsage=clientAuth\n");
    let admin_config = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    let token_line = admin_config.lines().find(|l| l.trim_start().starts_with("user: {token:")).unwrap();
    let alice_config = dir.path().join("alice.kubeconfig");
    let certificate =
        format!("  user: {{client-certificate: {:?}, client-key: {:?}}}", path(&alice.cert), path(&alice.key));
    std::fs::write(&alice_config, admin_config.replace(token_line, &certificate)).unwrap();
    admin(&["create", "rolebinding", "alice", "-n", ns, "--clusterrole", "bitsmith-uploader", "--user", "alice"], None);
    admin(&["apply", "-n", ns, "-f", "-"], Some(&crate::support::kube::awaiting_packages(&["pushed", "raw", "other"])));
    let as_alice = |args: &[&str]| {
        tokio::task::block_in_place(|| crate::support::kube::kubectl_at(alice_config.to_str().unwrap(), args, None))
    };

    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("blob.bin"), data::bytes(77, 8 << 20)).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bitsmith"), bin.join("kubectl-bitsmith")).unwrap();
    let started = std::time::Instant::now();
    let pushed = tokio::task::block_in_place(|| {
        std::process::Command::new("kubectl")
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env("KUBECONFIG", &alice_config)
            .env("XDG_CACHE_HOME", dir.path().join("records"))
            .args(["bitsmith", "push", &path(&app), "pushed", "-n", ns, "--quiet"])
            .args(["--api-url", &format!("https://localhost:{proxy_port}"), "--api-ca", &path(&ca)])
            .output()
            .unwrap()
    });
    let took = started.elapsed();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(took > std::time::Duration::from_secs(6), "the push took {took:?}: longer than the request timeout");
    let state = admin(&["get", "pkg", "pushed", "-n", ns, "-o", "jsonpath={.status.state}"], None);
    assert_eq!(state, "READY");
    // Without a bearer token, a download goes through the aggregated API, and is checked all the same.
    let out = dir.path().join("pushed.zip");
    let downloaded = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["download", "pushed", "-n", ns, "-o", &path(&out)])
            .env("KUBECONFIG", &alice_config)
            .output()
            .unwrap()
    });
    assert!(downloaded.status.success(), "{}", String::from_utf8_lossy(&downloaded.stderr));
    let sha256 = admin(&["get", "pkg", "pushed", "-n", ns, "-o", "jsonpath={.status.checksum.value}"], None);
    assert_eq!(bitsmith::digest::to_hex(&sha2::Sha256::digest(std::fs::read(&out).unwrap())), sha256);

    // The same bytes through the aggregator are cut at the request timeout.
    let zip = crate::api::python_zip(
        dir.path(),
        "app.zip",
        &format!("z.write({:?}, 'blob.bin')", path(&app.join("blob.bin"))),
    );
    let raw = as_alice(&[
        "create",
        "--raw",
        &format!("/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/packages/raw/upload"),
        "-f",
        &path(&zip),
    ]);
    assert!(!raw.status.success(), "through kube-apiserver: {}", String::from_utf8_lossy(&raw.stdout));
    let state = admin(&["get", "pkg", "raw", "-n", ns, "-o", "jsonpath={.status.state}"], None);
    assert_ne!(state, "READY");

    // A token is for its object's upload, and for resource matches as its user; nothing else, and not for long.
    let answer = as_alice(&[
        "create",
        "--raw",
        &format!("/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/packages/raw/uploadtoken"),
        "-f",
        "/dev/null",
    ]);
    assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    let token = answer["token"].as_str().unwrap().to_string();
    let uid = |name: &str| admin(&["get", "pkg", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let api = format!("https://localhost:{port}");
    let form = || {
        reqwest::multipart::Form::new()
            .part("bits", reqwest::multipart::Part::bytes(b"PK\x05\x06".to_vec()).file_name("a.zip"))
    };
    let token = token.as_str();
    let status = |request: reqwest::RequestBuilder| async move {
        request.bearer_auth(token).send().await.unwrap().status().as_u16()
    };
    assert_eq!(status(client.post(format!("{api}/v3/packages/{}/upload", uid("other"))).multipart(form())).await, 403);
    assert_eq!(status(client.get(format!("{api}/v3/packages/{}", uid("raw")))).await, 403);
    let matches = serde_json::json!({"resources": [{"path": "a", "size_in_bytes": 70000, "checksum": {"value": "a".repeat(40)}, "mode": "644"}]});
    assert_eq!(status(client.post(format!("{api}/v3/resource_matches")).json(&matches)).await, 201);
    // A Droplet's token names the Droplet's upload, and is no good for a Package's.
    let droplet = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: drop\n  namespace: {ns}\nspec: {{}}\n"
    );
    admin(&["apply", "-f", "-"], Some(&droplet));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let answer = loop {
        let out = as_alice(&[
            "create",
            "--raw",
            &format!("/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/droplets/drop/uploadtoken"),
            "-f",
            "/dev/null",
        ]);
        // bitsmith's watch cache may trail the new Droplet by a moment.
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    let drop_uid = admin(&["get", "droplet", "drop", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    assert!(answer["upload"].as_str().unwrap().ends_with(&format!("/v3/droplets/{drop_uid}/upload")), "{answer}");
    let droplet_token = answer["token"].as_str().unwrap();
    let with_droplet_token = client
        .post(format!("{api}/v3/packages/{}/upload", uid("raw")))
        .multipart(form())
        .bearer_auth(droplet_token)
        .send()
        .await
        .unwrap();
    assert_eq!(with_droplet_token.status(), 403);
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert_eq!(
        status(client.post(format!("{api}/v3/packages/{}/upload", uid("raw"))).multipart(form())).await,
        401,
        "expired"
    );
    drop(controller);
}
