//! Application zips, read as they stream by and written anew.
//!
//! [`ZipReader`] is a push parser: it takes the upload's bytes in any chunking and reports each entry's header,
//! its raw (still compressed) bytes and, at its end, the sha1, CRC and sizes of its inflated content. Every entry
//! is inflated on the way to check it, but never kept: the raw bytes are passed on as they are, so a repacked
//! zip costs no recompression. The central directory at the end must agree with the entries read (name, offset,
//! method, CRC and sizes), and the end records with the directory, so that no other reader can find other
//! entries or other content in the same bytes; symlinks are only known from it, so [`ZipWriter::finish`] leaves
//! them out of the new zip's directory.
//!
//! Refused: names that escape the root (absolute, `..`, drive letters), names that are not UTF-8 or longer than
//! [`MAX_NAME_LEN`], two entries of one name, more entries than the reader's limit, encrypted entries and other
//! flags than the sizes-after-data, UTF-8 and deflate-level ones, methods other than stored and deflate, a total
//! inflated size over the limit, and entries that inflate at an absurd ratio.
//!
//! Cost: every byte of the input is parsed, searched, hashed and inflated a bounded number of times, and the
//! reader holds, beyond the chunk it was given and one record, only a name and a few numbers per entry. Its
//! [`ZipReader::work`] counter makes that checkable.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use crc32fast::Hasher as Crc;
use flate2::{Decompress, FlushDecompress, Status};
use sha1::{Digest, Sha1};

use super::segmented::Segmented;
use crate::digest::to_hex;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const DESCRIPTOR: u32 = 0x0807_4b50;
const END_OF_CENTRAL: u32 = 0x0605_4b50;
const ZIP64_END_OF_CENTRAL: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EXTRA: u16 = 0x0001;

const STORED: u16 = 0;
const DEFLATED: u16 = 8;
/// General purpose flag bits.
const ENCRYPTED: u16 = 1;
/// Deflate's compression level, informative only.
const DEFLATE_LEVEL: u16 = 0b110;
const SIZES_AFTER_DATA: u16 = 1 << 3;
/// Names are UTF-8.
const UTF8_NAMES: u16 = 1 << 11;
/// Any other flag (patched data, strong encryption, masked headers, reserved bits) changes how the bytes must
/// be read, and readers disagree on it.
const KNOWN_FLAGS: u16 = ENCRYPTED | DEFLATE_LEVEL | SIZES_AFTER_DATA | UTF8_NAMES;
/// The highest "version needed to extract" (zip 6.3) that common readers take.
const MAX_VERSION_NEEDED: u8 = 63;

/// An entry may inflate to at most this many times its compressed size once it is over a megabyte:
/// ordinary files stay far below, the near-1000:1 streams of zip bombs do not.
pub const MAX_RATIO: u64 = 200;
/// Below this many inflated bytes no ratio is held against an archive.
const RATIO_FLOOR: u64 = 1 << 20;

/// Whether `inflated` bytes from `compressed` ones pass the ratio a bomb would: over [`MAX_RATIO`] times, once
/// past [`RATIO_FLOOR`]. Zip entries, whole zips and droplets' gzip streams are held to it alike.
pub fn inflates_like_a_bomb(inflated: u64, compressed: u64) -> bool {
    inflated > RATIO_FLOOR && inflated > compressed.max(1).saturating_mul(MAX_RATIO)
}

/// The default limit on entries in a zip (`--max-zip-entries`).
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// The longest entry name, in bytes: Linux's `PATH_MAX`.
pub const MAX_NAME_LEN: usize = 4096;
/// The most bytes all names of a zip may take together; with the entry limit, it bounds what the reader keeps.
pub const MAX_NAMES_LEN: usize = 32 << 20;
/// The largest zip64 end record, and so the most the reader buffers for it.
const MAX_END_RECORD: u64 = 1 << 20;

/// Why a zip was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipError {
    #[error("Invalid zip archive: {0}")]
    Invalid(String),
    #[error("Package may not be larger than {max} bytes uncompressed")]
    TooLarge { max: u64 },
}

fn invalid(reason: impl Into<String>) -> ZipError {
    ZipError::Invalid(reason.into())
}

/// An entry's local header, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    /// Shared by everything that keeps the entry's name (the reader's checks, the writer's directory), so that a
    /// zip of many entries holds each name once.
    pub name: Arc<str>,
    pub method: u16,
    pub flags: u16,
    pub mod_time: u16,
    pub mod_date: u16,
    /// CRC and sizes, when the header states them (not when they follow the data).
    pub declared: Option<Sizes>,
    /// Whether the entry carries 64-bit sizes.
    pub zip64: bool,
}

/// 1980-01-01, the earliest date a zip can state.
const ZIP_EPOCH: u16 = (1 << 5) | 1;

impl EntryHeader {
    /// A header dated at the zip epoch, with `sizes` stated up front, or after the data when `after`.
    pub fn new(name: impl Into<Arc<str>>, method: u16, sizes: Sizes, after: bool) -> Self {
        EntryHeader {
            name: name.into(),
            method,
            flags: if after { SIZES_AFTER_DATA } else { 0 },
            mod_time: 0,
            mod_date: ZIP_EPOCH,
            declared: (!after).then_some(sizes),
            zip64: false,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.name.ends_with('/')
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub crc: u32,
    pub compressed: u64,
    pub uncompressed: u64,
}

/// What the inflated content of an entry turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryEnd {
    pub sizes: Sizes,
    /// Lowercase hex sha1 of the inflated content, for entries of a size the reader was asked to hash.
    pub sha1: Option<String>,
}

/// What the reader saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Start(EntryHeader),
    /// Raw bytes of the current entry, as they are in the zip.
    Data(Bytes),
    End(EntryEnd),
}

/// What the central directory says of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub name: Arc<str>,
    pub version_made_by: u16,
    pub external_attributes: u32,
}

impl DirectoryEntry {
    /// Unix symlinks: made on Unix, file type `S_IFLNK`.
    pub fn is_symlink(&self) -> bool {
        self.version_made_by >> 8 == 3 && (self.external_attributes >> 16) & 0o170_000 == 0o120_000
    }
}

enum State {
    Signature,
    Local,
    // Boxed: the state moves at every step, and an entry with its inflater and hashers is large.
    Data(Box<Entry>),
    Descriptor(Box<Entry>),
    Central,
    Zip64End,
    Zip64Locator,
    End,
    Comment(usize),
    Done,
}

/// The entry being read.
struct Entry {
    header: EntryHeader,
    offset: u64,
    /// Raw bytes left, when known.
    remaining: Option<u64>,
    /// Hashed (sha1) only for entries whose size may lie in [`ZipReader::hashed_sizes`].
    content: Content,
    compressed: u64,
}

/// An entry's content as its raw bytes arrive: inflated when deflated, with its CRC, and its sha1 when asked for.
/// Shared by the reader and [`EntryCheck`], so that both judge content the same way.
struct Content {
    inflater: Option<Decompress>,
    sha1: Option<Sha1>,
    crc: Crc,
}

/// What one [`Content::step`] did: raw bytes consumed, content bytes produced, and whether the deflate stream ended.
struct Step {
    consumed: usize,
    produced: usize,
    ended: bool,
}

impl Content {
    /// For `method`, which the caller has checked is stored or deflated.
    fn new(method: u16, hashed: bool) -> Self {
        Content {
            inflater: (method == DEFLATED).then(|| Decompress::new(false)),
            sha1: hashed.then(Sha1::new),
            crc: Crc::new(),
        }
    }

    fn is_deflated(&self) -> bool {
        self.inflater.is_some()
    }

    /// The content's size so far, given the raw bytes consumed so far.
    fn size(&self, compressed: u64) -> u64 {
        self.inflater.as_ref().map_or(compressed, |i| i.total_out())
    }

