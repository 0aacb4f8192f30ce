//! How the operator's watches come back after the API server was away.
//!
//! kube-runtime's default waits up to 30 s between attempts, and a watch that resumes after a restart is often
//! answered 410 Expired, which waits again before it relists: after a control-plane restart the controller and
//! the API's guid index could stay blind for a minute, and the API would answer 404 for Packages that exist. A
//! handful of watches per replica trying every few seconds cost the API server nothing, so ours wait at most 5 s.

use std::time::Duration;

use kube::runtime::watcher::ExponentialBackoff;

/// The longest wait between two attempts of a failing watch.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// The retry policy of every watch: from 250 ms doubling up to [`MAX_DELAY`], and reset by the first event that
/// arrives. Jitter (a random part of up to the delay itself, so that replicas do not retry in step) is included
/// in the bound.
pub fn backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(125))
        .with_max_delay(MAX_DELAY / 2)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_stay_bounded() {
        let waits: Vec<Duration> = backoff().take(12).collect();
        assert_eq!(waits.len(), 12, "a watch never gives up");
        assert!(waits[0] <= Duration::from_millis(250), "first retry is quick: {waits:?}");
        assert!(waits.iter().all(|w| *w <= MAX_DELAY), "{waits:?}");
        assert!(waits[11] >= MAX_DELAY / 2, "the waits grow to half the bound and more: {waits:?}");
    }
}
