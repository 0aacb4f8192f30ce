//! The transfer budget: how many transfers (fetches and uploads together) a process runs at once, so that their
//! buffers fit its memory. An upload over the budget is refused at once (503 with Retry-After: the client tries
//! again later, perhaps on another replica); a fetch over it waits for a transfer to end.
//!
//! The default is derived from the container's memory limit (cgroup v2 `memory.max`, or v1
//! `memory.limit_in_bytes`): what is left after [`BASE_MEMORY`], in [`TRANSFER_MEMORY`] per transfer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pipeline::StageWaits;
use crate::store;

/// What a process needs besides its transfers: the runtime, the watch caches, the resource cache index, TLS,
/// the kube client, and room for the allocator's slack.
pub const BASE_MEMORY: u64 = 128 << 20;

/// The most one transfer holds: the blob's staged write and, for a package upload, the write of a file into the
/// resource cache beside it (each [`store::WRITE_MEMORY`]), plus the blocks queued for the hashes, the content
/// check and the rewrite (a few MiB).
pub const TRANSFER_MEMORY: u64 = 2 * store::WRITE_MEMORY + (16 << 20);

/// Transfers at once when the container has no memory limit.
pub const UNLIMITED_DEFAULT: usize = 8;

/// More transfers than this at once only contend for the same cores and network.
const MOST: usize = 64;

/// How many transfers fit `memory_limit` (none: [`UNLIMITED_DEFAULT`]); at least one.
pub fn transfers_for(memory_limit: Option<u64>) -> usize {
    match memory_limit {
        None => UNLIMITED_DEFAULT,
        Some(limit) => {
            usize::try_from(limit.saturating_sub(BASE_MEMORY) / TRANSFER_MEMORY).unwrap_or(MOST).clamp(1, MOST)
        }
    }
}

/// The memory the budget is sized for: what `transfers` transfers and the rest of the process may hold.
pub fn memory_for(transfers: usize) -> u64 {
    BASE_MEMORY + transfers as u64 * TRANSFER_MEMORY
}

/// This process's memory limit, from its cgroup (and every cgroup above it), if it has one.
pub fn container_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_memory_limit(Path::new("/sys/fs/cgroup"), &own)
}

/// The lowest memory limit of the cgroups `self_cgroup` (the text of `/proc/self/cgroup`) names under `root`,
/// and of their ancestors: a parent's limit binds its children too. Inside a container the cgroup's own
/// directory is the mount's root, which is looked at too.
pub fn cgroup_memory_limit(root: &Path, self_cgroup: &str) -> Option<u64> {
    let mut files = Vec::new();
    for line in self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (base, file) = match controllers {
            // cgroup v2: one unified hierarchy.
            "" => (root.to_path_buf(), "memory.max"),
            v1 if v1.split(',').any(|c| c == "memory") => (root.join("memory"), "memory.limit_in_bytes"),
            _ => continue,
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            files.push(dir.join(file));
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    files.push(root.join("memory.max"));
    files.push(root.join("memory").join("memory.limit_in_bytes"));
    files.iter().filter_map(|file| parse_limit(&std::fs::read_to_string(file).ok()?)).min()
}

/// A limit file's value; `max` (v2) and v1's "no limit" (a page-rounded `i64::MAX`) are none.
fn parse_limit(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    (limit < 1 << 62).then_some(limit)
}

/// The process's transfer slots, shared by its fetches and uploads.
#[derive(Clone, Debug)]
pub struct TransferBudget {
    slots: Arc<Semaphore>,
    max: usize,
    metrics: TransferMetrics,
}

/// The budget's metrics, registered with the process's others.
#[derive(Clone, Debug, Default)]
pub struct TransferMetrics {
    /// Transfers running.
    pub running: Gauge,
    /// Fetches waiting for a slot.
    pub waiting: Gauge,
    /// Uploads refused for want of a slot.
    pub refused: Counter,
    /// The budget.
    pub max: Gauge,
    /// Seconds transfers that stored bits took.
    pub seconds: Counter<f64, AtomicU64>,
    /// Of those, the seconds they waited on each stage ([`StageWaits`]).
    pub waited: Family<StageLabel, Counter<f64, AtomicU64>>,
}

/// A transfer's stage: source, digests, check, store, finish.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    stage: &'static str,
}

impl StageLabel {
    /// The label of `stage` (one of [`StageWaits::stages`]).
    pub fn of(stage: &'static str) -> Self {
        StageLabel { stage }
    }
}

/// A slot, held for the life of one transfer.
#[derive(Debug)]
pub struct TransferSlot {
    _permit: OwnedSemaphorePermit,
    running: Gauge,
}

impl Drop for TransferSlot {
    fn drop(&mut self) {
        self.running.dec();
    }
}

impl TransferBudget {
    /// A budget of `max` transfers at once (at least one).
    pub fn new(max: usize) -> Self {
        Self::with_metrics(max, TransferMetrics::default())
    }

    /// A budget reporting to `metrics`.
    pub fn with_metrics(max: usize, metrics: TransferMetrics) -> Self {
        let max = max.max(1);
        metrics.max.set(max as i64);
        TransferBudget { slots: Arc::new(Semaphore::new(max)), max, metrics }
    }

