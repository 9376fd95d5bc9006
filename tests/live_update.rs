//! End-to-end tests of HyperFresh live update: the VMM process is replaced beneath a running
//! spanguest, which keeps its memory (verify bad=0), its console, its API socket and its
//! services; the guest-observed stall is reported.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
const STORM: &str = r#"{"base":2768,"len":1}"#;

fn writes(vm: &VmProcess) -> u64 {
    let out = vm.ctl_ok(&["plugin", "call", "exit-stats", "stats"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["result"]["writes"].as_u64().unwrap()
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "old VMM process {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The report's trace: both processes' steps on one clock, in order, the prepare before the
/// pause, the restore after it, and the new process's restore inside the old one's wait.
fn check_trace(report: &Value) {
    let trace = report["trace"].as_array().expect("a trace in the report");
    let at = |step: &str| {
        trace
            .iter()
            .find(|m| m["step"] == step)
            .and_then(|m| m["at_us"].as_i64())
            .unwrap_or_else(|| panic!("no step {step:?} in {report}"))
    };
    let times: Vec<i64> = trace.iter().map(|m| m["at_us"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert!(at("old: api call") < at("new: offer received"), "{report}");
    assert!(
        at("new: vm and vcpus created") <= at("old: ready received"),
        "{report}"
    );
    assert!(
        at("old: ready received") <= 0,
        "prepared before the pause: {report}"
    );
    assert!(
        at("old: services detached") <= at("new: state received"),
        "{report}"
    );
    for step in [
        "new: registers restored",
        "new: devices built",
        "new: vcpus given to their threads",
        "new: services attached",
    ] {
        let t = at(step);
        assert!(
            t > 0 && t <= at("old: restored received"),
            "{step}: {report}"
        );
    }
    assert!(
        at("old: go sent") <= at("old: running received"),
        "{report}"
    );
    assert_eq!(
        trace.last().unwrap()["step"],
        "old: running received",
        "{report}"
    );
}

#[test]
fn live_update_twice_keeps_memory_console_api_and_services() {
    let mut vm = VmProcess::boot(
        "lu",
        "workload=dirty,exits,verify mib=32 rate=20000 exits=500 stall_us=1000 report_ms=200",
        256,
        2,
    );
    // One native service (loaded again with dlopen in the new process), one Wasm service.
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("libexit-stats.so"),
        "--config",
        STORM,
    ]);
    vm.ctl_ok(&["plugin", "attach", &plugin("introspect.wasm")]);
    // A secret region registered through the API must stay registered in the new process, or
    // its next snapshot would hold the secret.
    let secret = ["--gpa", "0x8000000", "--len", "4096"];
    vm.ctl_ok(&[&["snapshot", "secret", "add"][..], &secret[..]].concat());
    std::thread::sleep(Duration::from_millis(300));
    let bin = spanvmm();
    let mut old_pid = vm.first_pid();
    for round in 0..2 {
        let before = writes(&vm);
        let from = vm.mark();
        let out = vm.ctl_ok(&["live-update", "--binary", bin]);
        let report: Value = serde_json::from_str(&out).unwrap();
        let new_pid = report["new_pid"].as_u64().unwrap() as u32;
        assert_eq!(report["services"], 2, "{report}");
        check_trace(&report);
        // The old process exits once the new one runs the guest; exactly one serves it.
        if round == 0 {
            assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.stderr());
        }
        wait_gone(old_pid);
        assert_eq!(vm.serving_pid(), Some(new_pid));
        assert!(pid_alive(new_pid));
        // The console continues on the same output, the guest runs on.
        let stat = vm.wait_line_from(vm.mark(), "SPANGUEST stat", T);
        assert!(num(&stat, "dirtied") > 0, "{stat}");
        let stall = vm.max_stall_since(from);
        eprintln!(
            "live update {round}: pause {} ms (VMM side), guest-observed stall {stall} µs",
            report["pause_ms"]
        );
        // The stall's size is the benchmark's business (a busy host adds its scheduling to
        // it); here: one pause (the old process's), not a guest left stopped.
        assert!(stall < 1_000_000, "guest stalled {stall} µs");
        // Services came along with their state.
        let list = vm.ctl_ok(&["plugin", "list"]);
        assert!(
            list.contains("exit-stats") && list.contains("introspect"),
            "{list}"
        );
        assert!(writes(&vm) >= before, "exit-stats lost its counts");
        let secrets: Value =
            serde_json::from_str(&vm.ctl_ok(&["snapshot", "secret", "list"])).unwrap();
        assert_eq!(
            secrets["secrets"],
            serde_json::json!([[0x8000000u64, 4096]]),
            "API secret lost"
        );
        vm.assert_verify_clean(2);
        old_pid = new_pid;
    }
}

#[test]
fn broken_binaries_roll_back_and_the_guest_never_notices() {
    let vm = VmProcess::boot(
        "lurb",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        128,
        1,
    );
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("exit-stats.wasm"),
        "--config",
        STORM,
    ]);
    let dir = TempDir::new("lubad");
    let hang = dir.path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nsleep 30\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pid = vm.first_pid();
    for (binary, extra) in [
        ("/bin/false", vec![]),
        ("/nonexistent/spanvmm", vec![]),
        (hang.to_str().unwrap(), vec!["--timeout-ms", "500"]),
    ] {
        let t = Instant::now();
        let mut args = vec!["live-update", "--binary", binary];
        args.extend(extra);
        let (ok, out) = vm.ctl(&args);
        assert!(!ok, "{binary} must be refused: {out}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{binary}: {:?}",
            t.elapsed()
        );
        assert_eq!(
            vm.serving_pid(),
            Some(pid),
            "{binary}: the old process must keep the VM"
        );
        assert!(vm.ctl_ok(&["status"]).contains("\"running\""));
    }
    assert!(vm.ctl_ok(&["plugin", "list"]).contains("exit-stats"));
    let status: Value = serde_json::from_str(&vm.ctl_ok(&["status"])).unwrap();
    assert_eq!(
        status["pauses"], 0,
        "an update failing before the pause never pauses the guest"
    );
    vm.assert_verify_clean(1);
}

