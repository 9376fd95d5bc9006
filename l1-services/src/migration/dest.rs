//! The destination side: accept the source (mutual TLS), fill guest RAM from `pages` frames,
//! take the VM state, and for a post-copy hand-over serve the guest's missing pages with
//! userfaultfd while the source pushes the rest. A broken post-copy connection is waited out:
//! vCPUs that touch a missing page wait, and the source reconnects and resumes the push.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base_vmm::memory::GuestRam;
use base_vmm::page_server::{
    FaultOnly, Fetched, PageError, PageServer, PageSource, PageStats, PrePaging, Why,
};
use rustls::ServerConfig;
use serde::Serialize;

use super::intermediary::PageStore;
use super::link::{Link, LinkError};
use super::scatter::{AheadRead, GatherPolicy, GatherSource, GatherStats, Locations};
use super::wire::{self, Frame, Handover, PAGE, VERSION};
use super::{bit, clear_bit, count, set_bit, Phase};
use crate::ctx::lock;

/// How long the destination waits for the source to say anything before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one connecting peer may take for TLS and `hello` together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; a connection beyond them is refused at once. Each runs
/// on a thread of its own, so idle peers cannot hold up a source behind them.
const MAX_HANDSHAKES: usize = 16;
/// What [`receive`] returns when [`MigrationDest::cancel`] stopped the wait.
pub const CANCELLED: &str = "the wait for an incoming migration was cancelled";

/// A VM that has arrived: its memory (complete, or filling in by post-copy) and its state.
pub struct Arrived {
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The VM state (state-file format).
    pub state: Vec<u8>,
    /// How the source handed over.
    pub handover: Handover,
    /// The KVM VM and vCPUs, built while pages streamed in (None: build them now).
    pub prepared: Option<base_vmm::vmm::PreparedVm>,
    received_at: Instant,
    link: Option<Link>,
    /// Post-copy: the fault service, started once the source commits.
    postcopy: Option<Postcopy>,
    dest: Arc<MigrationDest>,
}

/// Destination-side progress, for status and the report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DestProgress {
    /// Where the migration is: `waiting` (for a source), then as [`Phase`].
    pub phase: String,
    /// The source's address, once one has authenticated and said hello.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Pages received (data and zero markers).
    pub pages_received: u64,
    /// Post-copy: pages still missing.
    pub pages_needed: u64,
    /// Faults requested from the source.
    pub remote_faults: u64,
    /// Mean fault latency, µs.
    pub fault_latency_mean_us: u64,
    /// Worst fault latency, µs.
    pub fault_latency_max_us: u64,
    /// 99th percentile fault latency, µs.
    pub fault_latency_p99_us: u64,
    /// Connections lost and restored during post-copy.
    pub recoveries: u64,
    /// Pages dropped from guest memory so that the guest faults on them, before the state
    /// (the guest still running at the source): agile's located pages (parked at the
    /// intermediaries) at the source's `sync`, post-copy's stale copies as the source's
    /// `stale` frames named them.
    pub dropped_before_state: u64,
    /// Pages dropped from guest memory when the state came: inside the downtime (post-copy's
    /// stale copies, and located pages that came after the last `sync`).
    pub dropped_at_state: u64,
    /// Scatter-Gather: pages and bytes read from the intermediaries (bytes per
    /// intermediary: intermediaries → destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gather: Option<GatherStats>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The destination's view of a migration, shared with its post-copy thread.
pub struct MigrationDest {
    phase: Mutex<(Phase, Option<String>)>,
    received: AtomicU64,
    needed: AtomicU64,
    /// The post-copy page server's counters (faults and their latency).
    pages: Arc<PageStats>,
    recoveries: AtomicU64,
    /// See [`DestProgress::dropped_before_state`] and [`DestProgress::dropped_at_state`].
    dropped_before_state: AtomicU64,
    dropped_at_state: AtomicU64,
    /// The source's address once it said hello (None: still waiting for one).
    source: Mutex<Option<SocketAddr>>,
    /// Stop waiting (before the hand-over only), see [`MigrationDest::cancel`].
    cancelled: AtomicBool,
    /// Scatter-Gather: what the gather read from the intermediaries.
    gather: Mutex<Option<GatherStats>>,
}

impl MigrationDest {
    /// A destination waiting for its source; give it to [`receive`].
    pub fn waiting() -> Arc<Self> {
        Arc::new(MigrationDest {
            phase: Mutex::new((Phase::Precopy, None)),
            received: AtomicU64::new(0),
            needed: AtomicU64::new(0),
            pages: Arc::new(PageStats::default()),
            recoveries: AtomicU64::new(0),
            dropped_before_state: AtomicU64::new(0),
            dropped_at_state: AtomicU64::new(0),
            source: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            gather: Mutex::new(None),
        })
    }

    /// Ends the wait for the source (the destination is being shut down): [`receive`] returns
    /// [`CANCELLED`] soon, telling a source already connected to give up (it keeps the guest).
    /// Once the state has arrived the hand-over is not interrupted any more.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Whether [`MigrationDest::cancel`] was called.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Where the migration is.
    pub fn phase(&self) -> Phase {
        lock(&self.phase).0
    }

    /// Progress so far.
    pub fn progress(&self) -> DestProgress {
        let (phase, error) = lock(&self.phase).clone();
        let faults = self.pages.served.load(Ordering::Relaxed);
        let source = *lock(&self.source);
        DestProgress {
            phase: match (phase, source) {
                (Phase::Precopy, None) => "waiting".into(),
                _ => format!("{phase:?}").to_lowercase(),
            },
            source: source.map(|a| a.to_string()),
            pages_received: self.received.load(Ordering::Relaxed),
            pages_needed: self.needed.load(Ordering::Relaxed),
            remote_faults: faults,
            fault_latency_mean_us: self.pages.latency_mean_us(),
            fault_latency_max_us: self.pages.latency_max_us.load(Ordering::Relaxed),
            fault_latency_p99_us: self.pages.latency_p99_us(),
            recoveries: self.recoveries.load(Ordering::Relaxed),
            dropped_before_state: self.dropped_before_state.load(Ordering::Relaxed),
            dropped_at_state: self.dropped_at_state.load(Ordering::Relaxed),
            gather: lock(&self.gather).clone(),
            error,
        }
    }

    fn set(&self, phase: Phase, error: Option<String>) {
        *lock(&self.phase) = (phase, error);
    }
}

/// Why an incoming migration failed or a peer was refused. The texts are what the source
/// hears in its `error` frame and what the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// The wait was cancelled ([`CANCELLED`]).
    #[error("{}", CANCELLED)]
    Cancelled,
    /// A system call on the way failed.
    #[error("{what}: {err}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        err: std::io::Error,
    },
    /// The listening socket could not be duplicated.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] base_vmm::memory::MemoryError),
    /// A helper thread panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// The accept thread is gone.
    #[error("the migration listener stopped")]
    ListenerStopped,
    /// The connection failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The peer's first frame is not `hello`.
    #[error("expected hello, got {0}")]
    NotHello(&'static str),
    /// The peer speaks another wire version.
    #[error("wire version {0}, this destination speaks {VERSION}")]
    Version(u32),
    /// A reconnection of another session, or a new migration where a session is awaited.
    #[error("not the migration this destination is waiting for")]
    NotAwaited,
    /// A guest size this destination does not take.
    #[error("guest memory size {0} is not acceptable")]
    MemorySize(u64),
    /// Anything that ends the migration before the hand-over.
    #[error("incoming migration failed before the hand-over: {0}")]
    BeforeHandover(LinkError),
    /// A post-copy bitmap that does not match guest memory.
    #[error("post-copy bitmap has {got} words, guest memory {want}")]
    Bitmap {
        /// Words sent.
        got: usize,
        /// Words of guest memory.
        want: usize,
    },
    /// The machine description is not valid JSON for a machine.
    #[error("machine description: {0}")]
    Machine(serde_json::Error),
    /// The source sent an `error` frame.
    #[error("the source gave up: {0}")]
    SourceGaveUp(String),
    /// A frame the source must not send before the state.
    #[error("unexpected {0} frame before the state")]
    BeforeState(&'static str),
    /// The page writer was asked twice.
    #[error("the page writer already finished")]
    WriterFinished,
    /// A malformed `pages` frame.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Pages outside guest memory.
    #[error("pages {first}+{span} run past guest memory")]
    PastEnd {
        /// First page.
        first: u64,
        /// Pages in the frame.
        span: u64,
    },
    /// A `cnet` page that cannot be decoded.
    #[error(transparent)]
    Cnet(#[from] super::cnet::CnetError),
    /// Data left over after the last page of a frame.
    #[error("pages frame has {0} stray bytes after its last page")]
    Stray(usize),
    /// The state leaves out pages the source had this destination drop as stale.
    #[error(
        "{0} stale page(s) dropped here are missing from the state's needed: they would read \
         as zeros"
    )]
    StaleUnsent(u64),
    /// A stale page could not be dropped.
    #[error("dropping a stale page: {0}")]
    Punch(std::io::Error),
    /// `commit` without the connection.
    #[error("the hand-over has no connection")]
    NoConnection,
    /// The source did not commit: the guest stays there.
    #[error("the source did not commit the hand-over ({0}): the guest stays there")]
    NotCommitted(LinkError),
    /// Another frame where `commit` was due.
    #[error("expected commit, got {0}")]
    NotCommit(&'static str),
    /// `resumed` could not be sent (the guest runs here anyway).
    #[error("telling the source the guest runs here: {0}")]
    Resumed(LinkError),
    /// Post-copy pages in a cache codec.
    #[error("post-copy pages in codec {0}")]
    PostcopyCodec(u8),
    /// `done` while pages are missing.
    #[error("the source says it is done but {0} pages are missing")]
    Missing(u64),
    /// A frame out of place in post-copy.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// Scatter-Gather: a `store` or `located` frame refused, or the intermediaries failed.
    #[error("scatter-gather: {0}")]
    Scatter(String),
    /// The page server failed.
    #[error(transparent)]
    Pages(#[from] PageError),
    /// A disk frame refused.
    #[error(transparent)]
    Disk(#[from] super::disk::DiskError),
    /// The source did not reconnect in time: the pages still missing are lost.
    #[error("the source did not come back within {timeout:?} after {cause}; {lost} pages of the guest are lost")]
    Lost {
        /// The recovery timeout.
        timeout: Duration,
        /// What broke the connection.
        cause: LinkError,
        /// Pages missing.
        lost: u64,
    },
}

/// A protocol error as a link error (the text is kept; the cause stays typed inside).
fn io(e: DestError) -> LinkError {
    LinkError::Io(std::io::Error::other(e))
}

fn os(what: &'static str) -> impl Fn(std::io::Error) -> DestError {
    move |err| DestError::Os { what, err }
}

/// A peer that authenticated and said an acceptable `hello`.
struct Candidate {
    link: Link,
    mem: u64,
    session: u64,
    peer: SocketAddr,
}

/// The first source to authenticate and say an acceptable `hello`: every connection gets a
/// thread of its own for TLS and `hello` with its own deadline, so idle or slow peers cannot
/// hold up the source. The first one through wins (answered `welcome`); every peer refused
/// is reported on stderr once, with the reason. `resume`: only a reconnection of that
/// session is accepted.
struct Acceptor {
    found: mpsc::Receiver<Result<Candidate, DestError>>,
    /// A peer won or the wait ended: the accept thread stops, later peers are turned away.
    done: Arc<AtomicBool>,
}

impl Acceptor {
    fn start(
        listener: &TcpListener,
        tls: Arc<ServerConfig>,
        resume: Option<u64>,
        mem: Option<u64>,
    ) -> Result<Self, DestError> {
        let listener = listener
            .try_clone()
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(os("listener"))?;
        let (tx, found) = mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                accept_loop(listener, tls, resume, mem, tx, d)
            })
            .map_err(os("cannot start the migration listener"))?;
        Ok(Acceptor { found, done })
    }

    /// Waits up to `wait` for the winner; answers it `welcome`. Returns (link, guest memory
    /// bytes, session, address).
    fn next(&mut self, wait: Duration) -> Result<Option<(Link, u64, u64, SocketAddr)>, DestError> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut c = match self.found.recv_timeout(left) {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(DestError::ListenerStopped)
                }
            };
            match c
                .link
                .send(&Frame::Welcome { version: VERSION })
                .and_then(|()| c.link.take_over_records())
            {
                Ok(()) => {
                    self.done.store(true, Ordering::Release);
                    return Ok(Some((c.link, c.mem, c.session, c.peer)));
                }
                Err(e) => tracing::warn!("migration: refused {}: {e}", c.peer),
            }
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        // Peers that got through after the winner: told so, not left waiting.
        while let Ok(Ok(c)) = self.found.try_recv() {
            turn_away(c);
        }
    }
}

