//! `spanvmm-bench migration`: live migration between two "hosts" — loopback, or network
//! namespaces on a shaped link with latency from netlab's delay relay — measured the same way
//! for every engine: total time, guest-observed downtime (the destination guest's largest
//! `stall`), bytes, and the destination guest's memory check.
//!
//! This file holds the network set-ups and QEMU's engines (pre-copy, pre-copy into a
//! preallocated destination, post-copy, multifd; its 128 MiB/s default bandwidth cap lifted).
//! spanvmm's engines run over the same set-ups.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlab::{DelayRelay, NetLab};
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::field;
use crate::live_update::{qemu_with, qmp_arg, wait_ready, Qmp};

/// Populated memory of the guest: spanguest under QEMU fills only the RAM range holding its
/// image (docs/spanguest-abi.md), so stay well inside it.
fn populated_mib(mem: u64) -> u64 {
    (mem * 7 / 8).min(2900)
}

/// The guest's command line: `idle` populates and sleeps, `dirty` rewrites a 64 MiB working
/// set at `rate` pages/s. Both verify every 2 s on their own, so the destination's memory is
/// checked without an API (QEMU has none for the guest). `WORKLOAD+serial` writes the guest's
/// lines byte by byte through the 16550 on spanvmm too (`console=serial`), as it must on
/// QEMU: the two VMMs then pay the same for the guest's output.
pub fn guest_cmdline(mem: u64, workload: &str) -> String {
    let (workload, console) = workload.split_once('+').unwrap_or((workload, "line"));
    let base = format!(
        "mib={} stall_us=1000 report_ms=0 verify_ms=2000 console={console}",
        populated_mib(mem)
    );
    match workload {
        "idle" => format!("workload=idle,verify {base}"),
        _ => format!("workload=dirty,verify wss=64 rate=20000 {base}"),
    }
}

/// The link between source and destination.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Both on this host, TCP over loopback.
    Loopback,
    /// Network namespaces, tbf-shaped to `mbit`, `rtt_ms` added by the delay relay.
    Shaped { mbit: u64, rtt_ms: u64 },
    /// Like `Shaped`, the source's link at `src_mbit` and the destination's at `dst_mbit`
    /// (Scatter-Gather's slow destination).
    Asymmetric {
        src_mbit: u64,
        dst_mbit: u64,
        rtt_ms: u64,
    },
}

impl Link {
    pub fn label(&self) -> String {
        match self {
            Link::Loopback => "loopback".into(),
            Link::Shaped { mbit, rtt_ms } => format!("{mbit} Mbit/s, {rtt_ms} ms RTT"),
            Link::Asymmetric {
                src_mbit,
                dst_mbit,
                rtt_ms,
            } => {
                format!("source {src_mbit} Mbit/s, destination {dst_mbit} Mbit/s, {rtt_ms} ms RTT")
            }
        }
    }
}

/// A source and a destination host joined by a [`Link`]: where to run each side and where the
/// source connects.
pub struct Hosts {
    /// Kept alive for the lab's lifetime; declared first so it goes before the lab.
    _relay: Option<DelayRelay>,
    lab: Option<NetLab>,
    /// Where the destination listens.
    pub listen: SocketAddr,
    /// Where the source connects (the relay, on a shaped link).
    pub connect: SocketAddr,
    /// The relay's one-way delay and window (shaped links).
    delay: Option<(Duration, usize)>,
}

