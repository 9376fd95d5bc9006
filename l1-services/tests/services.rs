//! The service runtime end to end: real wasmtime, real dlopen, real memfd guest RAM.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use l1_services::{
    Capability, Lifecycle, ManagerConfig, ServiceError, ServiceKind, ServiceManager, ServiceState,
};

const STATS: &str = r#"{"base": "0x700", "len": 4}"#;

fn writes(m: &ServiceManager, port: u16, n: u32) {
    for i in 0..n {
        assert!(m.on_port_write(port, &i.to_le_bytes()[..1]));
    }
}

fn read(m: &ServiceManager, port: u16) -> Option<u32> {
    let mut d = [0u8; 4];
    m.on_port_read(port, &mut d).then(|| u32::from_le_bytes(d))
}

#[test]
fn no_service_no_claim() {
    let (_ram, m) = manager();
    assert!(!m.on_port_write(0x700, &[1]));
    let mut d = [0u8; 2];
    assert!(!m.on_port_read(0x700, &mut d));
    assert!(m.list().is_empty());
    assert!(m.next_tick_in(Instant::now()).is_none());
    m.tick(Instant::now());
    m.lifecycle(Lifecycle::Paused);
    assert!(matches!(m.detach("nobody"), Err(ServiceError::NotFound(_))));
}

#[test]
fn exit_stats_counts_events_in_both_runtimes() {
    for (path, kind) in [
        (wasm("exit-stats"), ServiceKind::Wasm),
        (native("exit-stats"), ServiceKind::Native),
    ] {
        let (_ram, m) = manager();
        let info = m.attach(&path, STATS).unwrap();
        assert_eq!(info.name, "exit-stats");
        assert_eq!(info.kind, kind);
        assert_eq!(info.ports, vec![l1_services::PortRange::new(0x700, 4)]);
        writes(&m, 0x701, 5);
        writes(&m, 0x703, 2);
        assert!(!m.on_port_write(0x704, &[1]), "outside the claimed range");
        assert!(!m.on_port_write(0x6ff, &[1]));
        assert_eq!(
            read(&m, 0x701),
            Some(5),
            "a read returns the port's write count"
        );
        assert_eq!(read(&m, 0x702), Some(0));
        let s = json(&m.call("exit-stats", "stats", "").unwrap());
        assert_eq!(s["writes"], 7);
        assert_eq!(s["reads"], 2);
        assert_eq!(s["last_write"], 1);
        assert_eq!(s["ports"]["0x701"]["writes"], 5);
        let err = m.call("exit-stats", "nope", "").unwrap_err();
        assert!(matches!(err, ServiceError::Call { .. }), "{err}");
        let l = m.list();
        assert_eq!(l[0].stats.events, 9);
        assert_eq!(l[0].stats.calls, 2);
        let state = m.detach("exit-stats").unwrap();
        assert_eq!(json(std::str::from_utf8(&state).unwrap())["writes"], 7);
        assert!(m.list().is_empty());
        assert!(
            !m.on_port_write(0x701, &[1]),
            "ports are released on detach"
        );
    }
}

#[test]
fn replace_hands_state_over_between_runtimes() {
    let (_ram, m) = manager();
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    writes(&m, 0x700, 3);
    // wasm -> native: the native one resumes from the wasm one's state.
    let info = m.replace("exit-stats", &native("exit-stats")).unwrap();
    assert_eq!(info.kind, ServiceKind::Native);
    assert_eq!(
        info.ports,
        vec![l1_services::PortRange::new(0x700, 4)],
        "config reused"
    );
    writes(&m, 0x700, 2);
    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        5
    );
    // native -> the same native object (unloaded, then loaded again).
    let so = m.list()[0].path.clone();
    m.replace("exit-stats", &so).unwrap();
    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        5
    );
    // native -> wasm again.
    let info = m.replace("exit-stats", &wasm("exit-stats")).unwrap();
    assert_eq!(info.kind, ServiceKind::Wasm);
    writes(&m, 0x700, 1);
    assert_eq!(read(&m, 0x700), Some(6));
    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        6
    );
    // A replacement refused at load leaves the old service attached, never detached.
    let err = m.replace("exit-stats", &wasm("abi-mismatch")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ABI version 999") && msg.contains("stays attached, untouched"),
        "{msg}"
    );

    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        6
    );
    assert_eq!(m.list().len(), 1);
    // One failing after the hand-over began rolls back to the old service with its state:
    // exit-stats refuses the template's state (or its config), which is not its own.
    m.detach("exit-stats").unwrap();
    m.attach(&wasm("template"), "").unwrap();
    let err = m
        .replace_with(
            "hello",
            &wasm("exit-stats"),
            l1_services::ReplaceOptions { rename: true },
        )
        .map(|_| ())
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attached again"), "{msg}");
    let names: Vec<_> = m.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["hello"]);
}

