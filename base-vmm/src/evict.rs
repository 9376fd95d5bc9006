//! Eviction of guest pages from a running VM (agile migration's mechanism): pages whose data
//! a store already holds are dropped from the VM's memfd (`fallocate(PUNCH_HOLE)`: the kernel
//! unmaps them everywhere, KVM's mappings included, through its MMU notifiers) while guest
//! RAM is registered with userfaultfd for missing pages. Whoever touches an evicted page
//! afterwards — a vCPU, KVM on its behalf (the shadow MMU walking an evicted page table), or
//! the VMM itself (devices, the mailbox, services, snapshots, a migration reading memory) —
//! blocks until [`Evictor::serve_faults`] has brought it back from the store (a
//! [`PageSource`]).
//!
//! Mechanism only: which pages are cold, where they are stored and when to evict is a
//! policy's. The evictor guarantees that no write is lost: a page is punched only if the
//! caller confirms, while the vCPUs are paused, that the store holds exactly its current
//! bytes ([`Evictor::evict`]'s `stored`).
//!
//! The evicted set lives in [`GuestRam`] (`is_evicted`) so that every path that treats a hole
//! as a zero page sees it: [`GuestRam::data_runs`] counts evicted pages as data (snapshot
//! layers then read them through the mapping: they fault back in); a migration source asks
//! `is_evicted` before taking a hole for zero. A second mapping of the memfd that is not
//! registered (a live update's new process) would see an evicted page as a fresh zero page:
//! everything must be brought back first ([`Evictor::bring_back`]), and the VMM refuses a
//! live update while pages are evicted.
//!
//! A never-written page (a hole that is not evicted) gets a zero page on its first touch, as
//! without the evictor, at the cost of one round trip to this server.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::page_server::{Fetched, PageError, PageSource};
use crate::uffd::{UffdError, Userfault};

/// Most pages brought back for one fault: the evicted run around it, at most this long (a
/// guest reading memory in order pays one store round trip per 64 KiB, not per page).
pub const FAULT_RUN: u64 = 16;

/// Eviction errors.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The store could not give an evicted page back (the faulting thread waits for it).
    #[error("evicted pages {first}+{n}: the store failed: {why}")]
    Store {
        /// First page of the run.
        first: u64,
        /// Its length.
        n: u64,
        /// Cause.
        why: String,
    },
    /// Punching the memfd failed.
    #[error("cannot drop pages {first}+{n} from guest memory: {err}")]
    Punch {
        /// First page.
        first: u64,
        /// Pages.
        n: u64,
        /// Cause.
        err: std::io::Error,
    },
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
    /// Pages are still evicted (unregistering would turn them into zero pages).
    #[error("{0} pages are still evicted: bring them back first")]
    StillEvicted(u64),
}

/// The counters.
#[derive(Debug, Default)]
pub struct EvictStats {
    /// Pages evicted (in all; a page evicted twice counts twice).
    pub evicted: AtomicU64,
    /// Candidates not evicted because the store does not hold their current bytes (written
    /// since they were stored).
    pub changed: AtomicU64,
    /// Missing-page faults read.
    pub faults: AtomicU64,
    /// Evicted pages brought back from the store (faults and their runs, and `bring_back`).
    pub faulted_in: AtomicU64,
    /// Store reads (runs) for faults.
    pub fault_runs: AtomicU64,
    /// Never-written pages given a zero page on first touch.
    pub zero_filled: AtomicU64,
    /// Evicted pages found present when brought back (filled behind the evictor's back
    /// through another mapping: their data is lost). Must stay 0.
    pub clobbered: AtomicU64,
    /// Sum of fault service times (evicted pages only), µs.
    pub latency_sum_us: AtomicU64,
    /// Worst fault service time, µs.
    pub latency_max_us: AtomicU64,
}

/// Resident vs evicted, for reports and status.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EvictReport {
    /// Pages evicted now.
    pub evicted_now: u64,
    /// Pages holding data in the VM's memfd now (resident).
    pub resident_pages: u64,
    /// Host memory the memfd holds, bytes.
    pub memfd_bytes: u64,
    /// Pages evicted in all.
    pub evicted: u64,
    /// Candidates refused: written since they were stored.
    pub changed: u64,
    /// Missing-page faults read.
    pub faults: u64,
    /// Evicted pages brought back.
    pub faulted_in: u64,
    /// Store reads for faults.
    pub fault_runs: u64,
    /// Fresh pages zero-filled on first touch.
    pub zero_filled: u64,
    /// Evicted pages filled behind the evictor's back (lost data; 0 unless misused).
    pub clobbered: u64,
    /// Mean service time of a fault on an evicted page, µs.
    pub fault_mean_us: u64,
    /// Worst, µs.
    pub fault_max_us: u64,
}

