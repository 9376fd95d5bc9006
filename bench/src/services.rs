//! The service-layer benchmark (see main.rs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{collect, field, median, percentile, spawn_vm, spawn_vm_env, Vm};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

/// spanguest's exit-storm port, claimable by a service.
const STORM: &str = r#"{"base":2768,"len":1}"#;

#[derive(Serialize)]
struct Latency {
    plugin: String,
    iterations: usize,
    first_attach_us: f64,
    attach_server_p50_us: f64,
    attach_server_p99_us: f64,
    attach_rtt_p50_us: f64,
    attach_rtt_p99_us: f64,
    detach_rtt_p50_us: f64,
    detach_rtt_p99_us: f64,
    guest_max_stall_us: u64,
    guest_max_stall_without_us: u64,
}

/// The guest's largest loop gap since `reset-stall`, from the first `stat` line printed at
/// least one report period after `from`.
fn stall_after(vm: &Vm, from: usize) -> anyhow::Result<u64> {
    let lines = vm.wait_lines("SPANGUEST stat", 2, from, Duration::from_secs(10))?;
    field(&lines[1], "max_stall_us").context("stat line without max_stall_us")
}

/// Attach/detach `plugin` `n` times beneath a dirtying guest; the guest's largest stall over the
/// loop is compared with an equally long span without attaches.
fn attach_latency(bin: &Path, elf: &Path, plugin: &Path, n: usize) -> anyhow::Result<Latency> {
    let vm = spawn_vm(
        bin,
        elf,
        "workload=dirty,verify mib=64 rate=20000 stall_us=1000000 report_ms=200",
        256,
        "lat",
    )?;
    let body = json!({"path": plugin, "config": STORM});
    let reset = || {
        vm.api_ok(
            "PUT",
            "/guest/command",
            Some(json!({"command": "reset-stall"})),
        )
    };
    // First attach: compiles the component (or finds it in the cache).
    let (v, rtt) = vm.api_ok("PUT", "/plugins/attach", Some(body.clone()))?;
    let first = v["attach_us"].as_f64().unwrap_or(rtt.as_secs_f64() * 1e6);
    let name = v["name"]
        .as_str()
        .context("attach reply without name")?
        .to_string();
    vm.api_ok("PUT", "/plugins/detach", Some(json!({ "name": name })))?;

    let (mut att_srv, mut att_rtt, mut det_rtt) = (Vec::new(), Vec::new(), Vec::new());
    reset()?;
    let t = Instant::now();
    for _ in 0..n {
        let (v, rtt) = vm.api_ok("PUT", "/plugins/attach", Some(body.clone()))?;
        att_srv.push(v["attach_us"].as_f64().unwrap_or(0.0));
        att_rtt.push(rtt.as_secs_f64() * 1e6);
        let (_, rtt) = vm.api_ok("PUT", "/plugins/detach", Some(json!({ "name": name })))?;
        det_rtt.push(rtt.as_secs_f64() * 1e6);
    }
    let span = t.elapsed();
    let with = stall_after(&vm, vm.mark())?;
    reset()?;
    std::thread::sleep(span);
    let without = stall_after(&vm, vm.mark())?;
    check_memory(&vm)?;
    Ok(Latency {
        plugin: plugin.file_name().unwrap().to_string_lossy().into(),
        iterations: n,
        first_attach_us: first,
        attach_server_p50_us: percentile(&mut att_srv, 0.5),
        attach_server_p99_us: percentile(&mut att_srv, 0.99),
        attach_rtt_p50_us: percentile(&mut att_rtt, 0.5),
        attach_rtt_p99_us: percentile(&mut att_rtt, 0.99),
        detach_rtt_p50_us: percentile(&mut det_rtt, 0.5),
        detach_rtt_p99_us: percentile(&mut det_rtt, 0.99),
        guest_max_stall_us: with,
        guest_max_stall_without_us: without,
    })
}

