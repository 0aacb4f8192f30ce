//! The `Droplet` resource: a staged application (a tarball), produced from a Package.

// Each `printcolumn(...)` repeats `name` and `type_`, which clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::package::AppRef;
use super::shared::{BitsStatus, Checksum, Refresh, Source};

/// A staged application: the droplet tarball a lifecycle built from a Package, with its start commands.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "bitsmith.dev",
    version = "v1alpha1",
    kind = "Droplet",
    plural = "droplets",
    category = "bitsmith",
    namespaced,
    status = "DropletStatus",
    derive = "PartialEq",
    printcolumn(name = "Package", type_ = "string", json_path = ".spec.packageRef.name"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Checksum", type_ = "string", json_path = ".status.checksum.value", priority = 1),
    printcolumn(name = "Interval", type_ = "string", json_path = ".spec.interval", priority = 1),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct DropletSpec {
    /// The Package this droplet was staged from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_ref: Option<PackageRef>,
    /// Where to fetch the droplet tarball from. Without a source the droplet waits for an upload through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// A checksum the tarball must match; a mismatch fails the Droplet and nothing is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
    /// Start commands by process type, e.g. `web: bundle exec rackup`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub process_types: BTreeMap<String, String>,
    /// Lifecycle-specific metadata about the staged app, opaque to bitsmith.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_metadata: Option<String>,
    /// The root filesystem the droplet was built for, e.g. `cflinuxfs4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// How the droplet was built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// The application this droplet belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_ref: Option<AppRef>,
    /// How long one fetch from the source may take in all, e.g. `10m` (the default), `90s` or `1h`: a fetch
    /// that takes longer (a source that trickles) fails with reason `Timeout` and is tried again with backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub timeout: Option<String>,
    #[serde(flatten)]
    pub refresh: Refresh,
}

/// A Package in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PackageRef {
    /// Name of the Package.
    pub name: String,
}

/// The lifecycle that staged a droplet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Lifecycle {
    /// `buildpack`, `cnb` or `docker`.
    #[serde(rename = "type")]
    pub lifecycle_type: LifecycleType,
    /// Buildpacks used, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buildpacks: Vec<String>,
}

/// Cloud Foundry's lifecycle types.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleType {
    Buildpack,
    Cnb,
    Docker,
}

/// Cloud Foundry's droplet states.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DropletState {
    AwaitingUpload,
    ProcessingUpload,
    Staged,
    Failed,
    Expired,
}

/// What bitsmith observed and did with a Droplet.
pub type DropletStatus = BitsStatus<DropletState>;
