//! One reconcile of a Package or Droplet, as a pipeline of phases: read the object and what it refers to, plan,
//! act (fetch into the store), write the status and an Event.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use super::audit::Findings;
use super::siblings::{self, Kin, Kindred};
use crate::claims::{ClaimWatch, Verdict};
use crate::conditions::{self, RECONCILING};
use crate::fetch::{Fetcher, Inputs};
use crate::leader::Leadership;
use crate::links::ApiUrls;
use crate::metrics::Metrics;
use crate::pipeline::PipelineError;
use crate::plan::{Plan, plan};
use crate::record::{Managed, Recorder, WriteError};
use crate::resources::{BitsStatus, Droplet, Package, ResolvedSource, Source};
use crate::retention::Expiry;
use crate::sources::SecretData;
use crate::status::{self, Activity, CfState};
use crate::store::BlobOwner;

/// The finalizer that removes an object's blobs before it goes.
pub const FINALIZER: &str = "bitsmith.dev/blobs";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub fetcher: Fetcher,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Where the CF v3 API serves the objects, for the links in their statuses.
    pub urls: Option<ApiUrls>,
    /// An upload's claim unchanged for this long was abandoned by its holder.
    pub upload_claim_timeout: Duration,
    /// The upload claims seen, by object uid.
    pub claims: std::sync::Mutex<ClaimWatch>,
    /// Whether this replica still leads: checked before every write, so that a leader that lost its Lease
    /// (frozen, or cut off from the API server) writes nothing once another replica may lead.
    pub leadership: Leadership,
    /// The Packages watched, and how many of an app's are kept.
    pub packages: Kin<Package>,
    /// The Droplets watched, and how many of an app's are kept.
    pub droplets: Kin<Droplet>,
    /// What store audits found, for each object's reconcile to act on.
    pub findings: Findings,
    /// When each source was last asked whether it changed (`spec.interval`).
    pub rechecks: std::sync::Mutex<crate::rechecks::Rechecks>,
}

impl Context {
    /// `status` with the links of `object` in its state.
    fn linked<O: Managed>(&self, object: &O, status: &BitsStatus<O::State>) -> BitsStatus<O::State> {
        let mut status = status.clone();
        // Every status the controller writes says which reconcile request it has handled.
        status.last_handled_reconcile_at = requested_at(object).map(str::to_string);
        let links = self.urls.as_ref().map(|urls| object.links(urls, status.state));
        crate::links::set_links(&mut status, links);
        status
    }

    /// Write `next` over the status `planned` holds, unless another writer changed it since (see
    /// [`Recorder::status`]). Returns the object as it now is.
    async fn write_status<O: Managed>(
        &self,
        api: &Api<O>,
        planned: &O,
        next: &BitsStatus<O::State>,
    ) -> Result<O, ReconcileError>
    where
        O::State: CfState + Serialize,
    {
        self.still_leading()?;
        let written = self.recorder.status(api, planned, &self.linked(planned, next)).await?;
        Ok(written.unwrap_or_else(|| planned.clone()))
    }

    fn still_leading(&self) -> Result<(), ReconcileError> {
        if self.leadership.check() { Ok(()) } else { Err(ReconcileError::NotLeading) }
    }
}

/// Why a reconcile did not finish; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Another writer changed the object first; the reconcile runs again on what it wrote.
    #[error("{0}")]
    Conflict(String),
    /// This replica no longer holds the leader Lease: it writes nothing more.
    #[error("not the leader any more")]
    NotLeading,
    #[error("removing blobs: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<ReconcileError>>),
}

impl From<WriteError> for ReconcileError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Conflict { .. } => ReconcileError::Conflict(error.to_string()),
            WriteError::Kube(error) => ReconcileError::Kube(error),
        }
    }
}

/// A reconcile that lost a race for a status runs again this soon, on the winner's status.
const AFTER_CONFLICT: Duration = Duration::from_secs(1);

