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
    let deadline = Instant::now() + 2 * T;
    let parked = loop {
        let s = stats(&vm);
        if n(&s, "evicted_now") >= cold_set * 9 / 10 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the cold set was not parked: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
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
    // Detaching brings every page back; then the guest is whole without the service.
    vm.ctl_ok(&["plugin", "detach", "agile"]);
    vm.assert_verify_clean(1);
    drop(redis);
}
