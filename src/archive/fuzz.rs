//! Generated and mutated archives thrown at the zip reader and the tgz check, in random chunkings. Properties:
//! no panic; work within a constant times the input and what it inflates to; and whatever is accepted, Python's
//! `zipfile` and `tarfile` read back the same way (names, sizes, content), the input as well as the rewritten
//! zip. `BITSMITH_FUZZ_ITERATIONS` (default 2000 of each) and `BITSMITH_FUZZ_SEED` choose a longer or another
//! run (`make fuzz`); a failure names the seed and iteration that found it.

use std::io::Write;
use std::process::Command;

use bytes::BytesMut;
use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder};

use super::tgz::TgzCheck;
use super::tgz::tests::{end, entry, header, long, pax_header, seal};
use super::zip::{EntryHeader, Event, Repack, Sizes, ZipReader, ZipWriter, file_attributes};
use crate::digest::to_hex;
use crate::pipeline::ContentCheck;

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Random bytes, of a random length in `lengths`.
    fn bytes(&mut self, lengths: std::ops::Range<usize>) -> Vec<u8> {
        let n = lengths.start + self.below(lengths.len());
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn iterations() -> u64 {
    setting("BITSMITH_FUZZ_ITERATIONS", 2000)
}

fn seed() -> u64 {
    setting("BITSMITH_FUZZ_SEED", 0x00b1_75a1_7400_0001)
}

const PARTS: &[&str] = &["app", "lib", "a", "b.txt", "main.py", "x y", "é", "..", ".", "C:", "node_modules", "PK"];

fn name(rng: &mut Rng) -> String {
    let parts: Vec<&str> = (0..1 + rng.below(4)).map(|_| *rng.pick(PARTS)).collect();
    let mut name = parts.join("/");
    if rng.chance(15) {
        name.push('/');
    }
    name
}

/// Content of the kinds that matter to the readers: empty, random, compressible, and full of descriptor
/// signatures.
fn content(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => Vec::new(),
        1 => rng.bytes(0..3000),
        2 => "print('hello')\n".repeat(rng.below(300)).into_bytes(),
        3 => {
            let mut out = b"PK\x07\x08".repeat(rng.below(800));
            for _ in 0..rng.below(4) {
                let at = rng.below(out.len() + 1);
                let noise = rng.bytes(0..12);
                out.splice(at..at, noise);
            }
            out
        }
        _ => vec![0; rng.below(5000)],
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A zip from the writer: entries stored or deflated, sizes up front or after the data, zip64 or not, some
/// of them symlinks.
fn generated_zip(rng: &mut Rng) -> Vec<u8> {
    let (mut writer, mut out) = (ZipWriter::new(), Vec::new());
    for _ in 0..rng.below(6) {
        let content = content(rng);
        let method = if rng.chance(50) { 0 } else { 8 };
        let raw = if method == 8 { deflate(&content) } else { content.clone() };
        let sizes =
            Sizes { crc: crc32fast::hash(&content), compressed: raw.len() as u64, uncompressed: content.len() as u64 };
        let after = rng.chance(50);
        let header = EntryHeader {
            name: name(rng).into(),
            method,
            flags: if after { 8 } else { 0 },
            mod_time: rng.next() as u16,
            mod_date: rng.next() as u16,
            declared: (!after).then_some(sizes),
            zip64: rng.chance(20),
        };
        let attributes = if rng.chance(10) { 0o120_777 << 16 } else { file_attributes(0o644) };
        out.extend_from_slice(&writer.whole_entry(&header, &raw, sizes, attributes));
    }
    out.extend_from_slice(&writer.finish());
    out
}

const SIGNATURES: &[&[u8; 4]] =
    &[b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"];
const VALUES: &[u64] = &[0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// One to three random edits: bit flips, bytes set, inserted, removed, truncation, signatures and boundary
/// values written over fields, a piece copied elsewhere.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        if data.is_empty() {
            data.extend(rng.bytes(1..31));
            continue;
        }
        let at = rng.below(data.len());
        match rng.below(8) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = rng.next() as u8,
            2 => {
                let noise = rng.bytes(1..17);
                data.splice(at..at, noise);
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                data.drain(at..end);
            }
            4 => data.truncate(at),
            5 => {
                let signature = rng.pick(SIGNATURES);
                let end = (at + 4).min(data.len());
                data[at..end].copy_from_slice(&signature[..end - at]);
            }
            6 => {
                let value = rng.pick(VALUES).to_le_bytes();
                let width = *rng.pick(&[2, 4, 8]);
                let end = (at + width).min(data.len());
                data[at..end].copy_from_slice(&value[..end - at]);
            }
            _ => {
                let from = rng.below(data.len());
                let piece = data[from..(from + 1 + rng.below(200)).min(data.len())].to_vec();
                data.splice(at..at, piece);
            }
        }
    }
}

