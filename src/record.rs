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
        let ready = conditions::find(&next.conditions, conditions::READY);
        let (reason, note) = ready.map(|c| (c.reason.clone(), c.message.clone())).unwrap_or_default();
        let changed = prev.state != next.state
            || conditions::find(&prev.conditions, conditions::READY).map(|c| &c.reason) != Some(&reason);
        if !changed {
            return;
        }
        let failed = next.state == Some(O::State::FAILED) || next.error.is_some();
        let event = Event {
            type_: if failed { EventType::Warning } else { EventType::Normal },
            reason,
            note: Some(next.error.clone().unwrap_or(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event that cannot be published must not fail the work whose status is already written.
        if let Err(error) = self.events.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, "publishing an Event failed");
        }
    }
}
