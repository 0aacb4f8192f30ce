//! The custom resources bitsmith serves: `Package` and `Droplet` (group `bitsmith.dev`, version `v1alpha1`).
//!
//! Doc comments on these types become the descriptions in the generated CRD schema, so they are written for
//! the people who read `kubectl explain`.

mod droplet;
pub mod duration;
mod package;
mod shared;

pub use droplet::{Droplet, DropletSpec, DropletState, DropletStatus, Lifecycle, LifecycleType, PackageRef};
pub use package::{AppRef, ImageSpec, Package, PackageSpec, PackageState, PackageStatus, PackageType};
pub use shared::{
    Artifact, BitsStatus, BlobRef, Checksum, ChecksumType, Header, HttpSource, Link, Links, ObjectStoreSource,
    PackageSourceRef, REQUESTED_AT_ANNOTATION, Refresh, ResolvedSource, SecretRef, Source, SourceKind, StoredDigests,
    UploadClaim,
};

/// The API group of every bitsmith resource.
pub const GROUP: &str = "bitsmith.dev";
/// The API version of every bitsmith resource.
pub const VERSION: &str = "v1alpha1";

/// How long one fetch may take when `spec.timeout` does not say.
pub const DEFAULT_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A duration as `spec.timeout` takes it: whole hours, minutes, seconds or milliseconds, e.g. `10m`, `1h30m`, `90s`.
pub const DURATION_PATTERN: &str = "^([0-9]+(h|m|s|ms))+$";

/// A duration of at least a minute in `h`, `m` and `s` parts (in that order), as `spec.interval` takes it: a
/// non-zero hour or minute part, or 60 seconds or more. Kubernetes before 1.25 has no CEL to compare durations, so
/// the minimum is written into the pattern; validation checks it again for manifests that never met the API server.
pub const INTERVAL_PATTERN: &str = "^(0*[1-9][0-9]*h([0-9]+m)?([0-9]+s)?|([0-9]+h)?0*[1-9][0-9]*m([0-9]+s)?|([0-9]+h)?([0-9]+m)?0*([6-9][0-9]|[1-9][0-9]{2,})s)$";

/// The shortest `spec.interval`: re-checking more often would make sources and the operator busy for nothing.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// What Packages and Droplets have in common: bits from an optional source, an optional checksum pin, and a
/// status that differs only in its CF states. Code that handles both is written once against this.
pub trait BitsObject: kube::Resource<DynamicType = ()> + Clone {
    /// The CF states of this kind.
    type State: Copy + PartialEq;
    /// The resource's plural; it also prefixes its blobs' keys.
    const PLURAL: &'static str;
    /// Lowercase kind for messages, e.g. `package`.
    const NOUN: &'static str;
    fn source(&self) -> Option<&Source>;
    fn checksum_pin(&self) -> Option<&Checksum>;
    /// `spec.timeout` as written, if set.
    fn timeout_spec(&self) -> Option<&str>;
    /// How long one fetch may take: `spec.timeout`, else [`DEFAULT_FETCH_TIMEOUT`]. A spec that does not parse
    /// is refused by validation before any fetch.
    fn fetch_timeout(&self) -> std::time::Duration {
        self.timeout_spec().and_then(duration::parse).unwrap_or(DEFAULT_FETCH_TIMEOUT)
    }
    /// `spec.interval` and `spec.suspend`.
    fn refresh(&self) -> &Refresh;
    /// How often to re-check the source: `spec.interval`, when it is set and valid (validation refuses others).
    fn recheck_interval(&self) -> Option<std::time::Duration> {
        self.refresh().interval.as_deref().and_then(|i| duration::parse_interval(i).ok())
    }
    fn bits_status(&self) -> Option<&BitsStatus<Self::State>>;
    fn set_bits_status(&mut self, status: BitsStatus<Self::State>);
}

impl BitsObject for Package {
    type State = PackageState;
    const PLURAL: &'static str = "packages";
    const NOUN: &'static str = "package";
    fn source(&self) -> Option<&Source> {
        self.spec.source.as_ref()
    }
    fn timeout_spec(&self) -> Option<&str> {
        self.spec.timeout.as_deref()
    }
    fn checksum_pin(&self) -> Option<&Checksum> {
        self.spec.checksum.as_ref()
    }
    fn refresh(&self) -> &Refresh {
        &self.spec.refresh
    }
    fn bits_status(&self) -> Option<&BitsStatus<PackageState>> {
        self.status.as_ref()
    }
    fn set_bits_status(&mut self, status: BitsStatus<PackageState>) {
        self.status = Some(status);
    }
}

impl BitsObject for Droplet {
    type State = DropletState;
    const PLURAL: &'static str = "droplets";
    const NOUN: &'static str = "droplet";
    fn source(&self) -> Option<&Source> {
        self.spec.source.as_ref()
    }
    fn timeout_spec(&self) -> Option<&str> {
        self.spec.timeout.as_deref()
    }
    fn checksum_pin(&self) -> Option<&Checksum> {
        self.spec.checksum.as_ref()
    }
    fn refresh(&self) -> &Refresh {
        &self.spec.refresh
    }
    fn bits_status(&self) -> Option<&BitsStatus<DropletState>> {
        self.status.as_ref()
    }
    fn set_bits_status(&mut self, status: BitsStatus<DropletState>) {
        self.status = Some(status);
    }
}
