//! Droplets are gzip-compressed tar archives. [`TgzCheck`] inflates the bytes as they go by and checks the gzip
//! framing (header, deflate data, trailer CRC and length) and that what is inside starts with a valid tar header.
//! The inflated bytes are only counted, never kept.

use std::io::Write;

use flate2::write::MultiGzDecoder;

use crate::pipeline::ContentCheck;

const TAR_BLOCK: usize = 512;

/// Checks that a stream is a non-empty `.tgz`; inflates at most `max_inflated` bytes, so that a gzip bomb costs
/// bounded time.
pub struct TgzCheck {
    decoder: MultiGzDecoder<TarProbe>,
}

impl TgzCheck {
    pub fn new(max_inflated: u64) -> Self {
        TgzCheck {
            decoder: MultiGzDecoder::new(TarProbe { first: Vec::with_capacity(TAR_BLOCK), inflated: 0, max_inflated }),
        }
    }
}

/// Keeps the first tar block and counts the rest.
struct TarProbe {
    first: Vec<u8>,
    inflated: u64,
    max_inflated: u64,
}

impl Write for TarProbe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inflated += buf.len() as u64;
        if self.inflated > self.max_inflated {
            return Err(std::io::Error::other(format!("it inflates to more than {} bytes", self.max_inflated)));
        }
        let wanted = (TAR_BLOCK - self.first.len()).min(buf.len());
        self.first.extend_from_slice(&buf[..wanted]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ContentCheck for TgzCheck {
    fn update(&mut self, block: &[u8]) -> Result<(), String> {
        self.decoder.write_all(block).map_err(|e| format!("not a gzip-compressed tar archive: {e}"))
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.decoder.try_finish().map_err(|e| format!("not a gzip-compressed tar archive: {e}"))?;
        let probe = self.decoder.get_ref();
        if probe.inflated == 0 {
            return Err("the archive is empty".into());
        }
        tar_header(&probe.first)
    }
}

/// A tar header block: a name, and a checksum that matches (the sum of its bytes with the checksum field
/// counted as spaces).
fn tar_header(block: &[u8]) -> Result<(), String> {
    if block.len() < TAR_BLOCK || block.iter().all(|&b| b == 0) {
        return Err("the archive holds no files".into());
    }
    let recorded = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok())
        .ok_or("not a tar archive: no header checksum")?;
    let actual: u32 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u32::from(b) }).sum();
    if recorded != actual {
        return Err("not a tar archive: header checksum mismatch".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    /// A tar archive of one file, made by hand.
    fn tar(name: &str, content: &[u8]) -> Vec<u8> {
        let mut header = [0u8; TAR_BLOCK];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..108].copy_from_slice(b"0000644\0");
        header[124..136].copy_from_slice(format!("{:011o}\0", content.len()).as_bytes());
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut out = header.to_vec();
        out.extend_from_slice(content);
        out.resize(out.len().div_ceil(TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK, 0);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn check(bytes: &[u8], chunk: usize) -> Result<(), String> {
        let mut check = Box::new(TgzCheck::new(1 << 20));
        for block in bytes.chunks(chunk) {
            check.update(block)?;
        }
        check.finish()
    }

    #[test]
    fn a_tgz_passes_in_any_chunking() {
        let tgz = gzip(&tar("app/start", b"#!/bin/sh\nexec ./web\n"));
        for chunk in [1, 7, 512, 1 << 16] {
            assert_eq!(check(&tgz, chunk), Ok(()), "chunks of {chunk}");
        }
    }

    #[test]
    fn what_is_not_a_tgz_is_refused() {
        let tgz = gzip(&tar("app/start", b"x"));
        assert!(check(b"PK\x03\x04 a zip", 64).unwrap_err().contains("gzip"));
        assert!(check(&tgz[..tgz.len() - 9], 64).is_err(), "truncated");
        let mut bad_crc = tgz.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 0xff;
        assert!(check(&bad_crc, 64).is_err(), "a wrong CRC");
        assert_eq!(check(&gzip(b""), 64), Err("the archive is empty".into()));
        assert!(check(&gzip(&[0u8; 1024]), 64).unwrap_err().contains("no files"));
        assert!(check(&gzip(&[b'x'; 1024]), 64).unwrap_err().contains("not a tar"));
        assert!(check(&gzip(&vec![0u8; 2 << 20]), 1 << 16).unwrap_err().contains("inflates to more than"));
    }
}
