//! The snapshot store, format version 3 (docs/snapshot-format.md): a snapshot is a chain of
//! *layers*, each a directory holding a `state` file and a sparse `memory` file. A full layer
//! holds every non-zero page; an incremental layer holds only the pages dirtied since its
//! parent, which it names by id and by the SHA-256 of the parent's state file.
//!
//! Every page written is covered by a 128-bit check in the state file's index: in a plain layer
//! one check per aligned 64 KiB group of pages (XXH3-128 of the pages' XXH3-128s), in an
//! encrypted layer each page's Poly1305 tag from XChaCha20-Poly1305 (the state payload is
//! encrypted the same way). A chain is opened and checked as a whole
//! (versions, checksums, parent links, key, expiry, file sizes) before anything is restored,
//! and every page is checked as it is loaded, before the guest can see it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::state::{VmState, MEMORY_FILE, STATE_FILE};

/// Magic of a layer's state file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"SPANVMST";

/// State-file format version of layered snapshots (version 1 was a single full image; version
/// 2 checked plain pages one by one; version 3 held the VM state as one JSON object).
pub const SNAPSHOT_VERSION: u32 = 4;
/// Header: magic, version, flags, payload length, CRC-32, key id, salt.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 8 + 12;
/// Flag: payload and pages are encrypted.
const FLAG_ENCRYPTED: u32 = 1;
/// Largest state payload accepted (a 4 GiB guest's index is ~16 MiB).
const MAX_PAYLOAD: u64 = 256 << 20;
/// Longest chain accepted.
pub const MAX_CHAIN: usize = 64;
/// Pages copied, checked and written per batch (8 MiB).
const BATCH_PAGES: u64 = 2048;
/// Bytes of an index run header: start page, count, kind, round.
const RUN_HEADER: usize = 8 + 4 + 1 + 4;
/// Pages of an aligned group that one check covers in a plain layer (64 KiB): a 16th of the
/// index a check per page needs, which a restore reads and checksums before the guest runs
/// (a 4 GiB guest's took 2-3 ms); a page is then loaded with its group's other pages.
pub const GROUP_PAGES: u64 = 16;

/// Snapshot errors: each says which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O on a snapshot file failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// A file is not a valid snapshot file (truncated, corrupted, foreign, wrong version).
    #[error("{path} is invalid: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The key is missing, wrong, or the file was tampered with.
    #[error("{path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The layers do not form a chain.
    #[error("broken snapshot chain: {0}")]
    Chain(String),
    /// The snapshot's expiry has passed.
    #[error("snapshot {dir} expired {ago} s ago (at unix time {at}); it can only be shredded (`spanvmm snapshot shred {dir}`)")]
    Expired {
        /// The layer.
        dir: String,
        /// Expiry, unix seconds.
        at: u64,
        /// Seconds since.
        ago: u64,
    },
    /// The request does not fit (bad options, wrong guest size).
    #[error("{0}")]
    Usage(String),
    /// The VM state inside a state file is refused (the message names the section).
    #[error(transparent)]
    State(Box<crate::state::StateError>),
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.display().to_string(),
        err,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if r > 0 {
            got += r as usize;
        }
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A snapshot key: 32 bytes from a key file.
#[derive(Clone)]
pub struct SnapshotKey {
    cipher: XChaCha20Poly1305,
    id: [u8; 8],
}

impl SnapshotKey {
    /// Reads a key file: 32 raw bytes, or 64 hex digits (a trailing newline is fine).
    pub fn from_file(path: &Path) -> Result<Self, SnapshotError> {
        let bytes = std::fs::read(path).map_err(io_at(path))?;
        Self::from_bytes(&bytes).map_err(|why| SnapshotError::Key {
            path: path.display().to_string(),
            why,
        })
    }

    /// A key from a key file's contents.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
        let key: [u8; 32] = if text.len() == 64 && text.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut k = [0u8; 32];
            for (i, k) in k.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            k
        } else if bytes.len() == 32 {
            bytes.try_into().unwrap_or([0; 32])
        } else {
            return Err(format!(
                "a key file holds 32 raw bytes or 64 hex digits, not {} bytes",
                bytes.len()
            ));
        };
        let mut h = Sha256::new();
        h.update(b"spanvmm snapshot key id");
        h.update(key);
        let id: [u8; 8] = h.finalize()[..8].try_into().unwrap_or([0; 8]);
        Ok(SnapshotKey {
            cipher: XChaCha20Poly1305::new((&key).into()),
            id,
        })
    }
}

/// Nonce of page `page` written in `round` of a layer with `salt`; the payload uses round
/// `u32::MAX`, which no page round reaches.
fn nonce(salt: &[u8; 12], round: u32, page: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..12].copy_from_slice(salt);
    n[12..16].copy_from_slice(&round.to_le_bytes());
    n[16..].copy_from_slice(&page.to_le_bytes());
    n.into()
}

/// The parent of an incremental layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent layer's directory (absolute).
    pub dir: PathBuf,
    /// The parent layer's id.
    pub id: String,
    /// SHA-256 of the parent's state file.
    pub state_sha256: String,
}

/// What a layer is (the JSON part of the state payload).
#[derive(Serialize, Deserialize)]
pub struct LayerManifest {
    /// Random id of this layer.
    pub id: String,
    /// Parent layer (incremental), or none (full).
    pub parent: Option<ParentRef>,
    /// Creation time, unix seconds.
    pub created_unix: u64,
    /// Restore is refused after this time (unix seconds).
    pub expires_unix: Option<u64>,
    /// Guest regions excluded from the snapshot, page-aligned `(gpa, len)`; zero on restore.
    pub secrets: Vec<(u64, u64)>,
    /// Write rounds (1 for a stop-the-world layer).
    pub rounds: u32,
    /// Bytes of page data written (the last copy of each page).
    pub data_bytes: u64,
}

/// What one page of a layer is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PageEntry {
    /// Not in this layer (the parent's copy stands; zero for a full layer).
    Absent,
    /// Zero in this layer (not written).
    Zero,
    /// Written in `round`, with its check.
    Data { round: u32, check: [u8; 16] },
}

/// How a layer is written.
#[derive(Default, Clone)]
pub struct LayerOptions {
    /// Parent layer directory (incremental layer), or none (full layer).
    pub parent: Option<PathBuf>,
    /// Encrypt with this key.
    pub key: Option<SnapshotKey>,
    /// Seconds until restore is refused.
    pub expires_in_s: Option<u64>,
    /// Guest regions `(gpa, len)` never written; rounded out to whole pages.
    pub secrets: Vec<(u64, u64)>,
}

