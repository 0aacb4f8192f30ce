//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas only one reconciles.
//!
//! The rules are client-go's, so that two replicas never lead at once even when their clocks disagree or one
//! of them is frozen (SIGSTOP, a paused VM) or cut off from the API server:
//!
//! - A follower takes the Lease when nobody holds it, or when the Lease has not changed for a whole lease
//!   duration *as the follower's own monotonic clock measures it* from when it first saw that version. Wall
//!   clocks of different nodes are never compared.
//! - The leader renews every `retry_every`; every call has a timeout. It leads only until `renew_deadline`
//!   (shorter than the lease duration) after the start of its last successful renewal: past that it stops at
//!   once, cancelling its work, before any follower may take over.
//! - [`Leadership::check`] tells work about to write whether the leader still holds the Lease by that rule, so
//!   that a leader resumed after a freeze writes nothing before it notices.
//!
//! Every write of the Lease carries its resourceVersion, so two replicas racing for it cannot both win.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Where the Lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity, written as the Lease's holder (e.g. the Pod's name).
    pub identity: String,
    /// How long a Lease stays valid without renewal; a new leader takes over at most this long (plus
    /// `retry_every`) after the old one stopped renewing.
    pub duration: Duration,
    /// The leader stops leading this long after the start of its last successful renewal. Shorter than
    /// `duration`, so that it has stopped before anyone else may start.
    pub renew_deadline: Duration,
    /// How often the leader renews, and a follower tries to take the Lease.
    pub retry_every: Duration,
}

impl LeaseConfig {
    /// Kubernetes' usual timing: a 15 s lease, a 10 s renew deadline, tried every 2 s.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }

    /// Whether the timings keep two leaders apart: retries well within the deadline, the deadline within the
    /// duration.
    pub fn check(&self) -> Result<(), String> {
        if self.retry_every.is_zero() || self.retry_every >= self.renew_deadline {
            return Err("the retry period must be shorter than the renew deadline".into());
        }
        if self.renew_deadline >= self.duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        Ok(())
    }
}

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the lease {namespace}/{name}: {reason}")]
    Lost { namespace: String, name: String, reason: String },
}

/// Whether this replica may act as the leader now. Cloned into the work; always valid when leader election is
/// off.
#[derive(Clone, Debug)]
pub struct Leadership {
    inner: Option<Arc<Deadline>>,
}

#[derive(Debug)]
struct Deadline {
    origin: Instant,
    /// Nanoseconds after `origin` until which this replica leads; 0 before it first does.
    until: AtomicU64,
}

impl Leadership {
    /// For a replica that leads without election (a single replica).
    pub fn always() -> Self {
        Leadership { inner: None }
    }

    /// For a replica taking part in an election: not leading until it wins.
    pub(crate) fn elected() -> Self {
        Leadership { inner: Some(Arc::new(Deadline { origin: Instant::now(), until: AtomicU64::new(0) })) }
    }

    /// Whether this replica still leads, by its own clock.
    pub fn check(&self) -> bool {
        let Some(deadline) = &self.inner else { return true };
        let now = deadline.origin.elapsed().as_nanos() as u64;
        now < deadline.until.load(Ordering::Acquire)
    }

    /// Lead until `until`.
    fn extend(&self, until: Instant) {
        if let Some(deadline) = &self.inner {
            let nanos = until.saturating_duration_since(deadline.origin).as_nanos() as u64;
            deadline.until.store(nanos, Ordering::Release);
        }
    }

    fn revoke(&self) {
        if let Some(deadline) = &self.inner {
            deadline.until.store(0, Ordering::Release);
        }
    }
}

/// What a follower last saw of the Lease, and since when (by its own clock).
#[derive(Debug, PartialEq)]
struct Observed {
    holder: String,
    version: Option<String>,
}

/// The Lease's holder as a follower judges it: free to take, or held for at most this much longer.
#[derive(Debug, PartialEq)]
pub enum Holder {
    Free,
    Held { for_at_most: Duration },
}

/// Judge a Lease held by `holder` whose record (resourceVersion) has been the same for `unchanged`: free when
/// nobody holds it, when `identity` does, or when it has not changed for a whole `duration`. Pure, so that the
/// rules are tested without a cluster.
pub fn judge(holder: &str, identity: &str, unchanged: Duration, duration: Duration) -> Holder {
    if holder.is_empty() || holder == identity || unchanged >= duration {
        Holder::Free
    } else {
        Holder::Held { for_at_most: duration - unchanged }
    }
}