impl Hosts {
    pub fn new(link: Link, port: u16) -> anyhow::Result<Self> {
        match link {
            Link::Loopback => {
                let a = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
                Ok(Hosts {
                    lab: None,
                    _relay: None,
                    listen: a,
                    connect: a,
                    delay: None,
                })
            }
            Link::Shaped { .. } | Link::Asymmetric { .. } => {
                let (src_mbit, mbit, rtt_ms) = match link {
                    Link::Shaped { mbit, rtt_ms } => (mbit, mbit, rtt_ms),
                    Link::Asymmetric {
                        src_mbit,
                        dst_mbit,
                        rtt_ms,
                    } => (src_mbit, dst_mbit, rtt_ms),
                    Link::Loopback => unreachable!("matched above"),
                };
                NetLab::available().map_err(anyhow::Error::msg)?;
                // A tag per lab: several migrations may run at once in this process (the
                // Scatter-Gather scale rows), and the namespaces are named by tag and pid.
                static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let lab = NetLab::new(&format!("mig{n}"), &["src", "dst"])?;
                lab.shape("src", src_mbit * 1_000_000)?;
                lab.shape("dst", mbit * 1_000_000)?;
                let (src, dst) = (lab.host("src"), lab.host("dst"));
                let listen = SocketAddr::new(dst.ip.into(), port);
                // Half the round trip in µs: `rtt_ms / 2` in ms made a 1 ms link's delay 0.
                let one_way = Duration::from_micros(rtt_ms * 500);
                // In flight at most one bandwidth-delay product (at least 256 KiB).
                let bdp = (mbit * 1_000_000 / 8) as f64 * one_way.as_secs_f64();
                let window = (bdp as usize).max(256 << 10);
                let relay = DelayRelay::start(
                    SocketAddr::new(src.gateway.into(), 0),
                    listen,
                    one_way,
                    window,
                )?;
                let connect = relay.addr();
                Ok(Hosts {
                    lab: Some(lab),
                    _relay: Some(relay),
                    listen,
                    connect,
                    delay: Some((one_way, window)),
                })
            }
        }
    }

    /// A second port of the destination reached the way the first is (through a relay of
    /// its own with the same delay, on a shaped link): (where the destination listens, where
    /// the source connects, the relay to keep alive).
    pub fn second_port(
        &self,
        port: u16,
    ) -> anyhow::Result<(SocketAddr, SocketAddr, Option<DelayRelay>)> {
        let listen = SocketAddr::new(self.listen.ip(), port);
        let Some((one_way, window)) = self.delay else {
            return Ok((listen, listen, None));
        };
        let relay = DelayRelay::start(
            SocketAddr::new(self.connect.ip(), 0),
            listen,
            one_way,
            window,
        )?;
        Ok((listen, relay.addr(), Some(relay)))
    }

    /// Bytes host `name` has sent on its shaped link so far (its tbf qdisc's count: every
    /// packet, headers included, whichever VMM or connection sent it); None on loopback.
    pub fn sent_bytes(&self, name: &str) -> Option<u64> {
        self.lab.as_ref()?;
        let out = self
            .command(name, "tc")
            .args(["-s", "-j", "qdisc", "show"])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .filter(|q| q["kind"] == "tbf")
            .map(|q| q["bytes"].as_u64())
            .sum()
    }

    /// The root namespace's address on host `name`'s link (None on loopback): a service in
    /// the root namespace bound there is reached by both hosts, each over its own link.
    pub fn gateway(&self, name: &str) -> Option<Ipv4Addr> {
        self.lab.as_ref().map(|l| l.host(name).gateway)
    }

    /// `program` run on host `name` (`src` or `dst`).
    pub fn command(&self, name: &str, program: &str) -> Command {
        match &self.lab {
            Some(lab) => lab.command(name, program),
            None => Command::new(program),
        }
    }
}

/// QEMU's migration engines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuEngine {
    Precopy,
    /// Pre-copy into a destination started with `-mem-prealloc` (its RAM allocated before the
    /// migration, as spanvmm's destination does with `--memory`).
    PrecopyPrealloc,
    /// `postcopy-ram`, switched to post-copy right after the migration starts.
    Postcopy,
    /// Pre-copy over 4 multifd channels.
    Multifd,
    /// Pre-copy with XBZRLE (XOR-delta pages against a cache of this many MiB, rounded up to
    /// a power of two as QEMU wants; CloudNet's page deltas in QEMU) into a `-mem-prealloc`
    /// destination.
    Xbzrle(u64),
    /// 4 multifd channels with zstd compression, into a `-mem-prealloc` destination.
    MultifdZstd,
    /// [`QemuEngine::Xbzrle`] with `auto-converge` (the guest throttled while pre-copy does
    /// not converge).
    XbzrleAutoConverge(u64),
}

