//! End-to-end live migration: real `spanvmm` processes on real KVM, spanguest moving between
//! them over TLS on loopback, through a delay relay that the tests kill to cut the link, and
//! between network namespaces over a veth pair shaped by `tc tbf`. Every migrated guest
//! verifies its memory (bad=0) at the destination and its stalls are checked.

mod common;

use std::path::Path;

use std::time::{Duration, Instant};

use common::*;
use netlab::{DelayRelay, NetLab};
use serde_json::Value;

const GUEST: &str = "workload=dirty,verify mib=64 rate=20000 stall_us=2000 report_ms=200";
const MEM: u64 = 256;

/// A destination waiting on `addr`, optionally inside a network namespace.
/// `spanvmm ctl migrate` at 20 MB/s on another thread, so a test can break things meanwhile;
/// the report goes to `r.json` in the source's directory.
fn migrate_in_background(
    src: &VmProcess,
    to: &str,
    plugin_file: &str,
    tls: &Path,
    extra: &[&str],
) -> std::thread::JoinHandle<(bool, String)> {
    let report = src.dir.path().join("r.json");
    let mut args: Vec<String> = [
        "migrate",
        "--report",
        report.to_str().unwrap(),
        "--to",
        to,
        "--plugin",
        &plugin(plugin_file),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--max-bandwidth",
        "20M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let api = src.api.clone();
    std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&api, &a)
    })
}

/// The destination runs the guest on: it keeps dirtying (stat lines), its memory verifies,
/// and its stalls stay below `max_stall_ms`. Returns the largest stall, µs.
fn check_arrived(dst: &VmProcess, max_stall_ms: u64) -> u64 {
    dst.wait_line("SPANGUEST stat", Duration::from_secs(10));
    let before = dst.mark();
    dst.wait_line_from(before, "SPANGUEST stat", Duration::from_secs(10));
    dst.assert_verify_clean(1);
    let stall = dst.max_stall_since(0);
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

/// Idle TCP connections to `addr` (`tls://HOST:PORT`): they never say anything.
fn idle_peers(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| std::net::TcpStream::connect(addr.trim_start_matches("tls://")).unwrap())
        .collect()
}

fn f(r: &Value, k: &str) -> f64 {
    r[k].as_f64()
        .unwrap_or_else(|| panic!("report has no {k}: {r}"))
}

/// A relay between source and destination on loopback, to cut the link (no added delay).
fn relay(target: &str) -> DelayRelay {
    DelayRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        target.parse().unwrap(),
        Duration::ZERO,
        4 << 20,
    )
    .expect("start the relay")
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
    let (ok, out, _) = migrate_precopy(&src, &addr, rogue.to_str().unwrap());
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
    // A destination prepared for a guest of another size refuses this one, saying why.
    let small_addr = format!("tls://127.0.0.1:{}", free_port());
    let mut small = destination(
        "mig-pre-small",
        &[],
        &small_addr,
        &tls,
        &["--memory", "128"],
    );
    wait_stderr(&small, "128 MiB ready", Duration::from_secs(10));
    let (ok, out, _) = migrate_precopy(&src, &small_addr, tls.to_str().unwrap());
    assert!(!ok, "a 128 MiB destination took a {MEM} MiB guest: {out}");
    assert!(out.contains("not acceptable"), "{out}");
    assert!(src.alive() && small.alive());
    // It still waits for a guest, and says so on its API.
    let st = status(&small);
    assert_eq!(st["state"], "incoming", "{st}");
    assert_eq!(st["progress"]["phase"], "waiting", "{st}");
    small.kill();

    // The stop-and-copy is what this test checks: on a loaded host the dirty set may not
    // shrink below what `max_pause_ms` allows, and the policy would switch to post-copy.
    let precopy = plugin("precopy.wasm");
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &precopy,
            "--config",
            r#"{"max_pause_ms":0}"#,
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
    // Prepared memory (every page present up front): the pages still to come must fault.
    let dst = destination("mig-post-dst", &[], &addr, &tls, &["--memory", "256"]);
    wait_stderr(&dst, "256 MiB ready", Duration::from_secs(10));
    // The policy given at `run --plugin` drives the migration `ctl migrate` starts.
    let kernel = guest_elf();
    let mut src = VmProcess::start(
        "mig-post-src",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            GUEST,
            "--memory",
            "256",
            "--plugin",
            &plugin("postcopy.wasm"),
        ],
    );
    src.wait_line("SPANGUEST ready", Duration::from_secs(60));
    let (ok, out, report) = migrate(&src, &["--to", &addr, "--tls-dir", tls.to_str().unwrap()]);
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
    // What the vCPUs' registers point at went ahead of their faults (a page table, code,
    // stack at least), each page still only once (above).
    assert!(f(&r, "first_touch_pages") >= 3.0, "{r}");
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
fn a_guest_dirtying_faster_than_the_link_switches_to_postcopy() {
    // 64 MiB rewritten as fast as the guest can against a 40 MB/s link: pre-copy does not
    // converge, and precopy, at its round limit, would pause the guest for what is dirty in
    // a stop-and-copy: it switches to post-copy instead once that pause would exceed
    // `max_pause_ms`. With `max_pause_ms: 0` it stops and copies whatever it costs. A starved
    // vCPU (a loaded host) dirties less, so convergence is taken out of the way (no page
    // count or time is small enough) and the pause bound is 1 µs: a single page left dirty
    // exceeds it at any rate the host measures (a 1 ms bound let a vCPU starved through the
    // last round leave few enough pages for a stop-and-copy on a loaded host), so the choice
    // is the policy's, whatever the load. Both destinations have their memory prepared: the
    // post-copy then drops the stale copies of the pages still to come.
    let fast = "workload=dirty,verify mib=64 rate=0 stall_us=2000 report_ms=200";
    let tmp = TempDir::new("mig-fast");
    let tls = certs(&tmp, "tls");
    for (tag, config, handover, logged) in [
        (
            "switch",
            r#"{"min_pages":0,"downtime_ms":0,"max_rounds":3,"max_pause_ms":0.001}"#,
            "postcopy",
            "Postcopy",
        ),
        (
            "stop",
            r#"{"min_pages":0,"downtime_ms":0,"max_rounds":3,"max_pause_ms":0}"#,
            "stop-and-copy",
            "StopAndCopy",
        ),
    ] {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let mem = MEM.to_string();
        let dst = destination(
            &format!("mig-{tag}-fast-dst"),
            &[],
            &addr,
            &tls,
            &["--memory", &mem],
        );
        let mut src = VmProcess::boot(&format!("mig-{tag}-fast-src"), fast, MEM, 1);
        let (ok, out, report) = migrate(
            &src,
            &[
                "--to",
                &addr,
                "--plugin",
                &plugin("precopy.wasm"),
                "--config",
                config,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--max-bandwidth",
                "40M",
            ],
        );
        assert!(ok, "{tag} failed: {out}\n{}", src.stderr());
        let r = report.unwrap();
        // The switch, from the counters: pre-copy rounds ran (the first sends all memory),
        // then the hand-over the policy chose, its reason in the service's log.
        assert_eq!(r["handover"], handover, "{tag}: {r}");
        assert_eq!(f(&r, "rounds"), 3.0, "{tag}: the round limit: {r}");
        assert!(
            src.stderr().contains(&format!(", {logged}")),
            "{tag}: the service did not say why\n{}",
            src.stderr()
        );
        if handover == "postcopy" {
            assert_eq!(f(&r, "postcopy_resent"), 0.0, "{r}");
        }
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        check_arrived(&dst, 5000);
        eprintln!(
            "{tag} at 40 MB/s: handover {handover}, total {:.0} ms, downtime {:.2} ms, rounds {}, {} bytes",
            f(&r, "total_ms"),
            f(&r, "downtime_ms"),
            r["rounds"],
            r["bytes"]
        );
    }
}

