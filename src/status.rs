//! Status transitions of Packages and Droplets: what the CF state and the conditions become after each outcome.
//! Pure functions of the previous status, the outcome and the clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::conditions::{self, READY, RECONCILING, SOURCE_VERIFIED, STALLED, Status};
use crate::digest::Digests;

use crate::resources::{
    Artifact, BitsStatus, BlobRef, Checksum, ChecksumType, DropletState, PackageState, StoredDigests, UploadClaim,
};

/// The CF states a status can move through; Packages and Droplets name some of them differently.
pub trait CfState: Copy + PartialEq {
    const AWAITING_UPLOAD: Self;
    const PROCESSING_UPLOAD: Self;
    /// The state while copying another object's bits.
    const COPYING: Self;
    /// READY for a Package, STAGED for a Droplet.
    const DONE: Self;
    const FAILED: Self;
    /// Past retention: the object stays, its bits are gone. Final.
    const EXPIRED: Self;
}

impl CfState for PackageState {
    const AWAITING_UPLOAD: Self = PackageState::AwaitingUpload;
    const PROCESSING_UPLOAD: Self = PackageState::ProcessingUpload;
    const COPYING: Self = PackageState::Copying;
    const DONE: Self = PackageState::Ready;
    const FAILED: Self = PackageState::Failed;
    const EXPIRED: Self = PackageState::Expired;
}

impl CfState for DropletState {
    const AWAITING_UPLOAD: Self = DropletState::AwaitingUpload;
    const PROCESSING_UPLOAD: Self = DropletState::ProcessingUpload;
    const COPYING: Self = DropletState::ProcessingUpload;
    const DONE: Self = DropletState::Staged;
    const FAILED: Self = DropletState::Failed;
    const EXPIRED: Self = DropletState::Expired;
}

/// The recorded digests and location of stored bits.
pub fn stored_digests(digests: &Digests, blob: BlobRef) -> StoredDigests {
    StoredDigests {
        checksum: Some(Checksum { checksum_type: ChecksumType::Sha256, value: digests.sha256.clone() }),
        hash: Some(Checksum { checksum_type: ChecksumType::Sha1, value: digests.sha1.clone() }),
        digest: Some(digests.oci_digest()),
        size: Some(digests.size),
        blob: Some(blob),
    }
}

/// The bits are stored and verified: READY (STAGED).
pub fn done<S: CfState>(
    prev: &BitsStatus<S>,
    stored: StoredDigests,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.state = Some(S::DONE);
    status.artifact = artifact(prev, &stored, now);
    status.stored = stored;
    status.error = None;
    status.observed_generation = generation;
    status.upload = None;
    let size = status.stored.size.unwrap_or_default();
    conditions::upsert(
        &mut status.conditions,
        conditions::new(READY, Status::True, "Succeeded", format!("stored {size} bytes"), generation, now),
    );
    conditions::remove(&mut status.conditions, RECONCILING);
    conditions::remove(&mut status.conditions, STALLED);
    conditions::remove(&mut status.conditions, SOURCE_VERIFIED);
    status
}

/// A re-check found the source serving what it served before: the stored bits stay, and a retry pending from a
/// failed re-check is over. Equal to `prev` when nothing was pending, so that nothing is written.
pub fn source_unchanged<S: CfState>(prev: &BitsStatus<S>, generation: Option<i64>) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.error = None;
    status.observed_generation = generation;
    conditions::remove(&mut status.conditions, RECONCILING);
    conditions::remove(&mut status.conditions, STALLED);
    status
}

/// The source of a pinned object changed to bits that do not match the pin (`message` says how): the bits that
/// matched stay READY, and `SourceVerified` False says that the source no longer serves them.
pub fn source_unverified<S: CfState>(
    prev: &BitsStatus<S>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = source_unchanged(prev, generation);
    let message = format!("{message}; the source changed, and the bits that match stay");
    conditions::upsert(
        &mut status.conditions,
        conditions::new(SOURCE_VERIFIED, Status::False, "ChecksumMismatch", message, generation, now),
    );
    status
}

