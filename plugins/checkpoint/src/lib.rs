//! checkpoint: the policy of snapshots; the host's snapshot engine writes the bytes.
//!
//! Methods (JSON):
//! - `create {"dir", "parent"?, "live"?, "key_file"?, "expires_in_s"?, "max_rounds"?,
//!   "stop_pages"?}` starts a layer: full, or incremental on top of `parent` (which must be
//!   the last layer this service committed: it knows the pages dirtied since only then).
//!   Stop-the-world: pause, queue the pages, commit, resume when the state file is written.
//!   Live: queue the pages while the guest runs, then on each tick, once the previous round is
//!   written, queue the pages dirtied meanwhile; when few are left (`stop_pages`, default 512)
//!   or after `max_rounds` (default 30), pause, queue the last ones, commit, resume.
//! - `status` → `{"phase": "idle"|"rounds"|"final"|"done"|"failed", "dir", "layer_id",
//!   "rounds", "bytes_written", "pause_ms", "total_ms", "last_round_pages", "error"}`;
//!   `pause_ms` is how long this service kept the guest paused.
//!
//! - `periodic {"dir", "key_file"?, "target_pages"?}` keeps writing live layers in the
//!   background, `DIR/layer-0000` (full) then incremental ones on top, at an interval adapted
//!   to the dirty rate: the next layer is due when about `target_pages` (default 4096) pages
//!   are expected dirty again, between 100 ms and 10 s. Retention (`keep`, default and most
//!   32): once the chain has more than `keep` layers, the host merges it into one full layer
//!   (`DIR/merged-NNNN`, read from the layers, not from the guest) in the background; the next
//!   layer builds on the merged one and the superseded layers are removed, so the chain and
//!   the directory stay bounded.
//! - `evict {"dir", "key_file"?}` stops the periodic layers and writes a stop-the-world layer
//!   into `dir`: incremental on the last periodic layer (only the pages dirtied since), or
//!   full when there is none. The caller stops the VM once `status` says done.
//!
//! Everything long runs on the host's writer thread; each call here only queues or polls.

use serde::Deserialize;
use serde_json::{json, Value};
use spanvmm_sdk::snapshot::{self, LayerOptions};
use spanvmm_sdk::{host, Capability, Event, EventReply, Manifest, Service};

const DEFAULT_STOP_PAGES: u64 = 512;
const DEFAULT_MAX_ROUNDS: u32 = 30;
const DEFAULT_TARGET_PAGES: u64 = 4096;
const MIN_INTERVAL_MS: u64 = 100;
const DEFAULT_KEEP: u32 = 32;
/// Restore reads every layer of a chain (the store takes at most 64).
const MAX_KEEP: u32 = 32;
const MAX_INTERVAL_MS: u64 = 10_000;

#[derive(Deserialize)]
struct PeriodicArgs {
    dir: String,
    #[serde(default)]
    key_file: Option<String>,
    #[serde(default)]
    target_pages: Option<u64>,
    #[serde(default)]
    keep: Option<u32>,
}

/// Background layers for quick eviction.
struct Periodic {
    dir: String,
    key_file: Option<String>,
    target_pages: u64,
    /// Most layers in the chain before it is merged.
    keep: u32,
    /// The current chain, base first.
    chain: Vec<String>,
    /// Chains merged so far.
    merges: u32,
    layers: u32,
    next_at_ns: u64,
    interval_ms: u64,
    /// When the previous periodic layer started, to measure the dirty rate.
    prev_start_ns: u64,
}

#[derive(Deserialize)]
struct EvictArgs {
    dir: String,
    #[serde(default)]
    key_file: Option<String>,
}

#[derive(Deserialize, Default)]
struct CreateArgs {
    dir: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    live: bool,
    #[serde(default)]
    key_file: Option<String>,
    #[serde(default)]
    expires_in_s: Option<u64>,
    #[serde(default)]
    max_rounds: Option<u32>,
    #[serde(default)]
    stop_pages: Option<u64>,
    /// Leave the guest paused afterwards (eviction: the VM stops next).
    #[serde(default)]
    stay_paused: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Live rounds while the guest runs.
    Rounds,
    /// Paused: the last pages and the state file are being written.
    Final,
    Done,
    Failed,
}

struct Op {
    job: u32,
    dir: String,
    phase: Phase,
    rounds: u32,
    max_rounds: u32,
    stop_pages: u64,
    started_ns: u64,
    paused_at_ns: Option<u64>,
    pause_ms: f64,
    total_ms: f64,
    last_round_pages: u64,
    layer_id: String,
    bytes_written: u64,
    error: Option<String>,
    stay_paused: bool,
    /// A periodic layer (its commit extends the periodic chain).
    periodic: bool,
}