impl QemuEngine {
    /// Its name in the results (`precopy`, `postcopy`, `multifd`).
    pub fn name(self) -> &'static str {
        match self {
            QemuEngine::Precopy => "precopy",
            QemuEngine::PrecopyPrealloc => "precopy-prealloc",
            QemuEngine::Postcopy => "postcopy",
            QemuEngine::Multifd => "multifd",
            QemuEngine::Xbzrle(_) => "xbzrle",
            QemuEngine::MultifdZstd => "multifd-zstd",
            QemuEngine::XbzrleAutoConverge(_) => "xbzrle-auto-converge",
        }
    }

    /// Its destination is started with `-mem-prealloc` (as spanvmm's with `--memory`).
    fn prealloc(self) -> bool {
        matches!(
            self,
            QemuEngine::PrecopyPrealloc
                | QemuEngine::Xbzrle(_)
                | QemuEngine::MultifdZstd
                | QemuEngine::XbzrleAutoConverge(_)
        )
    }
}

/// One migration's figures.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub vmm: String,
    pub engine: String,
    pub link: String,
    pub mem_mib: u64,
    pub workload: String,
    pub completed: bool,
    pub total_ms: u64,
    /// The VMM's own figure (QEMU's `downtime`).
    pub downtime_ms: u64,
    /// The destination guest's largest stall until 200 ms after the migration completed (µs;
    /// 0 = below its 1 ms threshold): what the migration cost the guest.
    pub guest_stall_us: u64,
    /// Its largest stall in the ~2 s of normal running after that (until its verify line):
    /// the shared machine's noise floor, for comparison.
    pub guest_stall_after_us: u64,
    /// Post-copy faults the destination requested (spanvmm; 0 for QEMU, which does not say).
    pub remote_faults: u64,
    /// Their mean and 99th percentile latency, µs.
    pub fault_mean_us: u64,
    pub fault_p99_us: u64,
    pub setup_ms: u64,
    pub bytes: u64,
    /// The destination guest's memory check after arrival (`verify bad=0`).
    pub verify_bad: Option<u64>,
    /// The link's cipher: a TLS 1.3 suite (`aes-128-gcm`, ...; spanvmm always encrypts), or
    /// `plaintext` (QEMU's default).
    pub cipher: String,
    /// CPU time the source and destination processes used from the start of the migration
    /// to its end (the guest's own vCPU time included, alike for every cipher), ms.
    pub cpu_ms: Option<u64>,
    pub note: String,
    /// Bytes the source host sent on the shaped link during the migration (see
    /// [`Hosts::sent_bytes`]); None on loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_bytes: Option<u64>,
    /// The VMM's own account (spanvmm's migration report, QEMU's `query-migrate`), for
    /// suites that read more of it.
    #[serde(skip)]
    pub report: Value,
}

/// The first `verify` line at or after `from`, waiting up to `timeout`: its `bad` count.
pub fn verify_after(
    lines: &Arc<Mutex<Vec<String>>>,
    from: usize,
    timeout: Duration,
) -> Option<u64> {
    let l = crate::harness::wait_line(lines, from, "SPANGUEST verify", timeout).ok()?;
    field(&l, "bad")
}

pub fn max_stall(lines: &Arc<Mutex<Vec<String>>>, range: std::ops::Range<usize>) -> u64 {
    let lines = lines.lock().unwrap();
    lines[range.start.min(lines.len())..range.end.min(lines.len())]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .filter_map(|l| field(l, "us"))
        .max()
        .unwrap_or(0)
}