/// A page-aligned bounce buffer (O_DIRECT needs one).
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping, no file; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "cannot map a {len}-byte buffer");
        AlignedBuf {
            ptr: ptr.cast(),
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by `self`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|c| {
        c.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

fn page_check(page: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(page).to_le_bytes()
}

/// The check of a group of pages from their checks, concatenated.
fn group_check(page_checks: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(page_checks).to_le_bytes()
}

/// Aligned groups that pages `[start, start + count)` touch (`count` > 0).
fn groups_of(start: u64, count: u64) -> u64 {
    (start + count - 1) / GROUP_PAGES - start / GROUP_PAGES + 1
}

fn bit(bits: &[u64], p: u64) -> bool {
    bits.get((p / 64) as usize)
        .is_some_and(|w| w >> (p % 64) & 1 == 1)
}

/// Page bitmap of secret regions, rounded out to whole pages.
fn secret_bitmap(secrets: &[(u64, u64)], pages: u64) -> Vec<u64> {
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    for &(gpa, len) in secrets {
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE).min(pages);
        for p in first..end {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    bits
}

/// Page-aligned version of the secret regions, merged and sorted.
fn normalize_secrets(secrets: &[(u64, u64)], mem: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = secrets
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(gpa, len)| {
            let a = gpa / PAGE_SIZE * PAGE_SIZE;
            let b = gpa.saturating_add(len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            (a.min(mem), b.min(mem))
        })
        .filter(|(a, b)| a < b)
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

/// One write of a batch: `len` bytes at `at` in the buffer go to `offset` in the file.
struct WriteRun {
    at: usize,
    len: usize,
    offset: u64,
}

/// Copies batches of pages out of guest memory and checks (or encrypts) them.
struct Filler<'a> {
    ram: &'a GuestRam,
    /// Runs of pages holding data in the memfd (the rest are holes: zero); `None`: every
    /// page asked for holds data.
    data: Option<&'a [(u64, u64)]>,
    entries: &'a mut [PageEntry],
    secret_bits: &'a [u64],
    key: Option<&'a SnapshotKey>,
    salt: &'a [u8; 12],
    id: &'a [u8; 16],
    round: u32,
}

impl Filler<'_> {
    /// Fills buffers from `free` with the wanted pages and hands them to `full`.
    fn all(
        &mut self,
        bitmap: Option<&[u64]>,
        free: &mpsc::Receiver<AlignedBuf>,
        full: &mpsc::SyncSender<(AlignedBuf, Vec<WriteRun>)>,
    ) -> Result<(), SnapshotError> {
        let pages = self.entries.len() as u64;
        let wanted = |p: u64| bitmap.is_none_or(|b| bit(b, p));
        let mut p = 0u64;
        while p < pages {
            if !wanted(p) {
                // Skip whole clear words of the bitmap at once.
                p = match bitmap {
                    Some(b) if p.is_multiple_of(64) && b.get((p / 64) as usize) == Some(&0) => {
                        p + 64
                    }
                    _ => p + 1,
                };
                continue;
            }
            let start = p;
            while p < pages && p - start < BATCH_PAGES && wanted(p) {
                p += 1;
            }
            // A buffer the writer is done with (none: the writer failed; its error wins).
            let Ok(mut buf) = free.recv() else {
                return Ok(());
            };
            let runs = self.batch(start, p, &mut buf)?;
            if full.send((buf, runs)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Copies and checks pages `[start, end)` into `buf`; returns the runs to write.
    fn batch(
        &mut self,
        start: u64,
        end: u64,
        buf: &mut AlignedBuf,
    ) -> Result<Vec<WriteRun>, SnapshotError> {
        let ps = PAGE_SIZE as usize;
        let n = (end - start) as usize;
        let buf = &mut buf.slice()[..n * ps];
        // SAFETY: pages [start, end) lie inside guest memory, which `self.ram` keeps mapped;
        // a guest write racing with the copy only changes what this round saves (the page is
        // dirty again and a later round writes it).
        let src = unsafe {
            std::slice::from_raw_parts(
                self.ram.host_base().add((start * PAGE_SIZE) as usize),
                buf.len(),
            )
        };
        // Holes of the memfd (never written) are zero without reading them: a read would
        // allocate them. The rest is mapped here in one call per run: page by page, a first
        // save of a 4 GiB guest spent 3 s in faults (4.9 s against 1.5-1.9 s for the next).
        let data: Option<Vec<(u64, u64)>> = self.data.map(|all| {
            let first = all.partition_point(|&(_, b)| b <= start);
            all[first..]
                .iter()
                .take_while(|&&(a, _)| a < end)
                .map(|&(a, b)| (a.max(start), b.min(end)))
                .collect()
        });
        for &(a, b) in data.iter().flatten() {
            let _ = self.ram.populate_read(a * PAGE_SIZE, (b - a) * PAGE_SIZE);
        }
        let in_data = |gp: u64| {
            data.as_ref()
                .is_none_or(|d| d.iter().any(|&(a, b)| a <= gp && gp < b))
        };
        let mut runs: Vec<WriteRun> = Vec::new();
        for (i, page) in buf.chunks_exact_mut(ps).enumerate() {
            let gp = start + i as u64;
            // Zero pages are found in guest memory and never copied; the copy is checked
            // again (the guest may have written the page meanwhile).
            let from = &src[i * ps..(i + 1) * ps];
            if bit(self.secret_bits, gp) || !in_data(gp) || is_zero(from) {
                self.entries[gp as usize] = PageEntry::Zero;
                continue;
            }
            page.copy_from_slice(from);
            if is_zero(page) {
                self.entries[gp as usize] = PageEntry::Zero;
                continue;
            }
            let check = match self.key {
                None => page_check(page),
                Some(k) => k
                    .cipher
                    .encrypt_in_place_detached(&nonce(self.salt, self.round, gp), self.id, page)
                    .map_err(|_| SnapshotError::Usage("page encryption failed".into()))?
                    .into(),
            };
            self.entries[gp as usize] = PageEntry::Data {
                round: self.round,
                check,
            };
            match runs.last_mut() {
                Some(r) if r.at + r.len == i * ps => r.len += ps,
                _ => runs.push(WriteRun {
                    at: i * ps,
                    len: ps,
                    offset: gp * PAGE_SIZE,
                }),
            }
        }
        Ok(runs)
    }
}

/// Result of writing a layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// The layer's id.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Pages the layer holds data for.
    pub data_pages: u64,
    /// Zero pages it records (incremental layers).
    pub zero_pages: u64,
    /// Bytes written to the memory file in all rounds.
    pub bytes_written: u64,
    /// Write rounds.
    pub rounds: u32,
}

/// Writes one layer: page batches (while the guest runs or not), then the state file.
pub struct LayerWriter {
    dir: PathBuf,
    ram: Arc<GuestRam>,
    file: File,
    key: Option<SnapshotKey>,
    salt: [u8; 12],
    id: [u8; 16],
    parent: Option<ParentRef>,
    expires_unix: Option<u64>,
    secrets: Vec<(u64, u64)>,
    secret_bits: Vec<u64>,
    entries: Vec<PageEntry>,
    round: u32,
    bytes_written: u64,
    bufs: Vec<AlignedBuf>,
}

impl LayerWriter {
    /// Starts a layer in `dir` for a VM with guest memory `ram`. An older snapshot in `dir` is
    /// invalidated first (its state file removed), so a crash never leaves a mix behind.
    pub fn create(
        dir: &Path,
        ram: Arc<GuestRam>,
        opts: LayerOptions,
    ) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let dir = std::path::absolute(dir).map_err(io_at(dir))?;
        let parent = match &opts.parent {
            None => None,
            Some(p) => {
                let p = std::path::absolute(p).map_err(io_at(p))?;
                if p == dir {
                    return Err(SnapshotError::Usage(
                        "a layer cannot be its own parent: use another directory".into(),
                    ));
                }
                let layer = Layer::open(&p, opts.key.as_ref())?;
                if layer.vm.machine.mem_bytes != ram.size() {
                    return Err(SnapshotError::Chain(format!(
                        "parent {} is of a {}-byte guest, this one has {} bytes",
                        p.display(),
                        layer.vm.machine.mem_bytes,
                        ram.size()
                    )));
                }
                Some(ParentRef {
                    dir: p,
                    id: layer.manifest.id.clone(),
                    state_sha256: layer.state_sha256.clone().unwrap_or_default(),
                })
            }
        };
        let state = dir.join(STATE_FILE);
        match std::fs::remove_file(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(&state)(e)),
            _ => {}
        }
        let path = dir.join(MEMORY_FILE);
        // O_DIRECT: batches go to the disk without a page-cache copy; filesystems without it
        // get buffered writes.
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            // Guest memory is the guest's secrets: readable by the owner only.
            o.mode(0o600);
            o.write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let file = open(true).or_else(|_| open(false)).map_err(io_at(&path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_at(&path))?;
        file.set_len(ram.size()).map_err(io_at(&path))?;
        let pages = ram.size() / PAGE_SIZE;
        let secrets = normalize_secrets(&opts.secrets, ram.size());
        Ok(LayerWriter {
            dir,
            secret_bits: secret_bitmap(&secrets, pages),
            secrets,
            file,
            key: opts.key,
            salt: random_bytes(),
            id: random_bytes(),
            parent,
            expires_unix: opts.expires_in_s.map(|s| unix_now().saturating_add(s)),
            entries: vec![PageEntry::Absent; pages as usize],
            round: 0,
            bytes_written: 0,
            bufs: (0..2)
                .map(|_| AlignedBuf::new((BATCH_PAGES * PAGE_SIZE) as usize))
                .collect(),
            ram,
        })
    }

    /// The layer's id.
    pub fn id(&self) -> String {
        hex(&self.id)
    }

    /// Adds secret regions (they are never written from now on; copies written earlier in
    /// this layer are dropped from its index).
    pub fn add_secrets(&mut self, more: &[(u64, u64)]) {
        let mut all = self.secrets.clone();
        all.extend_from_slice(more);
        self.secrets = normalize_secrets(&all, self.ram.size());
        let pages = self.entries.len() as u64;
        self.secret_bits = secret_bitmap(&self.secrets, pages);
        for p in 0..pages {
            if bit(&self.secret_bits, p) && self.entries[p as usize] != PageEntry::Absent {
                self.entries[p as usize] = PageEntry::Zero;
            }
        }
    }

    /// Writes the pages set in `bitmap` (every page when `None`) as they are now: each batch
    /// is copied out of guest memory first, so the guest may keep running (a page it changes
    /// meanwhile is written again in a later round). Copying and checking one batch overlaps
    /// with writing the previous one (a writer thread, two buffers). Returns the bytes written.
    pub fn write_pages(&mut self, bitmap: Option<&[u64]>) -> Result<u64, SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        let round = self.round;
        self.round += 1;
        let mut bufs = std::mem::take(&mut self.bufs);
        let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, Vec<WriteRun>)>(1);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        for b in bufs.drain(..) {
            let _ = free_tx.send(b);
        }
        let file = &self.file;
        // Where the memfd holds data, for a full round: found once (a hole search walks a
        // whole run per call). Pages of a bitmap were written, so they are data; scanning
        // the memfd there would cost a 1 GiB guest 8-10 ms of a live snapshot's pause.
        let data = bitmap
            .is_none()
            .then(|| self.ram.data_runs(0, self.entries.len() as u64));
        let mut fill = Filler {
            ram: &self.ram,
            data: data.as_deref(),
            entries: &mut self.entries,
            secret_bits: &self.secret_bits,
            key: self.key.as_ref(),
            salt: &self.salt,
            id: &self.id,
            round,
        };
        let (filled, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let mut written = 0u64;
                for (buf, runs) in full_rx {
                    for r in &runs {
                        file.write_all_at(&buf.as_slice()[r.at..r.at + r.len], r.offset)?;
                        written += r.len as u64;
                    }
                    if free_tx.send(buf).is_err() {
                        break;
                    }
                }
                Ok::<u64, std::io::Error>(written)
            });
            let filled = fill.all(bitmap, &free_rx, &full_tx);
            drop(full_tx);
            let written = writer.join().unwrap_or_else(|_| {
                Err(std::io::Error::other("the snapshot writer thread panicked"))
            });
            (filled, written)
        });
        // The buffers come back for the next round.
        self.bufs.extend(free_rx.try_iter());
        while self.bufs.len() < 2 {
            self.bufs
                .push(AlignedBuf::new((BATCH_PAGES * PAGE_SIZE) as usize));
        }
        let written = written.map_err(io_at(&path))?;
        filled?;
        self.bytes_written += written;
        Ok(written)
    }

    /// Finishes the layer: flushes the memory file, then writes the state file (atomically:
    /// the layer becomes valid in one rename).
    pub fn finish(self, vm: VmState) -> Result<LayerSummary, SnapshotError> {
        let mem = self.dir.join(MEMORY_FILE);
        self.file.sync_all().map_err(io_at(&mem))?;
        let full = self.parent.is_none();
        // Rounds only tell encrypted pages' nonces apart: a plain layer's runs ignore them.
        let plain = self.key.is_none();
        let mut index = Vec::new();
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        let mut checks: Vec<u8> = Vec::new();
        let pages = self.entries.len();
        let mut p = 0usize;
        while p < pages {
            let e = self.entries[p];
            let kind = match e {
                PageEntry::Absent => None,
                // A full layer's zero pages need no entry: everything absent is zero.
                PageEntry::Zero if full => None,
                PageEntry::Zero => Some((0u8, 0u32)),
                PageEntry::Data { round, .. } => Some((1u8, if plain { 0 } else { round })),
            };
            let Some((k, round)) = kind else {
                p += 1;
                continue;
            };
            let start = p;
            checks.clear();
            while p < pages {
                let same = match self.entries[p] {
                    PageEntry::Zero => k == 0,
                    PageEntry::Data { round: r, check } => {
                        if k == 1 && (plain || r == round) {
                            checks.extend_from_slice(&check);
                            true
                        } else {
                            false
                        }
                    }
                    PageEntry::Absent => false,
                };
                if !same || p - start >= u32::MAX as usize {
                    break;
                }
                p += 1;
            }
            let count = (p - start) as u64;
            if k == 1 {
                data_pages += count;
            } else {
                zero_pages += count;
            }
            index.extend_from_slice(&(start as u64).to_le_bytes());
            index.extend_from_slice(&(count as u32).to_le_bytes());
            index.push(k);
            index.extend_from_slice(&round.to_le_bytes());
            if k == 1 && plain {
                // One check per aligned group the run touches.
                let group = GROUP_PAGES as usize;
                let mut q = start;
                while q < p {
                    let g_end = ((q / group + 1) * group).min(p);
                    let of_group = &checks[16 * (q - start)..16 * (g_end - start)];
                    index.extend_from_slice(&group_check(of_group));
                    q = g_end;
                }
            } else {
                index.extend_from_slice(&checks);
            }
        }
        let manifest = LayerManifest {
            id: hex(&self.id),
            parent: self.parent,
            created_unix: unix_now(),
            expires_unix: self.expires_unix,
            secrets: self.secrets,
            rounds: self.round,
            data_bytes: data_pages * PAGE_SIZE,
        };
        let payload = payload_of(&manifest, &vm.to_bytes(), &index);
        let bytes = seal(&payload, self.key.as_ref(), &self.salt).map_err(SnapshotError::Usage)?;
        let state = self.dir.join(STATE_FILE);
        let tmp = self.dir.join("state.tmp");
        let w = owner_only_file(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &state));
        w.map_err(io_at(&state))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(LayerSummary {
            id: manifest.id,
            dir: self.dir,
            data_pages,
            zero_pages,
            bytes_written: self.bytes_written,
            rounds: self.round,
        })
    }
}

