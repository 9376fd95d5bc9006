//! The network-monitoring service (plugins/netmon) beneath a guest under real load: a real
//! tap on a bridge in a network namespace, spanguest's `kv` (RESP) server, the real
//! `redis-benchmark` as the client. netmon attaches, is queried, detaches, attaches again and
//! is replaced while requests flow; no request is lost, every frame the device moved while it
//! listened is seen or counted as dropped, and the guest verifies its memory (`bad=0`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use netlab::NetLab;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "10.0.0.2";
const GUEST: &str = "workload=dirty,verify,kv mib=16 rate=2000 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=200 stall_us=100000";
/// Tests of `-t ping,set,get,incr` (PING_INLINE and PING_MBULK are two).
const TESTS: u64 = 5;

/// A namespace with bridge br0 (10.0.0.1/24) and tap0 on it; None when the machine cannot
/// build it and CI is not set (netlab::can_run).
fn lan(tag: &str) -> Option<(NetLab, String)> {
    let needs = NetLab::available().and_then(|()| {
        Command::new("redis-benchmark")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .map(|_| ())
            .ok_or_else(|| "redis-benchmark (redis-tools) is not installed".to_string())
    });
    if !netlab::can_run(tag, needs) {
        return None;
    }
    let lab = NetLab::new(tag, &["lan"]).expect("namespace");
    let ns = lab.host("lan").netns.clone();
    for cmd in [
        "ip link add br0 type bridge",
        "ip addr add 10.0.0.1/24 dev br0",
        "ip link set br0 up",
        "ip tuntap add dev tap0 mode tap",
        "ip link set tap0 master br0",
        "ip link set tap0 up",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    }
    Some((lab, ns))
}

/// `redis-benchmark` against the guest: `n` requests per test, `pipeline` deep, keep-alive.
fn bench(ns: &str, n: u64, pipeline: u32) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "redis-benchmark", "-h", GUEST_IP])
        .args([
            "-p",
            "6379",
            "-t",
            "ping,set,get,incr",
            "-c",
            "20",
            "-k",
            "1",
        ])
        .args(["-P", &pipeline.to_string(), "-n", &n.to_string(), "--csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark")
}

/// Waits for redis-benchmark: it succeeded, saw no error and ran every test.
fn finish(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{what}: {stdout}\n{stderr}");
    for bad in ["Error", "error", "reset", "Reset", "WARNING"] {
        assert!(
            !stdout.contains(bad) && !stderr.contains(bad),
            "{what}: redis-benchmark saw an error: {stdout}\n{stderr}"
        );
    }
    for t in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        assert!(
            stdout.contains(&format!("\"{t}\"")),
            "{what}: test {t} did not run: {stdout}"
        );
    }
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn call(vm: &VmProcess, method: &str, args: &str) -> Value {
    json(&vm.ctl_ok(&["plugin", "call", "netmon", method, args]))["result"].clone()
}

/// Frames the net device moved (both directions).
fn device_frames(vm: &VmProcess) -> u64 {
    let vmj = api_get(&vm.api, "/vm").expect("GET /vm");
    vmj["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "net"))
        .and_then(|d| d["counters"]["ok"].as_u64())
        .unwrap_or_else(|| panic!("no net device in GET /vm: {vmj}"))
}

/// The guest's count of RESP commands served, from its latest `kv` report after `from`.
fn commands(vm: &VmProcess, from: usize) -> u64 {
    let l = vm.wait_line_from(from, "SPANGUEST kv ", T);
    let last = vm.lines()[from..]
        .iter()
        .rfind(|l| l.contains("SPANGUEST kv "))
        .cloned()
        .unwrap_or(l);
    num(&last[last.find("SPANGUEST").unwrap()..], "commands")
}

/// Sum of `field` over the flows to or from the guest's port 6379.
fn redis_sum(flows: &Value, field: &str) -> u64 {
    flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["proto"] == "tcp"
                && [&f["a"], &f["b"]]
                    .iter()
                    .any(|e| e.as_str() == Some("10.0.0.2:6379"))
        })
        .map(|f| f[field].as_u64().unwrap())
        .sum()
}

