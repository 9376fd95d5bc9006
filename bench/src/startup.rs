//! `spanvmm-bench startup [--runs N] [--trace] [--compare BIN]`: the two "from process start"
//! figures of issue #21 item 5, interleaved run by run so that both see the same machine:
//! boot to `SPANGUEST ready` (the `boot` benchmark's spanvmm row: 256 MiB, `mib=8`) and a lazy
//! restore (`run --restore DIR --lazy`) to the guest's first progress (its first `stall`
//! line), of a 256 MiB idle guest with 224 MiB populated saved once to /dev/shm (the snapshot
//! benchmark's 256 MiB idle row, from the page cache). `--trace` also collects each run's
//! start-up trace (`SPANVMM_STARTUP_TRACE`, base-vmm's `startup`) and reports the median time
//! of each step; `--compare BIN` runs a second spanvmm binary in alternation (A/B).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::harness::{self, field, spawn_run, Stat};

const MEM_MIB: u64 = 256;
const BOOT_CMDLINE: &str = "workload=idle mib=8 report_ms=0";
const SAVED_CMDLINE: &str = "workload=idle,verify mib=224 stall_us=1000 report_ms=0";

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// One run: ms from spawning the process to the line with the needle, that line, and the
/// start-up trace (`(step, µs since the spawn)`) when asked for.
#[derive(Clone)]
struct Run {
    ms: f64,
    line: String,
    trace: Vec<(String, u64)>,
}

/// Spawns `cmd` and waits for a stdout line containing `needle`; the child is returned
/// running (the caller ends it).
fn run_to_line(
    mut cmd: Command,
    needle: &'static str,
    trace: bool,
) -> anyhow::Result<(Run, Child)> {
    if trace {
        cmd.env("SPANVMM_STARTUP_TRACE", "1");
    }
    let t0_us = monotonic_us();
    cmd.env("SPANVMM_STARTUP_T0_US", t0_us.to_string());
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if trace { Stdio::piped() } else { Stdio::null() })
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Byte by byte into lines as they come: the time is taken when the line completes.
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            if line.contains(needle) {
                let _ = tx.send((t0.elapsed(), line.trim_end().to_string()));
                // Keep draining so that the guest never blocks on a full pipe.
                let _ = std::io::copy(&mut r, &mut std::io::sink());
                return;
            }
            line.clear();
        }
    });
    let stderr = child.stderr.take();
    let got = rx.recv_timeout(Duration::from_secs(60));
    let Ok((d, line)) = got else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{cmd:?}: no {needle:?} within 60 s");
    };
    let mut steps = Vec::new();
    if let Some(mut err) = stderr {
        // The trace lines printed so far: wait a moment for the console-line marks that
        // race with our read of the line, then take what is there.
        std::thread::sleep(Duration::from_millis(20));
        let mut text = Vec::new();
        set_nonblocking(&err);
        let _ = err.read_to_end(&mut text);
        for l in String::from_utf8_lossy(&text).lines() {
            if let Some(rest) = l.strip_prefix("[startup] +") {
                if let Some((us, step)) = rest.split_once(' ') {
                    if let Ok(us) = us.parse() {
                        steps.push((step.to_string(), us));
                    }
                }
            }
        }
    }
    Ok((
        Run {
            ms: d.as_secs_f64() * 1e3,
            line,
            trace: steps,
        },
        child,
    ))
}

