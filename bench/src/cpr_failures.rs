//! `spanvmm-bench live-update-failures`: what becomes of the guest when the new VMM process of a
//! same-host live update dies, spanvmm against QEMU's cpr-transfer, in one command. spanvmm's
//! side is the chaos campaign's live-update series (the new process SIGKILLed at random points
//! of the hand-over); QEMU's side kills the new QEMU of a cpr-transfer the same way — before
//! `migrate`, at random points after it (drawn over 1.5 times the measured hand-over time), and
//! after `completed` — and records what the old QEMU does with the guest. One more case asks
//! what an operator's `cont` does on the old QEMU while the new one runs the guest.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::chaos::{self, Rng};
use crate::harness::median;
use crate::live_update::{next_verify, CprChain, NextQemu};

/// A small guest: the hand-over does not depend on memory size (no copy on either side).
const MEM_MIB: u64 = 256;

#[derive(Serialize)]
struct QemuRecord {
    fault: String,
    fault_ms: u64,
    /// The old QEMU's run state once the new one was dead (`query-status`).
    old_status: String,
    /// The old QEMU's migration status then (`query-migrate`).
    migration_status: String,
    outcome: String,
    lost: bool,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    seed: u64,
    spanvmm: chaos::Report,
    qemu_cpr_transfer: Vec<QemuRecord>,
    qemu_outcomes: Vec<(String, usize)>,
}

fn status_of(q: &mut crate::live_update::Qmp) -> String {
    q.cmd("query-status", json!({}))
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_else(|| "no answer".into())
}

/// One cpr-transfer whose new QEMU is SIGKILLed `at` ms after `migrate` (None: before it;
/// `Some(u64::MAX)`: after `completed`). Returns the record and, without a kill, the
/// hand-over's time.
fn qemu_run(elf: &Path, at: Option<u64>) -> anyhow::Result<(QemuRecord, u64)> {
    let (mut chain, mut next) = running_with_next(elf)?;
    let t = Instant::now();
    let mut took = 0;
    let fault = match at {
        None => {
            kill(&mut next);
            "new QEMU SIGKILL before migrate".to_string()
        }
        Some(u64::MAX) => {
            chain.migrate_to(&next)?;
            took = t.elapsed().as_millis() as u64;
            std::thread::sleep(Duration::from_millis(300));
            kill(&mut next);
            "new QEMU SIGKILL after completed".to_string()
        }
        Some(ms) => {
            chain.start_migration(&next)?;
            while t.elapsed() < Duration::from_millis(ms) {
                std::thread::sleep(Duration::from_micros(200));
            }
            kill(&mut next);
            format!("new QEMU SIGKILL {ms} ms after migrate")
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let old_status = status_of(&mut chain.qmp);
    let migration_status = chain.migration()?["status"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    let (outcome, lost) = if old_status == "running" {
        match next_verify(&chain.lines, Duration::from_secs(10)) {
            Ok(()) => ("runs on in the old QEMU, bad=0".to_string(), false),
            Err(e) => (format!("old QEMU says running, but: {e}"), true),
        }
    } else {
        match chain.qmp.cmd("cont", json!({})) {
            Err(e) => (format!("lost: the old QEMU refuses cont ({e})"), true),
            Ok(_) => match next_verify(&chain.lines, Duration::from_secs(10)) {
                Ok(()) => (
                    format!("old QEMU {old_status}: an operator's cont resumes it, bad=0"),
                    false,
                ),
                Err(e) => (format!("lost: cont accepted, then {e}"), true),
            },
        }
    };
    Ok((
        QemuRecord {
            fault,
            fault_ms: at.filter(|&m| m != u64::MAX).unwrap_or(0),
            old_status,
            migration_status,
            outcome,
            lost,
        },
        took,
    ))
}

/// A running QEMU guest and the next QEMU, listening for its cpr-transfer.
fn running_with_next(elf: &Path) -> anyhow::Result<(CprChain, NextQemu)> {
    let mut chain = CprChain::start(elf, MEM_MIB, 1)?;
    chain.qmp.cmd("cont", json!({}))?;
    std::thread::sleep(Duration::from_millis(300));
    let next = chain.start_next(elf, MEM_MIB)?;
    Ok((chain, next))
}

fn kill(next: &mut NextQemu) {
    let _ = next.child.kill();
    let _ = next.child.wait();
}

/// The new QEMU runs the guest after `completed`; the operator (or a script retrying) sends
/// `cont` to the old one: does QEMU run the same guest twice?
fn qemu_cont_after_handover(elf: &Path) -> anyhow::Result<QemuRecord> {
    let (mut chain, mut next) = running_with_next(elf)?;
    if let Err(e) = chain.migrate_to(&next) {
        kill(&mut next);
        return Err(e);
    }
    std::thread::sleep(Duration::from_millis(300));
    let old_status = status_of(&mut chain.qmp);
    let migration_status = "completed".to_string();
    let answer = chain.qmp.cmd("cont", json!({}));
    std::thread::sleep(Duration::from_millis(300));
    let both = answer.is_ok() && status_of(&mut chain.qmp) == "running";
    kill(&mut next);
    let outcome = match answer {
        Err(e) => format!("cont refused: {e}"),
        Ok(_) if both => {
            "split brain: cont accepted, the old QEMU runs the guest while the new one does".into()
        }
        Ok(_) => "cont accepted, the old QEMU stays stopped".into(),
    };
    Ok(QemuRecord {
        fault: "no fault; cont on the old QEMU after completed".into(),
        fault_ms: 0,
        old_status,
        migration_status,
        outcome,
        lost: both,
    })
}

pub fn run(cfg: &chaos::Config, out: &Path) -> anyhow::Result<()> {
    let runs = cfg.counts.live_update;
    eprintln!("spanvmm: the chaos campaign's live-update series, {runs} runs");
    let spanvmm = chaos::campaign(cfg)?;
    print!("{}", chaos::table(&spanvmm));

    let elf = &cfg.guest;
    let mut records = Vec::new();
    let mut took = Vec::new();
    for _ in 0..3 {
        let (r, ms) = qemu_run(elf, Some(u64::MAX))?;
        took.push(ms as f64);
        records.push(r);
    }
    let window = (median(&mut took) * 1.5).ceil().max(2.0) as u64;
    eprintln!(
        "QEMU cpr-transfer: migrate → completed {took:?} ms; kills drawn in [0, {window}] ms"
    );
    records.push(qemu_run(elf, None)?.0);
    let mut rng = Rng::new(cfg.seed);
    for _ in 0..runs {
        let at = rng.range(0, window);
        let (r, _) = qemu_run(elf, Some(at))?;
        eprintln!("  {}: {}", r.fault, r.outcome);
        records.push(r);
    }
    records.push(qemu_cont_after_handover(elf)?);
    let mut outcomes: Vec<(String, usize)> = Vec::new();
    for r in &records {
        // Group by what happened, not by when.
        let key = format!("{} [{} / {}]", r.outcome, r.old_status, r.migration_status);
        match outcomes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => outcomes.push((key, 1)),
        }
    }
    for (k, n) in &outcomes {
        println!("QEMU cpr-transfer: {n:>3} × {k}");
    }
    let report = Report {
        benchmark: "live-update-failures",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        seed: cfg.seed,
        spanvmm,
        qemu_cpr_transfer: records,
        qemu_outcomes: outcomes,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
