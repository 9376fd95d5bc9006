//! Storage migration (CloudNet's disk, from the paper's DRBD set-up): the virtio-blk disks
//! move with the VM when the destination was given disks of its own (`run --incoming ...
//! --disk path=F`); without, they are on shared storage and nothing moves.
//!
//! Phases, on the migration's link, before the memory's pre-copy:
//! 1. **Offer and hashes** (incremental): the source offers each disk (size, block size);
//!    the destination answers with a 128-bit hash of each 64 KiB block of its own file (its
//!    base copy: empty, or yesterday's image), or says it does not receive that disk.
//! 2. **Bulk copy, asynchronous**: the source starts recording written blocks, then reads its
//!    disk and sends every block whose hash differs (in 4 KiB units: zero units as marker bits,
//!    the rest raw or in the `cnet` codec when the service chose it, whose redundancy cache
//!    then covers disk blocks too),
//!    while the guest runs and writes. Passes over the blocks written meanwhile follow, until
//!    few are left.
//! 3. **Synchronous replication** (DRBD's protocol C): every guest write is sent to the
//!    destination and its request completes only once the destination acknowledged it;
//!    the memory pre-copy runs meanwhile. The writes move to a connection of their own
//!    (DRBD's separate link) once nothing on the migration's link can overtake them, so a
//!    write waits one round trip, not behind the queued memory pages.
//! 4. **Switch-over**: before pausing, the source stops mirroring (writes are recorded again)
//!    and waits for the writes in flight; after the pause it sends the blocks written since,
//!    then the state. The destination syncs its files before it says `ready`: at resume its
//!    disk is exactly the source's.
//!
//! A link that fails (or a write not acknowledged within [`MIRROR_TIMEOUT`]) fails the
//! migration before the hand-over: the source's writes complete locally and it runs on.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base_vmm::devices::virtio::block::BlockConfig;
use base_vmm::devices::virtio::disk_track::{
    new_generation, read_stamp, remove_stamp, write_stamp, DiskTrack, WriteMirror, TRACK_BLOCK,
};
use serde::{Deserialize, Serialize};

use super::cnet::{Decoder, Encoder, Encoding, EncodingStats};
use super::link::{Link, LinkError};
use super::wire::{self, Frame, WireError, BATCH_PAGES, HEADER_LEN, PAGE};
use super::{bit, set_bit};
use crate::ctx::lock;

/// `disk-offer` (S→D): disk u8, bytes u64, block size u32, base u128 (0: none), generation
/// u128.
pub const T_DISK_OFFER: u8 = 0x40;
/// `disk-hashes` (D→S): disk u8, receiving u8 (0 no, 1 yes, 2 yes and holding the offered
/// base: no hashes), first block u64, count u32, count × 16 bytes.
pub const T_DISK_HASHES: u8 = 0x41;
/// `disk-blocks` (S→D): disk u8, then a `pages` payload whose pages are 4 KiB units of the disk.
pub const T_DISK_BLOCKS: u8 = 0x42;
/// `disk-write` (S→D): sequence u64, disk u8, byte offset u64, data (whole sectors).
pub const T_DISK_WRITE: u8 = 0x43;
/// `disk-ack` (D→S): sequence u64 of a `disk-write` now in the destination's file.
pub const T_DISK_ACK: u8 = 0x44;

/// Disks a VM has at most (virtio slots).
pub const MAX_DISKS: usize = 24;
/// Largest disk accepted (16 TiB).
pub const MAX_DISK_BYTES: u64 = 1 << 44;
/// How long a guest write waits for the destination's acknowledgement before the
/// migration gives up (the write then completes locally).
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);
/// 4 KiB units of a tracked block.
const UNITS: u64 = TRACK_BLOCK / PAGE as u64;
/// Blocks a `disk-blocks` frame carries at most (2 MiB).
const RUN_BLOCKS: u64 = BATCH_PAGES / UNITS;
/// Hashes per `disk-hashes` frame (1 MiB).
const HASHES_PER_FRAME: usize = 1 << 16;
/// The synchronous phase starts once a pass leaves at most this many written blocks...
const SYNC_THRESHOLD: u64 = 64;
/// ...or after this many passes (a guest writing faster than the link).
const MAX_PASSES: u32 = 8;
/// Sector size: mirrored writes are whole sectors.
const SECTOR: u64 = 512;
/// 4 KiB units whose hashes the source keeps at most, all disks together (16 GiB of disk,
/// 64 MiB of hashes); the units of larger disks go again whole blocks at a time.
const MAX_HELD_UNITS: u64 = 4 << 20;

/// The disk migration's frames.
#[derive(Debug, PartialEq)]
pub enum DiskFrame {
    /// Source → destination: disk `disk` of `bytes` bytes, tracked in blocks of `block`.
    Offer {
        /// Index among the VM's disks.
        disk: u8,
        /// Size.
        bytes: u64,
        /// Block size of the hashes and of the dirty tracking.
        block: u32,
        /// The generation the source's image held when its VMM took it (0: not known): a
        /// destination whose image still holds it needs only the blocks written since.
        base: u128,
        /// The generation both images hold after this migration.
        generation: u128,
    },
    /// Destination → source: hashes of its copy's blocks `first..`, or (`holds_base`) none:
    /// its image holds the offered base, or (not `receiving`) the disk stays where it is
    /// (shared storage).
    Hashes {
        /// Index.
        disk: u8,
        /// The destination receives this disk.
        receiving: bool,
        /// Its image holds the offered base generation (no hashes follow).
        holds_base: bool,
        /// First block.
        first: u64,
        /// xxh3-128 of each block's bytes.
        hashes: Vec<u128>,
    },
    /// Source → destination: 4 KiB units `first..first+span` of the disk selected by
    /// `present` (laid out as a `pages` frame; units past the disk's end are refused).
    Blocks {
        /// Index.
        disk: u8,
        /// First unit.
        first: u64,
        /// Units spanned (1..=512).
        span: u16,
        /// Page codec of the data.
        codec: u8,
        /// Units carried.
        present: Vec<u64>,
        /// Of which zero.
        zero: Vec<u64>,
        /// Data of the others.
        data: Vec<u8>,
    },
    /// Source → destination: a guest write of the synchronous phase.
    Write {
        /// Sequence number (acknowledged by `Ack`).
        seq: u64,
        /// Index.
        disk: u8,
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// Destination → source: write `seq` is in its file.
    Ack {
        /// Sequence number.
        seq: u64,
    },
}

impl DiskFrame {
    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            DiskFrame::Offer { .. } => "disk-offer",
            DiskFrame::Hashes { .. } => "disk-hashes",
            DiskFrame::Blocks { .. } => "disk-blocks",
            DiskFrame::Write { .. } => "disk-write",
            DiskFrame::Ack { .. } => "disk-ack",
        }
    }

    /// Appends the payload to `out`; returns the frame type.
    pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) -> u8 {
        match self {
            DiskFrame::Offer {
                disk,
                bytes,
                block,
                base,
                generation,
            } => {
                out.push(*disk);
                out.extend_from_slice(&bytes.to_le_bytes());
                out.extend_from_slice(&block.to_le_bytes());
                out.extend_from_slice(&base.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                T_DISK_OFFER
            }
            DiskFrame::Hashes {
                disk,
                receiving,
                holds_base,
                first,
                hashes,
            } => {
                out.push(*disk);
                out.push(if *holds_base { 2 } else { *receiving as u8 });
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                for h in hashes {
                    out.extend_from_slice(&h.to_le_bytes());
                }
                T_DISK_HASHES
            }
            DiskFrame::Blocks {
                disk,
                first,
                span,
                codec,
                present,
                zero,
                data,
            } => {
                out.push(*disk);
                wire::put_pages_fixed(out, *first, *span, *codec, present, zero);
                out.extend_from_slice(data);
                T_DISK_BLOCKS
            }
            DiskFrame::Write {
                seq,
                disk,
                offset,
                data,
            } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*disk);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
                T_DISK_WRITE
            }
            DiskFrame::Ack { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                T_DISK_ACK
            }
        }
    }
}

