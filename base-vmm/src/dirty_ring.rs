//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): a second way to learn which pages
//! the guest wrote, behind the same harvest as the bitmap (`Vm::harvest_dirty`).
//!
//! With the bitmap, each harvest (`KVM_GET_DIRTY_LOG`) walks and copies a bit per page of
//! guest memory, whatever was written. With the ring, KVM appends each page the guest dirties
//! to a per-vCPU ring shared with the VMM; a harvest reads only those entries, then asks KVM to
//! write-protect them again (`KVM_RESET_DIRTY_RINGS`): its cost follows the pages dirtied, not
//! the guest's size. A vCPU whose ring fills stops (`KVM_EXIT_DIRTY_RING_FULL`) until its
//! entries are taken: its thread moves them into the pending set here, so nothing is lost
//! between harvests. The ring must be chosen when the VM is created, before any vCPU (KVM
//! then refuses `KVM_GET_DIRTY_LOG`): see [`DirtyLogMode`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

/// An entry KVM filled (the page at `slot`/`offset` was dirtied).
const GFN_DIRTY: u32 = 1;
/// An entry the VMM has read: KVM may reuse it after `KVM_RESET_DIRTY_RINGS`.
const GFN_RESET: u32 = 2;
/// Entries per vCPU ring (16 bytes each: 256 KiB). A vCPU exits to have its ring emptied once
/// about this many pages are dirtied between harvests.
pub const RING_ENTRIES: u32 = 16384;

mod ioctls {
    use kvm_bindings::KVMIO;
    // Not in kvm-ioctls: `_IO(KVMIO, 0xc7)`.
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use ioctls::KVM_RESET_DIRTY_RINGS;

/// How a VM logs the pages its guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG`: a bit per page, the whole of guest memory each harvest.
    Bitmap,
    /// The dirty ring: the pages written, each harvest.
    Ring,
}

impl std::fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirtyLogMode::Bitmap => "bitmap",
            DirtyLogMode::Ring => "ring",
        })
    }
}

/// Why the ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// This host's KVM answered `KVM_CHECK_EXTENSION` with 0 for both ring capabilities.
    #[error("this host's KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING and _ACQ_REL: 0)")]
    NotOffered,
    /// An ioctl or the ring's mapping failed.
    #[error("dirty ring: {what}: {err}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// errno.
        err: std::io::Error,
    },
}

/// The largest ring (bytes per vCPU) this host's KVM offers, 0 when it has none: the answer of
/// `KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)`, else of `KVM_CAP_DIRTY_LOG_RING`,
/// with the capability that gave it.
pub fn offered(vm: &VmFd) -> (u32, u32) {
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let bytes = vm.check_extension_raw(cap.into());
        if bytes > 0 {
            return (cap, bytes as u32);
        }
    }
    (0, 0)
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    /// Its size (a power of two).
    len: u32,
    /// The next entry to read (free-running; masked by `len - 1`).
    next: u32,
}

// SAFETY: the mapping is owned by this struct (unmapped on drop) and only touched under the
// `DirtyRings` mutex; the kernel's side of each entry is synchronized through its flags.
unsafe impl Send for Ring {}

