//! `spanvmm-bench agile`: agile migration (issue #18 item 4). One VM with a small hot set and
//! a large cold set (spanguest `dirty,verify`: `mib` written once, `wss` rewritten for ever)
//! on namespace hosts joined by a tbf-shaped link; two `redis-server` intermediaries in the
//! root namespace, reached over each host's own link. Rows, interleaved run by run:
//!
//! - `spanvmm agile-precopy`: the `agile` service parks the cold set at the intermediaries
//!   while the VM runs (source memory freed: the memfd before and after), then a pre-copy
//!   moves the resident pages and a reference per parked page; the destination gathers the
//!   parked pages from the intermediaries;
//! - `spanvmm precopy`: the same VM, no parking, a plain pre-copy;
//! - `qemu precopy`: the same guest in QEMU, pre-copy into a `-mem-prealloc` destination.
//!
//! Each: the migration's time (`ctl migrate` to the source's end), bytes on the direct link
//! (the source host's tbf count), the destination's end (every page in: for agile, the
//! gather's end) and the guest's check there (`verify bad=0`); median and spread.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use netlab::RedisServer;
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{field, stat, Stat};
use crate::migration::{qemu_migrate_guest, Guest, Hosts, Link, QemuEngine};
use crate::migration_spanvmm::run_on;

/// One measured migration.
#[derive(Serialize, Default)]
struct Sample {
    /// `ctl migrate` until the source's migration ended, ms.
    migrate_ms: u64,
    /// Until the destination had every page (agile: the gather's end), ms.
    dest_done_ms: u64,
    /// Bytes the source host sent on its link during the migration (tbf count).
    link_bytes: u64,
    /// The source's report: bytes on the migration link (TLS records).
    report_bytes: u64,
    downtime_ms: f64,
    /// spanvmm: the destination's share of the downtime (state received to vCPUs running),
    /// and the pages it dropped from guest memory inside it (the located ones are dropped at
    /// the source's pre-pause `sync`).
    #[serde(skip_serializing_if = "Option::is_none")]
    dest_load_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped_at_state: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped_before_state: Option<u64>,
    /// spanvmm: pre-copy rounds, pages sent (data and zero markers) and of those zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    rounds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pages_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_pages: Option<u64>,
    /// Agile: the source's memfd before the first park and once parked, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    memfd_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memfd_after: Option<u64>,
    /// Agile: attach to parked, ms; pages evicted; pages sent as references; guest paused
    /// by the parks in all, µs; bytes the parks sent to the intermediaries.
    #[serde(skip_serializing_if = "Option::is_none")]
    park_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evicted_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    located_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    park_paused_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_intermediaries_bytes: Option<u64>,
    verify_bad: Option<u64>,
}

#[derive(Serialize)]
struct Row {
    vmm: String,
    engine: String,
    failed: usize,
    migrate_ms: Stat,
    dest_done_ms: Stat,
    link_mib: Stat,
    downtime_ms: Stat,
    #[serde(skip_serializing_if = "Option::is_none")]
    freed_mib: Option<Stat>,
    runs: Vec<Sample>,
}

/// The guest: `mem * 7 / 8` MiB written, `hot` MiB of it rewritten at 20 000 pages/s.
/// `verify_ms`: 0 for spanvmm (a periodic check reads every page, which would bring the cold
/// set back; the destination is asked once), 2000 for QEMU (no guest API there).
fn cmdline(mem: u64, hot: u64, verify_ms: u64) -> String {
    format!(
        "workload=dirty,verify mib={} wss={hot} rate=20000 stall_us=1000 report_ms=0 verify_ms={verify_ms}",
        mem * 7 / 8
    )
}

/// `GET path` on the API socket `api`: the JSON body (None: no answer).
fn api_get(api: &Path, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok()
}

fn ctl(bin: &Path, api: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "ctl {args:?}: {text}");
    Ok(text)
}

/// The agile service's `stats` (retried while the service is busy).
fn agile_stats(bin: &Path, api: &Path) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ctl(bin, api, &["plugin", "call", "agile", "stats", ""]) {
            Ok(t) => {
                let v: Value = serde_json::from_str(&t).context("stats")?;
                return Ok(v["result"].clone());
            }
            Err(e) if Instant::now() < deadline && e.to_string().contains("busy") => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    }
}

