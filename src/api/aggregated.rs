//! The API as an aggregated Kubernetes API (`APIService` `v1alpha1.api.bitsmith.dev`): the same uploads and
//! downloads, addressed by namespace and name, for kubectl users —
//! `kubectl create --raw /apis/api.bitsmith.dev/v1alpha1/namespaces/NS/packages/NAME/upload -f app.zip` and
//! `kubectl get --raw .../download`. The Kubernetes API server authenticates the user and authorizes the request
//! on `api.bitsmith.dev`; this API then checks the same SubjectAccessReviews on `bitsmith.dev` as for CF clients.
//! Downloads are always the bytes: kubectl's requests go through the API server and cannot follow a redirect to
//! the store.
//!
//! `POST …/packages/NAME/uploadtoken` (and for droplets) hands a user who may upload to that object a short-lived
//! upload token (see [`super::upload_token`]), for sending the bits straight to this API — as `kubectl bitsmith
//! push` does — instead of through the API server, whose request timeout cuts long uploads (kubernetes#73421).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::blobs::{self, Delivery};
use super::front_proxy::Credentials;
use super::upload::UploadBody;
use super::{AppState, CfError, droplets, packages};
use crate::resources::BitsObject;

/// The aggregated API's group.
pub const GROUP: &str = "api.bitsmith.dev";
const VERSION: &str = "v1alpha1";

/// The discovery documents and the upload and download routes.
pub fn routes() -> Router<Arc<AppState>> {
    let base = format!("/apis/{GROUP}/{VERSION}");
    Router::new()
        .route(&format!("/apis/{GROUP}"), get(group))
        .route(&base, get(resources))
        .route(&format!("{base}/namespaces/{{namespace}}/packages/{{name}}/upload"), post(upload_package))
        .route(&format!("{base}/namespaces/{{namespace}}/packages/{{name}}/download"), get(download_package))
        .route(&format!("{base}/namespaces/{{namespace}}/droplets/{{name}}/upload"), post(upload_droplet))
        .route(&format!("{base}/namespaces/{{namespace}}/droplets/{{name}}/download"), get(download_droplet))
        .route(&format!("{base}/namespaces/{{namespace}}/packages/{{name}}/uploadtoken"), post(package_upload_token))
        .route(&format!("{base}/namespaces/{{namespace}}/droplets/{{name}}/uploadtoken"), post(droplet_upload_token))
}

/// `GET /apis/api.bitsmith.dev`: the group and its one version.
async fn group() -> Json<Value> {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    Json(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version], "preferredVersion": version}),
    )
}

/// `GET /apis/api.bitsmith.dev/v1alpha1`: the subresources served, which is also what the API server's
/// availability check asks for.
async fn resources() -> Json<Value> {
    let resource = |name: &str, kind: &str, verb: &str| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": [verb]});
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [
            resource("packages/upload", "Package", "create"),
            resource("packages/download", "Package", "get"),
            resource("droplets/upload", "Droplet", "create"),
            resource("droplets/download", "Droplet", "get"),
            resource("packages/uploadtoken", "Package", "create"),
            resource("droplets/uploadtoken", "Droplet", "create"),
        ],
    }))
}

async fn upload_package(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
    request: Request,
) -> Result<Response, CfError> {
    let found = || state.index.package_named(&namespace, &name);
    let (caller, package) = state.authorized_caller(&credentials, found, "Package", "create", Some("upload")).await?;
    packages::upload_to(&state, &package, &caller, UploadBody::from_request(request, &state).await?).await
}

async fn download_package(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let found = || state.index.package_named(&namespace, &name);
    let package = state.authorized(&credentials, found, "Package", "get", Some("download")).await?;
    blobs::download(&state, packages::package_blob(&package)?, &headers, Delivery::Bytes).await
}

async fn upload_droplet(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
    request: Request,
) -> Result<Response, CfError> {
    let found = || state.index.droplet_named(&namespace, &name);
    let droplet = state.authorized(&credentials, found, "Droplet", "create", Some("upload")).await?;
    droplets::upload_to(&state, &droplet, UploadBody::from_request(request, &state).await?).await
}

async fn download_droplet(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let found = || state.index.droplet_named(&namespace, &name);
    let droplet = state.authorized(&credentials, found, "Droplet", "get", Some("download")).await?;
    blobs::download(&state, droplets::droplet_blob(&droplet)?, &headers, Delivery::Bytes).await
}

async fn package_upload_token(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
) -> Result<Json<Value>, CfError> {
    upload_token(&state, &credentials, || state.index.package_named(&namespace, &name), "Package").await
}

async fn droplet_upload_token(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    credentials: Credentials,
) -> Result<Json<Value>, CfError> {
    upload_token(&state, &credentials, || state.index.droplet_named(&namespace, &name), "Droplet").await
}

/// A token for the caller, who may upload to the object, bound to it; and where to upload with it.
async fn upload_token<O: BitsObject>(
    state: &AppState,
    credentials: &Credentials,
    found: impl FnOnce() -> Option<Arc<O>>,
    what: &'static str,
) -> Result<Json<Value>, CfError> {
    let who = state.authenticated_as(credentials).await?;
    // An upload token is not traded for another: its life would have no end.
    if who.upload_of.is_some() {
        return Err(CfError::NotAuthorized);
    }
    let (caller, object) = state.authorize_as(who, found, what, "create", Some("upload")).await?;
    let uid = object.uid().unwrap_or_default();
    let (token, expires) = state.config.upload_tokens.issue(&caller, O::PLURAL, &uid, Timestamp::now());
    Ok(Json(json!({
        "kind": "UploadToken",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "token": token,
        "expirationTimestamp": expires.to_string(),
        "upload": state.config.urls.href(&format!("/v3/{}/{uid}/upload", O::PLURAL)),
    })))
}
