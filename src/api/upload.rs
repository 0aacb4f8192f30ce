//! What package and droplet uploads share: claiming the object (AWAITING_UPLOAD → PROCESSING_UPLOAD, so that of
//! two concurrent uploads exactly one wins), renewing the claim while the bytes flow (so that the controller can
//! tell a live upload from one whose holder died), reading the multipart form, and settling the outcome in the
//! status. Every write is made over the status the upload last wrote: one the controller or another upload
//! changed meanwhile is never overwritten.

use axum::extract::Multipart;
use axum::extract::multipart::{Field, MultipartRejection};
use futures::TryStreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use serde::Serialize;

use super::{AppState, CfError, views};
use crate::pipeline::{PipelineError, Stored};
use crate::record::{Managed, WriteError};
use crate::resources::{BitsStatus, Droplet, DropletState, Package, PackageState};
use crate::sources::SourceError;
use crate::status::{self, CfState};

/// What an upload needs to know of its kind.
pub(super) trait Uploadable: Managed<State: CfState + Serialize + Send + Sync> {
    /// The state the API shows, also before the controller wrote one.
    fn shown_state(&self) -> Self::State;
    /// The answer to an upload when the object is not AWAITING_UPLOAD.
    fn not_awaiting_upload() -> CfError;
    /// The answer when the object has gone.
    fn not_found() -> CfError;
}

impl Uploadable for Package {
    fn shown_state(&self) -> PackageState {
        views::package_state(self)
    }
    fn not_awaiting_upload() -> CfError {
        CfError::PackageBitsAlreadyUploaded
    }
    fn not_found() -> CfError {
        CfError::ResourceNotFound { what: "Package" }
    }
}

impl Uploadable for Droplet {
    fn shown_state(&self) -> DropletState {
        views::droplet_state(self)
    }
    fn not_awaiting_upload() -> CfError {
        CfError::UnprocessableEntity("Droplet must be in AWAITING_UPLOAD state to upload bits.".into())
    }
    fn not_found() -> CfError {
        CfError::ResourceNotFound { what: "Droplet" }
    }
}

/// An object this upload holds, as the upload last wrote it (PROCESSING_UPLOAD, with its claim).
pub(super) struct Claimed<O: Uploadable> {
    pub object: O,
    /// The claim's id, which names the upload's staged bytes.
    pub id: String,
}

impl<O: Uploadable> Claimed<O> {
    fn status(&self) -> BitsStatus<O::State> {
        self.object.bits_status().cloned().unwrap_or_default()
    }

    /// The store, staging this upload's writes under its claim, so that the controller can remove them if the
    /// upload is abandoned.
    pub fn store(&self, state: &AppState) -> crate::store::BlobStore {
        state.store.staging_as(&self.id)
    }
}

fn api_of<O: Uploadable>(state: &AppState, object: &O) -> Api<O> {
    Api::namespaced(state.client.clone(), &object.namespace().unwrap_or_default())
}

fn with_links<O: Uploadable>(state: &AppState, object: &O, mut status: BitsStatus<O::State>) -> BitsStatus<O::State> {
    let links = object.links(&state.config.urls, status.state);
    crate::links::set_links(&mut status, Some(links));
    status
}

/// Move `object` from AWAITING_UPLOAD to PROCESSING_UPLOAD. The write carries the resourceVersion just read, so
/// when two uploads race, the second write conflicts and that upload is refused.
pub(super) async fn claim<O: Uploadable>(state: &AppState, object: &O) -> Result<Claimed<O>, CfError> {
    let api = api_of(state, object);
    let fresh = api
        .get_opt(&object.name_any())
        .await
        .map_err(|e| CfError::internal("reading the object to upload to", &e))?
        .filter(|fresh| fresh.uid() == object.uid())
        .ok_or_else(O::not_found)?;
    if fresh.shown_state() != O::State::AWAITING_UPLOAD || fresh.source().is_some() {
        return Err(O::not_awaiting_upload());
    }
    let prev = fresh.bits_status().cloned().unwrap_or_default();
    let generation = fresh.meta().generation;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let holder = &state.config.instance;
    let started = status::upload_claimed(&prev, holder, &id, generation, Timestamp::now());
    let started = with_links(state, &fresh, started);
    match state.recorder.status(&api, &fresh, &started).await {
        Ok(written) => Ok(Claimed { object: written.unwrap_or(fresh), id }),
        Err(WriteError::Conflict { .. }) => Err(O::not_awaiting_upload()),
        Err(WriteError::Kube(e)) => Err(CfError::internal("claiming the object for an upload", &e)),
    }
}

