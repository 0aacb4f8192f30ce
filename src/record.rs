//! Recording outcomes on Packages and Droplets: the status, written by server-side apply under one field manager
//! (by the controller and the API alike, so that each write states the whole status) and only over the status it
//! was planned from, and an Event for every change of state or reason.

use std::fmt::Debug;
use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::events::{Event, EventType, Recorder as EventRecorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conditions;
use crate::links::Linked;
use crate::metrics::Metrics;
use crate::plan::Planned;
use crate::resources::BitsStatus;
use crate::status::CfState;

/// The field manager of every status bitsmith writes.
pub const FIELD_MANAGER: &str = "bitsmith-controller";

/// Writes of one status tried, while only what the write does not depend on (labels, annotations) changes.
const WRITE_ATTEMPTS: usize = 3;

/// Why a status was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The object's spec or status changed since it was read: another writer won. Re-read and re-plan.
    #[error("{kind} {name} changed since it was read; another writer's status stands")]
    Conflict { kind: String, name: String },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The objects bitsmith records outcomes on.
pub trait Managed:
    Planned
    + Linked
    + Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + DeserializeOwned
    + Serialize
    + Clone
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<T> Managed for T where
    T: Planned
        + Linked
        + Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Serialize
        + Clone
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// Writes statuses and publishes Events.
pub struct Recorder {
    events: EventRecorder,
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        Recorder { events: EventRecorder::new(client, reporter), metrics }
    }

    /// Write `next` over the status of `planned`, the object as the caller read it, when the two differ, and
    /// publish an Event for a new state or reason. The write carries `planned`'s resourceVersion. When the object
    /// changed in between, the write is tried again on the fresh version only if neither its spec (generation) nor
    /// its status changed (a label or an annotation did); otherwise another writer won, and the caller re-reads
    /// and re-plans ([`WriteError::Conflict`]). Returns the object as written, or `None` when nothing changed.
    pub async fn status<O: Managed>(
        &self,
        api: &Api<O>,
        planned: &O,
        next: &BitsStatus<O::State>,
    ) -> Result<Option<O>, WriteError>
    where
        O::State: CfState + Serialize,
    {
        let prev = planned.bits_status().cloned().unwrap_or_default();
        if &prev == next {
            return Ok(None);
        }
        let name = planned.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut version = planned.resource_version();
        for _ in 0..WRITE_ATTEMPTS {
            let patch = serde_json::json!({
                "apiVersion": O::api_version(&()),
                "kind": O::kind(&()),
                "metadata": { "resourceVersion": version },
                "status": next,
            });
            match api.patch_status(&name, &params, &Patch::Apply(&patch)).await {
                Ok(written) => {
                    self.metrics.status_written(&O::kind(&()));
                    self.event(planned, &prev, next).await;
                    return Ok(Some(written));
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let fresh = api.get_opt(&name).await?;
                    match fresh {
                        Some(fresh)
                            if fresh.uid() == planned.uid()
                                && fresh.meta().generation == planned.meta().generation
                                && fresh.bits_status().cloned().unwrap_or_default() == prev =>
                        {
                            version = fresh.resource_version();
                        }
                        _ => break,
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(WriteError::Conflict { kind: O::kind(&()).into_owned(), name })
    }

    async fn event<O: Managed>(&self, object: &O, prev: &BitsStatus<O::State>, next: &BitsStatus<O::State>)
    where
        O::State: CfState,
    {
        let Some(event) = transition_event(prev, next) else { return };
        // An Event that cannot be published must not fail the work whose status is already written.
        if let Err(error) = self.events.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, "publishing an Event failed");
        }
    }
}

/// The Event a status change deserves, if any: a new state or `Ready` reason; new bits from a changed source (same
/// state and reason, another revision); a pinned source refusing changed bits.
pub fn transition_event<S: CfState>(prev: &BitsStatus<S>, next: &BitsStatus<S>) -> Option<Event> {
    let event = |warning: bool, reason: &str, note: String| Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    let ready = conditions::find(&next.conditions, conditions::READY);
    let (reason, note) = ready.map(|c| (c.reason.clone(), c.message.clone())).unwrap_or_default();
    if prev.state != next.state
        || conditions::find(&prev.conditions, conditions::READY).map(|c| &c.reason) != Some(&reason)
    {
        let failed = next.state == Some(S::FAILED) || next.error.is_some();
        return Some(event(failed, &reason, next.error.clone().unwrap_or(note)));
    }
    let revision = |s: &BitsStatus<S>| s.artifact.as_ref().map(|a| a.revision.clone());
    if let (Some(before), Some(after)) = (revision(prev), revision(next))
        && before != after
    {
        return Some(event(false, "NewRevision", format!("the source changed: stored {after} in place of {before}")));
    }
    let refused = |s: &BitsStatus<S>| {
        conditions::find(&s.conditions, conditions::SOURCE_VERIFIED).filter(|c| c.status == "False").cloned()
    };
    match (refused(prev), refused(next)) {
        (before, Some(now)) if before.as_ref().map(|c| &c.message) != Some(&now.message) => {
            Some(event(true, &now.reason, now.message))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::digest::Digests;
    use crate::resources::{BlobRef, PackageStatus};
    use crate::status;

    fn ready(sha256: char) -> PackageStatus {
        let digests = Digests { sha1: "1".repeat(40), sha256: sha256.to_string().repeat(64), size: 3 };
        let blob = BlobRef { store: "memory://".into(), key: sha256.to_string() };
        status::done(&PackageStatus::default(), status::stored_digests(&digests, blob), Some(1), Timestamp::now())
    }

    #[test]
    fn events_for_new_states_new_revisions_and_refused_changes() {
        let first = transition_event(&PackageStatus::default(), &ready('a')).unwrap();
        assert_eq!((first.type_, first.reason.as_str()), (EventType::Normal, "Succeeded"));
        assert!(transition_event(&ready('a'), &ready('a')).is_none(), "nothing new");
        let changed =
            transition_event(&ready('a'), &status::done(&ready('a'), ready('b').stored, Some(1), Timestamp::now()))
                .unwrap();
        assert_eq!((changed.type_, changed.reason.as_str()), (EventType::Normal, "NewRevision"));
        assert!(changed.note.unwrap().contains(&"b".repeat(64)));
        let refused = status::source_unverified(&ready('a'), "checksum mismatch: c", Some(1), Timestamp::now());
        let warning = transition_event(&ready('a'), &refused).unwrap();
        assert_eq!((warning.type_, warning.reason.as_str()), (EventType::Warning, "ChecksumMismatch"));
        assert!(transition_event(&refused, &refused).is_none(), "said once");
        let refused_again = status::source_unverified(&ready('a'), "checksum mismatch: d", Some(1), Timestamp::now());
        assert!(transition_event(&refused, &refused_again).is_some(), "another refused version is news");
    }
}