#[test]
fn replace_keeps_the_event_order_position() {
    let (_ram, m) = manager();
    m.attach(&wasm("introspect"), "").unwrap();
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    m.attach(&wasm("template"), "").unwrap();
    m.replace("exit-stats", &native("exit-stats")).unwrap();
    let names: Vec<_> = m.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["introspect", "exit-stats", "hello"]);
}

/// 63 GiB: above any guest RAM, where spanguest's `mmio` workload writes.
const MMIO_BASE: u64 = 63 << 30;

#[test]
fn mmio_claims_route_guest_accesses_in_both_runtimes() {
    for path in [wasm("exit-stats"), native("exit-stats")] {
        let (_ram, m) = manager();
        assert!(
            !m.on_mmio_write(MMIO_BASE, &[1, 0, 0, 0]),
            "nobody claims MMIO yet"
        );
        let cfg = format!(r#"{{"mmio_base": "{MMIO_BASE:#x}", "mmio_len": 4096}}"#);
        let info = m.attach(&path, &cfg).unwrap();
        assert_eq!(
            info.mmio,
            vec![l1_services::MmioRange::new(MMIO_BASE, 4096)]
        );
        for i in 0..3u64 {
            assert!(m.on_mmio_write(MMIO_BASE + 8 * i, &i.to_le_bytes()));
        }
        assert!(!m.on_mmio_write(MMIO_BASE + 4096, &[1]), "past the range");
        assert!(
            !m.on_port_write(0x700, &[1]),
            "claiming MMIO claims no port"
        );
        let mut d = [0u8; 8];
        assert!(m.on_mmio_read(MMIO_BASE + 0x10, &mut d));
        assert_eq!(
            u64::from_le_bytes(d),
            3,
            "a read returns the MMIO write count"
        );
        let s = json(&m.call("exit-stats", "stats", "").unwrap());
        assert_eq!(s["mmio_writes"], 3, "{s}");
        assert_eq!(s["mmio_reads"], 1, "{s}");
        assert_eq!(s["mmio_last_addr"], MMIO_BASE + 16, "{s}");
        m.detach("exit-stats").unwrap();
        assert!(
            !m.on_mmio_write(MMIO_BASE, &[1]),
            "the claim ends with detach"
        );
    }
}

#[test]
fn mmio_claims_inside_ram_or_overlapping_are_refused() {
    let (_ram, m) = manager();
    // Guest RAM never exits: a claim there could never fire.
    let err = m
        .attach(&wasm("exit-stats"), r#"{"mmio_base": 4096}"#)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("inside guest RAM"), "{msg}");
    assert!(m.list().is_empty());
    // A static claim (greedy's manifest) against a dynamic one, both ways round.
    m.attach(&wasm("greedy"), "").unwrap();
    let cfg = format!(
        r#"{{"mmio_base": "{:#x}", "mmio_len": 16}}"#,
        MMIO_BASE + 0x800
    );
    let err = m.attach(&native("exit-stats"), &cfg).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::AttachRefused { .. }), "{msg}");
    assert!(
        msg.contains("exit-stats") && msg.contains("greedy-wasm"),
        "{msg}"
    );
    m.detach("greedy-wasm").unwrap();
    m.attach(&native("exit-stats"), &cfg).unwrap();
    let err = m.attach(&wasm("greedy"), "").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::MmioConflict { .. }), "{msg}");
    assert!(
        msg.contains("greedy-wasm") && msg.contains("exit-stats"),
        "{msg}"
    );
    assert_eq!(m.list().len(), 1, "the refused service must not linger");
}

#[test]
fn a_virtio_devices_window_cannot_be_claimed() {
    let (_ram, m) = manager();
    m.reserve_mmio(0xfeb0_0000, 0x200, "spanvmm (virtio device)")
        .unwrap();
    let cfg = r#"{"mmio_base": "0xfeb00100", "mmio_len": 16}"#;
    let err = m.attach(&native("exit-stats"), cfg).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("virtio device"), "{msg}");
    assert!(m.list().is_empty());
    // Next to it is free.
    let cfg = r#"{"mmio_base": "0xfeb00200", "mmio_len": 16}"#;
    m.attach(&native("exit-stats"), cfg).unwrap();
    assert!(m
        .reserve_mmio(0xfeb0_0200, 0x200, "spanvmm (virtio device)")
        .is_err());
}

