//! Scatter-Gather's destination side: the page server's third page source, the
//! intermediaries, and the gather pre-paging.
//!
//! The source tells the destination where each scattered page is (a location: page number →
//! content address, over the TLS link); [`Locations`] keeps them. [`GatherSource`] serves a run
//! whose pages are all located from the intermediaries at once ([`Fetched::Here`]) and hands
//! any other run to the direct source (the link). [`GatherPolicy`] is the gather: while no
//! fault waits it brings the located pages still missing, in page order, at most
//! `gather_rate` bytes per second — faults are never held back by the cap (the paper's
//! gather thread is paused, its fault thread is not).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base_vmm::memory::PAGE_SIZE;
use base_vmm::page_server::{Fetched, PageError, PageServer, PageSource, PrePaging};

use super::intermediary::{
    ContentHash, IntermediaryError, Job, Output, PageStore, StorePool, StoreStats,
};

/// Where the scattered pages are: page number → content address, and which of them the
/// gather has not brought yet.
#[derive(Default)]
pub struct Locations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, ContentHash>,
    /// Located pages the gather has not taken yet, in page order.
    todo: BTreeSet<u64>,
}

impl Locations {
    /// No page located yet.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that pages `first..first + hashes.len()` are at the intermediaries.
    pub fn add(&self, first: u64, hashes: &[ContentHash]) {
        let mut m = self.lock();
        for (i, h) in hashes.iter().enumerate() {
            m.map.insert(first + i as u64, *h);
            m.todo.insert(first + i as u64);
        }
    }

    /// Where page `p` is, if scattered.
    pub fn get(&self, p: u64) -> Option<ContentHash> {
        self.lock().map.get(&p).copied()
    }

    /// Pages located.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no page is located.
    pub fn is_empty(&self) -> bool {
        self.lock().map.is_empty()
    }

    /// Located pages the gather has not taken yet.
    pub fn pending(&self) -> usize {
        self.lock().todo.len()
    }

    /// Takes the lowest run of at most `max` consecutive pages still to gather for which
    /// `missing` holds (the others are dropped from the to-do: a fault or a direct push
    /// brought them).
    fn take_run(&self, max: u64, missing: impl Fn(u64) -> bool) -> Option<Range<u64>> {
        let mut m = self.lock();
        let a = loop {
            let p = m.todo.pop_first()?;
            if missing(p) {
                break p;
            }
        };
        let mut b = a + 1;
        while b - a < max && m.todo.contains(&b) && missing(b) {
            m.todo.remove(&b);
            b += 1;
        }
        Some(a..b)
    }

    /// Drops the locations of `pages` (the source sends them again after the state).
    pub fn drop_pages(&self, pages: &[u64]) {
        if pages.is_empty() {
            return;
        }
        let mut m = self.lock();
        for p in pages {
            if m.map.remove(p).is_some() {
                m.todo.remove(p);
            }
        }
    }

    /// Drops the locations of the pages of `first..first + span` set in `present` (they
    /// came as data since).
    pub fn drop_present(&self, first: u64, span: u64, present: &[u64]) {
        let mut m = self.lock();
        for i in (0..span).filter(|&i| {
            present
                .get((i / 64) as usize)
                .is_some_and(|w| w >> (i % 64) & 1 == 1)
        }) {
            let p = first + i;
            if m.map.remove(&p).is_some() {
                m.todo.remove(&p);
            }
        }
    }

    /// Gives back pages taken but not gathered.
    fn give_back(&self, run: Range<u64>) {
        self.lock().todo.extend(run);
    }
}

/// Counters of the intermediary source.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GatherStats {
    /// Pages read from intermediaries (faults and gather).
    pub pages: u64,
    /// Runs read from them.
    pub runs: u64,
    /// Runs handed to the direct source.
    pub direct_runs: u64,
    /// Located runs the intermediaries could not give (down, or a value refused as
    /// corrupt) that were asked of the direct source instead.
    pub fallback_runs: u64,
    /// The last such failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Time the read-ahead was held back ([`GatherSource::hold_ahead`]), ms.
    pub ahead_held_ms: u64,
    /// The store's counters (bytes per intermediary, corrupt values refused).
    pub store: StoreStats,
}

/// Pages from the intermediaries where located, the rest from `direct`.
pub struct GatherSource<D: PageSource> {
    store: PageStore,
    locs: Arc<Locations>,
    direct: D,
    pages: u64,
    runs: u64,
    direct_runs: u64,
    fallback: bool,
    fallback_runs: u64,
    last_error: Option<String>,
    /// The gather's reads in flight ([`GatherSource::start_ahead`]): tag → run.
    ahead: Option<StorePool>,
    /// Since when the read-ahead is held ([`GatherSource::hold_ahead`]), and for how long
    /// it was held before.
    held_since: Option<std::time::Instant>,
    held_for: Duration,
    ahead_runs: HashMap<u64, Range<u64>>,
    next_tag: u64,
}

/// A gather read that finished ([`GatherSource::ahead_finished`]).
pub enum AheadRead {
    /// The pages of the run, to place.
    Pages(Range<u64>, Vec<u8>),
    /// The intermediaries could not give the run; it was asked of the direct source (its
    /// pages come later).
    AskedDirect(Range<u64>),
}

