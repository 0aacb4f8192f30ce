//! When each object's source was last asked whether it changed (`spec.interval`), and which version of it a
//! pinned checksum refused. Pure and in memory: the time is this process's monotonic clock, so nothing is written
//! to the status for a source that did not change. A controller that starts (or takes over) asks each source once
//! at once, with the validators of the status, and keeps the interval from then on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::resources::ResolvedSource;

#[derive(Debug, Default)]
struct Entry {
    checked: Option<Instant>,
    /// What the source served when the pin refused it: asking with these validators tells whether it changed
    /// since, so refused bits are not fetched again at every interval.
    refused: Option<ResolvedSource>,
}

/// Re-checks by object uid.
#[derive(Debug, Default)]
pub struct Rechecks {
    entries: HashMap<String, Entry>,
}

impl Rechecks {
    /// How long until the source of `uid` is due for a look, every `interval`; `None` when it is due now.
    pub fn due_in(&self, uid: &str, interval: Duration, now: Instant) -> Option<Duration> {
        let checked = self.entries.get(uid)?.checked?;
        interval.checked_sub(now.saturating_duration_since(checked)).filter(|wait| !wait.is_zero())
    }

    /// The source of `uid` was asked (or fetched) at `now`.
    pub fn checked(&mut self, uid: &str, now: Instant) {
        self.entries.entry(uid.to_string()).or_default().checked = Some(now);
    }

    /// The version of the source a pin refused last, if one did since the last bits were stored.
    pub fn refused(&self, uid: &str) -> Option<&ResolvedSource> {
        self.entries.get(uid)?.refused.as_ref()
    }

    /// The pin refused what the source of `uid` serves now (`None`: the source did not say what it serves).
    pub fn refuse(&mut self, uid: &str, served: Option<ResolvedSource>) {
        self.entries.entry(uid.to_string()).or_default().refused = served;
    }

    /// New bits were stored: what was refused before is history.
    pub fn stored(&mut self, uid: &str) {
        if let Some(entry) = self.entries.get_mut(uid) {
            entry.refused = None;
        }
    }

    /// The object is gone.
    pub fn forget(&mut self, uid: &str) {
        self.entries.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_due_at_once_and_then_every_interval() {
        let mut rechecks = Rechecks::default();
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        assert_eq!(rechecks.due_in("a", minute, start), None, "never asked in this process: now");
        rechecks.checked("a", start);
        assert_eq!(rechecks.due_in("a", minute, start + Duration::from_secs(20)), Some(Duration::from_secs(40)));
        assert_eq!(rechecks.due_in("a", minute, start + minute), None);
        assert_eq!(rechecks.due_in("b", minute, start), None, "each object on its own");
        rechecks.forget("a");
        assert_eq!(rechecks.due_in("a", minute, start), None);
    }

    #[test]
    fn a_refused_version_is_remembered_until_bits_are_stored() {
        let mut rechecks = Rechecks::default();
        let served = ResolvedSource { url: "u".into(), etag: Some("\"v2\"".into()), ..Default::default() };
        rechecks.refuse("a", Some(served.clone()));
        assert_eq!(rechecks.refused("a"), Some(&served));
        rechecks.checked("a", Instant::now());
        assert_eq!(rechecks.refused("a"), Some(&served), "asking again keeps it");
        rechecks.stored("a");
        assert_eq!(rechecks.refused("a"), None);
    }
}
