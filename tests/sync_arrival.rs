//! Synchronized arrival (issue 17 item 4): `ctl migrate-group` moves two guests of different
//! sizes across CloudNet's shaped WAN so that they switch over together. The mechanism is
//! asserted, not the clock: no member paused before the last one was ready, and no member
//! committed before every member had paused (the hold's two gates). A member whose
//! destination refuses leaves the other at its source, running, its memory exact; a hold
//! never released gives up by itself and the guest runs on.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::wan::{relay, Wan};
use common::*;
use serde_json::Value;

const PORT_A: u16 = 7470;
const PORT_B: u16 = 7471;

/// A small front end and a larger back end (64 and 256 MiB; what they write moves, the rest
/// of their memory is holes that go as zero markers).
const SMALL: &str = "workload=dirty,verify mib=16 wss=4 rate=500 stall_us=2000 report_ms=200";
const LARGE: &str = "workload=dirty,verify mib=48 wss=8 rate=500 stall_us=2000 report_ms=200";

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// The two sites of a group test: the shaped WAN between them, a scratch directory and the
/// migration certificates.
struct Sites {
    wan: Wan,
    tmp: TempDir,
    tls: PathBuf,
}

impl Sites {
    fn new(tag: &str) -> Option<Sites> {
        let wan = Wan::new(tag)?;
        let tmp = TempDir::new(tag);
        let tls = certs(&tmp, "tls");
        Some(Sites { wan, tmp, tls })
    }

    /// The wrapper that runs a command at the source site.
    fn at_source(&self) -> [&str; 4] {
        self.wan.src.wrapper()
    }

    /// A destination VMM at the destination site, listening on `port`.
    fn destination(&self, tag: &str, port: u16) -> VmProcess {
        let wrapper = self.wan.dst.wrapper();
        let addr = format!("tls://{}:{port}", self.wan.dst.ip);
        destination(tag, &wrapper, &addr, &self.tls, &[])
    }

    /// `spanvmm ctl migrate-group` of `vms` (`API=DEST` each) with the pre-copy service:
    /// (success, output, the group's report).
    fn migrate_group(&self, vms: &[&str]) -> (bool, String, Value) {
        let report = self.tmp.path().join("group.json");
        let precopy = plugin("precopy.wasm");
        let mut args = vec!["ctl", "migrate-group", "--report", report.to_str().unwrap()];
        for vm in vms {
            args.extend(["--vm", vm]);
        }
        args.extend([
            "--plugin",
            &precopy,
            "--tls-dir",
            self.tls.to_str().unwrap(),
        ]);
        let out = std::process::Command::new(spanvmm())
            .args(&args)
            .output()
            .expect("run spanvmm ctl migrate-group");
        let mut s = String::from_utf8_lossy(&out.stdout).to_string();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        let r = std::fs::read_to_string(&report)
            .ok()
            .map(|t| serde_json::from_str(&t).expect("the group report is JSON"))
            .unwrap_or(Value::Null);
        (out.status.success(), s, r)
    }
}

