//! Lazy memory: guest RAM filled from a memory image on first touch (userfaultfd) while a
//! background thread copies the rest, so a restored VM runs before its memory is loaded.
//!
//! Faults come first: a thread of their own serves each as it comes, with the aligned 64 KiB
//! group around the faulting page (a plain snapshot checks a group as one, so it is read
//! whole anyway, and the guest likely touches the neighbours next). Before the vCPUs start,
//! the pages their saved registers point at are brought in (instruction, stack, descriptor
//! tables, and the page tables on the way), then the rest of their groups while no fault waits. The background copy starts only once the vCPUs
//! run, at the lowest priority. Only the snapshot's data pages are copied in the background;
//! the rest is left alone, and once every data page is in, the loader unregisters so
//! untouched pages become ordinary zero pages at no cost.
//!
//! Every page is checked (and decrypted) before the guest can see it. A page that fails its
//! check cannot be replaced: the loader then stops the process rather than let the guest run
//! on memory that is not its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};
use crate::snapshot::{Chain, GROUP_PAGES};
use crate::uffd::{UffdError, Userfault};

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
    faults: AtomicU64,
    copied: AtomicU64,
    total: AtomicU64,
    elapsed_us: AtomicU64,
    error: std::sync::Mutex<Option<String>>,
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

/// Writes a line of the restore trace to stderr when `SPANVMM_RESTORE_DEBUG` is set: the
/// steps of a restore and the first faults of a lazy one, in µs.
pub fn trace(what: std::fmt::Arguments) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SPANVMM_RESTORE_DEBUG").is_some()) {
        eprintln!("[restore] {what}");
    }
}

/// A vCPU's address translation, as far as prefetching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// Addresses are guest-physical.
    Off,
    /// 4-level long-mode paging.
    Long4,
}

/// A running lazy load.
pub struct LazyLoader {
    shared: Arc<Shared>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
    /// Dropped to start the background copy.
    begin: Option<std::sync::mpsc::Sender<()>>,
}

