//! What the last push of a directory sent, kept in the user's cache directory (`$XDG_CACHE_HOME/bitsmith/pushes`,
//! else `~/.cache/bitsmith/pushes`), one file per directory: the Package it went to, which the next push names as
//! its base so that unchanged files are not sent again, and each file's sha1 with the size, modification time and
//! inode it had when hashed, so that unchanged files are not hashed again (the quick check git and rsync make).
//!
//! The record only saves work: the API checks every file taken from the base against its sha1, and a record that
//! is missing, unreadable or from another cluster or namespace is a push without one.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::manifest::{Entry, Kind, Sha1, walk_order};

/// A file is trusted unhashed only when it was last modified this long before the push that hashed it began:
/// a file written in the same moment it was read could hold other bytes than those hashed.
const SETTLED_NS: i64 = 2_000_000_000;

/// The layout of a record: its files in walk order. A record of another layout is no record.
const FORMAT: u32 = 2;

/// Where the pushed bits went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The Kubernetes API server's URL.
    pub cluster: String,
    pub namespace: String,
    pub package: String,
    pub uid: String,
    /// The Package's sha256 once READY: a base is used only while it still holds these bits.
    pub sha256: String,
    /// When hashing began, in nanoseconds since the epoch.
    pub hashed_at_ns: i64,
}

/// The first line of a record.
#[derive(Serialize, Deserialize)]
struct Header {
    #[serde(default)]
    format: u32,
    #[serde(flatten)]
    pushed: Pushed,
}

/// A file as it was pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub sha1: Sha1,
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

/// The record of a directory's last push, read along with the walk: files are looked up in walk order, so only
/// the line at hand is in memory.
#[derive(Default)]
pub struct History {
    pub pushed: Option<Pushed>,
    lines: Option<std::io::Lines<std::io::BufReader<std::fs::File>>>,
    /// The next recorded file not yet passed by a lookup.
    next: Option<(String, Recorded)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct HistoryError {
    path: String,
    source: std::io::Error,
}

/// One line per file: `[path, size, mtime_ns, ino, sha1]`.
type Line = (String, u64, i64, u64, String);

impl History {
    /// The record of the last push of `root` in `cache` (see [`cache_dir`]), or an empty one.
    pub fn load(cache: &Path, root: &Path) -> Self {
        record_path(cache, root).and_then(|path| Self::open(&path).ok()).unwrap_or_default()
    }

    fn open(path: &Path) -> std::io::Result<Self> {
        let mut lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
        let header = lines.next().ok_or_else(|| std::io::Error::other("empty"))??;
        let header: Header = serde_json::from_str(&header)?;
        if header.format != FORMAT {
            return Err(std::io::Error::other("a record of another layout"));
        }
        let mut history = History { pushed: Some(header.pushed), lines: Some(lines), next: None };
        history.advance();
        Ok(history)
    }

    /// Read the next line; a line that cannot be read ends the record (it only saves work).
    fn advance(&mut self) {
        let parsed = self.lines.as_mut().and_then(Iterator::next).and_then(|line| {
            let (path, size, mtime_ns, ino, sha1): Line = serde_json::from_str(&line.ok()?).ok()?;
            Some((path, Recorded { sha1: Sha1::from_hex(&sha1)?, size, mtime_ns, ino }))
        });
        if parsed.is_none() {
            self.lines = None;
        }
        self.next = parsed;
    }

    /// What the last push recorded of the file at `path`. Files must be asked for in walk order: those before
    /// `path` are passed for good.
    pub fn recorded(&mut self, path: &str) -> Option<Recorded> {
        loop {
            let (next, _) = self.next.as_ref()?;
            match walk_order(next, path) {
                std::cmp::Ordering::Less => self.advance(),
                std::cmp::Ordering::Equal => {
                    let (_, recorded) = self.next.take()?;
                    self.advance();
                    return Some(recorded);
                }
                std::cmp::Ordering::Greater => return None,
            }
        }
    }

    /// The sha1 `recorded` gives a file, if the file has not changed since: the same size, modification time and
    /// inode, and modified well before it was hashed.
    pub fn known_sha1(&self, recorded: &Recorded, size: u64, mtime_ns: i64, ino: u64) -> Option<Sha1> {
        let hashed_at = self.pushed.as_ref()?.hashed_at_ns;
        let same = (recorded.size, recorded.mtime_ns, recorded.ino) == (size, mtime_ns, ino);
        (same && mtime_ns < hashed_at - SETTLED_NS).then_some(recorded.sha1)
    }

