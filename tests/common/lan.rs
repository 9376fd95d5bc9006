//! Guest networks for the end-to-end tests: network namespaces with bridges and taps, the
//! guest's `kv` (RESP) server booted on them, and the real `redis-benchmark`/`redis-cli`
//! (Debian redis-tools) as clients.
//!
//! Two shapes:
//! - [`Lan::new`]: one namespace `lan` holding the bridge `br0` (10.0.0.1/24: the guest's
//!   gateway and the client's address) and the taps; the VMMs and the client run there.
//! - [`Lan::with_hosts`]: the client's namespace `lan` is the switch (`br0`, 10.0.0.1), and
//!   each host is a namespace of its own with a bridge, a tap `tap0` and an uplink (a veth
//!   whose other end is `up-HOST` on the switch), as hypervisor hosts on one L2 segment. The
//!   hosts also have netlab's routed addresses ([`Lan::host_ip`]), the management network a
//!   migration stream takes; the guest's frames go over the switch only.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netlab::NetLab;
use serde_json::Value;

use super::{api_get, guest_elf, num, VmProcess};

/// The guest's address and MAC on every Lan.
pub const GUEST_IP: &str = "10.0.0.2";
pub const MAC: &str = "52:54:00:5a:00:02";
/// The tests redis-benchmark runs, as its CSV names them.
pub const TESTS: [&str; 5] = ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"];
/// The key redis-benchmark's INCR test increments (without `-r` it is not randomised): after a
/// run from a deleted key it holds the number of INCRs the guest executed.
pub const COUNTER: &str = "counter:__rand_int__";
/// The server with memory dirtied and verified beside it; stalls of 100 ms or more printed.
pub const KV_GUEST: &str = "workload=dirty,verify,kv mib=16 rate=2000 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=500 stall_us=100000";

const T: Duration = Duration::from_secs(60);

/// Namespaces with bridges and taps; dropping it deletes them.
pub struct Lan {
    lab: NetLab,
    /// The client's namespace.
    pub ns: String,
}

/// Whether the machine can build a Lan (and CI is not set: see netlab::can_run).
fn can_build(tag: &str) -> bool {
    let needs = NetLab::available().and_then(|()| {
        let ok = Command::new("redis-benchmark")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err("redis-benchmark (redis-tools) is not installed".into())
        }
    });
    netlab::can_run(tag, needs)
}

impl Lan {
    /// One namespace with `br0` and `taps` on it; None when the machine cannot build it.
    pub fn new(tag: &str, taps: &[&str]) -> Option<Lan> {
        if !can_build(tag) {
            return None;
        }
        let lab = NetLab::new(tag, &["lan"]).expect("namespace");
        let ns = lab.host("lan").netns.clone();
        let lan = Lan { lab, ns };
        lan.bridge(&lan.ns, Some("10.0.0.1/24"));
        for t in taps {
            lan.tap(&lan.ns, t);
        }
        Some(lan)
    }

    /// The client's namespace as a switch and one namespace per host in `hosts`, each with
    /// `br0`, `tap0` and an uplink to the switch (`up-HOST` there).
    pub fn with_hosts(tag: &str, hosts: &[&str]) -> Option<Lan> {
        if !can_build(tag) {
            return None;
        }
        let mut names = vec!["lan"];
        names.extend_from_slice(hosts);
        let lab = NetLab::new(tag, &names).expect("namespaces");
        let ns = lab.host("lan").netns.clone();
        let lan = Lan { lab, ns };
        lan.bridge(&lan.ns, Some("10.0.0.1/24"));
        for h in hosts {
            let hns = lan.lab.host(h).netns.clone();
            lan.bridge(&hns, None);
            lan.tap(&hns, "tap0");
            let peer = format!("up-{h}");
            let link = [
                "ip",
                "link",
                "add",
                "uplink",
                "type",
                "veth",
                "peer",
                "name",
                peer.as_str(),
                "netns",
                lan.ns.as_str(),
            ];
            sh_in(&hns, &link);
            for (ns, dev) in [(&hns, "uplink"), (&lan.ns, peer.as_str())] {
                sh_in(ns, &["ip", "link", "set", dev, "master", "br0"]);
                sh_in(ns, &["ip", "link", "set", dev, "up"]);
            }
        }
        Some(lan)
    }

    fn bridge(&self, ns: &str, addr: Option<&str>) {
        sh_in(ns, &["ip", "link", "add", "br0", "type", "bridge"]);
        if let Some(a) = addr {
            sh_in(ns, &["ip", "addr", "add", a, "dev", "br0"]);
        }
        sh_in(ns, &["ip", "link", "set", "br0", "up"]);
    }

    fn tap(&self, ns: &str, t: &str) {
        sh_in(ns, &["ip", "tuntap", "add", "dev", t, "mode", "tap"]);
        sh_in(ns, &["ip", "link", "set", t, "master", "br0"]);
        sh_in(ns, &["ip", "link", "set", t, "up"]);
    }

    /// `program` in the client's namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs `args` in the client's namespace; it must succeed; its stdout.
    pub fn sh(&self, args: &[&str]) -> String {
        sh_in(&self.ns, args)
    }

