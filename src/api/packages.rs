//! `/v3/packages/:guid` and its download and upload.

use std::sync::Arc;

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use kube::ResourceExt;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::blobs::Delivery;
use super::front_proxy::Credentials;
use super::resources::{self, Resource};
use super::upload::{self, Failure, UploadBody};
use super::{AppState, CfError, blobs, views};
use crate::archive::zip::{
    EntryCheck, EntryHeader, Event as ZipEvent, MADE_ON_UNIX, Repack, Sizes, ZipError, ZipWriter, file_attributes,
};
use crate::auth::{Access, Caller};
use crate::cache::{self, CachedFile, ResourceCache, Scope};
use crate::pipeline::{self, Stored};
use crate::resources::{BlobRef, Package, PackageState, PackageType};
use crate::sources::SourceError;
use crate::store::{BlobOwner, BlobStore};

/// `GET /v3/packages/:guid`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    credentials: Credentials,
) -> Result<Json<Value>, CfError> {
    let package = state.authorized(&credentials, || state.index.package(&guid), "Package", "get", None).await?;
    Ok(Json(views::package(&package, &state.config.urls)))
}

/// `GET /v3/packages/:guid/download`: a redirect to a presigned URL on a remote store, the bytes otherwise.
pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    credentials: Credentials,
    headers: HeaderMap,
) -> Result<Response, CfError> {
    let package =
        state.authorized(&credentials, || state.index.package(&guid), "Package", "get", Some("download")).await?;
    blobs::download(&state, package_blob(&package)?, &headers, Delivery::RedirectWhenSigned).await
}

/// The blob of a READY bits package.
pub(super) fn package_blob(package: &Package) -> Result<&BlobRef, CfError> {
    if package.spec.package_type != PackageType::Bits {
        return Err(CfError::UnprocessableEntity("Package type must be bits.".into()));
    }
    package
        .status
        .as_ref()
        .filter(|s| s.state == Some(PackageState::Ready))
        .and_then(|s| s.stored.blob.as_ref())
        .ok_or_else(|| CfError::UnprocessableEntity("Package has no bits to download.".into()))
}

/// `POST /v3/resource_matches`: which of the named files the cache holds for the caller, by Cloud Controller's
/// rules. Any authenticated caller may ask, as in Cloud Foundry; what they are offered depends on the
/// `resource_cache_scope`.
pub async fn resource_matches(
    State(state): State<Arc<AppState>>,
    credentials: Credentials,
    body: Bytes,
) -> Result<Response, CfError> {
    let caller = state.authenticated(&credentials).await?;
    let requested = resources::parse_matches(&body)?;
    let held: Vec<Option<Vec<String>>> = requested
        .iter()
        .map(|(_, resource)| resource.matchable().then(|| state.cache.holders(&resource.sha1, resource.size)).flatten())
        .collect();
    let usable = usable(&state, &caller, &held).await?;
    let matched: Vec<&RawValue> =
        requested.into_iter().zip(usable).filter(|(_, usable)| *usable).map(|((item, _), _)| item).collect();
    Ok((StatusCode::CREATED, Json(Matched { resources: matched })).into_response())
}

/// The answer of `resource_matches`: the matched entries as the client sent them.
#[derive(serde::Serialize)]
struct Matched<'a> {
    resources: Vec<&'a RawValue>,
}

/// Which cached files `caller` may use: `held[i]` names the namespaces whose uploads held file `i`, `None`
/// when the cache does not hold it. With [`Scope::Namespace`], those where the caller may download packages in
/// one of them; a file the caller may not use is treated as one the cache does not hold, so that nobody learns
/// what another namespace uploaded.
async fn usable(state: &AppState, caller: &Caller, held: &[Option<Vec<String>>]) -> Result<Vec<bool>, CfError> {
    if state.config.resource_cache_scope == Scope::Cluster {
        return Ok(held.iter().map(Option::is_some).collect());
    }
    let holders: Vec<&[String]> = held.iter().map(|h| h.as_deref().unwrap_or_default()).collect();
    cache::permitted(&holders, |namespace| {
        let access = Access {
            verb: "get",
            resource: "packages",
            subresource: Some("download"),
            namespace: namespace.to_string(),
            name: String::new(),
        };
        async move { state.auth.allows(caller, &access).await }
    })
    .await
}

