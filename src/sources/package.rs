//! The package source: another Package's bits, copied inside the store.

use super::SourceError;
use crate::digest::Digests;
use crate::resources::{BlobRef, Package, PackageState};

/// A READY Package's blob and digests, ready to be copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageCopy {
    pub blob: BlobRef,
    pub digests: Digests,
}

/// Check that `source` can be copied: READY, with digests, and its blob in the store at `store_url`.
///
/// The digests are taken from the source's status rather than recomputed: bitsmith measured them when it
/// stored that blob, and blobs are never modified in place.
pub fn resolve_package_copy(source: &Package, store_url: &str) -> Result<PackageCopy, SourceError> {
    let name = source.metadata.name.clone().unwrap_or_default();
    let not_ready = |reason: String| SourceError::PackageNotReady { name: name.clone(), reason };
    let status = source.status.as_ref().ok_or_else(|| not_ready("has no status yet".into()))?;
    if status.state != Some(PackageState::Ready) {
        let state = status.state.map(|s| format!("{s:?}")).unwrap_or_else(|| "unknown".into());
        return Err(not_ready(format!("is not READY (state {state})")));
    }
    let stored = &status.stored;
    let (Some(checksum), Some(hash), Some(size), Some(blob)) =
        (&stored.checksum, &stored.hash, stored.size, &stored.blob)
    else {
        return Err(not_ready("is READY but its status lacks checksum, hash, size or blob".into()));
    };
    if blob.store != store_url {
        // Copying across stores would need this operator's credentials on a store named by a status field;
        // refuse rather than widen what a status writer can reach.
        return Err(SourceError::InvalidUrl {
            url: blob.store.clone(),
            reason: format!("the source Package's bits live in another store than {store_url}; fetch them again"),
        });
    }
    Ok(PackageCopy {
        blob: blob.clone(),
        digests: Digests { sha1: hash.value.clone(), sha256: checksum.value.clone(), size },
    })
}
