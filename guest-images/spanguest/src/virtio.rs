//! A polled virtio-mmio block driver (virtio 1.x, register layout 2), at CPL3, and the
//! register access the net driver (net.rs) shares.
//!
//! Devices are found the way Linux finds them on QEMU's microvm: from
//! `virtio_mmio.device=SIZE@ADDR:IRQ` words on the command line (spanvmm adds the same words).
//! The guest cannot take interrupts on PVM, so completion is found by polling the used ring.
//! One request is in flight at a time; the rings and buffers are statics in .bss, whose
//! guest-physical address is their address (identity map).

use core::sync::atomic::{Ordering, fence};

use crate::arch::{in_map, rdtsc};

/// Most devices read from the command line.
pub const MAX_DEVICES: usize = 8;
/// Queue entries the driver uses.
const QSZ: u16 = 8;
/// Bytes per block the workload moves.
pub const BLOCK: usize = 4096;

pub(crate) const MAGIC: u32 = 0x7472_6976;
pub(crate) const REG_MAGIC: u64 = 0x000;
pub(crate) const REG_VERSION: u64 = 0x004;
pub(crate) const REG_DEVICE_ID: u64 = 0x008;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC: u64 = 0x080;
pub(crate) const REG_QUEUE_AVAIL: u64 = 0x090;
pub(crate) const REG_QUEUE_USED: u64 = 0x0a0;
pub(crate) const REG_CONFIG: u64 = 0x100;

pub(crate) const S_ACKNOWLEDGE: u32 = 1;
pub(crate) const S_DRIVER: u32 = 2;
pub(crate) const S_DRIVER_OK: u32 = 4;
pub(crate) const S_FEATURES_OK: u32 = 8;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
pub(crate) const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Status of a request.
pub const S_OK: u8 = 0;
/// Status the driver leaves before the device answers (never a device status).
const S_PENDING: u8 = 0xff;

const DESC_F_NEXT: u16 = 1;
pub(crate) const DESC_F_WRITE: u16 = 2;

/// Longest wait for a request (the device is on another thread of the host; a pause or a
/// migration in between is far shorter).
const TIMEOUT_S: u64 = 60;

/// A `virtio_mmio.device=` word: where the register window is (its size is checked when
/// parsed, its IRQ unused: the driver polls).
#[derive(Clone, Copy)]
pub struct MmioDev {
    /// Guest-physical address of the registers.
    pub addr: u64,
}

/// Parses `SIZE@ADDR:IRQ` (SIZE with an optional K/M suffix, numbers decimal or 0x hex).
pub fn parse_device(v: &[u8]) -> Option<MmioDev> {
    let at = v.iter().position(|&b| b == b'@')?;
    let colon = v.iter().position(|&b| b == b':').unwrap_or(v.len());
    let (size, addr) = (&v[..at], &v[at + 1..colon]);
    let (digits, mult) = match size.last()? {
        b'K' | b'k' => (&size[..size.len() - 1], 1 << 10),
        b'M' | b'm' => (&size[..size.len() - 1], 1 << 20),
        _ => (size, 1),
    };
    let size = number(digits)?.checked_mul(mult)?;
    let addr = number(addr)?;
    (size >= 0x100 && in_map(addr, size)).then_some(MmioDev { addr })
}

fn number(v: &[u8]) -> Option<u64> {
    let (digits, radix) = match v {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (v, 10),
    };
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(radix)?;
        acc.checked_mul(radix as u64)?.checked_add(d as u64)
    })
}

pub(crate) fn rd(base: u64, off: u64) -> u32 {
    // SAFETY: base..base+0x200 is a virtio-mmio window from the command line, inside the
    // identity map and backed by no RAM: the load exits to the VMM, which answers it.
    unsafe { ((base + off) as *const u32).read_volatile() }
}

pub(crate) fn wr(base: u64, off: u64, v: u32) {
    // SAFETY: as in `rd`; the store exits to the VMM (or, for QueueNotify, to its ioeventfd).
    unsafe { ((base + off) as *mut u32).write_volatile(v) }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
    pub(crate) next: u16,
}

