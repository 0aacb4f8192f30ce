//! Upload tokens. A user whom Kubernetes authenticated and authorized for one object's upload — through the
//! aggregated API, so with whatever credentials their kubeconfig holds — gets a short-lived token that lets them
//! send the bits straight to this API, past kube-apiserver's request timeout, without handing this API their own
//! credentials. A token names the object (by uid) and the user, expires (`--upload-token-ttl`), and is signed with
//! HMAC-SHA256 under `--upload-token-key-file`, which every replica shares. It is good for that object's upload
//! and for `resource_matches` as that user, and for nothing else; the user's RBAC is still checked at the upload.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;

/// What every upload token starts with, so that it is never sent to kube-apiserver's TokenReview.
pub const PREFIX: &str = "bitsmith-upload.";

/// The shortest key accepted: as long as the HMAC's output.
pub const MIN_KEY_LEN: usize = 32;

/// Signs and checks upload tokens.
pub struct UploadTokens {
    key: hmac::Key,
    pub ttl: Duration,
}

impl std::fmt::Debug for UploadTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadTokens").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// What a token says; signed as JSON.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The object's plural (`packages`, `droplets`) and uid.
    pub resource: String,
    pub uid: String,
    /// Who the token was issued to.
    pub user: Caller,
    /// When it expires, in seconds since the epoch.
    pub expires: i64,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not an upload token")]
    Malformed,
    #[error("the upload token's signature does not match")]
    BadSignature,
    #[error("the upload token has expired")]
    Expired,
}

impl UploadTokens {
    /// Tokens signed with `secret` (at least [`MIN_KEY_LEN`] bytes, which the caller checks).
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        UploadTokens { key: hmac::Key::new(hmac::HMAC_SHA256, secret), ttl }
    }

    /// Tokens signed with a random key of this process: good only at this replica.
    pub fn random(ttl: Duration) -> Self {
        let mut secret = [0u8; MIN_KEY_LEN];
        aws_lc_rs::rand::fill(&mut secret).expect("the system's random source");
        Self::new(&secret, ttl)
    }

    /// A token for `user` to upload the object `resource`/`uid`, and when it expires.
    pub fn issue(&self, user: &Caller, resource: &str, uid: &str, now: Timestamp) -> (String, Timestamp) {
        let expires = now.as_second().saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX));
        let grant = Grant { resource: resource.into(), uid: uid.into(), user: user.clone(), expires };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&grant).expect("a grant serializes"));
        let tag = URL_SAFE_NO_PAD.encode(hmac::sign(&self.key, payload.as_bytes()));
        let at = Timestamp::from_second(expires).unwrap_or(Timestamp::MAX);
        (format!("{PREFIX}{payload}.{tag}"), at)
    }

    /// The grant of `token`, if this API signed it and it has not expired. The signature is checked (in constant
    /// time) before anything in the token is read.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<Grant, TokenError> {
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, payload.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        let grant: Grant = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if grant.expires <= now.as_second() {
            return Err(TokenError::Expired);
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Caller {
        Caller { username: "alice".into(), uid: None, groups: vec!["dev".into()], extra: Default::default() }
    }

    #[test]
    fn a_token_is_good_until_it_expires_and_only_as_signed() {
        let tokens = UploadTokens::new(&[7u8; 32], Duration::from_secs(300));
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let (token, expires) = tokens.issue(&alice(), "packages", "uid-1", now);
        assert!(token.starts_with(PREFIX));
        assert_eq!(expires.as_second(), 1_800_000_300);
        let grant = tokens.verify(&token, now).unwrap();
        assert_eq!((grant.resource.as_str(), grant.uid.as_str(), grant.user), ("packages", "uid-1", alice()));
        let later = Timestamp::from_second(1_800_000_300).unwrap();
        assert_eq!(tokens.verify(&token, later), Err(TokenError::Expired));

        // Another object or user spliced into the payload, another key, or garbage: refused.
        let (other, _) = tokens.issue(&alice(), "packages", "uid-2", now);
        let spliced = format!("{}.{}", other.rsplit_once('.').unwrap().0, token.rsplit_once('.').unwrap().1);
        assert_eq!(tokens.verify(&spliced, now), Err(TokenError::BadSignature));
        let stranger = UploadTokens::new(&[8u8; 32], Duration::from_secs(300));
        assert_eq!(stranger.verify(&token, now), Err(TokenError::BadSignature));
        assert_eq!(UploadTokens::random(Duration::from_secs(1)).verify(&token, now), Err(TokenError::BadSignature));
        for garbage in ["", "bitsmith-upload.", "bitsmith-upload.a", "bitsmith-upload.a.!!", "eyJhbGciOi.x.y"] {
            assert!(tokens.verify(garbage, now).is_err(), "{garbage}");
        }
    }
}
