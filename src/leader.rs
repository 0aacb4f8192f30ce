//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas only one reconciles.
//!
//! A replica takes the Lease when nobody holds it or the holder let it expire, renews it every
//! `renew_every`, and stops leading when it cannot renew for a whole lease duration. Every write carries the
//! Lease's resourceVersion, so two replicas racing for it cannot both win.

use std::future::Future;
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
    /// How long a Lease stays valid without renewal; a new leader takes over at most this long after the old
    /// one stopped renewing.
    pub duration: Duration,
    /// How often the leader renews (well within `duration`).
    pub renew_every: Duration,
    /// How often a follower tries to take the Lease.
    pub retry_every: Duration,
}

impl LeaseConfig {
    /// Kubernetes' usual timing: a 15 s lease, renewed every 5 s, tried every 2 s.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the lease {namespace}/{name}: {reason}")]
    Lost { namespace: String, name: String, reason: String },
}

/// Whether `identity` may write the Lease now: it holds it already, nobody does, or the holder's renewal is
/// older than the lease duration. Pure, so that the rules are tested without a cluster.
pub fn may_hold(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    match &spec.renew_time {
        Some(renewed) => now.as_second() - renewed.0.as_second() > duration,
        None => true,
    }
}

/// Wait until this replica holds the Lease, then run `work` for as long as it keeps holding it. Returns
/// `work`'s output, or an error when the Lease was lost (the caller should stop: another replica leads now).
pub async fn run_as_leader<F: Future>(client: Client, config: LeaseConfig, work: F) -> Result<F::Output, LeaderError> {
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        match try_hold(&leases, &config).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, lease = config.name, "trying to take the lease"),
        }
        tokio::time::sleep(config.retry_every).await;
    }
    tracing::info!(lease = config.name, identity = config.identity, "leading");
    let renewals = async {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(config.renew_every).await;
            match try_hold(&leases, &config).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return "another replica holds it".to_string(),
                Err(error) if renewed.elapsed() >= config.duration => {
                    return format!("no renewal for a lease duration: {error}");
                }
                Err(error) => tracing::warn!(%error, lease = config.name, "renewing the lease"),
            }
        }
    };
    tokio::select! {
        output = work => Ok(output),
        reason = renewals => Err(LeaderError::Lost { namespace: config.namespace.clone(), name: config.name.clone(), reason }),
    }
}

/// Take or renew the Lease; false when another replica holds it or won a race for it.
async fn try_hold(leases: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = leases.get_opt(&config.name).await?;
    let (metadata, spec) = match current {
        Some(lease) => (lease.metadata, lease.spec.unwrap_or_default()),
        None => (ObjectMeta { name: Some(config.name.clone()), ..Default::default() }, LeaseSpec::default()),
    };
    if !may_hold(&spec, &config.identity, now) {
        return Ok(false);
    }
    let taking_over = spec.holder_identity.as_deref() != Some(config.identity.as_str());
    let lease = Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(config.duration.as_secs().try_into().unwrap_or(i32::MAX)),
            acquire_time: if taking_over { Some(MicroTime(now)) } else { spec.acquire_time },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                spec.lease_transitions.unwrap_or(0) + i32::from(taking_over && spec.holder_identity.is_some()),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_at: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn who_may_hold_the_lease() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(may_hold(&LeaseSpec::default(), "a", now), "nobody holds it");
        assert!(may_hold(&lease(Some("a"), 999, 15), "a", now), "the holder renews");
        assert!(!may_hold(&lease(Some("b"), 990, 15), "a", now), "b's lease is still valid");
        assert!(may_hold(&lease(Some("b"), 980, 15), "a", now), "b let it expire");
        assert!(may_hold(&lease(Some(""), 999, 15), "a", now), "released");
    }
}
