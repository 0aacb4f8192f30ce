//! An app directory as a push sees it: the files and directories `.cfignore` leaves in, each file with its size,
//! mode and sha1 (hashed on every core), and what was skipped. Symlinks are not followed: a link could name
//! anything on the pusher's disk.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use sha1::Digest;

use super::cfignore::{CfIgnore, CfIgnoreError};

/// One file to push. Kept small: a push holds one for every file of the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppFile {
    /// `/`-separated, relative to the app's root; shared with the zip's directory.
    pub path: Arc<str>,
    pub size: u64,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    pub sha1: Sha1,
    /// Last modification, in nanoseconds since the epoch, and the inode: with the size, what tells that a file
    /// has not changed since it was last hashed.
    pub mtime_ns: i64,
    pub ino: u64,
}

/// What a push of a directory takes.
#[derive(Debug, Default)]
pub struct AppDir {
    pub files: Vec<AppFile>,
    /// Directories, `/`-separated and ending in `/`, parents first; empty ones are kept too.
    pub dirs: Vec<String>,
    /// Symlinks and other things that are not files or directories, left out.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppDirError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: a file name that is not UTF-8")]
    NotUtf8 { path: String },
    #[error(transparent)]
    CfIgnore(#[from] CfIgnoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AppDirError + '_ {
    move |source| AppDirError::Io { path: path.display().to_string(), source }
}

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

impl AppDir {
    /// Walk `root` as `.cfignore` says, then hash every file, `threads` at a time, except those whose sha1
    /// `known` gives (by path, size, modification time and inode).
    pub fn read(
        root: &Path,
        threads: usize,
        known: impl Fn(&str, u64, i64, u64) -> Option<Sha1>,
    ) -> Result<Self, AppDirError> {
        let cfignore = match std::fs::read_to_string(root.join(".cfignore")) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&root.join(".cfignore"))(e)),
        };
        let rules = CfIgnore::new(root, cfignore.as_deref())?;
        let mut dir = AppDir::default();
        let mut pending = vec![(root.to_path_buf(), String::new())];
        while let Some((full, relative)) = pending.pop() {
            let mut entries =
                std::fs::read_dir(&full).map_err(io(&full))?.collect::<Result<Vec<_>, _>>().map_err(io(&full))?;
            // A stable order: the same directory zips the same way every time.
            entries.sort_by_key(|e| e.file_name());
            for entry in entries.iter().rev() {
                let name = entry.file_name();
                let name =
                    name.to_str().ok_or_else(|| AppDirError::NotUtf8 { path: entry.path().display().to_string() })?;
                let path = if relative.is_empty() { name.to_string() } else { format!("{relative}/{name}") };
                let meta = entry.path().symlink_metadata().map_err(io(&entry.path()))?;
                if rules.ignores(&path, meta.is_dir()) {
                    continue;
                }
                if meta.is_dir() {
                    pending.push((entry.path(), path));
                } else if meta.is_file() {
                    use std::os::unix::fs::{MetadataExt, PermissionsExt};
                    let mode = meta.permissions().mode() & 0o7777;
                    let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
                    let (size, ino) = (meta.len(), meta.ino());
                    dir.files.push(AppFile { path: path.into(), size, mode, sha1: Sha1::default(), mtime_ns, ino });
                } else {
                    dir.skipped.push(path);
                }
            }
            if !relative.is_empty() {
                dir.dirs.push(format!("{relative}/"));
            }
        }
        dir.files.sort_by(|a, b| a.path.cmp(&b.path));
        dir.dirs.sort();
        let hashed: Vec<bool> = dir
            .files
            .iter_mut()
            .map(|file| known(&file.path, file.size, file.mtime_ns, file.ino).map(|sha1| file.sha1 = sha1).is_some())
            .collect();
        hash_all(root, &mut dir.files, &hashed, threads)?;
        Ok(dir)
    }

    /// Bytes in all files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Fill in the sha1 of every file not `hashed` yet, `threads` files at a time.
fn hash_all(root: &Path, files: &mut [AppFile], hashed: &[bool], threads: usize) -> Result<(), AppDirError> {
    let next = AtomicUsize::new(0);
    let hashes: Vec<std::sync::OnceLock<Sha1>> = files.iter().map(|_| Default::default()).collect();
    let files_ref: &[AppFile] = files;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(), AppDirError> {
                    let mut buffer = vec![0u8; 256 << 10];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files_ref.get(i) else { return Ok(()) };
                        if !hashed[i] {
                            let _ = hashes[i].set(sha1_of(&root.join(&*file.path), &mut buffer)?);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a hashing thread panicked"))
    })?;
    for (file, hash) in files.iter_mut().zip(hashes) {
        if let Some(hash) = hash.into_inner() {
            file.sha1 = hash;
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

    #[test]
    fn a_directory_is_walked_as_cfignore_says_and_hashed() {
        let root = tempfile::tempdir().unwrap();
        let write = |path: &str, data: &[u8]| {
            let full = root.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, data).unwrap();
        };
        write("app.js", b"console.log(1)");
        write("lib/deep/util.js", b"");
        write("debug.log", b"noise");
        write(".git/config", b"[core]");
        write("manifest.yml", b"applications: []");
        write(".cfignore", b"*.log\n");
        std::fs::create_dir_all(root.path().join("empty")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("link")).unwrap();

        let dir = AppDir::read(root.path(), 2, |_, _, _, _| None).unwrap();
        let paths: Vec<_> = dir.files.iter().map(|f| &*f.path).collect();
        assert_eq!(paths, ["app.js", "lib/deep/util.js"]);
        assert_eq!(dir.dirs, ["empty/", "lib/", "lib/deep/"]);
        assert_eq!(dir.skipped, ["link"]);
        assert_eq!(dir.files[1].sha1.hex(), "da39a3ee5e6b4b0d3255bfef95601890afd80709", "sha1 of nothing");
        assert_eq!(dir.files[0].size, 14);
        assert_eq!(dir.total_size(), 14);

        // A file whose sha1 is known is not read again.
        let known =
            AppDir::read(root.path(), 2, |path, size, _, _| (path == "app.js" && size == 14).then_some(Sha1([7; 20])));
        let sha1s: Vec<_> = known.unwrap().files.into_iter().map(|f| f.sha1.hex()).collect();
        assert_eq!(sha1s, ["07".repeat(20).as_str(), "da39a3ee5e6b4b0d3255bfef95601890afd80709"]);
        assert_eq!(Sha1::from_hex(&"07".repeat(20)), Some(Sha1([7; 20])));
        assert_eq!(Sha1::from_hex("07"), None);
        assert_eq!(Sha1::from_hex(&"zz".repeat(20)), None);
    }
}
