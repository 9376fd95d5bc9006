//! Gang migration with cluster-wide dedup (issue #18 item 3; GMGD, CCGrid 2013): N guests
//! sharing half their pages move together from rack A to rack B, two groups of network-
//! namespace hosts joined by one tbf-shaped core link (`netlab::Racks`). `ctl migrate-group
//! --no-sync --share-key` starts them at once with the `scatter-gather` service, one store key
//! shared by the group,
//! `high_water: 0` (every data page through the intermediary) and one `redis-server` inside
//! rack B: content addressing makes an identical page cross the core once, and each
//! destination gathers it inside its rack.
//!
//! Asserted from counters, not clocks: every member moved and its source exited after
//! eviction; the store holds the N copies of the shared region once (its key count against
//! the pages the sources scattered); the bytes the core's tbf counted are bounded by what the
//! sources' counters say they sent (the link plus the values actually written); no page is
//! written twice (two sources finding a page absent at once: the probe race, closed by
//! reserving an absent page before writing it — the loser waits for the winner's value — so
//! that only a reservation lapsed under a stalled holder could let one through);
//! every destination gathers everything and its guest's memory checks clean.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use l1_services::migration::resp::{Reply, Resp};
use netlab::{NetLab, Racks, RedisServer};
use serde_json::{json, Value};

/// Guests in the gang.
const N: usize = 3;
const MEM: u64 = 64;
/// Data MiB per guest, half of it the shared region (the same bytes in every guest).
const DATA_MIB: u64 = 40;
const SHARED_MIB: u64 = 20;
const CORE_BPS: u64 = 200_000_000;
const PORT: u16 = 7610;

fn f(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"))
}

/// Guest `i`: its own seed (unique pages differ between guests), the shared region alike.
fn guest(i: usize) -> String {
    format!(
        "workload=dirty,verify,shared mib={DATA_MIB} shared_mib={SHARED_MIB} wss=4 rate=500 \
         seed={} report_ms=500",
        i + 1
    )
}

