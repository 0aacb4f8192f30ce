//! A mocked Kubernetes API for fast tests of reconcile decisions. It answers every request a reconcile makes
//! from a small world of objects and records each one, so a test asserts exactly which writes a reconcile made
//! and what they said. The same behaviours are tested against a real apiserver in the integration tests.

use std::sync::{Arc, Mutex};

use crate::record::Recorder;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use super::reconcile::Context;
use crate::fetch::Fetcher;
use crate::resources::Package;
use crate::sources::{Egress, SourcePolicy};
use crate::store::BlobStore;

/// One request the reconciler made.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub body: Value,
}

impl Call {
    /// A status write by server-side apply: its `status`.
    pub fn applied_status(&self) -> Option<&Value> {
        (self.method == Method::PATCH && self.path.contains("/status?")).then(|| &self.body["status"])
    }

    /// A created Event: `(type, reason)`.
    pub fn event(&self) -> Option<(&str, &str)> {
        (self.method == Method::POST && self.path.contains("/events"))
            .then(|| (self.body["type"].as_str().unwrap_or_default(), self.body["reason"].as_str().unwrap_or_default()))
    }
}

/// What the mocked API holds: the object under reconcile, and what it may look up.
#[derive(Default)]
pub struct World {
    /// Returned for writes to the object under reconcile.
    pub object: Value,
    pub secrets: Vec<Secret>,
    pub packages: Vec<Package>,
}

/// A reconcile context over a mocked API and an in-memory store, and the calls made through it.
pub struct Mocked {
    pub context: Arc<Context>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Mocked {
    /// Over a fresh in-memory store.
    pub fn new(world: World) -> Self {
        Self::with_store(world, memory_store())
    }

    pub fn with_store(world: World, store: BlobStore) -> Self {
        Self::with_leadership(world, store, crate::leader::Leadership::always())
    }

    /// Over `store`, for a replica whose leadership is `leadership`.
    pub fn with_leadership(world: World, store: BlobStore, leadership: crate::leader::Leadership) -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let recorded = calls.clone();
        tokio::spawn(async move {
            while let Some((request, reply)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let call = Call { method: parts.method, path: parts.uri.to_string(), body };
                let (status, answer) = answer(&world, &call);
                recorded.lock().unwrap().push(call);
                reply.send_response(
                    Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
                );
            }
        });
        let client = Client::new(service, "default");
        // Sources may reach loopback, where an unreachable port stands for a source that is down.
        let egress = Egress::new(vec!["127.0.0.0/8".parse().expect("a CIDR")], Vec::new());
        let policy = SourcePolicy { egress: std::sync::Arc::new(egress), ..Default::default() };
        let fetcher = Fetcher::new(store, policy, 1 << 20).expect("an http client");
        let context = Arc::new(Context {
            recorder: Recorder::new(client.clone(), "bitsmith-test".into(), Default::default()),
            client,
            fetcher,
            metrics: Default::default(),
            urls: None,
            upload_claim_timeout: std::time::Duration::from_secs(60),
            claims: Default::default(),
            leadership,
            packages: detached(),
            droplets: detached(),
            findings: Default::default(),
            rechecks: Default::default(),
        });
        Mocked { context, calls }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The statuses written so far, in order.
    pub fn statuses(&self) -> Vec<Value> {
        self.calls().iter().filter_map(|c| c.applied_status().cloned()).collect()
    }

    /// The Events created so far: `(type, reason)`.
    pub fn events(&self) -> Vec<(String, String)> {
        self.calls().iter().filter_map(|c| c.event().map(|(t, r)| (t.to_string(), r.to_string()))).collect()
    }
}

/// Siblings of no one: an empty watch cache, and triggers nobody follows.
fn detached<K: kube::Resource<DynamicType = ()> + Clone + 'static>() -> super::siblings::Kin<K> {
    let (store, _writer) = kube::runtime::reflector::store();
    let (_, filled) = tokio::sync::watch::channel(true);
    super::siblings::Kin::new(store, filled, Default::default()).0
}

pub fn memory_store() -> BlobStore {
    BlobStore::open("memory://", &Default::default()).expect("a memory store")
}

/// Answer one request like an apiserver holding `world` would.
fn answer(world: &World, call: &Call) -> (StatusCode, Value) {
    let path = call.path.split('?').next().unwrap_or_default();
    let name = path.rsplit('/').next().unwrap_or_default();
    match call.method {
        Method::GET if path.contains("/secrets/") => {
            found(world.secrets.iter().find(|s| s.metadata.name.as_deref() == Some(name)))
        }
        Method::GET if path.contains("/packages/") => {
            found(world.packages.iter().find(|p| p.metadata.name.as_deref() == Some(name)))
        }
        Method::POST if path.ends_with("/events") => (StatusCode::CREATED, call.body.clone()),
        Method::PATCH if path.contains("/packages/") || path.contains("/droplets/") => {
            (StatusCode::OK, world.object.clone())
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, status_body(500, "InternalError", "not mocked")),
    }
}

fn found<T: serde::Serialize>(object: Option<&T>) -> (StatusCode, Value) {
    match object {
        Some(object) => (StatusCode::OK, serde_json::to_value(object).unwrap()),
        None => (StatusCode::NOT_FOUND, status_body(404, "NotFound", "not found")),
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}
