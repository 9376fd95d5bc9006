//! `spanvmm-bench sync-arrival`: CloudNet's synchronized arrival (issue 17 item 4) on a
//! two-tier application. A front end (64 MiB, spanguest `kvload`: SET/GET at a fixed rate,
//! its latency per second) loads a back end (256 MiB, spanguest `kv` with dirtied memory) over
//! the guests' network; both run on host `src` and move to host `dst` with `spanvmm ctl
//! migrate-group`, once independently (`--no-sync`: each switches over when it is done) and
//! once synchronized (held until both are ready, released together).
//!
//! The hosts are network namespaces. Migration streams go over netlab's routed links shaped
//! to 100 Mbit/s (tbf) through its delay relay (10 ms each way). The guests' L2 segment spans
//! both hosts: each host has a bridge with the two guests' taps and an uplink veth; the
//! uplinks' other ends are joined by a userspace frame relay in this process that delays
//! every frame by 10 ms each way and paces it to 100 Mbit/s (this kernel has no netem). A
//! tier left behind therefore talks to the other across the WAN, as in the paper; the
//! destination's RARP announce moves each guest's MAC in the bridges.
//!
//! Figures per mode: the front end's request latency (mean, p99, max over the migration and
//! after it), its errors (must be 0), how long the tiers ran split (arrival spread), each
//! tier's downtime, and the bytes the held rounds cost. Under load the numbers are
//! indications only (docs/benchmarks.md says which).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlab::{DelayRelay, NetLab};
use serde::Serialize;
use serde_json::Value;

use crate::harness::field;

const ONE_WAY: Duration = Duration::from_millis(10);
const MBIT: u64 = 100;
const FRONT_MAC: &str = "52:54:00:5a:00:02";
const BACK_MAC: &str = "52:54:00:5a:00:03";
const FRONT: &str = "workload=kvload,dirty,verify mib=8 wss=2 rate=200 peer=10.0.0.3:6379 load_rate=200 ip=10.0.0.2/24 report_ms=1000 stall_us=100000";
const BACK: &str = "workload=dirty,verify,kv mib=64 wss=16 rate=1500 ip=10.0.0.3/24 report_ms=1000 stall_us=100000";
const PORTS: [u16; 2] = [47_300, 47_301];
/// The guests' report period (`report_ms`).
const PERIOD: Duration = Duration::from_secs(1);

/// A console line and when it came.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn collect(out: impl std::io::Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push((Instant::now(), line));
        }
    });
    lines
}