/// Call when the migration has completed: waits for the destination guest's lines of the
/// hand-over to arrive (200 ms) and returns how many lines belong to the migration.
pub fn settle(lines: &Arc<Mutex<Vec<String>>>) -> usize {
    std::thread::sleep(Duration::from_millis(200));
    lines.lock().unwrap().len()
}

/// Migrates a QEMU guest from host `src` to host `dst` with `engine`.
pub fn qemu_migrate(
    elf: &Path,
    mem: u64,
    workload: &str,
    engine: QemuEngine,
    link: Link,
    timeout: Duration,
    tls: Option<(&Path, &str)>,
) -> anyhow::Result<Outcome> {
    let guest = Guest {
        workload,
        cmdline: &guest_cmdline(mem, workload),
    };
    qemu_migrate_guest(elf, mem, guest, engine, link, timeout, tls)
}

/// A guest to migrate: its workload's name in the results and its command line (which must
/// verify its memory on its own, `verify_ms`, and print stalls, like [`guest_cmdline`]'s).
#[derive(Clone, Copy)]
pub struct Guest<'a> {
    pub workload: &'a str,
    pub cmdline: &'a str,
}

/// [`qemu_migrate`] with any guest command line.
pub fn qemu_migrate_guest(
    elf: &Path,
    mem: u64,
    guest: Guest,
    engine: QemuEngine,
    link: Link,
    timeout: Duration,
    tls: Option<(&Path, &str)>,
) -> anyhow::Result<Outcome> {
    qemu_migrate_with(
        elf,
        mem,
        guest,
        engine,
        link,
        timeout,
        tls,
        &QemuHook::default(),
    )
    .map(|r| r.outcome)
}

/// What must live while a migration runs, made once its hosts exist.
pub type Keep<'a> = &'a dyn Fn(&Hosts) -> anyhow::Result<Box<dyn std::any::Any>>;

/// What a benchmark adds around a QEMU migration (spanvmm's side: `migration_spanvmm::Prepare`).
#[derive(Default)]
pub struct QemuHook<'a> {
    /// Called once the hosts exist, before either QEMU starts; what it returns lives until the
    /// migration has ended (the co-located guests of the Scatter-Gather Table 1, say).
    pub prepare: Option<Keep<'a>>,
    /// QEMU's `downtime-limit`, ms (None: QEMU's default, 300): set to the budget spanvmm's
    /// pre-copy is compared under.
    pub downtime_limit_ms: Option<u64>,
}

/// A QEMU migration's [`Outcome`] and when its `migrate` command was sent (to line up what ran
/// beside it).
pub struct QemuRun {
    pub outcome: Outcome,
    pub started: Instant,
}

