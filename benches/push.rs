//! `bitsmith push` (the `kubectl bitsmith push` command) against the control plane `make bench` starts, with the
//! real `bitsmith controller --listen` on loopback over a `file://` store. Prints a table; asserts nothing about
//! time.
//!
//! A generated app of `BITSMITH_BENCH_PUSH_FILES` files (default 100 000; also run at a tenth of that, for the
//! push's peak RSS against the app's size) in nested directories, mixed sizes: 70 % of 64 B–1 KiB, 26 % of
//! 1–16 KiB, 3 % of 64–192 KiB and 1 % of 256 KiB–1 MiB (about 1.3 GiB at 100 000 files). Measured: the first
//! push; a second push of the same app; one with 1 % of the files changed; and `zip -r` + `curl` of the same
//! directory, as a user without the plugin would. Bytes on the wire are counted by a proxy in front of the API;
//! each push's peak RSS and CPU time are its own process's.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../tests/integration/support/data.rs"]
mod data;
#[path = "../tests/integration/support/proxy.rs"]
mod proxy;

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl").args(args).output().expect("kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The size of file `n`, by the mix above.
fn size_of(n: u64) -> usize {
    let pick = |lo: u64, hi: u64| (lo + (n.wrapping_mul(2_654_435_761) % (hi - lo))) as usize;
    match n % 100 {
        0..70 => pick(64, 1024),
        70..96 => pick(1024, 16 << 10),
        96..99 => pick(64 << 10, 192 << 10),
        _ => pick(256 << 10, 1 << 20),
    }
}

/// Write the app: `files` files, 100 to a directory, in directories two deep, their bytes drawn from `seed`
/// on. Returns its bytes.
fn generate(root: &Path, files: u64, seed: u64) -> u64 {
    let mut total = 0;
    for n in 0..files {
        let dir = root.join(format!("mod-{:03}/pkg-{:03}", n / 10_000, (n / 100) % 100));
        if n % 100 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let size = size_of(n);
        std::fs::write(dir.join(format!("file-{n}.dat")), data::bytes(seed + n, size)).unwrap();
        total += size as u64;
    }
    settle();
    total
}

/// Write what was just written to disk, so that its writeback does not land in the next measurement.
fn settle() {
    assert!(Command::new("sync").status().unwrap().success());
}

/// Change 1 % of the files (every hundredth, each of every size class in turn).
fn change_one_percent(root: &Path, files: u64) {
    for n in (0..files).step_by(100).map(|n| n + (n / 100) % 100) {
        let path = root.join(format!("mod-{:03}/pkg-{:03}/file-{n}.dat", n / 10_000, (n / 100) % 100));
        std::fs::write(path, data::bytes(n + 1_000_000_007, size_of(n))).unwrap();
    }
    settle();
}

/// What a run of a command took.
struct Measured {
    took: Duration,
    /// Peak RSS (VmHWM, polled), MiB.
    rss: f64,
    /// User and system CPU-seconds of the process, from its rusage when it was reaped.
    cpu: f64,
}