fn turn_away(mut c: Candidate) {
    let why = "another source is migrating to this destination";
    tracing::warn!("migration: refused {}: {why}", c.peer);
    let _ = c.link.send(&Frame::Error(why.into()));
    let _ = c.link.flush(Duration::from_secs(1));
}

/// The accept thread of an [`Acceptor`]: polls, so that it notices `done` within 50 ms.
fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    resume: Option<u64>,
    mem: Option<u64>,
    tx: mpsc::Sender<Result<Candidate, DestError>>,
    done: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    while !done.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        let (sock, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => {
                let _ = tx.send(Err(os("accept")(e)));
                return;
            }
        };
        if active.load(Ordering::Acquire) >= MAX_HANDSHAKES {
            tracing::warn!(
                "migration: refused {peer}: {MAX_HANDSHAKES} handshakes already in progress"
            );
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (tls, tx, done, n) = (tls.clone(), tx.clone(), done.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("migrate-handshake".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                match handshake(sock, peer, tls, resume, mem) {
                    Ok(c) if done.load(Ordering::Acquire) => turn_away(c),
                    Ok(c) => {
                        if let Err(mpsc::SendError(Ok(c))) = tx.send(Ok(c)) {
                            turn_away(c);
                        }
                    }
                    Err(why) => tracing::warn!("migration: refused {peer}: {why}"),
                }
                n.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("migration: refused {peer}: no thread for its handshake: {e}");
        }
    }
}

/// TLS and `hello` of one connection, within [`HANDSHAKE_TIMEOUT`]; a refused `hello` is
/// answered with an `error` frame saying why.
fn handshake(
    sock: TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerConfig>,
    resume: Option<u64>,
    mem: Option<u64>,
) -> Result<Candidate, DestError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut link = Link::accept(sock, tls, HANDSHAKE_TIMEOUT)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let (version, mem_bytes, session, is_resume) = match link.expect(left, "hello") {
        Ok(Frame::Hello {
            version,
            mem_bytes,
            session,
            resume,
        }) => (version, mem_bytes, session, resume),
        Ok(other) => return Err(refuse(&mut link, DestError::NotHello(other.name()))),
        Err(e @ LinkError::Wire(_)) => {
            // A malformed frame: say so (a peer that is gone does not hear it).
            return Err(refuse(&mut link, e.into()));
        }
        Err(e) => return Err(e.into()),
    };
    let why = if version != VERSION {
        Some(DestError::Version(version))
    } else if resume.is_some() != is_resume || resume.is_some_and(|s| s != session) {
        Some(DestError::NotAwaited)
    } else if mem.is_some_and(|m| m != mem_bytes)
        || mem_bytes == 0
        || !mem_bytes.is_multiple_of(2 << 20)
        || mem_bytes > 1 << 40
    {
        Some(DestError::MemorySize(mem_bytes))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(refuse(&mut link, why));
    }
    Ok(Candidate {
        link,
        mem: mem_bytes,
        session,
        peer,
    })
}

/// Guest memory made ready while the destination waits for its source (`run --incoming ADDR
/// --memory M`): every page allocated and mapped up front, as QEMU's `-mem-prealloc` does.
/// On this hardware allocating fresh shared memory costs 1.2-2.2 s a GiB, more than the
/// whole transfer, so a destination that knows the guest's size does it before the source
/// connects. A source with a guest of another size is refused.
pub struct PreparedRam {
    size: u64,
    ready: std::thread::JoinHandle<Arc<GuestRam>>,
}

impl PreparedRam {
    /// Creates `size` bytes of guest memory now and populates it on a thread of its own,
    /// which calls `on_ready` when done.
    pub fn start(size: u64, on_ready: impl FnOnce() + Send + 'static) -> Result<Self, DestError> {
        let ram = Arc::new(GuestRam::new(size)?);
        let ready = std::thread::Builder::new()
            .name("populate-ram".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                let _ = ram.populate(0, ram.size());
                on_ready();
                ram
            })
            .map_err(os("cannot start populating guest memory"))?;
        Ok(PreparedRam { size, ready })
    }

    /// Guest memory size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn wait(self) -> Result<Arc<GuestRam>, DestError> {
        self.ready
            .join()
            .map_err(|_| DestError::Panicked("populating guest memory"))
    }
}

