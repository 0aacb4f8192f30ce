//! The resource cache: the files of earlier uploads, keyed by the sha1 of their content, so that a client can
//! leave out of an upload what the server already has (`resource_matches`). A file is kept as its raw zip entry
//! data — compressed as it came — so it goes into a new package zip without recompression; its key records
//! what a zip entry needs besides: `resource-cache/<sha1>/<size>-<compressed>-<crc32>-<method>`.
//!
//! Tenants do not share files: each namespace whose uploads held a file leaves a small marker beside it,
//! `resource-cache-namespaces/<sha1>/<namespace>`, while the bytes are stored once. With [`Scope::Namespace`] a
//! caller is offered a file only when they may download packages in one of those namespaces ([`permitted`]).
//!
//! Every API replica keeps an index of the cache in memory, filled from a listing at start and on a timer, and
//! kept up by its own inserts. An entry another replica added since the last listing is only a missed match:
//! the client uploads that file again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::store::{BlobStore, StoreError};

const PREFIX: &str = "resource-cache";
/// Where the markers of the namespaces that contributed each file live.
const NAMESPACES: &str = "resource-cache-namespaces";

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

/// Who may use a cached file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Only callers who may download packages in a namespace whose uploads held the file.
    #[default]
    Namespace,
    /// Every authenticated caller, as in Cloud Controller: for installs with a single tenant.
    Cluster,
}

/// The marker recording that uploads in `namespace` held the file `sha1`.
fn marker_key(sha1: &str, namespace: &str) -> String {
    format!("{NAMESPACES}/{sha1}/{namespace}")
}

/// The sha1 and namespace of a marker key, when it is one.
fn from_marker_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(NAMESPACES)?.strip_prefix('/')?;
    let (sha1, namespace) = rest.split_once('/')?;
    (is_sha1(sha1) && is_namespace(namespace)).then_some((sha1, namespace))
}