/// Run `work` (the upload) while renewing `claimed`'s claim every quarter of the claim timeout. A renewal that
/// finds the status changed means the claim is lost (the controller judged it abandoned): the work stops and
/// the upload is answered 503, to be tried again. A renewal the API server does not answer is tried again at
/// the next turn; the controller's timeout covers them. When the server's shutdown grace runs out, the work
/// stops, its staged bytes are removed, and the outcome is a failure to retry: the object awaits another upload.
pub(super) async fn hold<O: Uploadable>(
    state: &AppState,
    claimed: &mut Claimed<O>,
    work: impl std::future::Future<Output = Result<Stored, Failure>>,
) -> Result<Result<Stored, Failure>, CfError> {
    let api = api_of(state, &claimed.object);
    let every = state.config.upload_claim_timeout / 4;
    let mut cut_off = state.cut_off.subscribe();
    let mut cut_off = std::pin::pin!(async move {
        // The guard `wait_for` answers with is not Send: drop it here, not across the select's await.
        if cut_off.wait_for(|cut_off| *cut_off).await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    let mut work = Box::pin(work);
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            () = &mut cut_off => {
                drop(work);
                if let Err(error) = state.store.sweep_staged(&claimed.id).await {
                    tracing::warn!(%error, claim = claimed.id, "removing the staged bytes of an upload cut off");
                }
                let message = "the server shut down before the upload finished".to_string();
                let answer = CfError::ServiceUnavailable("The server is shutting down; upload again.".into());
                return Ok(Err(Failure::Retry { answer, message }));
            }
            () = tokio::time::sleep(every) => {}
        }
        let next = status::upload_renewed(&claimed.status(), Timestamp::now());
        match tokio::time::timeout(every, state.recorder.status(&api, &claimed.object, &next)).await {
            Ok(Ok(written)) => claimed.object = written.unwrap_or_else(|| claimed.object.clone()),
            Ok(Err(WriteError::Conflict { .. })) => {
                tracing::warn!(object = claimed.object.name_any(), claim = claimed.id, "an upload lost its claim");
                return Err(claim_lapsed());
            }
            Ok(Err(WriteError::Kube(error))) => tracing::warn!(%error, "renewing an upload's claim"),
            Err(_) => tracing::warn!("renewing an upload's claim: the API server did not answer in time"),
        }
    }
}

/// The answer to an upload whose claim lapsed before it finished.
fn claim_lapsed() -> CfError {
    CfError::ServiceUnavailable("The upload's claim on the object lapsed before it finished; upload again.".into())
}

/// Why an upload stored no bits.
pub(super) enum Failure {
    /// The bits themselves are unacceptable: the object is FAILED, as in Cloud Foundry.
    Content { answer: CfError, reason: &'static str, message: String },
    /// The request was wrong, broke off, or the store failed: the object awaits another upload.
    Retry { answer: CfError, message: String },
}

impl Failure {
    /// A request the API refuses before looking at any bits.
    pub fn request(answer: CfError) -> Self {
        Failure::Retry { message: answer.to_string(), answer }
    }

