//! `/v3/droplets/:guid`, its download, and the jobs of droplet uploads.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use kube::ResourceExt;
use serde_json::Value;

use super::{AppState, CfError, blobs, views};
use crate::resources::DropletState;

/// `GET /v3/droplets/:guid`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, CfError> {
    let droplet = state.authorized(&headers, || state.index.droplet(&guid), "Droplet", "get", None).await?;
    let package = droplet
        .spec
        .package_ref
        .as_ref()
        .and_then(|p| state.index.package_named(&droplet.namespace().unwrap_or_default(), &p.name));
    let package_guid = package.as_ref().and_then(|p| p.metadata.uid.as_deref());
    Ok(Json(views::droplet(&droplet, package_guid, &state.config.urls)))
}

/// `GET /v3/droplets/:guid/download`, once STAGED.
pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let droplet = state.authorized(&headers, || state.index.droplet(&guid), "Droplet", "get", Some("download")).await?;
    let blob = droplet
        .status
        .as_ref()
        .filter(|s| s.state == Some(DropletState::Staged))
        .and_then(|s| s.stored.blob.as_ref())
        .ok_or_else(|| CfError::UnprocessableEntity("Droplet has no bits to download.".into()))?;
    blobs::download(&state, blob, &headers).await
}

/// `GET /v3/jobs/:guid`: a droplet upload's job, whose guid is the Droplet's.
pub async fn job(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, CfError> {
    let droplet = state.authorized(&headers, || state.index.droplet(&guid), "Job", "get", None).await?;
    Ok(Json(views::droplet_upload_job(&droplet, &state.config.urls)))
}
