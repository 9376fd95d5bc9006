//! Lazy memory: guest RAM filled from a memory image on first touch while a background
//! thread copies the rest, so a restored VM runs before its memory is loaded. The work is the
//! page server's ([`crate::page_server`]) with the snapshot chain as its source
//! ([`ChainPages`]); what is lazy restore's own is the policy: [`PageTableWalk`] (which pages
//! come first) and when the background copy starts.
//!
//! Faults come first: a thread of their own serves each as it comes, with the aligned 64 KiB
//! group around the faulting page. Before the vCPUs start, the pages their saved registers
//! point at are brought in (instruction, stack, descriptor tables, and the page tables on the
//! way), then the rest of their groups while no fault waits. The background copy starts only
//! once the vCPUs run, at the lowest priority. Only the snapshot's data pages are copied in
//! the background; the rest is left alone, and once every data page is in, the loader
//! unregisters so untouched pages become ordinary zero pages at no cost.
//!
//! Every page is checked (and decrypted) before the guest can see it. A page that fails its
//! check cannot be replaced: the loader then stops the process rather than let the guest run
//! on memory that is not its own.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};
pub use crate::page_server::trace;
use crate::page_server::{Fetched, PageError, PageServer, PageSource, PageStats, PrePaging, Why};
use crate::snapshot::{Chain, GROUP_PAGES};
use crate::uffd::UffdError;

/// Pages copied per background step (256 KiB).
const CHUNK_PAGES: u64 = 64;
/// The background copy starts once no fault came for this long after the vCPUs started...
const QUIET: Duration = Duration::from_millis(3);
/// ...or after this long at most.
const START_WAIT_MAX: Duration = Duration::from_millis(20);

/// Lazy-load errors.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The image cannot be used.
    #[error(transparent)]
    Image(#[from] MemoryError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A page failed its check (or could not be read).
    #[error("{0}")]
    Check(String),
}

impl From<PageError> for LazyError {
    fn from(e: PageError) -> Self {
        match e {
            PageError::Uffd(e) => LazyError::Uffd(e),
            other => LazyError::Check(other.to_string()),
        }
    }
}

/// Progress of a lazy load, for status and benchmarks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LazyProgress {
    /// The whole image is in and the loader has stopped.
    pub done: bool,
    /// Faults served ahead of the background copy.
    pub faults: u64,
    /// Pages copied in all (faults and background).
    pub pages_copied: u64,
    /// Pages of data the image holds.
    pub pages_total: u64,
    /// How long the load took (so far), ms.
    pub ms: f64,
}

#[derive(Default)]
struct Shared {
    done: AtomicBool,
    total: AtomicU64,
    elapsed_us: AtomicU64,
    error: std::sync::Mutex<Option<LazyError>>,
}

/// Where a vCPU will touch memory first, from its saved registers (see
/// [`LazyLoader::start`]).
#[derive(Debug, Clone)]
pub struct FirstTouch {
    /// How its addresses translate.
    pub paging: Paging,
    /// Page-table root (CR3).
    pub cr3: u64,
    /// Addresses: instruction, stack, descriptor tables.
    pub addrs: Vec<u64>,
}

/// A vCPU's address translation, as far as prefetching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// Addresses are guest-physical.
    Off,
    /// 4-level long-mode paging.
    Long4,
}

/// A snapshot chain as a page source: pages read (and checked, decrypted) where they lie.
pub struct ChainPages<'a>(pub &'a Chain);

impl PageSource for ChainPages<'_> {
    fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
        self.0
            .read_pages(run.start, run.end - run.start, buf, true)
            .map_err(|e| PageError::Source(e.to_string()))?;
        Ok(Fetched::Here)
    }
}

/// Lazy restore's pre-paging: a fault brings its aligned 64 KiB group (a plain snapshot
/// checks a group as one, so it is read whole anyway, and the guest likely touches the
/// neighbours next); before the vCPUs start, the pages their saved registers point at (and
/// the page tables on the way) come in alone, the rest of their groups while no fault waits.
#[derive(Default)]
pub struct PageTableWalk {
    groups: VecDeque<u64>,
}

impl PrePaging for PageTableWalk {
    fn around_fault(&mut self, page: u64) -> Range<u64> {
        let first = page - page % GROUP_PAGES;
        first..first + GROUP_PAGES
    }

    fn next(&mut self, _server: &PageServer) -> Option<Range<u64>> {
        self.groups.pop_front().map(|g| g..g + GROUP_PAGES)
    }
}