#[repr(C, align(4096))]
struct Rings {
    desc: [Desc; QSZ as usize],
    /// flags, idx, ring[QSZ], used_event.
    avail: [u16; 3 + QSZ as usize],
    _pad: [u8; 2048],
    /// flags, idx, then (id, len) pairs as u32s.
    used: [u32; 1 + 2 * QSZ as usize],
}

#[repr(C, align(4096))]
struct Buffers {
    data: [u8; BLOCK],
    /// type, reserved (u32), sector (u64).
    header: [u64; 2],
    status: u8,
}

static mut RINGS: Rings = Rings {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QSZ as usize],
    avail: [0; 3 + QSZ as usize],
    _pad: [0; 2048],
    used: [0; 1 + 2 * QSZ as usize],
};

static mut BUFFERS: Buffers = Buffers {
    data: [0; BLOCK],
    header: [0; 2],
    status: 0,
};

/// Why the disk cannot be used.
pub enum Error {
    /// No virtio-blk device among those announced.
    NoDevice,
    /// The device refused virtio 1.x (FEATURES_OK did not stick).
    Features,
    /// Queue 0 is missing.
    Queue,
    /// A request did not complete in time.
    Timeout,
}

impl Error {
    /// A short description for the `error` line.
    pub fn what(&self) -> &'static str {
        match self {
            Error::NoDevice => "no virtio 1.x (modern) block device among virtio_mmio.device=",
            Error::Features => "the virtio-blk device refused virtio 1.x features",
            Error::Queue => "the virtio-blk device has no usable queue 0",
            Error::Timeout => "a virtio-blk request did not complete",
        }
    }
}

/// The block device, driven by vCPU 0 only.
pub struct Blk {
    base: u64,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// The device offers VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// The device honours FLUSH.
    pub flush: bool,
    avail_idx: u16,
    used_seen: u16,
    ticks_timeout: u64,
}