/// Receives a VM on `listener`: blocks until the source hands over (or fails, or `dest` is
/// cancelled: [`CANCELLED`]). Returns the guest's memory and state; build the VM from them
/// (vCPUs paused), call [`Arrived::commit`], and only if it succeeds run the vCPUs (if it
/// says so) and call [`Arrived::running`] (else [`Arrived::abort`] or drop). With `prepared`
/// memory only a guest of its size is accepted. `dest` (from [`MigrationDest::waiting`])
/// shows the progress meanwhile.
pub fn receive(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    recovery_timeout: Duration,
    prepared_ram: Option<PreparedRam>,
    dest: Arc<MigrationDest>,
) -> Result<Arrived, DestError> {
    let want = prepared_ram.as_ref().map(PreparedRam::size);
    let (mut link, mem, session) = {
        let mut acceptor = Acceptor::start(&listener, tls.clone(), None, want)?;
        loop {
            if dest.cancelled() {
                return Err(DestError::Cancelled);
            }
            if let Some((link, mem, session, peer)) = acceptor.next(Duration::from_millis(50))? {
                *lock(&dest.source) = Some(peer);
                break (link, mem, session);
            }
        }
    };
    // Every page of prepared memory is present in the memfd (zero until written).
    let populated = prepared_ram.is_some();
    let ram = match prepared_ram {
        Some(p) => p.wait()?,
        None => Arc::new(GuestRam::new(mem)?),
    };
    let pages = mem / PAGE as u64;
    let mut writer = PageWriter::start(ram.clone(), dest.clone(), populated)?;
    let mut prepared = None;
    // Populated memory is the wrong start for a post-copy: every page the guest still lacks
    // must be dropped before it runs (about 0.2 s a GiB, all of it downtime). So beside it
    // the destination keeps a VM on fresh, untouched memory, ready when the machine is
    // known; the hand-over takes whichever is cheaper (see `fresh_is_cheaper`).
    let mut fresh: Option<(Arc<GuestRam>, base_vmm::vmm::PreparedVm)> = None;
    let fail = DestError::BeforeHandover;
    let mut heard = Instant::now();
    // This host's own disks, when it receives the source's (else shared storage).
    let mut disks = super::disk::DiskReceiver::new(base_vmm::devices::virtio::block::local_disks());
    // Once a disk is received, the source may open a connection of its own for the
    // synchronous phase's writes (a second `hello` of this session); its thread ends with
    // this function.
    let mut mirror_acceptor: Option<Acceptor> = None;
    let mut mirror_listening = false;
    let mirror_stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let mut machine_seen = false;
    // Scatter-Gather: the intermediaries the source scatters to, connected as soon as the
    // `store` frame names them (unreachable ones end the migration before the hand-over).
    let mut store: Option<Gather> = None;
    // Agile: the located pages (parked at the intermediaries) must be holes in guest memory
    // when the guest runs, so that it faults on them. They are dropped at the source's
    // `sync` (the writer drained: no earlier data of theirs is still on its way; the source
    // pauses only once answered), not when the state comes: a parked GiB in prepared memory
    // took tens of ms of the downtime there. `located`: located and not sent as data since;
    // `to_drop`: of those, not dropped yet; `holes`: dropped and not written since.
    let words = pages.div_ceil(64) as usize;
    let mut located = vec![0u64; words];
    let mut to_drop = vec![0u64; words];
    let mut holes = vec![0u64; words];
    loop {
        if let Some(got) = mirror_acceptor.as_mut().map(|a| a.next(Duration::ZERO)) {
            match got {
                Ok(None) => {}
                Ok(Some((mirror, _, _, peer))) => {
                    mirror_acceptor = None;
                    match disks.mirror_targets() {
                        Ok(targets) => {
                            let stop = mirror_stop.0.clone();
                            let spawned = std::thread::Builder::new()
                                .name("migrate-mirror-in".into())
                                .spawn(move || {
                                    base_vmm::seccomp::enter_or_log(
                                        base_vmm::seccomp::Role::Migration,
                                    );
                                    super::disk::serve_mirror_in(mirror, targets, stop)
                                });
                            match spawned {
                                Ok(_) => tracing::info!(
                                    "migration: the disk mirror's connection from {peer}"
                                ),
                                Err(e) => tracing::warn!(
                                    "migration: no thread for the disk mirror's connection: {e}"
                                ),
                            }
                        }
                        Err(e) => tracing::warn!("migration: the disk mirror's connection: {e}"),
                    }
                }
                Err(e) => {
                    tracing::warn!("migration: no connection for the disk mirror: {e}");
                    mirror_acceptor = None;
                }
            }
        }
        if dest.cancelled() {
            // The source keeps the guest and runs it on. It closes first, once it has read
            // why: closing with its pages unread would reset the connection, and the reason
            // could be lost with it.
            let _ = link.send(&Frame::Error("the destination is shutting down".into()));
            let _ = link.flush(Duration::from_secs(1));
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until && link.recv_raw(Duration::from_millis(100)).is_ok() {}
            return Err(DestError::Cancelled);
        }
        // Short waits: a cancel is noticed within 100 ms.
        let got = match link.recv_raw(Duration::from_millis(100)) {
            Ok(got) => got,
            // A malformed header: the source hears why.
            Err(e @ LinkError::Wire(_)) => return Err(refuse(&mut link, fail(e))),
            Err(e) => return Err(fail(e)),
        };
        let Some((ty, payload)) = got else {
            // A `pages` frame the writer refused (pages beyond guest memory, say) ends the
            // migration now, not at the source's next frame.
            if writer.stopped() {
                return Err(refuse(
                    &mut link,
                    fail(io(writer
                        .finish()
                        .err()
                        .unwrap_or(DestError::WriterFinished))),
                ));
            }
            if heard.elapsed() >= IDLE_TIMEOUT {
                return Err(refuse(&mut link, fail(LinkError::Timeout(IDLE_TIMEOUT))));
            }
            continue;
        };
        heard = Instant::now();
        if ty == wire::T_PAGES || ty == wire::T_STALE {
            // Agile: a page that comes as data (zero or not) after its location supersedes
            // it; a malformed frame is the writer's to refuse.
            if let Some(g) = store.as_ref().filter(|g| !g.locs.is_empty()) {
                if let Ok(f) = wire::decode_pages(payload) {
                    g.locs.drop_present(f.first, f.span as u64, &f.present);
                    for p in (0..f.span as u64)
                        .filter(|&i| bit(&f.present, i))
                        .map(|i| f.first + i)
                        .take_while(|&p| p < pages)
                    {
                        clear_bit(&mut located, p);
                        clear_bit(&mut to_drop, p);
                        clear_bit(&mut holes, p);
                    }
                }
            }
            if ty == wire::T_STALE {
                // Stale copies are dropped in place now (in stream order, by the writer):
                // the fresh memory kept for a post-copy would save no work in the pause.
                if let Some(unused) = fresh.take() {
                    let _ = std::thread::Builder::new().spawn(move || drop(unused));
                }
            }
            let spare = writer.spare();
            if !writer.write(ty, link.take_last_frame(spare)) {
                return Err(refuse(
                    &mut link,
                    fail(io(writer
                        .finish()
                        .err()
                        .unwrap_or(DestError::WriterFinished))),
                ));
            }
            continue;
        }
        let f = wire::decode(ty, payload).map_err(|e| refuse(&mut link, fail(e.into())))?;
        match f {
            Frame::State {
                handover,
                state,
                needed,
            } => {
                let received_at = Instant::now();
                // The disks are exact (every block and write before the state) and stable.
                disks
                    .finish()
                    .map_err(|e| refuse(&mut link, fail(io(e.into()))))?;
                // Every page before the state is in guest memory once the writer is done.
                let Written {
                    data: written,
                    dropped,
                } = writer
                    .finish()
                    .map_err(|e| refuse(&mut link, fail(io(e))))?;
                // Its buffers go back to the system off the downtime's path.
                let _ = std::thread::Builder::new().spawn(move || drop(writer));
                super::trace(format_args!(
                    "dest: state received, pages written after {:?}; receiving thread CPU \
                     {:.1} ms; link: {}",
                    received_at.elapsed(),
                    super::thread_cpu_ms(),
                    link.stats
                ));
                let postcopy = handover == Handover::Postcopy;
                if postcopy && needed.len() != written.len() {
                    return Err(refuse(
                        &mut link,
                        fail(io(DestError::Bitmap {
                            got: needed.len(),
                            want: written.len(),
                        })),
                    ));
                }
                // A page dropped as stale is a hole: it must come again, or the guest would
                // read zeros where it had data.
                let unsent: u64 = dropped
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d & !needed.get(i).copied().unwrap_or(0)).count_ones() as u64)
                    .sum();
                if unsent > 0 {
                    return Err(refuse(&mut link, fail(io(DestError::StaleUnsent(unsent)))));
                }
                // Holes already, with agile's located pages dropped at a `sync`.
                for (h, d) in holes.iter_mut().zip(&dropped) {
                    *h |= d;
                }
                // Agile: pages located before the state (parked at the source's
                // intermediaries) are still to come from there, unless they came as data
                // since (brought back and written at the source: sent again; dropped as the
                // frames came) or the source sends them again after the state (`needed`).
                // They are missing here as post-copy's pages are, and gathered from the
                // intermediaries.
                // (Word by word: a parked GiB is 262 144 pages, and this is the downtime.)
                let mut needed = needed;
                if postcopy {
                    let mut superseded = Vec::new();
                    for (i, (l, n)) in located.iter_mut().zip(&needed).enumerate() {
                        let mut both = *l & n;
                        *l &= !n;
                        while both != 0 {
                            superseded.push(i as u64 * 64 + u64::from(both.trailing_zeros()));
                            both &= both - 1;
                        }
                    }
                    if let Some(g) = &store {
                        g.locs.drop_pages(&superseded);
                    }
                }
                let parked = located.iter().any(|&w| w != 0);
                if parked {
                    needed.resize(written.len(), 0);
                    for (n, l) in needed.iter_mut().zip(&located) {
                        *n |= l;
                    }
                }
                // A stop-and-copy with parked pages: the guest runs with them missing and
                // the destination gathers them alone (the source has left).
                let gather_alone = !postcopy && parked;
                let mut ram = ram.clone();
                // Which pages may hold a stale copy: in populated memory all, in fresh memory
                // those written (none on the memory swapped in below).
                let mut stale_may_be = if populated {
                    Stale::All
                } else {
                    Stale::Written
                };
                match fresh.take() {
                    Some((fresh_ram, fresh_vm))
                        if (postcopy || gather_alone)
                            && fresh_is_cheaper(&needed, &written, &holes) =>
                    {
                        // Pages that arrived and are not coming again move over; the rest
                        // fault in. The populated memory goes back off the downtime's path.
                        copy_pages(&ram, &fresh_ram, &written, &needed);
                        super::trace(format_args!("dest: post-copy on fresh memory"));
                        let old_vm = prepared.take();
                        release(std::mem::replace(&mut ram, fresh_ram), old_vm);
                        prepared = Some(fresh_vm);
                        stale_may_be = Stale::None;
                    }
                    unused => {
                        let _ = std::thread::Builder::new().spawn(move || drop(unused));
                    }
                }
                let mut arrived = Arrived {
                    ram: ram.clone(),
                    state,
                    handover,
                    prepared: prepared.take(),
                    received_at,
                    link: None,
                    postcopy: None,
                    dest: dest.clone(),
                };
                if handover == Handover::Complete && !gather_alone {
                    arrived.link = Some(link);
                    return Ok(arrived);
                }
                // The guest must not touch a page before the fault service runs: missing pages
                // are registered now (a touch waits) and served once the source commits.
                // Stale copies of pages still to come must go, so that the guest faults on them
                // (pages dropped before the pause are holes already).
                let present = |p| {
                    !bit(&holes, p)
                        && match stale_may_be {
                            Stale::All => true,
                            Stale::Written => bit(&written, p),
                            Stale::None => false,
                        }
                };
                let (mut paused_drops, mut ranges) = (0, 0);
                let mut p = 0;
                while p < pages {
                    if !(bit(&needed, p) && present(p)) {
                        p += 1;
                        continue;
                    }
                    let mut q = p;
                    while q < pages && bit(&needed, q) && present(q) {
                        q += 1;
                    }
                    punch(&ram, p, q - p).map_err(|e| refuse(&mut link, fail(io(e))))?;
                    paused_drops += q - p;
                    ranges += 1;
                    p = q;
                }
                dest.dropped_at_state
                    .fetch_add(paused_drops, Ordering::Relaxed);
                super::trace(format_args!(
                    "dest: {paused_drops} stale pages dropped in the pause ({ranges} ranges)"
                ));
                let server = PageServer::register(&ram, needed.clone(), dest.pages.clone())
                    .map_err(|e| refuse(&mut link, fail(io(e.into()))))?;
                super::trace(format_args!("dest: userfaultfd registered"));
                dest.needed.store(count(&needed), Ordering::Relaxed);
                if postcopy {
                    link.for_postcopy();
                }
                dest.set(Phase::Postcopy, None);
                arrived.postcopy = Some(Postcopy {
                    server,
                    asks: Requests::default(),
                    gather: store.take(),
                    buf: Vec::new(),
                    pages,
                    dest: dest.clone(),
                    listener: listener.try_clone()?,
                    tls: tls.clone(),
                    session,
                    recovery_timeout,
                });
                arrived.link = Some(link);
                return Ok(arrived);
            }
            Frame::Sync => {
                if !writer.drain() {
                    return Err(refuse(
                        &mut link,
                        fail(io(writer
                            .finish()
                            .err()
                            .unwrap_or(DestError::WriterFinished))),
                    ));
                }
                // Before the answer: the source pauses once it has it.
                let n = drop_located(&ram, &mut to_drop, &mut holes)
                    .map_err(|e| refuse(&mut link, fail(io(e))))?;
                if n > 0 {
                    dest.dropped_before_state.fetch_add(n, Ordering::Relaxed);
                    super::trace(format_args!("dest: {n} located pages dropped at the sync"));
                }
                link.send(&Frame::Sync).map_err(fail)?
            }
            Frame::Store(rec) => {
                let why = if !machine_seen {
                    Some("a store frame before the machine".to_string())
                } else if store.is_some() {
                    Some("a second store frame".to_string())
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(refuse(&mut link, fail(io(DestError::Scatter(why)))));
                }
                let g = Gather::connect(&rec).map_err(|e| refuse(&mut link, fail(io(e))))?;
                super::trace(format_args!(
                    "dest: store of {} intermediaries",
                    rec.intermediaries.len()
                ));
                store = Some(g);
            }
            Frame::Machine(json) => {
                machine_seen = true;
                let machine: base_vmm::state::MachineConfig = serde_json::from_slice(&json)
                    .map_err(|e| refuse(&mut link, fail(io(DestError::Machine(e)))))?;
                // A failure here is retried when the state arrives (and reported then).
                prepared = base_vmm::vmm::Vmm::prepare(ram.clone(), &machine).ok();
                if populated {
                    fresh = GuestRam::new(mem).ok().and_then(|r| {
                        let r = Arc::new(r);
                        let vm = base_vmm::vmm::Vmm::prepare(r.clone(), &machine).ok()?;
                        Some((r, vm))
                    });
                }
            }
            Frame::Located(rec) => {
                // Agile: pages parked at the intermediaries, located before the state.
                let why = match (rec.check(pages), &store) {
                    (Err(e), _) => DestError::Wire(e),
                    (Ok(()), Some(g)) => {
                        for (p, h) in rec.pages() {
                            g.locs.add(p, std::slice::from_ref(h));
                            set_bit(&mut located, p);
                            set_bit(&mut to_drop, p);
                        }
                        continue;
                    }
                    (Ok(()), None) => DestError::Scatter(
                        "a located frame, but no store frame named the intermediaries".into(),
                    ),
                };
                return Err(refuse(&mut link, fail(io(why))));
            }
            Frame::Error(msg) => return Err(DestError::SourceGaveUp(msg)),
            Frame::Disk(d) => {
                disks
                    .handle(d, &mut link)
                    .map_err(|e| refuse(&mut link, fail(io(e.into()))))?;
                if !mirror_listening && disks.receiving_any() {
                    mirror_listening = true;
                    match Acceptor::start(&listener, tls.clone(), Some(session), Some(mem)) {
                        Ok(a) => mirror_acceptor = Some(a),
                        Err(e) => tracing::warn!(
                            "migration: no connection for the disk mirror: {e} (its writes \
                             come on the migration's link)"
                        ),
                    }
                }
            }
            other => {
                return Err(refuse(
                    &mut link,
                    fail(io(DestError::BeforeState(other.name()))),
                ))
            }
        }
    }
}

