//! Cost of the upload checks on hostile archives against an ordinary one: process CPU time (`getrusage`) per
//! MiB of input, median of 9 runs, fed in 1 MiB chunks as the API feeds them. Prints a table; asserts nothing
//! about time.
//!
//! - an ordinary app zip: 3000 deflated files, mostly text, some binary;
//! - one stored entry with a data descriptor whose 2 MiB of data are descriptor signatures;
//! - 100 000 empty entries (the default `--max-zip-entries`);
//! - small deflated entries of zeros, each under the per-entry ratio floor (a spread-out zip bomb);
//! - a droplet `.tgz` of 100 000 entries, and gunzip alone over it: the floor under any tar reader;
//! - a `.tgz` that inflates 1000:1 (a gzip bomb).

use std::io::Write;

use bitsmith::archive::tgz::TgzCheck;
use bitsmith::archive::zip::{EntryHeader, Repack, Sizes, ZipWriter, file_attributes};
use bitsmith::pipeline::ContentCheck;
use bytes::BytesMut;
use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder};

// The integration tests' data generator; the benchmarks use only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/support/data.rs"]
mod data;

const MIB: f64 = (1 << 20) as f64;
const CHUNK: usize = 1 << 20;

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs of each case, one after another; their median is reported. (Interleaving the cases costs every case
/// page faults for memory another case just gave back: on a VM those dominate and vary from run to run.)
const RUNS: usize = 9;

/// Median CPU seconds of [`RUNS`] runs of `run`, and what the last run said.
fn measure(run: impl Fn() -> String) -> (f64, String) {
    let mut times = Vec::new();
    let mut verdict = String::new();
    for _ in 0..RUNS {
        let before = cpu_seconds();
        verdict = run();
        times.push(cpu_seconds() - before);
    }
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], verdict)
}

/// The zip check as the API runs it, with its default limits.
fn repack(zip: &[u8]) -> String {
    let mut repack = Repack::new(1 << 30, 1..(64 << 20));
    for piece in zip.chunks(CHUNK) {
        if let Err(error) = repack.push(BytesMut::from(piece)) {
            return format!("refused: {error}");
        }
    }
    match repack.finish() {
        Ok(writer) => format!("accepted, {} entries", writer.len()),
        Err(error) => format!("refused: {error}"),
    }
}

fn tgz_check(tgz: &[u8]) -> String {
    // The API's limit with its default --max-upload-size: 20 times 2048 MiB.
    let mut check = Box::new(TgzCheck::new(20 * (2048 << 20)));
    for piece in tgz.chunks(CHUNK) {
        if let Err(error) = check.update(piece) {
            return format!("refused: {error}");
        }
    }
    match check.finish() {
        Ok(()) => "accepted".into(),
        Err(error) => format!("refused: {error}"),
    }
}

fn gunzip_only(tgz: &[u8]) -> String {
    let mut decoder = flate2::write::MultiGzDecoder::new(std::io::sink());
    for piece in tgz.chunks(CHUNK) {
        decoder.write_all(piece).unwrap();
    }
    decoder.try_finish().unwrap();
    "inflated".into()
}

fn entry(out: &mut Vec<u8>, writer: &mut ZipWriter, name: String, content: &[u8], method: u16, after: bool) {
    let raw = if method == 8 {
        let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(content).unwrap();
        encoder.finish().unwrap()
    } else {
        content.to_vec()
    };
    let sizes =
        Sizes { crc: crc32fast::hash(content), compressed: raw.len() as u64, uncompressed: content.len() as u64 };
    let header = EntryHeader::new(name, method, sizes, after);
    out.extend_from_slice(&writer.whole_entry(&header, &raw, sizes, file_attributes(0o644)));
}

/// Source-like text: words from a small vocabulary in lines, compressing about as code does.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "fn", "let", "return", "self", "import", "def", "class", "value", "request", "response", "config", "(", ")",
        "{", "}", "=", "==", "if", "else", "for", "in", "0", "1", "\"name\"", "error", "result", "map", "list",
    ];
    let noise = data::bytes(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let word = WORDS[noise[i % len] as usize % WORDS.len()];
        out.extend_from_slice(word.as_bytes());
        out.push(if noise[(i + 1) % len].is_multiple_of(9) { b'\n' } else { b' ' });
        i += 2;
    }
    out.truncate(len);
    out
}