#[test]
fn a_switch_to_postcopy_drops_the_stale_copies_before_the_pause() {
    // Pre-copy rounds of a guest rewriting 64 MiB at 20 000 pages/s over 20 MB/s never
    // converge; after two the policy switches to post-copy with the working set queued and
    // not sent: the destination (memory prepared, so every page is populated) holds old
    // copies of those pages. The source names them in a `stale` frame before it pauses, the
    // destination drops them then, and inside the pause only those the final harvest found
    // are left: the counters say so on both sides. A 20 ms round trip (the delay relay) makes
    // it the WAN's hand-over (commit with the state).
    let tmp = TempDir::new("mig-stale");
    let tls = certs(&tmp, "tls");
    let dport = free_port();
    let dst = destination(
        "mig-stale-dst",
        &[],
        &format!("tls://127.0.0.1:{dport}"),
        &tls,
        &["--memory", &MEM.to_string()],
    );
    let relay = DelayRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{dport}").parse().unwrap(),
        Duration::from_millis(10),
        8 << 20,
    )
    .expect("start the relay");
    let mut src = VmProcess::boot("mig-stale-src", GUEST, MEM, 1);
    let to = format!("tls://{}", relay.addr());
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &to,
            "--plugin",
            &plugin("precopy.wasm"),
            "--config",
            r#"{"min_pages":0,"downtime_ms":0,"max_rounds":2,"max_pause_ms":1}"#,
            "--tls-dir",
            tls.to_str().unwrap(),
            "--max-bandwidth",
            "20M",
        ],
    );
    assert!(ok, "{out}\n{}", src.stderr());
    let r = report.unwrap();
    assert_eq!(r["handover"], "postcopy", "{r}");
    assert_eq!(r["commit"], "with-state", "{r}");
    assert_eq!(f(&r, "postcopy_resent"), 0.0, "{r}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    check_arrived(&dst, 5000);
    let d =
        api_get(&dst.api, "/vm/migration").expect("the destination answers")["incoming"].clone();
    let (named, final_new) = (f(&r, "stale_pages"), f(&r, "final_harvest_pages"));
    let (early, paused) = (f(&d, "dropped_before_state"), f(&d, "dropped_at_state"));
    // Populated memory holds a copy of every page: each one named went before the pause.
    assert!(named > 0.0, "no stale page named: {r}");
    assert_eq!(early, named, "dropped before the pause: {d}\n{r}");
    // Inside the pause, at most the pages dirtied after the stale frame.
    assert!(
        paused <= final_new,
        "{paused} stale pages dropped in the pause, the final harvest found {final_new}: {d}\n{r}"
    );
    eprintln!(
        "switch to post-copy at 20 ms RTT: {named} stale pages dropped before the pause, \
         {paused} in it; downtime {:.2} ms (round trip {:.1} ms)",
        f(&r, "downtime_ms"),
        f(&r, "rtt_ms")
    );
}

