//! Writes to and reads from the filesystem store.
//!
//! A write is a multipart upload: parts are written at their offsets into a file beside the key (`<key>#<id>`,
//! which listings do not show), and the file is synced and renamed to the key when the upload is completed.
//!
//! Unlike object_store's own local upload, each part is handed to the disk as soon as it is written
//! (`sync_file_range`) and the file is synced in the background as it grows, so the disk writes while the rest of
//! the bytes still arrive and are hashed, and the sync at the end has little left to do: a fetch takes about as
//! long as the slower of the two instead of their sum. Durability is the same: the file is synced before it is
//! renamed, and its directory after.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::{MultipartUpload, PutPayload, PutResult, UploadPart};

use super::LOCAL_SYNC_EVERY;
use crate::object_url::{READ_CONCURRENCY, read_ranges};
use crate::recycle::PageBuffer;

/// An upload to `dest` through a partial file beside it.
#[derive(Debug)]
pub(super) struct LocalUpload {
    file: Arc<Flushed>,
    partial: PathBuf,
    dest: PathBuf,
    /// Where the next part goes.
    offset: u64,
    /// Completed or aborted: nothing is left to clean up.
    over: bool,
}

impl LocalUpload {
    /// Create the partial file for `dest` (and `dest`'s directory).
    pub(super) async fn create(dest: PathBuf) -> Result<Self, object_store::Error> {
        blocking(move || {
            let parent = dest.parent().ok_or_else(|| generic(format!("{} names no directory", dest.display())))?;
            std::fs::create_dir_all(parent).map_err(|e| io_error("create directory", parent, e))?;
            let mut partial = dest.clone().into_os_string();
            partial.push(format!("#{}", uuid::Uuid::new_v4().simple()));
            let partial = PathBuf::from(partial);
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&partial)
                .map_err(|e| io_error("create", &partial, e))?;
            Ok(LocalUpload { file: Arc::new(Flushed::new(file)), partial, dest, offset: 0, over: false })
        })
        .await
    }
}

#[async_trait::async_trait]
impl MultipartUpload for LocalUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let start = self.offset;
        self.offset += data.content_length() as u64;
        let (file, partial) = (self.file.clone(), self.partial.clone());
        Box::pin(blocking(move || {
            let mut at = start;
            for piece in data.iter() {
                file.file.write_all_at(piece, at).map_err(|e| io_error("write", &partial, e))?;
                at += piece.len() as u64;
            }
            // The bytes are in the page cache: their blocks may be filled again while the disk is asked to write.
            drop(data);
            start_writeback(&file.file, start, at - start);
            file.written(at - start);
            Ok(())
        }))
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.over = true;
        let (file, partial, dest) = (self.file.clone(), self.partial.clone(), self.dest.clone());
        blocking(move || {
            let published = file
                .sync()
                .map_err(|e| io_error("sync", &partial, e))
                .and_then(|()| std::fs::rename(&partial, &dest).map_err(|e| io_error("rename", &partial, e)))
                .and_then(|()| sync_directory(&dest));
            if published.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            published?;
            Ok(PutResult { e_tag: None, version: None, extensions: Default::default() })
        })
        .await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.over = true;
        let partial = self.partial.clone();
        blocking(move || match std::fs::remove_file(&partial) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &partial, e)),
        })
        .await
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // Dropped neither completed nor aborted (a cancelled task): the partial file goes, off the async thread
        // when there is a runtime, since unlinking a large file takes a while.
        if self.over {
            return;
        }
        let partial = std::mem::take(&mut self.partial);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || std::fs::remove_file(partial))),
            Err(_) => drop(std::fs::remove_file(partial)),
        }
    }
}

/// The partial file, synced in the background every `LOCAL_SYNC_EVERY` bytes written.
#[derive(Debug)]
struct Flushed {
    file: File,
    unsynced: AtomicU64,
    syncing: AtomicBool,
    /// A background sync's failure, kept for the final sync: Linux reports a writeback error to one sync of an
    /// open file only, so the final one would not see it again. The lock is held for a whole sync, so that the
    /// final sync starts only after a background one has recorded its result.
    failed: Mutex<Option<std::io::Error>>,
}

impl Flushed {
    fn new(file: File) -> Self {
        Flushed { file, unsynced: AtomicU64::new(0), syncing: AtomicBool::new(false), failed: Mutex::new(None) }
    }

