//! Controller benchmark against the control plane `make bench` starts (scripts/with-test-env.sh): N Packages
//! (default 1000, `BITSMITH_BENCH_PACKAGES`) are created at once, each with a small http source on loopback, and
//! the controller runs in this process with a `file://` store. Prints a table: the time until every Package is
//! READY, and the API writes per Package (status writes from the controller's own metrics, Events and finalizer
//! patches counted on the apiserver). Then the store audit over 100 000 blobs: its time and peak RSS
//! (`CONTROLLER_BENCH=audit` runs that alone). Asserts nothing about time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use bitsmith::controller::{self, Options};
use bitsmith::fetch::Fetcher;
use bitsmith::metrics::Metrics;
use bitsmith::resources::{HttpSource, Package, PackageSpec, PackageState, Source};
use bitsmith::store::BlobStore;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

// The integration tests' data generator; the benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/support/data.rs"]
mod data;
#[path = "../tests/integration/support/policy.rs"]
mod policy;
use policy::loopback_policy;

/// Bytes of each Package's source.
const BITS: usize = 16 << 10;
/// Creations in flight at once, as `kubectl apply` of a large manifest (or a GitOps tool) would send them.
const CREATORS: usize = 16;

/// `BITS` bytes that differ for each `n`, so every Package gets a blob of its own.
async fn bits(Path(n): Path<u64>) -> Vec<u8> {
    data::bytes(n, BITS)
}

fn package(n: usize, base: &str) -> Package {
    let source = Source {
        http: Some(HttpSource { url: format!("{base}/bits/{n}"), ..Default::default() }),
        ..Default::default()
    };
    let spec = PackageSpec::bits(Some(source));
    Package::new(&format!("app-{n:04}"), spec)
}

