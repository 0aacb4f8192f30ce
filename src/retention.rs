//! Retention, by Cloud Controller's rules: of the Packages (Droplets) of one app in a namespace, the newest few
//! that are done (READY or STAGED) or FAILED are kept and older ones expire; an object awaiting an upload for too
//! long expires too. Expiry is final: the object stays (so GitOps does not fight over it) but loses its bits.
//! Pure: the reconciler gathers the siblings and acts on the verdict.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// The annotation that exempts an object from expiry.
pub const RETAIN_ANNOTATION: &str = "bitsmith.dev/retain";

/// How many of an app's objects are kept, and how long an upload is awaited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Done or failed objects kept per app (Cloud Controller's `max_retained_packages_per_app`).
    pub keep: usize,
    /// An object awaiting an upload longer than this expires; never when `None`.
    pub awaiting_upload: Option<Duration>,
}

impl Default for Retention {
    /// Cloud Controller's default: five per app; uploads are awaited for ever.
    fn default() -> Self {
        Retention { keep: 5, awaiting_upload: None }
    }
}

/// Where an object stands, as far as retention is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// READY / STAGED, or FAILED: counted against the app's limit.
    Finished,
    /// AWAITING_UPLOAD: expires by age alone.
    AwaitingUpload,
    /// Anything else (being fetched or uploaded, or expired already): left alone.
    Other,
}

/// One object of an app, as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub created: Timestamp,
    pub stage: Stage,
    /// Exempt (`bitsmith.dev/retain: "true"`): never expires, and does not count against the limit.
    pub retained: bool,
}

/// Why an object expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `newer` finished objects of the app are newer, and only `keep` are kept.
    Superseded { newer: usize, keep: usize },
    /// It awaited an upload for longer than the limit.
    UploadNeverCame { after: Duration },
}

impl Expiry {
    /// What the status and the Event say.
    pub fn message(&self, noun: &str, app: &str) -> String {
        match self {
            Expiry::Superseded { newer, keep } => format!(
                "expired: {newer} newer {noun}s of app {app:?} are finished, and {keep} are kept per app; its bits were removed"
            ),
            Expiry::UploadNeverCame { after } => {
                format!("expired: no upload came within {} of its creation", humantime::format_duration(*after))
            }
        }
    }
}

/// Whether `member`, one of `app` (which includes it), expires now.
pub fn judge(member: &Member<'_>, app: &[Member<'_>], retention: Retention, now: Timestamp) -> Option<Expiry> {
    if member.retained {
        return None;
    }
    match member.stage {
        Stage::Finished => {
            let newer = app
                .iter()
                .filter(|other| other.stage == Stage::Finished && !other.retained && newer_than(other, member))
                .count();
            (newer >= retention.keep).then_some(Expiry::Superseded { newer, keep: retention.keep })
        }
        Stage::AwaitingUpload => {
            let after = retention.awaiting_upload?;
            (age(member, now) >= after).then_some(Expiry::UploadNeverCame { after })
        }
        Stage::Other => None,
    }
}

/// How long until `member`, awaiting an upload, expires by age; `None` when it never does.
pub fn awaiting_expires_in(member: &Member<'_>, retention: Retention, now: Timestamp) -> Option<Duration> {
    let after = retention.awaiting_upload?;
    (member.stage == Stage::AwaitingUpload && !member.retained).then(|| after.saturating_sub(age(member, now)))
}

