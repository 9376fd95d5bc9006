//! End-to-end live migration: real `spanvmm` processes on real KVM, spanguest moving between
//! them over TLS on loopback, through a delay relay that the tests kill to cut the link, and
//! between network namespaces over a veth pair shaped by `tc tbf`. Every migrated guest
//! verifies its memory (bad=0) at the destination and its stalls are checked.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const GUEST: &str = "workload=dirty,verify mib=64 rate=20000 stall_us=2000 report_ms=200";
const MEM: u64 = 256;

fn plugin(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/plugins")
        .join(file);
    assert!(p.exists(), "{} missing — run plugins/build.sh", p.display());
    p.to_str().unwrap().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a node certificate, made by `spanvmm migrate-certs`.
fn certs(dir: &TempDir, name: &str) -> PathBuf {
    let out = dir.path().join(name);
    let (code, err) = run_to_end(&["migrate-certs", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "migrate-certs failed: {err}");
    out
}

/// Waits until `vm`'s stderr contains `needle`.
fn wait_stderr(vm: &VmProcess, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !vm.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "waiting for {needle:?} on stderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A destination waiting on `addr`, optionally inside a network namespace.
fn destination(tag: &str, wrapper: &[&str], addr: &str, tls: &Path, extra: &[&str]) -> VmProcess {
    let mut args = vec!["--incoming", addr, "--tls-dir", tls.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vm = VmProcess::start_wrapped(tag, wrapper, &args);
    wait_stderr(
        &vm,
        "waiting for an incoming migration",
        Duration::from_secs(10),
    );
    vm
}

/// `spanvmm ctl migrate`: (success, output, report).
fn migrate(src: &VmProcess, args: &[&str]) -> (bool, String, Option<Value>) {
    let report = src.dir.path().join("report.json");
    let mut a = vec!["migrate", "--report", report.to_str().unwrap()];
    a.extend_from_slice(args);
    let (ok, out) = src.ctl(&a);
    let r = std::fs::read_to_string(&report)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("the report is JSON"));
    (ok, out, r)
}

/// The largest stall the guest reported since line `from`, µs.
fn stall_since(vm: &VmProcess, from: usize) -> u64 {
    vm.lines()[from.min(vm.mark())..]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .map(|l| num(l, "us"))
        .max()
        .unwrap_or(0)
}

/// The destination runs the guest on: it keeps dirtying (stat lines), its memory verifies,
/// and its stalls stay below `max_stall_ms`. Returns the largest stall, µs.
fn check_arrived(dst: &VmProcess, max_stall_ms: u64) -> u64 {
    dst.wait_line("SPANGUEST stat", Duration::from_secs(10));
    let before = dst.mark();
    dst.wait_line_from(before, "SPANGUEST stat", Duration::from_secs(10));
    dst.assert_verify_clean(1);
    let stall = stall_since(dst, 0);
    assert!(
        stall < max_stall_ms * 1000,
        "the guest stalled {stall} µs at the destination (limit {max_stall_ms} ms)"
    );
    stall
}

fn wait_exit(vm: &mut VmProcess, what: &str) -> Option<i32> {
    let code = vm.wait_exit(Duration::from_secs(15));
    assert!(code.is_some(), "{what} did not exit:\n{}", vm.stderr());
    code
}

fn f(r: &Value, k: &str) -> f64 {
    r[k].as_f64()
        .unwrap_or_else(|| panic!("report has no {k}: {r}"))
}

/// The relay between source and destination (killing it cuts the link).
struct Relay(Child);

impl Relay {
    fn start(wrapper: &[&str], listen: &str, target: &str, delay_ms: u64) -> Relay {
        let mut cmd = match wrapper.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(env!("CARGO_BIN_EXE_spanvmm-delay-relay"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_spanvmm-delay-relay")),
        };
        let mut child = cmd
            .args([listen, target, &delay_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the relay");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.contains("relay listening"), "relay: {line:?}");
        Relay(child)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn precopy_moves_a_dirtying_guest_and_an_unauthenticated_peer_is_refused() {
    let tmp = TempDir::new("mig-pre");
    let tls = certs(&tmp, "tls");
    let rogue = certs(&tmp, "rogue");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination("mig-pre-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-pre-src", GUEST, MEM, 1);

    // A source whose certificate another CA signed is refused; nothing changes on either side.
    let (ok, out, _) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &plugin("precopy.wasm"),
            "--tls-dir",
            rogue.to_str().unwrap(),
        ],
    );
    assert!(
        !ok,
        "a migration with a foreign certificate succeeded: {out}"
    );
    assert!(out.contains("cannot reach the destination"), "{out}");
    wait_stderr(&dst, "migration: refused", Duration::from_secs(5));
    assert!(src.alive() && dst.alive());
    // So is a peer that speaks no TLS at all.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr.trim_start_matches("tls://")).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }

    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &plugin("precopy.wasm"),
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    assert!(ok, "precopy failed: {out}\n{}", src.stderr());
    let r = report.expect("a report");
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(r["handover"], "stop-and-copy", "{r}");
    assert!(
        f(&r, "rounds") >= 1.0 && f(&r, "pages_sent") >= f(&r, "pages_total"),
        "{r}"
    );
    assert!(f(&r, "zero_pages") > 0.0, "zero pages went as data: {r}");
    assert!(f(&r, "downtime_ms") < 100.0, "{r}");
    assert!(
        src.dir.path().join("report.svg").exists(),
        "no timeline plot"
    );
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    let stall = check_arrived(&dst, 1000);
    eprintln!(
        "precopy: total {:.0} ms, downtime {:.2} ms (guest saw {stall} µs), rounds {}",
        f(&r, "total_ms"),
        f(&r, "downtime_ms"),
        r["rounds"]
    );
    assert!(dst.alive());
}

#[test]
fn postcopy_runs_at_once_and_sends_each_page_once() {
    let tmp = TempDir::new("mig-post");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-post-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-post-src", GUEST, MEM, 1);
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &plugin("postcopy.wasm"),
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    assert!(ok, "postcopy failed: {out}\n{}", src.stderr());
    let r = report.unwrap();
    assert_eq!(r["handover"], "postcopy", "{r}");
    assert_eq!(
        f(&r, "pages_sent"),
        f(&r, "pages_total"),
        "each page once: {r}"
    );
    assert_eq!(f(&r, "postcopy_resent"), 0.0, "{r}");
    assert!(f(&r, "remote_faults") > 0.0, "the guest never faulted: {r}");
    assert!(f(&r, "downtime_ms") < 100.0, "{r}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    let stall = check_arrived(&dst, 2000);
    eprintln!(
        "postcopy: total {:.0} ms, downtime {:.2} ms, {} faults (mean {} µs), guest stall {stall} µs",
        f(&r, "total_ms"),
        f(&r, "downtime_ms"),
        r["remote_faults"],
        r["fault_latency_mean_us"]
    );
}

#[test]
fn a_guest_dirtying_faster_than_the_link_still_moves() {
    // 64 MiB rewritten as fast as the guest can against a 40 MB/s link: pre-copy cannot
    // converge. precopy stops and copies when the dirty set stops shrinking; hybrid switches
    // to post-copy after its rounds.
    let fast = "workload=dirty,verify mib=64 rate=0 stall_us=2000 report_ms=200";
    let tmp = TempDir::new("mig-fast");
    let tls = certs(&tmp, "tls");
    for (name, handover) in [("precopy", "stop-and-copy"), ("hybrid", "postcopy")] {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let dst = destination(&format!("mig-{name}-fast-dst"), &[], &addr, &tls, &[]);
        let mut src = VmProcess::boot(&format!("mig-{name}-fast-src"), fast, MEM, 1);
        let (ok, out, report) = migrate(
            &src,
            &[
                "--to",
                &addr,
                "--plugin",
                &plugin(&format!("{name}.wasm")),
                "--tls-dir",
                tls.to_str().unwrap(),
                "--max-bandwidth",
                "40M",
            ],
        );
        assert!(ok, "{name} failed: {out}\n{}", src.stderr());
        let r = report.unwrap();
        assert_eq!(r["handover"], handover, "{name}: {r}");
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        check_arrived(&dst, 5000);
        eprintln!(
            "{name} at 40 MB/s: total {:.0} ms, downtime {:.2} ms, rounds {}, {} bytes",
            f(&r, "total_ms"),
            f(&r, "downtime_ms"),
            r["rounds"],
            r["bytes"]
        );
    }
}

#[test]
fn a_cut_during_precopy_leaves_the_source_running_and_the_destination_gone() {
    let tmp = TempDir::new("mig-cut");
    let tls = certs(&tmp, "tls");
    let dport = free_port();
    let rport = free_port();
    let mut dst = destination(
        "mig-cut-dst",
        &[],
        &format!("tls://127.0.0.1:{dport}"),
        &tls,
        &[],
    );
    let relay = Relay::start(
        &[],
        &format!("127.0.0.1:{rport}"),
        &format!("127.0.0.1:{dport}"),
        0,
    );
    let mut src = VmProcess::boot("mig-cut-src", GUEST, MEM, 1);
    let api = src.api.clone();
    let args: Vec<String> = [
        "migrate",
        "--report",
        src.dir.path().join("r.json").to_str().unwrap(),
        "--to",
        &format!("tls://127.0.0.1:{rport}"),
        "--plugin",
        &plugin("precopy.wasm"),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--max-bandwidth",
        "20M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ctl = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&api, &a)
    });
    std::thread::sleep(Duration::from_millis(800));
    drop(relay); // the cut
    let (ok, out) = ctl.join().unwrap();
    assert!(!ok, "the migration survived a cut: {out}");
    assert!(out.contains("runs on at the source"), "{out}");
    assert!(src.alive(), "the source died");
    let status = src.ctl_ok(&["status"]);
    assert!(
        status.contains("\"running\""),
        "source not running: {status}"
    );
    src.assert_verify_clean(1);
    // The destination gives up and leaves (nothing of the half-received VM stays).
    let code = wait_exit(&mut dst, "the destination");
    assert_ne!(code, Some(0));
    assert!(
        dst.stderr().contains("before the hand-over"),
        "{}",
        dst.stderr()
    );
    // The source can migrate again afterwards.
    let dst2 = destination(
        "mig-cut-dst2",
        &[],
        &format!("tls://127.0.0.1:{dport}"),
        &tls,
        &[],
    );
    let (ok, out, _) = migrate(
        &src,
        &[
            "--to",
            &format!("tls://127.0.0.1:{dport}"),
            "--plugin",
            &plugin("precopy.wasm"),
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    assert!(ok, "second attempt failed: {out}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    check_arrived(&dst2, 1000);
}

#[test]
fn a_postcopy_cut_is_recovered_without_losing_a_page() {
    let tmp = TempDir::new("mig-rec");
    let tls = certs(&tmp, "tls");
    let dport = free_port();
    let rport = free_port();
    let listen = format!("127.0.0.1:{rport}");
    let target = format!("127.0.0.1:{dport}");
    let dst = destination("mig-rec-dst", &[], &format!("tls://{target}"), &tls, &[]);
    let relay = Relay::start(&[], &listen, &target, 0);
    let mut src = VmProcess::boot("mig-rec-src", GUEST, MEM, 1);
    let api = src.api.clone();
    let report = src.dir.path().join("r.json");
    let args: Vec<String> = [
        "migrate",
        "--report",
        report.to_str().unwrap(),
        "--to",
        &format!("tls://{listen}"),
        "--plugin",
        &plugin("postcopy.wasm"),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--max-bandwidth",
        "20M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ctl = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&api, &a)
    });
    wait_stderr(&dst, "the guest runs here", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    drop(relay); // the cut, in the middle of the push
    wait_stderr(&dst, "post-copy connection lost", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(700));
    let _relay = Relay::start(&[], &listen, &target, 0); // the link is back
    let (ok, out) = ctl.join().unwrap();
    assert!(ok, "post-copy did not recover: {out}\n{}", src.stderr());
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(f(&r, "recoveries") >= 1.0, "{r}");
    assert_eq!(r["bytes_per_link"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    assert!(dst.stderr().contains("post-copy connection restored"));
    // The outage stalled the guest; what matters is that every page arrived.
    check_arrived(&dst, 30_000);
}

#[test]
fn a_destination_dying_in_postcopy_is_reported() {
    let tmp = TempDir::new("mig-die");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-die-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-die-src", GUEST, MEM, 1);
    let api = src.api.clone();
    let args: Vec<String> = [
        "migrate",
        "--report",
        src.dir.path().join("r.json").to_str().unwrap(),
        "--to",
        &addr,
        "--plugin",
        &plugin("postcopy.wasm"),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--max-bandwidth",
        "20M",
        "--recovery-timeout-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ctl = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&api, &a)
    });
    wait_stderr(&dst, "the guest runs here", Duration::from_secs(20));
    drop(dst); // SIGKILL in the middle of post-copy
    let (ok, out) = ctl.join().unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("destination is unreachable") && out.contains("source stays paused"),
        "unclear report: {out}"
    );
    assert!(src.alive(), "the source must keep the guest's memory");
    let status = src.ctl_ok(&["status"]);
    assert!(status.contains("\"paused\""), "{status}");
}

/// Runs `cmd` (as `sh -c`), panicking with its output on failure.
fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair, each end shaped by `tc tbf`; removed on drop.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new(rate: &str) -> Option<Hosts> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
            return None;
        }
        let id = std::process::id() % 10000;
        let h = Hosts {
            a: format!("spanmig-a{id}"),
            b: format!("spanmig-b{id}"),
        };
        let (a, b) = (&h.a, &h.b);
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!(
            "ip link add va{id} netns {a} type veth peer name vb{id} netns {b} && \
             ip -n {a} addr add 10.77.0.1/24 dev va{id} && ip -n {b} addr add 10.77.0.2/24 dev vb{id} && \
             ip -n {a} link set va{id} up && ip -n {b} link set vb{id} up && \
             ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip netns exec {a} tc qdisc add dev va{id} root tbf rate {rate} burst 256kb latency 50ms && \
             ip netns exec {b} tc qdisc add dev vb{id} root tbf rate {rate} burst 256kb latency 50ms"
        ));
        Some(h)
    }

    fn exec(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns].map(String::from).to_vec()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn netns_hosts_over_a_shaped_link_with_latency() {
    let Some(hosts) = Hosts::new("500mbit") else {
        eprintln!(
            "SKIPPED netns_hosts_over_a_shaped_link_with_latency: needs root and iproute2 \
             (network namespaces, veth, tc tbf)"
        );
        return;
    };
    let tmp = TempDir::new("mig-ns");
    let tls = certs(&tmp, "tls");
    let wa = Hosts::exec(&hosts.a);
    let wb = Hosts::exec(&hosts.b);
    let wa: Vec<&str> = wa.iter().map(String::as_str).collect();
    let wb: Vec<&str> = wb.iter().map(String::as_str).collect();
    // Host B: the destination behind a relay adding 5 ms each way (10 ms more round trip).
    for (name, handover) in [("precopy", "stop-and-copy"), ("postcopy", "postcopy")] {
        let dst = destination(
            &format!("mig-ns-{name}-dst"),
            &wb,
            "tls://127.0.0.1:7440",
            &tls,
            &[],
        );
        let _relay = Relay::start(&wb, "10.77.0.2:7441", "127.0.0.1:7440", 5);
        // Dirtying 5000 pages/s (20 MB/s), well within the link.
        let guest = "workload=dirty,verify mib=64 rate=5000 stall_us=2000 report_ms=200";
        let mut src = VmProcess::boot_wrapped(&format!("mig-ns-{name}-src"), &wa, guest, MEM, 1);
        let (ok, out, report) = migrate(
            &src,
            &[
                "--to",
                "tls://10.77.0.2:7441",
                "--plugin",
                &plugin(&format!("{name}.wasm")),
                "--tls-dir",
                tls.to_str().unwrap(),
            ],
        );
        assert!(
            ok,
            "{name} across namespaces failed: {out}\n{}",
            src.stderr()
        );
        let r = report.unwrap();
        assert_eq!(r["handover"], handover, "{r}");
        // 500 Mbit/s: the 64 MiB of data take over a second; zero pages go as markers only.
        assert!(
            f(&r, "total_ms") > 1000.0,
            "faster than the shaped link allows: {r}"
        );
        assert!(f(&r, "bytes") < 3.0 * 67e6, "{r}");
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        let stall = check_arrived(&dst, 5000);
        eprintln!(
            "netns {name} (500 Mbit, +10 ms RTT): total {:.0} ms, downtime {:.2} ms, faults {} \
             (mean {} µs), guest stall {stall} µs",
            f(&r, "total_ms"),
            f(&r, "downtime_ms"),
            r["remote_faults"],
            r["fault_latency_mean_us"]
        );
    }
}
