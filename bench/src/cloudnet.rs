//! `spanvmm-bench cloudnet`: the CloudNet paper's memory experiments (Wood et al., Tables I/II,
//! Figs. 12–15) on network-namespace hosts joined by a tbf-shaped link with netlab's delay
//! relay, spanvmm's pre-copy service with each CloudNet option (`redundancy`, `deltas`,
//! `smart_stop`) alone and together (`cloudnet`), the throttle beyond CloudNet
//! (`converge_throttle`) alone and with them (`all`), and QEMU on the same link in the same
//! run (pre-copy, XBZRLE with a cache as large as ours, multifd with zstd, XBZRLE with
//! auto-converge).
//!
//! Parts (`--parts`; `table1,storage` by default, `all` for every one):
//! - `table1`: 100 Mbit/s, 20 ms RTT; four workloads modelling the paper's applications;
//!   data sent, total time, pause time; the rounds interleaved, each figure the median of the
//!   runs with its spread. Its reports also give Table II (page deltas per round), Fig. 12
//!   (pages sent and final per round) and Fig. 13(a) (redundancy found per workload).
//! - `cache`: Fig. 13(b), redundancy found against the cache's size.
//! - `bandwidth`: Figs. 14/15, 50–1000 Mbit/s at 10 ms RTT, plain pre-copy against all
//!   optimizations.
//! - `storage`: a disk with a running `disk` workload moved with the VM, full and
//!   incremental, against QEMU's `blockdev-mirror` to an NBD export over the same link.
//!   `--disk-mib N` sets the disk alone (256 MiB by default, 4 GiB with `--full`); the
//!   images live on tmpfs up to 1 GiB, in /var/tmp above, and are removed at the end.
//!
//! `cache`, `bandwidth` and `storage` run once; `table1` `--runs` times (2 by default, 4
//! with `--full`). The default run takes ~15 min on two quiet cores (about 12.5 s a
//! migration: hosts set up, boot, transfer, the destination's memory check); `--parts all`
//! adds ~8 min.
//! "Data sent" is what the source host put on the shaped link (its tbf qdisc's byte count:
//! every packet of every connection, headers included), the same measure for both VMMs.
//!
//! Scale: the paper moves 1 GiB guests; at 100 Mbit/s that is ≥ 86 s per populated GiB and
//! migration, so by default each guest populates 32 MiB of 128 (1/28 of the paper's data)
//! and `--full` gives the paper's scale (1 GiB guests, 896 MiB populated, 4 GiB disk: hours). Dirty rates are absolute (pages/s against the same link), working sets scale with
//! the populated size, so the rounds keep their shape.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{stat, Stat};
use crate::migration::{qemu_migrate_guest, Guest, Link, Outcome, QemuEngine};
use crate::migration_spanvmm::spanvmm_migrate_guest;

/// What to run.
pub struct Config {
    pub spanvmm: PathBuf,
    pub plugins: PathBuf,
    pub elf: PathBuf,
    /// The paper's scale (1 GiB guests) instead of the reduced one.
    pub full: bool,
    /// Rounds of Table I (each row once per round, interleaved).
    pub runs: usize,
    /// `table1`, `cache`, `bandwidth`, `storage` (or `all`).
    pub parts: Vec<String>,
    /// Only these workloads / engines (by name), if given.
    pub workloads: Option<Vec<String>>,
    pub engines: Option<Vec<String>>,
    /// The storage part's disk, MiB (default 256, 4096 with `--full`); the guest stays small.
    pub disk_mib: Option<u64>,
    pub out: PathBuf,
}

/// Guest sizes and the cache.
#[derive(Serialize, Clone, Copy)]
struct Scale {
    /// Guest memory, MiB.
    memory_mib: u64,
    /// Memory the workload populates, MiB.
    populated_mib: u64,
    /// Redundancy (and delta page) cache, and QEMU's XBZRLE cache, MiB: the paper's 100 MB.
    cache_mib: u64,
}

impl Scale {
    fn new(full: bool) -> Self {
        if full {
            Scale {
                memory_mib: 1024,
                populated_mib: 896,
                cache_mib: 100,
            }
        } else {
            Scale {
                memory_mib: 128,
                populated_mib: 32,
                cache_mib: 100,
            }
        }
    }

    /// `repeated`'s distance between equal pages: a quarter of the populated memory, at most
    /// 64 MiB (within the default cache), in pages.
    fn repeat_pages(&self) -> u64 {
        (self.populated_mib / 4).clamp(1, 64) * 256
    }
}

/// The paper's applications as spanguest workloads: (name, what it models, command line).
fn workloads(s: &Scale) -> Vec<(&'static str, &'static str, String)> {
    let p = s.populated_mib;
    // Every guest verifies its memory every 2 s on its own, so the destination's check needs
    // no API (QEMU has none for the guest), and reports stalls above 1 ms.
    let base = format!("mib={p} stall_us=1000 report_ms=0 verify_ms=2000");
    let q = (p / 4).max(1);
    vec![
        (
            "partial",
            "TPC-W: a few bytes rewritten per page (delta-friendly), below the link's rate",
            format!("workload=dirty,verify wss={q} rate=2000 write=64 {base}"),
        ),
        (
            "repeated",
            "content repeated across pages (cache-friendly), whole pages rewritten",
            format!(
                "workload=dirty,verify repeat={} wss={q} rate=2000 {base}",
                s.repeat_pages()
            ),
        ),
        (
            "varying",
            "kernel compile: the dirty rate in 1 s phases of 1, 1/4, 2, 1/2 × 3000 pages/s \
             (around the link's ~3000)",
            format!(
                "workload=dirty,verify wss={} rate=3000 vary_ms=1000 {base}",
                (p / 2).max(1)
            ),
        ),
        (
            "zero",
            "SPECjbb: mostly zero memory, a small region rewritten faster than the link drains",
            format!("workload=zero,dirty,verify wss={q} rate=6000 {base}"),
        ),
        // Beyond the issue's four: the others rewrite their working set in page order, so a
        // round's pages are never written again before their turn (the writer is past
        // them), which leaves pre-copy's mid-round harvests nothing to leave out.
        (
            "scattered",
            "a heap or key-value store: whole pages rewritten all over the working set \
             (each 1031 pages on), below the link's rate",
            format!("workload=dirty,verify wss={q} rate=2000 stride=1031 {base}"),
        ),
    ]
}

