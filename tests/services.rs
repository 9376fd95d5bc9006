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

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `plugin call NAME METHOD ARGS` → the service's result.
fn call(vm: &VmProcess, name: &str, method: &str, args: &str) -> Value {
    json(&vm.ctl_ok(&["plugin", "call", name, method, args]))["result"].clone()
}

/// Asserts the VMM never paused the guest: services attach, detach and fail beneath a
/// running guest. (The VMM's pause counter is the mechanism; a guest-observed gap can also come
/// from a busy host descheduling the vCPU thread, which says nothing about the VMM.) The
/// guest's largest stall is printed for the record.
fn assert_never_paused(vm: &VmProcess, from: usize) {
    let status = json(&vm.ctl_ok(&["status"]));
    assert_eq!(status["pauses"], 0, "the VMM paused the guest: {status}");
    let stalls: Vec<_> = vm.lines()[from..]
        .iter()
        .filter(|l| l.contains("SPANGUEST stall"))
        .cloned()
        .collect();
    eprintln!("guest-observed stalls of 50 ms or more (host scheduling): {stalls:?}");
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
    // Attaching and detaching never stopped the guest.
    assert_never_paused(&vm, from);
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
    assert_never_paused(&vm, from);
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
    assert_never_paused(&vm, from);
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

// --- Service files are checked before anything of them is loaded or read (#19, #20). ---

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A shared object whose constructor creates `marker` (it is no service: loading it gets as
/// far as the missing handshake symbol, after the constructor ran).
fn marker_object(dir: &Path, marker: &Path) -> std::path::PathBuf {
    let src = dir.join("mark.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n__attribute__((constructor)) static void mark(void) {\n\
         FILE *f = fopen(MARKER, \"w\"); if (f) { fputs(\"ran\\n\", f); fclose(f); }\n}\n",
    )
    .unwrap();
    let so = dir.join("libmark.so");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(format!("-DMARKER=\"{}\"", marker.display()))
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&src).unwrap();
    chmod(&so, 0o755);
    so
}

/// `spanvmm ctl` that must answer within `limit` (it is killed and the test fails otherwise).
fn ctl_within(vm: &VmProcess, args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = std::process::Command::new(spanvmm())
        .arg("ctl")
        .arg("--api-socket")
        .arg(&vm.api)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spanvmm ctl {args:?} got no answer within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Peak resident set of `pid`, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

#[test]
fn an_untrusted_native_plugin_never_runs_in_the_vmm() {
    let vm = VmProcess::boot("untrusted", "workload=dirty,verify mib=8", 128, 1);
    let marks = TempDir::new("untrusted-marks");
    // (setup, words the refusal must contain)
    let cases: [(&str, &str); 3] = [
        ("world-writable-dir", "writable by"),
        ("other-owner", "owned by uid 65534"),
        ("group-writable", "chmod go-w"),
    ];
    for (setup, words) in cases {
        let dir = TempDir::new(setup);
        let marker = marks.path().join(format!("{setup}.ran"));
        let so = marker_object(dir.path(), &marker);
        match setup {
            "world-writable-dir" => chmod(dir.path(), 0o1777),
            "other-owner" => std::os::unix::fs::chown(&so, Some(65534), Some(65534)).unwrap(),
            _ => chmod(&so, 0o775),
        }
        let (ok, out) = vm.ctl(&["plugin", "attach", so.to_str().unwrap()]);
        assert!(!ok, "{setup}: must be refused: {out}");
        assert!(
            out.contains(so.to_str().unwrap()) && out.contains(words),
            "{setup}: the refusal must name the file and the problem: {out}"
        );
        assert!(
            !out.contains("missing symbol"),
            "{setup}: refused only after loading it: {out}"
        );
        assert!(
            !marker.exists(),
            "{setup}: the refused object's constructor ran in the VMM"
        );
    }
    // Control: from a trusted directory the same object is loaded, its constructor runs.
    let dir = TempDir::new("trusted-mark");
    let marker = marks.path().join("trusted.ran");
    let so = marker_object(dir.path(), &marker);
    let (ok, out) = vm.ctl(&["plugin", "attach", so.to_str().unwrap()]);
    assert!(!ok && out.contains("missing symbol"), "{out}");
    assert!(marker.exists(), "the control object's constructor must run");
    assert_eq!(json(&vm.ctl_ok(&["plugin", "list"])), Value::Array(vec![]));
    vm.assert_verify_clean(1);
}

#[test]
fn a_fifo_or_oversized_plugin_is_refused_and_the_api_stays_responsive() {
    let vm = VmProcess::boot("fifo", "workload=dirty,verify mib=8", 128, 1);
    let dir = TempDir::new("fifo-files");
    let fifo = dir.path().join("service.wasm");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // Nobody ever opens the FIFO's other end: a blocking open would hang the main loop.
    let limit = Duration::from_secs(10);
    let (ok, out) = ctl_within(&vm, &["plugin", "attach", fifo.to_str().unwrap()], limit);
    assert!(!ok, "{out}");
    assert!(
        out.contains(fifo.to_str().unwrap()) && out.contains("a FIFO, not a regular file"),
        "{out}"
    );
    let (ok, out) = ctl_within(&vm, &["status"], limit);
    assert!(ok && out.contains("\"running\""), "{out}");

    // A 2 GiB (sparse) file is refused by its size, not read: the VMM's peak RSS stays put.
    let big = dir.path().join("big.wasm");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let pid = vm.first_pid();
    let before = peak_rss_kib(pid);
    let (ok, out) = ctl_within(&vm, &["plugin", "attach", big.to_str().unwrap()], limit);
    assert!(!ok, "{out}");
    assert!(
        out.contains(big.to_str().unwrap()) && out.contains("64 MiB"),
        "{out}"
    );
    let grown = peak_rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 256 << 10,
        "the VMM's peak RSS grew by {grown} KiB: the file was read"
    );
    // The VMM goes on serving services.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
    ]);
    vm.assert_verify_clean(1);
}

