//! Frame observation: what a network-monitoring service sees of the virtio-net traffic.
//!
//! When (and only when) a subscriber is attached ([`set_observed`]), every net device copies a
//! fixed-size summary of each frame it moves (direction, length, ethertype, IP addresses,
//! protocol, TCP/UDP ports, TCP flags; never the payload) into one bounded buffer per process
//! (a spanvmm process runs one VM). Detached, a frame costs one relaxed atomic load.
//!
//! The device never waits for the reader: it only `try_lock`s the buffer, and a frame that
//! finds the buffer full (or, rarely, being swapped by the reader) is counted as dropped.
//! The reader ([`drain`]) swaps the whole buffer for an empty one of the same capacity, so the
//! device never allocates on its path either. Headers are parsed from the bounce buffer the
//! frame already crosses, so observing copies nothing of the guest's memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Records buffered between two drains; beyond them frames are counted as dropped. At a drain
/// every 10 ms this takes 800 k frames/s, far above what a tap moves here.
pub const CAPACITY: usize = 8192;

/// A frame went from the tap to the guest.
pub const RX: u8 = 0;
/// A frame went from the guest to the tap.
pub const TX: u8 = 1;

/// One frame's header summary. Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`);
/// zero when the frame is not IP. Ports and flags are zero when not TCP/UDP (or a later
/// IPv4 fragment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameRecord {
    /// Source IP address.
    pub src: [u8; 16],
    /// Destination IP address.
    pub dst: [u8; 16],
    /// Bytes of the Ethernet frame (without the vnet header).
    pub len: u32,
    /// Ethertype (after one VLAN tag, if any).
    pub ethertype: u16,
    /// TCP/UDP source port.
    pub src_port: u16,
    /// TCP/UDP destination port.
    pub dst_port: u16,
    /// IP protocol (IPv6: the first next-header), 0 when not IP.
    pub protocol: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...).
    pub tcp_flags: u8,
    /// [`RX`] or [`TX`].
    pub direction: u8,
}

/// Parses an Ethernet frame's headers; short or odd frames give what could be read.
pub fn summarize(direction: u8, frame: &[u8]) -> FrameRecord {
    let mut r = FrameRecord {
        direction,
        len: frame.len() as u32,
        ..Default::default()
    };
    let be16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    let Some(mut ethertype) = be16(frame, 12) else {
        return r;
    };
    let mut l3 = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Some(inner) = be16(frame, 16) else {
            r.ethertype = ethertype;
            return r;
        };
        ethertype = inner;
        l3 = 18;
    }
    r.ethertype = ethertype;
    let ip = &frame[l3.min(frame.len())..];
    let l4 = match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            r.protocol = ip[9];
            r.src[10..12].fill(0xff);
            r.src[12..].copy_from_slice(&ip[12..16]);
            r.dst[10..12].fill(0xff);
            r.dst[12..].copy_from_slice(&ip[16..20]);
            // A later fragment carries no transport header.
            let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            let ihl = (ip[0] & 0xf) as usize * 4;
            (frag_offset == 0 && ihl >= 20).then(|| &ip[ihl.min(ip.len())..])
        }
        0x86dd if ip.len() >= 40 => {
            r.protocol = ip[6];
            r.src.copy_from_slice(&ip[8..24]);
            r.dst.copy_from_slice(&ip[24..40]);
            Some(&ip[40..])
        }
        _ => None,
    };
    if let Some(l4) = l4 {
        if matches!(r.protocol, 6 | 17) {
            if let (Some(s), Some(d)) = (be16(l4, 0), be16(l4, 2)) {
                r.src_port = s;
                r.dst_port = d;
            }
        }
        if r.protocol == 6 {
            r.tcp_flags = l4.get(13).copied().unwrap_or(0);
        }
    }
    r
}

/// The process's frame tap.
struct Tap {
    observed: AtomicBool,
    ring: Mutex<Vec<FrameRecord>>,
    dropped: AtomicU64,
    recorded: AtomicU64,
}

static TAP: Tap = Tap {
    observed: AtomicBool::new(false),
    ring: Mutex::new(Vec::new()),
    dropped: AtomicU64::new(0),
    recorded: AtomicU64::new(0),
};

/// Starts or stops recording frames. Starting empties what an earlier subscriber left.
pub fn set_observed(on: bool) {
    let mut ring = crate::devices::lock(&TAP.ring);
    if on && !TAP.observed.load(Ordering::Acquire) {
        ring.clear();
        ring.reserve(CAPACITY);
        TAP.dropped.store(0, Ordering::Relaxed);
    }
    if !on {
        // Give the memory back: a detached tap costs nothing.
        *ring = Vec::new();
    }
    TAP.observed.store(on, Ordering::Release);
}