/// Reconcile one object, behind the finalizer that cleans up its blobs.
pub async fn reconcile<O: Kindred>(object: Arc<O>, ctx: Arc<Context>) -> Result<Action, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let started = Instant::now();
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<O> = Api::namespaced(ctx.client.clone(), &namespace);
    let outcome = finalizer(&api, FINALIZER, object, |event| async {
        match event {
            finalizer::Event::Apply(object) => match apply(&api, object.as_ref(), &namespace, &ctx).await {
                Err(ReconcileError::Conflict(reason)) => {
                    tracing::debug!(object = %ObjectRef::from(object.as_ref()), reason, "lost a status race; planning again");
                    Ok(Action::requeue(AFTER_CONFLICT))
                }
                other => other,
            },
            finalizer::Event::Cleanup(object) => {
                forget_claim(&ctx, object.as_ref());
                ctx.rechecks.lock().expect("rechecks lock").forget(object.uid().as_deref().unwrap_or_default());
                cleanup(object.as_ref(), &namespace, &ctx).await
            }
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

/// Follow the object's plan, unless retention expires it first.
async fn apply<O: Kindred>(api: &Api<O>, object: &O, namespace: &str, ctx: &Context) -> Result<Action, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    if let Some(expiry) = siblings::verdict(object, ctx, Timestamp::now()) {
        return expire(api, object, namespace, &expiry, ctx).await;
    }
    let current = bits_checked(api, object, ctx).await?;
    let object = current.as_ref().unwrap_or(object);
    let (action, state) = advance(api, object, namespace, ctx).await?;
    match siblings::awaiting_expires_in(object, state, ctx, Timestamp::now()) {
        // Awaiting an upload that may not come: look again when it would expire.
        Some(expires_in) if action == Action::await_change() => {
            Ok(Action::requeue(expires_in + Duration::from_secs(1)))
        }
        _ => Ok(action),
    }
}

/// The reconcile request (`bitsmith.dev/requested-at`) on `object`, if any.
fn requested_at<O: Managed>(object: &O) -> Option<&str> {
    object.annotations().get(crate::resources::REQUESTED_AT_ANNOTATION).map(String::as_str)
}

/// Whether `object` carries a reconcile request its status has not echoed yet.
fn new_request<O: Managed>(object: &O) -> bool {
    let handled = object.bits_status().and_then(|s| s.last_handled_reconcile_at.as_deref());
    requested_at(object).is_some_and(|r| handled != Some(r))
}

/// When an audit found `object`'s blob gone or wrong, or a new reconcile request asks for a look, and it is gone
/// or wrong: stop naming it (see [`status::bits_lost`]). Returns the object as written then, for the plan to go on from (a fetch, when it has a
/// source).
async fn bits_checked<O: Kindred>(api: &Api<O>, object: &O, ctx: &Context) -> Result<Option<O>, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let prev = object.bits_status().cloned().unwrap_or_default();
    let (Some(uid), Some(blob)) = (object.uid(), prev.stored.blob.as_ref()) else { return Ok(None) };
    let Some(found) =
        ctx.findings.take(&uid, &blob.key).or(new_request(object).then_some(crate::audit::Finding::Missing))
    else {
        return Ok(None);
    };
    // The audit's listing may be older than the object's latest bits: look at the blob itself. A wrong digest is
    // taken as found when the status still records the digest it was held against.
    let finding = match found {
        crate::audit::Finding::WrongDigest { recorded, found } => {
            if prev.stored.checksum.as_ref().map(|c| &c.value) != Some(&recorded) {
                return Ok(None);
            }
            crate::audit::Finding::WrongDigest { recorded, found }
        }
        crate::audit::Finding::Missing | crate::audit::Finding::WrongSize { .. } => {
            match ctx.fetcher.store.size(&blob.key).await {
                Ok(size) if prev.stored.size.is_none_or(|recorded| recorded == size) => return Ok(None),
                Ok(found) => crate::audit::Finding::WrongSize { recorded: prev.stored.size.unwrap_or_default(), found },
                Err(crate::store::StoreError::NotFound { .. }) => crate::audit::Finding::Missing,
                Err(error) => return Err(error.into()),
            }
        }
    };
    let message = finding.message(&blob.key);
    let refetch = object.source().is_some();
    let next =
        status::bits_lost(&prev, finding.reason(), &message, refetch, object.meta().generation, Timestamp::now());
    tracing::warn!(object = %ObjectRef::from(object), reason = finding.reason(), refetch, "stored bits lost");
    let written = ctx.write_status(api, object, &next).await?;
    record_state(ctx, object, next.state);
    Ok(Some(written))
}

/// Expire `object`: EXPIRED, Stalled, an Event saying why; its bits go once the status no longer names them.
async fn expire<O: Kindred>(
    api: &Api<O>,
    object: &O,
    namespace: &str,
    expiry: &Expiry,
    ctx: &Context,
) -> Result<Action, ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let prev = object.bits_status().cloned().unwrap_or_default();
    let message = expiry.message(O::NOUN, object.app().unwrap_or_default());
    let next = status::expired(&prev, &message, object.meta().generation, Timestamp::now());
    ctx.write_status(api, object, &next).await?;
    record_state(ctx, object, next.state);
    tracing::info!(object = %ObjectRef::from(object), message, "expired");
    if ctx.leadership.check() {
        let removed = match (BlobOwner::of(object, namespace).own_prefix(), &prev.stored.blob) {
            (Some(prefix), _) => ctx.fetcher.store.remove_under(&prefix, None).await.map(|_| ()),
            (None, Some(blob)) if ctx.fetcher.store.holds(blob) => ctx.fetcher.store.delete(&blob.key).await,
            (None, _) => Ok(()),
        };
        if let Err(error) = removed {
            tracing::warn!(%error, object = %ObjectRef::from(object), "removing an expired object's bits; they go with the object");
        }
    }
    Ok(Action::await_change())
}