/// The state payload: manifest (JSON) and VM state (the state tree's codec), each behind its
/// u32 LE length, then the index.
fn payload_of(manifest: &LayerManifest, tree: &[u8], index: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).expect("a manifest always serializes");
    let mut payload = Vec::with_capacity(8 + json.len() + tree.len() + index.len() + 16);
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    payload.extend_from_slice(&(tree.len() as u32).to_le_bytes());
    payload.extend_from_slice(tree);
    payload.extend_from_slice(index);
    payload
}

/// Creates (or truncates) a file only its owner can read: snapshot files hold the guest's
/// memory and registers. An existing file's mode is set too (`mode` applies only to new ones).
fn owner_only_file(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Frames (and encrypts) a state payload.
fn seal(payload: &[u8], key: Option<&SnapshotKey>, salt: &[u8; 12]) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(SNAPSHOT_MAGIC);
    head.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    head.extend_from_slice(&(if key.is_some() { FLAG_ENCRYPTED } else { 0 }).to_le_bytes());
    let body = match key {
        None => payload.to_vec(),
        Some(k) => {
            let mut body = payload.to_vec();
            let aad = aad_of(&head, &k.id, salt);
            let tag = k
                .cipher
                .encrypt_in_place_detached(&nonce(salt, u32::MAX, 0), &aad, &mut body)
                .map_err(|_| "state encryption failed".to_string())?;
            body.extend_from_slice(&tag);
            body
        }
    };
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    head.extend_from_slice(&key.map(|k| k.id).unwrap_or([0; 8]));
    head.extend_from_slice(salt);
    head.extend_from_slice(&body);
    Ok(head)
}

/// Authenticated data of an encrypted payload: the header fields before the length, the key
/// id and the salt.
fn aad_of(head16: &[u8], key_id: &[u8; 8], salt: &[u8; 12]) -> Vec<u8> {
    let mut aad = head16[..16].to_vec();
    aad.extend_from_slice(key_id);
    aad.extend_from_slice(salt);
    aad
}

/// A run of the index.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    count: u64,
    data: bool,
    round: u32,
    /// Offset of the run's first check in the payload: 16 bytes for each page (encrypted) or
    /// each aligned group the run touches (plain).
    checks_at: usize,
}

/// Parsed state file of one layer.
pub struct ParsedState {
    /// The manifest.
    pub manifest: LayerManifest,
    /// The VM state (vCPUs, devices, machine, services).
    pub vm: VmState,
    /// Where the index starts in the payload.
    index_at: usize,
    runs: Vec<Run>,
    /// The payload when it had to be decrypted; `None`: it is the file's bytes after the
    /// header (the checks are read in place rather than copied: a restore waits for this).
    decrypted: Option<Vec<u8>>,
    salt: [u8; 12],
    encrypted: bool,
}

/// Parses and checks a state file's bytes (`path` names it in errors). Everything is checked
/// before it is used: a truncated, corrupted, foreign, wrong-version, wrong-key or tampered
/// file is refused, and an index that does not fit the machine is too.
pub fn parse_state(
    bytes: &[u8],
    path: &Path,
    key: Option<&SnapshotKey>,
) -> Result<ParsedState, SnapshotError> {
    parse_state_with(bytes, None, path, key)
}

