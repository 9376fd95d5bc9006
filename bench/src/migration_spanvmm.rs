//! spanvmm's engines for `spanvmm-bench migration`: the same guest, hosts and links as QEMU's
//! runs (see `migration.rs`), driven by `spanvmm ctl migrate` with the precopy, postcopy or
//! hybrid service, figures taken from its report and from the destination guest.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

pub use crate::harness::Lines;
use crate::harness::{api_get, collect, cpu_ms, exit_cpu_ms};
use crate::migration::{
    guest_cmdline, max_stall, settle, verify_after, Guest, Hosts, Link, Outcome,
};

/// Migrates a spanvmm guest from host `src` to host `dst` with the `engine` service
/// (`precopy`, ...; `-early` / `-ready` appended: `--commit with-state` / `after-ready`;
/// `@CIPHER` appended: that
/// TLS 1.3 suite).
#[allow(clippy::too_many_arguments)]
pub fn spanvmm_migrate(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    workload: &str,
    engine: &str,
    link: Link,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let guest = Guest {
        workload,
        cmdline: &guest_cmdline(mem, workload),
    };
    spanvmm_migrate_guest(
        bin, plugins, elf, mem, guest, engine, "", None, link, timeout,
    )
}

/// What [`spanvmm_migrate_run`] saw beyond the [`Outcome`].
pub struct Run {
    pub outcome: Outcome,
    /// The source's report.
    pub report: Value,
    /// From `ctl migrate` to the destination's migration `completed` (every page in: for
    /// Scatter-Gather, the gather's end), ms; None if it never completed.
    pub dest_done_ms: Option<u64>,
    /// The destination's incoming-migration progress at its end.
    pub dest: Value,
    /// When `ctl migrate` began (to line up what ran beside the migration).
    pub started: Instant,
}

/// Extra `ctl migrate` arguments for a migration between `hosts`, and what must live while
/// it runs (intermediaries, say).
pub type Prepare<'a> = &'a dyn Fn(&Hosts) -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)>;

/// No extra arguments, nothing to keep.
fn no_preparation(_: &Hosts) -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)> {
    Ok((Vec::new(), Box::new(())))
}

/// [`spanvmm_migrate`] with any guest command line, the service's configuration (JSON;
/// empty: its defaults), and `disks`: (the source's image, the destination's file), the disk
/// moving with the VM.
#[allow(clippy::too_many_arguments)]
pub fn spanvmm_migrate_guest(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    guest: Guest,
    engine: &str,
    config: &str,
    disks: Option<(&Path, &Path)>,
    link: Link,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    spanvmm_migrate_run(
        bin,
        plugins,
        elf,
        mem,
        guest,
        engine,
        config,
        disks,
        link,
        timeout,
        &no_preparation,
    )
    .map(|r| r.outcome)
}

/// [`spanvmm_migrate`] with `prepare`'s extra arguments, and what the destination said.
#[allow(clippy::too_many_arguments)]
pub fn spanvmm_migrate_with(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    workload: &str,
    engine: &str,
    link: Link,
    timeout: Duration,
    prepare: Prepare<'_>,
) -> anyhow::Result<Run> {
    let guest = Guest {
        workload,
        cmdline: &guest_cmdline(mem, workload),
    };
    spanvmm_migrate_run(
        bin, plugins, elf, mem, guest, engine, "", None, link, timeout, prepare,
    )
}

