//! The custom resources bitsmith serves: `Package` and `Droplet` (group `bitsmith.dev`, version `v1alpha1`).
//!
//! Doc comments on these types become the descriptions in the generated CRD schema, so they are written for
//! the people who read `kubectl explain`.

mod droplet;
mod package;
mod shared;

pub use droplet::{
    Droplet, DropletSpec, DropletState, DropletStatus, Lifecycle, LifecycleType, PackageRef,
};
pub use package::{
    AppRef, ImageSpec, Package, PackageSpec, PackageState, PackageStatus, PackageType,
};
pub use shared::{
    BitsStatus, BlobRef, Checksum, ChecksumType, Header, HttpSource, Link, Links,
    ObjectStoreSource, PackageSourceRef, SecretRef, Source, SourceKind, StoredDigests,
};

/// The API group of every bitsmith resource.
pub const GROUP: &str = "bitsmith.dev";
/// The API version of every bitsmith resource.
pub const VERSION: &str = "v1alpha1";