/// `POST /v3/packages/:guid/upload`: a zip in the form's `bits` part and/or the files the cache should add, as
/// JSON in its `resources` part. The zip is checked and rewritten while it streams into the store; its files go
/// into the resource cache. Answers 200 with the package as the upload found it (PROCESSING_UPLOAD).
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Path(guid): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    credentials: Credentials,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, CfError> {
    let found = || state.index.package(&guid);
    let (caller, package) = state.authorized_caller(&credentials, found, "Package", "create", Some("upload")).await?;
    if query.contains_key("bits_path") {
        return Err(CfError::UnprocessableEntity("Bits path is invalid".into()));
    }
    upload_from(&state, &package, &caller, UploadBody::Form(upload::form(form)?), credentials.offload).await
}

/// Upload `body` to `package` for `caller`, who may upload to it; spooled files (`bits_path`) are not taken.
pub(super) async fn upload_to(
    state: &AppState,
    package: &Package,
    caller: &Caller,
    body: UploadBody,
) -> Result<Response, CfError> {
    upload_from(state, package, caller, body, false).await
}

/// Upload `body` to `package` for `caller`; `offload` when the upload-offloading proxy sent it, which alone may
/// name a spooled file (`bits_path`).
async fn upload_from(
    state: &AppState,
    package: &Package,
    caller: &Caller,
    body: UploadBody,
    offload: bool,
) -> Result<Response, CfError> {
    if package.spec.package_type != PackageType::Bits {
        return Err(CfError::UnprocessableEntity("Package type must be bits.".into()));
    }
    let mut claimed = upload::claim(state, package).await?;
    let (target, store) = (claimed.object.clone(), claimed.store(state));
    let outcome = upload::hold(state, &mut claimed, receive(state, &store, &target, caller, body, offload)).await?;
    upload::settle(state, &claimed, outcome).await?;
    Ok(Json(views::package(&claimed.object, &state.config.urls)).into_response())
}

/// Stream the new package zip into the store while the form is read.
async fn receive(
    state: &AppState,
    store: &BlobStore,
    package: &Package,
    caller: &Caller,
    body: UploadBody,
    offload: bool,
) -> Result<Stored, Failure> {
    let namespace = package.namespace().unwrap_or_default();
    let owner = BlobOwner::of(package, &namespace);
    let (zip, rx) = mpsc::channel::<Result<Bytes, SourceError>>(8);
    let chunks = Box::pin(futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|item| (item, rx)) }));
    let limit = state.config.max_upload_size.saturating_add(state.config.max_package_size);
    let storing = pipeline::store_checked(chunks, "the package", store, &owner, None, limit, None);
    let mut packing = Packing { state, store, caller, namespace, zip, inflated: 0, offload };
    let producing = async {
        let produced = packing.run(body).await;
        if produced.is_err() {
            // Tell the store to throw away what it has so far; it commits only a stream that ends cleanly.
            let _ = packing
                .zip
                .send(Err(SourceError::Interrupted { url: "the upload".into(), detail: "refused".into() }))
                .await;
        }
        drop(packing);
        produced
    };
    let (stored, produced) = tokio::join!(storing, producing);
    match (stored, produced) {
        (Ok(stored), Ok(())) => Ok(stored),
        (Ok(stored), Err(failure)) => {
            // Not reached (the store sees the refusal and commits nothing), but refused bits are never kept.
            let _ = state.store.delete(&stored.blob.key).await;
            Err(failure)
        }
        // Packing only saw the store stop: the store's error says why.
        (Err(error), Ok(()) | Err(Failure::Retry { answer: CfError::BlobstoreUnavailable, .. })) => {
            Err(Failure::pipeline(error, |e| CfError::AppPackageInvalid(e.to_string())))
        }
        (Err(_), Err(failure)) => Err(failure),
    }
}

/// How much of an upload's body the rewrite takes at once.
const FEED_BATCH: usize = 1 << 20;

