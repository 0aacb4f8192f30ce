//! The in-cluster controller: reconciles Packages and Droplets by following their [`plan`](crate::plan), and
//! records each outcome as status (server-side apply under one field manager) and as Events.

mod audit;
#[cfg(test)]
mod fixtures;
mod reconcile;
mod siblings;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Predicate, predicates};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};

pub use audit::AuditOptions;
pub use reconcile::{Context, FINALIZER, ReconcileError};

use crate::fetch::Fetcher;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::record::Managed;
use crate::resources::{Droplet, Package};
use crate::retention::Retention;
use crate::store::BlobStore;
use siblings::Kin;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Objects reconciled at once, so that many new Packages do not open as many downloads.
    pub concurrency: u16,
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Who publishes Events (the Deployment's name, the Pod's name).
    pub reporter: Reporter,
    /// Where reconciles are counted.
    pub metrics: Arc<Metrics>,
    /// Where the CF v3 API serves the objects; their statuses link there. No links without it.
    pub urls: Option<crate::links::ApiUrls>,
    /// An upload whose claim does not change for this long was abandoned: the object awaits another upload.
    pub upload_claim_timeout: Duration,
    /// How many Packages of an app are kept, and how long an upload is awaited.
    pub package_retention: Retention,
    /// How many Droplets of an app are kept, and how long an upload is awaited.
    pub droplet_retention: Retention,
    /// How often the store is audited, and how long orphans and staged leftovers are given.
    pub audit: AuditOptions,
}

/// Reconcile Packages and Droplets until the process is asked to stop (SIGTERM or Ctrl-C), writing only while
/// `leadership` holds.
pub async fn run(client: Client, fetcher: Fetcher, options: Options, leadership: Leadership) {
    // Stopped with the rest when leading ends, however it ends (the work is dropped when the Lease is lost).
    let _sweeper = AbortOnDrop(tokio::spawn(sweep_staging(fetcher.store.clone(), options.audit.orphan_grace)));
    let (packages, package_kin, package_triggers) =
        controller_for(scoped::<Package>(&client, &options.namespace), options.package_retention);
    let (droplets, droplet_kin, droplet_triggers) =
        controller_for(scoped::<Droplet>(&client, &options.namespace), options.droplet_retention);
    let packages = with_secret_triggers(packages, &client, &options.namespace);
    let droplets = with_secret_triggers(droplets, &client, &options.namespace);
    let context = Arc::new(Context {
        client: client.clone(),
        fetcher,
        recorder: crate::record::Recorder::new(client.clone(), options.reporter.clone(), options.metrics.clone()),
        metrics: options.metrics.clone(),
        urls: options.urls.clone(),
        upload_claim_timeout: options.upload_claim_timeout,
        claims: Default::default(),
        leadership,
        packages: package_kin,
        droplets: droplet_kin,
        findings: Default::default(),
        rechecks: Default::default(),
    });
    let _auditor = AbortOnDrop(tokio::spawn(audit::run(context.clone(), options.audit)));
    let config = controller::Config::default().concurrency(options.concurrency);
    let packages = packages
        .reconcile_on(package_triggers)
        .with_config(config.clone())
        .shutdown_on_signal()
        .run(reconcile::reconcile::<Package>, reconcile::error_policy::<Package>, context.clone())
        .for_each(|result| async move { reconcile::log_outcome(result) });
    let droplets = droplets
        .reconcile_on(droplet_triggers)
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile::reconcile::<Droplet>, reconcile::error_policy::<Droplet>, context)
        .for_each(|result| async move { reconcile::log_outcome(result) });
    tokio::join!(packages, droplets);
}

/// A task that stops when its handle goes.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Remove what writers killed mid-write left under `staging/` (never visible as blobs) once older than `grace`,
/// every 10 minutes.
async fn sweep_staging(store: BlobStore, grace: Duration) {
    loop {
        match store.sweep_staging(grace).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed stale staged writes"),
            Err(error) => tracing::warn!(%error, "sweeping stale staged writes"),
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// A controller that reconciles when the spec changes (a new generation), the finalizers do, or an upload takes
/// or gives back its claim, and not when only the rest of the status does: the controller's own status writes
/// would otherwise trigger it again at once. Retries, and the watch on a claim's renewals, are scheduled by the
/// reconciler's requeues. Every change, status included, has retention look at the object's app (see
/// [`Kin::changed`]); the objects it finds past the limit come out of the returned stream.
fn controller_for<K: siblings::Kindred>(
    api: Api<K>,
    retention: Retention,
) -> (Controller<K>, Kin<K>, futures::channel::mpsc::UnboundedReceiver<ObjectRef<K>>) {
    let (reader, writer) = reflector::store();
    // Whether the watch cache holds the whole list: the store's own readiness wakes one waiter only, which the
    // controller itself is.
    let (filled, filled_rx) = tokio::sync::watch::channel(false);
    let (kin, superseded) = Kin::new(reader.clone(), filled_rx, retention);
    let watching = kin.clone();
    let triggers = watcher(api, watcher::Config::default())
        .backoff(crate::watching::backoff())
        .reflect(writer)
        .inspect_ok(move |event| match event {
            watcher::Event::InitDone => {
                filled.send_replace(true);
            }
            watcher::Event::Apply(object) => watching.changed(object),
            _ => {}
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::finalizers)
                .combine(upload_claim::<K>)
                .combine(requested_at::<K>),
            Default::default(),
        );
    (Controller::for_stream(triggers, reader), kin, superseded)
}

/// The reconcile request on the object (`bitsmith.dev/requested-at`), if any: a new value triggers a reconcile.
fn requested_at<K: Managed>(object: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let requested = object.annotations().get(crate::resources::REQUESTED_AT_ANNOTATION);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    requested.hash(&mut hasher);
    Some(hasher.finish())
}

/// Which upload holds the object, if any.
fn upload_claim<K: Managed>(object: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let claim = object.bits_status().and_then(|s| s.upload.as_ref()).map(|claim| claim.id.as_str());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    claim.hash(&mut hasher);
    Some(hasher.finish())
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reconcile an object again when the Secret its source names appears, changes or goes. Secrets are watched as
/// metadata only: the controller reads a Secret's data when it reconciles, and never keeps it.
fn with_secret_triggers<K: Managed>(
    controller: Controller<K>,
    client: &Client,
    namespace: &Option<String>,
) -> Controller<K> {
    let objects = controller.store();
    let secrets: Api<PartialObjectMeta<Secret>> = scoped(client, namespace);
    let changes = watcher(secrets, watcher::Config::default()).backoff(crate::watching::backoff()).touched_objects();
    controller.watches_stream(changes, move |secret: PartialObjectMeta<Secret>| {
        let (namespace, name) = (secret.namespace(), secret.name_any());
        objects
            .state()
            .into_iter()
            .filter(|o| o.namespace() == namespace && o.source().and_then(|s| s.secret_name()) == Some(name.as_str()))
            .map(|o| ObjectRef::from(o.as_ref()))
            .collect::<Vec<_>>()
    })
}
