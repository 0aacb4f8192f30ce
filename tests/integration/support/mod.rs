//! Shared test parts: generated data, a loopback HTTP server, and the object-store servers the test scripts start.

pub mod cloud;
pub mod data;
pub mod http_server;
pub mod kube;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod ports;
pub mod process;
pub mod proxy;

pub use policy::loopback_policy;

use std::path::{Path, PathBuf};

/// Every regular file below `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

use bitsmith::fetch::Fetcher;
use bitsmith::sources::{HttpFetcher, HttpOptions};
use bitsmith::store::{BlobOwner, BlobStore};

/// A fetcher over a fresh `file://` store in `dir`, allowed to read files below `/`.
pub fn file_fetcher(dir: &Path, max_size: u64) -> Fetcher {
    fetcher(file_store(dir), HttpOptions::default(), max_size)
}

/// A fetcher over `store` with the given http options, whose sources may reach loopback (where the test
/// servers are) and read files below `/`.
pub fn fetcher(store: BlobStore, http: HttpOptions, max_size: u64) -> Fetcher {
    let policy = loopback_policy(Some("/".into()));
    let http = HttpFetcher::new(http, policy.egress.clone()).unwrap();
    Fetcher { store, http, policy, max_size, budget: Default::default() }
}

/// A `file://` store rooted at `dir`.
pub fn file_store(dir: &Path) -> BlobStore {
    let url = url::Url::from_directory_path(dir).unwrap();
    BlobStore::open(url.as_str(), &Default::default()).unwrap()
}

/// A Package owner for blob keys.
pub fn owner(name: &str) -> BlobOwner {
    BlobOwner {
        plural: "packages",
        namespace: "tests".into(),
        name: name.into(),
        uid: Some(uuid::Uuid::new_v4().to_string()),
    }
}

/// An http source without credentials.
pub fn http_source(url: String) -> bitsmith::resources::Source {
    bitsmith::resources::Source {
        http: Some(bitsmith::resources::HttpSource { url, ..Default::default() }),
        ..Default::default()
    }
}

/// Fetch `source` for a fresh owner named `name`, with no pin, Secret or source Package.
pub async fn plain_fetch(
    fetcher: &Fetcher,
    name: &str,
    source: &bitsmith::resources::Source,
) -> Result<bitsmith::pipeline::Stored, bitsmith::pipeline::PipelineError> {
    fetcher.fetch(&owner(name), source, None, bitsmith::fetch::Inputs::default()).await
}

/// A self-signed certificate for 127.0.0.1, made with the openssl command line.
pub fn self_signed() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=bitsmith test CA", "-addext", "subjectAltName=IP:127.0.0.1", "-addext"])
        .args(["basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}
