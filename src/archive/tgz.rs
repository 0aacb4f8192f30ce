//! Droplets are gzip-compressed tar archives. [`TgzCheck`] inflates the bytes as they go by, checks the gzip
//! framing (header, deflate data, trailer CRC and length) and walks every tar header of what is inside: each
//! must have a valid checksum, a safe name, a type a droplet may hold, and the archive must end with its
//! end-of-archive marker. Entry data is only counted, never kept.
//!
//! The walk is a push parser fed by the gzip decoder, like the check itself: the `tar` crate reads by pulling,
//! so it would need a thread and a channel between the pushed blocks and its reader, and it reads GNU long
//! names and pax headers whole into memory, which a hostile archive makes as large as it likes. Here they are
//! capped ([`MAX_NAME_LEN`], [`MAX_PAX_LEN`]), and nothing else is kept across entries.
//!
//! Each entry's name is its pax `path`, else its GNU long name, else the ustar prefix and name, as GNU tar and
//! Python's `tarfile` read them; cases where those readers would disagree (both a long name and a pax path, two
//! extended headers for one entry, data behind a link or directory, global pax names) are refused.

use std::borrow::Cow;
use std::io::Write;

use flate2::write::MultiGzDecoder;

use crate::archive::zip::{MAX_NAME_LEN, MAX_RATIO, inflates_like_a_bomb};
use crate::pipeline::ContentCheck;

const TAR_BLOCK: usize = 512;
/// The numeric fields of a header besides size and checksum: mode, uid, gid, mtime, device major and minor.
const NUMBERS: [std::ops::Range<usize>; 6] = [100..108, 108..116, 116..124, 136..148, 329..337, 337..345];
/// Compressed bytes given to the decoder at once: a bomb inflates at most [`MAX_RATIO`] times this past its limit.
const RATIO_STEP: usize = 16 << 10;
/// The most a pax extended header may hold: paths and a few attributes, far below this.
pub const MAX_PAX_LEN: u64 = 64 << 10;

/// Checks that a stream is a non-empty `.tgz` whose entries are safe to extract; inflates at most
/// `max_inflated` bytes, and past a megabyte at most [`MAX_RATIO`] times what it was given, as zips: a gzip
/// bomb costs time in proportion to its own size, not to what it would inflate to.
pub struct TgzCheck {
    decoder: MultiGzDecoder<TarWalk>,
}

impl TgzCheck {
    pub fn new(max_inflated: u64) -> Self {
        TgzCheck { decoder: MultiGzDecoder::new(TarWalk::new(max_inflated)) }
    }

    /// A check that also lists the entries it walked, for tests.
    #[cfg(test)]
    pub(crate) fn listing(max_inflated: u64) -> Self {
        let mut walk = TarWalk::new(max_inflated);
        walk.listing = Some(Vec::new());
        TgzCheck { decoder: MultiGzDecoder::new(walk) }
    }

    /// Bytes inflated, and looked at in headers and extended headers, so far.
    pub fn work(&self) -> u64 {
        self.decoder.get_ref().work
    }

    /// Bytes inflated so far.
    pub fn inflated(&self) -> u64 {
        self.decoder.get_ref().position
    }

    /// The entries walked so far, when made by [`TgzCheck::listing`].
    #[cfg(test)]
    pub(crate) fn entries(&self) -> &[TarEntry] {
        self.decoder.get_ref().listing.as_deref().unwrap_or_default()
    }

    /// The final verdict, leaving the check in place to be asked about afterwards.
    pub(crate) fn conclude(&mut self) -> Result<(), String> {
        self.decoder.try_finish().map_err(|e| self.refusal(e))?;
        self.decoder.get_ref().finish()
    }

    fn refusal(&self, error: std::io::Error) -> String {
        match &self.decoder.get_ref().failure {
            Some(reason) => reason.clone(),
            None => format!("not a gzip-compressed tar archive: {error}"),
        }
    }
}

impl ContentCheck for TgzCheck {
    fn update(&mut self, block: &[u8]) -> Result<(), String> {
        // In small pieces, so that the ratio is held against what was inflated from so far, not against a whole
        // block that a bomb's first bytes already inflate past.
        for piece in block.chunks(RATIO_STEP) {
            let walk = self.decoder.get_mut();
            walk.compressed = walk.compressed.saturating_add(piece.len() as u64);
            self.decoder.write_all(piece).map_err(|e| self.refusal(e))?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.conclude()
    }
}

/// An entry as the walk saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    pub name: Vec<u8>,
    /// `0` regular file, `1` hard link, `2` symlink, `5` directory.
    pub kind: u8,
    pub size: u64,
}