    /// Take what `raw` gives in one step: all of it when stored, at most `scratch`'s length of content when
    /// deflated.
    fn step(&mut self, raw: &[u8], scratch: &mut [u8]) -> Result<Step, flate2::DecompressError> {
        let Content { inflater, sha1, crc } = self;
        let Some(inflater) = inflater else {
            sha1.iter_mut().for_each(|h| h.update(raw));
            crc.update(raw);
            return Ok(Step { consumed: raw.len(), produced: raw.len(), ended: false });
        };
        let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
        let status = inflater.decompress(raw, scratch, FlushDecompress::None)?;
        let produced = (inflater.total_out() - out_before) as usize;
        sha1.iter_mut().for_each(|h| h.update(&scratch[..produced]));
        crc.update(&scratch[..produced]);
        Ok(Step { consumed: (inflater.total_in() - in_before) as usize, produced, ended: status == Status::StreamEnd })
    }
}

/// What the reader keeps of each entry to check the central directory against, and what the directory adds.
struct Seen {
    name: Arc<str>,
    offset: u64,
    method: u16,
    utf8: bool,
    sizes: Sizes,
    version_made_by: u16,
    external_attributes: u32,
}

/// Where the central directory lies, and what a zip64 end record says of it.
#[derive(Default)]
struct Directory {
    start: Option<u64>,
    end: u64,
    /// Offset, entry count, size and start offset of the directory, from the zip64 end record.
    zip64: Option<[u64; 4]>,
}

/// Reads a zip pushed to it in chunks.
pub struct ZipReader {
    state: State,
    buffer: BytesMut,
    /// Bytes consumed so far: the offset of `buffer`'s start.
    offset: u64,
    max_inflated: u64,
    max_entries: usize,
    inflated: u64,
    seen: Segmented<Seen>,
    /// The names of `seen`, to find a second entry of a name at once.
    names: HashSet<Arc<str>>,
    names_len: usize,
    /// Entries of the central directory read so far; their attributes are kept in `seen`.
    directory_len: usize,
    located: Directory,
    scratch: Vec<u8>,
    /// Entries whose inflated size lies in this range are hashed with sha1; hashing the others would be wasted.
    hashed_sizes: std::ops::Range<u64>,
    work: u64,
}

impl ZipReader {
    /// A reader that refuses more than `max_inflated` bytes of inflated content in all, and reports the sha1 of
    /// entries whose inflated size lies in `hashed_sizes`. It takes at most [`DEFAULT_MAX_ENTRIES`] entries.
    pub fn new(max_inflated: u64, hashed_sizes: std::ops::Range<u64>) -> Self {
        ZipReader {
            state: State::Signature,
            buffer: BytesMut::new(),
            offset: 0,
            max_inflated,
            max_entries: DEFAULT_MAX_ENTRIES,
            inflated: 0,
            seen: Segmented::default(),
            names: HashSet::new(),
            names_len: 0,
            directory_len: 0,
            located: Directory::default(),
            scratch: vec![0; 64 << 10],
            hashed_sizes,
            work: 0,
        }
    }

    /// Refuse zips of more than `max` entries.
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// How much the reader has done so far, in bytes parsed, searched, hashed or inflated: at most a small
    /// constant times the input and the inflated content, whatever the input.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Bytes of entry content inflated so far.
    pub fn inflated(&self) -> u64 {
        self.inflated
    }

    /// Take the next chunk; returns what it completed.
    pub fn push(&mut self, chunk: BytesMut) -> Result<Vec<Event>, ZipError> {
        let mut events = Vec::new();
        self.push_into(chunk, &mut events)?;
        Ok(events)
    }

    /// [`ZipReader::push`], appending what the chunk completed to `events`: a caller that reuses one buffer
    /// spares a zip of many small entries an allocation that grows with every chunk.
    pub fn push_into(&mut self, chunk: BytesMut, events: &mut Vec<Event>) -> Result<(), ZipError> {
        // Most chunks arrive with nothing left over from the last: take them as they are, without a copy.
        if self.buffer.is_empty() {
            self.buffer = chunk;
        } else {
            crate::recycle::append(&mut self.buffer, &chunk);
        }
        while self.step(events)? {}
        Ok(())
    }

    /// The input ended: the zip must be complete. Returns the central directory, in entry order.
    pub fn finish(self) -> Result<Vec<DirectoryEntry>, ZipError> {
        match self.state {
            State::Done => {}
            State::Comment(n) if self.buffer.len() == n => {
                // Readers that look for the end record from the end of the file would find this one instead.
                if self.buffer.windows(4).any(|w| w == END_OF_CENTRAL.to_le_bytes()) {
                    return Err(invalid("an archive comment that holds an end record"));
                }
            }
            _ => return Err(invalid("the archive ends early")),
        }
        Ok(self
            .seen
            .into_iter()
            .map(|seen| DirectoryEntry {
                name: seen.name,
                version_made_by: seen.version_made_by,
                external_attributes: seen.external_attributes,
            })
            .collect())
    }

    /// Pass on the buffer's first `n` bytes.
    fn take(&mut self, n: usize) -> Bytes {
        self.offset += n as u64;
        self.work += n as u64;
        self.buffer.split_to(n).freeze()
    }

    /// Drop the buffer's first `n` bytes, a record already read.
    fn skip(&mut self, n: usize) {
        self.offset += n as u64;
        self.work += n as u64;
        self.buffer.advance(n);
    }