/// The work of one upload: the uploaded zip rewritten, files cached, resources added.
struct Packing<'a> {
    state: &'a AppState,
    /// Where the upload stages what it writes (the package and the files it caches): under its claim.
    store: &'a BlobStore,
    /// Who uploads: the files of the cache they may use depend on it.
    caller: &'a Caller,
    /// The package's namespace, recorded as a holder of the files the upload puts in the cache.
    namespace: String,
    /// The new zip, on its way to the store.
    zip: mpsc::Sender<Result<Bytes, SourceError>>,
    /// Inflated bytes of resources added so far.
    inflated: u64,
    /// The upload came from the upload-offloading proxy.
    offload: bool,
}

/// A zip problem, in Cloud Controller's terms.
fn zip_failure(error: ZipError) -> Failure {
    let answer = match &error {
        ZipError::Invalid(_) => CfError::AppBitsUploadInvalid(error.to_string()),
        ZipError::TooLarge { .. } => CfError::AppPackageInvalid(error.to_string()),
    };
    let reason = if matches!(error, ZipError::TooLarge { .. }) { "TooLarge" } else { "InvalidBits" };
    Failure::Content { answer, reason, message: error.to_string() }
}

impl Packing<'_> {
    async fn run(&mut self, body: UploadBody) -> Result<(), Failure> {
        match body {
            UploadBody::Form(mut form) => self.run_form(&mut form).await,
            UploadBody::Raw(body) => {
                let repack = Repack::new(self.state.config.max_package_size, crate::cache::CACHED_SIZES)
                    .with_max_entries(self.state.config.max_zip_entries);
                let chunks = upload::raw_stream(body, self.state.config.max_upload_size);
                let repack = self.feed(repack, &mut CacheWrite::new(self.store), chunks).await?;
                let writer = repack.finish().map_err(zip_failure)?;
                self.send(writer.finish()).await
            }
        }
    }

    async fn run_form(&mut self, form: &mut Multipart) -> Result<(), Failure> {
        let max = self.state.config.max_package_size;
        let mut repack =
            Some(Repack::new(max, crate::cache::CACHED_SIZES).with_max_entries(self.state.config.max_zip_entries));
        let (mut saw_bits, mut resources) = (false, None);
        let (mut base_package, mut base_resources) = (None, None);
        let mut cache = CacheWrite::new(self.store);
        let json_cap = resources_json_cap(self.state.config.max_zip_entries);
        while let Some(field) =
            upload::next_field(form).await.map_err(|e| Failure::pipeline(e, |_| CfError::Unknown))?
        {
            match field.name().unwrap_or_default() {
                "resources" => {
                    let text = resources_text(field, json_cap).await?;
                    resources = Some(resources::parse_upload(&text).map_err(Failure::request)?);
                }
                "base_package" => base_package = Some(field_text(field, 256).await?.trim().to_string()),
                "base_resources" => {
                    let text = resources_text(field, json_cap).await?;
                    base_resources = Some(resources::parse_upload(&text).map_err(Failure::request)?);
                }
                "bits" if !saw_bits => {
                    saw_bits = true;
                    let fed = repack.take().expect("one bits part");
                    repack = Some(self.feed(fed, &mut cache, upload::field_stream(field)).await?);
                }
                "bits_path" if !saw_bits => {
                    // An upload an offloading proxy (nginx's upload module) spooled to disk, accepted only from
                    // that proxy and only from the configured spool directory: anyone else could name the file
                    // of another user's upload.
                    if !self.offload {
                        return Err(Failure::request(CfError::UnprocessableEntity(
                            "Bits path is accepted only from the upload-offloading proxy".into(),
                        )));
                    }
                    saw_bits = true;
                    let path = self.spooled(&field_text(field, 4096).await?)?;
                    let fed = repack.take().expect("one bits part");
                    let fed = self.feed(fed, &mut cache, spool_file(&path)?).await;
                    if let Err(error) = tokio::fs::remove_file(&path).await {
                        tracing::warn!(%error, path = %path.display(), "removing a spooled upload");
                    }
                    repack = Some(fed?);
                }
                "bits" | "bits_path" => {
                    return Err(Failure::request(CfError::UnprocessableEntity(
                        "Upload must include one bits part".into(),
                    )));
                }
                _ => {}
            }
        }
        if !saw_bits && resources.is_none() && base_resources.is_none() {
            return Err(Failure::request(CfError::UnprocessableEntity(
                "Upload must include either resources or bits".into(),
            )));
        }
        let mut writer = match repack.take() {
            Some(repack) if saw_bits => {
                self.inflated = repack.inflated();
                repack.finish().map_err(zip_failure)?
            }
            _ => ZipWriter::new(),
        };
        // The upload's own file wins over a resource of the same path, then the base package's, and the first of
        // two resources over the second.
        let mut names: std::collections::HashSet<Arc<str>> = writer.names().cloned().collect();
        match (base_package, base_resources) {
            (Some(guid), Some(wanted)) => writer = self.add_from_base(writer, &guid, wanted, &mut names).await?,
            (None, None) => {}
            _ => {
                return Err(Failure::request(CfError::UnprocessableEntity(
                    "base_package and base_resources come together".into(),
                )));
            }
        }
        let resources = resources.unwrap_or_default();
        let wanted: Vec<&Resource> =
            resources.iter().filter(|r| names.insert(r.path.as_deref().unwrap_or_default().into())).collect();
        let held: Vec<Option<Vec<String>>> = wanted.iter().map(|r| self.state.cache.holders(&r.sha1, r.size)).collect();
        let usable = usable(self.state, self.caller, &held).await.map_err(Failure::request)?;
        for (resource, usable) in wanted.into_iter().zip(usable) {
            self.add_resource(&mut writer, resource, usable).await?;
        }
        self.send(writer.finish()).await
    }

    /// Run the upload's bytes through the rewrite, into the new zip and the cache. The next batch is read while
    /// one is rewritten, so that the body keeps flowing.
    async fn feed<S>(&self, mut repack: Repack, cache: &mut CacheWrite, mut chunks: S) -> Result<Repack, Failure>
    where
        S: futures::Stream<Item = Result<Bytes, SourceError>> + Unpin,
    {
        let mut batches = Batches::default();
        let read_failed = |e: SourceError| Failure::pipeline(e.into(), |_| CfError::Unknown);
        let mut next = batches.next(&mut chunks).await.map_err(read_failed)?;
        while let Some(batch) = next {
            let rewrite = Rewrite::start(repack, batch, None);
            next = batches.next(&mut chunks).await.map_err(read_failed)?;
            let (back, rewritten) = rewrite.done().await;
            repack = back;
            let (out, events) = rewritten.map_err(zip_failure)?;
            for bytes in out {
                self.send(bytes).await?;
            }
            for event in events {
                cache.follow(&self.state.cache, &self.namespace, event).await;
            }
        }
        Ok(repack)
    }

    /// The spooled file `bits_path` names, if it lies inside the spool directory.
    fn spooled(&self, bits_path: &str) -> Result<std::path::PathBuf, Failure> {
        let invalid = || Failure::request(CfError::UnprocessableEntity("Bits path is invalid".into()));
        let spool = self.state.config.spool_dir.as_ref().ok_or_else(invalid)?;
        let spool = std::fs::canonicalize(spool).map_err(|_| invalid())?;
        // Resolving symlinks first means a link inside the spool cannot point out of it.
        let path = std::fs::canonicalize(bits_path).map_err(|_| invalid())?;
        if path.starts_with(&spool) && path != spool && path.is_file() { Ok(path) } else { Err(invalid()) }
    }

    async fn send(&self, bytes: Bytes) -> Result<(), Failure> {
        // A closed channel means the store stopped; its own error says why.
        self.zip.send(Ok(bytes)).await.map_err(|_| Failure::Retry {
            answer: CfError::BlobstoreUnavailable,
            message: "the store stopped taking the package".into(),
        })
    }

    /// Copy the files `wanted` names (by path) out of `guid`, a READY package of the same namespace that the
    /// caller may download: an upload that changes a few files of a large app sends only those. Each file must
    /// inflate to the sha1 and size named, or the upload is refused and the package awaits another upload. The
    /// stored zip is read once, in order; the copied entries keep their compressed bytes.
    async fn add_from_base(
        &mut self,
        writer: ZipWriter,
        guid: &str,
        wanted: Vec<Resource>,
        names: &mut std::collections::HashSet<Arc<str>>,
    ) -> Result<ZipWriter, Failure> {
        let refused = |detail: String| Failure::request(CfError::UnprocessableEntity(detail));
        let unusable =
            || refused(format!("Base package {guid} is not a READY package of this namespace that you may download."));
        let base = self.state.index.package(guid).filter(|p| p.namespace().as_deref() == Some(self.namespace.as_str()));
        let base = base.ok_or_else(unusable)?;
        let access = Access {
            verb: "get",
            resource: "packages",
            subresource: Some("download"),
            namespace: self.namespace.clone(),
            name: base.name_any(),
        };
        if !self.state.auth.allows(self.caller, &access).await.map_err(Failure::request)? {
            return Err(unusable());
        }
        let blob = package_blob(&base).map_err(|_| unusable())?;
        if !self.state.store.holds(blob) {
            return Err(unusable());
        }
        let wanted: HashMap<Arc<str>, Resource> = wanted
            .into_iter()
            .filter_map(|r| {
                let path: Arc<str> = r.path.as_deref().unwrap_or_default().into();
                names.insert(path.clone()).then_some((path, r))
            })
            .collect();
        let wanted = Arc::new(wanted);
        let max_entries = self.state.config.max_zip_entries;
        if writer.len() + wanted.len() > max_entries {
            return Err(zip_failure(ZipError::Invalid(format!("more than {max_entries} entries"))));
        }
        let store_failure =
            |e: crate::store::StoreError| Failure::pipeline(e.into(), |_| CfError::BlobstoreUnavailable);
        let (_, mut stream) = self.state.store.read(&blob.key).await.map_err(store_failure)?;
        let mut copy = Repack::resume(writer, u64::MAX, 0..u64::MAX).with_max_entries(max_entries);
        let (mut current, mut found): (Option<&Resource>, usize) = (None, 0);
        // Read until every wanted file was copied, not to the end of the zip.
        let mut batches = Batches::default();
        while found < wanted.len() || current.is_some() {
            let Some(batch) = batches.next(&mut stream).await.map_err(store_failure)? else { break };
            let (back, rewritten) = Rewrite::start(copy, batch, Some(wanted.clone())).done().await;
            copy = back;
            let (out, events) =
                rewritten.map_err(|e| refused(format!("Base package {guid} could not be read: {e}")))?;
            for event in events {
                match event {
                    ZipEvent::Start(header) if !header.is_dir() => {
                        current = wanted.get(&header.name);
                        found += usize::from(current.is_some());
                    }
                    ZipEvent::Start(_) | ZipEvent::Data(_) => {}
                    ZipEvent::End(end) => {
                        let Some(resource) = current.take() else { continue };
                        if end.sha1.as_deref() != Some(resource.sha1.as_str())
                            || end.sizes.uncompressed != resource.size
                        {
                            let path = resource.path.as_deref().unwrap_or_default();
                            return Err(refused(format!(
                                "Resource {path:?} in base package {guid} does not have sha1 {} and size {}.",
                                resource.sha1, resource.size
                            )));
                        }
                        self.inflated += end.sizes.uncompressed;
                    }
                }
            }
            if self.inflated > self.state.config.max_package_size {
                return Err(zip_failure(ZipError::TooLarge { max: self.state.config.max_package_size }));
            }
            for bytes in out {
                self.send(bytes).await?;
            }
        }
        if found < wanted.len() {
            let writer = copy.into_writer();
            let copied: std::collections::HashSet<&str> = writer.names().map(|n| n.as_ref()).collect();
            let missing = wanted.keys().find(|path| !copied.contains(path.as_ref())).expect("a file not found");
            return Err(refused(format!("Resource {missing:?} is not in base package {guid}.")));
        }
        Ok(copy.into_writer())
    }

    /// Add a file from the resource cache, checking on the way that it still inflates to its sha1. A file the
    /// caller may not use (not `usable`) is answered as one the cache does not hold.
    async fn add_resource(&mut self, writer: &mut ZipWriter, resource: &Resource, usable: bool) -> Result<(), Failure> {
        let path = resource.path.clone().unwrap_or_default();
        let max_entries = self.state.config.max_zip_entries;
        if writer.len() >= max_entries {
            return Err(zip_failure(ZipError::Invalid(format!("more than {max_entries} entries"))));
        }
        let cached =
            usable.then(|| self.state.cache.get(&resource.sha1, resource.size)).flatten().ok_or_else(|| {
                Failure::request(CfError::UnprocessableEntity(format!(
                    "Resource {path:?} (sha1 {}) is not in the resource cache; upload it in bits.",
                    resource.sha1
                )))
            })?;
        self.inflated += cached.size;
        if self.inflated > self.state.config.max_package_size {
            return Err(zip_failure(ZipError::TooLarge { max: self.state.config.max_package_size }));
        }
        let sizes = Sizes { crc: cached.crc, compressed: cached.compressed, uncompressed: cached.size };
        let header = EntryHeader::new(path.as_str(), cached.method, sizes, false);
        self.send(writer.start(&header)).await?;
        let mut check = EntryCheck::new(cached.method).map_err(zip_failure)?;
        let (_, mut stream) = self
            .state
            .store
            .read(&cached.key())
            .await
            .map_err(|e| Failure::pipeline(e.into(), |_| CfError::BlobstoreUnavailable))?;
        while let Some(chunk) =
            stream.try_next().await.map_err(|e| Failure::pipeline(e.into(), |_| CfError::BlobstoreUnavailable))?
        {
            if blocking(|| check.update(&chunk)).is_err() {
                self.state.cache.evict(&cached).await;
                return Err(self.mismatch(&path));
            }
            writer.data(chunk.len());
            self.send(chunk).await?;
        }
        let (sha1, crc, size) = check.finish();
        if (sha1.as_str(), crc, size) != (resource.sha1.as_str(), cached.crc, cached.size) {
            self.state.cache.evict(&cached).await;
            return Err(self.mismatch(&path));
        }
        let descriptor = writer.end(sizes, MADE_ON_UNIX, file_attributes(resource.mode));
        debug_assert!(descriptor.is_empty(), "sizes are declared up front");
        // The package now holds the file, so its namespace's users may read it anyway.
        if let Err(error) = self.state.cache.held_in(&cached.sha1, &self.namespace).await {
            tracing::warn!(%error, "recording a cached file's namespace");
        }
        Ok(())
    }

    fn mismatch(&self, path: &str) -> Failure {
        let answer = CfError::ResourceChecksumMismatch(format!("{path} no longer matches its checksum"));
        Failure::Content { message: answer.to_string(), answer, reason: "ResourceChecksumMismatch" }
    }
}

