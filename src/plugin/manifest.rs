//! The entries of an app directory a push works from, kept in an unlinked temporary file so that a push's memory
//! does not grow with the app: written once by the walk, then read as often as the push needs (to ask the
//! resource cache, to name the upload's parts, to zip, to record the push), each reader at its own offset.
//!
//! Entries are in walk order: paths compared component by component (`a/b` before `a.txt`), which is the order a
//! depth-first walk of sorted directories yields and the order the record of the last push is kept in, so the two
//! are read side by side instead of one being held in memory.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A file's sha1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sha1(pub [u8; 20]);

impl Sha1 {
    /// Lowercase hex.
    pub fn hex(&self) -> String {
        crate::digest::to_hex(&self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 40 {
            return None;
        }
        let mut out = [0u8; 20];
        for (i, pair) in bytes.chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Sha1(out))
    }
}

/// The order entries are walked and recorded in: component by component.
pub fn walk_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    /// A directory; its path ends in `/`.
    Dir,
    /// A symlink or another thing that is neither a file nor a directory: left out.
    Skipped,
}

/// One entry of the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// `/`-separated, relative to the app's root.
    pub path: String,
    pub size: u64,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    /// Last modification in nanoseconds since the epoch, and the inode: with the size, what tells that a file has
    /// not changed since it was last hashed.
    pub mtime_ns: i64,
    pub ino: u64,
    pub sha1: Sha1,
    /// The last push of this directory sent this file with these bytes.
    pub in_last_push: bool,
}

impl Entry {
    pub fn file(path: String, size: u64, mode: u32, mtime_ns: i64, ino: u64) -> Self {
        Entry { kind: Kind::File, path, size, mode, mtime_ns, ino, sha1: Sha1::default(), in_last_push: false }
    }

    pub fn other(kind: Kind, path: String) -> Self {
        Entry { kind, ..Entry::file(path, 0, 0, 0, 0) }
    }
}

/// What a push does with an entry, one byte per entry of the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A directory (zipped) or a skipped entry (not).
    NotAFile,
    /// A file not yet asked of the resource cache.
    Unasked,
    /// The resource cache holds it: named, not sent.
    Matched,
    /// Taken from the last push's package: named, not sent.
    Base,
    /// Sent in the zip.
    Sent,
}

/// Writes a [`Manifest`].
pub struct ManifestWriter {
    out: BufWriter<File>,
    entries: u64,
}

/// A fixed part of every record: kind, in_last_push, size, mode, mtime, inode, sha1, path length.
const FIXED: usize = 1 + 1 + 8 + 4 + 8 + 8 + 20 + 4;

impl ManifestWriter {
    /// A manifest in a new unlinked file of the temporary directory.
    pub fn new() -> std::io::Result<Self> {
        Ok(ManifestWriter { out: BufWriter::with_capacity(64 << 10, tempfile::tempfile()?), entries: 0 })
    }

    pub fn push(&mut self, entry: &Entry) -> std::io::Result<()> {
        let mut fixed = [0u8; FIXED];
        fixed[0] = match entry.kind {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Skipped => 2,
        };
        fixed[1] = entry.in_last_push as u8;
        fixed[2..10].copy_from_slice(&entry.size.to_le_bytes());
        fixed[10..14].copy_from_slice(&entry.mode.to_le_bytes());
        fixed[14..22].copy_from_slice(&entry.mtime_ns.to_le_bytes());
        fixed[22..30].copy_from_slice(&entry.ino.to_le_bytes());
        fixed[30..50].copy_from_slice(&entry.sha1.0);
        let len = u32::try_from(entry.path.len()).map_err(|_| std::io::Error::other("a path over 4 GiB"))?;
        fixed[50..54].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&fixed)?;
        self.out.write_all(entry.path.as_bytes())?;
        self.entries += 1;
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<Manifest> {
        let entries = self.entries;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(Manifest { file: Arc::new(file), entries })
    }
}

/// The entries of an app, in walk order.
#[derive(Clone)]
pub struct Manifest {
    file: Arc<File>,
    entries: u64,
}