impl<D: PageSource> GatherSource<D> {
    /// Reads located pages through `store`; others are asked of `direct`.
    pub fn new(store: PageStore, locs: Arc<Locations>, direct: D) -> Self {
        GatherSource {
            store,
            locs,
            direct,
            pages: 0,
            runs: 0,
            direct_runs: 0,
            fallback: false,
            fallback_runs: 0,
            last_error: None,
            ahead: None,
            held_since: None,
            held_for: Duration::ZERO,
            ahead_runs: HashMap::new(),
            next_tag: 0,
        }
    }

    /// Reads gather runs in the background from now on: `workers` threads, each with its own
    /// connections, so that several runs are on their way while the caller serves faults and
    /// the link (one run at a time left the destination's link idle between round trips).
    pub fn start_ahead(&mut self, workers: usize) -> Result<(), IntermediaryError> {
        self.ahead = Some(StorePool::start(&self.store, workers, "sg-gather")?);
        Ok(())
    }

    /// Whether another gather run can be read ahead now (one per worker, none while held).
    pub fn ahead_room(&self) -> bool {
        self.held_since.is_none()
            && self
                .ahead
                .as_ref()
                .is_some_and(|p| p.in_flight() < p.workers())
    }

    /// Holds the read-ahead (no run started) or lets it go; the time held is counted
    /// (`ahead_held_ms`).
    pub fn hold_ahead(&mut self, hold: bool) {
        match (self.held_since, hold) {
            (None, true) => self.held_since = Some(std::time::Instant::now()),
            (Some(t), false) => {
                self.held_for += t.elapsed();
                self.held_since = None;
            }
            _ => {}
        }
    }

    /// Gather runs being read.
    pub fn ahead_in_flight(&self) -> usize {
        self.ahead.as_ref().map_or(0, |p| p.in_flight())
    }

    /// Starts reading `run`: [`Fetched::Later`], its pages come from
    /// [`GatherSource::ahead_finished`]. A run not wholly located (or with no readers) is
    /// fetched as a fault's would be: into `buf` at once ([`Fetched::Here`]) or asked of the
    /// direct source.
    pub fn ahead_submit(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
        let hashes: Option<Vec<ContentHash>> = run.clone().map(|p| self.locs.get(p)).collect();
        let Some(hashes) = hashes.filter(|_| self.ahead.is_some()) else {
            let n = ((run.end - run.start) * PAGE_SIZE) as usize;
            return self.fetch(run, &mut buf[..n]);
        };
        let pool = self.ahead.as_mut().expect("checked");
        let tag = self.next_tag;
        self.next_tag += 1;
        pool.submit(Job::Get { tag, hashes })
            .map_err(|e| PageError::Source(e.to_string()))?;
        self.ahead_runs.insert(tag, run);
        Ok(Fetched::Later)
    }

    /// A gather run read ahead that finished (waiting up to `wait`): its pages, or, if the
    /// intermediaries could not give it, the run asked of the direct source (while the source
    /// is there; after, an error).
    pub fn ahead_finished(&mut self, wait: Duration) -> Result<Option<AheadRead>, PageError> {
        let Some(done) = self.ahead.as_mut().and_then(|p| p.next(wait)) else {
            return Ok(None);
        };
        let run = self
            .ahead_runs
            .remove(&done.tag)
            .expect("a finished read was submitted");
        match done.result {
            Ok(Output::Get(pages)) if pages.len() as u64 == (run.end - run.start) * PAGE_SIZE => {
                self.pages += run.end - run.start;
                self.runs += 1;
                Ok(Some(AheadRead::Pages(run, pages)))
            }
            other => {
                let e = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "a read of the wrong length".into(),
                };
                self.last_error = Some(e.clone());
                if !self.fallback {
                    return Err(PageError::Source(format!("intermediaries: {e}")));
                }
                self.fallback_runs += 1;
                let mut b = vec![0u8; ((run.end - run.start) * PAGE_SIZE) as usize];
                Ok(Some(match self.direct.fetch(run.clone(), &mut b)? {
                    Fetched::Here => AheadRead::Pages(run, b),
                    Fetched::Later => AheadRead::AskedDirect(run),
                }))
            }
        }
    }

    /// Whether a located run the intermediaries cannot give goes to the direct source (true
    /// while the source still holds every page) or is an error (once it is gone).
    pub fn set_fallback(&mut self, on: bool) {
        self.fallback = on;
    }

    /// The direct source (to take the requests it queued).
    pub fn direct(&mut self) -> &mut D {
        &mut self.direct
    }

    /// Counters so far.
    pub fn stats(&self) -> GatherStats {
        GatherStats {
            pages: self.pages,
            runs: self.runs,
            direct_runs: self.direct_runs,
            fallback_runs: self.fallback_runs,
            last_error: self.last_error.clone(),
            ahead_held_ms: (self.held_for + self.held_since.map_or(Duration::ZERO, |t| t.elapsed()))
                .as_millis() as u64,
            store: {
                let mut st = self.store.stats();
                if let Some(p) = &self.ahead {
                    st.add(&p.stats());
                }
                st
            },
        }
    }
}

