//! The source side of a migration: a host thread that owns the connection and moves pages,
//! fed by the migration service (the plugin), which only queues work and reads progress.
//!
//! Work, most urgent first: pages the destination faulted on (post-copy), ranges the plugin
//! marked urgent (pre-paging), then the pending bitmap in address order. A switch-over the
//! plugin requested runs on this thread once it is reached: pause, final dirty pages, vCPU and
//! device state, and either wait for the destination to run the guest (stop-and-copy) or push
//! every page the destination still lacks, each exactly once (post-copy).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base_vmm::memory::GuestRam;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use super::cnet::{Encoder, Encoding, EncodingStats};
use super::disk::{DiskFrame, DiskReport, DiskSender};
use super::hold::{Hold, HoldReport, HoldSpec};
use super::intermediary::PageStore;
use super::link::{Link, LinkError};
use super::scatter::{Scatter, ScatterReport, ScatterRequest};
use super::wire::Store;
use super::wire::{Frame, Handover, PageCodec, BATCH_PAGES, PAGE, VERSION};
use super::{bit, clear_bit, count, set_bit, Phase, Progress, SwitchMode};
use crate::ctx::lock;
use crate::error::HostError;
use crate::handover::{self, NotReady};

/// Most pages per batch during post-copy (256 KiB); fewer on a slow link (see
/// [`Sender::postcopy_queue`]).
const POSTCOPY_BATCH: u64 = 64;

/// Post-copy: how long the bytes queued at the source ahead of a faulted page may take to
/// leave (the send queue is sized to the measured rate for this): the link stays busy, and a
/// fault overtakes everything but this much.
const POSTCOPY_QUEUE: Duration = Duration::from_millis(2);
/// The post-copy send queue's bounds, bytes.
const POSTCOPY_QUEUE_MIN: u64 = 32 << 10;
const POSTCOPY_QUEUE_MAX: u64 = 1 << 20;
/// The post-copy window's least size, bytes (see [`Sender::window_full`]).
const POSTCOPY_WINDOW_MIN: u64 = 256 << 10;
/// Post-copy: pushed bytes waiting this long on the path beyond its idle round trip, in
/// every one of the last [`QUEUE_SYNCS`] `sync` answers, are a queue to keep short
/// (see [`Sender::paced`]): twice what the paced push lets wait.
const QUEUE_DELAY: Duration = Duration::from_millis(4);
const QUEUE_SYNCS: usize = 4;
/// Post-copy: the path's delivery rate is measured over at least this long (a shaped link
/// lets a 10 ms burst through at the hosts' speed).
const DELIVERY_SPAN: Duration = Duration::from_millis(20);
/// Post-copy paced for a queue (not for a long round trip): a `sync` unanswered this long
/// past the round trip means a reader the CPU starves, not a path the window keeps short;
/// waiting for it would only idle the link (a loaded host's push took 25 s instead of 2).
const READER_STALLED: Duration = Duration::from_millis(10);

/// Pre-copy on a long link (see [`Sender::past_bottleneck`]): a round's progress marks (`sync`s)
/// go once the stream moved this long of the path's rate on, or [`PROGRESS_MARK_MIN`] bytes,
/// and the path's delivery rate is measured over at least [`OVERLAP_SPAN`] (a shaped link's
/// 10 ms burst after an idle spell is a tenth of it).
const PROGRESS_MARK: Duration = Duration::from_millis(2);
const PROGRESS_MARK_MIN: u64 = 16 << 10;
const OVERLAP_SPAN: Duration = Duration::from_millis(100);
/// The send rate the service is shown is capped by the path's delivery rate over spans of at
/// least this: steadier than the rounds' [`OVERLAP_SPAN`], whose fastest rides the shaper's
/// burst and the answers' jitter (a 100 Mbit/s link measured 13.6 MB/s).
const STEADY_SPAN: Duration = Duration::from_millis(500);
/// Pre-copy batches there, pages: a mark follows a batch, so a round's end is seen within
/// one (128 KiB at most: half of a 100 Mbit/s, 20 ms path's bytes in flight).
const OVERLAP_BATCH: u64 = 32;
/// Unanswered progress marks at most (a round's first megabytes fill the sockets' buffers).
const PROGRESS_MARKS_MAX: usize = 256;

/// The destination answers a `sync` once it has read what came before it: within this long,
/// or it reads no more.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A held migration's dirty rounds come at most this often.
const HELD_ROUND: Duration = Duration::from_millis(20);

/// A held migration with nothing to send sends a `sync` this often (the destination's idle
/// timeout is a minute).
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A round trip at least this long makes [`CommitMode::Auto`] send `commit` with the state:
/// there the two-phase hand-over's second round trip is a large part of the downtime (at 20 ms
/// it is nine tenths of it), while on a LAN or loopback it saves next to nothing and the
/// narrower in-doubt window costs nothing.
pub const AUTO_COMMIT_RTT: Duration = Duration::from_millis(1);

/// When the source sends the hand-over's `commit` (docs/migration-wire.md, "The hand-over").
/// Either way the destination runs the guest only once `commit` says the source has stopped
/// it for good; what changes is what a link lost before `ready` leaves: with the state, the
/// source paused in doubt; after `ready`, the source running again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommitMode {
    /// With the state when the link's round trip (the least of `hello`'s and the pre-pause
    /// `sync`'s) is at least [`AUTO_COMMIT_RTT`], after `ready` otherwise; after `ready`
    /// always for a held migration (its second gate is between the two).
    #[default]
    Auto,
    /// After the destination's `ready`: two round trips in the downtime.
    AfterReady,
    /// Right behind the state: one round trip in the downtime.
    WithState,
}

impl CommitMode {
    /// The name `ctl migrate --commit` takes and reports carry.
    pub fn name(self) -> &'static str {
        match self {
            CommitMode::Auto => "auto",
            CommitMode::AfterReady => "after-ready",
            CommitMode::WithState => "with-state",
        }
    }
}

impl std::str::FromStr for CommitMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            CommitMode::Auto,
            CommitMode::AfterReady,
            CommitMode::WithState,
        ]
        .into_iter()
        .find(|c| c.name() == s)
        .ok_or_else(|| format!("unknown commit mode {s:?}: auto, after-ready or with-state"))
    }
}

/// What the engine needs from the VMM beyond guest RAM.
pub trait SourceVm: Send + Sync {
    /// Guest RAM.
    fn ram(&self) -> &Arc<GuestRam>;
    /// Stops every vCPU. True: they ran; false: the guest was paused already (by its
    /// operator), so it stays paused at the destination and after a failed migration.
    fn pause(&self) -> Result<bool, HostError>;
    /// Lets the vCPUs run again (a failed migration that paused a running guest).
    fn resume(&self) -> Result<(), HostError>;
    /// Whether the vCPUs run now.
    fn running(&self) -> bool;
    /// The VM's state (vCPUs paused), in the state-file format.
    fn capture_state(&self) -> Result<Vec<u8>, HostError>;
    /// [`Self::pause`] and [`Self::capture_state`] at once (one round trip to the vCPU
    /// threads where the VMM can, instead of two: milliseconds of a busy host's downtime).
    /// On an error the guest may be paused: see [`Self::running`].
    fn pause_and_capture(&self) -> Result<(bool, Vec<u8>), HostError> {
        let ran = self.pause()?;
        Ok((ran, self.capture_state()?))
    }
    /// The machine's shape (JSON of `base_vmm::state::MachineConfig`).
    fn machine(&self) -> Vec<u8>;
    /// The disks' write tracking: the disks move with the VM when the destination receives
    /// them (see `disk.rs`).
    fn disks(&self) -> Vec<Arc<base_vmm::devices::virtio::disk_track::DiskTrack>> {
        Vec::new()
    }
    /// Slows the running guest: each vCPU sleeps `percent` of the time (runs of 10 ms
    /// between sleeps `percent / (100 - percent)` times as long; 0: lifted).
    fn set_throttle(&self, _percent: u8) -> Result<(), HostError> {
        Err(HostError::NotAvailable("throttling the vCPUs"))
    }
    /// Milliseconds the vCPUs have slept for a throttle so far (all vCPUs together).
    fn throttled_ms(&self) -> f64 {
        0.0
    }
}

/// How to reach the destination.
#[derive(Clone)]
pub struct SourceConfig {
    /// Destination address.
    pub to: SocketAddr,
    /// TLS client configuration (see [`super::tls::client_config`]).
    pub tls: Arc<ClientConfig>,
    /// Send at most this many bytes per second (None: as fast as the link goes).
    pub max_bandwidth: Option<u64>,
    /// How long a broken post-copy connection is retried before giving up.
    pub recovery_timeout: Duration,
    /// When `commit` goes: right behind the state (one round trip less of downtime, but a
    /// link lost before the destination answers leaves the source paused "in doubt" where it
    /// would otherwise resume), after `ready`, or chosen by the link's round trip.
    pub commit: CommitMode,
    /// Hold at the switch-over point until released (synchronized arrival, see `hold.rs`).
    pub hold: Option<HoldSpec>,
    /// Pre-copy pages whose 64-bit words form an arithmetic progression (constant fills
    /// included) go as their first word and step: the `stride` page codec (wire.rs). Off by
    /// default: a destination older than the codec refuses it, before the hand-over.
    pub stride_pages: bool,
    /// Agile migration: the VM's pages parked at intermediaries. An evicted page goes as its
    /// `located` record (after one `store` record naming the intermediaries and the key),
    /// never read here: reading it would bring it back.
    pub parked: Option<Arc<super::agile::Parked>>,
    /// Called (on the sender thread) when the service has news to act on at once: a
    /// post-copy fault, whose neighbourhood it pre-pages. The VMM ticks the service then
    /// instead of at its next period (up to 5 ms later, as long as several faults take on
    /// a LAN). None: the service sees the news at its next tick.
    pub news: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// One point of the timeline (for the report's plot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// ms since the start.
    pub t_ms: u64,
    /// Pages sent so far.
    pub sent: u64,
    /// Pages the guest dirtied so far (as harvested by the service).
    pub dirtied: u64,
    /// Remote faults so far.
    pub faults: u64,
}

/// The end-of-migration report.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    /// `completed`, `failed`, or `in-doubt` (the hand-over was committed but the destination's
    /// confirmation never came: the source stays paused, see [`MigrationSource::in_doubt`]).
    pub result: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `stop-and-copy` or `postcopy` (the switch-over that ran), or `none`.
    pub handover: String,
    /// The guest at the source once the migration ended: `moved` (it lives at the
    /// destination), `running` or `paused` (a failure; paused: in doubt, a failed post-copy,
    /// or paused by its operator before).
    #[serde(default)]
    pub source_vm: String,
    /// From the request to the end, ms.
    pub total_ms: f64,
    /// Connect, TLS handshake and hello, ms.
    pub setup_ms: f64,
    /// The TLS 1.3 cipher suite of the link (`aes-128-gcm`, `aes-256-gcm`,
    /// `chacha20-poly1305`).
    #[serde(default)]
    pub cipher: String,
    /// Source pause to the destination's `resumed`, ms (the guest did not run meanwhile).
    pub downtime_ms: f64,
    /// Wall clock of the switch-over's pause, µs since the epoch (0: none): a group's
    /// members compare theirs (see `hold.rs`).
    #[serde(default)]
    pub switch_unix_us: u64,
    /// Destination's share of it: state received to vCPUs running, ms.
    pub dest_load_ms: f64,
    /// Round trips the paused source waited for (a reply to a frame sent after the previous
    /// reply): 2 for the two-phase hand-over, 1 with the commit sent along with the state.
    #[serde(default)]
    pub switch_round_trips: u32,
    /// When `commit` went: `with-state` or `after-ready` (empty: no hand-over).
    #[serde(default)]
    pub commit: String,
    /// The link's round trip as the source measured it (the least of `hello`'s and the
    /// pre-copy `sync`s'), ms: what [`CommitMode::Auto`] decides on.
    #[serde(default)]
    pub rtt_ms: f64,
    /// Post-copy: switch-over to the source holding no page the destination lacks, ms.
    pub eviction_ms: f64,
    /// Bytes on the wire (TLS records), by link (one link per connection).
    pub bytes_per_link: Vec<u64>,
    /// Bytes on the wire in all.
    pub bytes: u64,
    /// Pages sent (data and zero markers).
    pub pages_sent: u64,
    /// Of which zero pages (markers, no data).
    pub zero_pages: u64,
    /// Of which pages sent as arithmetic progressions (16 bytes each; `stride_pages`).
    #[serde(default)]
    pub stride_pages: u64,
    /// Guest RAM pages.
    pub pages_total: u64,
    /// Pre-copy rounds the service ran.
    pub rounds: u32,
    /// Pages the service queued in each round.
    pub pages_per_round: Vec<u64>,
    /// Pre-copy on a long link: rounds (and the pre-pause wait) that ended when their pages
    /// had left the path's bottleneck, before they arrived (see `Sender::past_bottleneck`).
    #[serde(default)]
    pub overlapped_round_trips: u32,
    /// The time that saved in all, ms: from each such end to its `sync`'s answer.
    #[serde(default)]
    pub overlap_saved_ms: f64,
    /// The highest send rate the service was shown (its status' `rate-bytes-per-sec`, over
    /// 200 ms windows), bytes/s: no more than the path delivers, once measured.
    #[serde(default)]
    pub rate_peak_bytes_per_sec: u64,
    /// Pre-copy: pages sent in each round (the stop-and-copy last, also the pages queued at
    /// the switch-over), and of those the pages never sent again: CloudNet's "final" data
    /// (the rest was re-sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent_per_round: Vec<u64>,
    /// Of `sent_per_round`, the pages never sent again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_per_round: Vec<u64>,
    /// Pre-copy: pages the service's harvests found dirty while they were still queued,
    /// left out of what the harvest returned (see [`MigrationSource::unqueued`]): each went
    /// once, with what the guest wrote, rather than again in the next round.
    #[serde(default)]
    pub dirtied_while_queued: u64,
    /// Pages the destination faulted on and requested.
    pub remote_faults: u64,
    /// Their mean latency at the destination, µs.
    pub fault_latency_mean_us: u64,
    /// Their worst latency, µs.
    pub fault_latency_max_us: u64,
    /// Their 99th percentile, µs.
    #[serde(default)]
    pub fault_latency_p99_us: u64,
    /// Pages sent more than once during post-copy (0: each page once).
    pub postcopy_resent: u64,
    /// Post-copy: the pages named in the `stale` frame before the pause (queued or dirtied,
    /// not sent since): the destination dropped its copies of them while the guest still ran
    /// here.
    #[serde(default)]
    pub stale_pages: u64,
    /// Post-copy: the pages the final harvest (the guest paused) found dirty that were not
    /// named stale before: the most the destination drops inside the pause.
    #[serde(default)]
    pub final_harvest_pages: u64,
    /// Post-copy: pages sent right behind the commit because the vCPUs' registers point at
    /// them (instruction, stack, descriptor tables, pointers, and the page tables on the way).
    #[serde(default)]
    pub first_touch_pages: u64,
    /// Post-copy: the largest cap on the bytes the socket holds unsent (see
    /// `Sender::postcopy_queue`; 0: none, as with Scatter-Gather).
    #[serde(default)]
    pub postcopy_queue_cap_bytes: u64,
    /// Post-copy: the largest window of pushed bytes the destination had not read yet (see
    /// `Sender::window_full`).
    #[serde(default)]
    pub postcopy_window_bytes: u64,
    /// Post-copy: why the push was paced (the send cap and the window, see
    /// `Sender::paced`): `rtt` (a round trip of 1 ms or more), `queue` (a queue seen on the
    /// path: `sync`s answered 4 ms or more late); empty: not paced.
    #[serde(default)]
    pub postcopy_paced: String,
    /// Post-copy: the most the pushed bytes waited on the path beyond its idle round trip,
    /// µs (the least of [`QUEUE_SYNCS`] consecutive `sync` answers, the largest such).
    #[serde(default)]
    pub postcopy_queue_delay_us: u64,
    /// Post-copy: the fastest delivery rate the `sync` answers showed, bytes/s.
    #[serde(default)]
    pub postcopy_delivery_bps: u64,
    /// Post-copy: the most bytes the socket held unsent when a faulted page was handed to
    /// it, i.e. what the page queued behind at the source (the send queue's own order puts
    /// faults first).
    #[serde(default)]
    pub fault_queued_max_bytes: u64,
    /// Post-copy reconnections.
    pub recoveries: u32,
    /// The highest vCPU throttle the service asked for, percent (0: never throttled).
    #[serde(default)]
    pub vcpu_throttle_max: u8,
    /// Milliseconds the vCPUs slept for that throttle (all vCPUs together).
    #[serde(default)]
    pub vcpu_throttled_ms: f64,
    /// Timeline, one sample per 50 ms.
    pub timeline: Vec<Sample>,
    /// What the CloudNet encodings did (redundancy cache, deltas), when the service chose them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<EncodingStats>,
    /// What the disk migration did, when disks moved with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskReport>,
    /// What the hold did, when the migration was held for a synchronized arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldReport>,
    /// Scatter-Gather: pages on the link and to the intermediaries, bytes, dedup hits
    /// (`eviction_ms` is then the switch-over to the destination's `complete`: every page
    /// there or at an intermediary, the source free to go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scatter: Option<ScatterReport>,
    /// Agile: the parked pages sent as their locations, when the VM had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agile: Option<ParkedSendReport>,
}

