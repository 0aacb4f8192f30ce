//! The leader's store audit, every `--audit-interval`: the blob of every READY (STAGED) object is looked for in a
//! listing of the store; an object whose blob is gone or has the wrong size is handed to its reconcile, which
//! looks again and acts (fetch again, or FAILED). Blobs of objects that no longer exist are removed after
//! `--orphan-grace`. See [`crate::audit`] for the rules.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::reconcile::Context;
use super::siblings::Kindred;
use crate::audit::{Audit, Expected, Finding, Report};
use crate::resources::{Droplet, Package};
use crate::status::CfState;

/// How often the store is audited, how old an orphan must be before it goes, and how often blobs are hashed
/// again.
#[derive(Clone, Copy, Debug)]
pub struct AuditOptions {
    pub interval: Duration,
    pub orphan_grace: Duration,
    /// Every this long, every READY (STAGED) object's blob is read and hashed again; never when `None`.
    pub verify_every: Option<Duration>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions { interval: Duration::from_secs(600), orphan_grace: Duration::from_secs(3600), verify_every: None }
    }
}

/// An object an audit found something wrong with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audited {
    Package(ObjectRef<Package>),
    Droplet(ObjectRef<Droplet>),
}

/// What audits found, by object uid, until each object's reconcile takes it.
#[derive(Default)]
pub struct Findings(std::sync::Mutex<HashMap<String, (String, Finding)>>);

impl Findings {
    /// The finding for the object `uid`, if its blob is `key`; taken, so that it is acted on once.
    pub fn take(&self, uid: &str, key: &str) -> Option<Finding> {
        let mut findings = self.0.lock().expect("findings lock");
        match findings.remove(uid) {
            Some((found_key, finding)) if found_key == key => Some(finding),
            _ => None,
        }
    }

    fn put(&self, uid: String, key: String, finding: Finding) {
        self.0.lock().expect("findings lock").insert(uid, (key, finding));
    }
}

/// Audit now, and then every `options.interval`, until dropped (when leading ends).
pub async fn run(ctx: Arc<Context>, options: AuditOptions) {
    // Judge nothing before the watch caches hold every object: an object not seen yet would look like an
    // orphan's owner gone.
    if !ctx.packages.filled().await || !ctx.droplets.filled().await {
        return;
    }
    tracing::info!(every = ?options.interval, verify = ?options.verify_every, "auditing the store");
    let _verifier = options.verify_every.map(|every| super::AbortOnDrop(tokio::spawn(verify(ctx.clone(), every))));
    loop {
        match audit(&ctx, options).await {
            Ok(report) => act(&ctx, report).await,
            Err(error) => tracing::warn!(%error, "auditing the store; trying again at the next interval"),
        }
        tokio::time::sleep(options.interval).await;
    }
}

/// Every object of one kind: `each` is given its uid, and its blob and status when it is READY (STAGED) with a
/// blob in this store.
fn walk<K: Kindred>(
    ctx: &Context,
    wrap: impl Fn(ObjectRef<K>) -> Audited,
    mut each: impl FnMut(String, Option<(Audited, &crate::resources::BlobRef, &crate::resources::StoredDigests)>),
) {
    for object in K::kin(ctx).store().state() {
        let Some(uid) = object.uid() else { continue };
        let stored = object
            .bits_status()
            .filter(|status| status.state == Some(K::State::DONE))
            .and_then(|status| Some((status.stored.blob.as_ref()?, &status.stored)))
            .filter(|(blob, _)| ctx.fetcher.store.holds(blob))
            .map(|(blob, stored)| (wrap(ObjectRef::from(object.as_ref())), blob, stored));
        each(uid, stored);
    }
}

/// Both kinds, [`walk`]ed.
fn walk_all(
    ctx: &Context,
    mut each: impl FnMut(String, Option<(Audited, &crate::resources::BlobRef, &crate::resources::StoredDigests)>),
) {
    walk::<Package>(ctx, Audited::Package, &mut each);
    walk::<Droplet>(ctx, Audited::Droplet, &mut each);
}

