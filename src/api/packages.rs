//! `/v3/packages/:guid` and its download and upload.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;

use super::{AppState, CfError, blobs, views};
use crate::resources::{PackageState, PackageType};

/// `GET /v3/packages/:guid`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, CfError> {
    let package = state.authorized(&headers, || state.index.package(&guid), "Package", "get", None).await?;
    Ok(Json(views::package(&package, &state.config.urls)))
}

/// `GET /v3/packages/:guid/download`: a redirect to a presigned URL on a remote store, the bytes otherwise.
pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let package = state.authorized(&headers, || state.index.package(&guid), "Package", "get", Some("download")).await?;
    if package.spec.package_type != PackageType::Bits {
        return Err(CfError::UnprocessableEntity("Package type must be bits.".into()));
    }
    let blob = package
        .status
        .as_ref()
        .filter(|s| s.state == Some(PackageState::Ready))
        .and_then(|s| s.stored.blob.as_ref())
        .ok_or_else(|| CfError::UnprocessableEntity("Package has no bits to download.".into()))?;
    blobs::download(&state, blob, &headers).await
}
