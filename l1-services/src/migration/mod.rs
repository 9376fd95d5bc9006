//! Live migration, the host side: the transport (TCP + TLS 1.3 with mutual certificate
//! authentication), the wire format, the source's sender thread and the destination's receiver
//! with its userfaultfd page service. The policy (rounds, when to stop, what to prefetch) is a
//! service holding the `drives-migration` capability, which reaches this engine through the
//! `spanvmm:service/migration` interface: it queues bitmaps and ranges and reads progress; the
//! bytes never cross into the service.

pub mod cnet;
mod dest;
mod link;
pub mod report;
mod source;
pub mod tls;
pub mod wire;

pub use dest::{receive, Arrived, DestProgress, MigrationDest, PreparedRam, CANCELLED};
pub use link::{Link, LinkError};
pub use source::{Harvest, MigrationSource, Report, Sample, SourceConfig, SourceVm};

use serde::Serialize;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Pages go out while the guest runs at the source.
    Precopy,
    /// The guest runs at the destination; the source pushes what it still lacks.
    Postcopy,
    /// Post-copy lost its connection and waits for it to come back.
    Recovering,
    /// Done: the guest lives at the destination.
    Completed,
    /// Given up (the message says why).
    Failed,
}

/// How the service asks to hand the guest over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchMode {
    /// Pause, send every remaining dirty page and the state, run at the destination.
    StopAndCopy,
    /// Pause, send the state, run at the destination at once; pages follow.
    Postcopy,
}

/// Progress as the service and the control API see it.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Where the migration is.
    pub phase: Phase,
    /// Guest pages.
    pub pages_total: u64,
    /// Pages queued and not sent yet.
    pub pages_pending: u64,
    /// Pages sent so far (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub bytes_sent: u64,
    /// Recent send rate, bytes/s.
    pub rate_bytes_per_sec: u64,
    /// Recent send rate, pages/s.
    pub pages_per_sec: u64,
    /// Pre-copy rounds so far.
    pub rounds: u32,
    /// Faults the destination requested.
    pub remote_faults: u64,
    /// Post-copy: pages the destination still lacks.
    pub pages_needed: u64,
    /// Since the migration started, ms.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
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

pub(crate) fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// Debug trace with wall-clock µs (comparable across source and destination), on stderr when
/// `SPANVMM_MIGRATION_DEBUG` is set.
pub fn trace(what: std::fmt::Arguments) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SPANVMM_MIGRATION_DEBUG").is_some()) {
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
