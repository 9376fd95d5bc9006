//! Agile migration's cold-page parking end to end: a real spanvmm process running spanguest
//! (`dirty,verify`, a small working set in a large region), the `agile` Wasm service parking
//! the cold pages at two real `redis-server` intermediaries (encrypted, two replicas) and
//! evicting them from the running VM; the guest keeps running and verifies every page.

mod common;

use std::time::{Duration, Instant};

use common::*;
use netlab::RedisServer;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 64;
const WSS: u64 = 8;

/// The service's `stats`; a park in progress (a tick of the main loop) may delay the call.
fn stats(vm: &VmProcess) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (ok, out) = vm.ctl(&["plugin", "call", "agile", "stats", ""]);
        if ok {
            let v: Value =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
            return v["result"].clone();
        }
        assert!(
            out.contains("busy") && Instant::now() < deadline,
            "stats: {out}"
        );
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Waits until at least 9/10 of `cold_set` pages are evicted; returns the service's stats
/// then, and whether the VMM was seen answering its API (`GET /vm`) while a park's push was
/// in progress (the same park before and after the answer, its push not over).
fn wait_parked(vm: &VmProcess, cold_set: u64) -> (Value, bool) {
    let deadline = Instant::now() + 2 * T;
    let mut answered = false;
    loop {
        let s = stats(vm);
        if n(&s, "evicted_now") >= cold_set * 9 / 10 {
            return (s, answered);
        }
        let pushing = |s: &Value| {
            let p = &s["park"];
            (p.is_object() && p["pushed_all"] == false).then(|| n(p, "elapsed_ms"))
        };
        if let Some(t0) = pushing(&s) {
            let status = api_get(&vm.api, "/vm");
            let after = stats(vm);
            if let (Some(st), Some(t1)) = (status, pushing(&after)) {
                // The same park still pushing (its age grew), and the VMM answered between.
                answered |= t1 >= t0 && st.get("state").is_some();
            }
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "the cold set was not parked: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two intermediaries (None: the test may skip, never under CI), a source VM running
/// `dirty,verify` with `WSS` of `MIB` hot, the `agile` service attached with `extra`
/// configuration and its cold set parked; the service's stats once parked.
fn parked_vm(
    test: &str,
    dir: &TempDir,
    extra: Value,
) -> Option<(Vec<RedisServer>, VmProcess, Value)> {
    if !netlab::can_run(test, RedisServer::available()) {
        return None;
    }
    let redis: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(dir.path()).expect("start redis-server"))
        .collect();
    let vm = VmProcess::boot(
        test,
        &format!("workload=dirty,verify mib={MIB} wss={WSS} rate=50000 report_ms=200"),
        128,
        1,
    );
    vm.wait_line("SPANGUEST stat", T);
    let mut cfg = json!({
        "intermediaries": redis.iter().map(|r| r.addr().to_string()).collect::<Vec<_>>(),
        "cold_ms": 1000,
        "max_evict_mb": 64,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("agile.wasm"),
        "--config",
        &cfg.to_string(),
    ]);
    let (parked, _) = wait_parked(&vm, (MIB - WSS) * 256);
    Some((redis, vm, parked))
}

/// The destination's view of the incoming migration.
fn incoming(dst: &VmProcess) -> Value {
    api_get(&dst.api, "/vm/migration").expect("the destination answers")["incoming"].clone()
}

/// Waits until the destination's migration is `completed` (every parked page gathered).
fn wait_gathered(dst: &VmProcess) -> Value {
    let deadline = Instant::now() + 2 * T;
    loop {
        let p = incoming(dst);
        match p["phase"].as_str() {
            Some("completed") => return p,
            Some("failed") => panic!("the gather failed: {p}\n{}", dst.stderr()),
            _ => {}
        }
        assert!(Instant::now() < deadline, "not gathered: {p}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates `src` to a new destination (`run --incoming` with `extra`) with `policy` (a
/// migration service); the report and the destination.
fn migrate_to_new(
    src: &VmProcess,
    dir: &TempDir,
    tag: &str,
    policy: &str,
    extra: &[&str],
) -> (Value, VmProcess) {
    certs(dir, "tls");
    let port = free_port();
    let addr = format!("tls://127.0.0.1:{port}");
    let dst = destination(tag, &[], &addr, &dir.path().join("tls"), extra);
    if let Some(i) = extra.iter().position(|&a| a == "--memory") {
        let ready = format!("{} MiB ready", extra[i + 1]);
        wait_stderr(&dst, &ready, T);
    }
    let (ok, out, report) = migrate(
        src,
        &[
            "--to",
            &addr,
            "--tls-dir",
            dir.path().join("tls").to_str().unwrap(),
            "--plugin",
            &plugin(policy),
        ],
    );
    assert!(
        ok,
        "migration failed: {out}\n--- source ---\n{}\n--- destination ---\n{}",
        src.stderr(),
        dst.stderr()
    );
    (report.expect("a report"), dst)
}

#[test]
fn cold_pages_parked_at_redis_free_the_source_and_the_guest_stays_intact() {
    let test = "agile_cold_pages";
    if !netlab::can_run(test, RedisServer::available()) {
        return;
    }
    let dir = TempDir::new("agile-redis");
    let redis: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(dir.path()).expect("start redis-server"))
        .collect();
    let vm = VmProcess::boot(
        "agile",
        &format!("workload=dirty,verify mib={MIB} wss={WSS} rate=50000 report_ms=200"),
        128,
        1,
    );
    vm.wait_line("SPANGUEST stat", T);
    let attached_at = vm.mark();
    let cfg = json!({
        "intermediaries": redis.iter().map(|r| r.addr().to_string()).collect::<Vec<_>>(),
        "replicas": 2,
        "encrypt": true,
        "cold_ms": 1500,
        "max_evict_mb": 16,
    });
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("agile.wasm"),
        "--config",
        &cfg.to_string(),
    ]);
    // Before the first park (pages turn cold 1.5 s after attach).
    let before = stats(&vm);
    assert_eq!(n(&before, "evicted_now"), 0, "{before}");
    // The cold set: everything but the working set, parked once cold.
    let cold_set = (MIB - WSS) * 256;
    let (parked, answered) = wait_parked(&vm, cold_set);
    // The park is a host job: the VMM answered its API while a push was in progress.
    assert!(answered, "no API answer seen during a park: {parked}");
    let freed = n(&before, "memfd_bytes").saturating_sub(n(&parked, "memfd_bytes"));
    eprintln!(
        "parked: {parked}\nfreed {freed} bytes of {} (memfd)",
        n(&before, "memfd_bytes")
    );
    assert!(
        freed >= n(&parked, "evicted_now") * 4096 * 9 / 10,
        "memory freed {freed} for {} pages evicted",
        n(&parked, "evicted_now")
    );
    assert!(
        n(&parked["store"], "pushed") >= n(&parked, "evicted"),
        "{parked}"
    );
    // The guest keeps running on its hot set.
    let from = vm.mark();
    let s1 = vm.wait_line_from(from, "SPANGUEST stat", T);
    let s2 = vm.wait_line_from(vm.mark(), "SPANGUEST stat", T);
    assert!(num(&s2, "dirtied") > num(&s1, "dirtied"), "{s1} / {s2}");
    // A live update would map the memfd unwatched: refused while pages are evicted.
    let (ok, out) = vm.ctl(&["live-update", "--binary", spanvmm()]);
    assert!(!ok && out.contains("evicted"), "{out}");
    // Every written page checked: the cold ones come back from Redis, intact.
    vm.assert_verify_clean(1);
    let after = stats(&vm);
    eprintln!("after verify: {after}");
    assert!(n(&after, "faulted_in") >= cold_set * 9 / 10, "{after}");
    assert_eq!(n(&after, "clobbered"), 0, "{after}");
    assert_eq!(
        n(&after, "evicted_now"),
        n(&after, "evicted") - n(&after, "faulted_in"),
        "{after}"
    );
    // What the guest saw: each park paused it for its eviction (all of them together bound
    // the longest), and a touch of a parked page waits for its read from Redis.
    let bound_us = n(&after, "paused_us") + FAULTS_PER_STEP * n(&after, "fault_max_us");
    vm.assert_stall_below(
        attached_at,
        bound_us / 1000 + DESCHEDULED_MS,
        "parks and fault-ins",
    );
    // Detaching brings every page back; then the guest is whole without the service.
    vm.ctl_ok(&["plugin", "detach", "agile"]);
    vm.assert_verify_clean(1);
    drop(redis);
}

/// The later migration moves the hot set and references: a pre-copy of a VM whose cold set
/// is parked sends each evicted page as its location (none is brought back at the source),
/// the destination gathers them from the intermediaries, and the guest checks clean there.
#[test]
fn a_parked_vm_migrates_its_hot_set_and_references_to_the_cold_pages() {
    let dir = TempDir::new("agile-migrate");
    let Some((_redis, mut src, _)) = parked_vm(
        "agile_migrate_precopy",
        &dir,
        json!({ "replicas": 2, "encrypt": true }),
    ) else {
        return;
    };
    // Paused (by its operator): nothing brings a parked page back before or during the
    // migration, so every one must go as its location.
    let t_pause = Instant::now();
    src.ctl_ok(&["pause"]);
    // A fault-in the guest started before its pause may still land after it (the pause kicks
    // the vCPU out of its wait; the page server's read goes on): read the counts once they
    // hold still (CI: 16 pages came back after the first read).
    let mut before = stats(&src);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let again = stats(&src);
        if n(&again, "evicted_now") == n(&before, "evicted_now") {
            break;
        }
        before = again;
    }
    let evicted = n(&before, "evicted_now");
    let resident = n(&before, "resident_pages");
    // Into prepared memory (`--memory`, every page present): the located pages must be
    // dropped from it before the guest runs there.
    let (r, dst) = migrate_to_new(
        &src,
        &dir,
        "agile-migrate-dst",
        "precopy.wasm",
        &["--memory", "128"],
    );
    eprintln!("report: {}", serde_json::to_string(&r["agile"]).unwrap());
    assert_eq!(r["handover"], "stop-and-copy", "{r}");
    let a = &r["agile"];
    // (A park may still have ended after the pause: the set only grew until the migration
    // began; from then on parks are refused and the paused guest brings nothing back.)
    let evicted = n(a, "evicted_at_start").max(evicted);
    assert_eq!(n(a, "evicted_at_start"), evicted, "{r}");
    // Every evicted page went as its location, none as data.
    assert_eq!(n(a, "located_pages"), evicted, "{r}");
    assert_eq!(n(a, "resent_direct"), 0, "{r}");
    // On the link: the resident pages (hot set, code, page tables) and the references.
    let data_pages = n(&r, "pages_sent") - n(&r, "zero_pages");
    assert!(
        data_pages <= resident,
        "{data_pages} data pages sent, {resident} resident: {r}"
    );
    let bytes = n(&r, "bytes");
    assert!(
        bytes < (resident * 4096 + n(a, "located_bytes")) * 11 / 10 + (1 << 20),
        "{bytes} bytes on the link for {resident} resident pages: {r}"
    );
    assert!(
        bytes < evicted * 4096 / 2,
        "the cold set crossed the link: {r}"
    );
    // The source leaves normally (nothing brought back from the intermediaries there).
    assert_eq!(
        src.wait_exit(Duration::from_secs(40)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert!(!src.stderr().contains("agile close"), "{}", src.stderr());
    // The destination reads the parked pages from the intermediaries.
    let done = wait_gathered(&dst);
    eprintln!("destination: {done}");
    let g = &done["gather"];
    assert!(n(g, "pages") >= evicted, "{done}");
    assert_eq!(n(g, "fallback_runs"), 0, "{done}");
    // The located pages were dropped from the prepared memory at the source's pre-pause
    // `sync`, while the guest still ran there: none inside the downtime (a parked GiB took
    // tens of ms of it).
    assert_eq!(
        n(&done, "dropped_before_state"),
        n(a, "located_pages"),
        "{done}"
    );
    assert_eq!(n(&done, "dropped_at_state"), 0, "{done}");
    let at_resume = dst.mark();
    dst.ctl_ok(&["resume"]);
    let paused_ms = t_pause.elapsed().as_millis() as u64;
    dst.assert_verify_clean(1);
    // The guest saw its operator's pause as one gap (the migration and the gather happened
    // inside it, every page was in before it ran again), never longer than that pause.
    let first = dst.wait_line_from(at_resume, "SPANGUEST stall", T);
    let gap = num(&first, "us");
    eprintln!("the operator's pause: {paused_ms} ms; the guest saw {gap} µs");
    assert!(
        gap < (paused_ms + DESCHEDULED_MS) * 1000,
        "the guest stalled {gap} µs, paused for {paused_ms} ms"
    );
    // The service came along: once the gather is over it opens its engine there.
    let deadline = Instant::now() + T;
    while stats(&dst)["open"] != true {
        assert!(
            Instant::now() < deadline,
            "agile not open at the destination: {}",
            stats(&dst)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The same with post-copy, the guest running: parked pages go as locations after the
/// switch-over; the destination gathers them while the source pushes the rest.
#[test]
fn a_parked_vm_moves_by_postcopy_with_references_to_the_cold_pages() {
    let dir = TempDir::new("agile-postcopy");
    let Some((_redis, mut src, parked)) =
        parked_vm("agile_migrate_postcopy", &dir, json!({ "replicas": 1 }))
    else {
        return;
    };
    let evicted = n(&parked, "evicted_now");
    let (r, dst) = migrate_to_new(&src, &dir, "agile-postcopy-dst", "postcopy.wasm", &[]);
    eprintln!("report: {}", serde_json::to_string(&r["agile"]).unwrap());
    assert_eq!(r["handover"], "postcopy", "{r}");
    let a = &r["agile"];
    // The guest ran until the switch-over: a page it touched meanwhile came back and went as
    // data; every other evicted page went as its location.
    let at_start = n(a, "evicted_at_start");
    assert!(at_start >= evicted * 9 / 10, "{r}");
    assert!(n(a, "located_pages") >= at_start * 9 / 10, "{r}");
    assert!(n(a, "located_pages") <= at_start, "{r}");
    assert!(
        n(&r, "bytes") < evicted * 4096 / 2,
        "the cold set crossed the link: {r}"
    );
    assert_eq!(
        src.wait_exit(Duration::from_secs(40)),
        Some(0),
        "{}",
        src.stderr()
    );
    let done = wait_gathered(&dst);
    assert!(
        n(&done["gather"], "pages") >= n(a, "located_pages"),
        "{done}"
    );
    dst.assert_verify_clean(1);
    // Post-copy: the guest waited for the switch-over, then for its faults (from the source
    // or the intermediaries), a loop step's worth at most at a time. (Up to its check: then
    // the service at the destination opens and parks again, pausing it as at the source.)
    let downtime_ms = r["downtime_ms"].as_f64().unwrap();
    let fault_max_us = n(&done, "fault_latency_max_us");
    eprintln!("post-copy: downtime {downtime_ms:.1} ms, worst fault {fault_max_us} µs");
    let bound_us = (downtime_ms * 1e3) as u64 + FAULTS_PER_STEP * fault_max_us;
    let checked = dst.mark();
    dst.assert_stall_in(
        0..checked,
        bound_us / 1000 + DESCHEDULED_MS,
        "post-copy with parked pages",
    );
}