/// `spec.suspend`: nothing is fetched or re-checked. Stored bits stay as they are; `Reconciling` False says why
/// nothing moves, and an object without bits is not Ready for the same reason.
pub fn suspended<S: CfState>(prev: &BitsStatus<S>, generation: Option<i64>, now: Timestamp) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.observed_generation = generation;
    let message = "spec.suspend is true: the source is neither fetched nor re-checked";
    conditions::upsert(
        &mut status.conditions,
        conditions::new(RECONCILING, Status::False, "Suspended", message, generation, now),
    );
    if conditions::find(&status.conditions, READY).is_none_or(|c| c.status != "True") {
        conditions::upsert(
            &mut status.conditions,
            conditions::new(READY, Status::False, "Suspended", message, generation, now),
        );
    }
    status
}

/// The artifact of stored bits: new bits get a new update time, the same bits keep theirs. The URL names the blob
/// in its store until [`crate::links::set_links`] points it at the API.
fn artifact<S>(prev: &BitsStatus<S>, stored: &StoredDigests, now: Timestamp) -> Option<Artifact> {
    let (blob, checksum) = (stored.blob.as_ref()?, stored.checksum.as_ref()?);
    let digest = format!("sha256:{}", checksum.value);
    let unchanged = prev.artifact.as_ref().filter(|a| a.digest == digest);
    Some(Artifact {
        url: unchanged.map_or_else(|| blob_url(blob), |a| a.url.clone()),
        revision: digest.clone(),
        size: stored.size.unwrap_or_default(),
        last_update_time: unchanged.map_or(Time(now), |a| a.last_update_time.clone()),
        digest,
    })
}

/// The blob's URL in its store.
fn blob_url(blob: &BlobRef) -> String {
    let separator = if blob.store.ends_with('/') { "" } else { "/" };
    format!("{}{separator}{}", blob.store, blob.key)
}

/// Ready without bits: a docker Package, which only references an image.
pub fn done_without_bits<S: CfState>(
    prev: &BitsStatus<S>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = done(prev, StoredDigests::default(), generation, now);
    conditions::upsert(
        &mut status.conditions,
        conditions::new(READY, Status::True, "Succeeded", message, generation, now),
    );
    status
}

/// A bits object without a source waits for an upload through the API.
pub fn awaiting_upload<S: CfState>(prev: &BitsStatus<S>, generation: Option<i64>, now: Timestamp) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.state = Some(S::AWAITING_UPLOAD);
    status.error = None;
    status.observed_generation = generation;
    status.upload = None;
    conditions::upsert(
        &mut status.conditions,
        conditions::new(READY, Status::False, "AwaitingUpload", "waiting for bits to be uploaded", generation, now),
    );
    conditions::remove(&mut status.conditions, RECONCILING);
    conditions::remove(&mut status.conditions, STALLED);
    status
}

/// An upload through the API has begun: PROCESSING_UPLOAD, held by `holder` under the claim `id`.
pub fn upload_claimed<S: CfState>(
    prev: &BitsStatus<S>,
    holder: &str,
    id: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = in_progress(prev, Activity::Uploading, "receiving an upload", generation, now);
    status.upload = Some(UploadClaim { holder: holder.into(), id: id.into(), renewals: 0, renew_time: Time(now) });
    status
}

/// The upload's holder says it is still receiving bytes.
pub fn upload_renewed<S: CfState>(prev: &BitsStatus<S>, now: Timestamp) -> BitsStatus<S> {
    let mut status = prev.clone();
    if let Some(claim) = &mut status.upload {
        claim.renewals += 1;
        claim.renew_time = Time(now);
    }
    status
}

/// Why an upload's claim was given up: its holder stopped renewing it.
pub const UPLOAD_ABANDONED: &str = "UploadAbandoned";

/// An upload whose holder stopped renewing its claim (it died or lost the API server): the object awaits
/// another upload, and says what happened.
pub fn upload_abandoned<S: CfState>(prev: &BitsStatus<S>, generation: Option<i64>, now: Timestamp) -> BitsStatus<S> {
    let holder = prev.upload.as_ref().map_or("an API replica", |claim| claim.holder.as_str());
    let message = format!("the upload held by {holder} stopped renewing its claim; upload the bits again");
    let mut status = awaiting_upload(prev, generation, now);
    status.error = Some(message.clone());
    conditions::upsert(
        &mut status.conditions,
        conditions::new(READY, Status::False, UPLOAD_ABANDONED, message, generation, now),
    );
    status
}

