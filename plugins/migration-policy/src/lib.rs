//! Migration policy, shared by the `precopy`, `postcopy` and `hybrid` services. The host's
//! engine moves the bytes; this decides, from ticks, what to queue and when to hand over.
//!
//! - **precopy**: round 1 queues all of memory, each later round the pages dirtied during the
//!   previous one. It stops and copies when the remaining dirty set is small (at most
//!   `min_pages`, or sendable within `downtime_ms` at the measured rate). When the guest
//!   dirties faster than the link drains, the set stops shrinking: after `stall_rounds`
//!   rounds without a new minimum (smaller by more than a tenth), or at `max_rounds` or
//!   `max_bytes`, it hands over anyway: by stop-and-copy when the dirty set would go out
//!   within `max_pause_ms` (the source stays the complete copy to the very end), else by
//!   switching to post-copy. A non-converging guest keeps its dirty set near its working
//!   set, so a stop-and-copy would pause it for working-set/bandwidth — seconds on a slow
//!   link (5.6 s for 64 MiB at 100 Mbit/s) — where post-copy's pause is one round trip and
//!   the guest then waits only for the pages it touches. `max_pause_ms: 0` keeps the
//!   stop-and-copy whatever it costs.
//!   While a round's pages are queued it harvests the dirty log every `harvest_ms` (25;
//!   0: only at the round's end). The host leaves out the pages still queued: they go with
//!   the writes the harvest saw, so a page dirtied before its turn goes once rather than
//!   again in the next round (Xen's pre-copy skips the pages dirtied in the current round
//!   for the same reason).
//! - **postcopy**: hands over at once; the host pushes every page once, faulted pages first.
//!   On each fault this queues the neighbourhood after the faulting page as urgent
//!   (pre-paging), with a window that doubles while faults stay close to each other (a
//!   sequential pass) and halves when they scatter.
//! - **hybrid**: pre-copy for at most `max_rounds` (default 2), then post-copy unless the
//!   dirty set already converged (then stop-and-copy is cheaper).
//!
//! CloudNet's optimizations, each an option (all off by default):
//! - `redundancy` (cache `cache_mb`, `blocks` per page) and `deltas`: the host's page
//!   encodings, chosen before the first page (pre-copy rounds and the stop-and-copy; post-copy
//!   pages go raw).
//! - `smart_stop` (precopy, hybrid): CloudNet's Smart Stop-and-Copy. Once a round left about
//!   as many pages dirty as it sent or more (within a tenth: the crossover, iterating
//!   further gains little), it stops at the first round whose remaining dirty
//!   set is at most each of the previous `smart_window` rounds' (within 1 %: a local
//!   minimum; on a plateau, its first round) or larger than the last round's by more than
//!   1 % (past a minimum), instead of waiting for the stall or round limits.
//!
//! Beyond CloudNet (off by default):
//! - `converge_throttle` (precopy; percent, 0: off): when the rounds would stop with a
//!   final copy that pauses the guest longer than one of the throttle's sleeps (10 ms runs
//!   between sleeps of `p / (100 - p)` × 10 ms: 90 ms at 90 %), the guest is throttled
//!   and the rounds go on, their stop rules counting afresh: the guest, slowed, dirties
//!   less than the link carries, and its longest stall is a sleep instead of the final
//!   copy of its working set. A final copy shorter than a sleep stays a stop-and-copy
//!   (throttling would stall the guest longer than the pause it saves). The throttle
//!   goes straight to its level: on a plateau each step of a gentler ladder (QEMU's
//!   auto-converge: 20 %, +10 % per round) costs a whole working set's round. The host
//!   lifts it when the migration ends, whatever its end.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spanvmm_sdk::migration::{self as mig, Phase, SwitchMode};
use spanvmm_sdk::{host, LogLevel};

/// The attach configuration's fields, each overriding the mode's default.
pub type Overrides = Map<String, Value>;

/// Which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Iterative pre-copy, stop-and-copy.
    #[default]
    Precopy,
    /// Post-copy at once, adaptive pre-paging.
    Postcopy,
    /// Bounded pre-copy, then post-copy.
    Hybrid,
}

