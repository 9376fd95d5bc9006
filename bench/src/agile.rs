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

use crate::harness::{api_get, ctl, field, wait_line};
use crate::migration::{qemu_migrate_guest, Guest, Hosts, Link, QemuEngine};
use crate::migration_spanvmm::run_on;
use crate::rounds::{col, interleave, no_extra, Table};

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

/// The guest: `mem * 7 / 8` MiB written, `hot` MiB of it rewritten at 20 000 pages/s.
/// `verify_ms`: 0 for spanvmm (a periodic check reads every page, which would bring the cold
/// set back; the destination is asked once), 2000 for QEMU (no guest API there).
fn cmdline(mem: u64, hot: u64, verify_ms: u64) -> String {
    format!(
        "workload=dirty,verify mib={} wss={hot} rate=20000 stall_us=1000 report_ms=0 verify_ms={verify_ms}",
        mem * 7 / 8
    )
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
    let one = |&(vmm, engine): &(&str, &str)| -> anyhow::Result<Sample> {
        let s = if vmm == "qemu" {
            let cl = cmdline(mem, hot, 2000);
            let guest = Guest {
                workload: "hot-cold",
                cmdline: &cl,
            };
            let o = qemu_migrate_guest(
                elf,
                mem,
                guest,
                QemuEngine::PrecopyPrealloc,
                link,
                limit,
                None,
            )?;
            anyhow::ensure!(o.completed, "{}", o.note);
            Sample {
                migrate_ms: o.total_ms,
                dest_done_ms: o.total_ms,
                link_bytes: o.link_bytes.unwrap_or(o.bytes),
                report_bytes: o.bytes,
                downtime_ms: o.downtime_ms as f64,
                verify_bad: o.verify_bad,
                ..Default::default()
            }
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
            )?
        };
        anyhow::ensure!(s.verify_bad == Some(0), "verify bad={:?}", s.verify_bad);
        Ok(s)
    };
    let freed = |s: &Sample| {
        s.memfd_before
            .zip(s.memfd_after)
            .map(|(a, b)| a.saturating_sub(b) as f64 / (1 << 20) as f64)
    };
    let cases = interleave(
        runs,
        keys.to_vec(),
        |&(vmm, engine): &(&str, &str)| format!("{vmm:>7} {engine:>13}"),
        one,
        |s: &Sample| {
            format!(
                "migrate {} ms, downtime {:.1} ms (destination {:?} ms, {:?} pages dropped in it, \
                 {:?} before), dest done {} ms, link {} MiB, freed {} MiB, located {:?}",
                s.migrate_ms,
                s.downtime_ms,
                s.dest_load_ms,
                s.dropped_at_state,
                s.dropped_before_state,
                s.dest_done_ms,
                s.link_bytes >> 20,
                freed(s).unwrap_or(0.0) as u64,
                s.located_pages,
            )
        },
    );
    let rows = Table {
        key_heads: &["vmm", "engine"],
        key_cells: &|&(vmm, engine): &(&str, &str)| vec![vmm.into(), engine.into()],
        key_json: &|&(vmm, engine): &(&str, &str)| json!({"vmm": vmm, "engine": engine}),
        columns: vec![
            col("freed_mib", "source freed MiB", 1.0, 1, freed),
            col("migrate_ms", "migration s", 1e3, 1, |s: &Sample| {
                Some(s.migrate_ms as f64)
            }),
            col(
                "dest_done_ms",
                "destination done s",
                1e3,
                1,
                |s: &Sample| Some(s.dest_done_ms as f64),
            ),
            col("link_mib", "link MiB", 1.0, 1, |s: &Sample| {
                Some(s.link_bytes as f64 / (1 << 20) as f64)
            }),
            col("downtime_ms", "downtime ms", 1.0, 1, |s: &Sample| {
                Some(s.downtime_ms)
            }),
        ],
        extra_heads: &[],
        extra: &no_extra,
    }
    .rows(&cases)?;
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
