//! Transfer benchmark: bitsmith's fetch, upload and download against the limits of this machine and against the
//! tools a user would script, on the same bytes, in one run. Prints tables; asserts nothing about time.
//!
//! The input is a zip of stored entries of 512 MiB (too big for the resource cache) of distinct pseudo-random
//! bytes (`BITSMITH_BENCH_SIZE`, default 1 GiB; no block repeats, so the S3 server cannot deduplicate),
//! page-cached and served over plain HTTP on loopback by a server on its own thread. Each round measures every
//! row once, in a fixed order, so that a slow spell of the disk lands on all rows alike, and after a `sync`, so
//! that no row pays for the one before; the table shows the median of three rounds.
//!
//! - Limits: sha1 ∥ sha256 on two plain threads over bytes in memory (the digests' own speed on two cores); the
//!   input written durably into the store's directory (data synced before the blob is visible, as the file store
//!   does), by `dd conv=fsync` and by 1 MiB writes each handed to the disk at once and synced every 32 MiB as the
//!   store makes them, the better of the two; a plain multipart upload of the input to Garage (object_store, the
//!   same part size and parts in flight as the store, no digests); `curl` of the source to /dev/null; and a read
//!   of a stored blob with its pages dropped first (`posix_fadvise(DONTNEED)`, checked with `mincore`), in the
//!   ranges and with the concurrency the store reads with. Beside them, not a limit: the store's durable write
//!   while sha1 and sha256 hash other bytes on both cores at the lowest priority (the disk on busy cores).
//! - Peers: `curl | tee` into `sha1sum`, `sha256sum` and a file, then `sync` of the file; `rclone copyurl` into
//!   the same Garage bucket (rclone computes no SHA digest); `cat` of the stored blob, its pages dropped.
//! - The same work without bitsmith: a fetch's (the body received by a blocking socket, both digests and the
//!   store's durable write on plain threads) and an upload's (the `curl -F` form received whole, likewise; no
//!   multipart parse or zip check): what any program doing that work gets out of this machine, where bytes are
//!   received, hashed and written on the same two cores. bitsmith's fetch and upload are also held against them.
//! - bitsmith: fetch http → file store; fetch http → Garage; the pipeline alone (page-cached bytes → digests →
//!   file store); an upload through the real `bitsmith api` (multipart sent by `curl -F`, zip checked and
//!   rewritten, file store); a download of that package through the API, its blob cold.
//!
//! A second table gives what the whole machine spent on each row (`/proc/stat`: every process, the client's, the
//! source's and the servers' too, and the kernel): CPU-seconds per GiB, cores busy, time the hypervisor took, and
//! the fastest the row could run if its CPU-seconds were spread over all cores. A third gives bitsmith's own
//! account of where its transfers waited (`StageWaits`; for the upload, the API's `bitsmith_transfer_*`
//! counters).
//!
//! Before the table, how fast chunks are regrouped into blocks by where the destination lies relative to the
//! source (one `memcpy` per chunk against `recycle::append`), and how fast the page-cached input is read into a
//! buffer by where the buffer starts relative to a page; after it, the peak RSS of `bitsmith fetch` (http →
//! file store) at 1, 2, 4 and 8 GiB (`BITSMITH_BENCH_RSS_SIZES`).
//! Needs what `make bench` starts (scripts/with-test-env.sh): the control plane and Garage; and `rclone`
//! (installed with apt when missing).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bitsmith::fetch::{Fetcher, Inputs};
use bitsmith::recycle::PageBuffer;
use bitsmith::resources::{HttpSource, Source};
use bitsmith::store::{BlobOwner, BlobStore};
use futures::StreamExt;
use object_store::ObjectStoreExt;

// The integration tests' object-store servers and data generator; the benchmark uses only part of them.
#[allow(dead_code)]
#[path = "../tests/integration/support/cloud.rs"]
mod cloud;
#[allow(dead_code)]
#[path = "../tests/integration/support/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../tests/integration/support/http_server.rs"]
mod http_server;
#[path = "../tests/integration/support/metrics.rs"]
mod metrics;
#[path = "../tests/integration/support/policy.rs"]
mod policy;
#[path = "../tests/integration/support/ports.rs"]
mod ports;
#[allow(dead_code)]
#[path = "support/api.rs"]
mod support;
use cloud::Cloud;
use policy::loopback_policy;
use support::{Api, MIB};

const GIB: u64 = 1 << 30;
/// Rounds; each row shows the median of its runs.
const RUNS: usize = 3;
/// The store's part size and parts in flight (`src/store/mod.rs`), for the plain multipart upload and the plain
/// durable write.
const PART_SIZE: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 3;
/// The input's data stream (see `data::fill`).
const SEED: u64 = 0x5eed;

fn env_u64s(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .map(|v| v.split(',').map(|s| s.trim().parse().expect("a size in bytes")).collect())
        .unwrap_or_else(|_| default.to_vec())
}

fn mbps(size: u64, seconds: f64) -> f64 {
    size as f64 / seconds / 1e6
}

/// Run `script` with bash and return how long it took; it must succeed.
fn timed_shell(script: &str, env: &[(String, String)]) -> f64 {
    let started = Instant::now();
    let status = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .unwrap();
    assert!(status.success(), "failed: {script}");
    started.elapsed().as_secs_f64()
}

/// Run `script` as a row that moves `size` bytes; it must succeed.
fn shell_run(script: &str, env: &[(String, String)], size: u64) -> Run {
    let meter = Meter::start();
    timed_shell(script, env);
    meter.stop(size)
}

/// The whole machine's CPU time so far (`/proc/stat`): every process and the kernel, on every core, so that a
/// row's client, source and servers count as well as what is measured.
#[derive(Clone, Copy)]
struct MachineCpu {
    /// Seconds the cores ran anything (user, nice, system, interrupts).
    busy: f64,
    /// Seconds the hypervisor ran something else while this VM wanted the cores.
    stolen: f64,
    at: Instant,
}

