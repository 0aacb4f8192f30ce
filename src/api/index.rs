//! Resolves CF guids — the objects' `metadata.uid` — to Packages and Droplets, from a watch cache of both kinds.

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};

use crate::resources::{Droplet, Package};

/// The watch cache the API answers from.
#[derive(Clone)]
pub struct Index {
    packages: Store<Package>,
    droplets: Store<Droplet>,
}

impl Index {
    /// Start watching Packages and Droplets (in `namespace`, or everywhere), on the current runtime.
    pub fn start(client: &Client, namespace: Option<&str>) -> Self {
        Index { packages: watch(client, namespace), droplets: watch(client, namespace) }
    }

    /// Wait until both kinds have been listed once.
    pub async fn ready(&self) {
        let _ = tokio::join!(self.packages.wait_until_ready(), self.droplets.wait_until_ready());
    }

    pub fn package(&self, guid: &str) -> Option<Arc<Package>> {
        self.packages.find(|p| p.metadata.uid.as_deref() == Some(guid))
    }

    pub fn package_named(&self, namespace: &str, name: &str) -> Option<Arc<Package>> {
        self.packages.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn droplet_named(&self, namespace: &str, name: &str) -> Option<Arc<Droplet>> {
        self.droplets.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn droplet(&self, guid: &str) -> Option<Arc<Droplet>> {
        self.droplets.find(|d| d.metadata.uid.as_deref() == Some(guid))
    }
}

fn watch<K>(client: &Client, namespace: Option<&str>) -> Store<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let events = watcher(api, watcher::Config::default()).backoff(crate::watching::backoff()).reflect(writer);
    tokio::spawn(events.for_each(|event| async move {
        if let Err(error) = event {
            tracing::warn!(%error, "watching for the API's guid index");
        }
    }));
    reader
}