/// Whether `ty` is one of the disk frames.
pub fn is_disk_frame(ty: u8) -> bool {
    (T_DISK_OFFER..=T_DISK_ACK).contains(&ty)
}

fn bad(why: impl Into<String>) -> WireError {
    wire::bad(why)
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], WireError> {
    if b.len() < n {
        return Err(bad(format!("{what} frame is truncated")));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn u64_at(b: &mut &[u8], what: &str) -> Result<u64, WireError> {
    Ok(u64::from_le_bytes(take(b, 8, what)?.try_into().expect("8")))
}

/// Decodes a disk frame's payload, checked against its exact layout.
pub fn decode(ty: u8, payload: &[u8]) -> Result<DiskFrame, WireError> {
    let mut b = payload;
    let f = match ty {
        T_DISK_OFFER => {
            let w = "disk-offer";
            let disk = take(&mut b, 1, w)?[0];
            let bytes = u64_at(&mut b, w)?;
            let block = u32::from_le_bytes(take(&mut b, 4, w)?.try_into().expect("4"));
            let base = u128::from_le_bytes(take(&mut b, 16, w)?.try_into().expect("16"));
            let generation = u128::from_le_bytes(take(&mut b, 16, w)?.try_into().expect("16"));
            DiskFrame::Offer {
                disk,
                bytes,
                block,
                base,
                generation,
            }
        }
        T_DISK_HASHES => {
            let w = "disk-hashes";
            let disk = take(&mut b, 1, w)?[0];
            let (receiving, holds_base) = match take(&mut b, 1, w)?[0] {
                0 => (false, false),
                1 => (true, false),
                2 => (true, true),
                v => {
                    return Err(bad(format!(
                        "disk-hashes receiving flag {v} is not 0, 1 or 2"
                    )))
                }
            };
            let first = u64_at(&mut b, w)?;
            let n = u32::from_le_bytes(take(&mut b, 4, w)?.try_into().expect("4")) as usize;
            if n > HASHES_PER_FRAME {
                return Err(bad(format!(
                    "disk-hashes frame carries {n} hashes (at most {HASHES_PER_FRAME})"
                )));
            }
            if holds_base && n > 0 {
                return Err(bad("disk-hashes holding the base carries hashes"));
            }
            let raw = take(&mut b, n * 16, w)?;
            let hashes = raw
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().expect("16")))
                .collect();
            DiskFrame::Hashes {
                disk,
                receiving,
                holds_base,
                first,
                hashes,
            }
        }
        T_DISK_BLOCKS => {
            let disk = take(&mut b, 1, "disk-blocks")?[0];
            let p = wire::decode_pages(b).map_err(|e| bad(format!("disk-blocks: {}", e.0)))?;
            b = &[];
            DiskFrame::Blocks {
                disk,
                first: p.first,
                span: p.span,
                codec: p.codec,
                present: p.present,
                zero: p.zero,
                data: p.data.to_vec(),
            }
        }
        T_DISK_WRITE => {
            let w = "disk-write";
            let seq = u64_at(&mut b, w)?;
            let disk = take(&mut b, 1, w)?[0];
            let offset = u64_at(&mut b, w)?;
            let data = std::mem::take(&mut b).to_vec();
            if data.is_empty()
                || !(data.len() as u64).is_multiple_of(SECTOR)
                || !offset.is_multiple_of(SECTOR)
            {
                return Err(bad(format!(
                    "disk-write of {} bytes at {offset}: not whole sectors",
                    data.len()
                )));
            }
            DiskFrame::Write {
                seq,
                disk,
                offset,
                data,
            }
        }
        T_DISK_ACK => DiskFrame::Ack {
            seq: u64_at(&mut b, "disk-ack")?,
        },
        other => return Err(bad(format!("unknown frame type {other}"))),
    };
    if !b.is_empty() {
        return Err(bad(format!(
            "{} frame has {} stray bytes at its end",
            f.name(),
            b.len()
        )));
    }
    Ok(f)
}

/// What the disk migration did (the migration report's `disk`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskReport {
    /// Where the disk migration is (also in GET /vm/migration's progress): `bulk` (the copy),
    /// `passes` (the blocks written meanwhile), `sync` (every guest write mirrored), `left`
    /// (switch-over: writes recorded again, the last ones acknowledged), `done` (the blocks
    /// written since went with the guest paused).
    #[serde(default)]
    pub phase: String,
    /// Blocks known written and not sent since (at the last step).
    #[serde(default)]
    pub blocks_pending: u64,
    /// Disks moved with the VM (disks the destination did not receive stay on shared storage).
    pub disks: u32,
    /// Their size in all, bytes.
    pub disk_bytes: u64,
    /// Their 64 KiB blocks.
    pub blocks_total: u64,
    /// Blocks the destination held already (same hash): not sent. An incremental migration
    /// from a base both sides hold sends only the others.
    pub blocks_same: u64,
    /// Disks whose destination held the source's base generation: only the blocks written
    /// since went, and neither image was read to find them.
    #[serde(default)]
    pub base_held: u32,
    /// Blocks sent by the bulk copy.
    pub blocks_sent: u64,
    /// Blocks sent again by the asynchronous passes (written after they were sent).
    pub blocks_resent: u64,
    /// Blocks sent with the guest paused (written between the end of the synchronous phase
    /// and the pause).
    pub blocks_final: u64,
    /// 4 KiB units that went as zero markers.
    pub zero_units: u64,
    /// Of the blocks the asynchronous passes sent again, the 4 KiB units that went (changed
    /// since the destination got them)...
    #[serde(default)]
    pub units_resent: u64,
    /// ...and those that did not (unchanged: a block is tracked in 64 KiB, a write is
    /// often 4 KiB).
    #[serde(default)]
    pub units_unchanged: u64,
    /// Payload bytes of the passes' frames (the re-sent blocks), before TLS.
    #[serde(default)]
    pub bytes_resent: u64,
    /// Payload bytes of the disk frames (blocks and mirrored writes), before TLS.
    pub bytes: u64,
    /// Asynchronous passes after the bulk copy.
    pub passes: u32,
    /// Guest writes mirrored synchronously (acknowledged by the destination).
    pub sync_writes: u64,
    /// Their bytes.
    pub sync_bytes: u64,
    /// Mean wait of a mirrored write for its acknowledgement, µs.
    pub sync_ack_mean_us: u64,
    /// Of the mirrored writes, those sent on the mirror's own connection (not queued behind
    /// the memory pages on the migration's link).
    #[serde(default)]
    pub sync_writes_own_link: u64,
    /// Offer, the destination's hashing and the hashes, ms.
    pub setup_ms: f64,
    /// Bulk copy and asynchronous passes, ms.
    pub async_ms: f64,
    /// Synchronous phase (until the switch-over stopped it), ms.
    pub sync_ms: f64,
    /// The redundancy cache (and deltas) on disk units, when the migration service chose
    /// encodings before the bulk copy began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<EncodingStats>,
}

