//! The live-migration engine (`spanvmm:service/migration`), for the service holding the
//! `drives-migration` capability. The host moves the bytes on its own thread; the service
//! queues bitmaps and ranges, hands the guest over when it decides, and reads progress.
//!
//! Wasm and native services alike reach it (the native host table carries these calls since
//! they were appended to ABI version 1).
//!
//! The host uses these types too (its progress adds counters of its own around [`Progress`]):
//! one definition each, and one conversion to each wire form (the C struct here, the WIT record
//! in each runtime).

use serde::Serialize;

use crate::abi::{migration_phase, switch_mode, CMigrationStatus};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Pages go out while the guest runs here.
    Precopy,
    /// The guest runs at the destination; the host pushes what it lacks.
    Postcopy,
    /// Post-copy lost its connection; the host is reconnecting.
    Recovering,
    /// Done.
    Completed,
    /// Given up.
    Failed,
}

/// How to hand the guest over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchMode {
    /// Pause, send the remaining dirty pages and the state, run at the destination.
    StopAndCopy,
    /// Pause, send the state, run at the destination at once; pages follow.
    Postcopy,
}

/// Progress of the migration.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Where it is.
    pub phase: Phase,
    /// Guest pages.
    pub pages_total: u64,
    /// Pages queued and not sent yet; in pre-copy also those sent that are still queued on
    /// the path (not confirmed by the destination, nor past the path's bottleneck by its
    /// answers: docs/migration-wire.md); a round ends when this reaches 0.
    pub pages_pending: u64,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub bytes_sent: u64,
    /// Recent send rate, bytes/s (on a long link no more than the path delivers: 0 until
    /// measured).
    pub rate_bytes_per_sec: u64,
    /// Post-copy: pages the destination still lacks.
    pub pages_needed: u64,
    /// Faults the destination requested.
    pub remote_faults: u64,
    /// ms since the migration started.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl Phase {
    /// The C ABI code ([`migration_phase`]).
    pub fn code(self) -> u32 {
        match self {
            Phase::Precopy => migration_phase::PRECOPY,
            Phase::Postcopy => migration_phase::POSTCOPY,
            Phase::Recovering => migration_phase::RECOVERING,
            Phase::Completed => migration_phase::COMPLETED,
            Phase::Failed => migration_phase::FAILED,
        }
    }

    /// The phase of a C ABI code.
    pub fn from_code(code: u32) -> Option<Phase> {
        [
            Phase::Precopy,
            Phase::Postcopy,
            Phase::Recovering,
            Phase::Completed,
            Phase::Failed,
        ]
        .into_iter()
        .find(|p| p.code() == code)
    }
}

impl SwitchMode {
    /// The C ABI code ([`switch_mode`]).
    pub fn code(self) -> u32 {
        match self {
            SwitchMode::StopAndCopy => switch_mode::STOP_AND_COPY,
            SwitchMode::Postcopy => switch_mode::POSTCOPY,
        }
    }

    /// The mode of a C ABI code.
    pub fn from_code(code: u32) -> Option<SwitchMode> {
        [SwitchMode::StopAndCopy, SwitchMode::Postcopy]
            .into_iter()
            .find(|m| m.code() == code)
    }
}

impl From<&Progress> for CMigrationStatus {
    fn from(p: &Progress) -> Self {
        CMigrationStatus {
            phase: p.phase.code(),
            reserved: 0,
            pages_total: p.pages_total,
            pages_pending: p.pages_pending,
            pages_sent: p.pages_sent,
            bytes_sent: p.bytes_sent,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            pages_needed: p.pages_needed,
            remote_faults: p.remote_faults,
            elapsed_ms: p.elapsed_ms,
        }
    }
}

impl Progress {
    /// The progress a C status and its failure message describe.
    pub fn from_c(p: &CMigrationStatus, error: Option<String>) -> Result<Progress, String> {
        Ok(Progress {
            phase: Phase::from_code(p.phase)
                .ok_or_else(|| format!("progress: unknown migration phase {}", p.phase))?,
            pages_total: p.pages_total,
            pages_pending: p.pages_pending,
            pages_sent: p.pages_sent,
            bytes_sent: p.bytes_sent,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            pages_needed: p.pages_needed,
            remote_faults: p.remote_faults,
            elapsed_ms: p.elapsed_ms,
            error,
        })
    }
}