#[test]
fn conflicting_claims_are_refused_naming_both() {
    let (_ram, m) = manager();
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    // A dynamic claim (during attach) overlapping exit-stats' range.
    let err = m
        .attach(&native("template"), r#"{"port": 1794}"#)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::AttachRefused { .. }), "{msg}");
    assert!(msg.contains("hello") && msg.contains("exit-stats"), "{msg}");
    // The refused service left nothing behind.
    assert_eq!(m.list().len(), 1);
    m.attach(&native("template"), r#"{"port": 1800}"#).unwrap();

    // Static (manifest) ports and an exclusive capability.
    m.attach(&wasm("greedy"), "").unwrap();
    let err = m.attach(&native("greedy"), "").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ServiceError::CapabilityConflict {
                capability: Capability::DrivesMigration,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("greedy-native") && msg.contains("greedy-wasm"),
        "{msg}"
    );
    m.detach("greedy-wasm").unwrap();
    m.attach(&native("greedy"), "").unwrap();

    // The VMM's own devices own ports too.
    let (_ram2, m2) = manager();
    m2.reserve_ports(0x6e0, 2, "vmm:debug-port").unwrap();
    let err = m2.attach(&wasm("greedy"), "").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::PortConflict { .. }), "{msg}");
    assert!(
        msg.contains("greedy-wasm") && msg.contains("vmm:debug-port"),
        "{msg}"
    );
    assert!(m2.reserve_ports(0x6e1, 1, "vmm:other").is_err());

    // The same name twice.
    let err = m
        .attach(&native("exit-stats"), r#"{"base": 2048}"#)
        .unwrap_err();
    assert!(matches!(err, ServiceError::Duplicate(_)), "{err}");
}

#[test]
fn loop_in_attach_is_stopped_by_the_deadline() {
    let (_ram, m) = manager();
    let t = Instant::now();
    let err = m
        .attach(&wasm("misbehave"), r#"{"mode": "loop-attach"}"#)
        .unwrap_err();
    let took = t.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::Failed { .. }), "{msg}");
    assert!(
        msg.contains("misbehave") && msg.contains("deadline"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The manager still works.
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    writes(&m, 0x700, 1);
}

#[test]
fn loop_in_an_event_detaches_the_service_and_the_vm_goes_on() {
    let cfg = ManagerConfig {
        event_deadline: Duration::from_millis(20),
        ..Default::default()
    };
    let (_ram, m) = manager_with(cfg);
    m.attach(&wasm("misbehave"), r#"{"mode": "loop-event"}"#)
        .unwrap();
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    let t = Instant::now();
    assert!(
        m.on_port_write(0x6f0, &[1]),
        "the port was claimed when the write came"
    );
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "stopped after {took:?}");
    let l = m.list();
    let bad = l.iter().find(|i| i.name == "misbehave").unwrap();
    match &bad.state {
        ServiceState::Failed { reason } => assert!(reason.contains("deadline"), "{reason}"),
        s => panic!("misbehave is {s:?}"),
    }
    assert!(bad.ports.iter().any(|p| p.base == 0x6f0));
    assert!(!m.on_port_write(0x6f0, &[1]), "its port is free again");
    writes(&m, 0x700, 2);
    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        2
    );
    let err = m.detach("misbehave").unwrap_err();
    assert!(matches!(err, ServiceError::Failed { .. }), "{err}");
    assert_eq!(m.list().len(), 1, "the failure record is gone after detach");
    m.attach(&wasm("misbehave"), "").unwrap();
}

#[test]
fn hostile_calls_in_wasm() {
    let (_ram, m) = manager();
    m.attach(&wasm("misbehave"), "").unwrap();
    // Reads outside guest RAM and oversized reads are errors handed to the plugin.
    let r = m.call("misbehave", "oob", "").unwrap();
    assert!(r.contains("outside"), "{r}");
    let r = m.call("misbehave", "big-read", "").unwrap();
    assert!(r.contains("limit"), "{r}");
    // Capability denial.
    let r = m.call("misbehave", "write", "").unwrap();
    assert!(r.contains("memory-write") && r.contains("denied"), "{r}");
    // Unbounded allocation hits the memory limit.
    let err = m.call("misbehave", "alloc", "").unwrap_err();
    assert!(err.to_string().contains("memory limit"), "{err}");
    assert!(matches!(m.list()[0].state, ServiceState::Failed { .. }));
    // A loop in a call.
    m.detach("misbehave").unwrap_err();
    m.attach(&wasm("misbehave"), "").unwrap();
    let t = Instant::now();
    let err = m.call("misbehave", "loop", "").unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // A panic is a trap.
    m.detach("misbehave").unwrap_err();
    m.attach(&wasm("misbehave"), "").unwrap();
    let err = m.call("misbehave", "panic", "").unwrap_err();
    assert!(matches!(err, ServiceError::Failed { .. }), "{err}");
    // The SDK's panic hook carried the message and place out of Wasm into the error.
    let msg = err.to_string();
    assert!(
        msg.contains("panicked at") && msg.contains("told to panic") && msg.contains("lib.rs:"),
        "{msg}"
    );
    // And the manager is fine.
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    writes(&m, 0x700, 1);
}

/// The JSON error of a call the service's dispatcher refused.
fn call_error(m: &ServiceManager, method: &str, args: &str) -> serde_json::Value {
    match m.call("exit-stats", method, args) {
        Err(ServiceError::Call { msg, .. }) => json(&msg),
        r => panic!("{method} {args}: expected a call error, got {r:?}"),
    }
}

/// exit-stats uses the SDK's `#[service]` attribute: typed config, typed arguments, JSON
/// results, JSON errors for calls that do not fit, and the serde state hand-over.
#[test]
fn typed_calls_and_config_in_both_runtimes() {
    for p in both("exit-stats") {
        let (_ram, m) = manager();
        // A typed config refuses a bad one with serde's reason, naming the value.
        let err = m.attach(&p, r#"{"base": "0xzz"}"#).unwrap_err().to_string();
        assert!(
            err.contains("refused to attach") && err.contains("0xzz"),
            "{err}"
        );
        let err = m.attach(&p, r#"{"base": 70000}"#).unwrap_err().to_string();
        assert!(err.contains("too large for u16"), "{err}");
        m.attach(&p, STATS).unwrap();
        writes(&m, 0x701, 2);
        // One parameter: its value as a number or hex string, or by name.
        for args in ["1793", r#""0x701""#, r#"{"port": "0x701"}"#] {
            let c = json(&m.call("exit-stats", "port", args).unwrap());
            assert_eq!(c["writes"], 2, "{args}: {c}");
        }
        let e = call_error(&m, "port", r#""x""#);
        assert_eq!(
            (e["error"].as_str(), e["method"].as_str()),
            (Some("bad-args"), Some("port"))
        );
        assert!(
            e["message"].as_str().unwrap().contains("argument `port`"),
            "{e}"
        );
        assert!(
            e["usage"].as_str().unwrap().starts_with("port(port:"),
            "{e}"
        );
        let e = call_error(&m, "port", "");
        assert!(e["message"].as_str().unwrap().contains("missing"), "{e}");
        let e = call_error(&m, "port", "{");
        assert!(e["message"].as_str().unwrap().contains("not JSON"), "{e}");
        let e = call_error(&m, "reset", "[1]");
        assert!(
            e["message"].as_str().unwrap().contains("no arguments"),
            "{e}"
        );
        let e = call_error(&m, "stat", "");
        assert_eq!(e["error"], "unknown-method");
        assert_eq!(e["methods"], serde_json::json!(["stats", "port", "reset"]));
        // The method's own error stays its text.
        let err = m.call("exit-stats", "port", "1").unwrap_err().to_string();
        assert!(err.contains("not in this service's range"), "{err}");
        // A result without a value is JSON null; the service keeps working after every refusal.
        assert_eq!(m.call("exit-stats", "reset", "").unwrap(), "null");
        writes(&m, 0x702, 1);
        let s = json(&m.call("exit-stats", "stats", "{}").unwrap());
        assert_eq!(
            (s["writes"].as_u64(), s["base"].as_u64()),
            (Some(1), Some(0x700))
        );
        // The default state hand-over (the whole value as JSON) carries the counts.
        m.replace("exit-stats", &p).unwrap();
        assert_eq!(read(&m, 0x702), Some(1));
    }
}

#[test]
fn hostile_calls_in_native() {
    let (_ram, m) = manager();
    m.attach(&native("misbehave"), "").unwrap();
    let r = m.call("misbehave", "oob", "").unwrap();
    assert!(r.contains("outside"), "{r}");
    let r = m.call("misbehave", "big-read", "").unwrap();
    assert!(r.contains("limit"), "{r}");
    let r = m.call("misbehave", "write", "").unwrap();
    assert!(r.contains("memory-write") && r.contains("denied"), "{r}");
    let err = m.call("misbehave", "panic", "").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::Failed { .. }), "{msg}");
    assert!(msg.contains("told to panic"), "{msg}");
    m.attach(&native("exit-stats"), STATS).unwrap();
    writes(&m, 0x700, 1);
}

#[test]
fn bad_plugins_are_refused_clearly() {
    let (_ram, m) = manager();
    for p in both("abi-mismatch") {
        let err = m.attach(&p, "").unwrap_err();
        assert!(
            matches!(
                err,
                ServiceError::AbiMismatch {
                    found: 999,
                    expected: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = m.attach(&wasm("missing-export"), "").unwrap_err();
    assert!(err.to_string().contains("does not export"), "{err}");
    let err = m.attach(&native("missing-export"), "").unwrap_err();
    assert!(
        err.to_string()
            .contains("missing symbol spanvmm_service_describe"),
        "{err}"
    );
    // A shared object that is no service at all.
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .into_iter()
    .map(std::path::Path::new)
    .find(|p| p.exists());
    if let Some(libc) = libc {
        let err = m.attach(libc, "").unwrap_err();
        assert!(
            err.to_string()
                .contains("missing symbol spanvmm_service_abi_version"),
            "{err}"
        );
    }
    // A core module, garbage, a missing file, an unknown kind.
    let dir = tempdir("bad");
    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = m.attach(&core, "").unwrap_err();
    assert!(
        err.to_string()
            .contains("not a valid WebAssembly component"),
        "{err}"
    );
    assert!(err.to_string().contains("wasm32-wasip2"), "a hint: {err}");
    let junk = dir.join("junk.so");
    std::fs::write(&junk, b"not an ELF").unwrap();
    assert!(matches!(
        m.attach(&junk, ""),
        Err(ServiceError::Load { .. })
    ));
    let err = m.attach(&dir.join("absent.wasm"), "").unwrap_err();
    assert!(
        matches!(&err, ServiceError::File(e) if e.problem == l1_services::trust::TrustProblem::Missing),
        "{err}"
    );
    assert!(err.to_string().contains("absent.wasm"), "{err}");
    assert!(matches!(
        m.attach(&dir.join("x.txt"), ""),
        Err(ServiceError::UnknownKind(_))
    ));
    // A service refusing its config.
    let err = m.attach(&wasm("exit-stats"), "{}").unwrap_err();
    assert!(matches!(err, ServiceError::AttachRefused { .. }), "{err}");
    assert!(m.list().is_empty());
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "spanvmm-l1-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds page tables in guest RAM: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000;
/// GVA 0x40_1000 → GPA 0x9000 (user, writable), GVA 0x60_0000 → 2 MiB page at 0x20_0000
/// (kernel, read-only).
fn page_tables(ram: &base_vmm::memory::GuestRam) -> u64 {
    let put = |gpa: u64, v: u64| ram.write(gpa, &v.to_le_bytes()).unwrap();
    put(0x1000, 0x2000 | 7);
    put(0x2000, 0x3000 | 7);
    put(0x3000 + 2 * 8, 0x4000 | 7);
    put(0x3000 + 3 * 8, 0x20_0000 | 0x80 | 1);
    put(0x4000 + 8, 0x9000 | 7);
    0x1000
}

#[test]
fn introspect_reads_searches_and_walks_page_tables() {
    for p in both("introspect") {
        let (ram, m) = manager();
        let cr3 = page_tables(&ram);
        ram.write(0x9abc, b"spanvmm-secret-marker").unwrap();
        ram.write(0x5f_0000, b"spanvmm-secret-marker").unwrap();
        m.attach(&p, "").unwrap();
        let info = json(&m.call("introspect", "info", "").unwrap());
        assert_eq!(info["mem_bytes"], 16 << 20);
        let r = json(
            &m.call("introspect", "read", r#"{"gpa": "0x9abc", "len": 7}"#)
                .unwrap(),
        );
        assert_eq!(r["hex"], "7370616e766d6d");
        let s = json(
            &m.call("introspect", "search", r#"{"text": "secret-marker"}"#)
                .unwrap(),
        );
        assert_eq!(s["matches"], serde_json::json!([0x9ac4, 0x5f_0008]));
        let t = json(
            &m.call(
                "introspect",
                "translate",
                &format!(r#"{{"cr3": {cr3}, "gva": "0x401abc"}}"#),
            )
            .unwrap(),
        );
        assert_eq!(t["present"], true);
        assert_eq!(t["gpa"], 0x9abc);
        assert_eq!(
            (t["user"].clone(), t["writable"].clone()),
            (true.into(), true.into())
        );
        let t = json(
            &m.call(
                "introspect",
                "translate",
                &format!(r#"{{"cr3": {cr3}, "gva": "0x7ffff"}}"#),
            )
            .unwrap(),
        );
        assert_eq!(t["present"], false);
        let t = json(
            &m.call(
                "introspect",
                "translate",
                &format!(r#"{{"cr3": {cr3}, "gva": "0x612345"}}"#),
            )
            .unwrap(),
        );
        assert_eq!(
            (t["gpa"].clone(), t["page_size"].clone()),
            (0x212345.into(), (2 << 20).into())
        );
        assert_eq!(
            (t["user"].clone(), t["writable"].clone()),
            (false.into(), false.into())
        );
        let z = json(
            &m.call("introspect", "zero", r#"{"first": 0, "count": 16}"#)
                .unwrap(),
        );
        // Pages 1-4 (tables) and 9 (marker) hold data.
        assert_eq!(z["bitmap"][0], 0xffff & !0b10_0001_1110);
        let h = json(
            &m.call("introspect", "hash", r#"{"first": 9, "count": 2}"#)
                .unwrap(),
        );
        assert_ne!(h["hashes"][0], h["hashes"][1]);
        // No vCPUs behind this host: a clear error, not a crash.
        let err = m.call("introspect", "regs", r#"{"vcpu": 0}"#).unwrap_err();
        assert!(err.to_string().contains("not available"), "{err}");
        let err = m.call("introspect", "regs", r#"{"vcpu": 7}"#).unwrap_err();
        assert!(err.to_string().contains("no vCPU 7"), "{err}");
        let err = m
            .call("introspect", "read", r#"{"gpa": "0xfffff0", "len": 64}"#)
            .unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }
}

#[test]
fn introspect_watches_writes_through_the_dirty_log() {
    for p in both("introspect") {
        let (ram, m) = manager();
        // Dirt from before the attach is not reported.
        ram.write(0x10_0000, &[1]).unwrap();
        m.attach(&p, r#"{"watch": [{"gpa": "0x100000", "len": 8192}]}"#)
            .unwrap();
        let start = Instant::now();
        m.tick(start + Duration::from_millis(60));
        assert_eq!(
            json(&m.call("introspect", "hits", "").unwrap())["hits"],
            serde_json::json!([])
        );
        ram.write(0x10_1010, b"hello").unwrap(); // second page of the watch
        ram.write(0x20_0000, b"elsewhere").unwrap();
        let due = m.next_tick_in(start + Duration::from_millis(60)).unwrap();
        assert!(due <= Duration::from_millis(50));
        m.tick(start + Duration::from_millis(200));
        let hits = json(&m.call("introspect", "hits", "").unwrap());
        assert_eq!(hits["hits"].as_array().unwrap().len(), 1, "{hits}");
        assert_eq!(hits["hits"][0]["page_gpa"], 0x10_1000);
        let notes = m.take_notifications().notifications;
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].service, "introspect");
        assert_eq!(notes[0].kind, "write-watch");
        // The detail is the service's JSON object, not a string holding it.
        assert_eq!(notes[0].detail["page_gpa"], 0x10_1000);
        // Watches survive a replace into the other runtime, dirty pages pending included.
        ram.write(0x10_0000, b"again").unwrap();
        let other = if p.extension().is_some_and(|e| e == "wasm") {
            native("introspect")
        } else {
            wasm("introspect")
        };
        m.replace("introspect", &other).unwrap();
        m.tick(start + Duration::from_millis(400));
        let hits = json(&m.call("introspect", "hits", "").unwrap());
        assert_eq!(hits["hits"][0]["page_gpa"], 0x10_0000, "{hits}");
        let w = json(&m.call("introspect", "watches", "").unwrap());
        assert_eq!(w["watches"][0]["hits"], 2);
        assert_eq!(m.list()[0].metrics["watch_hits"], 2.0);
    }
}

/// Each service has its own bounded notification queue: a noisy one drops its own oldest
/// (counted), never another's.
#[test]
fn a_noisy_service_does_not_push_out_anothers_notifications() {
    let (ram, m) = manager();
    m.attach(
        &wasm("introspect"),
        r#"{"watch": [{"gpa": "0x100000", "len": 4096}]}"#,
    )
    .unwrap();
    m.attach(&native("misbehave"), "").unwrap();
    let start = Instant::now();
    m.tick(start);
    ram.write(0x10_0010, b"watched").unwrap();
    m.call("misbehave", "notify", "10").unwrap();
    m.tick(start + Duration::from_millis(100));
    let flood = l1_services::NOTIFICATIONS_PER_SERVICE as u64 * 4;
    m.call("misbehave", "notify", &flood.to_string()).unwrap();
    let t = m.take_notifications();
    let from = |who: &str| t.notifications.iter().filter(|n| n.service == who).count();
    assert_eq!(from("introspect"), 1, "{:?}", t.dropped);
    assert_eq!(from("misbehave"), l1_services::NOTIFICATIONS_PER_SERVICE);
    assert_eq!(
        t.dropped["misbehave"],
        flood + 10 - l1_services::NOTIFICATIONS_PER_SERVICE as u64
    );
    assert!(!t.dropped.contains_key("introspect"), "{:?}", t.dropped);
    // In publication order; the kept ones are the newest; details are JSON.
    assert!(t.notifications.windows(2).all(|w| w[0].seq < w[1].seq));
    let last = t.notifications.last().unwrap();
    assert_eq!(last.detail["i"], flood - 1);
    // Taken once: the queues start empty again, and the counters with them.
    let again = m.take_notifications();
    assert!(again.notifications.is_empty() && again.dropped.is_empty());
    // A follower waits for the next one.
    let t0 = Instant::now();
    assert!(m
        .wait_notifications(Duration::from_millis(50))
        .notifications
        .is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(50));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| m.wait_notifications(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        m.call("misbehave", "notify", "1").unwrap();
        assert_eq!(waiter.join().unwrap().notifications.len(), 1);
    });
}

#[test]
fn events_from_many_vcpu_threads_are_all_counted() {
    for p in both("exit-stats") {
        let (_ram, m) = manager();
        let m = Arc::new(m);
        m.attach(&p, STATS).unwrap();
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        assert!(m.on_port_write(0x700 + t, &[t as u8]));
                    }
                    let mut d = [0u8; 2];
                    assert!(m.on_port_read(0x700 + t, &mut d));
                })
            })
            .collect();
        for _ in 0..20 {
            m.call("exit-stats", "stats", "").unwrap();
            m.lifecycle(Lifecycle::Resumed);
        }
        for t in threads {
            t.join().unwrap();
        }
        let s = json(&m.call("exit-stats", "stats", "").unwrap());
        assert_eq!(s["writes"], 8000);
        assert_eq!(s["reads"], 4);
    }
}

#[test]
fn a_native_object_serves_once() {
    let (_ram, m) = manager();
    let (_ram2, m2) = manager();
    let so = native("exit-stats");
    m.attach(&so, STATS).unwrap();
    // Not even through another manager: dlopen hands back the same object, same statics.
    let err = m2.attach(&so, STATS).unwrap_err();
    assert!(
        err.to_string()
            .contains("already loaded (by service exit-stats)"),
        "{err}"
    );
    m.detach("exit-stats").unwrap();
    m2.attach(&so, STATS).unwrap();
}

#[test]
fn compiled_components_are_cached_on_disk() {
    let dir = tempdir("cache");
    let (_ram, host) = ram_host(16);
    let m = ServiceManager::new(host.clone(), dir.clone());
    let cold = m.attach(&wasm("template"), "").unwrap().attach_us;
    let cached: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(cached.len(), 1, "one artifact");
    drop(m);
    let m = ServiceManager::new(host, dir.clone());
    let warm = m.attach(&wasm("template"), "").unwrap().attach_us;
    m.detach("hello").unwrap();
    let hot = m.attach(&wasm("template"), "").unwrap().attach_us;
    eprintln!("attach: cold {cold} µs, disk cache {warm} µs, in-memory {hot} µs");
    assert!(warm < cold, "cold {cold} µs, warm {warm} µs");
    // A corrupt artifact is dropped and rebuilt.
    let art = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&art, b"garbage").unwrap();
    let (_ram, host) = ram_host(16);
    let m = ServiceManager::new(host, dir.clone());
    m.attach(&wasm("template"), "").unwrap();
    assert_eq!(
        m.call("hello", "hello", r#""you""#).unwrap(),
        "\"hello, you! greeting #1\""
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn detach_all_and_lifecycle_order() {
    let (_ram, m) = manager();
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    m.attach(&native("introspect"), "").unwrap();
    m.lifecycle(Lifecycle::Paused);
    let out = m.detach_all();
    let names: Vec<_> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["introspect", "exit-stats"]);
    assert!(out.iter().all(|(_, r)| r.is_ok()));
    assert!(m.list().is_empty());
}

/// A host whose pause takes a while, like one waiting for every vCPU to acknowledge.
struct SlowPause(l1_services::RamHost, Duration);

impl l1_services::VmHost for SlowPause {
    fn info(&self) -> l1_services::VmInfo {
        self.0.info()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), l1_services::HostError> {
        self.0.read_memory(gpa, buf)
    }
    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), l1_services::HostError> {
        self.0.write_memory(gpa, data)
    }
    fn pause(&self) -> Result<(), l1_services::HostError> {
        std::thread::sleep(self.1);
        Ok(())
    }
    fn resume(&self) -> Result<(), l1_services::HostError> {
        Ok(())
    }
    fn vcpu_regs(&self, i: u32) -> Result<l1_services::VcpuRegs, l1_services::HostError> {
        self.0.vcpu_regs(i)
    }
    fn harvest_dirty(&self) -> Result<Vec<u64>, l1_services::HostError> {
        self.0.harvest_dirty()
    }
}

#[test]
fn a_vcpu_never_waits_for_a_service_that_waits_for_vcpus() {
    for p in both("misbehave") {
        let ram = Arc::new(base_vmm::memory::GuestRam::new(16 << 20).unwrap());
        let host = Arc::new(SlowPause(
            l1_services::RamHost::new(ram, 1, 1_000_000),
            Duration::from_millis(1000),
        ));
        let m = Arc::new(ServiceManager::new(host, cache_dir()));
        m.attach(&p, "").unwrap();
        // The pause takes 1 s of host time: more than the 100 ms call deadline, but host time
        // is credited back, so the service is not interrupted.
        let m2 = m.clone();
        let pauser = std::thread::spawn(move || m2.call("misbehave", "pause", ""));
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        for _ in 0..3 {
            assert!(m.on_port_write(0x6f0, &[1]));
        }
        // Owned but reads not subscribed: all-ones without asking the service.
        let mut d = [0u8; 1];
        assert!(m.on_port_read(0x6f0, &mut d));
        assert_eq!(d, [0xff]);
        // Waiting for the service would take the rest of its 1 s pause; queueing takes µs
        // (the bound leaves room for a busy host's scheduling).
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        pauser.join().unwrap().unwrap();
        // The queued writes were delivered once the service was free.
        assert_eq!(m.call("misbehave", "writes", "").unwrap(), "3");
        assert_eq!(m.list()[0].stats.deferred, 3);
    }
}

#[test]
fn the_service_limit_holds() {
    let cfg = ManagerConfig {
        max_services: 2,
        ..Default::default()
    };
    let (_ram, m) = manager_with(cfg);
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    m.attach(&wasm("template"), "").unwrap();
    let err = m.attach(&native("introspect"), "").unwrap_err();
    assert!(matches!(err, ServiceError::TooMany(2)), "{err}");
    m.detach("hello").unwrap();
    m.attach(&wasm("introspect"), "").unwrap();
}

#[test]
fn async_port_writes_arrive_all_in_order_before_a_later_call() {
    let (_ram, m) = manager();
    let m = std::sync::Arc::new(m);
    m.start_async_delivery().unwrap();
    for path in both("exit-stats") {
        let opts = l1_services::AttachOptions {
            async_port_writes: true,
            ..Default::default()
        };
        m.attach_with(&path, r#"{"base":1792,"len":1}"#, opts)
            .unwrap();
        for i in 0..10_000u32 {
            assert!(m.on_port_write(0x700, &i.to_le_bytes()));
        }
        // A control call sees every write queued before it, the last one last.
        let stats = json(&m.call("exit-stats", "stats", "").unwrap());
        assert_eq!(stats["writes"], 10_000, "{path:?}: {stats}");
        assert_eq!(stats["last_write"], 9_999, "{path:?}: {stats}");
        m.detach("exit-stats").unwrap();
    }
}

/// Saving the services' states leaves them attached, counting on, in their event order; a
/// fresh manager attaches them again from the records with their counts; a service that
/// declined, or a section that does not parse, is listed failed with why and stops nothing.
#[test]
fn saved_states_stay_in_place_and_come_back_elsewhere() {
    let (_ram, m) = manager();
    m.attach(&wasm("introspect"), "").unwrap();
    m.attach(&native("exit-stats"), STATS).unwrap();
    m.attach(&wasm("template"), "").unwrap();
    writes(&m, 0x701, 7);
    let records = m.save_states(None);
    let names: Vec<_> = m.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["introspect", "exit-stats", "hello"], "order kept");
    assert_eq!(read(&m, 0x701), Some(7), "the count stayed");
    writes(&m, 0x701, 1);
    assert_eq!(read(&m, 0x701), Some(8), "and goes on");
    assert_eq!(records.len(), 3);
    assert!(records
        .iter()
        .all(|r| matches!(r, l1_services::ServiceRecord::Handed(_))));
    let mut sections: Vec<_> = records.iter().map(|r| r.to_section()).collect();
    sections.push(
        l1_services::ServiceRecord::Declined {
            name: "shy".into(),
            reason: "busy".into(),
        }
        .to_section(),
    );
    let mut bad = sections[0].clone();
    bad.id = "service/garbled".into();
    bad.data.truncate(2);
    sections.push(bad);
    // A native object serves one manager at a time (a_native_object_serves_once).
    drop(m);
    let (_ram2, there) = manager();
    let missing = there.restore_states(&sections);
    assert_eq!(read(&there, 0x701), Some(7), "the saved count came along");
    let names: Vec<_> = missing.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["shy", "garbled"], "{missing:?}");
    let list = there.list();
    let shy = list.iter().find(|i| i.name == "shy").unwrap();
    assert!(
        matches!(&shy.state, ServiceState::Failed { reason } if reason.contains("busy")),
        "{:?}",
        shy.state
    );
    assert_eq!(
        list.iter()
            .filter(|i| matches!(i.state, ServiceState::Attached))
            .count(),
        3
    );
}

/// Whoever attaches sets the tick period (instead of the manifest's); a replace keeps it.
#[test]
fn the_tick_period_is_set_at_attach_and_kept_by_a_replace() {
    let (_ram, m) = manager();
    let opts = l1_services::AttachOptions {
        tick_period_ms: Some(20),
        ..Default::default()
    };
    // exit-stats does not subscribe to ticks: a period for it is a mistake, said clearly.
    let err = m.attach_with(&wasm("exit-stats"), STATS, opts).unwrap_err();
    assert!(
        err.to_string().contains("does not subscribe to ticks"),
        "{err}"
    );
    let zero = l1_services::AttachOptions {
        tick_period_ms: Some(0),
        ..Default::default()
    };
    let err = m.attach_with(&wasm("template"), "", zero).unwrap_err();
    assert!(err.to_string().contains("at least 1 ms"), "{err}");
    // The template's manifest asks for 1000 ms.
    let info = m.attach_with(&wasm("template"), "", opts).unwrap();
    assert_eq!(info.tick_period_ms, 20);
    let now = Instant::now();
    m.tick(now);
    assert!(m.next_tick_in(now).unwrap() <= Duration::from_millis(20));
    let info = m.replace("hello", &native("template")).unwrap();
    assert_eq!(info.tick_period_ms, 20);
    assert_eq!(m.list()[0].tick_period_ms, 20);
}
