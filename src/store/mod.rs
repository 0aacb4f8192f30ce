//! The blob store: where bitsmith keeps bits, configured by one URL (`file://`, `s3://`, `gs://`, `az://`,
//! `memory://`).
//!
//! A write becomes a blob only when the caller commits it, after the bytes are complete and verified, so a
//! reader of a blob key never sees a partial blob, and a write that fails, is aborted, or is dropped leaves
//! nothing under a blob key. How depends on what the backend makes cheap:
//!
//! - [`BlobStore::begin_blob`] on object stores (S3, GCS, Azure) writes straight to the blob's key with a
//!   multipart upload (a block list on Azure) that the backend makes visible only when it is completed: nothing is
//!   copied, and a blob can be as large as the parts allow. On a filesystem it stages and renames, which is free.
//! - [`BlobStore::begin_write`] stages under `staging/` and moves the bytes to a key chosen at the end (a
//!   content-addressed one): a rename on a filesystem, a server-side copy on object stores.

mod local;

/// Stream a range of a file as the filesystem store reads its blobs (see `local::read_range`).
pub use local::read_range as read_file;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::WriteMultipart;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{MultipartId, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, PutResult, UploadPart};
use url::Url;

use crate::object_url::{self, CredentialPolicy, ObjectClient, ObjectUrlError, Scheme};
use crate::resources::{BitsObject, BlobRef};

/// Bytes per uploaded part (S3 needs at least 5 MiB for all but the last).
const PART_SIZE: usize = 8 << 20;
/// Bytes per part on the filesystem, where each part is handed to the disk as soon as it is written
/// (`local.rs`): smaller pieces keep the disk busier (a durable 1 GiB write on the benchmark machine, alternated:
/// 1–2 MiB pieces 373–477 MB/s, 8 MiB pieces 294–429), and a write holds less memory.
pub const LOCAL_PART_SIZE: usize = 1 << 20;
/// Bytes a filesystem write takes between two syncs in the background (`local.rs`), so that the disk empties its
/// write cache while the rest of the bytes arrive and the sync at completion has only the last stretch left: a
/// 1 GiB fetch on the benchmark machine, four alternated runs each, took 2.7–3.5 s with the one sync at the end,
/// 2.1–2.6 s with a sync every 4–32 MiB, 2.4–2.5 s every 128 MiB.
pub const LOCAL_SYNC_EVERY: u64 = 32 << 20;
/// Parts uploading at once. With the part size this bounds a write's memory.
const PARTS_IN_FLIGHT: usize = 3;
/// The most a staged write holds, on any store: the part being filled and those uploading.
pub const WRITE_MEMORY: u64 = (PART_SIZE * (PARTS_IN_FLIGHT + 1)) as u64;
/// Where writes live until they are committed, and where a write on an object store records its multipart
/// upload until it is completed or aborted.
const STAGING: &str = "staging";
/// The file name suffix of a multipart upload's record.
const RECORD_SUFFIX: &str = ".multipart";
/// How often a write that is making progress renews its record, so that the sweep never takes a live upload for
/// a killed one.
const RECORD_RENEWAL: Duration = Duration::from_secs(300);
/// A record this old (and at least as old as the sweep's own bound) belongs to a write that is gone.
const RECORD_STALE: Duration = Duration::from_secs(900);
/// The largest object S3's CopyObject copies; larger blobs are copied by streaming them.
const S3_LARGEST_COPY: u64 = 5 << 30;
/// Parts a multipart upload may have on S3 and GCS, and blocks a block blob may have on Azure.
const S3_MAX_PARTS: u64 = 10_000;
const AZURE_MAX_BLOCKS: u64 = 50_000;