/// `spanvmm ctl migrate-group ARGS`: (success, output, the group's report).
fn migrate_group(dir: &TempDir, args: &[&str]) -> (bool, String, Value) {
    let report = dir.path().join("group.json");
    let mut a = vec!["migrate-group", "--report", report.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = std::process::Command::new(spanvmm())
        .arg("ctl")
        .args(&a)
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

/// Waits until the destination's migration is `completed` (every page gathered).
fn wait_gathered(dst: &VmProcess, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = api_get(&dst.api, "/vm/migration").expect("the destination answers")["incoming"]
            .clone();
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

/// Pages at the intermediary: its `sg1:` keys (not the writers' reservations), asked from
/// inside its host.
fn stored_pages(racks: &Racks, addr: SocketAddr) -> u64 {
    racks
        .within("mid", || {
            let mut c = Resp::connect(addr, Duration::from_secs(5), 64 << 20).unwrap();
            match c.call(&[b"KEYS", b"sg1:*"]).unwrap() {
                Reply::Array(Some(k)) => k.len() as u64,
                other => panic!("KEYS: {other:?}"),
            }
        })
        .unwrap()
}

#[test]
fn a_gang_sends_each_identical_page_across_the_core_once() {
    let needs = NetLab::available().and_then(|()| RedisServer::available());
    if !netlab::can_run("gang", needs) {
        return;
    }
    let a: Vec<String> = (0..N).map(|i| format!("a{i}")).collect();
    let mut b: Vec<String> = (0..N).map(|i| format!("b{i}")).collect();
    b.push("mid".into());
    fn names(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let racks = Racks::new("gang", &names(&a), &names(&b), CORE_BPS).expect("racks");
    let tmp = TempDir::new("gang");
    let tls = certs(&tmp, "tls");
    let mid = racks.host("mid").ip;
    let redis_dir = tmp.path().join("redis");
    let redis = racks
        .within("mid", || {
            RedisServer::start_with(
                racks.command("mid", "redis-server"),
                IpAddr::V4(mid),
                6379,
                &redis_dir,
            )
        })
        .unwrap()
        .expect("redis-server in rack B");
    let mut dsts = Vec::new();
    let mut srcs = Vec::new();
    let mut vms = Vec::new();
    for i in 0..N {
        let to = format!("tls://{}:{PORT}", racks.host(&b[i]).ip);
        let wb = racks.host(&b[i]).wrapper();
        dsts.push(destination(&format!("gang-dst{i}"), &wb, &to, &tls, &[]));
        let wa = racks.host(&a[i]).wrapper();
        let src = VmProcess::boot_wrapped(&format!("gang-src{i}"), &wa, &guest(i), MEM, 1);
        vms.push(format!("{}={to}", src.api.display()));
        srcs.push(src);
    }
    for s in &srcs {
        s.wait_line("SPANGUEST stat", Duration::from_secs(30));
    }
    // Every data page through the intermediary; `--share-key` gives the group one store key,
    // so that its identical pages share one address at the store.
    let config = json!({
        "intermediaries": [redis.addr().to_string()],
        "high_water": 0,
    })
    .to_string();
    let core0 = racks.core_bytes().unwrap();
    let t0 = Instant::now();
    let mut args = Vec::new();
    for v in &vms {
        args.extend(["--vm", v.as_str()]);
    }
    let sg = plugin("scatter-gather.wasm");
    args.extend([
        "--no-sync",
        "--share-key",
        "--plugin",
        &sg,
        "--config",
        &config,
        "--tls-dir",
        tls.to_str().unwrap(),
    ]);
    let (ok, out, r) = migrate_group(&tmp, &args);
    let stderrs = || {
        srcs.iter()
            .map(|s| s.stderr())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(ok, "{out}\n{}", stderrs());
    assert_eq!(r["result"], "completed", "{r}");
    let members = r["members"].as_array().expect("members").clone();
    assert_eq!(members.len(), N, "{r}");
    // Every source evicted: its migration ended once every page was located, then it exited.
    for (i, s) in srcs.iter_mut().enumerate() {
        assert_eq!(members[i]["result"], "completed", "{r}");
        assert_eq!(members[i]["report"]["handover"], "postcopy", "{r}");
        assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0), "source {i}");
    }
    let evicted = t0.elapsed();
    let core1 = racks.core_bytes().unwrap();
    let gathered: Vec<Value> = dsts
        .iter()
        .map(|d| wait_gathered(d, Duration::from_secs(60)))
        .collect();
    let total = t0.elapsed();
    for d in &dsts {
        d.assert_verify_clean(1);
    }

    // The sources' counters.
    let rep = |i: usize| &members[i]["report"];
    let sc = |i: usize| &rep(i)["scatter"];
    let store = |i: usize| &sc(i)["intermediaries"][0];
    let sum = |g: &dyn Fn(usize) -> u64| (0..N).map(g).sum::<u64>();
    let scattered = sum(&|i| f(sc(i), "scattered_pages"));
    let written = sum(&|i| f(store(i), "pages_stored"));
    let value_bytes = sum(&|i| f(store(i), "bytes_stored"));
    let to_store = sum(&|i| f(sc(i), "bytes_to_intermediaries"));
    let link = sum(&|i| f(rep(i), "bytes"));
    let dedup = sum(&|i| f(sc(i), "dedup_hits"));
    for i in 0..N {
        assert_eq!(f(sc(i), "direct_pages"), 0, "high_water 0: {}", rep(i));
        assert_eq!(f(sc(i), "store_failures"), 0, "{}", rep(i));
        // Post-copy: each guest waited for its switch-over (the group's, synchronized or
        // not), then for its faults, a loop step's worth at their worst latency at a time.
        let bound_us = (rep(i)["downtime_ms"].as_f64().unwrap() * 1e3) as u64
            + FAULTS_PER_STEP * f(&gathered[i], "fault_latency_max_us");
        dsts[i].assert_stall_below(
            0,
            bound_us / 1000 + DESCHEDULED_MS,
            &format!("gang member {i} at its destination"),
        );
    }
    // The store's view: each distinct page once. Pages written more than once are the
    // probe race: two sources found the same page absent and both wrote it.
    let keys = stored_pages(&racks, redis.addr());
    assert!(written >= keys, "{written} writes, {keys} keys");
    let raced = written - keys;
    // With the reservations (on with a shared key) only a lapsed one (its holder stalled for
    // 5 s) lets a second source write a page.
    let waited = sum(&|i| f(store(i), "waited"));
    let takeovers = sum(&|i| f(store(i), "takeovers"));
    assert!(
        raced <= takeovers,
        "{raced} pages written twice, {takeovers} reservations lapsed ({waited} waited for)"
    );
    let shared = SHARED_MIB * 256;
    // The pages the vCPUs touch first go on the link right behind `commit`, outside the
    // scatter (each with its aligned group of 16: `FIRST_TOUCH_GROUP` in source.rs).
    let first_touch = sum(&|i| f(rep(i), "first_touch_pages")) * 16;
    // The N copies of the shared region are one at the store.
    assert!(
        keys + (N as u64 - 1) * shared <= scattered + first_touch,
        "{keys} keys for {scattered} pages scattered (+ at most {first_touch} sent first on \
         the links): the shared region is stored once"
    );
    assert_eq!(
        scattered,
        written + dedup,
        "each scattered page written or deduplicated"
    );
    // What crossed the core: the links (state, zero-page markers, locations) and the
    // intermediary's traffic (probes and the values written), plus TCP/IP/Ethernet
    // headers (< 6 %) and the guests' silence.
    let core = core1.0 - core0.0;
    assert!(
        core >= value_bytes,
        "the values crossed: {core} < {value_bytes}"
    );
    let bound = (link + to_store) * 106 / 100 + (1 << 20);
    assert!(
        core <= bound,
        "core {core} B > {bound} B (links {link} B, to the intermediary {to_store} B)"
    );
    // Without the shared store each guest's pages would all have crossed.
    let alone = scattered * 4096;
    eprintln!(
        "gang of {N}: core A→B {core} B, B→A {} B ({:.2}× the {alone} B of the pages alone); \
         links {link} B, to the intermediary {to_store} B ({value_bytes} B of values); \
         {scattered} pages scattered, {written} written, {dedup} deduplicated, {keys} keys, \
         {raced} written twice, {waited} waited for (the probe race); sources evicted after \
         {:.1} s, every page gathered after {:.1} s",
        core1.1 - core0.1,
        core as f64 / alone as f64,
        evicted.as_secs_f64(),
        total.as_secs_f64(),
    );
    for (i, g) in gathered.iter().enumerate() {
        eprintln!(
            "  source {i}: {} pages scattered, {} written, {} deduplicated, link {} B; \
             destination gathered {} pages in {} runs",
            f(sc(i), "scattered_pages"),
            f(store(i), "pages_stored"),
            f(sc(i), "dedup_hits"),
            f(rep(i), "bytes"),
            f(&g["gather"], "pages"),
            f(&g["gather"], "runs"),
        );
    }
}
