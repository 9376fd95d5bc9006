//! `spanvmm-bench gang`: gang migration with cluster-wide dedup (issue #18 item 3; GMGD,
//! CCGrid 2013). `--vms N` (4) guests of `--sizes MIB` (256), each filling three quarters of
//! its memory, half of that a region identical in every guest (spanguest's `shared`), move
//! together from rack A to rack B: two groups of network-namespace hosts joined by one
//! tbf-shaped core link of `--links MBIT` (200) (`netlab::Racks`), one host per guest on each
//! side and a `redis-server` host in rack B. Per engine, all N migrations start at once:
//!
//! - `gang`: `ctl migrate-group` with the `scatter-gather` service, one store key for the
//!   group, `high_water: 0` (every data page through the rack-B intermediary), reservations on
//!   (a page two sources find absent at once is sent by one); total time until every
//!   destination has gathered every page, eviction when the last source left;
//! - `gang-no-reserve`: the same without reservations (the probe race left open);
//! - `spanvmm-precopy`: `ctl migrate-group --no-sync` with `precopy.wasm`, N independent
//!   pre-copy migrations;
//! - `qemu-precopy`: N QEMU pre-copy migrations (QMP `migrate`, bandwidth cap lifted).
//!
//! Measured: bytes on the core (its tbf counters, A → B, and B → A), total time; for the
//! gang, per source the pages scattered, written and deduplicated, the pages stored at the
//! intermediary and those written twice. Engines interleaved run by run; median and spread.
//! Every destination's guest verifies its memory (`verify bad=0`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlab::{Racks, RedisServer};
use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{collect, wait_line, Vm};
use crate::live_update::{qemu_with, qmp_arg, wait_ready, Qmp};
use crate::migration::verify_after;
use crate::rounds::{col, interleave, Case, Table};

/// Migration ports: a new one each run (the last run's sockets may linger).
static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7650);

