//! `bitsmith fetch`: the same pipeline on manifests, without a cluster. Secrets come from `kind: Secret`
//! documents among the inputs, and a `package` source names a Package fetched earlier in the same run.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::fetch::{Fetcher, Inputs};
use crate::pipeline::PipelineError;
use crate::plan::{Plan, Planned, plan};
use crate::resources::{BitsObject, BitsStatus, Droplet, Package};
use crate::sources::SecretData;
use crate::status::{self, CfState};
use crate::store::BlobOwner;
use crate::validate::SpecError;

/// One document of the input.
#[derive(Clone, Debug)]
pub enum Manifest {
    Package(Box<Package>),
    Droplet(Box<Droplet>),
    Secret(Box<Secret>),
}

/// Why `fetch` stopped. Each names the document or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{origin}: {detail}")]
    Parse { origin: String, detail: String },
    #[error(
        "{origin}: document {index} is {kind}; fetch reads bitsmith.dev/v1alpha1 Package and Droplet, and v1 Secret"
    )]
    Unsupported { origin: String, index: usize, kind: String },
    #[error("{object}: {source}")]
    Spec {
        object: String,
        #[source]
        source: SpecError,
    },
    #[error("{object}: Secret {secret:?} is not among the input documents")]
    MissingSecret { object: String, secret: String },
    #[error("{object}: {source}")]
    Pipeline {
        object: String,
        #[source]
        source: Box<PipelineError>,
    },
}

/// Parse a multi-document YAML text. `origin` names it in errors (a file name, or `-`).
pub fn parse_manifests(text: &str, origin: &str) -> Result<Vec<Manifest>, OfflineError> {
    let parse_error = |detail: String| OfflineError::Parse { origin: origin.to_string(), detail };
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| parse_error(e.to_string().lines().next().unwrap_or("").to_string()))?;
    let mut manifests = Vec::new();
    for (index, doc) in documents.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
        let api_version = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let kind = doc.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let typed = |e: serde_json::Error| parse_error(format!("document {index} ({kind}): {e}"));
        let manifest = match (api_version.as_str(), kind.as_str()) {
            ("bitsmith.dev/v1alpha1", "Package") => {
                Manifest::Package(Box::new(serde_json::from_value(doc).map_err(typed)?))
            }
            ("bitsmith.dev/v1alpha1", "Droplet") => {
                Manifest::Droplet(Box::new(serde_json::from_value(doc).map_err(typed)?))
            }
            ("v1", "Secret") => Manifest::Secret(Box::new(serde_json::from_value(doc).map_err(typed)?)),
            _ => {
                return Err(OfflineError::Unsupported {
                    origin: origin.to_string(),
                    index,
                    kind: format!("{api_version} {kind}"),
                });
            }
        };
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// What one run has seen so far: Secrets for credentials, and fetched Packages for `package` sources.
#[derive(Default)]
struct Seen {
    secrets: BTreeMap<(String, String), SecretData>,
    packages: BTreeMap<(String, String), Package>,
}

/// Fetch every Package and Droplet in `manifests`, in order, and return them with their status filled in.
/// Stops at the first failure; blobs stored before it stay, as they would in a cluster.
pub async fn run(
    manifests: Vec<Manifest>,
    fetcher: &Fetcher,
    default_namespace: &str,
) -> Result<Vec<Manifest>, OfflineError> {
    let mut seen = Seen::default();
    let mut results = Vec::new();
    for manifest in manifests {
        match manifest {
            Manifest::Secret(secret) => {
                let namespace = secret.namespace().unwrap_or_else(|| default_namespace.to_string());
                seen.secrets.insert((namespace, secret.name_any()), SecretData::from_secret(&secret));
            }
            Manifest::Package(mut package) => {
                let namespace = claim_namespace(package.as_mut(), default_namespace);
                let status = next_status(package.as_ref(), &namespace, fetcher, &seen).await?;
                package.set_bits_status(status);
                seen.packages.insert((namespace, package.name_any()), (*package).clone());
                results.push(Manifest::Package(package));
            }
            Manifest::Droplet(mut droplet) => {
                let namespace = claim_namespace(droplet.as_mut(), default_namespace);
                let status = next_status(droplet.as_ref(), &namespace, fetcher, &seen).await?;
                droplet.set_bits_status(status);
                results.push(Manifest::Droplet(droplet));
            }
        }
    }
    Ok(results)
}

/// Give `object` the default namespace when it names none, and return its namespace.
fn claim_namespace<O: BitsObject>(object: &mut O, default_namespace: &str) -> String {
    object.meta_mut().namespace.get_or_insert_with(|| default_namespace.to_string()).clone()
}

/// `package ns/name`, for messages.
fn describe<O: BitsObject>(object: &O, namespace: &str) -> String {
    format!("{} {namespace}/{}", O::NOUN, object.meta().name.as_deref().unwrap_or_default())
}

/// The status after following `object`'s plan: fetched, ready without bits, awaiting an upload, or unchanged.
async fn next_status<O: Planned>(
    object: &O,
    namespace: &str,
    fetcher: &Fetcher,
    seen: &Seen,
) -> Result<BitsStatus<O::State>, OfflineError>
where
    O::State: CfState,
{
    let description = describe(object, namespace);
    let prev = object.bits_status().cloned().unwrap_or_default();
    let generation = object.meta().generation;
    let source = match plan(object) {
        Plan::Invalid(source) => return Err(OfflineError::Spec { object: description, source }),
        Plan::ReadyWithoutBits { message } => {
            return Ok(status::done_without_bits(&prev, &message, generation, Timestamp::now()));
        }
        Plan::AwaitUpload => return Ok(status::awaiting_upload(&prev, generation, Timestamp::now())),
        // Without a cluster nothing uploads: the state is as the manifest says.
        Plan::UpToDate | Plan::UploadInProgress | Plan::Recheck { .. } => return Ok(prev),
        Plan::Suspended => return Ok(status::suspended(&prev, generation, Timestamp::now())),
        Plan::Fetch(source) => source,
    };
    let secret = match source.secret_name().map(str::to_string) {
        Some(name) => Some(
            seen.secrets
                .get(&(namespace.to_string(), name.clone()))
                .ok_or_else(|| OfflineError::MissingSecret { object: description.clone(), secret: name })?,
        ),
        None => None,
    };
    let source_package =
        source.package.as_ref().and_then(|p| seen.packages.get(&(namespace.to_string(), p.name.clone())));
    let owner = BlobOwner::of(object, namespace);
    let inputs = Inputs { secret, source_package, deadline: Some(object.fetch_timeout()), known: None };
    let stored = fetcher
        .fetch(&owner, source, object.checksum_pin(), inputs)
        .await
        .map_err(|source| OfflineError::Pipeline { object: description, source: Box::new(source) })?;
    let digests = status::stored_digests(&stored.digests, stored.blob);
    let mut next = status::done(&prev, digests, generation, Timestamp::now());
    next.resolved_source = stored.resolved;
    Ok(next)
}

/// The results as a multi-document YAML stream.
pub fn to_yaml(manifests: &[Manifest]) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for manifest in manifests {
        out.push_str("---\n");
        out.push_str(&match manifest {
            Manifest::Package(p) => yaml(p.as_ref())?,
            Manifest::Droplet(d) => yaml(d.as_ref())?,
            Manifest::Secret(s) => yaml(s.as_ref())?,
        });
    }
    Ok(out)
}

fn yaml<T: Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(value)
}