    /// Advance as far as the buffer allows; false when more input is needed.
    fn step(&mut self, events: &mut Vec<Event>) -> Result<bool, ZipError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Signature => {
                if self.buffer.len() < 4 {
                    self.state = State::Signature;
                    return Ok(false);
                }
                self.state = match u32_at(&self.buffer, 0) {
                    LOCAL_HEADER => State::Local,
                    CENTRAL_HEADER => State::Central,
                    ZIP64_END_OF_CENTRAL => State::Zip64End,
                    END_OF_CENTRAL => State::End,
                    _ if self.offset == 0 => return Err(invalid("it does not start like a zip")),
                    _ => return Err(invalid(format!("unexpected data at offset {}", self.offset))),
                };
                match self.state {
                    State::Local if self.located.start.is_some() => {
                        return Err(invalid("an entry after the central directory"));
                    }
                    State::Central => {
                        self.located.start.get_or_insert(self.offset);
                    }
                    State::Zip64End | State::End => self.located.end = self.offset,
                    _ => {}
                }
                Ok(true)
            }
            State::Local => self.local(events),
            State::Data(entry) => self.data(entry, events),
            State::Descriptor(entry) => self.descriptor(entry, events),
            State::Central => self.central(),
            State::Zip64End => self.zip64_end(),
            State::Zip64Locator => self.zip64_locator(),
            State::End => self.end(),
            State::Comment(n) => {
                self.state = State::Comment(n);
                if self.buffer.len() > n {
                    return Err(invalid("data after the end of the archive"));
                }
                Ok(false)
            }
            State::Done => Ok(false),
        }
    }

    /// Where the directory starts and how long it is: an empty one lies where the end records begin.
    fn directory_span(&self) -> (u64, u64) {
        let start = self.located.start.unwrap_or(self.located.end);
        (start, self.located.end - start)
    }

    fn zip64_end(&mut self) -> Result<bool, ZipError> {
        if self.buffer.len() < 56 {
            self.state = State::Zip64End;
            return Ok(false);
        }
        // Readers that find this record from the end of the file expect it at its fixed size, right before the
        // locator; extensible data would move it.
        let len = u64_at(&self.buffer, 4).checked_add(12).filter(|&n| n <= MAX_END_RECORD);
        if len != Some(56) {
            return Err(invalid("a zip64 end record with extensible data"));
        }
        let record = [self.offset, u64_at(&self.buffer, 32), u64_at(&self.buffer, 40), u64_at(&self.buffer, 48)];
        let (start, size) = self.directory_span();
        if record[1..] != [self.directory_len as u64, size, start] {
            return Err(invalid("the zip64 end record does not describe the central directory"));
        }
        self.located.zip64 = Some(record);
        self.skip(56);
        self.state = State::Zip64Locator;
        Ok(true)
    }

    fn zip64_locator(&mut self) -> Result<bool, ZipError> {
        if self.buffer.len() < 20 {
            self.state = State::Zip64Locator;
            return Ok(false);
        }
        if u32_at(&self.buffer, 0) != ZIP64_LOCATOR {
            return Err(invalid("a zip64 end record without its locator"));
        }
        let record = self.located.zip64.map(|r| r[0]);
        if u32_at(&self.buffer, 4) != 0 || u32_at(&self.buffer, 16) > 1 || Some(u64_at(&self.buffer, 8)) != record {
            return Err(invalid("a zip64 locator that points elsewhere or to other disks"));
        }
        self.skip(20);
        self.state = State::End;
        Ok(true)
    }

    fn end(&mut self) -> Result<bool, ZipError> {
        if self.buffer.len() < 22 {
            self.state = State::End;
            return Ok(false);
        }
        if u32_at(&self.buffer, 0) != END_OF_CENTRAL {
            return Err(invalid("no end of central directory"));
        }
        let comment = u16_at(&self.buffer, 20) as usize;
        let recorded = u16_at(&self.buffer, 10) as usize;
        if recorded != 0xffff && recorded != self.directory_len % 0x10000 {
            return Err(invalid("the end record counts other entries than the directory holds"));
        }
        // With a zip64 end record, readers take the directory's place from it; without, from this record.
        let (start, size) = self.directory_span();
        let stated = (u64::from(u32_at(&self.buffer, 16)), u64::from(u32_at(&self.buffer, 12)));
        if self.located.zip64.is_none() && stated != (start, size) {
            return Err(invalid("the end record places the central directory elsewhere"));
        }
        self.skip(22);
        if self.directory_len != self.seen.len() {
            return Err(invalid(format!(
                "{} entries, but {} in the central directory",
                self.seen.len(),
                self.directory_len
            )));
        }
        self.state = State::Comment(comment);
        Ok(true)
    }

    fn local(&mut self, events: &mut Vec<Event>) -> Result<bool, ZipError> {
        if self.buffer.len() < 30 {
            self.state = State::Local;
            return Ok(false);
        }
        if self.seen.len() >= self.max_entries {
            return Err(invalid(format!("more than {} entries", self.max_entries)));
        }
        let (name_len, extra_len) = (u16_at(&self.buffer, 26) as usize, u16_at(&self.buffer, 28) as usize);
        if name_len > MAX_NAME_LEN {
            return Err(invalid(format!("a name of {name_len} bytes, over the {MAX_NAME_LEN} allowed")));
        }
        if self.buffer.len() < 30 + name_len + extra_len {
            self.state = State::Local;
            return Ok(false);
        }
        let offset = self.offset;
        let raw = &self.buffer[..30 + name_len + extra_len];
        let flags = u16_at(raw, 6);
        let method = u16_at(raw, 8);
        let name = entry_name(&raw[30..30 + name_len])?;
        check_flags(&name, flags)?;
        if method != STORED && method != DEFLATED {
            return Err(invalid(format!("{name}: compression method {method} is not supported")));
        }
        if self.names.contains(&name) {
            return Err(invalid(format!("{name}: a second entry of that name")));
        }
        self.names_len += name.len();
        if self.names_len > MAX_NAMES_LEN {
            return Err(invalid(format!("its names take more than {MAX_NAMES_LEN} bytes")));
        }
        let zip64 = find_extra(&raw[30 + name_len..], ZIP64_EXTRA);
        let (mut compressed, mut uncompressed) = (u64::from(u32_at(raw, 18)), u64::from(u32_at(raw, 22)));
        if let Some(extra) = zip64 {
            if extra.len() < 16 {
                return Err(invalid(format!("{name}: a short zip64 field")));
            }
            (uncompressed, compressed) = (u64_at(extra, 0), u64_at(extra, 8));
        }
        let declared =
            (flags & SIZES_AFTER_DATA == 0).then_some(Sizes { crc: u32_at(raw, 14), compressed, uncompressed });
        if declared.is_some_and(|d| method == STORED && d.compressed != d.uncompressed) {
            return Err(invalid(format!("{name}: a stored entry whose sizes differ")));
        }
        let header = EntryHeader {
            name,
            method,
            flags,
            mod_time: u16_at(raw, 10),
            mod_date: u16_at(raw, 12),
            declared,
            zip64: zip64.is_some(),
        };
        self.skip(30 + name_len + extra_len);
        events.push(Event::Start(header.clone()));
        let hashed = declared.is_none_or(|d| self.hashed_sizes.contains(&d.uncompressed));
        let entry = Box::new(Entry {
            remaining: declared.map(|d| d.compressed),
            content: Content::new(method, hashed),
            header,
            offset,
            compressed: 0,
        });
        self.state = State::Data(entry);
        Ok(true)
    }

    fn data(&mut self, mut entry: Box<Entry>, events: &mut Vec<Event>) -> Result<bool, ZipError> {
        let (consumed, finished) = if entry.content.is_deflated() {
            self.inflate(&mut entry)?
        } else if let Some(remaining) = entry.remaining {
            let n = remaining.min(self.buffer.len() as u64) as usize;
            entry.content.step(&self.buffer[..n], &mut self.scratch).expect("stored content takes any bytes");
            self.work += n as u64;
            (n, n as u64 == remaining)
        } else {
            let (n, found) = self.stored_end(&mut entry);
            // The search has taken the CRC this far; the sha1 follows.
            entry.content.sha1.iter_mut().for_each(|h| h.update(&self.buffer[..n]));
            self.work += n as u64;
            (n, found)
        };
        if !entry.content.is_deflated() {
            self.inflated += consumed as u64;
            if self.inflated > self.max_inflated {
                return Err(ZipError::TooLarge { max: self.max_inflated });
            }
        }
        entry.compressed += consumed as u64;
        entry.remaining = entry.remaining.map(|r| r - consumed as u64);
        if consumed > 0 {
            events.push(Event::Data(self.take(consumed)));
        }
        if !finished {
            self.state = State::Data(entry);
            return Ok(consumed > 0);
        }
        if entry.header.declared.is_some() {
            self.end_entry(entry, None, events)?;
        } else {
            self.state = State::Descriptor(entry);
        }
        Ok(true)
    }

    /// Inflate what the buffer holds of a deflated entry: returns the raw bytes consumed and whether its deflate
    /// stream ended. The limits are checked after every step, so a bomb stops within a step of crossing them.
    fn inflate(&mut self, entry: &mut Entry) -> Result<(usize, bool), ZipError> {
        let available = entry.remaining.map_or(self.buffer.len(), |r| r.min(self.buffer.len() as u64) as usize);
        let (mut consumed, mut ended) = (0, false);
        let name = &entry.header.name;
        loop {
            let step = entry
                .content
                .step(&self.buffer[consumed..available], &mut self.scratch)
                .map_err(|e| invalid(format!("{name}: {e}")))?;
            consumed += step.consumed;
            self.inflated += step.produced as u64;
            self.work += (step.consumed + step.produced) as u64;
            if self.inflated > self.max_inflated {
                return Err(ZipError::TooLarge { max: self.max_inflated });
            }
            let (inflated, compressed) = (entry.content.size(0), entry.compressed + consumed as u64);
            if inflates_like_a_bomb(inflated, compressed) {
                return Err(invalid(format!("{name}: it inflates more than {MAX_RATIO} times, like a zip bomb")));
            }
            // Many entries each under the floor: the archive as a whole is held to the same ratio.
            let read = self.offset + consumed as u64;
            if inflates_like_a_bomb(self.inflated, read) {
                return Err(invalid(format!("it inflates more than {MAX_RATIO} times, like a zip bomb")));
            }
            if step.ended {
                ended = true;
                break;
            }
            // Nothing more to inflate from what has arrived.
            if step.produced == 0 && (consumed == available || step.consumed == 0) {
                break;
            }
        }
        if entry.remaining == Some(consumed as u64) && !ended {
            return Err(invalid(format!("{name}: the compressed data ends early")));
        }
        if ended && entry.remaining.is_some_and(|r| r != consumed as u64) {
            return Err(invalid(format!("{name}: the compressed data is shorter than stated")));
        }
        Ok((consumed, ended))
    }

    /// How much of the buffer is data of a stored entry whose size follows its data, and whether the data ends
    /// there. It ends at the first descriptor signature followed by the CRC and size of exactly the bytes
    /// before it; otherwise it goes on at least to the buffer's end less what could be the start of a
    /// signature, or to a signature whose descriptor has not fully arrived.
    ///
    /// Such entries are what Go's `archive/zip` and Python's `zipfile` write to a stream, so they are taken
    /// rather than refused (as Java's `ZipInputStream` does). The entry's CRC advances with the search: at a
    /// candidate signature it is already the CRC of the bytes before it, so every byte is hashed once however
    /// many false signatures the data holds, and what the search passes is never searched again.
    fn stored_end(&mut self, entry: &mut Entry) -> (usize, bool) {
        let size_len = if entry.header.zip64 { 8 } else { 4 };
        let signature = DESCRIPTOR.to_le_bytes();
        let buffer = &self.buffer[..];
        let crc = &mut entry.content.crc;
        let (mut hashed, mut from) = (0, 0);
        let end = loop {
            let Some(i) = buffer[from..].windows(4).position(|w| w == signature).map(|i| i + from) else {
                self.work += buffer.len().saturating_sub(from) as u64;
                break (buffer.len().saturating_sub(3).max(from), false);
            };
            self.work += (i + 4 - from) as u64;
            crc.update(&buffer[hashed..i]);
            hashed = i;
            if buffer.len() < i + 8 + size_len {
                break (i, false);
            }
            let size = entry.compressed + i as u64;
            let stated = if size_len == 8 { u64_at(buffer, i + 8) } else { u64::from(u32_at(buffer, i + 8)) };
            if u32_at(buffer, i + 4) == crc.clone().finalize() && stated == size {
                break (i, true);
            }
            from = i + 1;
        };
        crc.update(&buffer[hashed..end.0]);
        end
    }

    fn descriptor(&mut self, entry: Box<Entry>, events: &mut Vec<Event>) -> Result<bool, ZipError> {
        let size_len = if entry.header.zip64 { 8 } else { 4 };
        let with_signature = 4 + 4 + 2 * size_len;
        if self.buffer.len() < with_signature {
            // Without a signature the descriptor is 4 bytes shorter, but then the next record's signature follows:
            // waiting for the longer form never waits for input that cannot come.
            self.state = State::Descriptor(entry);
            return Ok(false);
        }
        let crc = entry.content.crc.clone().finalize();
        let signed = u32_at(&self.buffer, 0) == DESCRIPTOR && u32_at(&self.buffer, 4) == crc;
        let at = if signed { 4 } else { 0 };
        let read = |b: &[u8], i: usize| if size_len == 8 { u64_at(b, i) } else { u64::from(u32_at(b, i)) };
        let stated = Sizes {
            crc: u32_at(&self.buffer, at),
            compressed: read(&self.buffer, at + 4),
            uncompressed: read(&self.buffer, at + 4 + size_len),
        };
        self.take(at + 4 + 2 * size_len);
        self.end_entry(entry, Some(stated), events)?;
        Ok(true)
    }

    fn end_entry(
        &mut self,
        entry: Box<Entry>,
        descriptor: Option<Sizes>,
        events: &mut Vec<Event>,
    ) -> Result<(), ZipError> {
        let uncompressed = entry.content.size(entry.compressed);
        let sizes = Sizes { crc: entry.content.crc.clone().finalize(), compressed: entry.compressed, uncompressed };
        let stated = descriptor.or(entry.header.declared).expect("sizes come from the header or a descriptor");
        if stated != sizes {
            return Err(invalid(format!("{}: its CRC or sizes do not match its content", entry.header.name)));
        }
        let name = entry.header.name;
        self.names.insert(name.clone());
        self.seen.push(Seen {
            name,
            offset: entry.offset,
            method: entry.header.method,
            utf8: entry.header.flags & UTF8_NAMES != 0,
            sizes,
            version_made_by: 0,
            external_attributes: 0,
        });
        let sha1 =
            entry.content.sha1.filter(|_| self.hashed_sizes.contains(&uncompressed)).map(|h| to_hex(&h.finalize()));
        events.push(Event::End(EntryEnd { sizes, sha1 }));
        self.state = State::Signature;
        Ok(())
    }

    fn central(&mut self) -> Result<bool, ZipError> {
        if self.buffer.len() < 46 {
            self.state = State::Central;
            return Ok(false);
        }
        let lens = [28, 30, 32].map(|i| u16_at(&self.buffer, i) as usize);
        let index = self.directory_len;
        let local = self.seen.get(index).ok_or_else(|| invalid("more entries in the directory than the archive"))?;
        if lens[0] != local.name.len() {
            return Err(invalid(format!("{}: the central directory names another entry", local.name)));
        }
        let total = 46 + lens.iter().sum::<usize>();
        if self.buffer.len() < total {
            self.state = State::Central;
            return Ok(false);
        }
        let raw = &self.buffer[..total];
        let local = self.seen.get(index).expect("checked above");
        let name = &local.name;
        if raw[46..46 + lens[0]] != *name.as_bytes() {
            return Err(invalid(format!("{name}: the central directory names another entry")));
        }
        let flags = u16_at(raw, 8);
        check_flags(name, flags)?;
        if !name.is_ascii() && (flags & UTF8_NAMES != 0) != local.utf8 {
            return Err(invalid(format!("{name}: its name's encoding differs in the central directory")));
        }
        if raw[6] > MAX_VERSION_NEEDED {
            return Err(invalid(format!("{name}: it needs zip version {}.{}", raw[6] / 10, raw[6] % 10)));
        }
        // The zip64 field holds, in order, only the values that are saturated here.
        let mut zip64 = zip64_field(name, &raw[46 + lens[0]..46 + lens[0] + lens[1]])?;
        let mut wide = |narrow: u32| -> Result<u64, ZipError> {
            match &mut zip64 {
                Some(values) if narrow == 0xffff_ffff => {
                    let all = *values;
                    let (value, rest) = all.split_first_chunk::<8>().ok_or_else(|| {
                        invalid(format!("{name}: a zip64 field without the values its directory entry saturates"))
                    })?;
                    *values = rest;
                    Ok(u64::from_le_bytes(*value))
                }
                _ => Ok(u64::from(narrow)),
            }
        };
        let uncompressed = wide(u32_at(raw, 24))?;
        let compressed = wide(u32_at(raw, 20))?;
        let offset = wide(u32_at(raw, 42))?;
        let sizes = Sizes { crc: u32_at(raw, 16), compressed, uncompressed };
        if (local.offset, local.method, local.sizes) != (offset, u16_at(raw, 10), sizes) {
            return Err(invalid(format!("{name}: the central directory does not match the entry")));
        }
        let (version_made_by, external_attributes) = (u16_at(raw, 4), u32_at(raw, 38));
        let local = self.seen.get_mut(index).expect("checked above");
        (local.version_made_by, local.external_attributes) = (version_made_by, external_attributes);
        self.directory_len += 1;
        self.skip(total);
        self.state = State::Signature;
        Ok(true)
    }
}

