//! The pipeline: source → digest → store. Bytes flow one way: a block is read from the source, handed to the
//! digest workers and to the store's staged write, and nothing is committed until the stream ended, stayed
//! under the size limit, and matched the checksum pin.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use crate::digest::{Digester, Digests};
use crate::resources::{BlobRef, Checksum, ChecksumType};
use crate::sources::{OpenedSource, PackageCopy, SourceError};
use crate::store::{BlobOwner, BlobStore, StoreError};
use crate::workers::{BlockWork, Offloaded};

/// Cloud Controller's default maximum package size.
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;

/// Blocks handed to the digest workers and the store are at least this big (except the last), so per-block
/// overhead stays negligible however small the source's chunks are.
pub const BLOCK_SIZE: usize = 1 << 20;

/// Stored, verified bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub digests: Digests,
    pub blob: BlobRef,
    /// What the source said of what it served; none for uploads and copies.
    pub resolved: Option<crate::resources::ResolvedSource>,
    /// Where the transfer's time went.
    pub waits: StageWaits,
}

/// How long a transfer took, and how long it waited on each stage: the stage that holds it up takes the time.
/// The source's share is the time the next block took to come: its bytes arriving (and small chunks gathered into
/// it, a copy at memory speed); the digests', the check's and the store's is time their queues were full (the
/// work behind them slower than the bytes coming in). What is left of `elapsed` went to moving the bytes along.
/// `finish` is the end: the last blocks' digests, the check's verdict and the store's commit (for the file store,
/// the sync that makes the blob durable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageWaits {
    pub elapsed: Duration,
    pub source: Duration,
    pub digests: Duration,
    pub check: Duration,
    pub store: Duration,
    pub finish: Duration,
}

impl StageWaits {
    /// The stages' names, in the order of [`StageWaits::stages`].
    pub const STAGES: [&'static str; 5] = ["source", "digests", "check", "store", "finish"];

    /// Each stage by name.
    pub fn stages(&self) -> [(&'static str, Duration); 5] {
        let waited = [self.source, self.digests, self.check, self.store, self.finish];
        std::array::from_fn(|at| (Self::STAGES[at], waited[at]))
    }
}

impl std::fmt::Display for StageWaits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [elapsed, source, digests, check, store, finish] =
            [self.elapsed, self.source, self.digests, self.check, self.store, self.finish].map(|d| d.as_secs_f64());
        write!(
            f,
            "{elapsed:.2} s, waiting {source:.2} s on the source, {digests:.2} s on the digests, {check:.2} s on the \
             check, {store:.2} s on the store, {finish:.2} s at the end"
        )
    }
}

/// `work`, its time added to `wait`.
async fn waited<T>(wait: &mut Duration, work: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let output = work.await;
    *wait += started.elapsed();
    output
}

/// Why bits were not stored. Nothing is left in the store after any of these.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{source_name} is larger than the maximum of {max} bytes")]
    TooLarge { source_name: String, max: u64 },
    #[error("checksum mismatch: spec.checksum wants {} {}, the bits have {actual}", .expected.checksum_type, .expected.value)]
    ChecksumMismatch { expected: Checksum, actual: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The bytes are not what they must be (e.g. not a valid archive).
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("the fetch did not finish within {} (spec.timeout)", humantime::format_duration(*.limit))]
    Timeout { limit: std::time::Duration },
}

impl PipelineError {
    /// A short CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            PipelineError::Source(SourceError::InvalidCredentials { .. }) => "InvalidCredentials",
            PipelineError::Source(SourceError::PackageNotReady { .. }) => "SourcePackageNotReady",
            PipelineError::Source(SourceError::TooLarge { .. }) | PipelineError::TooLarge { .. } => "TooLarge",
            PipelineError::Source(e) if e.is_permanent() => "InvalidSource",
            PipelineError::Source(_) => "SourceUnavailable",
            PipelineError::ChecksumMismatch { .. } => "ChecksumMismatch",
            PipelineError::Store(_) => "StoreError",
            PipelineError::Timeout { .. } => "Timeout",
            PipelineError::Invalid { .. } => "InvalidBits",
        }
    }

    /// Whether retrying the same spec can succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_permanent(),
            PipelineError::TooLarge { .. } | PipelineError::ChecksumMismatch { .. } | PipelineError::Invalid { .. } => {
                true
            }
            PipelineError::Store(_) | PipelineError::Timeout { .. } => false,
        }
    }
}