/// A wrapper script that runs the protocol-speaking fake VMM in `mode`.
fn fake_vmm(dir: &TempDir, mode: &str) -> String {
    let peer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/fake_vmm.py");
    let path = dir.path().join(format!("fake-{mode}"));
    let child_pid_file = dir.path().join("fake-child.pid");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nFAKE_CHILD_PID_FILE={} exec python3 {} {mode} \"$@\"\n",
            child_pid_file.display(),
            peer.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn incompatible_or_dying_new_binaries_roll_back_with_memory_intact() {
    let vm = VmProcess::boot(
        "lufake",
        "workload=dirty,verify mib=32 rate=20000 stall_us=1000",
        128,
        1,
    );
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("libexit-stats.so"),
        "--config",
        STORM,
    ]);
    let dir = TempDir::new("lufake");
    let pid = vm.first_pid();

    // Another state version: refused before any pause.
    let pauses = |vm: &VmProcess| -> u64 {
        let s: Value = serde_json::from_str(&vm.ctl_ok(&["status"])).unwrap();
        s["pauses"].as_u64().unwrap()
    };
    let before = pauses(&vm);
    let (ok, out) = vm.ctl(&["live-update", "--binary", &fake_vmm(&dir, "version")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("version 999") && out.contains("never paused"),
        "{out}"
    );
    assert_eq!(pauses(&vm), before, "the guest must not have been paused");

    // A new process that dies after the guest was paused and its state sent: rollback.
    let from = vm.mark();
    let (ok, out) = vm.ctl(&[
        "live-update",
        "--binary",
        &fake_vmm(&dir, "die-after-takeover"),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    let stat = vm.wait_line_from(vm.mark(), "SPANGUEST stat", T);
    assert!(num(&stat, "dirtied") > 0);
    eprintln!(
        "rollback after a paused hand-over: guest stall {} µs",
        vm.max_stall_since(from)
    );
    assert_eq!(vm.serving_pid(), Some(pid));
    assert_eq!(
        pauses(&vm),
        before + 1,
        "one pause, then the rollback resumed the guest"
    );
    assert!(
        vm.ctl_ok(&["plugin", "list"]).contains("exit-stats"),
        "services re-attached"
    );
    vm.assert_verify_clean(1);
}

/// Children of `pid` that ended and were never waited for.
fn zombie_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<u32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{k}/stat")).unwrap_or_default();
            if stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
            {
                out.push(k);
            }
        }
    }
    out
}