/// A merge of the periodic chain in flight on the host.
struct Merge {
    job: u32,
    out: String,
    /// The layers the merged one replaces.
    chain: Vec<String>,
}

#[derive(Default)]
struct Checkpoint {
    op: Option<Op>,
    periodic: Option<Periodic>,
    merge: Option<Merge>,
    /// The last layer this service committed: pages dirtied since are in `dirty`.
    last_layer: Option<String>,
    dirty: Vec<u64>,
}

fn or_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| w.count_ones() as u64).sum()
}

impl Checkpoint {
    /// Collects the pages dirtied since the previous look.
    fn harvest(&mut self) -> Result<(), String> {
        let fresh = host::dirty_bitmap()?;
        or_into(&mut self.dirty, &fresh);
        Ok(())
    }

    /// Hands the dirty pages collected so far to the engine (nothing when there are none).
    fn queue_dirty(&mut self, job: u32) -> Result<u64, String> {
        let bits = std::mem::take(&mut self.dirty);
        let n = count(&bits);
        if n > 0 {
            snapshot::write_pages(job, &bits)?;
        }
        Ok(n)
    }

    fn first_round(&mut self, op: &mut Op, full: bool) -> Result<(), String> {
        op.last_round_pages = if full {
            snapshot::write_pages(op.job, &[])?;
            host::vm_info().mem_bytes / 4096
        } else {
            self.queue_dirty(op.job)?
        };
        op.rounds = 1;
        Ok(())
    }

    /// Pauses, queues what is left and the commit.
    fn stop_and_commit(&mut self, op: &mut Op, full: bool) -> Result<(), String> {
        host::pause()?;
        op.paused_at_ns = Some(host::now_ns());
        self.harvest()?;
        if full && op.rounds == 0 {
            self.dirty.clear();
            snapshot::write_pages(op.job, &[])?;
            op.last_round_pages = host::vm_info().mem_bytes / 4096;
        } else {
            op.last_round_pages = self.queue_dirty(op.job)?;
        }
        op.rounds += 1;
        snapshot::commit(op.job)?;
        op.phase = Phase::Final;
        Ok(())
    }

    fn fail(&mut self, e: String) {
        if let Some(op) = self.op.as_mut() {
            if op.paused_at_ns.is_some() && op.pause_ms == 0.0 {
                let _ = host::resume();
            }
            snapshot::close(op.job);
            op.phase = Phase::Failed;
            op.error = Some(e);
        }
        // Periodic layers build on each other: a failed one ends the series.
        self.periodic = None;
    }

    fn busy(&self) -> bool {
        self.op
            .as_ref()
            .is_some_and(|op| matches!(op.phase, Phase::Rounds | Phase::Final))
    }

    fn tick(&mut self) -> Result<(), String> {
        if let Some(mut op) = self.op.take() {
            let r = self.step(&mut op);
            self.op = Some(op);
            r?;
        }
        self.merge_tick()?;
        self.periodic_tick()
    }

    /// After a periodic layer: merges the chain once it holds more than `keep` layers.
    fn extend_chain(&mut self, layer: &str) -> Result<(), String> {
        let Some(p) = self.periodic.as_mut() else {
            return Ok(());
        };
        p.chain.push(layer.to_string());
        if p.chain.len() as u32 <= p.keep || self.merge.is_some() {
            return Ok(());
        }
        let out = format!("{}/merged-{:04}", p.dir, p.layers - 1);
        let job = snapshot::merge(layer, &out, p.key_file.as_deref())?;
        self.merge = Some(Merge {
            job,
            out,
            chain: p.chain.clone(),
        });
        Ok(())
    }

    /// A finished merge: the next layer builds on the merged one (same contents as the
    /// chain's top), and the layers it replaces go. After an eviction meanwhile the eviction
    /// builds on the old chain instead, and the merged layer goes.
    fn merge_tick(&mut self) -> Result<(), String> {
        let Some(m) = &self.merge else {
            return Ok(());
        };
        let st = snapshot::status(m.job)?;
        if st.error.is_none() && !st.committed {
            return Ok(());
        }
        let m = self.merge.take().expect("checked above");
        snapshot::close(m.job);
        if let Some(e) = st.error {
            return Err(format!("merging the periodic chain into {}: {e}", m.out));
        }
        let adopt = self.periodic.is_some()
            && self.last_layer.as_deref() == m.chain.last().map(String::as_str);
        if !adopt {
            return snapshot::remove(&m.out);
        }
        let p = self.periodic.as_mut().expect("checked above");
        p.chain = vec![m.out.clone()];
        p.merges += 1;
        self.last_layer = Some(m.out);
        host::metric("periodic_merges", p.merges as f64);
        for d in &m.chain {
            snapshot::remove(d)?;
        }
        Ok(())
    }