/// Errors from the store, each naming the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL: {0}")]
    Url(#[from] ObjectUrlError),
    #[error("store {store}: no blob at {key}")]
    NotFound { store: String, key: String },
    #[error("store {store}: {op} {key}: {source}")]
    Backend {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("store {store}: {op} {path}: {source}")]
    Io {
        store: String,
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Who a blob belongs to; blob keys are derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobOwner {
    /// `packages` or `droplets`.
    pub plural: &'static str,
    pub namespace: String,
    pub name: String,
    /// The object's uid, which tells apart objects that reuse a name; absent when run without a cluster.
    pub uid: Option<String>,
}

impl BlobOwner {
    /// The owner of `object`'s blobs, in `namespace` (the object's own, or a default when it names none).
    pub fn of<O: BitsObject>(object: &O, namespace: &str) -> Self {
        BlobOwner {
            plural: O::PLURAL,
            namespace: namespace.to_string(),
            name: object.meta().name.clone().unwrap_or_default(),
            uid: object.meta().uid.clone(),
        }
    }

    /// The key of this owner's blob named `name`: the content's sha256 where blobs are renamed into place (so a
    /// re-fetch of the same bits lands on the same key), a fresh write id where they are written in place.
    pub fn blob_key(&self, name: &str) -> String {
        match self.own_prefix() {
            Some(prefix) => format!("{prefix}/{name}"),
            None => format!("{}/{}/{}/{name}", self.plural, self.namespace, self.name),
        }
    }

    /// Where all of this owner's blobs are, and no other owner's. Only an owner with a uid has such a place:
    /// without one, the blobs of a later object of the same name would lie beside its own.
    pub fn own_prefix(&self) -> Option<String> {
        let uid = self.uid.as_ref()?;
        Some(format!("{}/{}/{}/{uid}", self.plural, self.namespace, self.name))
    }
}

/// A connected blob store.
#[derive(Clone, Debug)]
pub struct BlobStore {
    client: ObjectClient,
    /// Names the writes this handle stages (`staging/<tag>-<uuid>`), so that one upload's leftovers can be found.
    staging_tag: Option<std::sync::Arc<str>>,
}

impl BlobStore {
    /// Connect to the store named by `url`. `options` are object_store settings (see
    /// [`object_url::connect`]); credentials may also come from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, StoreError> {
        let client = object_url::connect(url, options, CredentialPolicy::OptionsOrEnvironment, None)?;
        Ok(BlobStore { client, staging_tag: None })
    }

    /// The store's URL without settings or credentials, as recorded in statuses.
    pub fn url(&self) -> &str {
        &self.client.display_url
    }

    /// Whether `blob` lives in this store.
    pub fn holds(&self, blob: &BlobRef) -> bool {
        blob.store == self.url()
    }

    /// The largest blob [`BlobStore::begin_blob`] can write in this store, where the backend has a limit: as many
    /// parts of [`PART_SIZE`] as one multipart upload (block list) may have.
    pub fn largest_blob(&self) -> Option<u64> {
        match self.client.scheme {
            Scheme::S3 | Scheme::Gcs => Some(S3_MAX_PARTS * PART_SIZE as u64),
            Scheme::Azure => Some(AZURE_MAX_BLOCKS * PART_SIZE as u64),
            Scheme::File | Scheme::Memory => None,
        }
    }

    /// Whether [`BlobStore::begin_blob`] writes straight to the blob's key: on the object stores, whose multipart
    /// uploads become visible only when completed and whose rename would be a copy.
    fn writes_in_place(&self) -> bool {
        self.client.multipart.is_some()
    }

    /// A reference to `key` in this store.
    pub fn blob_ref(&self, key: &str) -> BlobRef {
        BlobRef { store: self.url().to_string(), key: key.to_string() }
    }

    fn path(&self, key: &str) -> Path {
        key.split('/').filter(|p| !p.is_empty()).fold(self.client.path.clone(), |path, part| path.join(part))
    }

    fn backend_error(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::NotFound { .. } => {
                StoreError::NotFound { store: self.url().to_string(), key: key.to_string() }
            }
            source => StoreError::Backend {
                store: self.url().to_string(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// The same store, staging its writes under `tag` (letters, digits and dashes), for
    /// [`BlobStore::sweep_staged`].
    pub fn staging_as(&self, tag: &str) -> BlobStore {
        debug_assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "a plain tag");
        BlobStore { client: self.client.clone(), staging_tag: Some(tag.into()) }
    }

    /// A fresh key under `staging/`, named by this handle's tag.
    fn staging_key(&self) -> String {
        match &self.staging_tag {
            Some(tag) => format!("{STAGING}/{tag}-{}", uuid::Uuid::new_v4()),
            None => format!("{STAGING}/{}", uuid::Uuid::new_v4()),
        }
    }

    /// Start a write whose key is chosen when it is committed ([`StagedWrite::commit`]): it is staged under a
    /// fresh key and moved.
    pub async fn begin_write(&self) -> Result<StagedWrite, StoreError> {
        Ok(StagedWrite { upload: self.upload_to(self.staging_key()).await? })
    }

    /// Start writing a blob of `owner`. It becomes visible whole at [`BlobWrite::commit`], and not at all
    /// otherwise. Where the write goes straight to its key, that key is `owner`'s and fresh (a write id);
    /// where it is staged, the key is the content's sha256, given at the commit.
    pub async fn begin_blob(&self, owner: &BlobOwner) -> Result<BlobWrite, StoreError> {
        if self.writes_in_place() {
            let key = owner.blob_key(&uuid::Uuid::new_v4().simple().to_string());
            Ok(BlobWrite(Landing::InPlace(self.upload_to(key).await?)))
        } else {
            Ok(BlobWrite(Landing::Staged { write: self.begin_write().await?, owner: owner.clone() }))
        }
    }

    /// Start a multipart upload to `key`. On object stores it is started by id and the id recorded under
    /// `staging/`, so that the sweep can abort it if this process dies before it is completed.
    async fn upload_to(&self, key: String) -> Result<Upload, StoreError> {
        let path = self.path(&key);
        let Some(multipart) = &self.client.multipart else {
            let upload: Box<dyn MultipartUpload> = match self.local_file(&key) {
                Some(dest) => {
                    let failed = |e| self.backend_error("begin write", &key, e);
                    Box::new(local::LocalUpload::create(dest.map_err(failed)?).await.map_err(failed)?)
                }
                None => self
                    .client
                    .store
                    .put_multipart(&path)
                    .await
                    .map_err(|e| self.backend_error("begin write", &key, e))?,
            };
            return Ok(Upload::new(self, key, upload, None));
        };
        let id = multipart.create_multipart(&path).await.map_err(|e| self.backend_error("begin write", &key, e))?;
        let record = Record { key: key.clone(), upload_id: id.clone() };
        let record_key = format!("{}{RECORD_SUFFIX}", self.staging_key());
        let upload = ById { multipart: multipart.clone(), path: path.clone(), id, parts: Default::default() };
        if let Err(e) = self.put_record(&record_key, &record).await {
            let _ = multipart.abort_multipart(&path, &record.upload_id).await;
            return Err(e);
        }
        let recorded = Recorded { key: record_key, record, renewed: std::time::Instant::now() };
        Ok(Upload::new(self, key, Box::new(upload), Some(recorded)))
    }

    async fn put_record(&self, record_key: &str, record: &Record) -> Result<(), StoreError> {
        let body = serde_json::to_vec(record).expect("a record serializes");
        self.client
            .store
            .put(&self.path(record_key), PutPayload::from(body))
            .await
            .map_err(|e| self.backend_error("record write", record_key, e))?;
        Ok(())
    }

    /// Abort the multipart upload recorded at `record_key` and remove the record. An upload that is already gone
    /// (completed or aborted) counts as aborted.
    async fn abort_recorded(&self, record_key: &str) -> Result<(), StoreError> {
        let Some(multipart) = &self.client.multipart else { return Ok(()) };
        let body = match self.client.store.get(&self.path(record_key)).await {
            Ok(got) => got.bytes().await.map_err(|e| self.backend_error("read record", record_key, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(self.backend_error("read record", record_key, e)),
        };
        // A record that does not parse was not written by this code: there is nothing to abort, only to remove.
        if let Ok(record) = serde_json::from_slice::<Record>(&body) {
            match multipart.abort_multipart(&self.path(&record.key), &record.upload_id).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_error("abort write", &record.key, e)),
            }
        }
        self.delete(record_key).await
    }

    /// The file (or directory) behind `key` on the filesystem store, by object_store's own mapping of keys to
    /// files; `None` on object stores.
    fn local_file(&self, key: &str) -> Option<Result<std::path::PathBuf, object_store::Error>> {
        self.client.local.as_ref().map(|fs| fs.path_to_filesystem(&self.path(key)))
    }

    /// The size of the blob at `key`.
    pub async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let meta = self.client.store.head(&self.path(key)).await.map_err(|e| self.backend_error("head", key, e))?;
        Ok(meta.size)
    }

    /// Stream the blob at `key`, returning its size and its bytes.
    pub async fn read(&self, key: &str) -> Result<(u64, BoxStream<'static, Result<Bytes, StoreError>>), StoreError> {
        let size = self.size(key).await?;
        Ok((size, self.read_range(key, 0..size)))
    }

    /// Stream the bytes `range` of the blob at `key` (which the caller knows to lie within it).
    pub fn read_range(&self, key: &str, range: std::ops::Range<u64>) -> BoxStream<'static, Result<Bytes, StoreError>> {
        let this = self.clone();
        let owned_key = key.to_string();
        let bytes = match self.local_file(key) {
            Some(Ok(file)) => local::read_range(file, range),
            Some(Err(e)) => stream::once(std::future::ready(Err(e))).boxed(),
            None => object_url::ranged_stream(self.client.store.clone(), self.path(key), range),
        };
        bytes.map_err(move |e| this.backend_error("read", &owned_key, e)).boxed()
    }

    /// Copy the blob `from` (of `size` bytes) to `to`. The copy appears whole or not at all: a server-side copy
    /// on cloud stores, a hard link on the local filesystem; a blob over what S3's CopyObject takes is streamed
    /// into a new multipart upload instead.
    pub async fn copy(&self, from: &str, to: &str, size: u64) -> Result<(), StoreError> {
        if self.client.scheme == Scheme::S3 && size > S3_LARGEST_COPY {
            let mut write = self.upload_to(to.to_string()).await?;
            let mut blocks = self.read_range(from, 0..size);
            while let Some(block) = blocks.next().await {
                write.write(block?).await?;
            }
            return write.finish().await;
        }
        self.client.store.copy(&self.path(from), &self.path(to)).await.map_err(|e| self.backend_error("copy", from, e))
    }

    /// Delete the blob at `key`. A blob that is already gone counts as deleted, so that cleanup never blocks.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.client.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend_error("delete", key, e)),
        }
    }

    /// A URL that lets anyone holding it GET the blob for `ttl`, where the backend can sign one.
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> Result<Option<Url>, StoreError> {
        let Some(signer) = &self.client.signer else {
            return Ok(None);
        };
        let signer: &Arc<dyn Signer> = signer;
        let url = signer
            .signed_url(Method::GET, &self.path(key), ttl)
            .await
            .map_err(|e| self.backend_error("presign", key, e))?;
        Ok(Some(url))
    }

    /// The blobs under `prefix` as the store lists them, one page at a time: a listing of any length costs a
    /// page of memory.
    pub fn listing(&self, prefix: &str) -> BoxStream<'static, Result<Listed, StoreError>> {
        let this = self.clone();
        let root = self.client.path.as_ref().to_string();
        let owned_prefix = prefix.to_string();
        self.client
            .store
            .list(Some(&self.path(prefix)))
            .map(move |item| match item {
                Ok(meta) => {
                    let key = meta.location.as_ref().strip_prefix(&root).unwrap_or(meta.location.as_ref());
                    Ok(Listed {
                        key: key.trim_start_matches('/').to_string(),
                        size: meta.size,
                        modified: SystemTime::from(meta.last_modified),
                    })
                }
                Err(e) => Err(this.backend_error("list", &owned_prefix, e)),
            })
            .boxed()
    }

    /// Every blob under `prefix`: its key (relative to the store) and size.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let root = self.client.path.as_ref().to_string();
        self.client
            .store
            .list(Some(&self.path(prefix)))
            .map_ok(|meta| {
                let key = meta.location.as_ref().strip_prefix(&root).unwrap_or(meta.location.as_ref());
                (key.trim_start_matches('/').to_string(), meta.size)
            })
            .try_collect()
            .await
            .map_err(|e| self.backend_error("list", prefix, e))
    }

    /// Remove every blob under `prefix` but `keep`: what an owner no longer names. Returns how many went.
    pub async fn remove_under(&self, prefix: &str, keep: Option<&str>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (key, _) in self.list(prefix).await? {
            if Some(key.as_str()) != keep {
                self.delete(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remove staged writes older than `older_than`, and abort multipart uploads whose writer has not renewed
    /// their record for that long (and at least 15 minutes): what a killed process left behind. Returns how many.
    pub async fn sweep_staging(&self, older_than: Duration) -> Result<usize, StoreError> {
        let now = SystemTime::now();
        let (cutoff, record_cutoff) = (now - older_than, now - older_than.max(RECORD_STALE));
        self.sweep_staged_where(|name, modified| {
            modified < if name.ends_with(RECORD_SUFFIX) { record_cutoff } else { cutoff }
        })
        .await
    }

    /// Remove what the writes staged under `tag` (see [`BlobStore::staging_as`]) left: the bytes of an upload
    /// whose holder died. Returns how many objects went.
    pub async fn sweep_staged(&self, tag: &str) -> Result<usize, StoreError> {
        let prefix = format!("{tag}-");
        self.sweep_staged_where(|name, _| name.starts_with(&prefix)).await
    }

    /// Remove the staged objects `stale` picks by file name and modification time.
    async fn sweep_staged_where(&self, stale: impl Fn(&str, SystemTime) -> bool) -> Result<usize, StoreError> {
        if let Some(dir) = self.local_file(STAGING) {
            // Listings hide in-progress part files (`<key>#<id>`), so look at the directory itself.
            let dir = dir.map_err(|e| self.backend_error("list", STAGING, e))?;
            return self.sweep_local_staging(&dir, stale);
        }
        let prefix = self.path(STAGING);
        let stale: Vec<Path> = self
            .client
            .store
            .list(Some(&prefix))
            .try_filter(|meta| {
                let name = meta.location.filename().unwrap_or_default();
                futures::future::ready(stale(name, SystemTime::from(meta.last_modified)))
            })
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|e| self.backend_error("list", STAGING, e))?;
        let root = self.client.path.as_ref();
        for path in &stale {
            if path.as_ref().ends_with(RECORD_SUFFIX) {
                let key = path.as_ref().strip_prefix(root).unwrap_or(path.as_ref()).trim_start_matches('/');
                self.abort_recorded(key).await?;
                continue;
            }
            match self.client.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_error("delete", path.as_ref(), e)),
            }
        }
        Ok(stale.len())
    }

    fn sweep_local_staging(
        &self,
        dir: &std::path::Path,
        stale: impl Fn(&str, SystemTime) -> bool,
    ) -> Result<usize, StoreError> {
        let io_error =
            |op, source| StoreError::Io { store: self.url().to_string(), op, path: dir.display().to_string(), source };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("list", e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", e))?;
            let modified = entry.metadata().and_then(|m| m.modified()).map_err(|e| io_error("stat", e))?;
            if stale(&entry.file_name().to_string_lossy(), modified) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("delete", e)),
                }
            }
        }
        Ok(removed)
    }
}