/// Agile migration's share of a migration, at the source: evicted pages go as references.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ParkedSendReport {
    /// Pages evicted (parked at the intermediaries) when the migration started.
    pub evicted_at_start: u64,
    /// Evicted pages sent as their location (32 bytes each, no data).
    pub located_pages: u64,
    /// `located` frames for them.
    pub located_frames: u64,
    /// Bytes of those frames on the link (before TLS).
    pub located_bytes: u64,
    /// Located pages the destination asked for again (it could not read them at the
    /// intermediaries), sent as data.
    pub resent_direct: u64,
}

/// What the plugin and the sender thread share.
struct State {
    phase: Phase,
    error: Option<String>,
    /// Pages to send (pre-copy: queued by the service; post-copy: what the destination lacks
    /// and has not been sent yet).
    pending: Vec<u64>,
    pending_count: u64,
    /// Pre-copy: pages the destination has confirmed reading (the pages sent before the last
    /// `sync` it answered) or that have left the path's bottleneck (see
    /// `Sender::past_bottleneck`); the rest of those sent wait on the path.
    pages_delivered: u64,
    cursor: u64,
    urgent: VecDeque<(u64, u64)>,
    faults: VecDeque<u64>,
    /// Faults for the service to read (pre-paging decisions).
    fault_events: Vec<u64>,
    switch: Option<(SwitchMode, Option<Harvest>)>,
    /// Pages sent at least once (pre-copy).
    sent_ever: Vec<u64>,
    /// Post-copy: pages the destination still lacks.
    needed: Vec<u64>,
    postcopy_sent: Vec<u64>,
    report: Report,
    /// The source committed the hand-over and lost the link before the destination confirmed.
    in_doubt: bool,
    /// Encodings the service asked for, not yet taken up by the sender.
    encoding: Option<Encoding>,
    /// The service chose encodings (once, before the first page).
    encoding_set: bool,
    dirtied: u64,
    rate_bps: u64,
    page_rate: u64,
    /// Scatter-Gather asked for by the service, not yet taken up by the sender.
    scatter: Option<ScatterRequest>,
    /// Scatter-Gather was asked for (once, before the switch-over).
    scatter_set: bool,
    /// A vCPU throttle asked for by the service, not yet applied by the sender.
    vcpu_throttle: Option<u8>,
}

/// A migration in progress, seen from the source.
pub struct MigrationSource {
    st: Mutex<State>,
    vm: Arc<dyn SourceVm>,
    pages: u64,
    started: Instant,
    cancel: AtomicBool,
    /// The switch-over paused the guest and the migration has not ended: it must not run here
    /// (see [`MigrationSource::holds_guest`]).
    held: AtomicBool,
    /// Synchronized arrival's gates, when asked for.
    hold: Option<Hold>,
}

/// Why a migration could not start, a request of the migration service was refused, or the
/// migration failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The connection failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// No thread for the sender.
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
    /// A bitmap longer than guest memory.
    #[error("bitmap of {got} words is longer than guest memory ({words} words)")]
    Bitmap {
        /// Words given.
        got: usize,
        /// Words of guest memory.
        words: usize,
    },
    /// A range past guest memory.
    #[error("pages {first}+{n} run past guest memory ({pages} pages)")]
    PastEnd {
        /// First page.
        first: u64,
        /// Pages.
        n: u64,
        /// Guest pages.
        pages: u64,
    },
    /// Pages queued after the migration ended.
    #[error("the migration is {0:?}: nothing more can be queued")]
    Ended(Phase),
    /// Encoding options refused.
    #[error(transparent)]
    Encoding(#[from] super::cnet::CnetError),
    /// Scatter-Gather chosen twice or after the switch-over was asked for.
    #[error("set-scatter: Scatter-Gather is chosen once, before the switch-over")]
    ScatterLate,
    /// A throttle asked for after the switch-over was.
    #[error(
        "throttle-vcpus: the guest is throttled during pre-copy only (the migration is {0:?})"
    )]
    ThrottleLate(Phase),
    /// Encodings chosen twice or after pages went out.
    #[error("set-encoding: the encodings are chosen once, before the first page is sent")]
    EncodingLate,
    /// A second or late switch-over.
    #[error("switch-over requested twice or too late (the migration is {0:?})")]
    SwitchLate(Phase),
    /// The migration was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A held migration was not released in time, or cancelled at its commit gate.
    #[error("hold: {0}")]
    Hold(String),
    /// Post-copy's destination did not come back.
    #[error("post-copy: the destination is unreachable since {cause} and did not come back within {timeout:?}; the guest may run there, so its CPU state here may be stale: the source stays paused with every page of memory")]
    Unreachable {
        /// What broke the link.
        cause: LinkError,
        /// The recovery timeout.
        timeout: Duration,
    },
}