    /// `len` more bytes are written: start a background sync when enough are and none is running.
    fn written(self: &Arc<Self>, len: u64) {
        let unsynced = self.unsynced.fetch_add(len, Ordering::Relaxed) + len;
        if unsynced < LOCAL_SYNC_EVERY || self.syncing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.unsynced.store(0, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.syncing.store(false, Ordering::Release);
            return;
        };
        let this = self.clone();
        drop(runtime.spawn_blocking(move || {
            let mut failed = this.failed.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = this.file.sync_data() {
                failed.get_or_insert(e);
            }
            drop(failed);
            this.syncing.store(false, Ordering::Release);
        }));
    }

    /// Sync everything written, reporting a background sync's failure too.
    fn sync(&self) -> std::io::Result<()> {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match failed.take() {
            Some(e) => Err(e),
            None => self.file.sync_all(),
        }
    }
}

/// Start writing `len` bytes at `offset` back to the disk, without waiting for them. A hint: where the
/// filesystem does not take it, the sync at completion writes them all the same.
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for `file`'s lifetime.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Stream the bytes `range` of the file at `path`, [`READ_RANGE`](crate::object_url::READ_RANGE) at a time and [`READ_CONCURRENCY`] read at once
/// on the blocking pool, as reads from the object stores go. object_store's own ranged read zeroes a fresh buffer
/// for every range, and a fresh buffer of megabytes is new memory to fault in; here a stream's buffers are filled
/// again once the bytes read into them are dropped. The file is opened once, so the stream reads one file to the
/// end even should its key be replaced meanwhile.
pub fn read_range(path: PathBuf, range: Range<u64>) -> BoxStream<'static, Result<Bytes, object_store::Error>> {
    let opened = blocking({
        let path = path.clone();
        move || File::open(&path).map_err(|e| open_error(&path, e))
    });
    stream::once(opened)
        .map_ok(move |file| {
            let (file, path, buffers) = (Arc::new(file), Arc::new(path.clone()), Arc::new(Buffers::default()));
            stream::iter(read_ranges(range.clone()))
                .map(move |range| {
                    let (file, path, buffers) = (file.clone(), path.clone(), buffers.clone());
                    blocking(move || buffers.read(&file, &path, range))
                })
                .buffered(READ_CONCURRENCY)
        })
        .try_flatten()
        .boxed()
}

/// Buffers kept for one read stream beyond those in flight: enough for the consumer's own queue.
const KEPT_BUFFERS: usize = 2 * READ_CONCURRENCY;

/// A read stream's buffers, kept once the bytes read into them are dropped.
#[derive(Debug, Default)]
struct Buffers(Mutex<Vec<PageBuffer>>);

impl Buffers {
    /// Read `range` of `file` into a kept buffer, or a new one when none is free.
    fn read(self: &Arc<Self>, file: &File, path: &Path, range: Range<u64>) -> Result<Bytes, object_store::Error> {
        let len = (range.end - range.start) as usize;
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
        // A kept buffer is already this long: nothing is zeroed but a new buffer's bytes.
        let mut buffer = kept.unwrap_or_else(|| PageBuffer::zeroed(len));
        buffer.set_len(len);
        file.read_exact_at(&mut buffer, range.start).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                generic(format!("read {}: the file ends before byte {}", path.display(), range.end))
            }
            _ => io_error("read", path, e),
        })?;
        Ok(Bytes::from_owner(Kept { buffer, buffers: self.clone() }))
    }
}

/// Bytes read into a buffer that goes back to its stream's [`Buffers`] when they are dropped.
struct Kept {
    buffer: PageBuffer,
    buffers: Arc<Buffers>,
}

impl AsRef<[u8]> for Kept {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let mut kept = self.buffers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < KEPT_BUFFERS {
            kept.push(std::mem::take(&mut self.buffer));
        }
    }
}

fn open_error(path: &Path, error: std::io::Error) -> object_store::Error {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            object_store::Error::NotFound { path: path.display().to_string(), source: Box::new(error) }
        }
        _ => io_error("open", path, error),
    }
}

/// Sync the directory holding `path`, so that a rename into it survives a crash.
fn sync_directory(path: &Path) -> Result<(), object_store::Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("sync directory", dir, e))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, object_store::Error> + Send + 'static,
) -> Result<T, object_store::Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| generic(format!("a file write stopped: {e}")))?
}