/// A blob as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the store.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// What a write on an object store records under `staging/` while its multipart upload is open.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// The key the upload writes, relative to the store.
    key: String,
    upload_id: MultipartId,
}

/// A write's record: where it is, and when it was last renewed.
struct Recorded {
    key: String,
    record: Record,
    renewed: std::time::Instant,
}

/// A multipart upload driven by its id, for [`WriteMultipart`] to buffer and parallelize: object_store's own
/// uploads keep their id to themselves, and the sweep needs it.
struct ById {
    multipart: Arc<dyn MultipartStore>,
    path: Path,
    id: MultipartId,
    /// Part ids by part number, filled in as parts finish (in any order).
    parts: Arc<std::sync::Mutex<Vec<Option<PartId>>>>,
}

impl std::fmt::Debug for ById {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ById").field("path", &self.path).field("id", &self.id).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl MultipartUpload for ById {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let index = {
            let mut parts = self.parts.lock().expect("part list");
            parts.push(None);
            parts.len() - 1
        };
        let (multipart, path, id, parts) =
            (self.multipart.clone(), self.path.clone(), self.id.clone(), self.parts.clone());
        Box::pin(async move {
            let part = multipart.put_part(&path, &id, index, data).await?;
            parts.lock().expect("part list")[index] = Some(part);
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let parts = std::mem::take(&mut *self.parts.lock().expect("part list"));
        let parts: Option<Vec<PartId>> = parts.into_iter().collect();
        let parts = parts.ok_or_else(|| object_store::Error::Generic {
            store: "multipart",
            source: "completed with a part still uploading".into(),
        })?;
        self.multipart.complete_multipart(&self.path, &self.id, parts).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.multipart.abort_multipart(&self.path, &self.id).await
    }
}