/// Stream `source` into `store` as `owner`'s blob, hashing on the way. Stops at `max_size` bytes.
pub async fn store_stream(
    source: OpenedSource,
    store: &BlobStore,
    owner: &BlobOwner,
    pin: Option<&Checksum>,
    max_size: u64,
) -> Result<Stored, PipelineError> {
    if let Some(size) = source.length.filter(|&n| n > max_size) {
        return Err(SourceError::TooLarge { url: source.description, size, max: max_size }.into());
    }
    let stored = store_checked(source.stream, &source.description, store, owner, pin, max_size, None).await?;
    Ok(Stored { resolved: Some(source.resolved), ..stored })
}

/// A check of the bytes' content (e.g. that they form a valid archive), run beside the digests on the blocking
/// pool. Nothing is stored when it fails.
pub trait ContentCheck: Send + 'static {
    /// Look at the next block. After an error no more blocks come.
    fn update(&mut self, block: &[u8]) -> Result<(), String>;
    /// The stream ended: the final verdict.
    fn finish(self: Box<Self>) -> Result<(), String>;
}

impl BlockWork for Box<dyn ContentCheck> {
    fn update(&mut self, block: &[u8]) -> Result<(), String> {
        ContentCheck::update(self.as_mut(), block)
    }
}

/// Blocks queued for a content check while it works on earlier ones.
const CHECK_QUEUE_DEPTH: usize = 4;

/// The check's verdict once every block went through it.
async fn check_verdict(check: Offloaded<Box<dyn ContentCheck>>) -> Result<(), String> {
    let check = check.finish().await?;
    tokio::task::spawn_blocking(move || check.finish()).await.map_err(|e| format!("content check failed: {e}"))?
}

/// Stream `chunks` (described as `description` in errors) into `store` as `owner`'s blob: hashed, checked by
/// `check` when given, limited to `max_size` bytes, verified against `pin`, and committed only if all agree.
pub async fn store_checked<S>(
    chunks: S,
    description: &str,
    store: &BlobStore,
    owner: &BlobOwner,
    pin: Option<&Checksum>,
    max_size: u64,
    check: Option<Box<dyn ContentCheck>>,
) -> Result<Stored, PipelineError>
where
    S: Stream<Item = Result<Bytes, SourceError>> + Unpin,
{
    let started = Instant::now();
    let mut staged = store.begin_blob(owner).await?;
    let mut digester = Digester::new();
    let mut checker = check.map(|check| Offloaded::new(check, CHECK_QUEUE_DEPTH));
    let mut blocks = Blocks::new(chunks);
    let mut waits = StageWaits::default();
    let streamed: Result<(), PipelineError> = async {
        while let Some(block) = waited(&mut waits.source, blocks.next()).await {
            let block = block?;
            if digester.size() + block.len() as u64 > max_size {
                return Err(PipelineError::TooLarge { source_name: description.to_string(), max: max_size });
            }
            waited(&mut waits.digests, digester.update(block.clone())).await;
            if let Some(checker) = &mut checker
                && !waited(&mut waits.check, checker.push(block.clone())).await
            {
                // The check failed: its verdict says why.
                return Ok(());
            }
            waited(&mut waits.store, staged.write(block)).await?;
        }
        Ok(())
    }
    .await;
    let finishing = Instant::now();
    let digests = digester.finish().await;
    let checked = match checker {
        Some(checker) => check_verdict(checker).await.map_err(|detail| PipelineError::Invalid { detail }),
        None => Ok(()),
    };
    let verified = streamed.and(checked).and_then(|()| verify_pin(pin, &digests));
    if let Err(e) = verified {
        staged.abort().await;
        return Err(e);
    }
    let blob = staged.commit(&digests.sha256).await?;
    waits.finish = finishing.elapsed();
    waits.elapsed = started.elapsed();
    Ok(Stored { digests, blob, resolved: None, waits })
}