/// A guest write waiting to be sent.
struct Pending {
    seq: u64,
    disk: u8,
    offset: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct MirrorState {
    open: bool,
    next: u64,
    queue: VecDeque<Pending>,
    inflight: HashMap<u64, Instant>,
    results: HashMap<u64, bool>,
    broken: Option<String>,
    acked: u64,
    ack_us: u64,
    /// The mirror's own connection is up (its thread waits for the hand-over).
    link_ready: bool,
    /// Writes go on the mirror's own connection from now on (its thread takes them).
    own_link: bool,
    /// Writes sent on the mirror's own connection.
    own_link_writes: u64,
    /// The migration no longer mirrors: the mirror's thread ends, closing its connection.
    closing: bool,
    /// (disk, offset, length) of every write taken for mirroring: the destination's copy of
    /// those units no longer follows the source's hashes of them.
    touched: Vec<(u8, u64, u64)>,
}

/// The synchronous phase's queue between the device (a guest write waits in
/// [`WriteMirror::mirror`]) and the sender thread (which sends it and reads the ack).
#[derive(Default)]
struct Mirror {
    st: Mutex<MirrorState>,
    cv: Condvar,
}

impl Mirror {
    /// Every write queued or in flight is answered "not delivered" (its block goes dirty).
    fn fail_all(st: &mut MirrorState) {
        st.open = false;
        let seqs: Vec<u64> = st
            .queue
            .drain(..)
            .map(|p| p.seq)
            .chain(st.inflight.drain().map(|(s, _)| s))
            .collect();
        for s in seqs {
            st.results.insert(s, false);
        }
    }

    fn abandon(&self) {
        let mut st = lock(&self.st);
        Self::fail_all(&mut st);
        st.closing = true;
        drop(st);
        self.cv.notify_all();
    }

    /// The mirror's connection failed: the migration fails (at the sender's next step), the
    /// writes waiting complete locally.
    fn broke(&self, why: String) {
        let mut st = lock(&self.st);
        st.broken.get_or_insert(why);
        Self::fail_all(&mut st);
        drop(st);
        self.cv.notify_all();
    }

    /// No new writes; queued ones are answered "not delivered", those in flight stay.
    fn stop_taking(&self) {
        let mut st = lock(&self.st);
        st.open = false;
        let seqs: Vec<u64> = st.queue.drain(..).map(|p| p.seq).collect();
        for s in seqs {
            st.results.insert(s, false);
        }
        drop(st);
        self.cv.notify_all();
    }

    fn take(&self) -> Vec<Pending> {
        let mut st = lock(&self.st);
        let now = Instant::now();
        let taken: Vec<Pending> = st.queue.drain(..).collect();
        for p in &taken {
            st.inflight.insert(p.seq, now);
        }
        taken
    }

    fn acked(&self, seq: u64) {
        let mut st = lock(&self.st);
        // An ack for a write given up on (or never sent) is ignored.
        if let Some(at) = st.inflight.remove(&seq) {
            st.acked += 1;
            if st.acked == 1 {
                tracing::info!(
                    "migration: first mirrored disk write acknowledged ({} µs)",
                    at.elapsed().as_micros()
                );
            }
            st.ack_us += at.elapsed().as_micros() as u64;
            st.results.insert(seq, true);
            drop(st);
            self.cv.notify_all();
        }
    }

    fn inflight(&self) -> usize {
        lock(&self.st).inflight.len()
    }

