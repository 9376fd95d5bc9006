//! `spanvmm-bench devices`: the paravirtual devices against QEMU microvm's, the same spanguest
//! ELF on both, interleaved run by run.
//!
//! - Network: the guest's `kv` (RESP) server on a tap bridged in a network namespace, the real
//!   `redis-benchmark` as client (ping, set, get, incr; pipelines of 4 and of 1): requests/s,
//!   p50, p99. QEMU: `virtio-net-device` on the same tap (no vhost, as spanvmm has none).
//! - Disk: the guest's `disk` workload flat out on an image file in the same directory (same
//!   file system) for both; blocks moved per second, timed on the host from the guest's
//!   `disk` lines. QEMU: `virtio-blk-device`, default cache (the page cache, as spanvmm).
//!
//! Fairness: spanguest is polled on both (no device interrupts), and under QEMU it has no
//! paravirtual sleep, so its idle loop spins where under spanvmm it sleeps. Nothing is pinned;
//! each run records the VMM process's CPU use (utime+stime over wall time) so the cost of the
//! spinning shows next to the throughput.
//!
//! Every run ends with a guest verify pass checked clean (`bad=0`, and `disk_bad=0`).
//!
//! - Latency during a live update and during migrations: see [`events`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlab::NetLab;
use serde::Serialize;

use crate::harness::{field, median};
use crate::redis_client::{self, Figures};

mod events;
pub(crate) mod lu_devices;

const MEM: &str = "128";
const GUEST_IP: &str = "10.0.0.2";
const MAC: &str = "52:54:00:5a:00:02";
const NET_GUEST: &str = "workload=dirty,verify,kv mib=16 rate=2000 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=1000 verify_ms=2000";
const DISK_GUEST: &str = "workload=verify,disk mib=16 disk_mib=64 disk_rate=0 disk_flush=64 report_ms=500 verify_ms=2000";
/// The disk image, MiB (the workload writes its first `disk_mib`).
const DISK_MIB: u64 = 64;
/// How long the disk workload is timed, after its first report.
const DISK_SPAN: Duration = Duration::from_secs(6);
/// redis-benchmark: the tests, requests per test for each pipeline depth, connections.
const TESTS: [&str; 5] = ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"];
const PIPELINES: [(u32, u64); 2] = [(4, 100_000), (1, 40_000)];
const CLIENTS: &str = "20";
const T: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Spanvmm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Spanvmm => "spanvmm",
            Vmm::Qemu => "qemu-microvm",
        }
    }
}

/// A running VMM with its console lines, each with the host time it arrived.
struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    vmm: Vmm,
}