/// Sets its flag when dropped (a thread serving the migration then ends).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Tells the source why this destination gives up (a source that is gone does not hear it),
/// and returns the reason.
fn refuse(link: &mut Link, why: DestError) -> DestError {
    let _ = link.send(&Frame::Error(why.to_string()));
    let _ = link.flush(Duration::from_secs(1));
    link.close_after_last_words(Duration::from_secs(1));
    why
}

/// Pre-copy pages go into guest memory on a thread of their own: the receiving thread only
/// decrypts and hands each `pages` payload over (in order, in recycled buffers), so the
/// decryption and the page-cache writes run on two cores.
struct PageWriter {
    to_write: Option<std::sync::mpsc::SyncSender<ToWrite>>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Buffers back from the writer, free.
    free: Vec<Vec<u8>>,
    /// Buffers queued or being written.
    outstanding: usize,
    thread: Option<std::thread::JoinHandle<Result<(), DestError>>>,
    /// Kept up to date by the writer, payload by payload: read without waiting for its thread
    /// to end (a wake-up and a join inside the downtime: 9 ms on a busy host).
    out: Arc<Mutex<Written>>,
}

/// A payload for the page writer: its frame type (`pages` or `stale`), the buffer, and where
/// in it the payload lies.
type ToWrite = (u8, Vec<u8>, std::ops::Range<usize>);

/// What the page writer leaves in guest memory.
#[derive(Default)]
struct Written {
    /// Pages holding data from the source.
    data: Vec<u64>,
    /// Pages dropped on the source's `stale` frames and not written since: holes in the
    /// memfd, each to come again after the state.
    dropped: Vec<u64>,
}

/// Payloads in flight between the receiver and the writer.
const WRITE_BUFFERS: usize = 4;

impl PageWriter {
    /// `populated`: every page of `ram` is already allocated and mapped.
    fn start(
        ram: Arc<GuestRam>,
        dest: Arc<MigrationDest>,
        populated: bool,
    ) -> Result<Self, DestError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ToWrite>(WRITE_BUFFERS);
        let (back, recycled) = std::sync::mpsc::sync_channel(WRITE_BUFFERS);
        let words = (ram.size() / PAGE as u64).div_ceil(64) as usize;
        let out = Arc::new(Mutex::new(Written {
            data: vec![0; words],
            dropped: vec![0; words],
        }));
        let shared = out.clone();
        let thread = std::thread::Builder::new()
            .name("migrate-write".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                let mut dec = super::cnet::Decoder::default();
                let (mut busy, mut payloads) = (Duration::ZERO, 0u64);
                let mut any_stale = false;
                for (ty, buf, payload) in rx {
                    let t = Instant::now();
                    let payload = &buf[payload];
                    // Uncontended: the receiver reads it only once every buffer is back.
                    let mut out = lock(&shared);
                    let Written {
                        data: written,
                        dropped,
                    } = &mut *out;
                    if ty == wire::T_STALE {
                        let n = drop_stale(&ram, payload, written, dropped, populated)?;
                        any_stale = true;
                        dest.dropped_before_state.fetch_add(n, Ordering::Relaxed);
                        super::trace(format_args!(
                            "dest: {n} stale pages dropped before the pause in {:?}",
                            t.elapsed()
                        ));
                    } else {
                        let n = write_pages(&ram, payload, written, populated, &mut dec)?;
                        if any_stale {
                            // A page written after it was dropped is the newest copy.
                            if let Ok(f) = wire::decode_pages(payload) {
                                for i in 0..f.span as u64 {
                                    if bit(&f.present, i) {
                                        clear_bit(dropped, f.first + i);
                                    }
                                }
                            }
                        }
                        dest.received.fetch_add(n, Ordering::Relaxed);
                    }
                    drop(out);
                    busy += t.elapsed();
                    payloads += 1;
                    let _ = back.send(buf);
                }
                super::trace(format_args!(
                    "dest: page writer busy {:.1} ms (thread CPU {:.1} ms) for {payloads} frames",
                    busy.as_secs_f64() * 1e3,
                    super::thread_cpu_ms()
                ));
                Ok(())
            })
            .map_err(os("cannot start the page writer"))?;
        Ok(PageWriter {
            to_write: Some(tx),
            recycled,
            free: Vec::new(),
            outstanding: 0,
            thread: Some(thread),
            out,
        })
    }

    /// A buffer for the link to receive into next (one back from the writer, or new).
    fn spare(&mut self) -> Vec<u8> {
        while let Ok(b) = self.recycled.try_recv() {
            self.outstanding -= 1;
            self.free.push(b);
        }
        if let Some(b) = self.free.pop() {
            return b;
        }
        if self.outstanding >= WRITE_BUFFERS {
            if let Ok(b) = self.recycled.recv() {
                self.outstanding -= 1;
                return b;
            }
        }
        Vec::with_capacity(wire::MAX_PAYLOAD + (64 << 10))
    }

    /// Queues a buffer with a `pages` (or `stale`: `ty`) payload at the range; false when
    /// the writer has stopped (see [`Self::finish`]).
    fn write(&mut self, ty: u8, (buf, at): (Vec<u8>, std::ops::Range<usize>)) -> bool {
        let sent = self
            .to_write
            .as_ref()
            .is_some_and(|tx| tx.send((ty, buf, at)).is_ok());
        self.outstanding += sent as usize;
        sent
    }

    /// Waits until everything queued is written (before the source pauses the guest, so the
    /// downtime does not wait for the pre-copy tail); false when the writer has stopped.
    fn drain(&mut self) -> bool {
        while self.outstanding > 0 {
            match self.recycled.recv() {
                Ok(b) => {
                    self.outstanding -= 1;
                    self.free.push(b);
                }
                Err(_) => return false,
            }
        }
        // Few pages follow (stop-and-copy): give the memory back now, not in the downtime.
        self.free.truncate(1);
        true
    }

    /// The writer thread has ended before [`Self::finish`]: it refused a payload.
    fn stopped(&self) -> bool {
        self.to_write.is_some() && self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Waits until every queued payload is written: which pages hold data and which were
    /// dropped as stale, or why the writer stopped.
    fn finish(&mut self) -> Result<Written, DestError> {
        self.to_write = None;
        let Some(thread) = self.thread.take() else {
            return Err(DestError::WriterFinished);
        };
        // Every buffer back: every payload written (the thread ends on its own). A writer
        // that refused one keeps it and ends: its error is the answer.
        if self.drain() {
            return Ok(std::mem::take(&mut *lock(&self.out)));
        }
        match thread.join() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(DestError::WriterFinished),
            Err(_) => Err(DestError::Panicked("the page writer")),
        }
    }
}

