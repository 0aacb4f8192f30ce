//! A zip of app files produced while it is sent: one file at a time is read, deflated and handed on in blocks,
//! and the central directory is kept in an unlinked temporary file until the end, so memory stays flat whatever
//! the app's size and the zip itself is never written anywhere.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::manifest::{Class, Entry, Kind, Manifest};
use crate::archive::zip::{EntryHeader, MADE_ON_UNIX, Sizes, ZipWriter};
use crate::recycle::PageBuffer;

/// Blocks of about this size go to the request.
const BLOCK: usize = 256 << 10;
const STORED: u16 = 0;
const DEFLATED: u16 = 8;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
/// Directory records kept in memory before they go to the temporary file.
const SPILL_EVERY: usize = 1024;

/// Why the zip could not be made: a file could not be read, or the receiver went away (the upload failed, and
/// says why itself).
#[derive(Debug, thiserror::Error)]
pub enum ZipStreamError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the upload stopped taking bytes")]
    Closed,
    #[error("the push's temporary files: {0}")]
    Scratch(std::io::Error),
}

/// Zip the directories of `manifest` and its files `classes` marks as sent, of the app at `root`, into `out`,
/// counting the files' bytes read in `progress`. Runs on a blocking thread.
pub fn write_zip(
    root: &std::path::Path,
    manifest: &Manifest,
    classes: &[Class],
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
    progress: Arc<AtomicU64>,
) -> Result<(), ZipStreamError> {
    let mut sink = BlockSink::new(out);
    let mut zip = ZipWriter::new();
    let mut directory = std::io::BufWriter::new(tempfile::tempfile().map_err(ZipStreamError::Scratch)?);
    let mut block = PageBuffer::zeroed(BLOCK);
    // One compressor for every file, reset between them: its state is a few hundred KiB, and allocating it per
    // file left the heap fragmented in proportion to the number of files.
    // Level 1: most of the gain of compressing app files at a fraction of the CPU of level 6.
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::with_capacity(BLOCK), flate2::Compression::fast());
    for item in manifest.classified(classes) {
        let (file, class) = item.map_err(ZipStreamError::Scratch)?;
        if zip.len() >= SPILL_EVERY {
            zip.spill_directory(&mut directory).map_err(ZipStreamError::Scratch)?;
        }
        match (file.kind, class) {
            (Kind::Dir, _) => {
                let empty = Sizes { crc: 0, compressed: 0, uncompressed: 0 };
                let header = EntryHeader::new(file.path.as_str(), STORED, empty, false);
                let entry = zip.whole_entry(&header, &[], empty, (S_IFDIR | 0o755) << 16);
                sink.write_all(&entry).map_err(|_| ZipStreamError::Closed)?;
                continue;
            }
            (Kind::File, Class::Sent) => {}
            _ => continue,
        }
        let unreadable = |source| ZipStreamError::Read { path: file.path.to_string(), source };
        let closed = |_| ZipStreamError::Closed;
        let mut reader = std::fs::File::open(root.join(&*file.path)).map_err(unreadable)?;
        let first = read_full(&mut reader, &mut block).map_err(unreadable)?;
        // What the first block deflates to says whether the file is worth deflating: already compressed files
        // (images, jars, archives) are stored, which costs nothing here and nothing to inflate on the server.
        deflate.write_all(&block[..first]).map_err(closed)?;
        deflate.flush().map_err(closed)?;
        if deflate.get_ref().len() as f64 > first as f64 * WORTH_DEFLATING {
            deflate.get_mut().clear();
            let buffer = std::mem::take(deflate.get_mut());
            deflate.reset(buffer).map_err(closed)?;
            write_stored(&mut zip, &mut sink, &file, &mut reader, &mut block, first, &progress)?;
            continue;
        }
        let mut header =
            EntryHeader::new(file.path.as_str(), DEFLATED, Sizes { crc: 0, compressed: 0, uncompressed: 0 }, true);
        header.zip64 = file.size >= 0xffff_ffff;
        sink.write_all(&zip.start(&header)).map_err(closed)?;
        let before = sink.written;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&block[..first]);
        sink.write_all(deflate.get_ref()).map_err(closed)?;
        deflate.get_mut().clear();
        let mut read = first as u64;
        progress.fetch_add(first as u64, Ordering::Relaxed);
        loop {
            let n = reader.read(&mut block).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            crc.update(&block[..n]);
            deflate.write_all(&block[..n]).map_err(closed)?;
            sink.write_all(deflate.get_ref()).map_err(closed)?;
            deflate.get_mut().clear();
            read += n as u64;
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        deflate.try_finish().map_err(closed)?;
        sink.write_all(deflate.get_ref()).map_err(closed)?;
        deflate.get_mut().clear();
        let buffer = std::mem::take(deflate.get_mut());
        deflate.reset(buffer).map_err(closed)?;
        let compressed = sink.written - before;
        zip.data(compressed as usize);
        let sizes = Sizes { crc: crc.finalize(), compressed, uncompressed: read };
        let descriptor = zip.end(sizes, MADE_ON_UNIX, (S_IFREG | file.mode) << 16);
        sink.write_all(&descriptor).map_err(closed)?;
    }
    sink.flush().map_err(|_| ZipStreamError::Closed)?;
    // The directory records spilled so far go first, then the rest and the end records.
    let mut directory = directory.into_inner().map_err(|e| ZipStreamError::Scratch(e.into_error()))?;
    std::io::Seek::rewind(&mut directory).map_err(ZipStreamError::Scratch)?;
    // The directory is not the app's bytes: it counts in no progress.
    send_blocks(&mut directory, &sink.out, None, ZipStreamError::Scratch)?;
    zip.finish_in_blocks(BLOCK, |block| sink.out.blocking_send(Ok(block)).map_err(|_| ZipStreamError::Closed))
}