impl PageTableWalk {
    fn note(&mut self, p: u64) {
        let g = p - p % GROUP_PAGES;
        if !self.groups.contains(&g) {
            self.groups.push_back(g);
        }
    }

    /// Brings in, before any fault asks, the pages each vCPU touches first: the page tables
    /// on the way to, and the pages of, its instruction, stack and descriptor tables (on
    /// restore these were 3-5 faults in a row, each a round trip through the fault thread).
    /// Pages alone, not their groups: a group's copy costs several times a page's, and the
    /// vCPUs wait for this. Their groups follow while no fault waits ([`PrePaging::next`]).
    pub fn prefetch(
        &mut self,
        server: &PageServer,
        source: &mut dyn PageSource,
        first: &[FirstTouch],
    ) -> Result<(), PageError> {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for f in first {
            for &addr in &f.addrs {
                let gpa = match f.paging {
                    Paging::Off => Some(addr),
                    Paging::Long4 => self.walk(server, source, f.cr3, addr, &mut buf)?,
                };
                if let Some(p) = gpa.map(|g| g / PAGE_SIZE).filter(|&p| p < server.pages()) {
                    server.bring(source, p..p + 1, Why::Prefetch, &mut buf)?;
                    self.note(p);
                }
            }
        }
        Ok(())
    }

