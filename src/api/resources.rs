//! The files clients name instead of sending: the `resources` of a package upload and the body of
//! `resource_matches`, in the v3 form (`path`, `size_in_bytes`, `checksum.value`, `mode`) or the v2 form
//! (`fn`, `size`, `sha1`, `mode`). Pure: parsing and Cloud Controller's matching rules.

use serde_json::{Map, Value};

use super::CfError;
use crate::archive::zip::safe_path;

/// At most this many entries in one `resource_matches` request.
pub const MAX_MATCHES: usize = 5000;
/// The mode of a file that names none.
pub const DEFAULT_MODE: u32 = 0o744;

/// A file named by its sha1 and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub path: Option<String>,
    pub sha1: String,
    pub size: u64,
    pub mode: u32,
}

impl Resource {
    /// Cloud Controller's rule: a file is matched only if cacheable by size and its owner may read and write it.
    pub fn matchable(&self) -> bool {
        crate::cache::cacheable(self.size) && self.mode & 0o600 == 0o600
    }
}

fn unprocessable(detail: impl Into<String>) -> CfError {
    CfError::UnprocessableEntity(detail.into())
}

/// One entry, in either form.
fn resource(item: &Value) -> Result<Resource, CfError> {
    let object = item.as_object().ok_or_else(|| unprocessable("Each resource must be an object."))?;
    let v2 = object.contains_key("sha1") || object.contains_key("fn");
    let allowed: &[&str] =
        if v2 { &["fn", "sha1", "size", "mode"] } else { &["path", "size_in_bytes", "checksum", "mode"] };
    if let Some(key) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(unprocessable(format!("Unknown field(s): '{key}'")));
    }
    let (path, size, sha1) = if v2 {
        (object.get("fn"), object.get("size"), object.get("sha1"))
    } else {
        let checksum = object.get("checksum").and_then(Value::as_object);
        if let Some(key) = checksum.and_then(|c| c.keys().find(|k| k.as_str() != "value")) {
            return Err(unprocessable(format!("Unknown field(s): 'checksum.{key}'")));
        }
        (object.get("path"), object.get("size_in_bytes"), checksum.and_then(|c| c.get("value")))
    };
    let sha1 = sha1
        .and_then(Value::as_str)
        .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| unprocessable("Checksum value must be a sha1: 40 hexadecimal characters."))?
        .to_ascii_lowercase();
    let size = size.and_then(Value::as_u64).ok_or_else(|| unprocessable("Size must be a non-negative integer."))?;
    let path = match path {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.clone()),
        Some(_) => return Err(unprocessable("Path must be a string.")),
    };
    let mode = match object.get("mode") {
        None | Some(Value::Null) => DEFAULT_MODE,
        Some(Value::String(m)) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| unprocessable(format!("Mode {m:?} must be an octal file mode.")))?,
        Some(_) => return Err(unprocessable("Mode must be a string.")),
    };
    Ok(Resource { path, sha1, size, mode })
}

/// The `resources` part of a package upload: a JSON string holding an array. Every entry needs a path inside
/// the package and a mode that lets the owner read and write. Entries are read one at a time, so that a list of
/// 100 000 files never stands in memory as a JSON tree.
pub fn parse_upload(text: &str) -> Result<Vec<Resource>, CfError> {
    if !text.trim_start().starts_with('[') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => unprocessable("Resources must be an array."),
            Err(_) => unprocessable("Resources must be valid JSON."),
        });
    }
    let refusal = std::cell::RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = serde::de::DeserializeSeed::deserialize(UploadList { refusal: &refusal }, &mut deserializer)
        .and_then(|resources| deserializer.end().map(|()| resources));
    parsed.map_err(|_| refusal.into_inner().unwrap_or_else(|| unprocessable("Resources must be valid JSON.")))
}

/// One entry of an upload's list, checked.
fn upload_resource(item: &Value) -> Result<Resource, CfError> {
    let resource = resource(item)?;
    let path = resource.path.as_deref().ok_or_else(|| unprocessable("Each resource needs a path."))?;
    safe_path(path).map_err(|reason| unprocessable(format!("Resource path {path:?} is invalid: {reason}.")))?;
    if resource.mode & 0o600 != 0o600 {
        return Err(unprocessable(format!("Resource {path:?} has mode {:o}, which must include 0600.", resource.mode)));
    }
    Ok(resource)
}