/// CloudNet's page encodings (`set_encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Content-based redundancy elimination.
    pub redundancy: bool,
    /// XOR + run-length deltas of pages sent before.
    pub deltas: bool,
    /// Size of each cache, bytes.
    pub cache_bytes: u64,
    /// Blocks per page for redundancy elimination: 1, 2, 4, 8 or 16.
    pub blocks: u32,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::wasm::bindings::spanvmm::service::migration as m;

    pub fn harvest_dirty() -> Result<Vec<u64>, String> {
        m::harvest_dirty()
    }
    pub fn set_encoding(e: Encoding) -> Result<(), String> {
        m::set_encoding(m::Encoding {
            redundancy: e.redundancy,
            deltas: e.deltas,
            cache_bytes: e.cache_bytes,
            blocks: e.blocks,
        })
    }
    pub fn queue_pages(bitmap: &[u64], round: u32) -> Result<u64, String> {
        m::queue_pages(bitmap, round)
    }
    pub fn set_scatter(config: &str) -> Result<(), String> {
        m::set_scatter(config)
    }
    pub fn throttle_vcpus(percent: u32) -> Result<(), String> {
        m::throttle_vcpus(percent)
    }
    pub fn queue_range(first: u64, count: u64, urgent: bool, round: u32) -> Result<(), String> {
        m::queue_range(first, count, urgent, round)
    }
    pub fn switch_over(mode: SwitchMode) -> Result<(), String> {
        m::switch_over(match mode {
            SwitchMode::StopAndCopy => m::SwitchMode::StopAndCopy,
            SwitchMode::Postcopy => m::SwitchMode::Postcopy,
        })
    }
    pub fn take_faults() -> Vec<u64> {
        m::take_faults()
    }
    pub fn progress() -> Result<Progress, String> {
        let p = m::progress()?;
        Ok(Progress {
            phase: match p.phase {
                m::Phase::Precopy => Phase::Precopy,
                m::Phase::Postcopy => Phase::Postcopy,
                m::Phase::Recovering => Phase::Recovering,
                m::Phase::Completed => Phase::Completed,
                m::Phase::Failed => Phase::Failed,
            },
            pages_total: p.pages_total,
            pages_pending: p.pages_pending,
            pages_sent: p.pages_sent,
            bytes_sent: p.bytes_sent,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            pages_needed: p.pages_needed,
            remote_faults: p.remote_faults,
            elapsed_ms: p.elapsed_ms,
            error: p.error,
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;
    use crate::native::imports as n;

    pub fn harvest_dirty() -> Result<Vec<u64>, String> {
        n::migration_harvest_dirty()
    }
    pub fn set_encoding(e: Encoding) -> Result<(), String> {
        n::migration_set_encoding(e.redundancy, e.deltas, e.cache_bytes, e.blocks)
    }
    pub fn queue_pages(bitmap: &[u64], round: u32) -> Result<u64, String> {
        n::migration_queue_pages(bitmap, round)
    }
    pub fn set_scatter(config: &str) -> Result<(), String> {
        n::migration_set_scatter(config)
    }
    pub fn throttle_vcpus(percent: u32) -> Result<(), String> {
        n::migration_throttle_vcpus(percent)
    }
    pub fn queue_range(first: u64, count: u64, urgent: bool, round: u32) -> Result<(), String> {
        n::migration_queue_range(first, count, urgent, round)
    }
    pub fn switch_over(mode: SwitchMode) -> Result<(), String> {
        n::migration_switch_over(mode.code())
    }
    pub fn take_faults() -> Vec<u64> {
        n::migration_take_faults()
    }
    pub fn progress() -> Result<Progress, String> {
        let (p, error) = n::migration_progress()?;
        Progress::from_c(&p, error)
    }
}

/// Chooses CloudNet's page encodings for this migration, once, before the first page is
/// queued (both ends' caches start empty together).
pub fn set_encoding(e: Encoding) -> Result<(), String> {
    imp::set_encoding(e)
}

/// Chooses Scatter-Gather for this migration, once, before a post-copy switch-over: what the
/// link cannot take at once goes to Redis intermediaries, and the destination gathers it
/// (`config`: JSON, see `set-scatter` in `wit/migration.wit`).
pub fn set_scatter(config: &str) -> Result<(), String> {
    imp::set_scatter(config)
}

/// Slows the guest while pre-copy goes on, for a guest that dirties memory faster than the
/// link carries it: every vCPU sleeps `percent` of the time (at most 99; 0 lifts it), runs
/// of 10 ms between sleeps `percent / (100 - percent)` times as long. Pre-copy only; the
/// host lifts it when the migration ends.
pub fn throttle_vcpus(percent: u32) -> Result<(), String> {
    imp::throttle_vcpus(percent)
}

/// How long each of [`throttle_vcpus`]'s sleeps lasts at `percent` (at most 99), ms: the
/// host's contract, for a policy weighing a sleep against the pause it would save.
pub fn throttle_sleep_ms(percent: u32) -> f64 {
    let p = f64::from(percent.min(99));
    10.0 * p / (100.0 - p)
}

/// Pages dirtied since the previous call, counted into the migration's dirty rate
/// (capabilities `drives-migration` and `dirty-log`). In pre-copy, pages still queued are
/// left out: they are read when they go, so they carry the writes this harvest saw.
pub fn harvest_dirty() -> Result<Vec<u64>, String> {
    imp::harvest_dirty()
}

/// Queues the pages set in `bitmap`, counted into pre-copy round `round` (0: none); returns
/// how many were not queued already.
pub fn queue_pages(bitmap: &[u64], round: u32) -> Result<u64, String> {
    imp::queue_pages(bitmap, round)
}

/// Queues pages `[first, first + count)`; `urgent` ones go before everything but faults.
pub fn queue_range(first: u64, count: u64, urgent: bool, round: u32) -> Result<(), String> {
    imp::queue_range(first, count, urgent, round)
}

/// Hands the guest over once the queued pages are out.
pub fn switch_over(mode: SwitchMode) -> Result<(), String> {
    imp::switch_over(mode)
}

/// Pages the destination faulted on since the previous call (post-copy).
pub fn take_faults() -> Vec<u64> {
    imp::take_faults()
}

/// Where the migration is.
pub fn progress() -> Result<Progress, String> {
    imp::progress()
}