fn next_port() -> u16 {
    PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
const REDIS_PORT: u16 = 6379;

/// One run of one engine.
#[derive(Serialize)]
struct Sample {
    /// Bytes the core carried rack A → rack B, and back.
    core_ab: u64,
    core_ba: u64,
    /// Until every guest runs at its destination with every page there.
    total_ms: u64,
    /// Until the last source left (the gang's eviction; pre-copy: its total time).
    eviction_ms: u64,
    /// The guests' memory checks at their destinations: the sum of `bad`.
    verify_bad: u64,
    /// Gang: the store's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<Value>,
}

/// The guest: `mib` of data, half of it shared, its own seed; verifies itself every 2 s
/// (QEMU's guests have no API to ask).
fn cmdline(mem: u64, i: usize) -> String {
    let mib = mem * 3 / 4;
    format!(
        "workload=idle,verify,shared mib={mib} shared_mib={} seed={} stall_us=1000 report_ms=0 \
         verify_ms=2000",
        mib / 2,
        i + 1
    )
}

struct Bed {
    racks: Racks,
    n: usize,
    dir: PathBuf,
    tls: PathBuf,
}

impl Bed {
    fn a(&self, i: usize) -> String {
        format!("a{i}")
    }
    fn b(&self, i: usize) -> String {
        format!("b{i}")
    }

    /// `spanvmm run ARGS` inside host `host`, console lines collected.
    fn spanvmm(&self, bin: &Path, host: &str, args: &[String], tag: &str) -> anyhow::Result<Vm> {
        let sock = self.dir.join(format!("{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut child = self
            .racks
            .command(host, bin)
            .arg("run")
            .args(args)
            .args(["--serial", "stdout", "--api-socket"])
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let lines = collect(child.stdout.take().context("stdout")?);
        Ok(Vm { child, lines, sock })
    }
}

/// Waits until `vm`'s API answers (a destination listening).
fn api_up(vm: &Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.api("GET", "/vm/migration", None).is_err() {
        if Instant::now() > deadline {
            bail!("{}: no API", vm.sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// spanvmm: N sources in rack A, N destinations in rack B, `ctl migrate-group`.
fn spanvmm_run(
    bed: &Bed,
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    engine: &str,
) -> anyhow::Result<Sample> {
    let gang = engine.starts_with("gang");
    let redis = if gang {
        let ip = bed.racks.host("mid").ip;
        let dir = bed.dir.join("redis");
        let _ = std::fs::remove_dir_all(&dir);
        Some(bed.racks.within("mid", || {
            RedisServer::start_with(
                bed.racks.command("mid", "redis-server"),
                IpAddr::V4(ip),
                REDIS_PORT,
                &dir,
            )
        })??)
    } else {
        None
    };
    let mut dsts = Vec::new();
    let mut srcs = Vec::new();
    let mut members = Vec::new();
    let port = next_port();
    for i in 0..bed.n {
        let to = format!("tls://{}:{port}", bed.racks.host(&bed.b(i)).ip);
        let args = [
            "--incoming".to_string(),
            to.clone(),
            "--tls-dir".into(),
            bed.tls.display().to_string(),
        ];
        dsts.push(bed.spanvmm(bin, &bed.b(i), &args, &format!("dst{i}"))?);
        let args = [
            "--kernel".to_string(),
            elf.display().to_string(),
            "--cmdline".into(),
            cmdline(mem, i),
            "--memory".into(),
            mem.to_string(),
        ];
        let src = bed.spanvmm(bin, &bed.a(i), &args, &format!("src{i}"))?;
        members.push(format!("{}={to}", src.sock.display()));
        srcs.push(src);
    }
    for (s, d) in srcs.iter().zip(&dsts) {
        wait_line(&s.lines, 0, "SPANGUEST ready", Duration::from_secs(120))?;
        api_up(d)?;
    }
    // Every guest populated and verified once before the clock starts.
    for s in &srcs {
        wait_line(&s.lines, 0, "SPANGUEST verify", Duration::from_secs(120))?;
    }
    let marks: Vec<usize> = dsts.iter().map(|d| d.mark()).collect();
    let report = bed.dir.join("group.json");
    let mut cmd = Command::new(bin);
    cmd.args(["ctl", "migrate-group", "--no-sync", "--report"])
        .arg(&report)
        .arg("--tls-dir")
        .arg(&bed.tls);
    for m in &members {
        cmd.args(["--vm", m]);
    }
    if let Some(r) = &redis {
        let config = json!({
            "intermediaries": [r.addr().to_string()],
            "high_water": 0,
            "reserve": engine == "gang",
        });
        cmd.arg("--share-key")
            .arg("--plugin")
            .arg(plugins.join("scatter-gather.wasm"))
            .arg("--config")
            .arg(config.to_string());
    } else {
        cmd.arg("--plugin").arg(plugins.join("precopy.wasm"));
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let core0 = bed.racks.core_bytes()?;
    let t0 = Instant::now();
    let st = cmd.status()?;
    let evicted = t0.elapsed();
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).context("the group report")?)?;
    if !st.success() {
        bail!("the group failed: {}", r["error"]);
    }
    // The gang's destinations gather after the sources left.
    let deadline = Instant::now() + Duration::from_secs(600);
    for d in &dsts {
        loop {
            let (_, v, _) = d.api("GET", "/vm/migration", None)?;
            match v["incoming"]["phase"].as_str() {
                Some("completed") => break,
                Some("failed") => bail!("a destination failed: {v}"),
                _ if Instant::now() > deadline => bail!("not gathered: {v}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    let total = t0.elapsed();
    let core1 = bed.racks.core_bytes()?;
    let mut bad = 0;
    for (d, &m) in dsts.iter().zip(&marks) {
        bad += verify_after(&d.lines, m, Duration::from_secs(60)).context("no verify line")?;
    }
    let store = redis.as_ref().map(|srv| {
        let m = r["members"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| -> u64 {
            m.iter()
                .map(|x| x["report"]["scatter"]["intermediaries"][0][k].as_u64().unwrap_or(0))
                .sum()
        };
        let keys = stored_pages(bed, srv.addr());
        json!({
            "pages_scattered": m.iter().map(|x| x["report"]["scatter"]["scattered_pages"].as_u64().unwrap_or(0)).sum::<u64>(),
            "pages_written": sum("pages_stored"),
            "dedup_hits": m.iter().map(|x| x["report"]["scatter"]["dedup_hits"].as_u64().unwrap_or(0)).sum::<u64>(),
            "waited": sum("waited"),
            "takeovers": sum("takeovers"),
            "pages_at_intermediary": keys,
            "written_twice": sum("pages_stored").saturating_sub(keys),
            "link_bytes": m.iter().map(|x| x["report"]["bytes"].as_u64().unwrap_or(0)).sum::<u64>(),
            "to_intermediary_bytes": m.iter().map(|x| x["report"]["scatter"]["bytes_to_intermediaries"].as_u64().unwrap_or(0)).sum::<u64>(),
            "per_source": m.iter().map(|x| {
                let sc = &x["report"]["scatter"];
                json!({
                    "scattered": sc["scattered_pages"],
                    "written": sc["intermediaries"][0]["pages_stored"],
                    "deduplicated": sc["dedup_hits"],
                    "waited": sc["intermediaries"][0]["waited"],
                    "link_bytes": x["report"]["bytes"],
                })
            }).collect::<Vec<_>>(),
        })
    });
    Ok(Sample {
        core_ab: core1.0 - core0.0,
        core_ba: core1.1 - core0.1,
        total_ms: total.as_millis() as u64,
        eviction_ms: evicted.as_millis() as u64,
        verify_bad: bad,
        store,
    })
}

/// Pages at the intermediary (its `sg1:` keys), counted by `redis-cli` inside its host.
fn stored_pages(bed: &Bed, addr: SocketAddr) -> u64 {
    bed.racks
        .command("mid", "redis-cli")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["--scan", "--pattern", "sg1:*"])
        .output()
        .map(|o| {
            o.stdout
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .count() as u64
        })
        .unwrap_or(0)
}

/// QEMU: N pre-copy migrations at once, rack A to rack B.
fn qemu_run(bed: &Bed, elf: &Path, mem: u64) -> anyhow::Result<Sample> {
    let mut procs = Vec::new();
    let result = (|| {
        let mut qmps = Vec::new();
        for i in 0..bed.n {
            let (sq, dq) = (
                bed.dir.join(format!("q-src{i}.qmp")),
                bed.dir.join(format!("q-dst{i}.qmp")),
            );
            let cl = cmdline(mem, i);
            let (src, src_lines) = qemu_with(
                bed.racks.command(&bed.a(i), "qemu-system-x86_64"),
                elf,
                mem,
                &cl,
                &qmp_arg(&sq),
            )?;
            procs.push(src);
            let mut dargs = qmp_arg(&dq);
            dargs.extend(["-incoming".into(), "defer".into()]);
            let (dst, dst_lines) = qemu_with(
                bed.racks.command(&bed.b(i), "qemu-system-x86_64"),
                elf,
                mem,
                &cl,
                &dargs,
            )?;
            procs.push(dst);
            qmps.push((sq, dq, src_lines, dst_lines));
        }
        let mut conns = Vec::new();
        let port = next_port();
        for (i, (sq, dq, src_lines, dst_lines)) in qmps.iter().enumerate() {
            wait_ready(src_lines)?;
            wait_line(src_lines, 0, "SPANGUEST verify", Duration::from_secs(120))?;
            let mut q = Qmp::connect(sq)?;
            let mut d = Qmp::connect(dq)?;
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100u64 << 30}),
            )?;
            let uri = format!("tcp:{}:{port}", bed.racks.host(&bed.b(i)).ip);
            d.cmd("migrate-incoming", json!({ "uri": uri }))?;
            conns.push((q, d, uri, dst_lines.clone()));
        }
        let core0 = bed.racks.core_bytes()?;
        let t0 = Instant::now();
        for (q, _, uri, _) in &mut conns {
            q.cmd("migrate", json!({ "uri": uri }))?;
        }
        let mut done = vec![false; conns.len()];
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done.iter().all(|&d| d) {
            for (i, (q, ..)) in conns.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                let info = q.cmd("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => done[i] = true,
                    Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
                    _ if Instant::now() > deadline => bail!("QEMU migration did not finish"),
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let total = t0.elapsed();
        let core1 = bed.racks.core_bytes()?;
        let mut bad = 0;
        for (.., lines) in &conns {
            let from = lines.lock().unwrap().len();
            bad += verify_after(lines, from, Duration::from_secs(60)).context("no verify line")?;
        }
        Ok(Sample {
            core_ab: core1.0 - core0.0,
            core_ba: core1.1 - core0.1,
            total_ms: total.as_millis() as u64,
            eviction_ms: total.as_millis() as u64,
            verify_bad: bad,
            store: None,
        })
    })();
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    result
}

/// `runs` rounds of every engine, interleaved; JSON to `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    plugins: &Path,
    elf: &Path,
    mem: u64,
    vms: usize,
    core_mbit: u64,
    runs: usize,
    engines: &[&str],
    out: &Path,
) -> anyhow::Result<()> {
    netlab::NetLab::available().map_err(anyhow::Error::msg)?;
    RedisServer::available().map_err(anyhow::Error::msg)?;
    for e in engines {
        if !["gang", "gang-no-reserve", "spanvmm-precopy", "qemu-precopy"].contains(e) {
            bail!("unknown engine {e} (gang, gang-no-reserve, spanvmm-precopy, qemu-precopy)");
        }
    }
    let dir = std::env::temp_dir().join(format!("spanvmm-bench-gang-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tls = dir.join("tls");
    let st = Command::new(bin)
        .args(["migrate-certs", "--out"])
        .arg(&tls)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "migrate-certs failed");
    let a: Vec<String> = (0..vms).map(|i| format!("a{i}")).collect();
    let mut b: Vec<String> = (0..vms).map(|i| format!("b{i}")).collect();
    b.push("mid".into());
    fn names(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let bed = Bed {
        racks: Racks::new("bgang", &names(&a), &names(&b), core_mbit * 1_000_000)?,
        n: vms,
        dir: dir.clone(),
        tls,
    };
    let cases = interleave(
        runs,
        engines.to_vec(),
        |e| format!("{e:>16}"),
        |&engine| {
            let s = match engine {
                "qemu-precopy" => qemu_run(&bed, elf, mem),
                _ => spanvmm_run(&bed, bin, plugins, elf, mem, engine),
            }?;
            anyhow::ensure!(s.verify_bad == 0, "verify bad={}", s.verify_bad);
            Ok(s)
        },
        |s: &Sample| {
            format!(
                "core A→B {:.1} MB, total {:.1} s, sources gone {:.1} s {}",
                s.core_ab as f64 / 1e6,
                s.total_ms as f64 / 1e3,
                s.eviction_ms as f64 / 1e3,
                s.store.as_ref().map(|v| {
                    format!(
                        "(written {} / scattered {}, at the intermediary {}, written twice {}, waited {})",
                        v["pages_written"], v["pages_scattered"], v["pages_at_intermediary"],
                        v["written_twice"], v["waited"]
                    )
                }).unwrap_or_default()
            )
        },
    );
    let core = |s: &Sample| Some(s.core_ab as f64 / 1e6);
    let base = cases
        .iter()
        .find(|c| c.key == "spanvmm-precopy")
        .map(|c| c.median(core));
    let rows = Table {
        key_heads: &["engine"],
        key_cells: &|e: &&str| vec![e.to_string()],
        key_json: &|e: &&str| json!({ "engine": e }),
        columns: vec![
            col("core_ab_mb", "core A→B MB", 1.0, 1, core),
            col("total_s", "total s", 1.0, 1, |s: &Sample| {
                Some(s.total_ms as f64 / 1e3)
            }),
            col("eviction_s", "sources gone s", 1.0, 1, |s: &Sample| {
                Some(s.eviction_ms as f64 / 1e3)
            }),
        ],
        extra_heads: &["× spanvmm pre-copy"],
        extra: &|c: &Case<&str, Sample>| {
            vec![base.map_or("-".into(), |b| format!("{:.2}", c.median(core) / b))]
        },
    }
    .rows(&cases)?;
    let report = json!({
        "benchmark": "gang",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "vms": vms,
        "memory_mib": mem,
        "guest": cmdline(mem, 0),
        "core_mbit": core_mbit,
        "runs": runs,
        "notes": "Two racks of network-namespace hosts joined by one tbf-shaped core; all migrations of a row start at once. core_ab: bytes the core's tbf counted rack A → rack B (headers included). gang: scatter-gather.wasm, one store key, high_water 0, a redis-server in rack B; total until every destination gathered every page; eviction until the last source left. Pre-copy rows: total = eviction.",
        "goal": "gang core bytes ≤ 0.5× the independent migrations'",
        "rows": rows,
    });
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