/// A file is deflated when its first block deflates to at most this fraction of itself.
const WORTH_DEFLATING: f64 = 0.95;

/// Fill `block` from `reader` as far as the file goes; the number of bytes read.
fn read_full(reader: &mut impl Read, block: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < block.len() {
        match reader.read(&mut block[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Write `file` as a stored entry whose sizes and CRC lead its data, as every zip reader takes them: a file
/// longer than the block `first` holds is read twice, once for its CRC. A file that changes meanwhile is an error.
fn write_stored(
    zip: &mut ZipWriter,
    sink: &mut BlockSink,
    file: &Entry,
    reader: &mut std::fs::File,
    block: &mut [u8],
    first: usize,
    progress: &AtomicU64,
) -> Result<(), ZipStreamError> {
    use std::io::Seek;
    let unreadable = |source| ZipStreamError::Read { path: file.path.to_string(), source };
    let closed = |_| ZipStreamError::Closed;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&block[..first]);
    let mut size = first as u64;
    let whole = first < block.len();
    if !whole {
        // The file is read again from its start below, so the block is free for this pass.
        loop {
            let n = reader.read(block).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            crc.update(&block[..n]);
            size += n as u64;
        }
    }
    let sizes = Sizes { crc: crc.finalize(), compressed: size, uncompressed: size };
    let mut header = EntryHeader::new(file.path.as_str(), STORED, sizes, false);
    header.zip64 = size >= 0xffff_ffff;
    sink.write_all(&zip.start(&header)).map_err(closed)?;
    if whole {
        sink.write_all(&block[..first]).map_err(closed)?;
    } else {
        reader.seek(std::io::SeekFrom::Start(0)).map_err(unreadable)?;
        let mut again = crc32fast::Hasher::new();
        let mut sent = 0u64;
        loop {
            let n = reader.read(block).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            again.update(&block[..n]);
            sink.write_all(&block[..n]).map_err(closed)?;
            sent += n as u64;
        }
        if (sent, again.finalize()) != (size, sizes.crc) {
            return Err(unreadable(std::io::Error::other("the file changed while it was being sent")));
        }
    }
    progress.fetch_add(size, Ordering::Relaxed);
    zip.data(size as usize);
    let descriptor = zip.end(sizes, MADE_ON_UNIX, (S_IFREG | file.mode) << 16);
    debug_assert!(descriptor.is_empty(), "sizes lead the data");
    Ok(())
}

/// Send the file at `path` (a zip made elsewhere) as it is, counting its bytes in `progress`.
pub fn send_file(
    path: &std::path::Path,
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
    progress: Arc<AtomicU64>,
) -> Result<(), ZipStreamError> {
    let unreadable = |source| ZipStreamError::Read { path: path.display().to_string(), source };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    send_blocks(&mut file, &out, Some(&progress), unreadable)
}

/// Send what `reader` holds in blocks, counting its bytes in `progress` when given; a read error is `unreadable`.
fn send_blocks(
    reader: &mut impl Read,
    out: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    progress: Option<&AtomicU64>,
    unreadable: impl Fn(std::io::Error) -> ZipStreamError,
) -> Result<(), ZipStreamError> {
    loop {
        let mut block = PageBuffer::zeroed(BLOCK);
        let n = read_full(reader, &mut block).map_err(&unreadable)?;
        if n == 0 {
            return Ok(());
        }
        block.set_len(n);
        if let Some(progress) = progress {
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        out.blocking_send(Ok(Bytes::from_owner(block))).map_err(|_| ZipStreamError::Closed)?;
    }
}

/// Collects written bytes into blocks and sends each full one; counts what passed through.
pub struct BlockSink {
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buffer: BytesMut,
    written: u64,
}

impl BlockSink {
    pub fn new(out: mpsc::Sender<Result<Bytes, std::io::Error>>) -> Self {
        BlockSink { out, buffer: BytesMut::with_capacity(BLOCK), written: 0 }
    }
}

impl Write for BlockSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        crate::recycle::append(&mut self.buffer, data);
        self.written += data.len() as u64;
        if self.buffer.len() >= BLOCK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let block = self.buffer.split().freeze();
        self.buffer.reserve(BLOCK);
        self.out.blocking_send(Ok(block)).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::appdir;
    use crate::plugin::history::History;

    #[test]
    fn the_stream_is_a_zip_the_server_reads_back() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("lib/empty")).unwrap();
        std::fs::write(root.path().join("lib/a.txt"), "hello ".repeat(10_000)).unwrap();
        std::fs::write(root.path().join("b.bin"), (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        std::fs::write(root.path().join("zero"), b"").unwrap();
        // Incompressible: one within a block, one over two.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        };
        std::fs::write(root.path().join("lib/small.jpg"), noise(10_000)).unwrap();
        std::fs::write(root.path().join("lib/big.jar"), noise(600_000)).unwrap();
        // More entries than the writer keeps its directory for in memory; one file the server holds already.
        std::fs::create_dir_all(root.path().join("many")).unwrap();
        for n in 0..SPILL_EVERY * 2 {
            std::fs::write(root.path().join(format!("many/{n}")), n.to_string()).unwrap();
        }
        std::fs::write(root.path().join("held"), "on the server").unwrap();
        let manifest = appdir::read(root.path(), 2, &mut History::default()).unwrap();
        let classes: Vec<Class> = manifest
            .entries()
            .map(|e| match e.unwrap() {
                e if e.kind != Kind::File => Class::NotAFile,
                e if e.path == "held" => Class::Matched,
                _ => Class::Sent,
            })
            .collect();

        let (tx, mut rx) = mpsc::channel(4);
        let progress = Arc::new(AtomicU64::new(0));
        let writer = {
            let progress = progress.clone();
            let root = root.path().to_path_buf();
            std::thread::spawn(move || write_zip(&root, &manifest, &classes, tx, progress))
        };
        let mut zip = Vec::new();
        while let Some(block) = rx.blocking_recv() {
            zip.extend_from_slice(&block.unwrap());
        }
        writer.join().unwrap().unwrap();
        let many: u64 = (0..SPILL_EVERY * 2).map(|n| n.to_string().len() as u64).sum();
        assert_eq!(progress.load(Ordering::Relaxed), 60_000 + 300_000 + 10_000 + 600_000 + many);

        // The API's own reader takes it: every entry's CRC and sizes check out. What deflates is deflated, the
        // rest stored with its sizes up front.
        let mut reader = crate::archive::zip::ZipReader::new(1 << 30, 0..u64::MAX);
        let mut names = Vec::new();
        for event in reader.push(BytesMut::from(&zip[..])).unwrap() {
            if let crate::archive::zip::Event::Start(header) = event
                && !header.name.starts_with("many/")
            {
                let how = if header.method == STORED { "stored" } else { "deflated" };
                names.push(format!("{} {how} {}", header.name, header.declared.is_some()));
            }
        }
        let directory = reader.finish().unwrap();
        assert_eq!(
            names,
            [
                "b.bin deflated false",
                "lib/ stored true",
                "lib/a.txt deflated false",
                "lib/big.jar stored true",
                "lib/empty/ stored true",
                "lib/small.jpg stored true",
                "zero stored true"
            ]
        );
        assert_eq!(directory.len(), 7 + 1 + SPILL_EVERY * 2, "every entry, in the directory spilled and kept");
        let names: Vec<&str> = directory.iter().map(|e| &*e.name).collect();
        assert_eq!(names[..3], ["b.bin", "lib/", "lib/a.txt"]);
        assert_eq!(names[names.len() - 2..], ["many/999", "zero"]);
        assert!(
            zip.len() < 60_000 + 610_000 + 2_000 + 100 * 2 * SPILL_EVERY,
            "deflated where it pays: {} bytes",
            zip.len()
        );
        // And so does Python's zipfile.
        let program = "import sys, zipfile, io\nz = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))\nassert z.testzip() is None\nprint(sum(len(z.read(i)) for i in z.infolist()))";
        let out = crate::archive::python(program, zip, "python rejects the zip");
        assert_eq!(String::from_utf8(out).unwrap().trim(), (970_000 + many).to_string());
    }
}
