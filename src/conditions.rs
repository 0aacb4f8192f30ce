//! Kubernetes conditions with their kstatus meaning: `Ready`, `Reconciling` (work in flight) and `Stalled`
//! (retrying cannot help); and `SourceVerified`, present while a pinned source serves bits that do not match.
//! Pure functions; the caller supplies the clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
/// False while the source of an object with `spec.checksum` and `spec.interval` serves changed bits that do
/// not match the pin; the last good bits stay READY meanwhile.
pub const SOURCE_VERIFIED: &str = "SourceVerified";

/// A condition's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Build a condition. An empty message becomes the reason: Kubernetes 1.20 turns an empty string in a custom
/// resource into null and then refuses it, so a condition must always say something.
pub fn new(
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let message = message.into();
    Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message: if message.is_empty() { reason.to_string() } else { message },
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Put `condition` in place of the one of its type. The transition time is kept when the status did not change,
/// as the Kubernetes API conventions ask.
pub fn upsert(conditions: &mut Vec<Condition>, mut condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

/// Remove the condition of `type_`, if any.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The condition of `type_`, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn messages_are_never_empty() {
        assert_eq!(new(READY, Status::True, "Succeeded", "", None, at(1)).message, "Succeeded");
        assert_eq!(new(READY, Status::True, "Succeeded", "done", None, at(1)).message, "done");
    }

    #[test]
    fn upsert_keeps_transition_time_while_status_holds() {
        let mut conditions = vec![new(READY, Status::False, "Fetching", "", Some(1), at(10))];
        upsert(&mut conditions, new(READY, Status::False, "Retrying", "again", Some(1), at(20)));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason, "Retrying");
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        upsert(&mut conditions, new(READY, Status::True, "Succeeded", "", Some(1), at(30)));
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
        upsert(&mut conditions, new(STALLED, Status::True, "X", "", Some(1), at(40)));
        assert_eq!(conditions.len(), 2);
        remove(&mut conditions, STALLED);
        assert!(find(&conditions, STALLED).is_none());
        assert_eq!(find(&conditions, READY).unwrap().status, "True");
    }
}
