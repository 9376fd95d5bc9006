//! What one dirty-page harvest costs, KVM's bitmap against its dirty ring, by guest size and by
//! pages dirtied per round (docs/benchmarks.md, "Dirty log"):
//!
//! `cargo run --release -p base-vmm --example dirty_log -- target/guest-images/spanguest.elf
//! [--sizes-gib 1,4,16,48] [--dirty 256,4096,32768] [--rounds 10] [--interval-ms 200]`
//!
//! Each case boots spanguest (`workload=dirty`, its working set the pages to dirty, at a rate
//! that rewrites it once per interval), turns logging on, and harvests every interval while the
//! guest runs: the time of `VmControl::harvest_dirty` (what the migration and snapshot engines
//! call) and the pages it returned, medians over the rounds; the ring's full-ring exits too.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use base_vmm::boot::EntryPreference;
use base_vmm::cpu::CpuTemplate;
use base_vmm::dirty_ring::DirtyLogMode;
use base_vmm::vmm::{VmConfig, Vmm};

fn arg_list(args: &[String], name: &str, default: &[u64]) -> Vec<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(|x| x.parse().expect("a number")).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Case {
    harvest_us: f64,
    pages: f64,
    full_exits: u64,
}

fn case(
    elf: &str,
    gib: u64,
    dirty: u64,
    mode: DirtyLogMode,
    rounds: usize,
    interval: Duration,
) -> Result<Case, String> {
    base_vmm::vm::set_dirty_log(Some(mode));
    let wss_mib = dirty.div_ceil(256).max(1);
    let rate = dirty * 1000 / interval.as_millis().max(1) as u64;
    let cfg = VmConfig {
        kernel: elf.into(),
        cmdline: format!(
            "workload=dirty mib={} wss={wss_mib} rate={rate} report_ms=0",
            wss_mib + 4
        ),
        initrd: None,
        mem_mib: gib << 10,
        vcpus: 1,
        serial: "none".into(),
        entry: EntryPreference::Direct,
        start_paused: false,
        cpu_template: CpuTemplate::Host,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let (tx, _rx) = mpsc::channel();
    let vmm = Vmm::boot(&cfg, tx).map_err(|e| e.to_string())?;
    let ctl = vmm.control().clone();
    // Boot and populate: the guest's own set-up, not what is measured.
    std::thread::sleep(Duration::from_millis(300) + Duration::from_micros(dirty * 40));
    ctl.set_dirty_logging(true).map_err(|e| e.to_string())?;
    ctl.harvest_dirty().map_err(|e| e.to_string())?;
    let (mut us, mut pages) = (Vec::new(), Vec::new());
    // One warm-up round first.
    for round in 0..=rounds {
        std::thread::sleep(interval);
        let t = Instant::now();
        let bits = ctl.harvest_dirty().map_err(|e| e.to_string())?;
        let dt = t.elapsed();
        if round > 0 {
            us.push(dt.as_secs_f64() * 1e6);
            pages.push(bits.iter().map(|w| w.count_ones() as f64).sum());
        }
    }
    let full_exits = vmm.status().dirty_log.ring_full_exits;
    ctl.set_dirty_logging(false).map_err(|e| e.to_string())?;
    vmm.shutdown();
    Ok(Case {
        harvest_us: median(&mut us),
        pages: median(&mut pages),
        full_exits,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(elf) = args.first().filter(|a| !a.starts_with("--")).cloned() else {
        eprintln!("usage: dirty_log ELF [--sizes-gib 1,4,16,48] [--dirty 256,4096,32768] [--rounds 10] [--interval-ms 200]");
        std::process::exit(2);
    };
    let sizes = arg_list(&args, "--sizes-gib", &[1, 4, 16, 48]);
    let dirties = arg_list(&args, "--dirty", &[256, 4096, 32768]);
    let rounds = arg_list(&args, "--rounds", &[10])[0] as usize;
    let interval = Duration::from_millis(arg_list(&args, "--interval-ms", &[200])[0]);
    if !base_vmm::vm::ring_offered() {
        eprintln!("this host's KVM offers no dirty ring: bitmap rows only");
    }
    println!("| guest GiB | pages dirtied per round (median) | bitmap harvest µs | ring harvest µs | ring full exits |");
    println!("|---|---|---|---|---|");
    for &gib in &sizes {
        for &dirty in &dirties {
            let bitmap = case(&elf, gib, dirty, DirtyLogMode::Bitmap, rounds, interval);
            let ring = if base_vmm::vm::ring_offered() {
                case(&elf, gib, dirty, DirtyLogMode::Ring, rounds, interval)
            } else {
                Err("not offered".into())
            };
            let cell = |c: &Result<Case, String>| match c {
                Ok(c) => format!("{:.0}", c.harvest_us),
                Err(e) => format!("({e})"),
            };
            let pages = match (&bitmap, &ring) {
                (Ok(b), Ok(r)) => format!("{:.0} / {:.0}", b.pages, r.pages),
                (Ok(b), _) => format!("{:.0}", b.pages),
                (_, Ok(r)) => format!("{:.0}", r.pages),
                _ => "-".into(),
            };
            println!(
                "| {gib} | {pages} | {} | {} | {} |",
                cell(&bitmap),
                cell(&ring),
                ring.as_ref()
                    .map_or("-".into(), |r| r.full_exits.to_string())
            );
        }
    }
}
