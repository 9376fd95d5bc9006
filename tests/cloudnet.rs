//! CloudNet's memory-side optimizations (issue 17) on a WAN-like link: two network-namespace
//! hosts on tbf-shaped 100 Mbit/s links with 20 ms round trips added by the delay relay, the
//! guest reduced to 32 MiB so that each migration takes seconds. Each optimization alone and
//! all together move the guest (`verify bad=0` at the destination, its stall bounded) and their
//! counters show they worked. A reference the destination cannot resolve is refused: see
//! `tests/hostile_peer.rs` (a fake source sends one).

mod common;

use std::time::Duration;

use common::wan::{relay, Wan};
use common::*;
use serde_json::Value;

const MEM: u64 = 128;
const PORT: u16 = 7460;

struct Run {
    ok: bool,
    out: String,
    report: Value,
    src: VmProcess,
    dst: VmProcess,
}

/// A source running `guest` and a destination waiting for it, across the WAN.
struct Hosts {
    _tmp: TempDir,
    tls: std::path::PathBuf,
    relay: netlab::DelayRelay,
    src: VmProcess,
    dst: VmProcess,
}

impl Hosts {
    fn new(wan: &Wan, tag: &str, guest: &str) -> Self {
        let tmp = TempDir::new(tag);
        let tls = certs(&tmp, "tls");
        let wb = wan.dst.wrapper();
        let addr = format!("tls://{}:{PORT}", wan.dst.ip);
        let dst = destination(&format!("{tag}-dst"), &wb, &addr, &tls, &[]);
        let relay = relay(&wan.dst, PORT);
        let wa = wan.src.wrapper();
        let src = VmProcess::boot_wrapped(&format!("{tag}-src"), &wa, guest, MEM, 1);
        // Let the workload run a little first (a partial-write guest must have pages to
        // rewrite).
        src.wait_line("SPANGUEST stat", Duration::from_secs(10));
        Hosts {
            _tmp: tmp,
            tls,
            relay,
            src,
            dst,
        }
    }
}