/// [`qemu_migrate_guest`] with a [`QemuHook`].
#[allow(clippy::too_many_arguments)]
pub fn qemu_migrate_with(
    elf: &Path,
    mem: u64,
    guest: Guest,
    engine: QemuEngine,
    link: Link,
    timeout: Duration,
    tls: Option<(&Path, &str)>,
    hook: &QemuHook,
) -> anyhow::Result<QemuRun> {
    let Guest { workload, cmdline } = guest;
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cipher = tls.map_or("plaintext", |(_, c)| c).to_string();
    let hosts = Hosts::new(link, 47_000)?;
    let keep = hook.prepare.map(|p| p(&hosts)).transpose()?;
    let mut started = Instant::now();
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let cl = cmdline.to_string();
    let (mut src, src_lines) = qemu_with(
        hosts.command("src", "qemu-system-x86_64"),
        elf,
        mem,
        &cl,
        &qmp_arg(&src_qmp),
    )?;
    let mut dst_args = qmp_arg(&dst_qmp);
    dst_args.extend(["-incoming".into(), "defer".into()]);
    if engine.prealloc() {
        dst_args.push("-mem-prealloc".into());
    }
    let result = (|| {
        wait_ready(&src_lines)?;
        // Let the guest finish populating before the clock starts.
        std::thread::sleep(Duration::from_millis(500));
        let (mut dst, dst_lines) = qemu_with(
            hosts.command("dst", "qemu-system-x86_64"),
            elf,
            mem,
            &cl,
            &dst_args,
        )?;
        let r = (|| {
            let mut q = Qmp::connect(&src_qmp)?;
            let mut dq = Qmp::connect(&dst_qmp)?;
            let caps = match engine {
                QemuEngine::Precopy | QemuEngine::PrecopyPrealloc => vec![],
                QemuEngine::Postcopy => vec![json!({"capability": "postcopy-ram", "state": true})],
                QemuEngine::Multifd | QemuEngine::MultifdZstd => {
                    vec![json!({"capability": "multifd", "state": true})]
                }
                QemuEngine::Xbzrle(_) => vec![json!({"capability": "xbzrle", "state": true})],
                QemuEngine::XbzrleAutoConverge(_) => vec![
                    json!({"capability": "xbzrle", "state": true}),
                    json!({"capability": "auto-converge", "state": true}),
                ],
            };
            for qmp in [&mut q, &mut dq] {
                if !caps.is_empty() {
                    qmp.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
                }
                match engine {
                    QemuEngine::Multifd => {
                        qmp.cmd("migrate-set-parameters", json!({"multifd-channels": 4}))?;
                    }
                    QemuEngine::MultifdZstd => {
                        qmp.cmd(
                            "migrate-set-parameters",
                            json!({"multifd-channels": 4, "multifd-compression": "zstd"}),
                        )?;
                    }
                    // QEMU wants a power of two: the next one up (at least ours).
                    QemuEngine::Xbzrle(mib) | QemuEngine::XbzrleAutoConverge(mib) => {
                        qmp.cmd(
                            "migrate-set-parameters",
                            json!({"xbzrle-cache-size": (mib << 20).next_power_of_two()}),
                        )?;
                    }
                    _ => {}
                }
            }
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100u64 << 30}),
            )?;
            if let Some(ms) = hook.downtime_limit_ms {
                q.cmd("migrate-set-parameters", json!({"downtime-limit": ms}))?;
            }
            if let Some((certs, cipher)) = tls {
                for (qmp, endpoint) in [(&mut q, "client"), (&mut dq, "server")] {
                    qemu_tls(qmp, certs, endpoint, cipher)?;
                }
            }
            let cpu_before = cpu_pair(src.id(), dst.id());
            let uri = |a: SocketAddr| format!("tcp:{}:{}", a.ip(), a.port());
            dq.cmd("migrate-incoming", json!({"uri": uri(hosts.listen)}))?;
            std::thread::sleep(Duration::from_millis(100));
            let sent_before = hosts.sent_bytes("src");
            started = Instant::now();
            q.cmd("migrate", json!({"uri": uri(hosts.connect)}))?;
            if engine == QemuEngine::Postcopy {
                q.cmd("migrate-start-postcopy", json!({}))?;
            }
            let deadline = Instant::now() + timeout;
            let info = loop {
                let info = q.cmd("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => break Some(info),
                    Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
                    _ if Instant::now() > deadline => {
                        let _ = q.cmd("migrate_cancel", json!({}));
                        break None;
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            let link_bytes = hosts
                .sent_bytes("src")
                .zip(sent_before)
                .map(|(a, b)| a.saturating_sub(b));
            let cpu = cpu_pair(src.id(), dst.id())
                .zip(cpu_before)
                .map(|(after, before)| after.saturating_sub(before));
            let Some(info) = info else {
                return Ok(Outcome {
                    vmm: "qemu".into(),
                    engine: engine.name().into(),
                    link: link.label(),
                    mem_mib: mem,
                    workload: workload.into(),
                    completed: false,
                    total_ms: timeout.as_millis() as u64,
                    downtime_ms: 0,
                    guest_stall_us: 0,
                    guest_stall_after_us: 0,
                    remote_faults: 0,
                    fault_mean_us: 0,
                    fault_p99_us: 0,
                    setup_ms: 0,
                    bytes: 0,
                    verify_bad: None,
                    cipher: cipher.clone(),
                    cpu_ms: cpu,
                    note: format!("did not complete in {timeout:?}"),
                    link_bytes,
                    report: Value::Null,
                });
            };
            let from = settle(&dst_lines);
            let verify_bad = verify_after(&dst_lines, from, Duration::from_secs(30));
            let end = dst_lines.lock().unwrap().len();
            Ok(Outcome {
                vmm: "qemu".into(),
                engine: engine.name().into(),
                link: link.label(),
                mem_mib: mem,
                workload: workload.into(),
                completed: true,
                total_ms: info["total-time"].as_u64().unwrap_or(0),
                downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                guest_stall_us: max_stall(&dst_lines, 0..from),
                guest_stall_after_us: max_stall(&dst_lines, from..end),
                remote_faults: 0,
                fault_mean_us: 0,
                fault_p99_us: 0,
                setup_ms: info["setup-time"].as_u64().unwrap_or(0),
                bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
                verify_bad,
                cipher,
                cpu_ms: cpu,
                note: String::new(),
                link_bytes,
                report: info,
            })
        })();
        let _ = dst.kill();
        let _ = dst.wait();
        r
    })();
    let _ = src.kill();
    let _ = src.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(keep);
    drop(hosts);
    result.map(|outcome| QemuRun { outcome, started })
}