#[test]
fn a_cut_during_precopy_leaves_the_source_running_and_the_destination_gone() {
    let tmp = TempDir::new("mig-cut");
    let tls = certs(&tmp, "tls");
    let dport = free_port();
    let mut dst = destination(
        "mig-cut-dst",
        &[],
        &format!("tls://127.0.0.1:{dport}"),
        &tls,
        &[],
    );
    let relay = relay(&format!("127.0.0.1:{dport}"));
    let rport = relay.addr().port();
    let mut src = VmProcess::boot("mig-cut-src", GUEST, MEM, 1);
    let ctl = migrate_in_background(
        &src,
        &format!("tls://127.0.0.1:{rport}"),
        "precopy.wasm",
        &tls,
        &[],
    );
    std::thread::sleep(Duration::from_millis(800));
    relay.set_down(true); // the cut
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

/// Stat lines the guest printed since line `from`.
fn stats_since(vm: &VmProcess, from: usize) -> usize {
    vm.lines()[from.min(vm.mark())..]
        .iter()
        .filter(|l| l.contains("SPANGUEST stat"))
        .count()
}

#[test]
fn a_link_lost_at_the_commit_never_runs_the_guest_twice() {
    // The destination drops the connection on purpose (SPANVMM_MIGRATION_CUT) at the two
    // points of the hand-over where the source cannot know what the destination did.
    let tmp = TempDir::new("mig-doubt");
    let tls = certs(&tmp, "tls");
    let src = VmProcess::boot("mig-doubt-src", GUEST, MEM, 1);
    let to_dest = |point: &str, tag: &str| {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let cut = format!("SPANVMM_MIGRATION_CUT={point}");
        let dst = destination(tag, &["env", &cut], &addr, &tls, &[]);
        let (ok, out, report) = migrate_precopy(&src, &addr, tls.to_str().unwrap());
        assert!(
            !ok,
            "the migration claims success after a cut at {point}: {out}"
        );
        let r = report.expect("a report");
        assert_eq!(r["result"], "in-doubt", "{point}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("ctl resume"),
            "{point}: the report does not say what to do: {r}"
        );
        dst
    };
    let paused_for_a_second = |what: &str| {
        let status = src.ctl_ok(&["status"]);
        assert!(
            status.contains("\"paused\""),
            "{what}: source not paused: {status}"
        );
        let from = src.mark();
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            stats_since(&src, from),
            0,
            "{what}: the source guest ran on"
        );
    };

    // 1. Cut before the destination has `commit`: it must not run the guest, and the source,
    //    which sent `commit` and heard nothing back, stays paused too.
    let mut dst = to_dest("before-commit", "mig-doubt-dst1");
    let code = wait_exit(&mut dst, "the uncommitted destination");
    assert_ne!(code, Some(0));
    assert!(dst.stderr().contains("did not commit"), "{}", dst.stderr());
    assert_eq!(
        stats_since(&dst, 0),
        0,
        "the uncommitted destination ran the guest"
    );
    paused_for_a_second("before-commit");
    // The operator, seeing the destination gone, resumes the guest here: nothing was lost.
    src.ctl_ok(&["resume"]);
    let from = src.mark();
    src.wait_line_from(from, "SPANGUEST stat", Duration::from_secs(5));
    src.assert_verify_clean(1);

    // 2. Cut after the destination has `commit`: the guest runs there and only there.
    let dst = to_dest("after-commit", "mig-doubt-dst2");
    paused_for_a_second("after-commit");
    check_arrived(&dst, 1000);
}

#[test]
fn a_postcopy_cut_is_recovered_without_losing_a_page() {
    let tmp = TempDir::new("mig-rec");
    let tls = certs(&tmp, "tls");
    let dport = free_port();
    let target = format!("127.0.0.1:{dport}");
    let dst = destination("mig-rec-dst", &[], &format!("tls://{target}"), &tls, &[]);
    let relay = relay(&target);
    let listen = relay.addr().to_string();
    let mut src = VmProcess::boot("mig-rec-src", GUEST, MEM, 1);
    let report = src.dir.path().join("r.json");
    let ctl = migrate_in_background(&src, &format!("tls://{listen}"), "postcopy.wasm", &tls, &[]);
    wait_stderr(&dst, "the guest runs here", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    relay.set_down(true); // the cut, in the middle of the push
    wait_stderr(&dst, "post-copy connection lost", Duration::from_secs(10));
    // Peers that connect and say nothing hold no one up: three of them, each with a
    // 10 s handshake deadline, would outlast the source's 30 s recovery if served in turn.
    let _idle = idle_peers(&format!("tls://{target}"), 3);
    std::thread::sleep(Duration::from_millis(700));
    relay.set_down(false); // the link is back
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
    let ctl = migrate_in_background(
        &src,
        &addr,
        "postcopy.wasm",
        &tls,
        &["--recovery-timeout-ms", "1500"],
    );
    wait_stderr(&dst, "the guest runs here", Duration::from_secs(20));
    drop(dst); // SIGKILL in the middle of post-copy
    let (ok, out) = ctl.join().unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("destination is unreachable") && out.contains("source stays paused"),
        "unclear report: {out}"
    );
    // ctl's own verdict follows the report: the guest is paused here, not running on.
    assert!(
        out.contains("post-copy failed after the hand-over: the VM is paused at the source")
            && !out.contains("runs on at the source"),
        "ctl misreports where the guest is: {out}"
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(src.dir.path().join("r.json")).unwrap())
            .unwrap();
    assert_eq!(r["source_vm"], "paused", "{r}");
    assert!(src.alive(), "the source must keep the guest's memory");
    let from = src.mark();
    assert_eq!(status(&src)["state"], "paused");
    // Paused means paused: no stat line while the operator decides.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stats_since(&src, from), 0, "the source guest ran on");
    // The source never ran the guest after the pause: its memory and state are one whole, so
    // the operator, knowing the destination dead, can resume it here.
    src.ctl_ok(&["resume"]);
    src.wait_line_from(from, "SPANGUEST stat", Duration::from_secs(10));
    src.assert_verify_clean(1);
}

/// Two namespace hosts, `src` and `dst`, each on a tbf link shaped to `bps`; the lab (kept
/// alive by the caller) and the two hosts.
fn shaped_pair(prefix: &str, bps: u64) -> (NetLab, netlab::Host, netlab::Host) {
    let lab = NetLab::new(prefix, &["src", "dst"]).expect("network namespaces");
    for h in ["src", "dst"] {
        lab.shape(h, bps).expect("tc tbf");
    }
    let (src, dst) = (lab.host("src").clone(), lab.host("dst").clone());
    (lab, src, dst)
}