fn wait_line(
    lines: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    from: usize,
    needle: &str,
    t: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .skip(from)
            .find(|l| l.contains(needle))
        {
            return Ok(l.clone());
        }
        anyhow::ensure!(Instant::now() < deadline, "no {needle:?} within {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One spanvmm migration of the hot/cold VM, parked first when `agile`.
#[allow(clippy::too_many_arguments)]
fn spanvmm_once(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    hot: u64,
    link: Link,
    agile: bool,
    limit: Duration,
) -> anyhow::Result<Sample> {
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-agile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let hosts = Hosts::new(link, 47_150)?;
    let gw = hosts
        .gateway("src")
        .context("agile needs the namespace hosts (a shaped link)")?;
    let redis: Vec<RedisServer> = if agile {
        (0..2)
            .map(|i| {
                RedisServer::start_with(
                    Command::new("redis-server"),
                    gw.into(),
                    47_330 + i,
                    &dir.join(format!("redis-{i}")),
                )
                .context("start redis-server")
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        Vec::new()
    };
    let tls = dir.join("tls");
    let st = Command::new(bin)
        .args(["migrate-certs", "--out"])
        .arg(&tls)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "spanvmm migrate-certs failed");
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let spawn = |host: &str, args: Vec<String>| run_on(&hosts, host, bin, args);
    let (mut dst, dst_lines, dst_errors) = spawn(
        "dst",
        vec![
            "--incoming".into(),
            format!("tls://{}", hosts.listen),
            "--tls-dir".into(),
            s(&tls),
            "--api-socket".into(),
            s(&dst_api),
            "--memory".into(),
            mem.to_string(),
        ],
    )?;
    let (mut src, src_lines, src_errors) = spawn(
        "src",
        vec![
            "--kernel".into(),
            s(elf),
            "--cmdline".into(),
            cmdline(mem, hot, 0),
            "--memory".into(),
            mem.to_string(),
            "--api-socket".into(),
            s(&src_api),
        ],
    )?;
    let result = (|| {
        wait_line(&src_lines, 0, "SPANGUEST ready", Duration::from_secs(60))?;
        wait_line(
            &dst_errors,
            0,
            "ready for the incoming",
            Duration::from_secs(60),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let mut sample = Sample::default();
        if agile {
            let cfg = json!({
                "intermediaries": redis.iter().map(|r| r.addr().to_string()).collect::<Vec<_>>(),
                "cold_ms": 2000,
                "max_evict_mb": mem,
            });
            let t = Instant::now();
            ctl(
                bin,
                &src_api,
                &[
                    "plugin",
                    "attach",
                    &s(&plugins.join("agile.wasm")),
                    "--config",
                    &cfg.to_string(),
                ],
            )?;
            let before = agile_stats(bin, &src_api)?;
            let cold = (mem * 7 / 8 - hot) * 256;
            // Parked: 9/10 of the cold set evicted, or no progress for 10 s.
            let (mut last, mut since) = (0, Instant::now());
            let parked = loop {
                let v = agile_stats(bin, &src_api)?;
                let e = v["evicted_now"].as_u64().unwrap_or(0);
                if e >= cold * 9 / 10 || (e > 0 && since.elapsed() > Duration::from_secs(10)) {
                    break v;
                }
                if e != last {
                    (last, since) = (e, Instant::now());
                }
                anyhow::ensure!(t.elapsed() < limit, "the cold set was not parked: {v}");
                std::thread::sleep(Duration::from_millis(100));
            };
            sample.park_ms = Some(t.elapsed().as_millis() as u64);
            sample.memfd_before = before["memfd_bytes"].as_u64();
            sample.memfd_after = parked["memfd_bytes"].as_u64();
            sample.evicted_pages = parked["evicted_now"].as_u64();
            sample.park_paused_us = parked["paused_us"].as_u64();
            sample.to_intermediaries_bytes = parked["store"]["wire_out"].as_u64();
        }
        let report = dir.join("report.json");
        let sent_before = hosts.sent_bytes("src");
        let t0 = Instant::now();
        let out = Command::new("timeout")
            .arg(limit.as_secs().to_string())
            .arg(bin)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&src_api)
            .args(["migrate", "--to", &format!("tls://{}", hosts.connect)])
            .arg("--plugin")
            .arg(plugins.join("precopy.wasm"))
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--report")
            .arg(&report)
            .output()?;
        sample.migrate_ms = t0.elapsed().as_millis() as u64;
        sample.link_bytes = hosts
            .sent_bytes("src")
            .zip(sent_before)
            .map_or(0, |(a, b)| a.saturating_sub(b));
        anyhow::ensure!(
            out.status.success(),
            "migration failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
        anyhow::ensure!(r["result"] == "completed", "migration: {}", r["error"]);
        sample.report_bytes = r["bytes"].as_u64().unwrap_or(0);
        sample.downtime_ms = r["downtime_ms"].as_f64().unwrap_or(0.0);
        sample.dest_load_ms = r["dest_load_ms"].as_f64();
        sample.located_pages = r["agile"]["located_pages"].as_u64();
        sample.rounds = r["rounds"].as_u64();
        sample.pages_sent = r["pages_sent"].as_u64();
        sample.zero_pages = r["zero_pages"].as_u64();
        // The destination's end: every page in (agile: gathered from the intermediaries).
        loop {
            let p = api_get(&dst_api, "/vm/migration");
            let phase = p
                .as_ref()
                .and_then(|p| p["incoming"]["phase"].as_str().map(str::to_string));
            if let Some(inc) = p.as_ref().map(|p| &p["incoming"]) {
                // (Kept from the last answer that had them: a finished migration's go.)
                if let Some(n) = inc["dropped_at_state"].as_u64() {
                    sample.dropped_at_state = Some(n);
                }
                if let Some(n) = inc["dropped_before_state"].as_u64() {
                    sample.dropped_before_state = Some(n);
                }
            }
            match phase.as_deref() {
                Some("completed") => break,
                Some("failed") => {
                    anyhow::bail!("the destination failed: {}", p.unwrap_or_default())
                }
                // A destination whose migration ended keeps no incoming state: done.
                None if p.as_ref().is_some_and(|p| p.get("incoming").is_none()) => break,
                _ => {}
            }
            anyhow::ensure!(t0.elapsed() < limit, "the destination never completed");
            std::thread::sleep(Duration::from_millis(20));
        }
        sample.dest_done_ms = t0.elapsed().as_millis() as u64;
        let from = dst_lines.lock().unwrap().len();
        ctl(bin, &dst_api, &["guest", "verify"])?;
        let v = wait_line(
            &dst_lines,
            from,
            "SPANGUEST verify",
            Duration::from_secs(120),
        )?;
        sample.verify_bad = field(&v, "bad");
        Ok(sample)
    })();
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // With the migration trace on (`SPANVMM_MIGRATION_DEBUG`), both sides' stderr are kept
    // for reading where the downtime goes.
    if std::env::var_os("SPANVMM_MIGRATION_DEBUG").is_some() {
        let tag = if agile { "agile-precopy" } else { "precopy" };
        for (side, lines) in [("src", &src_errors), ("dst", &dst_errors)] {
            let p = std::env::temp_dir().join(format!("spanvmm-bench-agile-{tag}-{side}.log"));
            let _ = std::fs::write(&p, lines.lock().unwrap().join("\n") + "\n");
            eprintln!("trace: {}", p.display());
        }
    }
    drop(redis);
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs `runs` interleaved rounds of the three rows and writes `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    hot: u64,
    mbit: u64,
    runs: usize,
    out: &Path,
) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        hot < mem * 7 / 8,
        "the hot set must be smaller than the {} MiB written",
        mem * 7 / 8
    );
    let link = Link::Shaped { mbit, rtt_ms: 2 };
    // Four times the whole memory over the link, at least two minutes.
    let limit = Duration::from_secs((mem * 8 * 4 / mbit).max(120));
    let keys = [
        ("spanvmm", "agile-precopy"),
        ("spanvmm", "precopy"),
        ("qemu", "precopy"),
    ];
    let mut results: Vec<Vec<Sample>> = keys.iter().map(|_| Vec::new()).collect();
    let mut failed = [0usize; 3];
    for round in 0..runs {
        for (i, &(vmm, engine)) in keys.iter().enumerate() {
            let r = if vmm == "qemu" {
                let cl = cmdline(mem, hot, 2000);
                let guest = Guest {
                    workload: "hot-cold",
                    cmdline: &cl,
                };
                qemu_migrate_guest(
                    elf,
                    mem,
                    guest,
                    QemuEngine::PrecopyPrealloc,
                    link,
                    limit,
                    None,
                )
                .and_then(|o| {
                    anyhow::ensure!(o.completed, "{}", o.note);
                    Ok(Sample {
                        migrate_ms: o.total_ms,
                        dest_done_ms: o.total_ms,
                        link_bytes: o.link_bytes.unwrap_or(o.bytes),
                        report_bytes: o.bytes,
                        downtime_ms: o.downtime_ms as f64,
                        verify_bad: o.verify_bad,
                        ..Default::default()
                    })
                })
            } else {
                spanvmm_once(
                    bin,
                    plugins,
                    elf,
                    mem,
                    hot,
                    link,
                    engine == "agile-precopy",
                    limit,
                )
            };
            match r {
                Ok(s) if s.verify_bad == Some(0) => {
                    eprintln!(
                        "round {round}: {vmm:>7} {engine:>13}: migrate {} ms, downtime {:.1} ms (destination {:?} ms, {:?} pages dropped in it, {:?} before), dest done {} ms, link {} MiB, freed {} MiB, located {:?}",
                        s.migrate_ms,
                        s.downtime_ms,
                        s.dest_load_ms,
                        s.dropped_at_state,
                        s.dropped_before_state,
                        s.dest_done_ms,
                        s.link_bytes >> 20,
                        s.memfd_before.zip(s.memfd_after).map_or(0, |(a, b)| a.saturating_sub(b) >> 20),
                        s.located_pages,
                    );
                    results[i].push(s);
                }
                Ok(s) => {
                    eprintln!(
                        "round {round}: {vmm} {engine}: FAILED: verify bad={:?}",
                        s.verify_bad
                    );
                    failed[i] += 1;
                }
                Err(e) => {
                    eprintln!("round {round}: {vmm} {engine}: FAILED: {e:#}");
                    failed[i] += 1;
                }
            }
        }
    }
    let rows: Vec<Row> = keys
        .iter()
        .zip(results)
        .zip(failed)
        .filter(|((_, runs), _)| !runs.is_empty())
        .map(|((&(vmm, engine), runs), failed)| Row {
            vmm: vmm.into(),
            engine: engine.into(),
            failed,
            migrate_ms: stat(runs.iter().map(|s| s.migrate_ms as f64)),
            dest_done_ms: stat(runs.iter().map(|s| s.dest_done_ms as f64)),
            link_mib: stat(runs.iter().map(|s| s.link_bytes as f64 / (1 << 20) as f64)),
            downtime_ms: stat(runs.iter().map(|s| s.downtime_ms)),
            freed_mib: runs[0].memfd_before.map(|_| {
                stat(runs.iter().map(|s| {
                    s.memfd_before
                        .zip(s.memfd_after)
                        .map_or(0.0, |(a, b)| a.saturating_sub(b) as f64 / (1 << 20) as f64)
                }))
            }),
            runs,
        })
        .collect();
    let f = |x: &Stat, scale: f64| {
        format!(
            "{:.1} ({:.1}–{:.1})",
            x.median / scale,
            x.min / scale,
            x.max / scale
        )
    };
    eprintln!("| vmm | engine | source freed MiB | migration s | destination done s | link MiB | downtime ms |");
    for r in &rows {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.vmm,
            r.engine,
            r.freed_mib.as_ref().map_or("–".into(), |x| f(x, 1.0)),
            f(&r.migrate_ms, 1e3),
            f(&r.dest_done_ms, 1e3),
            f(&r.link_mib, 1.0),
            f(&r.downtime_ms, 1.0),
        );
    }
    let report = json!({
        "benchmark": "agile",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "written_mib": mem * 7 / 8,
        "hot_mib": hot,
        "runs": runs,
        "notes": "Agile migration: the agile service parks the cold set (not dirtied for 2 s) at two redis-server intermediaries (MAC only, one copy) while the VM runs, then a pre-copy sends the resident pages and one location per parked page; the destination gathers the parked pages from the intermediaries. Against a plain pre-copy of the same VM and QEMU pre-copy (-mem-prealloc) of the same guest on the same link. migrate_ms: ctl migrate to the source's end; dest_done_ms: until the destination has every page; link: bytes the source host sent on its shaped link.",
        "rows": rows,
    });
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