impl Ring {
    /// Moves the entries KVM has filled since the last read into `bits` (bit per page of slot
    /// `slot`), marking each read; returns how many.
    fn collect(&mut self, slot: u32, bits: &mut [u64]) -> u64 {
        let mut n = 0;
        loop {
            // SAFETY: the index is masked into the mapped array of `len` entries.
            let e = unsafe { self.entries.add((self.next & (self.len - 1)) as usize) };
            // SAFETY: `flags` is an aligned u32 in the shared mapping, which KVM writes with
            // release semantics once the entry is complete; reading it atomically with acquire
            // makes slot and offset visible.
            let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is complete (acquire above) and KVM does not touch it again
            // until it is marked reset and the rings are reset.
            let (s, offset) = unsafe { ((*e).slot, (*e).offset) };
            // Slot ids carry the address space in their high bits; ours is 0.
            if s & 0xffff == slot {
                if let Some(w) = bits.get_mut((offset / 64) as usize) {
                    *w |= 1 << (offset % 64);
                }
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `DirtyRings::add_vcpu`.
        unsafe {
            libc::munmap(
                self.entries.cast(),
                self.len as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// The rings of one VM's vCPUs, and the pages taken from them that no harvest has returned.
pub struct DirtyRings {
    /// A duplicate of the VM's descriptor, for `KVM_RESET_DIRTY_RINGS`.
    vm: std::fs::File,
    slot: u32,
    inner: Mutex<Inner>,
    /// Times a vCPU stopped because its ring was full.
    full_exits: AtomicU64,
}

struct Inner {
    rings: Vec<Ring>,
    /// Pages taken from the rings since the last harvest, one bit a page.
    pending: Vec<u64>,
}

impl DirtyRings {
    /// Turns the dirty ring on for `vm`, which must have no vCPU yet; `pages` is the size of
    /// memslot `slot`, the one logged.
    pub fn enable(vm: &VmFd, slot: u32, pages: u64) -> Result<Self, RingError> {
        let (cap, max) = offered(vm);
        if cap == 0 {
            return Err(RingError::NotOffered);
        }
        let bytes =
            (RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>()).min(max as usize) as u64;
        let enable = kvm_enable_cap {
            cap,
            args: [bytes, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&enable).map_err(|e| RingError::Sys {
            what: "KVM_ENABLE_CAP",
            err: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        // SAFETY: dup of a descriptor we hold; the copy is owned by the File.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(RingError::Sys {
                what: "dup of the VM descriptor",
                err: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let vm = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(DirtyRings {
            vm,
            slot,
            inner: Mutex::new(Inner {
                rings: Vec::new(),
                pending: vec![0; pages.div_ceil(64) as usize],
            }),
            full_exits: AtomicU64::new(0),
        })
    }

    /// Entries per ring, as enabled.
    pub fn entries(&self) -> u32 {
        RING_ENTRIES
    }

    /// Maps the ring of a new vCPU.
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<(), RingError> {
        let len = RING_ENTRIES;
        let bytes = len as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps the vCPU's ring at the offset KVM documents; the result is checked and
        // the mapping is owned by the Ring from here on.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as i64) * 4096,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RingError::Sys {
                what: "mapping a vCPU's dirty ring",
                err: std::io::Error::last_os_error(),
            });
        }
        crate::devices::lock(&self.inner).rings.push(Ring {
            entries: p.cast(),
            len,
            next: 0,
        });
        Ok(())
    }

    /// Moves every ring's entries into the pending set and lets KVM reuse them (it
    /// write-protects those pages again, so the next write is logged anew).
    fn drain(&self, inner: &mut Inner) -> Result<u64, RingError> {
        let Inner { rings, pending } = inner;
        let n: u64 = rings
            .iter_mut()
            .map(|r| r.collect(self.slot, pending))
            .sum();
        if n > 0 {
            // SAFETY: a VM ioctl without argument on our duplicate of the VM descriptor.
            let r = unsafe { vmm_sys_util::ioctl::ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
            if r < 0 {
                return Err(RingError::Sys {
                    what: "KVM_RESET_DIRTY_RINGS",
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(n)
    }

    /// A vCPU stopped with its ring full: empty the rings (called on that vCPU's thread).
    pub fn on_full(&self) -> Result<(), RingError> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        self.drain(&mut crate::devices::lock(&self.inner))
            .map(|_| ())
    }

    /// The pages dirtied since the last harvest (a bit each), and forgets them.
    pub fn harvest(&self) -> Result<Vec<u64>, RingError> {
        let mut inner = crate::devices::lock(&self.inner);
        self.drain(&mut inner)?;
        let fresh = vec![0; inner.pending.len()];
        Ok(std::mem::replace(&mut inner.pending, fresh))
    }

    /// Drops whatever the rings and the pending set hold (logging starts or stops).
    pub fn discard(&self) -> Result<(), RingError> {
        let mut inner = crate::devices::lock(&self.inner);
        self.drain(&mut inner)?;
        inner.pending.iter_mut().for_each(|w| *w = 0);
        Ok(())
    }

    /// Times a vCPU stopped because its ring was full.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }
}