/// Run `command` to the end and measure it.
fn measured(command: &mut Command) -> Measured {
    let started = Instant::now();
    #[allow(clippy::zombie_processes, reason = "reaped by `wait4` below, which also gives its CPU time")]
    let child = command.stdout(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let status_file = format!("/proc/{pid}/status");
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak_kib = peak_kib.max(line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0));
        }
        // Reaped here rather than by `Child::try_wait`, for the CPU time the kernel reports with the exit.
        // SAFETY: rusage is plain integers, valid zeroed; wait4 on our own child writes into the two locals.
        let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid {
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{command:?} failed: {status:#x}");
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
            return Measured { took: started.elapsed(), rss: peak_kib as f64 / 1024.0, cpu };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Row {
    what: String,
    took: Duration,
    sent: u64,
    app: u64,
    rss: Option<f64>,
    /// The push's own CPU-seconds.
    cpu: Option<f64>,
}

/// The controller, stopped however the benchmark ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG: run through `make bench`");
    let files: u64 = std::env::var("BITSMITH_BENCH_PUSH_FILES").map(|v| v.parse().expect("a count")).unwrap_or(100_000);
    let ns = format!("push-bench-{}", std::process::id());
    kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds")]);
    kubectl(&["create", "namespace", &ns]);
    kubectl(&["create", "serviceaccount", "pusher", "-n", &ns]);
    let subject = format!("{ns}:pusher");
    kubectl(&[
        "create",
        "rolebinding",
        "pusher",
        "-n",
        &ns,
        "--clusterrole",
        "cluster-admin",
        "--serviceaccount",
        &subject,
    ]);
    let token = kubectl(&["create", "token", "pusher", "-n", &ns, "--duration=2h"]).trim().to_string();
    let work = tempfile::tempdir_in(std::env::var("BITSMITH_BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let store = work.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _controller = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["controller", "--namespace", &ns, "--leader-election-namespace", &ns, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--metrics-listen", "127.0.0.1:0", "--max-zip-entries", "400000"])
            .args(["--max-upload-size", "8GiB", "--max-package-size", "8GiB", "--max-size", "8GiB", "--store"])
            .arg(&store)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let proxy = proxy::Proxy::start(port, None).await;
    let (api, sent) = (proxy.url(), proxy.sent.clone());
    // The pusher's kubeconfig: the test control plane's, with the ServiceAccount's token.
    let admin = String::from_utf8(
        Command::new("kubectl")
            .args(["config", "view", "--raw", "-o", "jsonpath={.users[0].user.token}"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pusher_config = work.path().join("pusher.kubeconfig");
    std::fs::write(&pusher_config, std::fs::read_to_string(&kubeconfig).unwrap().replace(&admin, &token)).unwrap();

    // Where the pushes record what they sent, for the next push of the same directory.
    let records = work.path().join("records");
    let mut rows = Vec::new();
    let run = |app: &Path, package: &str, what: &str, app_bytes: u64, rows: &mut Vec<Row>| {
        sent.store(0, Ordering::Relaxed);
        let Measured { took, rss, cpu } = measured(
            Command::new(env!("CARGO_BIN_EXE_bitsmith"))
                .args(["push", app.to_str().unwrap(), package, "--create", "--quiet", "-n", &ns, "--api-url", &api])
                .env("KUBECONFIG", &pusher_config)
                .env("XDG_CACHE_HOME", &records),
        );
        let sent = sent.load(Ordering::Relaxed);
        rows.push(Row { what: what.into(), took, sent, app: app_bytes, rss: Some(rss), cpu: Some(cpu) });
    };

    // The push's memory against the app's size: a tenth of the files first.
    let small = work.path().join("small");
    let small_bytes = generate(&small, files / 10, 1 << 41);
    run(&small, "small", &format!("push, first, {} files", files / 10), small_bytes, &mut rows);
    std::fs::remove_dir_all(&small).unwrap();

    // What a user without the plugin does: zip the directory, then upload it with curl. On an app of the same
    // shape but other bytes, so that neither this nor the plugin's first push finds its files cached.
    let baseline = work.path().join("baseline");
    let baseline_bytes = generate(&baseline, files, 1 << 40);
    let zip = work.path().join("app.zip");
    let started = Instant::now();
    let zipped = Command::new("zip").current_dir(&baseline).args(["-q", "-r"]).arg(&zip).arg(".").status().unwrap();
    assert!(zipped.success());
    let manifest = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: curl\nspec:\n  type: bits\n";
    let mut apply = Command::new("kubectl")
        .args(["apply", "-n", &ns, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(apply.stdin.as_mut().unwrap(), manifest.as_bytes()).unwrap();
    assert!(apply.wait().unwrap().success());
    let uid = kubectl(&["get", "pkg", "curl", "-n", &ns, "-o", "jsonpath={.metadata.uid}"]);
    sent.store(0, Ordering::Relaxed);
    let mut uploaded = false;
    for _ in 0..100 {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("Authorization: bearer {token}")])
            .arg("-F")
            .arg(format!("bits=@{}", zip.display()))
            .arg(format!("{api}/v3/packages/{uid}/upload"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "200" {
            uploaded = true;
            break;
        }
        // The API's watch cache and the controller may trail the apply by a moment.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(uploaded, "curl's upload never succeeded");
    let baseline_row = Row {
        what: "zip -r + curl, an app of the same shape".into(),
        took: started.elapsed(),
        sent: sent.load(Ordering::Relaxed),
        app: baseline_bytes,
        rss: None,
        cpu: None,
    };
    std::fs::remove_dir_all(&baseline).unwrap();
    std::fs::remove_file(&zip).unwrap();

    let app = work.path().join("app");
    let app_bytes = generate(&app, files, 1);
    run(&app, "first", &format!("push, first, {files} files"), app_bytes, &mut rows);
    run(&app, "second", "push again, nothing changed", app_bytes, &mut rows);
    change_one_percent(&app, files);
    run(&app, "changed", "push again, 1 % of the files changed", app_bytes, &mut rows);
    rows.push(baseline_row);

    println!(
        "\n`bitsmith push` benchmark: {files} files, {:.2} GiB, {} cores",
        app_bytes as f64 / (1u64 << 30) as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| what | time | sent | sent / app | push peak RSS | push CPU |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.1} s | {:.1} MiB | {:.2} % | {} | {} |",
            row.what,
            row.took.as_secs_f64(),
            row.sent as f64 / (1u64 << 20) as f64,
            100.0 * row.sent as f64 / row.app as f64,
            row.rss.map(|r| format!("{r:.1} MiB")).unwrap_or_else(|| "—".into()),
            row.cpu.map(|c| format!("{c:.2} s")).unwrap_or_else(|| "—".into())
        );
    }
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