/// Writes one `pages` payload into guest memory; `written` tracks which pages hold data (a
/// zero page over one is dropped from the memfd). `populated`: every page is allocated and
/// mapped already. `dec` holds the `cnet` codec's cache. Returns the pages it carried.
fn write_pages(
    ram: &GuestRam,
    payload: &[u8],
    written: &mut [u64],
    populated: bool,
    dec: &mut super::cnet::Decoder,
) -> Result<u64, DestError> {
    let f = wire::decode_pages(payload)?;
    let (first, span) = (f.first, f.span as u64);
    // Checked: a hostile `first` near 2^64 must not wrap around into guest memory.
    if first
        .checked_add(span)
        .is_none_or(|end| end > ram.size() / PAGE as u64)
    {
        return Err(DestError::PastEnd { first, span });
    }
    match f.encoding() {
        wire::PageCodec::Cnet => return write_cnet_pages(ram, &f, written, populated, dec),
        wire::PageCodec::Stride => return write_stride_pages(ram, &f, written, populated),
        wire::PageCodec::Raw => {}
    }
    // Runs of data pages are copied through the mapping when it is populated; otherwise they
    // go into the memfd with one pwrite each (the kernel fills the page cache directly,
    // without a page fault per page) and are mapped afterwards.
    let mut off = 0;
    let mut n = 0;
    let mut i = 0;
    while i < span {
        if !bit(&f.present, i) {
            i += 1;
            continue;
        }
        let p = first + i;
        if bit(&f.zero, i) {
            n += 1;
            if bit(written, p) {
                punch(ram, p, 1)?;
                clear_bit(written, p);
            }
            i += 1;
            continue;
        }
        let mut j = i;
        while j < span && bit(&f.present, j) && !bit(&f.zero, j) {
            set_bit(written, first + j);
            j += 1;
        }
        let len = (j - i) as usize * PAGE;
        put_pages(ram, p, &f.data[off..off + len], populated)?;
        off += len;
        n += j - i;
        i = j;
    }
    Ok(n)
}

/// Drops the pages a `stale` payload names from guest memory where they hold a copy (in
/// `populated` memory every page not dropped before, else those `written`), before the pause:
/// each comes again after the state, and a dropped page faults until it has. Returns how many
/// pages it dropped.
fn drop_stale(
    ram: &GuestRam,
    payload: &[u8],
    written: &mut [u64],
    dropped: &mut [u64],
    populated: bool,
) -> Result<u64, DestError> {
    let Frame::Stale(stale) = wire::decode(wire::T_STALE, payload)? else {
        unreachable!("a stale payload decodes as a stale frame")
    };
    if stale.len() != written.len() {
        return Err(DestError::Bitmap {
            got: stale.len(),
            want: written.len(),
        });
    }
    let pages = ram.size() / PAGE as u64;
    if !pages.is_multiple_of(64) && stale[stale.len() - 1] >> (pages % 64) != 0 {
        return Err(DestError::Wire(wire::bad(
            "a stale frame names pages past guest memory",
        )));
    }
    let holds = |written: &[u64], dropped: &[u64], p| {
        bit(&stale, p)
            && if populated {
                !bit(dropped, p)
            } else {
                bit(written, p)
            }
    };
    let mut n = 0;
    let mut p = 0;
    while p < pages {
        if !holds(written, dropped, p) {
            p += 1;
            continue;
        }
        let mut q = p + 1;
        while q < pages && holds(written, dropped, q) {
            q += 1;
        }
        punch(ram, p, q - p)?;
        for r in p..q {
            clear_bit(written, r);
            set_bit(dropped, r);
        }
        n += q - p;
        p = q;
    }
    Ok(n)
}

/// Writes whole pages from page `p` on (`p` and the run checked to lie inside guest memory
/// by the caller). `populated`: see [`write_pages`].
fn put_pages(ram: &GuestRam, p: u64, data: &[u8], populated: bool) -> Result<(), DestError> {
    if populated {
        // A plain memcpy: `GuestRam::write` goes through vm-memory's volatile copy and
        // marks the VMM's dirty bitmap, neither of which a page not yet the guest's needs.
        // SAFETY: the run lies inside guest memory (checked by the caller) and the source
        // slice is a buffer of ours, so the two cannot overlap; no vCPU runs before the
        // hand-over, so nothing else writes these pages.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                ram.host_base().add(p as usize * PAGE),
                data.len(),
            )
        };
    } else {
        // One pwrite per run: the kernel fills the page cache directly, without a page
        // fault per page; mapped afterwards.
        ram.memfd()
            .write_all_at(data, p * PAGE as u64)
            .map_err(os("writing guest memory"))?;
        let _ = ram.populate(p * PAGE as u64, data.len() as u64);
    }
    Ok(())
}

/// [`write_pages`] for the `stride` codec: progression pages rebuilt from their first word
/// and step, runs of the others copied as in the raw codec.
fn write_stride_pages(
    ram: &GuestRam,
    f: &wire::PagesRef<'_>,
    written: &mut [u64],
    populated: bool,
) -> Result<u64, DestError> {
    let d = wire::split_stride(f)?;
    let (first, span) = (f.first, f.span as u64);
    let (mut pairs, mut off, mut n) = (d.pairs.chunks_exact(wire::STRIDE_PAIR), 0, 0);
    let raw = |i: u64| bit(&f.present, i) && !bit(&f.zero, i) && !bit(&d.stride, i);
    let mut scratch = Vec::new();
    let mut i = 0;
    while i < span {
        if !bit(&f.present, i) {
            i += 1;
            continue;
        }
        let p = first + i;
        if bit(&f.zero, i) {
            if bit(written, p) {
                punch(ram, p, 1)?;
                clear_bit(written, p);
            }
            n += 1;
            i += 1;
            continue;
        }
        if bit(&d.stride, i) {
            // `split_stride` checked that there is a pair for every progression page.
            let pair = pairs.next().expect("a pair per progression page");
            let word = |k: usize| u64::from_le_bytes(pair[k..k + 8].try_into().expect("8"));
            let (a, step) = (word(0), word(8));
            if populated {
                // SAFETY: p lies inside guest memory (checked by the caller), the mapping
                // lives as long as `ram`, and no vCPU runs before the hand-over, so nothing
                // else reads or writes this page meanwhile.
                let page = unsafe {
                    std::slice::from_raw_parts_mut(ram.host_base().add(p as usize * PAGE), PAGE)
                };
                wire::fill_stride(page, a, step);
            } else {
                scratch.resize(PAGE, 0);
                wire::fill_stride(&mut scratch, a, step);
                put_pages(ram, p, &scratch, false)?;
            }
            set_bit(written, p);
            n += 1;
            i += 1;
            continue;
        }
        let mut j = i;
        while j < span && raw(j) {
            set_bit(written, first + j);
            j += 1;
        }
        let len = (j - i) as usize * PAGE;
        put_pages(ram, p, &d.raw[off..off + len], populated)?;
        off += len;
        n += j - i;
        i = j;
    }
    Ok(n)
}

/// [`write_pages`] for the `cnet` codec: page by page, each decoded (from the frame, the
/// block cache, or as a delta over the page this destination holds) then written.
fn write_cnet_pages(
    ram: &GuestRam,
    f: &wire::PagesRef<'_>,
    written: &mut [u64],
    populated: bool,
    dec: &mut super::cnet::Decoder,
) -> Result<u64, DestError> {
    let mut data = f.data;
    let mut page = vec![0u8; PAGE];
    let mut n = 0;
    for i in (0..f.span as u64).filter(|&i| bit(&f.present, i)) {
        let p = f.first + i;
        n += 1;
        if bit(&f.zero, i) {
            if bit(written, p) {
                punch(ram, p, 1)?;
                clear_bit(written, p);
            }
            continue;
        }
        let held = bit(written, p);
        let mut current = |out: &mut [u8]| -> Result<(), super::cnet::NoBase> {
            if !held {
                return Err(super::cnet::NoBase::NotHeld);
            }
            Ok(ram.memfd().read_exact_at(out, p * PAGE as u64)?)
        };
        dec.decode_page(p, &mut data, &mut current, &mut page)?;
        if populated {
            // SAFETY: p lies inside guest memory (checked by the caller) and `page` is our own
            // buffer; no vCPU runs before the hand-over, so nothing else writes this page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    page.as_ptr(),
                    ram.host_base().add(p as usize * PAGE),
                    PAGE,
                )
            };
        } else {
            ram.memfd()
                .write_all_at(&page, p * PAGE as u64)
                .map_err(os("writing guest memory"))?;
            let _ = ram.populate(p * PAGE as u64, PAGE as u64);
        }
        set_bit(written, p);
    }
    if !data.is_empty() {
        return Err(DestError::Stray(data.len()));
    }
    Ok(n)
}

