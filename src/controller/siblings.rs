//! An object's siblings: the other Packages (Droplets) of its app in its namespace, found in the controller's
//! watch cache, so that retention can be judged; and a trigger that has the ones past the limit reconciled when
//! a sibling changes, so that they expire without waiting for a change of their own.

use std::sync::Arc;

use futures::channel::mpsc;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::reconcile::Context;
use crate::record::Managed;
use crate::resources::{Droplet, Package};
use crate::retention::{self, Expiry, Member, RETAIN_ANNOTATION, Retention, Stage};
use crate::status::CfState;

/// The objects of one kind the controller watches, how many of an app's it keeps, and how to have one
/// reconciled.
pub struct Kin<K: kube::Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    /// True once the watch cache holds the whole list.
    filled: tokio::sync::watch::Receiver<bool>,
    trigger: mpsc::UnboundedSender<ObjectRef<K>>,
    pub retention: Retention,
}

impl<K: kube::Resource<DynamicType = ()> + 'static> Clone for Kin<K> {
    fn clone(&self) -> Self {
        Kin {
            store: self.store.clone(),
            filled: self.filled.clone(),
            trigger: self.trigger.clone(),
            retention: self.retention,
        }
    }
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Kin<K> {
    /// Over the watch cache `store`, which `filled` says is whole; reconciles are asked for through the returned
    /// stream.
    pub fn new(
        store: Store<K>,
        filled: tokio::sync::watch::Receiver<bool>,
        retention: Retention,
    ) -> (Self, mpsc::UnboundedReceiver<ObjectRef<K>>) {
        let (trigger, triggered) = mpsc::unbounded();
        (Kin { store, filled, trigger, retention }, triggered)
    }

    /// Wait until the watch cache holds the whole list; false when it never will (the controller stopped).
    pub async fn filled(&self) -> bool {
        let mut filled = self.filled.clone();
        filled.wait_for(|filled| *filled).await.is_ok()
    }

    /// The watch cache.
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Have `object` reconciled soon.
    pub fn reconcile(&self, object: ObjectRef<K>) {
        // The controller's stream outlives every reconcile; after it ended nothing needs reconciling.
        let _ = self.trigger.unbounded_send(object);
    }
}

/// Kinds that retention applies to.
pub trait Kindred: Managed<State: CfState> {
    fn kin(ctx: &Context) -> &Kin<Self>;
    /// The app the object belongs to (`spec.appRef.name`).
    fn app(&self) -> Option<&str>;
}

impl Kindred for Package {
    fn kin(ctx: &Context) -> &Kin<Self> {
        &ctx.packages
    }
    fn app(&self) -> Option<&str> {
        self.spec.app_ref.as_ref().map(|app| app.name.as_str())
    }
}

impl Kindred for Droplet {
    fn kin(ctx: &Context) -> &Kin<Self> {
        &ctx.droplets
    }
    fn app(&self) -> Option<&str> {
        self.spec.app_ref.as_ref().map(|app| app.name.as_str())
    }
}

/// Where `state` stands for retention.
fn stage<S: CfState>(state: Option<S>) -> Stage {
    match state {
        Some(s) if s == S::DONE || s == S::FAILED => Stage::Finished,
        Some(s) if s == S::AWAITING_UPLOAD => Stage::AwaitingUpload,
        _ => Stage::Other,
    }
}

/// `object` as retention sees it, in `state`.
fn member<K: Kindred>(object: &K, state: Option<K::State>) -> Member<'_> {
    Member {
        name: object.meta().name.as_deref().unwrap_or_default(),
        created: object.meta().creation_timestamp.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0),
        stage: stage(state),
        retained: object.annotations().get(RETAIN_ANNOTATION).is_some_and(|v| v == "true"),
    }
}

/// The objects of `object`'s app in its namespace, from the watch cache: all but `object` itself, which the caller
/// knows better.
fn others<K: Kindred>(object: &K, store: &Store<K>) -> Vec<Arc<K>> {
    let Some(app) = object.app() else { return Vec::new() };
    let namespace = object.namespace();
    store
        .state()
        .into_iter()
        .filter(|o| o.namespace() == namespace && o.app() == Some(app) && o.uid() != object.uid())
        .collect()
}

/// The members of `object`'s app: the others from `others`, and `me` for `object` itself.
fn app<'a, K: Kindred>(others: &'a [Arc<K>], me: &Member<'a>) -> Vec<Member<'a>> {
    let mut app: Vec<Member> =
        others.iter().map(|o| member(o.as_ref(), o.bits_status().and_then(|s| s.state))).collect();
    app.push(me.clone());
    app
}

/// Whether `object`, as it now is, expires.
pub fn verdict<K: Kindred>(object: &K, ctx: &Context, now: Timestamp) -> Option<Expiry> {
    let others = others(object, &K::kin(ctx).store);
    let me = member(object, object.bits_status().and_then(|s| s.state));
    retention::judge(&me, &app(&others, &me), K::kin(ctx).retention, now)
}

impl<K: Kindred> Kin<K> {
    /// `changed` was just written to the watch cache: have its app's objects that are now past the limit
    /// reconciled, so that they expire. Judged on the watch cache right after each change, not when an object
    /// finishes: siblings finishing at once each see the others' older states, and only the last change's view
    /// holds them all.
    pub fn changed(&self, changed: &K) {
        // Only a finished object can push another past the limit; the rest cost no look at the cache.
        let me = member(changed, changed.bits_status().and_then(|s| s.state));
        if me.stage != Stage::Finished {
            return;
        }
        let others = others(changed, &self.store);
        for name in retention::superseded(&app(&others, &me), self.retention) {
            let mut superseded = ObjectRef::new(name);
            superseded.namespace = changed.namespace();
            self.reconcile(superseded);
        }
    }
}

/// How long until `object`, now in `state` and awaiting an upload, expires by age (`None`: never).
pub fn awaiting_expires_in<K: Kindred>(
    object: &K,
    state: Option<K::State>,
    ctx: &Context,
    now: Timestamp,
) -> Option<std::time::Duration> {
    retention::awaiting_expires_in(&member(object, state), K::kin(ctx).retention, now)
}