fn is_sha1(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A Kubernetes namespace name (an RFC 1123 label), so that a marker key never leaves its prefix.
fn is_namespace(text: &str) -> bool {
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// What the index knows of one sha1: the stored file, once listed or written, and the namespaces whose
/// uploads held it.
#[derive(Clone, Debug, Default)]
struct Entry {
    file: Option<CachedFile>,
    namespaces: Vec<String>,
}

/// The cache over a store, with its in-memory index.
#[derive(Clone)]
pub struct ResourceCache {
    pub store: BlobStore,
    index: Arc<RwLock<HashMap<String, Entry>>>,
}

impl ResourceCache {
    /// A cache with an empty index; [`ResourceCache::refresh`] fills it.
    pub fn new(store: BlobStore) -> Self {
        ResourceCache { store, index: Arc::default() }
    }

    /// Rebuild the index from a listing of the store. Returns how many files it holds.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let listed = self.store.list(PREFIX).await?;
        let markers = self.store.list(NAMESPACES).await?;
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for file in
            listed.iter().filter_map(|(key, stored)| CachedFile::from_key(key).filter(|f| f.compressed == *stored))
        {
            let sha1 = file.sha1.clone();
            entries.entry(sha1).or_default().file = Some(file);
        }
        for (sha1, namespace) in markers.iter().filter_map(|(key, _)| from_marker_key(key)) {
            entries.entry(sha1.to_string()).or_default().namespaces.push(namespace.to_string());
        }
        let count = entries.values().filter(|e| e.file.is_some()).count();
        *self.index.write().unwrap() = entries;
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
        self.index.read().unwrap().get(sha1).and_then(|e| e.file.clone()).filter(|f| f.size == size)
    }

    /// The namespaces whose uploads held the cached file with this sha1 and size, when the cache has it.
    pub fn holders(&self, sha1: &str, size: u64) -> Option<Vec<String>> {
        let index = self.index.read().unwrap();
        let entry = index.get(sha1)?;
        entry.file.as_ref().filter(|f| f.size == size).map(|_| entry.namespaces.clone())
    }

    /// Whether the cache holds a file with this sha1.
    pub fn contains(&self, sha1: &str) -> bool {
        self.index.read().unwrap().get(sha1).is_some_and(|e| e.file.is_some())
    }

    /// Record a file just stored under its key.
    pub fn inserted(&self, file: CachedFile) {
        let sha1 = file.sha1.clone();
        self.index.write().unwrap().entry(sha1).or_default().file = Some(file);
    }

    /// Record, in the store and the index, that uploads in `namespace` held the file `sha1`. Idempotent: a
    /// marker the index knows of is not written again.
    pub async fn held_in(&self, sha1: &str, namespace: &str) -> Result<(), StoreError> {
        if !is_namespace(namespace) || !is_sha1(sha1) {
            return Ok(()); // Kubernetes names every namespace so; nothing else reaches here.
        }
        let known = self.index.read().unwrap().get(sha1).is_some_and(|e| e.namespaces.iter().any(|n| n == namespace));
        if known {
            return Ok(());
        }
        let mut write = self.store.begin_write().await?;
        write.write(Bytes::from(namespace.to_string())).await?;
        write.commit(&marker_key(sha1, namespace)).await?;
        let mut index = self.index.write().unwrap();
        let entry = index.entry(sha1.to_string()).or_default();
        if !entry.namespaces.iter().any(|n| n == namespace) {
            entry.namespaces.push(namespace.to_string());
        }
        Ok(())
    }

    /// Forget a file whose stored bytes turned out not to match its sha1, and remove them. Its markers stay:
    /// they record who held a file of that sha1, which remains true.
    pub async fn evict(&self, file: &CachedFile) {
        if let Some(entry) = self.index.write().unwrap().get_mut(&file.sha1) {
            entry.file = None;
        }
        if let Err(error) = self.store.delete(&file.key()).await {
            tracing::warn!(%error, key = file.key(), "removing a corrupt cached file");
        }
    }
}

/// At most this many namespaces are asked about for one request. A file held only by namespaces beyond them
/// is not offered (the client uploads it), so that no request costs more than this many reviews.
pub const MAX_NAMESPACE_CHECKS: usize = 32;
/// Namespaces asked about at once.
const CONCURRENT_CHECKS: usize = 8;

/// Which of the files the caller may use: `holders[i]` are the namespaces whose uploads held file `i` (empty
/// when the cache does not hold it), and `may_use` says whether the caller may use a namespace's files. Each
/// namespace is asked about at most once, the ones holding most of the still undecided files first, and only
/// while some file they hold is undecided — so thousands of files cost one question per namespace involved,
/// at most [`MAX_NAMESPACE_CHECKS`].
pub async fn permitted<'a, F, Fut, E>(holders: &[&'a [String]], may_use: F) -> Result<Vec<bool>, E>
where
    F: Fn(&'a str) -> Fut,
    Fut: Future<Output = Result<bool, E>>,
{
    let mut files_of: HashMap<&'a str, Vec<usize>> = HashMap::new();
    for (file, namespaces) in holders.iter().enumerate() {
        for namespace in namespaces.iter() {
            files_of.entry(namespace.as_str()).or_default().push(file);
        }
    }
    let mut order: Vec<(&'a str, Vec<usize>)> = files_of.into_iter().collect();
    order.sort_unstable_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let mut allowed = vec![false; holders.len()];
    let mut order = order.into_iter();
    let mut asked = 0;
    while asked < MAX_NAMESPACE_CHECKS {
        let room = CONCURRENT_CHECKS.min(MAX_NAMESPACE_CHECKS - asked);
        let batch: Vec<(&'a str, Vec<usize>)> =
            order.by_ref().filter(|(_, files)| files.iter().any(|&f| !allowed[f])).take(room).collect();
        if batch.is_empty() {
            break;
        }
        asked += batch.len();
        let answers = futures::future::try_join_all(batch.iter().map(|(namespace, _)| may_use(namespace))).await?;
        for ((_, files), yes) in batch.iter().zip(answers) {
            if yes {
                files.iter().for_each(|&f| allowed[f] = true);
            }
        }
    }
    Ok(allowed)
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

    #[test]
    fn marker_keys_name_a_sha1_and_a_namespace() {
        let sha1 = "b".repeat(40);
        assert_eq!(marker_key(&sha1, "team-a"), format!("resource-cache-namespaces/{sha1}/team-a"));
        assert_eq!(from_marker_key(&marker_key(&sha1, "team-a")), Some((sha1.as_str(), "team-a")));
        for bad in ["", "-a", "a-", "Team", "a/b", "..", &"a".repeat(64)] {
            assert_eq!(from_marker_key(&format!("resource-cache-namespaces/{sha1}/{bad}")), None, "{bad:?}");
        }
        assert_eq!(from_marker_key("resource-cache-namespaces/abc/team-a"), None);
        assert_eq!(from_marker_key(&format!("resource-cache/{sha1}/team-a")), None);
    }

    /// `permitted` over `holders`, with the namespaces in `allowed` allowed; also the namespaces asked about.
    async fn decide(holders: &[Vec<String>], allowed: &[&str]) -> (Vec<bool>, Vec<String>) {
        let asked = std::sync::Mutex::new(Vec::new());
        let slices: Vec<&[String]> = holders.iter().map(Vec::as_slice).collect();
        let decided = permitted(&slices, |namespace| {
            asked.lock().unwrap().push(namespace.to_string());
            let yes = allowed.contains(&namespace);
            async move { Ok::<_, ()>(yes) }
        })
        .await
        .unwrap();
        (decided, asked.into_inner().unwrap())
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn files_are_permitted_through_any_allowed_namespace_that_held_them() {
        let holders =
            vec![names(&["team-a"]), names(&["team-b"]), names(&["team-a", "team-b"]), names(&[]), names(&["team-c"])];
        let (decided, mut asked) = decide(&holders, &["team-a", "team-c"]).await;
        assert_eq!(decided, [true, false, true, false, true]);
        asked.sort();
        assert_eq!(asked, ["team-a", "team-b", "team-c"], "each namespace once; none for files not held");
    }

    #[tokio::test]
    async fn thousands_of_files_cost_one_question_per_namespace() {
        let holders: Vec<Vec<String>> = (0..5000)
            .map(|n| if n % 100 < 50 { names(&[["team-a", "team-b", "team-c"][n % 3]]) } else { vec![] })
            .collect();
        let (decided, asked) = decide(&holders, &["team-b"]).await;
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert_eq!(
            decided.iter().filter(|d| **d).count(),
            holders.iter().filter(|h| h == &&names(&["team-b"])).count()
        );
    }

    #[tokio::test]
    async fn namespaces_are_not_asked_about_once_their_files_are_decided() {
        // One namespace holds every file; twenty more hold one each. The first batch settles all of them.
        let holders: Vec<Vec<String>> = (0..20).map(|n| names(&["big", &format!("small-{n:02}")])).collect();
        let (decided, asked) = decide(&holders, &["big"]).await;
        assert!(decided.iter().all(|d| *d));
        assert_eq!(asked.len(), CONCURRENT_CHECKS, "{asked:?}");
        assert_eq!(asked[0], "big", "the namespace holding most files first");
    }

    #[tokio::test]
    async fn a_request_asks_about_a_bounded_number_of_namespaces() {
        let holders: Vec<Vec<String>> = (0..1000).map(|n| vec![format!("ns-{n:04}")]).collect();
        let (decided, asked) = decide(&holders, &["ns-0999"]).await;
        assert_eq!(asked.len(), MAX_NAMESPACE_CHECKS);
        assert!(decided.iter().all(|d| !*d), "ns-0999 comes last in the order and is never reached");
        let failing = permitted(&[&names(&["a"])[..]], |_| async { Err::<bool, _>("no answer") }).await;
        assert_eq!(failing, Err("no answer"), "a failed question fails the decision");
    }

    #[tokio::test]
    async fn namespaces_that_held_a_file_survive_a_restart() {
        let store = BlobStore::open("memory://", &Default::default()).unwrap();
        let cache = ResourceCache::new(store.clone());
        let file = CachedFile { sha1: "c".repeat(40), size: 70_000, compressed: 5, crc: 1, method: 8 };
        let mut write = store.begin_write().await.unwrap();
        write.write(Bytes::from_static(b"12345")).await.unwrap();
        write.commit(&file.key()).await.unwrap();
        cache.inserted(file.clone());
        assert_eq!(cache.holders(&file.sha1, 70_000), Some(vec![]), "held, by no namespace yet");
        cache.held_in(&file.sha1, "team-a").await.unwrap();
        cache.held_in(&file.sha1, "team-a").await.unwrap();
        assert_eq!(cache.holders(&file.sha1, 70_000), Some(names(&["team-a"])));
        assert_eq!(cache.holders(&file.sha1, 70_001), None, "the size is part of the match");

        // Another replica, or this one restarted, knows it from the store alone.
        let restarted = ResourceCache::new(store.clone());
        assert_eq!(restarted.refresh().await.unwrap(), 1);
        assert_eq!(restarted.holders(&file.sha1, 70_000), Some(names(&["team-a"])));
        assert_eq!(store.list(NAMESPACES).await.unwrap().len(), 1, "one marker per namespace");

        restarted.evict(&file).await;
        assert_eq!(restarted.holders(&file.sha1, 70_000), None);
        assert_eq!(restarted.refresh().await.unwrap(), 0, "the bytes are gone from the store");
    }
}