/// Take the next step of the object's plan. Returns when to look again, and the state the object was left in.
async fn advance<O: Managed>(
    api: &Api<O>,
    object: &O,
    namespace: &str,
    ctx: &Context,
) -> Result<(Action, Option<O::State>), ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let prev = object.bits_status().cloned().unwrap_or_default();
    let generation = object.meta().generation;
    let now = Timestamp::now();
    let planned = plan(object);
    if planned != Plan::UploadInProgress {
        forget_claim(ctx, object);
    }
    let (next, action) = match planned {
        // Written all the same: links change when the API's external URL does, and a reconcile request is echoed.
        Plan::UpToDate => (prev.clone(), Action::await_change()),
        Plan::UploadInProgress => return watch_upload(api, object, ctx).await,
        Plan::Invalid(error) => {
            (status::failed(&prev, "InvalidSpec", &error.to_string(), true, generation, now), Action::await_change())
        }
        Plan::ReadyWithoutBits { message } => {
            (status::done_without_bits(&prev, &message, generation, now), Action::await_change())
        }
        Plan::AwaitUpload => (status::awaiting_upload(&prev, generation, now), Action::await_change()),
        Plan::Suspended => (status::suspended(&prev, generation, now), Action::await_change()),
        Plan::Fetch(source) => return transfer(api, object, namespace, source, ctx).await,
        Plan::Recheck { source, interval } => {
            let uid = object.uid().unwrap_or_default();
            let wait = ctx.rechecks.lock().expect("rechecks lock").due_in(&uid, interval, Instant::now());
            match wait {
                Some(wait) if !new_request(object) => (prev.clone(), Action::requeue(wait)),
                _ => return transfer(api, object, namespace, source, ctx).await,
            }
        }
    };
    ctx.write_status(api, object, &next).await?;
    record_state(ctx, object, next.state);
    Ok((action, next.state))
}