/// [`parse_state`], given the checksum of the bytes after the header when the reader
/// computed it already.
fn parse_state_with(
    bytes: &[u8],
    body_crc: Option<u32>,
    path: &Path,
    key: Option<&SnapshotKey>,
) -> Result<ParsedState, SnapshotError> {
    let bad = |why: String| invalid(path, why);
    if bytes.len() < 12 {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    if &bytes[0..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a spanvmm snapshot state file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
    if version != SNAPSHOT_VERSION {
        let hint = match version {
            1 => " (a single-image snapshot of an older spanvmm; restore it with that version)",
            2 => " (checked page by page, by an older spanvmm; restore it with that version)",
            3 => {
                " (written by an older spanvmm, before the VM state tree; restore it with that \
                 version)"
            }
            _ => "",
        };
        return Err(bad(format!(
            "format version {version}, this spanvmm reads version {SNAPSHOT_VERSION}{hint}"
        )));
    }
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let flags = u32_at(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    let crc = u32_at(24);
    let key_id: [u8; 8] = bytes[28..36].try_into().unwrap_or([0; 8]);
    let salt: [u8; 12] = bytes[36..48].try_into().unwrap_or([0; 12]);
    if flags & !FLAG_ENCRYPTED != 0 {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    let body = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || body.len() as u64 != len {
        return Err(bad(format!(
            "truncated or padded: header says {len} payload bytes, file has {}",
            body.len()
        )));
    }
    if body_crc.unwrap_or_else(|| crc32fast::hash(body)) != crc {
        return Err(bad("checksum mismatch: the file is corrupted".into()));
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let keyerr = |why: &str| SnapshotError::Key {
        path: path.display().to_string(),
        why: why.to_string(),
    };
    let payload = if encrypted {
        let Some(k) = key else {
            return Err(keyerr(
                "the snapshot is encrypted: give its key (--key FILE)",
            ));
        };
        if k.id != key_id {
            return Err(keyerr(
                "wrong key: the snapshot was encrypted with another key",
            ));
        }
        if body.len() < 16 {
            return Err(bad("encrypted payload shorter than its tag".into()));
        }
        let (ct, tag) = body.split_at(body.len() - 16);
        let mut pt = ct.to_vec();
        let aad = aad_of(bytes, &key_id, &salt);
        k.cipher
            .decrypt_in_place_detached(
                &nonce(&salt, u32::MAX, 0),
                &aad,
                &mut pt,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                keyerr("authentication failed: the state file was tampered with (or damaged)")
            })?;
        Some(pt)
    } else {
        if key.is_some() {
            tracing::info!("{}: not encrypted; the key is not needed", path.display());
        }
        None
    };
    let mut parsed = parse_payload(payload.as_deref().unwrap_or(body), path, salt, encrypted)?;
    parsed.decrypted = payload;
    Ok(parsed)
}

fn parse_payload(
    payload: &[u8],
    path: &Path,
    salt: [u8; 12],
    encrypted: bool,
) -> Result<ParsedState, SnapshotError> {
    let bad = |why: String| invalid(path, why);
    if payload.len() < 4 {
        return Err(bad("payload shorter than its manifest length".into()));
    }
    let jlen = u32::from_le_bytes(payload[..4].try_into().unwrap_or([0; 4])) as usize;
    let json = payload
        .get(4..4usize.saturating_add(jlen))
        .ok_or_else(|| bad(format!("manifest length {jlen} runs past the payload")))?;
    let manifest: LayerManifest =
        serde_json::from_slice(json).map_err(|e| bad(format!("manifest does not parse: {e}")))?;
    let after = &payload[4 + jlen..];
    if after.len() < 4 {
        return Err(bad("payload ends before the VM state's length".into()));
    }
    let tlen = u32::from_le_bytes(after[..4].try_into().unwrap_or([0; 4])) as usize;
    let tree = after
        .get(4..4usize.saturating_add(tlen))
        .ok_or_else(|| bad(format!("VM state length {tlen} runs past the payload")))?;
    // The state tree's own checks (sections, versions, consistency) name the section at fault.
    let vm = VmState::from_bytes(tree, &path.display().to_string())
        .map_err(|e| SnapshotError::State(Box::new(e)))?;
    let pages = vm.machine.mem_bytes / PAGE_SIZE;
    let index_at = 4 + jlen + 4 + tlen;
    let mut rest = &payload[index_at..];
    let mut runs = Vec::new();
    let mut next = 0u64;
    while !rest.is_empty() {
        if rest.len() < RUN_HEADER {
            return Err(bad("index ends inside a run header".into()));
        }
        let start = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8]));
        let count = u32::from_le_bytes(rest[8..12].try_into().unwrap_or([0; 4])) as u64;
        let kind = rest[12];
        let round = u32::from_le_bytes(rest[13..17].try_into().unwrap_or([0; 4]));
        rest = &rest[RUN_HEADER..];
        if count == 0 || start < next || start.checked_add(count).is_none_or(|e| e > pages) {
            return Err(bad(format!(
                "index run {start}+{count} overlaps another or lies outside the {pages}-page guest"
            )));
        }
        if kind > 1 || (kind == 1 && round == u32::MAX) {
            return Err(bad(format!(
                "index run {start}+{count} has kind {kind}, round {round}"
            )));
        }
        let data = kind == 1;
        let checks_at = payload.len() - rest.len();
        if data {
            let checks = if encrypted {
                count
            } else {
                groups_of(start, count)
            };
            let need = checks as usize * 16;
            if rest.len() < need {
                return Err(bad("index ends inside a run's checks".into()));
            }
            rest = &rest[need..];
        }
        runs.push(Run {
            start,
            count,
            data,
            round,
            checks_at,
        });
        next = start + count;
    }
    Ok(ParsedState {
        manifest,
        vm,
        index_at,
        runs,
        decrypted: None,
        salt,
        encrypted,
    })
}

/// A state file's bytes, read into memory populated in one call (a restore waits for them,
/// and a multi-MiB read into fresh heap memory takes a page fault per page, which is slow on
/// these hosts), or owned (decrypted, or small). Not a mapping of the file itself: a file
/// truncated under a mapping would kill the process.
enum StateBytes {
    /// `len` bytes used of a `cap`-byte mapping.
    Mapped {
        addr: *mut libc::c_void,
        len: usize,
        cap: usize,
    },
    Owned(Vec<u8>),
}

// SAFETY: the memory is private to this value and only read after `read` filled it.
unsafe impl Send for StateBytes {}
// SAFETY: as above, shared reads only.
unsafe impl Sync for StateBytes {}

impl StateBytes {
    /// Populated anonymous memory for `cap` bytes (none when the mapping fails).
    fn map(cap: usize) -> Option<Self> {
        // SAFETY: fresh anonymous memory, owned by the value returned; unmapped on drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        (addr != libc::MAP_FAILED).then_some(StateBytes::Mapped { addr, len: 0, cap })
    }

    /// Reads the file at `path`, into `buf` when it is large enough, with the checksum of its
    /// bytes after the header when it was computed on the way (the common case).
    fn read(path: &Path, buf: Option<StateBytes>) -> std::io::Result<(Self, Option<u32>)> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        let owned = || std::fs::read(path).map(|b| (StateBytes::Owned(b), None));
        if len <= HEADER_LEN || len as u64 > MAX_PAYLOAD + HEADER_LEN as u64 + 16 {
            // Short or oversized: let the parser say what is wrong with it.
            return owned();
        }
        let fits = |b: &StateBytes| matches!(b, StateBytes::Mapped { cap, .. } if *cap >= len);
        let Some(mut bytes) = buf.filter(fits).or_else(|| StateBytes::map(len)) else {
            return owned();
        };
        let StateBytes::Mapped {
            addr, len: used, ..
        } = &mut bytes
        else {
            return owned();
        };
        *used = len;
        let addr = *addr as usize;
        // Read and checksum piece by piece (each piece is hashed while still in the cache);
        // a large file's two halves on two threads (a 4 GiB guest's is 12 MiB: 2.5-3.7 ms on
        // one thread, 2.0-2.8 on two; below 8 MiB the second thread costs what it saves).
        let half = HEADER_LEN + (len - HEADER_LEN) / 2;
        let part = |from: usize, to: usize| -> std::io::Result<crc32fast::Hasher> {
            const PIECE: usize = 512 << 10;
            let mut hasher = crc32fast::Hasher::new();
            let mut at = from;
            while at < to {
                let n = PIECE.min(to - at);
                // SAFETY: [at, at + n) lies inside the `len` bytes just mapped writable; the
                // two halves do not overlap and nothing else sees the memory yet.
                let piece = unsafe { std::slice::from_raw_parts_mut((addr + at) as *mut u8, n) };
                file.read_exact_at(piece, at as u64)?;
                hasher.update(piece);
                at += n;
            }
            Ok(hasher)
        };
        // SAFETY: as above, the header's bytes.
        let head = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, HEADER_LEN) };
        file.read_exact_at(head, 0)?;
        let crc = if len - HEADER_LEN < 8 << 20 {
            part(HEADER_LEN, len)?
        } else {
            let (first, second) = std::thread::scope(|s| {
                let second = s.spawn(|| part(half, len));
                (part(HEADER_LEN, half), second.join())
            });
            let mut crc = first?;
            crc.combine(&second.map_err(|_| std::io::Error::other("reader panicked"))??);
            crc
        };
        Ok((bytes, Some(crc.finalize())))
    }
}

impl std::ops::Deref for StateBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: the memory lives as long as self and was filled by `read`.
            StateBytes::Mapped { addr, len, .. } => unsafe {
                std::slice::from_raw_parts(*addr as *const u8, *len)
            },
            StateBytes::Owned(v) => v,
        }
    }
}

impl Drop for StateBytes {
    fn drop(&mut self) {
        if let StateBytes::Mapped { addr, cap, .. } = *self {
            // SAFETY: unmapping our own mapping, once.
            unsafe { libc::munmap(addr, cap) };
        }
    }
}

/// One opened, checked layer.
pub struct Layer {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: LayerManifest,
    /// The VM state it records.
    pub vm: VmState,
    /// SHA-256 of its state file (what a child records): computed for layers opened as a
    /// parent ([`Layer::open`]), not for the top of a chain being restored (its CRC or AEAD
    /// tag already vouches for it, and a restore should not wait for a hash it never uses).
    pub state_sha256: Option<String>,
    runs: Vec<Run>,
    /// The payload (index with the checks) starts at `payload_at`.
    payload: StateBytes,
    payload_at: usize,
    salt: [u8; 12],
    key: Option<SnapshotKey>,
    memory: File,
}

impl Layer {
    /// Opens the layer in `dir`: state file checked and parsed, memory file sized right.
    pub fn open(dir: &Path, key: Option<&SnapshotKey>) -> Result<Self, SnapshotError> {
        Self::open_inner(dir, key, true, None)
    }