    /// Record that the files among `entries` (in walk order) of `root` went to `pushed`, replacing the record
    /// before (written aside, then renamed).
    pub fn save(
        cache: &Path,
        root: &Path,
        pushed: &Pushed,
        entries: impl Iterator<Item = std::io::Result<Entry>>,
    ) -> Result<(), HistoryError> {
        let Some(path) = record_path(cache, root) else { return Ok(()) };
        let failed = |source| HistoryError { path: path.display().to_string(), source };
        let dir = path.parent().expect("a record lives in a directory");
        std::fs::create_dir_all(dir).map_err(failed)?;
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
            serde_json::to_writer(&mut out, &Header { format: FORMAT, pushed: pushed.clone() })?;
            out.write_all(b"\n")?;
            for entry in entries {
                let file = entry?;
                if file.kind == Kind::File {
                    let line = (&file.path, file.size, file.mtime_ns, file.ino, file.sha1.hex());
                    serde_json::to_writer(&mut out, &line)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
            std::fs::rename(&partial, &path)
        };
        write().map_err(|source| {
            let _ = std::fs::remove_file(&partial);
            failed(source)
        })?;
        Ok(())
    }
}

/// Where records are kept: `$XDG_CACHE_HOME/bitsmith/pushes`, else `~/.cache/bitsmith/pushes`; none without
/// either variable.
pub fn cache_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|home| PathBuf::from(home).join(".cache"))
    })?;
    Some(cache.join("bitsmith").join("pushes"))
}

/// The record of `root`'s pushes: named by the sha256 of its canonical path.
fn record_path(cache: &Path, root: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(root).ok()?;
    Some(cache.join(crate::digest::to_hex(&sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, sha1: u8, mtime_ns: i64) -> Entry {
        let mut entry = Entry::file(path.into(), 3, 0o644, mtime_ns, 7);
        entry.sha1 = Sha1([sha1; 20]);
        entry
    }

    #[test]
    fn a_push_is_recorded_and_read_back_in_walk_order_for_its_directory_only() {
        let cache = tempfile::tempdir().unwrap();
        let app = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let now = 100_000_000_000i64;
        let pushed = Pushed {
            cluster: "https://127.0.0.1:6443".into(),
            namespace: "team".into(),
            package: "web".into(),
            uid: "u-1".into(),
            sha256: "ab".repeat(32),
            hashed_at_ns: now,
        };
        let entries = [
            file("a/b", 1, now - 10_000_000_000),
            Entry::other(Kind::Dir, "a/".into()),
            file("a.txt", 2, now - 1),
            file("dir/b c\n.txt", 3, now - 10_000_000_000),
            file("z", 4, now - 10_000_000_000),
        ];
        History::save(cache.path(), app.path(), &pushed, entries.iter().cloned().map(Ok)).unwrap();

        let mut history = History::load(cache.path(), app.path());
        assert_eq!(history.pushed.as_ref(), Some(&pushed));
        let recorded = history.recorded("a/b").unwrap();
        assert_eq!(recorded, Recorded { sha1: Sha1([1; 20]), size: 3, mtime_ns: now - 10_000_000_000, ino: 7 });
        assert_eq!(history.known_sha1(&recorded, 3, now - 10_000_000_000, 7), Some(Sha1([1; 20])));
        assert_eq!(history.known_sha1(&recorded, 4, now - 10_000_000_000, 7), None, "another size");
        assert_eq!(history.known_sha1(&recorded, 3, now - 9_000_000_000, 7), None, "modified since");
        assert_eq!(history.known_sha1(&recorded, 3, now - 10_000_000_000, 8), None, "replaced");
        assert_eq!(history.recorded("a/"), None, "directories are not recorded");
        let modified_as_hashed = history.recorded("a.txt").unwrap();
        assert_eq!(history.known_sha1(&modified_as_hashed, 3, now - 1, 7), None, "modified as it was hashed");
        assert_eq!(history.recorded("b"), None, "not recorded: the lookup passes nothing it should not");
        assert_eq!(history.recorded("dir/b c\n.txt").map(|r| r.sha1), Some(Sha1([3; 20])));
        assert_eq!(history.recorded("z").map(|r| r.sha1), Some(Sha1([4; 20])));
        assert_eq!(history.recorded("zz"), None);
        assert!(History::load(cache.path(), other.path()).pushed.is_none(), "another directory has no record");

        // A record of the earlier layout (files in plain string order) is no record.
        let path = record_path(cache.path(), app.path()).unwrap();
        let old = format!("{}\n", serde_json::to_string(&pushed).unwrap());
        std::fs::write(&path, old).unwrap();
        assert!(History::load(cache.path(), app.path()).pushed.is_none());
    }
}