#[test]
fn netmon_counts_flows_under_redis_load_and_attach_detach_loses_no_request() {
    let Some((_lab, ns)) = lan("netmon") else {
        return;
    };
    let wasm = plugin("netmon.wasm");
    let kernel = guest_elf();
    let vm = VmProcess::start_wrapped(
        "netmon",
        &["ip", "netns", "exec", &ns],
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            GUEST,
            "--memory",
            "128",
            "--net",
            "tap=tap0,mac=52:54:00:5a:00:02",
        ],
    );
    vm.wait_line("SPANGUEST ready", T);

    // 1. Attach, query, detach, attach again and replace, all under load.
    let before = commands(&vm, 0);
    let n = 100_000;
    let load = bench(&ns, n, 4);
    std::thread::sleep(Duration::from_millis(300));
    vm.ctl_ok(&["plugin", "attach", &wasm]);
    let deadline = Instant::now() + T;
    let first = loop {
        let top = call(&vm, "top", "3 by=bytes");
        if top["totals"]["frames"].as_u64().unwrap() > 100 {
            break top;
        }
        assert!(Instant::now() < deadline, "netmon saw no traffic: {top}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let top0 = &first["top"][0];
    assert_eq!(top0["proto"], "tcp", "{first}");
    assert!(
        [&top0["a"], &top0["b"]]
            .iter()
            .any(|e| e.as_str() == Some("10.0.0.2:6379")),
        "the redis flow tops the list: {first}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let later = call(&vm, "top", "3 by=frames");
    assert!(
        later["totals"]["frames"].as_u64() > first["totals"]["frames"].as_u64(),
        "counts do not grow: {first} then {later}"
    );
    vm.ctl_ok(&["plugin", "detach", "netmon"]);
    std::thread::sleep(Duration::from_millis(300));
    vm.ctl_ok(&["plugin", "attach", &wasm]);
    std::thread::sleep(Duration::from_millis(300));
    let fresh = call(&vm, "stats", "");
    vm.ctl_ok(&["plugin", "replace", "netmon", &wasm]);
    let replaced = call(&vm, "stats", "");
    assert!(
        replaced["frames"].as_u64() >= fresh["frames"].as_u64()
            && replaced["batches"].as_u64() >= fresh["batches"].as_u64(),
        "the counters did not survive the replace: {fresh} then {replaced}"
    );
    finish(load, "attach/detach under load");
    let served = commands(&vm, vm.mark()) - before;
    assert!(
        served >= n * TESTS,
        "the guest served {served} commands, {} were sent",
        n * TESTS
    );
    vm.ctl_ok(&["plugin", "detach", "netmon"]);

    // 2. Every frame the device moves while netmon listens is seen, or counted as dropped;
    // one request per frame (no pipelining) makes the guest's count a lower bound too.
    std::thread::sleep(Duration::from_millis(200));
    let dev_before = device_frames(&vm);
    vm.ctl_ok(&["plugin", "attach", &wasm]);
    let dev0 = device_frames(&vm);
    let before = commands(&vm, 0);
    let n = 4_000;
    finish(bench(&ns, n, 1), "with netmon attached");
    let dev1 = device_frames(&vm);
    let deadline = Instant::now() + T;
    let flows = loop {
        let f = call(&vm, "flows", "");
        let t = &f["totals"];
        let seen = t["frames"].as_u64().unwrap() + t["dropped"].as_u64().unwrap();
        if seen >= dev1 - dev0 {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "netmon saw {seen} frames, the device moved {}: {f}",
            dev1 - dev0
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = &flows["totals"];
    let seen = t["frames"].as_u64().unwrap() + t["dropped"].as_u64().unwrap();
    let dev2 = device_frames(&vm);
    assert!(
        seen <= dev2 - dev_before,
        "netmon saw {seen} frames, more than the device's {}",
        dev2 - dev_before
    );
    let requests = n * TESTS;
    let rx = redis_sum(&flows["flows"], "rx_frames") + t["dropped"].as_u64().unwrap();
    assert!(
        rx >= requests,
        "{rx} frames reached the guest's port 6379 for {requests} requests: {flows}"
    );
    let syn = redis_sum(&flows["flows"], "syn");
    assert!(syn >= 20, "each connection's SYN is seen: {syn}");
    let served = commands(&vm, vm.mark()) - before;
    assert!(
        served >= requests,
        "the guest served {served} of {requests}"
    );
    eprintln!(
        "netmon: {} frames seen ({} dropped), device moved {}..{}, {rx} to port 6379 for \
         {requests} requests, {} flows",
        t["frames"],
        t["dropped"],
        dev1 - dev0,
        dev2 - dev0,
        t["flows"]
    );
    vm.ctl_ok(&["plugin", "detach", "netmon"]);
    vm.assert_verify_clean(1);
}