/// A counter's value in the metrics text.
fn metric(metrics: &Metrics, line_prefix: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    if std::env::var("CONTROLLER_BENCH").is_ok_and(|only| only == "audit") {
        println!("{}", audit_bench().await);
        return;
    }
    let count: usize = std::env::var("BITSMITH_BENCH_PACKAGES").map(|v| v.parse().expect("a count")).unwrap_or(1000);
    let concurrency: u16 =
        std::env::var("BITSMITH_BENCH_CONCURRENCY").map(|v| v.parse().expect("a count")).unwrap_or(8);
    std::env::var("KUBECONFIG").expect("KUBECONFIG: run through `make bench`, which starts the control plane");
    let client = Client::try_default().await.expect("a client for the control plane");

    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
    let applied = std::process::Command::new("kubectl").args(["apply", "-f", crds]).output().expect("kubectl");
    assert!(applied.status.success(), "installing the CRDs: {}", String::from_utf8_lossy(&applied.stderr));
    let ns = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().route("/bits/{n}", get(bits))).await });

    let store_dir = tempfile::tempdir_in("target").unwrap();
    let store = BlobStore::open(url::Url::from_directory_path(store_dir.path()).unwrap().as_str(), &Default::default())
        .unwrap();
    let fetcher = Fetcher::new(store, loopback_policy(None), 1 << 30).unwrap();
    let metrics = Arc::new(Metrics::new());
    let options = Options {
        concurrency,
        namespace: Some(ns.clone()),
        reporter: "bitsmith-bench".into(),
        metrics: metrics.clone(),
        urls: None,
        upload_claim_timeout: std::time::Duration::from_secs(60),
        package_retention: Default::default(),
        droplet_retention: Default::default(),
        audit: Default::default(),
    };
    tokio::spawn(controller::run(client.clone(), fetcher, options, bitsmith::leader::Leadership::always()));

    let packages: Api<Package> = Api::namespaced(client.clone(), &ns);
    let watch = watcher(packages.clone(), watcher::Config::default()).applied_objects();
    let started = Instant::now();
    let creating = futures::stream::iter(0..count)
        .map(|n| {
            let packages = packages.clone();
            let package = package(n, &base);
            async move { packages.create(&PostParams::default(), &package).await.map(|_| ()) }
        })
        .buffer_unordered(CREATORS)
        .try_collect::<()>();
    let mut ready = HashSet::new();
    let mut created_in = None;
    let waiting = async {
        let mut watch = std::pin::pin!(watch);
        while ready.len() < count {
            let package = watch.try_next().await.expect("watching Packages").expect("the watch ended");
            if package.status.as_ref().and_then(|s| s.state) == Some(PackageState::Ready) {
                ready.insert(package.name_any());
            }
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(600), async {
        let created = async {
            creating.await.expect("creating Packages");
            created_in = Some(started.elapsed());
        };
        tokio::join!(created, waiting);
    })
    .await
    .is_err();
    let all_ready = started.elapsed();
    assert!(!timed_out, "only {} of {count} Packages READY after 10 minutes", ready.len());

    // Let the last writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status_writes = metric(&metrics, "bitsmith_status_writes_total{kind=\"Package\"}");
    let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let event_writes: i32 = events.items.iter().map(|e| e.count.unwrap_or(1).max(1)).sum();
    let per = |n: f64| n / count as f64;

    println!(
        "\nbitsmith controller benchmark: {count} Packages of {} KiB on loopback http, concurrency {concurrency}, {} cores",
        BITS >> 10,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| measurement | value |");
    println!("|---|---:|");
    println!("| all {count} created | {:.1} s |", created_in.unwrap().as_secs_f64());
    println!("| all {count} READY | {:.1} s |", all_ready.as_secs_f64());
    println!("| Packages READY per second | {:.0} |", count as f64 / all_ready.as_secs_f64());
    println!("| status writes per Package | {:.2} |", per(status_writes));
    println!("| Events per Package | {:.2} |", per(f64::from(event_writes)));
    println!("| finalizer patches per Package | 1 |");

    // Remove the Packages while the controller still runs their finalizers, then the namespace.
    packages.delete_collection(&Default::default(), &ListParams::default()).await.unwrap();
    for _ in 0..120 {
        if packages.list(&ListParams::default().limit(1)).await.unwrap().items.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Api::<Namespace>::all(client).delete(&ns, &Default::default()).await.unwrap();
    println!("{}", audit_bench().await);
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The store audit over `count` blobs in a `file://` store (default 100 000, `BITSMITH_BENCH_AUDIT_BLOBS`): 1% of
/// the expected ones missing, 1% with another size, and 1% more orphaned. Returns the table.
async fn audit_bench() -> String {
    use bitsmith::audit::{Audit, Expected};
    use std::collections::{HashMap, HashSet};
    let count: usize =
        std::env::var("BITSMITH_BENCH_AUDIT_BLOBS").map(|v| v.parse().expect("a count")).unwrap_or(100_000);
    let dir = tempfile::tempdir_in("target").unwrap();
    let started = Instant::now();
    let (mut expected, mut live) = (HashMap::new(), HashSet::new());
    for n in 0..count {
        let uid = format!("{:08x}-0000-4000-8000-{n:012x}", n);
        let key = format!("packages/bench/p{n}/{uid}/{:064x}", n);
        let orphan = n % 100 == 1;
        if !orphan {
            live.insert(uid);
            expected.insert(key.clone(), Expected { size: 16, owner: n });
        }
        if n % 100 != 0 {
            let path = dir.path().join(&key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let size = if n % 100 == 2 { 17 } else { 16 };
            std::fs::write(path, vec![b'x'; size]).unwrap();
        }
    }
    let made = started.elapsed();
    let store =
        BlobStore::open(url::Url::from_directory_path(dir.path()).unwrap().as_str(), &Default::default()).unwrap();
    let before = rss_kib("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS");
    let started = Instant::now();
    let audit = Audit::new(expected, live, Duration::ZERO, std::time::SystemTime::now());
    let report = bitsmith::audit::over(audit, store.listing("packages/")).await.unwrap().finish();
    let took = started.elapsed();
    let peak = rss_kib("VmHWM:");
    let listed = count - count.div_ceil(100);
    assert_eq!(report.blobs as usize, listed);
    assert_eq!(report.findings.len(), count.div_ceil(100) + (count + 97) / 100, "missing and wrong sizes");
    assert_eq!(report.orphans.len(), (count + 98) / 100);
    [
        format!("\nstore audit: {count} expected blobs in a file:// store (made in {:.1} s)", made.as_secs_f64()),
        "| measurement | value |".into(),
        "|---|---:|".into(),
        format!("| blobs listed | {} |", report.blobs),
        format!("| findings (missing, wrong size) / orphans | {} / {} |", report.findings.len(), report.orphans.len()),
        format!("| audit time | {:.2} s ({:.0} blobs/s) |", took.as_secs_f64(), listed as f64 / took.as_secs_f64()),
        format!("| RSS before (the expected blobs, as the statuses hold them) | {:.1} MiB |", before as f64 / 1024.0),
        format!("| peak RSS during the audit, above that | {:.1} MiB |", peak.saturating_sub(before) as f64 / 1024.0),
    ]
    .join("\n")
}
