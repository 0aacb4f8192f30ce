//! CF v3 API benchmark against the control plane `make bench` starts (scripts/with-test-env.sh), with the real
//! `bitsmith api` binary on loopback and a `file://` store. Prints a table; asserts nothing about time.
//!
//! - Peak RSS of the API process during the upload of a zip (default 2 GiB, `BITSMITH_BENCH_UPLOAD_SIZE`) of four
//!   stored entries, above its idle RSS. (Throughput against the machine's limits is the transfer benchmark's,
//!   `benches/pipeline.rs`.)
//! - `POST /v3/resource_matches` with 5000 entries, 150 of them cached by uploads in three namespaces of which
//!   the caller may download in two (so each request asks Kubernetes about three): median latency of 20
//!   requests while the answers are cached, and of 5 requests after the auth caches expired, with how long
//!   kube-apiserver took to answer their reviews (from the API's own metrics).
//! - `GET /v3/packages/:guid` requests per second under `wrk` (installed with apt when missing).
//! - The transfer budget: twice `--max-concurrent-transfers` (default 4, `BITSMITH_BENCH_TRANSFERS`) uploads of a
//!   1 GiB zip (four 256 MiB entries, each cached: the costliest upload) started at once, the refused ones tried
//!   again after Retry-After; the API's peak RSS against the memory figure the budget is sized for.
//!
//! `API_BENCH=budget` runs the budget measurement alone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bitsmith::archive::zip::ZipWriter;
use bitsmith::store::BlobStore;
use serde_json::{Value, json};

// The integration tests' data generator; the benchmarks use only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/support/data.rs"]
mod data;
#[path = "../tests/integration/support/metrics.rs"]
mod metrics;
#[path = "../tests/integration/support/ports.rs"]
mod ports;
// Shared with the transfer benchmark, which uses parts this one does not.
#[allow(dead_code)]
#[path = "support/api.rs"]
mod support;
use support::{
    Api, MIB, file_part, kubectl, package, prepare_cluster, rss_kib, stored_entry, upload, uploader, write_zip,
};

fn wrk(url: &str, token: &str) -> f64 {
    support::ensure_installed("wrk");
    let out = Command::new("wrk")
        .args(["-t2", "-c32", "-d10s", "-H", &format!("Authorization: bearer {token}"), url])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"))
}