/// The input in random pieces: single bytes, small and large chunks, or whole.
fn chunks(rng: &mut Rng, data: &[u8]) -> Vec<Vec<u8>> {
    let max = *rng.pick(&[1, 7, 64, 1000, usize::MAX]);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(max.min(rest.len()))).min(rest.len());
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    out
}

/// An entry as both sides list it: raw name, size, sha1 of the content.
type Listed = (Vec<u8>, u64, String);

/// What the reader made of an accepted zip.
struct ZipAccepted {
    input: Vec<u8>,
    output: Vec<u8>,
    entries: Vec<Listed>,
    symlinks: Vec<bool>,
}

/// Run the reader and the rewrite over `input`; panics if they panic or overwork.
fn read_zip(rng: &mut Rng, input: &[u8]) -> Option<ZipAccepted> {
    let pieces = chunks(rng, input);
    let mut reader = ZipReader::new(1 << 24, 0..u64::MAX);
    let (mut names, mut entries) = (Vec::new(), Vec::new());
    let mut pushes = 0u64;
    let mut read = || -> Result<(), super::zip::ZipError> {
        for piece in &pieces {
            pushes += 1;
            for event in reader.push(BytesMut::from(&piece[..]))? {
                match event {
                    Event::Start(header) => names.push(header.name.as_bytes().to_vec()),
                    Event::End(end) => {
                        let name = names.last().cloned().unwrap_or_default();
                        entries.push((name, end.sizes.uncompressed, end.sha1.unwrap_or_default()));
                    }
                    Event::Data(_) => {}
                }
            }
        }
        Ok(())
    };
    let pushed = read();
    let bound = 6 * input.len() as u64 + reader.inflated() + 64 * pushes + 64;
    assert!(reader.work() <= bound, "the zip reader worked {} for {} input bytes", reader.work(), input.len());
    pushed.ok()?;
    let directory = reader.finish().ok()?;
    let symlinks = directory.iter().map(|d| d.is_symlink()).collect();

    let mut repack = Repack::new(1 << 24, 0..u64::MAX);
    let mut output = Vec::new();
    for piece in &pieces {
        let (bytes, _) = repack.push(BytesMut::from(&piece[..])).expect("the rewrite reads as the reader did");
        bytes.iter().for_each(|b| output.extend_from_slice(b));
    }
    output.extend_from_slice(&repack.finish().expect("the rewrite ends as the reader did").finish());
    Some(ZipAccepted { input: input.to_vec(), output, entries, symlinks })
}

/// Run `program` once over all `blobs` (each framed by its length) and return its output, one JSON value per
/// line.
fn python(program: &str, blobs: &[&[u8]]) -> Vec<serde_json::Value> {
    let framed: Vec<u8> = blobs.iter().flat_map(|b| [&(b.len() as u64).to_le_bytes()[..], &b[..]].concat()).collect();
    let out = super::python(program, framed, "the Python reader failed");
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), blobs.len());
    lines
}

const PYTHON_FRAMES: &str = "import hashlib, io, json, struct, sys\ndata = sys.stdin.buffer.read()\npos = 0\ndef blobs():\n    global pos\n    while pos < len(data):\n        n, = struct.unpack_from('<Q', data, pos)\n        pos += 8 + n\n        yield data[pos - n:pos]\n";

const PYTHON_ZIPS: &str = "import zipfile\nfor blob in blobs():\n    try:\n        z = zipfile.ZipFile(io.BytesIO(blob))\n        rows = [[i.filename.encode('utf-8' if i.flag_bits & 0x800 else 'cp437').hex(), i.file_size, hashlib.sha1(z.read(i)).hexdigest()] for i in z.infolist()]\n        print(json.dumps(rows))\n    except Exception as e:\n        print(json.dumps(repr(e)))\n";

fn listed(rows: &serde_json::Value) -> Result<Vec<(String, u64, String)>, String> {
    let rows = rows.as_array().ok_or_else(|| rows.to_string())?;
    Ok(rows
        .iter()
        .map(|r| (r[0].as_str().unwrap().into(), r[1].as_u64().unwrap(), r[2].as_str().unwrap_or_default().into()))
        .collect())
}