    /// A pipeline failure; `content` answers for bits that are unacceptable.
    pub fn pipeline(error: PipelineError, content: impl FnOnce(&PipelineError) -> CfError) -> Self {
        match &error {
            PipelineError::Store(e) => {
                tracing::error!(error = %e, "storing an upload");
                Failure::Retry { answer: CfError::BlobstoreUnavailable, message: error.to_string() }
            }
            PipelineError::Timeout { .. } => {
                Failure::Retry { answer: CfError::ServiceUnavailable(error.to_string()), message: error.to_string() }
            }
            PipelineError::Invalid { .. } | PipelineError::TooLarge { .. } | PipelineError::ChecksumMismatch { .. } => {
                Failure::Content { answer: content(&error), reason: error.reason(), message: error.to_string() }
            }
            PipelineError::Source(SourceError::Interrupted { detail, .. }) => Failure::Retry {
                answer: CfError::UnprocessableEntity(format!("The upload broke off: {detail}")),
                message: error.to_string(),
            },
            PipelineError::Source(_) => Failure::Retry { answer: content(&error), message: error.to_string() },
        }
    }
}

/// Record how the upload ended: stored bits make the object READY (STAGED); see [`Failure`] for the rest.
/// Returns the error to answer with, if any.
pub(super) async fn settle<O: Uploadable>(
    state: &AppState,
    claimed: &Claimed<O>,
    outcome: Result<Stored, Failure>,
) -> Result<(), CfError> {
    let api = api_of(state, &claimed.object);
    let generation = claimed.object.meta().generation;
    let now = Timestamp::now();
    let claim = claimed.status();
    let stored_key = outcome.as_ref().ok().map(|stored| stored.blob.key.clone());
    let (next, answer) = match outcome {
        Ok(stored) => {
            state.config.transfers.record(&stored.waits);
            let (object, bytes) = (claimed.object.name_any(), stored.digests.size);
            tracing::debug!(object, bytes, took = %stored.waits, "uploaded");
            let digests = status::stored_digests(&stored.digests, stored.blob);
            (status::done(&claim, digests, generation, now), Ok(()))
        }
        Err(Failure::Retry { answer, message }) => {
            let mut next = status::awaiting_upload(&claim, generation, now);
            next.error = Some(format!("the last upload failed: {message}"));
            (next, Err(answer))
        }
        Err(Failure::Content { answer, reason, message }) => {
            (status::failed(&claim, reason, &message, true, generation, now), Err(answer))
        }
    };
    let next = with_links(state, &claimed.object, next);
    match state.recorder.status(&api, &claimed.object, &next).await {
        Ok(_) => answer,
        Err(WriteError::Conflict { .. }) => {
            // The claim lapsed: the object is no longer this upload's. Bits it stored stay where they are rather
            // than risk removing a later upload's identical bits (same key); they go with the object.
            tracing::warn!(object = claimed.object.name_any(), stored = ?stored_key, "an upload finished after its claim lapsed");
            Err(claim_lapsed())
        }
        Err(WriteError::Kube(error)) => Err(CfError::internal("recording the upload's outcome", &error)),
    }
}

/// An upload's bytes, as the pipeline takes them.
pub(super) type Chunks<'a> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<bytes::Bytes, SourceError>> + Send + 'a>>;

/// What an upload request carries: a multipart form (the CF API), or the file itself (through the aggregated
/// API, e.g. `kubectl create --raw .../upload -f app.zip`).
pub(super) enum UploadBody {
    Form(Multipart),
    Raw(axum::body::Body),
}

impl UploadBody {
    /// A form when the request says it is one, the bare file otherwise.
    pub async fn from_request(
        request: axum::extract::Request,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, CfError> {
        use axum::extract::FromRequest;
        let multipart = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("multipart/form-data"));
        if multipart {
            Ok(UploadBody::Form(form(Multipart::from_request(request, state).await)?))
        } else {
            Ok(UploadBody::Raw(request.into_body()))
        }
    }
}

/// A bare request body as a stream the pipeline takes, cut off after `limit` bytes.
pub(super) fn raw_stream(
    body: axum::body::Body,
    limit: u64,
) -> impl futures::Stream<Item = Result<bytes::Bytes, SourceError>> + Unpin + 'static {
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    Box::pin(
        axum::body::Body::new(limited)
            .into_data_stream()
            .map_err(|e| SourceError::Interrupted { url: "the upload".into(), detail: e.to_string() }),
    )
}

/// The multipart form, or 422 when the body is not one.
pub(super) fn form(multipart: Result<Multipart, MultipartRejection>) -> Result<Multipart, CfError> {
    multipart.map_err(|e| CfError::UnprocessableEntity(format!("The request must be multipart/form-data: {e}")))
}

/// The next part of the form; a body that breaks off mid-form is an upload that broke off.
pub(super) async fn next_field(form: &mut Multipart) -> Result<Option<Field<'_>>, PipelineError> {
    form.next_field().await.map_err(|e| interrupted(&e).into())
}

/// A form part's bytes, as a stream the pipeline takes.
pub(super) fn field_stream<'a>(
    field: Field<'a>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, SourceError>> + Unpin + 'a {
    Box::pin(field.map_err(|e| interrupted(&e)))
}

fn interrupted(error: &axum::extract::multipart::MultipartError) -> SourceError {
    SourceError::Interrupted { url: "the upload".into(), detail: error.body_text() }
}
