//! The start-up trace: named steps from the process's start to the guest's first instruction
//! and first console lines, on stderr when `SPANVMM_STARTUP_TRACE` is set (off otherwise: one
//! load of a cached flag per mark). Each line is `[startup] +US step`, µs on the host's
//! monotonic clock since `$SPANVMM_STARTUP_T0_US` (the spawner's [`crate::vmm::monotonic_us`]
//! just before it started this process, so that exec and the dynamic loader count), else since
//! the first mark. `spanvmm-bench startup --trace` reads these lines.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The trace's origin, µs on the monotonic clock; `None` when the trace is off.
fn origin() -> Option<u64> {
    static T0: OnceLock<Option<u64>> = OnceLock::new();
    *T0.get_or_init(|| {
        std::env::var_os("SPANVMM_STARTUP_TRACE")?;
        Some(
            std::env::var("SPANVMM_STARTUP_T0_US")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(crate::vmm::monotonic_us),
        )
    })
}

/// Whether the trace is on.
pub fn on() -> bool {
    origin().is_some()
}

/// Writes `step` with the time since the origin (when the trace is on).
pub fn mark(step: &str) {
    if let Some(t0) = origin() {
        let now = crate::vmm::monotonic_us();
        eprintln!("[startup] +{} {step}", now.saturating_sub(t0));
    }
}

/// [`mark`] for at most the first `n` times `counter` counts (the first exits, the first
/// console lines), numbering them.
pub fn mark_first(counter: &AtomicUsize, n: usize, step: &str) {
    if !on() {
        return;
    }
    let i = counter.fetch_add(1, Ordering::Relaxed);
    if i < n {
        mark(&format!("{step} {}", i + 1));
    }
}

/// [`mark`] with a time the caller took earlier (a step that ended on another thread).
pub fn mark_at(step: &str, at_us: u64) {
    if let Some(t0) = origin() {
        eprintln!("[startup] +{} {step}", at_us.saturating_sub(t0));
    }
}

/// Counts marks of a kind across threads (see [`mark_first`]).
pub static FIRST_RUNS: AtomicUsize = AtomicUsize::new(0);
/// The first exits of any vCPU.
pub static FIRST_EXITS: AtomicUsize = AtomicUsize::new(0);
/// The first console lines.
pub static FIRST_LINES: AtomicUsize = AtomicUsize::new(0);
