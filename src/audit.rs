//! The store audit: what the statuses say is stored, held against what the store lists. Pure: the controller
//! feeds it the expected blobs and the listing, one entry at a time, and acts on the report.
//!
//! - A blob a status names that the listing lacks, or lists with another size, is a finding for its object. A
//!   finding is a hint: the object's reconcile looks at the blob itself before it acts, so an object whose blob
//!   changed while the audit ran is left alone.
//! - A blob under an object's own prefix (`<plural>/<namespace>/<name>/<uid>/…`) whose uid belongs to no object,
//!   and older than the grace, is an orphan: what a failed removal or a crash left behind.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::store::Listed;

/// What is wrong with an object's blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The store does not have it.
    Missing,
    /// The store has it with another size than the status records.
    WrongSize { recorded: u64, found: u64 },
    /// Its bytes hash to another sha256 than the status records (found by `--verify-interval`).
    WrongDigest { recorded: String, found: String },
}

impl Finding {
    /// The reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Finding::Missing => "BlobMissing",
            Finding::WrongSize { .. } | Finding::WrongDigest { .. } => "BlobCorrupt",
        }
    }

    /// What the status says, about the blob at `key`.
    pub fn message(&self, key: &str) -> String {
        match self {
            Finding::Missing => format!("the stored bits ({key}) are gone from the store"),
            Finding::WrongSize { recorded, found } => {
                format!("the stored bits ({key}) have {found} bytes in the store, not the {recorded} recorded")
            }
            Finding::WrongDigest { recorded, found } => {
                format!("the stored bits ({key}) hash to sha256 {found} in the store, not the {recorded} recorded")
            }
        }
    }
}

/// A blob some object's status names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected<T> {
    pub size: u64,
    /// Whose it is, for the report.
    pub owner: T,
}

/// What an audit found.
#[derive(Debug, PartialEq, Eq)]
pub struct Report<T> {
    /// Objects whose blob is missing or wrong, with the blob's key.
    pub findings: Vec<(T, String, Finding)>,
    /// Keys of orphaned blobs, to remove.
    pub orphans: Vec<String>,
    /// Blobs listed, and their bytes.
    pub blobs: u64,
    pub bytes: u64,
}

/// An audit in progress.
pub struct Audit<T> {
    expected: HashMap<String, Expected<T>>,
    live: HashSet<String>,
    /// Blobs modified before this may be orphans.
    cutoff: SystemTime,
    report: Report<T>,
}

impl<T> Audit<T> {
    /// An audit of `expected` blobs (by key); `live` holds the uids of every object there is. Blobs younger than
    /// `grace` are never orphans: their object may be too new for the caller to have seen it.
    pub fn new(
        expected: HashMap<String, Expected<T>>,
        live: HashSet<String>,
        grace: Duration,
        now: SystemTime,
    ) -> Self {
        Audit {
            expected,
            live,
            cutoff: now.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH),
            report: Report { findings: Vec::new(), orphans: Vec::new(), blobs: 0, bytes: 0 },
        }
    }

    /// The next blob of the listing.
    pub fn saw(&mut self, listed: Listed) {
        self.report.blobs += 1;
        self.report.bytes += listed.size;
        if let Some(expected) = self.expected.remove(&listed.key) {
            if expected.size != listed.size {
                let finding = Finding::WrongSize { recorded: expected.size, found: listed.size };
                self.report.findings.push((expected.owner, listed.key, finding));
            }
            return;
        }
        if let Some(uid) = owner_uid(&listed.key)
            && !self.live.contains(uid)
            && listed.modified < self.cutoff
        {
            self.report.orphans.push(listed.key);
        }
    }

    /// The listing ended: what was expected and not seen is missing.
    pub fn finish(mut self) -> Report<T> {
        let mut missing: Vec<(T, String, Finding)> =
            self.expected.into_iter().map(|(key, expected)| (expected.owner, key, Finding::Missing)).collect();
        missing.sort_by(|a, b| a.1.cmp(&b.1));
        self.report.findings.extend(missing);
        self.report
    }
}

/// Feed `audit` a listing, one entry at a time as the store pages it in.
pub async fn over<T, E, S>(mut audit: Audit<T>, mut listing: S) -> Result<Audit<T>, E>
where
    S: futures::Stream<Item = Result<Listed, E>> + Unpin,
{
    use futures::StreamExt;
    while let Some(listed) = listing.next().await {
        audit.saw(listed?);
    }
    Ok(audit)
}

/// The owner uid in a blob key `<plural>/<namespace>/<name>/<uid>/<sha256>`; none for keys of another shape.
fn owner_uid(key: &str) -> Option<&str> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["packages" | "droplets", _, _, uid, _] if !uid.is_empty() => Some(uid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64, age: Duration, now: SystemTime) -> Listed {
        Listed { key: key.into(), size, modified: now - age }
    }

    #[test]
    fn blobs_are_checked_and_orphans_found() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let expected = HashMap::from([
            ("packages/ns/a/uid-a/s1".to_string(), Expected { size: 10, owner: "a" }),
            ("packages/ns/b/uid-b/s2".to_string(), Expected { size: 20, owner: "b" }),
            ("droplets/ns/c/uid-c/s3".to_string(), Expected { size: 30, owner: "c" }),
        ]);
        let live = HashSet::from(["uid-a".to_string(), "uid-b".to_string(), "uid-c".to_string(), "uid-d".into()]);
        let mut audit = Audit::new(expected, live, hour, now);
        audit.saw(listed("packages/ns/a/uid-a/s1", 10, hour, now));
        audit.saw(listed("packages/ns/b/uid-b/s2", 21, hour, now));
        // An earlier generation's blob of a live object is not an orphan.
        audit.saw(listed("packages/ns/d/uid-d/old", 5, 2 * hour, now));
        // A gone object's blob is, once older than the grace; a young one is not yet.
        audit.saw(listed("packages/ns/e/uid-e/s4", 5, 2 * hour, now));
        audit.saw(listed("droplets/ns/f/uid-f/s5", 5, Duration::from_secs(60), now));
        // Keys of other shapes are never judged.
        audit.saw(listed("packages/ns/g/s6", 5, 2 * hour, now));
        let report = audit.finish();
        assert_eq!(
            report.findings,
            vec![
                ("b", "packages/ns/b/uid-b/s2".to_string(), Finding::WrongSize { recorded: 20, found: 21 }),
                ("c", "droplets/ns/c/uid-c/s3".to_string(), Finding::Missing),
            ]
        );
        assert_eq!(report.orphans, vec!["packages/ns/e/uid-e/s4".to_string()]);
        assert_eq!((report.blobs, report.bytes), (6, 51));
        assert_eq!(report.findings[0].2.reason(), "BlobCorrupt");
        assert!(report.findings[1].2.message("k").contains("gone"));
    }
}