impl MigrationSource {
    /// Connects to the destination (TLS, hello) and starts the sender thread. Nothing is sent
    /// until the service queues pages.
    pub fn start(vm: Arc<dyn SourceVm>, cfg: SourceConfig) -> Result<Arc<Self>, SourceError> {
        let started = Instant::now();
        let ram = vm.ram().clone();
        let pages = ram.size() / PAGE as u64;
        let session = started.elapsed().as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
        let (mut link, rtt) = hello_timed(&cfg, ram.size(), session, false)?;
        super::trace(format_args!(
            "source: connected (TCP, TLS, hello, records taken over) in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ));
        link.send(&Frame::Machine(vm.machine()))?;
        let words = pages.div_ceil(64) as usize;
        let parked_now = cfg
            .parked
            .as_ref()
            .map(|_| ram.evicted_pages())
            .filter(|&n| n > 0);
        let src = Arc::new(MigrationSource {
            st: Mutex::new(State {
                phase: Phase::Precopy,
                error: None,
                pending: vec![0; words],
                pending_count: 0,
                pages_delivered: 0,
                cursor: 0,
                urgent: VecDeque::new(),
                faults: VecDeque::new(),
                fault_events: Vec::new(),
                switch: None,
                sent_ever: vec![0; words],
                needed: Vec::new(),
                postcopy_sent: Vec::new(),
                report: Report {
                    setup_ms: started.elapsed().as_secs_f64() * 1e3,
                    cipher: link.cipher().map(|c| c.name()).unwrap_or_default().into(),
                    pages_total: pages,
                    handover: "none".into(),
                    agile: parked_now.map(|n| ParkedSendReport {
                        evicted_at_start: n,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                in_doubt: false,
                encoding: None,
                encoding_set: false,
                dirtied: 0,
                rate_bps: 0,
                page_rate: 0,
                scatter: None,
                scatter_set: false,
                vcpu_throttle: None,
            }),
            vm,
            pages,
            started,
            cancel: AtomicBool::new(false),
            held: AtomicBool::new(false),
            hold: cfg.hold.map(Hold::new),
        });
        let s = src.clone();
        std::thread::Builder::new()
            .name("migrate-send".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                let mut sender = Sender {
                    src: &s,
                    cfg,
                    session,
                    ram,
                    link,
                    buf: Vec::with_capacity(3 << 20),
                    paused: false,
                    stopped_running: false,
                    committed: false,
                    confirmed: false,
                    rtt,
                    queue_cap: 0,
                    pc_syncs: VecDeque::new(),
                    pc_acked: 0,
                    pc_last_sync: Instant::now(),
                    pc_rate: 0,
                    pc_queued: false,
                    pc_delays: VecDeque::new(),
                    pc_delivery: DeliveryRate::new(DELIVERY_SPAN),
                    known_data: vec![0; pages.div_ceil(64) as usize],
                    encoder: None,
                    encoded: Vec::with_capacity(3 << 20),
                    last_sample: Instant::now() - Duration::from_secs(1),
                    rate_mark: (Instant::now(), 0, 0),
                    throttle: (Instant::now(), 0),
                    vcpu_throttled_base: None,
                    eviction_start: None,
                    disk: None,
                    last_round: Vec::new(),
                    held_harvest: Instant::now(),
                    keepalive: Instant::now(),
                    hold_failure: None,
                    caught_up: false,
                    delivery_syncs: VecDeque::new(),
                    delivery: DeliveryRate::new(OVERLAP_SPAN),
                    delivery_steady: DeliveryRate::new(STEADY_SPAN),
                    answered_at: None,
                    burst: (Instant::now(), 0),
                    sending: false,
                    scatter: None,
                    scattered: vec![0; pages.div_ceil(64) as usize],
                    t_read: Duration::ZERO,
                    store_sent: false,
                    parked_sent: vec![0; pages.div_ceil(64) as usize],
                    direct_only: vec![0; pages.div_ceil(64) as usize],
                };
                let r = sender.run();
                sender.finish(r);
            })
            .map_err(SourceError::Thread)?;
        Ok(src)
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Queues the pages set in `bitmap` for sending; `round` counts them into that round.
    pub fn queue_bitmap(&self, bitmap: &[u64], round: u32) -> Result<u64, SourceError> {
        let mut st = lock(&self.st);
        self.check_queue(&st)?;
        let words = st.pending.len();
        if bitmap.len() > words {
            return Err(SourceError::Bitmap {
                got: bitmap.len(),
                words,
            });
        }
        let mut added = 0;
        for (i, w) in bitmap.iter().enumerate() {
            let new = w & !st.pending[i];
            added += new.count_ones() as u64;
            st.pending[i] |= w;
        }
        st.pending_count += added;
        count_round(&mut st.report, round, count(bitmap));
        Ok(added)
    }

    /// Queues pages `[first, first+count)`; `urgent` sends them before the pending bitmap.
    pub fn queue_range(
        &self,
        first: u64,
        n: u64,
        urgent: bool,
        round: u32,
    ) -> Result<(), SourceError> {
        let end =
            first
                .checked_add(n)
                .filter(|&e| e <= self.pages)
                .ok_or(SourceError::PastEnd {
                    first,
                    n,
                    pages: self.pages,
                })?;
        let mut st = lock(&self.st);
        self.check_queue(&st)?;
        if urgent {
            st.urgent.push_back((first, end));
            return Ok(());
        }
        for p in first..end {
            if !bit(&st.pending, p) {
                set_bit(&mut st.pending, p);
                st.pending_count += 1;
            }
        }
        count_round(&mut st.report, round, n);
        Ok(())
    }

    fn check_queue(&self, st: &State) -> Result<(), SourceError> {
        match st.phase {
            Phase::Precopy | Phase::Postcopy | Phase::Recovering => Ok(()),
            p => Err(SourceError::Ended(p)),
        }
    }

    /// Chooses the page encodings (CloudNet's redundancy cache and deltas) for this migration:
    /// once, before the first page goes out, as both ends' caches start empty together.
    pub fn set_encoding(&self, enc: Encoding) -> Result<(), SourceError> {
        enc.check()?;
        let mut st = lock(&self.st);
        if st.phase != Phase::Precopy || st.encoding_set || st.report.pages_sent > 0 {
            return Err(SourceError::EncodingLate);
        }
        st.encoding_set = true;
        st.encoding = Some(enc);
        Ok(())
    }

    /// Chooses Scatter-Gather for this migration (once, before the switch-over): after a
    /// post-copy hand-over, what the link cannot take at once goes to the intermediaries.
    pub fn set_scatter(&self, req: ScatterRequest) -> Result<(), SourceError> {
        let mut st = lock(&self.st);
        if st.phase != Phase::Precopy || st.switch.is_some() || st.scatter_set {
            return Err(SourceError::ScatterLate);
        }
        st.scatter_set = true;
        st.scatter = Some(req);
        Ok(())
    }

    /// Throttles the guest's vCPUs (`percent` of the time asleep; 0 lifts it) while
    /// pre-copy goes on: QEMU's auto-converge lever, for a guest that dirties its memory
    /// faster than the link carries it. Lifted when the migration ends, whatever its end.
    pub fn set_throttle(&self, percent: u8) -> Result<(), SourceError> {
        let mut st = lock(&self.st);
        if st.phase != Phase::Precopy || st.switch.is_some() {
            return Err(SourceError::ThrottleLate(st.phase));
        }
        st.vcpu_throttle = Some(percent);
        Ok(())
    }

    /// Asks for the switch-over once the queued pages are sent. `final_dirty` harvests the
    /// pages dirtied since the service's last harvest (called with the guest paused).
    pub fn switch_over(
        &self,
        mode: SwitchMode,
        final_dirty: Option<Harvest>,
    ) -> Result<(), SourceError> {
        let mut st = lock(&self.st);
        if st.phase != Phase::Precopy || st.switch.is_some() {
            return Err(SourceError::SwitchLate(st.phase));
        }
        st.switch = Some((mode, final_dirty));
        Ok(())
    }

    /// Progress for the service and the control API.
    pub fn progress(&self) -> Progress {
        let st = lock(&self.st);
        Progress {
            status: super::Status {
                phase: st.phase,
                pages_total: self.pages,
                // Pre-copy: a page is pending until the destination has it (see
                // `send_delivery_sync`).
                pages_pending: st.pending_count
                    + st.urgent.iter().map(|(a, b)| b - a).sum::<u64>()
                    + match st.phase {
                        Phase::Precopy => st.report.pages_sent.saturating_sub(st.pages_delivered),
                        _ => 0,
                    },
                pages_sent: st.report.pages_sent,
                bytes_sent: st.report.bytes,
                rate_bytes_per_sec: st.rate_bps,
                remote_faults: st.report.remote_faults,
                pages_needed: count(&st.needed),
                elapsed_ms: self.started.elapsed().as_millis() as u64,
                error: st.error.clone(),
            },
            pages_per_sec: st.page_rate,
            rounds: st.report.rounds,
            disk: st.report.disk.clone(),
            hold: self.hold.as_ref().map(Hold::report),
        }
    }

    /// Faults the destination reported since the last call (post-copy), by page.
    pub fn take_faults(&self) -> Vec<u64> {
        std::mem::take(&mut lock(&self.st).fault_events)
    }

    /// A harvest of the service's: counts its pages into the dirty rate and, in pre-copy,
    /// clears from `dirty` the pages still queued. Those are read when they go, after this
    /// harvest, so they carry the writes it saw; a service harvesting while a round's pages
    /// are queued then sends such a page once, not again in the next round (Xen's pre-copy
    /// skips the pages dirtied in the current round for the same reason). A page taken for
    /// sending is no longer queued and stays in `dirty`: its copy may be older than the
    /// write.
    pub fn unqueued(&self, dirty: &mut [u64]) {
        let mut st = lock(&self.st);
        st.dirtied += count(dirty);
        if !matches!(st.phase, Phase::Precopy) {
            return;
        }
        let mut queued = 0;
        for (d, q) in dirty.iter_mut().zip(&st.pending) {
            queued += (*d & q).count_ones() as u64;
            *d &= !q;
        }
        st.report.dirtied_while_queued += queued;
    }

    /// The report (final once the phase is completed or failed).
    pub fn report(&self) -> Report {
        let st = lock(&self.st);
        let mut r = st.report.clone();
        r.result = match st.phase {
            Phase::Completed => "completed",
            Phase::Failed if st.in_doubt => "in-doubt",
            Phase::Failed => "failed",
            _ => "running",
        }
        .into();
        r.error = st.error.clone();
        r.hold = self.hold.as_ref().map(Hold::report);
        r
    }

    /// Opens the gate a held migration waits at (see `hold.rs`).
    pub fn release(&self) -> Result<super::hold::Stage, String> {
        match &self.hold {
            Some(h) => h.release(),
            None => Err("the migration was not started with a hold".into()),
        }
    }

    /// The hand-over was committed but never confirmed: the guest may run at the destination,
    /// so the source keeps it paused (intact) instead of resuming it.
    pub fn in_doubt(&self) -> bool {
        lock(&self.st).in_doubt
    }

    /// The switch-over has paused the guest and the migration is still on: resuming it here
    /// now could run it on both hosts, so the VMM refuses pause and resume meanwhile.
    pub fn holds_guest(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Gives up (before the switch-over only): the sender stops and the guest runs on here.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
        // A held migration's commit gate gives up too (the guest is still here).
        if let Some(h) = &self.hold {
            h.wake();
        }
    }
}

/// Post-copy: pages sent with each page the vCPUs touch first (its aligned group, as lazy
/// restore brings it).
const FIRST_TOUCH_GROUP: u64 = 16;

/// The pages the vCPUs of `state` (state-file format) touch first on resuming — instruction,
/// stack, descriptor tables and what their registers point at, and the page tables on the
/// way (`base_vmm::vmm::first_touches`) — walked in `ram`, each once, in that order.
fn first_touch_pages(ram: &GuestRam, state: &[u8]) -> Vec<u64> {
    use base_vmm::lazy::Paging;
    const FRAME: u64 = 0x000f_ffff_ffff_f000;
    let Ok(state) = base_vmm::state::VmState::from_bytes(state, "the migrating VM's state") else {
        return Vec::new();
    };
    let pages = ram.size() / PAGE as u64;
    let mut out: Vec<u64> = Vec::new();
    let note = |p: u64, out: &mut Vec<u64>| {
        if p < pages && !out.contains(&p) {
            out.push(p);
        }
    };
    for f in base_vmm::vmm::first_touches(&state) {
        for &va in &f.addrs {
            if f.paging == Paging::Off {
                note(va / PAGE as u64, &mut out);
                continue;
            }
            // 4-level walk; each table page the MMU reads is touched too.
            let mut table = f.cr3 & FRAME;
            for level in (1..=4u32).rev() {
                note(table / PAGE as u64, &mut out);
                let shift = 12 + 9 * (level - 1);
                let mut raw = [0u8; 8];
                if ram
                    .read(table + ((va >> shift) & 511) * 8, &mut raw)
                    .is_err()
                {
                    break;
                }
                let entry = u64::from_le_bytes(raw);
                if entry & 1 == 0 {
                    break; // not mapped: the guest faults in itself, not on us
                }
                if level == 1 || ((level == 3 || level == 2) && entry & 0x80 != 0) {
                    let size = 1u64 << shift;
                    let gpa = (entry & FRAME & !(size - 1)) | (va & (size - 1));
                    note(gpa / PAGE as u64, &mut out);
                    break;
                }
                table = entry & FRAME;
            }
        }
    }
    out
}

/// A switch-over to post-copy was asked for.
fn src_switch_is_postcopy(src: &MigrationSource) -> bool {
    matches!(lock(&src.st).switch, Some((SwitchMode::Postcopy, _)))
}

fn count_round(r: &mut Report, round: u32, pages: u64) {
    if round == 0 {
        return;
    }
    let i = round as usize - 1;
    if r.pages_per_round.len() <= i {
        r.pages_per_round.resize(i + 1, 0);
    }
    r.pages_per_round[i] += pages;
    r.rounds = r.rounds.max(round);
}

fn hello(cfg: &SourceConfig, mem: u64, session: u64, resume: bool) -> Result<Link, LinkError> {
    hello_timed(cfg, mem, session, resume).map(|(link, _)| link)
}

/// [`hello`], and the time from `hello` to `welcome` (a round trip of the link).
fn hello_timed(
    cfg: &SourceConfig,
    mem: u64,
    session: u64,
    resume: bool,
) -> Result<(Link, Duration), LinkError> {
    let timeout = Duration::from_secs(10);
    let mut link = Link::connect(cfg.to, cfg.tls.clone(), timeout)?;
    let sent = Instant::now();
    link.send(&Frame::Hello {
        version: VERSION,
        mem_bytes: mem,
        session,
        resume,
    })?;
    match link.expect(timeout, "welcome")? {
        Frame::Welcome { version } if version == VERSION => {
            // The round trip is hello's: measured before the record take-over.
            let rtt = sent.elapsed();
            link.take_over_records()?;
            Ok((link, rtt))
        }
        Frame::Welcome { version } => Err(LinkError::Io(std::io::Error::other(format!(
            "the destination speaks wire version {version}, we speak {VERSION}"
        )))),
        other => Err(LinkError::Io(std::io::Error::other(format!(
            "expected welcome, got {}",
            other.name()
        )))),
    }
}

/// The sender thread.
struct Sender<'a> {
    src: &'a MigrationSource,
    cfg: SourceConfig,
    session: u64,
    ram: Arc<GuestRam>,
    link: Link,
    buf: Vec<u8>,
    paused: bool,
    /// The switch-over stopped a running guest (false: its operator had paused it): the
    /// destination runs it, or a failure before `commit` resumes it here.
    stopped_running: bool,
    /// `commit` went out: the guest must never run here again.
    committed: bool,
    /// The destination's `resumed` came: it took the guest over.
    confirmed: bool,
    /// The least round trip seen (`hello`, the pre-copy `sync`s).
    rtt: Duration,
    /// Post-copy: the socket's unsent-bytes cap (TCP_NOTSENT_LOWAT) now, 0: none set.
    queue_cap: u64,
    /// Post-copy: the `sync`s in flight (when sent, the link's bytes written then), each
    /// answered in order once the destination has read what came before it.
    pc_syncs: VecDeque<(Instant, u64)>,
    /// Post-copy: the link's bytes the destination has read, as of its last `sync` answer.
    pc_acked: u64,
    pc_last_sync: Instant,
    /// Post-copy: the fastest send rate seen, bytes/s (the window's rate).
    pc_rate: u64,
    /// Post-copy: a queue was seen on the path (see [`Sender::paced`]).
    pc_queued: bool,
    /// Post-copy: how late the last `sync`s were answered beyond the idle round trip.
    pc_delays: VecDeque<Duration>,
    /// Post-copy: the path's delivery rate.
    pc_delivery: DeliveryRate,
    /// Pages of guest memory known to be data (not a hole in the memfd), see `holes`.
    known_data: Vec<u64>,
    /// The `cnet` codec's encoder, once the service chose encodings (pre-copy and
    /// stop-and-copy only: post-copy pages go raw).
    encoder: Option<Encoder>,
    /// Encoded page data of the batch being sent.
    encoded: Vec<u8>,
    last_sample: Instant,
    rate_mark: (Instant, u64, u64),
    throttle: (Instant, u64),
    /// The vCPUs' throttled time when this migration first throttled them (ms; `None`: it
    /// never did).
    vcpu_throttled_base: Option<f64>,
    eviction_start: Option<Instant>,
    /// The disks moving with the VM (none: no disks, or shared storage).
    disk: Option<DiskSender>,
    /// Pre-copy: the round each page was last sent in (0: never), for `final_per_round`.
    last_round: Vec<u16>,
    /// Held: when the last held round was harvested.
    held_harvest: Instant,
    /// Held: when the last frame went out (a quiet hold sends a keep-alive `sync`).
    keepalive: Instant,
    /// Why the hold failed the migration (reported as such, not as a link error).
    hold_failure: Option<String>,
    /// Released from a hold, the catch-up round was queued.
    caught_up: bool,
    /// Pre-copy `sync`s not answered yet (a round's end, the rounds' progress marks, a held
    /// migration's keep-alive): their answers tell which pages arrived, and the switch-over's
    /// own `sync` waits past them.
    delivery_syncs: VecDeque<DeliverySync>,
    /// Pre-copy: the path's delivery rate (see [`Sender::past_bottleneck`]).
    delivery: DeliveryRate,
    /// Pre-copy: the same over [`STEADY_SPAN`]s (the service's rate is capped by it).
    delivery_steady: DeliveryRate,
    /// Pre-copy: where the last answered `sync` lies in the stream.
    answered_at: Option<u64>,
    /// Pre-copy: when, and where in the stream, the sender last started from idle (its queue
    /// out), and whether it sends now.
    burst: (Instant, u64),
    sending: bool,
    /// Scatter-Gather: the intermediaries and the router (after `set-scatter`).
    scatter: Option<Scatter>,
    /// Scatter-Gather: pages sent to the intermediaries, not on the link.
    scattered: Vec<u64>,
    /// Time spent reading guest memory to classify pages (zero, progression, data).
    t_read: Duration,
    /// The `store` record went out (Scatter-Gather's, or the parked pages').
    store_sent: bool,
    /// Agile: pages sent as their location (parked at the intermediaries).
    parked_sent: Vec<u64>,
    /// Agile: located pages the destination asked for again: sent as data from now on.
    direct_only: Vec<u64>,
}

/// Harvests the pages dirtied since the service's (or its own) last harvest: with the guest
/// paused at the switch-over, and for each held round (see `hold.rs`) while it runs.
pub type Harvest = Box<dyn FnMut() -> Result<Vec<u64>, HostError> + Send>;

/// A pre-copy `sync` not answered yet.
struct DeliverySync {
    sent: Instant,
    /// Pages sent before it.
    pages: u64,
    /// Where it lies in the stream, wire bytes (see [`Link::position`]).
    at: u64,
    /// It ends a round (or the pre-pause wait), not a progress mark or a keep-alive.
    round_end: bool,
    /// When its pages were counted past the path's bottleneck, before its answer came.
    credited: Option<Instant>,
}

/// The path's delivery rate, from the answers to `sync`s: the bytes the destination read
/// over spans of at least `span`, the fastest such.
struct DeliveryRate {
    span: Duration,
    /// The span's start: when, and the stream position answered then.
    mark: Option<(Instant, u64)>,
    fastest: u64,
}

impl DeliveryRate {
    fn new(span: Duration) -> Self {
        DeliveryRate {
            span,
            mark: None,
            fastest: 0,
        }
    }

    /// A `sync` at stream position `at` was answered now: the span's rate, when one ended.
    fn answered(&mut self, at: u64) -> Option<u64> {
        let now = Instant::now();
        match self.mark {
            Some((t, b)) if now.duration_since(t) >= self.span => {
                let rate = at.saturating_sub(b) as f64 / now.duration_since(t).as_secs_f64();
                self.fastest = self.fastest.max(rate as u64);
                self.mark = Some((now, at));
                Some(rate as u64)
            }
            Some(_) => None,
            None => {
                self.mark = Some((now, at));
                None
            }
        }
    }
}

enum Outcome {
    /// Stop-and-copy done: the guest runs at the destination.
    Moved,
    /// Post-copy done: every page is at the destination.
    Evicted,
}

impl Sender<'_> {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.src.st)
    }

    /// A link whose round trip is [`AUTO_COMMIT_RTT`] or more: there the send queue's cap and
    /// the window bound what a fault waits behind. On a LAN or loopback the hosts, not the
    /// link, are the bottleneck: the queues drain at memory speed, and small batches and a
    /// window that waits for answers from a busy destination only slowed the push (loopback
    /// dirty post-copy: guest stall 42 → 170 ms, total 1.8 → 2.2 s, median of two each on a
    /// busy host).
    fn long_link(&self) -> bool {
        self.rtt >= AUTO_COMMIT_RTT
    }

    /// Whether post-copy paces its push — the send queue's cap and the window over the path,
    /// which bound what a fault waits behind: on a long link (see [`Sender::long_link`]),
    /// and on any link once the push has built a queue on it: the last [`QUEUE_SYNCS`]
    /// `sync`s all answered [`QUEUE_DELAY`] or more beyond the idle round trip (a 1 Gbit/s
    /// link without delay held 15 ms of pushed pages ahead of each fault, in a shaped
    /// queue and a relay the source's socket does not see). Loopback's queues (the two
    /// sockets' buffers) drain at memory speed, and a busy host's late answer alone does
    /// not count. Once seen, the queue counts for the rest of the push.
    fn paced(&mut self) -> bool {
        if self.scatter.is_some() {
            return false;
        }
        let why = if self.long_link() {
            "rtt"
        } else if self.pc_queued {
            "queue"
        } else {
            return false;
        };
        let mut st = self.st();
        if st.report.postcopy_paced.is_empty() {
            st.report.postcopy_paced = why.into();
        }
        true
    }

    /// Post-copy: a `sync` sent at `sent`, when the link had carried `bytes`, was answered:
    /// the destination has read those bytes. Measures the path's queue and delivery rate.
    fn sync_answered(&mut self, sent: Instant, bytes: u64) {
        self.pc_acked = self.pc_acked.max(bytes);
        let now = Instant::now();
        let late = now.duration_since(sent).saturating_sub(self.rtt);
        self.pc_delays.push_back(late);
        if self.pc_delays.len() > QUEUE_SYNCS {
            self.pc_delays.pop_front();
        }
        let mut st = lock(&self.src.st);
        if self.pc_delays.len() == QUEUE_SYNCS {
            let least = self.pc_delays.iter().min().copied().unwrap_or_default();
            let us = least.as_micros() as u64;
            st.report.postcopy_queue_delay_us = st.report.postcopy_queue_delay_us.max(us);
            // `SPANVMM_MIGRATION_LEVERS_OFF=queue-pacing`: the round trip alone decides (A/B).
            if least >= QUEUE_DELAY && !self.pc_queued && !super::link::lever_off("queue-pacing") {
                self.pc_queued = true;
                super::trace(format_args!(
                    "source: post-copy paced from here: the path queues ({us} µs)"
                ));
            }
        }
        if let Some(rate) = self.pc_delivery.answered(bytes) {
            self.pc_rate = self.pc_rate.max(rate);
            st.report.postcopy_delivery_bps = st.report.postcopy_delivery_bps.max(rate);
        }
    }

    /// Whether the hand-over sends `commit` with the state (see [`CommitMode`]).
    fn commit_early(&self) -> bool {
        match self.cfg.commit {
            CommitMode::WithState => true,
            CommitMode::AfterReady => false,
            CommitMode::Auto => self.src.hold.is_none() && self.rtt >= AUTO_COMMIT_RTT,
        }
    }

    fn is_zero(page: &[u8]) -> bool {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
        let (head, mid, tail) = unsafe { page.align_to::<u64>() };
        head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
    }

    /// Pages of `[first, first+span)` (bit i = page first+i) that are holes in guest memory's
    /// memfd: never written, so zero. A file system without SEEK_DATA reports no hole.
    fn holes(&mut self, first: u64, span: u64) -> Vec<u64> {
        use std::os::fd::AsRawFd;
        let fd = self.ram.memfd().as_raw_fd();
        let mut holes = vec![0u64; span.div_ceil(64) as usize];
        let (start, end) = (first * PAGE as u64, (first + span) * PAGE as u64);
        let mut off = start;
        while off < end {
            // Data stays data or is evicted (see below): skip pages known to be data, as
            // SEEK_HOLE walks a whole run of data each time.
            if bit(&self.known_data, off / PAGE as u64) {
                off += PAGE as u64;
                continue;
            }
            // SAFETY: lseek on our own descriptor; it only moves the file offset.
            let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
            let data = if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    break; // unsupported or failed: everything counts as data
                }
                end // no data after `off`
            } else {
                (data as u64).min(end)
            };
            for p in off / PAGE as u64..data / PAGE as u64 {
                set_bit(&mut holes, p - first);
            }
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            if hole < 0 {
                break;
            }
            off = (hole as u64).next_multiple_of(PAGE as u64);
            let last = self.known_data.len() as u64 * 64;
            for p in data / PAGE as u64..(off / PAGE as u64).min(last) {
                set_bit(&mut self.known_data, p);
            }
        }
        // An evicted page (agile: its data is in a store) is a hole but not zero: it is read
        // like any page, which brings it back.
        if self.ram.evicted_pages() > 0 {
            for p in first..first + span {
                if self.ram.is_evicted(p) {
                    holes[((p - first) / 64) as usize] &= !(1 << ((p - first) % 64));
                }
            }
        }
        holes
    }

