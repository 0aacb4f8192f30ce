//! The in-cluster controller: reconciles Packages and Droplets by following their [`plan`](crate::plan), and
//! records each outcome as status (server-side apply under one field manager) and as Events.

mod reconcile;

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Predicate, predicates};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};

pub use reconcile::{Context, FIELD_MANAGER, FINALIZER, ReconcileError};

use crate::fetch::Fetcher;
use crate::resources::{Droplet, Package};

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Objects reconciled at once, so that many new Packages do not open as many downloads.
    pub concurrency: u16,
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Who publishes Events (the Deployment's name, the Pod's name).
    pub reporter: Reporter,
}

/// Reconcile Packages and Droplets until the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn run(client: Client, fetcher: Fetcher, options: Options) {
    let context = Arc::new(Context {
        client: client.clone(),
        fetcher,
        recorder: Recorder::new(client.clone(), options.reporter.clone()),
    });
    let config = controller::Config::default().concurrency(options.concurrency);
    let packages: Api<Package> = scoped(&client, &options.namespace);
    let droplets: Api<Droplet> = scoped(&client, &options.namespace);
    let packages = controller_for(packages)
        .with_config(config.clone())
        .shutdown_on_signal()
        .run(reconcile::reconcile::<Package>, reconcile::error_policy::<Package>, context.clone())
        .for_each(|result| async move { reconcile::log_outcome(result) });
    let droplets = controller_for(droplets)
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile::reconcile::<Droplet>, reconcile::error_policy::<Droplet>, context)
        .for_each(|result| async move { reconcile::log_outcome(result) });
    tokio::join!(packages, droplets);
}

/// A controller that reconciles when the spec changes (a new generation) or the finalizers do, and not when
/// only the status does: the controller's own status writes would otherwise trigger it again at once.
/// Retries are scheduled by the reconciler's requeues.
fn controller_for<K>(api: Api<K>) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let triggers = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::finalizers), Default::default());
    Controller::for_stream(triggers, reader)
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
