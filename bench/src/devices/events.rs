//! The latency part of `spanvmm-bench devices`: the same `redis-benchmark` client's latency
//! while the VM is live-updated (spanvmm) or migrated on the same host (spanvmm's pre-copy,
//! post-copy and hybrid services; QEMU's pre-copy and post-copy), beside a quiet run of the
//! same client on the same VM.
//!
//! The client runs one test (GET, 20 connections kept alive, no pipelining, so each figure is
//! one request's round trip) sized to last `SPAN` at the quiet rate; the event starts `LEAD`
//! into it and must end before the client does (checked). p99 is over the whole run, the
//! worst latency (`max`) is the event's. Both VMMs migrate over loopback inside the namespace,
//! the destination on a second tap on the same bridge (QEMU's with its own `-netdev`), and
//! both announce the guest's MAC there. Each VM ends every step with a clean guest verify pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::{qemu_base, stat, Lan, Stat, CLIENTS, GUEST_IP, MAC, MEM, NET_GUEST};
use crate::harness::{collect, ctl, field};
use crate::live_update::{qmp_arg, Qmp};
use crate::redis_client::{self, Figures};

/// How long a client run lasts at the quiet rate.
const SPAN: Duration = Duration::from_secs(5);
/// When the event starts after the client.
const LEAD: Duration = Duration::from_secs(1);
/// The downtime budget both VMMs are given: spanvmm's pre-copy default (`downtime_ms`), set as
/// QEMU's `downtime-limit`.
const DOWNTIME_MS: u64 = 2;
const T: Duration = Duration::from_secs(60);
const SPANVMM_ENGINES: [&str; 3] = ["precopy", "postcopy", "hybrid"];
const QEMU_ENGINES: [&str; 2] = ["precopy", "postcopy"];

/// One measured step of one run.
struct Sample {
    vmm: &'static str,
    event: String,
    /// None: the step failed (`note` says why).
    client: Option<Figures>,
    /// The VMM's own figure: a live update's pause, a migration's downtime.
    vmm_ms: Option<f64>,
    note: String,
}

/// A VMM process, its console and stderr lines collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    errs: Arc<Mutex<Vec<String>>>,
    /// spanvmm's API socket (shut down through it at drop: after a live update another process
    /// serves the VM), or QEMU's QMP socket.
    sock: PathBuf,
    spanvmm: Option<PathBuf>,
}

