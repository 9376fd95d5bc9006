//! `spanvmm-bench snapshot`: full snapshot and restore of idle and dirtying guests, spanvmm vs
//! QEMU (`migrate` to a file, `-incoming` from it) on the same spanguest ELF, plus lazy restore
//! and the snapshot write rate against the disk's own sequential write rate; live snapshots
//! (checkpoint service) and eviction with and without periodic background layers.
//!
//! Restores are like-for-like: both VMMs restore from the page cache (each image is read once
//! before its restore; spanvmm writes with O_DIRECT, so its image would otherwise come from
//! the disk while QEMU's, written through the cache, would not).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::harness::{field, spawn_run, spawn_vm, Vm};
use crate::live_update::{qemu, qmp_arg, wait_ready, Qmp};

/// Most populated MiB (spanguest fills the RAM range holding its image; see live_update.rs).
const MAX_POPULATED_MIB: u64 = 2944;

fn cmdline(mem: u64, workload: &str) -> String {
    let mib = (mem * 7 / 8).min(MAX_POPULATED_MIB);
    match workload {
        "idle" => format!("workload=idle,verify mib={mib} stall_us=1000 report_ms=0"),
        _ => format!("workload=dirty,verify mib={mib} wss=64 rate=20000 stall_us=1000 report_ms=0"),
    }
}