/// The finished members of `app` past the limit: those that expire when judged now.
pub fn superseded<'a>(app: &'a [Member<'a>], retention: Retention) -> Vec<&'a str> {
    let mut finished: Vec<&Member<'a>> = app.iter().filter(|m| m.stage == Stage::Finished && !m.retained).collect();
    finished.sort_by_key(|m| std::cmp::Reverse((m.created, m.name)));
    finished.into_iter().skip(retention.keep).map(|m| m.name).collect()
}

/// Whether `a` is newer than `b`: created later, or at the same time with a later name.
fn newer_than(a: &Member<'_>, b: &Member<'_>) -> bool {
    (a.created, a.name) > (b.created, b.name)
}

fn age(member: &Member<'_>, now: Timestamp) -> Duration {
    now.duration_since(member.created).unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn finished(name: &str, created: i64) -> Member<'_> {
        Member { name, created: at(created), stage: Stage::Finished, retained: false }
    }

    fn expired_of<'a>(app: &'a [Member<'a>], retention: Retention) -> Vec<&'a str> {
        app.iter().filter(|m| judge(m, app, retention, at(10_000)).is_some()).map(|m| m.name).collect()
    }

    #[test]
    fn the_newest_are_kept_and_older_ones_expire() {
        let app: Vec<Member> = (0..7).map(|i| finished(["a", "b", "c", "d", "e", "f", "g"][i], i as i64)).collect();
        assert_eq!(expired_of(&app, Retention::default()), vec!["a", "b"]);
        assert_eq!(judge(&app[1], &app, Retention::default(), at(0)), Some(Expiry::Superseded { newer: 5, keep: 5 }));
        assert_eq!(expired_of(&app, Retention { keep: 7, ..Default::default() }), Vec::<&str>::new());
    }

    #[test]
    fn ties_in_creation_time_go_by_name() {
        let app = vec![finished("b", 5), finished("a", 5), finished("c", 5)];
        assert_eq!(expired_of(&app, Retention { keep: 2, ..Default::default() }), vec!["a"]);
    }

    #[test]
    fn retained_objects_neither_expire_nor_count() {
        let mut app: Vec<Member> = (0..7).map(|i| finished(["a", "b", "c", "d", "e", "f", "g"][i], i as i64)).collect();
        app[0].retained = true;
        app[6].retained = true;
        // Of the five not retained (b..f), all are kept.
        assert_eq!(expired_of(&app, Retention::default()), Vec::<&str>::new());
        app[5].retained = false;
        app.push(finished("h", 10));
        assert_eq!(expired_of(&app, Retention::default()), vec!["b"]);
    }

    #[test]
    fn objects_in_flight_are_left_alone_and_do_not_count() {
        let mut app: Vec<Member> = (0..6).map(|i| finished(["a", "b", "c", "d", "e", "f"][i], i as i64)).collect();
        app[5].stage = Stage::Other;
        assert_eq!(expired_of(&app, Retention::default()), Vec::<&str>::new());
        app[5].stage = Stage::Finished;
        assert_eq!(expired_of(&app, Retention::default()), vec!["a"]);
    }

    #[test]
    fn an_upload_awaited_too_long_expires() {
        let waiting = Member { name: "w", created: at(0), stage: Stage::AwaitingUpload, retained: false };
        let app = [waiting.clone()];
        assert_eq!(judge(&waiting, &app, Retention::default(), at(1_000_000)), None, "off by default");
        let retention = Retention { keep: 5, awaiting_upload: Some(Duration::from_secs(3600)) };
        assert_eq!(judge(&waiting, &app, retention, at(3599)), None);
        assert_eq!(awaiting_expires_in(&waiting, retention, at(3599)), Some(Duration::from_secs(1)));
        assert_eq!(
            judge(&waiting, &app, retention, at(3600)),
            Some(Expiry::UploadNeverCame { after: Duration::from_secs(3600) })
        );
        let kept = Member { retained: true, ..waiting };
        assert_eq!(judge(&kept, std::slice::from_ref(&kept), retention, at(7200)), None);
        assert_eq!(awaiting_expires_in(&kept, retention, at(0)), None);
    }

    #[test]
    fn the_superseded_are_those_judge_expires() {
        let mut app: Vec<Member> =
            (0..8).map(|i| finished(["a", "b", "c", "d", "e", "f", "g", "h"][i], i as i64)).collect();
        app[7].stage = Stage::Other;
        app[0].retained = true;
        assert_eq!(superseded(&app, Retention::default()), vec!["b"]);
        for retention in [Retention::default(), Retention { keep: 2, ..Default::default() }] {
            let judged: Vec<&str> =
                app.iter().filter(|m| judge(m, &app, retention, at(0)).is_some()).map(|m| m.name).collect();
            let mut superseded = superseded(&app, retention);
            superseded.sort();
            assert_eq!(superseded, judged);
        }
    }
}
