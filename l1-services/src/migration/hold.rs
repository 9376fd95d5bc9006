//! Synchronized arrival's mechanism (CloudNet, issue 17 item 4): a migration that holds at its
//! switch-over point until a coordinator releases it, so that several VMs (the tiers of one
//! application) switch over together and none runs at the destination while another still
//! runs at the source.
//!
//! Two gates, both opened by [`Hold::release`]:
//!
//! 1. **ready** (the guest runs): the policy asked for the switch-over and every queued page
//!    went out. Until released, the engine keeps the destination's copy fresh by sending the
//!    pages dirtied meanwhile (held rounds; a pure post-copy, having sent nothing, just
//!    waits). Not released within `timeout_ms`: the migration fails, the guest runs on here.
//! 2. **prepared** (the guest is paused): the destination has the state and said it can run
//!    the guest; the commit waits for the release. Not released within `commit_timeout_ms`,
//!    or cancelled: rolled back, the guest runs here again. This gate makes the group
//!    all-or-nothing: no member commits before every member's destination is ready, so a
//!    member that fails anywhere before that point leaves every member at its source.
//!
//! The paper adapts each VM's transfer rate so the migrations finish together; holding gives
//! the same guarantee without predicting rates over a shared WAN, at the cost of the held
//! rounds' bytes (counted in the report) and, at the second gate, of the slowest member's
//! stop-and-copy in every member's downtime. See docs/operations.md.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ctx::lock;

/// How a migration holds (the `hold` of `PUT /vm/migrate`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoldSpec {
    /// Longest wait at `ready` for the release, ms (then the migration fails and the guest
    /// runs on at the source).
    pub timeout_ms: u64,
    /// Longest wait at `prepared` (guest paused) for the release, ms (then rolled back).
    pub commit_timeout_ms: u64,
    /// Bytes per second the held rounds may send (None: a tenth of the send rate measured
    /// when the migration became ready, at least 256 KiB/s).
    pub held_rate: Option<u64>,
}

impl Default for HoldSpec {
    fn default() -> Self {
        HoldSpec {
            timeout_ms: 120_000,
            commit_timeout_ms: 5_000,
            held_rate: None,
        }
    }
}

/// Where a held migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Pre-copy rounds, not yet at the switch-over point.
    #[default]
    Converging,
    /// At the switch-over point, the guest running: waiting for the first release.
    Ready,
    /// Released: the switch-over runs.
    Released,
    /// Paused, the destination ready to run the guest: waiting for the second release.
    Prepared,
    /// Released again: the commit went (or goes) out.
    Committed,
    /// The hold failed (deadline, cancel): the migration ends, the guest stays here.
    Aborted,
}

/// What a hold did (in the progress and the report as `hold`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldReport {
    /// Where it is.
    pub stage: Stage,
    /// From the migration's start to `ready`, ms.
    #[serde(default)]
    pub ready_ms: f64,
    /// Wall clock of `ready`, µs since the epoch (compare across members).
    #[serde(default)]
    pub ready_unix_us: u64,
    /// Time at `ready` (guest running), ms.
    #[serde(default)]
    pub held_ms: f64,
    /// The held rounds' budget, bytes/s.
    #[serde(default)]
    pub held_rate: u64,
    /// Dirty rounds sent while at `ready`.
    #[serde(default)]
    pub held_rounds: u32,
    /// Pages they queued.
    #[serde(default)]
    pub held_pages: u64,
    /// Bytes on the wire while at `ready`: what synchronization cost in traffic.
    #[serde(default)]
    pub held_bytes: u64,
    /// Time at `prepared` (guest paused: part of the downtime), ms.
    #[serde(default)]
    pub commit_wait_ms: f64,
    /// Wall clock of the commit, µs since the epoch.
    #[serde(default)]
    pub committed_unix_us: u64,
}

struct HoldState {
    report: HoldReport,
    since: Option<Instant>,
    bytes_at_ready: u64,
}

/// A migration's hold: the engine's sender thread waits at it, the control API releases it.
pub struct Hold {
    spec: HoldSpec,
    st: Mutex<HoldState>,
    cv: Condvar,
}

/// Wall clock, µs since the epoch (the report's timestamps, compared across members).
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