impl Manifest {
    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries as usize
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Read the entries from the first, independently of any other reader.
    pub fn entries(&self) -> Entries {
        Entries { reader: BufReader::with_capacity(64 << 10, At { file: self.file.clone(), offset: 0 }) }
    }

    /// The entries with their classes.
    pub fn classified<'a>(&self, classes: &'a [Class]) -> impl Iterator<Item = std::io::Result<(Entry, Class)>> + 'a {
        self.entries().zip(classes.iter().copied()).map(|(entry, class)| entry.map(|e| (e, class)))
    }
}

/// A reader of a shared file at its own offset.
struct At {
    file: Arc<File>,
    offset: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// The entries of a [`Manifest`], in order.
pub struct Entries {
    reader: BufReader<At>,
}

impl Iterator for Entries {
    type Item = std::io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut fixed = [0u8; FIXED];
        match self.reader.read(&mut fixed[..1]) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
        let read = |reader: &mut BufReader<At>, fixed: &mut [u8; FIXED]| -> std::io::Result<Entry> {
            reader.read_exact(&mut fixed[1..])?;
            let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().expect("8 bytes"));
            let kind = match fixed[0] {
                0 => Kind::File,
                1 => Kind::Dir,
                2 => Kind::Skipped,
                _ => return Err(std::io::Error::other("a manifest record of no known kind")),
            };
            let len = u32::from_le_bytes(fixed[50..54].try_into().expect("4 bytes")) as usize;
            let mut path = vec![0u8; len];
            reader.read_exact(&mut path)?;
            Ok(Entry {
                kind,
                in_last_push: fixed[1] != 0,
                size: u64_at(2),
                mode: u32::from_le_bytes(fixed[10..14].try_into().expect("4 bytes")),
                mtime_ns: u64_at(14) as i64,
                ino: u64_at(22),
                sha1: Sha1(fixed[30..50].try_into().expect("20 bytes")),
                path: String::from_utf8(path).map_err(std::io::Error::other)?,
            })
        };
        Some(read(&mut self.reader, &mut fixed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_back_as_written_by_any_number_of_readers() {
        let mut writer = ManifestWriter::new().unwrap();
        let mut file = Entry::file("dir/naïve file".into(), 1 << 40, 0o755, -5, 9);
        file.sha1 = Sha1([3; 20]);
        file.in_last_push = true;
        let written = [
            Entry::other(Kind::Dir, "dir/".into()),
            file,
            Entry::other(Kind::Skipped, "link".into()),
            Entry::file(String::new(), 0, 0o644, 0, 0),
        ];
        for entry in &written {
            writer.push(entry).unwrap();
        }
        let manifest = writer.finish().unwrap();
        assert_eq!(manifest.len(), 4);
        let (mut one, mut two) = (manifest.entries(), manifest.entries());
        assert_eq!(one.next().unwrap().unwrap(), written[0]);
        let all: Vec<Entry> = two.by_ref().map(Result::unwrap).collect();
        assert_eq!(all, written);
        assert_eq!(one.map(Result::unwrap).collect::<Vec<_>>(), written[1..]);
        let classes = [Class::NotAFile, Class::Sent, Class::NotAFile, Class::Matched];
        let classified: Vec<Class> = manifest.classified(&classes).map(|e| e.unwrap().1).collect();
        assert_eq!(classified, classes);
    }

    #[test]
    fn walk_order_is_component_by_component() {
        let mut paths = vec!["a.txt", "a/b", "a", "a-b/c", "a/b/c", "b", "a/a.txt", "a/a/z"];
        paths.sort_by(|a, b| walk_order(a, b));
        assert_eq!(paths, ["a", "a/a/z", "a/a.txt", "a/b", "a/b/c", "a-b/c", "a.txt", "b"]);
    }

    #[test]
    fn a_sha1_reads_back_from_hex() {
        assert_eq!(Sha1::from_hex(&"07".repeat(20)), Some(Sha1([7; 20])));
        assert_eq!(Sha1([7; 20]).hex(), "07".repeat(20));
        assert_eq!(Sha1::from_hex("07"), None);
        assert_eq!(Sha1::from_hex(&"zz".repeat(20)), None);
    }
}