impl MachineCpu {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let line = stat.lines().next().unwrap();
        assert!(line.starts_with("cpu "), "the first line of /proc/stat sums all cores");
        // user nice system idle iowait irq softirq steal ...; guest time is counted in user already.
        let ticks: Vec<f64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        MachineCpu {
            busy: (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / hz,
            stolen: ticks[7] / hz,
            at: Instant::now(),
        }
    }

    /// What the machine spent from `self` until now, for `size` bytes moved.
    fn until_now(self, size: u64) -> MachineUse {
        let now = MachineCpu::now();
        let per_gib = GIB as f64 / size as f64;
        MachineUse {
            busy_per_gib: (now.busy - self.busy) * per_gib,
            cores_busy: (now.busy - self.busy) / now.at.duration_since(self.at).as_secs_f64(),
            stolen_per_gib: (now.stolen - self.stolen) * per_gib,
        }
    }
}

/// What the whole machine spent on one run of a row.
#[derive(Clone, Copy)]
struct MachineUse {
    /// CPU-seconds per GiB moved, all processes.
    busy_per_gib: f64,
    /// How many cores were busy on average.
    cores_busy: f64,
    /// CPU-seconds per GiB the hypervisor took away.
    stolen_per_gib: f64,
}

/// A run of a row: its speed and what the machine spent on it.
struct Run {
    rate: f64,
    machine: MachineUse,
    /// bitsmith's own account of where a transfer's time went, in seconds per GiB: the whole transfer, then the
    /// waits on each stage (see [`bitsmith::pipeline::StageWaits`]).
    waits: Option<[f64; 6]>,
}

impl Run {
    /// The run, with `seconds` (the transfer's, then its waits') for `size` bytes.
    fn with_waits(self, seconds: [f64; 6], size: u64) -> Run {
        Run { waits: Some(seconds.map(|s| s * GIB as f64 / size as f64)), ..self }
    }
}

/// A transfer's time and waits, in seconds.
fn seconds(waits: &bitsmith::pipeline::StageWaits) -> [f64; 6] {
    let mut seconds = [waits.elapsed.as_secs_f64(), 0.0, 0.0, 0.0, 0.0, 0.0];
    for (at, (_, waited)) in waits.stages().iter().enumerate() {
        seconds[at + 1] = waited.as_secs_f64();
    }
    seconds
}

/// Measures a run: its time and what the whole machine spends meanwhile.
struct Meter(MachineCpu);

impl Meter {
    fn start() -> Self {
        Meter(MachineCpu::now())
    }

    /// The run, `size` bytes moved.
    fn stop(self, size: u64) -> Run {
        let machine = self.0.until_now(size);
        Run { rate: mbps(size, self.0.at.elapsed().as_secs_f64()), machine, waits: None }
    }
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display())
}

// --- the source ---------------------------------------------------------------------------------------------

/// Serve `input` at `/input` over plain HTTP on loopback, a thread per connection, the body sent from the page cache
/// by `sendfile` (what `std::io::copy` does from a file to a socket), as a web server sends a static file: the
/// source shares this machine's two cores with the measured code, and should take no more of them than a real
/// server would. Returns the base URL.
fn serve(input: PathBuf) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            let input = input.clone();
            std::thread::spawn(move || answer(socket, &input));
        }
    });
    format!("http://{addr}")
}

fn answer(mut socket: std::net::TcpStream, input: &Path) {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let mut file = std::fs::File::open(input).unwrap();
    let size = file.metadata().unwrap().len();
    let header = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n");
    if socket.write_all(header.as_bytes()).is_ok() {
        let _ = std::io::copy(&mut file, &mut socket);
    }
}

// --- page cache -------------------------------------------------------------------------------------------------

/// Drop `path`'s pages from the page cache (after syncing it, so that they are clean and can go), and return the
/// fraction still resident, which should be 0.
fn make_cold(path: &Path) -> f64 {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: plain syscalls on a file descriptor we own; the mapping is only passed to mincore and unmapped.
    unsafe {
        assert_eq!(libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED), 0);
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let mut resident = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
        resident.iter().filter(|r| *r & 1 == 1).count() as f64 / resident.len() as f64
    }
}

/// Read `path` with its pages dropped as the store reads a blob: ranges of `READ_RANGE` bytes, `READ_CONCURRENCY`
/// at once (here one thread each), into buffers that are thrown away. The disk's cold read, with the same queue
/// depth a download gets; `cat` reads one range at a time.
fn parallel_cold_read(path: &Path) -> Run {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let range = bitsmith::object_url::READ_RANGE;
    let readers = bitsmith::object_url::READ_CONCURRENCY as u64;
    let meter = Meter::start();
    std::thread::scope(|scope| {
        for reader in 0..readers {
            let file = &file;
            scope.spawn(move || {
                let mut buf = PageBuffer::zeroed(range as usize);
                let mut start = reader * range;
                while start < size {
                    let len = range.min(size - start) as usize;
                    file.read_exact_at(&mut buf[..len], start).unwrap();
                    start += readers * range;
                }
            });
        }
    });
    meter.stop(size)
}

/// The largest file under `dir`: a store's only blob of that size.
fn largest_file(dir: &Path) -> PathBuf {
    fn walk(dir: &Path, best: &mut Option<(u64, PathBuf)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(&entry.path(), best);
            } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                *best = Some((meta.len(), entry.path()));
            }
        }
    }
    let mut best = None;
    walk(dir, &mut best);
    best.expect("a blob").1
}

// --- the rows ---------------------------------------------------------------------------------------------------

fn owner(name: &str) -> BlobOwner {
    BlobOwner { plural: "packages", namespace: "bench".into(), name: name.into(), uid: None }
}

fn fetcher(store: BlobStore) -> Fetcher {
    Fetcher::new(store, loopback_policy(Some("/".into())), 64 * GIB).unwrap()
}

fn http_source(url: &str) -> Source {
    Source { http: Some(HttpSource { url: url.into(), ..Default::default() }), ..Default::default() }
}

