//! The missing-page server: guest RAM registered with userfaultfd, its missing pages brought in
//! from a [`PageSource`] as the guest touches them, ahead of it as a [`PrePaging`] strategy
//! asks, and in the background until every page the source holds is in. Lazy restore (pages
//! from a snapshot chain) and post-copy migration (pages from the migration link) are both this
//! server with another source and another strategy.
//!
//! Mechanism only: where pages come from is the source's business, which pages to bring next
//! the strategy's. The server keeps which pages are in, places them (`UFFDIO_COPY` /
//! `UFFDIO_ZEROPAGE`), wakes the faulting threads and counts (faults, pages prefetched and
//! placed, fault latency).
//!
//! A source either has the pages at hand (a snapshot chain: [`Fetched::Here`], read into the
//! buffer it is given) or asks someone for them ([`Fetched::Later`]: a request over a link;
//! whoever receives the answer gives it to [`PageServer::place`]). A fault on a page asked for
//! later stays pending until its page is placed; its latency is measured from the fault read
//! to the page in.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::uffd::{UffdError, Userfault};

/// Page-server errors.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The source could not give a page (unreadable, or it failed its check).
    #[error("{0}")]
    Source(String),
    /// A run outside guest memory.
    #[error("pages {first}+{n} run past guest memory ({pages} pages)")]
    OutOfRange {
        /// First page of the run.
        first: u64,
        /// Its length in pages.
        n: u64,
        /// Guest memory in pages.
        pages: u64,
    },
}

/// What a source did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The pages are in the buffer it was given.
    Here,
    /// Asked for: they come later, through [`PageServer::place`].
    Later,
}

/// Where missing pages come from.
pub trait PageSource {
    /// Brings the pages of `run` (at least one of them missing). A source with the pages at
    /// hand reads them into `buf` (exactly the run's bytes) and says [`Fetched::Here`]; one
    /// that must ask for them sends (or queues) the request and says [`Fetched::Later`].
    fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError>;
}

/// Which pages to bring beside and after the ones the guest faults on: the pre-paging policy,
/// asked after each fault and whenever no fault waits.
pub trait PrePaging {
    /// The run to bring for a fault on `page` (it must hold `page`): the page alone, or its
    /// neighbourhood when the source reads that at the same cost.
    fn around_fault(&mut self, page: u64) -> Range<u64> {
        page..page + 1
    }
    /// The next run to bring while no fault waits; `None`: nothing now.
    fn next(&mut self, _server: &PageServer) -> Option<Range<u64>> {
        None
    }
}

/// Brings only what faults (the source pushes the rest by itself).
pub struct FaultOnly;

impl PrePaging for FaultOnly {}

/// The server's counters, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct PageStats {
    /// Missing-page faults read.
    pub faults: AtomicU64,
    /// Faults whose page had to be fetched (their latency is recorded).
    pub served: AtomicU64,
    /// Pages brought in by the pre-paging strategy.
    pub prefetched: AtomicU64,
    /// Pages placed in all (faults, pre-paging, background, pushed).
    pub placed: AtomicU64,
    /// Sum of the served faults' latencies, µs.
    pub latency_sum_us: AtomicU64,
    /// Worst served fault latency, µs.
    pub latency_max_us: AtomicU64,
    /// Every served fault's latency, µs (for percentiles).
    pub latencies_us: Mutex<Vec<u64>>,
}

impl PageStats {
    /// Mean served fault latency, µs.
    pub fn latency_mean_us(&self) -> u64 {
        self.latency_sum_us.load(Ordering::Relaxed) / self.served.load(Ordering::Relaxed).max(1)
    }

    /// 99th percentile of the served fault latencies, µs (0 before the first).
    pub fn latency_p99_us(&self) -> u64 {
        let mut v = self
            .latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        v[(v.len() * 99).div_ceil(100) - 1]
    }

    fn record(&self, t: Instant) {
        let us = t.elapsed().as_micros() as u64;
        self.served.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
        self.latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(us);
    }
}