/// Encrypted entries cannot be checked; unknown flags change how the data must be read.
fn check_flags(name: &str, flags: u16) -> Result<(), ZipError> {
    if flags & ENCRYPTED != 0 {
        return Err(invalid(format!("{name}: encrypted entries are not supported")));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(invalid(format!("{name}: general purpose flags {flags:#06x} are not supported")));
    }
    Ok(())
}

/// The zip64 field of a central directory entry's extra data, whose fields must each fit in it.
fn zip64_field<'a>(name: &str, mut extra: &'a [u8]) -> Result<Option<&'a [u8]>, ZipError> {
    let mut found = None;
    while extra.len() >= 4 {
        let (field, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
        let data = extra.get(4..4 + len).ok_or_else(|| invalid(format!("{name}: a malformed extra field")))?;
        if field == ZIP64_EXTRA && found.is_none() {
            found = Some(data);
        }
        extra = &extra[4 + len..];
    }
    Ok(found)
}

/// An entry name that stays inside the root: UTF-8, relative, without `..`, drive letters or NUL.
pub fn entry_name(raw: &[u8]) -> Result<Arc<str>, ZipError> {
    let name = std::str::from_utf8(raw)
        .map_err(|_| invalid(format!("{:?}: a name that is not UTF-8", String::from_utf8_lossy(raw))))?;
    safe_path(name).map_err(|reason| invalid(format!("{name:?}: {reason}")))?;
    Ok(name.into())
}

