//! The `Package` resource: application bits (a zip), or a docker image reference.

// Each `printcolumn(...)` repeats `name` and `type_`, which clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{BitsStatus, Checksum, Refresh, SecretRef, Source};

/// The application's source code, as Cloud Foundry keeps it: a zip of the app (`bits`) or a docker image.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "bitsmith.dev",
    version = "v1alpha1",
    kind = "Package",
    plural = "packages",
    shortname = "pkg",
    category = "bitsmith",
    namespaced,
    status = "PackageStatus",
    derive = "PartialEq",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Checksum", type_ = "string", json_path = ".status.checksum.value", priority = 1),
    printcolumn(name = "Interval", type_ = "string", json_path = ".spec.interval", priority = 1),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct PackageSpec {
    /// `bits` for an application zip, `docker` for an image reference.
    #[serde(rename = "type")]
    pub package_type: PackageType,
    /// Where to fetch the bits from. A bits Package without a source waits for an upload through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// A checksum the bits must match; a mismatch fails the Package and nothing is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
    /// The image of a docker Package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// The application this Package belongs to.
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

impl PackageSpec {
    /// A bits Package's spec: its bits come from `source`, or from an upload when there is none.
    pub fn bits(source: Option<Source>) -> Self {
        PackageSpec {
            package_type: PackageType::Bits,
            source,
            checksum: None,
            image: None,
            app_ref: None,
            timeout: None,
            refresh: Refresh::default(),
        }
    }
}

/// The kind of a Package.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PackageType {
    Bits,
    Docker,
}

/// A container image for a docker Package.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// The image reference, e.g. `registry.example.com/team/app:1.2` or `app@sha256:<hex>`.
    pub reference: String,
    /// A Secret with registry credentials (`username` and `password`) for pulling the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<SecretRef>,
}

/// The application a Package or Droplet belongs to.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AppRef {
    /// The application's name.
    pub name: String,
}

/// Cloud Foundry's package states.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PackageState {
    AwaitingUpload,
    ProcessingUpload,
    Copying,
    Ready,
    Failed,
    Expired,
}

/// What bitsmith observed and did with a Package.
pub type PackageStatus = BitsStatus<PackageState>;