    /// Starts the next periodic layer when it is due.
    fn periodic_tick(&mut self) -> Result<(), String> {
        let now = host::now_ns();
        let due = match &self.periodic {
            // A merge in flight decides the next layer's parent: wait for it.
            Some(p) => now >= p.next_at_ns && !self.busy() && self.merge.is_none(),
            None => false,
        };
        if !due {
            return Ok(());
        }
        let p = self.periodic.as_mut().expect("checked above");
        let parent = p.chain.last().cloned();
        let dir = format!("{}/layer-{:04}", p.dir, p.layers);
        let args = CreateArgs {
            dir,
            parent,
            live: true,
            key_file: p.key_file.clone(),
            ..Default::default()
        };
        p.prev_start_ns = now;
        p.layers += 1;
        if let Err(e) = self.create(args) {
            // Another operation owns the VM (a migration, a live update): this layer waits
            // for the next interval; the series goes on from the same parent.
            if e.contains("is in progress") {
                let p = self.periodic.as_mut().expect("checked above");
                p.layers -= 1;
                p.next_at_ns = now + p.interval_ms * 1_000_000;
                host::log(
                    spanvmm_sdk::LogLevel::Info,
                    &format!("periodic layer postponed: {e}"),
                );
                return Ok(());
            }
            return Err(e);
        }
        if let Some(op) = self.op.as_mut() {
            op.periodic = true;
        }
        Ok(())
    }

    /// After a periodic layer: the next one is due when about `target_pages` are dirty again.
    fn schedule_next(&mut self, layer_pages: u64) {
        let Some(p) = self.periodic.as_mut() else {
            return;
        };
        let now = host::now_ns();
        let secs = ((now - p.prev_start_ns) as f64 / 1e9).max(1e-3);
        let rate = layer_pages as f64 / secs;
        p.interval_ms = if rate <= 0.0 {
            MAX_INTERVAL_MS
        } else {
            ((p.target_pages as f64 / rate) * 1e3) as u64
        }
        .clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
        p.next_at_ns = now + p.interval_ms * 1_000_000;
        host::metric("periodic_interval_ms", p.interval_ms as f64);
        host::metric("periodic_layers", p.layers as f64);
    }