/// The guest verifies its memory; anything but bad=0 fails the benchmark.
fn check_memory(vm: &Vm) -> anyhow::Result<()> {
    let from = vm.mark();
    vm.api_ok("PUT", "/guest/command", Some(json!({"command": "verify"})))?;
    let l = vm.wait_lines("SPANGUEST verify", 1, from, Duration::from_secs(30))?;
    if field(&l[0], "bad") != Some(0) {
        bail!("guest memory damaged: {}", l[0]);
    }
    Ok(())
}

#[derive(Serialize)]
struct Dispatch {
    variant: String,
    ns_per_exit_median: f64,
    samples: Vec<u64>,
    /// Server-side attach time, µs (a fresh VMM: the component comes from the artifact cache
    /// when an earlier run compiled it).
    #[serde(skip_serializing_if = "Option::is_none")]
    attach_us: Option<f64>,
    /// The service's Wasm linear memory right after attach and after the storm, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes_attached: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes_after: Option<u64>,
    /// Events the service counted over the storm.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<u64>,
    /// What went wrong with the service during the storm (e.g. detached at its memory limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

/// Which exits a dispatch measurement storms: port writes (`exits` workload) or MMIO stores
/// above guest RAM (`mmio` workload).
#[derive(Clone, Copy, PartialEq)]
enum Storm {
    Port,
    Mmio,
}

impl Storm {
    fn cmdline(self) -> &'static str {
        match self {
            Storm::Port => "workload=exits exits=20000 report_ms=0",
            Storm::Mmio => "workload=mmio exits=20000 report_ms=0",
        }
    }