/// An in-progress multipart upload to one key. Dropping it unfinished aborts it.
struct Upload {
    store: BlobStore,
    key: String,
    upload: Option<WriteMultipart>,
    /// Its record, on object stores; removed once the upload is completed or aborted.
    record: Option<Recorded>,
}

impl Upload {
    fn new(store: &BlobStore, key: String, upload: Box<dyn MultipartUpload>, record: Option<Recorded>) -> Self {
        let part_size = if store.client.local.is_some() { LOCAL_PART_SIZE } else { PART_SIZE };
        let upload = Some(WriteMultipart::new_with_chunk_size(upload, part_size));
        Upload { store: store.clone(), key, upload, record }
    }

    /// Append a block. Waits while `PARTS_IN_FLIGHT` parts are uploading.
    async fn write(&mut self, block: Bytes) -> Result<(), StoreError> {
        if let Some(recorded) = &mut self.record
            && recorded.renewed.elapsed() >= RECORD_RENEWAL
        {
            self.store.put_record(&recorded.key, &recorded.record).await?;
            recorded.renewed = std::time::Instant::now();
        }
        let upload = self.upload.as_mut().expect("write after finish or abort");
        if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
            return Err(self.store.backend_error("write", &self.key, e));
        }
        upload.put(block);
        Ok(())
    }

    /// Complete the upload: the object at the key appears whole. On failure the backend's parts are discarded.
    async fn finish(mut self) -> Result<(), StoreError> {
        let upload = self.upload.take().expect("finish twice");
        let finished = upload.finish().await;
        self.forget_record().await;
        if let Err(e) = finished {
            // A failed finish discards the backend's own staging (an S3 multipart upload, a local part file); make
            // sure no completed object lingers either.
            let _ = self.store.client.store.delete(&self.store.path(&self.key)).await;
            return Err(self.store.backend_error("finish write", &self.key, e));
        }
        Ok(())
    }

    async fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            let _ = upload.abort().await;
        }
        self.forget_record().await;
    }

    /// Remove the record of an upload that is over. Should that fail, the sweep finds the upload gone and removes
    /// the record then.
    async fn forget_record(&mut self) {
        if let Some(recorded) = self.record.take() {
            let _ = self.store.delete(&recorded.key).await;
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Dropped mid-write, e.g. because the task was cancelled: abort in the background so that an S3 multipart
        // upload or a local part file does not linger, and its record with it.
        if let Some(upload) = self.upload.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (store, record) = (self.store.clone(), self.record.take());
            runtime.spawn(async move {
                let _ = upload.abort().await;
                if let Some(recorded) = record {
                    let _ = store.delete(&recorded.key).await;
                }
            });
        }
    }
}

