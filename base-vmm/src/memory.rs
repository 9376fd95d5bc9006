//! Guest RAM: one memfd per VM, mapped shared, so that a replacement VMM or an out-of-process
//! service can map the very same pages (no copy). Guest-physical address == offset in the memfd.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a multiple of 2 MiB.
    #[error("guest memory size {0} bytes is invalid: it must be a non-zero multiple of 2 MiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(std::io::Error),
    /// mmap of the memfd failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// An access fell outside guest memory.
    #[error(
        "guest memory access at {addr:#x} (+{len}) is outside the {size:#x}-byte guest memory"
    )]
    OutOfRange {
        /// Guest-physical address.
        addr: u64,
        /// Length of the access.
        len: u64,
        /// Guest memory size.
        size: u64,
    },
    /// Reading or writing a memory image failed.
    #[error("memory image {path}: {err}")]
    Image {
        /// The file involved.
        path: String,
        /// What went wrong.
        err: std::io::Error,
    },
}

/// The guest's RAM.
pub struct GuestRam {
    memfd: File,
    size: u64,
    mem: GuestMemoryMmap<AtomicBitmap>,
    /// Pages evicted from the memfd (held by a store, brought back on touch; see
    /// [`crate::evict`]): a hole there is not a zero page. Kept here so that every path
    /// that looks at holes sees it.
    evicted: Vec<AtomicU64>,
    evicted_n: AtomicU64,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM on a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: the name is a valid NUL-terminated string; flags are plain constants.
        let fd = unsafe { libc::memfd_create(c"spanvmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a fresh descriptor we now own.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(MemoryError::Memfd)?;
        Self::from_memfd(memfd.into(), size)
    }

    /// Maps an existing memfd (handed over by another process) as guest RAM of `size` bytes.
    pub fn from_memfd(fd: OwnedFd, size: u64) -> Result<Self, MemoryError> {
        let memfd = File::from(fd);
        let actual = memfd.metadata().map_err(MemoryError::Memfd)?.len();
        if actual < size || size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let file = FileOffset::new(memfd.try_clone().map_err(MemoryError::Memfd)?, 0);
        let region =
            GuestRegionMmap::<AtomicBitmap>::from_range(GuestAddress(0), size as usize, Some(file))
                .map_err(|e| MemoryError::Map(e.to_string()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let words = (size / PAGE_SIZE).div_ceil(64) as usize;
        Ok(GuestRam {
            memfd,
            size,
            mem,
            evicted: (0..words).map(|_| AtomicU64::new(0)).collect(),
            evicted_n: AtomicU64::new(0),
        })
    }

    /// Guest memory size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd holding the guest's pages.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// The vm-memory view (used by loaders and devices).
    pub fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.mem
    }

    /// Host virtual address of guest-physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        // The single region starts at guest address 0; its mapping lives as long as `self`.
        self.mem
            .iter()
            .next()
            .map(|r| r.as_ptr())
            .unwrap_or(std::ptr::null_mut())
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads guest memory (bounds-checked).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| MemoryError::Map(e.to_string()))
    }