impl<D: PageSource> PageSource for GatherSource<D> {
    fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
        let hashes: Option<Vec<ContentHash>> = run.clone().map(|p| self.locs.get(p)).collect();
        let Some(hashes) = hashes else {
            self.direct_runs += 1;
            return self.direct.fetch(run, buf);
        };
        let got = self
            .store
            .get(&hashes)
            .map_err(|e| e.to_string())
            .and_then(
                |pages| match pages.iter().find(|p| p.len() != PAGE_SIZE as usize) {
                    Some(p) => Err(format!("a page of {} bytes", p.len())),
                    None => Ok(pages),
                },
            );
        let pages = match got {
            Ok(pages) => pages,
            Err(e) => {
                // Nothing of a failed run is placed.
                self.last_error = Some(e.to_string());
                if !self.fallback {
                    return Err(PageError::Source(format!("intermediaries: {e}")));
                }
                self.fallback_runs += 1;
                return self.direct.fetch(run, buf);
            }
        };
        for (page, dst) in pages.iter().zip(buf.chunks_exact_mut(PAGE_SIZE as usize)) {
            dst.copy_from_slice(page);
        }
        self.pages += hashes.len() as u64;
        self.runs += 1;
        Ok(Fetched::Here)
    }
}

/// A token bucket over bytes: `rate` bytes/s, bursts of at most `burst` bytes.
#[derive(Debug)]
pub struct RateCap {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateCap {
    /// `rate` bytes/s (at least one page/s), bursts of `burst` bytes (at least one page).
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(PAGE_SIZE) as f64;
        RateCap {
            rate: rate.max(PAGE_SIZE) as f64,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Whole pages' worth of bytes that may be taken now (at most `want`), taken.
    pub fn take(&mut self, want: u64) -> u64 {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        let page = PAGE_SIZE as f64;
        let n = ((self.tokens / page).floor() * page)
            .min(want as f64)
            .max(0.0);
        self.tokens -= n;
        n as u64
    }
}

/// The gather: the located pages still missing, in page order, capped by a [`RateCap`];
/// faults bring their page alone.
pub struct GatherPolicy {
    locs: Arc<Locations>,
    max_run: u64,
    cap: Option<RateCap>,
}

impl GatherPolicy {
    /// Runs of at most `max_run` pages; `gather_rate` bytes/s at most (None: as fast as the
    /// intermediaries answer).
    pub fn new(locs: Arc<Locations>, max_run: u64, gather_rate: Option<u64>) -> Self {
        let max_run = max_run.max(1);
        GatherPolicy {
            locs,
            max_run,
            // A burst of one run: the cap holds over any window longer than a run's time.
            cap: gather_rate.map(|r| RateCap::new(r, max_run * PAGE_SIZE)),
        }
    }
}

impl PrePaging for GatherPolicy {
    fn next(&mut self, server: &PageServer) -> Option<Range<u64>> {
        let run = self
            .locs
            .take_run(self.max_run, |p| !server.is_present(p))?;
        let Some(cap) = &mut self.cap else {
            return Some(run);
        };
        let pages = cap.take((run.end - run.start) * PAGE_SIZE) / PAGE_SIZE;
        let (now, later) = (run.start..run.start + pages, run.start + pages..run.end);
        if !later.is_empty() {
            self.locs.give_back(later);
        }
        (!now.is_empty()).then_some(now)
    }
}

/// `ioctl` request: bytes in a TCP socket's send queue not yet sent (linux/sockios.h).
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Bytes written to TCP socket `fd` that the kernel has not put on the wire yet: how far the
/// link is behind its writer (the receiver's window or the path is full). Unacknowledged
/// bytes already sent do not count: a long link is not a slow one.
pub fn unsent_bytes(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd, SIOCOUTQNSD as _, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// The source's choice for each batch (the paper: "saturate the direct connection first,
/// then route excess traffic through intermediaries"): the link while what it could not send
/// yet stays under `high_water` bytes, the intermediaries otherwise. A link that keeps up
/// never sends a page through an intermediary, so the worst case is direct post-copy.
#[derive(Debug, Clone)]
pub struct Router {
    high_water: u64,
    /// Batches sent direct.
    pub direct: u64,
    /// Batches sent to the intermediaries.
    pub scattered: u64,
}

impl Router {
    /// A router that sends direct while less than `high_water` bytes wait in the link.
    pub fn new(high_water: u64) -> Self {
        Router {
            high_water,
            direct: 0,
            scattered: 0,
        }
    }

    /// Whether the next batch goes direct, given the link's socket and the bytes its own
    /// buffers (TLS) hold; counts the choice.
    pub fn go_direct(&mut self, fd: std::os::fd::RawFd, buffered: u64) -> std::io::Result<bool> {
        let direct = self.keeps_up(fd, buffered)?;
        self.count(direct);
        Ok(direct)
    }

    /// Whether the link keeps up now (not counted as a choice).
    pub fn keeps_up(&self, fd: std::os::fd::RawFd, buffered: u64) -> std::io::Result<bool> {
        Ok(unsent_bytes(fd)? + buffered < self.high_water)
    }

    /// Counts a choice made with [`Router::keeps_up`].
    pub fn count(&mut self, direct: bool) {
        if direct {
            self.direct += 1;
        } else {
            self.scattered += 1;
        }
    }
}

/// Scatter errors.
#[derive(Debug, thiserror::Error)]
pub enum ScatterError {
    /// The link failed (or its backlog could not be read).
    #[error("scatter: link: {0}")]
    Link(#[from] std::io::Error),
    /// The intermediaries could not take a batch (the source still holds it).
    #[error("scatter: {0}")]
    Store(#[from] IntermediaryError),
    /// A batch that is not whole pages, or longer than a record spans.
    #[error("scatter: a batch of {0} bytes")]
    Batch(usize),
}

/// Counters of a scatter.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScatterStats {
    /// Pages sent on the link.
    pub direct_pages: u64,
    /// Pages sent to the intermediaries.
    pub scattered_pages: u64,
}

/// The source's scatter: every batch once, on the link while it keeps up ([`Router`]), else
/// to the intermediaries, with the record that tells the destination where its pages are.
pub struct Scatter {
    store: PageStore,
    router: Router,
    /// Pages each way so far.
    pub stats: ScatterStats,
    /// Worker threads storing batches in the background ([`Scatter::start_workers`]).
    pool: Option<StorePool>,
    /// Batches queued to the workers: tag → (first page, span, which pages).
    queued: HashMap<u64, (u64, u16, Vec<u64>)>,
    next_tag: u64,
}

/// A batch the intermediaries could not take (the source still holds it: it goes on the
/// link).
#[derive(Debug)]
pub struct Unstored {
    /// First page of the span.
    pub first: u64,
    /// Pages spanned.
    pub span: u16,
    /// Which pages of the span.
    pub present: Vec<u64>,
    /// Why.
    pub error: ScatterError,
}

impl Scatter {
    /// Scatters through `store`; the link is "behind" from `high_water` unsent bytes.
    pub fn new(store: PageStore, high_water: u64) -> Self {
        Scatter {
            store,
            router: Router::new(high_water),
            stats: ScatterStats::default(),
            pool: None,
            queued: HashMap::new(),
            next_tag: 0,
        }
    }

    /// Stores batches in the background from now on ([`Scatter::queue`]): `workers` threads,
    /// each with its own connections to every intermediary.
    pub fn start_workers(&mut self, workers: usize) -> Result<(), ScatterError> {
        self.pool = Some(StorePool::start(&self.store, workers, "sg-scatter")?);
        Ok(())
    }

    /// Whether the link keeps up now (not counted; see [`Scatter::count`]).
    pub fn link_keeps_up(
        &self,
        link_fd: std::os::fd::RawFd,
        buffered: u64,
    ) -> std::io::Result<bool> {
        self.router.keeps_up(link_fd, buffered)
    }

    /// Counts a choice made with [`Scatter::link_keeps_up`].
    pub fn count(&mut self, direct: bool) {
        self.router.count(direct);
    }

    /// Whether a batch can be queued now: two per worker, so that each has the next one at
    /// hand while the bytes in flight stay bounded.
    pub fn has_room(&self) -> bool {
        self.pool
            .as_ref()
            .is_some_and(|p| p.in_flight() < 2 * p.workers())
    }

    /// Batches queued and not finished.
    pub fn in_flight(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.in_flight())
    }

    /// Queues the pages of `first..first + span` selected by `present` (`pages`: their bytes,
    /// in order) for the workers; [`Scatter::finished`] gives its `located` record.
    pub fn queue(
        &mut self,
        first: u64,
        span: u16,
        present: Vec<u64>,
        pages: Vec<u8>,
    ) -> Result<(), ScatterError> {
        let page = PAGE_SIZE as usize;
        let nw = (span as usize).div_ceil(64);
        let n: usize = present
            .iter()
            .take(nw)
            .map(|w| w.count_ones() as usize)
            .sum();
        if span == 0
            || span as u64 > super::wire::BATCH_PAGES
            || present.len() < nw
            || pages.len() != n * page
        {
            return Err(ScatterError::Batch(pages.len()));
        }
        let Some(pool) = self.pool.as_mut() else {
            return Err(ScatterError::Store(IntermediaryError::Config(
                "no scatter workers".into(),
            )));
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        pool.submit(Job::Put { tag, pages })?;
        self.queued
            .insert(tag, (first, span, present[..nw].to_vec()));
        Ok(())
    }

    /// A queued batch that finished (waiting up to `wait`): its `located` record, or the batch
    /// back if the intermediaries could not take it.
    pub fn finished(&mut self, wait: Duration) -> Option<Result<records::Located, Unstored>> {
        let done = self.pool.as_mut()?.next(wait)?;
        let (first, span, present) = self
            .queued
            .remove(&done.tag)
            .expect("a finished job was queued");
        Some(match done.result {
            Ok(Output::Put(hashes)) => {
                self.stats.scattered_pages += hashes.len() as u64;
                Ok(records::Located {
                    first,
                    span,
                    present,
                    hashes,
                })
            }
            Ok(Output::Get(_)) => unreachable!("the scatter queues only puts"),
            Err(e) => Err(Unstored {
                first,
                span,
                present,
                error: e.into(),
            }),
        })
    }

    /// Sends the pages of `data` (whole pages, from page `first`, at most a record's span):
    /// through `direct` when the link (socket `link_fd`, `buffered` bytes in its own buffers)
    /// keeps up — `None` — else to the intermediaries — the `located` record to send.
    pub fn send(
        &mut self,
        first: u64,
        data: &[u8],
        link_fd: std::os::fd::RawFd,
        buffered: u64,
        direct: impl FnOnce(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<Option<records::Located>, ScatterError> {
        let page = PAGE_SIZE as usize;
        let n = data.len() / page;
        if !data.len().is_multiple_of(page) || n == 0 || n as u64 > super::wire::BATCH_PAGES {
            return Err(ScatterError::Batch(data.len()));
        }
        if self.router.go_direct(link_fd, buffered)? {
            direct(first, data)?;
            self.stats.direct_pages += n as u64;
            return Ok(None);
        }
        let pages: Vec<&[u8]> = data.chunks_exact(page).collect();
        let hashes = self.store.put(&pages)?;
        self.stats.scattered_pages += n as u64;
        let mut present = vec![0u64; n.div_ceil(64)];
        for i in 0..n {
            present[i / 64] |= 1 << (i % 64);
        }
        Ok(Some(records::Located {
            first,
            span: n as u16,
            present,
            hashes,
        }))
    }

    /// The intermediaries' counters (bytes per intermediary, dedup hits), the workers'
    /// included.
    pub fn store_stats(&self) -> StoreStats {
        let mut s = self.store.stats();
        if let Some(p) = &self.pool {
            s.add(&p.stats());
        }
        s
    }

    /// Counts `n` pages the caller sent on the link.
    pub fn sent_direct(&mut self, n: u64) {
        self.stats.direct_pages += n;
    }
}

/// What the migration service asks of Scatter-Gather (`set-scatter`, JSON): where pages go
/// and how, when the link counts as behind, how fast the destination gathers.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScatterRequest {
    /// The intermediaries (Redis servers, `host:port`), in placement order.
    pub intermediaries: Vec<std::net::SocketAddr>,
    /// Copies of each page (default 1).
    #[serde(default = "one")]
    pub replicas: usize,
    /// Encrypt pages at the intermediaries (the MAC is always there).
    #[serde(default)]
    pub encrypt: bool,
    /// The intermediaries are seed nodes of one Redis Cluster.
    #[serde(default)]
    pub cluster: bool,
    /// Lifetime of stored pages, s (default 3600).
    #[serde(default = "hour")]
    pub ttl_secs: u32,
    /// The link is behind from this many unsent bytes (default 256 KiB).
    #[serde(default = "high_water")]
    pub high_water: u64,
    /// The destination's gather cap, bytes/s (0, the default: uncapped).
    #[serde(default)]
    pub gather_rate: u64,
    /// The store key (64 hex digits) shared by a group of migrations, so that their
    /// identical pages are stored once (gang migration); default: a fresh key for this one.
    #[serde(default)]
    pub key: Option<String>,
    /// Reserve each absent page before writing it, so that migrations sharing `key` and
    /// racing on one page send it once (default: on with a shared key).
    #[serde(default)]
    pub reserve: Option<bool>,
    /// Threads storing batches at the intermediaries, each with its own connections
    /// (default 4): their hashing, sealing and round trips overlap.
    #[serde(default = "workers")]
    pub workers: usize,
}

/// Scatter workers at most.
pub const MAX_WORKERS: usize = 16;

fn one() -> usize {
    1
}
fn workers() -> usize {
    4
}
fn hour() -> u32 {
    3600
}
fn high_water() -> u64 {
    256 << 10
}

impl ScatterRequest {
    /// Reads and checks a request (a bad one is refused with the reason).
    pub fn parse(json: &str) -> Result<Self, String> {
        let r: ScatterRequest =
            serde_json::from_str(json).map_err(|e| format!("set-scatter: {e}"))?;
        let n = r.intermediaries.len();
        if n == 0 || n > records::MAX_INTERMEDIARIES {
            return Err(format!(
                "set-scatter: {n} intermediaries (1..={})",
                records::MAX_INTERMEDIARIES
            ));
        }
        if r.replicas == 0 || r.replicas > n || (r.cluster && r.replicas != 1) {
            return Err(format!(
                "set-scatter: {} replicas on {n} intermediaries (a cluster keeps its own: 1)",
                r.replicas
            ));
        }
        if r.ttl_secs == 0 {
            return Err("set-scatter: ttl_secs must be at least 1".into());
        }
        if r.workers == 0 || r.workers > MAX_WORKERS {
            return Err(format!(
                "set-scatter: {} workers (1..={MAX_WORKERS})",
                r.workers
            ));
        }
        r.store_key()?;
        Ok(r)
    }

    /// The shared key if one was given, else a fresh one.
    pub fn store_key(&self) -> Result<super::intermediary::StoreKey, String> {
        let Some(hex) = &self.key else {
            return super::intermediary::StoreKey::generate().map_err(|e| e.to_string());
        };
        let b = hex.as_bytes();
        if b.len() != 64 || !b.iter().all(u8::is_ascii_hexdigit) {
            return Err("set-scatter: key must be 64 hex digits".into());
        }
        let mut k = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).expect("checked") as u8;
            k[i] = digit(pair[0]) << 4 | digit(pair[1]);
        }
        Ok(super::intermediary::StoreKey::from_bytes(k))
    }

    /// The store configuration it describes.
    pub fn store_config(&self) -> super::intermediary::StoreConfig {
        super::intermediary::StoreConfig {
            encrypt: self.encrypt,
            cluster: self.cluster,
            replicas: self.replicas,
            ttl_secs: self.ttl_secs as u64,
            reserve: self.reserve.unwrap_or(self.key.is_some()),
            ..super::intermediary::StoreConfig::new(self.intermediaries.clone())
        }
    }
}

/// The source's Scatter-Gather report (in the migration report's `scatter`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ScatterReport {
    /// Pages with data sent on the link after the switch-over.
    pub direct_pages: u64,
    /// Pages sent to the intermediaries.
    pub scattered_pages: u64,
    /// Zero pages (markers on the link, never scattered).
    pub zero_pages: u64,
    /// `located` frames sent.
    pub located_frames: u64,
    /// Batches the intermediaries could not take, sent on the link instead.
    pub store_failures: u64,
    /// Pages sent to the intermediaries again on the link (the destination could not read
    /// them, or faulted before their location arrived).
    pub resent_direct: u64,
    /// Bytes source → intermediaries (RESP on the wire, all of them).
    pub bytes_to_intermediaries: u64,
    /// Pages already at their intermediary or repeated in a batch (stored once).
    pub dedup_hits: u64,
    /// Per intermediary.
    pub intermediaries: Vec<super::intermediary::IntermediaryStats>,
}

/// Scatter-Gather's records on the migration link (payloads of the `store` and `located`
/// frames; see `docs/scatter-gather.md`), laid out and checked here, strictly: anything
/// malformed is refused before it is used.
pub mod records {
    use std::net::SocketAddr;