/// Wait until this replica holds the Lease, then run `work` with a [`Leadership`] for as long as it keeps holding
/// it. Returns `work`'s output, or an error once the Lease was lost, after `work` was dropped (cancelled): the
/// caller should exit, as another replica leads now. When `work` finishes (a shutdown), the Lease is released so
/// that another replica takes over at once. A follower stops waiting when `shutdown` completes (`Ok(None)`).
pub async fn run_as_leader<F, W>(
    client: Client,
    config: LeaseConfig,
    shutdown: impl Future<Output = ()>,
    work: W,
) -> Result<Option<F::Output>, LeaderError>
where
    W: FnOnce(Leadership) -> F,
    F: Future,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    let leadership = Leadership::elected();
    let lost =
        |reason: String| LeaderError::Lost { namespace: config.namespace.clone(), name: config.name.clone(), reason };
    let mut seen: Option<(Observed, Instant)> = None;
    loop {
        let started = Instant::now();
        match tokio::time::timeout(config.retry_every, try_hold(&leases, &config, &mut seen)).await {
            Ok(Ok(true)) => {
                leadership.extend(started + config.renew_deadline);
                break;
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => tracing::warn!(%error, lease = config.name, "trying to take the lease"),
            Err(_) => {
                tracing::warn!(lease = config.name, "trying to take the lease: the API server did not answer in time")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.retry_every.saturating_sub(started.elapsed())) => {}
            () = &mut shutdown => {
                tracing::info!(lease = config.name, "shutting down as a follower");
                return Ok(None);
            }
        }
    }
    tracing::info!(lease = config.name, identity = config.identity, "leading");
    let renewals = async {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(config.retry_every).await;
            let started = Instant::now();
            let left = (renewed + config.renew_deadline).saturating_duration_since(started);
            if left.is_zero() {
                return "no renewal within the renew deadline".to_string();
            }
            match tokio::time::timeout(left, try_hold(&leases, &config, &mut seen)).await {
                Ok(Ok(true)) => {
                    renewed = started;
                    leadership.extend(started + config.renew_deadline);
                }
                Ok(Ok(false)) => return "another replica holds it".to_string(),
                Ok(Err(error)) => tracing::warn!(%error, lease = config.name, "renewing the lease"),
                Err(_) => return "no renewal within the renew deadline: the API server did not answer".to_string(),
            }
            if !leadership.check() {
                return "no renewal within the renew deadline".to_string();
            }
        }
    };
    let deadline_watch = async {
        // Woken often, so that a leader resumed after a freeze notices before its work runs on.
        loop {
            tokio::time::sleep(config.retry_every / 4).await;
            if !leadership.check() {
                return "the renew deadline passed".to_string();
            }
        }
    };
    let work = work(leadership.clone());
    let outcome = tokio::select! {
        biased;
        reason = deadline_watch => Err(reason),
        reason = renewals => Err(reason),
        output = work => Ok(output),
    };
    match outcome {
        Ok(output) => {
            leadership.revoke();
            release(&leases, &config).await;
            Ok(Some(output))
        }
        Err(reason) => {
            leadership.revoke();
            Err(lost(reason))
        }
    }
}

/// Take or renew the Lease; false when another replica holds it or won a race for it.
async fn try_hold(
    leases: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<(Observed, Instant)>,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = leases.get_opt(&config.name).await?;
    let (metadata, spec) = match current {
        Some(lease) => (lease.metadata, lease.spec.unwrap_or_default()),
        None => (ObjectMeta { name: Some(config.name.clone()), ..Default::default() }, LeaseSpec::default()),
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let observed = Observed { holder: holder.clone(), version: metadata.resource_version.clone() };
    let since = match seen {
        Some((last, since)) if *last == observed => *since,
        _ => {
            let since = Instant::now();
            *seen = Some((observed, since));
            since
        }
    };
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    if let Holder::Held { .. } = judge(&holder, &config.identity, since.elapsed(), duration) {
        return Ok(false);
    }
    let taking_over = holder != config.identity;
    let lease = Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(config.duration.as_secs().try_into().unwrap_or(i32::MAX)),
            acquire_time: if taking_over { Some(MicroTime(now)) } else { spec.acquire_time },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(taking_over && !holder.is_empty())),
            ..Default::default()
        }),
        metadata,
    };
    let written = match lease.metadata.resource_version {
        Some(_) => leases.replace(&config.name, &PostParams::default(), &lease).await,
        None => leases.create(&PostParams::default(), &lease).await,
    };
    match written {
        Ok(_) => Ok(true),
        // Someone else wrote the Lease between our read and our write: they won this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Give the Lease up on the way out, so that another replica takes over at once rather than after it expires.
async fn release(leases: &Api<Lease>, config: &LeaseConfig) {
    let released = async {
        let Some(mut lease) = leases.get_opt(&config.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        leases.replace(&config.name, &PostParams::default(), &lease).await.map(|_| ())
    };
    match tokio::time::timeout(config.retry_every, released).await {
        Ok(Ok(())) => tracing::info!(lease = config.name, "released the lease"),
        Ok(Err(error)) => tracing::warn!(%error, lease = config.name, "releasing the lease"),
        Err(_) => tracing::warn!(lease = config.name, "releasing the lease: the API server did not answer in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    #[test]
    fn who_may_take_the_lease() {
        let second = Duration::from_secs(1);
        assert_eq!(judge("", "a", Duration::ZERO, DURATION), Holder::Free, "nobody holds it");
        assert_eq!(judge("a", "a", Duration::ZERO, DURATION), Holder::Free, "the holder renews");
        assert_eq!(judge("b", "a", 5 * second, DURATION), Holder::Held { for_at_most: 10 * second });
        assert_eq!(judge("b", "a", 15 * second, DURATION), Holder::Free, "b's lease went unrenewed for its duration");
    }

    #[test]
    fn timings_must_keep_two_leaders_apart() {
        let mut config = LeaseConfig::new("ns".into(), "l".into(), "a".into());
        assert!(config.check().is_ok());
        config.renew_deadline = config.duration;
        assert!(config.check().is_err());
        config.renew_deadline = Duration::from_secs(1);
        assert!(config.check().is_err(), "retries as slow as the deadline");
    }

    #[test]
    fn leadership_lasts_until_its_deadline() {
        let leadership = Leadership::elected();
        assert!(!leadership.check(), "not before it is won");
        leadership.extend(Instant::now() + Duration::from_secs(60));
        assert!(leadership.check());
        leadership.extend(Instant::now());
        assert!(!leadership.check(), "not past the deadline");
        assert!(Leadership::always().check());
    }
}