/// `ctl migrate` from `src` through `relay` with `plugin` and `config`: (success, output,
/// report).
fn migrate_over(
    src: &VmProcess,
    relay: &netlab::DelayRelay,
    tls: &std::path::Path,
    plugin_file: &str,
    config: &str,
) -> (bool, String, Value) {
    let (ok, out, report) = common::migrate(
        src,
        &[
            "--to",
            &format!("tls://{}", relay.addr()),
            "--plugin",
            &plugin(plugin_file),
            "--config",
            config,
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    (ok, out, report.unwrap_or(Value::Null))
}

/// Boots `guest` at the source, migrates it with `plugin` and `config` across the WAN.
fn migrate(wan: &Wan, tag: &str, guest: &str, plugin_file: &str, config: &str) -> Run {
    let h = Hosts::new(wan, tag, guest);
    let (ok, out, report) = migrate_over(&h.src, &h.relay, &h.tls, plugin_file, config);
    Run {
        ok,
        out,
        report,
        src: h.src,
        dst: h.dst,
    }
}

/// The migration succeeded and the guest runs on at the destination with its memory exact.
fn arrived(mut r: Run, what: &str) -> Value {
    assert!(r.ok, "{what} failed: {}\n{}", r.out, r.src.stderr());
    assert_eq!(r.report["result"], "completed", "{what}: {}", r.report);
    assert_eq!(r.src.wait_exit(Duration::from_secs(15)), Some(0), "{what}");
    r.dst.wait_line("SPANGUEST stat", Duration::from_secs(10));
    r.dst.assert_verify_clean(1);
    // The guest's own view of the switch-over: one stall at the destination, bounded by the
    // hand-over over a 20 ms round trip (generous: a loaded host stretches it).
    let stall = r.dst.max_stall_since(0);
    assert!(
        stall < 5_000_000,
        "{what}: the guest stalled {stall} µs at the destination"
    );
    let e = &r.report["encoding"];
    eprintln!(
        "{what}: guest stall {stall} µs; {:.0} ms, {} bytes, downtime {:.1} ms, {} rounds; encoding {e}",
        r.report["total_ms"].as_f64().unwrap_or(0.0),
        r.report["bytes"],
        r.report["downtime_ms"].as_f64().unwrap_or(0.0),
        r.report["rounds"]
    );
    r.report
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Repeated content: the unique region repeats every 64 pages; dirtied in 64-byte pieces.
const REPEATED: &str =
    "workload=dirty,verify mib=32 repeat=64 wss=8 rate=2000 write=64 stall_us=2000 report_ms=200";

#[test]
fn redundancy_cache_sends_repeated_content_as_references() {
    let Some(wan) = Wan::new("cnet-cbr") else {
        return;
    };
    let r = migrate(
        &wan,
        "cnet-cbr",
        REPEATED,
        "precopy.wasm",
        r#"{"redundancy":true}"#,
    );
    let report = arrived(r, "redundancy cache");
    let e = &report["encoding"];
    let (hits, misses) = (n(e, "cache_hits"), n(e, "cache_misses"));
    // 32 MiB of which 64 pages are distinct: nearly every block is a hit.
    assert!(hits > 10 * misses, "hits {hits}, misses {misses}: {e}");
    assert!(n(e, "cache_bytes_saved") > 20 << 20, "{e}");
    assert!(n(&report, "bytes") < 16 << 20, "{report}");
    assert!(e["deltas"] == false && n(e, "delta_pages") == 0, "{e}");
}

#[test]
fn page_deltas_send_partial_writes_as_small_deltas() {
    let Some(wan) = Wan::new("cnet-delta") else {
        return;
    };
    let guest = "workload=dirty,verify mib=32 wss=8 rate=2000 write=64 stall_us=2000 report_ms=200";
    let r = migrate(
        &wan,
        "cnet-delta",
        guest,
        "precopy.wasm",
        r#"{"deltas":true}"#,
    );
    let report = arrived(r, "page deltas");
    let e = &report["encoding"];
    assert!(n(e, "delta_pages") > 0, "{e}");
    assert!(
        n(e, "delta_bytes_saved") > n(e, "delta_pages") * 3000,
        "{e}"
    );
    // Round 1 sends every page for the first time: no deltas there.
    let rounds = e["per_round"].as_array().unwrap();
    assert_eq!(n(&rounds[0], "delta_pages"), 0, "{e}");
    assert!(rounds[1..].iter().any(|r| n(r, "delta_pages") > 0), "{e}");
    assert_eq!(n(e, "cache_hits"), 0, "{e}");
}

#[test]
fn a_page_dirtied_before_its_turn_in_a_round_goes_once() {
    let Some(wan) = Wan::new("cnet-skip") else {
        return;
    };
    // A working set rewritten all over (each page 1031 pages on from the last) at 2000
    // pages/s against ~3000 pages/s of link: a round's pages are written again while they
    // wait their turn (a writer in page order is past them).
    let guest =
        "workload=dirty,verify mib=32 wss=8 rate=2000 stride=1031 stall_us=2000 report_ms=200";
    // Plain pre-copy harvests every 25 ms during a round; the host leaves the pages still
    // queued out of those harvests: they go once, with the new writes, and the guest's
    // memory is exact at the destination.
    let r = migrate(&wan, "cnet-skip", guest, "precopy.wasm", "{}");
    let report = arrived(r, "mid-round harvests");
    assert!(n(&report, "dirtied_while_queued") > 0, "{report}");
    // Harvests at each round's end only: none finds a page still queued.
    let r = migrate(
        &wan,
        "cnet-skip-end",
        guest,
        "precopy.wasm",
        r#"{"harvest_ms":0}"#,
    );
    let report = arrived(r, "harvests at the rounds' ends");
    assert_eq!(n(&report, "dirtied_while_queued"), 0, "{report}");
}

/// Migrates `guest` with Smart Stop alone, the stall rule and the round cap out of its way
/// (100 rounds, 30): Smart Stop must be what ended the rounds. The report (None where the
/// test may skip, as [`Wan::new`]).
fn smart_stop_alone(tag: &str, guest: &str) -> Option<Value> {
    let wan = Wan::new(tag)?;
    let config = r#"{"smart_stop":true,"stall_rounds":100,"max_rounds":30}"#;
    let r = migrate(&wan, tag, guest, "precopy.wasm", config);
    let stderr = r.src.stderr();
    let report = arrived(r, tag);
    assert!(stderr.contains("smart stop: a local minimum"), "{stderr}");
    Some(report)
}

#[test]
fn smart_stop_stops_at_a_local_minimum_before_the_round_cap() {
    // Dirtying 1000..8000 pages/s in 1 s phases over 32 MiB, against ~3000 pages/s of link:
    // it never converges.
    let guest = "workload=dirty,verify mib=32 rate=4000 vary_ms=1000 stall_us=2000 report_ms=200";
    let Some(report) = smart_stop_alone("cnet-smart", guest) else {
        return;
    };
    assert!(n(&report, "rounds") < 30, "{report}");
}

#[test]
fn smart_stop_stops_on_a_plateau_without_waiting_for_the_stall_rule() {
    // SPECjbb-like: mostly zero memory, an 8 MiB working set rewritten far faster than the
    // ~3000 pages/s of link, so that every round leaves all of it dirty again: a plateau.
    let guest = "workload=zero,dirty,verify mib=32 wss=8 rate=20000 report_ms=200";
    let Some(report) = smart_stop_alone("cnet-plateau", guest) else {
        return;
    };
    // Round 1 sends the memory, round 2 the working set and finds it all dirty again (the
    // crossover, at the plateau's level): it stops there, or a round or two later if the
    // set's size wobbles under a loaded host.
    assert!(n(&report, "rounds") <= 5, "{report}");
}

#[test]
fn plain_precopy_on_a_plateau_stops_after_its_stall_rounds() {
    // The benchmark's `zero` guest under plain pre-copy: every round leaves its working set
    // dirty, and the stall rule (3 rounds without a set smaller by a tenth) ends it after
    // round 4. The set's count wobbles (2 053, 2 052, 2 053; up to 7 % with the mid-round
    // harvests), which is no smaller set: when a page counted, the benchmark's `zero` went
    // on for 6-7 rounds in 3 runs of 6, 78 MB instead of 53, and this test for 7 rounds
    // when 1 % counted with the mid-round harvests.
    let Some(wan) = Wan::new("cnet-stall") else {
        return;
    };
    let guest = "workload=zero,dirty,verify mib=32 wss=8 rate=6000 report_ms=200 verify_ms=2000";
    let r = migrate(
        &wan,
        "cnet-stall",
        guest,
        "precopy.wasm",
        r#"{"max_pause_ms":0}"#,
    );
    let stderr = r.src.stderr();
    let report = arrived(r, "cnet-stall");
    let left = per_round(&report, "pages_per_round");
    assert!(stderr.contains("not converging"), "{stderr}");
    assert_eq!(left.len(), 4, "rounds {left:?}: {report}");
}

/// The benchmark's `repeated` guest: 8 MiB of whole pages rewritten at 2000 pages/s against
/// the link's ~3000-3900, so every round shrinks the set until the rounds' own time.
const CONVERGING: &str =
    "workload=dirty,verify repeat=2048 wss=8 rate=2000 mib=32 stall_us=1000 report_ms=200";

/// A per-round list of the report (`pages_per_round`, `sent_per_round`).
fn per_round(report: &Value, key: &str) -> Vec<u64> {
    report[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[test]
fn smart_stop_lets_a_converging_guest_converge() {
    // Its rounds shrink by a quarter or more each until near the floor (a round's own
    // crossing): no crossover before, the rounds go on as plain pre-copy's. (When rounds
    // ended as their pages entered the sockets' buffers, a round's count matched the one
    // before, 1 055 sent and 1 048 left, and the rounds ended at ~1 000 pages.)
    let Some(wan) = Wan::new("cnet-converge") else {
        return;
    };
    let config = r#"{"smart_stop":true,"stall_rounds":100,"max_rounds":30}"#;
    let r = migrate(&wan, "cnet-converge", CONVERGING, "precopy.wasm", config);
    let report = arrived(r, "cnet-converge");
    let left = per_round(&report, "pages_per_round");
    // The set the rounds ended at (the working set is 2 048 pages): well down from where the
    // count alone ended them (quiet: 613, 658 and 1 061 pages; now about 100).
    assert!(
        left.last().is_some_and(|&n| n < 500),
        "the rounds ended at {left:?}: {report}"
    );
}

#[test]
fn a_round_ends_when_its_pages_have_left_the_bottleneck() {
    // The converging guest under plain pre-copy: its rounds shrink to the pages it dirties
    // while one round crosses the link. A round that ended once its pages were in the
    // sockets' buffers (megabytes on this path: the relay's and tbf's too) counted only the
    // pages dirtied while they were written; the stop-and-copy then found all those dirtied
    // while the buffers drained (1.35-4.8 times the last round: 586 after 407, 287 after
    // 91), and the rounds' counts wobbled. Ended at the destination's answer to a `sync`,
    // the rounds shrank steadily, but each idled the link a round trip (the floor: ~105
    // pages, the final copy ~100). Ended when the round's pages have left the bottleneck
    // (an answer a round trip's bytes behind them), the next round follows them on the
    // path: the rounds, and the pre-pause wait, end before their `sync`s are answered.
    let Some(wan) = Wan::new("cnet-arrived") else {
        return;
    };
    let config = r#"{"max_pause_ms":0}"#;
    let r = migrate(&wan, "cnet-arrived", CONVERGING, "precopy.wasm", config);
    let report = arrived(r, "cnet-arrived");
    let left = per_round(&report, "pages_per_round");
    let sent = per_round(&report, "sent_per_round");
    let (Some(&last_round), Some(&final_copy)) = (left.last(), sent.last()) else {
        panic!("no rounds in {report}");
    };
    let overlapped = n(&report, "overlapped_round_trips");
    let saved = report["overlap_saved_ms"].as_f64().unwrap_or(0.0);
    let peak = n(&report, "rate_peak_bytes_per_sec");
    eprintln!(
        "cnet-arrived: rounds {left:?}, sent {sent:?}; {overlapped} ended before arrival, \
         {saved:.0} ms saved; the service's peak send rate {peak} bytes/s"
    );
    assert!(left.len() > 2, "the guest converged at once: {report}");
    assert!(
        final_copy * 5 <= last_round * 6 + 80,
        "the stop-and-copy sent {final_copy} pages after a last round of {last_round} \
         (rounds {left:?}, sent {sent:?})"
    );
    // The rounds after the first (and the wait before the pause) end early: quiet, all of
    // them; a loaded host that reads several answers at once may see a round's own among
    // them. Each answer that came later saved time.
    assert!(
        overlapped as usize * 2 >= left.len() - 1 && saved > 0.0,
        "{overlapped} of {} rounds ended before arrival, {saved} ms saved: {report}",
        left.len()
    );
    // The send rate the service is shown is no more than the path delivers: 100 Mbit/s
    // carries 12.5 MB/s (less its headers), plus tbf's 10 ms burst after an idle spell
    // (2 % of a half-second span), though the sockets' and the relay's buffers take
    // megabytes at once (15.8 MB/s shown before; 5 % of slack for the answers' jitter).
    assert!(
        peak > 0 && peak <= 13_500_000,
        "the service was shown {peak} bytes/s on a 100 Mbit/s link"
    );
}

#[test]
fn all_optimizations_together() {
    let Some(wan) = Wan::new("cnet-all") else {
        return;
    };
    let config = r#"{"redundancy":true,"deltas":true,"smart_stop":true,"cache_mb":50}"#;
    let r = migrate(&wan, "cnet-all", REPEATED, "precopy.wasm", config);
    let report = arrived(r, "all together");
    let e = &report["encoding"];
    assert!(n(e, "cache_hits") > 0 && n(e, "delta_pages") > 0, "{e}");
    // And through hybrid's pre-copy rounds (its post-copy pages go raw).
    let r = migrate(&wan, "cnet-all-hy", REPEATED, "hybrid.wasm", config);
    let report = arrived(r, "all together, hybrid");
    assert!(n(&report["encoding"], "cache_hits") > 0, "{report}");
}

#[test]
fn together_a_resent_page_costs_no_more_than_with_deltas_alone() {
    let Some(wan) = Wan::new("cnet-vary") else {
        return;
    };
    // The kernel-compile-like workload: whole pages rewritten at a rate that varies around
    // the link's, so pages go again and again (some unchanged: sent while being rewritten).
    let guest = "workload=dirty,verify mib=32 wss=16 rate=3000 vary_ms=1000 stall_us=2000 \
                 report_ms=200";
    let config = r#"{"redundancy":true,"deltas":true,"smart_stop":true,"cache_mb":50}"#;
    let r = migrate(&wan, "cnet-vary", guest, "precopy.wasm", config);
    let report = arrived(r, "all together, varying");
    let e = &report["encoding"];
    // Each re-sent page went as the smallest of its delta, its cached blocks and raw: never
    // more than the deltas alone would have sent for the same pages (counted by the encoder
    // against the same page cache).
    let (resent, bytes, alone) = (
        n(e, "resent_pages"),
        n(e, "resent_bytes"),
        n(e, "resent_deltas_alone_bytes"),
    );
    assert!(resent > 0, "{e}");
    assert!(
        bytes <= alone,
        "re-sent pages took {bytes} bytes, deltas alone {alone}: {e}"
    );
    // And at most a raw page (blocks that all miss are not sent again).
    assert!(bytes <= resent * 4097, "{e}");
}

/// The benchmark's `zero` guest (SPECjbb-like): mostly zero memory, an 8 MiB working set
/// rewritten at 6000 pages/s against the link's ~3000-3900: every round leaves all of it
/// dirty again, so without a throttle the stop-and-copy sends the whole working set.
const PLATEAU: &str =
    "workload=zero,dirty,verify mib=32 wss=8 rate=6000 stall_us=2000 report_ms=200";

/// Smart Stop ends the rounds at the plateau; the throttle then takes over.
const THROTTLED: &str = r#"{"max_pause_ms":0,"smart_stop":true,"converge_throttle":90}"#;

#[test]
fn a_throttled_guest_converges_where_its_working_set_would_be_the_final_copy() {
    let Some(wan) = Wan::new("cnet-throttle") else {
        return;
    };
    let r = migrate(&wan, "cnet-throttle", PLATEAU, "precopy.wasm", THROTTLED);
    let stderr = r.src.stderr();
    let report = arrived(r, "cnet-throttle");
    assert!(stderr.contains("throttling the guest to 90 %"), "{stderr}");
    assert_eq!(n(&report, "vcpu_throttle_max"), 90, "{report}");
    let slept = report["vcpu_throttled_ms"].as_f64().unwrap_or(0.0);
    assert!(slept > 0.0, "the vCPUs never slept: {report}");
    // The plateau: rounds that left most of the 2 048-page working set dirty (2 053 quiet).
    // Throttled, the guest dirties less than the link carries and the final copy is a
    // fraction of it (16-146 pages quiet).
    let left = per_round(&report, "pages_per_round");
    let sent = per_round(&report, "sent_per_round");
    eprintln!("cnet-throttle: rounds {left:?}, sent {sent:?}, slept {slept:.0} ms");
    let plateau = left.iter().skip(1).copied().max().unwrap_or(0);
    let final_copy = *sent.last().expect("rounds sent");
    assert!(
        plateau >= 1024 && final_copy * 2 < plateau,
        "the stop-and-copy sent {final_copy} pages after a plateau of {plateau} (rounds \
         {left:?}, sent {sent:?})"
    );
}

#[test]
fn a_failed_migration_leaves_the_guest_unthrottled() {
    let Some(wan) = Wan::new("cnet-unthrottle") else {
        return;
    };
    let Hosts {
        _tmp,
        tls,
        relay,
        src,
        mut dst,
    } = Hosts::new(&wan, "cnet-unthrottle", PLATEAU);
    let (ok, out, report) = std::thread::scope(|s| {
        let migration = s.spawn(|| migrate_over(&src, &relay, &tls, "precopy.wasm", THROTTLED));
        wait_stderr(&src, "vCPUs throttled to 90 %", Duration::from_secs(60));
        assert_eq!(status(&src)["throttle_percent"], 90);
        // The destination dies while the guest is throttled at the source, once its vCPU
        // has slept (the first sleep follows a 10 ms run; a kill before it would find
        // nothing to lift).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while n(&status(&src), "throttled_ms") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the throttled vCPU never slept"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        dst.kill();
        migration.join().expect("the migration thread")
    });
    assert!(
        !ok,
        "the migration succeeded without its destination: {out}"
    );
    assert_eq!(report["result"], "failed", "{report}");
    assert_eq!(report["source_vm"], "running", "{report}");
    assert_eq!(n(&report, "vcpu_throttle_max"), 90, "{report}");
    // Lifted: the vCPUs sleep no more, and the guest runs on intact.
    let st = status(&src);
    assert_eq!(st["throttle_percent"], 0, "{st}");
    let slept = n(&st, "throttled_ms");
    assert!(slept > 0, "{st}");
    src.assert_verify_clean(1);
    assert_eq!(
        n(&status(&src), "throttled_ms"),
        slept,
        "the vCPUs slept on"
    );
    // The guest's own view: throttled, its longest stall is a sleep (90 ms), not a pause
    // (generous, as `arrived`: a loaded host stretches it).
    let stall = src.max_stall_since(0);
    assert!(
        stall < 5_000_000,
        "the guest stalled {stall} µs at the source"
    );
}