/// Gives populated guest memory (and the VM built on it) back to the system on a thread of
/// its own. Unmapping a populated GiB holds the process's memory-map lock for 70 ms or more,
/// stalling every page fault of the running guest meanwhile; the pages are dropped from the
/// memfd in small pieces first (which does not take that lock), so the final unmap is cheap.
fn release(ram: Arc<GuestRam>, vm: Option<base_vmm::vmm::PreparedVm>) {
    const PIECE: u64 = 4096; // pages: 16 MiB
    let _ = std::thread::Builder::new()
        .name("release-ram".into())
        .spawn(move || {
            base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
            drop(vm);
            let pages = ram.size() / PAGE as u64;
            let mut p = 0;
            while p < pages {
                let n = PIECE.min(pages - p);
                if punch(&ram, p, n).is_err() {
                    break;
                }
                p += n;
                std::thread::yield_now();
            }
            drop(ram);
        });
}

/// Which pages of guest memory may hold a stale copy of a page still to come.
#[derive(Clone, Copy)]
enum Stale {
    All,
    Written,
    None,
}

/// Whether a post-copy into populated memory is cheaper on fresh memory: there, pages that
/// arrived and are not coming again (`written` and not `needed`) must be copied, while in the
/// populated memory every page still `needed` must be dropped. Measured on this host, a page
/// copied into fresh shared memory costs about ten times a page dropped (first touch 1.2-2.2
/// s a GiB, punching a hole 0.2 s a GiB). Pages dropped already (`holes`: agile's located
/// pages and post-copy's stale copies, dropped before the pause) cost nothing more there.
fn fresh_is_cheaper(needed: &[u64], written: &[u64], holes: &[u64]) -> bool {
    let to_copy: u64 = written
        .iter()
        .zip(needed)
        .map(|(w, n)| (w & !n).count_ones() as u64)
        .sum();
    let to_drop: u64 = needed
        .iter()
        .zip(holes)
        .map(|(n, h)| (n & !h).count_ones() as u64)
        .sum();
    to_copy * 10 < to_drop
}

/// Copies the pages set in `written` and clear in `needed` from `from` to `to`.
fn copy_pages(from: &GuestRam, to: &GuestRam, written: &[u64], needed: &[u64]) {
    for (i, (w, n)) in written.iter().zip(needed).enumerate() {
        let mut bits = w & !n;
        while bits != 0 {
            let p = i as u64 * 64 + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let off = (p * PAGE as u64) as usize;
            // SAFETY: both mappings are guest-sized (the same size, checked at the hello), the
            // page is inside them, and no vCPU runs on either yet.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    from.host_base().add(off),
                    to.host_base().add(off),
                    PAGE,
                )
            };
        }
    }
}

/// Agile: drops the pages set in `to_drop` from the memfd (runs at a time), marks them in
/// `holes` and clears `to_drop`; how many. Call it with the page writer drained.
fn drop_located(ram: &GuestRam, to_drop: &mut [u64], holes: &mut [u64]) -> Result<u64, DestError> {
    let pages = ram.size() / PAGE as u64;
    let mut n = 0;
    let mut p = 0;
    while p < pages {
        let w = to_drop[(p / 64) as usize] >> (p % 64);
        if w == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        p += u64::from(w.trailing_zeros());
        let mut q = p;
        while q < pages && bit(to_drop, q) {
            q += 1;
        }
        punch(ram, p, q - p)?;
        n += q - p;
        p = q;
    }
    for (h, d) in holes.iter_mut().zip(to_drop.iter_mut()) {
        *h |= std::mem::take(d);
    }
    Ok(n)
}

