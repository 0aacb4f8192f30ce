//! An app directory as a push sees it: walked depth-first in walk order as `.cfignore` says, each file hashed
//! (sha1, on every core) unless the last push's record still vouches for it, and written to a [`Manifest`] — so
//! the walk holds one directory's names and a window of files being hashed, whatever the app's size. Symlinks are
//! not followed: a link could name anything on the pusher's disk.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};

use sha1::Digest;

use super::cfignore::{CfIgnore, CfIgnoreError};
use super::history::{History, Recorded};
use super::manifest::{Entry, Kind, Manifest, ManifestWriter, Sha1};

/// Files in flight between the walk and the manifest: enough that every hashing thread has work while a large
/// file holds the front of the window.
const WINDOW: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppDirError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: a file name that is not UTF-8")]
    NotUtf8 { path: String },
    #[error("the push's list of files: {0}")]
    Manifest(std::io::Error),
    #[error(transparent)]
    CfIgnore(#[from] CfIgnoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AppDirError + '_ {
    move |source| AppDirError::Io { path: path.display().to_string(), source }
}

/// A directory being walked: its path, its path in the app, and its entries' names not yet visited (sorted,
/// last first).
struct Level {
    full: PathBuf,
    relative: String,
    names: Vec<String>,
}

impl Level {
    fn open(full: PathBuf, relative: String) -> Result<Self, AppDirError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&full).map_err(io(&full))? {
            let name = entry.map_err(io(&full))?.file_name();
            let name = name
                .into_string()
                .map_err(|name| AppDirError::NotUtf8 { path: full.join(name).display().to_string() })?;
            names.push(name);
        }
        // A stable order: the same directory zips the same way every time, and in the record's order.
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Level { full, relative, names })
    }
}

/// An entry between the walk and the manifest.
struct InFlight {
    entry: Entry,
    /// What the last push recorded of it.
    recorded: Option<Recorded>,
    hashed: bool,
}

/// Walk `root` as `.cfignore` says, hash every file `threads` at a time except those `history` (asked in walk
/// order) vouches for, and write every entry to a manifest.
pub fn read(root: &Path, threads: usize, history: &mut History) -> Result<Manifest, AppDirError> {
    let cfignore = match std::fs::read_to_string(root.join(".cfignore")) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&root.join(".cfignore"))(e)),
    };
    let rules = CfIgnore::new(root, cfignore.as_deref())?;
    let mut manifest = ManifestWriter::new().map_err(AppDirError::Manifest)?;
    let (jobs, queue) = mpsc::sync_channel::<(u64, PathBuf)>(WINDOW);
    let (results, hashed) = mpsc::channel::<(u64, Result<Sha1, AppDirError>)>();
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let (queue, results) = (&queue, results.clone());
            scope.spawn(move || {
                let mut buffer = crate::recycle::PageBuffer::zeroed(256 << 10);
                loop {
                    let job = queue.lock().expect("the hashing queue").recv();
                    let Ok((seq, path)) = job else { return };
                    if results.send((seq, sha1_of(&path, &mut buffer))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(results);
        let mut window = Window { flight: VecDeque::with_capacity(WINDOW), first: 0, hashed, manifest: &mut manifest };
        let walked = walk(root, &rules, |entry| {
            window.make_room(WINDOW - 1)?;
            let seq = window.first + window.flight.len() as u64;
            let recorded = (entry.kind == Kind::File).then(|| history.recorded(&entry.path)).flatten();
            let mut entry = entry;
            let known = recorded.as_ref().and_then(|r| history.known_sha1(r, entry.size, entry.mtime_ns, entry.ino));
            let hashed = match (entry.kind, known) {
                (Kind::File, Some(sha1)) => {
                    entry.sha1 = sha1;
                    true
                }
                (Kind::File, None) => {
                    jobs.send((seq, root.join(&entry.path))).expect("the hashing threads outlive the walk");
                    false
                }
                _ => true,
            };
            window.flight.push_back(InFlight { entry, recorded, hashed });
            window.make_room(WINDOW)
        });
        // Without the queue, the hashing threads stop once it is empty.
        drop(jobs);
        walked?;
        window.make_room(0)
    })?;
    manifest.finish().map_err(AppDirError::Manifest)
}

/// Files being hashed, in walk order: the front goes to the manifest once hashed.
struct Window<'a> {
    flight: VecDeque<InFlight>,
    /// The sequence number of the front.
    first: u64,
    hashed: mpsc::Receiver<(u64, Result<Sha1, AppDirError>)>,
    manifest: &'a mut ManifestWriter,
}

impl Window<'_> {
    /// Write the hashed front to the manifest, waiting for hashes until at most `room` entries are in flight.
    fn make_room(&mut self, room: usize) -> Result<(), AppDirError> {
        loop {
            while self.flight.front().is_some_and(|f| f.hashed) {
                let InFlight { mut entry, recorded, .. } = self.flight.pop_front().expect("a front");
                entry.in_last_push = recorded.is_some_and(|r| (r.sha1, r.size) == (entry.sha1, entry.size));
                self.manifest.push(&entry).map_err(AppDirError::Manifest)?;
                self.first += 1;
            }
            if self.flight.len() <= room {
                return Ok(());
            }
            let (seq, sha1) = self.hashed.recv().expect("a hashing thread stopped with files queued");
            let slot = &mut self.flight[(seq - self.first) as usize];
            slot.entry.sha1 = sha1?;
            slot.hashed = true;
        }
    }
}

