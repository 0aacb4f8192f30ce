//! Prometheus metrics of the controller: what it reconciled, how long that took, what it wrote, and how many
//! objects are in each state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    kind: String,
    state: String,
}

type HistogramFamily = Family<KindLabel, Histogram, fn() -> Histogram>;

/// The controller's metrics, registered once and shared by every reconcile.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    reconcile_errors: Family<KindLabel, Counter>,
    reconcile_seconds: HistogramFamily,
    status_writes: Family<KindLabel, Counter>,
    stored_bytes: Counter,
    objects: Family<StateLabels, Gauge>,
    audit_blobs: Gauge,
    audit_bytes: Gauge,
    audit_findings: Counter,
    orphans_removed: Counter,
    /// How long kube-apiserver took to answer the API's reviews, by kind (TokenReview, SubjectAccessReview):
    /// a cold API request waits on them, and this tells their share from bitsmith's.
    review_seconds: HistogramFamily,
    /// The transfer budget's slots, shared by fetches and uploads.
    pub transfers: crate::budget::TransferMetrics,
    /// The last state each object was seen in, by `kind/namespace/name`; the `objects` gauges are counted from
    /// it at scrape time, so they never drift from what the controller saw.
    states: Mutex<HashMap<String, (String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bitsmith");
        let reconciles = Family::<KindLabel, Counter>::default();
        let reconcile_errors = Family::<KindLabel, Counter>::default();
        let reconcile_seconds: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        let status_writes = Family::<KindLabel, Counter>::default();
        let stored_bytes = Counter::default();
        let objects = Family::<StateLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles finished", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed and will be retried", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "How long reconciles took", reconcile_seconds.clone());
        registry.register("status_writes", "Status writes to the Kubernetes API", status_writes.clone());
        registry.register("stored_bytes", "Bytes of bits stored", stored_bytes.clone());
        registry.register("objects", "Objects by kind and CF state, as last reconciled", objects.clone());
        let (audit_blobs, audit_bytes) = (Gauge::default(), Gauge::default());
        let (audit_findings, orphans_removed) = (Counter::default(), Counter::default());
        registry.register("store_blobs", "Blobs in the store, as the last audit listed them", audit_blobs.clone());
        registry.register("store_bytes", "Bytes in the store, as the last audit listed them", audit_bytes.clone());
        registry.register("audit_findings", "Objects whose bits an audit found gone or wrong", audit_findings.clone());
        registry.register("orphans_removed", "Blobs removed because no object owns them", orphans_removed.clone());
        let review_seconds: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14)));
        registry.register(
            "kubernetes_review_duration_seconds",
            "How long kube-apiserver took to answer a TokenReview or SubjectAccessReview",
            review_seconds.clone(),
        );
        let transfers = crate::budget::TransferMetrics::default();
        registry.register("transfers_running", "Fetches and uploads running", transfers.running.clone());
        registry.register("transfers_waiting", "Fetches waiting for a transfer slot", transfers.waiting.clone());
        registry.register(
            "transfers_refused",
            "Uploads refused for want of a transfer slot",
            transfers.refused.clone(),
        );
        registry.register(
            "transfers_max",
            "Transfers allowed at once (--max-concurrent-transfers)",
            transfers.max.clone(),
        );
        registry.register("transfer_seconds", "Seconds transfers that stored bits took", transfers.seconds.clone());
        registry.register(
            "transfer_wait_seconds",
            "Of those, the seconds they waited on each stage: for the source's bytes, for full queues of the \
             digests, the content check or the store, and for the end (last digests, check verdict, commit)",
            transfers.waited.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            status_writes,
            stored_bytes,
            objects,
            audit_blobs,
            audit_bytes,
            audit_findings,
            orphans_removed,
            review_seconds,
            transfers,
            states: Mutex::default(),
        }
    }

    fn kind(kind: &str) -> KindLabel {
        KindLabel { kind: kind.to_string() }
    }

    /// A reconcile of a `kind` finished after `took`; `failed` when it will be retried.
    pub fn reconciled(&self, kind: &str, took: Duration, failed: bool) {
        self.reconciles.get_or_create(&Self::kind(kind)).inc();
        self.reconcile_seconds.get_or_create(&Self::kind(kind)).observe(took.as_secs_f64());
        if failed {
            self.reconcile_errors.get_or_create(&Self::kind(kind)).inc();
        }
    }

    /// A status was written.
    pub fn status_written(&self, kind: &str) {
        self.status_writes.get_or_create(&Self::kind(kind)).inc();
    }

    /// Bytes were stored.
    pub fn stored(&self, bytes: u64) {
        self.stored_bytes.inc_by(bytes);
    }

    /// An audit listed `blobs` blobs of `bytes` in all, and found `findings` objects' bits wrong.
    pub fn audited(&self, blobs: u64, bytes: u64, findings: u64) {
        self.audit_blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
        self.audit_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.audit_findings.inc_by(findings);
    }

    /// A verification found `wrong` blobs hashing to other bits than recorded.
    pub fn audited_digests(&self, wrong: u64) {
        self.audit_findings.inc_by(wrong);
    }

    /// kube-apiserver answered a review of `kind` after `took`.
    pub fn reviewed(&self, kind: &str, took: Duration) {
        self.review_seconds.get_or_create(&Self::kind(kind)).observe(took.as_secs_f64());
    }

    /// An orphaned blob was removed.
    pub fn orphan_removed(&self) {
        self.orphans_removed.inc();
    }

    /// The object `key` (`kind/namespace/name`) is in `state`, or gone when `None`.
    pub fn object_state(&self, kind: &str, key: String, state: Option<String>) {
        let mut states = self.states.lock().expect("metrics lock");
        match state {
            Some(state) => states.insert(key, (kind.to_string(), state)),
            None => states.remove(&key),
        };
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        self.objects.clear();
        for (kind, state) in self.states.lock().expect("metrics lock").values() {
            self.objects.get_or_create(&StateLabels { kind: kind.clone(), state: state.clone() }).inc();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_states() {
        let metrics = Metrics::new();
        metrics.reconciled("Package", Duration::from_millis(20), false);
        metrics.reconciled("Package", Duration::from_millis(20), true);
        metrics.status_written("Package");
        metrics.stored(1234);
        metrics.reviewed("TokenReview", Duration::from_millis(3));
        metrics.object_state("Package", "Package/ns/a".into(), Some("READY".into()));
        metrics.object_state("Package", "Package/ns/b".into(), Some("READY".into()));
        metrics.object_state("Package", "Package/ns/b".into(), None);
        let text = metrics.encode();
        assert!(text.contains("bitsmith_reconciles_total{kind=\"Package\"} 2"), "{text}");
        assert!(text.contains("bitsmith_reconcile_errors_total{kind=\"Package\"} 1"), "{text}");
        assert!(text.contains("bitsmith_status_writes_total{kind=\"Package\"} 1"), "{text}");
        assert!(text.contains("bitsmith_stored_bytes_total 1234"), "{text}");
        let budget = crate::budget::TransferBudget::with_metrics(1, metrics.transfers.clone());
        let waits = crate::pipeline::StageWaits {
            elapsed: Duration::from_millis(2500),
            source: Duration::from_millis(1500),
            ..Default::default()
        };
        budget.record(&waits);
        let text = metrics.encode();
        assert!(text.contains("bitsmith_transfer_seconds_total 2.5"), "{text}");
        assert!(text.contains("bitsmith_transfer_wait_seconds_total{stage=\"source\"} 1.5"), "{text}");
        assert!(text.contains("bitsmith_transfer_wait_seconds_total{stage=\"finish\"} 0"), "{text}");
        assert!(text.contains("bitsmith_kubernetes_review_duration_seconds_count{kind=\"TokenReview\"} 1"), "{text}");
        assert!(text.contains("bitsmith_objects{kind=\"Package\",state=\"READY\"} 1"), "{text}");
    }
}