/// sha1 and sha256 over `size` bytes held in memory (a 64 MiB block, over and over), each on a thread of its own
/// (the tests' [`data::repeated_digests`]): the digests' own speed on two cores, with nothing of bitsmith's around
/// them.
fn hash_limit(block: &[u8], size: u64) -> Run {
    let meter = Meter::start();
    std::hint::black_box(data::repeated_digests(block, size));
    meter.stop(size)
}

/// `input` written to `out` as the file store writes a blob (see [`write_as_stored`]). The same durability as
/// `dd conv=fsync`, which leaves everything in the page cache until its sync at the end; where the earlier start
/// is faster, a store that writes this way is held against this, not against `dd`.
fn durable_write(input: &Path, out: &Path) -> Run {
    let meter = Meter::start();
    let written = write_as_stored(&mut std::fs::File::open(input).unwrap(), out, false);
    let run = meter.stop(written);
    std::fs::remove_file(out).unwrap();
    run
}

/// `work` run while sha1 and sha256 hash `block` over and over on two threads at the lowest priority: the cores
/// are busy, but `work` gets one whenever it wants it. Shows what a disk write loses when it is not alone on the
/// machine (the limits are measured with idle cores).
fn beside_hashes<T>(block: &[u8], work: impl FnOnce() -> T) -> T {
    use sha2::Digest;
    use std::sync::atomic::{AtomicBool, Ordering};
    fn hash<D: Digest>(block: &[u8], stop: &AtomicBool) {
        // SAFETY: plain syscalls that lower this thread's own priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        let mut digest = D::new();
        while !stop.load(Ordering::Relaxed) {
            for piece in block.chunks(bitsmith::pipeline::BLOCK_SIZE) {
                digest.update(piece);
            }
        }
        std::hint::black_box(digest.finalize());
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| hash::<sha1::Sha1>(block, &stop));
        scope.spawn(|| hash::<sha2::Sha256>(block, &stop));
        let result = work();
        stop.store(true, Ordering::Relaxed);
        result
    })
}

/// A fetch's work without bitsmith: the source's body received over loopback by a plain blocking socket, both
/// digests and the durable write on plain threads ([`write_as_stored`]). What any program doing the same work
/// gets out of this machine: the ceiling a fetch into the file store is held against besides its limits.
fn plain_fetch(url: &str, out: &Path, size: u64) -> Run {
    use std::io::Write;
    let meter = Meter::start();
    let url = url::Url::parse(url).unwrap();
    let address = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    write!(socket, "GET {} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n", url.path()).unwrap();
    let head = read_head(&mut socket);
    assert!(head.starts_with("HTTP/1.1 200"), "the source answered {head}");
    let written = write_as_stored(&mut socket, out, true);
    assert_eq!(written, size);
    let run = meter.stop(size);
    std::fs::remove_file(out).unwrap();
    run
}

/// An upload's work without bitsmith: the form `curl -F` sends (as in the upload row) received by a plain
/// blocking socket, and the whole body, form framing and all, through both digests and the durable write on
/// plain threads ([`write_as_stored`]); no HTTP server, multipart parser or zip check. The ceiling an upload is
/// held against besides its reference.
fn plain_upload(input: &Path, out: &Path, size: u64) -> Run {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    let meter = Meter::start();
    let received = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let (mut socket, _) = listener.accept().unwrap();
            let head = read_head(&mut socket).to_ascii_lowercase();
            let length: u64 = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .expect("curl sends the form's length")
                .trim()
                .parse()
                .unwrap();
            let written = write_as_stored(&mut (&socket).take(length), out, true);
            socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            written
        });
        timed_shell(
            &format!(
                "code=$(curl -sS -o /dev/null -w '%{{http_code}}' -H 'Expect:' -F bits=@{} {url})\ntest \"$code\" = 200",
                quote(input)
            ),
            &[],
        );
        receiver.join().unwrap()
    });
    assert!(received > size, "the form holds the file");
    let run = meter.stop(size);
    std::fs::remove_file(out).unwrap();
    run
}