/// Copy another Package's blob inside the store, after checking the pin against its recorded digests.
pub async fn copy_in_store(
    copy: PackageCopy,
    store: &BlobStore,
    owner: &BlobOwner,
    pin: Option<&Checksum>,
) -> Result<Stored, PipelineError> {
    verify_pin(pin, &copy.digests)?;
    let key = owner.blob_key(&copy.digests.sha256);
    if copy.blob.key != key {
        store.copy(&copy.blob.key, &key, copy.digests.size).await?;
    }
    // Nothing streams through this process: the store copies.
    Ok(Stored { blob: store.blob_ref(&key), digests: copy.digests, resolved: None, waits: StageWaits::default() })
}

fn verify_pin(pin: Option<&Checksum>, digests: &Digests) -> Result<(), PipelineError> {
    let Some(pin) = pin else { return Ok(()) };
    let actual = match pin.checksum_type {
        ChecksumType::Sha256 => &digests.sha256,
        ChecksumType::Sha1 => &digests.sha1,
    };
    if actual.eq_ignore_ascii_case(&pin.value) {
        Ok(())
    } else {
        Err(PipelineError::ChecksumMismatch { expected: pin.clone(), actual: actual.clone() })
    }
}

/// Room in a block's buffer: the block, and the piece that takes it past [`BLOCK_SIZE`].
const BLOCK_ROOM: usize = 2 * BLOCK_SIZE;
/// Blocks handed out lately that [`Blocks`] fills again once everyone else is done with them: as many as can be
/// in flight (the store's write memory, the two hashes' and the content check's queues, the block each works on,
/// the one being filled), else most are still held when they are looked at again (with 8, nine blocks in ten
/// were fresh memory, faulted in page by page).
const RECYCLED_BLOCKS: usize =
    crate::store::WRITE_MEMORY as usize / BLOCK_SIZE + 2 * (crate::digest::QUEUE_DEPTH + 1) + CHECK_QUEUE_DEPTH + 2;

/// Regroups a stream's chunks into blocks of at least [`BLOCK_SIZE`]; chunks already that big pass through
/// without a copy.
struct Blocks<S> {
    /// Fused: after the last partial block, the stream is asked again and must say "ended" again.
    inner: futures::stream::Fuse<S>,
    buffer: BytesMut,
    /// A block the hashes and the store are done with is filled again (a fresh one faulted in every page: a
    /// quarter of a fetch's CPU). Holds at most [`RECYCLED_BLOCKS`] buffers more than are in flight.
    buffers: crate::recycle::Recycler,
}

impl<S: Stream<Item = Result<Bytes, SourceError>> + Unpin> Blocks<S> {
    fn new(inner: S) -> Self {
        let buffers = crate::recycle::Recycler::new(RECYCLED_BLOCKS, BLOCK_ROOM);
        Blocks { inner: inner.fuse(), buffer: BytesMut::new(), buffers }
    }

    async fn next(&mut self) -> Option<Result<Bytes, SourceError>> {
        loop {
            if self.buffer.len() >= BLOCK_SIZE {
                return Some(Ok(self.hand_out()));
            }
            match self.inner.next().await {
                Some(Ok(chunk)) if self.buffer.is_empty() && chunk.len() >= BLOCK_SIZE => {
                    return Some(Ok(chunk));
                }
                Some(Ok(chunk)) => {
                    if self.buffer.capacity() == 0 {
                        self.buffer = self.buffers.buffer();
                    }
                    crate::recycle::append(&mut self.buffer, &chunk);
                }
                Some(Err(e)) => return Some(Err(e)),
                None if self.buffer.is_empty() => return None,
                None => return Some(Ok(self.hand_out())),
            }
        }
    }

