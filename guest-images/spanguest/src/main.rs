//! spanguest: the tiny x86-64 guest every spanvmm test and benchmark runs.
//!
//! boot.S holds everything that runs at CPL0 (about twenty instructions: PVM emulates CPL0 code)
//! and the static page tables; from `user_entry` on, everything runs natively at CPL3 (ports
//! allowed by the TSS I/O bitmap), never taking an interrupt or an exception. The contract with
//! the VMM is docs/spanguest-abi.md.

#![no_std]
#![no_main]

mod arch;
mod config;
mod console;
mod disk;
mod kv;
mod kvload;
mod memory;
mod net;
mod pv;
mod tsc;
mod virtio;
mod workload;

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use arch::{MAPPED, in_map, phys_u32, phys_u64, rdtsc};
use console::Line;
use memory::MapEntry;
use workload::Plan;

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));

/// Set to 1 by the PVH path in boot.S; stays 0 with the direct entry.
#[unsafe(no_mangle)]
static SPANGUEST_ENTRY_PVH: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    /// First byte after the image, bss included (linker.ld).
    static spanguest_image_end: u8;
}

/// vCPUs boot.S gives a stack to.
const MAX_CPUS: u64 = 8;
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Longest command line read.
const CMDLINE_MAX: u64 = 4096;
/// Memory-map entries read (more are ignored).
const MAP_MAX: usize = 32;

/// A value vCPU 0 computes once and the other vCPUs wait for.
struct Once<T> {
    claimed: AtomicBool,
    ready: AtomicBool,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once by the single caller that claimed it, before `ready` is set
// with Release; readers touch it only after seeing `ready` with Acquire, and never mutate it.
unsafe impl<T: Sync> Sync for Once<T> {}

impl<T> Once<T> {
    const fn new() -> Self {
        Once {
            claimed: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    fn publish(&'static self, value: T) -> &'static T {
        assert!(
            !self.claimed.swap(true, Ordering::Relaxed),
            "published twice"
        );
        // SAFETY: we won the claim, so no other writer exists, and no reader looks before
        // `ready`.
        let slot = unsafe { &mut *self.value.get() };
        let value = slot.write(value);
        self.ready.store(true, Ordering::Release);
        value
    }

    fn wait(&'static self) -> &'static T {
        while !self.ready.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: `ready` is set only after the value was written, and it is never written again.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}

static PLAN: Once<Plan> = Once::new();

/// Called by `user_entry` on every vCPU with its own stack.
#[unsafe(no_mangle)]
extern "C" fn spanguest_main(start_info: u64, cpu: u64, cpus: u64) -> ! {
    let t0 = rdtsc();
    let plan = if cpu == 0 {
        PLAN.publish(boot(start_info, cpus, t0))
    } else {
        PLAN.wait()
    };
    workload::run(plan, cpu)
}

/// Prints `line` (an `error` line) and powers off with status 1.
fn fail(line: Line) -> ! {
    line.emit();
    pv::power_off(1)
}

/// vCPU 0's set-up: read `hvm_start_info`, parse the command line, find the TSC frequency and
/// place the workload in RAM, then print `boot`.
fn boot(start_info: u64, cpus: u64, t0: u64) -> Plan {
    let pv = pv::detect();
    if !(1..=MAX_CPUS).contains(&cpus) {
        fail(
            Line::new("error")
                .text("unsupported vCPU count")
                .num("cpus", cpus),
        );
    }
    // hvm_start_info: magic, version, flags, nr_modules (u32); modlist, cmdline, rsdp, memmap
    // (u64); memmap_entries (u32).
    if phys_u32(start_info) != Some(HVM_START_MAGIC) {
        fail(
            Line::new("error")
                .text("no hvm_start_info")
                .hex("at", start_info),
        );
    }
    let version = phys_u32(start_info + 4).unwrap_or(0);
    let cmdline = cmdline_at(phys_u64(start_info + 24).unwrap_or(0));
    let cfg = config::parse(cmdline).unwrap_or_else(|e| {
        let line = Line::new("error").text("cmdline:").text(e.what);
        fail(if e.token.is_empty() {
            line
        } else {
            line.text("").raw(e.token)
        })
    });
    if pv && !cfg.serial_console {
        console::use_pv_lines();
    }
    let Some((khz, source)) = tsc::detect(cfg.tsc_khz, pv) else {
        fail(Line::new("error").text("cannot find the TSC frequency: pass tsc_khz="));
    };
    let (map, entries) = memory_map(start_info, version);
    if entries == 0 {
        fail(Line::new("error").text("hvm_start_info has no memory map"));
    }
    let map = &map[..entries];
    let image_end = &raw const spanguest_image_end as u64;
    let layout = memory::plan(&cfg, map, image_end, MAPPED).unwrap_or_else(|what| {
        fail(
            Line::new("error")
                .text(what)
                .num("mib", cfg.mib)
                .num("ram_mib", memory::ram_mib(map)),
        )
    });
    if pv {
        pv::register_mailbox();
        if cfg.secret != 0 {
            let gpa = pv::register_secret();
            Line::new("secret")
                .hex("gpa", gpa)
                .num("len", pv::SECRET_LEN as u64)
                .emit();
        }
    }
    let entry = if SPANGUEST_ENTRY_PVH.load(Ordering::Relaxed) == 1 {
        "pvh"
    } else {
        "direct"
    };
    Line::new("boot")
        .num("cpus", cpus)
        .num("tsc_khz", khz)
        .num("mem_mib", layout.ram_mib)
        .kv("entry", entry)
        .kv("tsc", source.name())
        .emit();
    Plan {
        cfg,
        layout,
        cpus,
        pv,
        clock: tsc::Clock { khz },
        t0,
    }
}

/// The memory map of `hvm_start_info` version 1 and later (entries: addr, size u64; type,
/// reserved u32), and how many entries were read.
fn memory_map(start_info: u64, version: u32) -> ([MapEntry; MAP_MAX], usize) {
    let mut map = [MapEntry {
        addr: 0,
        size: 0,
        kind: 0,
    }; MAP_MAX];
    let (Some(at), Some(n)) = (phys_u64(start_info + 40), phys_u32(start_info + 48)) else {
        return (map, 0);
    };
    if version < 1 {
        return (map, 0);
    }
    let mut entries = 0;
    for (i, slot) in map.iter_mut().take(n as usize).enumerate() {
        let p = at + 24 * i as u64;
        let (Some(addr), Some(size), Some(kind)) = (phys_u64(p), phys_u64(p + 8), phys_u32(p + 16))
        else {
            break;
        };
        *slot = MapEntry { addr, size, kind };
        entries += 1;
    }
    (map, entries)
}

/// The NUL-terminated command line at `addr` (empty if there is none).
fn cmdline_at(addr: u64) -> &'static [u8] {
    if !in_map(addr, CMDLINE_MAX) {
        return b"";
    }
    // SAFETY: addr..addr + CMDLINE_MAX is identity-mapped (checked above) and nothing writes it
    // while the slice is used: it is parsed before the workload touches any memory.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, CMDLINE_MAX as usize) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..len]
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new("error").text("panic");
    if let Some(at) = info.location() {
        line = line.text(at.file()).num("line", u64::from(at.line()));
    }
    fail(line)
}
