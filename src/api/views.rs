//! The JSON the CF v3 API answers with, built from Packages and Droplets. Pure: the shapes are tested without a
//! server.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use serde_json::{Value, json};

use crate::links::ApiUrls;
use crate::resources::{BitsStatus, ChecksumType, Droplet, DropletState, Links, Package, PackageState, PackageType};

/// Annotations Kubernetes tools keep for themselves, not the user's metadata.
const HIDDEN_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// `2015-11-13T17:02:56Z`, as Cloud Controller writes times.
pub fn timestamp(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn created(meta: &ObjectMeta) -> Timestamp {
    meta.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_default()
}

/// The last time anything about the object changed that the API shows: its creation or a condition's transition.
fn updated<S>(meta: &ObjectMeta, status: Option<&BitsStatus<S>>) -> Timestamp {
    let transitions = status.iter().flat_map(|s| s.conditions.iter()).map(|c| c.last_transition_time.0);
    transitions.fold(created(meta), Timestamp::max)
}

fn metadata(meta: &ObjectMeta) -> Value {
    let annotations: BTreeMap<&String, &String> =
        meta.annotations.iter().flatten().filter(|(k, _)| !HIDDEN_ANNOTATIONS.contains(&k.as_str())).collect();
    json!({"labels": meta.labels.clone().unwrap_or_default(), "annotations": annotations})
}

fn app_relationship(app: Option<&str>) -> Value {
    match app {
        Some(guid) => json!({"app": {"data": {"guid": guid}}}),
        None => json!({"app": {"data": null}}),
    }
}

fn links(links: &Links) -> Value {
    serde_json::to_value(links).unwrap_or(Value::Null)
}

fn sha256<S>(status: Option<&BitsStatus<S>>) -> Option<&str> {
    let checksum = status?.stored.checksum.as_ref()?;
    (checksum.checksum_type == ChecksumType::Sha256).then_some(checksum.value.as_str())
}

/// A Package's state, also before the controller has written any: docker is READY at once, bits wait for an
/// upload or are being fetched.
pub fn package_state(package: &Package) -> PackageState {
    let recorded = package.status.as_ref().and_then(|s| s.state);
    recorded.unwrap_or(match (package.spec.package_type, &package.spec.source) {
        (PackageType::Docker, _) => PackageState::Ready,
        (PackageType::Bits, None) => PackageState::AwaitingUpload,
        (PackageType::Bits, Some(source)) if source.package.is_some() => PackageState::Copying,
        (PackageType::Bits, Some(_)) => PackageState::ProcessingUpload,
    })
}

/// A Droplet's state, also before the controller has written any.
pub fn droplet_state(droplet: &Droplet) -> DropletState {
    let recorded = droplet.status.as_ref().and_then(|s| s.state);
    recorded.unwrap_or(if droplet.spec.source.is_some() {
        DropletState::ProcessingUpload
    } else {
        DropletState::AwaitingUpload
    })
}

/// `GET /v3/packages/:guid`.
pub fn package(package: &Package, urls: &ApiUrls) -> Value {
    let guid = package.metadata.uid.as_deref().unwrap_or_default();
    let status = package.status.as_ref();
    let app = package.spec.app_ref.as_ref().map(|a| a.name.as_str());
    let bits = package.spec.package_type == PackageType::Bits;
    let data = if bits {
        json!({
            "error": status.and_then(|s| s.error.as_deref()),
            "checksum": {"type": "sha256", "value": sha256(status)},
        })
    } else {
        let image = package.spec.image.as_ref();
        json!({
            "image": image.map(|i| i.reference.as_str()),
            "username": null,
            "password": image.and_then(|i| i.pull_secret_ref.as_ref()).map(|_| "***"),
        })
    };
    json!({
        "guid": guid,
        "created_at": timestamp(created(&package.metadata)),
        "updated_at": timestamp(updated(&package.metadata, status)),
        "type": if bits { "bits" } else { "docker" },
        "data": data,
        "state": package_state(package),
        "relationships": app_relationship(app),
        "metadata": metadata(&package.metadata),
        "links": links(&urls.package_links(guid, app, bits)),
    })
}

/// `GET /v3/droplets/:guid`. `package_guid` is the guid of the Package named by `spec.packageRef`.
pub fn droplet(droplet: &Droplet, package_guid: Option<&str>, urls: &ApiUrls) -> Value {
    let guid = droplet.metadata.uid.as_deref().unwrap_or_default();
    let status = droplet.status.as_ref();
    let state = droplet_state(droplet);
    let app = droplet.spec.app_ref.as_ref().map(|a| a.name.as_str());
    let lifecycle = droplet.spec.lifecycle.as_ref();
    let buildpacks: Vec<Value> =
        lifecycle.iter().flat_map(|l| l.buildpacks.iter()).map(|name| json!({"name": name})).collect();
    let lifecycle_type = lifecycle.map_or("buildpack".into(), |l| {
        serde_json::to_value(l.lifecycle_type).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    });
    json!({
        "guid": guid,
        "state": state,
        "error": status.and_then(|s| s.error.as_deref()),
        "lifecycle": {"type": lifecycle_type, "data": {}},
        "checksum": sha256(status).map(|v| json!({"type": "sha256", "value": v})),
        "buildpacks": buildpacks,
        "stack": droplet.spec.stack,
        "image": null,
        "execution_metadata": droplet.spec.execution_metadata.as_deref().unwrap_or_default(),
        "process_types": droplet.spec.process_types,
        "created_at": timestamp(created(&droplet.metadata)),
        "updated_at": timestamp(updated(&droplet.metadata, status)),
        "relationships": app_relationship(app),
        "metadata": metadata(&droplet.metadata),
        "links": links(&urls.droplet_links(guid, app, package_guid, Some(state))),
    })
}

/// `GET /v3/jobs/:guid` for a droplet upload. The job has no state of its own: it is read off the Droplet, so
/// nothing is lost when the API restarts. Its guid is the Droplet's.
pub fn droplet_upload_job(droplet: &Droplet, urls: &ApiUrls) -> Value {
    let guid = droplet.metadata.uid.as_deref().unwrap_or_default();
    let status = droplet.status.as_ref();
    let (state, errors) = match droplet_state(droplet) {
        DropletState::Staged => ("COMPLETE", vec![]),
        DropletState::Failed | DropletState::Expired => {
            let detail = status.and_then(|s| s.error.as_deref()).unwrap_or("the droplet upload failed");
            ("FAILED", vec![json!({"code": 10001, "title": "CF-UnknownError", "detail": detail})])
        }
        DropletState::AwaitingUpload | DropletState::ProcessingUpload => ("PROCESSING", vec![]),
    };
    json!({
        "guid": guid,
        "created_at": timestamp(created(&droplet.metadata)),
        "updated_at": timestamp(updated(&droplet.metadata, status)),
        "operation": "droplet.upload",
        "state": state,
        "errors": errors,
        "warnings": [],
        "links": {"self": {"href": urls.job(guid)}, "droplet": {"href": urls.droplet(guid)}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{AppRef, DropletSpec, ImageSpec, PackageSpec, StoredDigests};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn urls() -> ApiUrls {
        ApiUrls::new(&url::Url::parse("https://bits.example.com").unwrap())
    }

    fn meta(object: &mut ObjectMeta) {
        object.uid = Some("0a3b0d8e-6b0c-4c5e-9f38-2f1f6a1c7d11".into());
        object.creation_timestamp = Some(Time(Timestamp::from_second(1_447_434_176).unwrap()));
        object.annotations = Some(BTreeMap::from([
            (HIDDEN_ANNOTATIONS[0].to_string(), "{}".to_string()),
            ("team".to_string(), "payments".to_string()),
        ]));
    }

    #[test]
    fn a_bits_package_awaiting_upload() {
        let spec = PackageSpec {
            package_type: PackageType::Bits,
            source: None,
            checksum: None,
            image: None,
            app_ref: Some(AppRef { name: "web".into() }),
            timeout: None,
            refresh: Default::default(),
        };
        let mut p = Package::new("app", spec);
        meta(&mut p.metadata);
        let json = package(&p, &urls());
        assert_eq!(json["guid"], "0a3b0d8e-6b0c-4c5e-9f38-2f1f6a1c7d11");
        assert_eq!(json["created_at"], "2015-11-13T17:02:56Z");
        assert_eq!(json["updated_at"], "2015-11-13T17:02:56Z");
        assert_eq!(json["type"], "bits");
        assert_eq!(json["state"], "AWAITING_UPLOAD");
        assert_eq!(json["data"], json!({"error": null, "checksum": {"type": "sha256", "value": null}}));
        assert_eq!(json["relationships"]["app"]["data"]["guid"], "web");
        assert_eq!(json["metadata"], json!({"labels": {}, "annotations": {"team": "payments"}}));
        assert_eq!(
            json["links"]["upload"],
            json!({"href": "https://bits.example.com/v3/packages/0a3b0d8e-6b0c-4c5e-9f38-2f1f6a1c7d11/upload", "method": "POST"})
        );
        assert_eq!(json["links"]["download"]["method"], "GET");
    }

    #[test]
    fn a_docker_package_hides_its_password_and_has_no_bits_links() {
        let spec = PackageSpec {
            package_type: PackageType::Docker,
            source: None,
            checksum: None,
            image: Some(ImageSpec {
                reference: "nginx:1.27".into(),
                pull_secret_ref: Some(crate::resources::SecretRef { name: "pull".into() }),
            }),
            app_ref: None,
            timeout: None,
            refresh: Default::default(),
        };
        let mut p = Package::new("image", spec);
        meta(&mut p.metadata);
        let json = package(&p, &urls());
        assert_eq!(json["state"], "READY");
        assert_eq!(json["data"], json!({"image": "nginx:1.27", "username": null, "password": "***"}));
        assert!(json["links"].get("upload").is_none() && json["links"].get("download").is_none());
        assert_eq!(json["relationships"], json!({"app": {"data": null}}));
    }

    #[test]
    fn a_staged_droplet_and_its_job() {
        let mut d = Droplet::new("web", DropletSpec::default());
        meta(&mut d.metadata);
        let digests = crate::digest::Digests { sha1: "a".repeat(40), sha256: "b".repeat(64), size: 3 };
        let stored: StoredDigests =
            crate::status::stored_digests(&digests, crate::resources::BlobRef { store: "s".into(), key: "k".into() });
        d.status = Some(crate::status::done(
            &Default::default(),
            stored,
            None,
            Timestamp::from_second(1_447_434_200).unwrap(),
        ));
        let json = droplet(&d, Some("p1"), &urls());
        assert_eq!(json["state"], "STAGED");
        assert_eq!(json["checksum"], json!({"type": "sha256", "value": "b".repeat(64)}));
        assert_eq!(json["updated_at"], "2015-11-13T17:03:20Z");
        assert_eq!(json["links"]["package"]["href"], "https://bits.example.com/v3/packages/p1");
        assert!(json["links"].get("upload").is_none());
        assert_eq!(json["links"]["download"]["method"], "GET");

        let job = droplet_upload_job(&d, &urls());
        assert_eq!(job["state"], "COMPLETE");
        assert_eq!(job["operation"], "droplet.upload");
        assert_eq!(
            job["links"]["droplet"]["href"],
            format!("https://bits.example.com/v3/droplets/{}", d.metadata.uid.as_deref().unwrap())
        );
    }
}
