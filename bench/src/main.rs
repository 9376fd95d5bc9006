//! spanvmm benchmarks, each side by side with QEMU on the same spanguest ELF in the same run.
//! Results are written as JSON under bench/results/.
//!
//! `spanvmm-bench boot [--runs N]`: wall time from process start to `SPANGUEST ready`.
//! `spanvmm-bench startup [--runs N] [--trace] [--compare BIN]`: boot and lazy restore from
//! process start, interleaved (A/B against another binary), with the start-up trace's steps.
//! `spanvmm-bench live-update [--sizes 256,1024,...] [--runs N]`: replacing the VMM beneath a
//! running guest vs QEMU's cpr-transfer (and, for reference, QEMU's copying migration).
//! `spanvmm-bench snapshot [--sizes ...]`: full snapshot/restore vs QEMU, lazy restore, write rate.
//! `spanvmm-bench services`: service attach/detach latency and the guest's stall meanwhile,
//! per-event dispatch cost (no service, Wasm, native; QEMU's plain exit for reference), and
//! guest throughput with a service attached but subscribed to nothing.
//! `spanvmm-bench services-alloc [--runs N]`: synchronous Wasm dispatch cost by wasmtime's
//! linear-memory allocation (pooling, on-demand, on 2 MiB huge pages), interleaved runs.
//! `spanvmm-bench migration [--sizes 256,1024]`: live migration on loopback and on shaped
//! network-namespace links (1 Gbit/s; 100 Mbit/s with 20 ms RTT through netlab's delay relay);
//! `--workloads idle,dirty` (`+serial`: the guest's lines through the 16550 on both VMMs),
//! `--runs N` interleaved rounds, spanvmm first in every other one.
//! `spanvmm-bench live-update-failures [--runs-live-update N] [--seed S]`: the new process of a
//! live update killed at random points, spanvmm against QEMU's cpr-transfer.
//! `spanvmm-bench devices [--runs N]`: virtio-net (redis-benchmark against the guest's `kv`) and
//! virtio-blk (the guest's `disk` workload) against QEMU microvm's devices, interleaved.
//! `spanvmm-bench cloudnet [--full] [--disk-mib MIB] [--runs N] [--parts table1,storage,cache,bandwidth|all]
//! [--workloads ..] [--engines ..]`: the CloudNet paper's Tables I/II and Figs. 12–15 on a
//! shaped WAN, spanvmm's CloudNet options against QEMU (see `cloudnet.rs`).
//! `spanvmm-bench live-update-devices [--runs N]`: a guest with a tap and a disk under
//! redis-benchmark while spanvmm live-updates it, against QEMU's cpr-transfer with
//! virtio-net and virtio-blk (lu_devices.rs).
//! `spanvmm-bench chaos [--runs-precopy N ...] [--seed S]`: fault injection at scale (links cut,
//! destinations, live updates' new processes and snapshot writers killed at random times).
//! `spanvmm-bench sync-arrival [--runs N]`: a two-tier application (a `kvload` front end, a
//! `kv` back end) moved across a shaped WAN with `ctl migrate-group`, independently and
//! synchronized: the front end's latency, its errors, the held rounds' bytes.
//! `spanvmm-bench gang [--vms N] [--sizes MIB] [--links MBIT] [--runs N] [--engines ..]`:
//! gang migration with cluster-wide dedup across two racks' shaped core, against N
//! independent spanvmm and QEMU pre-copy migrations (gang.rs).

mod agile;
mod chaos;
mod ciphers;
mod cloudnet;
mod cpr_failures;
mod devices;
mod gang;
mod harness;
mod live_update;
mod migration;
mod migration_spanvmm;
mod redis_client;
mod rounds;
mod scatter_gather;
mod services;
mod snapshot;
mod startup;
mod sync_arrival;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ lives in the repository")
        .to_path_buf()
}

/// The spanvmm binary: $SPANVMM_BIN, else the one built next to this benchmark.
fn spanvmm_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SPANVMM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("spanvmm");
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --release) or set SPANVMM_BIN",
            p.display()
        );
    }
    Ok(p)
}

fn guest_elf() -> anyhow::Result<PathBuf> {
    let p = repo_root().join("target/guest-images/spanguest.elf");
    if !p.exists() {
        bail!("{} not found: run guest-images/build.sh", p.display());
    }
    Ok(p)
}