/// What work is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// From the spec's source, by the controller.
    Fetching,
    /// Another Package's bits, inside the store.
    Copying,
    /// Bits arriving through the API.
    Uploading,
}

impl Activity {
    /// The condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Activity::Fetching => "Fetching",
            Activity::Copying => "Copying",
            Activity::Uploading => "Uploading",
        }
    }
}

/// Past retention (see [`crate::retention`]): EXPIRED, for good. The digests stay as a record of what the bits
/// were; the blob, the artifact and any error go. `Ready` is False and `Stalled` True with reason `Expired`: no
/// more progress will be made.
pub fn expired<S: CfState>(
    prev: &BitsStatus<S>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.state = Some(S::EXPIRED);
    status.stored.blob = None;
    status.artifact = None;
    status.error = None;
    status.upload = None;
    status.observed_generation = generation;
    conditions::upsert(
        &mut status.conditions,
        conditions::new(READY, Status::False, "Expired", message, generation, now),
    );
    conditions::upsert(
        &mut status.conditions,
        conditions::new(STALLED, Status::True, "Expired", message, generation, now),
    );
    conditions::remove(&mut status.conditions, RECONCILING);
    status
}

/// The stored bits are gone or wrong (`reason` BlobMissing or BlobCorrupt): the status stops naming them at once,
/// so that nothing is READY for bits that are not there. With a source (`refetch`) the object is fetched again:
/// PROCESSING_UPLOAD, Reconciling. Without one (uploaded bits cannot be made again) it is FAILED and Stalled,
/// with the reason in `error`. The digests stay as a record of what the bits were.
pub fn bits_lost<S: CfState>(
    prev: &BitsStatus<S>,
    reason: &str,
    message: &str,
    refetch: bool,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = prev.clone();
    status.stored.blob = None;
    status.artifact = None;
    status.upload = None;
    conditions::upsert(&mut status.conditions, conditions::new(READY, Status::False, reason, message, generation, now));
    if refetch {
        status.state = Some(S::PROCESSING_UPLOAD);
        status.error = None;
        let fetching = format!("{message}; fetching them again");
        conditions::upsert(
            &mut status.conditions,
            conditions::new(RECONCILING, Status::True, reason, fetching, generation, now),
        );
        conditions::remove(&mut status.conditions, STALLED);
    } else {
        status.state = Some(S::FAILED);
        status.error = Some(format!("{message}; they were uploaded, so upload them again to a new object"));
        conditions::upsert(
            &mut status.conditions,
            conditions::new(STALLED, Status::True, reason, message, generation, now),
        );
        conditions::remove(&mut status.conditions, RECONCILING);
    }
    status
}

/// Work is in flight: PROCESSING_UPLOAD, or COPYING for a copy. Bits already READY stay visible until the new
/// ones replace them, so a consumer never loses a working version.
pub fn in_progress<S: CfState>(
    prev: &BitsStatus<S>,
    activity: Activity,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = prev.clone();
    let reason = activity.reason();
    if status.state != Some(S::DONE) {
        status.state = Some(if activity == Activity::Copying { S::COPYING } else { S::PROCESSING_UPLOAD });
    }
    conditions::upsert(
        &mut status.conditions,
        conditions::new(RECONCILING, Status::True, reason, message, generation, now),
    );
    if conditions::find(&status.conditions, READY).is_none_or(|c| c.status != "True") {
        conditions::upsert(
            &mut status.conditions,
            conditions::new(READY, Status::Unknown, reason, message, generation, now),
        );
    }
    conditions::remove(&mut status.conditions, STALLED);
    status
}