/// Copies the upload's files into the resource cache as their entries stream by, and records the upload's
/// namespace as a holder of each; only files of a size worth matching are kept, and the bytes of a file the cache
/// holds already are not stored again. A cache that cannot be written only costs later matches, never the
/// upload.
struct CacheWrite {
    /// Stages under the upload's claim.
    store: BlobStore,
    open: Option<(EntryHeader, crate::store::StagedWrite)>,
}

impl CacheWrite {
    fn new(store: &BlobStore) -> Self {
        CacheWrite { store: store.clone(), open: None }
    }

    async fn follow(&mut self, cache: &ResourceCache, namespace: &str, event: ZipEvent) {
        match event {
            ZipEvent::Start(header) => {
                let worth = header.declared.is_none_or(|d| crate::cache::cacheable(d.uncompressed));
                if !header.is_dir() && worth {
                    match self.store.begin_write().await {
                        Ok(write) => self.open = Some((header, write)),
                        Err(error) => tracing::warn!(%error, "caching an uploaded file"),
                    }
                }
            }
            ZipEvent::Data(bytes) => {
                if let Some((_, write)) = &mut self.open
                    && let Err(error) = write.write(bytes).await
                {
                    tracing::warn!(%error, "caching an uploaded file");
                    self.open = None;
                }
            }
            ZipEvent::End(end) => {
                let Some((header, write)) = self.open.take() else { return };
                let Some(sha1) = end.sha1 else {
                    write.abort().await;
                    return;
                };
                if cache.contains(&sha1) {
                    write.abort().await;
                } else {
                    let file = CachedFile {
                        sha1: sha1.clone(),
                        size: end.sizes.uncompressed,
                        compressed: end.sizes.compressed,
                        crc: end.sizes.crc,
                        method: header.method,
                    };
                    match write.commit(&file.key()).await {
                        Ok(_) => cache.inserted(file),
                        Err(error) => {
                            tracing::warn!(%error, "caching an uploaded file");
                            return;
                        }
                    }
                }
                if let Err(error) = cache.held_in(&sha1, namespace).await {
                    tracing::warn!(%error, "recording a cached file's namespace");
                }
            }
        }
    }
}

