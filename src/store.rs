//! The blob store: where bitsmith keeps bits, configured by one URL (`file://`, `s3://`, `gs://`, `az://`,
//! `memory://`).
//!
//! Every write goes to a unique key under `staging/` and becomes a blob only through [`StagedWrite::commit`],
//! which the caller runs after the bytes are complete and verified. A reader of a blob key therefore never sees
//! a partial blob, and a write that fails, is aborted, or is dropped leaves nothing under a blob key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use url::Url;

use crate::object_url::{self, CredentialPolicy, ObjectClient, ObjectUrlError, Scheme};
use crate::resources::{BitsObject, BlobRef};

/// Bytes per uploaded part (S3 needs at least 5 MiB for all but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once. With [`PART_SIZE`] this bounds a write's memory.
const PARTS_IN_FLIGHT: usize = 3;
/// The most a staged write holds: the part being filled and those uploading.
pub const WRITE_MEMORY: u64 = (PART_SIZE * (PARTS_IN_FLIGHT + 1)) as u64;
/// Where writes live until they are committed.
const STAGING: &str = "staging";
/// The largest object S3's CopyObject copies. A commit on S3 is a copy out of staging, so no larger blob can be
/// committed there.
const S3_LARGEST_COMMIT: u64 = 5 << 30;

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

    /// The key of this owner's blob with the given sha256. Keys are content-addressed per owner, so a
    /// re-fetch of the same bits lands on the same key and a new generation with new bits on a new one.
    pub fn blob_key(&self, sha256: &str) -> String {
        match self.own_prefix() {
            Some(prefix) => format!("{prefix}/{sha256}"),
            None => format!("{}/{}/{}/{sha256}", self.plural, self.namespace, self.name),
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

    /// The largest blob a commit can make in this store, where the backend has a limit.
    pub fn largest_blob(&self) -> Option<u64> {
        (self.client.scheme == Scheme::S3).then_some(S3_LARGEST_COMMIT)
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

    /// Start a write under a fresh staging key.
    pub async fn begin_write(&self) -> Result<StagedWrite, StoreError> {
        let staging_key = match &self.staging_tag {
            Some(tag) => format!("{STAGING}/{tag}-{}", uuid::Uuid::new_v4()),
            None => format!("{STAGING}/{}", uuid::Uuid::new_v4()),
        };
        let path = self.path(&staging_key);
        let upload = self
            .client
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.backend_error("begin write", &staging_key, e))?;
        Ok(StagedWrite {
            store: self.clone(),
            staging_key,
            upload: Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)),
        })
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
        object_url::ranged_stream(self.client.store.clone(), self.path(key), range)
            .map_err(move |e| this.backend_error("read", &owned_key, e))
            .boxed()
    }

    /// Copy a blob inside the store without moving its bytes through bitsmith. The copy appears whole or not at
    /// all: a server-side copy on cloud stores, a hard link on the local filesystem.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
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

    /// Remove staged writes older than `older_than`: what a killed process left behind. Returns how many.
    pub async fn sweep_staging(&self, older_than: Duration) -> Result<usize, StoreError> {
        let cutoff = SystemTime::now() - older_than;
        self.sweep_staged_where(|_, modified| modified < cutoff).await
    }

    /// Remove what the writes staged under `tag` (see [`BlobStore::staging_as`]) left: the bytes of an upload
    /// whose holder died. Returns how many objects went.
    pub async fn sweep_staged(&self, tag: &str) -> Result<usize, StoreError> {
        let prefix = format!("{tag}-");
        self.sweep_staged_where(|name, _| name.starts_with(&prefix)).await
    }

    /// Remove the staged objects `stale` picks by file name and modification time.
    async fn sweep_staged_where(&self, stale: impl Fn(&str, SystemTime) -> bool) -> Result<usize, StoreError> {
        if self.client.scheme == Scheme::File {
            // The local backend hides its in-progress part files from listings, so look at the directory itself.
            return self.sweep_local_staging(stale);
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
        for path in &stale {
            match self.client.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_error("delete", path.as_ref(), e)),
            }
        }
        Ok(stale.len())
    }

    fn sweep_local_staging(&self, stale: impl Fn(&str, SystemTime) -> bool) -> Result<usize, StoreError> {
        let dir = std::path::Path::new("/").join(self.path(STAGING).as_ref());
        let io_error =
            |op, source| StoreError::Io { store: self.url().to_string(), op, path: dir.display().to_string(), source };
        let entries = match std::fs::read_dir(&dir) {
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

/// An in-progress write under a staging key. Call [`StagedWrite::commit`] once the bytes are verified, or
/// [`StagedWrite::abort`]; dropping it aborts too.
pub struct StagedWrite {
    store: BlobStore,
    staging_key: String,
    upload: Option<WriteMultipart>,
}

impl StagedWrite {
    /// Append a block. Waits while `PARTS_IN_FLIGHT` parts are uploading.
    pub async fn write(&mut self, block: Bytes) -> Result<(), StoreError> {
        let upload = self.upload.as_mut().expect("write after commit or abort");
        if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
            return Err(self.store.backend_error("write", &self.staging_key, e));
        }
        upload.put(block);
        Ok(())
    }

    /// Finish the write and move it to `key`, where it becomes visible whole. On failure nothing is left.
    pub async fn commit(mut self, key: &str) -> Result<BlobRef, StoreError> {
        let upload = self.upload.take().expect("commit twice");
        let store = self.store.clone();
        let staging = store.path(&self.staging_key);
        if let Err(e) = upload.finish().await {
            // The backend's own staging (an S3 multipart upload, a local part file) is discarded by the failed
            // finish; make sure no completed staging object lingers either.
            let _ = store.client.store.delete(&staging).await;
            return Err(store.backend_error("finish write", &self.staging_key, e));
        }
        if let Err(e) = store.client.store.rename(&staging, &store.path(key)).await {
            let _ = store.client.store.delete(&staging).await;
            return Err(store.backend_error("commit", key, e));
        }
        Ok(store.blob_ref(key))
    }

    /// Discard everything written.
    pub async fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            let _ = upload.abort().await;
        }
    }
}

impl Drop for StagedWrite {
    fn drop(&mut self) {
        // Dropped mid-write, e.g. because the task was cancelled: abort in the background so an S3 multipart
        // upload or a local part file does not linger.
        if let Some(upload) = self.upload.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}