/// Why a run is brought in (for the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The guest touched it.
    Fault,
    /// The pre-paging strategy asked for it.
    Prefetch,
    /// The background fill.
    Fill,
}

/// Writes a line of the restore trace to stderr when `SPANVMM_RESTORE_DEBUG` is set: the
/// steps of a restore and the first faults of a lazy one, in µs.
pub fn trace(what: std::fmt::Arguments) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SPANVMM_RESTORE_DEBUG").is_some()) {
        eprintln!("[restore] {what}");
    }
}

/// Guest RAM under userfaultfd and the bookkeeping of its missing pages. Shared by reference
/// between the threads that serve it (all methods take `&self`).
pub struct PageServer {
    uffd: Userfault,
    ram: Arc<GuestRam>,
    pages: u64,
    /// Pages the source holds: the server is done when all of them are in. A fault on a page
    /// outside it (and not placed) gets a zero page.
    wanted: Vec<u64>,
    /// Pages placed by this server.
    present: Vec<AtomicU64>,
    /// Faulted pages asked for and not yet in, with the time of the fault.
    pending: Mutex<HashMap<u64, Instant>>,
    /// `pending`'s size, read without the lock on the placing path.
    pending_n: AtomicU64,
    stats: Arc<PageStats>,
    started: Instant,
}

fn bit(words: &[u64], p: u64) -> bool {
    words
        .get((p / 64) as usize)
        .is_some_and(|w| w >> (p % 64) & 1 == 1)
}

impl PageServer {
    /// Registers `ram` for missing-page faults; `wanted` (a bitmap, one bit a page) is what the
    /// source holds and what must be in before [`PageServer::finish`]. Pages present in the
    /// memfd already are not affected.
    pub fn register(
        ram: &Arc<GuestRam>,
        wanted: Vec<u64>,
        stats: Arc<PageStats>,
    ) -> Result<Self, PageError> {
        let pages = ram.size() / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        let mut wanted = wanted;
        wanted.resize(words, 0);
        let uffd = Userfault::register_missing(ram)?;
        Ok(PageServer {
            uffd,
            ram: ram.clone(),
            pages,
            wanted,
            present: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pending: Mutex::new(HashMap::new()),
            pending_n: AtomicU64::new(0),
            stats,
            started: Instant::now(),
        })
    }

    /// A bitmap of the pages in `extents` (`[first, end)` runs), for [`PageServer::register`].
    pub fn bitmap_of(pages: u64, extents: &[(u64, u64)]) -> Vec<u64> {
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        for &(a, b) in extents {
            for p in a..b.min(pages) {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        bits
    }

    /// Guest memory in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<PageStats> {
        &self.stats
    }

    /// The userfaultfd, to poll together with others (readable: a fault is waiting).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.uffd.raw_fd()
    }