impl LazyLoader {
    /// Registers `ram` (still empty) for missing-page faults and starts filling it from
    /// `chain`, an opened and checked snapshot.
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
        let uffd = Userfault::register_missing(ram)?;
        let extents = chain.data_extents();
        let shared = Arc::new(Shared::default());
        shared
            .total
            .store(extents.iter().map(|(a, b)| b - a).sum(), Ordering::Relaxed);
        let s = shared.clone();
        let pages = ram.size() / PAGE_SIZE;
        let started = Instant::now();
        let filled: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        // The pages the vCPUs touch first, here and now: the vCPUs cannot run without them,
        // and a thread started to fetch them began only ~0.3 ms later.
        let groups = Fill {
            chain: &chain,
            uffd: &uffd,
            ram,
            filled: &filled,
            pages,
            shared: &shared,
            started,
        }
        .prefetch(&first)?;
        let ram = ram.clone();
        let (begin, go) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lazy-load".into())
            .spawn(move || {
                crate::seccomp::enter_or_log(crate::seccomp::Role::Snapshot);
                let fill = Fill {
                    chain: &chain,
                    uffd: &uffd,
                    ram: &ram,
                    filled: &filled,
                    pages,
                    shared: &s,
                    started,
                };
                let stop = AtomicBool::new(false);
                let r = std::thread::scope(|scope| {
                    // Faults have a thread of their own, blocked on the userfaultfd, so a
                    // vCPU waits for its page only, never for a background chunk.
                    let faults = std::thread::Builder::new()
                        .name("lazy-fault".into())
                        .spawn_scoped(scope, || fill.serve_faults(&stop, groups));
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
                    fill.wait_for_quiet();
                    let r = fill.background(&extents);
                    stop.store(true, Ordering::Release);
                    let served = match faults {
                        Ok(t) => t.join().unwrap_or_else(|_| {
                            Err(LazyError::Check("the fault thread panicked".into()))
                        }),
                        Err(err) => Err(LazyError::Image(MemoryError::Image {
                            path: "lazy-fault thread".into(),
                            err,
                        })),
                    };
                    r.and(served)
                });
                // Unregistering wakes any fault that came after the last one served: it is
                // then an ordinary page fault (every data page is in).
                let r = r.and_then(|_| uffd.unregister().map_err(LazyError::from));
                if let Err(e) = r {
                    if matches!(e, LazyError::Check(_)) {
                        // Faulting vCPUs wait for pages that can never come: stop here.
                        eprintln!("spanvmm: lazy restore: {e}; stopping the VM");
                        std::process::exit(3);
                    }
                    *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
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

    /// Progress so far.
    pub fn progress(&self) -> LazyProgress {
        let done = self.done();
        LazyProgress {
            done,
            faults: self.shared.faults.load(Ordering::Relaxed),
            pages_copied: self.shared.copied.load(Ordering::Relaxed),
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
            .clone()
    }

    /// Waits for the load to finish.
    pub fn wait(mut self) -> Result<LazyProgress, String> {
        self.begin_background();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(self.progress()),
        }
    }
}

/// What the fault thread and the background copy share.
struct Fill<'a> {
    chain: &'a Chain,
    uffd: &'a Userfault,
    ram: &'a GuestRam,
    /// Pages in guest memory (set after their copy).
    filled: &'a [AtomicU64],
    pages: u64,
    shared: &'a Shared,
    /// When the load started (for the trace).
    started: Instant,
}

impl Fill<'_> {
    fn is_filled(&self, p: u64) -> bool {
        self.filled[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64) & 1 == 1
    }

    /// Copies pages `[first, end)` that are not in yet, in pieces of at most `buf`'s size;
    /// pages without data are zero. A page the other thread copies meanwhile is left as it is
    /// (the copy skips present pages).
    fn fill(&self, first: u64, end: u64, buf: &mut [u8]) -> Result<(), LazyError> {
        let piece = buf.len() as u64 / PAGE_SIZE;
        let mut p = first;
        while p < end {
            if self.is_filled(p) {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < end && q - p < piece && !self.is_filled(q) {
                q += 1;
            }
            let bytes = ((q - p) * PAGE_SIZE) as usize;
            self.chain
                .read_pages(p, q - p, &mut buf[..bytes], true)
                .map_err(LazyError::Check)?;
            self.place(p, &buf[..bytes])?;
            p = q;
        }
        Ok(())
    }

    /// Puts `data` (whole pages, read and checked) into guest memory from page `p` on.
    fn place(&self, p: u64, data: &[u8]) -> Result<(), LazyError> {
        let copied = self.uffd.copy(p * PAGE_SIZE, data)?;
        for r in p..p + data.len() as u64 / PAGE_SIZE {
            self.filled[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Release);
        }
        self.shared.copied.fetch_add(copied, Ordering::Relaxed);
        Ok(())
    }

    /// Reads and checks the aligned group around `p` into `buf`; returns its first page and
    /// bytes.
    fn read_group<'b>(&self, p: u64, buf: &'b mut [u8]) -> Result<(u64, &'b [u8]), LazyError> {
        let first = p - p % GROUP_PAGES;
        let end = (first + GROUP_PAGES).min(self.pages);
        let buf = &mut buf[..((end - first) * PAGE_SIZE) as usize];
        self.chain
            .read_pages(first, end - first, buf, true)
            .map_err(LazyError::Check)?;
        Ok((first, buf))
    }

    /// Brings in the pages of the aligned group around `p` that are not in yet.
    fn fill_group(&self, p: u64, buf: &mut [u8]) -> Result<(), LazyError> {
        let (first, group) = self.read_group(p, buf)?;
        let end = first + (group.len() as u64) / PAGE_SIZE;
        let at = |q: u64| ((q - first) * PAGE_SIZE) as usize;
        let mut q = first;
        while q < end {
            if self.is_filled(q) {
                q += 1;
                continue;
            }
            let mut r = q;
            while r < end && !self.is_filled(r) {
                r += 1;
            }
            self.place(q, &group[at(q)..at(r)])?;
            q = r;
        }
        Ok(())
    }

    /// Brings in page `p` alone when it is not in yet (its group is read and checked); returns
    /// its bytes, or `None` when it was in already.
    fn fill_page<'b>(&self, p: u64, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, LazyError> {
        if self.is_filled(p) {
            return Ok(None);
        }
        let (first, group) = self.read_group(p, buf)?;
        let page = &group[((p - first) * PAGE_SIZE) as usize..][..PAGE_SIZE as usize];
        self.place(p, page)?;
        Ok(Some(page))
    }