/// True while a subscriber is attached.
pub fn observed() -> bool {
    TAP.observed.load(Ordering::Relaxed)
}

/// Records `frame` (an Ethernet frame, without the vnet header) when observed. Called by the
/// net devices for each frame they move; never blocks.
#[inline]
pub fn observe(direction: u8, frame: &[u8]) {
    if !TAP.observed.load(Ordering::Relaxed) {
        return;
    }
    record(summarize(direction, frame));
}

fn record(rec: FrameRecord) {
    match TAP.ring.try_lock() {
        // Below the capacity reserved at attach and at each drain: no allocation.
        Ok(mut ring) if ring.len() < CAPACITY && ring.capacity() >= CAPACITY => {
            ring.push(rec);
            TAP.recorded.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            TAP.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Moves the recorded frames into `out` (which is cleared first; give the same vector back
/// each time, it becomes the next buffer) and returns the frames dropped since the previous
/// drain.
pub fn drain(out: &mut Vec<FrameRecord>) -> u64 {
    out.clear();
    out.reserve(CAPACITY);
    {
        let mut ring = crate::devices::lock(&TAP.ring);
        if TAP.observed.load(Ordering::Acquire) {
            std::mem::swap(&mut *ring, out);
        }
    }
    TAP.dropped.swap(0, Ordering::Relaxed)
}

/// Frames recorded since the process started (for tests and metrics).
pub fn recorded() -> u64 {
    TAP.recorded.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_v4(flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut ip[20..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&6379u16.to_be_bytes());
        tcp[13] = flags;
        f
    }

    #[test]
    fn headers_are_summarized_and_odd_frames_do_not_panic() {
        let r = summarize(RX, &tcp_v4(0x18, 10));
        assert_eq!(r.len, 64);
        assert_eq!((r.ethertype, r.protocol), (0x0800, 6));
        assert_eq!(&r.src[10..], &[0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(&r.dst[12..], &[10, 0, 0, 2]);
        assert_eq!((r.src_port, r.dst_port, r.tcp_flags), (40000, 6379, 0x18));
        // IPv6 UDP behind a VLAN tag.
        let mut f = vec![0u8; 18 + 40 + 8];
        f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        f[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[18] = 0x60;
        f[18 + 6] = 17;
        f[18 + 8] = 0xfe;
        f[18 + 24] = 0xff;
        f[58..60].copy_from_slice(&53u16.to_be_bytes());
        f[60..62].copy_from_slice(&5353u16.to_be_bytes());
        let r = summarize(TX, &f);
        assert_eq!((r.ethertype, r.protocol, r.direction), (0x86dd, 17, TX));
        assert_eq!(
            (r.src[0], r.dst[0], r.src_port, r.dst_port),
            (0xfe, 0xff, 53, 5353)
        );
        // A later IPv4 fragment: addresses, no ports.
        let mut frag = tcp_v4(0x02, 0);
        frag[14 + 7] = 1;
        let r = summarize(RX, &frag);
        assert_eq!((r.protocol, r.src_port, r.tcp_flags), (6, 0, 0));
        // Truncated and garbage frames of every length up to a full TCP header.
        let whole = tcp_v4(0x02, 0);
        for n in 0..whole.len() {
            let r = summarize(RX, &whole[..n]);
            assert_eq!(r.len as usize, n);
        }
        let mut bad = whole.clone();
        bad[14] = 0x4f; // IHL 60 bytes, longer than the frame
        let _ = summarize(RX, &bad);
    }

    #[test]
    fn the_ring_is_bounded_counts_drops_and_costs_nothing_detached() {
        set_observed(false);
        let before = recorded();
        observe(RX, &tcp_v4(0x10, 0));
        assert_eq!(recorded(), before, "recorded while detached");
        set_observed(true);
        let frame = tcp_v4(0x10, 0);
        for _ in 0..CAPACITY + 5 {
            observe(TX, &frame);
        }
        let mut out = Vec::new();
        assert_eq!(drain(&mut out), 5);
        assert_eq!(out.len(), CAPACITY);
        assert!(out.iter().all(|r| r.direction == TX && r.dst_port == 6379));
        observe(RX, &frame);
        assert_eq!(drain(&mut out), 0);
        assert_eq!(out.len(), 1);
        set_observed(false);
        assert_eq!(drain(&mut out), 0);
        assert!(out.is_empty());
    }
}
