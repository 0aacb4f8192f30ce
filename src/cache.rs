//! The resource cache: the files of earlier uploads, keyed by the sha1 of their content, so that a client can
//! leave out of an upload what the server already has (`resource_matches`). A file is kept as its raw zip entry
//! data — compressed as it came — so it goes into a new package zip without recompression; its key records
//! what a zip entry needs besides: `resource-cache/<sha1>/<size>-<compressed>-<crc32>-<method>`.
//!
//! Every API replica keeps an index of the cache in memory, filled from a listing at start and on a timer, and
//! kept up by its own inserts. An entry another replica added since the last listing is only a missed match:
//! the client uploads that file again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::store::{BlobStore, StoreError};

const PREFIX: &str = "resource-cache";

/// Files are matched only when bigger than this (Cloud Controller's minimum)...
pub const MIN_SIZE: u64 = 65_536;
/// ...and smaller than this (its maximum).
pub const MAX_SIZE: u64 = 536_870_912;

/// The sizes of files worth caching and matching.
pub const CACHED_SIZES: std::ops::Range<u64> = MIN_SIZE + 1..MAX_SIZE;

/// Whether a file of `size` bytes is worth caching and matching.
pub fn cacheable(size: u64) -> bool {
    CACHED_SIZES.contains(&size)
}

/// A cached file: enough to write it as a zip entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    pub sha1: String,
    pub size: u64,
    pub compressed: u64,
    pub crc: u32,
    pub method: u16,
}

impl CachedFile {
    pub fn key(&self) -> String {
        format!("{PREFIX}/{}/{}-{}-{:08x}-{}", self.sha1, self.size, self.compressed, self.crc, self.method)
    }

    fn from_key(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let (sha1, name) = rest.split_once('/')?;
        let mut parts = name.split('-');
        let file = CachedFile {
            sha1: sha1.to_string(),
            size: parts.next()?.parse().ok()?,
            compressed: parts.next()?.parse().ok()?,
            crc: u32::from_str_radix(parts.next()?, 16).ok()?,
            method: parts.next()?.parse().ok()?,
        };
        (sha1.len() == 40 && parts.next().is_none()).then_some(file)
    }
}

/// The cache over a store, with its in-memory index.
#[derive(Clone)]
pub struct ResourceCache {
    pub store: BlobStore,
    index: Arc<RwLock<HashMap<String, CachedFile>>>,
}

impl ResourceCache {
    /// A cache with an empty index; [`ResourceCache::refresh`] fills it.
    pub fn new(store: BlobStore) -> Self {
        ResourceCache { store, index: Arc::default() }
    }

    /// Rebuild the index from a listing of the store.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let listed = self.store.list(PREFIX).await?;
        let files: HashMap<String, CachedFile> = listed
            .iter()
            .filter_map(|(key, stored)| CachedFile::from_key(key).filter(|f| f.compressed == *stored))
            .map(|f| (f.sha1.clone(), f))
            .collect();
        let count = files.len();
        *self.index.write().unwrap() = files;
        Ok(count)
    }

    /// Refresh the index every `every`, for as long as the task runs.
    pub async fn keep_fresh(self, every: Duration) {
        loop {
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "listing the resource cache");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The cached file with this sha1 and size.
    pub fn get(&self, sha1: &str, size: u64) -> Option<CachedFile> {
        self.index.read().unwrap().get(sha1).filter(|f| f.size == size).cloned()
    }

    pub fn contains(&self, sha1: &str) -> bool {
        self.index.read().unwrap().contains_key(sha1)
    }

    /// Record a file just stored under its key.
    pub fn inserted(&self, file: CachedFile) {
        self.index.write().unwrap().insert(file.sha1.clone(), file);
    }

    /// Forget a file whose stored bytes turned out not to match its sha1, and remove them.
    pub async fn evict(&self, file: &CachedFile) {
        self.index.write().unwrap().remove(&file.sha1);
        if let Err(error) = self.store.delete(&file.key()).await {
            tracing::warn!(%error, key = file.key(), "removing a corrupt cached file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let file = CachedFile { sha1: "a".repeat(40), size: 70_000, compressed: 1234, crc: 0xdead_beef, method: 8 };
        assert_eq!(file.key(), format!("resource-cache/{}/70000-1234-deadbeef-8", "a".repeat(40)));
        assert_eq!(CachedFile::from_key(&file.key()), Some(file));
        assert_eq!(CachedFile::from_key("resource-cache/abc/1-2-3-4"), None);
        assert_eq!(CachedFile::from_key("packages/x"), None);
    }

    #[test]
    fn only_mid_sized_files_are_cached() {
        assert!(!cacheable(65_536) && cacheable(65_537) && cacheable(536_870_911) && !cacheable(536_870_912));
    }
}
