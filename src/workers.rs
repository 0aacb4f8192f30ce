//! CPU work over a stream of blocks (hashing, archive checks) on tokio's blocking pool, a batch at a time.
//!
//! A worker that waited on a channel for its next block would hold a blocking thread for the whole life of a
//! transfer, however slowly its bytes arrive: a few hundred slow uploads would exhaust the pool. Here a thread is
//! taken only while there are blocks to work on: blocks queue beside the work's state, and a job on the pool
//! takes the state and the queued blocks, and hands the state back when it is done.

use bytes::Bytes;
use tokio::task::JoinHandle;

/// Work that looks at every block of a stream, in order.
pub trait BlockWork: Send + 'static {
    /// Look at the next block. An error says why the work stopped early; no more blocks come after it.
    fn update(&mut self, block: &[u8]) -> Result<(), String>;
}

/// A batch job: the work's state back, and how its blocks went.
type Job<W> = JoinHandle<(W, Result<(), String>)>;

/// Feeds blocks to a [`BlockWork`] on the blocking pool. At most `depth` blocks wait while a job runs; beyond
/// that [`Offloaded::push`] waits for the job, which slows the producer down to the work's pace.
pub struct Offloaded<W: BlockWork> {
    /// The work's state while no job has it.
    idle: Option<W>,
    running: Option<Job<W>>,
    queued: Vec<Bytes>,
    failed: Option<String>,
    depth: usize,
}

impl<W: BlockWork> Offloaded<W> {
    /// Must be used inside a tokio runtime.
    pub fn new(work: W, depth: usize) -> Self {
        Offloaded { idle: Some(work), running: None, queued: Vec::new(), failed: None, depth: depth.max(1) }
    }

    /// Queue the next block, starting a job when none runs. False once the work has failed: the caller may stop
    /// early, and [`Offloaded::finish`] says why.
    pub async fn push(&mut self, block: Bytes) -> bool {
        if self.failed.is_some() {
            return false;
        }
        self.queued.push(block);
        let busy = self.running.as_ref().is_some_and(|job| !job.is_finished());
        if busy && self.queued.len() < self.depth {
            return true;
        }
        self.collect().await;
        if self.failed.is_some() {
            return false;
        }
        self.start();
        true
    }

    /// Work through every queued block and hand back the work's state, or the error it stopped with.
    pub async fn finish(mut self) -> Result<W, String> {
        self.collect().await;
        if self.failed.is_none() && !self.queued.is_empty() {
            self.start();
            self.collect().await;
        }
        match self.failed.take() {
            Some(error) => Err(error),
            None => Ok(self.idle.take().expect("the work's state is back once no job runs")),
        }
    }

    /// Wait for the running job, if any, and take the state back.
    async fn collect(&mut self) {
        let Some(job) = self.running.take() else { return };
        // A job ends only by working through its blocks; a panic in the work is a bug worth propagating.
        let (work, outcome) = job.await.expect("a block worker panicked");
        self.idle = Some(work);
        if let Err(error) = outcome {
            self.failed = Some(error);
            self.queued.clear();
        }
    }

    fn start(&mut self) {
        let mut work = self.idle.take().expect("no job runs");
        let blocks = std::mem::take(&mut self.queued);
        self.running = Some(tokio::task::spawn_blocking(move || {
            for block in &blocks {
                if let Err(error) = work.update(block) {
                    return (work, Err(error));
                }
            }
            (work, Ok(()))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums bytes; fails on a zero byte.
    struct Sum(u64);

    impl BlockWork for Sum {
        fn update(&mut self, block: &[u8]) -> Result<(), String> {
            for &b in block {
                if b == 0 {
                    return Err(format!("a zero after {}", self.0));
                }
                self.0 += u64::from(b);
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_block_is_worked_on_in_order() {
        let mut offloaded = Offloaded::new(Sum(0), 2);
        for i in 1..=200u8 {
            assert!(offloaded.push(Bytes::from(vec![i; 1000])).await);
        }
        let expected: u64 = (1..=200u64).map(|i| i * 1000).sum();
        assert_eq!(offloaded.finish().await.ok().map(|s| s.0), Some(expected));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_stops_the_work_and_is_reported() {
        let mut offloaded = Offloaded::new(Sum(0), 1);
        assert!(offloaded.push(Bytes::from_static(&[1, 2])).await);
        offloaded.push(Bytes::from_static(&[0])).await;
        // The failure shows by the next push at the latest: the job that saw it has been collected by then.
        assert!(!offloaded.push(Bytes::from_static(&[5])).await);
        assert_eq!(offloaded.finish().await.err(), Some("a zero after 3".to_string()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_stream_holds_no_blocking_thread() {
        let mut offloaded = Offloaded::new(Sum(0), 4);
        offloaded.push(Bytes::from_static(&[7])).await;
        // Between blocks, the job ends: nothing waits on the pool for more input.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !offloaded.running.as_ref().is_none_or(|job| job.is_finished()) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the job ends once its blocks are done, without waiting for more");
        assert_eq!(offloaded.finish().await.ok().map(|s| s.0), Some(7));
    }
}