    /// `buf`: memory prepared ahead for the state file (see [`RestoreBuffers`]).
    fn open_inner(
        dir: &Path,
        key: Option<&SnapshotKey>,
        identity: bool,
        buf: Option<StateBytes>,
    ) -> Result<Self, SnapshotError> {
        let state = dir.join(STATE_FILE);
        let (bytes, body_crc) = StateBytes::read(&state, buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => invalid(dir, "no snapshot here (no state file)"),
            _ => io_at(&state)(e),
        })?;
        let parsed = parse_state_with(&bytes, body_crc, &state, key)?;
        let mem = dir.join(MEMORY_FILE);
        let memory = File::open(&mem).map_err(io_at(&mem))?;
        let len = memory.metadata().map_err(io_at(&mem))?.len();
        let want = parsed.vm.machine.mem_bytes;
        if len != want {
            return Err(invalid(
                &mem,
                format!("memory image truncated or padded: {len} bytes, the guest has {want}"),
            ));
        }
        if let Some(at) = parsed.manifest.expires_unix {
            let now = unix_now();
            if now >= at {
                return Err(SnapshotError::Expired {
                    dir: dir.display().to_string(),
                    at,
                    ago: now - at,
                });
            }
        }
        Ok(Layer {
            dir: dir.to_path_buf(),
            manifest: parsed.manifest,
            vm: parsed.vm,
            state_sha256: identity.then(|| hex(&Sha256::digest(&*bytes))),
            runs: parsed.runs,
            payload_at: if parsed.decrypted.is_some() {
                0
            } else {
                HEADER_LEN
            },
            payload: parsed.decrypted.map_or(bytes, StateBytes::Owned),
            salt: parsed.salt,
            key: if parsed.encrypted { key.cloned() } else { None },
            memory,
        })
    }

    /// The `i`th check of `run`.
    fn check(&self, run: &Run, i: u64) -> &[u8] {
        let at = self.payload_at + run.checks_at + 16 * i as usize;
        &self.payload[at..at + 16]
    }

    /// Reads pages `[first, end)` of `run`, one of this layer's data runs, into `out`, checked
    /// (and decrypted). A plain layer checks the run's pages of an aligned group together, so
    /// the groups at either end are read whole even when only part of them is asked for.
    fn read_run(&self, run: &Run, first: u64, end: u64, out: &mut [u8]) -> Result<(), String> {
        let ps = PAGE_SIZE as usize;
        let file = || self.dir.join(MEMORY_FILE).display().to_string();
        let read = |buf: &mut [u8], page: u64| {
            self.memory
                .read_exact_at(buf, page * PAGE_SIZE)
                .map_err(|e| format!("{}: {e}", file()))
        };
        if let Some(k) = &self.key {
            read(out, first)?;
            let id = unhex16(&self.manifest.id);
            for (i, page) in out.chunks_exact_mut(ps).enumerate() {
                let p = first + i as u64;
                let tag = Tag::from_slice(self.check(run, p - run.start));
                k.cipher
                    .decrypt_in_place_detached(&nonce(&self.salt, run.round, p), &id, page, tag)
                    .map_err(|_| {
                        format!(
                            "{}: page {p:#x} fails authentication: the memory file was tampered with",
                            file()
                        )
                    })?;
            }
            return Ok(());
        }
        // The groups' pages that lie in the run, from `first`'s group to `end - 1`'s.
        let a = (first - first % GROUP_PAGES).max(run.start);
        let b = end
            .div_ceil(GROUP_PAGES)
            .saturating_mul(GROUP_PAGES)
            .min(run.start + run.count);
        let verify = |buf: &[u8]| -> Result<(), String> {
            let mut g = a;
            while g < b {
                let g_end = ((g / GROUP_PAGES + 1) * GROUP_PAGES).min(b);
                let mut checks = [0u8; 16 * GROUP_PAGES as usize];
                let pages = buf[(g - a) as usize * ps..(g_end - a) as usize * ps].chunks_exact(ps);
                for (c, page) in checks.chunks_exact_mut(16).zip(pages) {
                    c.copy_from_slice(&page_check(page));
                }
                let want = self.check(run, g / GROUP_PAGES - run.start / GROUP_PAGES);
                if group_check(&checks[..16 * (g_end - g) as usize]) != want {
                    return Err(format!(
                        "{}: pages {g:#x}-{:#x} fail their checksum: the memory file is corrupted",
                        file(),
                        g_end - 1
                    ));
                }
                g = g_end;
            }
            Ok(())
        };
        if (a, b) == (first, end) {
            read(out, a)?;
            return verify(out);
        }
        let mut whole = vec![0u8; ((b - a) * PAGE_SIZE) as usize];
        read(&mut whole, a)?;
        verify(&whole)?;
        let from = ((first - a) * PAGE_SIZE) as usize;
        out.copy_from_slice(&whole[from..from + out.len()]);
        Ok(())
    }
}

fn unhex16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// Where each page of the guest comes from: `NONE` (zero) or a layer and one of its runs.
const NONE: u8 = u8::MAX;

/// Memory a restore of a guest of a given size needs, allocated and faulted in ahead: the
/// chain's per-page tables and room for the top layer's state file (an encrypted full layer's
/// index holds a 16-byte check per page). A standby VMM prepares them with its VM, so a restore
/// does not wait for fresh memory: on PVM a 1 GiB guest's 6 MiB of it take 3-4 ms to fault in.
pub struct RestoreBuffers {
    tables: (Vec<u8>, Vec<u32>),
    state: Option<StateBytes>,
}

impl RestoreBuffers {
    /// Buffers for a guest of `mem_bytes`.
    pub fn new(mem_bytes: u64) -> Self {
        let pages = (mem_bytes / PAGE_SIZE) as usize;
        // The state file: header, manifest (VM state; well under 1 MiB), run headers, checks.
        let state = HEADER_LEN + (1 << 20) + pages * 16;
        // Written now, so that their pages exist: zeroed allocations are mapped lazily, and
        // faulting in 2 MiB of them during a 1 GiB restore took ~1 ms.
        let touched = || {
            let mut v = vec![0u32; pages];
            v.fill(std::hint::black_box(0));
            v
        };
        RestoreBuffers {
            tables: (vec![NONE; pages], touched()),
            state: StateBytes::map(state),
        }
    }
}

/// A whole chain, opened and checked: the layers from the base (index 0) to the one asked for.
pub struct Chain {
    /// Layers, base first.
    pub layers: Vec<Layer>,
    /// Where each page comes from; `None` for a single layer (its runs say it: see
    /// [`Chain::source`]).
    tables: Option<Tables>,
    /// Prepared tables a single layer did not need. Kept, not dropped: unmapping MiBs of
    /// populated memory takes the address space's lock for a millisecond or more, which the
    /// restore path (and the guest's first faults) would wait for; they go with the chain.
    _spare: Option<(Vec<u8>, Vec<u32>)>,
}

/// Per page: the layer holding it (`NONE`: zero) and the run of that layer's index it is in.
struct Tables {
    owner: Vec<u8>,
    run: Vec<u32>,
}

/// Pages `[first, end)` of a chain that come from one place: zero (`layer` `NONE`) or one run
/// of a layer.
struct Source {
    layer: u8,
    run: usize,
    end: usize,
}

/// A key given for a chain none of whose layers is encrypted is a mistake worth saying (the
/// operator believes the snapshot is protected, or has the wrong snapshot).
fn refuse_unneeded_key(key: Option<&SnapshotKey>, layers: &[Layer]) -> Result<(), SnapshotError> {
    if key.is_some() && layers.iter().all(|l| l.key.is_none()) {
        return Err(SnapshotError::Usage(format!(
            "{} is not encrypted: a key is only for encrypted snapshots (leave --key out)",
            layers
                .last()
                .map(|l| l.dir.display().to_string())
                .unwrap_or_default()
        )));
    }
    Ok(())
}

impl Chain {
    /// Opens the layer in `dir` and its ancestors, checking every link (parent id and state
    /// file checksum), version, key and expiry, before anything is restored.
    pub fn open(dir: &Path, key: Option<&SnapshotKey>) -> Result<Self, SnapshotError> {
        Self::open_with(dir, key, None)
    }

    /// [`Chain::open`] into memory prepared ahead (a standby VMM's), when it fits.
    pub fn open_with(
        dir: &Path,
        key: Option<&SnapshotKey>,
        bufs: Option<RestoreBuffers>,
    ) -> Result<Self, SnapshotError> {
        Self::open_chain(dir, key, bufs, true)
    }

    /// `runs_for_one`: a single layer (a full snapshot without secret regions) goes without
    /// per-page tables, its runs say where each page is (filling the tables took 0.3 ms a GiB
    /// on a restore's path).
    fn open_chain(
        dir: &Path,
        key: Option<&SnapshotKey>,
        bufs: Option<RestoreBuffers>,
        runs_for_one: bool,
    ) -> Result<Self, SnapshotError> {
        let (tables, state_buf) = match bufs {
            Some(b) => (Some(b.tables), b.state),
            None => (None, None),
        };
        let top = Layer::open_inner(dir, key, false, state_buf)?;
        if runs_for_one && top.manifest.parent.is_none() && top.manifest.secrets.is_empty() {
            refuse_unneeded_key(key, std::slice::from_ref(&top))?;
            return Ok(Chain {
                layers: vec![top],
                tables: None,
                _spare: tables,
            });
        }
        let mut layers = vec![top];
        while let Some(parent) = layers.last().and_then(|l| l.manifest.parent.clone()) {
            if layers.len() >= MAX_CHAIN {
                return Err(SnapshotError::Chain(format!(
                    "more than {MAX_CHAIN} layers above {}: merge the chain",
                    parent.dir.display()
                )));
            }
            let child = layers
                .last()
                .map(|l| l.dir.display().to_string())
                .unwrap_or_default();
            let p = Layer::open(&parent.dir, key).map_err(|e| {
                SnapshotError::Chain(format!("parent {} of {child}: {e}", parent.dir.display()))
            })?;
            if p.manifest.id != parent.id || p.state_sha256.as_ref() != Some(&parent.state_sha256) {
                return Err(SnapshotError::Chain(format!(
                    "{} is not the parent {child} was taken on (layer id or state checksum differ: \
                     it was replaced or modified)",
                    parent.dir.display()
                )));
            }
            if p.vm.machine.mem_bytes != layers[0].vm.machine.mem_bytes {
                return Err(SnapshotError::Chain(format!(
                    "{} is of another guest size than {child}",
                    parent.dir.display()
                )));
            }
            layers.push(p);
        }
        layers.reverse();
        refuse_unneeded_key(key, &layers)?;
        let pages = (layers[0].vm.machine.mem_bytes / PAGE_SIZE) as usize;
        let (mut owner, mut run) = match tables {
            Some(t) if t.0.len() == pages => t,
            _ => (vec![NONE; pages], vec![0u32; pages]),
        };
        for (li, l) in layers.iter().enumerate() {
            for (ri, r) in l.runs.iter().enumerate() {
                let span = r.start as usize..(r.start + r.count) as usize;
                if r.data {
                    owner[span.clone()].fill(li as u8);
                    run[span].fill(ri as u32);
                } else {
                    owner[span].fill(NONE);
                }
            }
        }
        // Secret regions of any layer are zero, whatever an older layer holds.
        for l in &layers {
            for &(gpa, len) in &l.manifest.secrets {
                let first = (gpa / PAGE_SIZE) as usize;
                let end = (gpa.saturating_add(len).div_ceil(PAGE_SIZE) as usize).min(pages);
                for o in owner.iter_mut().take(end).skip(first) {
                    *o = NONE;
                }
            }
        }
        Ok(Chain {
            layers,
            tables: Some(Tables { owner, run }),
            _spare: None,
        })
    }