    use super::super::intermediary::{ContentHash, RedisAuth, StoreConfig, StoreKey};
    use super::super::wire::{WireError, BATCH_PAGES};

    /// Intermediaries a `store` record names at most.
    pub const MAX_INTERMEDIARIES: usize = 64;
    const FLAG_ENCRYPT: u8 = 1;
    const FLAG_CLUSTER: u8 = 2;

    fn bad(why: impl Into<String>) -> WireError {
        WireError(why.into())
    }

    struct Reader<'a>(&'a [u8], &'static str);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
            if self.0.len() < n {
                return Err(bad(format!("{} record is truncated", self.1)));
            }
            let (h, t) = self.0.split_at(n);
            self.0 = t;
            Ok(h)
        }
        fn u8(&mut self) -> Result<u8, WireError> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Result<u16, WireError> {
            Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
        }
        fn u32(&mut self) -> Result<u32, WireError> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
        }
        fn u64(&mut self) -> Result<u64, WireError> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
        }
        fn end(self) -> Result<(), WireError> {
            if self.0.is_empty() {
                Ok(())
            } else {
                Err(bad(format!(
                    "{} record has {} stray bytes",
                    self.1,
                    self.0.len()
                )))
            }
        }
    }

    /// Source → destination, once, before the hand-over: where scattered pages go and the key
    /// to read them (only ever on the TLS link).
    #[derive(Debug, Clone)]
    pub struct Store {
        /// The migration's store key.
        pub key: StoreKey,
        /// Pages are encrypted.
        pub encrypt: bool,
        /// The intermediaries are seed nodes of a Redis Cluster.
        pub cluster: bool,
        /// Copies of each page.
        pub replicas: u8,
        /// Lifetime of stored pages, s.
        pub ttl_secs: u32,
        /// The intermediaries, in placement order.
        pub intermediaries: Vec<SocketAddr>,
        /// Their credentials, if they require them.
        pub auth: Option<RedisAuth>,
        /// The destination's gather cap, bytes/s (0: as fast as the intermediaries answer);
        /// the migration service's choice, applied by the destination.
        pub gather_rate: u64,
    }

    impl Store {
        /// The store configuration it describes (timeouts: the caller's).
        pub fn config(&self) -> StoreConfig {
            StoreConfig {
                encrypt: self.encrypt,
                cluster: self.cluster,
                replicas: self.replicas as usize,
                ttl_secs: self.ttl_secs as u64,
                auth: self.auth.clone(),
                ..StoreConfig::new(self.intermediaries.clone())
            }
        }

        /// Its payload: key (32), flags (u8), replicas (u8), ttl (u32), count (u8), then per
        /// intermediary its address as text (u8 length, bytes); then the credentials: user and
        /// password (u16 length, bytes each; an empty password: none, an empty user: the
        /// default user); the gather rate (u64, bytes/s, 0: uncapped).
        pub fn encode(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(self.key.as_bytes());
            let flag = |on: bool, f: u8| if on { f } else { 0 };
            out.push(flag(self.encrypt, FLAG_ENCRYPT) | flag(self.cluster, FLAG_CLUSTER));
            out.push(self.replicas);
            out.extend_from_slice(&self.ttl_secs.to_le_bytes());
            out.push(self.intermediaries.len() as u8);
            for a in &self.intermediaries {
                let t = a.to_string();
                out.push(t.len() as u8);
                out.extend_from_slice(t.as_bytes());
            }
            let (user, password) = match &self.auth {
                Some(a) => (a.user.as_deref().unwrap_or(""), a.password.as_str()),
                None => ("", ""),
            };
            for t in [user, password] {
                let t = &t.as_bytes()[..t.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(t.len() as u16).to_le_bytes());
                out.extend_from_slice(t);
            }
            out.extend_from_slice(&self.gather_rate.to_le_bytes());
        }

        /// Reads a payload, refusing anything malformed or unusable.
        pub fn decode(b: &[u8]) -> Result<Self, WireError> {
            let mut r = Reader(b, "store");
            let key = StoreKey::from_bytes(r.take(32)?.try_into().expect("32"));
            let flags = r.u8()?;
            if flags & !(FLAG_ENCRYPT | FLAG_CLUSTER) != 0 {
                return Err(bad(format!("store record flags {flags:#x}")));
            }
            let replicas = r.u8()?;
            let ttl_secs = r.u32()?;
            let n = r.u8()? as usize;
            if n == 0 || n > MAX_INTERMEDIARIES {
                return Err(bad(format!(
                    "store record names {n} intermediaries (1..={MAX_INTERMEDIARIES})"
                )));
            }
            if replicas == 0 || replicas as usize > n {
                return Err(bad(format!("store record: {replicas} replicas on {n}")));
            }
            if ttl_secs == 0 {
                return Err(bad("store record: pages that expire at once"));
            }
            let mut intermediaries = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.u8()? as usize;
                let t = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| bad("store record: an address is not text"))?;
                let a: SocketAddr = t
                    .parse()
                    .map_err(|_| bad(format!("store record: bad address {t:?}")))?;
                // One spelling per address: a record reads back as it was written.
                if a.to_string() != t {
                    return Err(bad(format!("store record: address {t:?} is not canonical")));
                }
                intermediaries.push(a);
            }
            let mut text = || {
                let n = r.u16()? as usize;
                String::from_utf8(r.take(n)?.to_vec())
                    .map_err(|_| bad("store record: credentials are not text"))
            };
            let (user, password) = (text()?, text()?);
            if password.is_empty() && !user.is_empty() {
                return Err(bad("store record: a user without a password"));
            }
            let gather_rate = r.u64()?;
            let auth = (!password.is_empty()).then(|| RedisAuth {
                user: (!user.is_empty()).then_some(user),
                password,
            });
            r.end()?;
            Ok(Store {
                auth,
                key,
                encrypt: flags & FLAG_ENCRYPT != 0,
                cluster: flags & FLAG_CLUSTER != 0,
                replicas,
                ttl_secs,
                intermediaries,
                gather_rate,
            })
        }
    }

    /// Source → destination: pages `first..first + span` selected by `present` are at the
    /// intermediaries, at these addresses (the paper's PAGE_SCATTERED control records).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Located {
        /// First page of the span.
        pub first: u64,
        /// Pages spanned (1..=BATCH_PAGES).
        pub span: u16,
        /// Which pages of the span are located.
        pub present: Vec<u64>,
        /// Their addresses, in page order.
        pub hashes: Vec<ContentHash>,
    }

    impl Located {
        /// The located pages and their addresses.
        pub fn pages(&self) -> impl Iterator<Item = (u64, &ContentHash)> + '_ {
            (0..self.span as u64)
                .filter(|i| self.present[(i / 64) as usize] >> (i % 64) & 1 == 1)
                .map(|i| self.first + i)
                .zip(&self.hashes)
        }

        /// Its payload: first (u64), span (u16), the span's presence words, 32 bytes per
        /// located page.
        pub fn encode(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.first.to_le_bytes());
            out.extend_from_slice(&self.span.to_le_bytes());
            for w in &self.present[..(self.span as usize).div_ceil(64)] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            for h in &self.hashes {
                out.extend_from_slice(h);
            }
        }

        /// Refuses a record whose span runs past guest memory (`pages` pages): for a record
        /// decoded before the receiver knew its guest's size.
        pub fn check(&self, pages: u64) -> Result<(), WireError> {
            if (self.first)
                .checked_add(self.span as u64)
                .is_none_or(|e| e > pages)
            {
                return Err(bad(format!(
                    "located record {}+{} runs past guest memory ({pages} pages)",
                    self.first, self.span
                )));
            }
            Ok(())
        }

        /// Reads a payload, refusing anything malformed; `pages`: guest memory in pages.
        pub fn decode(b: &[u8], pages: u64) -> Result<Self, WireError> {
            let mut r = Reader(b, "located");
            let first = r.u64()?;
            let span = r.u16()?;
            if span == 0 || span as u64 > BATCH_PAGES {
                return Err(bad(format!("located record spans {span} pages")));
            }
            if first.checked_add(span as u64).is_none_or(|e| e > pages) {
                return Err(bad(format!(
                    "located record {first}+{span} runs past guest memory ({pages} pages)"
                )));
            }
            let nw = (span as usize).div_ceil(64);
            let present: Vec<u64> = (0..nw).map(|_| r.u64()).collect::<Result<_, _>>()?;
            let tail = span as u64 % 64;
            if tail != 0 && present[nw - 1] >> tail != 0 {
                return Err(bad("located record marks pages beyond its span"));
            }
            let n: usize = present.iter().map(|w| w.count_ones() as usize).sum();
            let hashes = (0..n)
                .map(|_| Ok(r.take(32)?.try_into().expect("32")))
                .collect::<Result<Vec<ContentHash>, WireError>>()?;
            r.end()?;
            Ok(Located {
                first,
                span,
                present,
                hashes,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn records_round_trip_and_damage_is_refused() {
            let l = Located {
                first: 640,
                span: 70,
                present: vec![0b1011, 1 << 5],
                hashes: vec![[1; 32], [2; 32], [3; 32], [4; 32]],
            };
            let mut b = Vec::new();
            l.encode(&mut b);
            assert_eq!(Located::decode(&b, 1024).unwrap(), l);
            let pages: Vec<u64> = l.pages().map(|(p, _)| p).collect();
            assert_eq!(pages, [640, 641, 643, 640 + 69]);
            for cut in 0..b.len() {
                assert!(Located::decode(&b[..cut], 1024).is_err());
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Located::decode(&long, 1024).is_err());
            assert!(Located::decode(&b, 700)
                .unwrap_err()
                .0
                .contains("past guest"));
            let mut beyond = b.clone();
            beyond[10 + 8 + 7] = 0x80; // bit 127 of a 70-page span
            assert!(Located::decode(&beyond, 1024).is_err());

            let s = Store {
                key: StoreKey::from_bytes([9; 32]),
                encrypt: true,
                cluster: false,
                auth: Some(RedisAuth {
                    user: None,
                    password: "s3cret".into(),
                }),
                replicas: 2,
                ttl_secs: 600,
                intermediaries: vec![
                    "10.77.3.2:6379".parse().unwrap(),
                    "[::1]:7000".parse().unwrap(),
                ],
                gather_rate: 16 << 20,
            };
            let mut b = Vec::new();
            s.encode(&mut b);
            let d = Store::decode(&b).unwrap();
            assert_eq!(d.key.as_bytes(), &[9; 32]);
            assert_eq!(d.intermediaries, s.intermediaries);
            assert_eq!(d.auth, s.auth);
            assert_eq!(d.gather_rate, 16 << 20);
            assert_eq!(format!("{:?}", d.auth), "Some(RedisAuth(..))");
            let c = d.config();
            assert_eq!((c.encrypt, c.replicas, c.ttl_secs), (true, 2, 600));
            for cut in 0..b.len() {
                assert!(Store::decode(&b[..cut]).is_err());
            }
            let mut three = b.clone();
            three[33] = 3;
            assert!(Store::decode(&three).unwrap_err().0.contains("replicas"));
            let mut flags = b.clone();
            flags[32] = 4;
            assert!(Store::decode(&flags).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// A link whose far end stops reading: what it cannot send piles up and the router turns
    /// to the intermediaries; once the far end drains it, back to the link.
    #[test]
    fn the_router_sends_direct_while_the_link_keeps_up() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        tx.set_nonblocking(true).unwrap();
        // A fixed send buffer (no autotuning): what piles up does not depend on the machine.
        let size: libc::c_int = 512 << 10;
        // SAFETY: setsockopt with a valid int option on our own socket.
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let mut router = Router::new(64 << 10);
        let batch = vec![7u8; 64 << 10];
        let fd = tx.as_raw_fd();
        assert!(router.go_direct(fd, 0).unwrap(), "an idle link");
        assert!(
            !router.go_direct(fd, 300 << 10).unwrap(),
            "its own buffers count"
        );
        // Fill until the kernel refuses more: the receiver's window is shut.
        let mut written = 0u64;
        loop {
            match tx.write(&batch) {
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let stuck = unsent_bytes(fd).unwrap();
        assert!(stuck >= 64 << 10, "{stuck} of {written} bytes unsent");
        assert!(
            !router.go_direct(fd, 0).unwrap(),
            "a link behind: intermediaries"
        );
        // The far end reads everything: the link keeps up again.
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < written {
            got += rx.read(&mut sink).unwrap() as u64;
        }
        let mut tries = 0;
        while unsent_bytes(fd).unwrap() > 0 {
            tries += 1;
            assert!(tries < 1000, "the kernel never sent the rest");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(router.go_direct(fd, 0).unwrap());
        assert_eq!((router.direct, router.scattered), (2, 2));
    }
}
