//! WASI Preview 2 as the host offers it: deny-by-default (no files, sockets, environment or
//! arguments; clocks and random allowed), and components from standard toolchains (Rust
//! wasm32-wasip2, componentize-py, ComponentizeJS) running as services. Real wasmtime, real
//! memfd guest RAM, the components built from source by plugins/build.sh.

mod common;

use common::*;
use l1_services::{ServiceKind, ServiceManager, ServiceState};

const PORT: u16 = 0x700;
const CFG: &str = r#"{"base": 1792, "len": 1}"#;

fn attached(m: &ServiceManager, name: &str) {
    let list = m.list();
    let s = list.iter().find(|s| s.name == name).expect("listed");
    assert!(matches!(s.state, ServiceState::Attached), "{:?}", s.state);
}

#[test]
fn wasi_refuses_files_sockets_and_environment_without_trapping() {
    let (_ram, m) = manager();
    m.attach(&wasm("misbehave"), "").unwrap();
    // Each refusal reaches the service as an ordinary error it reports back.
    for method in ["wasi-file", "wasi-write-file"] {
        let r = json(&m.call("misbehave", method, "").unwrap());
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method}: {r}"
        );
    }
    let r = json(&m.call("misbehave", "wasi-socket", "127.0.0.1:1").unwrap());
    for what in ["connect", "listen", "udp"] {
        assert!(r[what].as_str().is_some(), "{what}: {r}");
    }
    let r = json(&m.call("misbehave", "wasi-env", "").unwrap());
    assert_eq!(r["vars"], 0, "{r}");
    assert_eq!(r["args"], 0, "{r}");
    // Clocks are granted.
    let r = json(&m.call("misbehave", "wasi-clock", "").unwrap());
    assert!(r["wall_s"].as_u64().unwrap() > 1_600_000_000, "{r}");
    assert_eq!(r["mono_ok"], true, "{r}");
    // Printing is fine, without end too (bounded in the host: logged in pieces).
    m.call("misbehave", "print", "hello").unwrap();
    m.call("misbehave", "print-flood", "4194304").unwrap();
    attached(&m, "misbehave");
    assert_eq!(m.call("misbehave", "writes", "").unwrap(), "0");
}

/// The same service in three languages: each counts port writes and answers `stats`, and the
/// count goes across a replace from one language to the next (the state format is shared).
#[test]
fn the_example_service_runs_in_rust_python_and_javascript() {
    let (_ram, m) = manager();
    let langs = [
        ("rust", "port-counter-rust", "rust"),
        ("python", "port-counter-python", "python"),
        ("js", "port-counter-js", "javascript"),
    ];
    let mut total = 0u64;
    for (i, (_, file, lang)) in langs.iter().enumerate() {
        let info = if i == 0 {
            m.attach(&wasm(file), CFG).unwrap()
        } else {
            m.replace("port-counter", &wasm(file)).unwrap()
        };
        assert_eq!(info.kind, ServiceKind::Wasm);
        let n = 10 + i as u32;
        for v in 0..n {
            assert!(m.on_port_write(PORT, &[v as u8 + 1]), "{lang}");
        }
        total += u64::from(n);
        let s = json(&m.call("port-counter", "stats", "").unwrap());
        assert_eq!(s["language"], *lang, "{s}");
        assert_eq!(s["writes"], total, "{lang}: {s}");
        assert_eq!(s["last"], u64::from(n), "{lang}: {s}");
        // Unknown methods are errors from the service, not failures.
        assert!(m.call("port-counter", "nope", "").is_err());
        attached(&m, "port-counter");
    }
    let state = m.detach("port-counter").unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(state["writes"], total, "{state}");
    // A port another service owns refuses the attach in every language, with the host's reason.
    m.attach(&wasm("exit-stats"), r#"{"base": 1792, "len": 1}"#)
        .unwrap();
    for (_, file, lang) in langs {
        let err = m.attach(&wasm(file), CFG).unwrap_err().to_string();
        assert!(err.contains("exit-stats"), "{lang}: {err}");
    }
}
