//! `spanvmm-bench scatter-gather`: the Scatter-Gather paper's Fig. 9 analogue (issue #18).
//! A source and a slow destination: network namespaces, the source's link tbf-shaped to
//! `src_mbit`, the destination's to a sixth of it; two `redis-server` intermediaries in the
//! root namespace, reached by the source over its own (fast) link and by the destination over
//! its (slow) one. For an idle and a busy guest: eviction time (from `ctl migrate` until the
//! source holds nothing the destination lacks and exits) and total time (until the
//! destination has every page) of spanvmm's pre-copy, post-copy and Scatter-Gather, and of
//! QEMU's pre-copy and post-copy on the same links; rows interleaved run by run, each figure
//! the median of the runs with its spread. Pre-copy's eviction is its total time; post-copy's
//! too (the source is free once its last page is out, which is when the destination has it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use netlab::RedisServer;
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{stat, Stat};
use crate::migration::{qemu_migrate, Hosts, Link, QemuEngine};
use crate::migration_spanvmm::spanvmm_migrate_with;

/// One measured migration.
#[derive(Serialize)]
struct Sample {
    eviction_ms: u64,
    total_ms: u64,
    /// Bytes on the migration link (source → destination).
    link_bytes: u64,
    /// Scatter-Gather: source → intermediaries, intermediaries → destination, dedup hits.
    #[serde(skip_serializing_if = "Option::is_none")]
    scatter: Option<Value>,
    verify_bad: Option<u64>,
}

#[derive(Serialize)]
struct Row {
    vmm: String,
    engine: String,
    workload: String,
    failed: usize,
    eviction_ms: Stat,
    total_ms: Stat,
    runs: Vec<Sample>,
}

/// Intermediaries in the root namespace, bound on the source's gateway address.
fn intermediaries(hosts: &Hosts, dir: &Path) -> anyhow::Result<Vec<RedisServer>> {
    let ip = hosts
        .gateway("src")
        .context("scatter-gather needs the namespace hosts (a shaped link)")?;
    (0..2)
        .map(|i| {
            let port = 47_300 + i;
            RedisServer::start_with(
                std::process::Command::new("redis-server"),
                ip.into(),
                port,
                &dir.join(format!("redis-{i}")),
            )
            .context("start redis-server")
        })
        .collect()
}