/// An HTTP message's head, read a byte at a time so that nothing of the body is taken with it.
fn read_head(socket: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// `source` read to its end in blocks of the file store's part size, each written to `out` as the store writes a
/// blob (`src/store/local.rs`): handed to the disk as soon as it is written (`sync_file_range`), a sync on another
/// thread every `LOCAL_SYNC_EVERY` bytes, then `fsync`. Every stage has a thread of its own, as many blocks queued
/// for it as bitsmith queues: the writer (the store's parts in flight) and, with `hashes`, sha1 and sha256
/// (the digests' queue), so that reading, hashing and writing overlap as far as two cores let them. Blocks are
/// reused once every stage is done with them, as the pipeline reuses its own; the reader sleeps until one is.
/// Returns the bytes written.
fn write_as_stored(source: &mut dyn std::io::Read, out: &Path, hashes: bool) -> u64 {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, mpsc};
    /// A buffer that goes back to the reader when the last stage lets go of it.
    struct Pooled {
        buffer: PageBuffer,
        home: mpsc::Sender<PageBuffer>,
    }
    impl Drop for Pooled {
        fn drop(&mut self) {
            let _ = self.home.send(std::mem::take(&mut self.buffer));
        }
    }
    impl std::ops::Deref for Pooled {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.buffer
        }
    }
    type Block = Arc<Pooled>;
    fn hash<D: Digest>(blocks: mpsc::Receiver<Block>) {
        let digest = blocks.into_iter().fold(D::new(), |digest, block| digest.chain_update(&block[..]));
        std::hint::black_box(digest.finalize());
    }
    let file = std::fs::File::create(out).unwrap();
    let part = bitsmith::store::LOCAL_PART_SIZE;
    let depth = bitsmith::digest::QUEUE_DEPTH;
    // Each stage holds at most its queue and the block it works on; one more is being filled.
    let (home, free) = mpsc::channel();
    for _ in 0..2 * (depth + 1) + PARTS_IN_FLIGHT + 2 {
        home.send(PageBuffer::zeroed(part)).unwrap();
    }
    std::thread::scope(|scope| {
        let (to_writer, to_write) = mpsc::sync_channel::<Block>(PARTS_IN_FLIGHT - 1);
        let file = &file;
        let writer = scope.spawn(move || {
            let mut syncing: Option<std::thread::ScopedJoinHandle<'_, ()>> = None;
            let (mut at, mut synced_at) = (0u64, 0u64);
            for block in to_write {
                file.write_all_at(&block[..], at).unwrap();
                // SAFETY: a plain syscall on a descriptor we own.
                unsafe {
                    libc::sync_file_range(file.as_raw_fd(), at as i64, block.len() as i64, libc::SYNC_FILE_RANGE_WRITE)
                };
                at += block.len() as u64;
                if at - synced_at >= bitsmith::store::LOCAL_SYNC_EVERY
                    && syncing.as_ref().is_none_or(|s| s.is_finished())
                {
                    synced_at = at;
                    syncing = Some(scope.spawn(move || file.sync_data().unwrap()));
                }
            }
            file.sync_all().unwrap();
            at
        });
        let (to_sha1, sha1_blocks) = mpsc::sync_channel::<Block>(depth);
        let (to_sha256, sha256_blocks) = mpsc::sync_channel::<Block>(depth);
        if hashes {
            scope.spawn(move || hash::<sha1::Sha1>(sha1_blocks));
            scope.spawn(move || hash::<sha2::Sha256>(sha256_blocks));
        }
        loop {
            let mut buffer = free.recv().unwrap();
            buffer.set_len(part);
            let mut filled = 0;
            while filled < part {
                match source.read(&mut buffer[filled..]).unwrap() {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            buffer.set_len(filled);
            let block = Arc::new(Pooled { buffer, home: home.clone() });
            if hashes {
                to_sha1.send(block.clone()).unwrap();
                to_sha256.send(block.clone()).unwrap();
            }
            to_writer.send(block).unwrap();
            if filled < part {
                break;
            }
        }
        // Every stage ends with its channel; the hashes before the scope returns.
        drop((to_sha1, to_sha256, to_writer));
        writer.join().unwrap()
    })
}

/// The page-cached file `input`, read as the file store reads its blobs ([`bitsmith::store::read_file`]).
fn file_blocks(input: &Path) -> impl futures::Stream<Item = bytes::Bytes> + use<> {
    let size = std::fs::metadata(input).unwrap().len();
    bitsmith::store::read_file(input.to_path_buf(), 0..size).map(Result::unwrap)
}

/// bitsmith's pipeline alone: `input`, read from the page cache as the store reads, through the digests into the
/// store (what an upload does once the form and the zip are parsed).
async fn pipeline_alone(store: &BlobStore, input: &Path, size: u64) -> Run {
    let meter = Meter::start();
    let chunks = file_blocks(input).map(Ok);
    let stored =
        bitsmith::pipeline::store_checked(Box::pin(chunks), "input", store, &owner("pipeline"), None, 64 * GIB, None)
            .await
            .unwrap();
    let run = meter.stop(size).with_waits(seconds(&stored.waits), size);
    assert_eq!(stored.digests.size, size);
    store.delete(&stored.blob.key).await.unwrap();
    run
}

/// A plain multipart upload of `input` to `bucket/key`: the store's part size and parts in flight, no digests.
async fn plain_multipart(s3: &dyn object_store::ObjectStore, key: &str, input: &Path, size: u64) -> Run {
    let meter = Meter::start();
    let path = object_store::path::Path::from(key);
    let upload = s3.put_multipart(&path).await.unwrap();
    let mut write = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut blocks = std::pin::pin!(file_blocks(input));
    while let Some(block) = blocks.next().await {
        write.wait_for_capacity(PARTS_IN_FLIGHT).await.unwrap();
        write.put(block);
    }
    write.finish().await.unwrap();
    let run = meter.stop(size);
    s3.delete(&path).await.unwrap();
    run
}

async fn fetch(fetcher: &Fetcher, source: &Source, size: u64) -> Run {
    let meter = Meter::start();
    let stored = fetcher.fetch(&owner("fetch"), source, None, Inputs::default()).await.unwrap();
    let run = meter.stop(size).with_waits(seconds(&stored.waits), size);
    assert_eq!(stored.digests.size, size);
    fetcher.store.delete(&stored.blob.key).await.unwrap();
    run
}

/// The rows of the table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Row {
    Hash,
    Disk,
    DiskAsStored,
    DiskBesideHashes,
    Source,
    PlainMultipart,
    ColdRead,
    CurlTee,
    Rclone,
    PlainFetch,
    PlainUpload,
    FetchToFile,
    FetchToS3,
    Pipeline,
    Upload,
    ColdCat,
    Download,
}

/// Every run of every row, and each bitsmith or peer row's ratios, round by round, to its limit and to its
/// reference.
#[derive(Default)]
struct Results {
    rates: BTreeMap<Row, Vec<f64>>,
    to_limit: BTreeMap<Row, Vec<f64>>,
    to_reference: BTreeMap<Row, Vec<f64>>,
    /// bitsmith's rows against the same work done on plain threads in the same round.
    to_same_work: BTreeMap<Row, Vec<f64>>,
    /// What the API process spent on a row, per GiB.
    api_spent: BTreeMap<Row, Vec<Spent>>,
    /// What the whole machine spent on each run of a row.
    machine: BTreeMap<Row, Vec<MachineUse>>,
    /// Where bitsmith's transfers waited, run by run.
    waits: BTreeMap<Row, Vec<[f64; 6]>>,
}

/// A process's CPU time and minor page faults: where an upload's or a download's time goes in the API.
#[derive(Clone, Copy, Default)]
struct Spent {
    user: f64,
    system: f64,
    faults: f64,
}