    /// Whether this server placed page `p`.
    pub fn is_present(&self, p: u64) -> bool {
        self.present
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (p % 64) & 1 == 1)
    }

    /// Whether the source holds page `p`.
    pub fn is_wanted(&self, p: u64) -> bool {
        bit(&self.wanted, p)
    }

    /// Pages the source holds that are not in yet, as a bitmap.
    pub fn missing(&self) -> Vec<u64> {
        self.wanted
            .iter()
            .zip(&self.present)
            .map(|(w, p)| w & !p.load(Ordering::Acquire))
            .collect()
    }

    /// How many pages the source holds that are not in yet.
    pub fn remaining(&self) -> u64 {
        self.missing().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Faulted pages asked for and not in yet.
    pub fn pending(&self) -> Vec<u64> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn check(&self, first: u64, n: u64) -> Result<(), PageError> {
        if first.checked_add(n).is_none_or(|end| end > self.pages) {
            return Err(PageError::OutOfRange {
                first,
                n,
                pages: self.pages,
            });
        }
        Ok(())
    }

    fn mark(&self, a: u64, b: u64) {
        for p in a..b {
            self.present[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
        }
        if self.pending_n.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for p in a..b {
            if let Some(t) = pending.remove(&p) {
                self.stats.record(t);
            }
        }
        self.pending_n
            .store(pending.len() as u64, Ordering::Release);
    }

    /// Places the pages of `data` (whole pages, from page `first` on) that are not in yet and
    /// wakes whoever waits for them; returns how many it placed.
    pub fn place(&self, first: u64, data: &[u8]) -> Result<u64, PageError> {
        let n = data.len() as u64 / PAGE_SIZE;
        self.check(first, n)?;
        let at = |q: u64| ((q - first) * PAGE_SIZE) as usize;
        let mut placed = 0;
        let mut p = first;
        while p < first + n {
            if self.is_present(p) {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < first + n && !self.is_present(q) {
                q += 1;
            }
            placed += self.uffd.copy(p * PAGE_SIZE, &data[at(p)..at(q)])?;
            self.mark(p, q);
            p = q;
        }
        self.stats.placed.fetch_add(placed, Ordering::Relaxed);
        Ok(placed)
    }

    /// Places zero pages over `[first, first+n)` where not in yet; returns how many.
    pub fn place_zero(&self, first: u64, n: u64) -> Result<u64, PageError> {
        self.check(first, n)?;
        let mut placed = 0;
        let mut p = first;
        while p < first + n {
            if self.is_present(p) {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < first + n && !self.is_present(q) {
                q += 1;
            }
            self.uffd.zero(p * PAGE_SIZE, (q - p) * PAGE_SIZE)?;
            self.mark(p, q);
            placed += q - p;
            p = q;
        }
        self.stats.placed.fetch_add(placed, Ordering::Relaxed);
        Ok(placed)
    }

    /// Brings in the pages of `run` that are not in yet, from `source`; `buf` is scratch of at
    /// least the run's size. Returns whether they are in now (false: asked for, or nothing
    /// missing).
    pub fn bring(
        &self,
        source: &mut dyn PageSource,
        run: Range<u64>,
        why: Why,
        buf: &mut Vec<u8>,
    ) -> Result<bool, PageError> {
        let end = run.end.min(self.pages);
        // Only the part from the first to the last missing page is fetched.
        let Some(a) = (run.start..end).find(|&p| !self.is_present(p)) else {
            return Ok(false);
        };
        let b = (a..end).rev().find(|&p| !self.is_present(p)).unwrap_or(a) + 1;
        let bytes = ((b - a) * PAGE_SIZE) as usize;
        if buf.len() < bytes {
            buf.resize(bytes, 0);
        }
        match source.fetch(a..b, &mut buf[..bytes])? {
            Fetched::Later => Ok(false),
            Fetched::Here => {
                let placed = self.place(a, &buf[..bytes])?;
                if why == Why::Prefetch {
                    self.stats.prefetched.fetch_add(placed, Ordering::Relaxed);
                }
                Ok(true)
            }
        }
    }

    /// Waits up to `wait` for missing-page faults and serves every one waiting: a page placed
    /// meanwhile is woken, a page the source does not hold gets a zero page, any other is
    /// brought with the run `policy` picks around it. Returns how many faults it read.
    pub fn serve_faults(
        &self,
        source: &mut dyn PageSource,
        policy: &mut dyn PrePaging,
        wait: Duration,
        buf: &mut Vec<u8>,
    ) -> Result<u64, PageError> {
        let mut n = 0;
        let mut wait = wait;
        while let Some(gpa) = self.uffd.wait_fault(wait)? {
            wait = Duration::ZERO;
            n += 1;
            let page = gpa / PAGE_SIZE;
            if page >= self.pages {
                continue;
            }
            let t = Instant::now();
            let k = self.stats.faults.fetch_add(1, Ordering::Relaxed);
            if self.is_present(page) {
                // Placed after the fault was queued.
                self.uffd.wake(page * PAGE_SIZE, PAGE_SIZE)?;
                continue;
            }
            if !self.is_wanted(page) {
                let run = policy.around_fault(page);
                // Nothing the source holds around it: a zero page, at once.
                if !(run.start..run.end.min(self.pages)).any(|p| self.is_wanted(p)) {
                    self.place_zero(page, 1)?;
                    continue;
                }
                if !self.bring(source, run, Why::Fault, buf)? {
                    self.place_zero(page, 1)?;
                }
                continue;
            }
            {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if pending.contains_key(&page) {
                    continue; // asked for already
                }
                pending.insert(page, t);
                self.pending_n
                    .store(pending.len() as u64, Ordering::Release);
            }
            let run = policy.around_fault(page);
            debug_assert!(run.contains(&page), "a fault's run must hold its page");
            self.bring(source, run, Why::Fault, buf)?;
            if self.is_present(page) {
                // Placed by another thread between the check and the request: count it now.
                self.mark(page, page + 1);
            }
            if k < 16 {
                trace(format_args!(
                    "fault {k}: page {page:#x} at {} µs, served in {} µs",
                    (t - self.started).as_micros(),
                    t.elapsed().as_micros()
                ));
            }
        }
        Ok(n)
    }

    /// Serves faults until `stop`; while none waits, brings what `policy` picks next.
    pub fn serve_until(
        &self,
        source: &mut dyn PageSource,
        policy: &mut dyn PrePaging,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), PageError> {
        let mut buf = Vec::new();
        let mut next = None;
        while !stop.load(Ordering::Acquire) {
            if next.is_none() {
                next = policy.next(self);
            }
            let wait = if next.is_some() {
                Duration::ZERO
            } else {
                Duration::from_millis(10)
            };
            if self.serve_faults(source, policy, wait, &mut buf)? == 0 {
                if let Some(run) = next.take() {
                    self.bring(source, run, Why::Prefetch, &mut buf)?;
                }
            }
        }
        Ok(())
    }

    /// Brings in every wanted page of `runs` still missing, `chunk` pages a fetch at most:
    /// the background fill.
    pub fn fill(
        &self,
        source: &mut dyn PageSource,
        runs: &[(u64, u64)],
        chunk: u64,
    ) -> Result<(), PageError> {
        let mut buf = vec![0u8; (chunk * PAGE_SIZE) as usize];
        for &(first, end) in runs {
            let end = end.min(self.pages);
            let mut p = first;
            while p < end {
                if self.is_present(p) {
                    p += 1;
                    continue;
                }
                let mut q = p;
                while q < end && q - p < chunk && !self.is_present(q) {
                    q += 1;
                }
                self.bring(source, p..q, Why::Fill, &mut buf)?;
                p = q;
            }
        }
        Ok(())
    }

    /// Stops serving: later faults are ordinary page faults (call it once every wanted page is
    /// in; a fault that came after the last one served is woken by this).
    pub fn finish(self) -> Result<(), PageError> {
        Ok(self.uffd.unregister()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    /// What page `p` holds at the source.
    fn content(p: u64) -> u8 {
        (p % 251) as u8 + 1
    }

    /// A source with the pages at hand, as a snapshot chain.
    struct AtHand;

    impl PageSource for AtHand {
        fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
            for (i, page) in buf.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
                page.fill(content(run.start + i as u64));
            }
            Ok(Fetched::Here)
        }
    }

    /// A source that asks for pages, as a migration link: a responder thread places them.
    struct Asks(mpsc::Sender<Range<u64>>);

    impl PageSource for Asks {
        fn fetch(&mut self, run: Range<u64>, _: &mut [u8]) -> Result<Fetched, PageError> {
            self.0
                .send(run)
                .map_err(|e| PageError::Source(e.to_string()))?;
            Ok(Fetched::Later)
        }
    }

    /// Brings the aligned 4 pages around a fault.
    struct Fours;

    impl PrePaging for Fours {
        fn around_fault(&mut self, page: u64) -> Range<u64> {
            let first = page - page % 4;
            first..first + 4
        }
    }

    /// One server, two sources: a source with its pages at hand (lazy restore's chain) and
    /// one that asks and is answered later (post-copy's link), each with its pre-paging.
    #[test]
    fn the_one_page_server_serves_a_chain_and_a_link() {
        const PAGES: u64 = 1024;
        for asks in [false, true] {
            let ram = Arc::new(GuestRam::new(PAGES * PAGE_SIZE).unwrap());
            let stats = Arc::new(PageStats::default());
            // The source holds pages 0-511; the rest are zero wherever they come from.
            let wanted = PageServer::bitmap_of(PAGES, &[(0, 512)]);
            let server = PageServer::register(&ram, wanted, stats.clone()).unwrap();
            let stop = AtomicBool::new(false);
            let (tx, rx) = mpsc::channel::<Range<u64>>();
            std::thread::scope(|s| {
                let server = &server;
                let stop = &stop;
                let faults = s.spawn(move || {
                    if asks {
                        server.serve_until(&mut Asks(tx), &mut FaultOnly, stop)
                    } else {
                        drop(tx);
                        server.serve_until(&mut AtHand, &mut Fours, stop)
                    }
                });
                s.spawn(move || {
                    let mut buf = Vec::new();
                    for run in rx {
                        buf.resize(((run.end - run.start) * PAGE_SIZE) as usize, 0);
                        AtHand.fetch(run.clone(), &mut buf).unwrap();
                        server.place(run.start, &buf).unwrap();
                    }
                });
                let ram = ram.clone();
                let got: Vec<u8> = s
                    .spawn(move || {
                        [5u64, 300, 301, 700]
                            .iter()
                            .map(|&p| {
                                let mut b = [0u8; 1];
                                ram.read(p * PAGE_SIZE + 9, &mut b).unwrap();
                                b[0]
                            })
                            .collect()
                    })
                    .join()
                    .unwrap();
                assert_eq!(got, [content(5), content(300), content(301), 0]);
                // The rest: filled in the background, or pushed by the far side.
                if asks {
                    let mut buf = vec![0u8; (64 * PAGE_SIZE) as usize];
                    for first in (0..512).step_by(64) {
                        AtHand.fetch(first..first + 64, &mut buf).unwrap();
                        server.place(first, &buf).unwrap();
                    }
                } else {
                    server.fill(&mut AtHand, &[(0, 512)], 64).unwrap();
                }
                stop.store(true, Ordering::Release);
                faults.join().unwrap().unwrap();
            });
            // Faults on 5, 300 (and 301 when pages come one by one) fetched, 700 a zero page.
            let f = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let want_served = if asks { 3 } else { 2 };
            assert_eq!(f(&stats.faults), want_served + 1, "asks: {asks}");
            assert_eq!(f(&stats.served), want_served, "asks: {asks}");
            assert_eq!(f(&stats.placed), 513, "asks: {asks}");
            assert!(stats.latency_p99_us() >= stats.latency_mean_us() / 2);
            assert_eq!((server.remaining(), server.pending().len()), (0, 0));
            server.finish().unwrap();
            for p in 0..PAGES {
                let mut b = [0u8; 1];
                ram.read(p * PAGE_SIZE + 100, &mut b).unwrap();
                let want = if p < 512 { content(p) } else { 0 };
                assert_eq!(b[0], want, "page {p}, asks: {asks}");
            }
        }
    }

    #[test]
    fn a_run_past_guest_memory_is_refused() {
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        let server = PageServer::register(&ram, Vec::new(), Arc::default()).unwrap();
        for (first, n) in [(512u64, 1u64), (u64::MAX, 1), (511, 2)] {
            let e = server.place_zero(first, n).unwrap_err();
            assert!(e.to_string().contains("run past guest memory"), "{e}");
        }
        assert_eq!(server.place_zero(511, 1).unwrap(), 1);
        server.finish().unwrap();
    }
}