/// Whether `path` names a place inside the package's root.
pub fn safe_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.contains('\0') {
        return Err("an empty or binary name");
    }
    if path.len() > MAX_NAME_LEN {
        return Err("a name longer than 4096 bytes");
    }
    // Windows readers take `\\` for a separator too.
    if path.starts_with(['/', '\\']) || path.as_bytes().get(1) == Some(&b':') {
        return Err("an absolute path");
    }
    if path.split(['/', '\\']).any(|part| part == "..") {
        return Err("a path that leaves the root");
    }
    Ok(())
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// The data of the extra field `id`.
fn find_extra(mut extra: &[u8], id: u16) -> Option<&[u8]> {
    while extra.len() >= 4 {
        let (field, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
        let data = extra.get(4..4 + len)?;
        if field == id {
            return Some(data);
        }
        extra = &extra[4 + len..];
    }
    None
}

/// An entry of the zip being written.
#[derive(Clone, Debug)]
pub struct WrittenEntry {
    pub name: Arc<str>,
    pub method: u16,
    pub flags: u16,
    pub mod_time: u16,
    pub mod_date: u16,
    pub sizes: Sizes,
    pub offset: u64,
    pub version_made_by: u16,
    pub external_attributes: u32,
    /// Written but left out of the directory.
    pub excluded: bool,
}

/// Writes a zip as a sequence of byte blocks: entries one after another, then the central directory.
#[derive(Default)]
pub struct ZipWriter {
    offset: u64,
    entries: Segmented<WrittenEntry>,
    open: Option<(EntryHeader, u64)>,
    /// Directory records already handed out by [`ZipWriter::spill_directory`]: how many, and their bytes.
    spilled: (u64, u64),
}

/// Unix, zip 3.0.
pub const MADE_ON_UNIX: u16 = (3 << 8) | 30;

impl ZipWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start an entry with `header`'s name, method, time and flags (sizes as the header has them, or after the
    /// data). Returns the local header's bytes.
    pub fn start(&mut self, header: &EntryHeader) -> Bytes {
        let mut out = BytesMut::with_capacity(30 + header.name.len() + 20);
        self.start_into(header, &mut out);
        out.freeze()
    }

    /// [`ZipWriter::start`], appending the local header to `out`.
    pub fn start_into(&mut self, header: &EntryHeader, out: &mut BytesMut) {
        let before = out.len();
        let sizes = header.declared.unwrap_or(Sizes { crc: 0, compressed: 0, uncompressed: 0 });
        let zip64 = header.zip64 || sizes.compressed >= 0xffff_ffff || sizes.uncompressed >= 0xffff_ffff;
        out.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
        out.extend_from_slice(&(if zip64 { 45u16 } else { 20u16 }).to_le_bytes());
        let flags = (header.flags & SIZES_AFTER_DATA) | if header.name.is_ascii() { 0 } else { UTF8_NAMES };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&header.method.to_le_bytes());
        out.extend_from_slice(&header.mod_time.to_le_bytes());
        out.extend_from_slice(&header.mod_date.to_le_bytes());
        out.extend_from_slice(&sizes.crc.to_le_bytes());
        let saturated = |v: u64| if zip64 && header.declared.is_some() { 0xffff_ffffu32 } else { v as u32 };
        out.extend_from_slice(&saturated(sizes.compressed).to_le_bytes());
        out.extend_from_slice(&saturated(sizes.uncompressed).to_le_bytes());
        out.extend_from_slice(&(header.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(if zip64 { 20u16 } else { 0u16 }).to_le_bytes());
        out.extend_from_slice(header.name.as_bytes());
        if zip64 {
            out.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
            out.extend_from_slice(&16u16.to_le_bytes());
            out.extend_from_slice(&sizes.uncompressed.to_le_bytes());
            out.extend_from_slice(&sizes.compressed.to_le_bytes());
        }
        let mut header = header.clone();
        header.zip64 = zip64;
        self.open = Some((header, self.offset));
        self.offset += (out.len() - before) as u64;
    }

    /// A whole entry whose raw (stored or deflated) bytes are at hand: its local header, `raw`, and its data
    /// descriptor when its sizes come after the data.
    pub fn whole_entry(&mut self, header: &EntryHeader, raw: &[u8], sizes: Sizes, external_attributes: u32) -> Bytes {
        let mut out = BytesMut::with_capacity(30 + header.name.len() + 20 + raw.len() + 24);
        self.start_into(header, &mut out);
        out.extend_from_slice(raw);
        self.data(raw.len());
        self.end_into(sizes, MADE_ON_UNIX, external_attributes, &mut out);
        out.freeze()
    }

    /// `n` raw bytes of the open entry were written.
    pub fn data(&mut self, n: usize) {
        self.offset += n as u64;
    }

    /// End the open entry; returns its data descriptor's bytes when its sizes come after the data.
    pub fn end(&mut self, sizes: Sizes, version_made_by: u16, external_attributes: u32) -> Bytes {
        let mut out = BytesMut::new();
        self.end_into(sizes, version_made_by, external_attributes, &mut out);
        out.freeze()
    }

    /// [`ZipWriter::end`], appending the data descriptor (if any) to `out`.
    pub fn end_into(&mut self, sizes: Sizes, version_made_by: u16, external_attributes: u32, out: &mut BytesMut) {
        let (header, offset) = self.open.take().expect("an open entry");
        let before = out.len();
        if header.flags & SIZES_AFTER_DATA != 0 {
            out.extend_from_slice(&DESCRIPTOR.to_le_bytes());
            out.extend_from_slice(&sizes.crc.to_le_bytes());
            if header.zip64 {
                out.extend_from_slice(&sizes.compressed.to_le_bytes());
                out.extend_from_slice(&sizes.uncompressed.to_le_bytes());
            } else {
                out.extend_from_slice(&(sizes.compressed as u32).to_le_bytes());
                out.extend_from_slice(&(sizes.uncompressed as u32).to_le_bytes());
            }
        }
        self.offset += (out.len() - before) as u64;
        let flags = (header.flags & SIZES_AFTER_DATA) | if header.name.is_ascii() { 0 } else { UTF8_NAMES };
        self.entries.push(WrittenEntry {
            name: header.name,
            method: header.method,
            flags,
            mod_time: header.mod_time,
            mod_date: header.mod_date,
            sizes,
            offset,
            version_made_by,
            external_attributes,
            excluded: false,
        });
    }

    /// The names written so far.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.entries.iter().map(|e| &e.name)
    }

    /// How many entries were written.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `index`th entry written, to set what only the input's central directory tells: its attributes, and
    /// whether it is left out of the directory (its bytes stay where they are, but no reader finds it).
    pub fn entry_mut(&mut self, index: usize) -> Option<&mut WrittenEntry> {
        self.entries.get_mut(index)
    }

    /// The central directory and the end records.
    pub fn finish(self) -> Bytes {
        debug_assert_eq!(self.spilled.0, 0, "a writer that spilled its directory finishes in blocks");
        let size: usize = self.entries.iter().map(|e| 46 + e.name.len() + 28).sum();
        let mut out = BytesMut::with_capacity(size + 98);
        self.finish_in_blocks(usize::MAX, |block| {
            out.extend_from_slice(&block);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
        out.freeze()
    }

    /// Move the directory records of the entries written so far to `out` (a temporary file, say), so that a zip
    /// of very many entries does not hold its directory in memory. Whoever spills sends those bytes, in the order
    /// spilled, right before [`ZipWriter::finish_in_blocks`]'s. Entries spilled are no longer counted by
    /// [`ZipWriter::len`] or reached by [`ZipWriter::entry_mut`].
    pub fn spill_directory(&mut self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut records = BytesMut::new();
        for e in std::mem::take(&mut self.entries).into_iter().filter(|e| !e.excluded) {
            central_record(&e, &mut records);
            self.spilled.0 += 1;
        }
        self.spilled.1 += records.len() as u64;
        out.write_all(&records)
    }

    /// The central directory and end records, handed to `emit` in blocks of about `block` bytes: a zip of many
    /// entries never holds its whole directory twice. The directory starts with the records spilled, if any.
    pub fn finish_in_blocks<E>(self, block: usize, mut emit: impl FnMut(Bytes) -> Result<(), E>) -> Result<(), E> {
        let mut out = BytesMut::with_capacity(block.min(1 << 20));
        let (spilled, spilled_size) = self.spilled;
        let start = self.offset;
        let (mut count, mut size) = (spilled, spilled_size);
        for e in self.entries.iter().filter(|e| !e.excluded) {
            count += 1;
            central_record(e, &mut out);
            if out.len() >= block {
                size += out.len() as u64;
                emit(out.split().freeze())?;
            }
        }
        let size = size + out.len() as u64;
        if count >= 0xffff || start >= 0xffff_ffff || size >= 0xffff_ffff {
            let record = start + size;
            out.extend_from_slice(&ZIP64_END_OF_CENTRAL.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&MADE_ON_UNIX.to_le_bytes());
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&[0; 8]); // this disk, directory disk
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&ZIP64_LOCATOR.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&record.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        let count16 = count.min(0xffff) as u16;
        out.extend_from_slice(&END_OF_CENTRAL.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&count16.to_le_bytes());
        out.extend_from_slice(&count16.to_le_bytes());
        out.extend_from_slice(&(size.min(0xffff_ffff) as u32).to_le_bytes());
        out.extend_from_slice(&(start.min(0xffff_ffff) as u32).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        emit(out.freeze())
    }
}

/// The central directory record of `e`.
fn central_record(e: &WrittenEntry, out: &mut BytesMut) {
    let mut zip64 = BytesMut::new();
    for value in [e.sizes.uncompressed, e.sizes.compressed, e.offset] {
        if value >= 0xffff_ffff {
            zip64.extend_from_slice(&value.to_le_bytes());
        }
    }
    let capped = |v: u64| v.min(0xffff_ffff) as u32;
    out.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
    out.extend_from_slice(&e.version_made_by.to_le_bytes());
    out.extend_from_slice(&(if zip64.is_empty() { 20u16 } else { 45u16 }).to_le_bytes());
    out.extend_from_slice(&e.flags.to_le_bytes());
    out.extend_from_slice(&e.method.to_le_bytes());
    out.extend_from_slice(&e.mod_time.to_le_bytes());
    out.extend_from_slice(&e.mod_date.to_le_bytes());
    out.extend_from_slice(&e.sizes.crc.to_le_bytes());
    out.extend_from_slice(&capped(e.sizes.compressed).to_le_bytes());
    out.extend_from_slice(&capped(e.sizes.uncompressed).to_le_bytes());
    out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    let extra_len = if zip64.is_empty() { 0 } else { 4 + zip64.len() as u16 };
    out.extend_from_slice(&extra_len.to_le_bytes());
    out.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
    out.extend_from_slice(&e.external_attributes.to_le_bytes());
    out.extend_from_slice(&capped(e.offset).to_le_bytes());
    out.extend_from_slice(e.name.as_bytes());
    if !zip64.is_empty() {
        out.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
        out.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
        out.extend_from_slice(&zip64);
    }
}

/// A regular file's directory attributes for `mode` (permission bits).
pub fn file_attributes(mode: u32) -> u32 {
    (0o100_000 | (mode & 0o7777)) << 16
}

/// Checks raw entry data against the sha1 it should inflate to (for files taken from the resource cache).
pub struct EntryCheck {
    content: Content,
    size: u64,
    scratch: Vec<u8>,
}

impl EntryCheck {
    pub fn new(method: u16) -> Result<Self, ZipError> {
        if method != STORED && method != DEFLATED {
            return Err(invalid(format!("compression method {method} is not supported")));
        }
        Ok(EntryCheck { content: Content::new(method, true), size: 0, scratch: vec![0; 64 << 10] })
    }

    pub fn update(&mut self, mut raw: &[u8]) -> Result<(), ZipError> {
        loop {
            let step = self.content.step(raw, &mut self.scratch).map_err(|e| invalid(e.to_string()))?;
            raw = &raw[step.consumed..];
            self.size += step.produced as u64;
            if step.ended || (step.produced == 0 && (raw.is_empty() || step.consumed == 0)) {
                return Ok(());
            }
        }
    }

    /// The inflated content's sha1 (hex), CRC and size.
    pub fn finish(self) -> (String, u32, u64) {
        let sha1 = self.content.sha1.expect("an entry check always hashes");
        (to_hex(&sha1.finalize()), self.content.crc.finalize(), self.size)
    }
}

/// Rewrites an uploaded zip as it streams: each entry's raw bytes are copied behind a fresh local header, and
/// symlinks are left out of the new directory. More entries can be added before [`ZipWriter::finish`].
pub struct Repack {
    reader: ZipReader,
    writer: ZipWriter,
    /// What the reader saw in the last chunk; kept to reuse its allocation.
    events: Vec<Event>,
    /// The external attributes of the entry being copied; `None` while an entry is left out.
    copying: Option<u32>,
    /// How many entries the writer held before this zip's.
    first: usize,
}

impl Repack {
    pub fn new(max_inflated: u64, hashed_sizes: std::ops::Range<u64>) -> Self {
        Self::resume(ZipWriter::new(), max_inflated, hashed_sizes)
    }

    /// Copy entries of another zip into `writer`, after those it holds (see [`Repack::push_selected`]).
    pub fn resume(writer: ZipWriter, max_inflated: u64, hashed_sizes: std::ops::Range<u64>) -> Self {
        let first = writer.len();
        Repack { reader: ZipReader::new(max_inflated, hashed_sizes), writer, events: Vec::new(), copying: None, first }
    }

    /// Refuse zips of more than `max` entries.
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.reader = self.reader.with_max_entries(max);
        self
    }

    /// The reader's work so far (see [`ZipReader::work`]).
    pub fn work(&self) -> u64 {
        self.reader.work()
    }

    /// Bytes of entry content inflated so far.
    pub fn inflated(&self) -> u64 {
        self.reader.inflated()
    }

    /// Take the next chunk of the upload; returns the new zip's next bytes and what the reader saw. Headers and
    /// descriptors between two pieces of entry data go out as one block, so that a zip of many small entries
    /// costs a few blocks per chunk rather than a few per entry.
    pub fn push(&mut self, chunk: BytesMut) -> Result<(Vec<Bytes>, std::vec::Drain<'_, Event>), ZipError> {
        // Attributes come with the central directory (see `finish`); until then, a plain file.
        self.push_selected(chunk, |_| Some(file_attributes(0o644)))
    }

    /// As [`Repack::push`], copying only the entries `keep` gives external attributes; the reader still reads
    /// (and checks) every entry, and every event is returned.
    pub fn push_selected(
        &mut self,
        chunk: BytesMut,
        mut keep: impl FnMut(&EntryHeader) -> Option<u32>,
    ) -> Result<(Vec<Bytes>, std::vec::Drain<'_, Event>), ZipError> {
        self.events.clear();
        self.reader.push_into(chunk, &mut self.events)?;
        let mut out = Vec::new();
        let mut records = BytesMut::new();
        for event in &self.events {
            match event {
                Event::Start(header) => {
                    self.copying = keep(header);
                    if self.copying.is_some() {
                        self.writer.start_into(header, &mut records);
                    }
                }
                Event::Data(bytes) if self.copying.is_some() => {
                    if !records.is_empty() {
                        out.push(records.split().freeze());
                    }
                    self.writer.data(bytes.len());
                    out.push(bytes.clone());
                }
                Event::Data(_) => {}
                Event::End(end) => {
                    if let Some(attributes) = self.copying.take() {
                        self.writer.end_into(end.sizes, MADE_ON_UNIX, attributes, &mut records);
                    }
                }
            }
        }
        if !records.is_empty() {
            out.push(records.freeze());
        }
        Ok((out, self.events.drain(..)))
    }

    /// The entries copied so far, without checking that the zip read was whole: for a zip read only for some
    /// of its entries, each checked on its own.
    pub fn into_writer(self) -> ZipWriter {
        self.writer
    }

    /// The upload ended: check that it was a whole zip, take over its entries' attributes, drop its symlinks.
    /// For a zip pushed whole ([`Repack::push`]).
    pub fn finish(self) -> Result<ZipWriter, ZipError> {
        let mut writer = self.writer;
        // The reader holds the directory to the entries' order, and the writer wrote every entry it read.
        for (index, entry) in self.reader.finish()?.into_iter().enumerate() {
            let written = writer.entry_mut(self.first + index).expect("an entry written for every entry read");
            debug_assert_eq!(written.name, entry.name);
            if entry.is_symlink() {
                written.excluded = true;
            } else {
                written.version_made_by = entry.version_made_by;
                written.external_attributes = entry.external_attributes;
            }
        }
        Ok(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A zip made by Python's zipfile. With `streamed`, written to a pipe, so that sizes follow the data.
    fn python_zip(script: &str, streamed: bool) -> Vec<u8> {
        let program = format!(
            "import sys, zipfile, io\nout = sys.stdout.buffer if {streamed} else io.BytesIO()\nz = zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED)\n{script}\nz.close()\nif not {streamed}: sys.stdout.buffer.write(out.getvalue())\n",
            streamed = if streamed { "True" } else { "False" }
        );
        crate::archive::python(&program, Vec::new(), "Python could not write the zip")
    }

    /// Python's verdict on a zip: its names and each file's content length, or its error.
    fn python_list(zip: &[u8]) -> String {
        let program = "import sys, zipfile, io\nz = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))\nassert z.testzip() is None\nprint(' '.join(f'{i.filename}:{len(z.read(i))}:{oct(i.external_attr >> 16)}' for i in z.infolist()))";
        let out = crate::archive::python(program, zip.to_vec(), "python rejects the zip");
        String::from_utf8(out).unwrap().trim().to_string()
    }

    fn repack(zip: &[u8], chunk: usize) -> Result<(Vec<u8>, Vec<EntryEnd>), ZipError> {
        let mut repack = Repack::new(1 << 30, 0..u64::MAX);
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        for piece in zip.chunks(chunk) {
            let (bytes, events) = repack.push(BytesMut::from(piece))?;
            bytes.iter().for_each(|b| out.extend_from_slice(b));
            ends.extend(events.into_iter().filter_map(|e| match e {
                Event::End(end) => Some(end),
                _ => None,
            }));
        }
        out.extend_from_slice(&repack.finish()?.finish());
        Ok((out, ends))
    }

    const FILES: &str = "z.writestr('app/', '')\nz.writestr('app/main.py', 'print(1)\\n' * 5000)\nz.writestr(zipfile.ZipInfo('app/raw.bin'), bytes(range(256)) * 300)\nz.writestr('app/empty', '')";

    #[test]
    fn zips_are_copied_entry_for_entry_in_any_chunking() {
        for streamed in [false, true] {
            let zip = python_zip(FILES, streamed);
            for chunk in [1, 13, 4096, 1 << 20] {
                let (out, ends) =
                    repack(&zip, chunk).unwrap_or_else(|e| panic!("streamed {streamed}, chunks of {chunk}: {e}"));
                assert_eq!(
                    python_list(&out),
                    "app/:0:0o40775 app/main.py:45000:0o600 app/raw.bin:76800:0o600 app/empty:0:0o600",
                    "streamed {streamed}, chunks of {chunk}"
                );
                let main = &ends[1];
                assert_eq!(main.sizes.uncompressed, 45000);
                assert_eq!(main.sha1, Some(to_hex(&Sha1::digest("print(1)\n".repeat(5000)))));
            }
        }
    }

    #[test]
    fn the_directory_in_blocks_is_the_directory() {
        let written = || {
            let mut writer = ZipWriter::new();
            let mut zip = BytesMut::new();
            for n in 0..300 {
                let sizes = Sizes { crc: crc32fast::hash(b"x"), compressed: 1, uncompressed: 1 };
                let header = EntryHeader::new(format!("dir/file-{n}.txt"), 0, sizes, false);
                zip.extend_from_slice(&writer.whole_entry(&header, b"x", sizes, file_attributes(0o644)));
            }
            (writer, zip)
        };
        let (whole, mut one) = written();
        one.extend_from_slice(&whole.finish());
        let (blocks, mut many) = written();
        let mut count = 0;
        blocks
            .finish_in_blocks(1000, |block| {
                count += 1;
                many.extend_from_slice(&block);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert!(count > 10, "{count} blocks");
        assert_eq!(one, many);
        assert_eq!(python_list(&many).split(' ').count(), 300);
    }

    #[test]
    fn chosen_entries_of_a_second_zip_follow_the_first() {
        let (first, _) = repack(&python_zip("z.writestr('own.txt', 'mine')", true), 1 << 20).unwrap();
        let mut own = Repack::new(1 << 30, 0..0);
        let (mut out, _) = own.push(BytesMut::from(&first[..])).unwrap();
        let mut out: Vec<u8> = out.drain(..).flat_map(|b| b.to_vec()).collect();
        let writer = own.finish().unwrap();
        let mut other = Repack::resume(writer, 1 << 30, 0..u64::MAX);
        let mut kept_sha1 = Vec::new();
        for piece in python_zip(FILES, true).chunks(97) {
            let (bytes, events) = other
                .push_selected(BytesMut::from(piece), |h| (&*h.name == "app/main.py").then(|| file_attributes(0o755)))
                .unwrap();
            bytes.iter().for_each(|b| out.extend_from_slice(b));
            kept_sha1.extend(events.filter_map(|e| match e {
                Event::End(end) if end.sizes.uncompressed == 45000 => end.sha1,
                _ => None,
            }));
        }
        out.extend_from_slice(&other.into_writer().finish());
        assert_eq!(python_list(&out), "own.txt:4:0o600 app/main.py:45000:0o100755");
        assert_eq!(kept_sha1, vec![to_hex(&Sha1::digest("print(1)\n".repeat(5000)))]);
    }

    #[test]
    fn zip64_entries_are_read() {
        let script = "with z.open('app/big.bin', 'w', force_zip64=True) as f:\n    f.write(bytes(range(256)) * 4000)\nz.writestr('app/small.txt', 'x')";
        for streamed in [false, true] {
            let (out, ends) = repack(&python_zip(script, streamed), 777).unwrap();
            assert_eq!(python_list(&out), "app/big.bin:1024000:0o600 app/small.txt:1:0o600", "streamed {streamed}");
            assert_eq!(ends[0].sizes.uncompressed, 1_024_000);
        }
    }

    #[test]
    fn symlinks_are_dropped() {
        let script = "i = zipfile.ZipInfo('app/link')\ni.create_system = 3\ni.external_attr = 0o120777 << 16\nz.writestr(i, '/etc/passwd')\nz.writestr('app/file', 'x')";
        let (out, _) = repack(&python_zip(script, false), 100).unwrap();
        assert_eq!(python_list(&out), "app/file:1:0o600");
    }

    #[test]
    fn dangerous_or_broken_zips_are_refused() {
        for name in ["../evil", "app/../../evil", "/etc/cron.d/x", "C:/windows/x", "app\\..\\..\\x"] {
            let zip = python_zip(&format!("z.writestr({name:?}, 'x')"), false);
            let error = repack(&zip, 64).unwrap_err();
            assert!(error.to_string().contains("Invalid zip archive"), "{name}: {error}");
        }
        let zip = python_zip(FILES, false);
        assert!(repack(&zip[..zip.len() - 30], 64).is_err(), "truncated");
        assert!(repack(b"not a zip at all", 64).is_err());
        let mut corrupt = zip.clone();
        corrupt[90] ^= 0x55; // inside app/main.py's deflate data
        assert!(repack(&corrupt, 64).is_err(), "corrupt data");

        let bomb = python_zip("z.writestr('zeros', bytes(50 << 20))", true);
        assert!(repack(&bomb, 1 << 16).unwrap_err().to_string().contains("zip bomb"));
        let mut small = Repack::new(10_000, 0..u64::MAX);
        let error =
            small.push(BytesMut::from(&zip[..])).map(|_| ()).and_then(|()| small.finish().map(|_| ())).unwrap_err();
        assert_eq!(error, ZipError::TooLarge { max: 10_000 });
    }

    #[test]
    fn names_must_stay_inside_the_root() {
        assert!(safe_path("app/a/b.txt").is_ok());
        assert!(safe_path("a..b/c").is_ok());
        for bad in ["", "/abs", "..", "a/../../b", "a\\..\\b", "D:x", "a\0b"] {
            assert!(safe_path(bad).is_err(), "{bad:?}");
        }
    }

    /// A zip by the writer: `(name, content, method)` entries, with sizes after the data when `streamed`.
    fn written(entries: &[(&str, &[u8], u16)], streamed: bool) -> Vec<u8> {
        let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
        for &(name, content, method) in entries {
            let raw = if method == DEFLATED {
                let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
                encoder.write_all(content).unwrap();
                encoder.finish().unwrap()
            } else {
                content.to_vec()
            };
            let sizes = Sizes {
                crc: crc32fast::hash(content),
                compressed: raw.len() as u64,
                uncompressed: content.len() as u64,
            };
            let header = EntryHeader::new(name, method, sizes, streamed);
            out.extend_from_slice(&writer.whole_entry(&header, &raw, sizes, file_attributes(0o644)));
        }
        out.extend_from_slice(&writer.finish());
        out
    }

    /// Read `zip` in chunks of `chunk`: the directory, or why it was refused, and the work it took.
    fn read(zip: &[u8], chunk: usize, reader: ZipReader) -> (Result<Vec<DirectoryEntry>, ZipError>, u64) {
        let mut reader = reader;
        for piece in zip.chunks(chunk) {
            if let Err(error) = reader.push(BytesMut::from(piece)) {
                return (Err(error), reader.work());
            }
        }
        let work = reader.work();
        (reader.finish(), work)
    }

    fn reason(result: (Result<Vec<DirectoryEntry>, ZipError>, u64)) -> String {
        match result.0 {
            Err(ZipError::Invalid(reason)) => reason,
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn descriptor_signatures_cost_one_pass() {
        // Every fourth byte starts a candidate end of the entry; none is followed by the right CRC and size.
        let data = b"PK\x07\x08".repeat(256 << 10);
        let zip = written(&[("app/sig", &data, STORED)], true);
        for chunk in [13, 4096, 1 << 20] {
            let (directory, work) = read(&zip, chunk, ZipReader::new(1 << 30, 0..u64::MAX));
            assert_eq!(directory.unwrap().len(), 1);
            assert!(work <= 5 * zip.len() as u64, "chunks of {chunk}: {work} for {} bytes", zip.len());
        }
        let (out, ends) = repack(&zip, 1 << 16).unwrap();
        assert_eq!(ends[0].sizes.uncompressed, data.len() as u64);
        assert_eq!(ends[0].sha1, Some(to_hex(&Sha1::digest(&data))));
        assert!(python_list(&out).starts_with("app/sig:1048576:"));
    }

    #[test]
    fn entries_and_names_are_limited() {
        let names: Vec<String> = (0..11).map(|n| format!("app/e{n}")).collect();
        let entries: Vec<(&str, &[u8], u16)> = names.iter().map(|n| (n.as_str(), &b""[..], STORED)).collect();
        let ten = written(&entries[..10], false);
        assert!(read(&ten, 64, ZipReader::new(1 << 20, 0..0).with_max_entries(10)).0.is_ok());
        let eleven = written(&entries, false);
        let refused = read(&eleven, 64, ZipReader::new(1 << 20, 0..0).with_max_entries(10));
        assert_eq!(reason(refused), "more than 10 entries");

        let twice = written(&[("app/a", b"1", STORED), ("app/a", b"2", STORED)], false);
        assert_eq!(reason(read(&twice, 64, ZipReader::new(1 << 20, 0..0))), "app/a: a second entry of that name");
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let zip = written(&[(&long, b"x", STORED)], false);
        assert_eq!(
            reason(read(&zip, 64, ZipReader::new(1 << 20, 0..0))),
            "a name of 4097 bytes, over the 4096 allowed"
        );
        let mut latin1 = written(&[("app/caf?", b"x", STORED)], false);
        let at = latin1.windows(8).position(|w| w == b"app/caf?").unwrap();
        latin1[at + 7] = 0xe9;
        assert!(reason(read(&latin1, 64, ZipReader::new(1 << 20, 0..0))).contains("a name that is not UTF-8"));
    }

    #[test]
    fn the_directory_and_end_records_must_describe_the_entries() {
        let zip = written(&[("app/a", b"hello", STORED), ("app/b", b"world", DEFLATED)], false);
        let central = zip.windows(4).position(|w| w == CENTRAL_HEADER.to_le_bytes()).unwrap();
        let end = zip.len() - 22;
        let refused = |at: usize, value: &[u8]| {
            let mut bad = zip.clone();
            bad[at..at + value.len()].copy_from_slice(value);
            reason(read(&bad, 64, ZipReader::new(1 << 20, 0..0)))
        };
        assert!(refused(central + 10, &DEFLATED.to_le_bytes()).contains("does not match the entry"), "method");
        assert!(refused(central + 24, &6u32.to_le_bytes()).contains("does not match the entry"), "size");
        assert!(refused(central + 8, &0x40u16.to_le_bytes()).contains("flags 0x0040"), "strong encryption");
        assert!(refused(central + 6, &[64]).contains("needs zip version 6.4"), "version");
        assert!(refused(end + 16, &(central as u32 + 1).to_le_bytes()).contains("elsewhere"), "directory offset");
        assert!(refused(end + 12, &1u32.to_le_bytes()).contains("elsewhere"), "directory size");

        let comment = b"PK\x05\x06 a second end record";
        let mut commented = zip.clone();
        commented[end + 20..].copy_from_slice(&(comment.len() as u16).to_le_bytes());
        commented.extend_from_slice(comment);
        assert_eq!(
            reason(read(&commented, 64, ZipReader::new(1 << 20, 0..0))),
            "an archive comment that holds an end record"
        );
    }

    #[test]
    fn many_small_bombs_are_one_bomb() {
        // Each entry inflates to 1 MiB, under the ratio floor; together they do what one bomb would.
        let zeros = vec![0u8; 1 << 20];
        let names: Vec<String> = (0..50).map(|n| format!("app/z{n}")).collect();
        let entries: Vec<(&str, &[u8], u16)> = names.iter().map(|n| (n.as_str(), &zeros[..], DEFLATED)).collect();
        let zip = written(&entries, false);
        let mut reader = ZipReader::new(1 << 30, 0..0);
        let error = reader.push(BytesMut::from(&zip[..])).unwrap_err();
        assert!(error.to_string().contains("like a zip bomb"), "{error}");
        assert!(reader.inflated() <= 2 << 20, "stopped after {} bytes", reader.inflated());
    }
}