    /// Writes guest memory (bounds-checked); the pages are marked dirty for the VMM's own log.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|e| MemoryError::Map(e.to_string()))
    }

    /// Allocates and maps the pages of `[addr, addr + len)` now, so that later writes to them
    /// cost no page fault. On this hardware a first touch of fresh shared memory costs several
    /// microseconds a page, much more than the copy into it. Best effort: a kernel without
    /// `MADV_POPULATE_WRITE` only loses the speed-up.
    pub fn populate(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.advise(addr, len, libc::MADV_POPULATE_WRITE)
    }

    /// Maps the (already allocated) pages of `[addr, addr+len)` into this process in one call,
    /// for reading: cheaper than a fault per page. Holes must be left out (a read allocates
    /// them, see [`GuestRam::data_runs`]). Best effort, as [`GuestRam::populate`].
    pub fn populate_read(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.advise(addr, len, libc::MADV_POPULATE_READ)
    }

    fn advise(&self, addr: u64, len: u64, advice: libc::c_int) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        // SAFETY: the range lies inside our mapping (checked); populating faults pages in and
        // changes no content.
        unsafe {
            libc::madvise(
                self.host_base().add(addr as usize) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        Ok(())
    }

    /// The pages of `[first, end)` that hold data (not zero): data in the memfd, and the
    /// evicted pages (holes whose data a store holds), as runs.
    pub fn data_runs(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let runs = self.memfd_data_runs(first, end);
        if self.evicted_pages() == 0 {
            return runs;
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        };
        let mut p = first;
        for (a, b) in runs.into_iter().chain(std::iter::once((end, end))) {
            // Evicted pages in the hole before this run.
            let mut q = p;
            while q < a {
                // Whole words of nothing evicted are skipped at once (a big, sparse guest).
                if q.is_multiple_of(64)
                    && q + 64 <= a
                    && self.evicted[(q / 64) as usize].load(Ordering::Acquire) == 0
                {
                    q += 64;
                } else if self.is_evicted(q) {
                    let s = q;
                    while q < a && self.is_evicted(q) {
                        q += 1;
                    }
                    push(s, q);
                } else {
                    q += 1;
                }
            }
            if a < b {
                push(a, b);
            }
            p = b;
        }
        out
    }

    /// Whether page `p` is evicted (a hole in the memfd whose data a store holds).
    pub fn is_evicted(&self, p: u64) -> bool {
        self.evicted
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (p % 64) & 1 == 1)
    }

    /// How many pages are evicted now.
    pub fn evicted_pages(&self) -> u64 {
        self.evicted_n.load(Ordering::Acquire)
    }

    /// The evicted pages, one bit a page.
    pub fn evicted_bitmap(&self) -> Vec<u64> {
        self.evicted
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Marks page `p` evicted (`true`) or back in; returns whether it changed.
    pub(crate) fn set_evicted(&self, p: u64, on: bool) -> bool {
        let Some(w) = self.evicted.get((p / 64) as usize) else {
            return false;
        };
        let m = 1u64 << (p % 64);
        let old = if on {
            w.fetch_or(m, Ordering::AcqRel)
        } else {
            w.fetch_and(!m, Ordering::AcqRel)
        };
        let changed = (old & m != 0) != on;
        if changed && on {
            self.evicted_n.fetch_add(1, Ordering::AcqRel);
        } else if changed {
            self.evicted_n.fetch_sub(1, Ordering::AcqRel);
        }
        changed
    }

    /// Bytes the memfd holds in host memory (its allocated blocks).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.memfd.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// The pages of `[first, end)` that hold data in the memfd (not holes), as runs; evicted
    /// pages are holes here.
    pub fn memfd_data_runs(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let seek = |off: u64, whence| {
            // SAFETY: lseek on our memfd has no memory effects.
            let r = unsafe { libc::lseek(self.memfd.as_raw_fd(), off as libc::off_t, whence) };
            (r >= 0).then_some(r as u64 / PAGE_SIZE)
        };
        let mut out = Vec::new();
        let mut p = first;
        while p < end {
            let Some(data) = seek(p * PAGE_SIZE, libc::SEEK_DATA).filter(|&d| d < end) else {
                break;
            };
            let hole = seek(data * PAGE_SIZE, libc::SEEK_HOLE)
                .unwrap_or(end)
                .min(end);
            out.push((data, hole.max(data + 1)));
            p = hole.max(data + 1);
        }
        out
    }

    /// Maps into this process the pages of the memfd that hold data, lowest addresses first,
    /// until `budget` has passed (checked every 2 MiB); returns the pages mapped. A process
    /// that takes over a running guest's memfd does this before the guest moves to it: each
    /// page the guest touches next then costs no page fault here on top of the new VM's own.
    pub fn map_data_within(&self, budget: std::time::Duration) -> u64 {
        use std::os::fd::AsRawFd;
        const CHUNK: u64 = 2 << 20;
        let t = std::time::Instant::now();
        let seek = |off: u64, whence| {
            // SAFETY: lseek on our memfd has no memory effects.
            let r = unsafe { libc::lseek(self.memfd.as_raw_fd(), off as libc::off_t, whence) };
            u64::try_from(r).ok()
        };
        // Run by run as it goes (not `data_runs` first): finding every run of a large,
        // fragmented memfd alone can take longer than the budget.
        let (size, mut off, mut mapped) = (self.size(), 0, 0);
        while off < size && t.elapsed() < budget {
            let Some(data) = seek(off, libc::SEEK_DATA).filter(|&d| d < size) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE)
                .unwrap_or(size)
                .min(size)
                .max(data + PAGE_SIZE);
            off = data;
            while off < hole && t.elapsed() < budget {
                let n = CHUNK.min(hole - off);
                let _ = self.populate_read(off, n);
                mapped += n / PAGE_SIZE;
                off += n;
            }
            off = off.max(hole);
        }
        mapped
    }

    /// Takes (and clears) the bitmap of pages the VMM itself wrote, one bit per page.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.mem
            .iter()
            .next()
            .map(|r| r.get_mmap().bitmap().get_and_reset())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            GuestRam::new(4096),
            Err(MemoryError::BadSize(4096))
        ));
    }

    #[test]
    fn bounds_are_checked() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut b = [0u8; 8];
        assert!(ram.read((2 << 20) - 4, &mut b).is_err());
        assert!(ram.read(u64::MAX - 2, &mut b).is_err());
        assert!(ram.write((2 << 20) - 8, &b).is_ok());
    }

    #[test]
    fn data_runs_are_the_written_pages() {
        let ram = GuestRam::new(4 << 20).unwrap();
        for p in [3u64, 5, 6, 1023] {
            ram.write(p * PAGE_SIZE, &[1; 8]).unwrap();
        }
        assert_eq!(ram.data_runs(0, 1024), vec![(3, 4), (5, 7), (1023, 1024)]);
        assert_eq!(ram.data_runs(6, 1000), vec![(6, 7)]);
        ram.populate_read(5 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!(
            ram.data_runs(0, 1024).len(),
            3,
            "populating for reading allocates nothing"
        );
        // Evicted pages are holes in the memfd but data for everyone else.
        assert!(ram.set_evicted(4, true) && ram.set_evicted(200, true));
        assert!(!ram.set_evicted(4, true), "already evicted");
        assert_eq!(ram.evicted_pages(), 2);
        assert_eq!(
            ram.data_runs(0, 1024),
            vec![(3, 7), (200, 201), (1023, 1024)]
        );
        assert_eq!(ram.data_runs(4, 100), vec![(4, 7)]);
        assert_eq!(ram.memfd_data_runs(0, 1024).len(), 3);
        assert!(ram.set_evicted(4, false) && ram.set_evicted(200, false));
        assert_eq!(ram.evicted_pages(), 0);
    }

    #[test]
    fn vmm_writes_are_logged_and_the_memfd_is_shared() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write(5 * PAGE_SIZE + 10, b"hello").unwrap();
        ram.write(700 * PAGE_SIZE, &[7u8; 4096]).unwrap();
        let bits = ram.take_vmm_dirty();
        let set: Vec<usize> = (0..1024)
            .filter(|p| bits[p / 64] >> (p % 64) & 1 == 1)
            .collect();
        assert_eq!(set, vec![5, 700]);
        assert!(ram.take_vmm_dirty().iter().all(|w| *w == 0));

        let copy = GuestRam::new(4 << 20).unwrap();
        // The memfd is shared: a second mapping sees the same bytes.
        copy.write(5 * PAGE_SIZE + 10, b"hello").unwrap();
        let fd: OwnedFd = copy.memfd().try_clone().unwrap().into();
        let again = GuestRam::from_memfd(fd, 4 << 20).unwrap();
        let mut h = [0u8; 5];
        again.read(5 * PAGE_SIZE + 10, &mut h).unwrap();
        assert_eq!(&h, b"hello");
    }
}