impl Guest {
    fn start(mut cmd: Command, vmm: Vmm) -> anyhow::Result<Guest> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", vmm.name()))?;
        let out = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        let g = Guest { child, lines, vmm };
        g.wait_line("SPANGUEST ready", 0)?;
        Ok(g)
    }

    fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The first line from `from` on that contains `needle`.
    fn wait_line(&self, needle: &str, from: usize) -> anyhow::Result<(Instant, String)> {
        let deadline = Instant::now() + T;
        loop {
            let lines = self.lines.lock().unwrap();
            if let Some(l) = lines[from.min(lines.len())..]
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if let Some(e) = lines.iter().find(|(_, l)| l.contains("SPANGUEST error")) {
                bail!("{}: the guest failed: {}", self.vmm.name(), e.1);
            }
            drop(lines);
            if Instant::now() > deadline {
                bail!("{}: no `{needle}` from the guest", self.vmm.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a verify pass that starts after line `from` and checks it clean.
    fn verify_clean(&self, from: usize) -> anyhow::Result<()> {
        let (_, l) = self.wait_line("SPANGUEST verify ", from)?;
        let bad = field(&l, "bad").context("verify line without bad=")?;
        if bad != 0 || field(&l, "disk_bad").unwrap_or(0) != 0 || field(&l, "ok") == Some(0) {
            bail!("{}: guest damaged: {l}", self.vmm.name());
        }
        Ok(())
    }

    /// The VMM process's CPU time so far (user + system), seconds.
    fn cpu_s(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command name (in parentheses): fields 14 and 15 of stat(5) are utime, stime.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) / hz
    }

    /// spanvmm: SIGTERM, a clean shutdown (exit 0 expected); QEMU (no power-off port for
    /// spanguest): killed.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id() as i32;
        if self.vmm == Vmm::Spanvmm {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(s) = self.child.try_wait()? {
                    if s.code() != Some(0) {
                        bail!("spanvmm ended with {s} on SIGTERM");
                    }
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            bail!("spanvmm did not exit on SIGTERM");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace with a bridge (10.0.0.1/24, the client's address) and one tap the VMMs use in
/// turn; the VMMs and the client run inside it.
struct Lan {
    _lab: NetLab,
    ns: String,
}

impl Lan {
    fn new() -> anyhow::Result<Lan> {
        let lab = NetLab::new("bdev", &["lan"]).context("network namespace")?;
        let ns = lab.host("lan").netns.clone();
        let lan = Lan { _lab: lab, ns };
        for cmd in [
            "ip link add br0 type bridge",
            "ip addr add 10.0.0.1/24 dev br0",
            "ip link set br0 up",
            "ip tuntap add dev tap0 mode tap",
            "ip link set tap0 master br0",
            "ip link set tap0 up",
            // A migration's destination on the same host (events.rs).
            "ip tuntap add dev tap1 mode tap",
            "ip link set tap1 master br0",
            "ip link set tap1 up",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            let out = lan.cmd(args[0]).args(&args[1..]).output()?;
            if !out.status.success() {
                bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(lan)
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

fn qemu_base(elf: &Path, append: &str) -> Vec<String> {
    // microvm writes virtio_mmio.device= only without ACPI; virtio-mmio is legacy unless told
    // otherwise (spanguest's drivers are modern only).
    [
        "-enable-kvm",
        "-M",
        "microvm,acpi=off",
        "-m",
        MEM,
        "-global",
        "virtio-mmio.force-legacy=false",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        &elf.to_string_lossy(),
        "-append",
        append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_net(lan: &Lan, vmm: Vmm, bin: &Path, elf: &Path) -> anyhow::Result<Guest> {
    let cmd = match vmm {
        Vmm::Spanvmm => {
            let mut c = lan.cmd(bin);
            c.arg("run").arg("--kernel").arg(elf).args([
                "--cmdline",
                NET_GUEST,
                "--memory",
                MEM,
                "--net",
                &format!("tap=tap0,mac={MAC}"),
            ]);
            c
        }
        Vmm::Qemu => {
            let mut c = lan.cmd("qemu-system-x86_64");
            c.args(qemu_base(elf, NET_GUEST)).args([
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={MAC}"),
            ]);
            c
        }
    };
    let g = Guest::start(cmd, vmm)?;
    g.wait_line("SPANGUEST net ", 0)?;
    Ok(g)
}

fn start_disk(vmm: Vmm, bin: &Path, elf: &Path, img: &Path) -> anyhow::Result<Guest> {
    let cmd = match vmm {
        Vmm::Spanvmm => {
            let mut c = Command::new(bin);
            c.arg("run").arg("--kernel").arg(elf).args([
                "--cmdline",
                DISK_GUEST,
                "--memory",
                MEM,
                "--disk",
                &format!("path={}", img.display()),
            ]);
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(qemu_base(elf, DISK_GUEST)).args([
                "-drive",
                &format!("id=d0,file={},format=raw,if=none", img.display()),
                "-device",
                "virtio-blk-device,drive=d0",
            ]);
            c
        }
    };
    Guest::start(cmd, vmm)
}

/// One VMM's net run at one pipeline depth: each test's figures and the VMM's CPU use.
struct NetRun {
    tests: Vec<(String, Figures)>,
    vmm_cpu_pct: f64,
}

fn redis_benchmark(lan: &Lan, g: &Guest, pipeline: u32, n: u64) -> anyhow::Result<NetRun> {
    let (cpu0, t0) = (g.cpu_s(), Instant::now());
    // A stuck client must not hang the benchmark: give it a generous bound.
    let out = lan
        .cmd("timeout")
        .args(["300", "redis-benchmark"])
        .args(["-h", GUEST_IP, "-p", "6379", "-t", "ping,set,get,incr"])
        .args(["-c", CLIENTS, "-P", &pipeline.to_string()])
        .args(["-n", &n.to_string(), "--csv"])
        .stdin(Stdio::null())
        .output()
        .context("redis-benchmark")?;
    let vmm_cpu_pct = (g.cpu_s() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let run = redis_client::read(&out);
    if let Some(e) = &run.error {
        bail!(
            "{}: redis-benchmark -P {pipeline} failed: {e}",
            g.vmm.name()
        );
    }
    for t in TESTS {
        if run.test(t).is_none() {
            bail!("{}: test {t} did not run", g.vmm.name());
        }
    }
    let tests = run.tests;
    Ok(NetRun { tests, vmm_cpu_pct })
}

/// One disk run: blocks (4 KiB) moved per second as the host timed the guest's reports, and
/// the VMM's CPU use meanwhile.
struct DiskRun {
    mib_s: f64,
    vmm_cpu_pct: f64,
}

fn disk_run(g: &Guest) -> anyhow::Result<DiskRun> {
    // From the second report on: the first one includes the device's set-up.
    g.wait_line("SPANGUEST disk ", 0)?;
    let from = g.mark();
    let (t0, l0) = g.wait_line("SPANGUEST disk ", from)?;
    let cpu0 = g.cpu_s();
    std::thread::sleep(DISK_SPAN);
    let last = g.mark();
    let (t1, l1) = g.lines.lock().unwrap()[..last]
        .iter()
        .rev()
        .find(|(_, l)| l.contains("SPANGUEST disk "))
        .cloned()
        .context("no disk report")?;
    let cpu1 = g.cpu_s();
    let moved = |l: &str| field(l, "writes").unwrap_or(0) + field(l, "reads").unwrap_or(0);
    let secs = (t1 - t0).as_secs_f64();
    if secs <= 0.0 {
        bail!("{}: too few disk reports", g.vmm.name());
    }
    if field(&l1, "errors").unwrap_or(0) != 0 {
        bail!("{}: disk errors: {l1}", g.vmm.name());
    }
    g.verify_clean(last)?;
    Ok(DiskRun {
        mib_s: (moved(&l1) - moved(&l0)) as f64 * 4096.0 / secs / (1 << 20) as f64,
        vmm_cpu_pct: (cpu1 - cpu0) / DISK_SPAN.as_secs_f64() * 100.0,
    })
}

/// Median and spread of one figure over the runs.
#[derive(Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

fn stat(mut v: Vec<f64>) -> Stat {
    let samples = v.clone();
    let med = median(&mut v);
    Stat {
        median: med,
        min: v[0],
        max: v[v.len() - 1],
        samples,
    }
}

#[derive(Serialize)]
struct NetRow {
    vmm: &'static str,
    pipeline: u32,
    test: String,
    rps: Stat,
    p50_ms: Stat,
    p99_ms: Stat,
    vmm_cpu_pct: Stat,
}

#[derive(Serialize)]
struct DiskRow {
    vmm: &'static str,
    mib_s: Stat,
    vmm_cpu_pct: Stat,
}

#[derive(Serialize)]
struct Report {
    notes: Vec<String>,
    runs: usize,
    load_before: String,
    load_after: String,
    net: Vec<NetRow>,
    disk: Vec<DiskRow>,
    /// The client's latency during a live update and migrations (events.rs).
    during: Vec<events::EventRow>,
    netmon: Vec<NetmonRow>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(bin: &Path, elf: &Path, plugins: &Path, runs: usize, out: &Path) -> anyhow::Result<()> {
    NetLab::available().map_err(|e| anyhow::anyhow!("{e}"))?;
    for tool in ["redis-benchmark", "qemu-system-x86_64"]
        .into_iter()
        .filter(|t| *t != "qemu-system-x86_64" || std::env::var("SPANVMM_BENCH_ONLY").is_err())
    {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("{tool} is needed"))?;
    }
    let runs = runs.max(1);
    let load_before = loadavg();
    let lan = Lan::new()?;
    let img_dir = out.parent().unwrap_or(Path::new(".")).join("devices-disk");
    std::fs::create_dir_all(&img_dir)?;
    let img: PathBuf = img_dir.join("disk.img");
    let vmms = [Vmm::Spanvmm, Vmm::Qemu];
    // net[vmm][pipeline] = runs; disk[vmm] = runs.
    let mut net: Vec<Vec<Vec<NetRun>>> = (0..vmms.len())
        .map(|_| PIPELINES.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut disk: Vec<Vec<DiskRun>> = vec![Vec::new(), Vec::new()];
    // SPANVMM_BENCH_ONLY=netmon: only the netmon rows (no QEMU needed).
    let only_netmon = std::env::var("SPANVMM_BENCH_ONLY").as_deref() == Ok("netmon");
    for r in (0..runs).filter(|_| !only_netmon) {
        // Alternate who goes first, so a slow phase of the host does not favour one.
        let order: Vec<usize> = if r % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for &i in &order {
            let vmm = vmms[i];
            eprintln!("run {} {}: net", r + 1, vmm.name());
            let g = start_net(&lan, vmm, bin, elf)?;
            for (p, (pipeline, n)) in PIPELINES.iter().enumerate() {
                let nr = redis_benchmark(&lan, &g, *pipeline, *n)?;
                eprintln!(
                    "run {} {} -P {pipeline}: {} (VMM cpu {:.0} %)",
                    r + 1,
                    vmm.name(),
                    nr.tests
                        .iter()
                        .map(|(t, x)| format!("{t} {:.0}/s p99 {:.2}", x.rps, x.p99_ms))
                        .collect::<Vec<_>>()
                        .join(", "),
                    nr.vmm_cpu_pct
                );
                net[i][p].push(nr);
            }
            g.verify_clean(g.mark())?;
            g.stop()?;
            std::fs::File::create(&img)?.set_len(DISK_MIB << 20)?;
            let g = start_disk(vmm, bin, elf, &img)?;
            let d = disk_run(&g)?;
            eprintln!(
                "run {} {} disk: {:.1} MiB/s (VMM cpu {:.0} %)",
                r + 1,
                vmm.name(),
                d.mib_s,
                d.vmm_cpu_pct
            );
            disk[i].push(d);
            g.stop()?;
        }
    }
    let during = if only_netmon {
        Vec::new()
    } else {
        events::run(&lan, bin, elf, plugins, runs, &img_dir)
    };
    let _ = std::fs::remove_dir_all(&img_dir);
    let netmon = netmon_rows(&lan, bin, elf, runs)?;
    let mut net_rows = Vec::new();
    for (p, (pipeline, _)) in PIPELINES.iter().enumerate().filter(|_| !only_netmon) {
        for test in TESTS {
            for (i, vmm) in vmms.iter().enumerate() {
                let runs = &net[i][p];
                let pick = |f: fn(&Figures) -> f64| {
                    stat(
                        runs.iter()
                            .filter_map(|nr| nr.tests.iter().find(|(t, _)| t == test))
                            .map(|(_, x)| f(x))
                            .collect(),
                    )
                };
                net_rows.push(NetRow {
                    vmm: vmm.name(),
                    pipeline: *pipeline,
                    test: test.to_string(),
                    rps: pick(|x| x.rps),
                    p50_ms: pick(|x| x.p50_ms),
                    p99_ms: pick(|x| x.p99_ms),
                    vmm_cpu_pct: stat(runs.iter().map(|nr| nr.vmm_cpu_pct).collect()),
                });
            }
        }
    }
    let disk_rows = vmms
        .iter()
        .enumerate()
        .filter(|_| !only_netmon)
        .map(|(i, vmm)| DiskRow {
            vmm: vmm.name(),
            mib_s: stat(disk[i].iter().map(|d| d.mib_s).collect()),
            vmm_cpu_pct: stat(disk[i].iter().map(|d| d.vmm_cpu_pct).collect()),
        })
        .collect::<Vec<_>>();
    let report = Report {
        notes: vec![
            "same spanguest ELF; QEMU microvm (acpi=off) with virtio-net-device (tap, vhost=off) and virtio-blk-device (raw file, default cache); spanvmm with --net tap= and --disk path=".into(),
            format!("net: redis-benchmark -c {CLIENTS} -t ping,set,get,incr, -P 4 (-n 100000) and -P 1 (-n 40000), inside a namespace; the guest kv server: {NET_GUEST}"),
            format!("disk: {DISK_GUEST}, a {DISK_MIB} MiB image in the same directory for both; MiB/s of 4 KiB blocks written+read, timed on the host between the guest's reports over {} s", DISK_SPAN.as_secs()),
            "fairness: spanguest polls its devices on both; under QEMU it has no paravirtual sleep, so its idle loop spins a host core; nothing pinned; vmm_cpu_pct is the VMM process's utime+stime over the measured span".into(),
            "interleaved: spanvmm and QEMU alternate who goes first each run; every run ends with a clean guest verify pass".into(),
            format!("during: redis-benchmark -t get -c {CLIENTS} -P 1 sized to about 5 s at the quiet rate, the event 1 s in (checked to end before the client); spanvmm live update, spanvmm migrations (precopy, postcopy, hybrid) and QEMU's (precopy, postcopy with migrate-start-postcopy at once) over loopback in the namespace to a destination on a second tap of the same bridge; QEMU downtime-limit 2 ms (spanvmm precopy's downtime_ms), max-bandwidth unlimited; p99 over the whole run, worst = max latency; p99_over_quiet_ms against the same VM's quiet run of the same length"),
        ],
        runs,
        load_before,
        load_after: loadavg(),
        net: net_rows,
        disk: disk_rows,
        during,
        netmon,
    };
    if !only_netmon {
        print!("{}", table(&report));
    }
    print!("{}", netmon_table(&report.netmon));
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn table(r: &Report) -> String {
    let mut s = format!(
        "devices, {} runs (load {} before, {} after); median [min–max]\n",
        r.runs, r.load_before, r.load_after
    );
    s += "| -P | test | VMM | req/s | p50 ms | p99 ms | VMM CPU % |\n|---|---|---|---|---|---|---|\n";
    for n in &r.net {
        s += &format!(
            "| {} | {} | {} | {:.0} [{:.0}–{:.0}] | {:.3} | {:.3} [{:.3}–{:.3}] | {:.0} |\n",
            n.pipeline,
            n.test,
            n.vmm,
            n.rps.median,
            n.rps.min,
            n.rps.max,
            n.p50_ms.median,
            n.p99_ms.median,
            n.p99_ms.min,
            n.p99_ms.max,
            n.vmm_cpu_pct.median
        );
    }
    s += "\n| disk | MiB/s | VMM CPU % |\n|---|---|---|\n";
    for d in &r.disk {
        s += &format!(
            "| {} | {:.1} [{:.1}–{:.1}] | {:.0} |\n",
            d.vmm, d.mib_s.median, d.mib_s.min, d.mib_s.max, d.vmm_cpu_pct.median
        );
    }
    s += &events::table(&r.during);
    s
}

/// netmon's cost (issue 16's goal: within 5 %): one spanvmm guest under `redis-benchmark -P 4`
/// with nothing attached, then with `plugins/netmon` attached (every frame summarized and
/// counted per flow), alternating which goes first each run.
#[derive(Serialize)]
pub struct NetmonRow {
    test: String,
    rps_detached: Stat,
    rps_attached: Stat,
    /// Median attached over median detached, %.
    attached_pct: f64,
    p99_detached_ms: Stat,
    p99_attached_ms: Stat,
    vmm_cpu_detached_pct: Stat,
    vmm_cpu_attached_pct: Stat,
    /// Frames netmon counted over the attached runs, and frames the host dropped.
    frames_seen: u64,
    frames_dropped: u64,
    /// Per run, the mean req/s of the five tests attached over detached (same guest, back to
    /// back, so a slow phase of the host weighs on both), %; the same for every test's row.
    paired_pct: Stat,
}

fn ctl(bin: &Path, sock: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "spanvmm ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
}

fn netmon_rows(lan: &Lan, bin: &Path, elf: &Path, runs: usize) -> anyhow::Result<Vec<NetmonRow>> {
    let wasm = crate::repo_root().join("target/plugins/netmon.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: build the plugins (plugins/build.sh)",
            wasm.display()
        );
    }
    let sock =
        std::env::temp_dir().join(format!("spanvmm-bench-netmon-{}.sock", std::process::id()));
    let (pipeline, n) = PIPELINES[0];
    // runs[attached] = the runs; frames seen and dropped while attached.
    let mut by: [Vec<NetRun>; 2] = [Vec::new(), Vec::new()];
    let (mut seen, mut dropped) = (0u64, 0u64);
    for r in 0..runs {
        let _ = std::fs::remove_file(&sock);
        let mut c = lan.cmd(bin);
        c.arg("run").arg("--kernel").arg(elf).args([
            "--cmdline",
            NET_GUEST,
            "--memory",
            MEM,
            "--net",
            &format!("tap=tap0,mac={MAC}"),
        ]);
        c.arg("--api-socket").arg(&sock);
        let g = Guest::start(c, Vmm::Spanvmm)?;
        g.wait_line("SPANGUEST net ", 0)?;
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for attached in order {
            if attached {
                ctl(bin, &sock, &["plugin", "attach", &wasm.to_string_lossy()])?;
            }
            let nr = redis_benchmark(lan, &g, pipeline, n)?;
            if attached {
                // The last batch goes out within the delivery period.
                std::thread::sleep(Duration::from_millis(100));
                let s = ctl(bin, &sock, &["plugin", "call", "netmon", "stats"])?;
                seen += s["result"]["frames"].as_u64().unwrap_or(0);
                dropped += s["result"]["dropped"].as_u64().unwrap_or(0);
                ctl(bin, &sock, &["plugin", "detach", "netmon"])?;
            }
            eprintln!(
                "run {} netmon {}: {} (VMM cpu {:.0} %)",
                r + 1,
                if attached { "attached" } else { "detached" },
                nr.tests
                    .iter()
                    .map(|(t, x)| format!("{t} {:.0}/s", x.rps))
                    .collect::<Vec<_>>()
                    .join(", "),
                nr.vmm_cpu_pct
            );
            by[attached as usize].push(nr);
        }
        g.verify_clean(g.mark())?;
        g.stop()?;
    }
    let _ = std::fs::remove_file(&sock);
    let pick = |runs: &[NetRun], test: &str, f: fn(&Figures) -> f64| {
        stat(
            runs.iter()
                .filter_map(|nr| nr.tests.iter().find(|(t, _)| t == test))
                .map(|(_, x)| f(x))
                .collect(),
        )
    };
    let cpu = |runs: &[NetRun]| stat(runs.iter().map(|nr| nr.vmm_cpu_pct).collect());
    let mean =
        |nr: &NetRun| nr.tests.iter().map(|(_, x)| x.rps).sum::<f64>() / nr.tests.len() as f64;
    let paired: Vec<f64> = by[0]
        .iter()
        .zip(&by[1])
        .map(|(off, on)| mean(on) / mean(off) * 100.0)
        .collect();
    Ok(TESTS
        .iter()
        .map(|test| {
            let (off, on) = (pick(&by[0], test, |x| x.rps), pick(&by[1], test, |x| x.rps));
            NetmonRow {
                test: test.to_string(),
                attached_pct: on.median / off.median * 100.0,
                rps_detached: off,
                rps_attached: on,
                p99_detached_ms: pick(&by[0], test, |x| x.p99_ms),
                p99_attached_ms: pick(&by[1], test, |x| x.p99_ms),
                vmm_cpu_detached_pct: cpu(&by[0]),
                vmm_cpu_attached_pct: cpu(&by[1]),
                frames_seen: seen,
                frames_dropped: dropped,
                paired_pct: stat(paired.clone()),
            }
        })
        .collect())
}

fn netmon_table(rows: &[NetmonRow]) -> String {
    let mut s = format!(
        "\nnetmon attached vs nothing attached (spanvmm, -P {}); median [min–max]\n",
        PIPELINES[0].0
    );
    s += "| test | req/s detached | req/s netmon | netmon/detached | p99 ms detached | p99 ms netmon | VMM CPU % detached / netmon |\n|---|---|---|---|---|---|---|\n";
    for r in rows {
        s += &format!(
            "| {} | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.1} % | {:.3} | {:.3} | {:.0} / {:.0} |\n",
            r.test,
            r.rps_detached.median,
            r.rps_detached.min,
            r.rps_detached.max,
            r.rps_attached.median,
            r.rps_attached.min,
            r.rps_attached.max,
            r.attached_pct,
            r.p99_detached_ms.median,
            r.p99_attached_ms.median,
            r.vmm_cpu_detached_pct.median,
            r.vmm_cpu_attached_pct.median
        );
    }
    if let Some(r) = rows.first() {
        s += &format!(
            "per run, mean req/s of the five tests attached / detached: median {:.1} % [{:.1}–{:.1}]\n",
            r.paired_pct.median, r.paired_pct.min, r.paired_pct.max
        );
        s += &format!(
            "netmon counted {} frames, the host dropped {}\n",
            r.frames_seen, r.frames_dropped
        );
    }
    s
}
