//! `spanvmm-bench live-update-devices`: a guest with a tap and a disk serves `redis-benchmark`
//! (a client in the namespace, 20 kept-alive connections) while its VMM process is replaced:
//! spanvmm's `ctl live-update` against QEMU 10's cpr-transfer with virtio-net (tap) and
//! virtio-blk, the same spanguest ELF (`kv` and `disk` workloads, memory dirtied) on both.
//!
//! QEMU 10.0 carries no tap on its cpr channel (a tap's `cpr=on` is QEMU 11 work), so a new
//! QEMU must get the tap some other way. Two QEMU rows:
//! - `qemu-cpr-transfer tap-by-name`: both QEMUs name the tap (`ifname=`), as a plain command
//!   line does. The tap admits one holder; the row records what happens to the update and to
//!   the client.
//! - `qemu-cpr-transfer tap-fd-shared`: the management layer (here this benchmark, as libvirt
//!   would) opens the tap once and gives the same descriptor to the old and the new QEMU: the
//!   best a QEMU 10 user can do.
//!
//! spanvmm hands the tap's descriptor to its new process itself, and the new process reopens
//! the disk by path. Each run: the VMM boots, a quiet client run sizes the measured one to about
//! `SPAN`, the update starts `LEAD` into the measured run; the row records client errors, the
//! client's p99 and worst latency (against the quiet run's), the VMM's pause, the guest's
//! largest loop gap around the update (against the largest in the `LEAD` before it), and the
//! guest's next verify pass over memory and disk (`bad`, `disk_bad`).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::{stat, Lan, Stat, CLIENTS, GUEST_IP, MAC, MEM};
use crate::harness::{collect, field, Vm};
use crate::live_update::{cpr_channel, qmp_arg, report_trace, trace_medians, trace_text, Qmp};
use crate::redis_client::{self, Figures};

/// The guest: the `kv` server on the tap, the disk workload writing and checking blocks,
/// memory dirtied; every loop gap above 1 ms reported.
const GUEST: &str = "workload=dirty,verify,kv,disk mib=16 rate=2000 disk_mib=16 disk_rate=500 disk_flush=32 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=1000 stall_us=1000 verify_ms=1000";
const DISK_MIB: u64 = 32;
/// How long a measured client run lasts at the quiet rate, and when the update starts in it.
const SPAN: Duration = Duration::from_secs(4);
const LEAD: Duration = Duration::from_secs(1);
/// How long the guest runs after the update before its loop gaps are read.
const AFTER: Duration = Duration::from_millis(300);
const T: Duration = Duration::from_secs(60);

/// A VMM's console lines, collected as they come.
type Lines = Arc<Mutex<Vec<String>>>;

fn start_client(lan: &Lan, n: u64) -> anyhow::Result<Child> {
    redis_client::start_get(lan.cmd("timeout"), GUEST_IP, CLIENTS, n, 120)
}

/// Largest `stall` the guest printed in `lines[from..to]`, µs.
fn stall_in(lines: &Lines, from: usize, to: Option<usize>) -> u64 {
    let l = lines.lock().unwrap();
    let to = to.unwrap_or(l.len()).min(l.len());
    l[from.min(to)..to]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .filter_map(|l| field(l, "us"))
        .max()
        .unwrap_or(0)
}

