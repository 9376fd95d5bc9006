//! `spanvmm ctl migrate`: starts the migration, shows its progress, writes the report and
//! its plot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use l1_services::migration::{self, report};
use serde_json::{json, Value};

use crate::migrate::REPORT_GRACE;

/// `ctl migrate`: starts the migration, shows progress, writes the report and its plot; an
/// error says where the guest is when the migration did not complete.
pub fn ctl_migrate(socket: &Path, body: Value, report_path: &Path) -> anyhow::Result<()> {
    let (code, v) = crate::api::client::call(socket, "PUT", "/vm/migrate", Some(&body))?;
    if code != 200 {
        anyhow::bail!(
            "{} (HTTP {code})",
            v.get("error").and_then(Value::as_str).unwrap_or("failed")
        );
    }
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("the VMM's answer names no migration: {v}"))?;
    // Polled as the starter: the source waits for this poll to have the report before it
    // exits (other clients may watch GET /vm/migration meanwhile).
    let poll = json!({ "poll": id });
    let mut last_line = Instant::now() - Duration::from_secs(1);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let (code, v) = crate::api::client::call(socket, "PUT", "/vm/migrate", Some(&poll))
            .map_err(|e| {
                anyhow::anyhow!(
                    "lost the source VMM before migration {id}'s report ({e:#}); a source \
                     exits on its own only after a completed migration (once its report was \
                     fetched, or {}s after), otherwise it was shut down or its guest stopped: \
                     ask the destination whether the guest runs there",
                    REPORT_GRACE.as_secs()
                )
            })?;
        if code != 200 {
            anyhow::bail!("migration status: HTTP {code}: {v}");
        }
        if let Some(r) = v.get("report") {
            eprintln!();
            std::fs::write(report_path, serde_json::to_string_pretty(r)?)
                .with_context(|| format!("write {}", report_path.display()))?;
            let rep: migration::Report =
                serde_json::from_value(r.clone()).context("the report does not parse")?;
            let svg = report_path.with_extension("svg");
            std::fs::write(&svg, report::svg(&rep))
                .with_context(|| format!("write {}", svg.display()))?;
            println!("{}", serde_json::to_string(r)?);
            return verdict(&rep, report_path);
        }
        let Some(p) = v.get("progress") else {
            anyhow::bail!("no migration is running: {v}");
        };
        if last_line.elapsed() >= Duration::from_millis(250) {
            last_line = Instant::now();
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            eprint!(
                "\r{:>9} pages sent  {:>7.1} MB/s  round {:>2}  {:>8} pending  {:>8} needed  {:>5} faults  [{}]   ",
                n("pages_sent"),
                n("rate_bytes_per_sec") as f64 / 1e6,
                n("rounds"),
                n("pages_pending"),
                n("pages_needed"),
                n("remote_faults"),
                p["phase"].as_str().unwrap_or("?")
            );
        }
    }
}

/// What a finished migration's report means for the operator: where the guest is.
fn verdict(rep: &migration::Report, report_path: &Path) -> anyhow::Result<()> {
    let at = report_path.display();
    match (rep.result.as_str(), rep.source_vm.as_str()) {
        ("completed", _) => Ok(()),
        ("in-doubt", _) => anyhow::bail!(
            "the hand-over is in doubt: the VM stays paused at the source and may run at the \
             destination; resume it at the source only once the destination is known not to \
             run it (report in {at})"
        ),
        (_, "running") => {
            anyhow::bail!("the migration failed; the VM runs on at the source (report in {at})")
        }
        _ if rep.handover == "postcopy" => anyhow::bail!(
            "post-copy failed after the hand-over: the VM is paused at the source, which keeps \
             all of its memory; its CPU state there is stale (report in {at})"
        ),
        _ => anyhow::bail!(
            "the migration failed; the VM stays paused at the source, as it was before (report \
             in {at})"
        ),
    }
}
