//! The resource cache between tenants, with the real `bitsmith api` binary on loopback against the real
//! control plane: a file uploaded in one namespace is offered by `resource_matches`, and taken from the cache in
//! an upload's `resources`, only for callers who may download packages in a namespace whose uploads held it —
//! unless the installer chose `--resource-cache-scope=cluster`. What decides is kept in the store, so a
//! restarted API (or another replica) decides the same.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::api::{cf_error, python_zip, sha1_hex, zip_contents};
use crate::support::data::bytes;
use crate::support::files_under;
use crate::support::kube::{
    awaiting_packages, install_crds, kube_ok, kubeconfig, namespace, service_account_token, service_account_with_role,
};
use crate::support::ports::free_port;

/// A `bitsmith api` process serving every namespace over the `file://` store in `store`; killed on drop.
struct Api {
    child: Child,
    base: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api {
    /// Start the API with `--resource-cache-scope scope` and wait until it is ready.
    async fn start(store: &Path, scope: &str) -> Api {
        let (port, ops) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["api", "--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", &format!("127.0.0.1:{ops}")])
            .args(["--resource-cache-scope", scope, "--store"])
            .arg(store)
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let api = Api { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("http://127.0.0.1:{ops}/readyz")).await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return api;
            }
            assert!(Instant::now() < deadline, "the API did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The guid of `pkg/name` in `ns`, once this API's watch cache knows it.
    async fn guid(&self, ns: &str, name: &str, token: &str) -> String {
        let guid = kube_ok(&["get", "pkg", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = reqwest::Client::new()
                .get(format!("{}/v3/packages/{guid}", self.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            if response.status() == StatusCode::OK {
                return guid;
            }
            assert!(Instant::now() < deadline, "the API never saw {ns}/{name}: {}", response.status());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The paths of `files` that `resource_matches` offers to `token`.
    async fn offered(&self, token: &str, files: &[&File]) -> Vec<String> {
        let resources: Vec<Value> = files.iter().map(|f| f.v3()).collect();
        let response = reqwest::Client::new()
            .post(format!("{}/v3/resource_matches", self.base))
            .bearer_auth(token)
            .json(&json!({ "resources": resources }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        let matched = body["resources"].as_array().unwrap();
        matched.iter().map(|r| r["path"].as_str().unwrap().to_string()).collect()
    }

    /// Upload to package `guid`: `resources` by reference and, when given, a zip in `bits`.
    async fn upload(&self, token: &str, guid: &str, resources: &[&File], bits: Option<&Path>) -> reqwest::Response {
        let resources: Vec<Value> = resources.iter().map(|f| f.v3()).collect();
        let mut form = reqwest::multipart::Form::new().text("resources", Value::from(resources).to_string());
        if let Some(zip) = bits {
            form = form.part("bits", reqwest::multipart::Part::bytes(std::fs::read(zip).unwrap()).file_name("app.zip"));
        }
        self.post_upload(token, guid, form).await
    }

    /// Upload to package `guid` the files `wanted` (path, sha1 and size) of package `base`, and a zip in `bits`;
    /// the list gzipped when `gzip`.
    async fn upload_on(
        &self,
        token: &str,
        guid: &str,
        base: &str,
        wanted: &[Value],
        bits: &Path,
        gzip: bool,
    ) -> reqwest::Response {
        let list = Value::from(wanted.to_vec()).to_string();
        let part = if gzip {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut encoder, list.as_bytes()).unwrap();
            reqwest::multipart::Part::bytes(encoder.finish().unwrap()).mime_str("application/gzip").unwrap()
        } else {
            reqwest::multipart::Part::text(list)
        };
        let form = reqwest::multipart::Form::new()
            .text("base_package", base.to_string())
            .part("base_resources", part)
            .part("bits", reqwest::multipart::Part::bytes(std::fs::read(bits).unwrap()).file_name("app.zip"));
        self.post_upload(token, guid, form).await
    }

    async fn post_upload(&self, token: &str, guid: &str, form: reqwest::multipart::Form) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v3/packages/{guid}/upload", self.base))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    async fn download(&self, token: &str, guid: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("{}/v3/packages/{guid}/download", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }
}

/// A file of the app, big enough for the cache.
struct File {
    path: &'static str,
    data: Vec<u8>,
}

impl File {
    fn new(path: &'static str, size: usize) -> File {
        // Content of this run alone, so that nothing else ever uploaded the same sha1.
        File { path, data: bytes(rand_seed(), size) }
    }

    fn sha1(&self) -> String {
        sha1_hex(&self.data)
    }

    fn v3(&self) -> Value {
        json!({"path": self.path, "size_in_bytes": self.data.len(), "checksum": {"value": self.sha1()}, "mode": "644"})
    }
}

fn rand_seed() -> u64 {
    u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap())
}

/// The keys of the store under `prefix`.
fn stored(store: &Path, prefix: &str) -> Vec<String> {
    files_under(store).into_iter().map(|f| f.display().to_string()).filter(|f| f.starts_with(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_files_are_offered_only_to_namespaces_whose_uploads_held_them() {
    tokio::task::block_in_place(install_crds);
    let (team_a, team_b) = tokio::task::block_in_place(|| (namespace("cache-a"), namespace("cache-b")));
    let (alice, bob, carol, dave) = tokio::task::block_in_place(|| {
        let alice = service_account_with_role(&team_a, "alice", "bitsmith-uploader");
        let bob = service_account_with_role(&team_b, "bob", "bitsmith-uploader");
        // Carol uploads in team-b and may also read and download in team-a.
        let carol = service_account_with_role(&team_b, "carol", "bitsmith-uploader");
        let subject = format!("{team_b}:carol");
        let binding = ["create", "rolebinding", "carol", "-n", &team_a, "--clusterrole", "bitsmith-viewer"];
        kube_ok(&[&binding[..], &["--serviceaccount", &subject]].concat(), None);
        // Dave may read team-a's Packages but not download their bits.
        let rules = "- apiGroups: [bitsmith.dev]\n  resources: [packages]\n  verbs: [get, list]\n";
        let dave = service_account_token(&team_a, "dave", Some(rules));
        kube_ok(&["apply", "-n", &team_a, "-f", "-"], Some(&awaiting_packages(&["app", "next"])));
        kube_ok(&["apply", "-n", &team_b, "-f", "-"], Some(&awaiting_packages(&["steal", "shared", "later"])));
        (alice, bob, carol, dave)
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let api = Api::start(&store, "namespace").await;

    // Alice uploads an app with two files the cache keeps (and one too small for it).
    let (one, two, unknown) =
        (File::new("app/one.bin", 100_000), File::new("app/two.bin", 120_000), File::new("app/unknown.bin", 90_000));
    for file in [&one, &two] {
        std::fs::write(dir.path().join(file.path.trim_start_matches("app/")), &file.data).unwrap();
    }
    let script = format!(
        "z.write({:?}, 'app/one.bin')\nz.write({:?}, 'app/two.bin')\nz.writestr('app/main.py', 'print(1)')",
        dir.path().join("one.bin").display().to_string(),
        dir.path().join("two.bin").display().to_string(),
    );
    let zip = python_zip(dir.path(), "app.zip", &script);
    let app = api.guid(&team_a, "app", &alice).await;
    let response = api.upload(&alice, &app, &[], Some(&zip)).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    for file in [&one, &two] {
        assert_eq!(stored(&store, &format!("resource-cache/{}/", file.sha1())).len(), 1, "the bytes, once");
        assert_eq!(
            stored(&store, &format!("resource-cache-namespaces/{}/", file.sha1())),
            [format!("resource-cache-namespaces/{}/{team_a}", file.sha1())],
            "team-a's uploads held it"
        );
    }

    // Who is offered what: the namespace's own users, and whoever may download there too; nobody else.
    let asked = [&one, &two, &unknown];
    let both = ["app/one.bin".to_string(), "app/two.bin".to_string()];
    assert_eq!(api.offered(&alice, &asked).await, both, "team-a's uploader");
    assert_eq!(api.offered(&carol, &asked).await, both, "a user who may also download in team-a");
    assert_eq!(api.offered(&bob, &asked).await, Vec::<String>::new(), "team-b's uploader");
    assert_eq!(api.offered(&dave, &asked).await, Vec::<String>::new(), "reading Packages is not downloading bits");

    // Naming team-a's file in a team-b upload is answered exactly as naming a file nobody has.
    let steal = api.guid(&team_b, "steal", &bob).await;
    let small = python_zip(dir.path(), "small.zip", "z.writestr('app/main.py', 'print(2)')");
    let mut answers = Vec::new();
    for file in [&one, &unknown] {
        let (status, title, code, detail) = cf_error(api.upload(&bob, &steal, &[file], Some(&small)).await).await;
        answers.push((status, title, code, detail.replace(&file.sha1(), "SHA1").replace(file.path, "PATH")));
    }
    assert_eq!(answers[0], answers[1], "no hint that the file exists elsewhere");
    assert_eq!((answers[0].0, answers[0].2), (StatusCode::UNPROCESSABLE_ENTITY, 10008));
    let refused = cf_error(api.upload(&bob, &steal, &[&one], None).await).await;
    assert_eq!((refused.0, refused.2), (StatusCode::UNPROCESSABLE_ENTITY, 10008), "{}", refused.3);
    let state = kube_ok(&["get", "pkg/steal", "-n", &team_b, "-o", "jsonpath={.status.state}"], None);
    assert_eq!(state, "AWAITING_UPLOAD", "team-b's package got nothing");
    assert_eq!(cf_error(api.download(&bob, &steal).await).await.3, "Package has no bits to download.");
    assert!(stored(&store, &format!("packages/{team_b}/")).is_empty(), "no blob for team-b");
    assert!(stored(&store, "staging/").is_empty(), "no staged leftovers");

    // Nor may team-b take files out of team-a's package as a base, not even Carol, who may download it: a base
    // is a package of the upload's own namespace. The answer is the one for a package that does not exist.
    let main_py = json!({"fn": "app/main.py", "sha1": sha1_hex(b"print(1)"), "size": 8, "mode": "644"});
    let mut answers = Vec::new();
    for (who, base) in [(&bob, app.as_str()), (&carol, app.as_str()), (&bob, "no-such-package")] {
        let (status, _, code, detail) =
            cf_error(api.upload_on(who, &steal, base, std::slice::from_ref(&main_py), &small, true).await).await;
        answers.push((status, code, detail.replace(base, "BASE")));
    }
    assert_eq!(answers[0], answers[2], "no hint that team-a's package exists");
    assert_eq!(answers[1], answers[2]);
    assert_eq!((answers[0].0, answers[0].1), (StatusCode::UNPROCESSABLE_ENTITY, 10008), "{}", answers[0].2);
    let state = kube_ok(&["get", "pkg/steal", "-n", &team_b, "-o", "jsonpath={.status.state}"], None);
    assert_eq!(state, "AWAITING_UPLOAD", "refused bases leave the package awaiting an upload");

    // In team-a, Alice's next upload sends one new file and takes two from her last package — a small one the
    // cache never holds among them — each checked against its sha1 and size.
    let next = api.guid(&team_a, "next", &alice).await;
    let new_file = python_zip(dir.path(), "new.zip", "z.writestr('app/new.txt', 'new')");
    let lie = json!({"fn": "app/main.py", "sha1": sha1_hex(b"print(9)"), "size": 8, "mode": "644"});
    let (status, _, code, detail) = cf_error(api.upload_on(&alice, &next, &app, &[lie], &new_file, false).await).await;
    assert_eq!((status, code), (StatusCode::UNPROCESSABLE_ENTITY, 10008), "{detail}");
    assert!(detail.contains("app/main.py") && detail.contains("does not have sha1"), "{detail}");
    let missing = json!({"fn": "app/gone.txt", "sha1": sha1_hex(b"x"), "size": 1, "mode": "644"});
    let (status, _, _, detail) = cf_error(api.upload_on(&alice, &next, &app, &[missing], &new_file, false).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("app/gone.txt") && detail.contains("is not in base package"), "{detail}");
    let two_v3 = two.v3();
    let response = api.upload_on(&alice, &next, &app, &[main_py.clone(), two_v3], &new_file, true).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let bits = api.download(&alice, &next).await.bytes().await.unwrap();
    assert_eq!(
        zip_contents(&bits),
        [
            format!("app/main.py:{}", sha1_hex(b"print(1)")),
            format!("app/new.txt:{}", sha1_hex(b"new")),
            format!("app/two.bin:{}", two.sha1())
        ]
    );

    // Carol may use team-a's file in a team-b package; then team-b holds it, and its users are offered it.
    let shared = api.guid(&team_b, "shared", &carol).await;
    let response = api.upload(&carol, &shared, &[&one], Some(&small)).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let bits = api.download(&bob, &shared).await.bytes().await.unwrap();
    assert_eq!(
        zip_contents(&bits),
        [format!("app/main.py:{}", sha1_hex(b"print(2)")), format!("app/one.bin:{}", one.sha1())]
    );
    assert_eq!(api.offered(&bob, &asked).await, ["app/one.bin"], "team-b holds one.bin now, not two.bin");
    drop(api);

    // Restarted, the API decides the same from the store alone.
    let again = Api::start(&store, "namespace").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while again.offered(&alice, &asked).await != both {
        assert!(Instant::now() < deadline, "the restarted API never listed the cache");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(again.offered(&bob, &asked).await, ["app/one.bin"]);
    drop(again);

    // With the cluster-wide pool, team-b is offered and may use everything the cache holds.
    let cluster = Api::start(&store, "cluster").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.offered(&bob, &asked).await != both {
        assert!(Instant::now() < deadline, "team-b is not offered team-a's files with --resource-cache-scope=cluster");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let later = cluster.guid(&team_b, "later", &bob).await;
    let response = cluster.upload(&bob, &later, &[&two], None).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let bits = cluster.download(&bob, &later).await.bytes().await.unwrap();
    assert_eq!(zip_contents(&bits), [format!("app/two.bin:{}", two.sha1())]);
}
