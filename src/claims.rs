//! Whether an upload's claim is still held. The API replica that receives an upload renews its claim on the
//! object while the upload runs; the controller decides the claim was abandoned when the claim has not changed
//! for the claim timeout. Pure: the time is the controller's own monotonic clock, so clocks of different nodes are
//! never compared, and a controller that starts (or takes over) waits a whole timeout before it judges.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::resources::UploadClaim;

/// What the controller should do about an object under an upload's claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The claim may still be held: look again after this long.
    Live { recheck_in: Duration },
    /// The claim has not changed for the whole timeout: its holder stopped.
    Abandoned,
}

/// The claims seen, each with when it was last seen to change.
#[derive(Debug, Default)]
pub struct ClaimWatch {
    seen: HashMap<String, (Option<(String, u64)>, Instant)>,
}

impl ClaimWatch {
    /// Judge the claim on the object `uid` (`None`: PROCESSING_UPLOAD without a claim, as statuses written
    /// before claims were recorded are) at `now`.
    pub fn judge(&mut self, uid: &str, claim: Option<&UploadClaim>, now: Instant, timeout: Duration) -> Verdict {
        let observed = claim.map(|c| (c.id.clone(), c.renewals));
        match self.seen.get(uid) {
            Some((last, since)) if *last == observed => {
                let quiet = now.saturating_duration_since(*since);
                if quiet >= timeout { Verdict::Abandoned } else { Verdict::Live { recheck_in: timeout - quiet } }
            }
            _ => {
                self.seen.insert(uid.to_string(), (observed, now));
                Verdict::Live { recheck_in: timeout }
            }
        }
    }

    /// The object is no longer under a claim (or is gone): forget it.
    pub fn forget(&mut self, uid: &str) {
        self.seen.remove(uid);
    }

    /// Objects being watched.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn claim(id: &str, renewals: u64) -> UploadClaim {
        UploadClaim { holder: "api-0".into(), id: id.into(), renewals, renew_time: Time(Timestamp::UNIX_EPOCH) }
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn a_claim_that_keeps_changing_is_live() {
        let (mut watch, start) = (ClaimWatch::default(), Instant::now());
        assert_eq!(watch.judge("u", Some(&claim("a", 0)), start, TIMEOUT), Verdict::Live { recheck_in: TIMEOUT });
        let later = start + Duration::from_secs(50);
        assert_eq!(
            watch.judge("u", Some(&claim("a", 0)), later, TIMEOUT),
            Verdict::Live { recheck_in: Duration::from_secs(10) }
        );
        // Renewed just in time: the timeout starts again from when the change was seen.
        let renewed = start + Duration::from_secs(59);
        assert_eq!(watch.judge("u", Some(&claim("a", 1)), renewed, TIMEOUT), Verdict::Live { recheck_in: TIMEOUT });
        assert!(matches!(
            watch.judge("u", Some(&claim("a", 1)), start + Duration::from_secs(100), TIMEOUT),
            Verdict::Live { .. }
        ));
    }

    #[test]
    fn a_claim_unchanged_for_the_timeout_is_abandoned() {
        let (mut watch, start) = (ClaimWatch::default(), Instant::now());
        watch.judge("u", Some(&claim("a", 3)), start, TIMEOUT);
        assert_eq!(watch.judge("u", Some(&claim("a", 3)), start + TIMEOUT, TIMEOUT), Verdict::Abandoned);
        // A status without a claim (an older writer's) is judged the same way.
        watch.judge("v", None, start, TIMEOUT);
        assert_eq!(watch.judge("v", None, start + TIMEOUT, TIMEOUT), Verdict::Abandoned);
    }

    #[test]
    fn a_new_claim_or_a_new_watcher_waits_a_whole_timeout() {
        let (mut watch, start) = (ClaimWatch::default(), Instant::now());
        watch.judge("u", Some(&claim("a", 3)), start, TIMEOUT);
        let later = start + Duration::from_secs(90);
        assert_eq!(watch.judge("u", Some(&claim("b", 0)), later, TIMEOUT), Verdict::Live { recheck_in: TIMEOUT });
        watch.forget("u");
        assert!(watch.is_empty());
        assert_eq!(watch.judge("u", Some(&claim("b", 0)), later, TIMEOUT), Verdict::Live { recheck_in: TIMEOUT });
        assert_eq!(watch.len(), 1);
    }
}