/// Waits for the first `stall` line: the guest's first loop iteration after a restore reports
/// the gap since the snapshot. Returns the time since `t0`, ms.
fn first_progress(
    lines: &Arc<Mutex<Vec<String>>>,
    t0: Instant,
    timeout: Duration,
) -> anyhow::Result<f64> {
    loop {
        if lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SPANGUEST stall"))
        {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > timeout {
            bail!("the restored guest made no progress in {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn verify(vm: &Vm) -> anyhow::Result<()> {
    let from = vm.mark();
    vm.api_ok("PUT", "/guest/command", Some(json!({"command": "verify"})))?;
    let l = vm.wait_lines("SPANGUEST verify", 1, from, Duration::from_secs(120))?;
    if field(&l[0], "bad") != Some(0) {
        bail!("restored guest memory damaged: {}", l[0]);
    }
    Ok(())
}

/// Reads every file of `path` (a file or a directory) once, so it is in the page cache.
fn warm(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        if let Ok(mut file) = std::fs::File::open(&f) {
            let _ = std::io::copy(&mut file, &mut std::io::sink());
        }
    }
}

/// Waits for the checkpoint service's layer to be done; returns its status.
fn wait_snapshot(vm: &Vm) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let (v, _) = vm.api_ok("GET", "/snapshot/status", None)?;
        match v["phase"].as_str() {
            Some("done") => return Ok(v),
            Some("failed") => bail!("snapshot failed: {v}"),
            _ if t.elapsed() > Duration::from_secs(600) => bail!("snapshot not done: {v}"),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// A live snapshot through the checkpoint service: (total ms, pause ms, rounds, guest stall µs).
fn live_case(
    bin: &Path,
    elf: &Path,
    plugin: &Path,
    mem: u64,
    workload: &str,
    dir: &Path,
) -> anyhow::Result<(f64, f64, u64, u64)> {
    let vm = spawn_vm(bin, elf, &cmdline(mem, workload), mem, "live")?;
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::fs::remove_dir_all(dir);
    vm.api_ok(
        "PUT",
        "/guest/command",
        Some(json!({"command": "reset-stall"})),
    )?;
    let from = vm.mark();
    let body = json!({"dir": dir, "live": true, "plugin": plugin});
    vm.api_ok("PUT", "/snapshot/create", Some(body))?;
    let st = wait_snapshot(&vm)?;
    // The guest's largest stall since the reset, from its next stat line.
    vm.api_ok("PUT", "/guest/command", Some(json!({"command": "verify"})))?;
    let l = vm.wait_lines("SPANGUEST verify", 1, from, Duration::from_secs(120))?;
    if field(&l[0], "bad") != Some(0) {
        bail!("guest memory damaged after a live snapshot: {}", l[0]);
    }
    let stall = vm
        .lines
        .lock()
        .unwrap()
        .iter()
        .skip(from)
        .filter(|l| l.contains("SPANGUEST stall"))
        .filter_map(|l| field(l, "us"))
        .max()
        .unwrap_or(0);
    Ok((
        st["total_ms"].as_f64().unwrap_or(0.0),
        st["pause_ms"].as_f64().unwrap_or(0.0),
        st["rounds"].as_u64().unwrap_or(0),
        stall,
    ))
}

/// Eviction of a dirtying guest: ms from the request to the layer written, and bytes, without
/// and with periodic background layers (their base and one incremental layer, then 3 s more).
fn evict_case(
    bin: &Path,
    elf: &Path,
    plugin: &Path,
    mem: u64,
    dir: &Path,
    periodic: bool,
) -> anyhow::Result<(f64, u64)> {
    let vm = spawn_vm(bin, elf, &cmdline(mem, "dirty"), mem, "evict")?;
    let _ = std::fs::remove_dir_all(dir);
    if periodic {
        let body = json!({"dir": dir.join("bg"), "plugin": plugin});
        vm.api_ok("PUT", "/snapshot/periodic", Some(body))?;
        // Eviction is quick only once the background chain has its full base layer: wait for
        // the base and one incremental layer (a large guest's base alone takes seconds), then
        // let the guest dirty for the usual 3 s.
        let t = Instant::now();
        loop {
            let (v, _) = vm.api_ok("GET", "/snapshot/status", None)?;
            let layers = v["periodic"]["layers"].as_u64().unwrap_or(0);
            if layers >= 2 && v["phase"] != "rounds" && v["phase"] != "final" {
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("periodic snapshots made no progress: {v}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(3));
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    let body = json!({"dir": dir.join("evicted"), "plugin": plugin});
    loop {
        let (code, v, _) = vm.api("PUT", "/snapshot/evict", Some(body.clone()))?;
        match code {
            200 => break,
            _ if v.to_string().contains("busy") => std::thread::sleep(Duration::from_millis(1)),
            _ => bail!("evict: HTTP {code}: {v}"),
        }
    }
    let st = wait_snapshot(&vm)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = vm.api("PUT", "/vm/shutdown", None);
    let bytes = st["bytes_written"].as_u64().unwrap_or(0);
    // The evicted VM comes back intact.
    let d = dir.join("evicted");
    let back = spawn_run(bin, &["--restore", d.to_str().unwrap()], "evicted")?;
    first_progress(&back.lines, Instant::now(), Duration::from_secs(120))?;
    verify(&back)?;
    Ok((ms, bytes))
}

fn dir_bytes(dir: &Path) -> u64 {
    // Allocated bytes (the memory file is sparse).
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[derive(Serialize)]
struct Case {
    memory_mib: u64,
    workload: String,
    /// The disk's own rate (dd) measured just before this case's saves, MB/s.
    disk_write_mb_s: f64,
    /// Median of the saves.
    spanvmm_save_ms: f64,
    spanvmm_save_runs_ms: Vec<f64>,
    spanvmm_bytes: u64,
    spanvmm_write_mb_s: f64,
    spanvmm_write_fraction_of_disk: f64,
    spanvmm_restore_to_progress_ms: f64,
    spanvmm_lazy_restore_to_progress_ms: f64,
    /// Lazy restore into a standby VMM (`run --standby`): from `PUT /snapshot/load` to the
    /// guest's first progress, median and best of several runs.
    spanvmm_standby_lazy_load_to_progress_ms: f64,
    spanvmm_standby_lazy_load_to_progress_best_ms: f64,
    spanvmm_standby_lazy_load_to_progress_runs_ms: Vec<f64>,
    /// The same loads to the guest's first loop iteration (the TSC its `stall` line reports),
    /// without the console's time: median and every run (runs whose stamp did not fit the
    /// host's TSC are left out; none when no stamp fit).
    spanvmm_standby_lazy_load_to_first_iteration_ms: Option<f64>,
    spanvmm_standby_lazy_load_to_first_iteration_runs_ms: Vec<f64>,
    spanvmm_live_total_ms: f64,
    spanvmm_live_pause_ms: f64,
    spanvmm_live_rounds: u64,
    spanvmm_live_guest_stall_us: u64,
    spanvmm_stop_the_world_guest_stall_us: u64,
    evict_ms_without_periodic: Option<f64>,
    evict_bytes_without_periodic: Option<u64>,
    evict_ms_with_periodic: Option<f64>,
    evict_bytes_with_periodic: Option<u64>,
    qemu_save_ms: u64,
    qemu_bytes: u64,
    qemu_restore_to_progress_ms: f64,
}

/// Stop-the-world saves per case: this virtual disk's rate swings between runs, so one save
/// is a poor sample.
const SAVE_RUNS: usize = 3;

/// What one spanvmm case measured.
struct SpanvmmRuns {
    /// The disk's rate (dd) just before the saves, MB/s.
    disk_mb_s: f64,
    save_ms: Vec<f64>,
    bytes: u64,
    restore_ms: f64,
    lazy_ms: f64,
    /// The guest's stall across the first save, µs.
    stall_us: u64,
    standby_ms: Vec<f64>,
    /// To the guest's first loop iteration (its TSC stamp), where the stamp fit.
    standby_iteration_ms: Vec<f64>,
}

fn spanvmm_case(
    bin: &Path,
    elf: &Path,
    mem: u64,
    workload: &str,
    dir: &Path,
) -> anyhow::Result<SpanvmmRuns> {
    let vm = spawn_vm(bin, elf, &cmdline(mem, workload), mem, "snap")?;
    let disk_mb_s = disk_rate(dir.parent().unwrap_or(dir))?;
    let mut save_ms = Vec::new();
    let mut stall = 0;
    for run in 0..SAVE_RUNS {
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(dir);
        let from = vm.mark();
        let (r, _) = vm.api_ok("PUT", "/vm/save", Some(json!({"dir": dir})))?;
        save_ms.push(r["ms"].as_f64().context("save ms")?);
        if run == 0 {
            // The pause's own line comes once the guest runs again; with stall_us=1000 the
            // host's noise prints small ones too, so the largest line around the save is the
            // pause's.
            let _ = vm.wait_lines("SPANGUEST stall", 1, from, Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(300));
            stall = vm.lines.lock().unwrap()[from..]
                .iter()
                .filter(|l| l.contains("SPANGUEST stall"))
                .filter_map(|l| field(l, "us"))
                .max()
                .unwrap_or(0);
        }
    }
    drop(vm);
    let bytes = dir_bytes(dir);
    let mut restore = [0.0f64; 2];
    for (i, lazy) in [false, true].into_iter().enumerate() {
        let d = dir.to_str().unwrap();
        let args: Vec<&str> = if lazy {
            vec!["--restore", d, "--lazy"]
        } else {
            vec!["--restore", d]
        };
        warm(dir);
        let t0 = Instant::now();
        let vm = spawn_run(bin, &args, "restore")?;
        restore[i] = first_progress(&vm.lines, t0, Duration::from_secs(120))?;
        verify(&vm)?;
    }
    let (mut standby, mut iteration) = (Vec::new(), Vec::new());
    let per_ms = tsc_per_ms();
    for run in 0..STANDBY_RUNS {
        let (line, first) = standby_case(bin, mem, dir, run == 0, per_ms)?;
        standby.push(line);
        iteration.extend(first);
    }
    Ok(SpanvmmRuns {
        disk_mb_s,
        save_ms,
        bytes,
        restore_ms: restore[0],
        lazy_ms: restore[1],
        stall_us: stall,
        standby_ms: standby,
        standby_iteration_ms: iteration,
    })
}

/// Lazy restores into a standby VMM measured from the load request.
const STANDBY_RUNS: usize = 9;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The host's TSC ticks per ms.
fn tsc_per_ms() -> f64 {
    let (t, c) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(100));
    (rdtsc() - c) as f64 / (t.elapsed().as_secs_f64() * 1e3)
}

/// One lazy restore of `dir` into a fresh `run --standby` VMM, from `PUT /snapshot/load`: ms
/// to the guest's first progress as its `stall` line completes on the console, and ms to the
/// loop iteration that line reports (its `tsc=`: the guest shares the host's TSC here), which
/// leaves out the console's own time (a byte is a VM exit: ~1-2 ms for the line, and more when
/// the snapshot caught the guest in the middle of another line). `None` for the second when
/// the stamp does not fit (a guest TSC that is not the host's). The first run also verifies
/// the guest's memory.
fn standby_case(
    bin: &Path,
    mem: u64,
    dir: &Path,
    check: bool,
    tsc_per_ms: f64,
) -> anyhow::Result<(f64, Option<f64>)> {
    let vm = spawn_run(bin, &["--standby", "--memory", &mem.to_string()], "standby")?;
    let t = Instant::now();
    while vm.api("GET", "/vm", None).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the standby VMM does not answer");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    warm(dir);
    let (t0, c0) = (Instant::now(), rdtsc());
    vm.api_ok(
        "PUT",
        "/snapshot/load",
        Some(json!({"dir": dir, "lazy": true})),
    )?;
    let ms = first_progress(&vm.lines, t0, Duration::from_secs(120))?;
    let stamp = vm
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("SPANGUEST stall"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tsc=0x"))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        });
    let iteration = stamp
        .filter(|&t| t > c0)
        .map(|t| (t - c0) as f64 / tsc_per_ms)
        .filter(|&m| m <= ms);
    if check {
        verify(&vm)?;
    }
    Ok((ms, iteration))
}

fn qemu_case(elf: &Path, mem: u64, workload: &str, dir: &Path) -> anyhow::Result<(u64, u64, f64)> {
    std::fs::create_dir_all(dir)?;
    let (qmp, image) = (dir.join("q.qmp"), dir.join("qemu.img"));
    let _ = std::fs::remove_file(&image);
    let cl = cmdline(mem, workload);
    let (mut src, lines) = qemu(elf, mem, &cl, &qmp_arg(&qmp))?;
    let r = (|| {
        wait_ready(&lines)?;
        std::thread::sleep(Duration::from_millis(300));
        let mut q = Qmp::connect(&qmp)?;
        q.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 100u64 << 30}),
        )?;
        q.cmd(
            "migrate",
            json!({"uri": format!("file:{}", image.display())}),
        )?;
        loop {
            let info = q.cmd("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info["total-time"].as_u64().unwrap_or(0)),
                Some("failed") | Some("cancelled") => bail!("QEMU migrate to file failed: {info}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })();
    let _ = src.kill();
    let _ = src.wait();
    let save_ms = r?;
    let bytes =
        std::fs::metadata(&image).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)?;
    warm(&image);
    let t0 = Instant::now();
    let (mut dst, lines) = qemu(
        elf,
        mem,
        &cl,
        &["-incoming".into(), format!("file:{}", image.display())],
    )?;
    let restore = first_progress(&lines, t0, Duration::from_secs(300));
    let _ = dst.kill();
    let _ = dst.wait();
    Ok((save_ms, bytes, restore?))
}

/// The disk's own sequential write rate (dd, direct I/O, 800 MiB), MB/s.
fn disk_rate(dir: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let f = dir.join("dd.tmp");
    let t = Instant::now();
    let ok = Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=4M",
            "count=200",
            "oflag=direct",
            "conv=fsync",
        ])
        .arg(format!("of={}", f.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&f);
    if !ok {
        bail!("dd failed");
    }
    Ok(800.0 * 1.048576 / secs)
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    snapshot_dir: PathBuf,
    disk_write_mb_s: f64,
    cases: Vec<Case>,
    /// The lowest of the cases' save rates as a fraction of the disk's rate just before.
    worst_spanvmm_write_fraction_of_disk: f64,
    lazy_restore_goal: &'static str,
    restore_comparison: &'static str,
}

/// Runs the benchmark and writes `out`.
pub fn run(bin: &Path, elf: &Path, plugin: &Path, sizes: &[u64], out: &Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-snap-{}", std::process::id()));
    let disk = disk_rate(&dir)?;
    eprintln!("disk sequential write (dd, direct): {disk:.0} MB/s");
    let mut cases = Vec::new();
    for &mem in sizes {
        for workload in ["idle", "dirty"] {
            let span = spanvmm_case(bin, elf, mem, workload, &dir.join("span"))?;
            let (bytes, restore, lazy, stw_stall) =
                (span.bytes, span.restore_ms, span.lazy_ms, span.stall_us);
            let standby_best = span
                .standby_ms
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min);
            let standby_median = crate::harness::median(&mut span.standby_ms.clone());
            let save_ms = crate::harness::median(&mut span.save_ms.clone());
            let iteration_median = (!span.standby_iteration_ms.is_empty())
                .then(|| crate::harness::median(&mut span.standby_iteration_ms.clone()));
            let (live_ms, live_pause, live_rounds, live_stall) =
                live_case(bin, elf, plugin, mem, workload, &dir.join("live"))?;
            let (evict_plain, evict_periodic) = if workload == "dirty" {
                (
                    Some(evict_case(bin, elf, plugin, mem, &dir.join("ev0"), false)?),
                    Some(evict_case(bin, elf, plugin, mem, &dir.join("ev1"), true)?),
                )
            } else {
                (None, None)
            };
            eprintln!(
                "{mem:>5} MiB {workload:>5}: live snapshot {live_ms:.0} ms, pause {live_pause:.1} ms in {live_rounds} rounds, guest stall {live_stall} µs (stop-the-world {stw_stall} µs); evict {evict_plain:?} vs with periodic layers {evict_periodic:?} (ms, bytes)"
            );
            let (q_save, q_bytes, q_restore) = qemu_case(elf, mem, workload, &dir.join("qemu"))?;
            let rate = bytes as f64 / 1e6 / (save_ms / 1e3);
            let of_disk = rate / span.disk_mb_s;
            eprintln!(
                "{mem:>5} MiB {workload:>5}: spanvmm save {save_ms:.0} ms {} MiB ({rate:.0} MB/s, {:.0} % of dd's {:.0} just before; saves {:.0?} ms), restore→progress {restore:.1} ms, lazy {lazy:.1} ms, standby lazy load {standby_median:.1} ms (best {standby_best:.1}; to its first loop iteration {iteration_median:.1?} ms) | QEMU save {q_save} ms {} MiB, restore→progress {q_restore:.0} ms",
                bytes >> 20,
                of_disk * 100.0,
                span.disk_mb_s,
                span.save_ms,
                q_bytes >> 20
            );
            cases.push(Case {
                memory_mib: mem,
                workload: workload.into(),
                disk_write_mb_s: span.disk_mb_s,
                spanvmm_save_ms: save_ms,
                spanvmm_save_runs_ms: span.save_ms,
                spanvmm_bytes: bytes,
                spanvmm_write_mb_s: rate,
                spanvmm_write_fraction_of_disk: of_disk,
                spanvmm_restore_to_progress_ms: restore,
                spanvmm_lazy_restore_to_progress_ms: lazy,
                spanvmm_standby_lazy_load_to_progress_ms: standby_median,
                spanvmm_standby_lazy_load_to_progress_best_ms: standby_best,
                spanvmm_standby_lazy_load_to_progress_runs_ms: span.standby_ms,
                spanvmm_standby_lazy_load_to_first_iteration_ms: iteration_median,
                spanvmm_standby_lazy_load_to_first_iteration_runs_ms: span.standby_iteration_ms,
                spanvmm_live_total_ms: live_ms,
                spanvmm_live_pause_ms: live_pause,
                spanvmm_live_rounds: live_rounds,
                spanvmm_live_guest_stall_us: live_stall,
                spanvmm_stop_the_world_guest_stall_us: stw_stall,
                evict_ms_without_periodic: evict_plain.map(|e| e.0),
                evict_bytes_without_periodic: evict_plain.map(|e| e.1),
                evict_ms_with_periodic: evict_periodic.map(|e| e.0),
                evict_bytes_with_periodic: evict_periodic.map(|e| e.1),
                qemu_save_ms: q_save,
                qemu_bytes: q_bytes,
                qemu_restore_to_progress_ms: q_restore,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let worst = cases
        .iter()
        .map(|c| c.spanvmm_write_fraction_of_disk)
        .fold(f64::INFINITY, f64::min);
    let report = Report {
        benchmark: "snapshot",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        snapshot_dir: dir,
        disk_write_mb_s: disk,
        cases,
        worst_spanvmm_write_fraction_of_disk: worst,
        lazy_restore_goal: "time to first guest progress < 5 ms (from process start; standby: from the load request)",
        restore_comparison: "both VMMs restore from the page cache (images read once before)",
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