/// Buffers recycled by [`Batches`]: about as many as are in flight between the body and the store (the new zip's
/// channel of 8, the hashes' queues of 4, the store's write). With 8, a third of the batches were still fresh.
const RECYCLED_BATCHES: usize = 16;

/// Regroups a body or a stored blob, which arrive in pieces of any size, into batches of about `FEED_BATCH` bytes
/// for the rewrite, each in the memory of one the rewrite, the hashes and the store are done with when there is
/// one (0.7 % of an upload's CPU in page faults, 6 % with fresh buffers).
struct Batches {
    buffers: crate::recycle::Recycler,
}

impl Default for Batches {
    fn default() -> Self {
        // Room for the last piece too, so that the batch is never moved while it grows.
        Batches { buffers: crate::recycle::Recycler::new(RECYCLED_BATCHES, 2 * FEED_BATCH) }
    }
}

impl Batches {
    /// The next batch of `chunks`, `None` at its end.
    async fn next<S, E>(&mut self, chunks: &mut S) -> Result<Option<bytes::BytesMut>, E>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let mut buffer = self.buffers.buffer();
        while buffer.len() < FEED_BATCH {
            match chunks.try_next().await? {
                Some(chunk) => crate::recycle::append(&mut buffer, &chunk),
                None => break,
            }
        }
        if buffer.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.buffers.hand_out(buffer)))
    }
}

