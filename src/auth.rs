//! Authentication and authorization by Kubernetes. A bearer token is checked with a TokenReview; each action on
//! an object with a SubjectAccessReview in the object's namespace (e.g. `create packages/upload`). Both answers
//! are cached for a short while, so that a client polling a Package does not cost two API calls per request, and
//! a revoked token or role stops working within that while.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::api::errors::CfError;
use crate::metrics::Metrics;
use crate::resources::GROUP;

/// Who is calling, as Kubernetes authenticated them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Caller {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// An action on one object: `verb` on `resource[/subresource]` named `name` in `namespace` (on every object of
/// the namespace when `name` is empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub namespace: String,
    pub name: String,
}

/// A map whose entries expire, bounded so that a flood of distinct tokens cannot grow it without end.
struct Expiring<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

const MAX_CACHED: usize = 10_000;

impl<K: Eq + Hash, V: Clone> Expiring<K, V> {
    fn new(ttl: Duration) -> Self {
        Expiring { ttl, entries: Mutex::default() }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap();
        entries.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= MAX_CACHED {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }
}

/// Checks tokens and actions with the Kubernetes API.
pub struct Authorizer {
    client: Client,
    /// By the token's sha256, so that tokens themselves are not kept.
    tokens: Expiring<[u8; 32], Option<Caller>>,
    decisions: Expiring<(String, Vec<String>, Access), bool>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    /// Answers are reused for `ttl`; how long kube-apiserver takes to give them goes into `metrics`.
    pub fn new(client: Client, ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Authorizer { client, tokens: Expiring::new(ttl), decisions: Expiring::new(ttl), metrics }
    }

    /// The caller behind an `Authorization` header value: 401 CF-NotAuthenticated without one, 401
    /// CF-InvalidAuthToken for anything Kubernetes does not accept.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, CfError> {
        let header = authorization.map(str::trim).filter(|h| !h.is_empty()).ok_or(CfError::NotAuthenticated)?;
        let token = bearer_token(header).ok_or(CfError::InvalidAuthToken)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let caller = match self.tokens.get(&key) {
            Some(cached) => cached,
            None => {
                let caller = self.review_token(token).await?;
                self.tokens.put(key, caller.clone());
                caller
            }
        };
        caller.ok_or(CfError::InvalidAuthToken)
    }

    async fn review_token(&self, token: &str) -> Result<Option<Caller>, CfError> {
        let review =
            TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences: None }, ..Default::default() };
        let started = Instant::now();
        let reviewed = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await;
        self.metrics.reviewed("TokenReview", started.elapsed());
        let reviewed = reviewed.map_err(|e| CfError::internal("TokenReview failed", &e))?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
            return Ok(None);
        };
        let user = status.user.unwrap_or_default();
        Ok(Some(Caller {
            username: user.username.unwrap_or_default(),
            uid: user.uid,
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        }))
    }

    /// Allow `access` for `caller`, or 403 CF-NotAuthorized.
    pub async fn authorize(&self, caller: &Caller, access: &Access) -> Result<(), CfError> {
        if self.allows(caller, access).await? { Ok(()) } else { Err(CfError::NotAuthorized) }
    }

    /// Whether Kubernetes allows `access` for `caller`.
    pub async fn allows(&self, caller: &Caller, access: &Access) -> Result<bool, CfError> {
        let key = (caller.username.clone(), caller.groups.clone(), access.clone());
        if let Some(allowed) = self.decisions.get(&key) {
            return Ok(allowed);
        }
        let allowed = self.review_access(caller, access).await?;
        self.decisions.put(key, allowed);
        Ok(allowed)
    }

    async fn review_access(&self, caller: &Caller, access: &Access) -> Result<bool, CfError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: Some(caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_string()),
                    resource: Some(access.resource.to_string()),
                    subresource: access.subresource.map(str::to_string),
                    verb: Some(access.verb.to_string()),
                    namespace: Some(access.namespace.clone()),
                    // No name: any object of the namespace.
                    name: (!access.name.is_empty()).then(|| access.name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let started = Instant::now();
        let reviewed =
            Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await;
        self.metrics.reviewed("SubjectAccessReview", started.elapsed());
        let reviewed = reviewed.map_err(|e| CfError::internal("SubjectAccessReview failed", &e))?;
        Ok(reviewed.status.is_some_and(|s| s.allowed))
    }
}

/// The token of `bearer <token>` (the scheme in any case, as CF clients send both `bearer` and `Bearer`).
pub(crate) fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("bearer abc.def"), Some("abc.def"));
        assert_eq!(bearer_token("Bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn cached_answers_expire() {
        let cache = Expiring::new(Duration::from_millis(30));
        cache.put("k", 1);
        assert_eq!(cache.get(&"k"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&"k"), None);
    }
}