    /// The filled buffer as a block; its memory is filled again once everyone is done with it.
    fn hand_out(&mut self) -> Bytes {
        self.buffers.hand_out(std::mem::take(&mut self.buffer)).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    #[tokio::test]
    async fn blocks_regroup_small_chunks_and_pass_big_ones() {
        let chunks: Vec<Result<Bytes, SourceError>> = vec![
            Ok(Bytes::from(vec![1u8; 600 << 10])),
            Ok(Bytes::from(vec![2u8; 600 << 10])),
            Ok(Bytes::from(vec![3u8; 2 << 20])),
            Ok(Bytes::from(vec![4u8; 10])),
        ];
        let mut blocks = Blocks::new(stream::iter(chunks));
        let mut sizes = Vec::new();
        while let Some(block) = blocks.next().await {
            sizes.push(block.unwrap().len());
        }
        assert_eq!(sizes, vec![1200 << 10, 2 << 20, 10]);
    }

    #[tokio::test]
    async fn a_block_everyone_is_done_with_is_filled_again() {
        let chunks = (0..6u8).map(|n| Ok::<_, SourceError>(Bytes::from(vec![n; 600 << 10])));
        let mut blocks = Blocks::new(stream::iter(chunks));
        let first = blocks.next().await.unwrap().unwrap();
        let at = first.as_ptr();
        // Still held (by a hash, say): the next block needs a buffer of its own.
        let second = blocks.next().await.unwrap().unwrap();
        assert_ne!(second.as_ptr(), at);
        assert_eq!(&second[..], [vec![2u8; 600 << 10], vec![3u8; 600 << 10]].concat());
        drop(first);
        let third = blocks.next().await.unwrap().unwrap();
        assert_eq!(third.as_ptr(), at, "the first block's memory, filled again");
        assert_eq!(&third[..], [vec![4u8; 600 << 10], vec![5u8; 600 << 10]].concat());
        assert!(blocks.next().await.is_none());
    }

    fn memory_store() -> (BlobStore, BlobOwner) {
        let store = BlobStore::open("memory://", &Default::default()).unwrap();
        (store, BlobOwner { plural: "packages", namespace: "ns".into(), name: "app".into(), uid: None })
    }

    fn total(waits: &StageWaits) -> Duration {
        waits.stages().iter().map(|(_, waited)| *waited).sum()
    }

    #[tokio::test]
    async fn a_slow_source_takes_the_wait() {
        let (store, owner) = memory_store();
        let chunks = stream::iter(0..4u8).then(|n| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, SourceError>(Bytes::from(vec![n; 1000]))
        });
        let stored = store_checked(Box::pin(chunks), "slow", &store, &owner, None, 1 << 20, None).await.unwrap();
        let waits = stored.waits;
        assert!(waits.source >= Duration::from_millis(200), "{waits:?}");
        assert!(waits.digests + waits.store + waits.check < Duration::from_millis(50), "{waits:?}");
        assert!(total(&waits) <= waits.elapsed, "{waits:?}");
    }

    /// A check that takes its time over every block.
    struct SlowCheck;

    impl ContentCheck for SlowCheck {
        fn update(&mut self, _block: &[u8]) -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<(), String> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_slow_check_takes_the_wait() {
        let (store, owner) = memory_store();
        let chunks = (0..12u8).map(|n| Ok::<_, SourceError>(Bytes::from(vec![n; BLOCK_SIZE])));
        let stored = store_checked(
            Box::pin(stream::iter(chunks)),
            "fast",
            &store,
            &owner,
            None,
            1 << 30,
            Some(Box::new(SlowCheck)),
        )
        .await
        .unwrap();
        let waits = stored.waits;
        // Twelve blocks of 20 ms, at most four queued: the body waits on the check for about five of them, and
        // the end for the last few.
        assert!(waits.check >= Duration::from_millis(60), "{waits:?}");
        assert!(waits.finish >= Duration::from_millis(40), "{waits:?}");
        assert!(waits.check > waits.source, "{waits:?}");
        assert!(total(&waits) <= waits.elapsed, "{waits:?}");
    }

    #[test]
    fn waits_read_as_a_line() {
        let seconds = Duration::from_secs_f64;
        let waits =
            StageWaits { elapsed: seconds(3.0), source: seconds(1.25), store: seconds(0.5), ..Default::default() };
        assert_eq!(
            waits.to_string(),
            "3.00 s, waiting 1.25 s on the source, 0.00 s on the digests, 0.00 s on the check, 0.50 s on the store, \
             0.00 s at the end"
        );
    }

    #[test]
    fn pins_compare_the_right_digest() {
        let digests = Digests { sha1: "1".repeat(40), sha256: "2".repeat(64), size: 1 };
        let sha1 = Checksum { checksum_type: ChecksumType::Sha1, value: "1".repeat(40) };
        assert!(verify_pin(Some(&sha1), &digests).is_ok());
        let wrong = Checksum { checksum_type: ChecksumType::Sha256, value: "1".repeat(64) };
        let err = verify_pin(Some(&wrong), &digests).unwrap_err();
        assert_eq!(err.reason(), "ChecksumMismatch");
        assert!(err.is_permanent());
    }
}
