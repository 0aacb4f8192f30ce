//! `/v3/droplets/:guid`, its download, and the jobs of droplet uploads.

use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kube::ResourceExt;
use serde_json::Value;

use super::blobs::Delivery;
use super::front_proxy::Credentials;
use super::upload::{self, Failure, UploadBody};
use super::{AppState, CfError, blobs, views};
use crate::archive::tgz::TgzCheck;
use crate::pipeline::{self, PipelineError, Stored};
use crate::resources::{BlobRef, Droplet, DropletState};
use crate::store::{BlobOwner, BlobStore};

/// A droplet may inflate to at most this many times its compressed size before the check gives up on it.
const INFLATION_LIMIT: u64 = 20;

/// `GET /v3/droplets/:guid`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    credentials: Credentials,
) -> Result<Json<Value>, CfError> {
    let droplet = state.authorized(&credentials, || state.index.droplet(&guid), "Droplet", "get", None).await?;
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
    credentials: Credentials,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let droplet =
        state.authorized(&credentials, || state.index.droplet(&guid), "Droplet", "get", Some("download")).await?;
    blobs::download(&state, droplet_blob(&droplet)?, &headers, Delivery::RedirectWhenSigned).await
}

/// The blob of a STAGED droplet.
pub(super) fn droplet_blob(droplet: &Droplet) -> Result<&BlobRef, CfError> {
    droplet
        .status
        .as_ref()
        .filter(|s| s.state == Some(DropletState::Staged))
        .and_then(|s| s.stored.blob.as_ref())
        .ok_or_else(|| CfError::UnprocessableEntity("Droplet has no bits to download.".into()))
}

/// `GET /v3/jobs/:guid`: a droplet upload's job, whose guid is the Droplet's.
pub async fn job(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    credentials: Credentials,
) -> Result<Json<Value>, CfError> {
    let droplet = state.authorized(&credentials, || state.index.droplet(&guid), "Job", "get", None).await?;
    Ok(Json(views::droplet_upload_job(&droplet, &state.config.urls)))
}

/// `POST /v3/droplets/:guid/upload`: a `.tgz` in the form's `bits` part. Answers 202 with the droplet as the
/// upload found it and the job to follow in `Location`.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    credentials: Credentials,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, CfError> {
    let droplet =
        state.authorized(&credentials, || state.index.droplet(&guid), "Droplet", "create", Some("upload")).await?;
    upload_to(&state, &droplet, UploadBody::Form(upload::form(form)?)).await
}

/// Upload `body` to `droplet`, whoever asked.
pub(super) async fn upload_to(state: &AppState, droplet: &Droplet, body: UploadBody) -> Result<Response, CfError> {
    let mut claimed = upload::claim(state, droplet).await?;
    let owner = BlobOwner::of(&claimed.object, &claimed.object.namespace().unwrap_or_default());
    let store = claimed.store(state);
    let max = state.config.max_upload_size;
    let receiving = async {
        let stored = async {
            match body {
                UploadBody::Form(mut form) => {
                    while let Some(field) = upload::next_field(&mut form).await? {
                        if field.name() == Some("bits") {
                            return store_tgz(state, &store, &owner, Box::pin(upload::field_stream(field))).await;
                        }
                    }
                    Err(PipelineError::Invalid { detail: "the form has no bits".into() })
                }
                UploadBody::Raw(body) => {
                    store_tgz(state, &store, &owner, Box::pin(upload::raw_stream(body, max))).await
                }
            }
        }
        .await;
        stored.map_err(|e| {
            Failure::pipeline(e, |e| CfError::UnprocessableEntity(format!("Uploaded droplet file is invalid: {e}")))
        })
    };
    let outcome = upload::hold(state, &mut claimed, receiving).await?;
    upload::settle(state, &claimed, outcome).await?;
    let guid = claimed.object.metadata.uid.as_deref().unwrap_or_default();
    let job = state.config.urls.job(guid);
    let body = views::droplet(&claimed.object, None, &state.config.urls);
    Ok((StatusCode::ACCEPTED, [(LOCATION, job)], Json(body)).into_response())
}

/// Store a droplet, checking on the way that it is a `.tgz`.
async fn store_tgz(
    state: &AppState,
    store: &BlobStore,
    owner: &BlobOwner,
    chunks: upload::Chunks<'_>,
) -> Result<Stored, PipelineError> {
    let max = state.config.max_upload_size;
    let check = Box::new(TgzCheck::new(max.saturating_mul(INFLATION_LIMIT)));
    pipeline::store_checked(chunks, "the droplet", store, owner, None, max, Some(check)).await
}