#[test]
fn two_tiers_switch_over_together_across_the_wan() {
    let Some(sites) = Sites::new("sync-arr") else {
        return;
    };
    let dst_a = sites.destination("sync-a-dst", PORT_A);
    let dst_b = sites.destination("sync-b-dst", PORT_B);
    let (relay_a, relay_b) = (relay(&sites.wan.dst, PORT_A), relay(&sites.wan.dst, PORT_B));
    let wa = sites.at_source();
    let mut src_a = VmProcess::boot_wrapped("sync-a-src", &wa, SMALL, 64, 1);
    let mut src_b = VmProcess::boot_wrapped("sync-b-src", &wa, LARGE, 256, 1);
    src_a.wait_line("SPANGUEST stat", Duration::from_secs(10));
    src_b.wait_line("SPANGUEST stat", Duration::from_secs(10));
    let vm_a = format!("{}=tls://{}", src_a.api.display(), relay_a.addr());
    let vm_b = format!("{}=tls://{}", src_b.api.display(), relay_b.addr());
    let (ok, out, r) = sites.migrate_group(&[&vm_a, &vm_b]);
    assert!(ok, "{out}\n{}\n{}", src_a.stderr(), src_b.stderr());
    assert_eq!(r["result"], "completed", "{r}");
    let members = r["members"].as_array().expect("members");
    assert_eq!(members.len(), 2, "{r}");
    for m in members {
        assert_eq!(m["result"], "completed", "{m}");
        assert_eq!(m["report"]["hold"]["stage"], "committed", "{m}");
    }
    // The mechanism: both were held until the last was ready, and neither committed before
    // both had paused.
    let rep = |i: usize| &members[i]["report"];
    let last_ready = (0..2)
        .map(|i| n(&rep(i)["hold"], "ready_unix_us"))
        .max()
        .unwrap();
    let last_pause = (0..2).map(|i| n(rep(i), "switch_unix_us")).max().unwrap();
    for i in 0..2 {
        assert!(
            n(rep(i), "switch_unix_us") >= last_ready,
            "member {i} switched over before the last was ready: {r}"
        );
        assert!(
            n(&rep(i)["hold"], "committed_unix_us") >= last_pause,
            "member {i} committed before every member paused: {r}"
        );
    }
    let spread = r["switch_spread_ms"].as_f64().unwrap();
    eprintln!(
        "sync arrival: switch-overs within {spread:.1} ms, arrivals within {:.1} ms; downtime {:.1} / {:.1} ms; held {} ms / {} ms, {} bytes in all",
        r["arrival_spread_ms"].as_f64().unwrap(),
        members[0]["downtime_ms"].as_f64().unwrap(),
        members[1]["downtime_ms"].as_f64().unwrap(),
        rep(0)["hold"]["held_ms"],
        rep(1)["hold"]["held_ms"],
        r["held_bytes"]
    );
    // The releases are two local API calls apart; generous for two busy cores.
    assert!(spread < 2_000.0, "{r}");
    assert_eq!(src_a.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(src_b.wait_exit(Duration::from_secs(15)), Some(0));
    for d in [&dst_a, &dst_b] {
        d.wait_line("SPANGUEST stat", Duration::from_secs(10));
        d.assert_verify_clean(1);
    }
}

#[test]
fn a_refused_member_leaves_the_group_at_its_sources() {
    let Some(sites) = Sites::new("sync-ref") else {
        return;
    };
    let _dst_a = sites.destination("sync-ra-dst", PORT_A);
    let relay_a = relay(&sites.wan.dst, PORT_A);
    let wa = sites.at_source();
    let mut src_a = VmProcess::boot_wrapped("sync-ra-src", &wa, SMALL, 64, 1);
    let mut src_b = VmProcess::boot_wrapped("sync-rb-src", &wa, SMALL, 64, 1);
    src_a.wait_line("SPANGUEST stat", Duration::from_secs(10));
    // B's destination host has nothing on that port: it refuses the connection.
    let vm_a = format!("{}=tls://{}", src_a.api.display(), relay_a.addr());
    let vm_b = format!(
        "{}=tls://{}:{PORT_B}",
        src_b.api.display(),
        sites.wan.dst.ip
    );
    let (ok, out, r) = sites.migrate_group(&[&vm_a, &vm_b]);
    assert!(!ok, "{out}");
    assert!(out.contains("every guest stays at its source"), "{out}");
    assert_eq!(r["result"], "aborted", "{r}");
    let a = &r["members"][0];
    assert_eq!(a["result"], "failed", "{r}");
    assert_eq!(a["source_vm"], "running", "{r}");
    assert_eq!(r["members"][1]["result"], "not-started", "{r}");
    // Both guests run on at their sources, memory exact.
    for vm in [&mut src_a, &mut src_b] {
        assert!(vm.alive(), "{}", vm.stderr());
        let from = vm.mark();
        vm.wait_line_from(from, "SPANGUEST stat", Duration::from_secs(10));
        vm.assert_verify_clean(1);
    }
}

#[test]
fn a_hold_never_released_gives_up_and_the_guest_runs_on() {
    let tmp = TempDir::new("sync-hold");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let _dst = destination("sync-hold-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("sync-hold-src", SMALL, 64, 1);
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &plugin("precopy.wasm"),
            "--tls-dir",
            tls.to_str().unwrap(),
            "--hold-timeout-ms",
            "1500",
        ],
    );
    assert!(!ok, "{out}");
    let report = report.expect("a report");
    assert_eq!(report["result"], "failed", "{report}");
    assert_eq!(report["source_vm"], "running", "{report}");
    assert_eq!(report["handover"], "none", "{report}");
    assert_eq!(report["hold"]["stage"], "aborted", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("not released within 1500 ms"),
        "{report}"
    );
    // Held at ready, the dirty pages kept going out meanwhile.
    assert!(
        report["hold"]["held_ms"].as_f64().unwrap() >= 1500.0,
        "{report}"
    );
    assert!(n(&report["hold"], "held_rounds") > 0, "{report}");
    assert!(src.alive());
    let from = src.mark();
    src.wait_line_from(from, "SPANGUEST stat", Duration::from_secs(10));
    src.assert_verify_clean(1);
}

/// `kvload` (the benchmark's front end) against `kv` on one bridge: every request answered
/// and checked (each GET returns the value of the SET before it), no error, latency lines.
#[test]
fn kvload_loads_a_kv_guest_without_errors() {
    let Some(lan) = common::lan::Lan::new("sync-kvl", &["tap0", "tap1"]) else {
        return;
    };
    let w = lan.wrapper();
    let back = lan.boot_on(
        &w,
        "sync-kvl-back",
        "workload=dirty,verify,kv mib=8 rate=500 ip=10.0.0.3/24 report_ms=500 stall_us=100000",
        &["--net", "tap=tap0,mac=52:54:00:5a:00:03"],
    );
    let kernel = guest_elf();
    let front = VmProcess::start_wrapped(
        "sync-kvl-front",
        &w,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=kvload,verify mib=4 peer=10.0.0.3:6379 load_rate=500 ip=10.0.0.2/24 report_ms=500",
            "--memory",
            "64",
            "--net",
            "tap=tap1,mac=52:54:00:5a:00:02",
        ],
    );
    front.wait_line("SPANGUEST kvload start", Duration::from_secs(60));
    // 500 requests answered and checked (at 500/s; slower on a loaded host, hence a count
    // rather than a time).
    let t = std::time::Instant::now();
    let last = loop {
        let lines: Vec<String> = front
            .lines()
            .into_iter()
            .filter(|l| l.contains("SPANGUEST kvload reqs="))
            .collect();
        if let Some(l) = lines.last().filter(|l| num(l, "total") >= 500) {
            assert!(
                lines
                    .iter()
                    .any(|l| num(l, "reqs") > 0 && num(l, "mean_us") > 0),
                "{lines:?}"
            );
            break l.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{lines:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(num(&last, "errors"), 0, "{last}");
    assert_eq!(num(&last, "connects"), 1, "{last}");
    let served = back.wait_line_from(back.mark(), "SPANGUEST kv ", Duration::from_secs(5));
    assert!(num(&served, "commands") >= num(&last, "total"), "{served}");
    back.assert_verify_clean(1);
    front.assert_verify_clean(1);
}