/// The migration itself; it also waits for the destination to say its migration completed.
#[allow(clippy::too_many_arguments)]
fn spanvmm_migrate_run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    guest: Guest,
    engine: &str,
    config: &str,
    disks: Option<(&Path, &Path)>,
    link: Link,
    timeout: Duration,
    prepare: Prepare<'_>,
) -> anyhow::Result<Run> {
    let Guest { workload, cmdline } = guest;
    let disk_arg = |i: usize| -> Vec<String> {
        disks.map_or(vec![], |d| {
            let p = if i == 0 { d.0 } else { d.1 };
            vec!["--disk".into(), format!("path={}", p.display())]
        })
    };
    // One directory per migration: several may run at once (the Scatter-Gather scale rows).
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "spanvmm-bench-smig-{}-{engine}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let hosts = Hosts::new(link, 47_100)?;
    let (extra, keep) = prepare(&hosts)?;
    let tls = dir.join("tls");
    let st = Command::new(bin)
        .args(["migrate-certs", "--out"])
        .arg(&tls)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "spanvmm migrate-certs failed");
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let spawn = |host: &str, args: Vec<String>| run_on(&hosts, host, bin, args);
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let (mut dst, dst_lines, dst_errors) = spawn(
        "dst",
        [
            disk_arg(1),
            vec![
                "--incoming".into(),
                format!("tls://{}", hosts.listen),
                "--tls-dir".into(),
                s(&tls),
                "--api-socket".into(),
                s(&dst_api),
                // The guest's size, so the destination allocates its memory before the source
                // connects (QEMU's destination is given `-m` too).
                "--memory".into(),
                mem.to_string(),
            ],
        ]
        .concat(),
    )?;
    let (mut src, src_lines, src_errors) = spawn(
        "src",
        [
            disk_arg(0),
            vec![
                "--kernel".into(),
                s(elf),
                "--cmdline".into(),
                cmdline.to_string(),
                "--memory".into(),
                mem.to_string(),
                "--api-socket".into(),
                s(&src_api),
            ],
        ]
        .concat(),
    )?;
    let mut src_reaped = false;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !src_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SPANGUEST ready"))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the source guest never got ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The destination's memory is allocated before the clock starts (QEMU's
        // `precopy-prealloc` row is measured the same way).
        while !dst_errors
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("memory of") && l.contains("ready"))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the destination never got its memory ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the guest finish populating before the clock starts (as for QEMU).
        std::thread::sleep(Duration::from_millis(500));
        let report = dir.join("report.json");
        // ENGINE[+stride][-early][@CIPHER]
        let (engine_name, cipher) = engine.split_once('@').unwrap_or((engine, "aes-128-gcm"));
        // `-early` / `-ready`: the hand-over's commit with the state / after `ready` (none:
        // `auto`, the VMM's choice by the link's round trip).
        let (service, early) = if let Some(base) = engine_name.strip_suffix("-early") {
            (base, &["--commit", "with-state"][..])
        } else if let Some(base) = engine_name.strip_suffix("-ready") {
            (base, &["--commit", "after-ready"][..])
        } else {
            (engine_name, &[][..])
        };
        let (service, stride) = match service.strip_suffix("+stride") {
            Some(base) => (base, &["--stride-pages"][..]),
            None => (service, &[][..]),
        };
        let sent_before = hosts.sent_bytes("src");
        let src_cpu_before = cpu_ms(src.id());
        let dst_cpu_before = cpu_ms(dst.id());
        let t0 = Instant::now();
        let out = Command::new("timeout")
            .arg(timeout.as_secs().to_string())
            .arg(bin)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&src_api)
            .args(["migrate", "--to", &format!("tls://{}", hosts.connect)])
            .args(early)
            .args(stride)
            .args(["--cipher", cipher])
            .arg("--plugin")
            .arg(plugins.join(format!("{service}.wasm")))
            // Only when given: `prepare` may pass its own (`--config` is accepted once).
            .args(
                Some(["--config", config])
                    .filter(|_| !config.is_empty())
                    .into_iter()
                    .flatten(),
            )
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--report")
            .arg(&report)
            .args(&extra)
            .output()?;
        let link_bytes = hosts
            .sent_bytes("src")
            .zip(sent_before)
            .map(|(a, b)| a.saturating_sub(b));
        // The destination's own end (post-copy: its last page; Scatter-Gather: the gather's).
        let mut dest_done_ms = None;
        let mut dest = Value::Null;
        let until = Instant::now() + timeout;
        while out.status.success() && Instant::now() < until {
            let Some(p) = api_get(&dst_api, "/vm/migration") else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let phase = p["incoming"]["phase"].as_str().unwrap_or("").to_string();
            // A destination whose migration ended keeps no incoming state: done.
            if phase == "completed" || p.get("incoming").is_none() {
                dest_done_ms = Some(t0.elapsed().as_millis() as u64);
                dest = p["incoming"].clone();
                break;
            }
            if phase == "failed" {
                dest = p["incoming"].clone();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let r: Option<Value> = std::fs::read_to_string(&report)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let completed =
            out.status.success() && r.as_ref().is_some_and(|r| r["result"] == "completed");
        // The source process exits once the guest moved: its CPU comes from its exit status.
        let dst_cpu = cpu_ms(dst.id()).zip(dst_cpu_before).map(|(a, b)| a - b);
        let src_cpu = if completed {
            src_reaped = true;
            exit_cpu_ms(&mut src, Duration::from_secs(15))
                .zip(src_cpu_before)
                .map(|(a, b)| a.saturating_sub(b))
        } else {
            None
        };
        let r = r.unwrap_or_default();
        let from = settle(&dst_lines);
        // With the VMM's migration trace on, show what both sides said.
        if std::env::var_os("SPANVMM_MIGRATION_DEBUG").is_some() {
            for (side, lines) in [("dst", &dst_errors), ("src", &src_errors)] {
                for l in lines.lock().unwrap().iter() {
                    eprintln!("{side}: {l}");
                }
            }
        }
        let verify_bad = if completed {
            verify_after(&dst_lines, from, Duration::from_secs(30))
        } else {
            None
        };
        let end = dst_lines.lock().unwrap().len();
        let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let outcome = Outcome {
            vmm: "spanvmm".into(),
            engine: engine.into(),
            link: link.label(),
            mem_mib: mem,
            workload: workload.into(),
            completed,
            total_ms: n("total_ms") as u64,
            downtime_ms: n("downtime_ms").round() as u64,
            guest_stall_us: max_stall(&dst_lines, 0..from),
            guest_stall_after_us: max_stall(&dst_lines, from..end),
            remote_faults: n("remote_faults") as u64,
            fault_mean_us: n("fault_latency_mean_us") as u64,
            fault_p99_us: n("fault_latency_p99_us") as u64,
            setup_ms: n("setup_ms") as u64,
            bytes: n("bytes") as u64,
            verify_bad,
            cipher: r["cipher"].as_str().unwrap_or(cipher).to_string(),
            cpu_ms: src_cpu.zip(dst_cpu).map(|(s, d)| s + d),
            note: if completed {
                format!(
                    "downtime {:.2} ms (commit {}, rtt {:.1} ms), {} rounds, {} pages sent of {}, {} resent in post-copy, {} faults (mean {} µs, p99 {} µs), handover {}{}",
                    n("downtime_ms"),
                    r["commit"].as_str().unwrap_or("?"),
                    n("rtt_ms"),
                    r["rounds"],
                    r["pages_sent"],
                    r["pages_total"],
                    r["postcopy_resent"],
                    r["remote_faults"],
                    r["fault_latency_mean_us"],
                    r["fault_latency_p99_us"],
                    r["handover"].as_str().unwrap_or("?"),
                    // Post-copy's pacing: why, the path's queue it saw, the window.
                    match r["postcopy_paced"].as_str().unwrap_or("") {
                        "" if r["handover"] != "postcopy" => String::new(),
                        why => format!(
                            ", paced {} (queue {} µs, delivery {:.0} Mbit/s, window {} KiB)",
                            if why.is_empty() { "no" } else { why },
                            r["postcopy_queue_delay_us"],
                            n("postcopy_delivery_bps") * 8e-6,
                            n("postcopy_window_bytes") as u64 / 1024
                        ),
                    }
                )
            } else {
                format!(
                    "failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or_default()
                )
            },
            link_bytes,
            report: r.clone(),
        };
        Ok(Run {
            outcome,
            report: r,
            dest_done_ms,
            dest,
            started: t0,
        })
    })();
    if !src_reaped {
        let _ = src.kill();
        let _ = src.wait();
    }
    let _ = dst.kill();
    let _ = dst.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(keep);
    drop(hosts);
    result
}

/// `spanvmm run ARGS` on host `host` of `hosts`, its console on stdout: the process, and its
/// console and stderr lines as they come.
pub fn run_on(
    hosts: &Hosts,
    host: &str,
    bin: &Path,
    args: Vec<String>,
) -> anyhow::Result<(std::process::Child, Lines, Lines)> {
    let mut c = hosts
        .command(host, bin.to_str().context("binary path")?)
        .arg("run")
        .args(args)
        .args(["--serial", "stdout"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spanvmm run")?;
    let lines = collect(c.stdout.take().context("stdout")?);
    let errors = collect(c.stderr.take().context("stderr")?);
    Ok((c, lines, errors))
}