/// Drops pages `[p, p+n)` from the memfd, so the next touch is a missing-page fault.
fn punch(ram: &GuestRam, p: u64, n: u64) -> Result<(), DestError> {
    // SAFETY: fallocate on our memfd; the range is inside it.
    let r = unsafe {
        libc::fallocate(
            ram.memfd().as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (p * PAGE as u64) as libc::off_t,
            (n * PAGE as u64) as libc::off_t,
        )
    };
    if r < 0 {
        return Err(DestError::Punch(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Test hook (`SPANVMM_MIGRATION_CUT`): where the destination drops the connection on
/// purpose, to show the hand-over is safe there. `before-commit`: after `ready`, without
/// waiting for `commit` (the guest must then run nowhere but, at most, the source);
/// `after-commit`: once `commit` arrived, before `resumed` (the guest runs here, the source
/// stays paused "in doubt").
fn cut_at(point: &str) -> bool {
    std::env::var("SPANVMM_MIGRATION_CUT").is_ok_and(|v| v == point)
}

impl Arrived {
    /// The VM is built (vCPUs paused): say `ready` and wait for the source's `commit`. Only
    /// after `Ok` may the guest run here, and only if it says `true` (false: the guest was
    /// paused at the source, so it stays paused here until resumed); on `Err` the source
    /// keeps (or resumes) the guest and this VM must be discarded.
    pub fn commit(&mut self) -> Result<bool, DestError> {
        let load_us = self.received_at.elapsed().as_micros() as u64;
        let link = self.link.as_mut().ok_or(DestError::NoConnection)?;
        let no = DestError::NotCommitted;
        link.send(&Frame::Ready { load_us })
            .and_then(|_| link.flush(Duration::from_secs(10)))
            .map_err(no)?;
        if cut_at("before-commit") {
            self.link = None;
            return Err(no(LinkError::Io(std::io::Error::other(
                "connection cut by SPANVMM_MIGRATION_CUT=before-commit",
            ))));
        }
        super::trace(format_args!("dest: ready after {load_us} µs"));
        let run = match link.expect(Duration::from_secs(30), "commit") {
            Ok(Frame::Commit { run }) => {
                super::trace(format_args!(
                    "dest: commit (run: {run}) after {:?}",
                    self.received_at.elapsed()
                ));
                run
            }
            Ok(other) => return Err(no(io(DestError::NotCommit(other.name())))),
            Err(e) => return Err(no(e)),
        };
        if cut_at("after-commit") {
            self.link = None;
        }
        Ok(run)
    }

    /// The VM runs (after [`Arrived::commit`]): tell the source. Returns the migration's
    /// handle (post-copy goes on in the background).
    pub fn running(mut self) -> Result<Arc<MigrationDest>, DestError> {
        let load_us = self.received_at.elapsed().as_micros() as u64;
        if self.handover == Handover::Complete && self.postcopy.is_some() {
            let pc = self.postcopy.take().expect("checked above");
            // Agile: every page is here but the parked ones, which the intermediaries hold:
            // the source hears that the guest runs and leaves; they are gathered from there.
            if let Some(mut link) = self.link.take() {
                link.send(&Frame::Resumed { load_us })
                    .and_then(|_| link.flush(Duration::from_secs(10)))
                    .map_err(DestError::Resumed)?;
                let _ = link.recv(Duration::from_secs(5));
            }
            std::thread::Builder::new()
                .name("migrate-gather".into())
                .spawn(move || {
                    base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                    pc.run_alone()
                })
                .map_err(os("cannot start the gather thread"))?;
            return Ok(self.dest.clone());
        }
        if let Some(pc) = self.postcopy.take() {
            let link = self.link.take();
            std::thread::Builder::new()
                .name("migrate-postcopy".into())
                .spawn(move || {
                    base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                    pc.run(link, load_us)
                })
                .map_err(os("cannot start the post-copy thread"))?;
            return Ok(self.dest.clone());
        }
        // The guest runs here whatever happens to the link now: the source committed.
        self.dest.set(Phase::Completed, None);
        if let Some(mut link) = self.link.take() {
            link.send(&Frame::Resumed { load_us })
                .and_then(|_| link.flush(Duration::from_secs(10)))
                .map_err(DestError::Resumed)?;
            // The source closes first once it has our answer.
            let _ = link.recv(Duration::from_secs(5));
        }
        Ok(self.dest.clone())
    }

    /// Building the VM failed: tell the source, which resumes the guest there.
    pub fn abort(mut self, why: &str) {
        if let Some(mut link) = self.link.take() {
            let _ = link.send(&Frame::Error(why.to_string()));
            let _ = link.flush(Duration::from_secs(5));
        }
    }
}

/// Post-copy's page source: the pages a fault needs are asked for in the next `fault` frame
/// (see [`Postcopy::serve_faults`]) and arrive in `pages` frames, which [`Postcopy::install`]
/// gives to the page server.
#[derive(Default)]
struct Requests(Vec<u64>);

impl PageSource for Requests {
    fn fetch(&mut self, run: std::ops::Range<u64>, _: &mut [u8]) -> Result<Fetched, PageError> {
        self.0.extend(run);
        Ok(Fetched::Later)
    }
}

/// Post-copy's pre-paging at the destination: a fault asks for its page alone. Bubbling
/// around the last fault is the source's policy (the migration service queues the
/// neighbourhood of each fault it reads with `take-faults`), which pushes those pages
/// unasked; asking for them here as well would queue them twice.
type PostcopyPrepaging = FaultOnly;

/// Pages a gather run reads at most (256 KiB: one pipelined `GET` per intermediary).
const GATHER_RUN: u64 = 64;
/// Gather runs read at once, each by a thread of its own (1 MiB on its way: the
/// destination's link stays busy across the round trips).
const GATHER_READERS: usize = 4;
/// The source's link counts as pushing for this long after it last brought page data (a
/// 64-page batch takes 20 ms at 100 Mbit/s).
const PUSH_QUIET: Duration = Duration::from_millis(50);

/// Scatter-Gather at the destination: the page source that reads located pages from the
/// intermediaries (and asks the link for the rest), and the gather that brings them in.
struct Gather {
    source: GatherSource<Requests>,
    policy: GatherPolicy,
    locs: Arc<Locations>,
    /// When the source's link last brought page data (its push, or a fault's answer).
    last_push: Option<Instant>,
}

impl Gather {
    /// Whether the gather has work: pages it may take now, or reads on their way.
    fn busy(&self) -> bool {
        (self.locs.pending() > 0 && self.source.ahead_room()) || self.source.ahead_in_flight() > 0
    }

    /// The source's push has the destination's intake first: while its link brings page
    /// data, no run is read ahead (they share the destination's link, and each run read
    /// meanwhile slows the push, which is the eviction Scatter-Gather shortens: measured,
    /// the last records of a 256 MiB eviction reached a 100 Mbit/s destination 0.8 s late
    /// behind four readers). When the push pauses (everything goes to the intermediaries,
    /// or the source left), every reader works. Demand faults are served either way.
    fn pace(&mut self) {
        let pushing = self.last_push.is_some_and(|t| t.elapsed() < PUSH_QUIET);
        self.source.hold_ahead(pushing);
    }

    /// Connects to the intermediaries a `store` record names.
    fn connect(rec: &wire::Store) -> Result<Self, DestError> {
        let store = PageStore::connect(rec.config(), &rec.key)
            .map_err(|e| DestError::Scatter(format!("intermediaries: {e}")))?;
        let locs = Locations::new();
        let mut source = GatherSource::new(store, locs.clone(), Requests::default());
        // While the source holds every page, a run the intermediaries cannot give (one is
        // down, or a value fails its check) is asked of the source instead.
        source.set_fallback(true);
        source
            .start_ahead(GATHER_READERS)
            .map_err(|e| DestError::Scatter(format!("intermediaries: {e}")))?;
        let rate = (rec.gather_rate > 0).then_some(rec.gather_rate);
        Ok(Gather {
            source,
            policy: GatherPolicy::new(locs.clone(), GATHER_RUN, rate),
            locs,
            last_push: None,
        })
    }
}

/// The post-copy fault service and page receiver: the page server, fed from the link.
struct Postcopy {
    server: PageServer,
    /// Pages asked for, to go out in the next `fault` frame.
    asks: Requests,
    /// Scatter-Gather: the intermediaries (a `store` frame came).
    gather: Option<Gather>,
    buf: Vec<u8>,
    pages: u64,
    dest: Arc<MigrationDest>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    session: u64,
    recovery_timeout: Duration,
}

impl Postcopy {
    fn run(self, link: Option<Link>, load_us: u64) {
        let mut pc = self;
        let r = pc.serve(link, load_us);
        pc.end(r)
    }

    /// Without the source (a stop-and-copy that left parked pages): gathers every missing
    /// page from the intermediaries, faults first.
    fn run_alone(mut self) {
        if let Some(g) = &mut self.gather {
            g.source.set_fallback(false);
        }
        let r = self.gather_rest();
        self.end(r)
    }

    fn end(self, r: Result<(), DestError>) {
        self.publish();
        match r {
            Ok(()) => {
                let r = self.server.finish();
                if let Err(e) = r {
                    tracing::warn!("migration: unregistering userfaultfd: {e}");
                }
                self.dest.set(Phase::Completed, None);
            }
            Err(e) => {
                tracing::error!("post-copy migration failed: {e}");
                self.dest.set(Phase::Failed, Some(e.to_string()));
            }
        }
    }

    fn serve(&mut self, link: Option<Link>, load_us: u64) -> Result<(), DestError> {
        let lost = |why: &str| LinkError::Io(std::io::Error::other(why.to_string()));
        let mut link = match link {
            Some(mut link) => match link.send(&Frame::Resumed { load_us }) {
                Ok(()) => link,
                Err(e) => self.recover(e)?,
            },
            None => self.recover(lost("the connection was cut after commit"))?,
        };
        loop {
            match self.step(&mut link) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => link = self.recover(e)?,
            }
        }
        drop(link);
        self.gather_rest()
    }

    /// Scatter-Gather (and agile): the source is gone, every page still missing is located;
    /// gather them at the destination's own pace, faults first.
    fn gather_rest(&mut self) -> Result<(), DestError> {
        while self.server.remaining() > 0 {
            let mut fd = libc::pollfd {
                fd: self.server.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let gathering = self.gather.as_ref().is_some_and(Gather::busy);
            if !gathering {
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fd, 1, 5) };
            }
            self.serve_faults(None).map_err(DestError::Link)?;
            if !self.gather_step().map_err(DestError::Pages)? && gathering {
                // Capped: the next tokens come in a moment (faults still wake us).
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fd, 1, 1) };
            }
            self.publish();
        }
        Ok(())
    }

    /// Places the gather runs read meanwhile (the pages still missing: a fault or the link
    /// may have brought some) and starts the next ones the policy picks, up to one per
    /// reader. True: it placed or started something.
    fn gather_step(&mut self) -> Result<bool, PageError> {
        let Some(g) = &mut self.gather else {
            return Ok(false);
        };
        g.pace();
        let mut busy = false;
        let mut placed = 0;
        while let Some(read) = g.source.ahead_finished(Duration::ZERO)? {
            busy = true;
            if let AheadRead::Pages(run, pages) = read {
                let n = self.server.place(run.start, &pages)?;
                self.server
                    .stats()
                    .prefetched
                    .fetch_add(n, Ordering::Relaxed);
                placed += n;
            }
        }
        while g.source.ahead_room() {
            let Some(run) = g.policy.next(&self.server) else {
                break;
            };
            let need = (run.end - run.start) as usize * PAGE;
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            if let Fetched::Here = g.source.ahead_submit(run.clone(), &mut self.buf)? {
                placed += self.server.place(run.start, &self.buf[..need])?;
            }
            busy = true;
        }
        self.dest.received.fetch_add(placed, Ordering::Relaxed);
        self.dest.needed.fetch_sub(placed, Ordering::Relaxed);
        Ok(busy)
    }

    /// Publishes the gather's counters on the destination's progress.
    fn publish(&self) {
        if let Some(g) = &self.gather {
            *lock(&self.dest.gather) = Some(g.source.stats());
        }
    }

    /// Records the pages of a `located` frame (those still missing) and serves the faults
    /// waiting for any of them from the intermediaries.
    fn locate(&mut self, rec: wire::Located) -> Result<(), DestError> {
        let Some(g) = &mut self.gather else {
            return Err(DestError::Scatter(
                "a located frame, but no store frame named the intermediaries".into(),
            ));
        };
        rec.check(self.pages)?;
        for (p, h) in rec.pages() {
            // A page the guest does not lack (sent already, or never needed) stays as it is.
            if self.server.is_wanted(p) && !self.server.is_present(p) {
                g.locs.add(p, std::slice::from_ref(h));
            }
        }
        for p in self.server.pending() {
            if g.locs.get(p).is_some() {
                let before = self.server.remaining();
                self.server
                    .bring(&mut g.source, p..p + 1, Why::Fault, &mut self.buf)?;
                let placed = before - self.server.remaining();
                self.dest.received.fetch_add(placed, Ordering::Relaxed);
                self.dest.needed.fetch_sub(placed, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// One round: wait for the socket or a fault, serve faults, apply frames. True when done.
    fn step(&mut self, link: &mut Link) -> Result<bool, LinkError> {
        let mut fds = [
            libc::pollfd {
                fd: link.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.server.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let gathering = self.gather.as_ref().is_some_and(Gather::busy);
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, if gathering { 1 } else { 5 }) };
        self.serve_faults(Some(link))?;
        while let Some(f) = link.recv(Duration::ZERO)? {
            match f {
                Frame::Pages {
                    first,
                    span,
                    codec,
                    present,
                    zero,
                    data,
                } => {
                    // The source sends post-copy pages raw: the cache encodings assume the
                    // destination holds what it was sent, which a running guest changes.
                    if codec != wire::PageCodec::Raw.tag() {
                        return Err(io(DestError::PostcopyCodec(codec)));
                    }
                    if first
                        .checked_add(span as u64)
                        .is_none_or(|end| end > self.pages)
                    {
                        return Err(io(DestError::PastEnd {
                            first,
                            span: span as u64,
                        }));
                    }
                    self.install(first, span as u64, &present, &zero, &data)?;
                    if let Some(g) = self.gather.as_mut().filter(|_| !data.is_empty()) {
                        g.last_push = Some(Instant::now());
                    }
                    // Faults first, between frames.
                    self.serve_faults(Some(link))?;
                }
                Frame::Located(rec) => {
                    self.locate(rec).map_err(io)?;
                    self.serve_faults(Some(link))?;
                }
                Frame::Done => {
                    let left = match &self.gather {
                        // Every page still missing must be at an intermediary: the source
                        // leaves once it hears `complete`.
                        Some(g) => {
                            let missing = self.server.missing();
                            (0..self.pages)
                                .filter(|&p| bit(&missing, p) && g.locs.get(p).is_none())
                                .count() as u64
                        }
                        None => self.server.remaining(),
                    };
                    if left != 0 {
                        return Err(io(DestError::Missing(left)));
                    }
                    if let Some(g) = &mut self.gather {
                        // The source leaves: a located page is to be had only there now.
                        g.source.set_fallback(false);
                        g.last_push = None;
                    }
                    let st = &self.dest.pages;
                    link.send(&Frame::Complete {
                        faults: st.served.load(Ordering::Relaxed),
                        fault_mean_us: st.latency_mean_us(),
                        fault_max_us: st.latency_max_us.load(Ordering::Relaxed),
                        fault_p99_us: st.latency_p99_us(),
                    })?;
                    link.flush(Duration::from_secs(10))?;
                    // The source closes first, once it has read `complete`.
                    let _ = link.recv(Duration::from_secs(5));
                    return Ok(true);
                }
                // The source's window: everything before it has been read (and placed).
                Frame::Sync => link.send(&Frame::Sync)?,
                Frame::Error(m) => return Err(io(DestError::SourceGaveUp(m))),
                other => return Err(io(DestError::Unexpected(other.name()))),
            }
        }
        if !self.gather_step().map_err(|e| io(e.into()))? {
            self.publish();
        }
        Ok(false)
    }

    /// Installs the pages of a frame that are still missing (runs coalesced): the page
    /// server places them and wakes the faults waiting for them.
    fn install(
        &mut self,
        first: u64,
        span: u64,
        present: &[u64],
        zero: &[u64],
        data: &[u8],
    ) -> Result<(), LinkError> {
        let perr = |e: PageError| io(e.into());
        let missing = |p: u64| self.server.is_wanted(p) && !self.server.is_present(p);
        let mut off = 0usize;
        let mut i = 0;
        let mut placed = 0;
        while i < span {
            if !bit(present, i) {
                i += 1;
                continue;
            }
            let is_zero = bit(zero, i);
            // A run of present pages of one kind.
            let mut j = i;
            let start_off = off;
            while j < span && bit(present, j) && bit(zero, j) == is_zero {
                if !is_zero {
                    off += PAGE;
                }
                j += 1;
            }
            let (a, b) = (first + i, first + j);
            // Only pages still missing; a run is split where one is present already.
            let mut p = a;
            while p < b {
                if !missing(p) {
                    p += 1;
                    continue;
                }
                let mut q = p;
                while q < b && missing(q) {
                    q += 1;
                }
                placed += if is_zero {
                    self.server.place_zero(p, q - p).map_err(perr)?
                } else {
                    let s = start_off + ((p - a) as usize) * PAGE;
                    let e = start_off + ((q - a) as usize) * PAGE;
                    self.server.place(p, &data[s..e]).map_err(perr)?
                };
                p = q;
            }
            i = j;
        }
        self.dest.received.fetch_add(placed, Ordering::Relaxed);
        self.dest.needed.fetch_sub(placed, Ordering::Relaxed);
        Ok(())
    }

    /// Reads every pending fault: pages to come are asked for (when a link is up; else once it
    /// is back, see [`Self::recover`]), pages that are zero at the source and were never sent
    /// become zero pages at once.
    fn serve_faults(&mut self, link: Option<&mut Link>) -> Result<(), LinkError> {
        let mut policy = PostcopyPrepaging {};
        let policy: &mut dyn PrePaging = &mut policy;
        // Scatter-Gather: a located page comes from the intermediaries at once.
        let source: &mut dyn PageSource = match &mut self.gather {
            Some(g) => &mut g.source,
            None => &mut self.asks,
        };
        let before = self.server.remaining();
        self.server
            .serve_faults(source, policy, Duration::ZERO, &mut self.buf)
            .map_err(|e| io(e.into()))?;
        // Pages a fault brought at once (from the intermediaries) count as received.
        let placed = before - self.server.remaining();
        self.dest.received.fetch_add(placed, Ordering::Relaxed);
        self.dest.needed.fetch_sub(placed, Ordering::Relaxed);
        let ask = match &mut self.gather {
            Some(g) => std::mem::take(&mut g.source.direct().0),
            None => std::mem::take(&mut self.asks.0),
        };
        if let (false, Some(link)) = (ask.is_empty(), link) {
            super::trace(format_args!("dest: fault request {ask:?}"));
            link.send(&Frame::Fault(ask))?;
        }
        Ok(())
    }

    /// The connection broke: wait for the source to reconnect (faults keep being recorded),
    /// tell it what is still missing, ask again for the faulted pages.
    fn recover(&mut self, cause: LinkError) -> Result<Link, DestError> {
        tracing::warn!("post-copy connection lost ({cause}); waiting for the source");
        self.dest.set(Phase::Recovering, None);
        let deadline = Instant::now() + self.recovery_timeout;
        let mem = self.server.ram().size();
        let mut acceptor: Option<Acceptor> = None;
        loop {
            if Instant::now() >= deadline {
                return Err(DestError::Lost {
                    timeout: self.recovery_timeout,
                    lost: self.server.remaining(),
                    cause,
                });
            }
            // Faults are recorded (and asked for once the source is back).
            self.serve_faults(None)?;
            let acc = match &mut acceptor {
                Some(a) => a,
                None => acceptor.insert(Acceptor::start(
                    &self.listener,
                    self.tls.clone(),
                    Some(self.session),
                    Some(mem),
                )?),
            };
            let Some((mut link, _, _, _)) = acc.next(Duration::from_millis(20))? else {
                continue;
            };
            // A winner ends that acceptor; a failed one needs a new one.
            acceptor = None;
            let again = self.server.pending();
            let r = link
                .send(&Frame::Needed(self.server.missing()))
                .and_then(|_| {
                    if again.is_empty() {
                        Ok(())
                    } else {
                        link.send(&Frame::Fault(again))
                    }
                });
            match r {
                Ok(()) => {
                    link.for_postcopy();
                    self.dest.recoveries.fetch_add(1, Ordering::Relaxed);
                    self.dest.set(Phase::Postcopy, None);
                    tracing::info!("post-copy connection restored");
                    return Ok(link);
                }
                Err(e) => tracing::warn!("post-copy recovery: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_payload(first: u64, span: u16, present: u64, zero: u64, data_pages: usize) -> Vec<u8> {
        let mut b = Vec::new();
        wire::encode(
            &Frame::Pages {
                first,
                span,
                codec: wire::CODEC_RAW,
                present: vec![present],
                zero: vec![zero],
                data: vec![0xa5; data_pages * PAGE],
            },
            &mut b,
        );
        b.split_off(wire::HEADER_LEN)
    }

    fn stale_payload(words: usize, pages: std::ops::Range<u64>) -> Vec<u8> {
        let mut bits = vec![0u64; words];
        for p in pages {
            set_bit(&mut bits, p);
        }
        let mut b = Vec::new();
        wire::encode(&Frame::Stale(bits), &mut b);
        b.split_off(wire::HEADER_LEN)
    }

    /// A `stale` frame drops the copies this destination holds (in populated memory every
    /// page not dropped already, else the pages written), marks them dropped and no longer
    /// written. A bitmap of another size is refused.
    #[test]
    fn stale_pages_are_dropped_where_a_copy_is_held() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let words = (ram.size() / PAGE as u64).div_ceil(64) as usize;
        let mut dec = crate::migration::cnet::Decoder::default();
        for populated in [false, true] {
            let mut written = vec![0u64; words];
            let mut dropped = vec![0u64; words];
            let data = pages_payload(0, 64, u64::MAX, 0, 64);
            write_pages(&ram, &data, &mut written, populated, &mut dec).unwrap();
            // Pages 10..20 hold data, 100..105 were never written.
            let stale = [stale_payload(words, 10..20), stale_payload(words, 100..105)].concat();
            let (a, b) = stale.split_at(stale.len() / 2);
            let n = drop_stale(&ram, a, &mut written, &mut dropped, populated).unwrap()
                + drop_stale(&ram, b, &mut written, &mut dropped, populated).unwrap();
            assert_eq!(n, if populated { 15 } else { 10 }, "populated {populated}");
            assert!((10..20).all(|p| !bit(&written, p) && bit(&dropped, p)));
            assert!(bit(&written, 9) && bit(&written, 20) && !bit(&dropped, 9));
            // SAFETY: page 10 lies inside guest memory; no vCPU runs.
            let first = unsafe { *ram.host_base().add(10 * PAGE) };
            assert_eq!(first, 0, "a dropped page reads as a hole");
            // Dropped already (and no longer written): not again.
            let again = stale_payload(words, 10..20);
            let n = drop_stale(&ram, &again, &mut written, &mut dropped, populated).unwrap();
            assert_eq!(n, 0);
            let bad = {
                let mut b = Vec::new();
                wire::encode(&Frame::Stale(vec![0; words + 1]), &mut b);
                b.split_off(wire::HEADER_LEN)
            };
            let err = drop_stale(&ram, &bad, &mut written, &mut dropped, populated).unwrap_err();
            assert!(matches!(err, DestError::Bitmap { .. }), "{err}");
        }
    }

    /// With the stale copies dropped before the pause, the populated memory has nothing left
    /// to drop and the fresh memory is not taken; without, a pure post-copy takes it.
    #[test]
    fn fresh_memory_only_when_dropping_would_cost_more() {
        let needed = vec![u64::MAX; 4];
        let none = vec![0u64; 4];
        assert!(fresh_is_cheaper(&needed, &none, &none));
        assert!(!fresh_is_cheaper(&needed, &none, &needed));
        // Half the pages received and kept, the other half still to drop: populated.
        let half = vec![u64::MAX, u64::MAX, 0, 0];
        let rest = vec![0, 0, u64::MAX, u64::MAX];
        assert!(!fresh_is_cheaper(&rest, &half, &none));
    }

    /// Found by the hostile-peer review of the wire decoder's users: a `pages` frame whose
    /// first page lies near 2^64 wrapped `first + span` around, passed the bounds check and
    /// panicked the page writer (release) or overflowed (debug). Now refused.
    #[test]
    fn pages_frame_wrapping_past_2_pow_64_is_refused() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let pages = ram.size() / PAGE as u64;
        let mut written = vec![0u64; pages.div_ceil(64) as usize];
        let mut dec = crate::migration::cnet::Decoder::default();
        for populated in [false, true] {
            for (first, span) in [(u64::MAX - 1, 4u16), (u64::MAX, 1), (u64::MAX - 30, 64)] {
                let present = if span == 64 {
                    u64::MAX
                } else {
                    (1 << span) - 1
                };
                let payload = pages_payload(first, span, present, 0, span as usize);
                let err =
                    write_pages(&ram, &payload, &mut written, populated, &mut dec).unwrap_err();
                assert!(matches!(err, DestError::PastEnd { .. }), "{err}");
            }
            // The last page of guest memory is still accepted, one past it is not.
            let ok = pages_payload(pages - 1, 1, 1, 0, 1);
            assert_eq!(
                write_pages(&ram, &ok, &mut written, populated, &mut dec).unwrap(),
                1
            );
            let past = pages_payload(pages, 1, 1, 0, 1);
            assert!(write_pages(&ram, &past, &mut written, populated, &mut dec).is_err());
        }
    }
}
