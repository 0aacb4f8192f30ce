//! One reconcile of a Package or Droplet, as a pipeline of phases: read the object and what it refers to, plan,
//! act (fetch into the store), write the status and an Event.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conditions::{self, RECONCILING};
use crate::fetch::{Fetcher, Inputs};
use crate::metrics::Metrics;
use crate::plan::{Plan, Planned, plan};
use crate::resources::{BitsStatus, Package};
use crate::sources::SecretData;
use crate::status::{self, CfState};
use crate::store::BlobOwner;

/// The field manager of every status bitsmith writes.
pub const FIELD_MANAGER: &str = "bitsmith-controller";
/// The finalizer that removes an object's blobs before it goes.
pub const FINALIZER: &str = "bitsmith.dev/blobs";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub fetcher: Fetcher,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

/// Why a reconcile did not finish; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("removing blobs: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<ReconcileError>>),
}

/// The objects the controller manages.
pub trait Managed:
    Planned
    + Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<T> Managed for T where
    T: Planned
        + Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Serialize
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// Reconcile one object, behind the finalizer that cleans up its blobs.
pub async fn reconcile<O: Managed>(object: Arc<O>, ctx: Arc<Context>) -> Result<Action, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let started = Instant::now();
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<O> = Api::namespaced(ctx.client.clone(), &namespace);
    let outcome = finalizer(&api, FINALIZER, object, |event| async {
        match event {
            finalizer::Event::Apply(object) => apply(&api, object.as_ref(), &namespace, &ctx).await,
            finalizer::Event::Cleanup(object) => cleanup(object.as_ref(), &ctx).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(&O::kind(&()), started.elapsed(), outcome.is_err());
    outcome
}

/// Record the state `object` was left in, for the `objects` gauges.
fn record_state<O: Managed>(ctx: &Context, object: &O, state: Option<O::State>)
where
    O::State: Serialize,
{
    let kind = O::kind(&());
    let key = format!("{kind}/{}/{}", object.namespace().unwrap_or_default(), object.name_any());
    let state = state.and_then(|s| serde_json::to_value(s).ok()).and_then(|v| v.as_str().map(str::to_string));
    ctx.metrics.object_state(&kind, key, state);
}

/// Retry a failed reconcile (an API or store error) after a pause.
pub fn error_policy<O: Managed>(object: Arc<O>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(object = %ObjectRef::from(object.as_ref()), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Log what each reconcile did.
pub fn log_outcome<O: Managed, E: std::error::Error>(
    result: Result<(ObjectRef<O>, Action), kube::runtime::controller::Error<E, kube::runtime::watcher::Error>>,
) {
    match result {
        Ok((object, _)) => tracing::debug!(%object, "reconciled"),
        Err(error) => tracing::warn!(%error, "reconcile error"),
    }
}

async fn apply<O: Managed>(api: &Api<O>, object: &O, namespace: &str, ctx: &Context) -> Result<Action, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let prev = object.bits_status().cloned().unwrap_or_default();
    let generation = object.meta().generation;
    let now = Timestamp::now();
    let (next, action) = match plan(object) {
        Plan::UpToDate => {
            record_state(ctx, object, prev.state);
            return Ok(Action::await_change());
        }
        Plan::Invalid(error) => {
            (status::failed(&prev, "InvalidSpec", &error.to_string(), true, generation, now), Action::await_change())
        }
        Plan::ReadyWithoutBits { message } => {
            (status::done_without_bits(&prev, &message, generation, now), Action::await_change())
        }
        Plan::AwaitUpload => (status::awaiting_upload(&prev, generation, now), Action::await_change()),
        Plan::Fetch(source) => {
            let copying = source.package.is_some();
            let started = status::in_progress(&prev, copying, "fetching the bits", generation, now);
            write_status(api, object, &prev, &started, ctx).await?;
            let (next, action) = fetch(object, namespace, source, &started, ctx).await?;
            write_status(api, object, &started, &next, ctx).await?;
            record_state(ctx, object, next.state);
            // The blob of an earlier generation goes only once the status names the new one, so that a READY
            // status never points at a deleted blob.
            if let (Some(old), Some(new)) = (&prev.stored.blob, &next.stored.blob)
                && old != new
                && ctx.fetcher.store.holds(old)
                && let Err(error) = ctx.fetcher.store.delete(&old.key).await
            {
                tracing::warn!(%error, key = old.key, "removing the blob of an earlier generation; it stays behind");
            }
            return Ok(action);
        }
    };
    write_status(api, object, &prev, &next, ctx).await?;
    record_state(ctx, object, next.state);
    Ok(action)
}

/// Read what the source refers to, fetch, and turn the outcome into the next status and when to look again.
async fn fetch<O: Managed>(
    object: &O,
    namespace: &str,
    source: &crate::resources::Source,
    current: &BitsStatus<O::State>,
    ctx: &Context,
) -> Result<(BitsStatus<O::State>, Action), ReconcileError>
where
    O::State: CfState,
{
    let generation = object.meta().generation;
    let secret = match source.secret_name() {
        Some(name) => match Api::<Secret>::namespaced(ctx.client.clone(), namespace).get_opt(name).await? {
            Some(secret) => Some(SecretData::from_secret(&secret)),
            None => {
                let message = format!("Secret {name:?} not found; waiting for it");
                let next = status::failed(current, "SecretNotFound", &message, false, generation, Timestamp::now());
                return Ok((next, Action::requeue(retry_delay(current))));
            }
        },
        None => None,
    };
    let source_package = match &source.package {
        Some(reference) => Api::<Package>::namespaced(ctx.client.clone(), namespace).get_opt(&reference.name).await?,
        None => None,
    };
    let inputs = Inputs { secret: secret.as_ref(), source_package: source_package.as_ref() };
    let owner = BlobOwner::of(object, namespace);
    let now = Timestamp::now();
    Ok(match ctx.fetcher.fetch(&owner, source, object.checksum_pin(), inputs).await {
        Ok(stored) => {
            ctx.metrics.stored(stored.digests.size);
            let digests = status::stored_digests(&stored.digests, stored.blob);
            (status::done(current, digests, generation, now), Action::await_change())
        }
        Err(error) if error.is_permanent() => {
            let next = status::failed(current, error.reason(), &error.to_string(), true, generation, now);
            (next, Action::await_change())
        }
        Err(error) => {
            let next = status::failed(current, error.reason(), &error.to_string(), false, generation, now);
            (next, Action::requeue(retry_delay(current)))
        }
    })
}

/// How long to wait before retrying a transient failure: half the time it has been failing, between 5 seconds
/// and 5 minutes. This doubles the pause with each retry without keeping any state outside the status.
fn retry_delay<S>(status: &BitsStatus<S>) -> Duration {
    let failing_for = conditions::find(&status.conditions, RECONCILING)
        .map(|c| Timestamp::now().duration_since(c.last_transition_time.0).unsigned_abs())
        .unwrap_or_default();
    (failing_for / 2).clamp(Duration::from_secs(5), Duration::from_secs(300))
}

/// Write `next` with server-side apply when it differs from `prev`, and publish an Event for a new state or
/// reason.
async fn write_status<O: Managed>(
    api: &Api<O>,
    object: &O,
    prev: &BitsStatus<O::State>,
    next: &BitsStatus<O::State>,
    ctx: &Context,
) -> Result<(), ReconcileError>
where
    O::State: CfState + Serialize,
{
    if prev == next {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": O::api_version(&()),
        "kind": O::kind(&()),
        "status": next,
    });
    api.patch_status(&object.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.status_written(&O::kind(&()));
    let ready = conditions::find(&next.conditions, conditions::READY);
    let (reason, note) = ready.map(|c| (c.reason.clone(), c.message.clone())).unwrap_or_default();
    let changed = prev.state != next.state
        || conditions::find(&prev.conditions, conditions::READY).map(|c| &c.reason) != Some(&reason);
    if changed {
        let failed = next.state == Some(O::State::FAILED) || next.error.is_some();
        let event = Event {
            type_: if failed { EventType::Warning } else { EventType::Normal },
            reason,
            note: Some(next.error.clone().unwrap_or(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event that cannot be published must not fail the reconcile that already wrote the status.
        if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, "publishing an Event failed");
        }
    }
    Ok(())
}

/// Remove the object's blob; a blob that is already gone counts as removed, so deletion never blocks on it.
async fn cleanup<O: Managed>(object: &O, ctx: &Context) -> Result<Action, ReconcileError>
where
    O::State: Serialize,
{
    record_state(ctx, object, None);
    if let Some(blob) = object.bits_status().and_then(|s| s.stored.blob.as_ref())
        && ctx.fetcher.store.holds(blob)
    {
        ctx.fetcher.store.delete(&blob.key).await?;
    }
    Ok(Action::await_change())
}
