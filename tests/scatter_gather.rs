//! Scatter-Gather end to end (issue #18): real `spanvmm` processes, real `redis-server`
//! intermediaries, the `scatter-gather.wasm` service. The destination sits behind a relay that
//! holds at most 64 KiB in flight with 10 ms each way (~6 MB/s), the intermediaries are on
//! loopback: most pages go through them, the source is evicted long before the destination
//! has gathered, and the guest's memory checks clean at the destination. Failures: an
//! intermediary SIGKILLed during the gather (two copies of each page), garbage under every key
//! of an intermediary (refused, the other copy used), and a destination that cannot reach the
//! intermediaries (it refuses before the hand-over: the guest runs on at the source, nothing
//! was scattered).
//! Every assertion is about mechanisms: counters, phases, exit statuses, the guest's check.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use l1_services::migration::resp::{Reply, Resp};
use netlab::{DelayRelay, NetLab, RedisServer};
use serde_json::{json, Value};

const MEM: u64 = 128;
/// 64 MiB written, every 16th page alike (dedup), rewritten slowly while it runs.
const GUEST: &str = "workload=dirty,verify mib=64 rate=2000 repeat=16 report_ms=200";

fn f(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"))
}

/// Two intermediaries, or None where the test may skip (never under CI).
fn intermediaries(test: &str, dir: &TempDir) -> Option<Vec<RedisServer>> {
    if !netlab::can_run(test, RedisServer::available()) {
        return None;
    }
    Some(
        (0..2)
            .map(|_| RedisServer::start(&dir.path().join("redis")).expect("start redis-server"))
            .collect(),
    )
}

/// A slow link to `target`: 10 ms each way, at most 64 KiB in flight (~6 MB/s).
fn slow_link(target: &str) -> DelayRelay {
    DelayRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        target.parse().unwrap(),
        Duration::from_millis(10),
        64 << 10,
    )
    .expect("start the relay")
}

