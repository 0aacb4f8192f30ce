//! Recording outcomes on Packages and Droplets: the status, written by server-side apply under one field manager
//! (by the controller and the API alike, so that each write states the whole status), and an Event for every
//! change of state or reason.

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

    /// Write `next` when it differs from `prev`, and publish an Event for a new state or reason. With
    /// `resource_version`, the write succeeds only if the object is still at that version (409 Conflict
    /// otherwise). Returns the object as written, or `None` when nothing changed.
    pub async fn status<O: Managed>(
        &self,
        api: &Api<O>,
        object: &O,
        prev: &BitsStatus<O::State>,
        next: &BitsStatus<O::State>,
        resource_version: Option<&str>,
    ) -> Result<Option<O>, kube::Error>
    where
        O::State: CfState + Serialize,
    {
        if prev == next {
            return Ok(None);
        }
        let mut patch = serde_json::json!({
            "apiVersion": O::api_version(&()),
            "kind": O::kind(&()),
            "status": next,
        });
        if let Some(version) = resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": version });
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let written = api.patch_status(&object.name_any(), &params, &Patch::Apply(&patch)).await?;
        self.metrics.status_written(&O::kind(&()));
        self.event(object, prev, next).await;
        Ok(Some(written))
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