impl Audited {
    /// Note `finding` about the blob `key` for the object's reconcile, and have it reconciled now.
    fn hand_over(self, ctx: &Context, uid: String, key: String, finding: Finding) {
        tracing::warn!(object = ?self, key, reason = finding.reason(), "the stored bits of an object are wrong");
        ctx.findings.put(uid, key, finding);
        match self {
            Audited::Package(object) => ctx.packages.reconcile(object),
            Audited::Droplet(object) => ctx.droplets.reconcile(object),
        }
    }
}

/// One audit: the expected blobs against a listing of the store, streamed.
async fn audit(ctx: &Context, options: AuditOptions) -> Result<Report<(String, Audited)>, crate::store::StoreError> {
    let started = std::time::Instant::now();
    let (mut expected, mut live) = (HashMap::new(), HashSet::new());
    walk_all(ctx, |uid, stored| {
        if let Some((object, blob, digests)) = stored
            && let Some(size) = digests.size
        {
            expected.insert(blob.key.clone(), Expected { size, owner: (uid.clone(), object) });
        }
        live.insert(uid);
    });
    let mut audit = Audit::new(expected, live, options.orphan_grace, SystemTime::now());
    for prefix in ["packages/", "droplets/"] {
        audit = crate::audit::over(audit, ctx.fetcher.store.listing(prefix)).await?;
    }
    let report = audit.finish();
    tracing::info!(
        blobs = report.blobs,
        bytes = report.bytes,
        findings = report.findings.len(),
        orphans = report.orphans.len(),
        took = ?started.elapsed(),
        "audited the store"
    );
    Ok(report)
}

/// Hand each finding to its object's reconcile, and remove the orphans.
async fn act(ctx: &Context, report: Report<(String, Audited)>) {
    ctx.metrics.audited(report.blobs, report.bytes, report.findings.len() as u64);
    for ((uid, object), key, finding) in report.findings {
        object.hand_over(ctx, uid, key, finding);
    }
    for key in report.orphans {
        if !ctx.leadership.check() {
            return;
        }
        match ctx.fetcher.store.delete(&key).await {
            Ok(()) => {
                tracing::info!(key, "removed an orphaned blob");
                ctx.metrics.orphan_removed();
            }
            Err(error) => tracing::warn!(%error, key, "removing an orphaned blob"),
        }
    }
}

/// Read and hash every READY (STAGED) object's blob again, every `every`, each in a transfer slot like a fetch;
/// a blob whose sha256 is not the recorded one is a finding.
async fn verify(ctx: Arc<Context>, every: Duration) {
    loop {
        let mut blobs = Vec::new();
        walk_all(&ctx, |uid, stored| {
            if let Some((object, blob, digests)) = stored
                && let Some(sha256) = &digests.checksum
            {
                blobs.push((uid, object, blob.key.clone(), sha256.value.clone()));
            }
        });
        let (started, count) = (std::time::Instant::now(), blobs.len());
        let mut wrong = 0;
        for (uid, object, key, recorded) in blobs {
            let _slot = ctx.fetcher.budget.start().await;
            match hash(&ctx.fetcher.store, &key).await {
                Ok(found) if found == recorded => {}
                Ok(found) => {
                    wrong += 1;
                    object.hand_over(&ctx, uid, key, Finding::WrongDigest { recorded, found });
                }
                // A blob that is gone is the audit's to find.
                Err(error) => tracing::debug!(%error, key, "verifying a blob"),
            }
        }
        ctx.metrics.audited_digests(wrong);
        tracing::info!(blobs = count, wrong, took = ?started.elapsed(), "verified the stored bits");
        tokio::time::sleep(every).await;
    }
}

/// The sha256 of the blob at `key`, streamed.
async fn hash(store: &crate::store::BlobStore, key: &str) -> Result<String, crate::store::StoreError> {
    use futures::TryStreamExt;
    let (_, mut bytes) = store.read(key).await?;
    let mut digester = crate::digest::Digester::new();
    while let Some(chunk) = bytes.try_next().await? {
        digester.update(chunk).await;
    }
    Ok(digester.finish().await.sha256)
}