/// Reads an upload's list entry by entry; the first refused entry is kept in `refusal`.
struct UploadList<'a> {
    refusal: &'a std::cell::RefCell<Option<CfError>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for UploadList<'_> {
    type Value = Vec<Resource>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UploadList<'_> {
    type Value = Vec<Resource>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an array of resources")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut resources = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            match upload_resource(&item) {
                Ok(resource) => resources.push(resource),
                Err(refused) => {
                    *self.refusal.borrow_mut() = Some(refused);
                    return Err(serde::de::Error::custom("a refused resource"));
                }
            }
        }
        Ok(resources)
    }
}

/// The body of `POST /v3/resource_matches`: `{"resources": [...]}` with 1 to 5000 entries. Returns each entry
/// as sent, with its parsed form.
pub fn parse_matches(body: &[u8]) -> Result<Vec<(Value, Resource)>, CfError> {
    let body: Map<String, Value> =
        serde_json::from_slice(body).map_err(|_| unprocessable("Request body must be a JSON object."))?;
    if let Some(key) = body.keys().find(|k| k.as_str() != "resources") {
        return Err(unprocessable(format!("Unknown field(s): '{key}'")));
    }
    let items =
        body.get("resources").and_then(Value::as_array).ok_or_else(|| unprocessable("Resources must be an array."))?;
    if items.is_empty() || items.len() > MAX_MATCHES {
        return Err(unprocessable(format!("Resources must have between 1 and {MAX_MATCHES} items.")));
    }
    items.iter().map(|item| Ok((item.clone(), resource(item)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA1: &str = "8b1f4f1dd2bea2ddf3f4f1e4a2a0a7d8c1b9c0de";

    #[test]
    fn both_forms_are_read() {
        let v3 = json!([{"path": "app/a.js", "size_in_bytes": 70000, "checksum": {"value": SHA1}, "mode": "644"}]);
        let v2 = json!([{"fn": "app/a.js", "size": 70000, "sha1": SHA1.to_uppercase()}]);
        let want = Resource { path: Some("app/a.js".into()), sha1: SHA1.into(), size: 70000, mode: 0o644 };
        assert_eq!(parse_upload(&v3.to_string()).unwrap(), vec![want.clone()]);
        assert_eq!(parse_upload(&v2.to_string()).unwrap(), vec![Resource { mode: DEFAULT_MODE, ..want }]);
    }

    #[test]
    fn bad_resources_are_refused_with_clear_details() {
        let detail = |text: &str| match parse_upload(text) {
            Err(CfError::UnprocessableEntity(detail)) => detail,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(detail("[{"), "Resources must be valid JSON.");
        assert_eq!(detail("[] x"), "Resources must be valid JSON.");
        assert_eq!(detail(r#"{"a": 1}"#), "Resources must be an array.");
        assert_eq!(detail("[1]"), "Each resource must be an object.");
        assert!(
            detail(
                &json!([{"path": "a", "size_in_bytes": 1, "checksum": {"value": SHA1}, "color": "red"}]).to_string()
            )
            .contains("'color'")
        );
        assert!(
            detail(&json!([{"path": "a", "size_in_bytes": 1, "checksum": {"value": "abc"}}]).to_string())
                .contains("sha1")
        );
        assert!(
            detail(&json!([{"path": "../a", "size_in_bytes": 1, "checksum": {"value": SHA1}}]).to_string())
                .contains("invalid")
        );
        assert!(
            detail(&json!([{"path": "a", "size_in_bytes": 1, "checksum": {"value": SHA1}, "mode": "444"}]).to_string())
                .contains("0600")
        );
        assert!(
            detail(&json!([{"path": "a", "size_in_bytes": -1, "checksum": {"value": SHA1}}]).to_string())
                .contains("Size")
        );
    }

    #[test]
    fn matches_follow_cloud_controllers_rules() {
        let item = |size: u64, mode: &str| json!({"checksum": {"value": SHA1}, "size_in_bytes": size, "mode": mode});
        let parsed = parse_matches(
            json!({"resources": [item(70_000, "644"), item(100, "644"), item(70_000, "444")]}).to_string().as_bytes(),
        )
        .unwrap();
        let matchable: Vec<bool> = parsed.iter().map(|(_, r)| r.matchable()).collect();
        assert_eq!(matchable, [true, false, false]);
        assert!(parse_matches(br#"{"resources": []}"#).is_err());
        let many = json!({"resources": vec![item(70_000, "644"); MAX_MATCHES + 1]});
        assert!(parse_matches(many.to_string().as_bytes()).is_err());
        assert!(parse_matches(b"[]").is_err());
    }
}
