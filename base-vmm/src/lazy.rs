//! Lazy memory: guest RAM filled from a memory image on first touch (userfaultfd) while a
//! background thread copies the rest, so a restored VM runs before its memory is loaded.
//!
//! Faults come first: between two background chunks the loader serves every pending fault,
//! copying a small neighbourhood of the faulting page. Only the snapshot's data pages are
//! copied in the background; the rest is left alone, and once every data page is in, the
//! loader unregisters so untouched pages become ordinary zero pages at no cost.
//!
//! Every page is checked (and decrypted) before the guest can see it. A page that fails its
//! check cannot be replaced: the loader then stops the process rather than let the guest run
//! on memory that is not its own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};
use crate::snapshot::Chain;
use crate::uffd::{UffdError, Userfault};

/// Pages copied per background step (256 KiB): bounds how long a fault may wait.
const CHUNK_PAGES: u64 = 64;
/// Pages copied around a faulting page (its aligned 64 KiB block).
const FAULT_PAGES: u64 = 16;

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

/// A running lazy load.
pub struct LazyLoader {
    shared: Arc<Shared>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
}

impl LazyLoader {
    /// Registers `ram` (still empty) for missing-page faults and starts filling it from
    /// `chain`, an opened and checked snapshot.
    pub fn start(ram: &Arc<GuestRam>, chain: Chain) -> Result<Self, LazyError> {
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
        let thread = std::thread::Builder::new()
            .name("lazy-load".into())
            .spawn(move || {
                // The background copy is the least urgent work in the process: the vCPUs
                // (and this thread's own fault service, which runs while they wait) come
                // first. Failure only costs start-up speed.
                // SAFETY: plain syscalls on this thread.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                }
                let r = Loader {
                    chain: &chain,
                    uffd: &uffd,
                    filled: vec![0u64; pages.div_ceil(64) as usize],
                    pages,
                    shared: &s,
                    buf: vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize],
                }
                .run(&extents);
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
        })
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(self.progress()),
        }
    }
}

struct Loader<'a> {
    chain: &'a Chain,
    uffd: &'a Userfault,
    filled: Vec<u64>,
    pages: u64,
    shared: &'a Shared,
    buf: Vec<u8>,
}

impl Loader<'_> {
    fn is_filled(&self, p: u64) -> bool {
        self.filled[(p / 64) as usize] >> (p % 64) & 1 == 1
    }

    /// Copies pages `[first, end)` that are not in yet; pages without data are zero.
    fn fill(&mut self, first: u64, end: u64) -> Result<(), LazyError> {
        let mut p = first;
        while p < end {
            if self.is_filled(p) {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < end && q - p < CHUNK_PAGES && !self.is_filled(q) {
                q += 1;
            }
            let bytes = ((q - p) * PAGE_SIZE) as usize;
            self.chain
                .read_pages(p, q - p, &mut self.buf[..bytes], true)
                .map_err(LazyError::Check)?;
            self.uffd.copy(p * PAGE_SIZE, &self.buf[..bytes])?;
            for r in p..q {
                self.filled[(r / 64) as usize] |= 1 << (r % 64);
            }
            self.shared.copied.fetch_add(q - p, Ordering::Relaxed);
            p = q;
        }
        Ok(())
    }

    /// Serves every pending fault.
    fn serve_faults(&mut self) -> Result<(), LazyError> {
        while let Some(gpa) = self.uffd.wait_fault(Duration::ZERO)? {
            let page = gpa / PAGE_SIZE;
            self.shared.faults.fetch_add(1, Ordering::Relaxed);
            if self.is_filled(page) {
                self.uffd.wake(page * PAGE_SIZE, PAGE_SIZE)?;
                continue;
            }
            let first = page - page % FAULT_PAGES;
            self.fill(first, (first + FAULT_PAGES).min(self.pages))?;
        }
        Ok(())
    }

    fn run(mut self, extents: &[(u64, u64)]) -> Result<(), LazyError> {
        for &(first, end) in extents {
            let mut p = first;
            while p < end {
                self.serve_faults()?;
                let q = (p + CHUNK_PAGES).min(end);
                self.fill(p, q)?;
                p = q;
            }
        }
        // Faults that raced with the last chunk.
        self.serve_faults()
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
        let loader = LazyLoader::start(&ram, Chain::open(&dir, None).unwrap()).unwrap();
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
        let e = LazyLoader::start(&small, Chain::open(&dir, None).unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("but the guest has"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
