//! Live migration, the host side: the transport (TCP + TLS 1.3 with mutual certificate
//! authentication), the wire format, the source's sender thread and the destination's receiver
//! with its userfaultfd page service. The policy (rounds, when to stop, what to prefetch) is a
//! service holding the `drives-migration` capability, which reaches this engine through the
//! `spanvmm:service/migration` interface: it queues bitmaps and ranges and reads progress; the
//! bytes never cross into the service.
//!
//! Scatter-Gather's parts: the intermediary store (`intermediary`: real Redis servers through
//! the RESP client `resp`, pages addressed by content, MAC'd and optionally encrypted) and the
//! destination's third page source with its rate-capped gather (`scatter`). Agile migration's
//! cold pages parked there and evicted from the running VM (`agile`).
//!
//! Synchronized arrival (`hold`): a migration can wait at its switch-over point, and again
//! before its commit, until released, so that a group of VMs switches over together.

pub mod agile;
pub mod cnet;
mod dest;
pub mod disk;
pub mod hold;
pub mod intermediary;
mod link;
mod records;
pub mod report;
pub mod resp;
pub mod scatter;
mod source;
pub mod tls;
pub mod wire;

pub use dest::{receive, Arrived, DestError, DestProgress, MigrationDest, PreparedRam, CANCELLED};
pub use link::{Link, LinkError};
pub use source::{
    CommitMode, Harvest, MigrationSource, ParkedSendReport, Report, Sample, SourceConfig,
    SourceError, SourceVm, AUTO_COMMIT_RTT,
};

use serde::Serialize;

// The SDK's types: a service and the host name phases and modes the same way.
pub use spanvmm_sdk::migration::{Phase, SwitchMode};

/// Progress as the control API sees it: what a service sees (the SDK's [`Status`]), plus the
/// host's own counters. Serialized flat, as one object.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// What the service sees.
    #[serde(flatten)]
    pub status: Status,
    /// Recent send rate, pages/s.
    pub pages_per_sec: u64,
    /// Pre-copy rounds so far.
    pub rounds: u32,
    /// The disks moving with the VM, so far (phase, blocks sent, pending, mirrored writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<disk::DiskReport>,
    /// Synchronized arrival: where a held migration is (`stage` `ready`: at its switch-over
    /// point, waiting for the release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<hold::HoldReport>,
}

/// The progress a service sees.
pub use spanvmm_sdk::migration::Progress as Status;

impl std::ops::Deref for Progress {
    type Target = Status;
    fn deref(&self) -> &Status {
        &self.status
    }
}

pub(crate) fn bit(words: &[u64], p: u64) -> bool {
    words
        .get((p / 64) as usize)
        .is_some_and(|w| w >> (p % 64) & 1 == 1)
}

pub(crate) fn set_bit(words: &mut [u64], p: u64) {
    words[(p / 64) as usize] |= 1 << (p % 64);
}

pub(crate) fn clear_bit(words: &mut [u64], p: u64) {
    words[(p / 64) as usize] &= !(1 << (p % 64));
}

/// The first bit set at or after `p`, if any.
pub(crate) fn next_set(words: &[u64], p: u64) -> Option<u64> {
    let mut w = (p / 64) as usize;
    let mut bits = words.get(w)? & (!0u64 << (p % 64));
    loop {
        if bits != 0 {
            return Some(w as u64 * 64 + bits.trailing_zeros() as u64);
        }
        w += 1;
        bits = *words.get(w)?;
    }
}

pub(crate) fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// Debug trace with wall-clock µs (comparable across source and destination), on stderr when
/// `SPANVMM_MIGRATION_DEBUG` is set.
pub fn trace(what: std::fmt::Arguments) {
    if tracing_on() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "[mig {}.{:06}] {what}",
            t.as_secs() % 1000,
            t.subsec_micros()
        );
    }
}

/// CPU time the calling thread has used (for the trace: what a step costs, whatever else
/// runs on the machine).
pub(crate) fn thread_cpu_ms() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// Whether `SPANVMM_MIGRATION_DEBUG` is set: the trace is printed and the links time their
/// steps.
pub(crate) fn tracing_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SPANVMM_MIGRATION_DEBUG").is_some())
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    /// The control API's progress stays one flat object with the keys it always had, though
    /// its service part is the SDK's type.
    #[test]
    fn progress_serializes_flat() {
        let p = Progress {
            status: Status {
                phase: Phase::Precopy,
                pages_total: 4,
                pages_pending: 1,
                pages_sent: 3,
                bytes_sent: 12288,
                rate_bytes_per_sec: 7,
                pages_needed: 0,
                remote_faults: 0,
                elapsed_ms: 5,
                error: None,
            },
            pages_per_sec: 2,
            rounds: 1,
            disk: None,
            hold: None,
        };
        let v = serde_json::to_value(&p).expect("serialize");
        assert_eq!(v["phase"], "precopy");
        assert_eq!(v["pages_sent"], 3);
        assert_eq!(v["rounds"], 1);
        assert_eq!(v["pages_per_sec"], 2);
        assert!(v.get("status").is_none(), "{v}");
        assert_eq!(p.pages_total, 4, "the service part reads through");
        assert_eq!(
            serde_json::to_value(SwitchMode::StopAndCopy).unwrap(),
            "stop-and-copy"
        );
    }
}
