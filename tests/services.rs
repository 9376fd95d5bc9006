//! End-to-end tests of services beneath running VMs: real spanvmm processes, real spanguest,
//! real Wasm components and native shared objects built by plugins/build.sh.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
/// The guest's exit-storm port (docs/spanguest-abi.md), claimable by services.
const STORM: &str = r#"{"base":2768,"len":1}"#;

fn plugin(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/plugins")
        .join(file);
    assert!(
        p.exists(),
        "{} not found — build the plugins with plugins/build.sh",
        p.display()
    );
    p.to_str().unwrap().to_string()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `plugin call NAME METHOD ARGS` → the service's result.
fn call(vm: &VmProcess, name: &str, method: &str, args: &str) -> Value {
    json(&vm.ctl_ok(&["plugin", "call", name, method, args]))["result"].clone()
}

fn stalls_since(vm: &VmProcess, from: usize) -> Vec<String> {
    vm.lines()[from..]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .cloned()
        .collect()
}

#[test]
fn wasm_and_native_services_attach_and_detach_beneath_a_running_guest() {
    let vm = VmProcess::boot(
        "svc",
        "workload=exits,dirty,verify exits=500 mib=16 rate=5000 stall_us=50000",
        128,
        1,
    );
    let from = vm.mark();
    for (file, kind) in [("exit-stats.wasm", "wasm"), ("libexit-stats.so", "native")] {
        let info = json(&vm.ctl_ok(&["plugin", "attach", &plugin(file), "--config", STORM]));
        assert_eq!(info["kind"], kind, "{info}");
        std::thread::sleep(Duration::from_millis(300));
        let stats = call(&vm, "exit-stats", "stats", "");
        assert!(stats["writes"].as_u64().unwrap() > 0, "{kind}: {stats}");
        let list = json(&vm.ctl_ok(&["plugin", "list"]));
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        vm.ctl_ok(&["plugin", "detach", "exit-stats"]);
        assert_eq!(json(&vm.ctl_ok(&["plugin", "list"])), Value::Array(vec![]));
    }
    // Attaching and detaching never stopped the guest for 50 ms or more.
    assert!(
        stalls_since(&vm, from).is_empty(),
        "{:?}",
        stalls_since(&vm, from)
    );
    vm.assert_verify_clean(1);
}

#[test]
fn a_service_claims_mmio_beneath_a_running_guest() {
    // spanguest's `mmio` workload stores to 63 GiB, above guest RAM: every store exits.
    let vm = VmProcess::boot(
        "mmio",
        "workload=mmio,dirty,verify exits=500 mib=16 rate=5000 stall_us=50000",
        128,
        1,
    );
    let from = vm.mark();
    let line = vm.wait_line_from(from, "SPANGUEST exits", T);
    assert!(line.contains("mmio=1"), "{line}");
    let cfg = r#"{"mmio_base":"0xfc0000000","mmio_len":4096}"#;
    for (file, kind) in [("exit-stats.wasm", "wasm"), ("libexit-stats.so", "native")] {
        let info = json(&vm.ctl_ok(&["plugin", "attach", &plugin(file), "--config", cfg]));
        assert_eq!(info["kind"], kind, "{info}");
        assert_eq!(info["mmio"][0]["base"], 63u64 << 30, "{info}");
        std::thread::sleep(Duration::from_millis(300));
        let stats = call(&vm, "exit-stats", "stats", "");
        assert!(
            stats["mmio_writes"].as_u64().unwrap() > 100,
            "{kind}: {stats}"
        );
        assert_eq!(stats["mmio_last_addr"], 63u64 << 30, "{kind}: {stats}");
        assert_eq!(stats["writes"], 0, "no port was claimed: {stats}");
        vm.ctl_ok(&["plugin", "detach", "exit-stats"]);
    }
    // A claim inside guest RAM is refused with the reason; the guest goes on.
    let (ok, out) = vm.ctl(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        r#"{"mmio_base":"0x100000"}"#,
    ]);
    assert!(!ok && out.contains("inside guest RAM"), "{out}");
    assert!(
        stalls_since(&vm, from).is_empty(),
        "{:?}",
        stalls_since(&vm, from)
    );
    vm.assert_verify_clean(1);
}