    /// Guest pages.
    fn pages(&self) -> usize {
        (self.mem_bytes() / PAGE_SIZE) as usize
    }

    /// Where pages from `p` (up to `end`) come from, as far as one place holds them.
    fn source(&self, p: usize, end: usize) -> Source {
        let zero = |end| Source {
            layer: NONE,
            run: 0,
            end,
        };
        let Some(t) = &self.tables else {
            // One layer: its runs, in order.
            let runs = &self.layers[0].runs;
            let i = runs.partition_point(|r| (r.start + r.count) as usize <= p);
            return match runs.get(i) {
                Some(r) if r.start as usize <= p => {
                    let run_end = ((r.start + r.count) as usize).min(end);
                    if !r.data {
                        return zero(run_end);
                    }
                    Source {
                        layer: 0,
                        run: i,
                        end: run_end,
                    }
                }
                // Between runs (or after the last): zero.
                Some(r) => zero((r.start as usize).min(end)),
                None => zero(end),
            };
        };
        let layer = t.owner[p];
        let mut q = p + 1;
        if layer == NONE {
            while q < end && t.owner[q] == NONE {
                q += 1;
            }
            return zero(q);
        }
        let run = t.run[p];
        while q < end && t.owner[q] == layer && t.run[q] == run {
            q += 1;
        }
        Source {
            layer,
            run: run as usize,
            end: q,
        }
    }

    /// The top layer (the one asked for).
    pub fn top(&self) -> &Layer {
        self.layers.last().expect("a chain has a layer")
    }

    /// The VM state to restore.
    pub fn vm_state(&self) -> &VmState {
        &self.top().vm
    }

    /// Guest memory size.
    pub fn mem_bytes(&self) -> u64 {
        self.vm_state().machine.mem_bytes
    }

    /// Pages holding data, as runs `(first, end)`.
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut p, pages) = (0, self.pages());
        while p < pages {
            let src = self.source(p, pages);
            if src.layer != NONE {
                match out.last_mut() {
                    Some(last) if last.1 == p as u64 => last.1 = src.end as u64,
                    _ => out.push((p as u64, src.end as u64)),
                }
            }
            p = src.end;
        }
        out
    }

    /// Pages holding data.
    pub fn data_pages(&self) -> u64 {
        self.data_extents().iter().map(|(a, b)| b - a).sum()
    }

    /// Reads pages `[first, first + count)` into `buf`, checked (and decrypted). Pages without
    /// data are zero-filled when `zero_fill`, else left as they are.
    pub fn read_pages(
        &self,
        first: u64,
        count: u64,
        buf: &mut [u8],
        zero_fill: bool,
    ) -> Result<(), String> {
        let ps = PAGE_SIZE as usize;
        let end = (first + count) as usize;
        let mut p = first as usize;
        while p < end {
            let src = self.source(p, end);
            let out = &mut buf[(p - first as usize) * ps..(src.end - first as usize) * ps];
            if src.layer == NONE {
                if zero_fill {
                    out.fill(0);
                }
                p = src.end;
                continue;
            }
            let l = &self.layers[src.layer as usize];
            l.read_run(&l.runs[src.run], p as u64, src.end as u64, out)?;
            p = src.end;
        }
        Ok(())
    }

    /// Loads the whole chain into fresh (zero) guest memory, checking every page. The work is
    /// spread over the host's cores in 16 MiB pieces, and each piece's guest pages are
    /// populated in one call first (per-page faults during the copy cost more than the copy).
    pub fn load_into(&self, ram: &GuestRam) -> Result<(), String> {
        if ram.size() != self.mem_bytes() {
            return Err(format!(
                "guest has {} bytes, the snapshot {}",
                ram.size(),
                self.mem_bytes()
            ));
        }
        const PIECE: u64 = 4096;
        let pieces: Vec<(u64, u64)> = self
            .data_extents()
            .into_iter()
            .flat_map(|(a, b)| {
                (a..b)
                    .step_by(PIECE as usize)
                    .map(move |p| (p, (p + PIECE).min(b)))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let base = ram.host_base() as usize;
        let load = || -> Result<(), String> {
            while let Some(&(p, q)) =
                pieces.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                let (addr, len) = (
                    base + (p * PAGE_SIZE) as usize,
                    ((q - p) * PAGE_SIZE) as usize,
                );
                // SAFETY: [p, q) lies inside guest memory (the sizes match, checked above);
                // pieces do not overlap and nothing else touches this RAM while it is loaded.
                let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
                let _ = ram.populate(p * PAGE_SIZE, (q - p) * PAGE_SIZE);
                if let Err(e) = self.read_pages(p, q - p, dst, false) {
                    // A bad page ends the load: the other threads find no more pieces.
                    next.store(pieces.len(), std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(())
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(load)).collect();
            let mut r = load();
            for h in helpers {
                let h = h
                    .join()
                    .unwrap_or_else(|_| Err("a loader thread panicked".into()));
                r = r.and(h);
            }
            r
        })?;
        // Loading is not the guest's doing: start the VMM's dirty log clean.
        ram.take_vmm_dirty();
        Ok(())
    }
}

/// Deletes the snapshot layer in `dir` (its state and memory files, then the directory when
/// nothing else is in it), without overwriting anything: retention of superseded layers,
/// where [`shred`] would double the I/O. Refuses a directory that holds no layer.
pub fn remove_layer(dir: &Path) -> Result<(), SnapshotError> {
    if !dir.join(STATE_FILE).exists() {
        return Err(invalid(dir, "no snapshot here (no state file)"));
    }
    // The state file first: a layer without it is no layer, whatever else is left.
    for name in [STATE_FILE, MEMORY_FILE, "state.tmp"] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(&path)(e)),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Securely deletes the snapshot layer in `dir`: its files' data are overwritten with zeros
/// and flushed, then unlinked; the directory is removed when empty. The chain is not followed.
pub fn shred(dir: &Path) -> Result<u64, SnapshotError> {
    let mut overwritten = 0;
    for name in [MEMORY_FILE, STATE_FILE, "state.tmp"] {
        let path = dir.join(name);
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(&path)(e)),
        };
        let len = file.metadata().map_err(io_at(&path))?.len();
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0u64;
        // Only the data extents hold anything (holes were never written).
        while off < len {
            let Some(data) = seek(&file, off, libc::SEEK_DATA) else {
                break;
            };
            let hole = seek(&file, data, libc::SEEK_HOLE).unwrap_or(len).min(len);
            let mut o = data;
            while o < hole {
                let n = (hole - o).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], o).map_err(io_at(&path))?;
                o += n as u64;
            }
            overwritten += hole - data;
            off = hole;
        }
        file.sync_all().map_err(io_at(&path))?;
        drop(file);
        std::fs::remove_file(&path).map_err(io_at(&path))?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(overwritten)
}