    /// exit-stats' attach config claiming the storm target, and its counter of it.
    fn claim(self) -> (&'static str, &'static str) {
        match self {
            Storm::Port => (STORM, "writes"),
            Storm::Mmio => (MMIO_STORM, "mmio_writes"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Storm::Port => "port",
            Storm::Mmio => "MMIO",
        }
    }
}

/// spanguest's MMIO storm target (63 GiB) claimed by exit-stats.
const MMIO_STORM: &str = r#"{"mmio_base":"0xfc0000000","mmio_len":4096}"#;

/// The storm workload's cost per exit, with the storm target handled by: nobody (plain exit),
/// the Wasm or the native exit-stats service; and under QEMU for reference.
fn dispatch(
    bin: &Path,
    elf: &Path,
    plugins: &Path,
    batches: usize,
    storm: Storm,
) -> anyhow::Result<Vec<Dispatch>> {
    let cmdline = storm.cmdline();
    let (claim, counter) = storm.claim();
    let mut out = Vec::new();
    let mut variants = vec![
        ("spanvmm, no service", None, false),
        ("spanvmm, Wasm exit-stats", Some("exit-stats.wasm"), false),
        (
            "spanvmm, native exit-stats",
            Some("libexit-stats.so"),
            false,
        ),
        (
            "spanvmm, Wasm exit-stats, async writes",
            Some("exit-stats.wasm"),
            true,
        ),
        (
            "spanvmm, native exit-stats, async writes",
            Some("libexit-stats.so"),
            true,
        ),
    ];
    if storm == Storm::Port {
        // The example service in each language (plugins/examples/port-counter, same config).
        variants.extend([
            (
                "spanvmm, Wasm port-counter (Rust)",
                Some("port-counter-rust.wasm"),
                false,
            ),
            (
                "spanvmm, Wasm port-counter (Python)",
                Some("port-counter-python.wasm"),
                false,
            ),
            (
                "spanvmm, Wasm port-counter (JavaScript)",
                Some("port-counter-js.wasm"),
                false,
            ),
        ]);
    }
    for (variant, plugin, asynchronous) in variants {
        let service = if plugin.is_some_and(|p| p.starts_with("port-counter")) {
            "port-counter"
        } else {
            "exit-stats"
        };
        let variant = format!("{} {variant}", storm.label());
        let vm = spawn_vm(bin, elf, cmdline, 128, "disp")?;
        let mut attach_us = None;
        let mut memory_bytes_attached = None;
        if let Some(p) = plugin {
            let body = json!({"path": plugins.join(p), "config": claim, "async_port_writes": asynchronous});
            let (v, _) = vm.api_ok("PUT", "/plugins/attach", Some(body))?;
            attach_us = v["attach_us"].as_f64();
            memory_bytes_attached = service_stat(&vm, service, "memory_bytes");
        }
        // The first batch may straddle the attach: skip it.
        let from = vm.mark();
        let lines = vm.wait_lines(
            "SPANGUEST exits",
            batches + 1,
            from,
            Duration::from_secs(120),
        )?;
        let samples: Vec<u64> = lines[1..]
            .iter()
            .filter_map(|l| field(l, "ns_per_exit"))
            .collect();
        let mut failure = None;
        let memory_bytes_after = plugin.and_then(|_| service_stat(&vm, service, "memory_bytes"));
        let events = plugin.and_then(|_| service_stat(&vm, service, "events"));
        if let Some(p) = plugin {
            let stats = vm.api_ok(
                "PUT",
                "/plugins/call",
                Some(json!({"name": service, "method": "stats"})),
            );
            match stats {
                Ok((v, _)) if v["result"][counter].as_u64().unwrap_or(0) == 0 => {
                    bail!("{p} saw no exits: the measurement would be meaningless")
                }
                Ok(_) => {}
                // An interpreted example may be detached during the storm (its memory limit):
                // the row says so instead of ending the run.
                Err(e) if service == "port-counter" => failure = Some(format!("{e:#}")),
                Err(e) => return Err(e),
            }
        }
        out.push(Dispatch {
            variant,
            ns_per_exit_median: median(&mut samples.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            samples,
            attach_us,
            memory_bytes_attached,
            memory_bytes_after,
            events,
            failure,
        });
    }
    // QEMU, same ELF, same command line: its plain port-exit cost.
    let mut q = Command::new("qemu-system-x86_64")
        .args([
            "-enable-kvm",
            "-M",
            "microvm",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-serial", "stdio", "-kernel"])
        .arg(elf)
        .args(["-append", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    let lines = collect(q.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let samples = loop {
        let got: Vec<u64> = lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("SPANGUEST exits"))
            .filter_map(|l| field(l, "ns_per_exit"))
            .collect();
        if got.len() > batches {
            break got[1..].to_vec();
        }
        if Instant::now() > deadline {
            let _ = q.kill();
            bail!("QEMU printed no exits lines");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = q.kill();
    let _ = q.wait();
    out.push(Dispatch {
        variant: format!("{} qemu-microvm, no service", storm.label()),
        ns_per_exit_median: median(&mut samples.iter().map(|&v| v as f64).collect::<Vec<_>>()),
        samples,
        attach_us: None,
        memory_bytes_attached: None,
        memory_bytes_after: None,
        events: None,
        failure: None,
    });
    Ok(out)
}

/// A counter of the attached (or failed) service `name` from `GET /plugins`.
fn service_stat(vm: &Vm, name: &str, stat: &str) -> Option<u64> {
    let (list, _) = vm.api_ok("GET", "/plugins", None).ok()?;
    list.as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["stats"][stat].as_u64())
}

#[derive(Serialize)]
struct Throughput {
    variant: String,
    pages_per_s_median: f64,
}

/// Pages/s a guest dirtying as fast as it can achieves, with nothing attached and with a
/// service attached that subscribes to nothing (introspect without watches).
fn throughput(bin: &Path, elf: &Path, plugins: &Path) -> anyhow::Result<Vec<Throughput>> {
    let mut out = Vec::new();
    for (variant, plugin) in [
        ("no service", None),
        ("introspect attached, unsubscribed", Some("introspect.wasm")),
    ] {
        let vm = spawn_vm(
            bin,
            elf,
            "workload=dirty mib=64 rate=0 write=64 report_ms=250",
            256,
            "thr",
        )?;
        if let Some(p) = plugin {
            vm.api_ok(
                "PUT",
                "/plugins/attach",
                Some(json!({"path": plugins.join(p)})),
            )?;
        }
        let from = vm.mark();
        let lines = vm.wait_lines("SPANGUEST stat", 10, from, Duration::from_secs(30))?;
        let d: Vec<u64> = lines.iter().filter_map(|l| field(l, "dirtied")).collect();
        let mut rates: Vec<f64> = d.windows(2).map(|w| (w[1] - w[0]) as f64 / 0.25).collect();
        out.push(Throughput {
            variant: variant.into(),
            pages_per_s_median: median(&mut rates),
        });
    }
    Ok(out)
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    unix_time: u64,
    attach_detach: Vec<Latency>,
    dispatch: Vec<Dispatch>,
    wasm_dispatch_ns_above_plain_exit: f64,
    native_dispatch_ns_above_plain_exit: f64,
    wasm_async_dispatch_ns_above_plain_exit: f64,
    native_async_dispatch_ns_above_plain_exit: f64,
    mmio_dispatch: Vec<Dispatch>,
    mmio_wasm_dispatch_ns_above_plain_exit: f64,
    mmio_native_dispatch_ns_above_plain_exit: f64,
    throughput: Vec<Throughput>,
    goals: Value,
}

/// Runs the whole benchmark and writes `out`.
pub fn run(bin: &Path, elf: &Path, plugins: &Path, out: &Path) -> anyhow::Result<()> {
    let mut lat = Vec::new();
    for p in ["exit-stats.wasm", "libexit-stats.so"] {
        let l = attach_latency(bin, elf, &plugins.join(p), 100)?;
        eprintln!(
            "{p}: attach p50 {:.0} µs (server {:.0}), p99 {:.0} µs; detach p50 {:.0} µs; guest stall {} µs (quiet: {} µs)",
            l.attach_rtt_p50_us, l.attach_server_p50_us, l.attach_rtt_p99_us, l.detach_rtt_p50_us,
            l.guest_max_stall_us, l.guest_max_stall_without_us
        );
        lat.push(l);
    }
    let disp = dispatch(bin, elf, plugins, 8, Storm::Port)?;
    let mmio = dispatch(bin, elf, plugins, 8, Storm::Mmio)?;
    for d in disp.iter().chain(&mmio) {
        let mib = |b: Option<u64>| b.map(|b| format!("{:.1}", b as f64 / 1048576.0));
        eprintln!(
            "{:>28}: {:.0} ns per exit{}{}{}",
            d.variant,
            d.ns_per_exit_median,
            d.attach_us
                .map(|a| format!(", attach {a:.0} µs"))
                .unwrap_or_default(),
            match (mib(d.memory_bytes_attached), mib(d.memory_bytes_after)) {
                (Some(a), Some(b)) => format!(", memory {a} -> {b} MiB"),
                _ => String::new(),
            },
            d.failure
                .as_ref()
                .map(|f| format!(", FAILED: {f}"))
                .unwrap_or_default()
        );
    }
    let thr = throughput(bin, elf, plugins)?;
    for t in &thr {
        eprintln!("{:>36}: {:.0} pages/s", t.variant, t.pages_per_s_median);
    }
    let wasm = disp[1].ns_per_exit_median - disp[0].ns_per_exit_median;
    let native = disp[2].ns_per_exit_median - disp[0].ns_per_exit_median;
    let wasm_async = disp[3].ns_per_exit_median - disp[0].ns_per_exit_median;
    let native_async = disp[4].ns_per_exit_median - disp[0].ns_per_exit_median;
    let mmio_wasm = mmio[1].ns_per_exit_median - mmio[0].ns_per_exit_median;
    let mmio_native = mmio[2].ns_per_exit_median - mmio[0].ns_per_exit_median;
    let report = Report {
        benchmark: "services",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        goals: json!({
            "attach_p50_under_1ms": lat.iter().all(|l| l.attach_rtt_p50_us < 1000.0),
            "sync_dispatch_at_most_1us_above_exit": wasm <= 1000.0 && native <= 1000.0,
            "async_dispatch_at_most_1us_above_exit": wasm_async <= 1000.0 && native_async <= 1000.0,
            "unsubscribed_within_noise": (thr[1].pages_per_s_median / thr[0].pages_per_s_median - 1.0).abs() < 0.05,
        }),
        attach_detach: lat,
        dispatch: disp,
        mmio_dispatch: mmio,
        mmio_wasm_dispatch_ns_above_plain_exit: mmio_wasm,
        mmio_native_dispatch_ns_above_plain_exit: mmio_native,
        wasm_dispatch_ns_above_plain_exit: wasm,
        native_dispatch_ns_above_plain_exit: native,
        wasm_async_dispatch_ns_above_plain_exit: wasm_async,
        native_async_dispatch_ns_above_plain_exit: native_async,
        throughput: thr,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[derive(Serialize)]
struct AllocRow {
    /// `SPANVMM_WASM_ALLOC` of the VMM (`none`: no service attached, the plain exit).
    alloc: String,
    /// Per run: the median ns per exit of its batches.
    ns_per_exit: Vec<f64>,
    ns_per_exit_median: f64,
    /// Per run: this row's median minus the same run's plain exit.
    above_plain: Vec<f64>,
    above_plain_median: f64,
    above_plain_min: f64,
    above_plain_max: f64,
}

/// Synchronous Wasm dispatch cost (exit-stats on the port storm) by how wasmtime allocates
/// linear memories (`SPANVMM_WASM_ALLOC`: pooling, the default; on-demand; on-demand on 2 MiB
/// transparent huge pages), `runs` rounds, each round one fresh VM per variant and one
/// without a service, in turn (the plain exit moves by about a µs between VMs: several rounds
/// and the same round's plain exit as the reference).
pub fn alloc_compare(
    bin: &Path,
    elf: &Path,
    plugins: &Path,
    runs: usize,
    batches: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let allocs = ["none", "pooling", "ondemand", "thp"];
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); allocs.len()];
    for run in 0..runs {
        for (i, alloc) in allocs.iter().enumerate() {
            let env: &[(&str, &str)] = if *alloc == "none" {
                &[]
            } else {
                &[("SPANVMM_WASM_ALLOC", alloc)]
            };
            let vm = spawn_vm_env(bin, elf, Storm::Port.cmdline(), 128, "alloc", env)?;
            if *alloc != "none" {
                let body = json!({"path": plugins.join("exit-stats.wasm"), "config": STORM});
                vm.api_ok("PUT", "/plugins/attach", Some(body))?;
            }
            let from = vm.mark();
            let lines = vm.wait_lines(
                "SPANGUEST exits",
                batches + 1,
                from,
                Duration::from_secs(120),
            )?;
            let mut samples: Vec<f64> = lines[1..]
                .iter()
                .filter_map(|l| field(l, "ns_per_exit"))
                .map(|v| v as f64)
                .collect();
            if *alloc != "none" && service_stat(&vm, "exit-stats", "events").unwrap_or(0) == 0 {
                bail!("exit-stats ({alloc}) saw no exits");
            }
            let m = median(&mut samples);
            eprintln!("run {run}: {alloc:>8}: {m:.0} ns per exit");
            per[i].push(m);
        }
    }
    let rows: Vec<AllocRow> = allocs
        .iter()
        .zip(&per)
        .map(|(alloc, v)| {
            let mut above: Vec<f64> = v.iter().zip(&per[0]).map(|(a, b)| a - b).collect();
            let (lo, hi) = above
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            AllocRow {
                alloc: alloc.to_string(),
                ns_per_exit: v.clone(),
                ns_per_exit_median: median(&mut v.clone()),
                above_plain_median: median(&mut above.clone()),
                above_plain_min: lo,
                above_plain_max: hi,
                above_plain: std::mem::take(&mut above),
            }
        })
        .collect();
    for r in &rows {
        eprintln!(
            "{:>8}: {:.0} ns per exit, {:+.0} ns above the plain exit ({:+.0} to {:+.0})",
            r.alloc,
            r.ns_per_exit_median,
            r.above_plain_median,
            r.above_plain_min,
            r.above_plain_max
        );
    }
    let report = json!({
        "benchmark": "services-alloc",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "runs": runs,
        "batches": batches,
        "rows": rows,
    });
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