fn set_nonblocking(f: &impl std::os::fd::AsRawFd) {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own changes only its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn end(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Boots a 256 MiB guest with 224 MiB populated and saves it into `dir`.
fn save_guest(bin: &Path, elf: &Path, dir: &Path) -> anyhow::Result<()> {
    let vm = harness::spawn_vm(bin, elf, SAVED_CMDLINE, MEM_MIB, "startup-save")?;
    let _ = std::fs::remove_dir_all(dir);
    vm.api_ok("PUT", "/vm/save", Some(json!({ "dir": dir })))?;
    Ok(())
}

/// Verifies every populated page of a restored guest (bad=0).
fn verify_restored(bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let d = dir.to_str().context("snapshot path")?;
    let vm = spawn_run(bin, &["--restore", d, "--lazy"], "startup-verify")?;
    vm.wait_lines("SPANGUEST stall", 1, 0, Duration::from_secs(60))?;
    let from = vm.mark();
    vm.api_ok("PUT", "/guest/command", Some(json!({"command": "verify"})))?;
    let l = vm.wait_lines("SPANGUEST verify", 1, from, Duration::from_secs(120))?;
    if field(&l[0], "bad") != Some(0) {
        bail!("lazily restored guest memory damaged: {}", l[0]);
    }
    Ok(())
}

#[derive(Serialize)]
struct Side {
    binary: String,
    boot_ms: Vec<f64>,
    boot: Stat,
    /// The guest's own `ms=` on its ready line (vCPU 0's entry to ready).
    boot_guest_ms: Vec<f64>,
    lazy_restore_ms: Vec<f64>,
    lazy_restore: Stat,
    /// Median µs since the spawn of each start-up step (with `--trace`).
    boot_trace_us: Vec<(String, f64)>,
    lazy_restore_trace_us: Vec<(String, f64)>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    load_average: String,
    memory_mib: u64,
    boot_cmdline: &'static str,
    saved_cmdline: &'static str,
    runs: usize,
    sides: Vec<Side>,
    goal: &'static str,
}

/// Median µs of each step over the runs, in order of the medians.
fn trace_medians(runs: &[Vec<(String, u64)>]) -> Vec<(String, f64)> {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for (s, _) in r {
            if !names.contains(s) {
                names.push(s.clone());
            }
        }
    }
    let mut out: Vec<(String, f64)> = names
        .into_iter()
        .map(|n| {
            let mut v: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.iter().find(|(s, _)| *s == n).map(|(_, us)| *us as f64))
                .collect();
            (n, harness::median(&mut v))
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

pub fn run(
    bin: &Path,
    compare: Option<PathBuf>,
    elf: &Path,
    runs: usize,
    trace: bool,
    out: &Path,
) -> anyhow::Result<()> {
    let bins: Vec<PathBuf> = std::iter::once(bin.to_path_buf()).chain(compare).collect();
    let scratch = PathBuf::from("/dev/shm").join(format!("spanvmm-startup-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let dir = scratch.join("snap");
    let result = (|| {
        save_guest(bin, elf, &dir)?;
        let mut boots = vec![Vec::new(); bins.len()];
        let mut restores = vec![Vec::new(); bins.len()];
        let d = dir.to_str().context("snapshot path")?.to_string();
        for i in 0..runs {
            // Alternate which binary goes first.
            for k in 0..bins.len() {
                let b = &bins[(i + k) % bins.len()];
                let mut c = Command::new(b);
                c.args(["run", "--kernel"]).arg(elf).args([
                    "--cmdline",
                    BOOT_CMDLINE,
                    "--memory",
                    &MEM_MIB.to_string(),
                ]);
                let (r, child) = run_to_line(c, "SPANGUEST ready", trace)?;
                end(child);
                boots[(i + k) % bins.len()].push(r);
                let mut c = Command::new(b);
                c.args(["run", "--restore", &d, "--lazy"]);
                let (r, child) = run_to_line(c, "SPANGUEST stall", trace)?;
                end(child);
                restores[(i + k) % bins.len()].push(r);
            }
            eprint!(".");
        }
        eprintln!();
        for b in &bins {
            verify_restored(b, &dir)?;
        }
        Ok::<_, anyhow::Error>((boots, restores))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let (boots, restores) = result?;
    let mut sides = Vec::new();
    for (k, b) in bins.iter().enumerate() {
        let boot_ms: Vec<f64> = boots[k].iter().map(|r| r.ms).collect();
        let guest: Vec<f64> = boots[k]
            .iter()
            .filter_map(|r| field(&r.line, "ms").map(|v| v as f64))
            .collect();
        let lazy: Vec<f64> = restores[k].iter().map(|r| r.ms).collect();
        let side = Side {
            binary: b.display().to_string(),
            boot: harness::stat(boot_ms.iter().copied()),
            boot_ms,
            boot_guest_ms: guest.clone(),
            lazy_restore: harness::stat(lazy.iter().copied()),
            lazy_restore_ms: lazy,
            boot_trace_us: trace_medians(
                &boots[k].iter().map(|r| r.trace.clone()).collect::<Vec<_>>(),
            ),
            lazy_restore_trace_us: trace_medians(
                &restores[k]
                    .iter()
                    .map(|r| r.trace.clone())
                    .collect::<Vec<_>>(),
            ),
        };
        let g = harness::stat(guest.into_iter());
        eprintln!(
            "{}: boot → ready median {:.1} ms (min {:.1}, max {:.1}; in the guest {:.0} ms), lazy restore → progress median {:.1} ms (min {:.1}, max {:.1})",
            side.binary,
            side.boot.median,
            side.boot.min,
            side.boot.max,
            g.median,
            side.lazy_restore.median,
            side.lazy_restore.min,
            side.lazy_restore.max
        );
        for (what, steps) in [
            ("boot", &side.boot_trace_us),
            ("lazy restore", &side.lazy_restore_trace_us),
        ] {
            if !steps.is_empty() {
                eprintln!("  {what}, median µs since the spawn:");
                for (s, us) in steps {
                    eprintln!("  {us:>9.0}  {s}");
                }
            }
        }
        sides.push(side);
    }
    let report = Report {
        benchmark: "startup",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        load_average: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .into(),
        memory_mib: MEM_MIB,
        boot_cmdline: BOOT_CMDLINE,
        saved_cmdline: SAVED_CMDLINE,
        runs,
        sides,
        goal: "boot to SPANGUEST ready < 20 ms, lazy restore to first progress < 10 ms, from process start",
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