fn seek(file: &File, off: u64, whence: libc::c_int) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid descriptor has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Merges the chain ending in `top` into one full layer in `out` (same state, same secrets,
/// same expiry; encrypted with `out_key` when given).
pub fn merge(
    top: &Path,
    key: Option<&SnapshotKey>,
    out: &Path,
    out_key: Option<SnapshotKey>,
) -> Result<LayerSummary, SnapshotError> {
    let chain = Chain::open(top, key)?;
    let out_abs = std::path::absolute(out).map_err(io_at(out))?;
    if chain
        .layers
        .iter()
        .any(|l| std::path::absolute(&l.dir).is_ok_and(|d| d == out_abs))
    {
        return Err(SnapshotError::Usage(format!(
            "{} is part of the chain: merge into a new directory",
            out.display()
        )));
    }
    let ram = Arc::new(
        GuestRam::new(chain.mem_bytes()).map_err(|e| SnapshotError::Usage(e.to_string()))?,
    );
    chain.load_into(&ram).map_err(|why| invalid(top, why))?;
    let m = &chain.top().manifest;
    let secrets: Vec<(u64, u64)> = chain
        .layers
        .iter()
        .flat_map(|l| l.manifest.secrets.iter().copied())
        .collect();
    let mut w = LayerWriter::create(
        out,
        ram,
        LayerOptions {
            parent: None,
            key: out_key,
            expires_in_s: m.expires_unix.map(|at| at.saturating_sub(unix_now())),
            secrets,
        },
    )?;
    w.write_pages(None)?;
    w.finish(chain.top().vm.clone())
}

/// Rewrites the VM state recorded in the layer `dir` (`edit` changes it) and seals the state
/// file again (checksum, or encryption with `key`), keeping the manifest, the index and the
/// memory file. For tests that need a snapshot of a VM that could not exist here (e.g. one
/// whose CPU had features this host lacks); a child layer of `dir` no longer matches it (it
/// records the old state file's SHA-256).
#[doc(hidden)]
pub fn rewrite_vm_state(
    dir: &Path,
    key: Option<&SnapshotKey>,
    edit: impl FnOnce(&mut VmState),
) -> Result<(), SnapshotError> {
    rewrite_state_sections(dir, key, |sections| {
        let mut vm = VmState::from_sections(std::mem::take(sections), "rewrite")
            .expect("the layer's state was checked when it was opened");
        edit(&mut vm);
        *sections = vm.to_sections();
    })
}

/// [`rewrite_vm_state`] at the level of the state tree's sections: for tests that need a state
/// this build would never write (a section from a newer spanvmm, say).
#[doc(hidden)]
pub fn rewrite_state_sections(
    dir: &Path,
    key: Option<&SnapshotKey>,
    edit: impl FnOnce(&mut Vec<crate::state::Section>),
) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_at(&path))?;
    let parsed = parse_state(&bytes, &path, key)?;
    let payload = parsed.decrypted.as_deref().unwrap_or(&bytes[HEADER_LEN..]);
    let index = &payload[parsed.index_at..];
    let mut sections = parsed.vm.to_sections();
    edit(&mut sections);
    let new = payload_of(&parsed.manifest, &crate::state::encode(&sections), index);
    let sealed = seal(&new, key, &parsed.salt).map_err(SnapshotError::Usage)?;
    let tmp = dir.join("state.tmp");
    owner_only_file(&tmp)
        .and_then(|mut f| f.write_all(&sealed).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(io_at(&path))
}

