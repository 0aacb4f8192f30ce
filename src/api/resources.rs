//! The files clients name instead of sending: the `resources` of a package upload and the body of
//! `resource_matches`, in the v3 form (`path`, `size_in_bytes`, `checksum.value`, `mode`) or the v2 form
//! (`fn`, `size`, `sha1`, `mode`). Pure: parsing and Cloud Controller's matching rules.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

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

/// A JSON object's members as sent, names borrowed from the body unless escaped and values not yet parsed: an
/// entry costs one small list instead of a tree of maps and strings (a 5000-entry `resource_matches` spent most
/// of its time allocating and freeing those).
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// The members of `raw`, or `None` when it is not an object.
    fn of(raw: &'a RawValue) -> Option<Self> {
        serde_json::from_str(raw.get()).ok()
    }

    /// The value of `name`; the last one when it is repeated, as a JSON map would keep it.
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The first member whose name is not in `allowed`.
    fn unknown(&self, allowed: &[&str]) -> Option<&str> {
        self.0.iter().map(|(n, _)| n.as_ref()).find(|n| !allowed.contains(n))
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

impl<'de> serde::de::Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
        while let Some((Name(name), value)) = map.next_entry::<Name, &RawValue>()? {
            members.push((name, value));
        }
        Ok(Members(members))
    }
}

/// A member name, borrowed from the body unless it holds escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> serde::de::Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(name.to_string())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// What a member's value holds, read for the checks below.
enum Scalar<'a> {
    Absent,
    Null,
    Text(Cow<'a, str>),
    Whole(u64),
    Other,
}

impl<'a> Scalar<'a> {
    fn of(raw: Option<&'a RawValue>) -> Self {
        let Some(raw) = raw else { return Scalar::Absent };
        let text = raw.get().trim_start();
        match text.as_bytes().first() {
            Some(b'n') => Scalar::Null,
            Some(b'"') => serde_json::from_str::<&str>(text)
                .map(|s| Scalar::Text(Cow::Borrowed(s)))
                .or_else(|_| serde_json::from_str::<String>(text).map(|s| Scalar::Text(Cow::Owned(s))))
                .unwrap_or(Scalar::Other),
            _ => serde_json::from_str::<u64>(text).map(Scalar::Whole).unwrap_or(Scalar::Other),
        }
    }
}