/// A VMM process on a host, killed when dropped.
struct Proc {
    child: Child,
    lines: Lines,
    sock: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Proc {
    fn wait(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let t = Instant::now();
        loop {
            if let Some((_, l)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if t.elapsed() > timeout {
                bail!("no {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `verify` in the guest: its `bad=` (all vCPUs' lines summed).
    fn verify(&self, bin: &Path) -> anyhow::Result<u64> {
        let from = self.lines.lock().unwrap().len();
        let st = Command::new(bin)
            .args(["ctl", "--api-socket"])
            .arg(&self.sock)
            .args(["guest", "verify"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "ctl guest verify failed");
        let t = Instant::now();
        loop {
            let got: Vec<String> = self.lines.lock().unwrap()[from..]
                .iter()
                .filter(|(_, l)| l.contains("SPANGUEST verify"))
                .map(|(_, l)| l.clone())
                .collect();
            if !got.is_empty() {
                return Ok(got.iter().filter_map(|l| field(l, "bad")).sum());
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "no verify line");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A raw socket on interface `name` (every frame it receives; frames sent go out of it).
fn packet_socket(name: &str) -> anyhow::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {name}");
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    anyhow::ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind(2) with a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    anyhow::ensure!(r == 0, "bind {name}: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt(2) with a timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

/// The WAN between the two hosts' guest segments: every frame from one uplink goes out of the
/// other `ONE_WAY` later, paced to `MBIT`.
struct FrameRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FrameRelay {
    fn start(a: &str, b: &str) -> anyhow::Result<Self> {
        let (fa, fb) = (Arc::new(packet_socket(a)?), Arc::new(packet_socket(b)?));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(fa.clone(), fb.clone()), (fb, fa)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s.load(Ordering::Relaxed) {
                    // SAFETY: sockaddr_ll is plain data.
                    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: recvfrom(2) into our buffer and address of the sizes given.
                    let n = unsafe {
                        libc::recvfrom(
                            from.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&mut sll as *mut libc::sockaddr_ll).cast(),
                            &mut len,
                        )
                    };
                    // Frames this socket sent itself show up as outgoing: not forwarded back.
                    if n > 0 && sll.sll_pkttype != libc::PACKET_OUTGOING {
                        let _ = tx.send((Instant::now() + ONE_WAY, buf[..n as usize].to_vec()));
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut free_at = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    // Paced: the link is busy for the frame's bits after the previous one.
                    let bits = Duration::from_nanos(frame.len() as u64 * 8 * 1000 / MBIT);
                    free_at = free_at.max(due) + bits;
                    let wait = free_at.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    // SAFETY: send(2) of our buffer on the bound socket.
                    unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                }
            }));
        }
        Ok(FrameRelay { stop, threads })
    }
}

impl Drop for FrameRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The two hosts, their guest segments joined by the frame relay, the migration relays.
struct Testbed {
    /// Stopped first: it reads the uplinks.
    wan: Option<FrameRelay>,
    relays: Vec<DelayRelay>,
    uplinks: Vec<String>,
    lab: NetLab,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        drop(self.wan.take());
        for u in &self.uplinks {
            let _ = sh(&["ip", "link", "del", u]);
        }
    }
}

impl Testbed {
    fn new() -> anyhow::Result<Self> {
        let lab = NetLab::new("sarr", &["src", "dst"])?;
        for h in ["src", "dst"] {
            lab.shape(h, MBIT * 1_000_000)?;
        }
        let mut uplinks = Vec::new();
        for h in ["src", "dst"] {
            let ns = lab.host(h).netns.clone();
            let up = format!("sa{}{}", std::process::id() % 100_000, &h[..1]);
            let inns = |a: &[&str]| {
                let mut v = vec!["ip", "netns", "exec", ns.as_str()];
                v.extend_from_slice(a);
                sh(&v)
            };
            inns(&["ip", "link", "add", "br0", "type", "bridge"])?;
            inns(&["ip", "link", "set", "br0", "up"])?;
            for t in ["tapf", "tapb"] {
                inns(&["ip", "tuntap", "add", "dev", t, "mode", "tap"])?;
                inns(&["ip", "link", "set", t, "master", "br0"])?;
                inns(&["ip", "link", "set", t, "up"])?;
            }
            sh(&[
                "ip",
                "link",
                "add",
                up.as_str(),
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                ns.as_str(),
            ])?;
            uplinks.push(up.clone());
            inns(&["ip", "link", "set", "wan", "master", "br0"])?;
            inns(&["ip", "link", "set", "wan", "up"])?;
            sh(&["ip", "link", "set", up.as_str(), "up", "promisc", "on"])?;
        }
        let wan = FrameRelay::start(&uplinks[0], &uplinks[1])?;
        let dst = lab.host("dst").clone();
        let relays = PORTS
            .iter()
            .map(|&p| {
                DelayRelay::start(
                    SocketAddr::new(lab.host("src").gateway.into(), 0),
                    SocketAddr::new(dst.ip.into(), p),
                    ONE_WAY,
                    256 << 10,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Testbed {
            wan: Some(wan),
            relays,
            uplinks,
            lab,
        })
    }

    fn run(&self, host: &str, bin: &Path, args: &[String], tag: &str) -> anyhow::Result<Proc> {
        let sock =
            std::env::temp_dir().join(format!("spanvmm-sarr-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut child = self
            .lab
            .command(host, bin.to_str().context("binary path")?)
            .arg("run")
            .args(args)
            .args(["--serial", "stdout", "--api-socket"])
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let lines = collect(child.stdout.take().context("stdout")?);
        Ok(Proc { child, lines, sock })
    }
}

/// The front end's latency over a window of periods.
#[derive(Serialize, Default, Clone)]
struct Window {
    periods: usize,
    requests: u64,
    mean_ms: f64,
    /// Largest per-second p99.
    p99_ms: f64,
    max_ms: f64,
}

fn window(lines: &[(Instant, String)], from: Instant, to: Instant) -> Window {
    let mut w = Window::default();
    let mut sum = 0.0;
    let inside =
        |(t, l): &&(Instant, String)| *t >= from && *t < to && l.contains("SPANGUEST kvload reqs=");
    for (_, l) in lines.iter().filter(inside) {
        let reqs = field(l, "reqs").unwrap_or(0);
        w.periods += 1;
        w.requests += reqs;
        sum += reqs as f64 * field(l, "mean_us").unwrap_or(0) as f64 / 1e3;
        w.p99_ms = w.p99_ms.max(field(l, "p99_us").unwrap_or(0) as f64 / 1e3);
        w.max_ms = w.max_ms.max(field(l, "max_us").unwrap_or(0) as f64 / 1e3);
    }
    w.mean_ms = sum / w.requests.max(1) as f64;
    w
}

#[derive(Serialize)]
struct Run {
    sync: bool,
    ok: bool,
    error: Option<String>,
    total_ms: f64,
    /// Front end's latency before, during and after the migration.
    before: Window,
    during: Window,
    after: Window,
    /// The front end's errors (wrong replies, lost connections, timeouts) over the run.
    client_errors: u64,
    front_downtime_ms: f64,
    back_downtime_ms: f64,
    switch_spread_ms: f64,
    /// How long the tiers ran on different hosts.
    arrival_spread_ms: f64,
    held_bytes: u64,
    bytes: u64,
    bad: u64,
    /// Each tier's figures from the group report (front end first): total time, bytes,
    /// rounds, and what the hold did.
    members: Vec<Value>,
}

fn one_run(bin: &Path, plugins: &Path, elf: &Path, sync: bool, dir: &Path) -> anyhow::Result<Run> {
    let tb = Testbed::new()?;
    let tls = dir.join("tls");
    if !tls.exists() {
        let st = Command::new(bin)
            .args(["migrate-certs", "--out"])
            .arg(&tls)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "migrate-certs failed");
    }
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let dst_ip = tb.lab.host("dst").ip;
    let incoming = |port: u16, tap: &str, mem: u64, tag: &str| {
        tb.run(
            "dst",
            bin,
            &[
                "--incoming".into(),
                format!("tls://{}:{port}", dst_ip),
                "--tls-dir".into(),
                s(&tls),
                "--net".into(),
                format!("tap={tap}"),
                "--memory".into(),
                mem.to_string(),
            ],
            tag,
        )
    };
    let dst_f = incoming(PORTS[0], "tapf", 64, "dst-front")?;
    let dst_b = incoming(PORTS[1], "tapb", 256, "dst-back")?;
    let boot = |cmdline: &str, tap: &str, mac: &str, mem: u64, tag: &str| {
        tb.run(
            "src",
            bin,
            &[
                "--kernel".into(),
                s(elf),
                "--cmdline".into(),
                cmdline.into(),
                "--memory".into(),
                mem.to_string(),
                "--net".into(),
                format!("tap={tap},mac={mac}"),
            ],
            tag,
        )
    };
    let back = boot(BACK, "tapb", BACK_MAC, 256, "src-back")?;
    back.wait("SPANGUEST ready", Duration::from_secs(60))?;
    let front = boot(FRONT, "tapf", FRONT_MAC, 64, "src-front")?;
    front.wait("SPANGUEST ready", Duration::from_secs(60))?;
    // A few seconds of steady load first.
    std::thread::sleep(Duration::from_secs(4));
    let report = dir.join(format!(
        "group-{}.json",
        if sync { "sync" } else { "nosync" }
    ));
    let vm = |p: &Proc, i: usize| format!("{}=tls://{}", p.sock.display(), tb.relays[i].addr());
    let t0 = Instant::now();
    let mut cmd = Command::new(bin);
    let (vm_f, vm_b) = (vm(&front, 0), vm(&back, 1));
    cmd.args([
        "ctl",
        "migrate-group",
        "--vm",
        vm_f.as_str(),
        "--vm",
        vm_b.as_str(),
    ])
    .arg("--plugin")
    .arg(plugins.join("precopy.wasm"))
    .arg("--tls-dir")
    .arg(&tls)
    .arg("--report")
    .arg(&report)
    .stdout(Stdio::null())
    // The coordinator's progress lines, when asked for.
    .stderr(if std::env::var_os("SPANVMM_BENCH_VERBOSE").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    if !sync {
        cmd.arg("--no-sync");
    }
    let st = cmd.status()?;
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    let t2 = Instant::now();
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).context("the group report")?)?;
    let mut lines = front.lines.lock().unwrap().clone();
    lines.extend(dst_f.lines.lock().unwrap().iter().cloned());
    let errors = lines
        .iter()
        .filter(|(_, l)| l.contains("SPANGUEST kvload reqs="))
        .filter_map(|(_, l)| field(l, "errors"))
        .max()
        .unwrap_or(0);
    let (bad, ok) = if st.success() {
        (dst_f.verify(bin)? + dst_b.verify(bin)?, true)
    } else {
        (front.verify(bin)? + back.verify(bin)?, false)
    };
    let m = |i: usize, k: &str| r["members"][i][k].as_f64().unwrap_or(0.0);
    Ok(Run {
        sync,
        ok,
        error: r["error"].as_str().map(String::from),
        total_ms: t1.duration_since(t0).as_secs_f64() * 1e3,
        // A line covers the second before it: the one after the end is the migration's.
        before: window(&lines, t0 - Duration::from_secs(3), t0),
        during: window(&lines, t0, t1 + PERIOD),
        after: window(&lines, t1 + PERIOD, t2),
        client_errors: errors,
        front_downtime_ms: m(0, "downtime_ms"),
        back_downtime_ms: m(1, "downtime_ms"),
        switch_spread_ms: r["switch_spread_ms"].as_f64().unwrap_or(0.0),
        arrival_spread_ms: r["arrival_spread_ms"].as_f64().unwrap_or(0.0),
        held_bytes: r["held_bytes"].as_u64().unwrap_or(0),
        bytes: r["bytes"].as_u64().unwrap_or(0),
        bad,
        members: (0..2)
            .map(|i| {
                let rep = &r["members"][i]["report"];
                serde_json::json!({
                    "total_ms": rep["total_ms"],
                    "downtime_ms": rep["downtime_ms"],
                    "bytes": rep["bytes"],
                    "rounds": rep["rounds"],
                    "hold": rep["hold"],
                })
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    setup: String,
    runs: Vec<Run>,
}

/// `runs` rounds of (independent, synchronized), interleaved; JSON to `out`.
pub fn run(bin: &Path, plugins: &Path, elf: &Path, runs: usize, out: &Path) -> anyhow::Result<()> {
    NetLab::available().map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-sarr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut all = Vec::new();
    for round in 0..runs {
        for sync in [false, true] {
            let r = one_run(bin, plugins, elf, sync, &dir)
                .with_context(|| format!("round {round}, sync {sync}"))?;
            eprintln!(
                "sync-arrival {}: during {:.1} ms mean / {:.1} p99 / {:.1} max, after {:.1} ms mean; split {:.0} ms; errors {}; held {} bytes; downtime {:.0}/{:.0} ms; bad {}",
                if sync { "sync  " } else { "nosync" },
                r.during.mean_ms,
                r.during.p99_ms,
                r.during.max_ms,
                r.after.mean_ms,
                r.arrival_spread_ms,
                r.client_errors,
                r.held_bytes,
                r.front_downtime_ms,
                r.back_downtime_ms,
                r.bad
            );
            all.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let report = Report {
        benchmark: "sync-arrival",
        setup: format!(
            "front end 64 MiB ({FRONT}), back end 256 MiB ({BACK}); migration {MBIT} Mbit/s tbf + {} ms each way (netlab relay); guest segment joined by a frame relay, {} ms each way, {MBIT} Mbit/s; precopy.wasm",
            ONE_WAY.as_millis(),
            ONE_WAY.as_millis()
        ),
        runs: all,
    };
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
