//! A polled virtio-net driver (virtio 1.x over virtio-mmio) under smoltcp, at CPL3, driven by
//! vCPU 0 only.
//!
//! Queue 0 (receive) holds `NQ` buffers of `BUF` bytes, all made available at start and given
//! back as soon as smoltcp has consumed a frame; queue 1 (transmit) uses one descriptor per
//! frame (its 12-byte header and the frame in one buffer), reclaimed from the used ring when
//! smoltcp wants to send. Nothing waits on an interrupt: the used rings are polled from the
//! workload loop, and the driver notifies a queue once per poll that made buffers available
//! (each notification is an exit: one per poll, not one per frame).

use core::marker::PhantomData;
use core::sync::atomic::{Ordering, fence};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{
    DESC_F_WRITE, Desc, F_VERSION_1, MAGIC, MmioDev, REG_CONFIG, REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL,
    REG_MAGIC, REG_QUEUE_AVAIL, REG_QUEUE_DESC, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX,
    REG_QUEUE_READY, REG_QUEUE_SEL, REG_QUEUE_USED, REG_STATUS, REG_VERSION, S_ACKNOWLEDGE,
    S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, rd, wr,
};

/// Entries of each queue.
const NQ: usize = 128;
/// Bytes of each buffer: the 12-byte header and a 1514-byte frame fit.
const BUF: usize = 2048;
/// The virtio 1.x net header in front of every frame.
const HDR: usize = 12;
/// Largest Ethernet frame (1500-byte MTU).
const MTU: usize = 1514;
const F_MAC: u64 = 1 << 5;
const ID_NET: u32 = 1;
const RXQ: u32 = 0;
const TXQ: u32 = 1;

#[repr(C, align(4096))]
struct Ring {
    desc: [Desc; NQ],
    /// flags, idx, ring[NQ], used_event.
    avail: [u16; 3 + NQ],
    _pad: [u8; 4096 - (3 + NQ) * 2],
    /// flags|idx (as one u32), then (id, len) pairs.
    used: [u32; 1 + 2 * NQ],
}

const EMPTY_DESC: Desc = Desc {
    addr: 0,
    len: 0,
    flags: 0,
    next: 0,
};
const EMPTY_RING: Ring = Ring {
    desc: [EMPTY_DESC; NQ],
    avail: [0; 3 + NQ],
    _pad: [0; 4096 - (3 + NQ) * 2],
    used: [0; 1 + 2 * NQ],
};

static mut RINGS: [Ring; 2] = [EMPTY_RING, EMPTY_RING];
static mut RX_BUFS: [[u8; BUF]; NQ] = [[0; BUF]; NQ];
static mut TX_BUFS: [[u8; BUF]; NQ] = [[0; BUF]; NQ];

/// Why the network cannot be used.
pub enum Error {
    /// No virtio 1.x net device among those announced.
    NoDevice,
    /// The device refused the features (FEATURES_OK did not stick) or offers no MAC.
    Features,
    /// A queue is missing or too small.
    Queue,
}

impl Error {
    /// A short description for the `error` line.
    pub fn what(&self) -> &'static str {
        match self {
            Error::NoDevice => "no virtio 1.x (modern) net device among virtio_mmio.device=",
            Error::Features => "the virtio-net device refused virtio 1.x or has no MAC",
            Error::Queue => "the virtio-net device's queues are missing or too small",
        }
    }
}

/// Frames moved, for the `kv` line.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    /// Frames received.
    pub rx: u64,
    /// Frames sent.
    pub tx: u64,
    /// Polls that found no free transmit buffer.
    pub tx_full: u64,
}

/// The virtio-net device.
pub struct NetDev {
    base: u64,
    /// The MAC the device gave.
    pub mac: [u8; 6],
    rx_last_used: u16,
    rx_avail: u16,
    tx_last_used: u16,
    tx_avail: u16,
    /// Transmit descriptors free for a frame.
    tx_free: [u16; NQ],
    tx_free_n: usize,
    rx_kick: bool,
    tx_kick: bool,
    /// What moved.
    pub counts: Counts,
}

fn ring(q: u32) -> *mut Ring {
    // SAFETY: an address only; vCPU 0 alone drives the device.
    unsafe { (&raw mut RINGS).cast::<Ring>().add(q as usize) }
}

fn used_idx(q: u32) -> u16 {
    // SAFETY: the used ring is in .bss; the device writes the index, read volatile.
    unsafe {
        ((&raw const (*ring(q)).used) as *const u16)
            .add(1)
            .read_volatile()
    }
}