#[test]
fn netns_hosts_over_a_shaped_link_with_latency() {
    if !netlab::can_run(
        "netns_hosts_over_a_shaped_link_with_latency",
        NetLab::available(),
    ) {
        return;
    }
    let (_lab, src_host, dst_host) = shaped_pair("mig", 500_000_000);
    let tmp = TempDir::new("mig-ns");
    let tls = certs(&tmp, "tls");
    let (wa, wb) = (src_host.wrapper(), dst_host.wrapper());
    for (name, handover) in [("precopy", "stop-and-copy"), ("postcopy", "postcopy")] {
        let port = 7440;
        let dst = destination(
            &format!("mig-ns-{name}-dst"),
            &wb,
            &format!("tls://{}:{port}", dst_host.ip),
            &tls,
            &[],
        );
        // Between the hosts: 5 ms each way (the delay relay, in the routing namespace).
        let relay = DelayRelay::start(
            std::net::SocketAddr::new(dst_host.gateway.into(), 0),
            std::net::SocketAddr::new(dst_host.ip.into(), port),
            Duration::from_millis(5),
            4 << 20,
        )
        .unwrap();
        // Dirtying 5000 pages/s (20 MB/s), well within the link.
        let guest = "workload=dirty,verify mib=64 rate=5000 stall_us=2000 report_ms=200";
        let mut src = VmProcess::boot_wrapped(&format!("mig-ns-{name}-src"), &wa, guest, MEM, 1);
        let to = format!("tls://{}", relay.addr());
        let service = plugin(&format!("{name}.wasm"));
        let mut args = vec![
            "--to",
            &to,
            "--plugin",
            &service,
            "--tls-dir",
            tls.to_str().unwrap(),
        ];
        if name == "precopy" {
            // Stop-and-copy is what this row checks, however loaded the host (a dirty set
            // that stays large would otherwise switch to post-copy).
            args.extend(["--config", r#"{"max_pause_ms":0}"#]);
        }
        let (ok, out, report) = migrate(&src, &args);
        assert!(
            ok,
            "{name} across namespaces failed: {out}\n{}",
            src.stderr()
        );
        let r = report.unwrap();
        assert_eq!(r["handover"], handover, "{r}");
        // A 10 ms round trip: `auto` sends the commit with the state, one round trip saved.
        assert_eq!(r["commit"], "with-state", "{r}");
        assert_eq!(r["switch_round_trips"], 1, "{r}");
        assert!(f(&r, "rtt_ms") >= 10.0, "{r}");
        if handover == "postcopy" {
            // Faults overtake the push: a faulted page queues behind at most the capped send
            // queue (and one segment the kernel took past it), not a socket buffer's MiB.
            let cap = f(&r, "postcopy_queue_cap_bytes");
            assert!(cap > 0.0, "{r}");
            assert!(
                f(&r, "fault_queued_max_bytes") <= cap + 128.0 * 1024.0,
                "a fault queued behind more than the cap: {r}"
            );
        }
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

/// A shaped link without delay still queues: its round trip is well under 1 ms, yet the
/// pushed pages wait in the tbf qdisc and the sockets' buffers (tens of ms at 200 Mbit/s).
/// Post-copy sees the queue in its `sync` answers and paces the push from then on: the
/// send cap and the window bound what a fault waits behind.
#[test]
fn postcopy_paces_its_push_on_a_queued_link_without_delay() {
    if !netlab::can_run(
        "postcopy_paces_its_push_on_a_queued_link_without_delay",
        NetLab::available(),
    ) {
        return;
    }
    let (_lab, src_host, dst_host) = shaped_pair("pace", 200_000_000);
    let tmp = TempDir::new("mig-pace");
    let tls = certs(&tmp, "tls");
    let (wa, wb) = (src_host.wrapper(), dst_host.wrapper());
    let to = format!("tls://{}:7441", dst_host.ip);
    let dst = destination("mig-pace-dst", &wb, &to, &tls, &["--memory", "128"]);
    wait_stderr(&dst, "128 MiB ready", Duration::from_secs(10));
    let guest = "workload=dirty,verify mib=48 rate=5000 stall_us=2000 report_ms=200";
    let mut src = VmProcess::boot_wrapped("mig-pace-src", &wa, guest, 128, 1);
    let service = plugin("postcopy.wasm");
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &to,
            "--plugin",
            &service,
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    assert!(ok, "post-copy failed: {out}\n{}", src.stderr());
    let r = report.unwrap();
    assert_eq!(r["handover"], "postcopy", "{r}");
    // The queue is seen (four `sync`s in a row answered 4 ms late or more) and the push
    // paced for it; on a host so loaded that even `hello` took 1 ms, the round trip
    // alone paces it.
    let why = r["postcopy_paced"].as_str().unwrap_or("");
    if f(&r, "rtt_ms") < 1.0 {
        assert_eq!(why, "queue", "the queue went unseen: {r}");
        assert!(f(&r, "postcopy_queue_delay_us") >= 4000.0, "{r}");
    } else {
        assert_eq!(why, "rtt", "{r}");
    }
    assert!(f(&r, "postcopy_delivery_bps") > 0.0, "{r}");
    // Paced, the socket's unsent bytes are capped. (The faults right after the resume come
    // before the queue is seen and may still wait behind the first burst: not asserted.)
    assert!(f(&r, "postcopy_queue_cap_bytes") > 0.0, "{r}");
    // The window held the path's unread bytes: 200 Mbit/s (25 MB/s) for the idle round
    // trip and 2 ms of slack is ~60 KB, so its 256 KiB floor, not the sockets' MiB.
    let window = f(&r, "postcopy_window_bytes");
    assert!(window > 0.0 && window <= 1024.0 * 1024.0, "{r}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    let stall = check_arrived(&dst, 5000);
    eprintln!(
        "paced post-copy (200 Mbit/s, no delay): total {:.0} ms, rtt {:.2} ms, queue {} µs, \
         window {} B, {} faults (p99 {} µs), guest stall {stall} µs",
        f(&r, "total_ms"),
        f(&r, "rtt_ms"),
        r["postcopy_queue_delay_us"],
        r["postcopy_window_bytes"],
        r["remote_faults"],
        r["fault_latency_p99_us"]
    );
}

/// The source chooses the link's TLS 1.3 cipher suite; the destination accepts each; the
/// report names the suite the handshake settled on. An unknown name is refused before any
/// connection.
#[test]
fn each_cipher_suite_carries_a_migration() {
    let tmp = TempDir::new("mig-cipher");
    let tls = certs(&tmp, "tls");
    let precopy = plugin("precopy.wasm");
    for cipher in ["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"] {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let dst = destination(&format!("cipher-{cipher}-dst"), &[], &addr, &tls, &[]);
        let mut src = VmProcess::boot(&format!("cipher-{cipher}-src"), GUEST, 128, 1);
        if cipher == "aes-128-gcm" {
            let (ok, out, _) = migrate(
                &src,
                &[
                    "--to",
                    &addr,
                    "--plugin",
                    &precopy,
                    "--tls-dir",
                    tls.to_str().unwrap(),
                    "--cipher",
                    "rc4",
                ],
            );
            assert!(!ok && out.contains("unknown cipher"), "{out}");
        }
        let (ok, out, report) = migrate(
            &src,
            &[
                "--to",
                &addr,
                "--plugin",
                &precopy,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--cipher",
                cipher,
            ],
        );
        assert!(ok, "{cipher}: {out}\n{}", src.stderr());
        let r = report.unwrap();
        assert_eq!(r["cipher"], cipher, "{r}");
        assert_eq!(r["result"], "completed", "{r}");
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        check_arrived(&dst, 5000);
        eprintln!(
            "{cipher}: total {:.0} ms, downtime {:.2} ms",
            f(&r, "total_ms"),
            f(&r, "downtime_ms")
        );
    }
}

/// `--stride-pages`: spanguest's pages are arithmetic progressions of 64-bit words (its
/// verify pattern), so they go as 16 bytes each; pages the dirtying guest rewrote in part
/// are not and go raw in the same frames. Into fresh and into prepared (`--memory`)
/// destination memory, each verified by the guest afterwards.
#[test]
fn stride_pages_move_a_dirtying_guest_in_a_fraction_of_the_bytes() {
    let tmp = TempDir::new("mig-stride");
    let tls = certs(&tmp, "tls");
    let precopy = plugin("precopy.wasm");
    for prepared in [false, true] {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let memory = ["--memory", "128"];
        let extra: &[&str] = if prepared { &memory } else { &[] };
        let dst = destination(&format!("stride-{prepared}-dst"), &[], &addr, &tls, extra);
        // Half of each page rewritten: a touched page is no progression any more. Slowly
        // enough that half the working set is still untouched when round 1 reaches it on a
        // loaded host (at 2000 pages/s, boot and round 1 taking 7 s left 7 107 of 16 384).
        let guest = "workload=dirty,verify mib=64 rate=500 write=2048 stall_us=2000 report_ms=200";
        let mut src = VmProcess::boot(&format!("stride-{prepared}-src"), guest, 128, 1);
        src.wait_line("SPANGUEST stat", Duration::from_secs(10));
        let (ok, out, report) = migrate(
            &src,
            &[
                "--to",
                &addr,
                "--plugin",
                &precopy,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--stride-pages",
            ],
        );
        assert!(ok, "{out}\n{}", src.stderr());
        let r = report.unwrap();
        assert_eq!(r["result"], "completed", "{r}");
        let (sent, zero, stride) = (
            f(&r, "pages_sent"),
            f(&r, "zero_pages"),
            f(&r, "stride_pages"),
        );
        // The 64 MiB working set is written whole once (16 384 progression pages); the dirty
        // rounds' partly rewritten pages go raw.
        assert!(stride >= 8192.0, "{stride} progression pages: {r}");
        assert!(stride < sent - zero, "no page went raw: {r}");
        let raw_bytes = (sent - zero - stride) * 4096.0;
        assert!(
            f(&r, "bytes") < raw_bytes + stride * 64.0 + (4 << 20) as f64,
            "{} bytes on the wire for {raw_bytes} bytes of raw pages: {r}",
            f(&r, "bytes")
        );
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        check_arrived(&dst, 5000);
    }
}

#[test]
fn commit_with_state_saves_a_round_trip_of_downtime() {
    // 200 ms round trips through the delay relay: the two-phase hand-over waits for two of
    // them (state -> ready, commit -> resumed), with --commit-with-state only for one.
    let tmp = TempDir::new("mig-early");
    let tls = certs(&tmp, "tls");
    let one_way = Duration::from_millis(100);
    let precopy = plugin("precopy.wasm");
    let mut downtime = Vec::new();
    for (tag, early) in [("two-phase", false), ("early", true)] {
        let dport = free_port();
        let dst = destination(
            &format!("mig-{tag}-dst"),
            &[],
            &format!("tls://127.0.0.1:{dport}"),
            &tls,
            &["--memory", &MEM.to_string()],
        );
        let relay = DelayRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            format!("127.0.0.1:{dport}").parse().unwrap(),
            one_way,
            8 << 20,
        )
        .expect("start the relay");
        let mut src = VmProcess::boot(&format!("mig-{tag}-src"), GUEST, MEM, 1);
        let to = format!("tls://{}", relay.addr());
        // A stop-and-copy however long the last round (through 200 ms round trips the
        // dirty set may not converge, which would switch to post-copy): this is about the
        // hand-over's round trips.
        let mut args = vec![
            "--to",
            &to,
            "--plugin",
            &precopy,
            "--config",
            r#"{"max_pause_ms":0}"#,
            "--tls-dir",
            tls.to_str().unwrap(),
        ];
        // Loopback's round trip is short, the relay's long: `auto` would commit with the
        // state for both, so each says which it wants.
        args.extend(["--commit", if early { "with-state" } else { "after-ready" }]);
        let (ok, out, report) = migrate(&src, &args);
        assert!(ok, "{tag}: {out}\n{}", src.stderr());
        let r = report.unwrap();
        assert_eq!(r["handover"], "stop-and-copy", "{tag}: {r}");
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        check_arrived(&dst, 5000);
        // The mechanism: how many round trips the paused source waited for.
        assert_eq!(
            r["switch_round_trips"],
            if early { 1 } else { 2 },
            "{tag}: {r}"
        );
        assert_eq!(
            r["commit"],
            if early { "with-state" } else { "after-ready" },
            "{tag}: {r}"
        );
        assert!(f(&r, "rtt_ms") >= 200.0, "{tag}: measured round trip: {r}");
        downtime.push(f(&r, "downtime_ms"));
    }
    let (two_phase, early) = (downtime[0], downtime[1]);
    // The ms saved show in the benchmark: here the final dirty pages' transfer through the
    // relay varies by more than a round trip from run to run, more so on a busy host.
    eprintln!(
        "downtime at 200 ms RTT: two-phase {two_phase:.1} ms, commit with state {early:.1} ms"
    );
    // Lower bounds are physics: the round trips waited for cannot take less.
    assert!(
        two_phase >= 400.0,
        "two-phase hand-over under two round trips: {two_phase} ms"
    );
    assert!(
        early >= 200.0,
        "early commit under one round trip: {early} ms"
    );
}

/// Operations that own the VM exclude each other: while a migration runs, a live update, a
/// snapshot and a save are refused naming it (a live update used to take the VM over and
/// silently abort the migration), and the migration completes unharmed.
#[test]
fn a_running_migration_excludes_live_update_snapshot_and_save() {
    let tmp = TempDir::new("mig-excl");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-excl-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-excl-src", GUEST, MEM, 1);
    let mig = migrate_in_background(&src, &addr, "precopy.wasm", &tls, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_get(&src.api, "/vm/migration").is_none_or(|v| v.get("progress").is_none()) {
        assert!(
            Instant::now() < deadline && !mig.is_finished(),
            "the migration did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let layer = tmp.path().join("layer");
    let checkpoint = plugin("checkpoint.wasm");
    let refused = [
        vec!["live-update", "--binary", spanvmm()],
        vec![
            "snapshot",
            "create",
            "--plugin",
            &checkpoint,
            "--dir",
            layer.to_str().unwrap(),
        ],
        vec!["save", "--dir", layer.to_str().unwrap()],
    ];
    for args in refused {
        let (ok, out) = src.ctl(&args);
        assert!(!ok, "{args:?} must be refused during a migration: {out}");
        assert!(
            out.contains("a migration is in progress") && out.contains("409"),
            "{args:?}: {out}"
        );
    }
    assert!(!mig.is_finished(), "20 MB/s for 64 MiB takes seconds");
    let (ok, out) = mig.join().unwrap();
    assert!(ok, "the migration failed: {out}\n{}", src.stderr());
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    check_arrived(&dst, 1000);
}

#[test]
fn idle_connections_do_not_hold_up_an_incoming_migration() {
    let tmp = TempDir::new("mig-idle");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-idle-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-idle-src", GUEST, MEM, 1);
    // Unauthenticated peers that connect first and never speak: each handshake has a 10 s
    // deadline; served one after another they made the real source time out.
    let idle = idle_peers(&addr, 4);
    let (ok, out, report) = migrate_precopy(&src, &addr, tls.to_str().unwrap());
    assert!(
        ok,
        "a migration behind idle peers failed: {out}\n{}",
        dst.stderr()
    );
    assert_eq!(report.unwrap()["result"], "completed");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    check_arrived(&dst, 1000);
    // Each idle peer is refused at its own deadline, reported once with the reason.
    for s in &idle {
        let me = s.local_addr().unwrap().to_string();
        let needle = format!("migration: refused {me}: ");
        wait_stderr(&dst, &needle, Duration::from_secs(30));
        let err = dst.stderr();
        assert_eq!(err.matches(&needle).count(), 1, "{err}");
        assert!(
            err.lines()
                .any(|l| l.contains(&needle) && l.contains("silent")),
            "no reason given for {me}:\n{err}"
        );
    }
}

#[test]
fn a_second_poller_does_not_take_the_report_from_the_migrations_starter() {
    let tmp = TempDir::new("mig-poll");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-poll-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-poll-src", GUEST, MEM, 1);
    // Another client watches GET /vm/migration far more often than ctl polls (every 100 ms):
    // it sees the final report first. The source used to exit on that.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (api, stop) = (src.api.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reports = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(v) = api_get(&api, "/vm/migration") {
                    if v.get("report").is_some() {
                        reports += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            reports
        })
    };
    let (ok, out, report) = migrate_precopy(&src, &addr, tls.to_str().unwrap());
    assert!(
        ok,
        "ctl migrate failed with a second poller: {out}\n{}",
        src.stderr()
    );
    let r = report.expect("the starter has the report");
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    // Whether the watcher saw the report before ctl's own poll is up to the scheduler (on a
    // busy host ctl may win every time); when it did, the source used to exit under ctl.
    eprintln!("the watcher saw the final report {seen} times before the source exited");
    check_arrived(&dst, 1000);
}

/// Waits until `vm`'s outgoing migration has sent some pages and is still in pre-copy.
fn wait_precopy_under_way(vm: &VmProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(p) = api_get(&vm.api, "/vm/migration").and_then(|v| v.get("progress").cloned())
        {
            if p["pages_sent"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(p["phase"], "precopy", "{p}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the migration never started sending"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_paused_guest_arrives_paused() {
    let tmp = TempDir::new("mig-paused");
    let tls = certs(&tmp, "tls");
    // (a) paused before a post-copy migration; (b) paused while pre-copy rounds run.
    for (case, plugin_file) in [("before", "postcopy.wasm"), ("during", "precopy.wasm")] {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let dst = destination(&format!("mig-paused-{case}-dst"), &[], &addr, &tls, &[]);
        let mut src = VmProcess::boot(&format!("mig-paused-{case}-src"), GUEST, MEM, 1);
        if case == "before" {
            src.ctl_ok(&["pause"]);
        }
        let ctl = migrate_in_background(&src, &addr, plugin_file, &tls, &[]);
        if case == "during" {
            wait_precopy_under_way(&src);
            src.ctl_ok(&["pause"]);
        }
        let (ok, out) = ctl.join().unwrap();
        assert!(ok, "{case}: {out}\n{}", src.stderr());
        assert_eq!(wait_exit(&mut src, "the source"), Some(0));
        wait_stderr(
            &dst,
            "paused as it was at the source",
            Duration::from_secs(10),
        );
        let from = dst.mark();
        let st = status(&dst);
        assert_eq!(st["state"], "paused", "{case}: {st}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            stats_since(&dst, from),
            0,
            "{case}: the guest ran at the destination before `ctl resume`"
        );
        dst.ctl_ok(&["resume"]);
        assert_eq!(status(&dst)["state"], "running");
        check_arrived(&dst, 30_000);
    }
}

#[test]
fn a_waiting_destination_serves_its_api() {
    let tmp = TempDir::new("mig-wait");
    let tls = certs(&tmp, "tls");
    // 1. Nobody comes: status, a clear refusal of other calls, and a shutdown that ends the
    //    wait and removes the socket.
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination("mig-wait-dst", &[], &addr, &tls, &["--memory", "256"]);
    let st = status(&dst);
    assert_eq!(st["state"], "incoming", "{st}");
    assert_eq!(st["memory_mib"], 256, "{st}");
    assert_eq!(st["progress"]["phase"], "waiting", "{st}");
    assert_eq!(st["listen"], addr.trim_start_matches("tls://"), "{st}");
    let (ok, out) = dst.ctl(&["pause"]);
    assert!(
        !ok && out.contains("waits for an incoming migration") && out.contains("409"),
        "{out}"
    );
    dst.ctl_ok(&["shutdown"]);
    assert_eq!(wait_exit(&mut dst, "the waiting destination"), Some(0));
    assert!(!dst.api.exists(), "the API socket stayed behind");

    // 2. Shut down while pages stream in: the source keeps its guest, which runs on there.
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination("mig-wait-dst2", &[], &addr, &tls, &[]);
    let src = VmProcess::boot("mig-wait-src", GUEST, MEM, 1);
    let ctl = migrate_in_background(&src, &addr, "precopy.wasm", &tls, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = status(&dst);
        if st["progress"]["pages_received"].as_u64().unwrap_or(0) > 0 {
            break st;
        }
        assert!(Instant::now() < deadline, "no pages arrived: {st}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(st["state"], "incoming", "{st}");
    assert_eq!(st["progress"]["phase"], "precopy", "{st}");
    assert!(st["progress"]["source"].is_string(), "{st}");
    dst.ctl_ok(&["shutdown"]);
    assert_eq!(wait_exit(&mut dst, "the destination"), Some(0));
    assert!(!dst.api.exists(), "the API socket stayed behind");
    let (ok, out) = ctl.join().unwrap();
    assert!(!ok, "the migration claims success: {out}");
    assert!(
        out.contains("shutting down") && out.contains("runs on at the source"),
        "{out}"
    );
    assert_eq!(status(&src)["state"], "running");
    src.assert_verify_clean(1);
}

/// A destination whose host lacks a CPU feature the guest was given refuses the VM before it
/// runs, naming the feature: the source hears why and keeps running the guest. (The
/// destination is told to compare as if its host lacked `sse2`: SPANVMM_TEST_HOST_LACKS.)
#[test]
fn a_destination_lacking_a_cpu_feature_refuses_the_guest_naming_it() {
    let tmp = TempDir::new("mig-cpu");
    let tls = certs(&tmp, "tls");
    let src = VmProcess::boot("mig-cpu-src", GUEST, MEM, 1);
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination(
        "mig-cpu-dst",
        &["env", "SPANVMM_TEST_HOST_LACKS=sse2"],
        &addr,
        &tls,
        &[],
    );
    // Committed with the state (what `auto` picks on a slow link, or a busy loopback): a
    // refused state must still roll back, not leave the source in doubt.
    let precopy = plugin("precopy.wasm");
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--plugin",
            &precopy,
            "--commit",
            "with-state",
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    assert!(!ok, "the migration claims success: {out}");
    let r = report.expect("a report");
    assert_eq!(r["result"], "failed", "{r}");
    assert_eq!(r["source_vm"], "running", "{r}");
    let err = r["error"].as_str().unwrap_or("").to_string();
    assert!(!err.contains("IN DOUBT"), "{r}");
    assert!(
        err.contains("missing CPU features: sse2") && err.contains("cpu-template"),
        "the source was not told why: {r}\n{out}"
    );
    let code = wait_exit(&mut dst, "the refusing destination");
    assert_ne!(code, Some(0));
    assert!(
        dst.stderr().contains("missing CPU features: sse2"),
        "{}",
        dst.stderr()
    );
    assert!(
        dst.lines().is_empty(),
        "the refused guest ran at the destination: {:?}",
        dst.lines()
    );
    // The source runs on, memory intact.
    let from = src.mark();
    src.wait_line_from(from, "SPANGUEST stat", Duration::from_secs(5));
    src.assert_verify_clean(1);
}

/// Periodic snapshot layers while a migration runs: the snapshot engine refuses to begin a
/// layer as long as the migration owns the VM (a layer's final resume would run the guest in
/// the migration's stop-and-copy), the checkpoint service postpones it, and the guest arrives
/// intact.
#[test]
fn periodic_layers_wait_while_a_migration_owns_the_vm() {
    let tmp = TempDir::new("mig-periodic");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-periodic-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot("mig-periodic-src", GUEST, MEM, 1);
    let layers = tmp.path().join("layers");
    src.ctl_ok(&[
        "snapshot",
        "periodic",
        "--dir",
        layers.to_str().unwrap(),
        "--plugin",
        &plugin("checkpoint.wasm"),
        "--target-pages",
        "64",
    ]);
    // A layer being written keeps a migration out (409): start it between layers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mig = loop {
        let mig = migrate_in_background(&src, &addr, "precopy.wasm", &tls, &[]);
        while !mig.is_finished()
            && api_get(&src.api, "/vm/migration").is_none_or(|v| v.get("progress").is_none())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !mig.is_finished() {
            break mig;
        }
        let (ok, out) = mig.join().unwrap();
        assert!(
            !ok && out.contains("a snapshot is being written"),
            "the migration failed otherwise: {out}"
        );
        assert!(Instant::now() < deadline, "never between two layers");
    };
    let (ok, out) = mig.join().unwrap();
    assert!(ok, "the migration failed: {out}\n{}", src.stderr());
    assert!(
        src.stderr().contains("periodic layer postponed")
            && src.stderr().contains("a migration is in progress"),
        "no periodic layer was due during the migration:\n{}",
        src.stderr()
    );
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    check_arrived(&dst, 1000);
}

/// exit-stats's count of the guest's port writes: its own state, which it hands over.
fn writes(vm: &VmProcess) -> u64 {
    let out = vm.ctl_ok(&["plugin", "call", "exit-stats", "stats"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["result"]["writes"].as_u64().unwrap()
}

#[test]
fn a_migration_carries_a_services_state() {
    let tmp = TempDir::new("mig-svc");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let dst = destination("mig-svc-dst", &[], &addr, &tls, &[]);
    let mut src = VmProcess::boot(
        "mig-svc-src",
        "workload=dirty,exits,verify mib=16 wss=4 rate=20000 exits=500 report_ms=200 stall_us=2000",
        MEM,
        1,
    );
    src.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("libexit-stats.so"),
        "--config",
        r#"{"base":2768,"len":1}"#,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes(&src) < 1000 {
        assert!(Instant::now() < deadline, "the guest does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused by the operator, the guest arrives paused: it has not written once at the
    // destination when its count is read there.
    src.ctl_ok(&["pause"]);
    let before = writes(&src);
    let (ok, out, _) = migrate_precopy(&src, &addr, tls.to_str().unwrap());
    assert!(ok, "migration failed: {out}\n{}", src.stderr());
    assert_eq!(wait_exit(&mut src, "the source"), Some(0));
    let list = dst.ctl_ok(&["plugin", "list"]);
    assert!(list.contains("exit-stats"), "{list}");
    // The migration service drove the switch-over: it does not come along.
    assert!(!list.contains("precopy"), "{list}");
    let arrived = writes(&dst);
    assert_eq!(arrived, before, "exit-stats did not arrive with its count");
    dst.ctl_ok(&["resume"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes(&dst) <= arrived {
        assert!(Instant::now() < deadline, "the count does not go on");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.assert_verify_clean(1);
}

/// A held-up main loop does not hold up a migration's watchers: `GET /vm/migration` and the
/// starter's polls are answered on the API's threads. (In CI, loaded, KVM took 12 s to turn
/// a memory slot's dirty logging off as the migration's service detached, and `ctl
/// migrate`'s poll, waiting for the main loop, got a 503.) Here a native service stuck in a
/// call holds the main loop while the migration waits at its hold gate.
#[test]
fn a_held_main_loop_still_answers_the_migrations_watchers() {
    let tmp = TempDir::new("mig-held");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let _dst = destination("mig-held-dst", &[], &addr, &tls, &[]);
    // It verifies its memory by itself every second: asking it goes through the held loop.
    let guest = format!("{GUEST} verify_ms=1000");
    let src = VmProcess::boot("mig-held-src", &guest, MEM, 1);
    src.ctl_ok(&["plugin", "attach", &plugin("libmisbehave.so")]);
    let starter = migrate_in_background(
        &src,
        &addr,
        "precopy.wasm",
        &tls,
        &["--hold-timeout-ms", "120000"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_get(&src.api, "/vm/migration").is_none_or(|v| v.get("progress").is_none()) {
        assert!(Instant::now() < deadline, "the migration never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = src.api.clone();
    let stuck = std::thread::spawn(move || ctl(&api, &["plugin", "call", "misbehave", "loop"]));
    // A request the main loop must take up waits its 10 s and is refused: the loop is held.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let (ok, out) = src.ctl(&["status"]);
        if !ok {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the call never held the main loop"
        );
    };
    assert!(
        refused.contains("503") && refused.contains("misbehave"),
        "{refused}"
    );
    let watched = api_get(&src.api, "/vm/migration").expect("an answer");
    assert!(watched["progress"]["phase"].is_string(), "{watched}");
    // The starter polled all along (every 100 ms): had a poll waited for the held loop, it
    // would have got the 503 and given up.
    assert!(
        !starter.is_finished(),
        "ctl migrate gave up: {:?}",
        starter.join()
    );
    assert!(!stuck.is_finished(), "the stuck call returned");
    // The guest runs on meanwhile, its memory intact and never stalled for long.
    let from = src.mark();
    let verified = src.wait_lines_from(from, "SPANGUEST verify", 2, Duration::from_secs(30));
    for l in &verified {
        assert_eq!(num(l, "bad"), 0, "guest memory damaged: {l}");
        assert!(num(l, "ok") > 0, "verify checked nothing: {l}");
    }
    let stall = src.max_stall_since(0);
    assert!(stall < 5_000_000, "the guest stalled {stall} µs");
}
