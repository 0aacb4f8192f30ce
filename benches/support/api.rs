//! What the benchmarks that drive the real `bitsmith api` share: the control plane through `kubectl`, an
//! uploader's token, the API process, Packages and uploads, and zips of stored entries.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bitsmith::archive::zip::{EntryHeader, MADE_ON_UNIX, Sizes, ZipWriter, file_attributes};

use super::data;

pub const MIB: u64 = 1 << 20;

pub fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Write one stored entry `name` of `size` bytes of the stream `seed` (see [`data::fill`]) to `out`. The data is
/// generated twice, once for the CRC the local header carries and once to write, so that no block repeats.
pub fn stored_entry(out: &mut impl Write, writer: &mut ZipWriter, name: String, seed: u64, size: u64) {
    let mut block = vec![0u8; 8 << 20];
    let mut crc = crc32fast::Hasher::new();
    each_block(seed, size, &mut block, |b| crc.update(b));
    let sizes = Sizes { crc: crc.finalize(), compressed: size, uncompressed: size };
    out.write_all(&writer.start(&EntryHeader::new(name, 0, sizes, false))).unwrap();
    each_block(seed, size, &mut block, |b| {
        out.write_all(b).unwrap();
        writer.data(b.len());
    });
    out.write_all(&writer.end(sizes, MADE_ON_UNIX, file_attributes(0o644))).unwrap();
}

/// `size` bytes of the stream `seed`, a `block` at a time.
fn each_block(seed: u64, size: u64, block: &mut [u8], mut each: impl FnMut(&[u8])) {
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(block.len() as u64) as usize;
        data::fill(seed, offset, &mut block[..len]);
        each(&block[..len]);
        offset += len as u64;
    }
}

/// A zip of `count` stored entries of `each` bytes of distinct data (from `seed`), written with bitsmith's own
/// writer and synced.
pub fn write_zip(path: &Path, count: u64, each: u64, seed: u64) {
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut writer = ZipWriter::new();
    for n in 0..count {
        stored_entry(&mut file, &mut writer, format!("app/part-{n}.bin"), seed ^ (n << 48), each);
    }
    file.write_all(&writer.finish()).unwrap();
    file.into_inner().unwrap().sync_all().unwrap();
}

/// Install the Debian package `tool` (the command of the same name) with apt when it is missing.
pub fn ensure_installed(tool: &str) {
    let installed = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
    if !installed {
        let ok = Command::new("sh")
            .args(["-c", &format!("apt-get update -qq && apt-get install -y -qq {tool} >/dev/null")])
            .status()
            .unwrap()
            .success();
        assert!(ok, "installing {tool}");
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A fresh namespace with a ServiceAccount `uploader` bound to `bitsmith-uploader` in it; its token.
pub fn uploader(ns: &str) -> String {
    kubectl(&["create", "namespace", ns], None);
    kubectl(&["create", "serviceaccount", "uploader", "-n", ns], None);
    let subject = format!("{ns}:uploader");
    let binding = ["create", "rolebinding", "uploader", "-n", ns, "--clusterrole", "bitsmith-uploader"];
    kubectl(&[&binding[..], &["--serviceaccount", &subject]].concat(), None);
    kubectl(&["create", "token", "uploader", "-n", ns, "--duration=1h"], None).trim().to_string()
}

/// The CRDs and the user roles in the control plane `make bench` started; a fresh namespace `<prefix>-<random>`
/// and its uploader's token.
pub fn prepare_cluster(prefix: &str) -> (String, String) {
    std::env::var("KUBECONFIG").expect("KUBECONFIG: run through `make bench`, which starts the control plane");
    kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds")], None);
    kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac/user-roles.yaml")], None);
    let ns = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = uploader(&ns);
    (ns, token)
}

/// A running `bitsmith api`, killed when dropped.
pub struct Api {
    pub process: Child,
    /// Its `/metrics` URL.
    pub metrics: String,
}

impl Api {
    /// `bitsmith api` on a free loopback port over `store` (a directory or a store URL), answering once it
    /// returns.
    pub async fn start(store: &std::ffi::OsStr, args: &[&str]) -> (Api, String) {
        let free = || std::net::SocketAddr::from(([127, 0, 0, 1], super::ports::free_port()));
        let (listen, metrics) = (free(), free());
        let base = format!("http://{listen}");
        let process = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["api", "--listen", &listen.to_string(), "--metrics-listen", &metrics.to_string(), "--store"])
            .arg(store)
            .args(args)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let api = Api { process, metrics: format!("http://{metrics}/metrics") };
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if client.get(format!("{base}/v3/nothing")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (api, base)
    }

    /// Seconds its transfers took so far, then the seconds they waited on each stage, in the order of
    /// [`bitsmith::pipeline::StageWaits::STAGES`].
    pub async fn transfer_seconds(&self) -> [f64; 6] {
        let text = reqwest::get(&self.metrics).await.unwrap().text().await.unwrap();
        let value = |series: &str| super::metrics::value(&text, series).unwrap_or(0.0);
        let mut seconds = [value("bitsmith_transfer_seconds_total"), 0.0, 0.0, 0.0, 0.0, 0.0];
        for (at, stage) in bitsmith::pipeline::StageWaits::STAGES.iter().enumerate() {
            seconds[at + 1] = value(&format!("bitsmith_transfer_wait_seconds_total{{stage=\"{stage}\"}}"));
        }
        seconds
    }

    /// The sum and count of a histogram of its metrics, by the series' name and labels as printed.
    pub async fn histogram(&self, series: &str) -> (f64, f64) {
        let text = reqwest::get(&self.metrics).await.unwrap().text().await.unwrap();
        let value = |suffix: &str| {
            let (name, labels) =
                series.split_once('{').map(|(n, l)| (n, format!("{{{l}"))).unwrap_or((series, String::new()));
            super::metrics::value(&text, &format!("{name}_{suffix}{labels}")).unwrap_or(0.0)
        };
        (value("sum"), value("count"))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Create Package `name` (type bits, no source) and wait until the API knows it; its guid.
pub async fn package(client: &reqwest::Client, base: &str, token: &str, ns: &str, name: &str) -> String {
    kubectl(
        &["apply", "-n", ns, "-f", "-"],
        Some(&format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n"
        )),
    );
    let guid = kubectl(&["get", "pkg", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    // Wait for the API's watch cache to know it.
    for _ in 0..100 {
        let response = client.get(format!("{base}/v3/packages/{guid}")).bearer_auth(token).send().await.unwrap();
        if response.status() == 200 {
            return guid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the API never saw package {name}");
}

/// POST `form` to `url` and return how long until the answer, which must be 200.
pub async fn upload(client: &reqwest::Client, url: &str, token: &str, form: reqwest::multipart::Form) -> Duration {
    let started = Instant::now();
    let response = client.post(url).bearer_auth(token).multipart(form).send().await.unwrap();
    let status = response.status();
    assert_eq!(status, 200, "upload failed: {}", response.text().await.unwrap());
    started.elapsed()
}

/// The file at `path` as the form part `bits`, streamed in 1 MiB reads.
pub async fn file_part(path: &Path) -> reqwest::multipart::Part {
    use futures::StreamExt;
    let len = std::fs::metadata(path).unwrap().len();
    let file = tokio::fs::File::open(path).await.unwrap();
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        let n = file.read(&mut buf).await.ok()?;
        buf.truncate(n);
        (n > 0).then(|| (Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
    })
    .boxed();
    reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(chunks), len).file_name("app.zip")
}