impl Spent {
    /// The counters of process `pid` so far, from `/proc/<pid>/stat`.
    fn of(pid: u32) -> Spent {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The fields after the command name (which may hold spaces) start with the state, field 3.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let field = |n: usize| fields[n - 3].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Spent { user: field(14) / ticks, system: field(15) / ticks, faults: field(10) }
    }

    /// What was spent between `self` and `later`, per GiB of `size` bytes.
    fn per_gib(self, later: Spent, size: u64) -> Spent {
        let scale = GIB as f64 / size as f64;
        Spent {
            user: (later.user - self.user) * scale,
            system: (later.system - self.system) * scale,
            faults: (later.faults - self.faults) * scale,
        }
    }
}

impl Results {
    /// A run of a limit; returned for the rows beside it. Each measurement starts with nothing of the one before
    /// left to be written.
    fn limit(&mut self, row: Row, run: Run) -> f64 {
        let Run { rate, machine, waits } = run;
        if let Some(waits) = waits {
            self.waits.entry(row).or_default().push(waits);
        }
        eprintln!(
            "{row:?}: {rate:.0} MB/s, machine {:.2} CPU-s/GiB, {:.2} cores busy",
            machine.busy_per_gib, machine.cores_busy
        );
        self.rates.entry(row).or_default().push(rate);
        self.machine.entry(row).or_default().push(machine);
        timed_shell("sync", &[]);
        rate
    }

    /// What the API process spent on a run of `row`.
    fn spent(&mut self, row: Row, spent: Spent) {
        self.api_spent.entry(row).or_default().push(spent);
    }

    /// A run of a peer's or bitsmith's row, against its `limit` and its `reference` in the same round; returned
    /// for the rows it is the reference of.
    fn judged(&mut self, row: Row, run: Run, limit: f64, reference: Option<f64>) -> f64 {
        let rate = self.limit(row, run);
        self.to_limit.entry(row).or_default().push(rate / limit);
        if let Some(reference) = reference {
            self.to_reference.entry(row).or_default().push(rate / reference);
        }
        rate
    }

    /// A bitsmith row's `rate` in a round against that round's `plain` rate for the same work.
    fn against_same_work(&mut self, row: Row, rate: f64, plain: f64) {
        self.to_same_work.entry(row).or_default().push(rate / plain);
    }
}

/// A line of the table: what it measures, its row and its target, if it has one.
type Line<'a> = (&'a str, Row, Option<Target>);

/// What a bitsmith row must reach: a ratio to its limit or to its reference.
#[derive(Clone, Copy)]
enum Target {
    Limit(f64),
    Reference(f64),
}

impl Target {
    /// "limit ≥ 0.9: met", judged on the unrounded median of the rounds' ratios.
    fn verdict(self, results: &Results, row: Row) -> String {
        let (name, ratios, wanted) = match self {
            Target::Limit(wanted) => ("limit", &results.to_limit[&row], wanted),
            Target::Reference(wanted) => ("reference", &results.to_reference[&row], wanted),
        };
        let met = if median(ratios) >= wanted { "met" } else { "not met" };
        format!("{name} ≥ {wanted:.1}: {met}")
    }
}

fn median(runs: &[f64]) -> f64 {
    let mut runs = runs.to_vec();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// GB/s of regrouping 1 GiB of 256 KiB chunks into 1 MiB blocks (as the pipeline regroups a body) with `copy`,
/// each block's destination `distance` bytes past its source modulo a page. Best of 3.
fn regroup_rate(distance: usize, copy: fn(&mut bytes::BytesMut, &[u8])) -> f64 {
    const CHUNK: usize = 256 << 10;
    const PAGE: usize = 4096;
    let source = data::bytes(SEED, 4 * CHUNK + PAGE);
    let start = source.as_ptr().align_offset(PAGE);
    let source = &source[start..start + 4 * CHUNK];
    let mut block = bytes::BytesMut::with_capacity(4 * CHUNK + 2 * PAGE);
    // Filler before the chunks puts the destination where it should be relative to the page-aligned source.
    let filler = (distance + PAGE - block.as_ptr() as usize % PAGE) % PAGE;
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..GIB as usize / source.len() {
                block.clear();
                block.resize(filler, 0);
                for chunk in source.chunks(CHUNK) {
                    copy(&mut block, chunk);
                }
                assert_eq!(block.len(), filler + source.len());
            }
            mbps(GIB, started.elapsed().as_secs_f64()) / 1e3
        })
        .fold(0.0, f64::max)
}

/// GB/s of reading the page-cached `input` in 4 MiB reads into a buffer `offset` bytes past a page boundary.
/// Best of 3.
fn page_cache_read_rate(input: &Path, offset: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(input).unwrap();
    let size = file.metadata().unwrap().len();
    let mut buffer = PageBuffer::zeroed((4 << 20) + offset);
    let buffer = &mut buffer[offset..];
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let mut at = 0;
            while at < size {
                let n = file.read_at(buffer, at).unwrap();
                assert!(n > 0);
                at += n as u64;
            }
            mbps(size, started.elapsed().as_secs_f64()) / 1e3
        })
        .fold(0.0, f64::max)
}

/// How fast the kernel copies a page-cached file out, by where the buffer starts relative to a page.
fn page_cache_read_table(input: &Path) {
    println!("| reading the page-cached input, 4 MiB reads: buffer past a page boundary | GB/s |");
    println!("|---|---:|");
    for offset in [0, 16, 64] {
        println!("| {offset} B | {:.1} |", page_cache_read_rate(input, offset));
    }
    println!();
}

/// How fast bytes are regrouped into blocks, by where the destination lies relative to the source: one
/// `memcpy` per chunk against [`bitsmith::recycle::append`].
fn regroup_table() {
    println!(
        "| regrouping 256 KiB chunks into 1 MiB blocks: destination past source, mod 4096 \
         | one `memcpy` per chunk, GB/s | `recycle::append`, GB/s |"
    );
    println!("|---|---:|---:|");
    for distance in [0, 8, 16, 31, 32, 64, 1000] {
        let memcpy = regroup_rate(distance, |block, chunk| block.extend_from_slice(chunk));
        let append = regroup_rate(distance, bitsmith::recycle::append);
        println!("| {distance} B | {memcpy:.1} | {append:.1} |");
    }
    println!();
}

