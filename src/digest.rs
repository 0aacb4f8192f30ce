//! The digest half of the pipeline: sha1 and sha256 of a byte stream in one pass.
//!
//! Each hash works through its blocks on tokio's blocking pool (see [`crate::workers`]), so on a fast stream the
//! two hashes use both cores while the caller goes on writing the same bytes to the store, and a slow stream
//! holds no thread between its blocks. A hash that falls behind makes [`Digester::update`] wait, which slows
//! the reader down: that is what bounds memory.

use bytes::Bytes;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::workers::{BlockWork, Offloaded};

/// Blocks queued per hash while it works on earlier ones.
pub const QUEUE_DEPTH: usize = 4;

/// The result of hashing a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    /// Lowercase hex sha1.
    pub sha1: String,
    /// Lowercase hex sha256.
    pub sha256: String,
    /// Number of bytes hashed.
    pub size: u64,
}

impl Digests {
    /// The sha256 as an OCI-style digest, `sha256:<hex>`.
    pub fn oci_digest(&self) -> String {
        format!("sha256:{}", self.sha256)
    }
}

/// Hashes blocks handed to it, in order, with sha1 and sha256 in parallel.
pub struct Digester {
    sha1: Offloaded<Hashing<Sha1>>,
    sha256: Offloaded<Hashing<Sha256>>,
    size: u64,
}

/// A hash as [`BlockWork`].
struct Hashing<D>(D);

impl<D: Digest + Send + 'static> BlockWork for Hashing<D> {
    fn update(&mut self, block: &[u8]) -> Result<(), String> {
        self.0.update(block);
        Ok(())
    }
}

impl<D: Digest + Send + 'static> Hashing<D> {
    fn offloaded() -> Offloaded<Self> {
        Offloaded::new(Hashing(D::new()), QUEUE_DEPTH)
    }

    async fn hex(offloaded: Offloaded<Self>) -> String {
        match offloaded.finish().await {
            Ok(Hashing(hasher)) => to_hex(&hasher.finalize()),
            Err(never) => unreachable!("hashing does not fail: {never}"),
        }
    }
}

impl Digester {
    /// Start hashing. Must be called inside a tokio runtime.
    pub fn new() -> Self {
        Digester { sha1: Hashing::offloaded(), sha256: Hashing::offloaded(), size: 0 }
    }

    /// Bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hash the next block. Waits while the hashes are behind. `Bytes` clones share the buffer, so the caller
    /// can pass the same block on to the store without a copy.
    pub async fn update(&mut self, block: Bytes) {
        self.size += block.len() as u64;
        // Hashing cannot fail, so a push is always taken.
        self.sha1.push(block.clone()).await;
        self.sha256.push(block).await;
    }

    /// Wait for both hashes and return the digests.
    pub async fn finish(self) -> Digests {
        let size = self.size;
        let (sha1, sha256) = tokio::join!(Hashing::hex(self.sha1), Hashing::hex(self.sha256));
        Digests { sha1, sha256, size }
    }
}

impl Default for Digester {
    fn default() -> Self {
        Self::new()
    }
}

/// Lowercase hex of a byte string.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn known_vectors() {
        let mut d = Digester::new();
        d.update(Bytes::from_static(b"ab")).await;
        d.update(Bytes::from_static(b"c")).await;
        let got = d.finish().await;
        assert_eq!(got.sha1, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(got.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(got.size, 3);
        assert_eq!(got.oci_digest(), format!("sha256:{}", got.sha256));
    }

    #[tokio::test]
    async fn empty_input() {
        let got = Digester::new().finish().await;
        assert_eq!(got.sha1, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(got.sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(got.size, 0);
    }
}
