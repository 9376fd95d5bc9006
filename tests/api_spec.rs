//! docs/api.yaml against the running server: a real VMM is driven through every documented
//! operation (successes and documented refusals), each exchange is recorded as it went over the
//! socket, and openapi-core (a maintained OpenAPI 3 validator, pinned in .ci/setup) checks that
//! every request is one the spec accepts and every response matches what the spec documents
//! for its status (tests/peers/openapi_check.py). The spec is the contract: a difference is
//! fixed in the code or in the spec, never here.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The pinned validator's interpreter: a venv .ci/setup makes (override: SPANVMM_OPENAPI_PYTHON).
fn validator() -> Result<PathBuf, String> {
    let py = std::env::var_os("SPANVMM_OPENAPI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let tools = std::env::var_os("SPANVMM_TOOLCHAINS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/spanvmm-toolchains")
                });
            tools.join("openapi-core-0.23.1/bin/python")
        });
    let ok = std::process::Command::new(&py)
        .args(["-c", "import openapi_core, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(py)
    } else {
        Err(format!(
            "no openapi-core at {} (.ci/setup installs it)",
            py.display()
        ))
    }
}

/// One request as it went over the socket, and its answer.
struct Recorder {
    api: PathBuf,
    exchanges: Vec<Value>,
}

impl Recorder {
    /// Sends `method path` with `body` (JSON text or nothing); records and returns (status,
    /// JSON body or the text).
    fn send(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = UnixStream::connect(&self.api).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read the answer");
        let raw = String::from_utf8_lossy(&raw).to_string();
        let (head, text) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        self.exchanges.push(json!({
            "method": method, "path": path, "body": body, "status": status,
            "content_type": content_type, "response": text,
        }));
        let v = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()));
        (status, v)
    }

    fn ok(&mut self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.send(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }
}

fn wait_snapshot_done(r: &mut Recorder) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = r.ok("GET", "/snapshot/status", None);
        match s["phase"].as_str() {
            Some("done") => return,
            Some("failed") => panic!("the snapshot failed: {s}"),
            _ if Instant::now() > deadline => panic!("the snapshot did not end: {s}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn the_running_server_matches_docs_api_yaml() {
    let py = validator();
    let needs = py.as_ref().map(|_| ()).map_err(Clone::clone);
    if !netlab::can_run("the_running_server_matches_docs_api_yaml", needs) {
        return;
    }
    let py = py.unwrap();
    let dir = TempDir::new("api-spec");
    let d = |name: &str| dir.path().join(name).display().to_string();
    let mut vm = VmProcess::boot("api-spec", "workload=dirty,verify mib=8", 64, 1);
    let mut r = Recorder {
        api: vm.api.clone(),
        exchanges: Vec::new(),
    };
    // The VM.
    r.ok("GET", "/vm", None);
    r.ok("PUT", "/vm/pause", None);
    r.ok("PUT", "/vm/resume", Some(json!({ "force": false })));
    r.ok("PUT", "/vm/resume", None);
    r.ok("GET", "/metrics", None);
    r.ok(
        "PUT",
        "/guest/command",
        Some(json!({ "command": "verify" })),
    );
    r.ok("PUT", "/vm/save", Some(json!({ "dir": d("save") })));
    let (status, _) = r.send("PUT", "/vm/save", Some(json!({ "dir": "relative" })));
    assert_eq!(status, 400);
    // Services.
    r.ok("GET", "/plugins", None);
    let stats = plugin("exit-stats.wasm");
    r.ok(
        "PUT",
        "/plugins/attach",
        Some(json!({ "path": stats, "config": r#"{"base":2768,"len":1}"#, "async_port_writes": false })),
    );
    r.ok(
        "PUT",
        "/plugins/attach",
        Some(json!({ "path": plugin("introspect.wasm"), "tick_period_ms": 20 })),
    );
    r.ok(
        "PUT",
        "/plugins/call",
        Some(json!({ "name": "exit-stats", "method": "stats", "args": "" })),
    );
    let (status, _) = r.send(
        "PUT",
        "/plugins/call",
        Some(json!({ "name": "exit-stats", "method": "stat" })),
    );
    assert_eq!(status, 400);
    r.ok(
        "PUT",
        "/plugins/replace",
        Some(json!({ "name": "exit-stats", "path": plugin("libexit-stats.so"), "rename": false })),
    );
    r.ok(
        "PUT",
        "/plugins/call",
        Some(json!({ "name": "introspect", "method": "watch", "args": r#"{"gpa": 0, "len": 4096}"# })),
    );
    r.ok("GET", "/plugins/notifications", None);
    r.ok(
        "PUT",
        "/plugins/detach",
        Some(json!({ "name": "introspect" })),
    );
    // Snapshots.
    r.ok(
        "PUT",
        "/snapshot/secret",
        Some(json!({ "gpa": 0x10_0000, "len": 4096 })),
    );
    r.ok("GET", "/snapshot/secrets", None);
    let checkpoint = plugin("checkpoint.wasm");
    r.ok(
        "PUT",
        "/snapshot/create",
        Some(json!({ "dir": d("layer"), "plugin": checkpoint, "track": true })),
    );
    wait_snapshot_done(&mut r);
    let (status, _) = r.send("PUT", "/snapshot/load", Some(json!({ "dir": d("layer") })));
    assert_eq!(status, 409, "a VM runs here already");
    // Migration: the documented refusals (a real migration is tests/migration.rs').
    let (status, _) = r.send(
        "PUT",
        "/vm/migrate",
        Some(json!({ "to": "tls://127.0.0.1:9", "tls_dir": d("no-certs") })),
    );
    assert_ne!(status, 200);
    let (status, _) = r.send("PUT", "/vm/migrate", Some(json!({ "poll": 99 })));
    assert_eq!(status, 404);
    for verb in ["release", "cancel"] {
        let (status, _) = r.send("PUT", "/vm/migrate", Some(json!({ verb: 99 })));
        assert_eq!(status, 404, "{verb}");
    }
    r.ok("GET", "/vm/migration", None);
    // A live update to a binary that is not there is refused; the VM runs on.
    let (status, _) = r.send(
        "PUT",
        "/vm/live-update",
        Some(json!({ "binary": d("no-such-spanvmm"), "timeout_ms": 1000 })),
    );
    assert_ne!(status, 200);
    r.ok(
        "PUT",
        "/snapshot/periodic",
        Some(json!({ "dir": d("periodic"), "plugin": checkpoint, "keep": 2 })),
    );
    // Evict: a last layer, the guest stays paused (or "busy" while a periodic layer is written).
    let (status, _) = r.send("PUT", "/snapshot/evict", Some(json!({ "dir": d("evict") })));
    assert!(status == 200 || status == 400, "{status}");
    r.ok("PUT", "/vm/shutdown", None);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), Some(0));

    let exchanges = dir.path().join("exchanges.json");
    std::fs::write(&exchanges, serde_json::to_vec_pretty(&r.exchanges).unwrap()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(&py)
        .arg(repo.join("tests/peers/openapi_check.py"))
        .arg(repo.join("docs/api.yaml"))
        .arg(&exchanges)
        .output()
        .expect("run the validator");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "docs/api.yaml and the server differ:\n{report}"
    );
}