#[test]
fn plugin_dir_and_no_native_plugins_confine_what_attaches() {
    let allowed = TempDir::new("plugin-dir");
    let outside = TempDir::new("plugin-outside");
    for f in ["exit-stats.wasm", "introspect.wasm", "libexit-stats.so"] {
        std::fs::copy(plugin(f), allowed.path().join(f)).unwrap();
        std::fs::copy(plugin(f), outside.path().join(f)).unwrap();
    }
    let kernel = guest_elf();
    let inside = allowed.path().join("exit-stats.wasm");
    let spec = format!("{}:{STORM}", inside.display());
    let dir_arg = allowed.path().to_str().unwrap();
    let vm = VmProcess::start(
        "plugin-dir",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=exits,verify exits=500 mib=8",
            "--memory",
            "128",
            "--plugin-dir",
            dir_arg,
            "--no-native-plugins",
            "--plugin",
            &spec,
        ],
    );
    vm.wait_line("SPANGUEST exits", T);
    let out_file = outside.path().join("introspect.wasm");
    let escape = allowed.path().join("escape.wasm");
    std::os::unix::fs::symlink(&out_file, &escape).unwrap();
    let dotdot = format!(
        "{}/../{}/introspect.wasm",
        dir_arg,
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    for p in [
        out_file.to_str().unwrap(),
        escape.to_str().unwrap(),
        &dotdot,
    ] {
        let (ok, out) = vm.ctl(&["plugin", "attach", p]);
        assert!(!ok, "{p}: {out}");
        assert!(
            out.contains(p) && out.contains("outside the plugin directories"),
            "{p}: {out}"
        );
    }
    let so = allowed.path().join("libexit-stats.so");
    let (ok, out) = vm.ctl(&["plugin", "attach", so.to_str().unwrap()]);
    assert!(!ok && out.contains("--no-native-plugins"), "{out}");
    let (ok, out) = vm.ctl(&["plugin", "replace", "exit-stats", so.to_str().unwrap()]);
    assert!(!ok && out.contains("--no-native-plugins"), "{out}");
    // Inside the directory a component attaches; the one from --plugin runs.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        allowed.path().join("introspect.wasm").to_str().unwrap(),
    ]);
    assert!(
        call(&vm, "exit-stats", "stats", "")["writes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // A --plugin outside the directories stops the start with the reason.
    let outside_spec = outside.path().join("exit-stats.wasm");
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--plugin-dir",
        dir_arg,
        "--plugin",
        outside_spec.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(outside_spec.to_str().unwrap()) && err.contains("--plugin-dir"),
        "{err}"
    );
    vm.assert_verify_clean(1);
}