#[tokio::main]
async fn main() {
    let size: u64 = std::env::var("BITSMITH_BENCH_UPLOAD_SIZE").map(|v| v.parse().expect("bytes")).unwrap_or(2 << 30);
    let each = (size / 4).div_ceil(8 * MIB) * 8 * MIB;
    let dir = tempfile::tempdir_in("target").unwrap();
    let zip = dir.path().join("app.zip");
    write_zip(&zip, 4, each, 1);
    let zip_len = std::fs::metadata(&zip).unwrap().len();
    let (ns, token) = prepare_cluster("bench-api");

    if std::env::var("API_BENCH").is_ok_and(|only| only == "budget") {
        let table = budget(dir.path(), &ns, &token).await;
        println!("{table}");
        kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
        return;
    }
    let store_dir: PathBuf = dir.path().join("store");
    let limit = format!("{}", 2 * size + 64 * MIB);
    let size_args = ["--max-upload-size", &limit, "--max-package-size", &limit];
    let (api, base) = Api::start(store_dir.as_os_str(), &size_args).await;
    let pid = api.process.id();
    let client = reqwest::Client::new();

    // Upload throughput and memory.
    let big = package(&client, &base, &token, &ns, "big").await;
    let idle = rss_kib(pid, "VmRSS:");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting the peak RSS");
    let took = upload(&client, &format!("{base}/v3/packages/{big}/upload"), &token, {
        reqwest::multipart::Form::new().part("bits", file_part(&zip).await)
    })
    .await;
    let peak = rss_kib(pid, "VmHWM:");
    let upload_mbs = zip_len as f64 / took.as_secs_f64() / 1e6;

    // Resource matches: 5000 entries, 50 of them cached by uploads in each of three namespaces: the caller's,
    // a peer where the caller may download too, and another where it may not.
    let (peer, other) = (format!("{ns}-peer"), format!("{ns}-other"));
    let tokens = [token.clone(), uploader(&peer), uploader(&other)];
    let subject = format!("{ns}:uploader");
    let binding = ["create", "rolebinding", "bench-peer", "-n", &peer, "--clusterrole", "bitsmith-viewer"];
    kubectl(&[&binding[..], &["--serviceaccount", &subject]].concat(), None);
    let mut files = Vec::new();
    for (i, (namespace, uploader)) in [&ns, &peer, &other].into_iter().zip(&tokens).enumerate() {
        let cached = package(&client, &base, uploader, namespace, "cached").await;
        let small = dir.path().join(format!("small-{i}.zip"));
        let mut out = std::fs::File::create(&small).unwrap();
        let mut writer = ZipWriter::new();
        for n in 0..50u64 {
            let seed = 1000 + 100 * i as u64 + n;
            stored_entry(&mut out, &mut writer, format!("lib/file-{n}.bin"), seed, 70_000);
            let data = data::bytes(seed, 70_000);
            files.push(bitsmith::digest::to_hex(&<sha1::Sha1 as sha1::Digest>::digest(&data)));
        }
        out.write_all(&writer.finish()).unwrap();
        upload(&client, &format!("{base}/v3/packages/{cached}/upload"), uploader, {
            reqwest::multipart::Form::new().part("bits", file_part(&small).await)
        })
        .await;
    }
    let resources: Vec<Value> = (0..5000)
        .map(|n| {
            let sha1 = files.get(n).cloned().unwrap_or_else(|| format!("{:040x}", n * 7919 + 1));
            json!({"checksum": {"value": sha1}, "size_in_bytes": 70_000, "path": format!("lib/file-{n}.bin"), "mode": "644"})
        })
        .collect();
    let body = json!({ "resources": resources }).to_string();
    let (client, base, token, body) = (&client, &base, &token, &body);
    let matches = move || async move {
        let started = Instant::now();
        let response = client
            .post(format!("{base}/v3/resource_matches"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let matched: Value = response.json().await.unwrap();
        let took = started.elapsed();
        assert_eq!(matched["resources"].as_array().map(Vec::len), Some(100), "the 100 files of two namespaces match");
        took
    };
    let median_ms = |mut latencies: Vec<Duration>| {
        latencies.sort();
        latencies[latencies.len() / 2].as_secs_f64() * 1e3
    };
    // Cold requests, with what kube-apiserver took to answer their reviews (the API's own histogram of them).
    let reviews = |kind: &'static str| {
        let series = format!("bitsmith_kubernetes_review_duration_seconds{{kind=\"{kind}\"}}");
        let api = &api;
        async move { api.histogram(&series).await }
    };
    let (mut cold, mut token_reviews, mut access_reviews, mut own) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        // The API reuses TokenReview and SubjectAccessReview answers for 10 s.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let (tr, sar) = (reviews("TokenReview").await, reviews("SubjectAccessReview").await);
        let took = matches().await;
        let (tr_after, sar_after) = (reviews("TokenReview").await, reviews("SubjectAccessReview").await);
        assert_eq!((tr_after.1 - tr.1, sar_after.1 - sar.1), (1.0, 3.0), "one TokenReview, three SubjectAccessReviews");
        let token_review = Duration::from_secs_f64(tr_after.0 - tr.0);
        // The three are asked at once: the batch took at least their mean.
        let access_review = Duration::from_secs_f64((sar_after.0 - sar.0) / 3.0);
        cold.push(took);
        token_reviews.push(token_review);
        access_reviews.push(access_review);
        own.push(took.saturating_sub(token_review + access_review));
    }
    let mut warm = Vec::new();
    for _ in 0..20 {
        warm.push(matches().await);
    }
    let (cold_ms, matches_ms) = (median_ms(cold), median_ms(warm));
    let (token_review_ms, access_review_ms, own_ms) =
        (median_ms(token_reviews), median_ms(access_reviews), median_ms(own));

    let rps = wrk(&format!("{base}/v3/packages/{big}"), token);
    drop(api);
    let budget_table = budget(dir.path(), &ns, token).await;

    println!(
        "\nbitsmith API benchmark: {:.2} GiB zip upload, {} cores",
        zip_len as f64 / (1u64 << 30) as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| measurement | value | target |");
    println!("|---|---:|---:|");
    println!("| upload (multipart, zip checked and rewritten; see the transfer benchmark) | {upload_mbs:.0} MB/s | |");
    println!(
        "| API peak RSS during the upload, above idle | {:.1} MiB | ≤ 64 MiB |",
        (peak.saturating_sub(idle)) as f64 / 1024.0
    );
    println!("| API idle RSS | {:.1} MiB | |", idle as f64 / 1024.0);
    println!("| resource_matches, 5000 entries over 3 namespaces (median of 20) | {matches_ms:.1} ms | < 50 ms |");
    println!(
        "| resource_matches, same, auth caches expired: 1 TokenReview + 3 SubjectAccessReviews at once (median of 5) | {cold_ms:.1} ms | < 50 ms |"
    );
    println!("| of which kube-apiserver answering the TokenReview | {token_review_ms:.1} ms | |");
    println!(
        "| of which kube-apiserver answering the SubjectAccessReviews (mean of the three) | {access_review_ms:.1} ms | |"
    );
    println!("| the rest: bitsmith's own time, at most | {own_ms:.1} ms | |");
    println!("| GET /v3/packages/:guid (wrk, 2 threads, 32 connections, 10 s) | {rps:.0} req/s | |");
    println!("{budget_table}");

    for namespace in [&ns, &peer, &other] {
        kubectl(&["delete", "namespace", namespace, "--wait=false"], None);
    }
}

/// The transfer budget's tables: on a `file://` store, and on Garage's S3 (whose writes keep parts in flight).
async fn budget(dir: &Path, ns: &str, token: &str) -> String {
    let zip = dir.join("budget.zip");
    write_zip(&zip, 4, 256 * MIB, 2);
    let file_store = dir.join("budget-store");
    let file = budget_on(&zip, file_store.as_os_str(), &[], "file", ns, token).await;
    let _ = std::fs::remove_dir_all(&file_store);
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}: run through `make bench`"));
    let s3 = format!(
        "s3://{}/bench-budget-{}?endpoint={}&path_style=true&region=us-east-1",
        var("BITSMITH_TEST_S3_BUCKET"),
        &uuid::Uuid::new_v4().simple().to_string()[..8],
        var("BITSMITH_TEST_S3_ENDPOINT")
    );
    let key = format!("aws_access_key_id={}", var("BITSMITH_TEST_S3_ACCESS_KEY"));
    let secret = format!("aws_secret_access_key={}", var("BITSMITH_TEST_S3_SECRET_KEY"));
    let options = ["--store-opt", &key, "--store-opt", &secret];
    let table = budget_on(&zip, s3.as_ref(), &options, "s3", ns, token).await;
    let credentials = [
        ("aws_access_key_id".to_string(), var("BITSMITH_TEST_S3_ACCESS_KEY")),
        ("aws_secret_access_key".to_string(), var("BITSMITH_TEST_S3_SECRET_KEY")),
    ];
    let store = BlobStore::open(&s3, &credentials.into_iter().collect()).unwrap();
    for (key, _) in store.list("").await.unwrap() {
        store.delete(&key).await.unwrap();
    }
    format!("{file}\n{table}")
}