    /// Sends the pages of `[first, first+span)` selected in `sel` (bit i = page first+i).
    fn send_batch(&mut self, first: u64, span: u64, sel: &[u64]) -> Result<u64, LinkError> {
        let (precopy, chosen, round) = {
            // Through `src` (not `self`), so that `last_round` can be borrowed alongside.
            let src = self.src;
            let mut st = lock(&src.st);
            // Pages sent during the stop-and-copy count into the round after the last one.
            let round = st.report.rounds + self.paused as u32;
            let postcopy = matches!(st.phase, Phase::Postcopy | Phase::Recovering);
            if !postcopy && round > 0 {
                Self::count_final(
                    &mut self.last_round,
                    &mut st.report,
                    first,
                    span,
                    sel,
                    round,
                );
            }
            (st.phase == Phase::Precopy, st.encoding.take(), round)
        };
        if let Some(enc) = chosen {
            self.encoder =
                Some(Encoder::new(enc).map_err(|e| {
                    LinkError::Io(std::io::Error::other(format!("set-encoding: {e}")))
                })?);
        }
        // Parked pages go as their locations; the rest as pages.
        let rest = self.send_parked(first, span, sel)?;
        let sel = &rest[..];
        if sel.iter().all(|&w| w == 0) {
            return Ok(0);
        }
        if precopy && self.encoder.is_some() {
            return self.send_encoded(first, span, sel, round);
        }
        let stride_ok = precopy && self.cfg.stride_pages;
        if self.t_read.is_zero() {
            super::trace(format_args!(
                "source: first pages at {:.1} ms",
                self.src.started.elapsed().as_secs_f64() * 1e3
            ));
        }
        let t_read = Instant::now();
        let holes = self.holes(first, span);
        let nw = span.div_ceil(64) as usize;
        let pages = |p: u64, n: u64| -> &[u8] {
            // SAFETY: p + n <= pages (batches never cross the end of guest RAM), so the pages
            // lie inside the guest mapping, which `self.ram` keeps alive; a racing guest write
            // only changes what is sent, and the dirty log has the page sent again.
            unsafe {
                std::slice::from_raw_parts(
                    self.ram.host_base().add(p as usize * PAGE),
                    n as usize * PAGE,
                )
            }
        };
        let page = |p: u64| pages(p, 1);
        // Pass 1: which pages are zero (they go as marker bits) and, with `stride_pages`,
        // which are progressions (16 bytes each). Holes in the memfd are zero without a look
        // (reading one would allocate and clear a page). A page is read once here: what is
        // sent of a progression is what was read, and a racing write is in the dirty log.
        let mut zero = vec![0u64; nw];
        let mut stride = vec![0u64; nw];
        let mut pairs = std::mem::take(&mut self.encoded);
        pairs.clear();
        let (mut n, mut data_pages, mut ns) = (0u64, 0u64, 0u64);
        for i in (0..span).filter(|&i| bit(sel, i)) {
            n += 1;
            if bit(&holes, i) {
                set_bit(&mut zero, i);
                continue;
            }
            if !stride_ok {
                if Self::is_zero(page(first + i)) {
                    set_bit(&mut zero, i);
                } else {
                    data_pages += 1;
                }
                continue;
            }
            match super::wire::stride_of(page(first + i)) {
                Some((0, 0)) => set_bit(&mut zero, i),
                Some((a, d)) => {
                    set_bit(&mut stride, i);
                    pairs.extend_from_slice(&a.to_le_bytes());
                    pairs.extend_from_slice(&d.to_le_bytes());
                    data_pages += 1;
                    ns += 1;
                }
                None => data_pages += 1,
            }
        }
        self.t_read += t_read.elapsed();
        // Header and bitmaps (see wire.rs) in one buffer, then runs of data pages straight from
        // guest memory: TLS gathers them into full-size records as it seals them.
        self.buf.clear();
        let raw_len = (data_pages - ns) as usize * PAGE;
        let (codec, data_len) = if ns > 0 {
            let len = nw * 8 + pairs.len() + raw_len;
            (PageCodec::Stride, len)
        } else {
            (PageCodec::Raw, raw_len)
        };
        super::wire::pages_header(
            &mut self.buf,
            first,
            span as u16,
            codec,
            sel,
            &zero,
            data_len,
        );
        if ns > 0 {
            for w in &stride[..nw] {
                self.buf.extend_from_slice(&w.to_le_bytes());
            }
            self.buf.extend_from_slice(&pairs);
        }
        self.encoded = pairs;
        let len = self.buf.len() - super::wire::HEADER_LEN + raw_len;
        let buf = std::mem::take(&mut self.buf);
        let mut slices = vec![std::io::IoSlice::new(&buf)];
        let raw = |i: u64| bit(sel, i) && !bit(&zero, i) && !bit(&stride, i);
        let mut i = 0;
        while i < span {
            if !raw(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < span && raw(j) {
                j += 1;
            }
            slices.push(std::io::IoSlice::new(pages(first + i, j - i)));
            i = j;
        }
        let r = self.link.send_slices(&mut slices);
        drop(slices);
        self.buf = buf;
        r?;
        let mut st = self.st();
        st.report.pages_sent += n;
        st.report.zero_pages += n - data_pages;
        st.report.stride_pages += ns;
        st.report.bytes = self.link.wire_bytes + st.report.bytes_per_link.iter().sum::<u64>();
        drop(st);
        self.throttle.1 += (super::wire::HEADER_LEN + len) as u64;
        Ok(n)
    }

    /// Agile: the pages of `sel` parked at the intermediaries (evicted here) go as one
    /// `located` record — their content addresses — instead of being read, which would
    /// bring them back; the `store` record naming the intermediaries and the key goes
    /// first, once. Returns the rest of the selection. A page evicted when checked holds
    /// exactly what was pushed; if it is brought back and written afterwards, the dirty log
    /// has it sent again as data, which supersedes the location at the destination.
    fn send_parked(&mut self, first: u64, span: u64, sel: &[u64]) -> Result<Vec<u64>, LinkError> {
        let mut rest = sel.to_vec();
        let Some(parked) = self.cfg.parked.clone() else {
            return Ok(rest);
        };
        if self.ram.evicted_pages() == 0 {
            return Ok(rest);
        }
        let pages: Vec<u64> = (0..span)
            .filter(|&i| bit(sel, i))
            .map(|i| first + i)
            .filter(|&p| self.ram.is_evicted(p) && !bit(&self.direct_only, p))
            .collect();
        if pages.is_empty() {
            return Ok(rest);
        }
        let mut present = vec![0u64; span.div_ceil(64) as usize];
        let mut hashes = Vec::with_capacity(pages.len());
        for (&p, h) in pages.iter().zip(parked.addresses(&pages)) {
            // The evictor drops only pages the store holds: an evicted page has an address.
            let Some(h) = h else { continue };
            set_bit(&mut present, p - first);
            clear_bit(&mut rest, p - first);
            set_bit(&mut self.parked_sent, p);
            hashes.push(h);
        }
        if hashes.is_empty() {
            return Ok(rest);
        }
        self.send_parked_store()?;
        let n = hashes.len() as u64;
        let frame_bytes = super::wire::HEADER_LEN as u64 + 10 + 8 * present.len() as u64 + 32 * n;
        self.link.send(&Frame::Located(super::wire::Located {
            first,
            span: span as u16,
            present,
            hashes,
        }))?;
        self.throttle.1 += frame_bytes;
        let mut st = self.st();
        st.report.bytes = self.link.wire_bytes + st.report.bytes_per_link.iter().sum::<u64>();
        let r = st.report.agile.get_or_insert_with(Default::default);
        r.located_pages += n;
        r.located_frames += 1;
        r.located_bytes += frame_bytes;
        Ok(rest)
    }

    /// Agile: the `store` record of the parked pages, once, if any page is parked and no
    /// `store` went out yet (Scatter-Gather's, sent first, names the same store).
    fn send_parked_store(&mut self) -> Result<(), LinkError> {
        if self.store_sent || self.ram.evicted_pages() == 0 {
            return Ok(());
        }
        if let Some(parked) = &self.cfg.parked {
            self.link.send(&Frame::Store(parked.store_record(0)))?;
            self.store_sent = true;
        }
        Ok(())
    }

    /// Moves the pages of a pre-copy batch sent in `round` into that round's final count
    /// (out of the round that sent them before, which sent them in vain).
    fn count_final(
        last: &mut Vec<u16>,
        r: &mut Report,
        first: u64,
        span: u64,
        sel: &[u64],
        round: u32,
    ) {
        if last.is_empty() {
            last.resize(r.pages_total as usize, 0);
        }
        let round = round.min(u16::MAX as u32) as u16;
        if r.final_per_round.len() < round as usize {
            r.final_per_round.resize(round as usize, 0);
            r.sent_per_round.resize(round as usize, 0);
        }
        for i in (0..span).filter(|&i| bit(sel, i)) {
            let Some(l) = last.get_mut((first + i) as usize) else {
                continue;
            };
            if *l > 0 {
                r.final_per_round[*l as usize - 1] -= 1;
            }
            *l = round;
            r.final_per_round[round as usize - 1] += 1;
            r.sent_per_round[round as usize - 1] += 1;
        }
    }

    /// [`Self::send_batch`] in the `cnet` codec: each page is copied once (so what is cached
    /// is exactly what was sent), then sent as zero marker, cached blocks, delta or raw.
    fn send_encoded(
        &mut self,
        first: u64,
        span: u64,
        sel: &[u64],
        round: u32,
    ) -> Result<u64, LinkError> {
        let holes = self.holes(first, span);
        let mut zero = vec![0u64; span.div_ceil(64) as usize];
        let mut data = std::mem::take(&mut self.encoded);
        data.clear();
        let mut copy = vec![0u8; PAGE];
        let (mut n, mut data_pages) = (0u64, 0u64);
        let enc = self.encoder.as_mut().expect("checked by the caller");
        for i in (0..span).filter(|&i| bit(sel, i)) {
            let p = first + i;
            n += 1;
            if !bit(&holes, i) {
                // SAFETY: p < pages (batches never cross the end of guest RAM), so the page
                // lies inside the guest mapping, which `self.ram` keeps alive; a racing guest
                // write only changes what is copied, and the dirty log has the page sent again.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ram.host_base().add(p as usize * PAGE),
                        copy.as_mut_ptr(),
                        PAGE,
                    )
                };
                if !Self::is_zero(&copy) {
                    data_pages += 1;
                    enc.encode(p, &copy, round, &mut data);
                    continue;
                }
            }
            set_bit(&mut zero, i);
            enc.zero(p);
        }
        self.buf.clear();
        super::wire::pages_header(
            &mut self.buf,
            first,
            span as u16,
            PageCodec::Cnet,
            sel,
            &zero,
            data.len(),
        );
        let len = self.buf.len() + data.len();
        let buf = std::mem::take(&mut self.buf);
        let r = self
            .link
            .send_slices(&mut [std::io::IoSlice::new(&buf), std::io::IoSlice::new(&data)]);
        self.buf = buf;
        self.encoded = data;
        r?;
        let stats = enc.stats().clone();
        let mut st = self.st();
        st.report.pages_sent += n;
        st.report.zero_pages += n - data_pages;
        st.report.bytes = self.link.wire_bytes + st.report.bytes_per_link.iter().sum::<u64>();
        st.report.encoding = Some(stats);
        drop(st);
        self.throttle.1 += len as u64;
        Ok(n)
    }

    /// Picks the next batch: faults, urgent ranges, then the pending bitmap. In post-copy only
    /// pages the destination still lacks are taken, and each once.
    fn next_batch(&mut self, wide: bool) -> Option<(u64, u64, Vec<u64>)> {
        let pages = self.src.pages;
        let overlapping = self.overlapping();
        let mut st = self.st();
        let postcopy = matches!(st.phase, Phase::Postcopy);
        // Post-copy batches are small so a fault's page never waits behind a big one: at most
        // the send queue's worth (see `postcopy_queue`); `wide` ones go elsewhere.
        let batch = if wide {
            BATCH_PAGES
        } else if postcopy && self.queue_cap > 0 {
            (self.queue_cap / PAGE as u64).clamp(4, POSTCOPY_BATCH)
        } else if postcopy {
            POSTCOPY_BATCH
        } else if overlapping {
            OVERLAP_BATCH
        } else {
            BATCH_PAGES
        };
        let take = |st: &mut State, first: u64, end: u64, only_pending: bool| {
            let span = (end - first).min(batch);
            let mut sel = vec![0u64; span.div_ceil(64) as usize];
            let mut any = false;
            for i in 0..span {
                let p = first + i;
                let want = if postcopy {
                    bit(&st.needed, p)
                } else {
                    !only_pending || bit(&st.pending, p)
                };
                if !want {
                    continue;
                }
                set_bit(&mut sel, i);
                any = true;
                if bit(&st.pending, p) {
                    clear_bit(&mut st.pending, p);
                    st.pending_count -= 1;
                }
                if postcopy {
                    clear_bit(&mut st.needed, p);
                    if bit(&st.postcopy_sent, p) {
                        st.report.postcopy_resent += 1;
                    }
                    set_bit(&mut st.postcopy_sent, p);
                } else {
                    set_bit(&mut st.sent_ever, p);
                }
            }
            any.then_some((first, span, sel))
        };
        while let Some(p) = st.faults.pop_front() {
            if p < pages {
                let b = take(&mut st, p, p + 1, false);
                super::trace(format_args!("source: fault {p} sent now: {}", b.is_some()));
                if let Some(b) = b {
                    return Some(b);
                }
            }
        }
        while let Some((a, b)) = st.urgent.pop_front() {
            let span_end = b.min(a + batch);
            if span_end < b {
                st.urgent.push_front((span_end, b));
            }
            if let Some(batch) = take(&mut st, a, span_end, false) {
                return Some(batch);
            }
        }
        if st.pending_count == 0 {
            return None;
        }
        // Next set bit from the cursor, wrapping once.
        let words = st.pending.len();
        let start = (st.cursor / 64) as usize;
        for k in 0..=words {
            let w = (start + k) % words;
            if st.pending[w] != 0 {
                let p = w as u64 * 64 + st.pending[w].trailing_zeros() as u64;
                let end = (p + batch).min(pages);
                st.cursor = end % pages;
                return take(&mut st, p, end, true);
            }
        }
        st.pending_count = 0;
        None
    }

    /// Scatter-Gather chosen: connect to the intermediaries and tell the destination where
    /// they are and the key (it connects too, and refuses if it cannot: the guest then stays
    /// here, as before any switch-over).
    fn start_scatter(&mut self, req: ScatterRequest) -> Result<(), LinkError> {
        let fail = |e: String| LinkError::Io(std::io::Error::other(format!("scatter-gather: {e}")));
        // A VM with parked pages (agile) scatters to the store holding them, under its key:
        // the destination takes one `store` record for both.
        let (cfg, key) = match &self.cfg.parked {
            Some(p) => p.store(),
            None => (req.store_config(), req.store_key().map_err(fail)?),
        };
        let store = PageStore::connect(cfg.clone(), &key).map_err(|e| fail(e.to_string()))?;
        let rec = match &self.cfg.parked {
            Some(p) => p.store_record(req.gather_rate),
            None => Store {
                key,
                encrypt: cfg.encrypt,
                cluster: cfg.cluster,
                replicas: cfg.replicas as u8,
                ttl_secs: req.ttl_secs,
                intermediaries: cfg.intermediaries.clone(),
                auth: cfg.auth.clone(),
                gather_rate: req.gather_rate,
            },
        };
        if self.store_sent {
            tracing::warn!("migration: the parked pages' store record went out first: the gather is not capped");
        } else {
            self.link.send(&Frame::Store(rec))?;
            self.store_sent = true;
        }
        let mut sc = Scatter::new(store, req.high_water);
        sc.start_workers(req.workers)
            .map_err(|e| fail(e.to_string()))?;
        self.scatter = Some(sc);
        self.st().report.scatter = Some(ScatterReport::default());
        tracing::info!(
            "migration: scatter-gather through {} intermediaries",
            cfg.intermediaries.len()
        );
        Ok(())
    }

    /// A background batch after the switch-over, Scatter-Gather: zero pages as markers on
    /// the link; the data pages on the link (`direct`: it keeps up) or to the intermediaries
    /// (and their `located` record on the link). Each page goes one way, once.
    fn scatter_batch(
        &mut self,
        first: u64,
        span: u64,
        sel: &[u64],
        direct: bool,
    ) -> Result<(), LinkError> {
        // Parked pages (agile) are at the intermediaries already: their locations go.
        let rest = self.send_parked(first, span, sel)?;
        let sel = &rest[..];
        let holes = self.holes(first, span);
        let nw = span.div_ceil(64) as usize;
        let (mut zero, mut data) = (vec![0u64; nw], vec![0u64; nw]);
        let base = self.ram.host_base();
        let page = |p: u64| -> &[u8] {
            // SAFETY: p < pages (batches never cross the end of guest RAM), so the page lies
            // inside the guest mapping, which `self.ram` keeps alive for the whole migration;
            // the guest is paused (post-copy), so the page does not change.
            unsafe { std::slice::from_raw_parts(base.add(p as usize * PAGE), PAGE) }
        };
        for i in (0..span).filter(|&i| bit(sel, i)) {
            if bit(&holes, i) || Self::is_zero(page(first + i)) {
                set_bit(&mut zero, i);
            } else {
                set_bit(&mut data, i);
            }
        }
        let (nz, nd) = (count(&zero), count(&data));
        if nz > 0 {
            self.send_batch(first, span, &zero)?;
        }
        if nd == 0 {
            if let Some(r) = self.st().report.scatter.as_mut() {
                r.zero_pages += nz;
            }
            return Ok(());
        }
        let sc = self.scatter.as_mut().expect("checked by the caller");
        sc.count(direct);
        if direct {
            sc.sent_direct(nd);
            self.send_batch(first, span, &data)?;
        } else {
            // A copy: the workers own their batches (the guest is paused, the bytes final).
            let mut bytes = Vec::with_capacity(nd as usize * PAGE);
            for i in (0..span).filter(|&i| bit(&data, i)) {
                bytes.extend_from_slice(page(first + i));
            }
            if let Err(e) = sc.queue(first, span as u16, data.clone(), bytes) {
                self.unstored(first, span, &data, &e.to_string())?;
            }
        }
        if let Some(r) = self.st().report.scatter.as_mut() {
            r.zero_pages += nz;
        }
        Ok(())
    }

    /// Sends on what the scatter workers finished (waiting up to `wait` for the first): a
    /// stored batch's `located` record; a batch they could not store, on the link.
    fn scatter_finished(&mut self, wait: Duration) -> Result<(), LinkError> {
        let mut wait = wait;
        loop {
            let Some(sc) = self.scatter.as_mut() else {
                return Ok(());
            };
            let Some(done) = sc.finished(wait) else {
                return Ok(());
            };
            wait = Duration::ZERO;
            match done {
                Ok(rec) => {
                    for (p, _) in rec.pages() {
                        set_bit(&mut self.scattered, p);
                    }
                    self.link.send(&Frame::Located(rec))?;
                    let mut st = self.st();
                    st.report.bytes =
                        self.link.wire_bytes + st.report.bytes_per_link.iter().sum::<u64>();
                    if let Some(r) = st.report.scatter.as_mut() {
                        r.located_frames += 1;
                    }
                }
                Err(u) => {
                    let why = u.error.to_string();
                    self.unstored(u.first, u.span as u64, &u.present, &why)?;
                }
            }
        }
    }

    /// A batch the intermediaries could not take: the source still holds it, it goes on the
    /// link.
    fn unstored(&mut self, first: u64, span: u64, sel: &[u64], why: &str) -> Result<(), LinkError> {
        tracing::warn!("migration: scatter: {why}; sending the batch on the link");
        if let Some(r) = lock(&self.src.st).report.scatter.as_mut() {
            r.store_failures += 1;
        }
        self.scatter.as_mut().expect("set").sent_direct(count(sel));
        self.send_batch(first, span, sel)?;
        Ok(())
    }

    /// Copies the scatter's counters into the report.
    fn scatter_report(&mut self) {
        let Some(sc) = &self.scatter else {
            return;
        };
        let store = sc.store_stats();
        let mut st = self.st();
        let r = st.report.scatter.get_or_insert_with(ScatterReport::default);
        r.direct_pages = sc.stats.direct_pages;
        r.scattered_pages = sc.stats.scattered_pages;
        r.dedup_hits = store.dedup_hits();
        r.bytes_to_intermediaries = store.intermediaries.iter().map(|i| i.wire_out).sum();
        r.intermediaries = store.intermediaries;
    }

    fn sample(&mut self) {
        let now = Instant::now();
        let mut st = lock(&self.src.st);
        if now.duration_since(self.last_sample) >= Duration::from_millis(50) {
            self.last_sample = now;
            let s = Sample {
                t_ms: self.src.started.elapsed().as_millis() as u64,
                sent: st.report.pages_sent,
                dirtied: st.dirtied,
                faults: st.report.remote_faults,
            };
            st.report.timeline.push(s);
            // The disks' progress, also while they need no step (mirrored writes go on
            // their own connection).
            if let Some(d) = &self.disk {
                st.report.disk = Some(d.report());
            }
        }
        let (t0, b0, p0) = self.rate_mark;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt >= 0.2 {
            // On a long link, no more than the path delivers, and nothing until the `sync`
            // answers measured that: bytes the sockets' and the relay's buffers took are not
            // on their way yet (a burst into empty buffers showed 13 MB/s on a 50 Mbit/s
            // link, and the policy's estimate of a final copy came out half its length).
            // Only there: progress marks keep the answers coming while pages go (between
            // round ends alone, a span would take in the idle time).
            let sent = ((st.report.bytes - b0) as f64 / dt) as u64;
            st.rate_bps = if self.overlapping() {
                sent.min(self.delivery_steady.fastest)
            } else {
                sent
            };
            st.report.rate_peak_bytes_per_sec = st.report.rate_peak_bytes_per_sec.max(st.rate_bps);
            st.page_rate = ((st.report.pages_sent - p0) as f64 / dt) as u64;
            self.rate_mark = (now, st.report.bytes, st.report.pages_sent);
        }
    }

    /// Keeps to `--max-bandwidth`: waits until the bytes sent fit the budget.
    fn throttle(&mut self) {
        let Some(bw) = self.cfg.max_bandwidth else {
            return;
        };
        let (t0, bytes) = self.throttle;
        let due = Duration::from_secs_f64(bytes as f64 / bw as f64);
        let el = t0.elapsed();
        if due > el {
            std::thread::sleep((due - el).min(Duration::from_millis(5)));
        }
        if el > Duration::from_secs(1) {
            // Forget old history so a slow phase does not earn a burst later.
            self.throttle = (
                Instant::now(),
                bytes.saturating_sub((el.as_secs_f64() * bw as f64) as u64),
            );
        }
    }

    fn over_budget(&self) -> bool {
        let Some(bw) = self.cfg.max_bandwidth else {
            return false;
        };
        let (t0, bytes) = self.throttle;
        bytes as f64 / bw as f64 > t0.elapsed().as_secs_f64()
    }

    /// Reads whatever the destination sent: fault requests, errors.
    fn read_incoming(&mut self, wait: Duration) -> Result<(), LinkError> {
        let mut wait = wait;
        while let Some(f) = self.link.recv(wait)? {
            wait = Duration::ZERO;
            match f {
                Frame::Fault(pages) => {
                    super::trace(format_args!("source: fault request {pages:?}"));
                    let mut st = lock(&self.src.st);
                    st.report.remote_faults += pages.len() as u64;
                    for &p in &pages {
                        // A page sent to the intermediaries that the destination asks for (it
                        // could not read it there, or faulted before its location came) goes
                        // again, on the link: the source holds it until eviction completes.
                        if p < self.src.pages && bit(&self.scattered, p) && !st.needed.is_empty() {
                            clear_bit(&mut self.scattered, p);
                            set_bit(&mut st.needed, p);
                            if let Some(r) = st.report.scatter.as_mut() {
                                r.resent_direct += 1;
                            }
                        }
                        // Likewise a parked page: read here (brought back) and sent as data.
                        if p < self.src.pages && bit(&self.parked_sent, p) && !st.needed.is_empty()
                        {
                            clear_bit(&mut self.parked_sent, p);
                            set_bit(&mut self.direct_only, p);
                            set_bit(&mut st.needed, p);
                            if let Some(r) = st.report.agile.as_mut() {
                                r.resent_direct += 1;
                            }
                        }
                    }
                    for p in pages {
                        st.faults.push_back(p);
                        st.fault_events.push(p);
                    }
                    drop(st);
                    if let Some(news) = &self.cfg.news {
                        news();
                    }
                }
                Frame::Error(msg) => {
                    return Err(LinkError::Io(std::io::Error::other(format!(
                        "the destination gave up: {msg}"
                    ))))
                }
                // The destination's confirmation, when the link broke right after `commit`.
                Frame::Resumed { .. } => {}
                // Post-copy: the destination has read what came before that `sync`.
                Frame::Sync if !self.pc_syncs.is_empty() => {
                    if let Some((sent, bytes)) = self.pc_syncs.pop_front() {
                        self.sync_answered(sent, bytes);
                    }
                }
                // Pre-copy: the pages sent before that `sync` arrived.
                Frame::Sync => self.delivery_answered(),
                Frame::Disk(DiskFrame::Ack { seq }) => {
                    if let Some(d) = &self.disk {
                        d.acked(seq);
                    }
                }
                other => {
                    return Err(LinkError::Io(std::io::Error::other(format!(
                        "unexpected {} frame from the destination",
                        other.name()
                    ))))
                }
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Outcome, SourceError> {
        // The disks first: offered, and (if the destination receives them) copied before the
        // memory, as CloudNet's disk is in sync before its memory migration starts.
        // The synchronous phase's writes get a connection of their own (a second `hello` of
        // this session), so that they do not wait behind the memory's pages.
        let (cfg, session) = (self.cfg.clone(), self.session);
        let mem = self.ram.size();
        let connect = Box::new(move || hello(&cfg, mem, session, true));
        self.disk = DiskSender::setup(self.src.vm.disks(), &mut self.link, connect)?;
        loop {
            if self.src.cancel.load(Ordering::Acquire) && !self.paused {
                let _ = self.link.send(&Frame::Error("the source cancelled".into()));
                return Err(SourceError::Cancelled);
            }
            let phase = self.st().phase;
            let r = match phase {
                Phase::Precopy => self.precopy_step(),
                Phase::Postcopy => self.postcopy_step(),
                _ => unreachable!("the sender ends on other phases"),
            };
            match r {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                Err(e) if phase == Phase::Postcopy || self.st().phase == Phase::Postcopy => {
                    self.recover(e)?;
                }
                Err(e) => {
                    return Err(match self.hold_failure.take() {
                        Some(why) => SourceError::Hold(why),
                        None => self.link.with_peer_reason(e).into(),
                    });
                }
            }
            self.sample();
        }
    }

    fn precopy_step(&mut self) -> Result<Option<Outcome>, LinkError> {
        self.read_incoming(Duration::ZERO)?;
        // The service's requests, taken under one lock (this runs for every batch).
        let (req, throttle) = {
            let mut st = self.st();
            (st.scatter.take(), st.vcpu_throttle.take())
        };
        if let Some(req) = req {
            self.start_scatter(req)?;
        }
        if let Some(percent) = throttle {
            self.throttle_vcpus(percent);
        }
        if self.over_budget() {
            self.throttle();
            return Ok(None);
        }
        // Disk work (bulk copy, passes, mirrored writes) goes before pages; the memory moves
        // once the disks are in sync.
        if let Some(d) = &mut self.disk {
            if !d.encoding_decided() {
                // The service chooses encodings before it queues its first pages: wait for
                // its first move (or a second), so that disk units get the same encodings.
                let st = lock(&self.src.st);
                let moved = st.encoding_set || st.pending_count > 0 || st.switch.is_some();
                if !moved && self.src.started.elapsed() < Duration::from_secs(1) {
                    drop(st);
                    self.read_incoming(Duration::from_millis(1))?;
                    return Ok(None);
                }
                let enc = st.encoding;
                drop(st);
                d.decide_encoding(enc);
            }
            if let Some(n) = d.step(&mut self.link)? {
                self.throttle.1 += n;
                let rep = d.report();
                let mut st = lock(&self.src.st);
                st.report.disk = Some(rep);
                st.report.bytes =
                    self.link.wire_bytes + st.report.bytes_per_link.iter().sum::<u64>();
                return Ok(None);
            }
        }
        // Released from a hold: one catch-up round of what the guest dirtied since the last
        // held round (their budget may have left much), sent while it runs; the switch-over
        // follows once it is out, as without a hold.
        if !self.caught_up && self.src.hold.as_ref().is_some_and(Hold::released) {
            self.caught_up = true;
            if self.st().report.pages_sent > 0 {
                self.held_round()?;
            }
        }
        // A switch to post-copy does not wait for the pages queued before it: they are among
        // those the destination lacks, pushed first after the hand-over. Sending them now
        // would re-send a working set that a guest outrunning the link dirties again
        // meanwhile (a held migration sends its held rounds, as before).
        let postcopy_now = src_switch_is_postcopy(self.src) && self.src.hold.is_none();
        if !postcopy_now {
            if self.precopy_window_full()? {
                return Ok(None);
            }
            if let Some((first, span, sel)) = self.next_batch(false) {
                if !self.sending {
                    self.sending = true;
                    self.burst = (Instant::now(), self.link.position());
                }
                self.send_batch(first, span, &sel)?;
                self.progress_mark()?;
                return Ok(None);
            }
            self.sending = false;
            self.credit_delivered(None);
            // The queue is out: a `sync` after its last page tells when it has arrived (and,
            // on a long link, the answers before it when it has left the bottleneck: see
            // `past_bottleneck`). The service's round ends then, not when the pages entered
            // the sockets' buffers: a round harvested while megabytes still wait on the path
            // counts only the pages dirtied while they were written, and the switch-over's
            // pause then waits for the path to drain as the guest dirties more (measured: a
            // last round of 75-95 pages on a 100 Mbit/s link, 300-500 for the stop-and-copy).
            self.check_delivery()?;
            let (sent, delivered) = {
                let st = self.st();
                (st.report.pages_sent, st.pages_delivered)
            };
            // A progress mark after the round's last page ends it as well as a new `sync`.
            if let Some(last) = self.delivery_syncs.back_mut().filter(|s| s.pages >= sent) {
                last.round_end = true;
            } else if sent > delivered {
                self.send_delivery_sync(true)?;
            }
        }
        if self.holding()? {
            return Ok(None);
        }
        let switch = self.st().switch.take();
        match switch {
            None => {
                self.read_incoming(Duration::from_millis(1))?;
                Ok(None)
            }
            Some((mode, dirty)) => {
                super::trace(format_args!(
                    "source: every queued page sent, switch-over at {:.1} ms",
                    self.src.started.elapsed().as_secs_f64() * 1e3
                ));
                self.switch_over(mode, dirty)
            }
        }
    }

    /// At the switch-over point (asked for, every queued page sent): true while a hold keeps
    /// the migration there. Meanwhile the pages the guest dirties go out in held rounds, so
    /// that the released switch-over has as little to send as an unheld one; a pure
    /// post-copy (nothing sent yet) just waits.
    fn holding(&mut self) -> Result<bool, LinkError> {
        let src = self.src;
        let Some(hold) = &src.hold else {
            return Ok(false);
        };
        let (any_sent, bytes, rate) = {
            let st = self.st();
            if st.switch.is_none() {
                return Ok(false);
            }
            (st.report.pages_sent > 0, st.report.bytes, st.rate_bps)
        };
        match hold.at_switch(src.started, bytes, rate) {
            Ok(true) => return Ok(false),
            Ok(false) => {}
            Err(why) => {
                let _ = self.link.send(&Frame::Error(why.clone()));
                let _ = self.link.flush(Duration::from_secs(1));
                self.hold_failure = Some(why.clone());
                return Err(LinkError::Io(std::io::Error::other(why)));
            }
        }
        // One held round per HELD_ROUND at most (each harvest walks the whole dirty log), and
        // within the hold's byte budget: pages dirtied meanwhile wait in the dirty log (a page
        // rewritten many times goes once), so a held member does not starve the others of
        // the link they may share.
        if any_sent && self.held_harvest.elapsed() >= HELD_ROUND && hold.may_send(bytes) {
            self.held_harvest = Instant::now();
            let n = self.held_round()?;
            if n > 0 {
                hold.held_round(n);
                self.keepalive = Instant::now();
                return Ok(true);
            }
        }
        // The destination gives up on a silent source: a quiet hold says it is still here.
        if self.keepalive.elapsed() >= KEEPALIVE && hold.held_for() >= KEEPALIVE {
            self.keepalive = Instant::now();
            self.send_delivery_sync(false)?;
        }
        self.read_incoming(Duration::from_millis(2))?;
        Ok(true)
    }

    /// Sends a `sync` whose answer confirms the pages sent so far (pre-copy).
    fn send_delivery_sync(&mut self, round_end: bool) -> Result<(), LinkError> {
        self.link.send(&Frame::Sync)?;
        let pages = self.st().report.pages_sent;
        self.delivery_syncs.push_back(DeliverySync {
            sent: Instant::now(),
            pages,
            at: self.link.position(),
            round_end,
            credited: None,
        });
        Ok(())
    }

    /// Pre-copy rounds overlap the path's round trip (see [`Sender::past_bottleneck`]): on a
    /// long link, unless `SPANVMM_MIGRATION_LEVERS_OFF=overlap-rounds` (A/B).
    fn overlapping(&self) -> bool {
        self.long_link() && self.scatter.is_none() && !super::link::lever_off("overlap-rounds")
    }

    /// How far the stream has left the path's bottleneck, wire bytes, as far as the source
    /// can tell: a round ends when its pages have left it, not when they have arrived. The
    /// answer to a `sync` comes at most a round trip after the bottleneck let it through,
    /// and the bottleneck lets `rate × round trip` more through meanwhile; those bytes are in
    /// flight, and pages sent after them (the next round's, the stop-and-copy's) wait behind
    /// none of them. Nor can it have let through more than `rate × time` since the sender
    /// last started from idle (a round's pages queued at once leave it one by one). A round
    /// ended at arrival idled the link a round trip while the guest dirtied on (at 20 ms and
    /// 2 000 pages/s, 40 pages a round, and again before the pause). Where the round trip is
    /// short (and before a rate is measured), the answered `sync` alone.
    fn past_bottleneck(&self) -> u64 {
        let Some(answered) = self.answered_at else {
            return 0;
        };
        let rate = self.delivery.fastest as f64;
        if !self.overlapping() || rate == 0.0 {
            return answered;
        }
        let after_answer = answered + (rate * self.rtt.as_secs_f64()) as u64;
        let (t, at) = self.burst;
        let since_idle = at + (rate * t.elapsed().as_secs_f64()) as u64;
        after_answer.min(since_idle)
    }

    /// Pre-copy on a long link: the bytes sent beyond the last answered `sync` stay within
    /// the path's round trip and half of it at the fastest delivery rate, as post-copy's
    /// window (see [`Sender::window_full`]). A page is read when it is sent: sent further
    /// ahead it would wait in the sockets' and the path's queues (megabytes at 100 Mbit/s, a
    /// quarter of a second and more) while the guest wrote it again, and the service's
    /// harvests meanwhile could not leave it out (see [`MigrationSource::unqueued`]); read
    /// late, it carries those writes. True: full (waited at most 2 ms for an answer).
    fn precopy_window_full(&mut self) -> Result<bool, LinkError> {
        let rate = self.delivery.fastest;
        let Some(answered) = self.answered_at.filter(|_| self.overlapping() && rate > 0) else {
            return Ok(false);
        };
        if self.link.position().saturating_sub(answered) < self.window(rate) {
            return Ok(false);
        }
        self.await_answer()
    }

    /// The bytes a window lets onto the path at `rate`: its round trip and half of it (2 ms
    /// at least) of slack, as the answers come late when the peer or the way back is slow (a
    /// busy host), and a tighter window then idles the link; 256 KiB at least (before a rate
    /// is known: a 100 Mbit/s link's round trip and a fifth).
    fn window(&self, rate: u64) -> u64 {
        let slack = (self.rtt / 2).max(POSTCOPY_QUEUE);
        ((rate as f64 * (self.rtt + slack).as_secs_f64()) as u64).max(POSTCOPY_WINDOW_MIN)
    }

    /// A full window: waits for what the peer sends (an answer, a fault), 2 ms at most, and
    /// reads it. True, for the window's callers.
    fn await_answer(&mut self) -> Result<bool, LinkError> {
        let mut p = libc::pollfd {
            fd: self.link.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 2) };
        self.read_incoming(Duration::ZERO)?;
        Ok(true)
    }

    /// Pre-copy: the `sync`s [`Sender::past_bottleneck`] reaches count their pages as on
    /// their way (delivered); so do the pages before `answered`, a `sync` just answered.
    fn credit_delivered(&mut self, answered: Option<&DeliverySync>) {
        let reach = self.past_bottleneck();
        let now = Instant::now();
        let mut delivered = answered.map_or(0, |s| s.pages);
        for s in self.delivery_syncs.iter_mut().take_while(|s| s.at <= reach) {
            delivered = s.pages;
            s.credited.get_or_insert(now);
        }
        let mut st = lock(&self.src.st);
        st.pages_delivered = st.pages_delivered.max(delivered);
        if let Some(DeliverySync {
            round_end: true,
            credited: Some(t),
            ..
        }) = answered
        {
            st.report.overlapped_round_trips += 1;
            st.report.overlap_saved_ms += t.elapsed().as_secs_f64() * 1e3;
        }
    }

    /// Pre-copy: a progress mark (`sync`) once the stream moved [`PROGRESS_MARK`]'s worth
    /// since the last `sync`, so that a round's end is seen within that.
    fn progress_mark(&mut self) -> Result<(), LinkError> {
        if !self.overlapping() || self.delivery_syncs.len() >= PROGRESS_MARKS_MAX {
            return Ok(());
        }
        let step = ((self.delivery.fastest as f64 * PROGRESS_MARK.as_secs_f64()) as u64)
            .max(PROGRESS_MARK_MIN);
        let last = self.delivery_syncs.back().map_or(0, |s| s.at);
        if self.link.position() >= last + step {
            self.send_delivery_sync(false)?;
        }
        Ok(())
    }

    /// Pre-copy: the destination answered the oldest `sync`: the pages before it arrived (and
    /// perhaps more left the bottleneck).
    fn delivery_answered(&mut self) {
        let Some(sync) = self.delivery_syncs.pop_front() else {
            return;
        };
        self.rtt = self.rtt.min(sync.sent.elapsed());
        self.delivery.answered(sync.at);
        self.delivery_steady.answered(sync.at);
        self.answered_at = Some(sync.at);
        self.credit_delivered(Some(&sync));
    }

    /// Fails when the destination left a `sync` unanswered for [`SYNC_TIMEOUT`]: it reads no
    /// more, and pre-copy's rounds would wait for it for ever.
    fn check_delivery(&self) -> Result<(), LinkError> {
        match self.delivery_syncs.front() {
            Some(s) if s.sent.elapsed() > SYNC_TIMEOUT => Err(LinkError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no sync from the peer within {SYNC_TIMEOUT:?}"),
            ))),
            _ => Ok(()),
        }
    }

    /// Harvests the pages dirtied since the last harvest and queues them (a held round);
    /// how many.
    fn held_round(&mut self) -> Result<u64, LinkError> {
        // Harvested without the state lock: the harvest takes the services' dirty-log lock,
        // which a service's own harvest holds while it counts into this state.
        let harvest = self.st().switch.as_mut().and_then(|s| s.1.take());
        let Some(mut harvest) = harvest else {
            return Ok(0);
        };
        let dirty = harvest();
        if let Some(s) = self.st().switch.as_mut() {
            s.1 = Some(harvest);
        }
        let dirty = dirty?;
        let n = count(&dirty);
        let mut st = self.st();
        st.dirtied += n;
        for (i, w) in dirty.iter().enumerate().take(st.pending.len()) {
            let new = w & !st.pending[i];
            st.pending_count += new.count_ones() as u64;
            st.pending[i] |= w;
        }
        Ok(n)
    }

    /// The switch-over: the hand-over steps every transport shares ([`crate::handover`]),
    /// over the migration link ([`Switch`]), then the report.
    fn switch_over(
        &mut self,
        mode: SwitchMode,
        final_dirty: Option<Harvest>,
    ) -> Result<Option<Outcome>, LinkError> {
        let mut switch = Switch {
            tx: self,
            mode,
            final_dirty,
            t_pause: Instant::now(),
            t_harvest: Duration::ZERO,
            t_state: Duration::ZERO,
            t_sent: Duration::ZERO,
            final_pages: 0,
            load_us: 0,
            round_trips: 0,
            sent_since_reply: false,
            first: Vec::new(),
            state: None,
            state_bytes: 0,
            stale: Vec::new(),
            final_new: 0,
        };
        let result = handover::hand_over(&mut switch);
        let Switch {
            t_pause,
            t_harvest,
            t_state,
            t_sent,
            final_pages,
            load_us,
            round_trips,
            state_bytes,
            stale,
            final_new,
            ..
        } = switch;
        match result {
            Ok(_) => {}
            Err(f) if f.in_doubt => {
                if mode == SwitchMode::Postcopy {
                    // The destination runs (or will not run) the guest; recovery finds out.
                    let mut st = self.st();
                    st.phase = Phase::Postcopy;
                    st.report.handover = "postcopy".into();
                    st.report.downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
                    drop(st);
                    self.eviction_start = Some(Instant::now());
                }
                return Err(f.error);
            }
            // Rolled back: the guest runs here again (if it ran before).
            Err(f) => {
                return Err(match f.resume_error {
                    None => f.error,
                    Some(re) => LinkError::Io(std::io::Error::other(format!(
                        "{}; resuming the source failed too: {re}",
                        f.error
                    ))),
                })
            }
        }
        super::trace(format_args!(
            "switch-over: paused+harvest {t_harvest:?} ({final_pages} pages to send), state \
             {t_state:?} ({state_bytes} bytes), sent {t_sent:?}, resumed {:?}",
            t_pause.elapsed()
        ));
        let early = self.commit_early();
        let rtt_ms = self.rtt.as_secs_f64() * 1e3;
        let mut st = self.st();
        st.report.downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        st.report.dest_load_ms = load_us as f64 / 1e3;
        st.report.switch_round_trips = round_trips;
        st.report.commit = if early { "with-state" } else { "after-ready" }.into();
        st.report.rtt_ms = rtt_ms;
        if mode == SwitchMode::Postcopy {
            st.report.stale_pages = count(&stale);
            st.report.final_harvest_pages = final_new;
        }
        st.report.handover = match mode {
            SwitchMode::StopAndCopy => "stop-and-copy",
            SwitchMode::Postcopy => "postcopy",
        }
        .into();
        match mode {
            SwitchMode::StopAndCopy => Ok(Some(Outcome::Moved)),
            SwitchMode::Postcopy => {
                st.phase = Phase::Postcopy;
                st.report.eviction_ms = 0.0;
                drop(st);
                self.eviction_start = Some(Instant::now());
                Ok(None)
            }
        }
    }

    /// After `commit`: the destination's `resumed` (faults can come first: the guest runs).
    fn await_resumed(&mut self) -> Result<(), LinkError> {
        loop {
            match self.link.expect(Duration::from_secs(30), "resumed")? {
                Frame::Resumed { .. } => {
                    self.confirmed = true;
                    return Ok(());
                }
                Frame::Fault(pages) => {
                    let mut st = self.st();
                    st.report.remote_faults += pages.len() as u64;
                    st.faults.extend(pages.iter().copied());
                    st.fault_events.extend(pages);
                }
                other => return Err(other_frame("resumed", other)),
            }
        }
    }

    /// Post-copy's send queue: the kernel takes at most `queue_cap` unsent bytes
    /// (TCP_NOTSENT_LOWAT; a write beyond waits in TLS, and the socket polls writable once
    /// below), sized to [`POSTCOPY_QUEUE`] at the measured rate. Without it the socket's
    /// buffer holds up to a MiB of pushed pages ahead of a faulted one: 80 ms at 100 Mbit/s,
    /// paid by every fault. Scatter-Gather measures the link's backlog itself (its
    /// `high_water`) and keeps the kernel's buffer.
    fn postcopy_queue(&mut self) {
        if !self.paced() {
            return;
        }
        // The delivery rate too: a push paced from its start has no send rate yet.
        let rate = self.st().rate_bps.max(self.pc_rate);
        let cap = ((rate as f64 * POSTCOPY_QUEUE.as_secs_f64()) as u64)
            .clamp(POSTCOPY_QUEUE_MIN, POSTCOPY_QUEUE_MAX);
        // Moved by a quarter at least, so that a rate's jitter does not reset it each time.
        if self.queue_cap != 0 && cap.abs_diff(self.queue_cap) < self.queue_cap / 4 {
            return;
        }
        let v = cap as libc::c_int;
        // SAFETY: setsockopt with a valid int option on the link's own socket.
        let r = unsafe {
            libc::setsockopt(
                self.link.fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            self.queue_cap = cap;
            let mut st = self.st();
            st.report.postcopy_queue_cap_bytes = st.report.postcopy_queue_cap_bytes.max(cap);
        }
    }

    /// Post-copy: pushed pages queue behind each other only while TLS holds none the socket
    /// refused; meanwhile wait (at most 5 ms) for the socket to take more, or for a fault.
    fn queue_full(&mut self) -> Result<bool, LinkError> {
        if self.queue_cap == 0 || self.link.pending_tls() == 0 {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd: self.link.fd(),
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 5) };
        // Reads what came (faults) and hands TLS's bytes to the socket.
        self.read_incoming(Duration::ZERO)?;
        Ok(true)
    }

    /// Post-copy: the pushed bytes the destination has not read yet — in our socket, in the
    /// link's queues (a router's buffer, a relay's: 1–2 MB, 100 ms and more at 100 Mbit/s,
    /// on the test WAN, invisible to our socket) and in its socket — stay within a window of
    /// the link's round trip plus half of it (2 ms at least) at the fastest rate seen.
    /// Every faulted page queues behind them, so they bound its wait. What the destination
    /// has read comes back as the answers to `sync`s sent every eighth of a round trip.
    /// True: full (waited for an answer or a fault, 2 ms at most).
    fn window_full(&mut self) -> Result<bool, LinkError> {
        if self.scatter.is_some() {
            return Ok(false);
        }
        // The `sync`s go also before the push is paced: their answers show a queue.
        let every = (self.rtt / 8).clamp(Duration::from_millis(1), Duration::from_millis(10));
        if self.pc_last_sync.elapsed() >= every && self.pc_syncs.len() < 256 {
            self.link.send(&Frame::Sync)?;
            self.pc_last_sync = Instant::now();
            if self.pc_syncs.is_empty() && self.pc_acked == 0 {
                // What went before the first `sync` counts as read until its answer.
                self.pc_acked = self.link.wire_bytes;
            }
            self.pc_syncs
                .push_back((self.pc_last_sync, self.link.wire_bytes));
        }
        if !self.paced() {
            return Ok(false);
        }
        let rate = self.st().rate_bps;
        self.pc_rate = self.pc_rate.max(rate);
        // A post-copy at once has no rate yet: the least window, growing with the rate.
        let window = self.window(self.pc_rate);
        {
            let mut st = self.st();
            st.report.postcopy_window_bytes = st.report.postcopy_window_bytes.max(window);
        }
        if self.link.wire_bytes.saturating_sub(self.pc_acked) < window {
            return Ok(false);
        }
        if !self.long_link()
            && self
                .pc_syncs
                .front()
                .is_some_and(|(sent, _)| sent.elapsed() >= self.rtt + READER_STALLED)
        {
            return Ok(false); // the sockets' buffers bound the push meanwhile
        }
        self.await_answer()
    }

    fn postcopy_step(&mut self) -> Result<Option<Outcome>, LinkError> {
        self.read_incoming(Duration::ZERO)?;
        self.scatter_finished(Duration::ZERO)?;
        if self.over_budget() && self.st().faults.is_empty() {
            self.throttle();
            return Ok(None);
        }
        self.postcopy_queue();
        // A fault goes at once, ahead of what waits; anything else waits for room.
        if self.st().faults.is_empty() && (self.queue_full()? || self.window_full()?) {
            return Ok(None);
        }
        // Faults and pre-paging go on the link; the background push may be scattered.
        let (background, fault) = {
            let st = self.st();
            (
                st.faults.is_empty() && st.urgent.is_empty(),
                !st.faults.is_empty(),
            )
        };
        // Scatter-Gather's background push: on the link while it keeps up (what TLS holds
        // beyond the socket counts as behind), else to a worker with room; with neither,
        // wait for either here, where a fault is not held up behind a batch already taken.
        let mut route = None;
        if background {
            if let Some(sc) = &self.scatter {
                let direct = sc.link_keeps_up(self.link.fd(), self.link.pending_tls())?;
                if !direct && !sc.has_room() {
                    self.scatter_finished(Duration::from_millis(2))?;
                    return Ok(None);
                }
                route = Some(direct);
            }
        }
        // A batch for the intermediaries is as wide as a record spans: no fault waits behind
        // it, and each worker's round trips carry more pages.
        if let Some((first, span, sel)) = self.next_batch(route == Some(false)) {
            if fault {
                // What the faulted page queues behind (the kernel's unsent bytes).
                let ahead = super::scatter::unsent_bytes(self.link.fd()).unwrap_or(0);
                let mut st = self.st();
                st.report.fault_queued_max_bytes = st.report.fault_queued_max_bytes.max(ahead);
            }
            if let Some(direct) = route {
                self.scatter_batch(first, span, &sel, direct)?;
            } else {
                self.send_batch(first, span, &sel)?;
            }
            return Ok(None);
        }
        // Scatter-Gather: batches still at the workers; their records come first (faults
        // are served meanwhile).
        if self.scatter.as_ref().is_some_and(|sc| sc.in_flight() > 0) {
            self.scatter_finished(Duration::from_millis(5))?;
            return Ok(None);
        }
        // Everything is sent: say so and wait for the destination to confirm. With
        // Scatter-Gather, eviction ends at its `complete` (every location received).
        if self.scatter.is_none() {
            if let Some(t) = self.eviction_start.take() {
                self.st().report.eviction_ms = t.elapsed().as_secs_f64() * 1e3;
            }
        }
        self.link.send(&Frame::Done)?;
        self.link.flush(Duration::from_secs(30))?;
        loop {
            match self.link.expect(Duration::from_secs(60), "complete")? {
                Frame::Complete {
                    faults,
                    fault_mean_us,
                    fault_max_us,
                    fault_p99_us,
                } => {
                    let mut st = self.st();
                    st.report.remote_faults = st.report.remote_faults.max(faults);
                    st.report.fault_latency_mean_us = fault_mean_us;
                    st.report.fault_latency_max_us = fault_max_us;
                    st.report.fault_latency_p99_us = fault_p99_us;
                    drop(st);
                    if self.scatter.is_some() {
                        if let Some(t) = self.eviction_start.take() {
                            self.st().report.eviction_ms = t.elapsed().as_secs_f64() * 1e3;
                        }
                        self.scatter_report();
                    }
                    return Ok(Some(Outcome::Evicted));
                }
                // Faults racing with `done` are for pages already on their way, answers to
                // the last `sync`s for bytes read.
                Frame::Fault(_) | Frame::Sync => {}
                other => return Err(other_frame("complete", other)),
            }
        }
    }

    /// Post-copy lost its connection: reconnect (the destination waits for us), learn which
    /// pages it still lacks and go on.
    fn recover(&mut self, cause: LinkError) -> Result<(), SourceError> {
        tracing::warn!("migration: post-copy connection lost ({cause}); reconnecting");
        {
            let mut st = self.st();
            st.phase = Phase::Recovering;
            let bytes = self.link.wire_bytes;
            st.report.bytes_per_link.push(bytes);
        }
        self.link.wire_bytes = 0;
        let deadline = Instant::now() + self.cfg.recovery_timeout;
        loop {
            if Instant::now() >= deadline {
                return Err(SourceError::Unreachable {
                    cause,
                    timeout: self.cfg.recovery_timeout,
                });
            }
            match hello(&self.cfg, self.ram.size(), self.session, true) {
                Ok(mut link) => match link.expect(Duration::from_secs(10), "needed") {
                    Ok(Frame::Needed(bits)) if bits.len() == self.st().needed.len() => {
                        let mut st = self.st();
                        // Pages in flight when the link broke are sent again.
                        st.pending_count = count(&bits);
                        st.pending = bits.clone();
                        st.needed = bits;
                        st.faults.clear();
                        st.phase = Phase::Postcopy;
                        st.report.recoveries += 1;
                        drop(st);
                        // Only a destination that took the guest over waits for us.
                        self.confirmed = true;
                        self.link = link;
                        self.link.for_postcopy();
                        self.queue_cap = 0; // a new socket: set again
                        self.pc_syncs.clear();
                        self.pc_acked = 0;
                        self.pc_delays.clear();
                        self.pc_delivery = DeliveryRate::new(DELIVERY_SPAN);
                        tracing::info!("migration: post-copy connection restored");
                        return Ok(());
                    }
                    Ok(other) => tracing::warn!("migration: recovery got {}", other.name()),
                    Err(e) => tracing::warn!("migration: recovery: {e}"),
                },
                Err(e) => tracing::debug!("migration: reconnect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Applies the service's throttle (here, on the sender's thread: the vCPU threads are
    /// kicked with a signal, which a service's thread may not send). A VMM that cannot
    /// throttle leaves the guest at full speed: the migration goes on, as without it.
    fn throttle_vcpus(&mut self, percent: u8) {
        let vm = &self.src.vm;
        // Noted before the call: a throttle that reached some vCPUs only is lifted too.
        self.vcpu_throttled_base
            .get_or_insert_with(|| vm.throttled_ms());
        if let Err(e) = vm.set_throttle(percent) {
            tracing::warn!("migration: the guest cannot be throttled: {e}");
            return;
        }
        tracing::info!(
            "migration: the guest's vCPUs throttled to {percent} % at {:.1} ms",
            self.src.started.elapsed().as_secs_f64() * 1e3
        );
        let mut st = self.st();
        st.report.vcpu_throttle_max = st.report.vcpu_throttle_max.max(percent);
    }

    fn finish(&mut self, r: Result<Outcome, SourceError>) {
        // The guest runs at full speed again wherever it goes on (here after a failure).
        if let Some(base) = self.vcpu_throttled_base {
            if let Err(e) = self.src.vm.set_throttle(0) {
                tracing::error!("migration: lifting the guest's throttle failed: {e}");
            }
            let ms = self.src.vm.throttled_ms() - base;
            self.st().report.vcpu_throttled_ms = ms;
        }
        // Either way the disks are no longer tracked; a write waiting for the destination
        // completes here.
        let confirmed = self.confirmed;
        let disk = self.disk.as_mut().map(|d| {
            d.abandon();
            // The destination resumed: both images hold the hand-over's generation.
            if confirmed {
                d.departed();
            }
            d.report()
        });
        self.scatter_report();
        let mut st = self.st();
        if disk.is_some() {
            st.report.disk = disk;
        }
        st.report.bytes_per_link.push(self.link.wire_bytes);
        st.report.bytes = st.report.bytes_per_link.iter().sum();
        st.report.total_ms = self.src.started.elapsed().as_secs_f64() * 1e3;
        super::trace(format_args!(
            "source: sender thread CPU {:.1} ms, reading guest memory {:.1} ms; link: {}",
            super::thread_cpu_ms(),
            self.t_read.as_secs_f64() * 1e3,
            self.link.stats
        ));
        match r {
            Ok(_) => {
                st.phase = Phase::Completed;
                st.report.source_vm = "moved".into();
            }
            Err(e) => {
                if let Some(h) = &self.src.hold {
                    h.abort();
                }
                // Before the commit the source is intact: run it again. After it, the guest
                // may run at the destination: stay paused and say so.
                let resumable = st.phase == Phase::Precopy && !self.committed;
                st.phase = Phase::Failed;
                // The report and the status carry the text.
                let mut msg = e.to_string();
                // Post-copy whose destination confirmed runs there (its failure says so);
                // unconfirmed, it may or may not.
                if self.committed && (st.report.handover != "postcopy" || !self.confirmed) {
                    st.in_doubt = true;
                    msg = format!(
                        "IN DOUBT: the hand-over was committed but the destination never \
                         confirmed it ({msg}). The guest may be running there, so it stays \
                         PAUSED here with its memory and state intact. If the destination does \
                         not run it, resume it here with `spanvmm ctl resume`"
                    );
                } else if self.paused && resumable && self.stopped_running {
                    if let Err(re) = self.src.vm.resume() {
                        msg = format!("{msg}; resuming the source failed too: {re}");
                    }
                }
                st.report.source_vm = if self.src.vm.running() {
                    "running"
                } else {
                    "paused"
                }
                .into();
                tracing::error!("migration failed: {msg}");
                st.error = Some(msg);
            }
        }
        let s = Sample {
            t_ms: self.src.started.elapsed().as_millis() as u64,
            sent: st.report.pages_sent,
            dirtied: st.dirtied,
            faults: st.report.remote_faults,
        };
        st.report.timeline.push(s);
        // Ended: a guest left paused here is the operator's again (e.g. `ctl resume` in doubt).
        self.src.held.store(false, Ordering::Release);
    }
}

/// Adds harvested dirty pages to the pending set; how many were not pending yet.
fn fold_dirty(st: &mut State, dirty: &[u64]) -> u64 {
    st.dirtied += count(dirty);
    let mut new_pages = 0;
    for (i, w) in dirty.iter().enumerate().take(st.pending.len()) {
        let new = w & !st.pending[i];
        new_pages += new.count_ones() as u64;
        st.pending[i] |= w;
    }
    st.pending_count += new_pages;
    new_pages
}

/// The pages the destination lacks or holds an old copy of: pending (queued or dirtied, not
/// sent since) or never sent.
fn lacking(st: &State, pages: u64) -> Vec<u64> {
    let mut lacking = st.pending.clone();
    for (i, w) in lacking.iter_mut().enumerate() {
        *w |= !st.sent_ever[i];
    }
    let tail = pages % 64;
    if tail != 0 {
        *lacking.last_mut().expect("at least one word") &= (1u64 << tail) - 1;
    }
    lacking
}

/// The migration's transport of the hand-over: the link carries the last pages and the state
/// (or, for post-copy, the state and the pages the destination still needs).
struct Switch<'s, 'a> {
    tx: &'s mut Sender<'a>,
    mode: SwitchMode,
    final_dirty: Option<Harvest>,
    t_pause: Instant,
    t_harvest: Duration,
    t_state: Duration,
    t_sent: Duration,
    final_pages: u64,
    load_us: u64,
    /// See [`MigrationReport::switch_round_trips`].
    round_trips: u32,
    sent_since_reply: bool,
    /// Post-copy: the pages the vCPUs touch first (see [`first_touch_pages`]).
    first: Vec<u64>,
    /// The state captured with the pause.
    state: Option<Vec<u8>>,
    state_bytes: usize,
    /// Post-copy: the pages named in the `stale` frame before the pause.
    stale: Vec<u64>,
    /// Post-copy: the final harvest's pages not named stale before.
    final_new: u64,
}

impl Switch<'_, '_> {
    /// Post-copy: the destination holds old copies of the pages queued and not sent (a switch
    /// to post-copy does not wait for them) and of those dirtied since; dropping them once
    /// the state has come took the pause 20 ms for a 64 MiB working set (a hole punched and
    /// the mappings invalidated per range). Named now, they go while the guest still runs
    /// here, and the pause is left with the few the final harvest finds. Harvested first, so
    /// that the frame names what the guest dirtied until now. Every page it names is in the
    /// state's *needed* (the destination refuses a state that leaves one out).
    fn send_stale(&mut self) -> Result<(), LinkError> {
        let tx = &mut *self.tx;
        if let Some(harvest) = self.final_dirty.as_mut() {
            let dirty = harvest()?;
            fold_dirty(&mut tx.st(), &dirty);
        }
        let stale = lacking(&tx.st(), tx.src.pages);
        tx.link.send(&Frame::Stale(stale.clone()))?;
        super::trace(format_args!(
            "source: {} stale pages named before the pause",
            count(&stale)
        ));
        self.stale = stale;
        Ok(())
    }

    fn sent(&mut self) {
        self.sent_since_reply = true;
    }

    /// Before waiting for a reply: a new round trip if something left since the last one.
    fn awaiting_reply(&mut self) {
        if std::mem::take(&mut self.sent_since_reply) {
            self.round_trips += 1;
        }
    }
}

impl handover::Handover for Switch<'_, '_> {
    type Error = LinkError;

    fn prepare(&mut self) -> Result<(), LinkError> {
        // The disks leave the synchronous phase before the pause: the pause waits for the
        // device, which must not be waiting for this thread.
        let tx = &mut *self.tx;
        if let Some(d) = &mut tx.disk {
            d.leave_sync(&mut tx.link)?;
        }
        // Agile: the parked pages' store goes before the state (a post-copy sends their
        // locations after it, when the destination takes no `store` any more).
        tx.send_parked_store()?;
        if self.mode == SwitchMode::Postcopy {
            self.send_stale()?;
        }
        // Let what is queued on the path drain while the guest still runs: a stop-and-copy
        // pauses once the last pages have left the bottleneck (see `past_bottleneck`: the final
        // copy follows them, waiting behind none), a post-copy once everything has arrived
        // (the stale copies gone: the answer comes once they have). Each `sync` answers in
        // order; those left unanswered here come before `ready`.
        let tx = &mut *self.tx;
        tx.send_delivery_sync(true)?;
        tx.link.flush(SYNC_TIMEOUT)?;
        let all = self.mode == SwitchMode::Postcopy;
        loop {
            tx.credit_delivered(None);
            let st = lock(&tx.src.st);
            let on_its_way = st.pages_delivered >= st.report.pages_sent;
            drop(st);
            if tx.delivery_syncs.is_empty() || (on_its_way && !all) {
                break;
            }
            tx.check_delivery()?;
            match tx.link.recv(Duration::from_millis(1))? {
                Some(Frame::Sync) => tx.delivery_answered(),
                Some(other) => return Err(other_frame("sync", other)),
                None => {}
            }
        }
        let mut st = lock(&tx.src.st);
        st.pages_delivered = st.report.pages_sent;
        drop(st);
        if all {
            tx.link.for_postcopy();
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<bool, LinkError> {
        self.t_pause = Instant::now();
        let tx = &mut *self.tx;
        tx.src.held.store(true, Ordering::Release);
        lock(&tx.src.st).report.switch_unix_us = super::hold::unix_us();
        // The state is taken with the pause: the vCPUs' registers do not change once they
        // stopped, and the final harvest and pages that come before it need no vCPU.
        let was_running = tx.src.vm.running();
        match tx.src.vm.pause_and_capture() {
            Ok((ran, state)) => {
                tx.stopped_running = ran;
                self.state = Some(state);
            }
            Err(e) => {
                // Paused but no state: the hand-over fails before its state step, which
                // does not roll back, so run the guest again here.
                if was_running && !tx.src.vm.running() {
                    let _ = tx.src.vm.resume();
                }
                return Err(e.into());
            }
        }
        tx.paused = true;
        Ok(tx.stopped_running)
    }

    fn send_state(&mut self) -> Result<(), LinkError> {
        let tx = &mut *self.tx;
        // The guest is paused: the blocks written since the disks left the synchronous phase
        // go now, so the destination's disks are exact at resume.
        if let Some(d) = &mut tx.disk {
            d.final_copy(&mut tx.link)?;
            let rep = d.report();
            lock(&tx.src.st).report.disk = Some(rep);
        }
        // Pages dirtied since the service's last harvest, now final.
        let dirty = match self.final_dirty.take() {
            Some(mut harvest) => harvest()?,
            None => Vec::new(),
        };
        self.final_new = fold_dirty(&mut tx.st(), &dirty);
        self.t_harvest = self.t_pause.elapsed();
        self.final_pages = tx.st().pending_count;
        let state = match self.state.take() {
            Some(s) => s,
            None => tx.src.vm.capture_state()?,
        };
        self.t_state = self.t_pause.elapsed();
        self.state_bytes = state.len();
        self.sent_since_reply = true;
        match self.mode {
            SwitchMode::StopAndCopy => {
                while let Some((first, span, sel)) = tx.next_batch(false) {
                    tx.send_batch(first, span, &sel)?;
                }
                tx.link.send(&Frame::State {
                    handover: Handover::Complete,
                    state,
                    needed: Vec::new(),
                })
            }
            SwitchMode::Postcopy => {
                self.first = first_touch_pages(&tx.ram, &state);
                let needed = {
                    let mut st = tx.st();
                    let mut needed = lacking(&st, tx.src.pages);
                    // Nothing was sent since the stale frame; its pages are in by construction.
                    for (w, s) in needed.iter_mut().zip(&self.stale) {
                        *w |= s;
                    }
                    st.needed = needed.clone();
                    st.postcopy_sent = vec![0; needed.len()];
                    // The background push walks what the destination lacks, in address order.
                    st.pending = needed.clone();
                    st.pending_count = count(&needed);
                    st.cursor = 0;
                    needed
                };
                tx.link.send(&Frame::State {
                    handover: Handover::Postcopy,
                    state,
                    needed,
                })
            }
        }
    }

    /// `commit` may travel with the state (`SourceConfig::commit`), in both hand-overs: the
    /// destination still runs the guest only on `commit`, sent once the source has stopped
    /// it for good.
    fn early_commit(&self) -> bool {
        self.tx.commit_early()
    }

    fn await_ready(&mut self) -> Result<(), NotReady<LinkError>> {
        self.awaiting_reply();
        self.tx
            .link
            .flush(Duration::from_secs(30))
            .map_err(NotReady::Lost)?;
        self.t_sent = self.t_pause.elapsed();
        let timeout = Duration::from_secs(30);
        // An `error` frame here is the destination refusing the state, not a lost link: it
        // will not run the guest, so even after an early commit the source may (the link's
        // `expect` would turn it into an error indistinguishable from a loss: in doubt).
        // The answers to the `sync`s the pre-pause wait did not wait for come first.
        let answer = match loop {
            match self.tx.link.recv(timeout) {
                Ok(Some(Frame::Sync)) if !self.tx.delivery_syncs.is_empty() => {
                    self.tx.delivery_answered()
                }
                other => break other,
            }
        } {
            Ok(Some(Frame::Error(why))) => {
                return Err(NotReady::Refused(LinkError::Io(std::io::Error::other(
                    format!("the peer gave up: {why}"),
                ))))
            }
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(LinkError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no ready from the peer within {timeout:?}"),
            ))),
            Err(e) => Err(e),
        };
        match answer {
            Ok(Frame::Ready { load_us }) => {
                self.load_us = load_us;
                // Synchronized arrival's second gate: no commit before the release.
                let tx = &mut *self.tx;
                if let Some(h) = &tx.src.hold {
                    let cancel = &tx.src.cancel;
                    if let Err(why) = h.await_commit(|| cancel.load(Ordering::Acquire)) {
                        // The destination drops the VM it built instead of waiting for us.
                        let _ = tx.link.send(&Frame::Error(why.clone()));
                        let _ = tx.link.flush(Duration::from_secs(1));
                        tx.hold_failure = Some(why.clone());
                        return Err(NotReady::Refused(LinkError::Io(std::io::Error::other(why))));
                    }
                }
                Ok(())
            }
            // The destination answered other than `ready` (it refused the state): it never
            // runs the guest, so the source may, whatever it sent.
            Ok(other) => Err(NotReady::Refused(other_frame("ready", other))),
            Err(e) => Err(NotReady::Lost(e)),
        }
    }

    fn commit(&mut self) -> Result<(), LinkError> {
        // The point of no return: once `commit` may have left, the guest may run there, so it
        // never runs here again (a lost link leaves it paused "in doubt", or in post-copy
        // recovery).
        self.sent();
        let tx = &mut *self.tx;
        tx.committed = true;
        tx.link.send(&Frame::Commit {
            run: tx.stopped_running,
        })?;
        if self.mode == SwitchMode::Postcopy {
            // Committed: post-copy from here (a lost link goes to recovery). What the vCPUs
            // touch first goes right behind the commit, as if faulted, without waiting for
            // `ready` or `resumed` (each would otherwise cost the resumed guest a round trip
            // of its own), and the rest of each one's group as pre-paging.
            let mut st = tx.st();
            st.phase = Phase::Postcopy;
            for &p in &self.first {
                st.faults.push_back(p);
                let g = p & !(FIRST_TOUCH_GROUP - 1);
                st.urgent
                    .push_back((g, (g + FIRST_TOUCH_GROUP).min(tx.src.pages)));
            }
            drop(st);
            while !tx.st().faults.is_empty() {
                let Some((first, span, sel)) = tx.next_batch(false) else {
                    break;
                };
                tx.send_batch(first, span, &sel)?;
            }
            tx.st().report.first_touch_pages = self.first.len() as u64;
        }
        tx.link.flush(Duration::from_secs(30))
    }

    fn await_running(&mut self) -> Result<(), LinkError> {
        self.awaiting_reply();
        self.tx.await_resumed()
    }

    fn undo(&mut self) {
        // A refused state after an early commit: the destination will not run the guest.
        self.tx.committed = false;
        if self.mode == SwitchMode::Postcopy {
            self.tx.st().phase = Phase::Precopy; // no post-copy to recover: rolled back
        }
    }

    fn resume(&mut self) -> Result<(), LinkError> {
        // Resumed once, here: `finish` finds the guest running and leaves it.
        self.tx.paused = false;
        Ok(self.tx.src.vm.resume()?)
    }
}

fn other_frame(wanted: &str, f: Frame) -> LinkError {
    LinkError::Io(std::io::Error::other(format!(
        "expected {wanted} from the destination, got {}",
        match f {
            Frame::Error(m) => format!("an error: {m}"),
            f => f.name().to_string(),
        }
    )))
}
