//! Deterministic test bytes of any size, generated on the fly (never held whole in memory), and their digests
//! computed independently by coreutils' `sha1sum` and `sha256sum`.

use std::io::Write;
use std::process::{Command, Stdio};

use bitsmith::digest::Digests;
use bytes::Bytes;

/// Fill `buf` with the bytes at `offset..offset+buf.len()` of the stream named by `seed`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    if offset.is_multiple_of(8) {
        for (i, word) in buf.chunks_mut(8).enumerate() {
            let bytes = splitmix(seed ^ (offset / 8 + i as u64)).to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        return;
    }
    for (i, byte) in buf.iter_mut().enumerate() {
        let position = offset + i as u64;
        let word = splitmix(seed ^ (position / 8));
        *byte = (word >> ((position % 8) * 8)) as u8;
    }
}

/// The first `len` bytes of the stream named by `seed`, for data small enough to hold.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fill(seed, 0, &mut buf);
    buf
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// The stream in blocks of `chunk` bytes.
pub fn chunks(seed: u64, size: u64, chunk: usize) -> impl Iterator<Item = Bytes> {
    (0..size.div_ceil(chunk as u64)).map(move |i| {
        let offset = i * chunk as u64;
        let mut buf = vec![0u8; (size - offset).min(chunk as u64) as usize];
        fill(seed, offset, &mut buf);
        Bytes::from(buf)
    })
}

/// Write the stream to a file.
pub fn write_file(path: &std::path::Path, seed: u64, size: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for chunk in chunks(seed, size, 1 << 20) {
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
}

/// The digests of the stream as `sha1sum` and `sha256sum` report them.
pub fn coreutils_digests(seed: u64, size: u64) -> Digests {
    let spawn = |tool: &str| {
        Command::new(tool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    };
    let mut sha1 = spawn("sha1sum");
    let mut sha256 = spawn("sha256sum");
    {
        let mut in1 = sha1.stdin.take().unwrap();
        let mut in256 = sha256.stdin.take().unwrap();
        for chunk in chunks(seed, size, 1 << 20) {
            in1.write_all(&chunk).unwrap();
            in256.write_all(&chunk).unwrap();
        }
    }
    let hex = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    Digests { sha1: hex(sha1), sha256: hex(sha256), size }
}

/// The digests of `size` bytes made of `block` over and over ([`super::http_server::Reply::Repeated`]), sha1 and
/// sha256 each on a thread of its own.
pub fn repeated_digests(block: &[u8], size: u64) -> Digests {
    fn digest<D: sha2::Digest>(block: &[u8], size: u64) -> String {
        let mut hasher = D::new();
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            hasher.update(&block[..n]);
            left -= n as u64;
        }
        bitsmith::digest::to_hex(&hasher.finalize())
    }
    std::thread::scope(|scope| {
        let sha1 = scope.spawn(|| digest::<sha1::Sha1>(block, size));
        let sha256 = digest::<sha2::Sha256>(block, size);
        Digests { sha1: sha1.join().unwrap(), sha256, size }
    })
}
