//! What the last push of a directory sent, kept in the user's cache directory (`$XDG_CACHE_HOME/bitsmith/pushes`,
//! else `~/.cache/bitsmith/pushes`), one file per directory: the Package it went to, which the next push names as
//! its base so that unchanged files are not sent again, and each file's sha1 with the size, modification time and
//! inode it had when hashed, so that unchanged files are not hashed again (the quick check git and rsync make).
//!
//! The record only saves work: the API checks every file taken from the base against its sha1, and a record that
//! is missing, unreadable or from another cluster or namespace is a push without one.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::appdir::{AppFile, Sha1};

/// A file is trusted unhashed only when it was last modified this long before the push that hashed it began:
/// a file written in the same moment it was read could hold other bytes than those hashed.
const SETTLED_NS: i64 = 2_000_000_000;

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

/// A file as it was pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub sha1: Sha1,
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

/// The record of a directory's last push.
#[derive(Debug, Default)]
pub struct History {
    pub pushed: Option<Pushed>,
    pub files: HashMap<String, Recorded>,
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
        record_path(cache, root).and_then(|path| Self::read(&path).ok()).unwrap_or_default()
    }

    fn read(path: &Path) -> std::io::Result<Self> {
        let mut lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
        let header = lines.next().ok_or_else(|| std::io::Error::other("empty"))??;
        let pushed: Pushed = serde_json::from_str(&header)?;
        let mut files = HashMap::new();
        for line in lines {
            let (path, size, mtime_ns, ino, sha1): Line = serde_json::from_str(&line?)?;
            let sha1 = Sha1::from_hex(&sha1).ok_or_else(|| std::io::Error::other("a sha1 that is not one"))?;
            files.insert(path, Recorded { sha1, size, mtime_ns, ino });
        }
        Ok(History { pushed: Some(pushed), files })
    }

    /// The sha1 of `file` as recorded, if the file has not changed since: the same size, modification time and
    /// inode, and modified well before it was hashed.
    pub fn known_sha1(&self, path: &str, size: u64, mtime_ns: i64, ino: u64) -> Option<Sha1> {
        let hashed_at = self.pushed.as_ref()?.hashed_at_ns;
        let recorded = self.files.get(path)?;
        let same = (recorded.size, recorded.mtime_ns, recorded.ino) == (size, mtime_ns, ino);
        (same && mtime_ns < hashed_at - SETTLED_NS).then_some(recorded.sha1)
    }

    /// Whether the last push left `file`, as it is now, in its package.
    pub fn holds(&self, file: &AppFile) -> bool {
        self.files.get(&*file.path).is_some_and(|r| r.sha1 == file.sha1 && r.size == file.size)
    }

    /// Record that `files` of `root` went to `pushed`, replacing the record before (written aside, then renamed).
    pub fn save<'a>(
        cache: &Path,
        root: &Path,
        pushed: &Pushed,
        files: impl Iterator<Item = &'a AppFile>,
    ) -> Result<(), HistoryError> {
        let Some(path) = record_path(cache, root) else { return Ok(()) };
        let failed = |source| HistoryError { path: path.display().to_string(), source };
        let dir = path.parent().expect("a record lives in a directory");
        std::fs::create_dir_all(dir).map_err(failed)?;
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
            serde_json::to_writer(&mut out, pushed)?;
            out.write_all(b"\n")?;
            for file in files {
                let line = (&*file.path, file.size, file.mtime_ns, file.ino, file.sha1.hex());
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
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

    fn file(path: &str, sha1: u8, mtime_ns: i64) -> AppFile {
        AppFile { path: path.into(), size: 3, mode: 0o644, sha1: Sha1([sha1; 20]), mtime_ns, ino: 7 }
    }

    #[test]
    fn a_push_is_recorded_and_read_back_for_its_directory_only() {
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
        let files = [file("a.txt", 1, now - 10_000_000_000), file("dir/b c\n.txt", 2, now - 1)];
        History::save(cache.path(), app.path(), &pushed, files.iter()).unwrap();

        let history = History::load(cache.path(), app.path());
        assert_eq!(history.pushed.as_ref(), Some(&pushed));
        assert_eq!(history.files.len(), 2);
        assert!(history.holds(&files[0]) && history.holds(&files[1]));
        assert!(!history.holds(&file("a.txt", 9, 0)), "another sha1");
        assert_eq!(history.known_sha1("a.txt", 3, now - 10_000_000_000, 7), Some(Sha1([1; 20])));
        assert_eq!(history.known_sha1("a.txt", 4, now - 10_000_000_000, 7), None, "another size");
        assert_eq!(history.known_sha1("a.txt", 3, now - 9_000_000_000, 7), None, "modified since");
        assert_eq!(history.known_sha1("a.txt", 3, now - 10_000_000_000, 8), None, "replaced");
        assert_eq!(history.known_sha1("dir/b c\n.txt", 3, now - 1, 7), None, "modified as it was hashed");
        assert!(History::load(cache.path(), other.path()).pushed.is_none(), "another directory has no record");
    }
}