#[tokio::main]
async fn main() {
    regroup_table();
    let size = env_u64s("BITSMITH_BENCH_SIZE", &[GIB])[0];
    let rss_sizes = env_u64s("BITSMITH_BENCH_RSS_SIZES", &[GIB, 2 * GIB, 4 * GIB, 8 * GIB]);
    let s3 = cloud::S3::try_from_env().expect("the S3 server: run through `make bench`");
    support::ensure_installed("rclone");
    let dir = tempfile::tempdir_in(std::env::var("BITSMITH_BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let input = dir.path().join("input.zip");
    // Entries of 512 MiB or more are checked but not cached, so the upload writes what the pipeline does.
    let entries = (size / bitsmith::cache::MAX_SIZE).max(1);
    support::write_zip(&input, entries, (size / entries).div_ceil(PART_SIZE as u64) * PART_SIZE as u64, SEED);
    let size = std::fs::metadata(&input).unwrap().len();
    timed_shell(&format!("cat {} > /dev/null", quote(&input)), &[]);
    page_cache_read_table(&input);
    let base = serve(input.clone());
    let source_url = format!("{base}/input");

    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let file_store =
        BlobStore::open(url::Url::from_directory_path(&store_dir).unwrap().as_str(), &BTreeMap::new()).unwrap();
    let to_file = fetcher(file_store);
    let s3_url = s3.store_url("bench");
    let (s3_store, _) = s3.store_at(&s3_url);
    let to_s3 = fetcher(s3_store);
    let plain_s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_bucket_name(s3.bucket())
        .with_access_key_id(&s3.access_key)
        .with_secret_access_key(&s3.secret_key)
        .with_region("us-east-1")
        .with_allow_http(true)
        .build()
        .unwrap();
    let prefix = s3_url.trim_start_matches(&format!("s3://{}/", s3.bucket())).split('?').next().unwrap().to_string();
    let rclone_env: Vec<(String, String)> = [
        ("TYPE", "s3"),
        ("PROVIDER", "Other"),
        ("ACCESS_KEY_ID", &s3.access_key),
        ("SECRET_ACCESS_KEY", &s3.secret_key),
        ("ENDPOINT", s3.endpoint()),
        ("REGION", "us-east-1"),
        ("FORCE_PATH_STYLE", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("RCLONE_CONFIG_BENCH_{k}"), v.to_string()))
    .collect();

    // The API, over a file store of its own.
    let (ns, token) = support::prepare_cluster("bench-transfer");
    let api_store = dir.path().join("api-store");
    let limit = (2 * size + 64 * MIB).to_string();
    let (api_process, api) =
        Api::start(api_store.as_os_str(), &["--max-upload-size", &limit, "--max-package-size", &limit]).await;
    let client = reqwest::Client::new();

    let block = data::bytes(SEED, 64 << 20);
    let mut results = Results::default();
    let mut residents = Vec::new();
    // The disk's durable write speed: the better of `dd conv=fsync` and a write as the store makes it.
    let disk = |results: &mut Results| {
        let out = store_dir.join("dd.out");
        let (quoted_input, quoted_out) = (quote(&input), quote(&out));
        let dd = shell_run(&format!("dd if={quoted_input} of={quoted_out} bs=1M conv=fsync status=none"), &[], size);
        timed_shell(&format!("rm {quoted_out}"), &[]);
        let dd = results.limit(Row::Disk, dd);
        let written = results.limit(Row::DiskAsStored, durable_write(&input, &out));
        dd.max(written)
    };
    let plain_key = format!("{prefix}/plain");
    let plain = || plain_multipart(&plain_s3, &plain_key, &input, size);
    for round in 0..RUNS {
        let hash = results.limit(Row::Hash, hash_limit(&block, size));
        let source = results.limit(Row::Source, shell_run(&format!("curl -sf -o /dev/null {source_url}"), &[], size));

        // Writes to the file store, each between two runs of `dd`: the disk's speed swings, and a row is held
        // against the better of the two runs beside it.
        let disk_0 = disk(&mut results);
        let beside = beside_hashes(&block, || durable_write(&input, &store_dir.join("beside.out")));
        results.limit(Row::DiskBesideHashes, beside);
        let out = store_dir.join("tee.out");
        let (dir_q, out_q) = (quote(dir.path()), quote(&out));
        let tee = shell_run(
            &format!(
                "cd {dir_q}; rm -f one; mkfifo one; sha1sum < one > /dev/null & sums=$!\n\
                 curl -sf {source_url} | tee {out_q} one | sha256sum > /dev/null; wait $sums; sync {out_q}"
            ),
            &[],
            size,
        );
        timed_shell(&format!("rm {dir_q}/one {out_q}"), &[]);
        let disk_1 = disk(&mut results);
        let tee = results.judged(Row::CurlTee, tee, hash.min(source).min(disk_0.max(disk_1)), None);
        let fetched = fetch(&to_file, &http_source(&source_url), size).await;
        timed_shell("sync", &[]);
        let same_work = plain_fetch(&source_url, &store_dir.join("plain.out"), size);
        let disk_2 = disk(&mut results);
        let to_file_limit = hash.min(source).min(disk_1.max(disk_2));
        let same_work = results.judged(Row::PlainFetch, same_work, to_file_limit, Some(tee));
        let fetched = results.judged(Row::FetchToFile, fetched, to_file_limit, Some(tee));
        results.against_same_work(Row::FetchToFile, fetched, same_work);
        let pipeline = pipeline_alone(&to_file.store, &input, size).await;
        let disk_3 = disk(&mut results);
        let pipeline = results.judged(Row::Pipeline, pipeline, hash.min(disk_2.max(disk_3)), None);
        let guid = support::package(&client, &api, &token, &ns, &format!("upload-{round}")).await;
        // curl sends the form, as CF clients upload: a client in its own process, which costs this 2-core
        // machine little CPU beside the API's.
        let upload_url = format!("{api}/v3/packages/{guid}/upload");
        let before = Spent::of(api_process.process.id());
        let counted = api_process.transfer_seconds().await;
        let uploaded = shell_run(
            &format!(
                "code=$(curl -sS -o /dev/null -w '%{{http_code}}' -H 'Expect:' -H \"Authorization: bearer $TOKEN\" \
                 -F bits=@{} {upload_url})\ntest \"$code\" = 200",
                quote(&input)
            ),
            &[("TOKEN".to_string(), token.clone())],
            size,
        );
        results.spent(Row::Upload, before.per_gib(Spent::of(api_process.process.id()), size));
        let now = api_process.transfer_seconds().await;
        let uploaded = uploaded.with_waits(std::array::from_fn(|at| now[at] - counted[at]), size);
        timed_shell("sync", &[]);
        let same_work = plain_upload(&input, &store_dir.join("plain.out"), size);
        let disk_4 = disk(&mut results);
        let upload_limit = hash.min(disk_3.max(disk_4));
        let same_work = results.judged(Row::PlainUpload, same_work, upload_limit, Some(pipeline));
        let uploaded = results.judged(Row::Upload, uploaded, upload_limit, Some(pipeline));
        results.against_same_work(Row::Upload, uploaded, same_work);

        // Writes to Garage, likewise between two plain multipart uploads.
        let plain_0 = results.limit(Row::PlainMultipart, plain().await);
        let object = format!("bench:{}/{prefix}/rclone", s3.bucket());
        // rclone's S3 client cannot take a CA bundle from the environment (it fails to start); Garage is plain http.
        let copy = format!("env -u AWS_CA_BUNDLE rclone copyurl {source_url} {object}");
        let rclone = shell_run(&copy, &rclone_env, size);
        timed_shell(&format!("env -u AWS_CA_BUNDLE rclone deletefile {object}"), &rclone_env);
        let plain_1 = results.limit(Row::PlainMultipart, plain().await);
        let rclone = results.judged(Row::Rclone, rclone, source.min(plain_0.max(plain_1)), None);
        let fetched = fetch(&to_s3, &http_source(&source_url), size).await;
        let plain_2 = results.limit(Row::PlainMultipart, plain().await);
        results.judged(Row::FetchToS3, fetched, hash.min(source).min(plain_1.max(plain_2)), Some(rclone));

        // Reads of the uploaded blob, its pages dropped before each, likewise between two reads as the store
        // reads.
        let blob = largest_file(&api_store);
        let stored = std::fs::metadata(&blob).unwrap().len();
        residents.push(make_cold(&blob));
        let read_0 = results.limit(Row::ColdRead, parallel_cold_read(&blob));
        residents.push(make_cold(&blob));
        let cat = format!("cat {} > /dev/null", quote(&blob));
        let cat = shell_run(&cat, &[], stored);
        residents.push(make_cold(&blob));
        let read_1 = results.limit(Row::ColdRead, parallel_cold_read(&blob));
        let cat = results.judged(Row::ColdCat, cat, read_0.max(read_1), None);
        residents.push(make_cold(&blob));
        let before = Spent::of(api_process.process.id());
        let download =
            format!("curl -sf -o /dev/null -H 'Authorization: bearer {token}' {api}/v3/packages/{guid}/download");
        let downloaded = shell_run(&download, &[], stored);
        results.spent(Row::Download, before.per_gib(Spent::of(api_process.process.id()), stored));
        residents.push(make_cold(&blob));
        let read_2 = results.limit(Row::ColdRead, parallel_cold_read(&blob));
        results.judged(Row::Download, downloaded, read_1.max(read_2), Some(cat));
        std::fs::remove_file(&blob).unwrap();
    }

    println!(
        "\nbitsmith transfer benchmark: {:.2} GiB zip, median of {RUNS} interleaved rounds, {} cores",
        size as f64 / GIB as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let as_stored = format!(
        "disk: 1 MiB writes, each handed to the disk at once, a sync every {} MiB, then `fsync` (as the store writes)",
        bitsmith::store::LOCAL_SYNC_EVERY >> 20
    );
    let sections: [(&str, Vec<Line>); 4] = [
        (
            "limits",
            vec![
                ("sha1 ∥ sha256 on two threads, in memory", Row::Hash, None),
                ("source alone: `curl -o /dev/null` over loopback", Row::Source, None),
                ("disk: `dd conv=fsync` into the store's directory", Row::Disk, None),
                (&as_stored, Row::DiskAsStored, None),
                (
                    "disk: as the store writes, while sha1 and sha256 hash other bytes on both cores at the lowest \
                     priority (not a limit: the disk's write on busy cores)",
                    Row::DiskBesideHashes,
                    None,
                ),
                ("Garage: plain multipart upload (8 MiB parts, 3 in flight)", Row::PlainMultipart, None),
                ("cold read of the stored blob: 4 MiB ranges, 4 at once, as the store reads", Row::ColdRead, None),
            ],
        ),
        (
            "peers",
            vec![
                ("`curl \\| tee` file, `sha1sum`, `sha256sum`; `sync`", Row::CurlTee, None),
                ("`rclone copyurl` → Garage (MD5 only)", Row::Rclone, None),
                ("`cat` of the stored blob, pages dropped", Row::ColdCat, None),
            ],
        ),
        (
            "the same work without bitsmith: plain threads and blocking sockets",
            vec![
                (
                    "fetch: receive over loopback, sha1 ∥ sha256, write as the store writes (reference: `curl \\| tee`)",
                    Row::PlainFetch,
                    None,
                ),
                (
                    "upload: a `curl -F` form received whole, sha1 ∥ sha256, write as the store writes; \
                     no multipart parse, no zip check (reference: the pipeline alone)",
                    Row::PlainUpload,
                    None,
                ),
            ],
        ),
        (
            "bitsmith",
            vec![
                ("fetch http → file store (reference: `curl \\| tee`)", Row::FetchToFile, Some(Target::Limit(0.9))),
                ("fetch http → Garage S3 (reference: rclone)", Row::FetchToS3, Some(Target::Reference(1.0))),
                ("pipeline alone: page-cached file → digests → file store", Row::Pipeline, None),
                (
                    "upload through the API → file store (reference: the pipeline alone)",
                    Row::Upload,
                    Some(Target::Reference(0.9)),
                ),
                (
                    "download through the API, blob cold (reference: cold `cat`)",
                    Row::Download,
                    Some(Target::Reference(0.9)),
                ),
            ],
        ),
    ];
    println!("| path | MB/s (median) | runs | / limit | / reference | / same work | target |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (section, rows) in &sections {
        println!("| **{section}** | | | | | | |");
        for &(name, row, target) in rows {
            let runs = &results.rates[&row];
            let (low, high) = runs.iter().fold((f64::MAX, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
            let ratio = |ratios: Option<&Vec<f64>>| ratios.map(|r| format!("{:.2}", median(r))).unwrap_or_default();
            // A row above its limit is a wrong measurement, not a fast path.
            let over = results.to_limit.get(&row).is_some_and(|r| median(r) > 1.0) as usize;
            println!(
                "| {name} | {:.0} | {low:.0}–{high:.0} | {}{} | {} | {} | {} |",
                median(runs),
                ratio(results.to_limit.get(&row)),
                [" ", " **over its limit**"][over],
                ratio(results.to_reference.get(&row)),
                ratio(results.to_same_work.get(&row)),
                target.map(|target| target.verdict(&results, row)).unwrap_or_default(),
            );
        }
    }
    println!(
        "\nA ratio is the median of the rounds' ratios. Limits: writes to the file store: min(hash, source, disk), \
         the disk being the better of its two rows; writes to Garage: min(hash, source, plain multipart), without \
         the hash for rclone; cold reads: the read as the store reads. The disk, Garage and cold-read limits are \
         the better of the two runs measured just before and just after the row. \"/ same work\": a bitsmith row \
         against the same work on plain threads in the same round. Pages resident before the cold reads: at most \
         {:.1} %.",
        residents.iter().copied().fold(0.0, f64::max) * 100.0
    );
    // Every process counts (client, source, servers, the kernel's writeback): a row needs at least its CPU-seconds
    // divided by the cores, whatever else holds it up.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!(
        "\n| path: the whole machine, median of the rounds | CPU-s per GiB | cores busy | stolen CPU-s per GiB \
         | fastest the CPU allows on {cores} cores, MB/s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (_, rows) in &sections {
        for &(name, row, _) in rows {
            let runs = &results.machine[&row];
            let of = |part: fn(&MachineUse) -> f64| median(&runs.iter().map(part).collect::<Vec<_>>());
            let busy = of(|m| m.busy_per_gib);
            println!(
                "| {name} | {busy:.2} | {:.2} | {:.2} | {:.0} |",
                of(|m| m.cores_busy),
                of(|m| m.stolen_per_gib),
                cores * GIB as f64 / busy / 1e6
            );
        }
    }
    println!(
        "\n| where bitsmith's transfers waited, seconds per GiB (median of the rounds) | transfer | on the source \
         | digests | check | store | end: last digests, verdict, commit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (_, rows) in &sections {
        for &(name, row, _) in rows {
            let Some(runs) = results.waits.get(&row) else { continue };
            let columns: Vec<String> =
                (0..6).map(|at| format!("{:.2}", median(&runs.iter().map(|w| w[at]).collect::<Vec<_>>()))).collect();
            println!("| {name} | {} |", columns.join(" | "));
        }
    }
    println!("\n| the API process, per GiB (median of the rounds) | user CPU-s | system CPU-s | minor page faults |");
    println!("|---|---:|---:|---:|");
    for (name, row) in [("upload", Row::Upload), ("download", Row::Download)] {
        let spent = &results.api_spent[&row];
        let of = |part: fn(&Spent) -> f64| median(&spent.iter().map(part).collect::<Vec<_>>());
        println!("| {name} | {:.2} | {:.2} | {:.0} |", of(|s| s.user), of(|s| s.system), of(|s| s.faults));
    }
    std::fs::remove_file(&input).unwrap();

    // Generated bytes, made as they are sent: no input file of the larger sizes.
    let generated = http_server::TestServer::start().await;
    println!("\n| bitsmith fetch, http → file store | peak RSS (MiB) |");
    println!("|---|---:|");
    for rss_size in rss_sizes {
        let path = format!("/generated/{rss_size}");
        generated.route(&path, http_server::Reply::Body { seed: SEED, size: rss_size, length: true });
        let peak = tokio::task::block_in_place(|| fetch_peak_rss(dir.path(), &generated.url(&path)));
        println!("| {:.2} GiB | {peak:.1} |", rss_size as f64 / GIB as f64);
    }
    support::kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
}

/// Run `bitsmith fetch` of `url` into a file store and return its peak RSS in MiB, sampled every 10 ms.
fn fetch_peak_rss(dir: &Path, url: &str) -> f64 {
    let manifest = dir.join("rss.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: rss\nspec:\n  type: bits\n  source:\n    http:\n      url: {url}\n"
        ),
    )
    .unwrap();
    let store = dir.join("rss-store");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["fetch", "--max-size", "64GiB", "--allow-source-cidr", "127.0.0.0/8", "--store"])
        .arg(&store)
        .arg("-f")
        .arg(&manifest)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // VmHWM is the high-water mark of the child's own address space since exec. (The rusage of wait4 would also
    // count the moment between fork and exec, when the child is still a copy of this large process.)
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            peak_kib = peak_kib.max(kib);
        }
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "bitsmith fetch failed");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::remove_dir_all(&store).unwrap();
    peak_kib as f64 / 1024.0
}