/// Past the commit point the old process cannot know whether the new one ran the guest on the
/// shared memory: it must never run the guest on its own again (two processes running one
/// guest is the worst thing a VMM can do), and it says how to resolve.
#[test]
fn a_new_process_that_dies_after_the_go_ahead_leaves_the_vm_in_doubt_not_running_twice() {
    let vm = VmProcess::boot(
        "ludoubt",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        128,
        1,
    );
    let dir = TempDir::new("ludoubt");
    let (ok, out) = vm.ctl(&["live-update", "--binary", &fake_vmm(&dir, "die-after-go")]);
    assert!(!ok, "{out}");
    assert!(out.contains("in doubt") && out.contains("--force"), "{out}");
    // The new process died: the report says so (its socket closes a moment before it can be
    // waited for; it used to be reported "still alive"), and it was reaped, not left a zombie
    // under the old process (found by `spanvmm-bench chaos`).
    assert!(out.contains("it is gone"), "{out}");
    let zombies = zombie_children(vm.first_pid());
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");
    let st = status(&vm);
    assert_eq!(st["state"], "paused", "{st}");
    assert!(st["in_doubt"].as_str().is_some(), "{st}");
    // Neither the operator's resume nor any other run of the guest: refused, saying why.
    let (ok, out) = vm.ctl(&["resume"]);
    assert!(!ok, "{out}");
    assert!(out.contains("in doubt") && out.contains("409"), "{out}");
    assert_eq!(status(&vm)["state"], "paused");
    // The operator knows the new process never ran it (it died right after the go-ahead).
    vm.ctl_ok(&["resume", "--force"]);
    let st = status(&vm);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st.get("in_doubt").is_none(), "{st}");
    vm.assert_verify_clean(1);
}

/// The new process prepares while the guest runs: the API answers meanwhile, the operations
/// that own the VM are refused naming the live update, and a rollback ends whatever the new
/// process started.
#[test]
fn a_preparing_live_update_keeps_the_api_and_its_rollback_ends_the_new_processs_children() {
    let vm = VmProcess::boot(
        "luhang",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        128,
        1,
    );
    let dir = TempDir::new("luhang");
    let fake = fake_vmm(&dir, "hang-with-child");
    let api = vm.api.clone();
    let update = std::thread::spawn(move || {
        ctl(
            &api,
            &["live-update", "--binary", &fake, "--timeout-ms", "4000"],
        )
    });
    let pid_file = dir.path().join("fake-child.pid");
    let deadline = Instant::now() + T;
    while !pid_file.exists() || std::fs::read_to_string(&pid_file).unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the fake new binary did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !update.is_finished(),
        "the live update should still be pending"
    );
    // The API is served while the new process prepares.
    assert_eq!(status(&vm)["state"], "running");
    let snap = TempDir::new("luhang-snap");
    for (args, what) in [
        (
            vec!["save", "--dir", snap.path().to_str().unwrap()],
            "no save now",
        ),
        (
            vec!["live-update", "--binary", spanvmm()],
            "no live update now",
        ),
    ] {
        let (ok, out) = vm.ctl(&args);
        assert!(!ok, "{args:?} must be refused during a live update: {out}");
        assert!(
            out.contains(what) && out.contains("live update") && out.contains("409"),
            "{out}"
        );
    }
    assert!(
        !update.is_finished(),
        "the live update should still be pending"
    );
    let (ok, out) = update.join().unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("never paused"), "{out}");
    // The rollback killed the new process's whole group, its child too.
    let deadline = Instant::now() + T;
    while pid_alive(grandchild) {
        assert!(
            Instant::now() < deadline,
            "the new binary's child {grandchild} outlived the rollback"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&vm)["pauses"], 0, "the guest was never paused");
    vm.assert_verify_clean(1);
}