/// Visit every entry under `root` that `rules` leaves in, depth-first in walk order; a directory before what it
/// holds.
fn walk(
    root: &Path,
    rules: &CfIgnore,
    mut visit: impl FnMut(Entry) -> Result<(), AppDirError>,
) -> Result<(), AppDirError> {
    let mut levels = vec![Level::open(root.to_path_buf(), String::new())?];
    while let Some(level) = levels.last_mut() {
        let Some(name) = level.names.pop() else {
            levels.pop();
            continue;
        };
        let full = level.full.join(&name);
        let path = if level.relative.is_empty() { name } else { format!("{}/{name}", level.relative) };
        let meta = full.symlink_metadata().map_err(io(&full))?;
        if rules.ignores(&path, meta.is_dir()) {
            continue;
        }
        if meta.is_dir() {
            visit(Entry::other(Kind::Dir, format!("{path}/")))?;
            levels.push(Level::open(full, path)?);
        } else if meta.is_file() {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let mode = meta.permissions().mode() & 0o7777;
            let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
            visit(Entry::file(path, meta.len(), mode, mtime_ns, meta.ino()))?;
        } else {
            visit(Entry::other(Kind::Skipped, path))?;
        }
    }
    Ok(())
}

fn sha1_of(path: &Path, buffer: &mut [u8]) -> Result<Sha1, AppDirError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = sha1::Sha1::new();
    loop {
        let n = file.read(buffer).map_err(io(path))?;
        if n == 0 {
            return Ok(Sha1(hasher.finalize().into()));
        }
        hasher.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::history::Pushed;

    #[test]
    fn a_directory_is_walked_as_cfignore_says_in_walk_order_and_hashed() {
        let root = tempfile::tempdir().unwrap();
        let write = |path: &str, data: &[u8]| {
            let full = root.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, data).unwrap();
        };
        write("app.js", b"console.log(1)");
        write("lib/deep/util.js", b"");
        write("lib.txt", b"x");
        write("debug.log", b"noise");
        write(".git/config", b"[core]");
        write("manifest.yml", b"applications: []");
        write(".cfignore", b"*.log\n");
        std::fs::create_dir_all(root.path().join("empty")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("link")).unwrap();

        let listed = |manifest: &Manifest| -> Vec<(Kind, String, String, bool)> {
            let entries = manifest.entries().map(Result::unwrap);
            entries.map(|e| (e.kind, e.path, e.sha1.hex()[..4].to_string(), e.in_last_push)).collect()
        };
        let manifest = read(root.path(), 2, &mut History::default()).unwrap();
        let (file, dir, skipped) = (Kind::File, Kind::Dir, Kind::Skipped);
        let none = "0000".to_string();
        assert_eq!(
            listed(&manifest),
            [
                (file, "app.js".into(), "ccb0".into(), false),
                (dir, "empty/".into(), none.clone(), false),
                (dir, "lib/".into(), none.clone(), false),
                (dir, "lib/deep/".into(), none.clone(), false),
                (file, "lib/deep/util.js".into(), "da39".into(), false),
                (file, "lib.txt".into(), "11f6".into(), false),
                (skipped, "link".into(), none, false),
            ]
        );
        let util = manifest.entries().map(Result::unwrap).find(|e| e.path == "lib/deep/util.js").unwrap();
        assert_eq!(util.sha1.hex(), "da39a3ee5e6b4b0d3255bfef95601890afd80709", "sha1 of nothing");

        // With a record: a file it vouches for is not read again, and files it holds as they are now are marked.
        let cache = tempfile::tempdir().unwrap();
        let long_after = i64::MAX / 2;
        let pushed = Pushed {
            cluster: "c".into(),
            namespace: "n".into(),
            package: "p".into(),
            uid: "u".into(),
            sha256: String::new(),
            hashed_at_ns: long_after,
        };
        let recorded = manifest.entries().map(|e| {
            e.map(|mut e| {
                if e.path == "app.js" {
                    e.sha1 = Sha1([7; 20]);
                }
                e
            })
        });
        History::save(cache.path(), root.path(), &pushed, recorded).unwrap();
        write("lib.txt", b"y");
        let again = read(root.path(), 2, &mut History::load(cache.path(), root.path())).unwrap();
        let files: Vec<_> = listed(&again).into_iter().filter(|e| e.0 == Kind::File).collect();
        assert_eq!(
            files,
            [
                (file, "app.js".into(), "0707".into(), true),
                (file, "lib/deep/util.js".into(), "da39".into(), true),
                (file, "lib.txt".into(), "95cb".into(), false),
            ]
        );
    }

    #[test]
    fn more_files_than_the_window_keep_their_order_and_hashes() {
        let root = tempfile::tempdir().unwrap();
        for n in 0..(WINDOW * 2 + 7) {
            let dir = root.path().join(format!("d{}", n % 3));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{n}")), n.to_string()).unwrap();
        }
        let manifest = read(root.path(), 3, &mut History::default()).unwrap();
        let mut previous = String::new();
        let mut files = 0;
        for entry in manifest.entries().map(Result::unwrap) {
            assert_eq!(super::super::manifest::walk_order(&previous, &entry.path), std::cmp::Ordering::Less);
            if entry.kind == Kind::File {
                let n = entry.path.rsplit('f').next().unwrap();
                assert_eq!(entry.sha1.0, <[u8; 20]>::from(sha1::Sha1::digest(n.as_bytes())), "{}", entry.path);
                files += 1;
            }
            previous = entry.path;
        }
        assert_eq!(files, WINDOW * 2 + 7);
    }
}