    /// The most transfers at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// What the budget counts.
    pub fn metrics(&self) -> &TransferMetrics {
        &self.metrics
    }

    /// Count where a transfer that stored bits spent its time.
    pub fn record(&self, waits: &StageWaits) {
        self.metrics.seconds.inc_by(waits.elapsed.as_secs_f64());
        for (stage, waited) in waits.stages() {
            self.metrics.waited.get_or_create(&StageLabel::of(stage)).inc_by(waited.as_secs_f64());
        }
    }

    /// A slot if one is free now (an upload); none counts as a refusal.
    pub fn try_start(&self) -> Option<TransferSlot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(self.slot(permit)),
            Err(_) => {
                self.metrics.refused.inc();
                None
            }
        }
    }

    /// A slot, waiting for one to be free (a fetch).
    pub async fn start(&self) -> TransferSlot {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return self.slot(permit);
        }
        let _waiting = Waiting::new(&self.metrics.waiting);
        let permit = self.slots.clone().acquire_owned().await.expect("the budget's semaphore is never closed");
        self.slot(permit)
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> TransferSlot {
        self.metrics.running.inc();
        TransferSlot { _permit: permit, running: self.metrics.running.clone() }
    }
}

impl Default for TransferBudget {
    fn default() -> Self {
        Self::new(UNLIMITED_DEFAULT)
    }
}

/// Counts a fetch as waiting while it lives, so that one cancelled while it waits stops counting.
struct Waiting(Gauge);

impl Waiting {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Waiting(gauge.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_fits_the_memory_limit() {
        assert_eq!(transfers_for(None), UNLIMITED_DEFAULT);
        // The chart's 512 MiB.
        let chart = transfers_for(Some(512 << 20));
        assert!(chart >= 1 && memory_for(chart) <= 512 << 20, "{chart}");
        assert!(memory_for(chart + 1) > 512 << 20, "{chart} leaves room for one more");
        // A limit below the base still allows one transfer; a huge one is capped.
        assert_eq!(transfers_for(Some(64 << 20)), 1);
        assert_eq!(transfers_for(Some(1 << 50)), MOST);
    }

    fn write(root: &Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn cgroup_v2_limits_are_read_up_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let own = "0::/kubepods/pod1/container\n";
        assert_eq!(cgroup_memory_limit(root.path(), own), None, "no files: no limit");
        write(root.path(), "kubepods/pod1/container/memory.max", "max\n");
        assert_eq!(cgroup_memory_limit(root.path(), own), None);
        write(root.path(), "kubepods/pod1/memory.max", "536870912\n");
        assert_eq!(cgroup_memory_limit(root.path(), own), Some(512 << 20), "the Pod's limit binds");
        write(root.path(), "kubepods/pod1/container/memory.max", "268435456\n");
        assert_eq!(cgroup_memory_limit(root.path(), own), Some(256 << 20), "the lower wins");
        // Inside the container's cgroup namespace, its own cgroup is the root.
        let inside = tempfile::tempdir().unwrap();
        write(inside.path(), "memory.max", "1073741824");
        assert_eq!(cgroup_memory_limit(inside.path(), "0::/\n"), Some(1 << 30));
    }

    #[test]
    fn cgroup_v1_limits_and_their_unlimited_value() {
        let root = tempfile::tempdir().unwrap();
        let own = "12:cpu,cpuacct:/x\n9:memory:/docker/abc\n";
        write(root.path(), "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cgroup_memory_limit(root.path(), own), None, "v1's no-limit value");
        write(root.path(), "memory/docker/abc/memory.limit_in_bytes", "402653184\n");
        assert_eq!(cgroup_memory_limit(root.path(), own), Some(384 << 20));
    }

    #[tokio::test]
    async fn uploads_are_refused_and_fetches_wait_when_the_budget_is_spent() {
        let budget = TransferBudget::new(1);
        let first = budget.try_start().expect("a free slot");
        assert!(budget.try_start().is_none(), "an upload over the budget is refused");
        assert_eq!(budget.metrics.refused.get(), 1);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.start().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a fetch over the budget waits");
        assert_eq!(budget.metrics.waiting.get(), 1);
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!((budget.metrics.waiting.get(), budget.metrics.running.get()), (0, 1));
        drop(second);
        assert_eq!(budget.metrics.running.get(), 0);
    }

    #[test]
    fn a_transfer_counts_its_time_and_its_waits_by_stage() {
        let budget = TransferBudget::new(1);
        let seconds = std::time::Duration::from_secs_f64;
        let waits =
            StageWaits { elapsed: seconds(3.0), source: seconds(1.5), store: seconds(0.5), ..Default::default() };
        budget.record(&waits);
        budget.record(&waits);
        let waited = |stage| budget.metrics.waited.get_or_create(&StageLabel::of(stage)).get();
        assert_eq!(budget.metrics.seconds.get(), 6.0);
        assert_eq!((waited("source"), waited("store"), waited("digests")), (3.0, 1.0, 0.0));
    }
}