/// An in-progress write under a staging key. Call [`StagedWrite::commit`] once the bytes are verified, or
/// [`StagedWrite::abort`]; dropping it aborts too.
pub struct StagedWrite {
    upload: Upload,
}

impl StagedWrite {
    /// Append a block. Waits while earlier parts are uploading.
    pub async fn write(&mut self, block: Bytes) -> Result<(), StoreError> {
        self.upload.write(block).await
    }

    /// Finish the write and move it to `key`, where it becomes visible whole. On failure nothing is left.
    pub async fn commit(self, key: &str) -> Result<BlobRef, StoreError> {
        let store = self.upload.store.clone();
        let staging = store.path(&self.upload.key);
        self.upload.finish().await?;
        if let Err(e) = store.client.store.rename(&staging, &store.path(key)).await {
            let _ = store.client.store.delete(&staging).await;
            return Err(store.backend_error("commit", key, e));
        }
        Ok(store.blob_ref(key))
    }

    /// Discard everything written.
    pub async fn abort(self) {
        self.upload.abort().await
    }
}

/// An in-progress write of a blob ([`BlobStore::begin_blob`]). Call [`BlobWrite::commit`] once the bytes are
/// verified, or [`BlobWrite::abort`]; dropping it aborts too.
pub struct BlobWrite(Landing);

enum Landing {
    /// A multipart upload to the blob's own key, visible once completed.
    InPlace(Upload),
    /// Staged and renamed to the owner's key for the content at commit.
    Staged { write: StagedWrite, owner: BlobOwner },
}

impl BlobWrite {
    /// Append a block. Waits while earlier parts are uploading.
    pub async fn write(&mut self, block: Bytes) -> Result<(), StoreError> {
        match &mut self.0 {
            Landing::InPlace(upload) => upload.write(block).await,
            Landing::Staged { write, .. } => write.write(block).await,
        }
    }

    /// Make the blob, whose content has `sha256`, visible whole. On failure nothing is left.
    pub async fn commit(self, sha256: &str) -> Result<BlobRef, StoreError> {
        match self.0 {
            Landing::InPlace(upload) => {
                let blob = upload.store.blob_ref(&upload.key);
                upload.finish().await?;
                Ok(blob)
            }
            Landing::Staged { write, owner } => write.commit(&owner.blob_key(sha256)).await,
        }
    }

    /// Discard everything written.
    pub async fn abort(self) {
        match self.0 {
            Landing::InPlace(upload) => upload.abort().await,
            Landing::Staged { write, .. } => write.abort().await,
        }
    }
}