/// Zips Python writes, to mutate besides the writer's own.
fn python_zips() -> Vec<Vec<u8>> {
    let program = "import io, sys, zipfile, struct\nfor streamed in (False, True):\n    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):\n        out = io.BytesIO()\n        class Pipe(io.RawIOBase):\n            def writable(self): return True\n            def write(self, b): return out.write(b)\n        z = zipfile.ZipFile(Pipe() if streamed else out, 'w', method)\n        z.writestr('app/', '')\n        z.writestr('app/main.py', 'print(1)\\n' * 300)\n        z.writestr('app/sig', b'PK\\x07\\x08' * 100)\n        z.writestr('app/é', 'x')\n        z.close()\n        v = out.getvalue()\n        sys.stdout.buffer.write(struct.pack('<Q', len(v)) + v)\n";
    let out = Command::new("python3").args(["-c", program]).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (mut rest, mut zips) = (&out.stdout[..], Vec::new());
    while rest.len() >= 8 {
        let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        zips.push(rest[8..8 + n].to_vec());
        rest = &rest[8 + n..];
    }
    zips
}

/// Python reads each accepted zip, and its rewrite, as the reader did.
fn python_agrees_on_zips(seed: u64, accepted: &[ZipAccepted]) {
    let blobs: Vec<&[u8]> = accepted.iter().flat_map(|z| [&z.input[..], &z.output[..]]).collect();
    let answers = python(&format!("{PYTHON_FRAMES}{PYTHON_ZIPS}"), &blobs);
    for (zip, answer) in accepted.iter().zip(answers.chunks(2)) {
        let ours: Vec<(String, u64, String)> =
            zip.entries.iter().map(|(name, size, sha1)| (to_hex(name), *size, sha1.clone())).collect();
        let kept: Vec<_> = ours.iter().zip(&zip.symlinks).filter(|(_, link)| !**link).map(|(e, _)| e.clone()).collect();
        let context = || format!("seed {seed:#x}: accepted {}", to_hex(&zip.input));
        assert_eq!(listed(&answer[0]).unwrap_or_else(|e| panic!("{}: python: {e}", context())), ours, "{}", context());
        assert_eq!(
            listed(&answer[1]).unwrap_or_else(|e| panic!("{}: rewritten: {e}", context())),
            kept,
            "{}",
            context()
        );
    }
}

/// Accepted inputs go to Python in batches of this many.
const BATCH: usize = 500;

#[test]
fn the_zip_reader_survives_generated_and_mutated_zips() {
    let (seed, iterations) = (seed(), iterations());
    let seeds = python_zips();
    let mut rng = Rng(seed);
    let (mut accepted, mut batch) = (0, Vec::new());
    for iteration in 0..iterations {
        let mut input = if rng.chance(20) { rng.pick(&seeds).clone() } else { generated_zip(&mut rng) };
        if rng.chance(70) {
            mutate(&mut rng, &mut input);
        }
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_zip(&mut rng, &input)));
        match verdict {
            Ok(Some(zip)) => {
                accepted += 1;
                batch.push(zip);
            }
            Ok(None) => {}
            Err(_) => panic!("seed {seed:#x}, iteration {iteration}: the zip reader panicked on {}", to_hex(&input)),
        }
        if batch.len() == BATCH || iteration + 1 == iterations {
            python_agrees_on_zips(seed, &std::mem::take(&mut batch));
        }
    }
    assert!(accepted > iterations / 10, "only {accepted} of {iterations} zips were accepted");
}

/// A tar archive of regular files, directories, links, GNU long names and pax headers; the offsets of its
/// header blocks, so that mutations can keep their checksums right and get past them.
fn generated_tar(rng: &mut Rng) -> (Vec<u8>, Vec<usize>) {
    let (mut tar, mut headers) = (Vec::new(), Vec::new());
    let mut names: Vec<String> = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let name = name(rng);
        let start = tar.len();
        let piece = match rng.below(7) {
            0 => header(format!("{}/", name.trim_end_matches('/')).as_bytes(), b'5', 0, b""),
            1 => header(name.as_bytes(), b'2', 0, rng.pick(&["/usr/bin", "../lib", "x"]).as_bytes()),
            2 if !names.is_empty() => header(name.as_bytes(), b'1', 0, rng.pick(&names).as_bytes()),
            3 => {
                let deep = format!("{}/{name}", "deep/".repeat(30 + rng.below(10)));
                [long(b'L', deep.as_bytes()), entry(b"app/short", b'0', &content(rng))].concat()
            }
            4 => {
                let deep = format!("{}/{name}", "pax/".repeat(30 + rng.below(10)));
                let content = content(rng);
                let size = content.len().to_string();
                let records: &[(&str, &[u8])] = &[("path", deep.as_bytes()), ("size", size.as_bytes())];
                [pax_header(records), entry(b"app/short", b'0', &content)].concat()
            }
            _ => entry(name.as_bytes(), b'0', &content(rng)),
        };
        // Header blocks are where a block's checksum field is filled in; data blocks, for all the walk knows,
        // are data.
        let mut at = 0;
        while at < piece.len() {
            headers.push(start + at);
            let size = super::tgz::tests::size_of(&piece[at..at + 512]) as usize;
            at += 512 + size.div_ceil(512) * 512;
        }
        tar.extend_from_slice(&piece);
        names.push(name);
    }
    let mut tar = end(tar);
    if rng.chance(30) {
        tar.resize(tar.len().div_ceil(10240) * 10240, 0);
    }
    (tar, headers)
}