    fn step(&mut self, op: &mut Op) -> Result<(), String> {
        if !matches!(op.phase, Phase::Rounds | Phase::Final) {
            return Ok(());
        }
        let st = snapshot::status(op.job)?;
        op.layer_id = st.layer_id.clone();
        op.bytes_written = st.bytes_written;
        if let Some(e) = st.error {
            return Err(e);
        }
        match op.phase {
            Phase::Rounds if st.pending == 0 => {
                self.harvest()?;
                let left = count(&self.dirty);
                if left <= op.stop_pages || op.rounds >= op.max_rounds {
                    self.stop_and_commit(op, false)?;
                } else {
                    op.last_round_pages = self.queue_dirty(op.job)?;
                    op.rounds += 1;
                }
            }
            Phase::Final => {
                // The guest runs again as soon as its pages are copied; the state file and
                // the flush follow while it runs.
                if st.copied && op.paused_at_ns.is_some() && op.pause_ms == 0.0 {
                    if !op.stay_paused {
                        host::resume()?;
                    }
                    let now = host::now_ns();
                    op.pause_ms = op
                        .paused_at_ns
                        .map(|t| (now - t) as f64 / 1e6)
                        .unwrap_or(0.0)
                        .max(1e-6);
                }
                if st.committed {
                    op.total_ms = (host::now_ns() - op.started_ns) as f64 / 1e6;
                    op.phase = Phase::Done;
                    snapshot::close(op.job);
                    self.last_layer = Some(op.dir.clone());
                    if op.periodic {
                        self.extend_chain(&op.dir)?;
                    }
                    self.schedule_next(st.bytes_written / 4096);
                    host::metric("last_pause_ms", op.pause_ms);
                    host::notify(
                        "snapshot-done",
                        &json!({"dir": op.dir, "pause_ms": op.pause_ms, "rounds": op.rounds})
                            .to_string(),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[spanvmm_sdk::service]
impl Service for Checkpoint {
    fn manifest() -> Manifest {
        Manifest::new("checkpoint", env!("CARGO_PKG_VERSION"))
            .capabilities(&[
                Capability::PauseResume,
                Capability::DirtyLog,
                Capability::Snapshot,
            ])
            .tick_every_ms(2)
    }

    fn attach(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::Tick { .. } = event {
            if let Err(e) = self.tick() {
                host::log(
                    spanvmm_sdk::LogLevel::Error,
                    &format!("snapshot failed: {e}"),
                );
                self.fail(e);
            }
        }
        EventReply::None
    }

    #[method]
    fn create(&mut self, a: CreateArgs) -> Result<Value, String> {
        if let Some(op) = &self.op {
            if matches!(op.phase, Phase::Rounds | Phase::Final) {
                return Err(format!("a snapshot into {} is in progress", op.dir));
            }
        }
        if let Some(p) = &a.parent {
            if self.last_layer.as_deref() != Some(p.as_str()) {
                return Err(format!(
                    "incremental layer on {p}: this service has not tracked the guest since that \
                     layer (it tracks from the last layer it wrote, {}); take a full snapshot \
                     with --track first",
                    self.last_layer.as_deref().unwrap_or("none")
                ));
            }
        }
        self.harvest()?;
        let full = a.parent.is_none();
        if full {
            // A full layer writes every page; what was dirty before it does not matter.
            self.dirty.clear();
        }
        let job = snapshot::begin(&LayerOptions {
            dir: a.dir.clone(),
            parent: a.parent.clone(),
            key_file: a.key_file.clone(),
            expires_in_s: a.expires_in_s,
        })?;
        let now = host::now_ns();
        let mut op = Op {
            job,
            dir: a.dir.clone(),
            phase: Phase::Rounds,
            rounds: 0,
            max_rounds: a.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS).max(1),
            stop_pages: a.stop_pages.unwrap_or(DEFAULT_STOP_PAGES),
            started_ns: now,
            paused_at_ns: None,
            pause_ms: 0.0,
            total_ms: 0.0,
            last_round_pages: 0,
            layer_id: String::new(),
            bytes_written: 0,
            error: None,
            stay_paused: a.stay_paused,
            periodic: false,
        };
        let r = if a.live {
            self.first_round(&mut op, full)
        } else {
            self.stop_and_commit(&mut op, full)
        };
        if let Err(e) = r {
            snapshot::close(job);
            if op.paused_at_ns.is_some() {
                let _ = host::resume();
            }
            return Err(e);
        }
        self.last_layer = None;
        self.op = Some(op);
        Ok(json!({ "job": job, "dir": a.dir, "live": a.live }))
    }

    #[method]
    fn periodic(&mut self, a: PeriodicArgs) -> Result<Value, String> {
        if self.periodic.is_some() || self.busy() || self.merge.is_some() {
            return Err("periodic layers or a snapshot are running already".into());
        }
        self.periodic = Some(Periodic {
            dir: a.dir.clone(),
            key_file: a.key_file,
            target_pages: a.target_pages.unwrap_or(DEFAULT_TARGET_PAGES).max(1),
            keep: a.keep.unwrap_or(DEFAULT_KEEP).clamp(1, MAX_KEEP),
            chain: Vec::new(),
            merges: 0,
            layers: 0,
            next_at_ns: 0,
            interval_ms: 0,
            prev_start_ns: 0,
        });
        self.periodic_tick()?;
        Ok(json!({ "periodic": a.dir }))
    }

    #[method]
    fn evict(&mut self, a: EvictArgs) -> Result<Value, String> {
        if self.busy() {
            // A periodic layer is being written: its pages count, let it finish.
            return Err("busy: a layer is being written; retry".into());
        }
        let parent = match self.periodic.take() {
            Some(_) => self.last_layer.clone(),
            None => None,
        };
        self.create(CreateArgs {
            dir: a.dir,
            parent,
            key_file: a.key_file,
            stay_paused: true,
            ..Default::default()
        })
    }

    #[method]
    fn status(&self) -> Value {
        let periodic = self.periodic.as_ref().map(|p| {
            json!({"dir": p.dir, "layers": p.layers, "interval_ms": p.interval_ms,
                       "chain": p.chain.len(), "keep": p.keep, "merges": p.merges,
                       "merging": self.merge.is_some()})
        });
        let Some(op) = &self.op else {
            return json!({ "phase": "idle", "last_layer": self.last_layer, "periodic": periodic });
        };
        let phase = match op.phase {
            Phase::Rounds => "rounds",
            Phase::Final => "final",
            Phase::Done => "done",
            Phase::Failed => "failed",
        };
        json!({
            "phase": phase,
            "dir": op.dir,
            "layer_id": op.layer_id,
            "rounds": op.rounds,
            "bytes_written": op.bytes_written,
            "pause_ms": op.pause_ms,
            "total_ms": op.total_ms,
            "last_round_pages": op.last_round_pages,
            "error": op.error,
            "periodic": periodic,
        })
    }
}