    /// Translates `va` through the 4-level page tables at `cr3`, bringing each table page in
    /// (and noting its group); `None` when it is not mapped (the vCPU will fault in the guest,
    /// not here).
    fn walk(
        &mut self,
        server: &PageServer,
        source: &mut dyn PageSource,
        cr3: u64,
        va: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>, PageError> {
        const FRAME: u64 = 0x000f_ffff_ffff_f000;
        let mut table = cr3 & FRAME;
        for level in (1..=4u32).rev() {
            let tp = table / PAGE_SIZE;
            if tp >= server.pages() {
                return Ok(None);
            }
            let shift = 12 + 9 * (level - 1);
            let at = ((va >> shift) & 511) * 8;
            server.bring(source, tp..tp + 1, Why::Prefetch, buf)?;
            if !server.is_present(tp) {
                return Ok(None); // the source sends it later: no walk through it now
            }
            let mut raw = [0u8; 8];
            // In guest memory now: a present page, so no fault.
            server
                .ram()
                .read(table + at, &mut raw)
                .map_err(|e| PageError::Source(e.to_string()))?;
            self.note(tp);
            let entry = u64::from_le_bytes(raw);
            if entry & 1 == 0 {
                return Ok(None);
            }
            // A large page (1 GiB or 2 MiB) ends the walk early.
            if (level == 3 || level == 2) && entry & 0x80 != 0 {
                let size = 1u64 << shift;
                return Ok(Some((entry & FRAME & !(size - 1)) | (va & (size - 1))));
            }
            table = entry & FRAME;
        }
        Ok(Some(table | (va & (PAGE_SIZE - 1))))
    }
}

/// A running lazy load.
pub struct LazyLoader {
    shared: Arc<Shared>,
    stats: Arc<PageStats>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
    /// Dropped to start the background copy.
    begin: Option<std::sync::mpsc::Sender<()>>,
}

impl LazyLoader {
    /// Registers `ram` (still empty) for missing-page faults and starts filling it from
    /// `chain`, an opened and checked snapshot: the page server with the chain as its source
    /// and [`PageTableWalk`] as its pre-paging.
    pub fn start(
        ram: &Arc<GuestRam>,
        chain: Chain,
        first: Vec<FirstTouch>,
    ) -> Result<Self, LazyError> {
        if chain.mem_bytes() != ram.size() {
            return Err(MemoryError::Image {
                path: chain.top().dir.display().to_string(),
                err: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "snapshot holds {} bytes but the guest has {} bytes",
                        chain.mem_bytes(),
                        ram.size()
                    ),
                ),
            }
            .into());
        }
        let extents = chain.data_extents();
        let shared = Arc::new(Shared::default());
        shared
            .total
            .store(extents.iter().map(|(a, b)| b - a).sum(), Ordering::Relaxed);
        let stats = Arc::new(PageStats::default());
        let pages = ram.size() / PAGE_SIZE;
        let server =
            PageServer::register(ram, PageServer::bitmap_of(pages, &extents), stats.clone())?;
        let started = Instant::now();
        // The pages the vCPUs touch first, here and now: the vCPUs cannot run without them,
        // and a thread started to fetch them began only ~0.3 ms later.
        let mut walk = PageTableWalk::default();
        walk.prefetch(&server, &mut ChainPages(&chain), &first)?;
        trace(format_args!(
            "prefetch done at {} µs",
            started.elapsed().as_micros()
        ));
        let s = shared.clone();
        let (begin, go) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lazy-load".into())
            .spawn(move || {
                crate::seccomp::enter_or_log(crate::seccomp::Role::Snapshot);
                let stop = AtomicBool::new(false);
                let r = std::thread::scope(|scope| {
                    // Faults have a thread of their own, blocked on the userfaultfd, so a
                    // vCPU waits for its page only, never for a background chunk.
                    let faults = std::thread::Builder::new()
                        .name("lazy-fault".into())
                        .spawn_scoped(scope, || {
                            server.serve_until(&mut ChainPages(&chain), &mut walk, &stop)
                        });
                    // The background copy is the least urgent work in the process: the vCPUs
                    // and the fault thread come first. Failure only costs start-up speed.
                    // SAFETY: a plain syscall on this thread.
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                    }
                    // Not before the vCPUs run: its copies hold the address space's lock
                    // and keep both cores busy, which made restoring the vCPUs' registers
                    // take 4-5 ms instead of 0.1 ms.
                    let _ = go.recv();
                    wait_for_quiet(server.stats());
                    let r = server
                        .fill(&mut ChainPages(&chain), &extents, CHUNK_PAGES)
                        .map_err(LazyError::from);
                    stop.store(true, Ordering::Release);
                    let served = match faults {
                        Ok(t) => t
                            .join()
                            .unwrap_or_else(|_| {
                                Err(PageError::Source("the fault thread panicked".into()))
                            })
                            .map_err(LazyError::from),
                        Err(err) => Err(LazyError::Image(MemoryError::Image {
                            path: "lazy-fault thread".into(),
                            err,
                        })),
                    };
                    r.and(served)
                });
                // Unregistering wakes any fault that came after the last one served: it is
                // then an ordinary page fault (every data page is in).
                let r = r.and_then(|_| server.finish().map_err(LazyError::from));
                if let Err(e) = r {
                    if matches!(e, LazyError::Check(_)) {
                        // Faulting vCPUs wait for pages that can never come: stop here.
                        eprintln!("spanvmm: lazy restore: {e}; stopping the VM");
                        std::process::exit(3);
                    }
                    *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                s.elapsed_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                s.done.store(true, Ordering::Release);
            })
            .map_err(|err| {
                LazyError::Image(MemoryError::Image {
                    path: "lazy-load thread".into(),
                    err,
                })
            })?;
        Ok(LazyLoader {
            shared,
            stats,
            started,
            thread: Some(thread),
            begin: Some(begin),
        })
    }

    /// Starts the background copy (faults are served from the start). Call it once the
    /// vCPUs run; dropping the loader or waiting for it starts it too.
    pub fn begin_background(&mut self) {
        self.begin.take();
    }

    /// Whether the loader finished (or failed).
    pub fn done(&self) -> bool {
        self.shared.done.load(Ordering::Acquire)
    }

    /// The page server's counters (faults, latency, pages prefetched and placed).
    pub fn stats(&self) -> &Arc<PageStats> {
        &self.stats
    }

    /// Progress so far.
    pub fn progress(&self) -> LazyProgress {
        let done = self.done();
        LazyProgress {
            done,
            faults: self.stats.faults.load(Ordering::Relaxed),
            pages_copied: self.stats.placed.load(Ordering::Relaxed),
            pages_total: self.shared.total.load(Ordering::Relaxed),
            ms: if done {
                self.shared.elapsed_us.load(Ordering::Relaxed) as f64 / 1e3
            } else {
                self.started.elapsed().as_secs_f64() * 1e3
            },
        }
    }

    /// The loader's error, if it failed.
    pub fn error(&self) -> Option<String> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ToString::to_string)
    }

    /// Waits for the load to finish.
    pub fn wait(mut self) -> Result<LazyProgress, LazyError> {
        self.begin_background();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failed = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failed {
            Some(e) => Err(e),
            None => Ok(self.progress()),
        }
    }
}