/// Attach configuration (JSON; every field optional).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Hand over when the remaining pages would take at most this long to send.
    pub downtime_ms: f64,
    /// Hand over when at most this many pages remain dirty.
    pub min_pages: u64,
    /// Hand over once this many bytes went out (0: no limit).
    pub max_bytes: u64,
    /// Hand over after this many rounds without a new smallest dirty set (by more than a
    /// tenth).
    pub stall_rounds: u32,
    /// Smallest and largest pre-paging window, pages.
    pub prepage_min: u64,
    /// Largest pre-paging window, pages.
    pub prepage_max: u64,
    /// CloudNet's content-based redundancy elimination.
    pub redundancy: bool,
    /// CloudNet's page deltas.
    pub deltas: bool,
    /// Size of the redundancy cache (and of the delta page cache), MiB.
    pub cache_mb: u64,
    /// Blocks per page for redundancy elimination.
    pub blocks: u32,
    /// Pre-copy that does not converge: a stop-and-copy expected to pause the guest longer
    /// than this switches to post-copy instead (0: always stop and copy).
    pub max_pause_ms: f64,
    /// CloudNet's Smart Stop-and-Copy.
    pub smart_stop: bool,
    /// Rounds Smart Stop compares the remaining dirty set with.
    pub smart_window: u32,
    /// Pre-copy: harvest the dirty log this often while a round's pages are queued, ms (0:
    /// only at each round's end). The host leaves out of a harvest the pages still queued
    /// (they go with those writes), so a page dirtied before its turn goes once, not again
    /// in the next round.
    pub harvest_ms: f64,
    /// Throttle the guest to this percent of the time asleep (0: never, at most 99) rather
    /// than stop with a final copy longer than one of its sleeps.
    pub converge_throttle: u32,
}

impl Config {
    fn for_mode(mode: Mode) -> Self {
        Config {
            max_rounds: if mode == Mode::Hybrid { 2 } else { 30 },
            downtime_ms: 2.0,
            min_pages: 64,
            max_bytes: 0,
            stall_rounds: 3,
            prepage_min: 8,
            prepage_max: 256,
            redundancy: false,
            deltas: false,
            cache_mb: 100,
            blocks: 4,
            max_pause_ms: 100.0,
            smart_stop: false,
            smart_window: 3,
            converge_throttle: 0,
            harvest_ms: 25.0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::for_mode(Mode::Precopy)
    }
}

/// The policy's state.
#[derive(Default)]
pub struct Policy {
    mode: Mode,
    cfg: Config,
    round: u32,
    started: bool,
    switched: bool,
    best: u64,
    no_progress: u32,
    /// The fastest the pages have gone out so far (bytes/s, 0 until the host has measured
    /// one): what a stop-and-copy gets. The last window's rate is no measure of the link once
    /// small rounds leave it idle between ticks.
    peak_rate: u64,
    last_fault: Option<u64>,
    window: u64,
    pages: u64,
    /// Pages queued for the round going out (Smart Stop's "sent").
    round_pages: u64,
    /// Smart Stop: the crossover was seen; searching for a local minimum.
    searching: bool,
    /// Smart Stop: the remaining dirty sets of the last rounds.
    recent: std::collections::VecDeque<u64>,
    /// The guest was throttled to converge.
    throttled: bool,
    /// Pages the harvests during the round found dirty and already sent: the next round's,
    /// with the harvest at its end.
    dirtied_in_round: Vec<u64>,
    /// When the dirty log was last harvested (`host::now_ns`).
    harvested_ns: u64,
}

fn info(msg: &str) {
    host::log(LogLevel::Info, msg);
}

impl Policy {
    /// Starts with the attach configuration: the fields given override the mode's defaults.
    pub fn attach(&mut self, mode: Mode, given: Option<Overrides>) -> Result<(), String> {
        let mut cfg = Config::for_mode(mode);
        if let Some(given) = given {
            let mut base = serde_json::to_value(&cfg).expect("plain values");
            if let Some(b) = base.as_object_mut() {
                b.extend(given);
            }
            cfg = serde_json::from_value(base).map_err(|e| format!("config: {e}"))?;
        }
        if cfg.prepage_min == 0 || cfg.prepage_max < cfg.prepage_min {
            return Err("config: need 0 < prepage_min <= prepage_max".into());
        }
        if ![1, 2, 4, 8, 16].contains(&cfg.blocks) || cfg.cache_mb == 0 || cfg.cache_mb > 1024 {
            return Err("config: need blocks in 1, 2, 4, 8, 16 and cache_mb in 1..=1024".into());
        }
        if cfg.max_pause_ms.is_nan() || cfg.max_pause_ms < 0.0 {
            return Err("config: need max_pause_ms >= 0".into());
        }
        if cfg.smart_window == 0 {
            return Err("config: need smart_window >= 1".into());
        }
        if cfg.converge_throttle > 99 {
            return Err("config: need converge_throttle in 0..=99".into());
        }
        if cfg.harvest_ms.is_nan() || cfg.harvest_ms < 0.0 {
            return Err("config: need harvest_ms >= 0".into());
        }
        self.mode = mode;
        self.window = cfg.prepage_min;
        self.cfg = cfg;
        self.pages = host::vm_info().mem_bytes / 4096;
        self.best = u64::MAX;
        Ok(())
    }

