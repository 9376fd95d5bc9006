//! Finding the TSC frequency: `tsc_khz=`, else the spanvmm info port, else CPUID 0x15, else the
//! PIT. Also the tick/time conversions everything else uses.

use crate::arch::{cpuid, inb, inl, outb, rdtsc};
use crate::pv;

/// Where the frequency came from (for the boot line).
#[derive(Clone, Copy)]
pub enum Source {
    /// `tsc_khz=` on the command line.
    Param,
    /// spanvmm's info port.
    Pv,
    /// CPUID leaf 0x15.
    Cpuid,
    /// Measured against the 8254 PIT.
    Pit,
}

impl Source {
    /// Name printed in the boot line.
    pub fn name(self) -> &'static str {
        match self {
            Source::Param => "param",
            Source::Pv => "pv",
            Source::Cpuid => "cpuid",
            Source::Pit => "pit",
        }
    }
}

/// Frequencies outside this range (kHz) are taken as a broken source.
const PLAUSIBLE_KHZ: core::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// The TSC frequency in kHz and its source, or `None` if nothing gives a plausible value.
pub fn detect(param: Option<u64>, pv_present: bool) -> Option<(u64, Source)> {
    if let Some(khz) = param {
        return Some((khz, Source::Param));
    }
    if pv_present {
        let khz = u64::from(inl(pv::PORT_SLEEP));
        if PLAUSIBLE_KHZ.contains(&khz) {
            return Some((khz, Source::Pv));
        }
    }
    if let Some(khz) = from_cpuid().filter(|k| PLAUSIBLE_KHZ.contains(k)) {
        return Some((khz, Source::Cpuid));
    }
    // Channel 2 is the classic choice (gated through port 0x61); some machines (QEMU microvm)
    // have no port 0x61, so channel 0, which always counts, is the fallback.
    [2, 0]
        .into_iter()
        .find_map(pit_calibrate)
        .filter(|k| PLAUSIBLE_KHZ.contains(k))
        .map(|khz| (khz, Source::Pit))
}

/// CPUID 0x15: TSC = crystal × EBX / EAX, usable only when all three are reported.
fn from_cpuid() -> Option<u64> {
    if cpuid(0).0 < 0x15 {
        return None;
    }
    let (den, num, crystal_hz, _) = cpuid(0x15);
    if den == 0 || num == 0 || crystal_hz == 0 {
        return None;
    }
    Some(u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000)
}

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks to measure over: about 13.7 ms.
const PIT_SPAN: u16 = 16384;
const PIT_CMD: u16 = 0x43;
const PORT_B: u16 = 0x61;

/// Counts TSC ticks while PIT `channel` counts down `PIT_SPAN` ticks. Every port access is a VM
/// exit (tens of µs), so each sample takes the TSC on both sides of the latch command and uses
/// the midpoint.
fn pit_calibrate(channel: u16) -> Option<u64> {
    let data = 0x40 + channel;
    let saved_b = inb(PORT_B);
    if channel == 2 {
        outb(PORT_B, (saved_b & !0x02) | 0x01); // gate on, speaker off
    }
    // Mode 0 (count down once), low then high byte, binary; start from 0xffff.
    outb(PIT_CMD, ((channel as u8) << 6) | 0x30);
    outb(data, 0xff);
    outb(data, 0xff);
    let sample = || {
        let before = rdtsc();
        outb(PIT_CMD, (channel as u8) << 6); // latch this channel's count
        let after = rdtsc();
        let lo = inb(data);
        let hi = inb(data);
        (before / 2 + after / 2, u16::from_le_bytes([lo, hi]))
    };
    sample(); // the count may load on the next PIT clock: let it
    let (t0, c0) = sample();
    let mut result = None;
    // Bounded: a PIT that does not count must not hang the boot (2000 samples ≈ 0.2 s of exits).
    for _ in 0..2000 {
        let (t1, c1) = sample();
        let elapsed = c0.wrapping_sub(c1);
        if elapsed >= PIT_SPAN && c1 < c0 {
            result = Some((t1 - t0) * PIT_HZ / (u64::from(elapsed) * 1000));
            break;
        }
    }
    if channel == 2 {
        outb(PORT_B, saved_b);
    }
    result
}

/// Converts between TSC ticks and time for a known frequency.
#[derive(Clone, Copy)]
pub struct Clock {
    /// TSC frequency, kHz.
    pub khz: u64,
}

impl Clock {
    /// Ticks in `us` microseconds.
    pub fn us(self, us: u64) -> u64 {
        us.saturating_mul(self.khz) / 1000
    }

    /// Ticks in `ms` milliseconds.
    pub fn ms(self, ms: u64) -> u64 {
        ms.saturating_mul(self.khz)
    }

    /// Whole microseconds in `ticks`.
    pub fn to_us(self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1000 / u128::from(self.khz)) as u64
    }

    /// Whole milliseconds in `ticks`.
    pub fn to_ms(self, ticks: u64) -> u64 {
        ticks / self.khz
    }

    /// Nanoseconds in `ticks`.
    pub fn to_ns(self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.khz)) as u64
    }

    /// TSC ticks per second.
    pub fn hz(self) -> u64 {
        self.khz * 1000
    }
}