#[test]
fn replace_hands_the_service_state_over() {
    let vm = VmProcess::boot("replace", "workload=exits,verify exits=500 mib=8", 128, 1);
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let before = call(&vm, "exit-stats", "stats", "")["writes"]
        .as_u64()
        .unwrap();
    assert!(before > 0);
    let info = json(&vm.ctl_ok(&[
        "plugin",
        "replace",
        "exit-stats",
        &plugin("libexit-stats.so"),
    ]));
    assert_eq!(info["kind"], "native", "{info}");
    let after = call(&vm, "exit-stats", "stats", "")["writes"]
        .as_u64()
        .unwrap();
    assert!(
        after >= before,
        "counts lost in the hand-over: {before} then {after}"
    );
    // And back to Wasm.
    vm.ctl_ok(&[
        "plugin",
        "replace",
        "exit-stats",
        &plugin("exit-stats.wasm"),
    ]);
    let again = call(&vm, "exit-stats", "stats", "")["writes"]
        .as_u64()
        .unwrap();
    assert!(again >= after, "{after} then {again}");
    vm.assert_verify_clean(1);
}

#[test]
fn plugin_flag_attaches_services_at_start() {
    let kernel = guest_elf();
    let spec = format!("{}:{STORM}", plugin("exit-stats.wasm"));
    let vm = VmProcess::start(
        "flag",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=exits,verify exits=500 mib=8",
            "--memory",
            "128",
            "--plugin",
            &spec,
            "--plugin",
            &plugin("introspect.wasm"),
        ],
    );
    vm.wait_line("SPANGUEST exits", T);
    let list = json(&vm.ctl_ok(&["plugin", "list"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["exit-stats", "introspect"]);
    assert!(
        call(&vm, "exit-stats", "stats", "")["writes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // A bad --plugin is a clear start-up error.
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--plugin",
        "/nonexistent/x.wasm",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/x.wasm"), "{err}");
}

#[test]
fn conflicting_claims_are_refused_naming_both_owners() {
    let vm = VmProcess::boot("claims", "workload=dirty,verify mib=8", 128, 1);
    // A built-in device's port.
    let (ok, out) = vm.ctl(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        r#"{"base":1016,"len":8}"#,
    ]);
    assert!(!ok, "claiming COM1 must fail: {out}");
    assert!(
        out.contains("exit-stats") && out.contains("built-in"),
        "{out}"
    );
    // Another service's port: misbehave always claims 0x6f0.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("misbehave.wasm"),
        "--config",
        r#"{"mode":"calls"}"#,
    ]);
    let (ok, out) = vm.ctl(&[
        "plugin",
        "attach",
        &plugin("libexit-stats.so"),
        "--config",
        r#"{"base":1776,"len":1}"#,
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("exit-stats") && out.contains("misbehave"),
        "{out}"
    );
    let list = json(&vm.ctl_ok(&["plugin", "list"]));
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the refused service must not linger: {list}"
    );
    vm.assert_verify_clean(1);
}

#[test]
fn hostile_services_are_stopped_and_the_guest_is_unharmed() {
    let vm = VmProcess::boot(
        "hostile",
        "workload=dirty,verify mib=16 rate=5000 stall_us=50000",
        128,
        1,
    );
    let from = vm.mark();
    let refused = |file: &str, config: &str, expect: &[&str]| {
        let t = Instant::now();
        let (ok, out) = vm.ctl(&["plugin", "attach", &plugin(file), "--config", config]);
        assert!(!ok, "{file} {config} must be refused: {out}");
        let low = out.to_lowercase();
        assert!(
            expect.iter().any(|e| low.contains(e)),
            "{file}: expected one of {expect:?} in {out}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{file} took {:?}",
            t.elapsed()
        );
    };
    refused(
        "misbehave.wasm",
        r#"{"mode":"loop-attach"}"#,
        &["deadline", "interrupt", "time"],
    );
    refused("abi-mismatch.wasm", "", &["abi", "version"]);
    refused("libabi-mismatch.so", "", &["abi", "version"]);
    refused("libmissing-export.so", "", &["symbol", "missing", "export"]);
    refused(
        "missing-export.wasm",
        "",
        &["export", "missing", "instantiate"],
    );

    // A service that misbehaves only when asked.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("misbehave.wasm"),
        "--config",
        r#"{"mode":"calls"}"#,
    ]);
    let oob = vm.ctl(&["plugin", "call", "misbehave", "oob"]).1;
    assert!(
        oob.contains("outside"),
        "an out-of-RAM read must be refused: {oob}"
    );
    let write = vm.ctl(&["plugin", "call", "misbehave", "write"]).1;
    assert!(write.to_lowercase().contains("capab"), "{write}");
    let (ok, out) = vm.ctl(&["plugin", "call", "misbehave", "loop"]);
    assert!(!ok, "an endless call must be stopped: {out}");
    // The runaway service was detached; the manager still works.
    let list = vm.ctl_ok(&["plugin", "list"]);
    assert!(!list.contains("\"attached\""), "{list}");

    // Unbounded allocation hits the memory limit; the service is stopped.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("misbehave.wasm"),
        "--config",
        r#"{"mode":"calls"}"#,
    ]);
    let (ok, out) = vm.ctl(&["plugin", "call", "misbehave", "alloc"]);
    assert!(!ok, "unbounded allocation must be stopped: {out}");
    let list = vm.ctl_ok(&["plugin", "list"]);
    assert!(!list.contains("\"attached\""), "{list}");

    // An exclusive capability (drives-migration) is held by one service at a time.
    vm.ctl_ok(&["plugin", "attach", &plugin("greedy.wasm")]);
    let (ok, out) = vm.ctl(&["plugin", "attach", &plugin("libgreedy.so")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("greedy-wasm") && out.contains("greedy-native"),
        "{out}"
    );
    vm.ctl_ok(&["plugin", "detach", "greedy-wasm"]);
    let (ok, _) = vm.ctl(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
    ]);
    assert!(ok, "the manager must keep working after hostile services");

    assert!(vm.ctl_ok(&["status"]).contains("\"running\""));
    assert!(
        stalls_since(&vm, from).is_empty(),
        "{:?}",
        stalls_since(&vm, from)
    );
    vm.assert_verify_clean(1);
}

