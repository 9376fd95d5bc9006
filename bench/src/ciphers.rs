//! `spanvmm-bench ciphers`: what encryption costs a migration, per cipher × engine ×
//! workload (the seeds' "encrypted live migration evaluation"; CloudNet issue, item 6), with
//! QEMU on the same link in the same run: plaintext (its default) and over TLS 1.3 with the
//! same cipher (`tls-creds-x509`, a GnuTLS priority string naming the one suite). Rows are
//! interleaved run by run; each figure is the median of the runs with its spread.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::harness::{stat, Stat};
use crate::migration::{qemu_migrate, Link, Outcome, QemuEngine};
use crate::migration_spanvmm::spanvmm_migrate;

const CIPHERS: [&str; 3] = ["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"];

#[derive(Serialize)]
struct Row {
    vmm: String,
    engine: String,
    workload: String,
    cipher: String,
    /// Runs that could not be made (left out of the figures).
    failed: usize,
    runs: Vec<Outcome>,
    total_ms: Stat,
    downtime_ms: Stat,
    cpu_ms: Stat,
    guest_stall_us: Stat,
}

/// Runs `runs` rounds of every row on `link` with `mem` MiB guests and writes `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    link: Link,
    runs: usize,
    workloads: &[&str],
    ciphers: Option<&str>,
    out: &Path,
) -> anyhow::Result<()> {
    let ciphers: Vec<&str> = match ciphers {
        Some(list) => list.split(',').collect(),
        None => CIPHERS.to_vec(),
    };
    if let Some(c) = ciphers.iter().find(|c| !CIPHERS.contains(c)) {
        anyhow::bail!("--ciphers: unknown cipher {c:?} ({})", CIPHERS.join(", "));
    }
    let certs = std::env::temp_dir().join(format!("spanvmm-bench-ciphers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    let st = Command::new(bin)
        .args(["migrate-certs", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "spanvmm migrate-certs failed");
    // (vmm, engine, workload, cipher) in the order they run within a round.
    let mut keys = Vec::new();
    for &workload in workloads {
        for engine in ["precopy", "postcopy"] {
            keys.push(("qemu", engine, workload, "plaintext"));
            for &cipher in &ciphers {
                keys.push(("qemu", engine, workload, cipher));
                keys.push(("spanvmm", engine, workload, cipher));
                // The same migration with progression pages as 16 bytes (`--stride-pages`):
                // pre-copy rounds only, so a post-copy row would be the plain one again.
                if engine == "precopy" {
                    keys.push(("spanvmm", "precopy+stride", workload, cipher));
                }
            }
        }
    }
    let limit = Duration::from_secs(120);
    let mut results: Vec<Vec<Outcome>> = keys.iter().map(|_| Vec::new()).collect();
    let mut failed = vec![0usize; keys.len()];
    for round in 0..runs {
        for (i, &(vmm, engine, workload, cipher)) in keys.iter().enumerate() {
            let o = if vmm == "qemu" {
                let e = match engine {
                    "precopy" | "precopy+stride" => QemuEngine::PrecopyPrealloc,
                    _ => QemuEngine::Postcopy,
                };
                let tls = (cipher != "plaintext").then_some((certs.as_path(), cipher));
                qemu_migrate(elf, mem, workload, e, link, limit, tls)
            } else {
                let e = format!("{engine}@{cipher}");
                spanvmm_migrate(bin, plugins, elf, mem, workload, &e, link, limit)
            }
            .with_context(|| format!("{vmm} {engine} {workload} {cipher}"));
            // A run that could not be made (e.g. a guest that never started on a busy host)
            // is counted and left out, not the whole benchmark.
            let o = match o {
                Ok(o) if o.completed && o.verify_bad == Some(0) => o,
                Ok(o) => {
                    eprintln!(
                        "round {round}: {vmm} {engine} {workload} {cipher}: FAILED: {}",
                        o.note
                    );
                    failed[i] += 1;
                    continue;
                }
                Err(e) => {
                    eprintln!("round {round}: {vmm} {engine} {workload} {cipher}: FAILED: {e:#}");
                    failed[i] += 1;
                    continue;
                }
            };
            eprintln!(
                "round {round}: {vmm:>7} {engine:>8} {workload:>5} {cipher:>17}: total {} ms, downtime {} ms, cpu {:?} ms, stall {} µs, bad={:?} {}",
                o.total_ms, o.downtime_ms, o.cpu_ms, o.guest_stall_us, o.verify_bad,
                if o.completed { "" } else { &o.note }
            );
            results[i].push(o);
        }
    }
    let rows: Vec<Row> = keys
        .iter()
        .zip(results)
        .zip(failed)
        .filter(|((_, runs), _)| !runs.is_empty())
        .map(|((&(vmm, engine, workload, cipher), runs), failed)| Row {
            failed,
            vmm: vmm.into(),
            engine: engine.into(),
            workload: workload.into(),
            cipher: cipher.into(),
            total_ms: stat(runs.iter().map(|o| o.total_ms as f64)),
            downtime_ms: stat(runs.iter().map(|o| o.downtime_ms as f64)),
            cpu_ms: stat(runs.iter().map(|o| o.cpu_ms.unwrap_or(0) as f64)),
            guest_stall_us: stat(runs.iter().map(|o| o.guest_stall_us as f64)),
            runs,
        })
        .collect();
    eprintln!("| vmm | engine | workload | cipher | total ms | downtime ms | CPU ms (src+dst) | guest stall ms |");
    for r in &rows {
        let s =
            |x: &Stat, k: f64| format!("{:.0} ({:.0}–{:.0})", x.median / k, x.min / k, x.max / k);
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.vmm,
            r.engine,
            r.workload,
            r.cipher,
            s(&r.total_ms, 1.0),
            s(&r.downtime_ms, 1.0),
            s(&r.cpu_ms, 1.0),
            s(&r.guest_stall_us, 1000.0)
        );
    }
    let report = json!({
        "benchmark": "ciphers",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "runs": runs,
        "notes": "QEMU pre-copy into a -mem-prealloc destination, post-copy switched at once; spanvmm's destination prepared with --memory. CPU = source + destination process CPU from the migration's start to its end, the guest's vCPU time included.",
        "rows": rows,
    });
    let _ = std::fs::remove_dir_all(&certs);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