    /// Waits up to `wait` for the acknowledgements in flight (taken by the mirror's thread).
    fn wait_inflight(&self, wait: Duration) {
        let st = lock(&self.st);
        if !st.inflight.is_empty() {
            let _ = self.cv.wait_timeout(st, wait);
        }
    }
}

/// The synchronous phase's own connection (a second `hello` of the same session, see
/// docs/migration-wire.md#disks): once the sender hands the mirror over, this thread sends
/// the guest's writes and reads their acknowledgements, so a write no longer waits behind
/// the memory pages queued on the migration's link.
fn serve_mirror(q: Arc<Mirror>, connect: Box<dyn FnOnce() -> Result<Link, LinkError> + Send>) {
    let mut link = match connect() {
        Ok(l) => l,
        Err(e) => {
            tracing::info!(
                "migration: no connection of its own for the disk mirror ({e}): mirrored \
                 writes go on the migration's link"
            );
            return;
        }
    };
    lock(&q.st).link_ready = true;
    tracing::info!("migration: the disk mirror has a connection of its own");
    loop {
        let (writes, waiting) = {
            let mut st = lock(&q.st);
            if st.closing || st.broken.is_some() {
                return;
            }
            let writes: Vec<Pending> = if st.own_link {
                let now = Instant::now();
                let taken: Vec<Pending> = st.queue.drain(..).collect();
                for p in &taken {
                    st.inflight.insert(p.seq, now);
                }
                st.own_link_writes += taken.len() as u64;
                taken
            } else {
                Vec::new()
            };
            (writes, !st.inflight.is_empty())
        };
        for w in writes {
            let f = Frame::Disk(DiskFrame::Write {
                seq: w.seq,
                disk: w.disk,
                offset: w.offset,
                data: w.data,
            });
            if let Err(e) = link.send(&f) {
                q.broke(format!("the disk mirror's connection failed: {e}"));
                return;
            }
        }
        if !waiting {
            // Nothing to hear: sleep until a write is queued (or 5 ms).
            let st = lock(&q.st);
            if st.queue.is_empty() && !st.closing {
                let _ = q.cv.wait_timeout(st, Duration::from_millis(5));
            }
            continue;
        }
        match link.recv(Duration::from_millis(1)) {
            Ok(None) => {}
            Ok(Some(Frame::Disk(DiskFrame::Ack { seq }))) => q.acked(seq),
            Ok(Some(Frame::Error(m))) => {
                q.broke(format!("the destination gave up on the disk mirror: {m}"));
                return;
            }
            Ok(Some(f)) => {
                q.broke(format!(
                    "unexpected {} frame on the disk mirror's connection",
                    f.name()
                ));
                return;
            }
            // Closed by the destination once the migration no longer needs it.
            Err(_) if lock(&q.st).closing => return,
            Err(e) => {
                q.broke(format!("the disk mirror's connection failed: {e}"));
                return;
            }
        }
    }
}

/// One disk's door into the mirror.
struct DiskMirror {
    q: Arc<Mirror>,
    disk: u8,
}

impl WriteMirror for DiskMirror {
    fn mirror(&self, offset: u64, data: &[u8]) -> bool {
        let mut st = lock(&self.q.st);
        if !st.open {
            return false;
        }
        let seq = st.next;
        st.next += 1;
        st.touched.push((self.disk, offset, data.len() as u64));
        st.queue.push_back(Pending {
            seq,
            disk: self.disk,
            offset,
            data: data.to_vec(),
        });
        let deadline = Instant::now() + MIRROR_TIMEOUT;
        loop {
            if let Some(ok) = st.results.remove(&seq) {
                return ok;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // The destination is too slow or gone: the migration fails, the source goes
                // on alone (this write completes here, its block recorded as dirty).
                st.broken.get_or_insert_with(|| {
                    format!(
                        "the destination did not acknowledge a mirrored disk write within \
                         {MIRROR_TIMEOUT:?}"
                    )
                });
                Mirror::fail_all(&mut st);
                st.results.remove(&seq);
                self.q.cv.notify_all();
                return false;
            }
            st = self
                .q
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A disk being sent.
struct OutDisk {
    index: u8,
    track: Arc<DiskTrack>,
    file: File,
    /// What the destination holds.
    remote: Remote,
    /// The generation both images hold once the migration is done (stamped on the source's
    /// image when the destination resumed).
    generation: u128,
    /// Bulk copy: next block to look at.
    cursor: u64,
    /// Blocks to send again (written after they were sent).
    resend: Vec<u64>,
    /// The xxh3-128 hash of each 4 KiB unit the destination holds (0: unknown), so that a
    /// block sent again carries only its changed units; empty beyond [`MAX_HELD_UNITS`]. A
    /// mirrored write changes the destination's copy without passing here: while every write
    /// is mirrored that is harmless (the destination gets each change either way), and the
    /// units it touched are forgotten before the blocks written after the mirror stopped go.
    held: Vec<u128>,
}

/// The destination's answer to a disk's offer.
enum Answer {
    /// Its image's block hashes, as far as received.
    Hashes(Vec<u128>),
    /// Its image still holds the offered base.
    HoldsBase,
}

/// What the destination's image holds, for the bulk copy.
enum Remote {
    /// Blocks whose hash is known.
    Hashes(Vec<u128>),
    /// The source's base generation: only the blocks written since (this bitmap) differ, and
    /// nothing else is read.
    Base(Vec<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Bulk,
    Passes,
    Synced,
    Left,
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Bulk => "bulk",
            Stage::Passes => "passes",
            Stage::Synced => "sync",
            Stage::Left => "left",
            Stage::Done => "done",
        }
    }
}

/// The source's side of the disk migration, driven by the sender thread.
pub(crate) struct DiskSender {
    disks: Vec<OutDisk>,
    stage: Stage,
    mirror: Arc<Mirror>,
    /// Synchronous phase: a write went on the migration's link after its last disk blocks,
    /// so once it is acknowledged nothing sent there can overtake a write sent on the
    /// mirror's own connection (the destination applies each link's frames in order).
    fenced: bool,
    encoder: Option<Encoder>,
    encoding_decided: bool,
    report: DiskReport,
    stage_start: Instant,
    buf: Vec<u8>,
    frame: Vec<u8>,
    /// The last `send_blocks`' units: sent, and left out as unchanged.
    units: (u64, u64),
}

fn other(msg: String) -> LinkError {
    LinkError::Io(std::io::Error::other(msg))
}

/// The xxh3-128 hash of block `b` of a disk whose bytes are `data` (the block's bytes, the
/// last block short).
fn block_hash(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// Reads blocks `first..first+n` of `file` (a disk of `bytes` bytes) into `buf`, zero-filled
/// past the end.
fn read_blocks(
    file: &File,
    bytes: u64,
    first: u64,
    n: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let start = first * TRACK_BLOCK;
    let len = (n * TRACK_BLOCK) as usize;
    buf.clear();
    buf.resize(len, 0);
    let have = bytes.saturating_sub(start).min(len as u64) as usize;
    file.read_exact_at(&mut buf[..have], start)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl DiskSender {
    /// Offers `tracks` to the destination and takes its answer. `None`: no disk moves (none,
    /// or the destination keeps them on shared storage).
    pub(crate) fn setup(
        tracks: Vec<Arc<DiskTrack>>,
        link: &mut Link,
        connect: Box<dyn FnOnce() -> Result<Link, LinkError> + Send>,
    ) -> Result<Option<Self>, LinkError> {
        if tracks.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let n = tracks.len().min(MAX_DISKS);
        let bases: Vec<Option<u128>> = tracks.iter().take(n).map(|t| t.base()).collect();
        let generations: Vec<u128> = (0..n).map(|_| new_generation()).collect();
        for (i, t) in tracks.iter().enumerate().take(n) {
            link.send(&Frame::Disk(DiskFrame::Offer {
                disk: i as u8,
                bytes: t.bytes(),
                block: TRACK_BLOCK as u32,
                base: bases[i].unwrap_or(0),
                generation: generations[i],
            }))?;
        }
        link.flush(Duration::from_secs(30))?;
        let mut answers: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
        let mut answered = vec![false; n];
        while answered.iter().any(|a| !a) {
            // The destination reads its whole file to hash it (unless it holds the base).
            match link.expect(Duration::from_secs(120), "disk-hashes")? {
                Frame::Disk(DiskFrame::Hashes {
                    disk,
                    receiving,
                    holds_base,
                    first,
                    hashes,
                }) => {
                    let d = disk as usize;
                    let (Some(slot), false) = (answers.get_mut(d), answered.get(d) == Some(&true))
                    else {
                        return Err(other(format!(
                            "disk-hashes for disk {disk}, which was not offered or is answered"
                        )));
                    };
                    if !receiving {
                        answered[d] = true;
                        continue;
                    }
                    if holds_base {
                        if slot.is_some() || bases[d].is_none() {
                            return Err(other(format!(
                                "disk-hashes for disk {disk}: holding a base not offered, or \
                                 after hashes"
                            )));
                        }
                        *slot = Some(Answer::HoldsBase);
                        answered[d] = true;
                        continue;
                    }
                    let Answer::Hashes(have) =
                        slot.get_or_insert_with(|| Answer::Hashes(Vec::new()))
                    else {
                        unreachable!("a base answer ends the disk's answers")
                    };
                    let blocks = tracks[d].blocks();
                    if first != have.len() as u64 || first + hashes.len() as u64 > blocks {
                        return Err(other(format!(
                            "disk-hashes for disk {disk}: blocks {first}+{} out of order or \
                             past its {blocks} blocks",
                            hashes.len()
                        )));
                    }
                    have.extend(hashes);
                    answered[d] = have.len() as u64 == blocks;
                }
                f => return Err(other(format!("expected disk-hashes, got {}", f.name()))),
            }
        }
        let mut disks = Vec::new();
        let mut report = DiskReport::default();
        let mut held_budget = MAX_HELD_UNITS;
        for (i, (t, answer)) in tracks.into_iter().zip(answers).enumerate() {
            let Some(answer) = answer else { continue };
            let remote = match answer {
                // The blocks written since the base, taken as the recording starts below
                // (no write falls between).
                Answer::HoldsBase => {
                    let base = bases[i].expect("answered for an offered base");
                    let Some(since) = t.start_since(base) else {
                        return Err(other(format!(
                            "disk {}: its base changed during the offer",
                            t.path().display()
                        )));
                    };
                    report.base_held += 1;
                    Remote::Base(since)
                }
                Answer::Hashes(hashes) => Remote::Hashes(hashes),
            };
            let file = File::open(t.path())
                .map_err(|e| other(format!("disk {}: {e}", t.path().display())))?;
            report.disks += 1;
            report.disk_bytes += t.bytes();
            report.blocks_total += t.blocks();
            let words = t.blocks().div_ceil(64) as usize;
            let units = t.bytes().div_ceil(PAGE as u64);
            let held = if units <= held_budget {
                held_budget -= units;
                vec![0; units as usize]
            } else {
                Vec::new()
            };
            disks.push(OutDisk {
                held,
                index: i as u8,
                track: t,
                file,
                remote,
                generation: generations[i],
                cursor: 0,
                resend: vec![0; words],
            });
        }
        if disks.is_empty() {
            return Ok(None);
        }
        // Written blocks are recorded before the bulk copy reads any (from the base: as the
        // blocks written since were taken).
        for d in &disks {
            if matches!(d.remote, Remote::Hashes(_)) {
                d.track.start();
            }
        }
        report.setup_ms = t0.elapsed().as_secs_f64() * 1e3;
        super::trace(format_args!(
            "disk: {} disks to move, {} blocks, setup {:.1} ms",
            report.disks, report.blocks_total, report.setup_ms
        ));
        let mirror = Arc::new(Mirror::default());
        // The mirror's own connection, opened meanwhile (a destination that does not take
        // it leaves the writes on this link).
        let q = mirror.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("migrate-mirror".into())
            .spawn(move || serve_mirror(q, connect))
        {
            tracing::info!("migration: no thread for the disk mirror's connection: {e}");
        }
        Ok(Some(DiskSender {
            disks,
            stage: Stage::Bulk,
            mirror,
            fenced: false,
            encoder: None,
            encoding_decided: false,
            report,
            stage_start: Instant::now(),
            buf: Vec::new(),
            frame: Vec::new(),
            units: (0, 0),
        }))
    }

    /// Whether the encodings for disk units are decided (at the first disk frame).
    pub(crate) fn encoding_decided(&self) -> bool {
        self.encoding_decided
    }

    /// Uses the migration's encodings (the service's choice) for disk units too, with caches
    /// of their own (CloudNet keeps one cache per memory or disk transfer).
    pub(crate) fn decide_encoding(&mut self, enc: Option<Encoding>) {
        self.encoding_decided = true;
        self.encoder = enc.and_then(|e| Encoder::new(e).ok());
    }

    /// The report so far.
    pub(crate) fn report(&self) -> DiskReport {
        let mut r = self.report.clone();
        r.phase = self.stage.name().into();
        r.blocks_pending = self.disks.iter().map(|d| super::count(&d.resend)).sum();
        if self.stage == Stage::Synced {
            r.sync_ms = self.stage_start.elapsed().as_secs_f64() * 1e3;
        }
        let st = lock(&self.mirror.st);
        r.sync_writes = st.acked;
        r.sync_bytes = self.disks.iter().map(|d| d.track.mirrored().1).sum();
        r.sync_ack_mean_us = st.ack_us.checked_div(st.acked).unwrap_or(0);
        r.sync_writes_own_link = st.own_link_writes;
        r.encoding = self.encoder.as_ref().map(|e| e.stats().clone());
        r
    }

    /// The destination acknowledged a mirrored write.
    pub(crate) fn acked(&self, seq: u64) {
        self.mirror.acked(seq);
    }

    /// Sends the next piece of disk work; the payload bytes sent, or `None` when there is
    /// none now (the disks are in sync).
    pub(crate) fn step(&mut self, link: &mut Link) -> Result<Option<u64>, LinkError> {
        if let Some(why) = lock(&self.mirror.st).broken.clone() {
            return Err(other(why));
        }
        match self.stage {
            Stage::Bulk => self.bulk(link).map(Some),
            Stage::Passes => {
                if let Some(n) = self.send_resend(link, false)? {
                    return Ok(Some(n));
                }
                let mut dirty = 0;
                for d in &mut self.disks {
                    d.resend = d.track.harvest();
                    dirty += super::count(&d.resend);
                }
                self.report.passes += 1;
                if dirty <= SYNC_THRESHOLD || self.report.passes >= MAX_PASSES {
                    self.enter_sync();
                }
                Ok(Some(0))
            }
            Stage::Synced => {
                if lock(&self.mirror.st).own_link {
                    return Ok(None);
                }
                let writes = self.mirror.take();
                if !writes.is_empty() {
                    let mut n = 0;
                    for w in writes {
                        n += w.data.len() as u64 + 17;
                        link.send(&Frame::Disk(DiskFrame::Write {
                            seq: w.seq,
                            disk: w.disk,
                            offset: w.offset,
                            data: w.data,
                        }))?;
                    }
                    self.report.bytes += n;
                    // Behind every block sent here (none is left to send).
                    self.fenced = self.disks.iter().all(|d| d.resend.iter().all(|&w| w == 0));
                    return Ok(Some(n));
                }
                let r = self.send_resend(link, false)?;
                if r.is_some() {
                    self.fenced = false;
                    return Ok(r);
                }
                // Hand the mirror over to its own connection once a write behind the last
                // blocks was acknowledged: the destination then holds everything sent here.
                let mut st = lock(&self.mirror.st);
                if self.fenced && st.link_ready && st.inflight.is_empty() {
                    st.own_link = true;
                    drop(st);
                    self.mirror.cv.notify_all();
                    tracing::info!(
                        "migration: mirrored disk writes now go on the mirror's own connection"
                    );
                }
                Ok(None)
            }
            Stage::Left | Stage::Done => Ok(None),
        }
    }

    fn enter_sync(&mut self) {
        self.report.async_ms = self.stage_start.elapsed().as_secs_f64() * 1e3;
        self.stage_start = Instant::now();
        lock(&self.mirror.st).open = true;
        for d in &mut self.disks {
            let m: Arc<dyn WriteMirror> = Arc::new(DiskMirror {
                q: self.mirror.clone(),
                disk: d.index,
            });
            // Blocks written before the mirror took over go once more, in order with the
            // mirrored writes (both leave from this thread).
            let before = d.track.mirror_on(m);
            for (w, b) in d.resend.iter_mut().zip(before) {
                *w |= b;
            }
        }
        self.stage = Stage::Synced;
        tracing::info!(
            "migration: disks in sync after {} passes; guest writes are now mirrored to the \
             destination",
            self.report.passes
        );
    }

    /// The bulk copy: the next run of blocks whose hash differs from the destination's.
    fn bulk(&mut self, link: &mut Link) -> Result<u64, LinkError> {
        // Blocks the destination holds are skipped without sending: look at up to 64 MiB
        // of them per step.
        for _ in 0..32 {
            let Some(i) = self.disks.iter().position(|d| d.cursor < d.track.blocks()) else {
                self.stage = Stage::Passes;
                return Ok(0);
            };
            let d = &mut self.disks[i];
            if let Remote::Base(since) = &d.remote {
                // Blocks not written since the base are the destination's already: skipped
                // unread, up to the next one written.
                let next = super::next_set(since, d.cursor).unwrap_or(d.track.blocks());
                self.report.blocks_same += next - d.cursor;
                d.cursor = next;
                if next == d.track.blocks() {
                    continue;
                }
            }
            let first = d.cursor;
            let n = RUN_BLOCKS.min(d.track.blocks() - first);
            d.cursor += n;
            let mut buf = std::mem::take(&mut self.buf);
            read_blocks(&d.file, d.track.bytes(), first, n, &mut buf)
                .map_err(|e| other(format!("reading disk {}: {e}", d.track.path().display())))?;
            let mut sel = Vec::new();
            for k in 0..n {
                let b = first + k;
                let end = (d.track.bytes() - b * TRACK_BLOCK).min(TRACK_BLOCK) as usize;
                let at = (k * TRACK_BLOCK) as usize;
                let same = match &d.remote {
                    Remote::Hashes(h) => block_hash(&buf[at..at + end]) == h[b as usize],
                    Remote::Base(since) => !bit(since, b),
                };
                if same {
                    self.report.blocks_same += 1;
                    // The destination holds these bytes (their hash matched): their units'
                    // hashes are known. Not from the base: a block written since the
                    // recording began (sent again later) may hold new bytes already.
                    if matches!(d.remote, Remote::Hashes(_)) && !d.held.is_empty() {
                        let units = (d.held.len() as u64 - b * UNITS).min(UNITS);
                        for u in 0..units {
                            let bytes = &buf[at + u as usize * PAGE..][..PAGE];
                            d.held[(b * UNITS + u) as usize] = block_hash(bytes);
                        }
                    }
                } else {
                    sel.push(k);
                }
            }
            let sent = if sel.is_empty() {
                None
            } else {
                self.report.blocks_sent += sel.len() as u64;
                Some(self.send_blocks(link, i, first, n, &sel, &buf, 1, false)?)
            };
            self.buf = buf;
            if let Some(bytes) = sent {
                return Ok(bytes);
            }
        }
        Ok(0)
    }

    /// Sends the next run of blocks marked for sending again; `None` when there is none.
    fn send_resend(&mut self, link: &mut Link, last: bool) -> Result<Option<u64>, LinkError> {
        for i in 0..self.disks.len() {
            let d = &mut self.disks[i];
            let Some(w) = d.resend.iter().position(|&w| w != 0) else {
                continue;
            };
            let first = w as u64 * 64 + d.resend[w].trailing_zeros() as u64;
            let n = RUN_BLOCKS.min(d.track.blocks() - first);
            let mut sel = Vec::new();
            for k in 0..n {
                if bit(&d.resend, first + k) {
                    sel.push(k);
                    super::clear_bit(&mut d.resend, first + k);
                }
            }
            let mut buf = std::mem::take(&mut self.buf);
            read_blocks(&d.file, d.track.bytes(), first, n, &mut buf)
                .map_err(|e| other(format!("reading disk {}: {e}", d.track.path().display())))?;
            if last {
                self.report.blocks_final += sel.len() as u64;
            } else {
                self.report.blocks_resent += sel.len() as u64;
            }
            let round = self.report.passes + 1 + last as u32;
            self.units = (0, 0);
            let r = self.send_blocks(link, i, first, n, &sel, &buf, round, true);
            if let (Ok(bytes), false) = (&r, last) {
                self.report.bytes_resent += bytes;
                self.report.units_resent += self.units.0;
                self.report.units_unchanged += self.units.1;
            }
            self.buf = buf;
            return r.map(Some);
        }
        Ok(None)
    }

    /// Sends blocks `first + k` (k in `sel`) of disk `i`, whose run `first..first+n` is in
    /// `buf`, as one `disk-blocks` frame of 4 KiB units. `again`: blocks sent before, of
    /// which only the units the destination does not hold go (none at all: no frame, 0).
    #[allow(clippy::too_many_arguments)]
    fn send_blocks(
        &mut self,
        link: &mut Link,
        i: usize,
        first: u64,
        n: u64,
        sel: &[u64],
        buf: &[u8],
        round: u32,
        again: bool,
    ) -> Result<u64, LinkError> {
        let d = &mut self.disks[i];
        let units = d.track.bytes().div_ceil(PAGE as u64);
        let first_unit = first * UNITS;
        let span = (n * UNITS).min(units - first_unit);
        let nw = span.div_ceil(64) as usize;
        let (mut present, mut zero) = (vec![0u64; nw], vec![0u64; nw]);
        let mut data = Vec::new();
        let mut any = false;
        for &k in sel {
            for u in k * UNITS..((k + 1) * UNITS).min(span) {
                let unit = &buf[u as usize * PAGE..(u as usize + 1) * PAGE];
                if let Some(h) = d.held.get_mut((first_unit + u) as usize) {
                    let now = block_hash(unit);
                    if again && *h != 0 && *h == now {
                        self.units.1 += 1;
                        continue;
                    }
                    *h = now;
                }
                self.units.0 += 1;
                any = true;
                set_bit(&mut present, u);
                if is_zero(unit) {
                    set_bit(&mut zero, u);
                    self.report.zero_units += 1;
                    if let Some(e) = &mut self.encoder {
                        e.zero(first_unit + u);
                    }
                    continue;
                }
                match &mut self.encoder {
                    Some(e) => e.encode(first_unit + u, unit, round, &mut data),
                    None => data.extend_from_slice(unit),
                }
            }
        }
        if !any {
            return Ok(0);
        }
        let d = &self.disks[i];
        let codec = if self.encoder.is_some() {
            wire::PageCodec::Cnet
        } else {
            wire::PageCodec::Raw
        };
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        frame.extend_from_slice(&[0; HEADER_LEN]);
        frame.push(d.index);
        wire::put_pages_fixed(
            &mut frame,
            first_unit,
            span as u16,
            codec.tag(),
            &present,
            &zero,
        );
        let len = (frame.len() - HEADER_LEN + data.len()) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        frame[4] = T_DISK_BLOCKS;
        let r =
            link.send_slices(&mut [std::io::IoSlice::new(&frame), std::io::IoSlice::new(&data)]);
        self.frame = frame;
        r?;
        self.report.bytes += len as u64;
        Ok(len as u64 + HEADER_LEN as u64)
    }

    /// Before the pause: writes are recorded again instead of mirrored, and those in flight
    /// are waited for (the device must not wait on this thread while the pause waits on the
    /// device).
    pub(crate) fn leave_sync(&mut self, link: &mut Link) -> Result<(), LinkError> {
        if self.stage != Stage::Synced {
            return Err(other(format!(
                "the switch-over came with the disks not in sync ({:?})",
                self.stage
            )));
        }
        for d in &self.disks {
            d.track.mirror_off();
        }
        self.mirror.stop_taking();
        self.report.sync_ms = self.stage_start.elapsed().as_secs_f64() * 1e3;
        self.stage = Stage::Left;
        let deadline = Instant::now() + Duration::from_secs(30);
        let own_link = lock(&self.mirror.st).own_link;
        while self.mirror.inflight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(other(
                    "the destination did not acknowledge the last mirrored disk writes".into(),
                ));
            }
            if let Some(why) = lock(&self.mirror.st).broken.clone() {
                return Err(other(why));
            }
            if own_link {
                // Its thread reads the acknowledgements.
                self.mirror
                    .wait_inflight(left.min(Duration::from_millis(100)));
                continue;
            }
            match link.recv(left.min(Duration::from_millis(100)))? {
                None => {}
                Some(Frame::Disk(DiskFrame::Ack { seq })) => self.mirror.acked(seq),
                Some(Frame::Error(m)) => {
                    return Err(other(format!("the destination gave up: {m}")))
                }
                Some(f) => {
                    return Err(other(format!(
                        "unexpected {} frame from the destination",
                        f.name()
                    )))
                }
            }
        }
        // Its work is done: the mirror's thread closes its connection.
        lock(&self.mirror.st).closing = true;
        self.mirror.cv.notify_all();
        Ok(())
    }

    /// With the guest paused: the blocks written since the synchronous phase ended, and any
    /// still marked. Tracking stops.
    pub(crate) fn final_copy(&mut self, link: &mut Link) -> Result<(), LinkError> {
        // The writes mirrored went to the destination unseen by the hashes: their units go
        // whole if written again since.
        let touched = std::mem::take(&mut lock(&self.mirror.st).touched);
        for (disk, offset, len) in touched {
            let Some(d) = self.disks.iter_mut().find(|d| d.index == disk) else {
                continue;
            };
            let first = (offset / PAGE as u64) as usize;
            let end = (offset + len).div_ceil(PAGE as u64) as usize;
            for h in d.held.iter_mut().take(end).skip(first) {
                *h = 0;
            }
        }
        for d in &mut self.disks {
            for (w, b) in d.resend.iter_mut().zip(d.track.stop()) {
                *w |= b;
            }
        }
        while self.send_resend(link, true)?.is_some() {}
        self.stage = Stage::Done;
        Ok(())
    }

    /// The destination resumed the guest: the source's images are stamped with the
    /// generation both sides now hold, for an incremental migration back to this host. A
    /// stamp that cannot be written costs only that (the next migration here hashes).
    pub(crate) fn departed(&self) {
        for d in &self.disks {
            let path = d.track.path();
            if let Err(e) = write_stamp(path, d.generation) {
                tracing::warn!("migration: disk {}: no base stamp: {e}", path.display());
            }
        }
    }

    /// The migration ended (either way): tracking stops, waiting writes are released.
    pub(crate) fn abandon(&mut self) {
        self.mirror.abandon();
        for d in &self.disks {
            d.track.stop();
        }
    }
}

/// Why the destination refuses a disk frame.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An offer out of place.
    #[error("disk-offer for disk {0}: offered twice or more than {MAX_DISKS} disks")]
    Offer(u8),
    /// An offer this destination cannot take.
    #[error("disk {disk}: {why}")]
    Refused {
        /// Index.
        disk: u8,
        /// Why.
        why: String,
    },
    /// Blocks or a write for a disk not being received.
    #[error("{frame} for disk {disk}, which this destination does not receive")]
    NotReceiving {
        /// Frame name.
        frame: &'static str,
        /// Index.
        disk: u8,
    },
    /// Units or bytes past the disk's end.
    #[error("{frame} for disk {disk}: {what} runs past its {bytes} bytes")]
    PastEnd {
        /// Frame name.
        frame: &'static str,
        /// Index.
        disk: u8,
        /// What.
        what: String,
        /// Disk size.
        bytes: u64,
    },
    /// A `cnet` unit that cannot be decoded.
    #[error("disk {disk}: {err}")]
    Cnet {
        /// Index.
        disk: u8,
        /// Cause.
        err: super::cnet::CnetError,
    },
    /// Data left over after the last unit.
    #[error("disk-blocks frame for disk {0} has stray bytes after its last unit")]
    Stray(u8),
    /// A frame only the destination sends.
    #[error("unexpected {0} frame from the source")]
    Unexpected(&'static str),
    /// The file could not be read or written.
    #[error("disk {path}: {what}: {err}")]
    Io {
        /// The image.
        path: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        err: std::io::Error,
    },
    /// The acknowledgement could not be sent.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// A mirrored guest write into a received disk, checked against its size.
fn write_mirrored(
    path: &str,
    file: &File,
    bytes: u64,
    disk: u8,
    offset: u64,
    data: &[u8],
) -> Result<(), DiskError> {
    if offset
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > bytes)
    {
        return Err(DiskError::PastEnd {
            frame: "disk-write",
            disk,
            what: format!("{} bytes at {offset}", data.len()),
            bytes,
        });
    }
    file.write_all_at(data, offset)
        .map_err(|err| DiskError::Io {
            path: path.into(),
            what: "writing",
            err,
        })
}

/// The received disks as the mirror's connection writes them: (path, file, bytes) by index.
pub(crate) struct MirrorTargets(Vec<Option<(String, File, u64)>>);

/// The destination's end of the mirror's own connection: applies each `disk-write` and
/// acknowledges it, until the source closes it or `stop` is set (the migration ended). The
/// source sends nothing on the migration's link that a write here could overtake (see
/// `DiskSender::step`), and waits for every acknowledgement before the pause, so the disks
/// are exact when the state arrives.
pub(crate) fn serve_mirror_in(
    mut link: Link,
    targets: MirrorTargets,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Acquire) {
        let (seq, r) = match link.recv(Duration::from_millis(100)) {
            Ok(None) => continue,
            Ok(Some(Frame::Disk(DiskFrame::Write {
                seq,
                disk,
                offset,
                data,
            }))) => match targets.0.get(disk as usize).and_then(|t| t.as_ref()) {
                Some((path, file, bytes)) => {
                    (seq, write_mirrored(path, file, *bytes, disk, offset, &data))
                }
                None => (
                    seq,
                    Err(DiskError::NotReceiving {
                        frame: "disk-write",
                        disk,
                    }),
                ),
            },
            Ok(Some(f)) => (0, Err(DiskError::Unexpected(f.name()))),
            // The source closed it (or the link broke: the migration's link hears of it).
            Err(_) => return,
        };
        let sent = match r {
            Ok(()) => link.send(&Frame::Disk(DiskFrame::Ack { seq })),
            Err(e) => {
                tracing::warn!("migration: the disk mirror's connection: {e}");
                let _ = link.send(&Frame::Error(e.to_string()));
                let _ = link.flush(Duration::from_secs(1));
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A disk being received.
struct InDisk {
    path: String,
    file: File,
    bytes: u64,
    /// The generation the image holds once received (stamped at the hand-over, taken into
    /// the tracking when the arriving VM opens it).
    generation: u128,
    dec: Decoder,
}

impl InDisk {
    fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> DiskError + '_ {
        move |err| DiskError::Io {
            path: self.path.clone(),
            what,
            err,
        }
    }
}

/// The destination's side: its own disks (`--disk` with `--incoming`), in order.
pub(crate) struct DiskReceiver {
    local: Vec<BlockConfig>,
    disks: Vec<Option<InDisk>>,
    offered: Vec<bool>,
}

impl DiskReceiver {
    /// A receiver for this host's disks (none: shared storage, every offer is declined).
    pub(crate) fn new(local: Vec<BlockConfig>) -> Self {
        DiskReceiver {
            local,
            disks: (0..MAX_DISKS).map(|_| None).collect(),
            offered: vec![false; MAX_DISKS],
        }
    }

    /// Serves one disk frame from the source.
    pub(crate) fn handle(&mut self, f: DiskFrame, link: &mut Link) -> Result<(), DiskError> {
        match f {
            DiskFrame::Offer {
                disk,
                bytes,
                block,
                base,
                generation,
            } => self.offer(disk, bytes, (block, base, generation), link),
            DiskFrame::Blocks {
                disk,
                first,
                span,
                codec,
                present,
                zero,
                data,
            } => {
                let d = self.receiving(disk, "disk-blocks")?;
                let units = d.bytes.div_ceil(PAGE as u64);
                if first.checked_add(span as u64).is_none_or(|end| end > units) {
                    return Err(DiskError::PastEnd {
                        frame: "disk-blocks",
                        disk,
                        what: format!("units {first}+{span}"),
                        bytes: d.bytes,
                    });
                }
                let cnet = match wire::PageCodec::from_tag(codec) {
                    Ok(wire::PageCodec::Cnet) => true,
                    Ok(wire::PageCodec::Raw) => false,
                    // Disk units go raw or `cnet` (the stride codec is for guest memory).
                    Ok(c @ wire::PageCodec::Stride) => {
                        return Err(DiskError::Link(LinkError::Wire(wire::bad(format!(
                            "disk-blocks frame in the {} page codec",
                            c.name()
                        )))))
                    }
                    Err(e) => return Err(DiskError::Link(LinkError::Wire(e))),
                };
                let mut rest = &data[..];
                let mut unit = vec![0u8; PAGE];
                for i in (0..span as u64).filter(|&i| bit(&present, i)) {
                    let u = first + i;
                    if bit(&zero, i) {
                        unit.fill(0);
                    } else if cnet {
                        let file = &d.file;
                        let mut current = |out: &mut [u8]| -> Result<(), super::cnet::NoBase> {
                            // The unit as this destination holds it (the base file, or what
                            // the source sent before).
                            out.fill(0);
                            let have = d.bytes.saturating_sub(u * PAGE as u64).min(PAGE as u64);
                            Ok(file.read_exact_at(&mut out[..have as usize], u * PAGE as u64)?)
                        };
                        d.dec
                            .decode_page(u, &mut rest, &mut current, &mut unit)
                            .map_err(|err| DiskError::Cnet { disk, err })?;
                    } else {
                        if rest.len() < PAGE {
                            return Err(DiskError::Link(LinkError::Wire(wire::bad(
                                "disk-blocks frame is truncated",
                            ))));
                        }
                        unit.copy_from_slice(&rest[..PAGE]);
                        rest = &rest[PAGE..];
                    }
                    // Never past the source's size (the last unit may be short).
                    let have = d.bytes - u * PAGE as u64;
                    let n = have.min(PAGE as u64) as usize;
                    d.file
                        .write_all_at(&unit[..n], u * PAGE as u64)
                        .map_err(d.io("writing"))?;
                }
                if !rest.is_empty() {
                    return Err(DiskError::Stray(disk));
                }
                Ok(())
            }
            DiskFrame::Write {
                seq,
                disk,
                offset,
                data,
            } => {
                let d = self.receiving(disk, "disk-write")?;
                write_mirrored(&d.path, &d.file, d.bytes, disk, offset, &data)?;
                link.send(&Frame::Disk(DiskFrame::Ack { seq }))?;
                Ok(())
            }
            f @ (DiskFrame::Hashes { .. } | DiskFrame::Ack { .. }) => {
                Err(DiskError::Unexpected(f.name()))
            }
        }
    }

    fn receiving(&mut self, disk: u8, frame: &'static str) -> Result<&mut InDisk, DiskError> {
        self.disks
            .get_mut(disk as usize)
            .and_then(|d| d.as_mut())
            .ok_or(DiskError::NotReceiving { frame, disk })
    }

    /// `(block, base, generation)`: the offer's block size and generations.
    fn offer(
        &mut self,
        disk: u8,
        bytes: u64,
        (block, base, generation): (u32, u128, u128),
        link: &mut Link,
    ) -> Result<(), DiskError> {
        let i = disk as usize;
        if i >= MAX_DISKS || self.offered[i] {
            return Err(DiskError::Offer(disk));
        }
        self.offered[i] = true;
        let Some(cfg) = self.local.get(i) else {
            // Not given a disk of its own: shared storage.
            link.send(&Frame::Disk(DiskFrame::Hashes {
                disk,
                receiving: false,
                holds_base: false,
                first: 0,
                hashes: Vec::new(),
            }))?;
            return Ok(());
        };
        let refused = |why: String| DiskError::Refused { disk, why };
        if block as u64 != TRACK_BLOCK {
            return Err(refused(format!(
                "blocks of {block} bytes (this destination tracks {TRACK_BLOCK})"
            )));
        }
        if bytes == 0 || !bytes.is_multiple_of(SECTOR) || bytes > MAX_DISK_BYTES {
            return Err(refused(format!("a disk of {bytes} bytes")));
        }
        if cfg.readonly {
            return Err(refused(format!(
                "this destination's disk {} is read-only: it cannot receive",
                cfg.path.display()
            )));
        }
        let path = cfg.path.display().to_string();
        let io = |what: &'static str| {
            let path = path.clone();
            move |err: std::io::Error| DiskError::Io { path, what, err }
        };
        // Whether this image still holds the source's base, read before anything writes it;
        // its stamp goes now (this image is written from here on).
        let holds_base = base != 0 && read_stamp(&cfg.path) == Some(base);
        remove_stamp(&cfg.path).map_err(io("removing the base stamp of"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg.path)
            .map_err(io("opening"))?;
        let len = file.metadata().map_err(io("sizing"))?.len();
        if len > bytes {
            return Err(refused(format!(
                "this destination's disk {path} holds {len} bytes, more than the source's \
                 {bytes}: the guest would see another capacity"
            )));
        }
        if len < bytes {
            // An empty (or shorter) base: the rest reads as zeros.
            file.set_len(bytes).map_err(io("extending"))?;
        }
        let held = InDisk {
            path: path.clone(),
            file,
            bytes,
            generation,
            dec: Decoder::default(),
        };
        if holds_base && len == bytes {
            link.send(&Frame::Disk(DiskFrame::Hashes {
                disk,
                receiving: true,
                holds_base: true,
                first: 0,
                hashes: Vec::new(),
            }))?;
            self.disks[i] = Some(held);
            return Ok(());
        }
        let file = &held.file;
        // The base copy's hashes: the source sends only the blocks that differ.
        let blocks = bytes.div_ceil(TRACK_BLOCK);
        let mut buf = Vec::new();
        let mut hashes = Vec::with_capacity(HASHES_PER_FRAME);
        let mut first = 0;
        for b0 in (0..blocks).step_by(RUN_BLOCKS as usize) {
            let n = RUN_BLOCKS.min(blocks - b0);
            read_blocks(file, bytes, b0, n, &mut buf).map_err(io("reading"))?;
            for k in 0..n {
                let end = (bytes - (b0 + k) * TRACK_BLOCK).min(TRACK_BLOCK) as usize;
                let at = (k * TRACK_BLOCK) as usize;
                hashes.push(block_hash(&buf[at..at + end]));
            }
            if hashes.len() >= HASHES_PER_FRAME || b0 + n == blocks {
                let chunk = std::mem::take(&mut hashes);
                let len = chunk.len() as u64;
                link.send(&Frame::Disk(DiskFrame::Hashes {
                    disk,
                    receiving: true,
                    holds_base: false,
                    first,
                    hashes: chunk,
                }))?;
                first += len;
            }
        }
        self.disks[i] = Some(held);
        Ok(())
    }

    /// Whether a disk is being received (the source may then open the mirror's connection).
    pub(crate) fn receiving_any(&self) -> bool {
        self.disks.iter().any(Option::is_some)
    }

    /// The disks being received, for the mirror's connection (each file opened again).
    pub(crate) fn mirror_targets(&self) -> Result<MirrorTargets, DiskError> {
        let mut t = Vec::new();
        for d in &self.disks {
            t.push(match d {
                Some(d) => Some((
                    d.path.clone(),
                    d.file.try_clone().map_err(d.io("opening"))?,
                    d.bytes,
                )),
                None => None,
            });
        }
        Ok(MirrorTargets(t))
    }

    /// Before `ready`: every received disk's writes are on stable storage, and its image is
    /// stamped with the generation it now shares with the source's.
    pub(crate) fn finish(&mut self) -> Result<(), DiskError> {
        for d in self.disks.iter().flatten() {
            d.file.sync_data().map_err(d.io("syncing"))?;
            // A stamp that cannot be written costs only that (the next migration hashes).
            if let Err(e) = write_stamp(Path::new(&d.path), d.generation) {
                tracing::warn!("migration: disk {}: no base stamp: {e}", d.path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: DiskFrame) {
        let mut b = Vec::new();
        wire::encode(&Frame::Disk(f), &mut b);
        let (len, ty) = wire::header(b[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, b.len() - HEADER_LEN);
        let back = wire::decode(ty, &b[HEADER_LEN..]).unwrap();
        for cut in 0..len {
            assert!(
                wire::decode(ty, &b[HEADER_LEN..HEADER_LEN + cut]).is_err()
                    || matches!(back, Frame::Disk(DiskFrame::Write { .. })),
                "{} cut at {cut}",
                back.name()
            );
        }
        let mut long = b[HEADER_LEN..].to_vec();
        long.push(0);
        if !matches!(back, Frame::Disk(DiskFrame::Write { .. })) {
            assert!(wire::decode(ty, &long).is_err(), "{}", back.name());
        }
        let Frame::Disk(_) = back else {
            panic!("not a disk frame")
        };
    }

    #[test]
    fn disk_frames_round_trip_and_damage_is_refused() {
        round_trip(DiskFrame::Offer {
            disk: 1,
            bytes: 64 << 20,
            block: TRACK_BLOCK as u32,
            base: 0,
            generation: u128::MAX - 1,
        });
        round_trip(DiskFrame::Hashes {
            disk: 0,
            receiving: true,
            holds_base: false,
            first: 3,
            hashes: vec![1, u128::MAX],
        });
        round_trip(DiskFrame::Hashes {
            disk: 0,
            receiving: true,
            holds_base: true,
            first: 0,
            hashes: Vec::new(),
        });
        round_trip(DiskFrame::Blocks {
            disk: 0,
            first: 16,
            span: 16,
            codec: wire::CODEC_RAW,
            present: vec![0b11],
            zero: vec![0b10],
            data: vec![7; PAGE],
        });
        round_trip(DiskFrame::Write {
            seq: 9,
            disk: 0,
            offset: 4096,
            data: vec![1; 1024],
        });
        round_trip(DiskFrame::Ack { seq: 9 });
        let mut b = Vec::new();
        wire::encode(
            &Frame::Disk(DiskFrame::Write {
                seq: 1,
                disk: 0,
                offset: 100,
                data: vec![1; 512],
            }),
            &mut b,
        );
        let e = wire::decode(T_DISK_WRITE, &b[HEADER_LEN..]).unwrap_err();
        assert!(e.0.contains("whole sectors"), "{e}");
        assert!(
            wire::decode(T_DISK_HASHES, &[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .unwrap_err()
                .0
                .contains("receiving flag")
        );
        let mut held = vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        held.extend_from_slice(&[0; 16]);
        assert!(wire::decode(T_DISK_HASHES, &held)
            .unwrap_err()
            .0
            .contains("holding the base carries hashes"));
    }

    #[test]
    fn a_write_waits_for_its_ack_and_a_stopped_mirror_answers_at_once() {
        let q = Arc::new(Mirror::default());
        lock(&q.st).open = true;
        let m = DiskMirror {
            q: q.clone(),
            disk: 0,
        };
        let sender = {
            let q = q.clone();
            std::thread::spawn(move || loop {
                let taken = q.take();
                if let Some(p) = taken.first() {
                    assert_eq!((p.offset, p.data.len()), (512, 1024));
                    q.acked(p.seq);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        };
        assert!(m.mirror(512, &[3; 1024]));
        sender.join().unwrap();
        assert_eq!(lock(&q.st).acked, 1);
        q.stop_taking();
        assert!(!m.mirror(0, &[1; 512]), "stopped: not delivered");
        q.acked(77);
        assert_eq!(lock(&q.st).acked, 1, "an unknown ack is ignored");
    }
}