fn gzip(rng: &mut Rng, tar: &[u8]) -> Vec<u8> {
    // Sometimes two gzip members, as concatenated .gz files are.
    let split = if rng.chance(20) { rng.below(tar.len()) } else { 0 };
    let parts = if split > 0 { vec![&tar[..split], &tar[split..]] } else { vec![tar] };
    parts
        .into_iter()
        .flat_map(|part| {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
            encoder.write_all(part).unwrap();
            encoder.finish().unwrap()
        })
        .collect()
}

const PYTHON_TARS: &str = "import tarfile\nfor blob in blobs():\n    try:\n        rows = []\n        with tarfile.open(fileobj=io.BytesIO(blob), mode='r:gz') as t:\n            for m in t:\n                kind = '0' if m.isreg() else '1' if m.islnk() else '2' if m.issym() else '5' if m.isdir() else '?'\n                if m.isreg():\n                    content = t.extractfile(m).read()\n                    assert len(content) == m.size, 'short data'\n                rows.append([m.name.encode('utf-8', 'surrogateescape').rstrip(b'/').hex(), m.size, kind])\n        print(json.dumps(rows))\n    except Exception as e:\n        print(json.dumps(repr(e)))\n";

#[test]
fn the_tgz_check_survives_generated_and_mutated_archives() {
    let (seed, iterations) = (seed(), iterations());
    let mut rng = Rng(seed ^ 0x7a7);
    let (mut accepted, mut batch) = (0, Vec::new());
    for iteration in 0..iterations {
        let (mut tar, headers) = generated_tar(&mut rng);
        let mut tgz = if rng.chance(75) {
            let len = tar.len();
            mutate(&mut rng, &mut tar);
            // Where the archive kept its length, headers get their checksum back, so that the walk looks
            // further than the first changed header.
            if tar.len() == len && rng.chance(80) {
                for &at in &headers {
                    seal(&mut tar[at..at + 512]);
                }
            }
            gzip(&mut rng, &tar)
        } else {
            let mut tgz = gzip(&mut rng, &tar);
            if rng.chance(50) {
                mutate(&mut rng, &mut tgz);
            }
            tgz
        };
        if tgz.is_empty() {
            tgz.push(0);
        }
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut check = Box::new(TgzCheck::listing(1 << 24));
            let mut walked = Ok(());
            for piece in chunks(&mut rng, &tgz) {
                walked = check.update(&piece);
                if walked.is_err() {
                    break;
                }
            }
            let walked = walked.and_then(|()| check.conclude());
            let bound = 3 * check.inflated() + 1024;
            assert!(check.work() <= bound, "the tgz check worked {} for {} inflated", check.work(), check.inflated());
            walked.ok().map(|()| check.entries().to_vec())
        }));
        match verdict {
            Ok(Some(entries)) => {
                accepted += 1;
                batch.push((tgz, entries));
            }
            Ok(None) => {}
            Err(_) => panic!("seed {seed:#x}, iteration {iteration}: the tgz check panicked on {}", to_hex(&tgz)),
        }
        if batch.len() == BATCH || iteration + 1 == iterations {
            python_agrees_on_tgzs(seed, &std::mem::take(&mut batch));
        }
    }
    assert!(accepted > iterations / 10, "only {accepted} of {iterations} archives were accepted");
}

/// Python reads each accepted archive as the walk did.
fn python_agrees_on_tgzs(seed: u64, accepted: &[(Vec<u8>, Vec<super::tgz::TarEntry>)]) {
    let blobs: Vec<&[u8]> = accepted.iter().map(|(tgz, _)| &tgz[..]).collect();
    let answers = python(&format!("{PYTHON_FRAMES}{PYTHON_TARS}"), &blobs);
    for ((tgz, entries), answer) in accepted.iter().zip(&answers) {
        let ours: Vec<(String, u64, String)> = entries
            .iter()
            .map(|e| {
                let end = e.name.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
                (to_hex(&e.name[..end]), e.size, char::from(e.kind).to_string())
            })
            .collect();
        let theirs = answer.as_array().map(|rows| {
            rows.iter()
                .map(|r| {
                    (r[0].as_str().unwrap().to_string(), r[1].as_u64().unwrap(), r[2].as_str().unwrap().to_string())
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(theirs, Some(ours), "seed {seed:#x}: python reads {answer} from accepted {}", to_hex(tgz));
    }
}
