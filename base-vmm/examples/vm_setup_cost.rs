//! What each KVM step of building a VM costs on this host, for the start-up path of issue #21
//! item 5 (docs/benchmarks.md, "Where the start-up goes"):
//!
//! `cargo run --release -p base-vmm --example vm_setup_cost -- [--reps 20] [--sizes-mib
//! 1,16,64,256,1024]`
//!
//! Each step is timed in a fresh VM, `--reps` times: wall time, the calling thread's CPU time
//! and its voluntary context switches during the ioctl. Wall ≫ CPU with a switch means the
//! ioctl slept (an SRCU grace period, a kthread it waits for); wall ≈ CPU means work. Steps:
//! `KVM_CREATE_VM`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`, `KVM_CREATE_VCPU`, and
//! `KVM_SET_USER_MEMORY_REGION` by slot size, with and without dirty logging, as one slot or
//! four, before or after the irqchip, and the flag change that turns dirty logging on.

use std::time::Instant;

use base_vmm::memory::GuestRam;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

fn arg_list(args: &[String], name: &str, default: &[u64]) -> Vec<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(|x| x.parse().expect("a number")).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// One timed call: µs of wall time, µs of this thread's CPU time, voluntary switches.
#[derive(Clone, Copy)]
struct Cost {
    wall: f64,
    cpu: f64,
    switches: f64,
}

fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

fn thread_switches() -> i64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_nvcsw
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Cost) {
    let (s0, c0, t0) = (thread_switches(), thread_cpu_us(), Instant::now());
    let r = f();
    let wall = t0.elapsed().as_secs_f64() * 1e6;
    let cost = Cost {
        wall,
        cpu: thread_cpu_us() - c0,
        switches: (thread_switches() - s0) as f64,
    };
    (r, cost)
}

fn slot(fd: &VmFd, n: u32, gpa: u64, size: u64, host: u64, flags: u32) {
    let region = kvm_userspace_memory_region {
        slot: n,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host..host+size` is a live mapping of guest RAM the caller keeps alive for as
    // long as the VM exists (both are dropped together at the end of each case).
    unsafe { fd.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
}

fn report(name: &str, v: &[Cost]) {
    let med = |f: fn(&Cost) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        (x[x.len() / 2], x[0], x[x.len() - 1])
    };
    let (w, wmin, wmax) = med(|c| c.wall);
    let (c, _, _) = med(|c| c.cpu);
    let (s, _, _) = med(|c| c.switches);
    println!(
        "{name:<44} wall {w:>8.1} µs (min {wmin:>7.1}, max {wmax:>8.1})  cpu {c:>7.1} µs  switches {s:>3.0}"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = arg_list(&args, "--reps", &[20])[0] as usize;
    let sizes = arg_list(&args, "--sizes-mib", &[1, 16, 64, 256, 1024]);
    let kvm = Kvm::new().expect("/dev/kvm");
    println!("{reps} reps each, medians; each case in a fresh VM");

    let mut create = Vec::new();
    let mut irqchip = Vec::new();
    let mut pit = Vec::new();
    let mut vcpu = Vec::new();
    for _ in 0..reps {
        let (vm, c) = timed(|| kvm.create_vm().expect("KVM_CREATE_VM"));
        create.push(c);
        let (_, c) = timed(|| vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP"));
        irqchip.push(c);
        let (_, c) = timed(|| {
            vm.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .expect("KVM_CREATE_PIT2")
        });
        pit.push(c);
        let (_v, c) = timed(|| vm.create_vcpu(0).expect("KVM_CREATE_VCPU"));
        vcpu.push(c);
    }
    report("KVM_CREATE_VM", &create);
    report("KVM_CREATE_IRQCHIP", &irqchip);
    report("KVM_CREATE_PIT2", &pit);
    report("KVM_CREATE_VCPU (the first)", &vcpu);

    // The order of the steps: the memslot first (before any device the irqchip registers on
    // KVM's buses), or after the irqchip, and after the irqchip once its grace periods had
    // time to end.
    let ram = GuestRam::new(256 << 20).expect("guest RAM");
    let host = ram.host_base() as u64;
    let mut first = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut after = Vec::new();
    let mut settled = Vec::new();
    for _ in 0..reps {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let (_, c) = timed(|| slot(&vm, 0, 0, 256 << 20, host, 0));
        first[0].push(c);
        let (_, c) = timed(|| vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP"));
        first[1].push(c);
        let (_, c) = timed(|| {
            vm.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .expect("KVM_CREATE_PIT2")
        });
        first[2].push(c);
        let (_v, c) = timed(|| vm.create_vcpu(0).expect("KVM_CREATE_VCPU"));
        first[3].push(c);
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let (_, c) = timed(|| slot(&vm, 0, 0, 256 << 20, host, 0));
        after.push(c);
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_, c) = timed(|| slot(&vm, 0, 0, 256 << 20, host, 0));
        settled.push(c);
    }
    report("order: memslot 256 MiB first", &first[0]);
    report("  then KVM_CREATE_IRQCHIP", &first[1]);
    report("  then KVM_CREATE_PIT2", &first[2]);
    report("  then KVM_CREATE_VCPU", &first[3]);
    report("order: irqchip, then memslot 256 MiB", &after);
    report("order: irqchip, 50 ms, then memslot 256 MiB", &settled);
    drop(ram);

    for &mib in &sizes {
        let size = mib << 20;
        let ram = GuestRam::new(size.max(2 << 20)).expect("guest RAM");
        let host = ram.host_base() as u64;
        for (label, flags) in [("", 0), (" dirty-log", KVM_MEM_LOG_DIRTY_PAGES)] {
            let mut one = Vec::new();
            let mut toggle = Vec::new();
            for _ in 0..reps {
                let vm = kvm.create_vm().expect("KVM_CREATE_VM");
                let (_, c) = timed(|| slot(&vm, 0, 0, size, host, flags));
                one.push(c);
                let (_, c) = timed(|| slot(&vm, 0, 0, size, host, flags ^ KVM_MEM_LOG_DIRTY_PAGES));
                toggle.push(c);
            }
            report(&format!("memslot {mib} MiB{label}"), &one);
            report("  then its dirty log toggled", &toggle);
        }
        let mut after_chip = Vec::new();
        let mut four = Vec::new();
        for _ in 0..reps {
            let vm = kvm.create_vm().expect("KVM_CREATE_VM");
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
            let (_, c) = timed(|| slot(&vm, 0, 0, size, host, 0));
            after_chip.push(c);
            if size >= 4 << 20 {
                let vm = kvm.create_vm().expect("KVM_CREATE_VM");
                let q = size / 4;
                let (_, c) = timed(|| {
                    for i in 0..4 {
                        slot(&vm, i as u32, i * q, q, host + i * q, 0)
                    }
                });
                four.push(c);
            }
        }
        report(&format!("memslot {mib} MiB after the irqchip"), &after_chip);
        if !four.is_empty() {
            report(&format!("memslot {mib} MiB as four slots"), &four);
        }
    }
}