fn ordinary_zip() -> Vec<u8> {
    let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
    for n in 0..3000u64 {
        let size = 1024 + (data::bytes(n, 8)[0] as usize) * 200 + if n % 50 == 0 { 400 << 10 } else { 0 };
        let (dir, content) = if n % 10 == 0 { ("assets", data::bytes(n, size)) } else { ("src", text(n, size)) };
        entry(&mut out, &mut writer, format!("app/{dir}/{}/file-{n}", n % 37), &content, 8, n % 2 == 0);
    }
    out.extend_from_slice(&writer.finish());
    out
}

fn descriptor_signatures_zip() -> Vec<u8> {
    let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
    entry(&mut out, &mut writer, "app/sig".into(), &b"PK\x07\x08".repeat(512 << 10), 0, true);
    out.extend_from_slice(&writer.finish());
    out
}

fn empty_entries_zip(count: usize) -> Vec<u8> {
    let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
    for n in 0..count {
        entry(&mut out, &mut writer, format!("app/{}/e{n}", n % 100), b"", 0, false);
    }
    out.extend_from_slice(&writer.finish());
    out
}

fn spread_bomb_zip() -> Vec<u8> {
    let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
    let zeros = vec![0u8; 1 << 20];
    for n in 0..2000 {
        entry(&mut out, &mut writer, format!("app/z{n}"), &zeros, 8, false);
    }
    out.extend_from_slice(&writer.finish());
    out
}

fn many_entries_tgz(count: usize) -> Vec<u8> {
    let mut tar = Vec::with_capacity(count * 1024);
    for n in 0..count {
        let mut header = [0u8; 512];
        let name = format!("app/{}/f{n}", n % 100);
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..108].copy_from_slice(b"0000644\0");
        let content = format!("{n}\n");
        header[124..136].copy_from_slice(format!("{:011o}\0", content.len()).as_bytes());
        header[156] = b'0';
        header[257..265].copy_from_slice(b"ustar\x0000");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        tar.extend_from_slice(&header);
        let mut block = [0u8; 512];
        block[..content.len()].copy_from_slice(content.as_bytes());
        tar.extend_from_slice(&block);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(&tar).unwrap();
    encoder.finish().unwrap()
}

/// One small file, then a gigabyte of zeros: a valid `.tgz` that inflates 1000:1 (a gzip bomb).
fn gzip_bomb_tgz() -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    let mut header = [0u8; 512];
    header[..9].copy_from_slice(b"app/start");
    header[100..108].copy_from_slice(b"0000644\0");
    header[124..136].copy_from_slice(b"00000000001\0");
    header[156] = b'0';
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    encoder.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.finish().unwrap()
}

/// How a case is checked: it returns what the check said.
type Check = fn(&[u8]) -> String;
/// A case: its label, how its input is made, how it is checked.
type Case = (&'static str, fn() -> Vec<u8>, Check);

fn main() {
    let cases: Vec<Case> = vec![
        ("ordinary app zip: 3000 deflated files", ordinary_zip, repack),
        ("one stored entry of 2 MiB of descriptor signatures, sizes after the data", descriptor_signatures_zip, repack),
        ("100 000 empty entries", || empty_entries_zip(100_000), repack),
        ("2000 deflated 1 MiB files of zeros (a spread-out zip bomb)", spread_bomb_zip, repack),
        ("droplet .tgz of 100 000 entries", || many_entries_tgz(100_000), tgz_check),
        ("the same .tgz, gunzip alone", || many_entries_tgz(100_000), gunzip_only),
        ("a .tgz of one file and 1 GiB of zeros (a gzip bomb)", gzip_bomb_tgz, tgz_check),
    ];
    // `ARCHIVE_BENCH=<words>` runs only the cases whose label holds them, e.g. under a profiler.
    let only = std::env::var("ARCHIVE_BENCH").unwrap_or_default();
    println!("| input | size | CPU s (median of {RUNS}) | CPU ms / MiB | vs ordinary zip | verdict |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut baseline = None;
    for (n, (label, input, run)) in cases.into_iter().enumerate().filter(|(_, (label, ..))| label.contains(&*only)) {
        let bytes = input();
        let (seconds, verdict) = measure(|| run(&bytes));
        let per_mib = seconds * 1e3 / (bytes.len() as f64 / MIB);
        if n == 0 {
            baseline = Some(per_mib);
        }
        let ratio = baseline.map_or("n/a".to_string(), |base| format!("{:.2}x", per_mib / base));
        println!(
            "| {label} | {:.2} MiB | {seconds:.3} | {per_mib:.2} | {ratio} | {} |",
            bytes.len() as f64 / MIB,
            verdict.chars().take(90).collect::<String>()
        );
    }
}