/// Waits until the guest's start-up burst of faults is over (no fault for `QUIET`), at most
/// `START_WAIT_MAX`: the first faults are served without the background copy competing for
/// the cores and the address space's lock.
fn wait_for_quiet(stats: &PageStats) {
    let start = Instant::now();
    let mut last = (stats.faults.load(Ordering::Relaxed), Instant::now());
    while start.elapsed() < START_WAIT_MAX {
        std::thread::sleep(Duration::from_micros(500));
        let n = stats.faults.load(Ordering::Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= QUIET {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{test_vm_state, LayerOptions, LayerWriter};

    #[test]
    fn faults_are_served_and_the_rest_streams_in() {
        let src = Arc::new(GuestRam::new(8 << 20).unwrap());
        for p in [3u64, 700, 1500, 2047] {
            src.write(p * PAGE_SIZE, &[(p % 200) as u8 + 1; 4096])
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("spanvmm-lazy-{}", std::process::id()));
        let mut w = LayerWriter::create(&dir, src.clone(), LayerOptions::default()).unwrap();
        w.write_pages(None).unwrap();
        w.finish(test_vm_state(8 << 20)).unwrap();

        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        let loader = LazyLoader::start(&ram, Chain::open(&dir, None).unwrap(), Vec::new()).unwrap();
        // A read before the background copy gets there is served as a fault.
        let mut b = [0u8; 8];
        ram.read(1500 * PAGE_SIZE + 100, &mut b).unwrap();
        assert_eq!(b, [(1500 % 200) as u8 + 1; 8]);
        ram.read(5 * PAGE_SIZE, &mut b).unwrap(); // a page without data reads as zero
        assert_eq!(b, [0; 8]);
        let done = loader.wait().unwrap();
        assert!(done.done);
        assert_eq!(done.pages_total, 4);
        let mut a = vec![0u8; 8 << 20];
        let mut c = vec![0u8; 8 << 20];
        src.read(0, &mut a).unwrap();
        ram.read(0, &mut c).unwrap();
        assert!(a == c, "lazily loaded memory differs from the snapshot");

        let small = Arc::new(GuestRam::new(4 << 20).unwrap());
        let e = LazyLoader::start(&small, Chain::open(&dir, None).unwrap(), Vec::new())
            .err()
            .unwrap();
        assert!(e.to_string().contains("but the guest has"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_pages_a_vcpu_points_at_come_in_before_it_runs() {
        // Page tables at pages 1-4: VA 0x40_0000 -> page 100 through a 4 KiB page, VA
        // 0x60_0000 -> 0x20_0000 through a 2 MiB page; page 5 is reached without paging.
        let src = Arc::new(GuestRam::new(8 << 20).unwrap());
        let entry = |at: u64, value: u64| src.write(at, &value.to_le_bytes()).unwrap();
        entry(PAGE_SIZE, (2 * PAGE_SIZE) | 3); // PML4[0] -> PDPT
        entry(2 * PAGE_SIZE, (3 * PAGE_SIZE) | 3); // PDPT[0] -> PD
        entry(3 * PAGE_SIZE + 2 * 8, (4 * PAGE_SIZE) | 3); // PD[2] -> PT
        entry(3 * PAGE_SIZE + 3 * 8, 0x20_0000 | 0x83); // PD[3]: a 2 MiB page
        entry(4 * PAGE_SIZE, (100 * PAGE_SIZE) | 3); // PT[0] -> page 100
        for p in [5u64, 100, 0x201, 900] {
            src.write(p * PAGE_SIZE + 8, &[p as u8 | 1; 8]).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("spanvmm-lazy-first-{}", std::process::id()));
        let mut w = LayerWriter::create(&dir, src.clone(), LayerOptions::default()).unwrap();
        w.write_pages(None).unwrap();
        w.finish(test_vm_state(8 << 20)).unwrap();

        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        let first = vec![
            FirstTouch {
                paging: Paging::Long4,
                cr3: PAGE_SIZE,
                addrs: vec![0x40_0010, 0x60_1234, 0x80_0000], // the last is not mapped
            },
            FirstTouch {
                paging: Paging::Off,
                cr3: 0,
                addrs: vec![5 * PAGE_SIZE + 7],
            },
        ];
        let mut loader = LazyLoader::start(&ram, Chain::open(&dir, None).unwrap(), first).unwrap();
        // The background copy has not begun: only the prefetch copies pages, the 7 pointed at
        // (tables included), then the rest of their groups: 0-15, 96-111, 0x200-0x20f.
        let t = Instant::now();
        while loader.progress().pages_copied < 48 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        let p = loader.progress();
        assert_eq!((p.pages_copied, p.faults), (48, 0), "{p:?}");
        loader.begin_background();
        let mut b = [0u8; 8];
        for page in [5u64, 100, 0x201, 900] {
            ram.read(page * PAGE_SIZE + 8, &mut b).unwrap();
            assert_eq!(b, [page as u8 | 1; 8], "page {page:#x}");
        }
        loader.wait().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