/// A VM the operator paused stays paused in the new process (and is resumed only by the
/// operator).
#[test]
fn an_operator_pause_survives_a_live_update() {
    let mut vm = VmProcess::boot(
        "lupause",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        128,
        1,
    );
    vm.ctl_ok(&["pause"]);
    let out = vm.ctl_ok(&["live-update", "--binary", spanvmm()]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.stderr());
    assert_eq!(
        vm.serving_pid(),
        Some(report["new_pid"].as_u64().unwrap() as u32)
    );
    let st = status(&vm);
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["operator_paused"], true, "{st}");
    vm.ctl_ok(&["resume"]);
    assert_eq!(status(&vm)["state"], "running");
    vm.assert_verify_clean(1);
}

/// The new binary will own the guest: one that others could have written is refused before
/// it runs, and the guest is never paused.
#[test]
fn an_untrusted_live_update_binary_is_refused_before_it_runs() {
    use std::os::unix::fs::PermissionsExt;
    let vm = VmProcess::boot(
        "luuntrusted",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        128,
        1,
    );
    let dir = TempDir::new("luuntrusted");
    let marker = dir.path().join("ran");
    let bin = dir.path().join("new-spanvmm");
    std::fs::write(
        &bin,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .unwrap();
    let other_owner = |p: &std::path::Path| {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let world_writable = |p: &std::path::Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    };
    for (spoil, what) in [
        (&world_writable as &dyn Fn(&std::path::Path), "writable"),
        (&other_owner, "owned by"),
    ] {
        spoil(&bin);
        let (ok, out) = vm.ctl(&["live-update", "--binary", bin.to_str().unwrap()]);
        assert!(!ok, "{out}");
        assert!(
            out.contains("live-update binary") && out.contains(what),
            "{out}"
        );
        assert!(!marker.exists(), "the untrusted binary ran");
    }
    assert_eq!(status(&vm)["pauses"], 0, "the guest was never paused");
    vm.assert_verify_clean(1);
}

/// The CPU model comes along with a live update: a guest booted with `--cpu-template
/// x86-64-v2` keeps it in the new process, whose host is compared as lacking `x2apic` (not in
/// the baseline: accepted). A new process whose host lacks a feature the guest was given
/// (`sse2`, through SPANVMM_TEST_HOST_LACKS) refuses the take-over naming it, and the old
/// process rolls back with the guest running and its memory intact.
#[test]
fn the_cpu_model_survives_a_live_update_and_a_host_lacking_it_is_rolled_back() {
    let kernel = common::guest_elf();
    let vm = VmProcess::start_wrapped(
        "lucpu",
        &["env", "SPANVMM_TEST_HOST_LACKS=x2apic"],
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=dirty,verify mib=16 rate=10000 report_ms=100",
            "--memory",
            "128",
            "--cpu-template",
            "x86-64-v2",
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    let before = status(&vm)["cpu"].clone();
    assert_eq!(before["template"], "x86-64-v2", "{before}");
    let out = vm.ctl_ok(&["live-update", "--binary", spanvmm()]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    assert_eq!(vm.serving_pid(), Some(new_pid));
    assert_eq!(status(&vm)["cpu"], before, "the new process's CPU model");

    // A new binary on a host lacking sse2 (a wrapper setting the hook): refused, rolled back.
    let dir = TempDir::new("lucpu");
    let wrapper = dir.path().join("spanvmm-no-sse2");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nSPANVMM_TEST_HOST_LACKS=sse2 exec {} \"$@\"\n",
            spanvmm()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // A generous step deadline: on a busy host the new process's start must not be what
    // refuses it.
    let (ok, out) = vm.ctl(&[
        "live-update",
        "--binary",
        wrapper.to_str().unwrap(),
        "--timeout-ms",
        "60000",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("missing CPU features: sse2") && out.contains("rolled back"),
        "{out}"
    );
    eprintln!("refused live update: {out}");
    assert_eq!(vm.serving_pid(), Some(new_pid), "the VM stays where it was");
    let stat = vm.wait_line_from(vm.mark(), "SPANGUEST stat", T);
    assert!(num(&stat, "dirtied") > 0, "{stat}");
    assert_eq!(status(&vm)["cpu"], before);
    vm.assert_verify_clean(1);
}