/// An attempt failed. A permanent failure is FAILED and Stalled; a transient one keeps Reconciling while it
/// retries. Either way a READY object keeps its state and its bits: a failed retry never downgrades it.
pub fn failed<S: CfState>(
    prev: &BitsStatus<S>,
    reason: &str,
    message: &str,
    permanent: bool,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    let mut status = prev.clone();
    let was_done = status.state == Some(S::DONE);
    status.error = Some(message.to_string());
    status.observed_generation = generation;
    status.upload = None;
    if permanent {
        if !was_done {
            status.state = Some(S::FAILED);
        }
        conditions::upsert(
            &mut status.conditions,
            conditions::new(STALLED, Status::True, reason, message, generation, now),
        );
        conditions::remove(&mut status.conditions, RECONCILING);
    } else {
        if !was_done {
            status.state = Some(S::PROCESSING_UPLOAD);
        }
        let retrying = format!("retrying: {message}");
        conditions::upsert(
            &mut status.conditions,
            conditions::new(RECONCILING, Status::True, reason, retrying, generation, now),
        );
        conditions::remove(&mut status.conditions, STALLED);
    }
    if !was_done {
        conditions::upsert(
            &mut status.conditions,
            conditions::new(READY, Status::False, reason, message, generation, now),
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::find;
    use crate::resources::PackageStatus;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn digests() -> Digests {
        Digests { sha1: "a".repeat(40), sha256: "b".repeat(64), size: 7 }
    }

    fn blob() -> BlobRef {
        BlobRef { store: "memory://".into(), key: "k".into() }
    }

    #[test]
    fn done_sets_digests_and_ready() {
        let status: PackageStatus = done(&PackageStatus::default(), stored_digests(&digests(), blob()), Some(3), now());
        assert_eq!(status.state, Some(PackageState::Ready));
        assert_eq!(status.stored.digest.as_deref(), Some(format!("sha256:{}", "b".repeat(64)).as_str()));
        assert_eq!(status.stored.hash.as_ref().unwrap().checksum_type, ChecksumType::Sha1);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(find(&status.conditions, READY).unwrap().status, "True");
        assert!(find(&status.conditions, RECONCILING).is_none());
        let artifact = status.artifact.as_ref().unwrap();
        assert_eq!((artifact.digest.as_str(), artifact.size), (format!("sha256:{}", "b".repeat(64)).as_str(), 7));
        assert_eq!(artifact.url, "memory://k");
        let later = Timestamp::from_second(1_800_000_100).unwrap();
        let again = done(&status, stored_digests(&digests(), blob()), Some(4), later);
        assert_eq!(again.artifact, status.artifact, "the same bits keep their update time");
    }

    #[test]
    fn permanent_failure_stalls_and_transient_keeps_reconciling() {
        let base = PackageStatus::default();
        let stalled = failed(&base, "ChecksumMismatch", "bad", true, Some(1), now());
        assert_eq!(stalled.state, Some(PackageState::Failed));
        assert_eq!(find(&stalled.conditions, STALLED).unwrap().status, "True");
        assert_eq!(find(&stalled.conditions, READY).unwrap().status, "False");
        let retrying = failed(&base, "SourceUnavailable", "404", false, Some(1), now());
        assert_eq!(retrying.state, Some(PackageState::ProcessingUpload));
        assert_eq!(find(&retrying.conditions, RECONCILING).unwrap().status, "True");
        assert!(find(&retrying.conditions, STALLED).is_none());
    }

    #[test]
    fn ready_is_never_downgraded_by_a_failed_retry() {
        let ready: PackageStatus = done(&PackageStatus::default(), stored_digests(&digests(), blob()), Some(1), now());
        let after = failed(&ready, "SourceUnavailable", "500", false, Some(2), now());
        assert_eq!(after.state, Some(PackageState::Ready));
        assert_eq!(after.stored, ready.stored);
        assert_eq!(find(&after.conditions, READY).unwrap().status, "True");
        let progressing = in_progress(&ready, Activity::Fetching, "fetching generation 2", Some(2), now());
        assert_eq!(progressing.state, Some(PackageState::Ready));
    }

    #[test]
    fn an_upload_claim_is_renewed_and_ends_with_the_upload() {
        let base = PackageStatus::default();
        let claimed = upload_claimed(&base, "api-0", "c1", Some(1), now());
        assert_eq!(claimed.state, Some(PackageState::ProcessingUpload));
        let claim = claimed.upload.clone().unwrap();
        assert_eq!((claim.holder.as_str(), claim.id.as_str(), claim.renewals), ("api-0", "c1", 0));
        let renewed = upload_renewed(&claimed, now());
        assert_eq!(renewed.upload.as_ref().unwrap().renewals, 1);
        assert_ne!(renewed, claimed, "a renewal is a change the controller sees");
        let stored = done(&renewed, stored_digests(&digests(), blob()), Some(1), now());
        assert!(stored.upload.is_none(), "a finished upload holds no claim");
        assert!(failed(&renewed, "InvalidBits", "bad", true, Some(1), now()).upload.is_none());
        assert!(awaiting_upload(&renewed, Some(1), now()).upload.is_none());
    }

    #[test]
    fn an_abandoned_upload_awaits_another_and_says_whose_it_was() {
        let claimed = upload_claimed(&PackageStatus::default(), "api-0", "c1", Some(1), now());
        let abandoned = upload_abandoned(&claimed, Some(1), now());
        assert_eq!(abandoned.state, Some(PackageState::AwaitingUpload));
        assert!(abandoned.upload.is_none());
        assert!(abandoned.error.as_deref().unwrap().contains("api-0"));
        let ready = find(&abandoned.conditions, READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", UPLOAD_ABANDONED));
        assert!(find(&abandoned.conditions, RECONCILING).is_none());
    }

    #[test]
    fn droplets_finish_as_staged() {
        let status = done(&BitsStatus::<DropletState>::default(), stored_digests(&digests(), blob()), None, now());
        assert_eq!(status.state, Some(DropletState::Staged));
        let copying = in_progress(&BitsStatus::<DropletState>::default(), Activity::Copying, "", None, now());
        assert_eq!(copying.state, Some(DropletState::ProcessingUpload));
    }

    #[test]
    fn a_refused_change_keeps_the_good_bits_ready_until_new_ones_are_stored() {
        let ready: PackageStatus = done(&PackageStatus::default(), stored_digests(&digests(), blob()), Some(1), now());
        let retrying = failed(&ready, "SourceUnavailable", "503", false, Some(1), now());
        assert_eq!(source_unchanged(&ready, Some(1)), ready, "nothing pending: nothing to write");
        assert_eq!(source_unchanged(&retrying, Some(1)), ready, "an unchanged source ends a pending retry");

        let refused = source_unverified(&retrying, "checksum mismatch", Some(1), now());
        assert_eq!(refused.state, Some(PackageState::Ready));
        assert_eq!(refused.stored, ready.stored);
        assert_eq!(find(&refused.conditions, READY).unwrap().status, "True");
        let verified = find(&refused.conditions, SOURCE_VERIFIED).unwrap();
        assert_eq!((verified.status.as_str(), verified.reason.as_str()), ("False", "ChecksumMismatch"));
        assert!(find(&refused.conditions, RECONCILING).is_none());
        assert!(find(&source_unchanged(&refused, Some(1)).conditions, SOURCE_VERIFIED).is_some(), "still refused");
        let fixed = done(&refused, stored_digests(&digests(), blob()), Some(1), now());
        assert!(find(&fixed.conditions, SOURCE_VERIFIED).is_none(), "matching bits again");
    }

    #[test]
    fn suspension_says_so_and_keeps_the_bits() {
        let ready: PackageStatus = done(&PackageStatus::default(), stored_digests(&digests(), blob()), Some(1), now());
        let paused = suspended(&ready, Some(2), now());
        assert_eq!(paused.state, Some(PackageState::Ready));
        let reconciling = find(&paused.conditions, RECONCILING).unwrap();
        assert_eq!((reconciling.status.as_str(), reconciling.reason.as_str()), ("False", "Suspended"));
        assert_eq!(find(&paused.conditions, READY).unwrap().status, "True");
        let never_fetched = suspended(&PackageStatus::default(), Some(1), now());
        let ready = find(&never_fetched.conditions, READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Suspended"));
    }
}
