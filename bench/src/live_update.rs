//! `spanvmm-bench live-update`: the guest-observed pause of replacing the VMM process beneath a
//! running guest, for growing guests, against QEMU's same-host migration of the same guest
//! (the usual way to refresh a QEMU: migrate to a new QEMU on the same host), in the same run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{collect, field, median, spawn_vm, Vm};

/// Most populated MiB: spanguest fills only the RAM range that holds its image, and QEMU's x86
/// machines move RAM above 3 GiB to 4 GiB, so under QEMU that range ends below 3 GiB.
const MAX_POPULATED_MIB: u64 = 2944;

/// The guest, the same for spanvmm and QEMU: most of its memory populated (the case where
/// copying would hurt; capped, see above), a working set being dirtied, every loop gap above
/// 1 ms reported.
fn cmdline(mem_mib: u64) -> String {
    format!(
        "workload=dirty,verify mib={} wss=64 rate=20000 stall_us=1000 report_ms=0",
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

#[derive(Serialize)]
struct SpanvmmRun {
    vmm_pause_ms: Vec<f64>,
    /// 0 = below the guest's 1 ms reporting threshold.
    guest_stall_us: Vec<u64>,
    restore_us: Vec<u64>,
    /// From the API call to the new process running the guest, ms.
    total_ms: Vec<f64>,
    median_guest_stall_us: f64,
}

fn spanvmm_updates(bin: &Path, elf: &Path, mem: u64, rounds: usize) -> anyhow::Result<SpanvmmRun> {
    let vm = spawn_vm(bin, elf, &cmdline(mem), mem, "lu")?;
    std::thread::sleep(Duration::from_millis(300));
    let (mut pause, mut stall, mut restore, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let from = vm.mark();
        let (r, _) = vm.api_ok("PUT", "/vm/live-update", Some(json!({"binary": bin})))?;
        pause.push(r["pause_ms"].as_f64().unwrap_or(0.0));
        restore.push(r["restore_us"].as_u64().unwrap_or(0));
        total.push(r["total_ms"].as_f64().unwrap_or(0.0));
        r["new_pid"]
            .as_u64()
            .context("no new_pid in the live-update answer")?;
        // Let the guest run a little so its stall line (if any) is printed.
        std::thread::sleep(Duration::from_millis(200));
        stall.push(stall_since(&vm.lines, from));
    }
    check_memory(&vm)?;
    drop(vm); // kills whichever process serves the VM now
    let mut s: Vec<f64> = stall.iter().map(|&v| v as f64).collect();
    Ok(SpanvmmRun {
        median_guest_stall_us: median(&mut s),
        vmm_pause_ms: pause,
        guest_stall_us: stall,
        restore_us: restore,
        total_ms: total,
    })
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

#[derive(Serialize)]
struct Size {
    memory_mib: u64,
    spanvmm: SpanvmmRun,
    qemu: QemuRun,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    guest_cmdline: String,
    sizes: Vec<Size>,
    goal: &'static str,
    goal_met: bool,
}

/// Runs the benchmark for each size and writes `out`.
pub fn run(bin: &Path, elf: &Path, sizes: &[u64], out: &Path) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for &mem in sizes {
        let s = spanvmm_updates(bin, elf, mem, 5)?;
        eprintln!(
            "{mem:>5} MiB spanvmm: guest stall median {:.0} µs {:?}, VMM pause {:?} ms, total {:?} ms",
            s.median_guest_stall_us, s.guest_stall_us, s.vmm_pause_ms, s.total_ms
        );
        let q = qemu_migration(elf, mem)?;
        eprintln!(
            "{mem:>5} MiB QEMU migrate: total {} ms, downtime {} ms, guest stall {} µs, {} MiB sent",
            q.total_ms, q.downtime_ms, q.guest_stall_us, q.ram_transferred_mib
        );
        all.push(Size {
            memory_mib: mem,
            spanvmm: s,
            qemu: q,
        });
    }
    let goal_met = all
        .iter()
        .all(|s| s.spanvmm.median_guest_stall_us <= 10_000.0);
    let report = Report {
        benchmark: "live-update",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        guest_cmdline: cmdline(0).replace("mib=0", "mib=<7/8 of memory, at most 2944>"),
        sizes: all,
        goal: "guest-observed pause <= 10 ms and flat in memory size",
        goal_met,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