    /// Serves faults as they come until `stop`, each with its page's group; while no fault
    /// waits, brings in the rest of `groups` (those of the pages prefetched).
    fn serve_faults(&self, stop: &AtomicBool, mut groups: VecDeque<u64>) -> Result<(), LazyError> {
        let mut buf = vec![0u8; (GROUP_PAGES * PAGE_SIZE) as usize];
        while !stop.load(Ordering::Acquire) {
            let wait = if groups.is_empty() {
                Duration::from_millis(10)
            } else {
                Duration::ZERO
            };
            let Some(gpa) = self.uffd.wait_fault(wait)? else {
                if let Some(p) = groups.pop_front() {
                    self.fill_group(p, &mut buf)?;
                }
                continue;
            };
            let page = gpa / PAGE_SIZE;
            let n = self.shared.faults.fetch_add(1, Ordering::Relaxed);
            let t = self.started.elapsed();
            if self.is_filled(page) {
                self.uffd.wake(page * PAGE_SIZE, PAGE_SIZE)?;
                continue;
            }
            self.fill_group(page, &mut buf)?;
            if n < 16 {
                let took = self.started.elapsed() - t;
                trace(format_args!(
                    "fault {n}: page {page:#x} at {} µs, served in {} µs",
                    t.as_micros(),
                    took.as_micros()
                ));
            }
        }
        Ok(())
    }

    /// Brings in, before any fault asks, the pages each vCPU touches first: the page tables
    /// on the way to, and the pages of, its instruction, stack and descriptor tables (on
    /// restore these were 3-5 faults in a row, each a round trip through the fault thread).
    /// Pages alone, not their groups: a group's copy costs several times a page's, and the
    /// vCPUs wait for this. Returns the groups, to complete while no fault waits.
    fn prefetch(&self, first: &[FirstTouch]) -> Result<VecDeque<u64>, LazyError> {
        let mut buf = vec![0u8; (GROUP_PAGES * PAGE_SIZE) as usize];
        let mut groups = VecDeque::new();
        let mut note = |p: u64| {
            let g = p - p % GROUP_PAGES;
            if !groups.contains(&g) {
                groups.push_back(g);
            }
        };
        for f in first {
            for &addr in &f.addrs {
                let gpa = match f.paging {
                    Paging::Off => Some(addr),
                    Paging::Long4 => self.walk(f.cr3, addr, &mut buf, &mut note)?,
                };
                if let Some(p) = gpa.map(|g| g / PAGE_SIZE).filter(|&p| p < self.pages) {
                    self.fill_page(p, &mut buf)?;
                    note(p);
                }
            }
        }
        trace(format_args!(
            "prefetch done at {} µs",
            self.started.elapsed().as_micros()
        ));
        Ok(groups)
    }

    /// Translates `va` through the 4-level page tables at `cr3`, bringing each table page in
    /// (`note`d); `None` when it is not mapped (the vCPU will fault in the guest, not here).
    fn walk(
        &self,
        cr3: u64,
        va: u64,
        buf: &mut [u8],
        note: &mut impl FnMut(u64),
    ) -> Result<Option<u64>, LazyError> {
        const FRAME: u64 = 0x000f_ffff_ffff_f000;
        let mut table = cr3 & FRAME;
        for level in (1..=4u32).rev() {
            let tp = table / PAGE_SIZE;
            if tp >= self.pages {
                return Ok(None);
            }
            let shift = 12 + 9 * (level - 1);
            let at = ((va >> shift) & 511) * 8;
            let mut raw = [0u8; 8];
            match self.fill_page(tp, buf)? {
                Some(page) => raw.copy_from_slice(&page[at as usize..at as usize + 8]),
                // In guest memory already: read it there (a present page, so no fault).
                None => self
                    .ram
                    .read(table + at, &mut raw)
                    .map_err(LazyError::Image)?,
            }
            note(tp);
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

    /// Waits until the guest's start-up burst of faults is over (no fault for `QUIET`), at
    /// most `START_WAIT_MAX`: the first faults are served without the background copy
    /// competing for the cores and the address space's lock.
    fn wait_for_quiet(&self) {
        let start = Instant::now();
        let mut last = (self.shared.faults.load(Ordering::Relaxed), Instant::now());
        while start.elapsed() < START_WAIT_MAX {
            std::thread::sleep(Duration::from_micros(500));
            let n = self.shared.faults.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= QUIET {
                return;
            }
        }
    }

    /// Copies every data page in `extents`.
    fn background(&self, extents: &[(u64, u64)]) -> Result<(), LazyError> {
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
        for &(first, end) in extents {
            self.fill(first, end, &mut buf)?;
        }
        Ok(())
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