/// Engines: spanvmm's pre-copy service with a configuration, or QEMU's.
#[derive(Clone)]
enum Engine {
    Spanvmm { config: String },
    Qemu(QemuEngine),
}

fn engines(s: &Scale) -> Vec<(&'static str, Engine)> {
    let c = s.cache_mib;
    // Every row ends in a stop-and-copy, as CloudNet's Xen and QEMU's rows here do: the
    // policy's hand-over to post-copy when the final copy would pause long (`max_pause_ms`)
    // is off, so that the pause is the final copy's, which the optimizations shrink.
    let cloudnet = format!(r#","redundancy":true,"deltas":true,"smart_stop":true,"cache_mb":{c}"#);
    let span = |options: &str| Engine::Spanvmm {
        config: format!(r#"{{"max_pause_ms":0{options}}}"#),
    };
    vec![
        ("precopy", span("")),
        // Pre-copy as before the mid-round harvests: the dirty log read at each round's end
        // only, so a page dirtied before its turn in a round goes again in the next.
        ("precopy-harvest-at-end", span(r#","harvest_ms":0"#)),
        (
            "redundancy",
            span(&format!(r#","redundancy":true,"cache_mb":{c}"#)),
        ),
        ("deltas", span(&format!(r#","deltas":true,"cache_mb":{c}"#))),
        ("smart-stop", span(r#","smart_stop":true"#)),
        // Beyond CloudNet: the last rounds made with the guest throttled, not paused.
        ("throttle", span(r#","converge_throttle":90"#)),
        // CloudNet's three together, as the paper's Table I "CloudNet" column.
        ("cloudnet", span(&cloudnet)),
        (
            "all",
            span(&format!(r#"{cloudnet},"converge_throttle":90"#)),
        ),
        ("qemu-precopy", Engine::Qemu(QemuEngine::PrecopyPrealloc)),
        ("qemu-xbzrle", Engine::Qemu(QemuEngine::Xbzrle(c))),
        ("qemu-multifd-zstd", Engine::Qemu(QemuEngine::MultifdZstd)),
        (
            "qemu-xbzrle-auto-converge",
            Engine::Qemu(QemuEngine::XbzrleAutoConverge(c)),
        ),
    ]
}

/// One migration, as the tables read it.
#[derive(Serialize)]
struct Run {
    part: &'static str,
    round: usize,
    workload: String,
    engine: String,
    link: String,
    completed: bool,
    verify_bad: Option<u64>,
    /// Bytes the source host sent on the shaped link during the migration (every packet,
    /// whichever VMM or connection: the same measure for both).
    bytes: u64,
    /// The VMM's own count (spanvmm: TLS records; QEMU: `ram.transferred`, plus the mirror's
    /// length in the storage part).
    vmm_bytes: u64,
    total_ms: u64,
    /// The VMM's pause time (spanvmm: source pause to destination running; QEMU's
    /// `downtime`), ms.
    pause_ms: f64,
    /// The destination guest's largest stall in the migration, µs.
    guest_stall_us: u64,
    /// Pre-copy rounds (QEMU: `dirty-sync-count`).
    rounds: u64,
    /// spanvmm's throttle: the highest level, percent of the vCPUs' time asleep, and their
    /// time asleep for it, ms (None for QEMU: its `cpu-throttle-percentage` is gone from the
    /// final `query-migrate`).
    throttle_pct: Option<u64>,
    throttled_ms: Option<f64>,
    /// spanvmm: pages queued per round; pages sent per round (the stop-and-copy last) and
    /// of those the pages never sent again (final).
    pages_per_round: Vec<u64>,
    sent_per_round: Vec<u64>,
    final_per_round: Vec<u64>,
    zero_pages: u64,
    pages_sent: u64,
    /// spanvmm: the `cnet` encoding's counters; QEMU XBZRLE: its cache's.
    encoding: Value,
    /// Storage: spanvmm's `disk` report, QEMU's mirror job.
    disk: Value,
    cache_mib: u64,
    note: String,
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn to_run(part: &'static str, round: usize, engine: &str, cache_mib: u64, o: Outcome) -> Run {
    let r = &o.report;
    let spanvmm = o.vmm == "spanvmm";
    Run {
        part,
        round,
        workload: o.workload.clone(),
        engine: engine.into(),
        link: o.link.clone(),
        completed: o.completed,
        verify_bad: o.verify_bad,
        bytes: o.link_bytes.unwrap_or(o.bytes),
        vmm_bytes: o.bytes,
        total_ms: o.total_ms,
        pause_ms: if spanvmm {
            r["downtime_ms"].as_f64().unwrap_or(0.0)
        } else {
            o.downtime_ms as f64
        },
        guest_stall_us: o.guest_stall_us,
        rounds: if spanvmm {
            r["rounds"].as_u64().unwrap_or(0)
        } else {
            r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0)
        },
        throttle_pct: spanvmm.then(|| r["vcpu_throttle_max"].as_u64().unwrap_or(0)),
        throttled_ms: spanvmm.then(|| r["vcpu_throttled_ms"].as_f64().unwrap_or(0.0)),
        pages_per_round: u64s(&r["pages_per_round"]),
        sent_per_round: u64s(&r["sent_per_round"]),
        final_per_round: u64s(&r["final_per_round"]),
        zero_pages: r["zero_pages"].as_u64().unwrap_or(0),
        pages_sent: r["pages_sent"].as_u64().unwrap_or(0),
        encoding: if spanvmm {
            r["encoding"].clone()
        } else {
            r["xbzrle-cache"].clone()
        },
        disk: if spanvmm {
            r["disk"].clone()
        } else {
            r["mirror"].clone()
        },
        cache_mib,
        note: o.note,
    }
}

struct Ctx<'a> {
    cfg: &'a Config,
    scale: Scale,
}

impl Ctx<'_> {
    /// One migration of `workload` (its command line `cmdline`) with `engine` over `link`.
    #[allow(clippy::too_many_arguments)]
    fn migrate(
        &self,
        part: &'static str,
        round: usize,
        workload: &str,
        cmdline: &str,
        name: &str,
        engine: &Engine,
        link: Link,
        cache_mib: u64,
    ) -> Run {
        let s = &self.scale;
        let mbit = match link {
            Link::Shaped { mbit, .. } => mbit,
            Link::Asymmetric {
                src_mbit, dst_mbit, ..
            } => src_mbit.min(dst_mbit),
            Link::Loopback => 10_000,
        };
        // Four times what the populated memory needs on the link, at least 30 s: a pre-copy
        // that has not converged by then will not (QEMU's has no stop rule of its own).
        let limit = Duration::from_secs((s.populated_mib * 8 * 4 / mbit).max(30));
        let guest = Guest { workload, cmdline };
        let (c, mem) = (self.cfg, s.memory_mib);
        let o = match engine {
            Engine::Spanvmm { config } => spanvmm_migrate_guest(
                &c.spanvmm, &c.plugins, &c.elf, mem, guest, "precopy", config, None, link, limit,
            ),
            Engine::Qemu(e) => qemu_migrate_guest(&c.elf, mem, guest, *e, link, limit, None),
        };
        let run = match o {
            Ok(o) => to_run(part, round, name, cache_mib, o),
            Err(e) => failed_run(part, round, workload, name, &link.label(), e),
        };
        eprintln!(
            "{part} #{round} {:>22} {workload:>8} {name:>17}: {} — {:.1} MB, {:.1} s, pause {:.1} ms, stall {:.1} ms, {} rounds, bad={:?} {}",
            run.link,
            if run.completed { "ok" } else { "FAILED" },
            run.bytes as f64 / 1e6,
            run.total_ms as f64 / 1e3,
            run.pause_ms,
            run.guest_stall_us as f64 / 1e3,
            run.rounds,
            run.verify_bad,
            if run.completed { "" } else { &run.note }
        );
        run
    }
}

/// A Table I row: one workload × engine over the runs that completed with `bad=0`.
#[derive(Serialize)]
struct Row {
    workload: String,
    engine: String,
    ok: usize,
    failed: usize,
    data_mb: Option<Stat>,
    total_s: Option<Stat>,
    pause_ms: Option<Stat>,
    guest_stall_ms: Option<Stat>,
    rounds: Option<Stat>,
}

fn good(r: &Run) -> bool {
    r.completed && r.verify_bad == Some(0)
}

fn row(runs: &[&Run], workload: &str, engine: &str) -> Row {
    let ok: Vec<&&Run> = runs.iter().filter(|r| good(r)).collect();
    let st = |f: &dyn Fn(&Run) -> f64| (!ok.is_empty()).then(|| stat(ok.iter().map(|r| f(r))));
    Row {
        workload: workload.into(),
        engine: engine.into(),
        ok: ok.len(),
        failed: runs.len() - ok.len(),
        data_mb: st(&|r| r.bytes as f64 / 1e6),
        total_s: st(&|r| r.total_ms as f64 / 1e3),
        pause_ms: st(&|r| r.pause_ms),
        guest_stall_ms: st(&|r| r.guest_stall_us as f64 / 1e3),
        rounds: st(&|r| r.rounds as f64),
    }
}

fn median_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| crate::harness::median(&mut v))
}

/// Reduction of `x` against `base`, percent (positive: smaller).
fn cut(base: Option<&Stat>, x: Option<&Stat>) -> Option<f64> {
    let (b, x) = (base?.median, x?.median);
    (b > 0.0).then(|| (1.0 - x / b) * 100.0)
}

/// Runs the parts asked for and writes the JSON and the SVG plots.
pub fn run(cfg: &Config) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(|e| anyhow::anyhow!("cloudnet needs netlab: {e}"))?;
    let scale = Scale::new(cfg.full);
    let ctx = Ctx { cfg, scale };
    let part = |p: &str| cfg.parts.iter().any(|x| x == p || x == "all");
    let all_w = workloads(&scale);
    let ws: Vec<_> = all_w
        .iter()
        .filter(|(n, ..)| {
            cfg.workloads
                .as_ref()
                .is_none_or(|w| w.iter().any(|x| x == n))
        })
        .collect();
    let all_e = engines(&scale);
    let es: Vec<_> = all_e
        .iter()
        .filter(|(n, _)| {
            cfg.engines
                .as_ref()
                .is_none_or(|e| e.iter().any(|x| x == n))
        })
        .collect();
    if part("table1") && (ws.is_empty() || es.is_empty()) {
        bail!(
            "no workload or engine left: workloads {:?}, engines {:?}",
            all_w.iter().map(|w| w.0).collect::<Vec<_>>(),
            all_e.iter().map(|e| e.0).collect::<Vec<_>>()
        );
    }
    let wan = Link::Shaped {
        mbit: 100,
        rtt_ms: 20,
    };
    let mut runs: Vec<Run> = Vec::new();
    let started = std::time::Instant::now();

    if part("table1") {
        for round in 0..cfg.runs {
            for (w, _, cl) in &ws {
                for (name, e) in &es {
                    runs.push(ctx.migrate("table1", round, w, cl, name, e, wan, scale.cache_mib));
                }
            }
        }
    }
    if part("cache") {
        // Fig. 13(b): the repeated workload's redundancy against the cache's size.
        let sizes: &[u64] = if cfg.full {
            &[10, 25, 50, 100, 200]
        } else {
            &[1, 2, 4, 8, 16, 32, 100]
        };
        let (w, _, cl) = all_w.iter().find(|w| w.0 == "repeated").expect("listed");
        for &mb in sizes {
            let e = Engine::Spanvmm {
                config: format!(r#"{{"redundancy":true,"cache_mb":{mb}}}"#),
            };
            runs.push(ctx.migrate("cache", 0, w, cl, "redundancy", &e, wan, mb));
        }
    }
    if part("bandwidth") {
        // Figs. 14/15: the paper's TPC-W and SPECjbb, default against all optimizations.
        for mbit in [50, 100, 250, 500, 1000] {
            let link = Link::Shaped { mbit, rtt_ms: 10 };
            for (w, _, cl) in all_w.iter().filter(|w| w.0 == "partial" || w.0 == "zero") {
                for (name, e) in all_e.iter().filter(|e| e.0 == "precopy" || e.0 == "all") {
                    runs.push(ctx.migrate("bandwidth", 0, w, cl, name, e, link, scale.cache_mib));
                }
            }
        }
    }

    if part("storage") {
        // `--engines` picks its rows too (spanvmm-full, spanvmm-incremental,
        // spanvmm-incremental-hashed, qemu-mirror-full, qemu-mirror-incremental).
        for round in 0..cfg.runs {
            match ctx.storage(round) {
                Ok(r) => runs.extend(r),
                Err(e) => eprintln!("storage: could not run: {e:#}"),
            }
        }
    }

    let report = summarize(cfg, &scale, &all_w, &runs, started.elapsed());
    std::fs::create_dir_all(cfg.out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&cfg.out, serde_json::to_string_pretty(&report)? + "\n")?;
    for (name, svg) in plots(&report) {
        let p = cfg.out.with_file_name(format!("cloudnet-{name}.svg"));
        std::fs::write(&p, svg)?;
        eprintln!("wrote {}", p.display());
    }
    eprintln!("wrote {}", cfg.out.display());
    Ok(())
}

fn summarize(
    cfg: &Config,
    scale: &Scale,
    all_w: &[(&str, &str, String)],
    runs: &[Run],
    took: Duration,
) -> Value {
    let t1: Vec<&Run> = runs.iter().filter(|r| r.part == "table1").collect();
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in &t1 {
        let k = (r.workload.clone(), r.engine.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let rows: Vec<Row> = keys
        .iter()
        .map(|(w, e)| {
            let rs: Vec<&Run> = t1
                .iter()
                .copied()
                .filter(|r| &r.workload == w && &r.engine == e)
                .collect();
            row(&rs, w, e)
        })
        .collect();
    let find = |w: &str, e: &str| rows.iter().find(|r| r.workload == w && r.engine == e);

    // Each optimization against plain pre-copy, per workload (the paper's Fig. 11).
    let mut reductions = Vec::new();
    for &(w, ..) in all_w {
        let Some(base) = find(w, "precopy") else {
            continue;
        };
        for e in [
            "precopy-harvest-at-end",
            "redundancy",
            "deltas",
            "smart-stop",
            "throttle",
            "cloudnet",
            "all",
        ] {
            let Some(x) = find(w, e) else { continue };
            let d = cut(base.data_mb.as_ref(), x.data_mb.as_ref());
            let t = cut(base.total_s.as_ref(), x.total_s.as_ref());
            let p = cut(base.pause_ms.as_ref(), x.pause_ms.as_ref());
            reductions.push(json!({
                "workload": w, "engine": e,
                "data_pct": d, "total_time_pct": t, "pause_pct": p,
            }));
        }
    }
    // The issue's goal, on its four workloads, against plain pre-copy as it is (mid-round
    // harvests) and as it was before them (harvests at the rounds' ends only, QEMU's way).
    let goal_against = |plain: &str| -> Option<bool> {
        let mut seen = false;
        let mut met = true;
        for &(w, ..) in all_w.iter().filter(|w| w.0 != "scattered") {
            let (Some(b), Some(x)) = (find(w, plain), find(w, "all")) else {
                continue;
            };
            seen = true;
            met &= cut(b.data_mb.as_ref(), x.data_mb.as_ref()).is_some_and(|d| d >= 30.0)
                && cut(b.total_s.as_ref(), x.total_s.as_ref()).is_some_and(|t| t >= 30.0)
                && cut(b.pause_ms.as_ref(), x.pause_ms.as_ref()).is_some_and(|p| p >= 40.0);
        }
        seen.then_some(met)
    };
    let xbzrle_goal = match (find("partial", "all"), find("partial", "qemu-xbzrle")) {
        (Some(a), Some(q)) => match (&a.data_mb, &q.data_mb) {
            (Some(a), Some(q)) => Some(a.median < q.median),
            (Some(_), None) => Some(true), // QEMU's did not complete
            _ => None,
        },
        _ => None,
    };

    // Table II: the deltas engine's data in round 1 and in the rounds after, and what the
    // deltas saved there (they cannot apply to round 1).
    let mut table2 = Vec::new();
    for &(w, ..) in all_w {
        let rs: Vec<&&Run> = t1
            .iter()
            .filter(|r| r.workload == w && r.engine == "deltas" && good(r))
            .collect();
        if rs.is_empty() {
            continue;
        }
        let per = |r: &Run| -> (f64, f64) {
            let pr = r.encoding["per_round"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let b = |x: &Value| x["bytes"].as_f64().unwrap_or(0.0);
            let first = pr.first().map(b).unwrap_or(0.0);
            let rest: f64 = pr.iter().skip(1).map(b).sum();
            (first / 1e6, rest / 1e6)
        };
        let saved = |r: &Run| r.encoding["delta_bytes_saved"].as_f64().unwrap_or(0.0) / 1e6;
        let first = median_of(rs.iter().map(|r| per(r).0));
        let rest = median_of(rs.iter().map(|r| per(r).1));
        let sv = median_of(rs.iter().map(|r| saved(r)));
        table2.push(json!({
            "workload": w,
            "iter1_mb": first,
            "iters2_mb": rest,
            "delta_savings_mb": sv,
            "iters2_without_deltas_mb": rest.zip(sv).map(|(a, b)| a + b),
            "rounds": median_of(rs.iter().map(|r| r.rounds as f64)),
        }));
    }

    // Fig. 12: pages sent and final per round, plain pre-copy and Smart Stop (first good run).
    let mut fig12 = Vec::new();
    for &(w, ..) in all_w {
        for e in ["precopy", "smart-stop"] {
            if let Some(r) = t1
                .iter()
                .find(|r| r.workload == w && r.engine == e && good(r))
            {
                fig12.push(json!({
                    "workload": w, "engine": e,
                    "pages_per_round": r.pages_per_round,
                    "sent_per_round": r.sent_per_round,
                    "final_per_round": r.final_per_round,
                }));
            }
        }
    }

    // Fig. 13(a): redundancy found per workload (redundancy engine): by the cache, and in zero
    // pages, as shares of the memory data sent.
    let share = |r: &Run| -> (f64, f64) {
        let e = &r.encoding;
        let data = (e["pages"].as_f64().unwrap_or(0.0) + r.zero_pages as f64) * 4096.0;
        if data == 0.0 {
            return (0.0, 0.0);
        }
        (
            e["cache_bytes_saved"].as_f64().unwrap_or(0.0) / data * 100.0,
            r.zero_pages as f64 * 4096.0 / data * 100.0,
        )
    };
    let mut fig13a = Vec::new();
    for &(w, ..) in all_w {
        let rs: Vec<&&Run> = t1
            .iter()
            .filter(|r| r.workload == w && r.engine == "redundancy" && good(r))
            .collect();
        if !rs.is_empty() {
            fig13a.push(json!({
                "workload": w,
                "cache_pct": median_of(rs.iter().map(|r| share(r).0)),
                "zero_pct": median_of(rs.iter().map(|r| share(r).1)),
            }));
        }
    }
    let fig13b: Vec<Value> = runs
        .iter()
        .filter(|r| r.part == "cache")
        .map(|r| {
            json!({
                "cache_mb": r.cache_mib, "ok": good(r),
                "cache_pct": share(r).0, "zero_pct": share(r).1,
                "data_mb": r.bytes as f64 / 1e6,
            })
        })
        .collect();
    let sweep: Vec<Value> = runs
        .iter()
        .filter(|r| r.part == "bandwidth")
        .map(|r| {
            json!({
                "link": r.link, "workload": r.workload, "engine": r.engine, "ok": good(r),
                "data_mb": r.bytes as f64 / 1e6, "total_s": r.total_ms as f64 / 1e3,
                "pause_ms": r.pause_ms,
            })
        })
        .collect();

    let storage: Vec<Value> = runs
        .iter()
        .filter(|r| r.part == "storage")
        .map(|r| {
            json!({
                "engine": r.engine, "ok": good(r),
                "link_mb": r.bytes as f64 / 1e6,
                "disk_mb": r.disk["bytes"].as_f64().or(r.disk["len"].as_f64()).map(|b| b / 1e6),
                "total_s": r.total_ms as f64 / 1e3,
                "pause_ms": r.pause_ms,
                "disk": r.disk,
            })
        })
        .collect();

    json!({
        "benchmark": "cloudnet",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "took_s": took.as_secs(),
        "scale": scale,
        "full": cfg.full,
        "runs": cfg.runs,
        "link": "100 Mbit/s (tbf), 20 ms RTT (delay relay); sweep: 10 ms RTT",
        "workloads": all_w.iter().map(|(n, like, cl)| json!({"name": n, "models": like, "cmdline": cl})).collect::<Vec<_>>(),
        "notes": "spanvmm: the precopy service over TLS 1.3 (AES-128-GCM), its destination prepared with --memory; QEMU: plain TCP, -mem-prealloc destination, max-bandwidth lifted, XBZRLE cache = our cache, multifd 4 channels zstd. Bytes: spanvmm's TLS records, QEMU's ram.transferred. Figures: median (min-max) of the runs that completed with verify bad=0.",
        "table1": rows,
        "reductions_vs_precopy": reductions,
        "goals": {
            "all_vs_precopy": "data and total time -30 % or better on every workload, pause -40 %",
            "all_vs_precopy_met": goal_against("precopy"),
            "all_vs_precopy_harvest_at_end_met": goal_against("precopy-harvest-at-end"),
            "partial_all_fewer_bytes_than_qemu_xbzrle": xbzrle_goal,
        },
        "table2": table2,
        "fig12": fig12,
        "fig13a": fig13a,
        "fig13b": fig13b,
        "fig14_15": sweep,
        "storage_scale": DiskScale::new(cfg.full, cfg.disk_mib),
        "storage": storage,
        "migrations": runs,
    })
}

/// The SVG plots: (name, document).
fn plots(r: &Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let rows = r["table1"].as_array().cloned().unwrap_or_default();
    let mut workloads: Vec<String> = Vec::new();
    let mut engines: Vec<String> = Vec::new();
    for x in &rows {
        let (w, e) = (x["workload"].as_str(), x["engine"].as_str());
        if let (Some(w), Some(e)) = (w, e) {
            if !workloads.iter().any(|y| y == w) {
                workloads.push(w.into());
            }
            if !engines.iter().any(|y| y == e) {
                engines.push(e.into());
            }
        }
    }
    for (name, key, title) in [
        ("data", "data_mb", "Data sent, MB (100 Mbit/s, 20 ms RTT)"),
        ("time", "total_s", "Total time, s"),
        ("pause", "pause_ms", "Pause time, ms"),
    ] {
        if rows.is_empty() {
            break;
        }
        let series: Vec<(String, Vec<Option<f64>>)> = engines
            .iter()
            .map(|e| {
                let v = workloads
                    .iter()
                    .map(|w| {
                        rows.iter()
                            .find(|x| x["workload"] == w.as_str() && x["engine"] == e.as_str())
                            .and_then(|x| x[key]["median"].as_f64())
                    })
                    .collect();
                (e.clone(), v)
            })
            .collect();
        out.push((name, bars(title, &workloads, &series)));
    }
    // Fig. 12: per round, plain pre-copy of the partial-write workload and Smart Stop's.
    for x in r["fig12"].as_array().into_iter().flatten() {
        if x["workload"] != "partial" {
            continue;
        }
        let mut sent = u64s(&x["sent_per_round"]);
        if sent.is_empty() {
            sent = u64s(&x["pages_per_round"]);
        }
        let fin = u64s(&x["final_per_round"]);
        if sent.is_empty() {
            continue;
        }
        // Past the service's rounds: the stop-and-copy.
        let rounds = u64s(&x["pages_per_round"]).len();
        let groups: Vec<String> = (1..=sent.len())
            .map(|i| {
                if i > rounds {
                    "stop".to_string()
                } else {
                    i.to_string()
                }
            })
            .collect();
        let mut series = vec![(
            "pages sent".to_string(),
            sent.iter().map(|&v| Some(v as f64)).collect(),
        )];
        if !fin.is_empty() {
            series.push((
                "of which final".to_string(),
                (0..sent.len())
                    .map(|i| fin.get(i).map(|&v| v as f64))
                    .collect(),
            ));
        }
        let name = if x["engine"] == "precopy" {
            "rounds-precopy"
        } else {
            "rounds-smart-stop"
        };
        let title = format!(
            "Pages per round, partial writes, {} (Fig. 12)",
            x["engine"].as_str().unwrap_or("")
        );
        out.push((name, bars(&title, &groups, &series)));
    }
    let f13: Vec<Value> = r["fig13b"].as_array().cloned().unwrap_or_default();
    if !f13.is_empty() {
        let groups: Vec<String> = f13
            .iter()
            .map(|x| format!("{} MB", x["cache_mb"]))
            .collect();
        let series = vec![(
            "redundancy found by the cache, %".to_string(),
            f13.iter().map(|x| x["cache_pct"].as_f64()).collect(),
        )];
        out.push((
            "cache",
            bars(
                "Redundancy vs cache size, repeated workload (Fig. 13b)",
                &groups,
                &series,
            ),
        ));
    }
    let sw: Vec<Value> = r["fig14_15"].as_array().cloned().unwrap_or_default();
    if !sw.is_empty() {
        let mut links: Vec<String> = Vec::new();
        for x in &sw {
            let l = x["link"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("");
            if !links.iter().any(|y| y == l) {
                links.push(l.into());
            }
        }
        for (name, key, title) in [
            (
                "bandwidth-time",
                "total_s",
                "Total time, s, vs bandwidth at 10 ms RTT (Fig. 14)",
            ),
            (
                "bandwidth-data",
                "data_mb",
                "Data sent, MB, vs bandwidth at 10 ms RTT (Fig. 15)",
            ),
        ] {
            let mut series = Vec::new();
            for w in ["partial", "zero"] {
                for e in ["precopy", "all"] {
                    let v = links
                        .iter()
                        .map(|l| {
                            sw.iter()
                                .find(|x| {
                                    x["workload"] == w
                                        && x["engine"] == e
                                        && x["ok"] == true
                                        && x["link"].as_str().unwrap_or("").starts_with(l.as_str())
                                })
                                .and_then(|x| x[key].as_f64())
                        })
                        .collect();
                    series.push((format!("{w} {e}"), v));
                }
            }
            out.push((name, bars(title, &links, &series)));
        }
    }
    out
}

/// A grouped bar chart: one group per `groups` entry, one bar per series (missing: no bar).
fn bars(title: &str, groups: &[String], series: &[(String, Vec<Option<f64>>)]) -> String {
    const COLORS: [&str; 8] = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
    ];
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-9);
    let n = series.len().max(1) as f64;
    let (left, top, plot_h) = (60.0, 40.0, 260.0);
    let bar_w = 14.0;
    let group_w = n * bar_w + 20.0;
    let w = left + group_w * groups.len() as f64 + 200.0;
    let h = top + plot_h + 60.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="11">
<text x="{left}" y="20" font-size="14">{}</text>
<line x1="{left}" y1="{y0:.0}" x2="{x1:.0}" y2="{y0:.0}" stroke="black"/>
"#,
        esc(title),
        y0 = top + plot_h,
        x1 = left + group_w * groups.len() as f64
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{}</text><line x1=\"{left}\" y1=\"{y:.0}\" x2=\"{:.0}\" y2=\"{y:.0}\" stroke=\"#ddd\"/>\n",
            left - 4.0,
            y + 4.0,
            fmt_num(v),
            left + group_w * groups.len() as f64
        );
    }
    for (g, name) in groups.iter().enumerate() {
        let gx = left + group_w * g as f64 + 10.0;
        for (k, (_, vals)) in series.iter().enumerate() {
            if let Some(Some(v)) = vals.get(g) {
                let bh = plot_h * v / max;
                s += &format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar_w}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {}</title></rect>\n",
                    gx + bar_w * k as f64,
                    top + plot_h - bh,
                    COLORS[k % COLORS.len()],
                    esc(&series[k].0),
                    fmt_num(*v)
                );
            }
        }
        s += &format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{}</text>\n",
            gx + n * bar_w / 2.0,
            top + plot_h + 16.0,
            esc(name)
        );
    }
    let lx = left + group_w * groups.len() as f64 + 16.0;
    for (k, (name, _)) in series.iter().enumerate() {
        let y = top + 14.0 * k as f64;
        s += &format!(
            "<rect x=\"{lx:.0}\" y=\"{y:.0}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{}</text>\n",
            COLORS[k % COLORS.len()],
            lx + 14.0,
            y + 9.0,
            esc(name)
        );
    }
    s + "</svg>\n"
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The storage part's disk: `disk_mib` MiB, whose upper half holds data the guest never
/// writes (an application's data set: what an incremental migration need not send again),
/// each MiB different; the guest's `disk` workload rewrites the first `guest_mib`.
#[derive(Serialize, Clone, Copy)]
struct DiskScale {
    disk_mib: u64,
    guest_mib: u64,
}

impl DiskScale {
    /// `disk_mib` when given, else 256 MiB (4 GiB with `--full`).
    fn new(full: bool, disk_mib: Option<u64>) -> Self {
        let disk_mib = disk_mib.unwrap_or(if full { 4096 } else { 256 }).max(16);
        DiskScale {
            disk_mib,
            guest_mib: (disk_mib / 8).min(64),
        }
    }
}

/// Writes the base image (sparse lower half, pseudo-random upper half) to `path`.
fn base_image(path: &Path, d: DiskScale) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(d.disk_mib << 20)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for m in d.disk_mib / 2..d.disk_mib {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&chunk, m << 20)?;
    }
    Ok(())
}

/// A sparse copy of `from` at `to` (the empty half stays holes), with its timestamps, written
/// back before it is used: a host's base image has long been on its disk, so a switch-over's
/// sync of the destination's file flushes only what the migration wrote, not the copy.
fn copy_image(from: &Path, to: &Path) -> anyhow::Result<()> {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", "--preserve=timestamps"])
        .arg(from)
        .arg(to)
        .status()?;
    anyhow::ensure!(st.success(), "cp {}", from.display());
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}

/// Where the storage part keeps its images: tmpfs up to 1 GiB, else /var/tmp (a real disk:
/// a 4 GiB image and its copies would take the host's memory on tmpfs). Removed on drop,
/// whatever the run's outcome.
struct ImageDir(PathBuf);

impl ImageDir {
    fn new(d: DiskScale) -> anyhow::Result<Self> {
        let base = if d.disk_mib <= 1024 && Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            PathBuf::from("/var/tmp")
        };
        let dir = base.join(format!("spanvmm-bench-cloudnet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(ImageDir(dir))
    }
}

impl ImageDir {
    /// Removes every file but the base image and its stamp: a run's copies are not needed by
    /// the next one (at 4 GiB they are gigabytes each).
    fn clear_runs(&self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with("base.img") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Drop for ImageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Ctx<'_> {
    /// The storage row: the disk moved with the VM (a running `disk` workload), full (to an
    /// empty file) and incremental (to a host holding the base image), spanvmm against QEMU's
    /// `blockdev-mirror` (write-blocking, to an NBD export of the destination's disk through
    /// a relay of its own on the same link; incremental: `sync=top` from a qcow2 overlay on
    /// the base both hosts hold).
    fn storage(&self, round: usize) -> anyhow::Result<Vec<Run>> {
        let s = &self.scale;
        let d = DiskScale::new(self.cfg.full, self.cfg.disk_mib);
        let images = ImageDir::new(d)?;
        let dir = images.0.clone();
        eprintln!(
            "storage: a {} MiB disk (guest rewrites {} MiB) in {}",
            d.disk_mib,
            d.guest_mib,
            dir.display()
        );
        let base = dir.join("base.img");
        base_image(&base, d)?;
        // The base's generation: copies made with their timestamps, stamp included, are the
        // same base (what QEMU's overlays know from their backing file).
        let st = std::process::Command::new(&self.cfg.spanvmm)
            .arg("disk-stamp")
            .arg(&base)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "spanvmm disk-stamp {}", base.display());
        let cmdline = format!(
            "workload=dirty,verify,disk mib={} wss={} rate=1000 disk_mib={} disk_rate=1000 \
             disk_flush=32 stall_us=1000 report_ms=0 verify_ms=2000",
            s.populated_mib,
            (s.populated_mib / 4).max(1),
            d.guest_mib
        );
        let wan = Link::Shaped {
            mbit: 100,
            rtt_ms: 20,
        };
        let limit = Duration::from_secs((d.disk_mib * 8 * 4 / 100).max(120));
        // A copy of the base, with its stamp or without.
        let copy = |name: &str, stamped: bool| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            copy_image(&base, &p)?;
            if stamped {
                // The stamp's place beside its image, as docs/migration-wire.md gives it.
                let stamp = |p: &Path| PathBuf::from(format!("{}.spanvmm-base", p.display()));
                std::fs::copy(stamp(&base), stamp(&p))?;
            }
            Ok(p)
        };
        let wanted = |name: &str| {
            self.cfg
                .engines
                .as_ref()
                .is_none_or(|e| e.iter().any(|x| x == name))
        };
        let mut out = Vec::new();
        // Incremental twice: both images stamped with the base's generation (only the blocks
        // written since go, neither image read whole), and unstamped copies (both hashed).
        for (name, incremental, stamped) in [
            ("spanvmm-full", false, true),
            ("spanvmm-incremental", true, true),
            ("spanvmm-incremental-hashed", true, false),
        ] {
            if !wanted(name) {
                continue;
            }
            let src = copy("src.img", stamped)?;
            let dst = if incremental {
                copy("dst.img", stamped)?
            } else {
                let p = dir.join("dst.img");
                std::fs::File::create(&p)?;
                p
            };
            let guest = Guest {
                workload: "disk",
                cmdline: &cmdline,
            };
            let c = self.cfg;
            let o = spanvmm_migrate_guest(
                &c.spanvmm,
                &c.plugins,
                &c.elf,
                s.memory_mib,
                guest,
                "precopy",
                "",
                Some((&src, &dst)),
                wan,
                limit,
            );
            out.push(self.storage_run(round, name, o));
            images.clear_runs();
        }
        for (name, incremental) in [
            ("qemu-mirror-full", false),
            ("qemu-mirror-incremental", true),
        ] {
            if !wanted(name) {
                continue;
            }
            let o = qemu_mirror(self, &dir, &base, d, &cmdline, incremental, wan, limit);
            out.push(self.storage_run(round, name, o));
            images.clear_runs();
        }
        drop(images);
        Ok(out)
    }

    fn storage_run(&self, round: usize, name: &str, o: anyhow::Result<Outcome>) -> Run {
        let run = match o {
            Ok(o) => to_run("storage", round, name, 0, o),
            Err(e) => failed_run("storage", round, "disk", name, "100 Mbit/s, 20 ms RTT", e),
        };
        eprintln!(
            "storage #{round} {name:>24}: {} — {:.1} MB on the link (VMM: {:.1} MB, disk {:.1} MB), {:.1} s, pause {:.1} ms, bad={:?} {}",
            if run.completed { "ok" } else { "FAILED" },
            run.bytes as f64 / 1e6,
            run.vmm_bytes as f64 / 1e6,
            run.disk["bytes"]
                .as_f64()
                .or(run.disk["len"].as_f64())
                .unwrap_or(0.0)
                / 1e6,
            run.total_ms as f64 / 1e3,
            run.pause_ms,
            run.verify_bad,
            if run.completed { "" } else { &run.note }
        );
        run
    }
}

fn failed_run(
    part: &'static str,
    round: usize,
    workload: &str,
    engine: &str,
    link: &str,
    e: anyhow::Error,
) -> Run {
    Run {
        part,
        round,
        workload: workload.into(),
        engine: engine.into(),
        link: link.into(),
        completed: false,
        verify_bad: None,
        bytes: 0,
        vmm_bytes: 0,
        total_ms: 0,
        pause_ms: 0.0,
        guest_stall_us: 0,
        rounds: 0,
        throttle_pct: None,
        throttled_ms: None,
        pages_per_round: vec![],
        sent_per_round: vec![],
        final_per_round: vec![],
        zero_pages: 0,
        pages_sent: 0,
        encoding: Value::Null,
        disk: Value::Null,
        cache_mib: 0,
        note: format!("could not run: {e:#}"),
    }
}

/// QEMU's storage migration over the same link: the destination (`-incoming defer`, `-S`)
/// exports its disk over NBD; the source mirrors its disk there (`blockdev-mirror`,
/// `copy-mode=write-blocking`: once ready, every guest write waits for the destination, as
/// spanvmm's synchronous phase), then migrates the memory; once that completed the mirror is
/// ended (`block-job-cancel`: the target is complete), the export removed and the
/// destination resumed. Total time: mirror start to resume; pause: QEMU's downtime plus
/// completion to resume.
#[allow(clippy::too_many_arguments)]
fn qemu_mirror(
    ctx: &Ctx,
    dir: &Path,
    base: &Path,
    d: DiskScale,
    cmdline: &str,
    incremental: bool,
    link: Link,
    limit: Duration,
) -> anyhow::Result<Outcome> {
    use crate::live_update::{qemu_with, qmp_arg, wait_ready, Qmp};
    use crate::migration::{max_stall, settle, verify_after, Hosts};
    use std::process::Command;
    use std::time::Instant;

    let mem = ctx.scale.memory_mib;
    let img = |name: &str| dir.join(name);
    let (src_img, dst_img, fmt) = if incremental {
        // Both hosts hold the base; the guest writes into an overlay, and only the overlay's
        // clusters are mirrored onto the destination's overlay of its own copy of the base.
        for side in ["src", "dst"] {
            let b = img(&format!("base-{side}.img"));
            copy_image(base, &b)?;
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&b)
                .arg(img(&format!("{side}.qcow2")))
                .status()?;
            anyhow::ensure!(st.success(), "qemu-img create");
        }
        (img("src.qcow2"), img("dst.qcow2"), "qcow2")
    } else {
        let s = img("src-q.img");
        copy_image(base, &s)?;
        let t = img("dst-q.img");
        std::fs::File::create(&t)?.set_len(d.disk_mib << 20)?;
        (s, t, "raw")
    };
    let hosts = Hosts::new(link, 47_200)?;
    let (nbd_listen, nbd_connect, _nbd_relay) = hosts.second_port(47_201)?;
    let (src_qmp, dst_qmp) = (img("src.qmp"), img("dst.qmp"));
    let disk_args = |path: &Path| -> Vec<String> {
        vec![
            "-M".into(),
            "microvm,acpi=off".into(),
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
            "-blockdev".into(),
            format!(
                "driver=file,filename={},node-name=f0,cache.direct=off",
                path.display()
            ),
            "-blockdev".into(),
            format!("driver={fmt},file=f0,node-name=n0"),
            "-device".into(),
            "virtio-blk-device,drive=n0".into(),
        ]
    };
    let mut src_args = qmp_arg(&src_qmp);
    src_args.extend(disk_args(&src_img));
    let (mut src, src_lines) = qemu_with(
        hosts.command("src", "qemu-system-x86_64"),
        &ctx.cfg.elf,
        mem,
        cmdline,
        &src_args,
    )?;
    let result = (|| {
        wait_ready(&src_lines)?;
        std::thread::sleep(Duration::from_millis(500));
        let mut dst_args = qmp_arg(&dst_qmp);
        dst_args.extend(disk_args(&dst_img));
        dst_args.extend(["-incoming", "defer", "-S", "-mem-prealloc"].map(String::from));
        let (mut dst, dst_lines) = qemu_with(
            hosts.command("dst", "qemu-system-x86_64"),
            &ctx.cfg.elf,
            mem,
            cmdline,
            &dst_args,
        )?;
        let r = (|| {
            let mut q = Qmp::connect(&src_qmp)?;
            let mut dq = Qmp::connect(&dst_qmp)?;
            dq.cmd(
                "nbd-server-start",
                json!({"addr": {"type": "inet", "data": {
                    "host": nbd_listen.ip().to_string(), "port": nbd_listen.port().to_string()}}}),
            )?;
            dq.cmd(
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "d0",
                       "writable": true}),
            )?;
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100u64 << 30}),
            )?;
            let sent_before = hosts.sent_bytes("src");
            let t0 = Instant::now();
            q.cmd(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "t0", "export": "d0",
                       "server": {"type": "inet", "host": nbd_connect.ip().to_string(),
                                  "port": nbd_connect.port().to_string()}}),
            )?;
            q.cmd(
                "blockdev-mirror",
                json!({"job-id": "m0", "device": "n0", "target": "t0",
                       "sync": if incremental { "top" } else { "full" },
                       "copy-mode": "write-blocking"}),
            )?;
            let deadline = t0 + limit;
            let job = loop {
                let jobs = q.cmd("query-block-jobs", json!({}))?;
                let j = jobs.get(0).cloned().unwrap_or(Value::Null);
                if j["ready"] == true {
                    break j;
                }
                anyhow::ensure!(!j.is_null(), "the mirror job ended before it was ready");
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the mirror was not ready in {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            let mirror_ms = t0.elapsed().as_millis() as u64;
            let uri = |a: std::net::SocketAddr| format!("tcp:{}:{}", a.ip(), a.port());
            dq.cmd("migrate-incoming", json!({"uri": uri(hosts.listen)}))?;
            std::thread::sleep(Duration::from_millis(100));
            q.cmd("migrate", json!({"uri": uri(hosts.connect)}))?;
            let info = loop {
                let info = q.cmd("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => break info,
                    Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
                    _ if Instant::now() > deadline => {
                        let _ = q.cmd("migrate_cancel", json!({}));
                        bail!("QEMU's memory migration did not complete in {limit:?}");
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            let completed_at = Instant::now();
            q.cmd("block-job-cancel", json!({"device": "m0"}))?;
            while !q
                .cmd("query-block-jobs", json!({}))?
                .as_array()
                .is_none_or(|a| a.is_empty())
            {
                anyhow::ensure!(
                    Instant::now() < deadline + Duration::from_secs(30),
                    "the mirror did not end"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // The source lets go of the target before the destination drops its export.
            q.cmd("blockdev-del", json!({"node-name": "t0"}))?;
            dq.cmd("block-export-del", json!({"id": "e0", "mode": "hard"}))?;
            dq.cmd("cont", json!({}))?;
            let total_ms = t0.elapsed().as_millis() as u64;
            let pause_ms =
                info["downtime"].as_u64().unwrap_or(0) + completed_at.elapsed().as_millis() as u64;
            let link_bytes = hosts
                .sent_bytes("src")
                .zip(sent_before)
                .map(|(a, b)| a.saturating_sub(b));
            let from = settle(&dst_lines);
            let verify_bad = verify_after(&dst_lines, from, Duration::from_secs(30));
            let end = dst_lines.lock().unwrap().len();
            let disk_bytes = job["len"].as_u64().unwrap_or(0);
            Ok(Outcome {
                vmm: "qemu".into(),
                engine: "blockdev-mirror".into(),
                link: link.label(),
                mem_mib: mem,
                workload: "disk".into(),
                completed: true,
                total_ms,
                downtime_ms: pause_ms,
                guest_stall_us: max_stall(&dst_lines, 0..from),
                guest_stall_after_us: max_stall(&dst_lines, from..end),
                remote_faults: 0,
                fault_mean_us: 0,
                fault_p99_us: 0,
                setup_ms: 0,
                bytes: info["ram"]["transferred"].as_u64().unwrap_or(0) + disk_bytes,
                verify_bad,
                cipher: "plaintext".into(),
                cpu_ms: None,
                note: format!("mirror ready after {mirror_ms} ms, job {job}"),
                link_bytes,
                report: json!({"migrate": info, "mirror": job, "mirror_ready_ms": mirror_ms}),
            })
        })();
        let _ = dst.kill();
        let _ = dst.wait();
        r
    })();
    let _ = src.kill();
    let _ = src.wait();
    drop(hosts);
    result
}
