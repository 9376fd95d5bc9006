//! `spanvmm-bench scatter-gather`: the Scatter-Gather paper's Fig. 9 analogue (issue #18).
//! A source and a slow destination: network namespaces, the source's link tbf-shaped to
//! `src_mbit`, the destination's to a sixth of it; two `redis-server` intermediaries in the
//! root namespace, reached by the source over its own (fast) link and by the destination over
//! its (slow) one. For an idle and a busy guest: eviction time (from `ctl migrate` until the
//! source holds nothing the destination lacks and exits) and total time (until the
//! destination has every page) of spanvmm's pre-copy, post-copy and Scatter-Gather, and of
//! QEMU's pre-copy and post-copy on the same links; rows interleaved run by run, each figure
//! the median of the runs with its spread. Pre-copy's eviction is its total time; post-copy's
//! too (the source is free once its last page is out, which is when the destination has it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use netlab::RedisServer;
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{stat, Stat};
use crate::migration::{
    guest_cmdline, qemu_migrate, qemu_migrate_with, Guest, Hosts, Link, Outcome, QemuEngine,
    QemuHook,
};
use crate::migration_spanvmm::spanvmm_migrate_with;
use crate::rounds::{col, interleave, no_extra, Case, Table};

/// One measured migration.
#[derive(Serialize)]
struct Sample {
    eviction_ms: u64,
    total_ms: u64,
    /// Bytes on the migration link (source → destination).
    link_bytes: u64,
    /// Scatter-Gather: source → intermediaries, intermediaries → destination, dedup hits.
    #[serde(skip_serializing_if = "Option::is_none")]
    scatter: Option<Value>,
    verify_bad: Option<u64>,
}

/// Intermediaries in the root namespace, bound on the source's gateway address.
fn intermediaries(hosts: &Hosts, dir: &Path) -> anyhow::Result<Vec<RedisServer>> {
    let ip = hosts
        .gateway("src")
        .context("scatter-gather needs the namespace hosts (a shaped link)")?;
    (0..2)
        .map(|i| {
            let port = 47_300 + i;
            RedisServer::start_with(
                std::process::Command::new("redis-server"),
                ip.into(),
                port,
                &dir.join(format!("redis-{i}")),
            )
            .context("start redis-server")
        })
        .collect()
}