/// Spawns `cmd` and returns the time until a stdout line contains `needle`; kills it after.
fn time_to_line(cmd: &mut Command, needle: &'static str, timeout: Duration) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                let _ = tx.send(t0.elapsed());
                return;
            }
        }
    });
    let got = rx.recv_timeout(timeout);
    let _ = child.kill();
    let _ = child.wait();
    match got {
        Ok(d) => Ok(d.as_secs_f64() * 1e3),
        Err(_) => bail!("{cmd:?}: no {needle:?} within {timeout:?}"),
    }
}

#[derive(Serialize)]
struct Series {
    name: String,
    command: String,
    times_ms: Vec<f64>,
    min_ms: f64,
    median_ms: f64,
}

fn series(name: &str, runs: usize, mut make: impl FnMut() -> Command) -> anyhow::Result<Series> {
    let mut times = Vec::new();
    let mut command = String::new();
    for _ in 0..runs {
        let mut cmd = make();
        command = format!("{cmd:?}");
        times.push(time_to_line(
            &mut cmd,
            "SPANGUEST ready",
            Duration::from_secs(60),
        )?);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    eprintln!(
        "{name:>16}: min {:8.1} ms  median {median:8.1} ms",
        sorted[0]
    );
    Ok(Series {
        name: name.into(),
        command,
        times_ms: times,
        min_ms: sorted[0],
        median_ms: median,
    })
}

#[derive(Serialize)]
struct BootReport {
    benchmark: &'static str,
    unix_time: u64,
    host_kernel: String,
    pvm: bool,
    guest: String,
    cmdline: String,
    memory_mib: u64,
    runs: usize,
    series: Vec<Series>,
    spanvmm_median_ms: f64,
    qemu_best_ms: f64,
    ratio_spanvmm_median_to_qemu_best: f64,
    goal: &'static str,
    goal_met: bool,
}

fn boot(runs: usize, out: &Path) -> anyhow::Result<()> {
    let spanvmm = spanvmm_bin()?;
    let elf = guest_elf()?;
    let cmdline = "workload=idle mib=8 report_ms=0";
    let mem = 256u64;
    let mem_s = mem.to_string();
    let qemu = |machine: &str| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-enable-kvm", "-M", machine, "-m", &mem_s])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&elf)
            .args(["-append", cmdline]);
        c
    };
    let span = |entry: &str| {
        let mut c = Command::new(&spanvmm);
        c.arg("run").arg("--kernel").arg(&elf).args([
            "--cmdline",
            cmdline,
            "--memory",
            &mem_s,
            "--entry",
            entry,
        ]);
        c
    };
    let all = vec![
        series("spanvmm", runs, || span("direct"))?,
        series("spanvmm-pvh", runs, || span("pvh"))?,
        series("qemu-microvm", runs, || qemu("microvm"))?,
        series("qemu-pc", runs, || qemu("pc"))?,
    ];
    let span_median = all[0].median_ms;
    let qemu_best = all[2].min_ms.min(all[3].min_ms);
    let ratio = span_median / qemu_best;
    let report = BootReport {
        benchmark: "boot",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
        guest: elf.display().to_string(),
        cmdline: cmdline.into(),
        memory_mib: mem,
        runs,
        series: all,
        spanvmm_median_ms: span_median,
        qemu_best_ms: qemu_best,
        ratio_spanvmm_median_to_qemu_best: ratio,
        goal: "spanvmm median <= 1/5 of QEMU's best",
        goal_met: ratio <= 0.2,
    };
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!(
        "spanvmm median {span_median:.1} ms vs QEMU best {qemu_best:.1} ms: ratio {ratio:.3} (goal <= 0.2: {})",
        if ratio <= 0.2 { "met" } else { "NOT met" }
    );
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// `chaos` runs per category by default (precopy, postcopy-cut, postcopy-death, live-update,
/// snapshot): the campaign, 7–8 minutes on two idle cores, about 15 on busy ones.
const DEFAULT_CHAOS: [usize; 5] = [100, 100, 20, 50, 50];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 10usize;
    let mut out = None;
    let mut sizes = vec![256u64, 1024, 4096, 8192];
    let mut links: Option<String> = None;
    let mut workloads: Option<String> = None;
    let mut engines: Option<String> = None;
    let mut cipher_list: Option<String> = None;
    let mut counts = chaos::Counts {
        precopy: DEFAULT_CHAOS[0],
        postcopy_cut: DEFAULT_CHAOS[1],
        postcopy_death: DEFAULT_CHAOS[2],
        live_update: DEFAULT_CHAOS[3],
        snapshot: DEFAULT_CHAOS[4],
    };
    let mut seed = None;
    let mut quiet = false;
    let mut full = false;
    let mut parts: Option<String> = None;
    let mut sizes_given = false;
    let mut vms = 4usize;
    let mut trace = false;
    let mut compare = None;
    let mut hot = 64u64;
    let mut disk_mib: Option<u64> = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--hot" => hot = it.next().context("--hot MIB")?.parse()?,
            "--out" => out = Some(PathBuf::from(it.next().context("--out FILE")?)),
            "--links" => {
                links = Some(
                    it.next()
                        .context("--links loopback,MBIT/RTT_MS,...")?
                        .clone(),
                )
            }
            "--workloads" => workloads = Some(it.next().context("--workloads idle,dirty")?.clone()),
            "--engines" => {
                engines = Some(
                    it.next()
                        .context("--engines qemu-precopy,precopy,postcopy,...")?
                        .clone(),
                )
            }
            "--ciphers" => {
                cipher_list = Some(
                    it.next()
                        .context("--ciphers aes-128-gcm,aes-256-gcm,chacha20-poly1305")?
                        .clone(),
                )
            }
            "--runs-precopy" => counts.precopy = it.next().context("--runs-precopy N")?.parse()?,
            "--runs-postcopy-cut" => {
                counts.postcopy_cut = it.next().context("--runs-postcopy-cut N")?.parse()?
            }
            "--runs-postcopy-death" => {
                counts.postcopy_death = it.next().context("--runs-postcopy-death N")?.parse()?
            }
            "--runs-live-update" => {
                counts.live_update = it.next().context("--runs-live-update N")?.parse()?
            }
            "--runs-snapshot" => {
                counts.snapshot = it.next().context("--runs-snapshot N")?.parse()?
            }
            "--seed" => seed = Some(it.next().context("--seed N")?.parse()?),
            "--vms" => vms = it.next().context("--vms N")?.parse()?,
            "--quiet" => quiet = true,
            "--trace" => trace = true,
            "--compare" => compare = Some(PathBuf::from(it.next().context("--compare BIN")?)),
            "--full" => full = true,
            "--disk-mib" => disk_mib = Some(it.next().context("--disk-mib MIB")?.parse()?),
            "--parts" => {
                parts = Some(
                    it.next()
                        .context("--parts table1,storage,cache,bandwidth|all")?
                        .clone(),
                )
            }
            "--sizes" => {
                sizes_given = true;
                sizes = it
                    .next()
                    .context("--sizes MIB,MIB,...")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown argument {other}"),
        }
    }
    match args.first().map(String::as_str) {
        Some("boot") => boot(
            runs,
            &out.unwrap_or_else(|| repo_root().join("bench/results/boot.json")),
        ),
        Some("startup") => startup::run(
            &spanvmm_bin()?,
            compare,
            &guest_elf()?,
            runs,
            trace,
            &out.unwrap_or_else(|| repo_root().join("bench/results/startup.json")),
        ),
        Some("snapshot") => snapshot::run(
            &spanvmm_bin()?,
            &guest_elf()?,
            &repo_root().join("target/plugins/checkpoint.wasm"),
            &sizes,
            &out.unwrap_or_else(|| repo_root().join("bench/results/snapshot.json")),
        ),
        Some("services") => services::run(
            &spanvmm_bin()?,
            &guest_elf()?,
            &repo_root().join("target/plugins"),
            &out.unwrap_or_else(|| repo_root().join("bench/results/services.json")),
        ),
        Some("sync-arrival") => sync_arrival::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            // ~40 s a run, two runs a round: the default round count stays under 10 minutes.
            if args.iter().any(|a| a == "--runs") { runs } else { 3 },
            &out.unwrap_or_else(|| repo_root().join("bench/results/sync-arrival.json")),
        ),
        // Table 1 analogue (`--parts table1`): `--sizes MIB` (256), `--links MBIT` (600),
        // `--runs N` (1); the capped row's gather rate is a third of the destination's link.
        Some("scatter-gather") if parts.as_deref() == Some("table1") => {
            let mbit = links.as_deref().map_or(Ok(600), str::parse)?;
            scatter_gather::table1(
                &spanvmm_bin()?,
                &repo_root().join("target/plugins"),
                &guest_elf()?,
                if sizes_given { sizes[0] } else { 256 },
                mbit,
                if args.iter().any(|a| a == "--runs") { runs } else { 1 },
                mbit * 1_000_000 / 6 / 8 / 3,
                &out.unwrap_or_else(|| {
                    repo_root().join("bench/results/scatter-gather-table1.json")
                }),
            )
        }
        // Scale rows (`--parts scale`): `--sizes MIB` (128), `--links MBIT` (600); 1, 2, 4, 8
        // VMs (powers of two up to `--vms N`, 8 unless given) at once through 1, 2, 4
        // intermediaries.
        Some("scatter-gather") if parts.as_deref() == Some("scale") => scatter_gather::scale(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            if sizes_given { sizes[0] } else { 128 },
            links.as_deref().map_or(Ok(600), str::parse)?,
            &std::iter::successors(Some(1), |n| Some(n * 2))
                .take_while(|&n| n <= if args.iter().any(|a| a == "--vms") { vms } else { 8 })
                .collect::<Vec<_>>(),
            &[1, 2, 4],
            &out.unwrap_or_else(|| repo_root().join("bench/results/scatter-gather-scale.json")),
        ),
        // Fig. 9 analogue: `--sizes MIB` (1024), `--links MBIT` (the source's link, 1200; the
        // destination's is a sixth), `--runs N` (1), `--workloads idle,dirty`, `--engines
        // scatter-gather,postcopy,precopy,qemu-postcopy,qemu-precopy` (all).
        Some("scatter-gather") => scatter_gather::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            if sizes_given { sizes[0] } else { 1024 },
            links.as_deref().map_or(Ok(1200), str::parse)?,
            if args.iter().any(|a| a == "--runs") { runs } else { 1 },
            &workloads.as_deref().unwrap_or("idle,dirty").split(',').collect::<Vec<_>>(),
            engines.as_deref(),
            &out.unwrap_or_else(|| repo_root().join("bench/results/scatter-gather.json")),
        ),
        // Gang migration: `--vms N` (4) of `--sizes MIB` (256) across a `--links MBIT` (200)
        // core, `--runs N` (2), `--engines gang,gang-no-reserve,spanvmm-precopy,qemu-precopy`.
        Some("gang") => gang::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            if sizes_given { sizes[0] } else { 256 },
            vms,
            links.as_deref().map_or(Ok(200), str::parse)?,
            // ~4.5 min a round under load (four rows of 4 guests): 2 rounds stay near 9 min.
            if args.iter().any(|a| a == "--runs") { runs } else { 2 },
            &engines
                .as_deref()
                .unwrap_or("gang,gang-no-reserve,spanvmm-precopy,qemu-precopy")
                .split(',')
                .collect::<Vec<_>>(),
            &out.unwrap_or_else(|| repo_root().join("bench/results/gang.json")),
        ),
        // Agile migration: `--sizes MIB` (1024), `--hot MIB` (64), `--links MBIT` (1000),
        // `--runs N` (3): about 4 minutes at the defaults.
        Some("agile") => agile::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            if sizes_given { sizes[0] } else { 1024 },
            hot,
            links.as_deref().map_or(Ok(1000), str::parse)?,
            if args.iter().any(|a| a == "--runs") { runs } else { 3 },
            &out.unwrap_or_else(|| repo_root().join("bench/results/agile.json")),
        ),
        Some("services-alloc") => services::alloc_compare(
            &spanvmm_bin()?,
            &guest_elf()?,
            &repo_root().join("target/plugins"),
            runs,
            8,
            &out.unwrap_or_else(|| repo_root().join("bench/results/services-alloc.json")),
        ),
        Some("ciphers") => ciphers::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            sizes.first().copied().unwrap_or(1024),
            migration::Link::Loopback,
            runs,
            &workloads.as_deref().unwrap_or("idle,dirty").split(',').collect::<Vec<_>>(),
            cipher_list.as_deref(),
            &out.unwrap_or_else(|| repo_root().join("bench/results/ciphers.json")),
        ),
        Some("cloudnet") => {
            let list = |s: Option<&String>| {
                s.map(|s| s.split(',').map(String::from).collect::<Vec<_>>())
            };
            cloudnet::run(&cloudnet::Config {
                spanvmm: spanvmm_bin()?,
                plugins: repo_root().join("target/plugins"),
                elf: guest_elf()?,
                full,
                // The default fits in ~15 min (two rounds); `--full` is the four.
                runs: if args.iter().any(|a| a == "--runs") {
                    runs
                } else if full {
                    4
                } else {
                    2
                },
                parts: list(parts.as_ref())
                    .unwrap_or_else(|| vec!["table1".into(), "storage".into()]),
                workloads: list(workloads.as_ref()),
                engines: list(engines.as_ref()),
                disk_mib,
                out: out.unwrap_or_else(|| repo_root().join("bench/results/cloudnet.json")),
            })
        }
        Some("migration") => migration::run(
            &spanvmm_bin()?,
            &repo_root().join("target/plugins"),
            &guest_elf()?,
            &sizes,
            links.as_deref(),
            workloads.as_deref(),
            engines.as_deref(),
            // Rounds of every engine, interleaved (`--runs N`; one by default).
            if args.iter().any(|a| a == "--runs") { runs } else { 1 },
            &out.unwrap_or_else(|| repo_root().join("bench/results/migration.json")),
        ),
        Some("live-update") => live_update::run(
            &spanvmm_bin()?,
            &guest_elf()?,
            &sizes,
            runs,
            &out.unwrap_or_else(|| repo_root().join("bench/results/live-update.json")),
        ),
        Some("live-update-devices") => devices::lu_devices::run(
            &spanvmm_bin()?,
            &guest_elf()?,
            if args.iter().any(|a| a == "--runs") { runs } else { 5 },
            &out.unwrap_or_else(|| repo_root().join("bench/results/live-update-devices.json")),
        ),
        Some("devices") => devices::run(
            &spanvmm_bin()?,
            &guest_elf()?,
            &repo_root().join("target/plugins"),
            if args.iter().any(|a| a == "--runs") { runs } else { 3 },
            &out.unwrap_or_else(|| repo_root().join("bench/results/devices.json")),
        ),
        Some("chaos") => {
            let out = out.unwrap_or_else(|| repo_root().join("bench/results/chaos.json"));
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let cfg = chaos::Config {
                spanvmm: spanvmm_bin()?,
                guest: guest_elf()?,
                plugins: repo_root().join("target/plugins"),
                counts,
                seed,
                verbose: !quiet,
            };
            let report = chaos::campaign(&cfg)?;
            std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
            std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
            print!("{}", chaos::table(&report));
            eprintln!("wrote {}", out.display());
            if report.total_lost > 0 {
                bail!("{} of {} runs lost", report.total_lost, report.total_runs);
            }
            Ok(())
        }
        Some("live-update-failures") => {
            let counts = chaos::Counts {
                precopy: 0,
                postcopy_cut: 0,
                postcopy_death: 0,
                live_update: counts.live_update,
                snapshot: 0,
            };
            let cfg = chaos::Config {
                spanvmm: spanvmm_bin()?,
                guest: guest_elf()?,
                plugins: repo_root().join("target/plugins"),
                counts,
                seed: seed.unwrap_or(20261206),
                verbose: !quiet,
            };
            cpr_failures::run(
                &cfg,
                &out.unwrap_or_else(|| {
                    repo_root().join("bench/results/live-update-failures.json")
                }),
            )
        }
        _ => bail!("usage: spanvmm-bench boot|startup|services|services-alloc|devices|live-update|live-update-devices|live-update-failures|snapshot|migration|ciphers|cloudnet|sync-arrival|scatter-gather|gang|agile|chaos [--runs N] [--vms N] [--hot MIB] [--full] [--trace] [--compare BIN] [--parts table1,scale,cache,bandwidth] [--sizes MIB,..] [--links loopback,1000/1,100/20] [--workloads idle,dirty] [--engines qemu-precopy,postcopy,..] [--ciphers aes-128-gcm,..] [--runs-precopy N --runs-postcopy-cut N --runs-postcopy-death N --runs-live-update N --runs-snapshot N --seed S --quiet] [--out FILE]"),
    }
}