fn wait_line(lines: &Lines, needle: &str, from: usize) -> anyhow::Result<String> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = lines.lock().unwrap()[from..]
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
        {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("no `{needle}` from the guest in {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest's next verify pass from line `from`: (bad, disk_bad).
fn next_verify(lines: &Lines, from: usize) -> anyhow::Result<(u64, u64)> {
    let l = wait_line(lines, "SPANGUEST verify ", from)?;
    Ok((
        field(&l, "bad").context("verify without bad=")?,
        field(&l, "disk_bad").unwrap_or(0),
    ))
}

/// One update under load.
#[derive(Serialize, Clone)]
struct Run {
    /// The guest runs in the new process after it.
    updated: bool,
    /// Why not, or what happened.
    note: String,
    client: Option<Figures>,
    client_error: Option<String>,
    /// The quiet run on the same VM just before.
    quiet: Option<Figures>,
    /// spanvmm `pause_ms`, QEMU `downtime`.
    vmm_pause_ms: Option<f64>,
    /// spanvmm: the API call as the client saw it (new process started, prepared, handed
    /// over); QEMU: from starting the new QEMU to `completed`.
    total_ms: Option<f64>,
    /// Largest loop gap the guest printed from the update to `AFTER` past it, µs.
    guest_stall_us: u64,
    /// Largest in the `LEAD` before it (the client running): the noise floor.
    quiet_stall_us: u64,
    /// The guest's next verify pass after the update: memory, disk.
    bad: Option<u64>,
    disk_bad: Option<u64>,
    /// spanvmm: the hand-over's steps, µs from the pause.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trace: Vec<(String, i64)>,
}

/// What the update step measured.
#[derive(Default)]
struct Update {
    pause_ms: Option<f64>,
    total_ms: Option<f64>,
    note: String,
    trace: Vec<(String, i64)>,
}

/// The measured client run with `update` started `LEAD` into it; the guest's lines are
/// `lines()` (asked again after the update: QEMU's new process has lines of its own).
fn measure(
    lan: &Lan,
    n: u64,
    quiet: Option<Figures>,
    old_lines: &Lines,
    update: &mut dyn FnMut() -> anyhow::Result<(Update, Lines)>,
) -> anyhow::Result<Run> {
    let lead_from = old_lines.lock().unwrap().len();
    let mut client = start_client(lan, n)?;
    std::thread::sleep(LEAD);
    let at = old_lines.lock().unwrap().len();
    let quiet_stall_us = stall_in(old_lines, lead_from, Some(at));
    let result = update();
    let client_still_ran = client.try_wait()?.is_none();
    std::thread::sleep(AFTER);
    let (updated, u, new_lines) = match result {
        Ok((u, l)) => (true, u, l),
        Err(e) => (
            false,
            Update {
                note: format!("{e:#}"),
                ..Default::default()
            },
            old_lines.clone(),
        ),
    };
    let same = Arc::ptr_eq(&new_lines, old_lines);
    let stall = stall_in(old_lines, at, None).max(if same {
        0
    } else {
        stall_in(&new_lines, 0, None)
    });
    let c = redis_client::finish(client)?;
    let mut note = u.note;
    if updated && !client_still_ran {
        note += " (the client ended before the update did: raise SPAN)";
    }
    let verify_from = if same { at } else { 0 };
    let verify = next_verify(&new_lines, verify_from);
    let (bad, disk_bad) = match verify {
        Ok((b, d)) => (Some(b), Some(d)),
        Err(e) => {
            note += &format!("; no verify pass after: {e:#}");
            (None, None)
        }
    };
    Ok(Run {
        updated,
        note,
        client: c.test("GET"),
        client_error: c.error,
        quiet,
        vmm_pause_ms: u.pause_ms,
        total_ms: u.total_ms,
        guest_stall_us: stall,
        quiet_stall_us,
        bad,
        disk_bad,
        trace: u.trace,
    })
}

/// A quiet client run on the VM: its figures, and the size of a measured run lasting `SPAN`.
fn calibrate(lan: &Lan) -> anyhow::Result<(Figures, u64)> {
    let f = redis_client::finish(start_client(lan, 20_000)?)?
        .require("GET")
        .context("the quiet client run")?;
    Ok((f, ((f.rps * SPAN.as_secs_f64()) as u64).max(20_000)))
}

fn fresh_disk(img: &Path) -> anyhow::Result<()> {
    File::create(img)?.set_len(DISK_MIB << 20)?;
    Ok(())
}

fn spanvmm_run(lan: &Lan, bin: &Path, elf: &Path, img: &Path) -> anyhow::Result<Run> {
    fresh_disk(img)?;
    let sock = std::env::temp_dir().join(format!("spanvmm-bench-lud-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = lan
        .cmd(bin)
        .arg("run")
        .arg("--kernel")
        .arg(elf)
        .args(["--cmdline", GUEST, "--memory", MEM])
        .args(["--net", &format!("tap=tap0,mac={MAC}")])
        .args(["--disk", &format!("path={}", img.display())])
        .args(["--serial", "stdout", "--api-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spanvmm")?;
    let lines = collect(child.stdout.take().context("stdout")?);
    // Dropped: the VMM serving the socket (the new process after an update) is killed.
    let vm = Vm { child, lines, sock };
    wait_line(&vm.lines, "SPANGUEST ready", 0)?;
    wait_line(&vm.lines, "SPANGUEST net ", 0)?;
    let (quiet, n) = calibrate(lan)?;
    let mut update = || -> anyhow::Result<(Update, Lines)> {
        let t = Instant::now();
        let (r, _) = vm.api_ok("PUT", "/vm/live-update", Some(json!({ "binary": bin })))?;
        Ok((
            Update {
                pause_ms: r["pause_ms"].as_f64(),
                total_ms: Some(t.elapsed().as_secs_f64() * 1e3),
                note: format!("new pid {}", r["new_pid"]),
                trace: report_trace(&r),
            },
            vm.lines.clone(),
        ))
    };
    let run = measure(lan, n, Some(quiet), &vm.lines, &mut update);
    // The VMM serving now (the new process after an update) is killed at drop: wait until it
    // is gone, or the next VMM finds the tap still held (EBUSY).
    let serving = vm
        .api("GET", "/vm", None)
        .ok()
        .and_then(|(_, v, _)| v["pid"].as_u64());
    drop(vm);
    if let Some(pid) = serving {
        wait_gone(pid as u32);
    }
    run
}

/// Waits (up to 10 s) until process `pid` has exited.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How the QEMUs get the tap.
#[derive(Clone, Copy, PartialEq)]
enum Tap {
    ByName,
    SharedFd(RawFd),
}

/// A QEMU process, its console and stderr lines collected; killed at drop.
struct Qemu {
    child: Child,
    lines: Lines,
    errs: Lines,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

fn start_qemu(
    lan: &Lan,
    elf: &Path,
    img: &Path,
    tap: Tap,
    qmp: PathBuf,
    incoming: &[Value],
) -> anyhow::Result<Qemu> {
    let netdev = match tap {
        Tap::ByName => "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off".to_string(),
        Tap::SharedFd(fd) => format!("tap,id=n0,fd={fd},vhost=off"),
    };
    // Inside the namespace either way (the tap by name is there).
    let mut c = lan.cmd("qemu-system-x86_64");
    c.args(["-enable-kvm", "-M"])
        .arg("microvm,acpi=off,memory-backend=ram0,aux-ram-share=on")
        .args([
            "-object",
            &format!("memory-backend-memfd,id=ram0,size={MEM}M,share=on"),
        ])
        .args(["-m", MEM, "-global", "virtio-mmio.force-legacy=false"])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(elf)
        .args(["-append", GUEST])
        // Disks before nets, as spanvmm places them.
        .args([
            "-drive",
            &format!("id=d0,file={},format=raw,if=none", img.display()),
            "-device",
            "virtio-blk-device,drive=d0",
        ])
        .args(["-netdev", &netdev])
        .args(["-device", &format!("virtio-net-device,netdev=n0,mac={MAC}")])
        .args(qmp_arg(&qmp));
    for ch in incoming {
        c.args(["-incoming", &ch.to_string()]);
    }
    if let Tap::SharedFd(fd) = tap {
        // SAFETY: between fork and exec only fcntl, which is async-signal-safe; it lets this
        // one child (and what it execs) inherit the tap's descriptor.
        unsafe {
            c.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64")?;
    let lines = collect(child.stdout.take().context("stdout")?);
    let errs = collect(child.stderr.take().context("stderr")?);
    Ok(Qemu {
        child,
        lines,
        errs,
        qmp,
    })
}

/// Opens tap `name` of namespace `ns` as QEMU's `-netdev tap,ifname=` would, for a management
/// layer to hand around: from a thread that entered the namespace (and ends right after).
fn open_tap(ns: &str, name: &str) -> anyhow::Result<OwnedFd> {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || -> anyhow::Result<OwnedFd> {
        let nsf = File::open(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("namespace {ns}"))?;
        // SAFETY: setns(2) moves only this thread, which ends once the tap is open.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {ns}: {}", std::io::Error::last_os_error());
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TAP: u16 = 0x0002;
        const IFF_NO_PI: u16 = 0x1000;
        const IFF_VNET_HDR: u16 = 0x4000;
        // struct ifreq: the name (16 bytes) then a union whose first member is ifr_flags.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // A VMM killed a moment ago may hold the tap a little longer (EBUSY meanwhile).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is 40 bytes, its size.
            if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } == 0 {
                return Ok(OwnedFd::from(tun));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                bail!("TUNSETIFF {name}: {e}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the tap-opening thread panicked"))?
}

fn qemu_run(lan: &Lan, elf: &Path, img: &Path, tap: Tap, dir: &Path) -> anyhow::Result<Run> {
    fresh_disk(img)?;
    let old = start_qemu(lan, elf, img, tap, dir.join("old.qmp"), &[])?;
    let mut q = Qmp::connect(&old.qmp)?;
    wait_line(&old.lines, "SPANGUEST ready", 0)?;
    wait_line(&old.lines, "SPANGUEST net ", 0)?;
    let (quiet, n) = calibrate(lan)?;
    // Kept alive to the end of the run (the old QEMU stays in `postmigrate` until then).
    let mut new: Option<Qemu> = None;
    let mut update = || -> anyhow::Result<(Update, Lines)> {
        let r = cpr_transfer(lan, elf, img, tap, dir, &mut q, &mut new);
        // A failed update: say what became of both QEMUs (a new QEMU that failed prints why
        // on its way out).
        r.map_err(|e| {
            std::thread::sleep(Duration::from_millis(500));
            let new_side = match new.as_mut() {
                None => "not started".to_string(),
                Some(n) => format!(
                    "{} ({})",
                    match n.child.try_wait() {
                        Ok(Some(st)) => format!("exited, {st}"),
                        _ => "still running".into(),
                    },
                    n.errs.lock().unwrap().join(" | ")
                ),
            };
            let old_side = q
                .cmd("query-status", json!({}))
                .map(|v| v["status"].to_string())
                .unwrap_or_else(|e| format!("no answer: {e:#}"));
            e.context(format!("new QEMU: {new_side}; old QEMU: {old_side}"))
        })
    };
    let run = measure(lan, n, Some(quiet), &old.lines, &mut update);
    drop(new);
    drop(old);
    run
}

/// One cpr-transfer from the QEMU `q` talks to, to a new one (kept in `new`), until the new
/// one runs the guest.
fn cpr_transfer(
    lan: &Lan,
    elf: &Path,
    img: &Path,
    tap: Tap,
    dir: &Path,
    q: &mut Qmp,
    new: &mut Option<Qemu>,
) -> anyhow::Result<(Update, Lines)> {
    {
        let (main_sock, cpr_sock) = (dir.join("main.sock"), dir.join("cpr.sock"));
        let channels = vec![
            cpr_channel("main", &main_sock),
            cpr_channel("cpr", &cpr_sock),
        ];
        q.cmd("migrate-set-parameters", json!({"mode": "cpr-transfer"}))?;
        let t = Instant::now();
        let next = new.insert(start_qemu(
            lan,
            elf,
            img,
            tap,
            dir.join("new.qmp"),
            &channels,
        )?);
        // The new QEMU listens on its cpr channel first; one that cannot start says why.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = next.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                let why = next.errs.lock().unwrap().join(" | ");
                bail!("the new QEMU exited ({st}) before listening: {why}");
            }
            if cpr_sock.exists() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the new QEMU never listened on its cpr channel");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Its socket file appears at bind(), a moment before it listens.
        let listen_deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match q.cmd("migrate", json!({ "channels": channels })) {
                Err(e)
                    if e.to_string().contains("Connection refused")
                        && Instant::now() < listen_deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2))
                }
                r => break r.map(|_| ())?,
            }
        }
        let info = loop {
            let info = q.cmd("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed") | Some("cancelled") => bail!("cpr-transfer failed: {info}"),
                _ if Instant::now() > deadline => bail!("cpr-transfer did not finish"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let total_ms = t.elapsed().as_secs_f64() * 1e3;
        // The new QEMU runs the guest once its incoming side completes (no -S).
        let mut nq = Qmp::connect(&next.qmp)?;
        let running_deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = nq.cmd("query-status", json!({}))?;
            if st["status"] == "running" {
                break;
            }
            if Instant::now() > running_deadline {
                bail!("the new QEMU does not run the guest: {st}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((
            Update {
                pause_ms: info["downtime"].as_f64(),
                total_ms: Some(total_ms),
                note: format!(
                    "{} bytes of RAM sent",
                    info["ram"]["transferred"].as_u64().unwrap_or(0)
                ),
                trace: Vec::new(),
            },
            next.lines.clone(),
        ))
    }
}

/// One VMM's runs, summarized.
#[derive(Serialize)]
struct Row {
    vmm: &'static str,
    runs: usize,
    updated: usize,
    /// Runs whose client reported an error.
    client_errors: usize,
    max_ms: Option<Stat>,
    p99_ms: Option<Stat>,
    quiet_max_ms: Option<Stat>,
    quiet_p99_ms: Option<Stat>,
    vmm_pause_ms: Option<Stat>,
    total_ms: Option<Stat>,
    guest_stall_us: Option<Stat>,
    quiet_stall_us: Option<Stat>,
    /// Verify passes after the update that found damage (memory or disk), and passes missed.
    damaged: usize,
    unverified: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trace_median_us: Vec<(String, f64)>,
    notes: Vec<String>,
    samples: Vec<Run>,
}

fn row(vmm: &'static str, samples: Vec<Run>) -> Row {
    let opt = |v: Vec<f64>| (!v.is_empty()).then(|| stat(v));
    let ok: Vec<&Run> = samples.iter().filter(|r| r.updated).collect();
    let fig =
        |g: fn(&Figures) -> f64| opt(ok.iter().filter_map(|r| r.client.as_ref().map(g)).collect());
    let quiet = |g: fn(&Figures) -> f64| {
        opt(samples
            .iter()
            .filter_map(|r| r.quiet.as_ref().map(g))
            .collect())
    };
    let traces: Vec<&[(String, i64)]> = ok
        .iter()
        .filter(|r| !r.trace.is_empty())
        .map(|r| &r.trace[..])
        .collect();
    let mut notes: Vec<String> = samples
        .iter()
        .filter(|r| !r.updated || r.client_error.is_some())
        .map(|r| {
            format!(
                "{}{}",
                r.note,
                r.client_error
                    .as_ref()
                    .map(|e| format!("; client: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    notes.dedup();
    Row {
        vmm,
        runs: samples.len(),
        updated: ok.len(),
        client_errors: samples.iter().filter(|r| r.client_error.is_some()).count(),
        max_ms: fig(|c| c.max_ms),
        p99_ms: fig(|c| c.p99_ms),
        quiet_max_ms: quiet(|c| c.max_ms),
        quiet_p99_ms: quiet(|c| c.p99_ms),
        vmm_pause_ms: opt(ok.iter().filter_map(|r| r.vmm_pause_ms).collect()),
        total_ms: opt(ok.iter().filter_map(|r| r.total_ms).collect()),
        guest_stall_us: opt(ok.iter().map(|r| r.guest_stall_us as f64).collect()),
        quiet_stall_us: opt(samples.iter().map(|r| r.quiet_stall_us as f64).collect()),
        damaged: samples
            .iter()
            .filter(|r| r.bad.unwrap_or(0) + r.disk_bad.unwrap_or(0) > 0)
            .count(),
        unverified: samples.iter().filter(|r| r.bad.is_none()).count(),
        trace_median_us: trace_medians(&traces),
        notes,
        samples,
    }
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    notes: Vec<String>,
    runs: usize,
    rows: Vec<Row>,
}

fn table(rows: &[Row]) -> String {
    let m = |x: &Option<Stat>, p: usize| match x {
        Some(x) => format!("{:.p$} [{:.p$}–{:.p$}]", x.median, x.min, x.max),
        None => "–".into(),
    };
    let mut s = String::from(
        "| VMM | updated | client errors | worst ms (quiet) | p99 ms (quiet) | VMM pause ms | total ms | guest stall µs (quiet) | damaged / unverified |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {}/{} | {} | {} ({}) | {} ({}) | {} | {} | {} ({}) | {} / {} |\n",
            r.vmm,
            r.updated,
            r.runs,
            r.client_errors,
            m(&r.max_ms, 1),
            m(&r.quiet_max_ms, 1),
            m(&r.p99_ms, 2),
            m(&r.quiet_p99_ms, 2),
            m(&r.vmm_pause_ms, 2),
            m(&r.total_ms, 1),
            m(&r.guest_stall_us, 0),
            m(&r.quiet_stall_us, 0),
            r.damaged,
            r.unverified
        );
    }
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        s += &format!("{}: {}\n", r.vmm, r.notes.join(" / "));
    }
    s
}

/// Runs spanvmm, QEMU with the tap's descriptor shared, and (once: it shows what a plain
/// command line gets) QEMU with the tap by name, alternating who goes first; writes `out`.
pub fn run(bin: &Path, elf: &Path, runs: usize, out: &Path) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(|e| anyhow::anyhow!("{e}"))?;
    for tool in ["redis-benchmark", "qemu-system-x86_64"] {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("{tool} is needed"))?;
    }
    let runs = runs.max(1);
    let lan = Lan::new()?;
    // The disk image on tmpfs: both VMMs use the page cache alike, and nothing reaches a disk.
    let dir = Path::new("/dev/shm").join(format!("spanvmm-bench-lud-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("disk.img");
    let (mut ours, mut fd_rows, mut name_rows) = (Vec::new(), Vec::new(), Vec::new());
    let failed = |e: anyhow::Error| Run {
        updated: false,
        note: format!("set-up failed: {e:#}"),
        client: None,
        client_error: None,
        quiet: None,
        vmm_pause_ms: None,
        total_ms: None,
        guest_stall_us: 0,
        quiet_stall_us: 0,
        bad: None,
        disk_bad: None,
        trace: Vec::new(),
    };
    for r in 0..runs {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for spanvmm in order {
            if spanvmm {
                let s = spanvmm_run(&lan, bin, elf, &img).unwrap_or_else(failed);
                eprintln!(
                    "run {} spanvmm: updated {} client {:?} err {:?} pause {:?} ms stall {} µs (quiet {}) bad {:?}/{:?} {}",
                    r + 1, s.updated, s.client.map(|c| c.max_ms), s.client_error, s.vmm_pause_ms,
                    s.guest_stall_us, s.quiet_stall_us, s.bad, s.disk_bad, s.note
                );
                ours.push(s);
            } else {
                // The descriptor lives as long as the run: no spanvmm may hold the tap meanwhile.
                let s = open_tap(&lan.ns, "tap0")
                    .and_then(|fd| qemu_run(&lan, elf, &img, Tap::SharedFd(fd.as_raw_fd()), &dir))
                    .unwrap_or_else(failed);
                eprintln!(
                    "run {} qemu tap-fd-shared: updated {} client {:?} err {:?} downtime {:?} ms stall {} µs (quiet {}) bad {:?}/{:?} {}",
                    r + 1, s.updated, s.client.map(|c| c.max_ms), s.client_error, s.vmm_pause_ms,
                    s.guest_stall_us, s.quiet_stall_us, s.bad, s.disk_bad, s.note
                );
                fd_rows.push(s);
            }
        }
    }
    let s = qemu_run(&lan, elf, &img, Tap::ByName, &dir).unwrap_or_else(failed);
    eprintln!(
        "qemu tap-by-name: updated {} client {:?} err {:?} {}",
        s.updated,
        s.client.map(|c| c.max_ms),
        s.client_error,
        s.note
    );
    name_rows.push(s);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = vec![
        row("spanvmm live-update", ours),
        row("qemu-cpr-transfer tap-fd-shared", fd_rows),
        row("qemu-cpr-transfer tap-by-name", name_rows),
    ];
    print!("{}", table(&rows));
    if let Some(r) = rows.first() {
        eprint!(
            "spanvmm's steps (median µs from the pause):\n{}",
            trace_text(&r.trace_median_us)
        );
    }
    let report = Report {
        benchmark: "live-update-devices",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        notes: vec![
            format!("guest (same ELF on both): {GUEST}, {MEM} MiB, 1 vCPU, a {DISK_MIB} MiB raw disk image on tmpfs"),
            format!("client: redis-benchmark -t get -c {CLIENTS} -P 1 -k 1 in the namespace, sized to about {} s at the quiet rate; the update {} s in", SPAN.as_secs(), LEAD.as_secs()),
            "spanvmm: --net tap=tap0 --disk path=IMG, PUT /vm/live-update with the same binary".into(),
            "QEMU 10: microvm acpi=off, memfd RAM with aux-ram-share, virtio-net-device (tap, vhost=off) and virtio-blk-device (raw, default cache); cpr-transfer to a new QEMU on the same command line plus main and cpr incoming channels. tap-fd-shared: the benchmark opens the tap and both QEMUs get the descriptor (fd=); tap-by-name: both name it (ifname=)".into(),
            "worst/p99: the measured run's (quiet: the run just before on the same VM); guest stall: largest loop gap above 1 ms from the update to 300 ms after (quiet: in the second before, the client running); damaged: verify passes after the update with bad or disk_bad above 0".into(),
        ],
        runs,
        rows,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