/// The rewrite back, with the new zip's bytes and the events of a batch.
type Rewritten = (Repack, Result<(Vec<Bytes>, Vec<ZipEvent>), ZipError>);

/// One batch of a zip rewritten on the blocking pool — every entry, or, given `wanted`, the files it names (with
/// their modes) — so that the store, which the same task polls, goes on with the batches before meanwhile: done
/// in place, inflating and storing would take turns on one core.
struct Rewrite(tokio::task::JoinHandle<Rewritten>);

impl Rewrite {
    /// Start rewriting `input`.
    fn start(mut repack: Repack, input: bytes::BytesMut, wanted: Option<Arc<HashMap<Arc<str>, Resource>>>) -> Self {
        Rewrite(tokio::task::spawn_blocking(move || {
            let rewritten = match &wanted {
                None => repack.push(input),
                Some(wanted) => repack.push_selected(input, |header| {
                    wanted.get(&header.name).filter(|_| !header.is_dir()).map(|r| file_attributes(r.mode))
                }),
            }
            .map(|(out, events)| (out, events.collect()));
            (repack, rewritten)
        }))
    }

    async fn done(self) -> Rewritten {
        self.0.await.expect("rewriting a zip panicked")
    }
}

/// A spooled upload, read as the filesystem store reads its blobs ([`crate::store::read_file`]).
fn spool_file(
    path: &std::path::Path,
) -> Result<impl futures::Stream<Item = Result<Bytes, SourceError>> + Unpin + use<>, Failure> {
    let description = path.display().to_string();
    let unreadable =
        move |e: &dyn std::fmt::Display| SourceError::ObjectRead { url: description.clone(), detail: e.to_string() };
    let metadata = std::fs::metadata(path).map_err(|e| {
        Failure::pipeline(unreadable(&e).into(), |_| CfError::UnprocessableEntity("Bits path is invalid".into()))
    })?;
    Ok(crate::store::read_file(path.to_path_buf(), 0..metadata.len()).map_err(move |e| unreadable(&e)))
}