    /// One tick: look at the progress, queue, hand over.
    pub fn tick(&mut self) -> Result<(), String> {
        // No migration (attached with `run --plugin`, waiting for `ctl migrate`): start afresh
        // with the next one.
        let Ok(p) = mig::progress() else {
            if self.started {
                self.restart();
            }
            return Ok(());
        };
        match p.phase {
            Phase::Completed | Phase::Failed => return Ok(()),
            Phase::Postcopy | Phase::Recovering => return self.prepage(),
            Phase::Precopy => {}
        }
        if self.switched {
            return Ok(());
        }
        if !self.started {
            self.started = true;
            if self.mode == Mode::Postcopy {
                self.switched = true;
                info("post-copy: handing over at once");
                return mig::switch_over(SwitchMode::Postcopy);
            }
            if self.cfg.redundancy || self.cfg.deltas {
                mig::set_encoding(mig::Encoding {
                    redundancy: self.cfg.redundancy,
                    deltas: self.cfg.deltas,
                    cache_bytes: self.cfg.cache_mb << 20,
                    blocks: self.cfg.blocks,
                })?;
            }
            self.harvest()?; // from here on, the dirty log counts against round 1
            self.dirtied_in_round.clear();
            self.round = 1;
            self.round_pages = self.pages;
            return mig::queue_range(0, self.pages, false, 1);
        }
        self.peak_rate = self.peak_rate.max(p.rate_bytes_per_sec);
        if p.pages_pending > 0 {
            // The round's pages are still queued on the path.
            let every_ns = (self.cfg.harvest_ms * 1e6) as u64;
            if every_ns > 0 && host::now_ns().saturating_sub(self.harvested_ns) >= every_ns {
                let dirty = self.harvest()?;
                or_into(&mut self.dirtied_in_round, &dirty);
            }
            return Ok(());
        }
        let mut dirty = self.harvest()?;
        or_into(&mut dirty, &std::mem::take(&mut self.dirtied_in_round));
        let remaining: u64 = dirty.iter().map(|w| w.count_ones() as u64).sum();
        let rate = self.peak_rate.max(1) as f64;
        let est_ms = remaining as f64 * 4096.0 * 1e3 / rate;
        // A new smallest set by more than a tenth: on a plateau the working set's count
        // wobbles, which is no progress. By a page or two with harvests at the rounds' ends
        // only (2 053, 2 052, 2 053: it kept `zero`'s rounds going 3 more times, 78 MB
        // instead of 53, when 1 % counted); by up to 7 % with the mid-round harvests, which
        // leave out the pages the guest last wrote before their turn (2 050, 2 053, 2 021,
        // 1 921, 1 913: 7 rounds instead of 4 at 1 %). A converging set shrinks by a third a
        // round.
        if remaining * 10 < self.best.saturating_mul(9) {
            self.best = remaining;
            self.no_progress = 0;
        } else {
            self.no_progress += 1;
        }
        let smart = self.smart_stop(remaining);
        let c = self.cfg.clone(); // once a round; `throttle` below needs `self`
        let converged = remaining <= c.min_pages || est_ms <= c.downtime_ms;
        let rule = if converged {
            Some("converged")
        } else if smart {
            Some("smart stop: a local minimum of the dirty set after the crossover")
        } else if self.no_progress >= c.stall_rounds {
            Some("not converging (dirty rate above the link's)")
        } else {
            None
        };
        let limit = if self.round >= c.max_rounds {
            Some("round limit")
        } else if c.max_bytes > 0 && p.bytes_sent >= c.max_bytes {
            Some("bytes limit")
        } else {
            None
        };
        // A rule (not a limit) that would end the rounds with a final copy longer than one of
        // the throttle's sleeps throttles the guest instead, once. As for `max_pause_ms`
        // below, no rate measured yet is no reason to think the copy long.
        let sleep_ms = mig::throttle_sleep_ms(c.converge_throttle);
        let throttle_now = rule.is_some()
            && limit.is_none()
            && self.mode == Mode::Precopy
            && c.converge_throttle > 0
            && !self.throttled
            && self.peak_rate > 0
            && est_ms > sleep_ms;
        if throttle_now {
            self.throttle(remaining, est_ms);
        }
        let stop = if throttle_now { None } else { rule.or(limit) };
        host::metric("round", self.round as f64);
        host::metric("remaining_pages", remaining as f64);
        let Some(why) = stop else {
            self.round += 1;
            self.round_pages = remaining;
            mig::queue_pages(&dirty, self.round)?;
            return Ok(());
        };
        // Whatever stopped the rounds (Smart Stop included: it says when, not how), a final
        // copy that would pause long goes post-copy instead; `max_pause_ms: 0` keeps the
        // stop-and-copy, as CloudNet's Xen did. No rate measured yet (the host's first window
        // is 0.2 s; a fast link may be done sooner) is no reason to think the pause long.
        let long_pause = c.max_pause_ms > 0.0 && self.peak_rate > 0 && est_ms > c.max_pause_ms;
        let mode = if !converged && (self.mode == Mode::Hybrid || long_pause) {
            SwitchMode::Postcopy
        } else {
            SwitchMode::StopAndCopy
        };
        info(&format!(
            "round {}: {remaining} pages dirty (~{est_ms:.1} ms at {:.0} MB/s): {why}, {mode:?}",
            self.round,
            rate / 1e6
        ));
        // Sent while the guest still runs (post-copy: pushed first after the hand-over); the
        // switch-over adds what the guest dirties meanwhile.
        mig::queue_pages(&dirty, 0)?;
        self.switched = true;
        mig::switch_over(mode)
    }