#[test]
fn a_failing_replace_keeps_the_old_service_attached_and_working() {
    let vm = VmProcess::boot(
        "replace-keep",
        "workload=exits,verify exits=500 mib=8",
        128,
        1,
    );
    let info = json(&vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
    ]));
    let writes = || {
        call(&vm, "exit-stats", "stats", "")["writes"]
            .as_u64()
            .unwrap()
    };
    let dir = TempDir::new("replace-keep");
    let missing = dir.path().join("missing.wasm");
    let cases = [
        (missing.to_str().unwrap().to_string(), "no such file"),
        (
            plugin("introspect.wasm"),
            "holds service introspect, not exit-stats",
        ),
    ];
    for (path, words) in &cases {
        let before = writes();
        let (ok, out) = vm.ctl(&["plugin", "replace", "exit-stats", path]);
        assert!(!ok, "{out}");
        assert!(
            out.contains(path.as_str())
                && out.contains(words)
                && out.contains("stays attached, untouched"),
            "{out}"
        );
        let list = json(&vm.ctl_ok(&["plugin", "list"]));
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        // The same instance: attached at the same moment, still counting the guest's writes.
        assert_eq!(list[0]["attached_at_ms"], info["attached_at_ms"], "{list}");
        assert_eq!(list[0]["state"], "attached", "{list}");
        let deadline = Instant::now() + T;
        while writes() <= before {
            assert!(
                Instant::now() < deadline,
                "the old service stopped counting"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // With --rename another service may take its place.
    let info = json(&vm.ctl_ok(&[
        "plugin",
        "replace",
        "exit-stats",
        &plugin("template.wasm"),
        "--rename",
    ]));
    assert_eq!(info["name"], "hello", "{info}");
    vm.assert_verify_clean(1);
}

#[test]
fn the_plugin_policy_survives_a_live_update() {
    let allowed = TempDir::new("lu-plugin-dir");
    let outside = TempDir::new("lu-plugin-outside");
    for f in ["exit-stats.wasm", "introspect.wasm", "libintrospect.so"] {
        std::fs::copy(plugin(f), allowed.path().join(f)).unwrap();
        std::fs::copy(plugin(f), outside.path().join(f)).unwrap();
    }
    let kernel = guest_elf();
    let vm = VmProcess::start(
        "lu-policy",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=exits,verify exits=500 mib=8",
            "--memory",
            "128",
            "--plugin-dir",
            allowed.path().to_str().unwrap(),
            "--no-native-plugins",
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    vm.ctl_ok(&[
        "plugin",
        "attach",
        allowed.path().join("exit-stats.wasm").to_str().unwrap(),
        "--config",
        STORM,
    ]);
    let report = json(&vm.ctl_ok(&["live-update", "--binary", spanvmm()]));
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    assert_eq!(vm.serving_pid(), Some(new_pid), "{report}");
    // The successor was started with --takeover-fd only, and keeps the operator's policy.
    let (ok, out) = vm.ctl(&[
        "plugin",
        "attach",
        outside.path().join("introspect.wasm").to_str().unwrap(),
    ]);
    assert!(
        !ok && out.contains("outside the plugin directories"),
        "{out}"
    );
    let (ok, out) = vm.ctl(&[
        "plugin",
        "attach",
        allowed.path().join("libintrospect.so").to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("--no-native-plugins"), "{out}");
    vm.ctl_ok(&[
        "plugin",
        "attach",
        allowed.path().join("introspect.wasm").to_str().unwrap(),
    ]);
    assert!(
        call(&vm, "exit-stats", "stats", "")["writes"]
            .as_u64()
            .unwrap()
            > 0
    );
    vm.assert_verify_clean(1);
}

/// The VMM's log: what a service logs arrives under its name, as JSON lines a real parser
/// reads, in the file asked for, with the VM's id; a bad filter is refused before any VM.
#[test]
fn a_services_log_reaches_the_vmm_log_with_its_name() {
    let dir = TempDir::new("svclog");
    let log = dir.path().join("vmm.log");
    let kernel = guest_elf();
    let mut vm = VmProcess::start(
        "svclog",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            "workload=dirty,verify mib=8",
            "--id",
            "vm-under-test",
            "--log-format",
            "json",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    vm.ctl_ok(&["plugin", "attach", &plugin("misbehave.wasm")]);
    call(&vm, "misbehave", "log", "hello from a service");
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    assert_eq!(vm.wait_exit(T), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let said = events
        .iter()
        .find(|e| e["target"] == "spanvmm::service")
        .unwrap_or_else(|| panic!("no service event in {text}"));
    assert_eq!(said["fields"]["service"], "misbehave", "{said}");
    assert_eq!(said["fields"]["message"], "hello from a service", "{said}");
    assert_eq!(said["level"], "WARN", "{said}");
    assert_eq!(said["span"]["id"], "vm-under-test", "{said}");
    assert!(
        events.iter().any(|e| e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("misbehave") && m.contains("attached"))),
        "attaching is logged: {text}"
    );

    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--log-level",
        "info,=nonsense[",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--log-level"), "{err}");
}

/// Reads a scrape with the Prometheus client's OpenMetrics parser; its samples by name.
fn parse_metrics(text: &str) -> Value {
    use std::io::Write;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/parse_metrics.py");
    // Debian's python3-prometheus-client (installed by .ci/setup) is for the system python.
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

/// The value of `name`'s sample whose labels include `labels`.
fn sample(m: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    m[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in {m}"))
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s[0][*k] == *v))
        .unwrap_or_else(|| panic!("no {name}{labels:?} in {m}"))[1]
        .as_f64()
        .unwrap()
}

fn http_get(mut s: impl std::io::Read + std::io::Write, path: &str) -> String {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// `GET /metrics` on the API socket and on `--metrics-addr`: the VMM's counters (exits by
/// kind, pauses, a service's events and handler-time histogram) in a scrape a real parser
/// reads, and they move with what the VM does.
#[test]
fn metrics_are_scraped_with_a_real_parser() {
    let kernel = guest_elf();
    let vm = VmProcess::start(
        "metrics",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            "workload=exits,dirty,verify exits=500 mib=8",
            "--metrics-addr",
            "127.0.0.1:0",
            "--plugin",
            &format!("{}:{STORM}", plugin("exit-stats.wasm")),
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    std::thread::sleep(Duration::from_millis(300));
    vm.ctl_ok(&["pause"]);
    vm.ctl_ok(&["resume"]);
    let first = parse_metrics(&http_get(
        std::os::unix::net::UnixStream::connect(&vm.api).unwrap(),
        "/metrics",
    ));
    assert!(sample(&first, "spanvmm_vm_exits_total", &[("kind", "io_out")]) > 0.0);
    assert_eq!(sample(&first, "spanvmm_vm_pauses_total", &[]), 1.0);
    assert_eq!(sample(&first, "spanvmm_vm_running", &[]), 1.0);
    assert_eq!(
        sample(&first, "spanvmm_service_up", &[("service", "exit-stats")]),
        1.0
    );
    let events = sample(
        &first,
        "spanvmm_service_events_total",
        &[("service", "exit-stats")],
    );
    assert!(events > 0.0, "{first}");
    let timed = sample(
        &first,
        "spanvmm_service_event_handler_seconds_count",
        &[("service", "exit-stats")],
    );
    assert!(timed > 0.0 && timed <= events, "{first}");
    assert_eq!(
        sample(
            &first,
            "spanvmm_migrations_total",
            &[("result", "completed")]
        ),
        0.0
    );
    // The TCP listener serves the same scrape; the counters have moved on.
    let stderr = vm.stderr();
    let addr = stderr
        .split("metrics on http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address logged: {stderr}"))
        .to_string();
    let second = parse_metrics(&http_get(
        std::net::TcpStream::connect(&addr).unwrap(),
        "/metrics",
    ));
    assert!(
        sample(
            &second,
            "spanvmm_service_events_total",
            &[("service", "exit-stats")]
        ) > events,
        "{second}"
    );
    // A live update hands the listener to the new process, which answers with its own
    // counters (its takeover's restore time: only a successor has one).
    assert_eq!(
        sample(&second, "spanvmm_live_update_takeover_restore_seconds", &[]),
        0.0
    );
    vm.ctl_ok(&["live-update", "--binary", spanvmm()]);
    let third = parse_metrics(&http_get(
        std::net::TcpStream::connect(&addr).unwrap(),
        "/metrics",
    ));
    assert!(
        sample(&third, "spanvmm_live_update_takeover_restore_seconds", &[]) > 0.0,
        "{third}"
    );
    vm.assert_verify_clean(1);
}

/// A native service stuck in a call holds the main loop; the API does not hang with it: other
/// requests are answered 503 naming the stuck call and are never executed later behind their
/// clients' backs; the guest's vCPUs run on; `ctl --timeout` gives up; SIGTERM ends the VMM
/// after its grace period, naming the service (issue #20 item 5).
#[test]
fn a_stuck_service_call_does_not_hang_the_api() {
    let mut vm = VmProcess::boot(
        "stuck",
        "workload=dirty,verify mib=8 rate=5000 report_ms=200",
        64,
        1,
    );
    vm.ctl_ok(&["plugin", "attach", &plugin("libmisbehave.so")]);
    let api = vm.api.clone();
    let stuck = std::thread::spawn(move || ctl(&api, &["plugin", "call", "misbehave", "loop"]));
    // Until the loop holds the main loop, status may still be served.
    let deadline = std::time::Instant::now() + T;
    let answer = loop {
        let (ok, out) = vm.ctl(&["status"]);
        if !ok {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the call never held the main loop"
        );
    };
    assert!(
        answer.contains("503") && answer.contains("misbehave") && answer.contains("loop"),
        "{answer}"
    );
    let (ok, out) = vm.ctl(&["pause"]);
    assert!(
        !ok && out.contains("503") && out.contains("not started"),
        "{out}"
    );
    assert!(!stuck.is_finished(), "the stuck call returned");
    // The abandoned pause never ran: the guest goes on printing.
    let from = vm.mark();
    vm.wait_line_from(from, "SPANGUEST stat", T);
    // `ctl` gives up by itself (--timeout) instead of hanging with the main loop.
    let t = Instant::now();
    let (ok, out) = vm.ctl(&["--timeout", "2", "status"]);
    assert!(!ok && t.elapsed() < Duration::from_secs(8), "{out}");
    // SIGTERM cannot be taken up by the held main loop: the VMM exits by itself after its
    // grace period, naming the service that held it.
    let t = Instant::now();
    let pid = vm.first_pid() as i32;
    // SAFETY: kill(2) on our own child's pid.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let code = vm.wait_exit(T);
    assert_eq!(code, Some(3), "{}", vm.stderr());
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "exited before its grace"
    );
    let err = vm.stderr();
    assert!(
        err.contains("held by service misbehave's call \"loop\""),
        "{err}"
    );
    // The socket it left is stale: a new VMM binds the same path.
    let kernel = guest_elf();
    let again = VmProcess::start_full(
        TempDir::new("stuck2"),
        &[],
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=idle mib=8",
            "--memory",
            "64",
        ],
        vm.api.clone(),
        vm.api.clone(),
    );
    again.wait_line("SPANGUEST ready", T);
    again.ctl_ok(&["shutdown"]);
    let (ok, out) = stuck.join().unwrap();
    assert!(!ok, "the stuck call answered: {out}");
}

/// A native service that makes a syscall no spanvmm thread may make (ptrace) gets EPERM, is
/// failed and detached with one log line naming the syscall, the service and the thread's role;
/// the guest runs on with its memory intact and the API still answers.
#[test]
fn a_forbidden_syscall_fails_only_the_service_that_made_it() {
    let mut vm = VmProcess::boot(
        "seccomp",
        "workload=dirty,verify mib=8 rate=5000 report_ms=200",
        64,
        1,
    );
    vm.ctl_ok(&["plugin", "attach", &plugin("libmisbehave.so")]);
    let (ok, out) = vm.ctl(&["plugin", "call", "misbehave", "ptrace"]);
    assert!(!ok, "a service making ptrace must be failed: {out}");
    let line = "seccomp: service 'misbehave' (main thread) made forbidden syscall ptrace (101)";
    assert!(out.contains(line), "{out}");
    wait_stderr(&vm, line, T);
    let list = vm.ctl_ok(&["plugin", "list"]);
    assert!(
        list.contains("\"failed\"") && list.contains("forbidden syscall ptrace"),
        "{list}"
    );
    // The VMM and the guest go on.
    vm.ctl_ok(&["status"]);
    let from = vm.mark();
    vm.wait_line_from(from, "SPANGUEST stat", T);
    vm.assert_verify_clean(1);
    vm.kill();
}

/// WASI is deny-by-default beneath a running guest: a wasip2 service that tries files, sockets
/// (to a real listener on loopback) and the environment gets errors and goes on, and so does
/// the guest; what it prints reaches the VMM's log under its name, bounded.
#[test]
fn a_wasip2_service_gets_errors_for_files_sockets_and_env_and_its_prints_reach_the_log() {
    let dir = TempDir::new("wasi");
    let log = dir.path().join("vmm.log");
    let kernel = guest_elf();
    let mut vm = VmProcess::start(
        "wasi",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            "workload=dirty,verify mib=8",
            "--log-format",
            "json",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    vm.ctl_ok(&["plugin", "attach", &plugin("misbehave.wasm")]);
    let r = call(&vm, "misbehave", "wasi-file", "/etc/hostname");
    assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    let r = call(&vm, "misbehave", "wasi-write-file", "");
    assert!(r["error"].as_str().is_some(), "{r}");
    // A listener the VMM process itself could reach: the service cannot.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let r = call(&vm, "misbehave", "wasi-socket", &to);
    assert!(r["connect"].as_str().is_some(), "{r}");
    assert!(
        listener.accept().is_err(),
        "a connection reached the listener"
    );
    let r = call(&vm, "misbehave", "wasi-env", "");
    assert_eq!(
        (r["vars"].as_u64(), r["args"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    call(&vm, "misbehave", "print", "hello from println");
    const FLOOD: usize = 1 << 20;
    call(&vm, "misbehave", "print-flood", &FLOOD.to_string());
    let list = json(&vm.ctl_ok(&["plugin", "list"]));
    assert_eq!(list[0]["name"], "misbehave", "{list}");
    assert_eq!(list[0]["state"], "attached", "{list}");
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    assert_eq!(vm.wait_exit(T), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|e: &Value| e["target"] == "spanvmm::service")
        .collect();
    let said = |msg: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == msg)
            .unwrap_or_else(|| panic!("{msg:?} not in the service log"))
    };
    let out = said("hello from println");
    assert_eq!(out["fields"]["service"], "misbehave", "{out}");
    assert_eq!(out["level"], "INFO", "{out}");
    let err = said("on stderr: hello from println");
    assert_eq!(err["level"], "WARN", "{err}");
    // The flood without a newline arrived in bounded pieces, all of it.
    let pieces: Vec<usize> = events
        .iter()
        .filter_map(|e| e["fields"]["message"].as_str())
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b == b'z'))
        .map(str::len)
        .collect();
    assert!(pieces.iter().all(|&n| n <= 4096), "a piece over 4096 bytes");
    assert_eq!(
        pieces.iter().sum::<usize>(),
        FLOOD,
        "{} pieces",
        pieces.len()
    );
}

/// The example service (plugins/examples/port-counter) in `lang` beneath a running guest: it
/// counts the guest's writes to the storm port, answers `stats`, keeps its count across a
/// replace by the Rust build and back (one state format for all languages), and detaches.
fn the_example_service_beneath_a_running_guest(lang: &str, language: &str) {
    let vm = VmProcess::boot(
        lang,
        "workload=exits,dirty,verify exits=500 mib=16 rate=5000 stall_us=50000",
        128,
        1,
    );
    let from = vm.mark();
    let file = plugin(&format!("port-counter-{lang}.wasm"));
    let info = json(&vm.ctl_ok(&["plugin", "attach", &file, "--config", STORM]));
    assert_eq!(info["kind"], "wasm", "{info}");
    let writes = |want: &str| {
        let s = call(&vm, "port-counter", "stats", "");
        assert_eq!(s["language"], want, "{s}");
        s["writes"].as_u64().unwrap()
    };
    let t = Instant::now();
    let mut before = writes(language);
    while before == 0 {
        assert!(t.elapsed() < T, "{lang}: no port writes counted");
        std::thread::sleep(Duration::from_millis(50));
        before = writes(language);
    }
    let rust = plugin("port-counter-rust.wasm");
    let other = if lang == "rust" {
        plugin("port-counter-python.wasm")
    } else {
        rust
    };
    let o = json(&vm.ctl_ok(&["plugin", "replace", "port-counter", &other]));
    assert_eq!(o["kind"], "wasm", "{o}");
    let s = call(&vm, "port-counter", "stats", "");
    let after = s["writes"].as_u64().unwrap();
    assert!(
        after >= before,
        "{lang}: count lost in the hand-over: {before} then {after}"
    );
    vm.ctl_ok(&["plugin", "replace", "port-counter", &file]);
    let again = writes(language);
    assert!(again >= after, "{lang}: {after} then {again}");
    vm.ctl_ok(&["plugin", "detach", "port-counter"]);
    assert_eq!(json(&vm.ctl_ok(&["plugin", "list"])), Value::Array(vec![]));
    assert_never_paused(&vm, from);
    vm.assert_verify_clean(1);
}

#[test]
fn the_example_service_in_rust_beneath_a_running_guest() {
    the_example_service_beneath_a_running_guest("rust", "rust");
}

#[test]
fn the_example_service_in_python_beneath_a_running_guest() {
    the_example_service_beneath_a_running_guest("python", "python");
}

#[test]
fn the_example_service_in_javascript_beneath_a_running_guest() {
    the_example_service_beneath_a_running_guest("js", "javascript");
}

/// The service's linear memory, bytes, from its stats (`plugin list`).
fn memory_bytes(vm: &VmProcess, name: &str) -> u64 {
    let list = json(&vm.ctl_ok(&["plugin", "list"]));
    let s = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("{name} is not attached: {list}"));
    assert_eq!(s["state"], "attached", "{s}");
    s["stats"]["memory_bytes"].as_u64().unwrap()
}

/// A JavaScript service takes 300 000 synchronous events and stays attached with bounded
/// memory. Its linear memory (the host's count of every memory's size and `memory.grow`)
/// rises while StarlingMonkey's GC heap grows to its collection thresholds, then stays flat:
/// no growth over the last 80 000 events, and below the 128 MiB limit (64 MiB detached it
/// after ~144 000 events: docs/benchmarks.md).
#[test]
fn a_javascript_service_takes_300000_events_in_bounded_memory() {
    let vm = VmProcess::boot(
        "jsmem",
        "workload=exits,dirty,verify exits=20000 mib=8 rate=1000 report_ms=0",
        128,
        1,
    );
    let from = vm.mark();
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("port-counter-js.wasm"),
        "--config",
        STORM,
    ]);
    let writes = || {
        call(&vm, "port-counter", "stats", "")["writes"]
            .as_u64()
            .unwrap()
    };
    let wait_for = |n: u64| {
        let t = Instant::now();
        loop {
            let w = writes();
            if w >= n {
                return w;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "only {w} of {n} events in 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut curve = Vec::new();
    for n in [30_000, 120_000, 220_000, 300_000] {
        let w = wait_for(n);
        curve.push((w, memory_bytes(&vm, "port-counter")));
    }
    eprintln!("JS linear memory (events, bytes): {curve:?}");
    let (_, at_220k) = curve[2];
    let (n, at_300k) = curve[3];
    assert!(curve[0].1 > 0, "no memory counted: {curve:?}");
    assert!(
        at_300k <= at_220k + (2 << 20),
        "the JS service's memory still grows after {n} events: {curve:?}"
    );
    assert!(at_300k < 100 << 20, "{curve:?}");
    vm.ctl_ok(&["plugin", "detach", "port-counter"]);
    assert_never_paused(&vm, from);
    vm.assert_verify_clean(1);
}

/// `--plugin PATH[:CONFIG]`: a path with ':' in it loads when it names a file (the
/// configuration follows the first ':' otherwise).
#[test]
fn a_plugin_path_with_a_colon_loads() {
    let dir = TempDir::new("plugin-colon");
    let odd = dir.path().join("with:colon.wasm");
    std::fs::copy(plugin("introspect.wasm"), &odd).unwrap();
    let kernel = guest_elf();
    let vm = VmProcess::start(
        "plugin-colon",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=dirty,verify mib=8",
            "--memory",
            "64",
            "--plugin",
            odd.to_str().unwrap(),
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    let list = json(&vm.ctl_ok(&["plugin", "list"]));
    assert_eq!(list[0]["name"], "introspect", "{list}");
    vm.assert_verify_clean(1);
}

/// Runs `spanvmm plugin ARGS`; returns (success, stdout, stderr).
fn plugin_tool(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(spanvmm())
        .arg("plugin")
        .args(args)
        .output()
        .expect("run spanvmm plugin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `spanvmm plugin inspect` says what a service file holds, and why a bad one cannot load.
#[test]
fn plugin_inspect_shows_the_manifest_and_explains_bad_files() {
    let (ok, out, err) = plugin_tool(&["inspect", &plugin("introspect.wasm")]);
    assert!(ok, "{out}{err}");
    let i = json(&out);
    assert_eq!(i["loadable"], true, "{i}");
    assert_eq!(i["kind"], "wasm");
    assert_eq!(i["manifest"]["name"], "introspect");
    assert_eq!(i["manifest"]["abi_version"], i["host_abi_version"]);
    let caps = i["manifest"]["capabilities"].to_string();
    assert!(
        caps.contains("memory-read") && caps.contains("dirty-log"),
        "{caps}"
    );
    let imports = i["imports"].to_string();
    assert!(imports.contains("spanvmm:service/host@0.1.0"), "{imports}");
    let (ok, out, err) = plugin_tool(&["inspect", &plugin("libexit-stats.so")]);
    assert!(ok, "{out}{err}");
    assert_eq!(json(&out)["manifest"]["name"], "exit-stats");
    // Bad files: each refused with its reason, the JSON still saying what was found.
    let dir = TempDir::new("inspect");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let text = dir.path().join("text.wasm");
    std::fs::write(&text, b"not wasm at all").unwrap();
    let other = dir.path().join("service.txt");
    std::fs::write(&other, b"x").unwrap();
    let missing = dir.path().join("missing.wasm");
    for (file, why) in [
        (plugin("abi-mismatch.wasm"), "ABI version 999"),
        (plugin("missing-export.wasm"), "export"),
        (core.display().to_string(), "core WebAssembly module"),
        (
            text.display().to_string(),
            "not a valid WebAssembly component",
        ),
        (other.display().to_string(), ".wasm"),
        (missing.display().to_string(), "missing.wasm"),
    ] {
        let (ok, out, err) = plugin_tool(&["inspect", &file]);
        assert!(!ok, "{file}: {out}");
        assert!(
            err.contains("cannot be loaded") && err.contains(why),
            "{file}: {err}"
        );
        let i = json(&out);
        assert_eq!(i["loadable"], false, "{i}");
        assert!(i["reason"].as_str().unwrap().contains(why), "{i}");
    }
    // The ABI mismatch was found after `describe`: its manifest is shown.
    let (_, out, _) = plugin_tool(&["inspect", &plugin("abi-mismatch.wasm")]);
    assert_eq!(json(&out)["manifest"]["abi_version"], 999);
}

/// Builds a `plugin new` project with its one command.
fn build_project(dir: &Path, cmd: &mut std::process::Command) {
    // What the calling cargo exported must not leak into the nested build (the caller sets
    // the target directory).
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(v);
    }
    let out = cmd.current_dir(dir).output().expect("run the build");
    assert!(
        out.status.success(),
        "building {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `spanvmm plugin new NAME` writes a project that builds with one command into a component
/// that loads (Rust always; Python and JavaScript where their toolchains are installed, which
/// CI's set-up does), and refuses bad names and existing directories.
#[test]
fn plugin_new_makes_a_project_that_builds_and_loads() {
    let dir = TempDir::new("plugin-new");
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = plugin_tool(&["new", "9lives", "--dir", d]);
    assert!(!ok && err.contains("not a service name"), "{err}");
    let (ok, out, err) = plugin_tool(&["new", "my-svc", "--dir", d]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = plugin_tool(&["new", "my-svc", "--dir", d]);
    assert!(!ok && err.contains("exists already"), "{err}");
    // Rust: `cargo build --release` (the target is in .cargo/config.toml). A target directory
    // kept across runs: the SDK's dependencies compile once.
    let target = std::env::temp_dir().join("spanvmm-plugin-new-target");
    let project = dir.path().join("my-svc");
    build_project(
        &project,
        std::process::Command::new("cargo")
            .args(["build", "--release", "--quiet"])
            .env("CARGO_TARGET_DIR", &target),
    );
    let wasm = target.join("wasm32-wasip2/release/my_svc.wasm");
    let (ok, out, err) = plugin_tool(&["inspect", wasm.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert_eq!(json(&out)["manifest"]["name"], "my-svc");
    // Python and JavaScript: `./build.sh`, with the toolchains plugins/build.sh installed.
    let tools = std::env::var_os("SPANVMM_TOOLCHAINS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/spanvmm-toolchains")
        });
    for (lang, var, tool) in [
        (
            "python",
            "COMPONENTIZE_PY",
            "componentize-py-0.25.1/bin/componentize-py",
        ),
        (
            "js",
            "COMPONENTIZE_JS",
            "componentize-js-0.23.0/node_modules/.bin/componentize-js",
        ),
    ] {
        let tool = tools.join(tool);
        let test = format!("plugin new --lang {lang}");
        if !netlab::can_run(
            &test,
            tool.exists()
                .then_some(())
                .ok_or(format!("no {}: run plugins/build.sh", tool.display())),
        ) {
            continue;
        }
        let name = format!("{lang}-svc");
        let (ok, out, err) = plugin_tool(&["new", &name, "--lang", lang, "--dir", d]);
        assert!(ok, "{out}{err}");
        let project = dir.path().join(&name);
        build_project(
            &project,
            std::process::Command::new(project.join("build.sh")).env(var, &tool),
        );
        let built = project.join(format!("{name}.wasm"));
        let (ok, out, err) = plugin_tool(&["inspect", built.to_str().unwrap()]);
        assert!(ok, "{lang}: {out}{err}");
        assert_eq!(json(&out)["manifest"]["name"], name.as_str());
    }
}

/// Notifications are served off the main loop: `ctl plugin notifications --follow` streams
/// them as services publish, and still answers while a stuck native service holds the main
/// loop, where `ctl` gives up at its `--timeout` instead of hanging.
#[test]
fn notifications_follow_streams_and_ctl_times_out() {
    use std::io::BufRead;
    let mut vm = VmProcess::boot("notes", "workload=dirty,verify mib=8", 64, 1);
    vm.ctl_ok(&["plugin", "attach", &plugin("libmisbehave.so")]);
    let mut follower = std::process::Command::new(spanvmm())
        .args([
            "ctl",
            "--api-socket",
            vm.api.to_str().unwrap(),
            "plugin",
            "notifications",
            "--follow",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the follower");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The follower is connected once it holds one of the follower slots; publishing before
    // that would only queue (it would still be streamed, first thing).
    vm.ctl_ok(&["plugin", "call", "misbehave", "notify", "3"]);
    for i in 0..3 {
        let line = rx.recv_timeout(T).expect("a streamed notification");
        let n = json(&line);
        assert_eq!(
            (n["service"].as_str(), n["kind"].as_str()),
            (Some("misbehave"), Some("noise")),
            "{n}"
        );
        assert_eq!(n["detail"]["i"], i, "the detail is a JSON object: {n}");
    }
    // The follower took them: a plain read finds nothing.
    let plain = json(&vm.ctl_ok(&["plugin", "notifications"]));
    assert_eq!(plain["notifications"], serde_json::json!([]), "{plain}");
    // A native service stuck in a call holds the main loop.
    let api = vm.api.clone();
    std::thread::spawn(move || {
        ctl(
            &api,
            &["--timeout", "600", "plugin", "call", "misbehave", "loop"],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let (ok, out) = vm.ctl(&["--timeout", "1", "status"]);
    assert!(
        !ok && out.contains("no answer from the VMM within 1 s"),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Notifications still answer (and still stream): the stuck service's own, sent before it
    // looped, are not needed for that.
    let (ok, out) = vm.ctl(&["--timeout", "5", "plugin", "notifications"]);
    assert!(ok, "{out}");
    assert!(follower.try_wait().unwrap().is_none(), "the follower ended");
    let _ = follower.kill();
    let _ = follower.wait();
    vm.kill();
}