/// Runs `runs` rounds of every row and writes `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    src_mbit: u64,
    runs: usize,
    workloads: &[&str],
    out: &Path,
) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    let link = Link::Asymmetric {
        src_mbit,
        dst_mbit: src_mbit / 6,
        rtt_ms: 2,
    };
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-sg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut keys = Vec::new();
    for &w in workloads {
        for (vmm, engine) in [
            ("spanvmm", "scatter-gather"),
            ("spanvmm", "postcopy"),
            ("spanvmm", "precopy"),
            ("qemu", "postcopy"),
            ("qemu", "precopy"),
        ] {
            keys.push((vmm, engine, w));
        }
    }
    // Four times what the memory needs on the slow link, at least two minutes.
    let limit = Duration::from_secs((mem * 8 * 4 / (src_mbit / 6)).max(120));
    let mut results: Vec<Vec<Sample>> = keys.iter().map(|_| Vec::new()).collect();
    let mut failed = vec![0usize; keys.len()];
    for round in 0..runs {
        for (i, &(vmm, engine, workload)) in keys.iter().enumerate() {
            let r = if vmm == "qemu" {
                let e = match engine {
                    "precopy" => QemuEngine::PrecopyPrealloc,
                    _ => QemuEngine::Postcopy,
                };
                qemu_migrate(elf, mem, workload, e, link, limit, None).map(|o| {
                    (
                        o.completed && o.verify_bad == Some(0),
                        o.note.clone(),
                        Sample {
                            eviction_ms: o.total_ms,
                            total_ms: o.total_ms,
                            link_bytes: o.bytes,
                            scatter: None,
                            verify_bad: o.verify_bad,
                        },
                    )
                })
            } else {
                let sg = engine == "scatter-gather";
                let rdir = dir.clone();
                let prepare = move |hosts: &Hosts| -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)> {
                    if !sg {
                        return Ok((Vec::new(), Box::new(())));
                    }
                    let srv = intermediaries(hosts, &rdir)?;
                    let addrs: Vec<SocketAddr> = srv.iter().map(|s| s.addr()).collect();
                    let config = json!({
                        "intermediaries": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        "replicas": 1,
                    });
                    Ok((
                        vec!["--config".into(), config.to_string()],
                        Box::new(srv),
                    ))
                };
                spanvmm_migrate_with(bin, plugins, elf, mem, workload, engine, link, limit, &prepare)
                    .map(|run| {
                        let o = &run.outcome;
                        let r = &run.report;
                        let total = run.dest_done_ms.unwrap_or(o.total_ms);
                        let scatter = sg.then(|| {
                            let read: u64 = run.dest["gather"]["store"]["intermediaries"]
                                .as_array()
                                .map(|a| a.iter().map(|i| i["wire_in"].as_u64().unwrap_or(0)).sum())
                                .unwrap_or(0);
                            json!({
                                "direct_pages": r["scatter"]["direct_pages"],
                                "scattered_pages": r["scatter"]["scattered_pages"],
                                "zero_pages": r["scatter"]["zero_pages"],
                                "src_to_intermediaries_bytes": r["scatter"]["bytes_to_intermediaries"],
                                "intermediaries_to_dst_bytes": read,
                                "dedup_hits": r["scatter"]["dedup_hits"],
                            })
                        });
                        (
                            o.completed && o.verify_bad == Some(0) && run.dest_done_ms.is_some(),
                            o.note.clone(),
                            Sample {
                                // The source's migration ends when it holds nothing the
                                // destination lacks (Scatter-Gather: every location sent).
                                eviction_ms: o.total_ms,
                                total_ms: total.max(o.total_ms),
                                link_bytes: o.bytes,
                                scatter,
                                verify_bad: o.verify_bad,
                            },
                        )
                    })
            }
            .with_context(|| format!("{vmm} {engine} {workload}"));
            match r {
                Ok((true, _, s)) => {
                    eprintln!(
                        "round {round}: {vmm:>7} {engine:>14} {workload:>5}: eviction {} ms, total {} ms, link {} MiB {}",
                        s.eviction_ms,
                        s.total_ms,
                        s.link_bytes >> 20,
                        s.scatter.as_ref().map(|v| v.to_string()).unwrap_or_default()
                    );
                    results[i].push(s);
                }
                Ok((false, note, _)) => {
                    eprintln!("round {round}: {vmm} {engine} {workload}: FAILED: {note}");
                    failed[i] += 1;
                }
                Err(e) => {
                    eprintln!("round {round}: {vmm} {engine} {workload}: FAILED: {e:#}");
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
        .map(|((&(vmm, engine, workload), runs), failed)| Row {
            vmm: vmm.into(),
            engine: engine.into(),
            workload: workload.into(),
            failed,
            eviction_ms: stat(runs.iter().map(|s| s.eviction_ms as f64)),
            total_ms: stat(runs.iter().map(|s| s.total_ms as f64)),
            runs,
        })
        .collect();
    eprintln!("| workload | vmm | engine | eviction s | total s |");
    for r in &rows {
        let s = |x: &Stat| {
            format!(
                "{:.1} ({:.1}–{:.1})",
                x.median / 1e3,
                x.min / 1e3,
                x.max / 1e3
            )
        };
        eprintln!(
            "| {} | {} | {} | {} | {} |",
            r.workload,
            r.vmm,
            r.engine,
            s(&r.eviction_ms),
            s(&r.total_ms)
        );
    }
    let report = json!({
        "benchmark": "scatter-gather",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "runs": runs,
        "notes": "Fig. 9 analogue: the destination's link at 1/6 of the source's. Eviction: from ctl migrate until the source's migration ends (pre-copy and post-copy: every page at the destination; Scatter-Gather: every page at the destination or at an intermediary). Total: until the destination has every page. Two redis-server intermediaries in the root namespace, one copy of each page. QEMU pre-copy into a -mem-prealloc destination, post-copy switched at once.",
        "goals": {
            "eviction": "Scatter-Gather ≥ 5× shorter than pre-copy and post-copy",
            "total": "Scatter-Gather ≤ 1.15× post-copy",
        },
        "rows": rows,
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