/// Twice the budget of uploads of `zip` started at once against an API with `--max-concurrent-transfers` over
/// `store`; the refused ones wait as Retry-After says and try again. Returns the table of what the API's memory
/// did.
async fn budget_on(zip: &Path, store: &std::ffi::OsStr, args: &[&str], name: &str, ns: &str, token: &str) -> String {
    let transfers: usize = std::env::var("BITSMITH_BENCH_TRANSFERS").map(|v| v.parse().expect("a count")).unwrap_or(4);
    let max = transfers.to_string();
    let (api, base) = Api::start(store, &[args, &["--max-concurrent-transfers", &max]].concat()).await;
    let pid = api.process.id();
    let client = reqwest::Client::new();
    let mut guids = Vec::new();
    for n in 0..2 * transfers {
        guids.push(package(&client, &base, token, ns, &format!("budget-{name}-{n}")).await);
    }
    let idle = rss_kib(pid, "VmRSS:");
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let uploads = guids.iter().map(|guid| {
        let (client, url, refusals) = (client.clone(), format!("{base}/v3/packages/{guid}/upload"), refusals.clone());
        async move {
            loop {
                let form = reqwest::multipart::Form::new().part("bits", file_part(zip).await);
                let response = client.post(&url).bearer_auth(token).multipart(form).send().await.unwrap();
                if response.status() != 503 {
                    assert_eq!(response.status(), 200, "upload failed: {}", response.text().await.unwrap());
                    return;
                }
                refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let wait: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        }
    });
    futures::future::join_all(uploads).await;
    let took = started.elapsed();
    let peak = rss_kib(pid, "VmHWM:");
    drop(api);
    let figure = bitsmith::budget::memory_for(transfers);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let uploaded = (2 * transfers) as u64 * std::fs::metadata(zip).unwrap().len();
    [
        format!(
            "\ntransfer budget, {name} store: {} uploads of a 1 GiB zip at once, --max-concurrent-transfers {transfers}",
            2 * transfers
        ),
        "| measurement | value | target |".into(),
        "|---|---:|---:|".into(),
        format!(
            "| uploads answered 503 + Retry-After, then tried again | {} | |",
            refusals.load(std::sync::atomic::Ordering::Relaxed)
        ),
        format!(
            "| all {} uploaded | {:.1} s ({:.0} MB/s) | |",
            2 * transfers,
            took.as_secs_f64(),
            uploaded as f64 / took.as_secs_f64() / 1e6
        ),
        format!("| API idle RSS | {:.1} MiB | |", mib(idle)),
        format!("| API peak RSS | {:.1} MiB | ≤ the budget's figure |", mib(peak)),
        format!(
            "| the budget's figure: {} MiB + {transfers} × {} MiB | {} MiB | |",
            bitsmith::budget::BASE_MEMORY >> 20,
            bitsmith::budget::TRANSFER_MEMORY >> 20,
            figure >> 20
        ),
        format!(
            "| peak above idle, per transfer | {:.1} MiB | ≤ {} MiB |",
            mib(peak.saturating_sub(idle)) / transfers as f64,
            bitsmith::budget::TRANSFER_MEMORY >> 20
        ),
    ]
    .join("\n")
}