enum Tar {
    /// Filling `block` with the next header.
    Header,
    /// Skipping this many bytes of entry data and padding.
    Skip(u64),
    /// Reading the data of an extension header (GNU long name or link, pax): `left` bytes, then `padding`.
    Extension { kind: u8, left: u64, padding: u64 },
    /// One zero block seen: the end marker has two.
    Zero,
    /// The end marker seen: only zeros may follow.
    End,
}

/// What pax extended headers say of the next entry.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

/// Walks the tar headers of the inflated stream written to it.
struct TarWalk {
    state: Tar,
    block: [u8; TAR_BLOCK],
    filled: usize,
    /// Offset of the next byte in the inflated stream.
    position: u64,
    max_inflated: u64,
    /// Compressed bytes given to the decoder so far, which the inflated ones are held against.
    compressed: u64,
    /// The data of the extension header being read.
    extension: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Pax>,
    entries: u64,
    work: u64,
    /// Why the walk stopped, for the error the check reports.
    failure: Option<String>,
    listing: Option<Vec<TarEntry>>,
}

impl Write for TarWalk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let inflated = self.position.saturating_add(buf.len() as u64);
        let walked = if inflated > self.max_inflated {
            Err(format!("it inflates to more than {} bytes", self.max_inflated))
        } else if inflates_like_a_bomb(inflated, self.compressed) {
            Err(format!("it inflates more than {MAX_RATIO} times, like a gzip bomb"))
        } else {
            self.walk(buf)
        };
        walked.map_err(|reason| {
            self.failure = Some(reason.clone());
            std::io::Error::other(reason)
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TarWalk {
    fn new(max_inflated: u64) -> Self {
        TarWalk {
            state: Tar::Header,
            block: [0; TAR_BLOCK],
            filled: 0,
            position: 0,
            max_inflated,
            compressed: 0,
            extension: Vec::new(),
            long_name: None,
            long_link: None,
            pax: None,
            entries: 0,
            work: 0,
            failure: None,
            listing: None,
        }
    }

    fn walk(&mut self, mut buf: &[u8]) -> Result<(), String> {
        while !buf.is_empty() {
            let taken = match &mut self.state {
                Tar::Header | Tar::Zero => {
                    if self.filled == 0
                        && let Some(block) = buf.first_chunk::<TAR_BLOCK>()
                    {
                        // A whole header at hand: read it where it is.
                        self.header(block, self.position)?;
                        TAR_BLOCK
                    } else {
                        let n = (TAR_BLOCK - self.filled).min(buf.len());
                        self.block[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
                        self.filled += n;
                        if self.filled == TAR_BLOCK {
                            self.filled = 0;
                            let block = self.block;
                            self.header(&block, self.position + n as u64 - TAR_BLOCK as u64)?;
                        }
                        n
                    }
                }
                Tar::Skip(left) => {
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = Tar::Header;
                    }
                    n
                }
                Tar::Extension { kind, left, padding } => {
                    let n = (*left).min(buf.len() as u64) as usize;
                    self.extension.extend_from_slice(&buf[..n]);
                    *left -= n as u64;
                    if *left == 0 {
                        let (kind, padding) = (*kind, *padding);
                        self.extended(kind)?;
                        self.state = if padding == 0 { Tar::Header } else { Tar::Skip(padding) };
                    }
                    n
                }
                Tar::End => {
                    if buf.iter().any(|&b| b != 0) {
                        return Err("data after the end of the archive".into());
                    }
                    buf.len()
                }
            };
            self.position += taken as u64;
            self.work += taken as u64;
            buf = &buf[taken..];
        }
        Ok(())
    }

    /// The stream ended: it must have ended at the end-of-archive marker, after at least one entry.
    fn finish(&self) -> Result<(), String> {
        match self.state {
            Tar::End => Ok(()),
            _ if self.position == 0 => Err("the archive is empty".into()),
            _ => Err("the tar archive is truncated: it ends without its end-of-archive marker".into()),
        }
    }

    /// A full header block has arrived, from offset `at` of the inflated stream.
    fn header(&mut self, block: &[u8; TAR_BLOCK], at: u64) -> Result<(), String> {
        self.work += TAR_BLOCK as u64;
        if block.iter().all(|&b| b == 0) {
            if self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some() {
                return Err(format!("an extended header without its entry, at offset {at}"));
            }
            if at == 0 {
                return Err("the archive holds no files".into());
            }
            self.state = if matches!(self.state, Tar::Zero) { Tar::End } else { Tar::Zero };
            return Ok(());
        }
        if matches!(self.state, Tar::Zero) {
            return Err(format!("a lone zero block before the header at offset {at}"));
        }
        let recorded = octal(&block[148..156]).ok_or_else(|| format!("not a tar header at offset {at}"))?;
        if !checksum_matches(block, recorded) {
            return Err(if self.entries == 0 && at == 0 {
                "not a tar archive: header checksum mismatch".into()
            } else {
                format!("a tar header with a bad checksum at offset {at}")
            });
        }
        let kind = block[156];
        let size =
            number(&block[124..136]).ok_or_else(|| format!("a tar header with an unreadable size at offset {at}"))?;
        // Readers that cannot read a number take the header for the archive's end, and miss what follows.
        if NUMBERS.iter().any(|field| number(&block[field.clone()]).is_none()) {
            return Err(format!("a tar header with an unreadable number at offset {at}"));
        }
        match kind {
            b'L' | b'K' | b'x' | b'X' | b'g' => {
                let max = if matches!(kind, b'L' | b'K') { MAX_NAME_LEN as u64 + 1 } else { MAX_PAX_LEN };
                if size > max {
                    return Err(format!("an extended header of {size} bytes, over the {max} allowed, at offset {at}"));
                }
                let pending = match kind {
                    b'L' => self.long_name.is_some(),
                    b'K' => self.long_link.is_some(),
                    b'x' | b'X' => self.pax.is_some(),
                    _ => false,
                };
                if pending {
                    return Err(format!("two extended headers of one kind for one entry, at offset {at}"));
                }
                self.extension.clear();
                let padding = padding(size);
                self.state = Tar::Extension { kind, left: size, padding };
                if size == 0 {
                    self.extended(kind)?;
                    self.state = if padding == 0 { Tar::Header } else { Tar::Skip(padding) };
                }
                Ok(())
            }
            _ => self.entry(block, kind, size, at),
        }
    }

    /// An extension header's data has arrived.
    fn extended(&mut self, kind: u8) -> Result<(), String> {
        self.work += self.extension.len() as u64;
        let data = std::mem::take(&mut self.extension);
        match kind {
            b'L' => self.long_name = Some(long_name(&data)?),
            b'K' => self.long_link = Some(long_name(&data)?),
            b'g' => {
                let global = pax(&data)?;
                if global.path.is_some() || global.linkpath.is_some() || global.size.is_some() {
                    return Err("a global pax header that names or sizes every entry".into());
                }
            }
            _ => self.pax = Some(pax(&data)?),
        }
        Ok(())
    }

    fn entry(&mut self, block: &[u8; TAR_BLOCK], kind: u8, size: u64, at: u64) -> Result<(), String> {
        let own = field(&block[..100]);
        // An old (v7) tar marks a directory by the slash that ends its name.
        let kind = if kind == 0 && own.ends_with(b"/") { b'5' } else { kind };
        let prefix = field(&block[345..500]);
        // Most entries carry their whole name in the header: borrow it rather than copy it.
        let mut name = Cow::Borrowed(own);
        if !prefix.is_empty() {
            name = Cow::Owned([prefix, &b"/"[..], own].concat());
        }
        let mut link = Cow::Borrowed(field(&block[157..257]));
        let pax = self.pax.take().unwrap_or_default();
        let (long_name, long_link) = (self.long_name.take(), self.long_link.take());
        if (pax.path.is_some() && long_name.is_some()) || (pax.linkpath.is_some() && long_link.is_some()) {
            return Err(format!("an entry named by both a GNU long name and a pax header, at offset {at}"));
        }
        if let Some(long) = pax.path.or(long_name) {
            name = Cow::Owned(long);
        }
        if let Some(long) = pax.linkpath.or(long_link) {
            link = Cow::Owned(long);
        }
        let size = pax.size.unwrap_or(size);
        // The name as errors show it; made only for an error.
        let shown = || String::from_utf8_lossy(&name);
        safe_name(&name).map_err(|reason| format!("an unsafe name {:?}: {reason}", shown()))?;
        let kind = match kind {
            b'0' | 0 | b'7' => b'0',
            b'1' => {
                // A hard link to a path outside the root would extract as that file.
                safe_name(&link).map_err(|reason| {
                    format!("{:?}: a hard link to {:?}: {reason}", shown(), String::from_utf8_lossy(&link))
                })?;
                b'1'
            }
            b'2' | b'5' => kind,
            b'3' | b'4' | b'6' => return Err(format!("{:?}: device and FIFO entries are not allowed", shown())),
            other => {
                return Err(format!("{:?}: entry type {:?} is not supported", shown(), char::from(other)));
            }
        };
        // Readers skip data only behind regular files; data behind anything else would read as headers to some.
        if kind != b'0' && size != 0 {
            return Err(format!("{:?}: a link or directory with {size} bytes of data", shown()));
        }
        let skip = size.checked_add(padding(size)).ok_or_else(|| format!("{:?}: an impossible size", shown()))?;
        self.entries += 1;
        if let Some(listing) = &mut self.listing {
            listing.push(TarEntry { name: name.into_owned(), kind, size });
        }
        self.state = if skip == 0 { Tar::Header } else { Tar::Skip(skip) };
        Ok(())
    }
}

/// Whether `recorded` is the header's checksum: the byte sum with the checksum field taken as spaces, unsigned
/// (POSIX) or signed (as some old tars wrote it).
fn checksum_matches(block: &[u8; TAR_BLOCK], recorded: u64) -> bool {
    const SPACES: u32 = 8 * b' ' as u32;
    let field = &block[148..156];
    let unsigned = |bytes: &[u8]| bytes.iter().map(|&b| u32::from(b)).sum::<u32>();
    if u64::from(byte_sum(block) - unsigned(field) + SPACES) == recorded {
        return true;
    }
    let signed = |bytes: &[u8]| bytes.iter().map(|&b| i32::from(b as i8)).sum::<i32>();
    u64::try_from(signed(block) - signed(field) + SPACES as i32).ok() == Some(recorded)
}

/// The unsigned sum of a block's bytes, eight at a time: each word's bytes are added pairwise into four 16-bit
/// lanes, which 64 words of at most 2 × 255 each cannot overflow. A third of the cost of widening every byte.
fn byte_sum(block: &[u8; TAR_BLOCK]) -> u32 {
    const EVEN: u64 = 0x00ff_00ff_00ff_00ff;
    let lanes = block.chunks_exact(8).fold(0u64, |lanes, word| {
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        lanes + (word & EVEN) + ((word >> 8) & EVEN)
    });
    (0..4).map(|lane| ((lanes >> (16 * lane)) & 0xffff) as u32).sum()
}

/// Bytes of padding after `size` bytes of data, to the next block.
fn padding(size: u64) -> u64 {
    (TAR_BLOCK as u64 - size % TAR_BLOCK as u64) % TAR_BLOCK as u64
}

/// A NUL-terminated header field.
fn field(raw: &[u8]) -> &[u8] {
    raw.iter().position(|&b| b == 0).map_or(raw, |end| &raw[..end])
}

/// A GNU long name or link: the name, NUL-terminated; nothing but NULs may follow it.
fn long_name(data: &[u8]) -> Result<Vec<u8>, String> {
    let name = field(data);
    if data[name.len()..].iter().any(|&b| b != 0) {
        return Err("a GNU long name with data after its end".into());
    }
    Ok(name.to_vec())
}

/// An octal header number: optional leading spaces, octal digits, then spaces; a NUL ends the field. One pass,
/// as every header has eight of them.
fn octal(raw: &[u8]) -> Option<u64> {
    let mut bytes = raw.iter().skip_while(|&&b| b == b' ').peekable();
    let mut value = 0u64;
    while let Some(digit) = bytes.next_if(|&&b| b.wrapping_sub(b'0') < 8) {
        value = value.checked_mul(8)?.checked_add(u64::from(digit - b'0'))?;
    }
    for &b in bytes {
        match b {
            b' ' => {}
            0 => break,
            _ => return None,
        }
    }
    Some(value)
}

/// A header number: octal, or base-256 (big-endian, first byte 0x80) for values octal cannot hold.
fn number(raw: &[u8]) -> Option<u64> {
    match raw[0] {
        0x80 => raw[1..].iter().try_fold(0u64, |n, &b| n.checked_mul(256)?.checked_add(b.into())),
        // Negative base-256 numbers are no size.
        0xff => None,
        _ => octal(raw),
    }
}

/// The records of a pax extended header, `"<length> <key>=<value>\n"` each, read strictly: a record that does
/// not frame exactly is refused rather than guessed at.
fn pax(data: &[u8]) -> Result<Pax, String> {
    let bad = |why: &str| format!("a malformed pax header: {why}");
    let mut out = Pax::default();
    let mut rest = data;
    while let Some(&first) = rest.first() {
        if first == 0 {
            if rest.iter().any(|&b| b != 0) {
                return Err(bad("data after its padding"));
            }
            break;
        }
        let digits = rest.iter().position(|&b| !b.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 || digits > 19 || rest.get(digits) != Some(&b' ') {
            return Err(bad("a record without its length"));
        }
        let len: usize = std::str::from_utf8(&rest[..digits]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        if len < digits + 4 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("a record whose length does not frame it"));
        }
        let record = &rest[digits + 1..len - 1];
        let eq =
            record.iter().position(|&b| b == b'=').filter(|&i| i > 0).ok_or_else(|| bad("a record without key"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" | b"linkpath" => {
                if value.contains(&0) {
                    return Err(format!("an unsafe name {:?}: a NUL byte", String::from_utf8_lossy(value)));
                }
                if key == b"path" {
                    out.path = Some(value.to_vec());
                } else {
                    out.linkpath = Some(value.to_vec());
                }
            }
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("an unreadable size"))?;
                out.size = Some(size);
            }
            _ if key.starts_with(b"GNU.sparse.") => return Err("sparse files are not supported".into()),
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(out)
}

/// A name that stays inside the root when extracted: not empty, not absolute, no `..` that climbs above the
/// root, no NUL.
fn safe_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("an empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("a name longer than 4096 bytes");
    }
    if name.contains(&0) {
        return Err("a NUL byte");
    }
    if name.starts_with(b"/") {
        return Err("an absolute path");
    }
    let mut depth = 0usize;
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => depth = depth.checked_sub(1).ok_or("a path that leaves the root")?,
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    /// A ustar header block, made by hand.
    pub(crate) fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> Vec<u8> {
        let mut header = vec![0u8; TAR_BLOCK];
        header[..name.len()].copy_from_slice(name);
        header[100..108].copy_from_slice(b"0000644\0");
        header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link);
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        seal(&mut header);
        header
    }

    /// The size a header block states.
    pub(crate) fn size_of(header: &[u8]) -> u64 {
        number(&header[124..136]).expect("a size")
    }

    /// Set a header block's checksum.
    pub(crate) fn seal(header: &mut [u8]) {
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// An entry: its header, its data and the padding to the next block.
    pub(crate) fn entry(name: &[u8], kind: u8, content: &[u8]) -> Vec<u8> {
        let mut out = header(name, kind, content.len() as u64, b"");
        out.extend_from_slice(content);
        out.resize(out.len().div_ceil(TAR_BLOCK) * TAR_BLOCK, 0);
        out
    }

    /// A GNU long name (`L`) or link (`K`) before an entry.
    pub(crate) fn long(kind: u8, name: &[u8]) -> Vec<u8> {
        entry(b"././@LongLink", kind, &[name, b"\0"].concat())
    }

    /// A pax extended header before an entry.
    pub(crate) fn pax_header(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
            // The length counts its own digits.
            let mut digits = 1;
            while (body.len() + digits).to_string().len() != digits {
                digits += 1;
            }
            data.extend_from_slice((body.len() + digits).to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        entry(b"PaxHeader", b'x', &data)
    }

    pub(crate) fn end(mut tar: Vec<u8>) -> Vec<u8> {
        tar.resize(tar.len() + 2 * TAR_BLOCK, 0);
        tar
    }

    /// A tar archive of one file, made by hand.
    fn tar(name: &str, content: &[u8]) -> Vec<u8> {
        end(entry(name.as_bytes(), b'0', content))
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn walk(bytes: &[u8], chunk: usize) -> Result<Vec<TarEntry>, String> {
        let mut check = Box::new(TgzCheck::listing(1 << 20));
        for block in bytes.chunks(chunk) {
            check.update(block)?;
        }
        check.conclude().map(|()| check.entries().to_vec())
    }

    fn check(bytes: &[u8], chunk: usize) -> Result<(), String> {
        walk(bytes, chunk).map(|_| ())
    }

    #[test]
    fn block_sums_agree_with_a_plain_sum() {
        let mut state = 7u64;
        for fill in [0u8, 0xff, 0x80] {
            let mut block = [fill; TAR_BLOCK];
            assert_eq!(byte_sum(&block), u32::from(fill) * TAR_BLOCK as u32);
            for byte in block.iter_mut() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *byte = (state >> 56) as u8;
            }
            assert_eq!(byte_sum(&block), block.iter().map(|&b| u32::from(b)).sum::<u32>());
        }
    }

    #[test]
    fn a_gzip_bomb_is_refused_by_its_ratio() {
        let run = |tgz: &[u8]| {
            let mut check = Box::new(TgzCheck::new(1 << 40));
            tgz.chunks(1 << 16).try_for_each(|block| check.update(block)).and_then(|()| check.finish())
        };
        // One file, then 64 MiB of zeros: valid, but 1000:1.
        let mut bomb = tar("app/start", b"x");
        bomb.resize(64 << 20, 0);
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        encoder.write_all(&bomb).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 128 << 10, "{} bytes", bomb.len());
        let refused = run(&bomb).unwrap_err();
        assert!(refused.contains("like a gzip bomb"), "{refused}");
        // Under the floor any ratio is fine; over it, ordinary ratios are.
        let mut small = tar("app/start", b"x");
        small.resize(1 << 19, 0);
        assert_eq!(run(&gzip(&small)), Ok(()));
        let text = b"exec ./web --port 8080\n".repeat(200_000);
        assert_eq!(run(&gzip(&tar("app/start", &text))), Ok(()), "4.6 MiB of text, about 100:1 and no more");
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
        let mut padded = tar("app/start", b"x");
        padded.resize(2 << 20, 0);
        assert!(check(&gzip(&padded), 1 << 16).unwrap_err().contains("inflates to more than"));
    }

    #[test]
    fn every_header_is_walked() {
        let two = end([entry(b"app/", b'5', b""), entry(b"app/start", b'0', &[7; 700])].concat());
        let entries = walk(&gzip(&two), 100).unwrap();
        let names: Vec<_> = entries.iter().map(|e| (e.name.as_slice(), e.kind, e.size)).collect();
        assert_eq!(names, [(&b"app/"[..], b'5', 0), (&b"app/start"[..], b'0', 700)]);

        let mut bad = two.clone();
        bad[TAR_BLOCK + 5] ^= 1; // the second header's name, under an unchanged checksum
        assert!(check(&gzip(&bad), 64).unwrap_err().contains("bad checksum at offset 512"));
        for name in [&b"../evil"[..], b"/etc/cron.d/x", b"app/../../x", b"a/./../../x"] {
            let tgz = gzip(&end([entry(b"app/", b'5', b""), entry(name, b'0', b"x")].concat()));
            let error = check(&tgz, 64).unwrap_err();
            assert!(error.starts_with("an unsafe name"), "{}: {error}", String::from_utf8_lossy(name));
        }
        for name in [&b"app/../b"[..], b"./app/x", b"app//x"] {
            assert_eq!(check(&gzip(&end(entry(name, b'0', b"x"))), 64), Ok(()), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn a_tar_must_end_with_its_marker() {
        let body = [entry(b"app/", b'5', b""), entry(b"app/start", b'0', b"x")].concat();
        let error = check(&gzip(&body), 64).unwrap_err();
        assert!(error.contains("without its end-of-archive marker"), "{error}");
        let lone = [body.clone(), vec![0; TAR_BLOCK]].concat();
        assert!(check(&gzip(&lone), 64).unwrap_err().contains("end-of-archive marker"));
        let cut = end(body.clone());
        assert!(check(&gzip(&cut[..TAR_BLOCK * 2 + 100]), 64).is_err(), "data cut short");
        let after = [end(body.clone()), b"more".to_vec()].concat();
        assert!(check(&gzip(&after), 64).unwrap_err().contains("after the end"));
        let record = [end(body), vec![0; 8192]].concat(); // padded to a 10 KiB record, as tar does
        assert_eq!(check(&gzip(&record), 64), Ok(()));
    }

    #[test]
    fn long_names_are_read_and_capped() {
        let deep = "app/".repeat(200) + "file";
        let gnu = end([long(b'L', deep.as_bytes()), entry(b"app/trunc", b'0', b"x")].concat());
        assert_eq!(walk(&gzip(&gnu), 333).unwrap()[0].name, deep.as_bytes());
        let pax = end([pax_header(&[("path", deep.as_bytes())]), entry(b"app/trunc", b'0', b"x")].concat());
        assert_eq!(walk(&gzip(&pax), 333).unwrap()[0].name, deep.as_bytes());
        let escape = "app/".repeat(200) + "../".repeat(201).as_str() + "x";
        let hidden = end([pax_header(&[("path", escape.as_bytes())]), entry(b"app/x", b'0', b"x")].concat());
        assert!(check(&gzip(&hidden), 64).unwrap_err().starts_with("an unsafe name"));

        let huge = end([long(b'L', &vec![b'a'; 5000]), entry(b"app/x", b'0', b"x")].concat());
        assert!(check(&gzip(&huge), 64).unwrap_err().contains("over the 4097 allowed"));
        let huge_pax = end([pax_header(&[("comment", &vec![b'a'; 70_000])]), entry(b"x", b'0', b"x")].concat());
        assert!(check(&gzip(&huge_pax), 64).unwrap_err().contains("over the 65536 allowed"));
        let both = end([long(b'L', b"a"), pax_header(&[("path", b"b")]), entry(b"app/x", b'0', b"x")].concat());
        assert!(check(&gzip(&both), 64).unwrap_err().contains("both a GNU long name and a pax header"));
        let sized = end([pax_header(&[("size", b"3")]), entry(b"app/x", b'0', b"abc")].concat());
        assert_eq!(walk(&gzip(&sized), 64).unwrap()[0].size, 3);
    }

    #[test]
    fn links_devices_and_odd_entries_are_checked() {
        let ok = end([
            header(b"app/bin", b'2', 0, b"/usr/bin").to_vec(),
            header(b"app/same", b'1', 0, b"app/bin").to_vec(),
            entry(b"app/file", b'7', b"contiguous"),
        ]
        .concat());
        assert_eq!(check(&gzip(&ok), 64), Ok(()));
        let refused = [
            (header(b"app/passwd", b'1', 0, b"../../etc/passwd"), "a hard link"),
            (header(b"app/dev", b'3', 0, b""), "device"),
            (header(b"app/fifo", b'6', 0, b""), "FIFO"),
            (header(b"app/sparse", b'S', 0, b""), "not supported"),
            (header(b"app/dir", b'5', 512, b""), "with 512 bytes of data"),
        ];
        let mut garbled = header(b"app/x", b'0', 0, b"");
        garbled[100..108].copy_from_slice(b"000\xff\x0044\0"); // the mode
        seal(&mut garbled);
        let error = check(&gzip(&end([header(b"app/", b'5', 0, b""), garbled].concat())), 64).unwrap_err();
        assert!(error.contains("unreadable number"), "{error}");
        for (block, why) in refused {
            let error = check(&gzip(&end(block.to_vec())), 64).unwrap_err();
            assert!(error.contains(why), "{why}: {error}");
        }
    }

    #[test]
    fn python_archives_are_read_as_python_lists_them() {
        for format in ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"] {
            let program = format!(
                "import io, sys, tarfile\nout = io.BytesIO()\nt = tarfile.open(fileobj=out, mode='w:gz', format=tarfile.{format})\nfor name, data in [('app', None), ('app/' + 'd' * 60 + '/' + 'e' * 60 + '/start', b'run'), ('app/empty', b'')]:\n    i = tarfile.TarInfo(name)\n    if data is None:\n        i.type = tarfile.DIRTYPE\n    else:\n        i.size = len(data)\n    t.addfile(i, io.BytesIO(data or b''))\nt.close()\nsys.stdout.buffer.write(out.getvalue())\n"
            );
            let out = std::process::Command::new("python3").args(["-c", &program]).output().expect("python3");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            for chunk in [1, 100, 1 << 16] {
                let entries = walk(&out.stdout, chunk).unwrap_or_else(|e| panic!("{format}, chunks of {chunk}: {e}"));
                let names: Vec<_> = entries.iter().map(|e| String::from_utf8_lossy(&e.name).into_owned()).collect();
                let long = format!("app/{}/{}/start", "d".repeat(60), "e".repeat(60));
                assert_eq!(names, ["app/", long.as_str(), "app/empty"], "{format}");
            }
        }
    }
}