impl Hold {
    /// A hold at the converging stage.
    pub fn new(spec: HoldSpec) -> Self {
        Hold {
            spec,
            st: Mutex::new(HoldState {
                report: HoldReport::default(),
                since: None,
                bytes_at_ready: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// Opens the gate the migration waits at (`ready` or `prepared`); the stage it moved to.
    pub fn release(&self) -> Result<Stage, String> {
        let mut st = lock(&self.st);
        let next = match st.report.stage {
            Stage::Ready => Stage::Released,
            Stage::Prepared => Stage::Committed,
            s => {
                return Err(format!(
                    "the migration is not held (it is {}): release it once it reports \
                     `ready` or `prepared`",
                    serde_json::to_value(s).unwrap_or_default()
                ))
            }
        };
        st.report.stage = next;
        self.cv.notify_all();
        Ok(next)
    }

    /// Released at `ready`: the switch-over may run.
    pub(crate) fn released(&self) -> bool {
        lock(&self.st).report.stage == Stage::Released
    }

    /// What it did so far.
    pub fn report(&self) -> HoldReport {
        lock(&self.st).report.clone()
    }

    /// Wakes a sender waiting at `prepared` (a cancel).
    pub(crate) fn wake(&self) {
        self.cv.notify_all();
    }

    /// At the switch-over point with `bytes` on the wire so far, sending at `rate` bytes/s:
    /// Ok(true) once released, Ok(false) while held, Err past the deadline.
    pub(crate) fn at_switch(
        &self,
        started: Instant,
        bytes: u64,
        rate: u64,
    ) -> Result<bool, String> {
        let mut st = lock(&self.st);
        match st.report.stage {
            Stage::Converging => {
                st.report.stage = Stage::Ready;
                st.report.ready_ms = started.elapsed().as_secs_f64() * 1e3;
                st.report.ready_unix_us = unix_us();
                st.since = Some(Instant::now());
                st.bytes_at_ready = bytes;
                st.report.held_rate = self.spec.held_rate.unwrap_or((rate / 10).max(256 << 10));
                crate::migration::trace(format_args!("source: held at ready"));
                Ok(false)
            }
            Stage::Ready => {
                let held = st.since.map(|t| t.elapsed()).unwrap_or_default();
                st.report.held_ms = held.as_secs_f64() * 1e3;
                st.report.held_bytes = bytes.saturating_sub(st.bytes_at_ready);
                if held > Duration::from_millis(self.spec.timeout_ms) {
                    st.report.stage = Stage::Aborted;
                    return Err(format!(
                        "held at the switch-over point and not released within {} ms: the \
                         guest stays here",
                        self.spec.timeout_ms
                    ));
                }
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// How long it has been held at `ready` (zero before).
    pub(crate) fn held_for(&self) -> Duration {
        lock(&self.st)
            .since
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Whether the held rounds are within their budget with `bytes` on the wire now.
    pub(crate) fn may_send(&self, bytes: u64) -> bool {
        let st = lock(&self.st);
        let held = st.since.map(|t| t.elapsed()).unwrap_or_default();
        let allowed = st.report.held_rate as f64 * held.as_secs_f64();
        (bytes.saturating_sub(st.bytes_at_ready) as f64) <= allowed
    }

    /// A dirty round sent while held.
    pub(crate) fn held_round(&self, pages: u64) {
        let mut st = lock(&self.st);
        st.report.held_rounds += 1;
        st.report.held_pages += pages;
    }

    /// The destination is ready (guest paused here): waits for the release, a cancel
    /// (`cancelled`) or the commit deadline. Ok: commit.
    pub(crate) fn await_commit(&self, cancelled: impl Fn() -> bool) -> Result<(), String> {
        let mut st = lock(&self.st);
        st.report.stage = Stage::Prepared;
        let t = Instant::now();
        let deadline = t + Duration::from_millis(self.spec.commit_timeout_ms);
        crate::migration::trace(format_args!("source: held at prepared"));
        loop {
            st.report.commit_wait_ms = t.elapsed().as_secs_f64() * 1e3;
            if st.report.stage == Stage::Committed {
                st.report.committed_unix_us = unix_us();
                return Ok(());
            }
            let why = if cancelled() {
                Some("cancelled while prepared".to_string())
            } else if Instant::now() >= deadline {
                Some(format!(
                    "prepared to hand over and not released within {} ms",
                    self.spec.commit_timeout_ms
                ))
            } else {
                None
            };
            if let Some(why) = why {
                st.report.stage = Stage::Aborted;
                return Err(format!("{why}: rolled back, the guest runs here again"));
            }
            // Short waits: a cancel sets its flag before waking us, but might miss the wait.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20));
            st = self
                .cv
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// The migration failed while held.
    pub(crate) fn abort(&self) {
        let mut st = lock(&self.st);
        if st.report.stage != Stage::Committed {
            st.report.stage = Stage::Aborted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_open_in_order_and_only_when_reached() {
        let h = Hold::new(HoldSpec::default());
        assert!(h.release().is_err(), "nothing to release while converging");
        let t0 = Instant::now();
        assert_eq!(h.at_switch(t0, 100, 0), Ok(false));
        assert_eq!(h.report().stage, Stage::Ready);
        assert_eq!(h.at_switch(t0, 150, 0), Ok(false));
        assert_eq!(h.report().held_bytes, 50);
        assert_eq!(h.report().held_rate, 256 << 10, "the floor");
        assert!(!h.may_send(1 << 30), "over budget");
        assert_eq!(h.release(), Ok(Stage::Released));
        assert_eq!(h.at_switch(t0, 150, 0), Ok(true));
        let h = std::sync::Arc::new(h);
        let r = {
            let h = h.clone();
            std::thread::spawn(move || h.await_commit(|| false))
        };
        while h.report().stage != Stage::Prepared {
            std::thread::yield_now();
        }
        assert_eq!(h.release(), Ok(Stage::Committed));
        assert_eq!(r.join().unwrap(), Ok(()));
        assert!(h.release().is_err());
    }

    #[test]
    fn deadlines_and_cancel_abort() {
        let h = Hold::new(HoldSpec {
            timeout_ms: 0,
            commit_timeout_ms: 0,
            held_rate: None,
        });
        let t0 = Instant::now();
        assert_eq!(h.at_switch(t0, 0, 0), Ok(false));
        std::thread::sleep(Duration::from_millis(2));
        assert!(h.at_switch(t0, 0, 0).is_err());
        assert_eq!(h.report().stage, Stage::Aborted);
        let h = Hold::new(HoldSpec::default());
        assert!(h.await_commit(|| true).unwrap_err().contains("cancelled"));
        let h = Hold::new(HoldSpec {
            timeout_ms: 1,
            commit_timeout_ms: 1,
            held_rate: None,
        });
        assert!(h.await_commit(|| false).unwrap_err().contains("1 ms"));
    }
}
