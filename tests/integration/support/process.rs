//! The `bitsmith` binary as a child process of a test, against the test control plane, over a `file://` store.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::ports::free_port;

/// The claim timeout the processes run with: short, so that the tests wait little.
pub const CLAIM_TIMEOUT: &str = "4s";

/// A `bitsmith` child process, killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub ops_port: u16,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// `bitsmith <args>` for namespace `ns` over the `file://` store `store`.
    pub fn spawn(command: &str, ns: &str, store: &Path, args: &[&str]) -> Process {
        Process::spawn_at(&crate::support::kube::kubeconfig(), command, ns, store, args)
    }

    /// [`Process::spawn`] against the control plane of `kubeconfig`.
    pub fn spawn_at(kubeconfig: &str, command: &str, ns: &str, store: &Path, args: &[&str]) -> Process {
        let ops_port = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args([command, "--namespace", ns, "--metrics-listen", &format!("127.0.0.1:{ops_port}")])
            .args(["--upload-claim-timeout", CLAIM_TIMEOUT, "--store"])
            .arg(store)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .spawn()
            .unwrap();
        Process { child, ops_port }
    }

    /// The API alone, on `port`.
    pub async fn api(ns: &str, store: &Path, port: u16, instance: &str) -> Process {
        let listen = format!("127.0.0.1:{port}");
        let process = Process::spawn("api", ns, store, &["--listen", &listen, "--instance", instance]);
        process.ready().await;
        process
    }

    /// The controller, leading in `ns`.
    pub async fn controller(ns: &str, store: &Path) -> Process {
        let args = ["--leader-election-namespace", ns, "--instance", "controller-0"];
        let process = Process::spawn("controller", ns, store, &args);
        process.ready().await;
        process
    }

    pub async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.ops_port)).await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            assert!(Instant::now() < deadline, "the process did not become ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn kill9(&mut self) {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// What a process run by [`run_measured`] printed, and the most memory it held.
pub struct Measured {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    /// The peak resident set size, as the kernel accounted it when the process ended.
    pub peak_rss_kib: i64,
}

/// Run `program args` with `stdin` as its input, to its end, and measure its peak RSS (`wait4`'s `ru_maxrss`, which
/// counts this child alone).
pub fn run_measured(program: &str, args: &[&str], stdin: &str) -> Measured {
    use std::io::{Read, Write};
    use std::process::Stdio;
    // Reaped by wait4 below, which also gives its rusage; `Child::wait` would not.
    #[allow(clippy::zombie_processes)]
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the pid is this process's own child, waited for once.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    Measured {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        peak_rss_kib: usage.ru_maxrss,
    }
}