fn sg_config(srv: &[RedisServer], extra: Value) -> String {
    let mut c = json!({
        "intermediaries": srv.iter().map(|s| s.addr().to_string()).collect::<Vec<_>>(),
        "replicas": 2,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

/// The destination's view of the incoming migration.
fn incoming(dst: &VmProcess) -> Value {
    api_get(&dst.api, "/vm/migration").expect("the destination answers")["incoming"].clone()
}

/// Waits until the destination's migration is `completed` (every page gathered).
fn wait_gathered(dst: &VmProcess, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = incoming(dst);
        match p["phase"].as_str() {
            Some("completed") => return p,
            Some("failed") => panic!("the gather failed: {p}\n{}", dst.stderr()),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "not gathered after {timeout:?}: {p}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn raw(addr: SocketAddr) -> Resp {
    Resp::connect(addr, Duration::from_secs(5), 16 << 20).unwrap()
}

fn dbsize(addr: SocketAddr) -> i64 {
    match raw(addr).call(&[b"DBSIZE"]).unwrap() {
        Reply::Int(n) => n,
        other => panic!("DBSIZE: {other:?}"),
    }
}

/// Overwrites the value of every key at `addr` with garbage; returns how many.
fn garble(addr: SocketAddr) -> usize {
    let mut c = raw(addr);
    let keys = match c.call(&[b"KEYS", b"*"]).unwrap() {
        Reply::Array(Some(k)) => k,
        other => panic!("KEYS: {other:?}"),
    };
    for k in &keys {
        let Reply::Bulk(Some(k)) = k else {
            panic!("{k:?}")
        };
        c.queue(&[b"SET", k, &[0x5a; 4200]]).unwrap();
    }
    c.flush().unwrap();
    for _ in &keys {
        assert_eq!(c.read().unwrap(), Reply::Simple("OK".into()));
    }
    keys.len()
}

/// Migrates `src` to `dst` (behind `link`) with Scatter-Gather; the report.
fn scatter_gather(src: &VmProcess, link: &DelayRelay, tls: &TempDir, config: &str) -> Value {
    let (ok, out, report) = migrate(
        src,
        &[
            "--to",
            &format!("tls://{}", link.addr()),
            "--tls-dir",
            tls.path().join("tls").to_str().unwrap(),
            "--plugin",
            &plugin("scatter-gather.wasm"),
            "--config",
            config,
        ],
    );
    assert!(ok, "scatter-gather failed: {out}\n{}", src.stderr());
    report.expect("a report")
}

/// The guest's stall at the destination of a post-copy hand-over (`r` the report, `done`
/// the destination's progress once gathered): the downtime, or a loop step's faults at
/// their worst latency, and a busy host's slack.
fn postcopy_stall(dst: &VmProcess, r: &Value, done: &Value) {
    let bound_us = (r["downtime_ms"].as_f64().unwrap() * 1e3) as u64
        + FAULTS_PER_STEP * f(done, "fault_latency_max_us");
    dst.assert_stall_below(
        0,
        bound_us / 1000 + DESCHEDULED_MS,
        "scatter-gather destination",
    );
}

/// Each page once: on the link (faults, zero markers, direct data) or at the
/// intermediaries; a page sent again on the link is counted as such.
fn assert_each_page_once(r: &Value) {
    let sc = &r["scatter"];
    assert_eq!(
        f(r, "pages_sent") + f(sc, "scattered_pages"),
        f(r, "pages_total") + f(r, "postcopy_resent"),
        "every page accounted once: {r}"
    );
    assert!(
        f(r, "postcopy_resent") <= f(r, "remote_faults"),
        "only faulted pages go twice: {r}"
    );
}

#[test]
fn the_source_is_evicted_before_the_gather_ends_and_a_killed_intermediary_loses_no_page() {
    let tmp = TempDir::new("sg-evict");
    let Some(mut srv) = intermediaries("sg-evict", &tmp) else {
        return;
    };
    certs(&tmp, "tls");
    let port = free_port();
    let dst = destination(
        "sg-evict-dst",
        &[],
        &format!("tls://127.0.0.1:{port}"),
        &tmp.path().join("tls"),
        &[],
    );
    let link = slow_link(&format!("127.0.0.1:{port}"));
    let mut src = VmProcess::boot("sg-evict-src", GUEST, MEM, 1);
    // The gather capped at 8 MiB/s: ~64 MiB of scattered pages take seconds to come in.
    let config = sg_config(
        &srv,
        json!({ "encrypt": true, "gather_rate": 8 << 20, "high_water": 128 << 10 }),
    );
    let t0 = Instant::now();
    let r = scatter_gather(&src, &link, &tmp, &config);
    // The source is evicted: it exits while the destination still gathers.
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    let evicted = t0.elapsed();
    let at_eviction = incoming(&dst);
    assert_eq!(at_eviction["phase"], "postcopy", "{at_eviction}");
    assert!(f(&at_eviction, "pages_needed") > 0, "{at_eviction}");
    assert_eq!(r["handover"], "postcopy", "{r}");
    let sc = &r["scatter"];
    // The link's buffers (the relay's included) take a few MiB before it counts as behind;
    // the rest goes to the intermediaries.
    assert!(
        f(sc, "scattered_pages") > f(sc, "direct_pages"),
        "most data pages through the intermediaries: {r}"
    );
    // Every 16th page alike: stored once, the others are dedup hits.
    assert!(
        f(sc, "dedup_hits") > f(sc, "scattered_pages") / 2,
        "repeated pages stored once: {r}"
    );
    assert!(f(sc, "bytes_to_intermediaries") > 0, "{r}");
    assert_each_page_once(&r);
    // One intermediary dies mid-gather: every page has its copy on the other.
    srv[0].kill();
    let done = wait_gathered(&dst, Duration::from_secs(60));
    let g = &done["gather"];
    assert!(
        g["store"]["intermediaries"][0]["down"].as_bool().unwrap(),
        "{done}"
    );
    // Each scattered page read once, but for those a fault wanted while the run holding them
    // was being read (the fault reads its page itself).
    assert!(
        f(g, "pages") > 0 && f(g, "pages") <= f(sc, "scattered_pages") + f(&done, "remote_faults"),
        "{done}"
    );
    assert_eq!(f(g, "fallback_runs"), 0, "the source was gone: {done}");
    assert_eq!(f(&done, "pages_needed"), 0, "{done}");
    // While the source pushed pages on the link, the gather left it the destination's link.
    assert!(
        f(sc, "direct_pages") > 0 && f(g, "ahead_held_ms") > 0,
        "{done}"
    );
    let read: u64 = (0..2)
        .map(|i| f(&g["store"]["intermediaries"][i], "wire_in"))
        .sum();
    dst.assert_verify_clean(1);
    // Post-copy at the destination: the guest waited for the switch-over, then for its
    // faults (from the intermediaries, or the source over the slow link; a killed
    // intermediary's share from the other copy), a loop step's worth at most at a time.
    postcopy_stall(&dst, &r, &done);
    eprintln!(
        "scatter-gather: eviction {:.0} ms (source gone after {:.1} s), total {:.0} ms; \
         link {} B; src→intermediaries {} B; intermediaries→dst {read} B; {} pages direct, {} \
         scattered, {} zero, {} dedup hits",
        r["eviction_ms"].as_f64().unwrap(),
        evicted.as_secs_f64(),
        r["total_ms"].as_f64().unwrap(),
        f(&r, "bytes"),
        f(sc, "bytes_to_intermediaries"),
        f(sc, "direct_pages"),
        f(sc, "scattered_pages"),
        f(sc, "zero_pages"),
        f(sc, "dedup_hits"),
    );
}

#[test]
fn garbage_under_the_keys_of_an_intermediary_is_refused_and_the_other_copy_used() {
    let tmp = TempDir::new("sg-garbage");
    let Some(srv) = intermediaries("sg-garbage", &tmp) else {
        return;
    };
    certs(&tmp, "tls");
    let port = free_port();
    let dst = destination(
        "sg-garbage-dst",
        &[],
        &format!("tls://127.0.0.1:{port}"),
        &tmp.path().join("tls"),
        &[],
    );
    let link = slow_link(&format!("127.0.0.1:{port}"));
    let mut src = VmProcess::boot("sg-garbage-src", GUEST, MEM, 1);
    let config = sg_config(&srv, json!({ "gather_rate": 8 << 20 }));
    let r = scatter_gather(&src, &link, &tmp, &config);
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    assert_each_page_once(&r);
    // Every value at the first intermediary replaced by garbage while the gather runs.
    let garbled = garble(srv[0].addr());
    // (Every 16th page alike: few distinct values, each read many times.)
    assert!(garbled >= 16, "{garbled} keys");
    let done = wait_gathered(&dst, Duration::from_secs(60));
    let first = &done["gather"]["store"]["intermediaries"][0];
    assert!(f(first, "corrupt") > 0, "garbage read and refused: {done}");
    dst.assert_verify_clean(1);
    // A refused value costs its fault a read of the other copy: inside its latency.
    postcopy_stall(&dst, &r, &done);
}

#[test]
fn a_destination_that_cannot_reach_the_intermediaries_leaves_the_guest_running_at_the_source() {
    let tmp = TempDir::new("sg-unreach");
    let Some(srv) = intermediaries("sg-unreach", &tmp) else {
        return;
    };
    if !netlab::can_run("sg-unreach", NetLab::available()) {
        return;
    }
    // The destination in a host of its own: the intermediaries listen on this host's
    // loopback, which the source reaches and the destination does not.
    let lab = NetLab::new("sgu", &["dst"]).expect("network namespaces");
    let h = lab.host("dst").clone();
    let wrapper = h.wrapper();
    certs(&tmp, "tls");
    let addr = format!("tls://{}:{}", h.ip, free_port());
    let mut dst = destination(
        "sg-unreach-dst",
        &wrapper,
        &addr,
        &tmp.path().join("tls"),
        &[],
    );
    let src = VmProcess::boot("sg-unreach-src", GUEST, MEM, 1);
    let (from, pauses, t0) = (src.mark(), src.pauses(), Instant::now());
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &addr,
            "--tls-dir",
            tmp.path().join("tls").to_str().unwrap(),
            "--plugin",
            &plugin("scatter-gather.wasm"),
            "--config",
            &sg_config(&srv, json!({})),
        ],
    );
    assert!(!ok, "the migration cannot succeed: {out}");
    let took = t0.elapsed();
    let r = report.expect("a report");
    assert_eq!(r["result"], "failed", "{r}");
    assert_eq!(r["handover"], "none", "{r}");
    assert_eq!(r["source_vm"], "running", "{r}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains("scatter-gather: intermediaries"), "{r}");
    // The destination refused before anything was handed over, and holds no guest.
    let code = dst.wait_exit(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0 && c != 101), "{code:?}");
    // No page went to the intermediaries: scattering starts only after the hand-over.
    for s in &srv {
        assert_eq!(dbsize(s.addr()), 0);
    }
    let at = src.mark();
    src.wait_line_from(at, "SPANGUEST stat", Duration::from_secs(10));
    src.assert_verify_clean(1);
    src.assert_ran_on(from, pauses, took, "a refused scatter-gather");
}