impl Proc {
    fn spawn(mut cmd: Command, sock: PathBuf, spanvmm: Option<&Path>) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a VMM")?;
        let lines = collect(child.stdout.take().context("stdout")?);
        let errs = collect(child.stderr.take().context("stderr")?);
        Ok(Proc {
            child,
            lines,
            errs,
            sock,
            spanvmm: spanvmm.map(Path::to_path_buf),
        })
    }

    fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn wait(&self, on_stderr: bool, needle: &str, from: usize) -> anyhow::Result<String> {
        let deadline = Instant::now() + T;
        loop {
            let src = if on_stderr { &self.errs } else { &self.lines };
            let lines = src.lock().unwrap();
            if let Some(l) = lines[from.min(lines.len())..]
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            drop(lines);
            if Instant::now() > deadline {
                bail!(
                    "no `{needle}` (stderr: {:?})",
                    self.errs.lock().unwrap().last()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a (periodic) verify pass printed after line `from` and checks it clean.
    fn verify_clean(&self, from: usize) -> anyhow::Result<()> {
        let l = self.wait(false, "SPANGUEST verify ", from)?;
        if field(&l, "bad") != Some(0) || field(&l, "ok") == Some(0) {
            bail!("guest damaged: {l}");
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(bin) = &self.spanvmm {
            // Bounded: a destination still waiting for its migration may not answer.
            let _ = Command::new("timeout")
                .arg("5")
                .arg(bin)
                .arg("ctl")
                .arg("--api-socket")
                .arg(&self.sock)
                .arg("shutdown")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn start_client(lan: &Lan, n: u64) -> anyhow::Result<Child> {
    redis_client::start_get(lan.cmd("timeout"), GUEST_IP, CLIENTS, n, 300)
}

/// What happens during a client run: returns the VMM's own figure and a note.
type Event<'a> = &'a mut dyn FnMut() -> anyhow::Result<(Option<f64>, String)>;

/// A client run of `n` requests with `event` started `LEAD` into it (none: a quiet run). The
/// client must still run when the event returns. Returns its figures and the event's.
fn during(
    lan: &Lan,
    n: u64,
    event: Option<Event>,
) -> anyhow::Result<(Figures, Option<f64>, String)> {
    let mut child = start_client(lan, n)?;
    let (ms, note) = match event {
        Some(event) => {
            std::thread::sleep(LEAD);
            let r = event();
            if r.is_ok() && child.try_wait()?.is_some() {
                bail!("the client ended before the event did: raise SPAN");
            }
            match r {
                Ok(x) => x,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        }
        None => (None, String::new()),
    };
    Ok((redis_client::finish(child)?.require("GET")?, ms, note))
}

/// Requests for a client run lasting about `SPAN` on the quiet VM.
fn calibrate(lan: &Lan) -> anyhow::Result<u64> {
    let (c, _, _) = during(lan, 20_000, None)?;
    Ok(((c.rps * SPAN.as_secs_f64()) as u64).max(20_000))
}

fn sample(
    vmm: &'static str,
    event: &str,
    r: anyhow::Result<(Figures, Option<f64>, String)>,
) -> Sample {
    match r {
        Ok((c, ms, note)) => Sample {
            vmm,
            event: event.into(),
            client: Some(c),
            vmm_ms: ms,
            note,
        },
        Err(e) => Sample {
            vmm,
            event: event.into(),
            client: None,
            vmm_ms: None,
            note: format!("failed: {e:#}"),
        },
    }
}

/// spanvmm: quiet, a live update, then each engine, the destination on the other tap.
fn spanvmm_run(
    lan: &Lan,
    bin: &Path,
    elf: &Path,
    plugins: &Path,
    dir: &Path,
    port: u16,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let r = (|| -> anyhow::Result<()> {
        let tls = dir.join("tls");
        if !tls.exists() {
            let st = Command::new(bin)
                .args(["migrate-certs", "--out"])
                .arg(&tls)
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(st.success(), "spanvmm migrate-certs failed");
        }
        let run = |args: Vec<String>, api: &Path| -> anyhow::Result<Proc> {
            let mut c = lan.cmd(bin);
            c.arg("run")
                .args(args)
                .arg("--serial")
                .arg("stdout")
                .arg("--api-socket")
                .arg(api);
            Proc::spawn(c, api.to_path_buf(), Some(bin))
        };
        let api = dir.join("vm0.sock");
        let mut cur = run(
            vec![
                "--kernel".into(),
                elf.display().to_string(),
                "--cmdline".into(),
                NET_GUEST.into(),
                "--memory".into(),
                MEM.into(),
                "--net".into(),
                format!("tap=tap0,mac={MAC}"),
            ],
            &api,
        )?;
        cur.wait(false, "SPANGUEST ready", 0)?;
        cur.wait(false, "SPANGUEST net ", 0)?;
        let n = calibrate(lan)?;
        out.push(sample("spanvmm", "quiet", during(lan, n, None)));
        let mut lu = || -> anyhow::Result<(Option<f64>, String)> {
            let bin_s = bin.to_str().context("binary path")?;
            let r: Value =
                serde_json::from_str(&ctl(bin, &api, &["live-update", "--binary", bin_s])?)?;
            Ok((r["pause_ms"].as_f64(), String::new()))
        };
        let from = cur.mark();
        out.push(sample(
            "spanvmm",
            "live-update",
            during(lan, n, Some(&mut lu)),
        ));
        cur.verify_clean(from)?;
        for (k, engine) in SPANVMM_ENGINES.iter().enumerate() {
            let tap = if k % 2 == 0 { "tap1" } else { "tap0" };
            let addr = format!("tls://127.0.0.1:{}", port + k as u16);
            let dst_api = dir.join(format!("vm{}.sock", k + 1));
            let dst = run(
                vec![
                    "--incoming".into(),
                    addr.clone(),
                    "--tls-dir".into(),
                    tls.display().to_string(),
                    "--net".into(),
                    format!("tap={tap}"),
                    "--memory".into(),
                    MEM.into(),
                ],
                &dst_api,
            )?;
            dst.wait(true, "waiting for an incoming migration", 0)?;
            let report = dir.join(format!("report{k}.json"));
            let plugin = plugins.join(format!("{engine}.wasm"));
            let src_api = cur.sock.clone();
            let mut mig = || -> anyhow::Result<(Option<f64>, String)> {
                ctl(
                    bin,
                    &src_api,
                    &[
                        "migrate",
                        "--to",
                        &addr,
                        "--plugin",
                        plugin.to_str().context("plugin path")?,
                        "--tls-dir",
                        tls.to_str().context("tls path")?,
                        "--report",
                        report.to_str().context("report path")?,
                    ],
                )?;
                let r: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
                anyhow::ensure!(r["result"] == "completed", "{r}");
                Ok((
                    r["downtime_ms"].as_f64(),
                    format!("handover {}", r["handover"].as_str().unwrap_or("?")),
                ))
            };
            let s = sample(
                "spanvmm",
                &format!("migrate-{engine}"),
                during(lan, n, Some(&mut mig)),
            );
            let failed = s.client.is_none();
            out.push(s);
            if failed {
                // The guest stays at the source (a failure before the hand-over).
                continue;
            }
            // The source exits after a migration; the guest is the destination's now.
            cur = dst;
            cur.verify_clean(0)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        out.push(Sample {
            vmm: "spanvmm",
            event: "set-up".into(),
            client: None,
            vmm_ms: None,
            note: format!("failed: {e:#}"),
        });
    }
    out
}

/// QEMU microvm: quiet, then each migration engine to a second QEMU on the other tap.
fn qemu_run(lan: &Lan, elf: &Path, dir: &Path, port: u16) -> Vec<Sample> {
    let mut out = Vec::new();
    let start = |tap: &str, qmp: &Path, incoming: bool| -> anyhow::Result<Proc> {
        let mut c = lan.cmd("qemu-system-x86_64");
        c.args(qemu_base(elf, NET_GUEST)).args(qmp_arg(qmp)).args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={MAC}"),
        ]);
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        Proc::spawn(c, qmp.to_path_buf(), None)
    };
    let r = (|| -> anyhow::Result<()> {
        let mut cur = start("tap0", &dir.join("q0.qmp"), false)?;
        cur.wait(false, "SPANGUEST ready", 0)?;
        cur.wait(false, "SPANGUEST net ", 0)?;
        let n = calibrate(lan)?;
        out.push(sample("qemu-microvm", "quiet", during(lan, n, None)));
        for (k, engine) in QEMU_ENGINES.iter().enumerate() {
            let tap = if k % 2 == 0 { "tap1" } else { "tap0" };
            let dst = start(tap, &dir.join(format!("q{}.qmp", k + 1)), true)?;
            let mut q = Qmp::connect(&cur.sock)?;
            let mut dq = Qmp::connect(&dst.sock)?;
            let post = *engine == "postcopy";
            if post {
                let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
                q.cmd("migrate-set-capabilities", caps.clone())?;
                dq.cmd("migrate-set-capabilities", caps)?;
            }
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100u64 << 30, "downtime-limit": DOWNTIME_MS}),
            )?;
            let uri = format!("tcp:127.0.0.1:{}", port + k as u16);
            dq.cmd("migrate-incoming", json!({ "uri": uri }))?;
            let mut mig = || -> anyhow::Result<(Option<f64>, String)> {
                q.cmd("migrate", json!({ "uri": uri }))?;
                if post {
                    q.cmd("migrate-start-postcopy", json!({}))?;
                }
                let deadline = Instant::now() + T;
                loop {
                    let info = q.cmd("query-migrate", json!({}))?;
                    match info["status"].as_str() {
                        Some("completed") => {
                            return Ok((info["downtime"].as_f64(), String::new()));
                        }
                        Some("failed") | Some("cancelled") => bail!("QEMU migration: {info}"),
                        _ if Instant::now() > deadline => {
                            let _ = q.cmd("migrate_cancel", json!({}));
                            bail!("QEMU migration did not complete in {T:?}");
                        }
                        _ => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            };
            let s = sample(
                "qemu-microvm",
                &format!("migrate-{engine}"),
                during(lan, n, Some(&mut mig)),
            );
            let failed = s.client.is_none();
            out.push(s);
            if failed {
                // Where the guest is after a failed post-copy is not worth guessing: stop here.
                bail!("stopped after a failed migration");
            }
            cur = dst;
            cur.verify_clean(0)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        out.push(Sample {
            vmm: "qemu-microvm",
            event: "set-up".into(),
            client: None,
            vmm_ms: None,
            note: format!("failed: {e:#}"),
        });
    }
    out
}

/// One (VMM, event) over the runs; medians and spread.
#[derive(Serialize)]
pub(super) struct EventRow {
    vmm: &'static str,
    /// `quiet`, `live-update`, `migrate-precopy`, ...
    event: String,
    runs_ok: usize,
    runs_failed: usize,
    rps: Option<Stat>,
    p50_ms: Option<Stat>,
    p99_ms: Option<Stat>,
    /// The worst request of each run.
    max_ms: Option<Stat>,
    /// p99 minus the quiet p99 of the same VM in the same run.
    p99_over_quiet_ms: Option<Stat>,
    /// The VMM's own figure: a live update's pause, a migration's downtime.
    vmm_ms: Option<Stat>,
    notes: Vec<String>,
}

/// Runs the events `runs` times, spanvmm and QEMU alternating who goes first.
pub(super) fn run(
    lan: &Lan,
    bin: &Path,
    elf: &Path,
    plugins: &Path,
    runs: usize,
    scratch: &Path,
) -> Vec<EventRow> {
    let mut samples: Vec<(usize, Sample)> = Vec::new();
    for r in 0..runs {
        let dir = scratch.join(format!("events-{r}"));
        let _ = std::fs::create_dir_all(&dir);
        let both = [true, false];
        let order: &[bool] = if r % 2 == 0 { &both } else { &[false, true] };
        for &spanvmm in order {
            // Ports of their own each run: no listener waits on a closing one.
            let port = 47_300 + 10 * r as u16;
            let got = if spanvmm {
                spanvmm_run(lan, bin, elf, plugins, &dir, port)
            } else {
                qemu_run(lan, elf, &dir, port + 5)
            };
            for s in got {
                match &s.client {
                    Some(c) => eprintln!(
                        "run {} {} {}: {:.0} req/s, p50 {:.3} p99 {:.3} max {:.1} ms; VMM {:?} ms {}",
                        r + 1,
                        s.vmm,
                        s.event,
                        c.rps,
                        c.p50_ms,
                        c.p99_ms,
                        c.max_ms,
                        s.vmm_ms,
                        s.note
                    ),
                    None => eprintln!("run {} {} {}: {}", r + 1, s.vmm, s.event, s.note),
                }
                samples.push((r, s));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut keys: Vec<(&'static str, String)> = Vec::new();
    for (_, s) in &samples {
        if !keys.iter().any(|(v, e)| *v == s.vmm && *e == s.event) {
            keys.push((s.vmm, s.event.clone()));
        }
    }
    let opt = |v: Vec<f64>| (!v.is_empty()).then(|| stat(v));
    keys.into_iter()
        .map(|(vmm, event)| {
            let mine: Vec<&(usize, Sample)> = samples
                .iter()
                .filter(|(_, s)| s.vmm == vmm && s.event == event)
                .collect();
            let ok: Vec<(usize, Figures, Option<f64>)> = mine
                .iter()
                .filter_map(|(r, s)| s.client.map(|c| (*r, c, s.vmm_ms)))
                .collect();
            let quiet = |run: usize| {
                samples.iter().find_map(|(r, s)| {
                    (*r == run && s.vmm == vmm && s.event == "quiet")
                        .then_some(s.client)
                        .flatten()
                })
            };
            let mut notes: Vec<String> = mine
                .iter()
                .map(|(_, s)| s.note.clone())
                .filter(|n| !n.is_empty())
                .collect();
            notes.dedup();
            EventRow {
                vmm,
                runs_ok: ok.len(),
                runs_failed: mine.len() - ok.len(),
                rps: opt(ok.iter().map(|(_, c, _)| c.rps).collect()),
                p50_ms: opt(ok.iter().map(|(_, c, _)| c.p50_ms).collect()),
                p99_ms: opt(ok.iter().map(|(_, c, _)| c.p99_ms).collect()),
                max_ms: opt(ok.iter().map(|(_, c, _)| c.max_ms).collect()),
                p99_over_quiet_ms: opt(ok
                    .iter()
                    .filter(|_| event != "quiet")
                    .filter_map(|(r, c, _)| quiet(*r).map(|q| c.p99_ms - q.p99_ms))
                    .collect()),
                vmm_ms: opt(ok.iter().filter_map(|(_, _, ms)| *ms).collect()),
                event,
                notes,
            }
        })
        .collect()
}

/// The Markdown table of the event rows.
pub(super) fn table(rows: &[EventRow]) -> String {
    let mut s = String::from(
        "\n| VMM | during | runs ok/failed | req/s | p50 ms | p99 ms | p99 − quiet ms | worst ms | VMM pause/downtime ms |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let m = |x: &Option<Stat>, p: usize| match x {
        Some(x) => format!("{:.p$} [{:.p$}–{:.p$}]", x.median, x.min, x.max),
        None => "–".into(),
    };
    for r in rows {
        s += &format!(
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} |\n",
            r.vmm,
            r.event,
            r.runs_ok,
            r.runs_failed,
            m(&r.rps, 0),
            m(&r.p50_ms, 3),
            m(&r.p99_ms, 3),
            m(&r.p99_over_quiet_ms, 3),
            m(&r.max_ms, 1),
            m(&r.vmm_ms, 2)
        );
    }
    s
}