    /// The wrapper that runs a program in the client's namespace (where [`Lan::new`]'s taps are).
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns]
    }

    /// The wrapper that runs a program on host `h` of [`Lan::with_hosts`].
    pub fn host_wrapper(&self, h: &str) -> [&str; 4] {
        self.lab.host(h).wrapper()
    }

    /// Host `h`'s management address (netlab's routed link), for migration streams.
    pub fn host_ip(&self, h: &str) -> Ipv4Addr {
        self.lab.host(h).ip
    }

    /// Boots spanguest with `kv` (`cmdline`) under `wrapper` with `args` (`--net`, `--disk`,
    /// ...), waiting for its `net` and `ready` lines.
    pub fn boot_on(&self, wrapper: &[&str], tag: &str, cmdline: &str, args: &[&str]) -> VmProcess {
        let kernel = guest_elf();
        let mut a = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            "128",
        ];
        a.extend_from_slice(args);
        let vm = VmProcess::start_wrapped(tag, wrapper, &a);
        vm.wait_line("SPANGUEST net ", T);
        vm.wait_line("SPANGUEST ready", T);
        vm
    }

    /// Boots spanguest with [`KV_GUEST`] on `tap` in the client's namespace.
    pub fn boot(&self, tag: &str, tap: &str) -> VmProcess {
        let net = format!("tap={tap},mac={MAC}");
        self.boot_on(&self.wrapper(), tag, KV_GUEST, &["--net", &net])
    }

    /// `redis-benchmark -c 20 -P 4 -n N --csv EXTRA` against the guest, started (N a multiple
    /// of 4: requests go in pipelines of 4, so exactly N of each test are sent).
    pub fn bench(&self, n: u64, extra: &[&str]) -> Child {
        self.cmd("redis-benchmark")
            .args(["-h", GUEST_IP, "-p", "6379", "-t", "ping,set,get,incr"])
            .args(["-c", "20", "-P", "4"])
            .args(["-n", &n.to_string(), "--csv"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-benchmark")
    }

    /// `redis-cli` against the guest.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .cmd("redis-cli")
            .args(["-h", GUEST_IP, "-p", "6379"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// How many INCRs the guest executed since [`COUNTER`] was deleted.
    pub fn incr_count(&self) -> u64 {
        let v = self.cli(&["GET", COUNTER]);
        v.parse()
            .unwrap_or_else(|_| panic!("GET {COUNTER}: {v:?} is not a count"))
    }

    /// Whether the client's bridge has the guest's MAC behind port `dev`.
    pub fn fdb_has(&self, dev: &str) -> bool {
        let fdb = self.sh(&["bridge", "fdb", "show", "br", "br0"]);
        fdb.lines()
            .any(|l| l.starts_with(MAC) && l.contains(&format!("dev {dev} ")))
    }

    /// Waits until the client's bridge has learnt the guest's MAC behind `dev`.
    pub fn wait_fdb(&self, dev: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.fdb_has(dev) {
            assert!(
                Instant::now() < deadline,
                "the bridge did not learn the guest behind {dev}: {}",
                self.sh(&["bridge", "fdb", "show", "br", "br0"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sh_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One CSV row of redis-benchmark: requests/s, p50, p99 and max (ms).
#[derive(Debug)]
pub struct Row {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Waits for redis-benchmark and checks that it succeeded without an error and ran every test;
/// returns its rows by test name.
pub fn finish(child: Child, what: &str) -> Vec<(String, Row)> {
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{what}: redis-benchmark failed: {stdout}\n{stderr}"
    );
    for bad in ["Error", "error", "reset", "Reset", "WARNING"] {
        assert!(
            !stdout.contains(bad) && !stderr.contains(bad),
            "{what}: redis-benchmark saw an error: {stdout}\n{stderr}"
        );
    }
    let mut rows = Vec::new();
    for line in stdout
        .lines()
        .skip_while(|l| !l.starts_with("\"test\""))
        .skip(1)
    {
        let f: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if f.len() < 8 {
            continue;
        }
        let n = |i: usize| f[i].parse::<f64>().unwrap_or(-1.0);
        rows.push((
            f[0].to_string(),
            Row {
                rps: n(1),
                p50: n(4),
                p99: n(6),
                max: n(7),
            },
        ));
    }
    for t in TESTS {
        let r = rows.iter().find(|(n, _)| n == t);
        assert!(
            r.is_some_and(|(_, r)| r.rps > 0.0),
            "{what}: test {t} did not run: {stdout}\n{stderr}"
        );
    }
    for (name, r) in &rows {
        eprintln!(
            "{what}: {name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            r.rps, r.p50, r.p99, r.max
        );
    }
    rows
}

/// The VM's net device as `GET /vm` lists it.
pub fn net_device(vm: &VmProcess) -> Value {
    let vmj = api_get(&vm.api, "/vm").expect("GET /vm");
    vmj["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "net"))
        .cloned()
        .unwrap_or_else(|| panic!("no net device in GET /vm: {vmj}"))
}

/// A verify pass: memory (and the disk, with `disk`) clean, and something checked.
pub fn verify_clean(vm: &VmProcess, disk: bool) {
    let l = &vm.verify(1)[0];
    assert_eq!(num(l, "bad"), 0, "memory or disk damaged: {l}");
    assert!(num(l, "ok") > 0, "nothing checked: {l}");
    if disk {
        assert_eq!(num(l, "disk_bad"), 0, "{l}");
        assert!(num(l, "disk_ok") > 0, "no disk block checked: {l}");
    }
}
