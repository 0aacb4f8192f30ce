//! The custom resources bitsmith serves: `Package` and `Droplet` (group `bitsmith.dev`, version `v1alpha1`).
//!
//! Doc comments on these types become the descriptions in the generated CRD schema, so they are written for
//! the people who read `kubectl explain`.

mod droplet;
mod package;
mod shared;

pub use droplet::{Droplet, DropletSpec, DropletState, DropletStatus, Lifecycle, LifecycleType, PackageRef};
pub use package::{AppRef, ImageSpec, Package, PackageSpec, PackageState, PackageStatus, PackageType};
pub use shared::{
    Artifact, BitsStatus, BlobRef, Checksum, ChecksumType, Header, HttpSource, Link, Links, ObjectStoreSource,
    PackageSourceRef, REQUESTED_AT_ANNOTATION, ResolvedSource, SecretRef, Source, SourceKind, StoredDigests,
    UploadClaim,
};

/// The API group of every bitsmith resource.
pub const GROUP: &str = "bitsmith.dev";
/// The API version of every bitsmith resource.
pub const VERSION: &str = "v1alpha1";

/// How long one fetch may take when `spec.timeout` does not say.
pub const DEFAULT_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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
        self.timeout_spec().and_then(|t| humantime::parse_duration(t).ok()).unwrap_or(DEFAULT_FETCH_TIMEOUT)
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
    fn bits_status(&self) -> Option<&BitsStatus<DropletState>> {
        self.status.as_ref()
    }
    fn set_bits_status(&mut self, status: BitsStatus<DropletState>) {
        self.status = Some(status);
    }
}