/// Runs `runs` rounds of every row and writes `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    src_mbit: u64,
    runs: usize,
    workloads: &[&str],
    engines: Option<&str>,
    out: &Path,
) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    const ROWS: [(&str, &str); 5] = [
        ("spanvmm", "scatter-gather"),
        ("spanvmm", "postcopy"),
        ("spanvmm", "precopy"),
        ("qemu", "postcopy"),
        ("qemu", "precopy"),
    ];
    // `--engines`: the rows' names, QEMU's prefixed (`scatter-gather,qemu-precopy`).
    let name = |(vmm, engine): (&str, &str)| {
        if vmm == "qemu" {
            format!("qemu-{engine}")
        } else {
            engine.to_string()
        }
    };
    let rows: Vec<(&str, &str)> = match engines {
        None => ROWS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|e| {
                ROWS.into_iter().find(|&r| name(r) == e).with_context(|| {
                    format!("--engines: {e} is not one of {}", ROWS.map(name).join(","))
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let link = Link::Asymmetric {
        src_mbit,
        dst_mbit: src_mbit / 6,
        rtt_ms: 2,
    };
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-sg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut keys = Vec::new();
    for &w in workloads {
        for &(vmm, engine) in &rows {
            keys.push((vmm, engine, w));
        }
    }
    // Four times what the memory needs on the slow link, at least two minutes.
    let limit = Duration::from_secs((mem * 8 * 4 / (src_mbit / 6)).max(120));
    let one = |&(vmm, engine, workload): &(&str, &str, &str)| -> anyhow::Result<Sample> {
        if vmm == "qemu" {
            let e = match engine {
                "precopy" => QemuEngine::PrecopyPrealloc,
                _ => QemuEngine::Postcopy,
            };
            let o = qemu_migrate(elf, mem, workload, e, link, limit, None)?;
            clean(&o)?;
            Ok(Sample {
                eviction_ms: o.total_ms,
                total_ms: o.total_ms,
                link_bytes: o.bytes,
                scatter: None,
                verify_bad: o.verify_bad,
            })
        } else {
            let sg = engine == "scatter-gather";
            let rdir = dir.clone();
            let prepare =
                move |hosts: &Hosts| -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)> {
                    if !sg {
                        return Ok((Vec::new(), Box::new(())));
                    }
                    let srv = intermediaries(hosts, &rdir)?;
                    let addrs: Vec<SocketAddr> = srv.iter().map(|s| s.addr()).collect();
                    let config = json!({
                        "intermediaries": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        "replicas": 1,
                    });
                    Ok((vec!["--config".into(), config.to_string()], Box::new(srv)))
                };
            let run = spanvmm_migrate_with(
                bin, plugins, elf, mem, workload, engine, link, limit, &prepare,
            )?;
            let o = &run.outcome;
            let r = &run.report;
            let total = run.dest_done_ms.unwrap_or(o.total_ms);
            let scatter = sg.then(|| {
                let read: u64 = run.dest["gather"]["store"]["intermediaries"]
                    .as_array()
                    .map(|a| a.iter().map(|i| i["wire_in"].as_u64().unwrap_or(0)).sum())
                    .unwrap_or(0);
                json!({
                    "direct_pages": r["scatter"]["direct_pages"],
                    "scattered_pages": r["scatter"]["scattered_pages"],
                    "zero_pages": r["scatter"]["zero_pages"],
                    "src_to_intermediaries_bytes": r["scatter"]["bytes_to_intermediaries"],
                    "intermediaries_to_dst_bytes": read,
                    "dedup_hits": r["scatter"]["dedup_hits"],
                })
            });
            clean(o)?;
            anyhow::ensure!(
                run.dest_done_ms.is_some(),
                "the destination never completed"
            );
            Ok(Sample {
                // The source's migration ends when it holds nothing the destination lacks
                // (Scatter-Gather: every location sent).
                eviction_ms: o.total_ms,
                total_ms: total.max(o.total_ms),
                link_bytes: o.bytes,
                scatter,
                verify_bad: o.verify_bad,
            })
        }
    };
    let cases = interleave(
        runs,
        keys,
        |&(vmm, engine, workload): &(&str, &str, &str)| {
            format!("{vmm:>7} {engine:>14} {workload:>5}")
        },
        one,
        |s: &Sample| {
            format!(
                "eviction {} ms, total {} ms, link {} MiB {}",
                s.eviction_ms,
                s.total_ms,
                s.link_bytes >> 20,
                s.scatter
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            )
        },
    );
    let rows = Table {
        key_heads: &["workload", "vmm", "engine"],
        key_cells: &|&(vmm, engine, workload): &(&str, &str, &str)| {
            vec![workload.into(), vmm.into(), engine.into()]
        },
        key_json: &|&(vmm, engine, workload): &(&str, &str, &str)| {
            json!({"vmm": vmm, "engine": engine, "workload": workload})
        },
        columns: vec![
            col("eviction_ms", "eviction s", 1e3, 1, |s: &Sample| {
                Some(s.eviction_ms as f64)
            }),
            col("total_ms", "total s", 1e3, 1, |s: &Sample| Some(s.total_ms as f64)),
        ],
        extra_heads: &[],
        extra: &no_extra,
    }
    .rows(&cases)?;
    let report = json!({
        "benchmark": "scatter-gather",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "runs": runs,
        "notes": "Fig. 9 analogue: the destination's link at 1/6 of the source's. Eviction: from ctl migrate until the source's migration ends (pre-copy and post-copy: every page at the destination; Scatter-Gather: every page at the destination or at an intermediary). Total: until the destination has every page. Two redis-server intermediaries in the root namespace, one copy of each page. QEMU pre-copy into a -mem-prealloc destination, post-copy switched at once.",
        "goals": {
            "eviction": "Scatter-Gather ≥ 5× shorter than pre-copy and post-copy",
            "total": "Scatter-Gather ≤ 1.15× post-copy",
        },
        "rows": rows,
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Table 1 analogue: two `kv` guests on the destination host, loaded by `redis-benchmark`
/// from a client host whose traffic crosses the destination's (slow) link, as the gather's
/// does; a VM migrates in by Scatter-Gather (with and without the gather cap), spanvmm
/// post-copy and pre-copy. Per row: the co-located guests' p99 before the migration (quiet)
/// and during it, and the migrating VM's eviction and total time.
mod colocated {
    use std::io::{BufRead, BufReader};
    use std::net::Ipv4Addr;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};
    use netlab::NetLab;

    use crate::migration::Hosts;

    /// One `redis-benchmark` run against one guest: when, its p99, and whether it failed
    /// (an error reply, a reset connection: the client's errors, which must stay 0).
    #[derive(Debug, Clone, Copy)]
    pub struct Probe {
        pub start: Instant,
        pub end: Instant,
        pub p99_ms: Option<f64>,
        pub failed: bool,
    }

    /// The guests, their load, and the route to them; dropping it stops them all.
    pub struct Colocated {
        guests: Vec<Child>,
        stop: Arc<AtomicBool>,
        load: Vec<JoinHandle<()>>,
        route: String,
    }

    const GUESTS: usize = 2;

    /// Starts the guests in host `dst` of `hosts` on a bridge of their own (routed through
    /// the destination host: the client's traffic crosses its link), waits until they serve,
    /// and loads them from host `client` of `client_lab`; each finished run lands in `probes`.
    pub fn start(
        hosts: &Hosts,
        client_lab: &NetLab,
        bin: &std::path::Path,
        elf: &std::path::Path,
        probes: Arc<Mutex<Vec<Probe>>>,
    ) -> anyhow::Result<Colocated> {
        let std::net::IpAddr::V4(dst_ip) = hosts.listen.ip() else {
            bail!("the destination host has no IPv4 address");
        };
        // A subnet per lab (the destination's own number), so labs side by side never clash.
        let net = dst_ip.octets()[2];
        let gw = Ipv4Addr::new(10, 79, net, 1);
        let run = |mut c: Command, what: &str| -> anyhow::Result<()> {
            let out = c.stdin(Stdio::null()).output().context(what.to_string())?;
            if !out.status.success() {
                bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        let ns = |args: &str| {
            let a: Vec<&str> = args.split(' ').collect();
            let mut c = hosts.command("dst", a[0]);
            c.args(&a[1..]);
            run(c, args)
        };
        ns("sysctl -qw net.ipv4.ip_forward=1")?;
        ns("ip link add sgbr0 type bridge")?;
        ns(&format!("ip addr add {gw}/24 dev sgbr0"))?;
        ns("ip link set sgbr0 up")?;
        for i in 0..GUESTS {
            ns(&format!("ip tuntap add dev sgtap{i} mode tap"))?;
            ns(&format!("ip link set sgtap{i} master sgbr0"))?;
            ns(&format!("ip link set sgtap{i} up"))?;
        }
        let route = format!("10.79.{net}.0/24");
        let mut c = Command::new("ip");
        c.args(["route", "replace", &route, "via", &dst_ip.to_string()]);
        run(c, "route to the co-located guests")?;
        let mut col = Colocated {
            guests: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            load: Vec::new(),
            route,
        };
        let mut ips = Vec::new();
        for i in 0..GUESTS {
            let ip = Ipv4Addr::new(10, 79, net, 2 + i as u8);
            let mut c = hosts.command("dst", bin.to_str().context("binary path")?);
            c.arg("run").arg("--kernel").arg(elf).args([
                "--cmdline",
                &format!("workload=kv mib=16 ip={ip}/24 gw={gw} report_ms=1000"),
                "--memory",
                "64",
                "--net",
                &format!("tap=sgtap{i},mac=52:54:00:5a:79:{:02x}", i + 2),
            ]);
            let mut child = c
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("start a co-located guest")?;
            let out = child.stdout.take().context("guest stdout")?;
            col.guests.push(child);
            // Wait for its network to be up, then keep draining its console.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.contains("SPANGUEST net ") {
                        if let Some(t) = tx.take() {
                            let _ = t.send(());
                        }
                    }
                }
            });
            rx.recv_timeout(Duration::from_secs(60))
                .context("a co-located guest's network did not come up")?;
            ips.push(ip);
        }
        for ip in ips {
            let (stop, probes) = (col.stop.clone(), probes.clone());
            let client = client_lab.command("client", "timeout");
            let prog = client.get_program().to_owned();
            let pre: Vec<_> = client.get_args().map(|a| a.to_owned()).collect();
            col.load.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let out = Command::new(&prog)
                        .args(&pre)
                        .args(["20", "redis-benchmark", "-h", &ip.to_string(), "-p", "6379"])
                        .args(["-t", "get", "-c", "2", "-P", "1", "-n", "1000", "--csv"])
                        .stdin(Stdio::null())
                        .output();
                    let Ok(out) = out else { return };
                    // A run cut by the end of the benchmark is not a client error.
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let run = crate::redis_client::read(&out);
                    let p99_ms = run.test("GET").map(|f| f.p99_ms);
                    probes.lock().unwrap().push(Probe {
                        start,
                        end: Instant::now(),
                        p99_ms,
                        failed: run.error.is_some(),
                    });
                    if p99_ms.is_none() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }));
        }
        Ok(col)
    }

    impl Drop for Colocated {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.load.drain(..) {
                let _ = t.join();
            }
            for g in &mut self.guests {
                let _ = g.kill();
                let _ = g.wait();
            }
            // The bridge and taps go with the destination's namespace.
            let _ = Command::new("ip")
                .args(["route", "del", &self.route])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One Table 1 run: the migrating VM's times and what its co-located neighbours saw.
#[derive(Serialize)]
struct Neighbours {
    eviction_ms: u64,
    total_ms: u64,
    /// Per `redis-benchmark` run its p99: over the runs that ended before the migration
    /// (quiet) and those wholly inside it (during).
    quiet_p99_ms: Stat,
    during_p99_ms: Stat,
    quiet_runs: usize,
    during_runs: usize,
    /// Client runs that overlapped the migration and failed.
    client_errors: usize,
}

impl Neighbours {
    /// The probes of one migration that began at `started` and ended `total_ms` later.
    fn read(p: &[colocated::Probe], started: Instant, eviction_ms: u64, total_ms: u64) -> Self {
        let end = started + Duration::from_millis(total_ms);
        let quiet: Vec<f64> = p
            .iter()
            .filter(|x| x.end <= started)
            .filter_map(|x| x.p99_ms)
            .collect();
        let during: Vec<f64> = p
            .iter()
            .filter(|x| x.start >= started && x.end <= end)
            .filter_map(|x| x.p99_ms)
            .collect();
        Neighbours {
            eviction_ms,
            total_ms,
            quiet_p99_ms: stat_or_nan(quiet.iter().copied()),
            during_p99_ms: stat_or_nan(during.iter().copied()),
            quiet_runs: quiet.len(),
            during_runs: during.len(),
            client_errors: p
                .iter()
                .filter(|x| x.failed && x.end >= started && x.start <= end)
                .count(),
        }
    }
}

/// An error unless the migration completed and its guest verified clean at the destination.
fn clean(o: &Outcome) -> anyhow::Result<()> {
    anyhow::ensure!(
        o.completed && o.verify_bad == Some(0),
        "{} (verify bad={:?})",
        o.note,
        o.verify_bad
    );
    Ok(())
}

/// spanvmm pre-copy's downtime budget (the migration policy's default `downtime_ms`), given to
/// QEMU as its `downtime-limit` so both stop and copy under the same one.
const DOWNTIME_BUDGET_MS: u64 = 2;

/// The Table 1 analogue: see [`colocated`]. `gather_rate`: the cap of the capped row, bytes/s.
#[allow(clippy::too_many_arguments)]
pub fn table1(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    src_mbit: u64,
    runs: usize,
    gather_rate: u64,
    out: &Path,
) -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    std::process::Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .context("redis-benchmark is not installed")?;
    let link = Link::Asymmetric {
        src_mbit,
        dst_mbit: src_mbit / 6,
        rtt_ms: 2,
    };
    let client_lab = netlab::NetLab::new("sgc", &["client"])?;
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-sgt1-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys: Vec<(&str, &str, u64)> = vec![
        ("spanvmm", "scatter-gather", 0),
        ("spanvmm", "scatter-gather", gather_rate),
        ("spanvmm", "postcopy", 0),
        ("spanvmm", "precopy", 0),
        ("qemu", "postcopy", 0),
        ("qemu", "precopy", 0),
    ];
    let limit = Duration::from_secs((mem * 8 * 4 / (src_mbit / 6)).max(120));
    let label = |&(vmm, engine, rate): &(&str, &str, u64)| {
        if rate > 0 {
            format!("{vmm} {engine} (gather_rate {:.1} MB/s)", rate as f64 / 1e6)
        } else {
            format!("{vmm} {engine}")
        }
    };
    let one = |&(vmm, engine, rate): &(&str, &str, u64)| -> anyhow::Result<Neighbours> {
        let probes = Arc::new(Mutex::new(Vec::<colocated::Probe>::new()));
        let (p2, cl) = (probes.clone(), &client_lab);
        if vmm == "qemu" {
            // The same neighbours (spanvmm `kv` guests) on the destination host; QEMU at its
            // best: pre-copy into a `-mem-prealloc` destination, post-copy against post-copy,
            // the same downtime budget as spanvmm's pre-copy.
            let e = match engine {
                "precopy" => QemuEngine::PrecopyPrealloc,
                _ => QemuEngine::Postcopy,
            };
            let prepare = move |hosts: &Hosts| -> anyhow::Result<Box<dyn std::any::Any>> {
                Ok(Box::new(colocated::start(hosts, cl, bin, elf, p2.clone())?))
            };
            let hook = QemuHook {
                prepare: Some(&prepare),
                downtime_limit_ms: Some(DOWNTIME_BUDGET_MS),
            };
            let guest = Guest {
                workload: "idle",
                cmdline: &guest_cmdline(mem, "idle"),
            };
            let run = qemu_migrate_with(elf, mem, guest, e, link, limit, None, &hook)?;
            let o = &run.outcome;
            clean(o)?;
            // QEMU's source is free when its migration completes, which is when the
            // destination has every page (post-copy too).
            let p = probes.lock().unwrap().clone();
            return Ok(Neighbours::read(&p, run.started, o.total_ms, o.total_ms));
        }
        let sg = engine == "scatter-gather";
        let rdir = dir.clone();
        let prepare =
            move |hosts: &Hosts| -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)> {
                let col = colocated::start(hosts, cl, bin, elf, p2.clone())?;
                if !sg {
                    return Ok((Vec::new(), Box::new(col)));
                }
                let srv = intermediaries(hosts, &rdir)?;
                let mut config = json!({
                    "intermediaries": srv.iter().map(|s| s.addr().to_string()).collect::<Vec<_>>(),
                });
                if rate > 0 {
                    config["gather_rate"] = json!(rate);
                }
                // The guests go before the intermediaries (drop order: the tuple's).
                Ok((
                    vec!["--config".into(), config.to_string()],
                    Box::new((col, srv)),
                ))
            };
        let run = spanvmm_migrate_with(
            bin, plugins, elf, mem, "idle", engine, link, limit, &prepare,
        )?;
        let o = &run.outcome;
        clean(o)?;
        let total = run.dest_done_ms.unwrap_or(o.total_ms).max(o.total_ms);
        let p = probes.lock().unwrap().clone();
        Ok(Neighbours::read(&p, run.started, o.total_ms, total))
    };
    let cases = interleave(
        runs,
        keys,
        |k| format!("{:>44}", label(k)),
        one,
        |n: &Neighbours| {
            format!(
            "eviction {} ms, total {} ms; co-located p99 quiet {:.2} ms ({} runs), during {:.2} ms (max {:.2}, {} runs), {} client errors",
            n.eviction_ms,
            n.total_ms,
            n.quiet_p99_ms.median,
            n.quiet_runs,
            n.during_p99_ms.median,
            n.during_p99_ms.max,
            n.during_runs,
            n.client_errors
        )
        },
    );
    let rows = Table {
        key_heads: &["row"],
        key_cells: &|k: &(&str, &str, u64)| vec![label(k)],
        key_json: &|&(vmm, engine, rate): &(&str, &str, u64)| {
            json!({"vmm": vmm, "engine": engine, "gather_rate": rate})
        },
        columns: vec![
            col("eviction_ms", "eviction s", 1e3, 1, |n: &Neighbours| {
                Some(n.eviction_ms as f64)
            }),
            col("total_ms", "total s", 1e3, 1, |n: &Neighbours| {
                Some(n.total_ms as f64)
            }),
            col("quiet_p99_ms", "co-located p99 quiet ms", 1.0, 2, |n: &Neighbours| {
                Some(n.quiet_p99_ms.median)
            }),
            col("during_p99_ms", "during ms", 1.0, 2, |n: &Neighbours| {
                Some(n.during_p99_ms.median)
            }),
            col("client_errors", "client errors", 1.0, 0, |n: &Neighbours| {
                Some(n.client_errors as f64)
            }),
        ],
        extra_heads: &["during / quiet"],
        extra: &|c: &Case<(&str, &str, u64), Neighbours>| {
            let q = c.median(|n| Some(n.quiet_p99_ms.median));
            let d = c.median(|n| Some(n.during_p99_ms.median));
            vec![format!("{:.1}×", d / q)]
        },
    }
    .rows(&cases)?;
    let report = json!({
        "benchmark": "scatter-gather table1",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "runs": runs,
        "notes": "Table 1 analogue: two kv guests (spanvmm, 64 MiB) on the destination host, each loaded by redis-benchmark -t get -c 2 -P 1 -n 1000 in a loop from a client host whose traffic crosses the destination's link; p99 per redis-benchmark run, median over the runs before the migration (quiet) and over those wholly inside it (during: from the migrate command to the destination's last page). The migrating VM: idle. spanvmm Scatter-Gather through two redis-server intermediaries in the root namespace, with and without the gather cap; spanvmm and QEMU post-copy and pre-copy (QEMU pre-copy into a -mem-prealloc destination; QEMU's downtime-limit at spanvmm pre-copy's 2 ms budget). client_errors: failed client runs that overlapped the migration.",
        "goal": "with the gather cap, the co-located p99 during the migration within 2× quiet, SG's eviction time not growing",
        "rows": rows,
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// [`stat`] of what is there; not a number where nothing is (no run fell in the window).
fn stat_or_nan(v: impl Iterator<Item = f64>) -> Stat {
    let v: Vec<f64> = v.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    stat(v.into_iter())
}

/// Scale rows: `vms` VMs evicted at once (each from a source host of its own to a
/// destination of its own, links as in the Fig. 9 analogue) through the same
/// `intermediaries` Redis servers: eviction and total time, and each intermediary's load
/// (bytes stored, and that over the eviction time).
#[allow(clippy::too_many_arguments)]
pub fn scale(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    src_mbit: u64,
    vm_counts: &[usize],
    inter_counts: &[usize],
    out: &Path,
) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    let link = Link::Asymmetric {
        src_mbit,
        dst_mbit: src_mbit / 6,
        rtt_ms: 2,
    };
    // An address of the root namespace every host reaches over its own link.
    let anchor = netlab::NetLab::new("sgs", &["anchor"])?;
    let ip = anchor.host("anchor").gateway;
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-sgs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let limit = Duration::from_secs((mem * 8 * 4 * 4 / (src_mbit / 6)).max(180));
    let mut rows = Vec::new();
    for &ni in inter_counts {
        for &nv in vm_counts {
            let srv: Vec<RedisServer> = (0..ni)
                .map(|i| {
                    RedisServer::start_with(
                        std::process::Command::new("redis-server"),
                        ip.into(),
                        47_400 + i as u16,
                        &dir.join(format!("redis-{ni}-{nv}-{i}")),
                    )
                    .context("start redis-server")
                })
                .collect::<anyhow::Result<_>>()?;
            let config = json!({
                "intermediaries": srv.iter().map(|s| s.addr().to_string()).collect::<Vec<_>>(),
            })
            .to_string();
            let prepare = |_: &Hosts| -> anyhow::Result<(Vec<String>, Box<dyn std::any::Any>)> {
                Ok((vec!["--config".into(), config.clone()], Box::new(())))
            };
            let t0 = std::time::Instant::now();
            let runs: Vec<anyhow::Result<crate::migration_spanvmm::Run>> =
                std::thread::scope(|s| {
                    let hs: Vec<_> = (0..nv)
                        .map(|_| {
                            s.spawn(|| {
                                spanvmm_migrate_with(
                                    bin,
                                    plugins,
                                    elf,
                                    mem,
                                    "idle",
                                    "scatter-gather",
                                    link,
                                    limit,
                                    &prepare,
                                )
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                        })
                        .collect()
                });
            let wall = t0.elapsed();
            let mut ev = Vec::new();
            let mut tot = Vec::new();
            let mut stored = vec![0u64; ni];
            let mut failed = 0;
            for r in &runs {
                match r {
                    Ok(run) if run.outcome.completed && run.outcome.verify_bad == Some(0) => {
                        ev.push(run.outcome.total_ms as f64);
                        tot.push(run.dest_done_ms.unwrap_or(run.outcome.total_ms) as f64);
                        if let Some(a) = run.report["scatter"]["intermediaries"].as_array() {
                            for (i, x) in a.iter().enumerate().take(ni) {
                                stored[i] += x["wire_out"].as_u64().unwrap_or(0);
                            }
                        }
                    }
                    Ok(run) => {
                        failed += 1;
                        eprintln!(
                            "{nv} VMs, {ni} intermediaries: FAILED: {}",
                            run.outcome.note
                        )
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{nv} VMs, {ni} intermediaries: FAILED: {e:#}")
                    }
                }
            }
            drop(srv);
            let e = stat_or_nan(ev.iter().copied());
            let t = stat_or_nan(tot.iter().copied());
            let max_ev_s = e.max / 1e3;
            let load: Vec<f64> = stored.iter().map(|&b| b as f64 / 1e6 / max_ev_s).collect();
            eprintln!(
                "| {nv} | {ni} | {:.1} (max {:.1}) | {:.1} | {} | {} | {failed} |",
                e.median / 1e3,
                max_ev_s,
                t.max / 1e3,
                stored
                    .iter()
                    .map(|b| format!("{}", b >> 20))
                    .collect::<Vec<_>>()
                    .join(" / "),
                load.iter()
                    .map(|l| format!("{l:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
            );
            rows.push(json!({
                "vms": nv,
                "intermediaries": ni,
                "failed": failed,
                "eviction_ms": e,
                "total_ms": t,
                "wall_ms": wall.as_millis() as u64,
                "bytes_to_each_intermediary": stored,
                "mb_s_into_each_intermediary": load,
            }));
        }
    }
    let report = json!({
        "benchmark": "scatter-gather scale",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "link": link.label(),
        "memory_mib": mem,
        "notes": "N idle VMs evicted at once, each from a source host of its own to a destination of its own (the Fig. 9 links each), through the same M redis-server intermediaries in the root namespace (one copy of each page). Eviction: per VM, from its ctl migrate; load: RESP bytes the sources sent to each intermediary, over the slowest eviction.",
        "rows": rows,
    });
    let _ = std::fs::remove_dir_all(&dir);
    drop(anchor);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