/// An upload through the API holds `object`: leave it alone while the upload's holder renews its claim; once
/// the claim has not changed for the claim timeout, return the object to AWAITING_UPLOAD (a Warning Event
/// `UploadAbandoned`) and remove what the upload had staged.
async fn watch_upload<O: Managed>(
    api: &Api<O>,
    object: &O,
    ctx: &Context,
) -> Result<(Action, Option<O::State>), ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let status = object.bits_status().cloned().unwrap_or_default();
    record_state(ctx, object, status.state);
    let uid = object.uid().unwrap_or_default();
    let verdict = ctx.claims.lock().expect("claims lock").judge(
        &uid,
        status.upload.as_ref(),
        std::time::Instant::now(),
        ctx.upload_claim_timeout,
    );
    if let Verdict::Live { recheck_in } = verdict {
        return Ok((Action::requeue(recheck_in + Duration::from_millis(100)), status.state));
    }
    let next = status::upload_abandoned(&status, object.meta().generation, Timestamp::now());
    ctx.write_status(api, object, &next).await?;
    ctx.claims.lock().expect("claims lock").forget(&uid);
    record_state(ctx, object, next.state);
    if let Some(claim) = &status.upload {
        tracing::warn!(object = %ObjectRef::from(object), holder = claim.holder, "an upload was abandoned");
        match ctx.fetcher.store.sweep_staged(&claim.id).await {
            Ok(removed) => tracing::info!(removed, claim = claim.id, "removed an abandoned upload's staged bytes"),
            Err(error) => tracing::warn!(%error, "removing an abandoned upload's staged bytes; the staging sweep will"),
        }
    }
    Ok((Action::await_change(), next.state))
}

fn forget_claim<O: Managed>(ctx: &Context, object: &O) {
    ctx.claims.lock().expect("claims lock").forget(object.uid().as_deref().unwrap_or_default());
}

/// Fetch the bits from `source` and write what came of it. When the stored bits are this generation's (a re-check,
/// or the retry of one), the source is first asked whether it changed since it was read: the bits are fetched only
/// when it did, and nothing is written when it did not.
async fn transfer<O: Managed>(
    api: &Api<O>,
    object: &O,
    namespace: &str,
    source: &Source,
    ctx: &Context,
) -> Result<(Action, Option<O::State>), ReconcileError>
where
    O::State: CfState + Serialize + Send + Sync,
{
    let prev = object.bits_status().cloned().unwrap_or_default();
    let generation = object.meta().generation;
    let uid = object.uid().unwrap_or_default();
    let recheck = crate::plan::holds_current_bits(object);
    let known = recheck
        .then(|| {
            let rechecks = ctx.rechecks.lock().expect("rechecks lock");
            rechecks.refused(&uid).cloned().or_else(|| prev.resolved_source.clone())
        })
        .flatten();
    // A first fetch says so at once. A re-check says so only once the source says it changed; one without
    // validators cannot say, so its bits are fetched and compared quietly.
    let conditional = known.as_ref().is_some_and(ResolvedSource::has_validators);
    let activity = if source.package.is_some() { Activity::Copying } else { Activity::Fetching };
    let announce = |message: &str| status::in_progress(&prev, activity, message, generation, Timestamp::now());
    let mut current =
        if recheck { object.clone() } else { ctx.write_status(api, object, &announce("fetching the bits")).await? };
    ctx.rechecks.lock().expect("rechecks lock").checked(&uid, Instant::now());
    let interval = object.recheck_interval();
    let look_again = || interval.map_or_else(Action::await_change, Action::requeue);

    let (secret, source_package) = match fetch_inputs(source, namespace, ctx).await? {
        Ok(inputs) => inputs,
        Err(missing) => {
            let base = current.bits_status().cloned().unwrap_or_default();
            let next = status::failed(&base, "SecretNotFound", &missing, false, generation, Timestamp::now());
            ctx.write_status(api, &current, &next).await?;
            record_state(ctx, object, next.state);
            return Ok((Action::requeue(retry_delay(&base)), next.state));
        }
    };
    let inputs = Inputs {
        secret: secret.as_ref(),
        source_package: source_package.as_ref(),
        deadline: Some(object.fetch_timeout()),
        known: known.as_ref(),
    };
    let owner = BlobOwner::of(object, namespace);
    let mut served = None;
    let fetched = match ctx.fetcher.open(source, inputs).await {
        Ok(None) => None,
        Ok(Some(opened)) => {
            if conditional {
                current = ctx.write_status(api, &current, &announce("the source changed; fetching it")).await?;
            }
            served = opened.resolved().cloned();
            Some(opened.store(&owner, object.checksum_pin()).await)
        }
        Err(error) => Some(Err(error)),
    };

    let base = current.bits_status().cloned().unwrap_or_default();
    let now = Timestamp::now();
    let (next, action) = match fetched {
        None => (status::source_unchanged(&base, generation), look_again()),
        Some(Ok(stored)) => {
            ctx.rechecks.lock().expect("rechecks lock").stored(&uid);
            ctx.metrics.stored(stored.digests.size);
            let digests = status::stored_digests(&stored.digests, stored.blob);
            let mut next = status::done(&base, digests, generation, now);
            next.resolved_source = stored.resolved;
            (next, look_again())
        }
        // A pinned source that changed to other bits: the bits that matched stay (verification, not a failure).
        Some(Err(error @ PipelineError::ChecksumMismatch { .. })) if recheck => {
            ctx.rechecks.lock().expect("rechecks lock").refuse(&uid, served);
            (status::source_unverified(&base, &error.to_string(), generation, now), look_again())
        }
        Some(Err(error)) if error.is_permanent() => {
            (status::failed(&base, error.reason(), &error.to_string(), true, generation, now), look_again())
        }
        Some(Err(error)) => (
            status::failed(&base, error.reason(), &error.to_string(), false, generation, now),
            Action::requeue(retry_delay(&base)),
        ),
    };
    ctx.write_status(api, &current, &next).await?;
    record_state(ctx, object, next.state);
    // Blobs of earlier generations (or revisions) go only once the status names the new one, so that a READY
    // status never points at a deleted blob. All of the owner's other blobs go, so that one an earlier removal
    // failed to delete goes now.
    if let Some(new) = &next.stored.blob
        && next.stored.blob != prev.stored.blob
        && ctx.leadership.check()
        && ctx.fetcher.store.holds(new)
        && let Some(prefix) = owner.own_prefix()
    {
        match ctx.fetcher.store.remove_under(&prefix, Some(&new.key)).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, prefix, "removed the blobs of earlier generations"),
            Err(error) => {
                tracing::warn!(%error, prefix, "removing the blobs of earlier generations; they stay until the next fetch or the deletion")
            }
        }
    }
    Ok((action, next.state))
}