/// Run CPU-heavy work (inflating) without stalling the other tasks of this worker thread.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// A small text part of at most `cap` bytes.
async fn field_text(field: axum::extract::multipart::Field<'_>, cap: usize) -> Result<String, Failure> {
    let name = field.name().unwrap_or_default().to_string();
    let bytes = field_bytes(field, cap).await?;
    String::from_utf8(bytes)
        .map_err(|_| Failure::request(CfError::UnprocessableEntity(format!("{name} must be text."))))
}

async fn field_bytes(field: axum::extract::multipart::Field<'_>, cap: usize) -> Result<Vec<u8>, Failure> {
    let name = field.name().unwrap_or_default().to_string();
    let mut bytes = Vec::new();
    let mut chunks = upload::field_stream(field);
    while let Some(chunk) = chunks.try_next().await.map_err(|e| Failure::pipeline(e.into(), |_| CfError::Unknown))? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > cap {
            return Err(Failure::request(CfError::UnprocessableEntity(format!("{name} must be at most {cap} bytes."))));
        }
    }
    Ok(bytes)
}

/// How much JSON a resource list may take: room for every entry a package may hold.
fn resources_json_cap(max_entries: usize) -> usize {
    (16 << 20).max(max_entries.saturating_mul(512))
}

/// A resource list: JSON, or gzipped JSON when the part says `Content-Type: application/gzip` (the plugin
/// sends its lists so; a list of 100 000 files is ~10 MiB of JSON). At most `cap` bytes either way.
async fn resources_text(field: axum::extract::multipart::Field<'_>, cap: usize) -> Result<String, Failure> {
    let name = field.name().unwrap_or_default().to_string();
    let gzipped = field.content_type() == Some("application/gzip");
    let bytes = field_bytes(field, cap).await?;
    let invalid = || Failure::request(CfError::UnprocessableEntity("Resources must be valid JSON.".into()));
    let text = if gzipped {
        let mut text = Vec::new();
        let mut decoder = std::io::Read::take(flate2::read::GzDecoder::new(&bytes[..]), cap as u64 + 1);
        blocking(|| std::io::Read::read_to_end(&mut decoder, &mut text)).map_err(|_| invalid())?;
        if text.len() > cap {
            return Err(Failure::request(CfError::UnprocessableEntity(format!(
                "{name} must be at most {cap} bytes of JSON."
            ))));
        }
        text
    } else {
        bytes
    };
    String::from_utf8(text).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pieces of `size` bytes, piece `i` made of the byte `i`.
    fn pieces(n: usize, size: usize) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter((0..n).map(move |i| Ok(Bytes::from(vec![i as u8; size]))))
    }

    #[tokio::test]
    async fn batches_are_regrouped_and_their_buffers_filled_again_once_free() {
        let mut batches = Batches::default();
        let mut chunks = pieces(40, 100_000);
        // Eleven pieces reach a batch's size.
        let first = batches.next(&mut chunks).await.unwrap().unwrap().freeze();
        assert_eq!(first.len(), 1_100_000);
        let held = first.slice(10..20);
        drop(first);
        // A slice of the first batch is still held: its buffer is not filled again.
        let second = batches.next(&mut chunks).await.unwrap().unwrap();
        assert_ne!(second.as_ptr(), held.as_ptr().wrapping_sub(10));
        let second_at = second.as_ptr();
        drop(second);
        // The second's buffer is free: the third batch lands in it, and the held slice is untouched.
        let third = batches.next(&mut chunks).await.unwrap().unwrap();
        assert_eq!(third.as_ptr(), second_at);
        assert_eq!(&held[..], &[0u8; 10]);
        assert!(third.iter().all(|&b| (22..33).contains(&b)), "the third batch holds pieces 22 to 32");
        drop((held, third));
        let rest = batches.next(&mut chunks).await.unwrap().unwrap();
        assert_eq!(rest.len(), 700_000, "the last seven pieces");
        assert!(batches.next(&mut chunks).await.unwrap().is_none());
    }
}