    /// The pages dirtied since the last harvest and not queued (see `harvest_ms`).
    fn harvest(&mut self) -> Result<Vec<u64>, String> {
        self.harvested_ns = host::now_ns();
        mig::harvest_dirty()
    }

    /// The round would stop with a final copy longer than a throttle's sleep: the guest is
    /// throttled and the rounds go on, their stop rules counting afresh.
    fn throttle(&mut self, remaining: u64, est_ms: f64) {
        let percent = self.cfg.converge_throttle;
        info(&format!(
            "round {}: {remaining} pages dirty (~{est_ms:.1} ms): throttling the guest to {percent} %",
            self.round
        ));
        // Refused (the migration moved on meanwhile), the rounds go on unthrottled and a
        // stop rule ends them.
        match mig::throttle_vcpus(percent) {
            Ok(()) => host::metric("throttle_percent", percent as f64),
            Err(e) => host::log(LogLevel::Warn, &format!("throttle-vcpus: {e}")),
        }
        self.throttled = true;
        self.best = remaining;
        self.no_progress = 0;
        self.searching = false;
        self.recent.clear();
    }

    /// Smart Stop's rule, at the end of a round that sent `round_pages` while the guest
    /// dirtied `remaining`: true at a local minimum after the crossover.
    fn smart_stop(&mut self, remaining: u64) -> bool {
        if !self.cfg.smart_stop {
            return false;
        }
        // The crossover: the round left as many pages dirty as it sent, or nearly (it shrank
        // the set by less than a tenth: a working set rewritten as fast as the link drains
        // it wobbles by a page or two around the round's size). A round ends when its pages
        // have left the path's bottleneck (the host's `pages-pending`), so its count is what
        // the guest dirtied while it went through (docs/migration-wire.md).
        if !self.searching && remaining * 10 >= self.round_pages * 9 {
            self.searching = true;
            info(&format!(
                "smart stop: round {} left {remaining} pages dirty, sent {}: searching for a \
                 local minimum",
                self.round, self.round_pages
            ));
        }
        // A local minimum: no more than any of the last rounds, within 1 %. On a plateau (a
        // working set rewritten faster than the link drains it) that is its first round: a
        // round more sends the same pages again and leaves as many. Or past one: the set
        // grew by more than 1 % since the last round (a plateau's set rises while the
        // mid-round harvests leave out fewer of its pages each round: 1 852, 1 900, 1 954,
        // 2 050 ran on to the stall rule, 8 rounds and 47 MB for `zero` against 6 and 29).
        let stop = self.searching
            && !self.recent.is_empty()
            && (self.recent.iter().all(|&r| remaining * 100 <= r * 101)
                || self
                    .recent
                    .back()
                    .is_some_and(|&r| remaining * 100 > r * 101));
        self.recent.push_back(remaining);
        if self.recent.len() > self.cfg.smart_window as usize {
            self.recent.pop_front();
        }
        host::metric("smart_stop_searching", self.searching as u8 as f64);
        stop
    }