impl Blk {
    /// Finds the first virtio-blk device in `devs` and brings it up. `hz` is the TSC rate.
    pub fn probe(devs: &[MmioDev], hz: u64) -> Result<Blk, Error> {
        let base = devs
            .iter()
            .map(|d| d.addr)
            .find(|&b| {
                rd(b, REG_MAGIC) == MAGIC && rd(b, REG_VERSION) == 2 && rd(b, REG_DEVICE_ID) == 2
            })
            .ok_or(Error::NoDevice)?;
        wr(base, REG_STATUS, 0);
        wr(base, REG_STATUS, S_ACKNOWLEDGE);
        wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr(base, REG_DEVICE_FEATURES_SEL, 0);
        let lo = rd(base, REG_DEVICE_FEATURES) as u64;
        wr(base, REG_DEVICE_FEATURES_SEL, 1);
        let hi = rd(base, REG_DEVICE_FEATURES) as u64;
        let offered = lo | hi << 32;
        if offered & F_VERSION_1 == 0 {
            return Err(Error::Features);
        }
        let wanted = offered & (F_VERSION_1 | F_RO | F_FLUSH);
        wr(base, REG_DRIVER_FEATURES_SEL, 0);
        wr(base, REG_DRIVER_FEATURES, wanted as u32);
        wr(base, REG_DRIVER_FEATURES_SEL, 1);
        wr(base, REG_DRIVER_FEATURES, (wanted >> 32) as u32);
        wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if rd(base, REG_STATUS) & S_FEATURES_OK == 0 {
            return Err(Error::Features);
        }
        wr(base, REG_QUEUE_SEL, 0);
        let max = rd(base, REG_QUEUE_NUM_MAX);
        if max < u32::from(QSZ) {
            return Err(Error::Queue);
        }
        wr(base, REG_QUEUE_NUM, u32::from(QSZ));
        let rings = &raw mut RINGS;
        // SAFETY: only vCPU 0 runs the driver; these are addresses, nothing is dereferenced.
        let (desc, avail, used) = unsafe {
            (
                &raw mut (*rings).desc as u64,
                &raw mut (*rings).avail as u64,
                &raw mut (*rings).used as u64,
            )
        };
        for (reg, addr) in [
            (REG_QUEUE_DESC, desc),
            (REG_QUEUE_AVAIL, avail),
            (REG_QUEUE_USED, used),
        ] {
            wr(base, reg, addr as u32);
            wr(base, reg + 4, (addr >> 32) as u32);
        }
        wr(base, REG_QUEUE_READY, 1);
        wr(
            base,
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        let sectors = u64::from(rd(base, REG_CONFIG)) | u64::from(rd(base, REG_CONFIG + 4)) << 32;
        Ok(Blk {
            base,
            sectors,
            readonly: wanted & F_RO != 0,
            flush: wanted & F_FLUSH != 0,
            avail_idx: 0,
            used_seen: 0,
            ticks_timeout: hz * TIMEOUT_S,
        })
    }

    /// Guest-physical address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The block buffer requests read into and write from.
    pub fn buffer(&mut self) -> &mut [u8; BLOCK] {
        let bufs = &raw mut BUFFERS;
        // SAFETY: only vCPU 0 drives the device, and no request is in flight between calls:
        // nothing else reads or writes the buffer now.
        unsafe { &mut (*bufs).data }
    }

    /// Reads block `block` (BLOCK bytes) into the buffer; returns the device's status.
    pub fn read(&mut self, block: u64) -> Result<u8, Error> {
        self.request(T_IN, block * (BLOCK as u64 / 512), true)
    }

    /// Writes the buffer to block `block`; returns the device's status.
    pub fn write(&mut self, block: u64) -> Result<u8, Error> {
        self.request(T_OUT, block * (BLOCK as u64 / 512), true)
    }

    /// Asks the device to make written blocks durable; returns its status.
    pub fn flush(&mut self) -> Result<u8, Error> {
        self.request(T_FLUSH, 0, false)
    }

    fn request(&mut self, kind: u32, sector: u64, data: bool) -> Result<u8, Error> {
        let bufs = &raw mut BUFFERS;
        let rings = &raw mut RINGS;
        // SAFETY: vCPU 0 alone drives the device, with one request in flight: the device does
        // not touch the rings or buffers between requests, and we wait for it before returning.
        unsafe {
            (*bufs).header = [u64::from(kind), sector];
            (&raw mut (*bufs).status).write_volatile(S_PENDING);
            let header = &raw const (*bufs).header as u64;
            let status = &raw const (*bufs).status as u64;
            let data_addr = &raw const (*bufs).data as u64;
            let desc = &raw mut (*rings).desc;
            let write = if kind == T_IN { DESC_F_WRITE } else { 0 };
            (*desc)[0] = Desc {
                addr: header,
                len: 16,
                flags: DESC_F_NEXT,
                next: 1,
            };
            let last = if data {
                (*desc)[1] = Desc {
                    addr: data_addr,
                    len: BLOCK as u32,
                    flags: write | DESC_F_NEXT,
                    next: 2,
                };
                2
            } else {
                (*desc)[0].next = 2;
                2
            };
            (*desc)[last] = Desc {
                addr: status,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            };
            let avail = &raw mut (*rings).avail;
            (&raw mut (*avail)[2 + (self.avail_idx % QSZ) as usize]).write_volatile(0);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            // The ring entry and descriptors before the index the device reads them by.
            fence(Ordering::SeqCst);
            (&raw mut (*avail)[1]).write_volatile(self.avail_idx);
            fence(Ordering::SeqCst);
        }
        wr(self.base, REG_QUEUE_NOTIFY, 0);
        let start = rdtsc();
        let want = self.used_seen.wrapping_add(1);
        loop {
            // SAFETY: as above; the device writes the used index, read volatile.
            let idx = unsafe {
                ((&raw const (*rings).used) as *const u16)
                    .add(1)
                    .read_volatile()
            };
            if idx == want {
                break;
            }
            if rdtsc().wrapping_sub(start) > self.ticks_timeout {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        self.used_seen = want;
        // Interrupts are never taken nor acknowledged (an exit each, 15-170 µs on PVM): the
        // used ring says everything.
        // SAFETY: the device completed the request: it wrote the status before the used index.
        Ok(unsafe { (&raw const (*bufs).status).read_volatile() })
    }
}
