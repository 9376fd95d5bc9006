//! Measures attach latency and per-event / per-call cost of Wasm and native services.
//!
//! ```sh
//! plugins/build.sh
//! cargo run --release -p l1-services --example measure [-- <plugins dir>]
//! # only the example service per language (or given builds of it), its memory per event:
//! cargo run --release -p l1-services --example measure -- target/plugins \
//!     --lang-files rust,python,js [--lang-storm 300000] [--memory-mib 64]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base_vmm::memory::GuestRam;
use l1_services::{ManagerConfig, RamHost, ServiceManager};

const STATS: &str = r#"{"base": 1792, "len": 4}"#;

fn per_op(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn manager(cache: &Path, pooling: bool) -> ServiceManager {
    let ram = Arc::new(GuestRam::new(64 << 20).unwrap());
    let mut cfg = ManagerConfig {
        pooling,
        ..Default::default()
    };
    // `--memory-mib N`: the services' linear-memory limit (default 64).
    if let Some(mib) = std::env::args()
        .skip_while(|a| a != "--memory-mib")
        .nth(1)
        .and_then(|n| n.parse::<usize>().ok())
    {
        cfg.memory_limit = mib << 20;
    }
    ServiceManager::with_config(Arc::new(RamHost::new(ram, 1, 1_000_000)), cache.into(), cfg)
}

fn attach_us(m: &ServiceManager, p: &Path) -> Duration {
    let t = Instant::now();
    m.attach(p, STATS).unwrap();
    let d = t.elapsed();
    m.detach("exit-stats").unwrap();
    d
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let wasm = dir.join("exit-stats.wasm");
    let native = dir.join("libexit-stats.so");
    let cache = std::env::temp_dir().join(format!("spanvmm-measure-{}", std::process::id()));
    if std::env::args().any(|a| a == "--lang-files") {
        lang_storm(&dir, &cache);
        let _ = std::fs::remove_dir_all(&cache);
        return;
    }

    println!("attach latency (exit-stats, attach + describe + claim, then detach):");
    for pooling in [true, false] {
        let _ = std::fs::remove_dir_all(&cache);
        let m = manager(&cache, pooling);
        let t = Instant::now();
        let _ = m.list();
        let cold = attach_us(&m, &wasm);
        let engine = t.elapsed() - cold;
        drop(m);
        let disk = median(
            (0..5)
                .map(|_| attach_us(&manager(&cache, pooling), &wasm))
                .collect(),
        );
        let m = manager(&cache, pooling);
        attach_us(&m, &wasm);
        let hot = median((0..50).map(|_| attach_us(&m, &wasm)).collect());
        println!(
            "  wasm (pooling {pooling:5}): cold compile {:>8.1?}, disk cache {:>8.1?}, in-memory {:>8.1?}{}",
            cold,
            disk,
            hot,
            if engine > Duration::from_micros(1) { format!(" (engine {engine:?})") } else { String::new() }
        );
    }
    let m = manager(&cache, true);
    let first = attach_us(&m, &native);
    let again = median((0..50).map(|_| attach_us(&m, &native)).collect());
    println!("  native: first dlopen {first:>8.1?}, again {again:>8.1?}");

    println!("per event / per call (median of 5 runs):");
    let empty = manager(&cache, true);
    let d = median(
        (0..5)
            .map(|_| per_op(5_000_000, || assert!(!empty.on_port_write(0x80, &[1]))))
            .collect(),
    );
    println!("  no service attached, port write:        {d:>8.1?}");
    for (label, p) in [("wasm  ", &wasm), ("native", &native)] {
        let m = manager(&cache, true);
        m.attach(p, STATS).unwrap();
        let miss = median(
            (0..5)
                .map(|_| per_op(2_000_000, || assert!(!m.on_port_write(0x80, &[1]))))
                .collect(),
        );
        let w = median(
            (0..5)
                .map(|_| per_op(500_000, || assert!(m.on_port_write(0x701, &[1]))))
                .collect(),
        );
        let mut b = [0u8; 4];
        let r = median(
            (0..5)
                .map(|_| per_op(500_000, || assert!(m.on_port_read(0x701, &mut b))))
                .collect(),
        );
        let c = median(
            (0..5)
                .map(|_| per_op(20_000, || drop(m.call("exit-stats", "stats", "").unwrap())))
                .collect(),
        );
        let info = &m.list()[0];
        println!(
            "  {label}: unclaimed port {miss:>7.1?}, port write {w:>7.1?}, port read {r:>7.1?}, call(stats) {c:>7.1?}, in-service share of events {:.0} ns",
            info.stats.event_ns as f64 / info.stats.events as f64
        );
        m.detach("exit-stats").unwrap();
    }
    // The smallest handler (the template: one add), to separate boundary cost from work.
    for (label, p) in [
        ("wasm  ", dir.join("template.wasm")),
        ("native", dir.join("libtemplate.so")),
    ] {
        let m = manager(&cache, true);
        m.attach(&p, r#"{"port": 1536}"#).unwrap();
        let w = median(
            (0..5)
                .map(|_| per_op(500_000, || assert!(m.on_port_write(0x600, &[1]))))
                .collect(),
        );
        println!("  {label}: minimal handler (template), port write {w:>7.1?}");
    }
    lang_storm(&dir, &cache);
    let _ = std::fs::remove_dir_all(&cache);
}

fn lang_storm(dir: &Path, cache: &Path) {
    // The example service in each language (plugins/examples/port-counter): per port write,
    // and whether it stays attached through a storm of `storm` writes (a service that grows
    // past the memory limit is detached). Optional: `--lang-storm N` (default 200000).
    let storm: u32 = std::env::args()
        .skip_while(|a| a != "--lang-storm")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    println!("the example service per language, {storm} port writes each:");
    // `--lang-files a,b`: port-counter-<a>.wasm, ... instead of the three languages (to compare
    // builds of one language).
    let langs: Vec<String> = std::env::args()
        .skip_while(|a| a != "--lang-files")
        .nth(1)
        .map(|l| l.split(',').map(String::from).collect())
        .unwrap_or_else(|| ["rust", "python", "js"].map(String::from).to_vec());
    for lang in &langs {
        let p = dir.join(format!("port-counter-{lang}.wasm"));
        if !p.exists() {
            println!("  {lang:6}: {} not built", p.display());
            continue;
        }
        let m = manager(cache, true);
        if let Err(e) = m.attach(&p, r#"{"base": 2768, "len": 1}"#) {
            println!("  {lang:6}: attach failed: {e}");
            continue;
        }
        let mem0 = m.list()[0].stats.memory_bytes;
        let t = Instant::now();
        let mut done = 0u32;
        // The linear memory at each tenth of the storm: a plateau or a slope.
        let mut curve = Vec::new();
        while done < storm && m.on_port_write(2768, &[1]) {
            done += 1;
            if done.is_multiple_of((storm / 10).max(1)) {
                curve.push(format!(
                    "{:.1}",
                    m.list()[0].stats.memory_bytes as f64 / 1048576.0
                ));
            }
        }
        let per = t.elapsed() / done.max(1);
        let info = &m.list()[0];
        let state = match &info.state {
            l1_services::ServiceState::Failed { reason } => format!("FAILED: {reason}"),
            s => format!("{s:?}"),
        };
        let mem = info.stats.memory_bytes;
        println!(
            "  {lang:6}: port write {per:>8.1?} ({done} delivered), in-service {:.0} ns, linear memory {:.1} -> {:.1} MiB ({:.0} B per event), then {state}",
            info.stats.event_ns as f64 / info.stats.events.max(1) as f64,
            mem0 as f64 / 1048576.0,
            mem as f64 / 1048576.0,
            mem.saturating_sub(mem0) as f64 / done.max(1) as f64,
        );
        println!("          MiB at each tenth: {}", curve.join(" "));
    }
}