/// A VM state for tests that need a layer without a real VM.
#[cfg(test)]
pub(crate) fn test_vm_state(mem_bytes: u64) -> VmState {
    use crate::state::{DeviceStates, MachineConfig};
    VmState {
        machine: MachineConfig {
            mem_bytes,
            vcpus: 1,
            tsc_khz: 1_000_000,
            cmdline: String::new(),
        },
        vcpus: vec![crate::vcpu::VcpuState {
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: None,
            msrs: vec![],
            events: Default::default(),
        }],
        vm: crate::vm::VmKvmState {
            irqchip: None,
            pit: None,
            clock: Default::default(),
        },
        devices: DeviceStates {
            serial: Default::default(),
            pv: Default::default(),
            virtio: Vec::new(),
        },
        api_secrets: Vec::new(),
        cpu: crate::cpu::CpuModel {
            template: crate::cpu::CpuTemplate::Host,
            cpuid: Vec::new(),
            msrs: Vec::new(),
        },
        services: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("spanvmm-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn fill(ram: &GuestRam, page: u64, v: u8) {
        ram.write(page * PAGE_SIZE, &[v; 4096]).unwrap();
    }

    fn full_layer(ram: &Arc<GuestRam>, dir: &Path, opts: LayerOptions) -> LayerSummary {
        let mut w = LayerWriter::create(dir, ram.clone(), opts).unwrap();
        w.write_pages(None).unwrap();
        w.finish(test_vm_state(ram.size())).unwrap()
    }

    fn same(a: &GuestRam, b: &GuestRam) -> bool {
        let mut x = vec![0u8; a.size() as usize];
        let mut y = vec![0u8; b.size() as usize];
        a.read(0, &mut x).unwrap();
        b.read(0, &mut y).unwrap();
        x == y
    }

    #[test]
    fn chain_restores_from_any_layer_and_merges() {
        let root = tmp("chain");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 3, 1);
        fill(&ram, 700, 2);
        let base = full_layer(&ram, &root.join("l0"), LayerOptions::default());
        assert_eq!(base.data_pages, 2);
        let before = GuestRam::new(4 << 20).unwrap();
        Chain::open(&root.join("l0"), None)
            .unwrap()
            .load_into(&before)
            .unwrap();
        assert!(same(&ram, &before));

        // Layer 1: page 700 rewritten, page 3 zeroed, page 5 new.
        fill(&ram, 700, 9);
        fill(&ram, 3, 0);
        fill(&ram, 5, 4);
        let mut dirty = vec![0u64; 16];
        for p in [3u64, 5, 700] {
            dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut w = LayerWriter::create(
            &root.join("l1"),
            ram.clone(),
            LayerOptions {
                parent: Some(root.join("l0")),
                ..Default::default()
            },
        )
        .unwrap();
        w.write_pages(Some(&dirty)).unwrap();
        let s1 = w.finish(test_vm_state(ram.size())).unwrap();
        assert_eq!((s1.data_pages, s1.zero_pages), (2, 1));
        assert_eq!(
            s1.bytes_written,
            2 * PAGE_SIZE,
            "only dirtied pages are written"
        );

        let top = GuestRam::new(4 << 20).unwrap();
        let chain = Chain::open(&root.join("l1"), None).unwrap();
        assert_eq!(chain.layers.len(), 2);
        chain.load_into(&top).unwrap();
        assert!(same(&ram, &top));
        // The base still restores to its own time.
        let mid = GuestRam::new(4 << 20).unwrap();
        Chain::open(&root.join("l0"), None)
            .unwrap()
            .load_into(&mid)
            .unwrap();
        assert!(same(&before, &mid));

        let m = merge(&root.join("l1"), None, &root.join("merged"), None).unwrap();
        assert_eq!(m.data_pages, 2);
        let merged = GuestRam::new(4 << 20).unwrap();
        let c = Chain::open(&root.join("merged"), None).unwrap();
        assert_eq!(c.layers.len(), 1);
        c.load_into(&merged).unwrap();
        assert!(same(&ram, &merged));

        // A replaced parent breaks the chain.
        full_layer(&ram, &root.join("l0"), LayerOptions::default());
        let e = Chain::open(&root.join("l1"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("broken snapshot chain"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rewritten_vm_state_is_sealed_again_and_the_pages_still_load() {
        use crate::cpu::{CpuModel, CpuTemplate, CpuidEntry};
        let root = tmp("rewrite");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 3, 1);
        fill(&ram, 700, 2);
        let key = SnapshotKey::from_bytes(&[5u8; 32]).unwrap();
        for (name, k) in [("plain", None), ("enc", Some(&key))] {
            let dir = root.join(name);
            full_layer(
                &ram,
                &dir,
                LayerOptions {
                    key: k.cloned(),
                    ..Default::default()
                },
            );
            let model = CpuModel {
                template: CpuTemplate::X86_64V2,
                cpuid: vec![CpuidEntry {
                    function: 7,
                    index: 0,
                    flags: 1,
                    eax: 0,
                    ebx: 1 << 16,
                    ecx: 0,
                    edx: 0,
                }],
                msrs: vec![0x10],
            };
            let id = Chain::open(&dir, k).unwrap().top().manifest.id.clone();
            rewrite_vm_state(&dir, k, |vm| vm.cpu = model.clone()).unwrap();
            let chain = Chain::open(&dir, k).unwrap();
            assert_eq!(chain.vm_state().cpu, model, "{name}");
            assert_eq!(chain.top().manifest.id, id, "{name}");
            let back = GuestRam::new(4 << 20).unwrap();
            chain.load_into(&back).unwrap();
            assert!(same(&ram, &back), "{name}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn encryption_secrets_and_damage() {
        let root = tmp("crypt");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 10, 0x5a);
        fill(&ram, 11, 0xa5);
        let key = SnapshotKey::from_bytes(&[1u8; 32]).unwrap();
        let other = SnapshotKey::from_bytes(&[2u8; 32]).unwrap();
        let dir = root.join("e");
        full_layer(
            &ram,
            &dir,
            LayerOptions {
                key: Some(key.clone()),
                secrets: vec![(11 * PAGE_SIZE + 8, 16)],
                ..Default::default()
            },
        );
        let mem = std::fs::read(dir.join(MEMORY_FILE)).unwrap();
        assert!(
            !mem.windows(64).any(|w| w == [0x5a; 64]),
            "plaintext in the file"
        );
        assert!(
            !mem.windows(64).any(|w| w == [0xa5; 64]),
            "secret in the file"
        );
        let err = |k: Option<&SnapshotKey>| Chain::open(&dir, k).err().unwrap().to_string();
        assert!(err(None).contains("encrypted"));
        assert!(err(Some(&other)).contains("wrong key"));
        let back = GuestRam::new(4 << 20).unwrap();
        Chain::open(&dir, Some(&key))
            .unwrap()
            .load_into(&back)
            .unwrap();
        let mut b = [0u8; 4096];
        back.read(10 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0x5a; 4096]);
        back.read(11 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 4096], "a secret page is zero after restore");

        // A flipped byte in the memory file is caught before the guest sees it.
        let mut m = mem.clone();
        m[10 * 4096 + 7] ^= 1;
        std::fs::write(dir.join(MEMORY_FILE), &m).unwrap();
        let fresh = GuestRam::new(4 << 20).unwrap();
        let e = Chain::open(&dir, Some(&key))
            .unwrap()
            .load_into(&fresh)
            .unwrap_err();
        assert!(e.contains("tampered"), "{e}");
        std::fs::write(dir.join(MEMORY_FILE), &mem).unwrap();

        // A state file with its CRC fixed up after tampering fails authentication.
        let st = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let mut t = st.clone();
        let n = t.len();
        t[n - 20] ^= 1;
        let crc = crc32fast::hash(&t[HEADER_LEN..]);
        t[24..28].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.join(STATE_FILE), &t).unwrap();
        assert!(err(Some(&key)).contains("tampered"));
        // Truncated and wrong version.
        std::fs::write(dir.join(STATE_FILE), &st[..st.len() - 1]).unwrap();
        assert!(err(Some(&key)).contains("truncated"));
        let mut v = st.clone();
        v[8] = 1;
        std::fs::write(dir.join(STATE_FILE), &v).unwrap();
        assert!(err(Some(&key)).contains("format version 1"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn expired_snapshots_are_refused_and_shred_removes_them() {
        let root = tmp("exp");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        let dir = root.join("x");
        full_layer(
            &ram,
            &dir,
            LayerOptions {
                expires_in_s: Some(0),
                ..Default::default()
            },
        );
        let e = Chain::open(&dir, None).err().unwrap().to_string();
        assert!(e.contains("expired"), "{e}");
        let state_len = std::fs::metadata(dir.join(STATE_FILE)).unwrap().len();
        assert!(shred(&dir).unwrap() >= PAGE_SIZE + state_len);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Retention removes a layer's own files only, and refuses a directory holding no layer.
    #[test]
    fn remove_layer_deletes_a_layer_and_nothing_else() {
        let root = tmp("remove");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let other = root.join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("keep"), b"x").unwrap();
        let e = remove_layer(&other).err().unwrap().to_string();
        assert!(e.contains("no snapshot here"), "{e}");
        assert!(other.join("keep").exists());
        remove_layer(&dir).unwrap();
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A chain opened into buffers prepared ahead (a standby VMM's) is the same chain.
    #[test]
    fn chains_open_the_same_into_prepared_buffers() {
        let root = tmp("bufs");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in [0, 5, 700] {
            fill(&ram, p, p as u8 + 1);
        }
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let plain = Chain::open(&dir, None).unwrap();
        let prepared = Chain::open_with(&dir, None, Some(RestoreBuffers::new(ram.size()))).unwrap();
        assert_eq!(plain.data_extents(), prepared.data_extents());
        let back = GuestRam::new(4 << 20).unwrap();
        prepared.load_into(&back).unwrap();
        assert!(same(&ram, &back));
        // Buffers for another guest size are not used, and nothing breaks.
        let other = Chain::open_with(&dir, None, Some(RestoreBuffers::new(2 << 20))).unwrap();
        assert_eq!(other.data_pages(), plain.data_pages());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A single layer finds its pages through its runs (no per-page tables) and gives the same
    /// pages as through tables; a damaged state file is still refused up front, and an
    /// incremental layer is opened with the tables.
    #[test]
    fn a_single_layer_is_read_through_its_runs() {
        let root = tmp("runs");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in [0, 5, 6, 700, 1023] {
            fill(&ram, p, (p % 200) as u8 + 1);
        }
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let tables = Chain::open_chain(&dir, None, None, false).unwrap();
        let runs = Chain::open_with(&dir, None, Some(RestoreBuffers::new(ram.size()))).unwrap();
        assert!(tables.tables.is_some() && runs.tables.is_none());
        assert_eq!(tables.data_extents(), runs.data_extents());
        assert_eq!(runs.data_pages(), 5);
        let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
        tables.read_pages(0, 1024, &mut a, true).unwrap();
        runs.read_pages(0, 1024, &mut b, true).unwrap();
        assert!(a == b);
        // Any piece, across run boundaries.
        let mut piece = vec![0u8; 10 * 4096];
        runs.read_pages(2, 10, &mut piece, true).unwrap();
        assert!(piece[..] == a[2 * 4096..12 * 4096]);

        let state = dir.join(STATE_FILE);
        let good = std::fs::read(&state).unwrap();
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x40;
        std::fs::write(&state, &bad).unwrap();
        let e = Chain::open(&dir, None).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        std::fs::write(&state, &good).unwrap();

        fill(&ram, 9, 77);
        let child = root.join("y");
        let mut w = LayerWriter::create(
            &child,
            ram.clone(),
            LayerOptions {
                parent: Some(dir.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let mut dirty = vec![0u64; 16];
        dirty[0] = 1 << 9;
        w.write_pages(Some(&dirty)).unwrap();
        w.finish(test_vm_state(4 << 20)).unwrap();
        let chain = Chain::open(&child, None).unwrap();
        assert!(chain.tables.is_some() && chain.layers.len() == 2);
        let mut page = vec![0u8; 4096];
        chain.read_pages(9, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 77);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The parser meets random, truncated and bit-flipped input with an error, never a panic.
    #[test]
    fn plain_layers_check_aligned_groups() {
        let root = tmp("groups");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in (0..40).chain([100]) {
            fill(&ram, p, (p % 200) as u8 + 1);
        }
        let dir = root.join("x");
        let mut w = LayerWriter::create(&dir, ram.clone(), LayerOptions::default()).unwrap();
        w.write_pages(None).unwrap();
        // A second round rewrites page 5: a plain layer's runs do not split on rounds.
        fill(&ram, 5, 99);
        let mut dirty = vec![0u64; 16];
        dirty[0] = 1 << 5;
        w.write_pages(Some(&dirty)).unwrap();
        w.finish(test_vm_state(4 << 20)).unwrap();
        let chain = Chain::open(&dir, None).unwrap();
        let runs: Vec<(u64, u64)> = chain.layers[0]
            .runs
            .iter()
            .map(|r| (r.start, r.count))
            .collect();
        assert_eq!(runs, [(0, 40), (100, 1)]);
        // Checks: 3 groups for pages 0-39, 1 for page 100 (the parser refuses any other size).
        let state = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let jlen = u32::from_le_bytes(state[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap());
        let at = HEADER_LEN + 4 + jlen as usize;
        let tlen = u32::from_le_bytes(state[at..at + 4].try_into().unwrap());
        assert_eq!(
            state.len(),
            at + 4 + tlen as usize + 2 * RUN_HEADER + 4 * 16
        );
        let mut page = vec![0u8; 4096];
        chain.read_pages(5, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 99);

        // A flipped byte in page 5 fails every read of its group, and only of its group.
        let mem = dir.join(MEMORY_FILE);
        let mut m = std::fs::read(&mem).unwrap();
        m[5 * 4096 + 9] ^= 1;
        std::fs::write(&mem, &m).unwrap();
        let e = chain.read_pages(3, 1, &mut page, true).unwrap_err();
        assert!(e.contains("pages 0x0-0xf fail their checksum"), "{e}");
        chain.read_pages(16, 1, &mut page, true).unwrap();
        chain.read_pages(100, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 101);
        let e = chain
            .load_into(&GuestRam::new(4 << 20).unwrap())
            .unwrap_err();
        assert!(e.contains("corrupted"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn parser_survives_garbage() {
        let root = tmp("fuzz");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        fill(&ram, 9, 4);
        full_layer(&ram, &root, LayerOptions::default());
        let good = std::fs::read(root.join(STATE_FILE)).unwrap();
        let path = Path::new("x");
        assert!(parse_state(&good, path, None).is_ok());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut b = good.clone();
            match i % 3 {
                0 => b.truncate((rnd() % good.len() as u64) as usize),
                1 => {
                    for _ in 0..1 + rnd() % 4 {
                        let at = (rnd() % b.len() as u64) as usize;
                        b[at] ^= 1 << (rnd() % 8);
                    }
                }
                _ => {
                    b = (0..rnd() % 512).map(|_| rnd() as u8).collect();
                    if i % 2 == 0 && b.len() > 12 {
                        b[..8].copy_from_slice(SNAPSHOT_MAGIC);
                        b[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
                    }
                }
            }
            if b != good {
                // Flips inside the payload are caught by the CRC; the parser must not panic
                // on any of it, and a frame it accepts must still describe this machine.
                if let Ok(p) = parse_state(&b, path, None) {
                    assert_eq!(p.vm.machine.mem_bytes, 2 << 20);
                }
            }
        }
        // Garbage behind a valid frame (CRC fixed up) reaches the payload parser.
        for _ in 0..2000 {
            let mut payload: Vec<u8> = (0..rnd() % 300).map(|_| rnd() as u8).collect();
            if payload.len() >= 4 && rnd() % 2 == 0 {
                let n = (rnd() % 64) as u32;
                payload[..4].copy_from_slice(&n.to_le_bytes());
            }
            let framed = seal(&payload, None, &[0; 12]).unwrap();
            assert!(parse_state(&framed, path, None).is_err());
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn secrets_are_rounded_out_and_merged() {
        let s = normalize_secrets(&[(5000, 10), (4096, 100), (3 << 12, 1), (0, 0)], 1 << 20);
        assert_eq!(s, vec![(4096, 4096), (3 << 12, 4096)]);
    }

    #[test]
    fn key_files_are_raw_or_hex() {
        assert!(SnapshotKey::from_bytes(&[7u8; 32]).is_ok());
        let hexkey = format!("{}\n", "ab".repeat(32));
        let a = SnapshotKey::from_bytes(hexkey.as_bytes()).unwrap();
        let b = SnapshotKey::from_bytes(&[0xab; 32]).unwrap();
        assert_eq!(a.id, b.id);
        assert!(SnapshotKey::from_bytes(b"short").is_err());
    }
}