/// Source + destination CPU time so far, ms.
fn cpu_pair(src: u32, dst: u32) -> Option<u64> {
    Some(crate::harness::cpu_ms(src)? + crate::harness::cpu_ms(dst)?)
}

/// Sets up QEMU's TLS for migration on one side: `tls-creds-x509` over the certificates
/// `spanvmm migrate-certs` made (under the file names QEMU wants), TLS 1.3 with `cipher` only
/// (a GnuTLS priority string), the destination checked under spanvmm's certificate name.
fn qemu_tls(qmp: &mut Qmp, certs: &Path, endpoint: &str, cipher: &str) -> anyhow::Result<()> {
    let gnutls = match cipher {
        "aes-128-gcm" => "AES-128-GCM",
        "aes-256-gcm" => "AES-256-GCM",
        "chacha20-poly1305" => "CHACHA20-POLY1305",
        other => bail!("no GnuTLS name for cipher {other}"),
    };
    let dir = certs.join("qemu");
    if !dir.exists() {
        std::fs::create_dir_all(&dir)?;
        for (to, from) in [
            ("ca-cert.pem", "ca.pem"),
            ("server-cert.pem", "node.pem"),
            ("server-key.pem", "node.key"),
            ("client-cert.pem", "node.pem"),
            ("client-key.pem", "node.key"),
        ] {
            std::fs::copy(certs.join(from), dir.join(to))?;
        }
    }
    qmp.cmd(
        "object-add",
        json!({
            "qom-type": "tls-creds-x509",
            "id": "tls0",
            "dir": dir,
            "endpoint": endpoint,
            "verify-peer": true,
            "priority": format!("NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{gnutls}"),
        }),
    )?;
    qmp.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-hostname": "spanvmm-migration"}),
    )?;
    Ok(())
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    runs: Vec<Outcome>,
    /// Per engine over the rounds: median and spread (see [`summarize`]).
    summary: Vec<Value>,
    goals: Value,
}

