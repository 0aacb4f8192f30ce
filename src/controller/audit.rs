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
        self.take_if(uid, key)
    }

    fn take_if(&self, uid: &str, key: &str) -> Option<Finding> {
        let mut findings = self.0.lock().expect("findings lock");
        match findings.remove(uid) {
            Some((found_key, finding)) if found_key == key => Some(finding),
            _ => None,
        }
    }

    /// Note `finding` about the blob `key` of the object `uid`, for its next reconcile to look into.
    pub fn put(&self, uid: String, key: String, finding: Finding) {
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

/// The READY (STAGED) objects' blobs, by key, and the uids of all objects, of one kind.
fn expected_of<K: Kindred>(
    ctx: &Context,
    wrap: impl Fn(ObjectRef<K>) -> Audited,
    expected: &mut HashMap<String, Expected<(String, Audited)>>,
    live: &mut HashSet<String>,
) {
    for object in K::kin(ctx).store().state() {
        let Some(uid) = object.uid() else { continue };
        live.insert(uid.clone());
        let Some(status) = object.bits_status() else { continue };
        if status.state != Some(K::State::DONE) {
            continue;
        }
        if let (Some(blob), Some(size)) = (&status.stored.blob, status.stored.size)
            && ctx.fetcher.store.holds(blob)
        {
            let owner = (uid, wrap(ObjectRef::from(object.as_ref())));
            expected.insert(blob.key.clone(), Expected { size, owner });
        }
    }
}

/// One audit: the expected blobs against a listing of the store, streamed.
async fn audit(ctx: &Context, options: AuditOptions) -> Result<Report<(String, Audited)>, crate::store::StoreError> {
    let started = std::time::Instant::now();
    let (mut expected, mut live) = (HashMap::new(), HashSet::new());
    expected_of::<Package>(ctx, Audited::Package, &mut expected, &mut live);
    expected_of::<Droplet>(ctx, Audited::Droplet, &mut expected, &mut live);
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
        tracing::warn!(?object, key, reason = finding.reason(), "the audit found an object's bits wrong");
        ctx.findings.put(uid, key, finding);
        match object {
            Audited::Package(object) => ctx.packages.reconcile(object),
            Audited::Droplet(object) => ctx.droplets.reconcile(object),
        }
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
        verifiable::<Package>(&ctx, Audited::Package, &mut blobs);
        verifiable::<Droplet>(&ctx, Audited::Droplet, &mut blobs);
        let (started, count) = (std::time::Instant::now(), blobs.len());
        let mut wrong = 0;
        for (uid, object, key, recorded) in blobs {
            let _slot = ctx.fetcher.budget.start().await;
            match hash(&ctx.fetcher.store, &key).await {
                Ok(found) if found == recorded => {}
                Ok(found) => {
                    wrong += 1;
                    tracing::warn!(?object, key, "a blob hashes to other bits than recorded");
                    ctx.findings.put(uid, key, Finding::WrongDigest { recorded, found });
                    match object {
                        Audited::Package(object) => ctx.packages.reconcile(object),
                        Audited::Droplet(object) => ctx.droplets.reconcile(object),
                    }
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

/// The READY (STAGED) objects of one kind whose blob and sha256 are recorded.
fn verifiable<K: Kindred>(
    ctx: &Context,
    wrap: impl Fn(ObjectRef<K>) -> Audited,
    out: &mut Vec<(String, Audited, String, String)>,
) {
    for object in K::kin(ctx).store().state() {
        let (Some(uid), Some(status)) = (object.uid(), object.bits_status()) else { continue };
        if status.state != Some(K::State::DONE) {
            continue;
        }
        if let (Some(blob), Some(sha256)) = (&status.stored.blob, &status.stored.checksum)
            && ctx.fetcher.store.holds(blob)
        {
            out.push((uid, wrap(ObjectRef::from(object.as_ref())), blob.key.clone(), sha256.value.clone()));
        }
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