/// What one [`Evictor::evict`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Pages dropped from the memfd.
    pub evicted: u64,
    /// Candidates whose current bytes the store does not hold: left in.
    pub changed: u64,
    /// Candidates that were holes or evicted already: nothing to do.
    pub skipped: u64,
}

/// Guest RAM under userfaultfd for the whole life of its evicted pages.
pub struct Evictor {
    uffd: Userfault,
    ram: Arc<GuestRam>,
    pages: u64,
    stats: Arc<EvictStats>,
    /// Taken by eviction and by the fault service: a page is never punched between a
    /// fault's "not evicted" and its zero page, nor brought back while being punched.
    turn: Mutex<()>,
}

impl Evictor {
    /// Registers `ram` (of a running VM: its present pages are not affected) for
    /// missing-page faults, for the VMM's mapping and every access through it, KVM's
    /// included (the descriptor is not user-mode-only).
    pub fn register(ram: &Arc<GuestRam>) -> Result<Self, EvictError> {
        Ok(Evictor {
            uffd: Userfault::register_missing(ram)?,
            ram: ram.clone(),
            pages: ram.size() / PAGE_SIZE,
            stats: Arc::default(),
            turn: Mutex::new(()),
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<EvictStats> {
        &self.stats
    }

    /// The userfaultfd (readable: a fault waits).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.uffd.raw_fd()
    }

    fn check(&self, run: &Range<u64>) -> Result<(), EvictError> {
        if run.start > run.end || run.end > self.pages {
            return Err(EvictError::OutOfRange {
                first: run.start,
                n: run.end.saturating_sub(run.start),
                pages: self.pages,
            });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evicts the pages of `run` whose data the store holds: for each page holding data in
    /// the memfd and not evicted yet, `stored(page, bytes)` is asked whether the store holds
    /// exactly `bytes` (its current contents); if so the page is dropped. Call it with the
    /// vCPUs (and devices) paused: a write between the check and the drop would be lost.
    pub fn evict(
        &self,
        run: Range<u64>,
        stored: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<Evicted, EvictError> {
        self.check(&run)?;
        let mut out = Evicted::default();
        let _turn = self.lock();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut pending: Option<(u64, u64)> = None;
        // Only data pages are read: a hole would fault to this server, which waits for
        // `turn`. Nothing else punches the memfd, so data stays data while we hold it.
        let data = self.ram.memfd_data_runs(run.start, run.end);
        let mut covered = 0;
        for (a, b) in data {
            covered += b - a;
            for p in a..b {
                if self.ram.is_evicted(p) {
                    out.skipped += 1;
                    continue;
                }
                if let Err(e) = self.ram.read(p * PAGE_SIZE, &mut page) {
                    // Pages marked evicted so far are dropped first: a marked page left in
                    // would never fault, and bringing it back would find it present.
                    if let Some((a, b)) = pending {
                        self.punch(a, b)?;
                    }
                    return Err(EvictError::Store {
                        first: p,
                        n: 1,
                        why: e.to_string(),
                    });
                }
                if !stored(p, &page) {
                    out.changed += 1;
                    continue;
                }
                // Marked first: a touch right after the punch finds it evicted.
                self.ram.set_evicted(p, true);
                out.evicted += 1;
                pending = match pending {
                    Some((s, e)) if e == p => Some((s, p + 1)),
                    Some((s, e)) => {
                        self.punch(s, e)?;
                        Some((p, p + 1))
                    }
                    None => Some((p, p + 1)),
                };
            }
        }
        if let Some((s, e)) = pending {
            self.punch(s, e)?;
        }
        out.skipped += (run.end - run.start) - covered;
        self.stats.evicted.fetch_add(out.evicted, Ordering::Relaxed);
        self.stats.changed.fetch_add(out.changed, Ordering::Relaxed);
        Ok(out)
    }

    fn punch(&self, first: u64, end: u64) -> Result<(), EvictError> {
        // SAFETY: fallocate on our own memfd, inside its size; it changes no mapping of ours
        // (the pages read as missing afterwards, which the userfaultfd serves).
        let r = unsafe {
            libc::fallocate(
                self.ram.memfd().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (first * PAGE_SIZE) as libc::off_t,
                ((end - first) * PAGE_SIZE) as libc::off_t,
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            for p in first..end {
                self.ram.set_evicted(p, false);
            }
            return Err(EvictError::Punch {
                first,
                n: end - first,
                err,
            });
        }
        Ok(())
    }

    /// The evicted run around `page` (at most [`FAULT_RUN`] pages, aligned), holding `page`.
    fn run_around(&self, page: u64) -> Range<u64> {
        let lo = page - page % FAULT_RUN;
        let hi = (lo + FAULT_RUN).min(self.pages);
        let mut a = page;
        while a > lo && self.ram.is_evicted(a - 1) {
            a -= 1;
        }
        let mut b = page + 1;
        while b < hi && self.ram.is_evicted(b) {
            b += 1;
        }
        a..b
    }

    /// Brings the evicted pages of `run` back from `source` (`turn` held); returns how many.
    fn bring(
        &self,
        source: &mut dyn PageSource,
        run: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<u64, EvictError> {
        let bytes = ((run.end - run.start) * PAGE_SIZE) as usize;
        if buf.len() < bytes {
            buf.resize(bytes, 0);
        }
        let store = |why: String| EvictError::Store {
            first: run.start,
            n: run.end - run.start,
            why,
        };
        match source.fetch(run.clone(), &mut buf[..bytes]) {
            Ok(Fetched::Here) => {}
            Ok(Fetched::Later) => return Err(store("the store must answer at once".into())),
            Err(PageError::Uffd(e)) => return Err(e.into()),
            Err(e) => return Err(store(e.to_string())),
        }
        let placed = self.uffd.copy(run.start * PAGE_SIZE, &buf[..bytes])?;
        let n = run.end - run.start;
        if placed < n {
            // Present already: written through a mapping the userfaultfd does not watch.
            self.stats
                .clobbered
                .fetch_add(n - placed, Ordering::Relaxed);
            tracing::error!(
                first = run.start,
                n,
                placed,
                "evicted pages were filled behind the evictor's back: their data is lost"
            );
        }
        for p in run {
            self.ram.set_evicted(p, false);
        }
        self.stats.faulted_in.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Waits up to `wait` for missing-page faults and serves every one waiting: an evicted
    /// page comes back from `source` with the evicted run around it, any other missing page
    /// (never written) gets a zero page. Returns how many faults it read.
    pub fn serve_faults(
        &self,
        source: &mut dyn PageSource,
        wait: Duration,
        buf: &mut Vec<u8>,
    ) -> Result<u64, EvictError> {
        let mut n = 0;
        let mut wait = wait;
        while let Some(gpa) = self.uffd.wait_fault(wait)? {
            wait = Duration::ZERO;
            n += 1;
            let page = gpa / PAGE_SIZE;
            if page >= self.pages {
                continue;
            }
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            let t = Instant::now();
            let _turn = self.lock();
            if self.ram.is_evicted(page) {
                let run = self.run_around(page);
                self.bring(source, run, buf)?;
                self.stats.fault_runs.fetch_add(1, Ordering::Relaxed);
                let us = t.elapsed().as_micros() as u64;
                self.stats.latency_sum_us.fetch_add(us, Ordering::Relaxed);
                self.stats.latency_max_us.fetch_max(us, Ordering::Relaxed);
            } else {
                // Never written (or placed meanwhile: the zero page is then refused and the
                // wake lets the thread find the page).
                self.uffd.zero(page * PAGE_SIZE, PAGE_SIZE)?;
                self.uffd.wake(page * PAGE_SIZE, PAGE_SIZE)?;
                self.stats.zero_filled.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(n)
    }

    /// Serves faults until `stop`.
    pub fn serve_until(
        &self,
        source: &mut dyn PageSource,
        stop: &AtomicBool,
    ) -> Result<(), EvictError> {
        let mut buf = Vec::new();
        while !stop.load(Ordering::Acquire) {
            self.serve_faults(source, Duration::from_millis(10), &mut buf)?;
        }
        Ok(())
    }

    /// Brings every evicted page of `run` back from `source`, [`FAULT_RUN`] pages a read at
    /// most; returns how many. Faults meanwhile are served by whoever serves them.
    pub fn bring_back(
        &self,
        source: &mut dyn PageSource,
        run: Range<u64>,
    ) -> Result<u64, EvictError> {
        self.check(&run)?;
        let mut buf = Vec::new();
        let mut n = 0;
        let mut p = run.start;
        while p < run.end {
            if !self.ram.is_evicted(p) {
                p += 1;
                continue;
            }
            let _turn = self.lock();
            let mut q = p;
            while q < run.end && q - p < FAULT_RUN && self.ram.is_evicted(q) {
                q += 1;
            }
            if q > p {
                n += self.bring(source, p..q, &mut buf)?;
            }
            p = q.max(p + 1);
        }
        Ok(n)
    }

    /// Resident vs evicted, and the counters.
    pub fn report(&self) -> EvictReport {
        let s = &self.stats;
        let f = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EvictReport {
            evicted_now: self.ram.evicted_pages(),
            resident_pages: self
                .ram
                .memfd_data_runs(0, self.pages)
                .iter()
                .map(|(a, b)| b - a)
                .sum(),
            memfd_bytes: self.ram.allocated_bytes(),
            evicted: f(&s.evicted),
            changed: f(&s.changed),
            faults: f(&s.faults),
            faulted_in: f(&s.faulted_in),
            fault_runs: f(&s.fault_runs),
            zero_filled: f(&s.zero_filled),
            clobbered: f(&s.clobbered),
            fault_mean_us: f(&s.latency_sum_us) / f(&s.fault_runs).max(1),
            fault_max_us: f(&s.latency_max_us),
        }
    }

    /// Brings every evicted page back from `source` and stops watching guest RAM (holes are
    /// ordinary zero pages again). Call it with no other thread serving faults.
    pub fn finish(self, source: &mut dyn PageSource) -> Result<(), EvictError> {
        self.bring_back(source, 0..self.pages)?;
        let n = self.ram.evicted_pages();
        if n > 0 {
            return Err(EvictError::StillEvicted(n));
        }
        Ok(self.uffd.unregister()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn content(p: u64, g: u8) -> Vec<u8> {
        vec![(p % 251) as u8 ^ g; PAGE_SIZE as usize]
    }

    /// Pages kept by page number, as a store returns them.
    #[derive(Default)]
    struct Kept(HashMap<u64, Vec<u8>>);

    impl PageSource for Kept {
        fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
            for (i, out) in buf.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
                let p = run.start + i as u64;
                let page = self
                    .0
                    .get(&p)
                    .ok_or_else(|| PageError::Source(format!("page {p} is not stored")))?;
                out.copy_from_slice(page);
            }
            Ok(Fetched::Here)
        }
    }

    #[test]
    fn evicted_pages_come_back_on_touch_and_changed_ones_stay() {
        const PAGES: u64 = 1024;
        let ram = Arc::new(GuestRam::new(PAGES * PAGE_SIZE).unwrap());
        for p in 0..512 {
            ram.write(p * PAGE_SIZE, &content(p, 0)).unwrap();
        }
        let before = ram.allocated_bytes();
        let ev = Evictor::register(&ram).unwrap();
        // The store holds pages 0..400; 100..110 were rewritten since.
        let mut kept = Kept::default();
        for p in 0..400 {
            kept.0.insert(p, content(p, 0));
        }
        for p in 100..110 {
            ram.write(p * PAGE_SIZE, &content(p, 7)).unwrap();
        }
        let r = ev
            .evict(0..PAGES, &mut |p, bytes| {
                kept.0.get(&p).is_some_and(|k| k == bytes)
            })
            .unwrap();
        assert_eq!(
            r,
            Evicted {
                evicted: 390,
                changed: 122,
                skipped: 512
            }
        );
        assert_eq!(ram.evicted_pages(), 390);
        assert!(ram.is_evicted(0) && !ram.is_evicted(105) && !ram.is_evicted(450));
        assert!(before - ram.allocated_bytes() >= 390 * PAGE_SIZE);
        assert_eq!(ram.data_runs(0, PAGES), vec![(0, 512)]);
        assert_eq!(ram.memfd_data_runs(0, PAGES), vec![(100, 110), (400, 512)]);
        // Touches from another thread: evicted pages from the store, a fresh page zero.
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| ev.serve_until(&mut kept, &stop));
            let got: Vec<u8> = [3u64, 17, 105, 399, 700]
                .iter()
                .map(|&p| {
                    let mut b = [0u8; 1];
                    ram.read(p * PAGE_SIZE + 11, &mut b).unwrap();
                    b[0]
                })
                .collect();
            let g = |p: u64, x: u8| content(p, x)[0];
            assert_eq!(got, [g(3, 0), g(17, 0), g(105, 7), g(399, 0), 0]);
            stop.store(true, Ordering::Release);
            server.join().unwrap().unwrap();
        });
        let rep = ev.report();
        // 3, 17 and 399: the aligned evicted run of 16 around each, 3 store reads, 48 pages.
        assert_eq!((rep.fault_runs, rep.faulted_in), (3, 48), "{rep:?}");
        assert_eq!((rep.zero_filled, rep.clobbered), (1, 0), "{rep:?}");
        assert_eq!(rep.evicted_now, 390 - 48);
        assert_eq!(ram.evicted_pages(), 342);
        assert_eq!(ev.bring_back(&mut kept, 0..200).unwrap(), 190 - 32);
        assert!(ev.evict(1000..1025, &mut |_, _| true).is_err());
        // The rest comes back; unregistered: holes are ordinary zero pages again.
        ev.finish(&mut kept).unwrap();
        assert_eq!(ram.evicted_pages(), 0);
        for p in 0..PAGES {
            let mut b = [0u8; 1];
            ram.read(p * PAGE_SIZE + 99, &mut b).unwrap();
            let want = match p {
                100..110 => content(p, 7)[0],
                0..512 => content(p, 0)[0],
                _ => 0,
            };
            assert_eq!(b[0], want, "page {p}");
        }
    }
}
