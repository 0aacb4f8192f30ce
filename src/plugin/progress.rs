//! Upload progress on stderr: a line redrawn in place on a terminal (bytes, rate, time left), a plain line every
//! few seconds otherwise, so that logs of a CI job stay readable.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A running progress report; [`Progress::finish`] prints the last line.
pub struct Progress {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Report `done` of `total` bytes until finished.
    pub fn start(done: Arc<AtomicU64>, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal { Duration::from_millis(200) } else { Duration::from_secs(5) };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut said_sent = false;
            loop {
                let last = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                let sent = done.load(Ordering::Relaxed);
                let mut line = line(sent, total, started.elapsed());
                if sent >= total && !last {
                    // Everything is sent; the server is still putting the package together and storing it.
                    if said_sent && !terminal {
                        continue;
                    }
                    said_sent = true;
                    line.push_str("  (the server is storing the package)");
                }
                let mut err = std::io::stderr().lock();
                let _ = if terminal { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
                if last {
                    if terminal {
                        let _ = writeln!(err);
                    }
                    return;
                }
            }
        });
        Progress { stop, task }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// `12.0 MiB / 40.0 MiB  30%  8.0 MiB/s  4s left`.
pub fn line(done: u64, total: u64, elapsed: Duration) -> String {
    let mib = |bytes: f64| bytes / (1u64 << 20) as f64;
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    let left = if rate > 0.0 && done < total {
        format!("  {}s left", ((total - done) as f64 / rate).ceil() as u64)
    } else {
        String::new()
    };
    format!("{:.1} MiB / {:.1} MiB  {percent}%  {:.1} MiB/s{left}", mib(done as f64), mib(total as f64), mib(rate))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_says_bytes_rate_and_time_left() {
        assert_eq!(
            super::line(12 << 20, 40 << 20, std::time::Duration::from_secs(2)),
            "12.0 MiB / 40.0 MiB  30%  6.0 MiB/s  5s left"
        );
        assert_eq!(super::line(0, 0, std::time::Duration::ZERO), "0.0 MiB / 0.0 MiB  100%  0.0 MiB/s");
    }
}