/// One entry, in either form.
fn resource(item: &RawValue) -> Result<Resource, CfError> {
    let object = Members::of(item).ok_or_else(|| unprocessable("Each resource must be an object."))?;
    let v2 = object.get("sha1").is_some() || object.get("fn").is_some();
    let allowed: &[&str] =
        if v2 { &["fn", "sha1", "size", "mode"] } else { &["path", "size_in_bytes", "checksum", "mode"] };
    if let Some(key) = object.unknown(allowed) {
        return Err(unprocessable(format!("Unknown field(s): '{key}'")));
    }
    let (path, size, sha1) = if v2 {
        (object.get("fn"), object.get("size"), object.get("sha1"))
    } else {
        let checksum = object.get("checksum").and_then(Members::of);
        if let Some(key) = checksum.as_ref().and_then(|c| c.unknown(&["value"])) {
            return Err(unprocessable(format!("Unknown field(s): 'checksum.{key}'")));
        }
        (object.get("path"), object.get("size_in_bytes"), checksum.and_then(|c| c.get("value")))
    };
    let sha1 = match Scalar::of(sha1) {
        Scalar::Text(s) if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) => s.to_ascii_lowercase(),
        _ => return Err(unprocessable("Checksum value must be a sha1: 40 hexadecimal characters.")),
    };
    let Scalar::Whole(size) = Scalar::of(size) else {
        return Err(unprocessable("Size must be a non-negative integer."));
    };
    let path = match Scalar::of(path) {
        Scalar::Absent | Scalar::Null => None,
        Scalar::Text(p) => Some(p.into_owned()),
        _ => return Err(unprocessable("Path must be a string.")),
    };
    let mode = match Scalar::of(object.get("mode")) {
        Scalar::Absent | Scalar::Null => DEFAULT_MODE,
        Scalar::Text(m) => u32::from_str_radix(&m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| unprocessable(format!("Mode {m:?} must be an octal file mode.")))?,
        _ => return Err(unprocessable("Mode must be a string.")),
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
fn upload_resource(item: &RawValue) -> Result<Resource, CfError> {
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
        while let Some(item) = seq.next_element::<&RawValue>()? {
            match upload_resource(item) {
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
/// as sent (its JSON text, to be echoed), with its parsed form.
pub fn parse_matches(body: &[u8]) -> Result<Vec<(&RawValue, Resource)>, CfError> {
    let not_an_object = || unprocessable("Request body must be a JSON object.");
    let text = std::str::from_utf8(body).map_err(|_| not_an_object())?;
    let body = serde_json::from_str::<Members>(text).map_err(|_| not_an_object())?;
    if let Some(key) = body.unknown(&["resources"]) {
        return Err(unprocessable(format!("Unknown field(s): '{key}'")));
    }
    let items: Vec<&RawValue> = body
        .get("resources")
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .ok_or_else(|| unprocessable("Resources must be an array."))?;
    if items.is_empty() || items.len() > MAX_MATCHES {
        return Err(unprocessable(format!("Resources must have between 1 and {MAX_MATCHES} items.")));
    }
    items.into_iter().map(|item| Ok((item, resource(item)?))).collect()
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
        let body = json!({"resources": [item(70_000, "644"), item(100, "644"), item(70_000, "444")]}).to_string();
        let parsed = parse_matches(body.as_bytes()).unwrap();
        let matchable: Vec<bool> = parsed.iter().map(|(_, r)| r.matchable()).collect();
        assert_eq!(matchable, [true, false, false]);
        assert!(parse_matches(br#"{"resources": []}"#).is_err());
        let many = json!({"resources": vec![item(70_000, "644"); MAX_MATCHES + 1]});
        assert!(parse_matches(many.to_string().as_bytes()).is_err());
        assert!(parse_matches(b"[]").is_err());
    }

    #[test]
    fn entries_are_echoed_as_sent_and_read_as_json_means_them() {
        // Escaped names and values, a repeated member (the last counts, as in a JSON map), spaces, nulls.
        let entry = r#"{ "check\u0073um" : {"value": "8B1F4F1DD2BEA2DDF3F4F1E4A2A0A7D8C1B9C0D\u0045"},
            "size_in_bytes": 1, "size_in_bytes": 70000, "path": null, "mode" : "0644" }"#;
        let body = format!(r#"{{"resources": [{entry}, {{"sha1": "{SHA1}", "size": 70000, "fn": "a\/b"}}]}}"#);
        let parsed = parse_matches(body.as_bytes()).unwrap();
        assert_eq!(parsed[0].0.get(), entry, "the entry's own text, to be echoed");
        assert_eq!(parsed[0].1, Resource { path: None, sha1: SHA1.into(), size: 70000, mode: 0o644 });
        assert_eq!(parsed[1].1, Resource { path: Some("a/b".into()), sha1: SHA1.into(), size: 70000, mode: 0o744 });
        let refused = |body: &str| match parse_matches(body.as_bytes()) {
            Err(CfError::UnprocessableEntity(detail)) => detail,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(refused(r#"{"resources": [1]}"#), "Each resource must be an object.");
        assert_eq!(refused(r#"{"resources": {}}"#), "Resources must be an array.");
        assert_eq!(refused(r#"{"resources": [], "x": 1}"#), "Unknown field(s): 'x'");
        assert_eq!(refused("not JSON"), "Request body must be a JSON object.");
        assert!(matches!(parse_matches(&[b'{', 0xff, b'}']), Err(CfError::UnprocessableEntity(_))), "not UTF-8");
        let sized = |size: &str| {
            format!(r#"{{"resources": [{{"checksum": {{"value": "{SHA1}"}}, "size_in_bytes": {size}}}]}}"#)
        };
        for size in ["-1", "1.5", "\"70000\"", "null", "18446744073709551616"] {
            assert_eq!(refused(&sized(size)), "Size must be a non-negative integer.", "{size}");
        }
        let checksum =
            format!(r#"{{"resources": [{{"checksum": {{"value": "{SHA1}", "type": "sha1"}}, "size_in_bytes": 1}}]}}"#);
        assert_eq!(refused(&checksum), "Unknown field(s): 'checksum.type'");
        let moded =
            format!(r#"{{"resources": [{{"checksum": {{"value": "{SHA1}"}}, "size_in_bytes": 1, "mode": 644}}]}}"#);
        assert_eq!(refused(&moded), "Mode must be a string.");
    }
}
