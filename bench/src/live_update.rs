//! `spanvmm-bench live-update`: replacing the VMM process beneath a running guest, against its
//! real QEMU peer, cpr-transfer (QEMU 10's no-copy local live update), run by run in the same
//! run, for growing guests with 1 and 2 vCPUs; QEMU's copying same-host migration (what a QEMU
//! user did before cpr) stays as a labelled reference row.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{collect, field, spawn_run, stat, Stat, Vm};

/// Most populated MiB: spanguest fills only the RAM range that holds its image, and QEMU's x86
/// machines move RAM above 3 GiB to 4 GiB, so under QEMU that range ends below 3 GiB.
const MAX_POPULATED_MIB: u64 = 2944;

/// The guest, the same for spanvmm and QEMU: most of its memory populated (the case where
/// copying would hurt; capped, see above), a working set being dirtied, every loop gap above
/// 1 ms reported.
fn cmdline(mem_mib: u64) -> String {
    format!(
        "workload=dirty,verify mib={} wss=64 rate=20000 stall_us=1000 report_ms=0 verify_ms=3000",
        (mem_mib * 7 / 8).min(MAX_POPULATED_MIB)
    )
}

/// Largest `stall` the guest printed since line `from`, µs.
fn stall_since(lines: &Arc<Mutex<Vec<String>>>, from: usize) -> u64 {
    lines.lock().unwrap()[from..]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .filter_map(|l| field(l, "us"))
        .max()
        .unwrap_or(0)
}

/// How long a VM runs after it is resumed before it is measured, and the quiet span whose
/// largest loop gap is the guest's noise floor (what it shows with nothing happening).
const SETTLE: Duration = Duration::from_millis(300);
const QUIET_SPAN: Duration = Duration::from_millis(500);
/// How long the guest runs after a hand-over before its stall lines are read.
const AFTER: Duration = Duration::from_millis(300);

/// One hand-over of a running guest to a new VMM process.
#[derive(Serialize, Clone)]
struct Sample {
    /// The VMM's own figure: spanvmm's `total_ms` (API call to the new process running the
    /// guest, the new process's start included); QEMU's `total-time` (from `migrate`; the new
    /// QEMU was started before).
    total_ms: f64,
    /// QEMU only: from starting the new QEMU to `completed` (comparable with spanvmm's total,
    /// which includes its new process's start). spanvmm: the same as `total_ms` as the client saw it.
    total_with_start_ms: f64,
    /// Of the total with start, the part before the guest paused: spanvmm's `prepare_ms` (new
    /// process started, memory mapped, VM and vCPUs built); QEMU: the new QEMU's start until
    /// it listens, plus its `total-time` before the downtime.
    before_pause_ms: f64,
    /// The VMM's pause (spanvmm `pause_ms`, QEMU `downtime`, whole ms).
    vmm_pause_ms: f64,
    /// Largest loop gap the guest reported around the hand-over, µs (0: none above 1 ms).
    guest_stall_us: u64,
    /// Largest loop gap in a quiet span just before, µs: the noise floor.
    quiet_stall_us: u64,
    /// Anonymous memory of the new process once it runs the guest, MiB.
    new_process_anon_mib: u64,
    /// spanvmm: the report's trace, each step of both processes with when it ended, µs from
    /// the pause (QEMU: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trace: Vec<(String, i64)>,
}

/// The trace of a live-update report: (step, µs from the pause).
pub(crate) fn report_trace(r: &Value) -> Vec<(String, i64)> {
    r["trace"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["step"].as_str()?.to_string(), m["at_us"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Each step's median over the runs, in the order of the first run.
pub(crate) fn trace_medians(traces: &[&[(String, i64)]]) -> Vec<(String, f64)> {
    let Some(first) = traces.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(step, _)| {
            let mut v: Vec<f64> = traces
                .iter()
                .filter_map(|t| t.iter().find(|(s, _)| s == step).map(|(_, us)| *us as f64))
                .collect();
            (step.clone(), crate::harness::median(&mut v))
        })
        .collect()
}

/// One line per step: `step at_us`.
pub(crate) fn trace_text(medians: &[(String, f64)]) -> String {
    medians
        .iter()
        .map(|(s, us)| format!("    {us:>9.0} µs  {s}\n"))
        .collect()
}

#[derive(Serialize)]
struct Series {
    samples: Vec<Sample>,
    total_ms: Stat,
    total_with_start_ms: Stat,
    before_pause_ms: Stat,
    vmm_pause_ms: Stat,
    guest_stall_us: Stat,
    quiet_stall_us: Stat,
    new_process_anon_mib: Stat,
    /// spanvmm: each step's median time from the pause, µs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trace_median_us: Vec<(String, f64)>,
}

impl Series {
    fn of(samples: Vec<Sample>) -> Series {
        let f = |g: fn(&Sample) -> f64| stat(samples.iter().map(g));
        let traces: Vec<&[(String, i64)]> = samples
            .iter()
            .filter(|s| !s.trace.is_empty())
            .map(|s| &s.trace[..])
            .collect();
        Series {
            trace_median_us: trace_medians(&traces),
            total_ms: f(|s| s.total_ms),
            total_with_start_ms: f(|s| s.total_with_start_ms),
            before_pause_ms: f(|s| s.before_pause_ms),
            vmm_pause_ms: f(|s| s.vmm_pause_ms),
            guest_stall_us: f(|s| s.guest_stall_us as f64),
            quiet_stall_us: f(|s| s.quiet_stall_us as f64),
            new_process_anon_mib: f(|s| s.new_process_anon_mib as f64),
            samples,
        }
    }
}

/// `RssAnon` of a process, MiB (0 when it cannot be read).
fn anon_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 10)
}