#[test]
fn introspect_reads_searches_translates_and_watches_the_guest() {
    let vm = VmProcess::boot("intro", "workload=dirty,verify mib=16 rate=5000", 128, 1);
    vm.ctl_ok(&["plugin", "attach", &plugin("introspect.wasm")]);
    let regs =
        json(&vm.ctl_ok(&["introspect", "regs", r#"{"vcpu":0,"pause":true}"#]))["result"].clone();
    assert_eq!(regs["cpl"], 3, "spanguest runs at CPL3: {regs}");
    assert!(
        vm.ctl_ok(&["status"]).contains("\"running\""),
        "regs must resume the VM"
    );
    let cr3 = regs["cr3"].as_u64().unwrap();
    let rip = regs["rip"].as_u64().unwrap();
    let t = json(&vm.ctl_ok(&[
        "introspect",
        "translate",
        &format!(r#"{{"cr3":{cr3},"gva":{rip}}}"#),
    ]))["result"]
        .clone();
    assert_eq!(t["present"], true, "{t}");
    assert_eq!(
        t["gpa"].as_u64(),
        Some(rip),
        "spanguest is identity-mapped: {t}"
    );
    assert_eq!(t["user"], true, "{t}");
    let found = json(&vm.ctl_ok(&["introspect", "search", r#"{"text":"SPANGUEST ready"}"#]))
        ["result"]
        .clone();
    let matches = found["matches"].as_array().unwrap();
    assert!(
        !matches.is_empty(),
        "the guest's own strings are in its memory: {found}"
    );
    let at = matches[0].as_u64().unwrap();
    let read = json(&vm.ctl_ok(&["introspect", "read", &format!(r#"{{"gpa":{at},"len":9}}"#)]))
        ["result"]
        .clone();
    assert_eq!(read["hex"], "5350414e4755455354", "{read}"); // "SPANGUEST"
                                                             // Watch all RAM above 2 MiB: the dirty workload writes there constantly.
    vm.ctl_ok(&["introspect", "watch", r#"{"gpa":2097152,"len":100000000}"#]);
    let deadline = Instant::now() + T;
    loop {
        let hits = json(&vm.ctl_ok(&["introspect", "watches"]))["result"].clone();
        if hits.to_string().contains("\"hits\":") && !hits.to_string().contains("\"hits\":0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write seen by the watch: {hits}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.assert_verify_clean(1);
}

#[test]
fn asynchronous_write_delivery_counts_every_write_and_survives_replace() {
    let vm = VmProcess::boot("async", "workload=exits,verify exits=500 mib=8", 128, 1);
    let info = json(&vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
        "--async-writes",
    ]));
    assert_eq!(info["async_port_writes"], true, "{info}");
    std::thread::sleep(Duration::from_millis(300));
    let before = call(&vm, "exit-stats", "stats", "")["writes"]
        .as_u64()
        .unwrap();
    assert!(before > 0, "queued writes must reach the service");
    // Replacing drains the queue into the old instance, hands the count over, keeps the mode.
    let info = json(&vm.ctl_ok(&[
        "plugin",
        "replace",
        "exit-stats",
        &plugin("libexit-stats.so"),
    ]));
    assert_eq!(info["async_port_writes"], true, "{info}");
    std::thread::sleep(Duration::from_millis(200));
    let after = call(&vm, "exit-stats", "stats", "")["writes"]
        .as_u64()
        .unwrap();
    assert!(after > before, "{before} then {after}");
    vm.assert_verify_clean(1);
}