/// Runs every engine on every link and size and writes `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    sizes: &[u64],
    links: Option<&str>,
    workloads: Option<&str>,
    engines: Option<&str>,
    repeat: usize,
    out: &Path,
) -> anyhow::Result<()> {
    // Which engines run: QEMU's as `qemu-precopy`, `qemu-postcopy`, `qemu-multifd`; spanvmm's
    // by service name (`-early` / `-ready` appended: `--commit with-state` / `after-ready`;
    // `@CIPHER`: that suite). All but the suffixed by default (a comparison runs both VMMs in
    // the same run); `repeat` rounds, each running every engine in turn (interleaved).
    let wanted_engine = |name: &str| engines.is_none_or(|e| e.split(',').any(|x| x == name));
    let spanvmm_engines: Vec<&str> = match engines {
        Some(e) => e.split(',').filter(|x| !x.starts_with("qemu-")).collect(),
        None => vec!["precopy", "postcopy", "hybrid"],
    };
    // `loopback`, or `MBIT/RTT_MS` for a shaped link; all three by default.
    let wanted = links.unwrap_or("loopback,1000/1,100/20");
    let mut links = Vec::new();
    for l in wanted.split(',') {
        if l == "loopback" {
            links.push(Link::Loopback);
            continue;
        }
        let (m, r) = l
            .split_once('/')
            .with_context(|| format!("link {l:?}: loopback or MBIT/RTT_MS"))?;
        if let Err(why) = NetLab::available() {
            eprintln!("SKIPPING the shaped link {l}: {why}");
            continue;
        }
        links.push(Link::Shaped {
            mbit: m.parse()?,
            rtt_ms: r.parse()?,
        });
    }
    let workloads: Vec<&str> = workloads.unwrap_or("idle,dirty").split(',').collect();
    // The engines each VMM runs in a round (the two VMMs take turns going first).
    enum Vmm<'a> {
        Qemu(QemuEngine),
        Spanvmm(&'a str),
    }
    let qemu_engines: Vec<Vmm> = [
        QemuEngine::Precopy,
        QemuEngine::PrecopyPrealloc,
        QemuEngine::Postcopy,
        QemuEngine::Multifd,
    ]
    .into_iter()
    .filter(|e| wanted_engine(&format!("qemu-{}", e.name())))
    .map(Vmm::Qemu)
    .collect();
    let spanvmm_engines: Vec<Vmm> = spanvmm_engines.iter().map(|&e| Vmm::Spanvmm(e)).collect();
    let mut runs = Vec::new();
    for &link in &links {
        // Four times what the data needs on the link, at least a minute: a pre-copy that has
        // not converged by then will not.
        let need_s = |mem: u64| match link {
            Link::Loopback => 0,
            Link::Shaped { mbit, .. } => mem * 8 / mbit,
            Link::Asymmetric { dst_mbit, .. } => mem * 8 / dst_mbit,
        };
        for &mem in sizes {
            for &workload in &workloads {
                for round in 0..repeat.max(1) {
                    if repeat > 1 {
                        eprintln!(
                            "round {} of {repeat}: {} {mem} MiB {workload}",
                            round + 1,
                            link.label()
                        );
                    }
                    // Every other round runs spanvmm first: whatever one VMM's run leaves the
                    // host to do (freeing and reporting its guest's memory) falls on both alike.
                    let (first, then) = if round % 2 == 1 {
                        (&spanvmm_engines, &qemu_engines)
                    } else {
                        (&qemu_engines, &spanvmm_engines)
                    };
                    for vmm in first.iter().chain(then) {
                        let o = match *vmm {
                            Vmm::Qemu(engine) => {
                                let limit = Duration::from_secs((need_s(mem) * 4).max(60));
                                qemu_migrate(elf, mem, workload, engine, link, limit, None)?
                            }
                            Vmm::Spanvmm(engine) => crate::migration_spanvmm::spanvmm_migrate(
                                bin,
                                plugins,
                                elf,
                                mem,
                                workload,
                                engine,
                                link,
                                Duration::from_secs(300),
                            )?,
                        };
                        eprintln!(
                            "{:>22} {mem:>5} MiB {workload:>5} {} {:>8}: total {} ms, downtime {} ms, guest stall {} µs (then {} µs), {} MiB, verify bad={:?} {}",
                            o.link, o.vmm, o.engine, o.total_ms, o.downtime_ms, o.guest_stall_us, o.guest_stall_after_us, o.bytes >> 20, o.verify_bad, o.note
                        );
                        runs.push(o);
                    }
                }
            }
        }
    }
    let summary = summarize(&runs);
    for l in &summary {
        eprintln!(
            "{:>22} {:>5} MiB {:>5} {:>7} {:>16}: {} of {} done, guest stall median {:.1} ms [{:.1}, {:.1}], downtime median {:.2} ms [{:.2}, {:.2}], fault p99 median {:.1} ms [{:.1}, {:.1}], total median {} ms, verify bad {}",
            l["link"].as_str().unwrap_or(""),
            l["mem_mib"],
            l["workload"].as_str().unwrap_or(""),
            l["vmm"].as_str().unwrap_or(""),
            l["engine"].as_str().unwrap_or(""),
            l["completed"],
            l["runs"],
            l["guest_stall_ms"]["median"].as_f64().unwrap_or(f64::NAN),
            l["guest_stall_ms"]["min"].as_f64().unwrap_or(f64::NAN),
            l["guest_stall_ms"]["max"].as_f64().unwrap_or(f64::NAN),
            l["downtime_ms"]["median"].as_f64().unwrap_or(f64::NAN),
            l["downtime_ms"]["min"].as_f64().unwrap_or(f64::NAN),
            l["downtime_ms"]["max"].as_f64().unwrap_or(f64::NAN),
            l["fault_p99_ms"]["median"].as_f64().unwrap_or(f64::NAN),
            l["fault_p99_ms"]["min"].as_f64().unwrap_or(f64::NAN),
            l["fault_p99_ms"]["max"].as_f64().unwrap_or(f64::NAN),
            l["total_ms"]["median"],
            l["verify_bad"],
        );
    }
    let report = Report {
        benchmark: "migration",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        goals: json!({
            "idle_1g_total": "spanvmm total ≤ 0.5 × QEMU pre-copy",
            "downtime": "≤ 5 ms and ≤ 1/4 of QEMU's",
            "dirty_faster_than_link": "completes",
            "postcopy": "each page sent once",
        }),
        runs,
        summary,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Median, least and largest of `v` (None when empty).
fn spread(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!({ "median": median, "min": v[0], "max": v[n - 1] })
}

/// One line per link, size, workload and engine over the completed runs: median and spread
/// of the guest stall, the downtime (spanvmm's to the µs, from its report), the fault
/// latency's 99th percentile and the total; runs and completed runs; the worst `verify bad`.
fn summarize(runs: &[Outcome]) -> Vec<Value> {
    let mut keys: Vec<(String, u64, String, String, String)> = Vec::new();
    for o in runs {
        let k = (
            o.link.clone(),
            o.mem_mib,
            o.workload.clone(),
            o.vmm.clone(),
            o.engine.clone(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(link, mem, workload, vmm, engine)| {
            let all: Vec<&Outcome> = runs
                .iter()
                .filter(|o| {
                    o.link == link
                        && o.mem_mib == mem
                        && o.workload == workload
                        && o.vmm == vmm
                        && o.engine == engine
                })
                .collect();
            let done: Vec<&&Outcome> = all.iter().filter(|o| o.completed).collect();
            let of = |f: &dyn Fn(&Outcome) -> f64| spread(done.iter().map(|o| f(o)).collect());
            json!({
                "link": link,
                "mem_mib": mem,
                "workload": workload,
                "vmm": vmm,
                "engine": engine,
                "runs": all.len(),
                "completed": done.len(),
                "guest_stall_ms": of(&|o| o.guest_stall_us as f64 / 1e3),
                "downtime_ms": of(&|o| o.report["downtime_ms"]
                    .as_f64()
                    .unwrap_or(o.downtime_ms as f64)),
                "fault_p99_ms": of(&|o| o.fault_p99_us as f64 / 1e3),
                "total_ms": of(&|o| o.total_ms as f64),
                "verify_bad": done.iter().filter_map(|o| o.verify_bad).max(),
            })
        })
        .collect()
}
