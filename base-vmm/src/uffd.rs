//! userfaultfd in "missing pages" mode over guest RAM: the base of lazy restore and post-copy.
//! A fault on a page not yet in the memfd blocks the faulting thread (a vCPU inside KVM, or the
//! VMM itself) until the page is supplied with [`Userfault::copy`] or [`Userfault::zero`].
//!
//! The few ioctls are defined here (no libclang-generated bindings needed). The descriptor is
//! created *without* `UFFD_USER_MODE_ONLY`, so faults taken by KVM on the guest's behalf are
//! reported too.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::memory::{GuestRam, PAGE_SIZE};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for page faults, `flags` then `address`.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _rest: u64,
}

/// userfaultfd errors.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A userfaultfd call failed.
    #[error("userfaultfd {what}: {err}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// Cause.
        err: std::io::Error,
    },
    /// An address outside guest RAM.
    #[error("guest address {0:#x} is outside guest memory")]
    OutOfRange(u64),
}

fn sys(what: &'static str) -> UffdError {
    UffdError::Sys {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// A userfaultfd watching all of guest RAM for missing pages.
pub struct Userfault {
    fd: OwnedFd,
    host_base: u64,
    size: u64,
}

impl Userfault {
    /// Registers guest RAM in missing mode. Pages already present are not affected; use it on
    /// RAM whose memfd is still empty (a VM being restored or migrated in).
    pub fn register_missing(ram: &GuestRam) -> Result<Self, UffdError> {
        // SAFETY: plain syscall; flags are constants.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(sys("create"));
        }
        // SAFETY: the syscall returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api the kernel reads and writes.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(sys("UFFDIO_API"));
        }
        let host_base = ram.host_base() as u64;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host_base,
                len: ram.size(),
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: the range is guest RAM's live mapping; `reg` is a valid uffdio_register.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(sys("UFFDIO_REGISTER"));
        }
        Ok(Userfault {
            fd,
            host_base,
            size: ram.size(),
        })
    }

    /// The descriptor, to poll together with others (readable: a fault is waiting).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Waits up to `timeout` for a missing-page fault; returns the faulting guest-physical page.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Sys { what: "poll", err });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::zeroed();
        // SAFETY: reading at most size_of::<UffdMsg>() bytes into owned storage.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msg.as_mut_ptr() as *mut libc::c_void,
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(UffdError::Sys { what: "read", err });
        }
        // SAFETY: zero-initialized and (partly) filled by the kernel: every bit pattern is valid.
        let msg = unsafe { msg.assume_init() };
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some((msg.address - self.host_base) & !(PAGE_SIZE - 1)))
    }

    fn host(&self, gpa: u64, len: u64) -> Result<u64, UffdError> {
        match gpa.checked_add(len) {
            Some(end)
                if end <= self.size
                    && gpa.is_multiple_of(PAGE_SIZE)
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                Ok(self.host_base + gpa)
            }
            _ => Err(UffdError::OutOfRange(gpa)),
        }
    }

    /// Supplies the pages at `gpa` with `data` (whole pages) and wakes the waiters; returns
    /// how many pages it placed. A page that is already present is left as it is (not an
    /// error: a racing fill won) and the pages after it are still placed.
    pub fn copy(&self, gpa: u64, data: &[u8]) -> Result<u64, UffdError> {
        let dst = self.host(gpa, data.len() as u64)?;
        let (mut done, mut placed) = (0u64, 0u64);
        while done < data.len() as u64 {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: data[done as usize..].as_ptr() as u64,
                len: data.len() as u64 - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `dst` is inside the registered range, `src` is a live buffer of `len`
            // bytes.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) } >= 0 {
                return Ok(placed + c.len / PAGE_SIZE);
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                // Stopped short (at a present page, or the address space was changing):
                // `copy` holds the bytes placed; go on from there.
                Some(libc::EAGAIN) => {
                    let placed_now = c.copy.max(0) as u64;
                    placed += placed_now / PAGE_SIZE;
                    done += placed_now;
                }
                // The first page is present: skip it.
                Some(libc::EEXIST) => done += PAGE_SIZE,
                _ => {
                    return Err(UffdError::Sys {
                        what: "UFFDIO_COPY",
                        err,
                    })
                }
            }
        }
        Ok(placed)
    }

    /// Supplies zero pages for `[gpa, gpa+len)` and wakes the waiters.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), UffdError> {
        let start = self.host(gpa, len)?;
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the range is inside the registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(UffdError::Sys {
                    what: "UFFDIO_ZEROPAGE",
                    err,
                });
            }
        }
        Ok(())
    }

    /// Wakes threads waiting on `[gpa, gpa+len)`: for a fault on a page that another fill
    /// made present after the fault was queued.
    pub fn wake(&self, gpa: u64, len: u64) -> Result<(), UffdError> {
        let start = self.host(gpa, len)?;
        let mut range = UffdioRange { start, len };
        // SAFETY: the range is inside the registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) } < 0 {
            return Err(sys("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Stops watching guest RAM: later faults are ordinary page faults again.
    pub fn unregister(self) -> Result<(), UffdError> {
        let mut range = UffdioRange {
            start: self.host_base,
            len: self.size,
        };
        // SAFETY: the range is the one registered.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) } < 0 {
            return Err(sys("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn missing_pages_are_served_on_first_touch() {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let uffd = Userfault::register_missing(&ram).unwrap();
        let reader = {
            let ram = ram.clone();
            std::thread::spawn(move || {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                ram.read(3 * PAGE_SIZE + 16, &mut a).unwrap();
                ram.read(900 * PAGE_SIZE, &mut b).unwrap();
                (a, b)
            })
        };
        let mut served = Vec::new();
        while served.len() < 2 {
            let page = uffd
                .wait_fault(Duration::from_secs(10))
                .unwrap()
                .expect("the reader must fault");
            if page == 3 * PAGE_SIZE {
                uffd.copy(page, &[0xab; PAGE_SIZE as usize]).unwrap();
            } else {
                uffd.zero(page, PAGE_SIZE).unwrap();
            }
            served.push(page);
        }
        let (a, b) = reader.join().unwrap();
        assert_eq!(a, [0xab; 8]);
        assert_eq!(b, [0; 8]);
        assert_eq!(served, vec![3 * PAGE_SIZE, 900 * PAGE_SIZE]);
        // Present pages no longer fault; a second copy to them is tolerated.
        assert_eq!(
            uffd.copy(3 * PAGE_SIZE, &[1; PAGE_SIZE as usize]).unwrap(),
            0
        );
        assert!(uffd.copy(5 << 20, &[0; 4096]).is_err());
        // A range with a present page in it: the pages around it are still placed.
        let run: Vec<u8> = (0..5u8).flat_map(|i| [i + 1; PAGE_SIZE as usize]).collect();
        assert_eq!(uffd.copy(PAGE_SIZE, &run).unwrap(), 4);
        for (p, want) in [(1, 1), (2, 2), (3, 0xab), (4, 4), (5, 5)] {
            let mut b = [0u8; 1];
            ram.read(p * PAGE_SIZE + 7, &mut b).unwrap();
            assert_eq!(b[0], want, "page {p}");
        }
        uffd.unregister().unwrap();
    }
}