/// Waits for the guest's next periodic `verify` line: `Ok` if it says `bad=0`.
pub(crate) fn next_verify(
    lines: &Arc<Mutex<Vec<String>>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let from = lines.lock().unwrap().len();
    let deadline = Instant::now() + timeout;
    loop {
        let l = lines.lock().unwrap()[from..]
            .iter()
            .find(|l| l.contains("SPANGUEST verify"))
            .cloned();
        match l {
            Some(l) if field(&l, "bad") == Some(0) => return Ok(()),
            Some(l) => bail!("memory damaged: {l}"),
            None if Instant::now() > deadline => bail!("no guest progress in {timeout:?}"),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Largest loop gap the guest shows over a quiet span.
fn quiet_stall(lines: &Arc<Mutex<Vec<String>>>) -> u64 {
    let from = lines.lock().unwrap().len();
    std::thread::sleep(QUIET_SPAN);
    stall_since(lines, from)
}

fn spanvmm_vm(bin: &Path, elf: &Path, mem: u64, vcpus: u32) -> anyhow::Result<Vm> {
    let (mem_s, vcpus_s, cl) = (mem.to_string(), vcpus.to_string(), cmdline(mem));
    let vm = spawn_run(
        bin,
        &[
            "--kernel",
            &elf.to_string_lossy(),
            "--cmdline",
            &cl,
            "--memory",
            &mem_s,
            "--vcpus",
            &vcpus_s,
        ],
        "lu",
    )?;
    vm.wait_lines("SPANGUEST ready", 1, 0, Duration::from_secs(300))?;
    Ok(vm)
}

/// One live update of a spanvmm VM the operator paused; left paused again.
fn spanvmm_update(vm: &Vm, bin: &Path) -> anyhow::Result<Sample> {
    vm.api_ok("PUT", "/vm/resume", None)?;
    std::thread::sleep(SETTLE);
    let quiet_stall_us = quiet_stall(&vm.lines);
    let from = vm.mark();
    let t = Instant::now();
    let (r, _) = vm.api_ok("PUT", "/vm/live-update", Some(json!({"binary": bin})))?;
    let client_ms = t.elapsed().as_secs_f64() * 1e3;
    let new_pid = r["new_pid"]
        .as_u64()
        .context("no new_pid in the live-update answer")?;
    std::thread::sleep(AFTER);
    let sample = Sample {
        total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
        total_with_start_ms: client_ms,
        before_pause_ms: r["prepare_ms"].as_f64().unwrap_or(0.0),
        vmm_pause_ms: r["pause_ms"].as_f64().unwrap_or(0.0),
        guest_stall_us: stall_since(&vm.lines, from),
        quiet_stall_us,
        new_process_anon_mib: anon_mib(new_pid as u32),
        trace: report_trace(&r),
    };
    vm.api_ok("PUT", "/vm/pause", None)?;
    Ok(sample)
}

fn check_memory(vm: &Vm) -> anyhow::Result<()> {
    let from = vm.mark();
    vm.api_ok("PUT", "/guest/command", Some(json!({"command": "verify"})))?;
    let l = vm.wait_lines("SPANGUEST verify", 1, from, Duration::from_secs(60))?;
    if field(&l[0], "bad") != Some(0) {
        bail!("guest memory damaged: {}", l[0]);
    }
    Ok(())
}

/// A QMP connection.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).context("QMP connect"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    pub(crate) fn cmd(&mut self, execute: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(
            self.writer,
            "{}",
            json!({"execute": execute, "arguments": args})
        )?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {execute}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

/// `-qmp unix:PATH,server=on,wait=off`.
pub(crate) fn qmp_arg(path: &Path) -> Vec<String> {
    vec![
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]
}

/// Waits until a QEMU guest printed `SPANGUEST ready`.
pub(crate) fn wait_ready(lines: &Arc<Mutex<Vec<String>>>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("SPANGUEST ready"))
    {
        if Instant::now() > deadline {
            bail!("QEMU guest never became ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// QEMU (microvm, spanguest ELF) started on this host, its console lines collected.
pub(crate) fn qemu(
    elf: &Path,
    mem: u64,
    cmdline: &str,
    extra: &[String],
) -> anyhow::Result<(Child, Arc<Mutex<Vec<String>>>)> {
    qemu_with(Command::new("qemu-system-x86_64"), elf, mem, cmdline, extra)
}

/// QEMU started through `cmd` (`qemu-system-x86_64`, or a wrapper such as `ip netns exec NS
/// qemu-system-x86_64`), its console lines collected.
pub(crate) fn qemu_with(
    mut cmd: Command,
    elf: &Path,
    mem: u64,
    cmdline: &str,
    extra: &[String],
) -> anyhow::Result<(Child, Arc<Mutex<Vec<String>>>)> {
    let mut c = cmd
        .args(["-enable-kvm", "-M", "microvm", "-m", &mem.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(elf)
        .args(["-append", cmdline])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    let lines = collect(c.stdout.take().context("QEMU stdout")?);
    Ok((c, lines))
}

#[derive(Serialize)]
struct QemuRun {
    total_ms: u64,
    downtime_ms: u64,
    guest_stall_us: u64,
    ram_transferred_mib: u64,
}

/// QEMU's same-host refresh: migrate to a new QEMU over a Unix socket, bandwidth uncapped.
fn qemu_migration(elf: &Path, mem: u64) -> anyhow::Result<QemuRun> {
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (src_qmp, dst_qmp, mig) = (
        dir.join("src.qmp"),
        dir.join("dst.qmp"),
        dir.join("mig.sock"),
    );
    let cl = cmdline(mem);
    let (mut src, src_lines) = qemu(elf, mem, &cl, &qmp_arg(&src_qmp))?;
    let mut dst_args = qmp_arg(&dst_qmp);
    dst_args.extend(["-incoming".to_string(), format!("unix:{}", mig.display())]);
    let result = (|| {
        wait_ready(&src_lines)?;
        let (mut dst, dst_lines) = qemu(elf, mem, &cl, &dst_args)?;
        let r = (|| {
            let mut q = Qmp::connect(&src_qmp)?;
            let _dq = Qmp::connect(&dst_qmp)?;
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100u64 << 30}),
            )?;
            q.cmd("migrate", json!({"uri": format!("unix:{}", mig.display())}))?;
            let deadline = Instant::now() + Duration::from_secs(600);
            let info = loop {
                let info = q.cmd("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => break info,
                    Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
                    _ if Instant::now() > deadline => bail!("QEMU migration did not finish"),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            std::thread::sleep(Duration::from_millis(500));
            Ok(QemuRun {
                total_ms: info["total-time"].as_u64().unwrap_or(0),
                downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                guest_stall_us: stall_since(&dst_lines, 0),
                ram_transferred_mib: info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
            })
        })();
        let _ = dst.kill();
        let _ = dst.wait();
        r
    })();
    let _ = src.kill();
    let _ = src.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A QEMU guest that moves from QEMU process to QEMU process by cpr-transfer: RAM on a shared
/// memfd (`aux-ram-share=on`), the new QEMU started with a `main` and a `cpr` incoming channel,
/// the old one told `mode=cpr-transfer` and `migrate` over both (QEMU 10's no-copy local live
/// update). Each hand-over's new QEMU is the next one's source.
pub(crate) struct CprChain {
    child: Child,
    pub(crate) lines: Arc<Mutex<Vec<String>>>,
    pub(crate) qmp: Qmp,
    dir: PathBuf,
    generation: u32,
    args: Vec<String>,
}

/// The next QEMU of a cpr chain, listening on its incoming channels.
pub(crate) struct NextQemu {
    pub(crate) child: Child,
    pub(crate) lines: Arc<Mutex<Vec<String>>>,
    qmp_path: PathBuf,
    /// `migrate`'s `channels` argument that reaches it.
    pub(crate) channels: Value,
}

impl Drop for CprChain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn cpr_channel(kind: &str, path: &Path) -> Value {
    json!({"channel-type": kind,
           "addr": {"transport": "socket", "type": "unix", "path": path.to_string_lossy()}})
}

impl CprChain {
    pub(crate) fn start(elf: &Path, mem: u64, vcpus: u32) -> anyhow::Result<CprChain> {
        let dir = std::env::temp_dir().join(format!("spanvmm-bench-cpr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let args: Vec<String> = [
            "-M",
            "microvm,memory-backend=ram0,aux-ram-share=on",
            "-object",
            &format!("memory-backend-memfd,id=ram0,size={mem}M,share=on"),
            "-smp",
            &vcpus.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let qmp_path = dir.join("qmp-0");
        let mut extra = args.clone();
        extra.extend(qmp_arg(&qmp_path));
        let (child, lines) = qemu(elf, mem, &cmdline(mem), &extra)?;
        let mut chain = CprChain {
            child,
            lines,
            qmp: Qmp::connect(&qmp_path)?,
            dir,
            generation: 0,
            args,
        };
        wait_ready(&chain.lines)?;
        chain.qmp.cmd("stop", json!({}))?;
        Ok(chain)
    }

    /// Starts the next QEMU of the chain, waiting on its incoming channels, and sets the
    /// current one's migration mode to cpr-transfer.
    pub(crate) fn start_next(&mut self, elf: &Path, mem: u64) -> anyhow::Result<NextQemu> {
        let next = self.generation + 1;
        let (qmp_path, main_sock, cpr_sock) = (
            self.dir.join(format!("qmp-{next}")),
            self.dir.join(format!("main-{next}.sock")),
            self.dir.join(format!("cpr-{next}.sock")),
        );
        let mut extra = self.args.clone();
        extra.extend(qmp_arg(&qmp_path));
        for ch in [
            cpr_channel("main", &main_sock),
            cpr_channel("cpr", &cpr_sock),
        ] {
            extra.extend(["-incoming".to_string(), ch.to_string()]);
        }
        self.qmp
            .cmd("migrate-set-parameters", json!({"mode": "cpr-transfer"}))?;
        let (mut child, lines) = qemu(elf, mem, &cmdline(mem), &extra)?;
        // The new QEMU listens on its cpr channel before anything else.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cpr_sock.exists() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the new QEMU never listened on its cpr channel");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(NextQemu {
            child,
            lines,
            qmp_path,
            channels: json!([
                cpr_channel("main", &main_sock),
                cpr_channel("cpr", &cpr_sock)
            ]),
        })
    }

    /// Where the current QEMU's migration is (`query-migrate`).
    pub(crate) fn migration(&mut self) -> anyhow::Result<Value> {
        self.qmp.cmd("query-migrate", json!({}))
    }

    /// Makes `next` the current QEMU and ends the old one.
    fn advance(&mut self, next: NextQemu) -> anyhow::Result<()> {
        let qmp = Qmp::connect(&next.qmp_path)?;
        let mut old = std::mem::replace(&mut self.child, next.child);
        let _ = old.kill();
        let _ = old.wait();
        self.qmp = qmp;
        self.lines = next.lines;
        self.generation += 1;
        Ok(())
    }

    /// One cpr-transfer to a new QEMU; the guest is left stopped in the new one.
    fn update(&mut self, elf: &Path, mem: u64) -> anyhow::Result<Sample> {
        self.qmp.cmd("cont", json!({}))?;
        std::thread::sleep(SETTLE);
        let quiet_stall_us = quiet_stall(&self.lines);
        let from = self.lines.lock().unwrap().len();
        let started = Instant::now();
        let mut next = self.start_next(elf, mem)?;
        let result = (|| {
            let info = self.migrate_to(&next)?;
            let total_with_start_ms = started.elapsed().as_secs_f64() * 1e3;
            let copied = info["ram"]["transferred"].as_u64().unwrap_or(0);
            if copied > 1 << 20 {
                eprintln!("note: cpr-transfer sent {copied} bytes (device state only expected)");
            }
            std::thread::sleep(AFTER);
            let downtime_ms = info["downtime"].as_f64().unwrap_or(0.0);
            Ok(Sample {
                total_ms: info["total-time"].as_f64().unwrap_or(0.0),
                total_with_start_ms,
                before_pause_ms: (total_with_start_ms - downtime_ms).max(0.0),
                vmm_pause_ms: downtime_ms,
                guest_stall_us: stall_since(&self.lines, from).max(stall_since(&next.lines, 0)),
                quiet_stall_us,
                new_process_anon_mib: anon_mib(next.child.id()),
                trace: Vec::new(),
            })
        })();
        let sample = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = next.child.kill();
                let _ = next.child.wait();
                return Err(e);
            }
        };
        self.advance(next)?;
        self.qmp.cmd("stop", json!({}))?;
        Ok(sample)
    }

    /// The guest's periodic verification in the current QEMU: bad=0, or why not.
    pub(crate) fn check_memory(&mut self) -> anyhow::Result<()> {
        self.qmp.cmd("cont", json!({}))?;
        next_verify(&self.lines, Duration::from_secs(120)).context("QEMU guest after cpr-transfer")
    }

    /// Sends `migrate` to `next`: its cpr socket file appears at bind(), a moment before it
    /// listens, so a refused connection is retried for up to 2 s.
    pub(crate) fn start_migration(&mut self, next: &NextQemu) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self
                .qmp
                .cmd("migrate", json!({"channels": next.channels.clone()}))
            {
                Err(e)
                    if e.to_string().contains("Connection refused")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2))
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Sends `migrate` to `next` and waits (up to 30 s) for `completed`, or the failure.
    pub(crate) fn migrate_to(&mut self, next: &NextQemu) -> anyhow::Result<Value> {
        self.start_migration(next)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.migration()?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed") | Some("cancelled") => bail!("cpr-transfer failed: {info}"),
                _ if Instant::now() > deadline => bail!("cpr-transfer did not finish"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

#[derive(Serialize)]
struct Case {
    memory_mib: u64,
    vcpus: u32,
    spanvmm_live_update: Series,
    qemu_cpr_transfer: Series,
    /// QEMU's copying same-host migration (what a QEMU user did before cpr): 1 vCPU only.
    qemu_copying_migration: Option<QemuRun>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    guest_cmdline: String,
    runs: usize,
    cases: Vec<Case>,
    goal: &'static str,
    goal_met: bool,
}

/// Runs the benchmark for each size and vCPU count, spanvmm and cpr-transfer alternating run
/// by run (the one not measured is paused), and writes `out`.
pub fn run(bin: &Path, elf: &Path, sizes: &[u64], runs: usize, out: &Path) -> anyhow::Result<()> {
    let mut cases = Vec::new();
    for &mem in sizes {
        for vcpus in [1u32, 2] {
            let vm = spanvmm_vm(bin, elf, mem, vcpus)?;
            vm.api_ok("PUT", "/vm/pause", None)?;
            let mut chain = CprChain::start(elf, mem, vcpus)?;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                ours.push(spanvmm_update(&vm, bin)?);
                theirs.push(chain.update(elf, mem)?);
            }
            vm.api_ok("PUT", "/vm/resume", None)?;
            check_memory(&vm)?;
            drop(vm);
            chain.check_memory()?;
            drop(chain);
            let (s, q) = (Series::of(ours), Series::of(theirs));
            eprintln!(
                "{mem:>5} MiB {vcpus} vCPU: spanvmm total {:.1} ms, pause {:.2} ms, stall {:.0} µs (quiet {:.0}) | cpr-transfer total {:.1} ms ({:.1} with start), downtime {:.0} ms, stall {:.0} µs (quiet {:.0})",
                s.total_ms.median,
                s.vmm_pause_ms.median,
                s.guest_stall_us.median,
                s.quiet_stall_us.median,
                q.total_ms.median,
                q.total_with_start_ms.median,
                q.vmm_pause_ms.median,
                q.guest_stall_us.median,
                q.quiet_stall_us.median
            );
            eprint!(
                "  spanvmm's steps (median µs from the pause):\n{}",
                trace_text(&s.trace_median_us)
            );
            let copying = if vcpus == 1 {
                let c = qemu_migration(elf, mem)?;
                eprintln!(
                    "{mem:>5} MiB QEMU copying migration: total {} ms, downtime {} ms, stall {} µs, {} MiB sent",
                    c.total_ms, c.downtime_ms, c.guest_stall_us, c.ram_transferred_mib
                );
                Some(c)
            } else {
                None
            };
            cases.push(Case {
                memory_mib: mem,
                vcpus,
                spanvmm_live_update: s,
                qemu_cpr_transfer: q,
                qemu_copying_migration: copying,
            });
        }
    }
    let goal_met = cases.iter().all(|c| {
        let (s, q) = (&c.spanvmm_live_update, &c.qemu_cpr_transfer);
        s.total_with_start_ms.median <= q.total_with_start_ms.median
            && s.guest_stall_us.median <= q.guest_stall_us.median
    });
    let report = Report {
        benchmark: "live-update",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        guest_cmdline: cmdline(0).replace("mib=0", "mib=<7/8 of memory, at most 2944>"),
        runs,
        cases,
        goal: "spanvmm's total time (new process start included) and guest stall at or below cpr-transfer's, medians, at every size",
        goal_met,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