fn io_error(op: &str, path: &Path, error: std::io::Error) -> object_store::Error {
    generic(format!("{op} {}: {error}", path.display()))
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic { store: "LocalFileSystem", source: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object_url::READ_RANGE;

    fn payload(bytes: &[u8]) -> PutPayload {
        PutPayload::from(bytes.to_vec())
    }

    #[tokio::test]
    async fn parts_land_at_their_offsets_and_appear_only_when_completed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/blob");
        let mut upload = LocalUpload::create(dest.clone()).await.unwrap();
        // Parts may finish in any order; each lands where it belongs.
        let first = upload.put_part(payload(&[1; 5000]));
        let second = upload.put_part(payload(&[2; 3]));
        second.await.unwrap();
        first.await.unwrap();
        assert!(!dest.exists(), "nothing at the key before completion");
        let partial = upload.partial.clone();
        assert!(partial.file_name().unwrap().to_string_lossy().starts_with("blob#"));
        upload.complete().await.unwrap();
        let written = std::fs::read(&dest).unwrap();
        assert_eq!(written.len(), 5003);
        assert!(written[..5000].iter().all(|&b| b == 1) && written[5000..] == [2, 2, 2]);
        assert!(!partial.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_write_is_synced_on_the_way_and_a_failed_sync_fails_completion() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let mut upload = LocalUpload::create(dest.clone()).await.unwrap();
        upload.put_part(payload(b"head")).await.unwrap();
        assert_eq!(upload.file.unsynced.load(Ordering::Relaxed), 4);
        upload.put_part(PutPayload::from(vec![7u8; LOCAL_SYNC_EVERY as usize])).await.unwrap();
        // The parts crossed the threshold: a background sync started and counts from zero again.
        assert_eq!(upload.file.unsynced.load(Ordering::Relaxed), 0);
        // Wait for it to end (it holds the lock while it runs), then stand in for a writeback error it saw.
        while upload.file.syncing.load(Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        *upload.file.failed.lock().unwrap() = Some(std::io::Error::other("lost page"));
        upload.put_part(payload(b"tail")).await.unwrap();
        let partial = upload.partial.clone();
        let error = upload.complete().await.unwrap_err().to_string();
        assert!(error.contains("lost page"), "{error}");
        assert!(!partial.exists() && !dest.exists(), "a failed sync publishes nothing and leaves nothing");
    }

    #[tokio::test]
    async fn a_read_streams_the_range_in_order_into_buffers_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let size = 2 * READ_RANGE + READ_RANGE / 2 + 7;
        let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        for range in [0..size, 5..size - 3, READ_RANGE - 1..READ_RANGE + 1, 9..9] {
            let read: Vec<Bytes> = read_range(path.clone(), range.clone()).try_collect().await.unwrap();
            assert_eq!(read.concat(), content[range.start as usize..range.end as usize], "{range:?}");
            assert!(read.iter().all(|b| b.len() as u64 <= READ_RANGE));
        }
        // A buffer comes back once its bytes are dropped, and the next read fills it again. Its bytes start on a
        // page, as the file's do (see `PageBuffer`).
        let buffers = Arc::new(Buffers::default());
        let file = File::open(&path).unwrap();
        let first = buffers.read(&file, &path, 0..READ_RANGE).unwrap();
        let address = first.as_ptr();
        assert_eq!(address.addr() % 4096, 0);
        drop(first);
        let second = buffers.read(&file, &path, READ_RANGE..2 * READ_RANGE).unwrap();
        assert_eq!(second.as_ptr(), address);
        assert_eq!(second[..], content[READ_RANGE as usize..2 * READ_RANGE as usize]);
    }

    #[tokio::test]
    async fn a_read_of_a_missing_or_short_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let missing: Result<Vec<Bytes>, _> = read_range(dir.path().join("none"), 0..10).try_collect().await;
        assert!(matches!(missing, Err(object_store::Error::NotFound { .. })), "{missing:?}");
        let path = dir.path().join("short");
        std::fs::write(&path, b"12345").unwrap();
        let short = read_range(path, 0..10).try_collect::<Vec<Bytes>>().await.unwrap_err().to_string();
        assert!(short.contains("ends before byte 10"), "{short}");
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for abort in [true, false] {
            let dest = dir.path().join(format!("blob-{abort}"));
            let mut upload = LocalUpload::create(dest.clone()).await.unwrap();
            upload.put_part(payload(b"bytes")).await.unwrap();
            let partial = upload.partial.clone();
            assert!(partial.exists());
            if abort {
                upload.abort().await.unwrap();
            } else {
                drop(upload);
                // The drop removes the file on the blocking pool.
                for _ in 0..100 {
                    if !partial.exists() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            assert!(!partial.exists() && !dest.exists(), "abort={abort}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