fn used_elem(q: u32, i: u16) -> (u16, u32) {
    let at = 1 + 2 * (i as usize % NQ);
    // SAFETY: as in `used_idx`; the element was written before the index we read.
    unsafe {
        let used = (&raw const (*ring(q)).used) as *const u32;
        (
            used.add(at).read_volatile() as u16,
            used.add(at + 1).read_volatile(),
        )
    }
}

/// Puts descriptor `id` in the available ring of queue `q` at position `idx` and publishes
/// `idx + 1`.
fn publish(q: u32, idx: u16, id: u16) {
    // SAFETY: the available ring is ours to write; the device reads entries below the index
    // only, and the fences order the entry before the index.
    unsafe {
        let avail = &raw mut (*ring(q)).avail;
        (&raw mut (*avail)[2 + idx as usize % NQ]).write_volatile(id);
        fence(Ordering::SeqCst);
        (&raw mut (*avail)[1]).write_volatile(idx.wrapping_add(1));
    }
}

impl NetDev {
    /// Finds the first virtio-net device in `devs` and brings it up with every receive buffer
    /// available.
    pub fn probe(devs: &[MmioDev]) -> Result<NetDev, Error> {
        let base = devs
            .iter()
            .map(|d| d.addr)
            .find(|&b| {
                rd(b, REG_MAGIC) == MAGIC
                    && rd(b, REG_VERSION) == 2
                    && rd(b, REG_DEVICE_ID) == ID_NET
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
        if offered & (F_VERSION_1 | F_MAC) != F_VERSION_1 | F_MAC {
            return Err(Error::Features);
        }
        let wanted = F_VERSION_1 | F_MAC;
        wr(base, REG_DRIVER_FEATURES_SEL, 0);
        wr(base, REG_DRIVER_FEATURES, wanted as u32);
        wr(base, REG_DRIVER_FEATURES_SEL, 1);
        wr(base, REG_DRIVER_FEATURES, (wanted >> 32) as u32);
        wr(base, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if rd(base, REG_STATUS) & S_FEATURES_OK == 0 {
            return Err(Error::Features);
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            // SAFETY: the configuration space of the device's window, read byte by byte; the
            // load exits to the VMM.
            *b = unsafe { ((base + REG_CONFIG + i as u64) as *const u8).read_volatile() };
        }
        for q in [RXQ, TXQ] {
            wr(base, REG_QUEUE_SEL, q);
            if rd(base, REG_QUEUE_NUM_MAX) < NQ as u32 {
                return Err(Error::Queue);
            }
            wr(base, REG_QUEUE_NUM, NQ as u32);
            let r = ring(q);
            // SAFETY: addresses only.
            let (desc, avail, used) = unsafe {
                (
                    &raw mut (*r).desc as u64,
                    &raw mut (*r).avail as u64,
                    &raw mut (*r).used as u64,
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
        }
        // Every receive buffer available, one descriptor each.
        for i in 0..NQ {
            // SAFETY: before DRIVER_OK the device reads nothing; vCPU 0 alone writes.
            unsafe {
                let buf = (&raw mut RX_BUFS).cast::<[u8; BUF]>().add(i) as u64;
                (*ring(RXQ)).desc[i] = Desc {
                    addr: buf,
                    len: BUF as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                };
            }
            publish(RXQ, i as u16, i as u16);
        }
        let mut tx_free = [0u16; NQ];
        for (i, f) in tx_free.iter_mut().enumerate() {
            *f = i as u16;
        }
        wr(
            base,
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        wr(base, REG_QUEUE_NOTIFY, RXQ);
        Ok(NetDev {
            base,
            mac,
            rx_last_used: 0,
            rx_avail: NQ as u16,
            tx_last_used: 0,
            tx_avail: 0,
            tx_free,
            tx_free_n: NQ,
            rx_kick: false,
            tx_kick: false,
            counts: Counts::default(),
        })
    }

    /// Guest-physical address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Tells the device about the buffers made available since the last call.
    pub fn kick(&mut self) {
        if core::mem::take(&mut self.tx_kick) {
            wr(self.base, REG_QUEUE_NOTIFY, TXQ);
        }
        if core::mem::take(&mut self.rx_kick) {
            wr(self.base, REG_QUEUE_NOTIFY, RXQ);
        }
    }

    /// Takes back the transmit descriptors the device is done with.
    fn reclaim_tx(&mut self) {
        let idx = used_idx(TXQ);
        fence(Ordering::SeqCst);
        while self.tx_last_used != idx {
            let (id, _) = used_elem(TXQ, self.tx_last_used);
            self.tx_last_used = self.tx_last_used.wrapping_add(1);
            if (id as usize) < NQ && self.tx_free_n < NQ {
                self.tx_free[self.tx_free_n] = id;
                self.tx_free_n += 1;
            }
        }
    }

    fn tx_token(&mut self) -> Option<TxToken<'_>> {
        if self.tx_free_n == 0 {
            self.reclaim_tx();
        }
        if self.tx_free_n == 0 {
            self.counts.tx_full += 1;
            return None;
        }
        Some(TxToken {
            dev: self,
            _life: PhantomData,
        })
    }
}

/// A received frame: buffer `id`, `len` bytes with the header.
pub struct RxToken<'a> {
    dev: *mut NetDev,
    id: u16,
    len: usize,
    _life: PhantomData<&'a mut NetDev>,
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    dev: *mut NetDev,
    _life: PhantomData<&'a mut NetDev>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the device returned buffer `id` in the used ring and does not touch it until
        // it is made available again below; `len` was bounded by the buffer size.
        let frame = unsafe {
            let buf = &*(&raw const RX_BUFS)
                .cast::<[u8; BUF]>()
                .add(self.id as usize);
            &buf[HDR..self.len]
        };
        let r = f(frame);
        // SAFETY: the token borrows the device (lifetime 'a) and no other token is consumed
        // at the same time: smoltcp consumes one token at a time on this vCPU.
        let dev = unsafe { &mut *self.dev };
        publish(RXQ, dev.rx_avail, self.id);
        dev.rx_avail = dev.rx_avail.wrapping_add(1);
        dev.rx_kick = true;
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // SAFETY: as for RxToken: one token consumed at a time, on vCPU 0.
        let dev = unsafe { &mut *self.dev };
        if dev.tx_free_n == 0 {
            dev.reclaim_tx();
        }
        let len = len.min(BUF - HDR);
        // tx_token() saw a free descriptor, and nothing took one since.
        dev.tx_free_n -= 1;
        let id = dev.tx_free[dev.tx_free_n];
        // SAFETY: descriptor `id` is free: the device gave it back (or never had it).
        let buf = unsafe { &mut *(&raw mut TX_BUFS).cast::<[u8; BUF]>().add(id as usize) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..HDR + len]);
        // SAFETY: vCPU 0 alone writes descriptors, and the device reads this one only after
        // it is published below.
        unsafe {
            (*ring(TXQ)).desc[id as usize] = Desc {
                addr: buf.as_ptr() as u64,
                len: (HDR + len) as u32,
                flags: 0,
                next: 0,
            };
        }
        publish(TXQ, dev.tx_avail, id);
        dev.tx_avail = dev.tx_avail.wrapping_add(1);
        dev.tx_kick = true;
        dev.counts.tx += 1;
        r
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        loop {
            let idx = used_idx(RXQ);
            if self.rx_last_used == idx {
                return None;
            }
            fence(Ordering::SeqCst);
            let (id, len) = used_elem(RXQ, self.rx_last_used);
            self.rx_last_used = self.rx_last_used.wrapping_add(1);
            let len = len as usize;
            if (id as usize) >= NQ {
                continue;
            }
            if len <= HDR || len > BUF {
                // A frame the device dropped (length 0): the buffer goes straight back.
                publish(RXQ, self.rx_avail, id);
                self.rx_avail = self.rx_avail.wrapping_add(1);
                self.rx_kick = true;
                continue;
            }
            // Need room to answer too (smoltcp may reply at once, e.g. an ARP reply).
            if self.tx_free_n == 0 {
                self.reclaim_tx();
            }
            if self.tx_free_n == 0 {
                // Leave the frame for the next poll.
                self.rx_last_used = self.rx_last_used.wrapping_sub(1);
                self.counts.tx_full += 1;
                return None;
            }
            self.counts.rx += 1;
            let dev: *mut NetDev = self;
            return Some((
                RxToken {
                    dev,
                    id,
                    len,
                    _life: PhantomData,
                },
                TxToken {
                    dev,
                    _life: PhantomData,
                },
            ));
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx_token()
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(NQ / 2);
        caps
    }
}
