//! What to do with a Package or Droplet, decided from the object alone. Pure: `bitsmith fetch` follows it
//! today, and the reconciler's decisions are the same ones.

use crate::conditions::{READY, RECONCILING, STALLED, find};
use crate::resources::{BitsObject, Droplet, Package, PackageType, Source};
use crate::status::CfState;
use crate::validate::{self, SpecError};

/// The next step for an object.
#[derive(Debug, PartialEq)]
pub enum Plan<'a> {
    /// The spec is invalid: FAILED and Stalled until the spec changes.
    Invalid(SpecError),
    /// Nothing to fetch: a docker Package is READY once its image reference is valid.
    ReadyWithoutBits { message: String },
    /// No source: wait for an upload through the API.
    AwaitUpload,
    /// An upload through the API holds the object (PROCESSING_UPLOAD): leave it to the upload while its claim
    /// is renewed, and return the object to AWAITING_UPLOAD once it is not.
    UploadInProgress,
    /// The bits of the current generation are stored already; or the object EXPIRED, which is final.
    UpToDate,
    /// Fetch the bits from this source.
    Fetch(&'a Source),
    /// The bits of the current generation are stored, and `spec.interval` asks to look whether the source
    /// changed every `interval`.
    Recheck { source: &'a Source, interval: std::time::Duration },
    /// `spec.suspend`: leave the source alone.
    Suspended,
}

/// Kind-specific rules: validation, and whether an object has bits at all.
pub trait Planned: BitsObject {
    fn validate(&self) -> Result<(), SpecError>;
    /// For objects that are ready without bits (docker Packages), the message that says so.
    fn ready_without_bits(&self) -> Option<String>;
}

impl Planned for Package {
    fn validate(&self) -> Result<(), SpecError> {
        validate::package_spec(&self.spec)
    }
    fn ready_without_bits(&self) -> Option<String> {
        match (&self.spec.package_type, &self.spec.image) {
            (PackageType::Docker, Some(image)) => Some(format!("image {}", image.reference)),
            _ => None,
        }
    }
}

impl Planned for Droplet {
    fn validate(&self) -> Result<(), SpecError> {
        validate::droplet_spec(&self.spec)
    }
    fn ready_without_bits(&self) -> Option<String> {
        None
    }
}

/// Decide the next step for `object`.
pub fn plan<O: Planned>(object: &O) -> Plan<'_>
where
    O::State: CfState,
{
    if object.bits_status().and_then(|s| s.state) == Some(O::State::EXPIRED) {
        return Plan::UpToDate;
    }
    if let Err(e) = object.validate() {
        return Plan::Invalid(e);
    }
    if let Some(message) = object.ready_without_bits() {
        return Plan::ReadyWithoutBits { message };
    }
    let Some(source) = object.source() else {
        // Suspension is about sources; an object without one takes uploads as ever.
        // Without a source the bits come through the API, which takes the state on from AWAITING_UPLOAD.
        let status = object.bits_status();
        return match status.and_then(|s| s.state) {
            None => Plan::AwaitUpload,
            // Awaiting already, perhaps saying why the last upload did not finish: leave it as it is.
            Some(state) if state == O::State::AWAITING_UPLOAD => {
                if status.and_then(|s| s.observed_generation) == object.meta().generation {
                    Plan::UpToDate
                } else {
                    Plan::AwaitUpload
                }
            }
            Some(state) if state == O::State::PROCESSING_UPLOAD => Plan::UploadInProgress,
            Some(_) => Plan::UpToDate,
        };
    };
    if object.refresh().suspend {
        return Plan::Suspended;
    }
    // A READY object whose newer generation failed keeps its old bits and state, so READY alone does not say
    // the current generation is stored: a pending retry (Reconciling) or a stalled attempt (Stalled) says not.
    let done_for_this_generation = object.bits_status().is_some_and(|s| {
        s.state == Some(O::State::DONE)
            && s.stored.blob.is_some()
            && s.observed_generation == object.meta().generation
            && ![RECONCILING, STALLED].iter().any(|t| find(&s.conditions, t).is_some_and(|c| c.status == "True"))
    });
    match object.recheck_interval() {
        _ if !done_for_this_generation => Plan::Fetch(source),
        Some(interval) => Plan::Recheck { source, interval },
        None => Plan::UpToDate,
    }
}

/// Whether the stored bits are the current generation's: READY (STAGED) with a blob, and `Ready` True for this
/// generation. A failed attempt at a newer generation leaves READY and `Ready` as they were, so the generation of
/// `Ready` is the one the bits were stored for. Only then may the source be asked whether it changed since.
pub fn holds_current_bits<O: Planned>(object: &O) -> bool
where
    O::State: CfState,
{
    object.bits_status().is_some_and(|s| {
        s.state == Some(O::State::DONE)
            && s.stored.blob.is_some()
            && find(&s.conditions, READY)
                .is_some_and(|c| c.status == "True" && c.observed_generation == object.meta().generation)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{BitsStatus, BlobRef, HttpSource, ImageSpec, PackageSpec, PackageState, StoredDigests};
    use crate::status;
    use k8s_openapi::jiff::Timestamp;

    fn package(source: Option<Source>) -> Package {
        let mut p = Package::new("p", PackageSpec::bits(source));
        p.metadata.generation = Some(2);
        p
    }

    fn http() -> Source {
        Source {
            http: Some(HttpSource { url: "https://example.com/a.zip".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(plan(&package(None)), Plan::AwaitUpload);
        let fetching = package(Some(http()));
        assert!(matches!(plan(&fetching), Plan::Fetch(_)));
        assert!(matches!(plan(&package(Some(Source::default()))), Plan::Invalid(_)));

        let mut docker = package(None);
        docker.spec.package_type = PackageType::Docker;
        docker.spec.image = Some(ImageSpec { reference: "nginx:1".into(), pull_secret_ref: None });
        assert_eq!(plan(&docker), Plan::ReadyWithoutBits { message: "image nginx:1".into() });
    }

    #[test]
    fn a_ready_object_is_fetched_again_only_for_a_new_generation() {
        let mut ready = package(Some(http()));
        ready.status = Some(BitsStatus {
            state: Some(PackageState::Ready),
            stored: StoredDigests {
                blob: Some(BlobRef { store: "memory://".into(), key: "k".into() }),
                ..Default::default()
            },
            observed_generation: Some(2),
            ..Default::default()
        });
        assert_eq!(plan(&ready), Plan::UpToDate);
        ready.metadata.generation = Some(3);
        assert!(matches!(plan(&ready), Plan::Fetch(_)));
    }

    #[test]
    fn an_upload_in_progress_or_done_is_left_to_the_api() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut uploaded = package(None);
        uploaded.status = Some(status::awaiting_upload(&Default::default(), Some(1), now));
        assert_eq!(plan(&uploaded), Plan::AwaitUpload, "a new generation awaits anew");
        uploaded.status = Some(status::awaiting_upload(&Default::default(), Some(2), now));
        assert_eq!(plan(&uploaded), Plan::UpToDate, "awaiting already, with what it says of the last upload");
        uploaded.status = Some(status::in_progress(
            uploaded.status.as_ref().unwrap(),
            status::Activity::Uploading,
            "up",
            Some(2),
            now,
        ));
        assert_eq!(plan(&uploaded), Plan::UploadInProgress, "the controller watches the upload's claim");
        uploaded.status = Some(status::done(&Default::default(), Default::default(), Some(2), now));
        assert_eq!(plan(&uploaded), Plan::UpToDate);
    }

    #[test]
    fn a_failed_attempt_at_a_new_generation_is_not_mistaken_for_its_ready_bits() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let stored =
            StoredDigests { blob: Some(BlobRef { store: "memory://".into(), key: "k".into() }), ..Default::default() };
        let mut ready = package(Some(http()));
        ready.status = Some(status::done(&Default::default(), stored, Some(1), now));
        // Generation 2 failed transiently: the status stays READY with generation 1's bits, and observes 2.
        let retrying = status::failed(ready.status.as_ref().unwrap(), "SourceUnavailable", "503", false, Some(2), now);
        ready.status = Some(retrying);
        assert!(matches!(plan(&ready), Plan::Fetch(_)), "the retry must fetch");
        let stalled = status::failed(ready.status.as_ref().unwrap(), "ChecksumMismatch", "bad", true, Some(2), now);
        ready.status = Some(stalled);
        assert!(matches!(plan(&ready), Plan::Fetch(_)), "a new trigger tries a stalled generation again");
    }

    #[test]
    fn an_interval_rechecks_current_bits_and_suspension_stops_everything() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let stored =
            StoredDigests { blob: Some(BlobRef { store: "memory://".into(), key: "k".into() }), ..Default::default() };
        let mut watched = package(Some(http()));
        watched.spec.refresh.interval = Some("10m".into());
        assert!(matches!(plan(&watched), Plan::Fetch(_)), "nothing stored yet");
        assert!(!holds_current_bits(&watched));
        watched.status = Some(status::done(&Default::default(), stored, Some(2), now));
        assert!(
            matches!(plan(&watched), Plan::Recheck { interval, .. } if interval.as_secs() == 600),
            "{:?}",
            plan(&watched)
        );
        assert!(holds_current_bits(&watched));

        // A newer generation failing keeps READY, but its bits are not the new generation's.
        watched.metadata.generation = Some(3);
        let failing = status::failed(watched.status.as_ref().unwrap(), "SourceUnavailable", "503", false, Some(3), now);
        watched.status = Some(failing);
        assert!(matches!(plan(&watched), Plan::Fetch(_)));
        assert!(!holds_current_bits(&watched), "a retry of generation 3 must not ask with generation 2's validators");

        watched.spec.refresh.suspend = true;
        assert_eq!(plan(&watched), Plan::Suspended);
        let mut upload = package(None);
        upload.spec.refresh.suspend = true;
        assert_eq!(plan(&upload), Plan::AwaitUpload, "suspension is about sources");
    }
}