    fn restart(&mut self) {
        self.dirtied_in_round.clear();
        self.throttled = false;
        self.searching = false;
        self.recent.clear();
        self.round = 0;
        self.started = false;
        self.switched = false;
        self.best = u64::MAX;
        self.no_progress = 0;
        self.last_fault = None;
        self.window = self.cfg.prepage_min;
    }

    /// Post-copy: queue the neighbourhood of each new fault ahead of the background push.
    fn prepage(&mut self) -> Result<(), String> {
        for f in mig::take_faults() {
            let near = self
                .last_fault
                .is_some_and(|l| f.abs_diff(l) <= 2 * self.window);
            self.window = if near {
                (self.window * 2).min(self.cfg.prepage_max)
            } else {
                (self.window / 2).max(self.cfg.prepage_min)
            };
            self.last_fault = Some(f);
            let first = f + 1;
            if first < self.pages {
                let n = self.window.min(self.pages - first);
                mig::queue_range(first, n, true, 0)?;
            }
        }
        host::metric("prepage_window", self.window as f64);
        Ok(())
    }
}

/// Defines a service type named `$ty` with manifest name `$name` running `$mode`.
#[macro_export]
macro_rules! migration_service {
    ($ty:ident, $name:literal, $mode:expr, $caps:expr) => {
        #[derive(Default)]
        struct $ty($crate::Policy);

        #[spanvmm_sdk::service]
        impl spanvmm_sdk::Service for $ty {
            fn manifest() -> spanvmm_sdk::Manifest {
                spanvmm_sdk::Manifest::new($name, env!("CARGO_PKG_VERSION"))
                    .events(&[spanvmm_sdk::EventKind::Tick])
                    .capabilities($caps)
                    .tick_every_ms(5)
            }

            fn attach(&mut self, cfg: Option<$crate::Overrides>) -> Result<(), String> {
                self.0.attach($mode, cfg)
            }

            fn on_event(&mut self, ev: spanvmm_sdk::Event) -> spanvmm_sdk::EventReply {
                if let spanvmm_sdk::Event::Tick { .. } = ev {
                    if let Err(e) = self.0.tick() {
                        spanvmm_sdk::host::log(spanvmm_sdk::LogLevel::Warn, &e);
                    }
                }
                spanvmm_sdk::EventReply::None
            }
        }
    };
}

fn or_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= s;
    }
}