/// The Secret and the source Package a fetch of `source` reads, or why it cannot start yet (a missing Secret).
async fn fetch_inputs(
    source: &Source,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<(Option<SecretData>, Option<Package>), String>, ReconcileError> {
    let secret = match source.secret_name() {
        Some(name) => match Api::<Secret>::namespaced(ctx.client.clone(), namespace).get_opt(name).await? {
            Some(secret) => Some(SecretData::from_secret(&secret)),
            None => return Ok(Err(format!("Secret {name:?} not found; waiting for it"))),
        },
        None => None,
    };
    let source_package = match &source.package {
        Some(reference) => Api::<Package>::namespaced(ctx.client.clone(), namespace).get_opt(&reference.name).await?,
        None => None,
    };
    Ok(Ok((secret, source_package)))
}

/// How long to wait before retrying a transient failure: half the time it has been failing, between 5 seconds
/// and 5 minutes. This doubles the pause with each retry without keeping any state outside the status.
fn retry_delay<S>(status: &BitsStatus<S>) -> Duration {
    let failing_for = conditions::find(&status.conditions, RECONCILING)
        .map(|c| Timestamp::now().duration_since(c.last_transition_time.0).unsigned_abs())
        .unwrap_or_default();
    (failing_for / 2).clamp(Duration::from_secs(5), Duration::from_secs(300))
}

/// Remove the object's blobs; a blob that is already gone counts as removed, so deletion never blocks on it.
async fn cleanup<O: Managed>(object: &O, namespace: &str, ctx: &Context) -> Result<Action, ReconcileError>
where
    O::State: Serialize,
{
    record_state(ctx, object, None);
    ctx.still_leading()?;
    if let Some(blob) = object.bits_status().and_then(|s| s.stored.blob.as_ref())
        && ctx.fetcher.store.holds(blob)
    {
        ctx.fetcher.store.delete(&blob.key).await?;
    }
    // And whatever else the object owns: blobs of earlier generations whose removal failed.
    if let Some(prefix) = BlobOwner::of(object, namespace).own_prefix() {
        ctx.fetcher.store.remove_under(&prefix, None).await?;
    }
    Ok(Action::await_change())
}

/// Reconcile decisions against a mocked API: which writes one reconcile makes, in which state, with which
/// conditions and Events.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::Method;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use kube::runtime::controller::Action;
    use serde_json::Value;

    use super::super::fixtures::{Mocked, World};
    use super::*;
    use crate::resources::{
        BlobRef, HttpSource, ImageSpec, PackageSourceRef, PackageSpec, PackageState, PackageStatus, PackageType,
        SecretRef, Source,
    };
    use crate::status;

    fn package(spec: PackageSpec) -> Package {
        let mut package = Package::new("app", spec);
        package.metadata.namespace = Some("team".into());
        package.metadata.uid = Some("5e7b1c1e-0000-4000-8000-000000000001".into());
        package.metadata.generation = Some(1);
        package.metadata.finalizers = Some(vec![FINALIZER.into()]);
        package
    }

    fn bits(source: Option<Source>) -> PackageSpec {
        PackageSpec::bits(source)
    }

    fn http(url: &str, secret: Option<&str>) -> Source {
        let secret_ref = secret.map(|name| SecretRef { name: name.into() });
        Source { http: Some(HttpSource { url: url.into(), secret_ref, ..Default::default() }), ..Default::default() }
    }

    async fn reconciled(package: Package, world: World) -> (Action, Mocked) {
        let mocked = Mocked::new(World { object: serde_json::to_value(&package).unwrap(), ..world });
        let action = reconcile(Arc::new(package), mocked.context.clone()).await.expect("reconcile");
        (action, mocked)
    }

    fn condition<'a>(status: &'a Value, type_: &str) -> Option<(&'a str, &'a str)> {
        let conditions = status["conditions"].as_array()?;
        let c = conditions.iter().find(|c| c["type"] == type_)?;
        Some((c["status"].as_str()?, c["reason"].as_str()?))
    }

    fn events(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(t, r)| (t.to_string(), r.to_string())).collect()
    }

    #[tokio::test]
    async fn a_new_object_first_gets_the_finalizer_and_nothing_else() {
        let mut new = package(bits(None));
        new.metadata.finalizers = None;
        let (action, mocked) = reconciled(new, World::default()).await;
        assert_eq!(action, Action::await_change());
        let calls = mocked.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].method, Method::PATCH);
        assert!(calls[0].path.starts_with("/apis/bitsmith.dev/v1alpha1/namespaces/team/packages/app?"));
        assert!(calls[0].body.to_string().contains(FINALIZER), "{}", calls[0].body);
    }

    #[tokio::test]
    async fn a_docker_package_is_ready_at_once() {
        let mut spec = bits(None);
        spec.package_type = PackageType::Docker;
        spec.image = Some(ImageSpec { reference: "nginx:1.27".into(), pull_secret_ref: None });
        let (action, mocked) = reconciled(package(spec), World::default()).await;
        assert_eq!(action, Action::await_change());
        let statuses = mocked.statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0]["state"], "READY");
        assert_eq!(condition(&statuses[0], "Ready"), Some(("True", "Succeeded")));
        assert_eq!(statuses[0]["observedGeneration"], 1);
        assert_eq!(mocked.events(), events(&[("Normal", "Succeeded")]));
    }

    #[tokio::test]
    async fn a_bits_package_without_a_source_awaits_its_upload() {
        let (action, mocked) = reconciled(package(bits(None)), World::default()).await;
        assert_eq!(action, Action::await_change());
        let statuses = mocked.statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0]["state"], "AWAITING_UPLOAD");
        assert_eq!(condition(&statuses[0], "Ready"), Some(("False", "AwaitingUpload")));
    }

    #[tokio::test]
    async fn an_invalid_spec_fails_and_stalls_without_a_retry() {
        let (action, mocked) = reconciled(package(bits(Some(Source::default()))), World::default()).await;
        assert_eq!(action, Action::await_change(), "retrying cannot fix a spec");
        let statuses = mocked.statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0]["state"], "FAILED");
        assert_eq!(condition(&statuses[0], "Stalled"), Some(("True", "InvalidSpec")));
        assert_eq!(condition(&statuses[0], "Reconciling"), None);
        assert_eq!(mocked.events(), events(&[("Warning", "InvalidSpec")]));
    }

    #[tokio::test]
    async fn an_up_to_date_package_makes_no_calls() {
        let mut ready = package(bits(Some(http("https://example.com/a.zip", None))));
        let stored = status::stored_digests(
            &crate::digest::Digests { sha1: "a".repeat(40), sha256: "b".repeat(64), size: 1 },
            BlobRef { store: "memory:///".into(), key: "k".into() },
        );
        ready.status = Some(status::done(&Default::default(), stored, Some(1), Timestamp::now()));
        let (action, mocked) = reconciled(ready, World::default()).await;
        assert_eq!(action, Action::await_change());
        assert!(mocked.calls().is_empty(), "{:?}", mocked.calls());
    }

    #[tokio::test]
    async fn a_missing_secret_is_a_condition_and_is_retried() {
        let missing = package(bits(Some(http("https://example.com/a.zip", Some("creds")))));
        let (action, mocked) = reconciled(missing, World::default()).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        let statuses = mocked.statuses();
        assert_eq!(statuses.len(), 2, "in progress, then the outcome");
        assert_eq!(statuses[0]["state"], "PROCESSING_UPLOAD");
        assert_eq!(condition(&statuses[0], "Reconciling"), Some(("True", "Fetching")));
        assert_eq!(statuses[1]["state"], "PROCESSING_UPLOAD");
        assert_eq!(condition(&statuses[1], "Reconciling"), Some(("True", "SecretNotFound")));
        assert_eq!(condition(&statuses[1], "Ready"), Some(("False", "SecretNotFound")));
        assert!(statuses[1]["error"].as_str().unwrap().contains("\"creds\""), "{}", statuses[1]);
        let gets: Vec<_> = mocked.calls().into_iter().filter(|c| c.method == Method::GET).collect();
        assert_eq!(gets.len(), 1);
        assert_eq!(gets[0].path, "/api/v1/namespaces/team/secrets/creds");
    }

    #[tokio::test]
    async fn a_failing_new_generation_keeps_the_ready_bits_and_retries() {
        let mut ready = package(bits(Some(http("http://127.0.0.1:1/app.zip", None))));
        let stored = status::stored_digests(
            &crate::digest::Digests { sha1: "a".repeat(40), sha256: "b".repeat(64), size: 1 },
            BlobRef { store: "memory:///".into(), key: "packages/team/app/old".into() },
        );
        ready.status = Some(status::done(&Default::default(), stored, Some(1), Timestamp::now()));
        ready.metadata.generation = Some(2);
        let (action, mocked) = reconciled(ready, World::default()).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        let last = mocked.statuses().pop().unwrap();
        assert_eq!(last["state"], "READY", "a failed retry never downgrades READY");
        assert_eq!(last["checksum"]["value"], "b".repeat(64));
        assert_eq!(condition(&last, "Ready"), Some(("True", "Succeeded")));
        assert_eq!(condition(&last, "Reconciling"), Some(("True", "SourceUnavailable")));
        assert_eq!(last["observedGeneration"], 2);
    }

    #[tokio::test]
    async fn a_copy_of_a_package_that_is_not_ready_waits_copying() {
        let copy = Source { package: Some(PackageSourceRef { name: "origin".into() }), ..Default::default() };
        let mut origin = package(bits(None));
        origin.metadata.name = Some("origin".into());
        origin.status = Some(status::awaiting_upload(&Default::default(), Some(1), Timestamp::now()));
        let world = World { packages: vec![origin], ..Default::default() };
        let (action, mocked) = reconciled(package(bits(Some(copy))), world).await;
        assert_ne!(action, Action::await_change(), "it looks again later");
        let statuses = mocked.statuses();
        assert_eq!(statuses[0]["state"], "COPYING");
        assert_eq!(condition(&statuses[0], "Reconciling"), Some(("True", "Copying")));
        assert_eq!(condition(statuses.last().unwrap(), "Reconciling"), Some(("True", "SourcePackageNotReady")));
    }

    #[tokio::test]
    async fn deletion_removes_the_blobs_and_then_the_finalizer() {
        let store = super::super::fixtures::memory_store();
        let commit = |key: String| {
            let store = store.clone();
            async move {
                let mut write = store.begin_write().await.unwrap();
                write.write(Bytes::from_static(b"bits")).await.unwrap();
                write.commit(&key).await.unwrap()
            }
        };
        let mut going = package(bits(None));
        let owner = BlobOwner::of(&going, "team");
        let blob = commit(owner.blob_key("new")).await;
        // Left behind when removing an earlier generation's blob failed.
        let leftover = commit(owner.blob_key("old")).await;
        // Another object's of the same name, before this one was created.
        let other = commit(BlobOwner { uid: Some("another-uid".into()), ..owner.clone() }.blob_key("old")).await;

        going.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        going.status = Some(PackageStatus {
            state: Some(PackageState::Ready),
            stored: crate::resources::StoredDigests { blob: Some(blob.clone()), ..Default::default() },
            ..Default::default()
        });
        let world = World { object: serde_json::to_value(&going).unwrap(), ..Default::default() };
        let mocked = Mocked::with_store(world, store.clone());
        assert_eq!(mocked.context.fetcher.store.size(&blob.key).await.unwrap(), 4, "the reconciler sees the blob");
        let action = reconcile(Arc::new(going), mocked.context.clone()).await.expect("reconcile");
        assert_eq!(action, Action::await_change());
        assert!(store.size(&blob.key).await.is_err(), "the blob is gone");
        assert!(store.size(&leftover.key).await.is_err(), "the leftover is gone");
        assert_eq!(store.size(&other.key).await.unwrap(), 4, "another object's blob stays");
        let calls = mocked.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].method, Method::PATCH);
        assert!(calls[0].body.to_string().contains("remove"), "{}", calls[0].body);
    }

    #[tokio::test]
    async fn a_replica_that_lost_the_lease_writes_and_removes_nothing() {
        // Not leading (any more): past its renew deadline, frozen or cut off from the API server.
        let lost = crate::leader::Leadership::elected();
        let awaiting = package(bits(None));
        let world = World { object: serde_json::to_value(&awaiting).unwrap(), ..Default::default() };
        let mocked = Mocked::with_leadership(world, super::super::fixtures::memory_store(), lost.clone());
        let outcome = reconcile(Arc::new(awaiting), mocked.context.clone()).await;
        let refused = outcome.as_ref().err().map(|e| format!("{e:?}"));
        assert!(refused.as_deref().is_some_and(|e| e.contains("NotLeading")), "{outcome:?}");
        assert!(mocked.calls().is_empty(), "no status, no Event: {:?}", mocked.calls());

        let store = super::super::fixtures::memory_store();
        let mut going = package(bits(None));
        let key = BlobOwner::of(&going, "team").blob_key("bits");
        let mut write = store.begin_write().await.unwrap();
        write.write(Bytes::from_static(b"bits")).await.unwrap();
        let blob = write.commit(&key).await.unwrap();
        going.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        going.status = Some(PackageStatus {
            state: Some(PackageState::Ready),
            stored: crate::resources::StoredDigests { blob: Some(blob.clone()), ..Default::default() },
            ..Default::default()
        });
        let world = World { object: serde_json::to_value(&going).unwrap(), ..Default::default() };
        let mocked = Mocked::with_leadership(world, store.clone(), lost);
        let outcome = reconcile(Arc::new(going), mocked.context.clone()).await;
        assert!(format!("{outcome:?}").contains("NotLeading"), "{outcome:?}");
        assert_eq!(store.size(&blob.key).await.unwrap(), 4, "the blob stays for the leader to remove");
        assert!(mocked.calls().is_empty(), "the finalizer stays: {:?}", mocked.calls());
    }
}
