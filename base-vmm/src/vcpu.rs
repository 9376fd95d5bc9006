//! vCPUs: register state, boot set-up, and the vCPU thread.
//!
//! Each vCPU runs on its own thread as a small state machine (`Running`, `Paused`) driven by
//! requests on a channel. A request is followed by a signal whose handler sets `immediate_exit`
//! in the thread's `kvm_run`, so `KVM_RUN` returns promptly; KVM completes any in-flight port
//! I/O before it returns, so a paused vCPU's registers are always consistent.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_EXIT_DIRTY_RING_FULL,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{BootEntry, BOOT_GDT_ADDR};
use crate::devices::{ExitKind, IoAction, IoBus};
use crate::dirty_ring::DirtyRings;

/// vCPU errors.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {err}")]
    Kvm {
        /// vCPU index.
        index: usize,
        /// The operation.
        what: &'static str,
        /// errno.
        err: kvm_ioctls::Error,
    },
    /// The vCPU thread is gone or did not answer in time.
    #[error("vCPU {0} does not answer")]
    NoAnswer(usize),
    /// The request does not fit the vCPU's current state.
    #[error("vCPU {index}: {msg}")]
    BadState {
        /// vCPU index.
        index: usize,
        /// What is wrong.
        msg: String,
    },
    /// Spawning the thread failed.
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Everything KVM holds about one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// MP state (runnable, halted, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Model-specific registers: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave is not Clone (it ends in a flexible array, empty in the legacy layout).
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        VcpuState {
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            debug_regs: self.debug_regs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuExitReason {
    /// The guest powered off with this status.
    PowerOff(u8),
    /// The guest asked for a reset.
    Reset,
    /// The guest halted with nothing to wake it.
    Halted,
    /// KVM or the VMM failed.
    Error(String),
}

/// Messages a vCPU thread sends to the VMM on its own.
#[derive(Debug)]
pub struct VcpuEvent {
    /// vCPU index.
    pub index: usize,
    /// Why it stopped.
    pub reason: VcpuExitReason,
}

#[derive(Clone, Copy)]
enum Request {
    Pause,
    Resume,
    Save,
    /// Pause, then save: one round trip where a hand-over needs both.
    PauseSave,
    /// Sleep this share (percent) of the time while running; 0 lifts it.
    Throttle(u8),
    Stop,
}

/// A throttled vCPU runs this long between its sleeps, which last `percent / (100 -
/// percent)` times as long (QEMU's auto-converge: at 90 %, 10 ms on, 90 ms off). A guest
/// that has slack catches up on short sleeps (a paced loop repays a few milliseconds of
/// lost time at once); long ones take work from it, as from a CPU-bound one.
pub const THROTTLE_RUN: Duration = Duration::from_millis(10);

/// The most a vCPU can be throttled, percent (it then sleeps 990 ms per 10 ms run).
pub const MAX_THROTTLE: u8 = 99;

/// A throttled vCPU's sleep per [`THROTTLE_RUN`] at `percent`.
pub fn throttle_sleep(percent: u8) -> Duration {
    let p = u32::from(percent.min(MAX_THROTTLE));
    THROTTLE_RUN * p / (100 - p)
}

/// A vCPU's throttle: its share and the thread-directed one-shot timer that ends each run
/// (created on first use; CLOCK_MONOTONIC, the kick signal, this thread only). The timer is
/// armed afresh when a run begins, after the sleep: a periodic one would tick during a sleep
/// that woke late on a loaded host and send the vCPU straight back to sleep, sleeps chaining
/// for as long as the wakes stay late (a 750 ms stall seen under load).
struct Throttle {
    percent: u8,
    timer: Option<libc::timer_t>,
    /// When the current run ends (the timer's tick): a kick before it is a request's, not
    /// the tick, and does not sleep.
    run_until: Option<std::time::Instant>,
}

enum Reply {
    Done,
    State(Box<VcpuState>),
    Refused(String),
}

/// True on a vCPU thread (while it handles an exit, e.g. a port event delivered to a service).
/// Operations that wait for every vCPU must refuse to run there: they would wait for themselves.
pub fn on_vcpu_thread() -> bool {
    KVM_RUN.with(|r| !r.get().is_null())
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialized thread-local read and a byte store.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, valid while the vCPU thread
        // lives; the handler only runs on vCPU threads that set it.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The handler does nothing unsafe for threads that never set KVM_RUN.
        register_signal_handler(kick_signal(), kick_handler)
            .expect("cannot install the vCPU kick signal handler");
    });
}

/// A vCPU not yet running: created, configured, then handed to [`Vcpu::start`].
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    msr_list: Arc<Vec<u32>>,
    has_lapic: bool,
    /// The VM's dirty rings, when it logs through them (this vCPU's ring is among them).
    dirty_rings: Option<Arc<DirtyRings>>,
}

fn kvm_err(index: usize, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { index, what, err }
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// MSRs read per `KVM_GET_MSRS` in [`Vcpu::readable_msrs`] (kvm-bindings' `Msrs` holds at
/// most 256).
const MSR_BATCH: usize = 256;

impl Vcpu {
    /// Creates vCPU `index` with `cpuid` (its APIC IDs patched to `index`).
    pub fn new(
        vm: &VmFd,
        index: usize,
        cpuid: &CpuId,
        msr_list: Arc<Vec<u32>>,
        has_lapic: bool,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(kvm_err(index, "KVM_CREATE_VCPU"))?;
        let vcpu = Vcpu {
            index,
            fd,
            msr_list,
            has_lapic,
            dirty_rings: None,
        };
        vcpu.set_cpuid(cpuid)?;
        Ok(vcpu)
    }

    /// Gives the vCPU `cpuid` (its APIC IDs patched to its index). Only before it first runs:
    /// a restore gives a prepared vCPU the CPUID the guest was recorded with.
    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24),
                0xb | 0x1f => e.edx = index as u32,
                _ => {}
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_err(index, "KVM_SET_CPUID2"))
    }

    /// Maps this vCPU's dirty ring into `rings` (a VM logging through its rings); the thread
    /// then empties them when KVM stops the vCPU with its ring full.
    pub fn join_dirty_rings(&mut self, rings: Arc<DirtyRings>) -> Result<(), VcpuError> {
        rings
            .add_vcpu(&self.fd)
            .map_err(|e| VcpuError::Spawn(std::io::Error::other(e.to_string())))?;
        self.dirty_rings = Some(rings);
        Ok(())
    }

    /// The MSRs saved and restored with this vCPU.
    pub fn msr_list(&self) -> &Arc<Vec<u32>> {
        &self.msr_list
    }

    /// Sets the MSRs saved and restored with this vCPU.
    pub fn set_msr_list(&mut self, list: Arc<Vec<u32>>) {
        self.msr_list = list;
    }

    /// Those of `list` this vCPU lets the VMM read with its current CPUID (some listed ones
    /// fail on PVM; a template that hides a feature can make its MSRs unreadable). Reads them
    /// in batches: `KVM_GET_MSRS` stops at the first MSR it cannot read and says how many it
    /// read, so the probe costs one ioctl per unreadable MSR rather than one per MSR.
    pub fn readable_msrs(&self, list: &[u32]) -> Vec<u32> {
        let mut readable = Vec::with_capacity(list.len());
        let mut rest = list;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSR_BATCH)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).expect("a batch fits in Msrs");
            // An ioctl error reads as "none readable": the first is dropped, the rest retried.
            let n = self.fd.get_msrs(&mut msrs).unwrap_or(0).min(batch.len());
            readable.extend_from_slice(&batch[..n]);
            // Past the batch when all of it was read; else past batch[n], the unreadable one.
            rest = &rest[if n == batch.len() { n } else { n + 1 }..];
        }
        readable
    }

    /// The TSC frequency KVM runs this vCPU at, in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd
            .get_tsc_khz()
            .map_err(kvm_err(self.index, "KVM_GET_TSC_KHZ"))
    }

    /// Sets the registers for a fresh boot through `entry`. vCPU 0 enters the kernel;
    /// with the direct entry every vCPU does (each runs its slice); otherwise secondary
    /// vCPUs wait for a startup IPI.
    pub fn configure_boot(&self, entry: &BootEntry, count: usize) -> Result<(), VcpuError> {
        let i = self.index;
        let mut sregs = self.fd.get_sregs().map_err(kvm_err(i, "KVM_GET_SREGS"))?;
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match *entry {
            BootEntry::Pvh { .. } | BootEntry::Linux { .. } if i > 0 => {
                let wait = kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
                };
                return self
                    .fd
                    .set_mp_state(wait)
                    .map_err(kvm_err(i, "KVM_SET_MP_STATE"));
            }
            BootEntry::Pvh { entry: rip, .. } | BootEntry::Linux { entry: rip, .. } => {
                // 32-bit protected mode, paging off, flat segments from the boot GDT.
                sregs.cs = segment(0x10, 0xb, 0, false);
                let data = segment(0x18, 0x3, 0, false);
                (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
                sregs.tr = kvm_segment {
                    limit: 0x67,
                    type_: 0xb,
                    present: 1,
                    ..Default::default()
                };
                sregs.gdt.base = BOOT_GDT_ADDR;
                sregs.gdt.limit = 31;
                sregs.cr0 = 0x11; // PE | ET
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = rip;
                match *entry {
                    // PVH: EBX = hvm_start_info.
                    BootEntry::Pvh { start_info, .. } => regs.rbx = start_info,
                    // Linux 32-bit protocol: ESI = boot_params, EBX/EBP/EDI zero.
                    BootEntry::Linux { boot_params, .. } => regs.rsi = boot_params,
                    BootEntry::Direct { .. } => {}
                }
            }
            BootEntry::Direct {
                user_entry,
                pml4,
                gdt_base,
                gdt_limit,
                tss_base,
                tss_limit,
                start_info,
            } => {
                // Long mode at CPL3 straight away: the guest's own page tables and GDT.
                sregs.cs = segment(0x2b, 0xb, 3, true);
                let data = segment(0x23, 0x3, 3, false);
                (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
                sregs.tr = kvm_segment {
                    base: tss_base,
                    limit: tss_limit,
                    selector: 0x30,
                    type_: 0xb,
                    present: 1,
                    ..Default::default()
                };
                sregs.ldt = kvm_segment {
                    unusable: 1,
                    ..Default::default()
                };
                sregs.gdt.base = gdt_base;
                sregs.gdt.limit = gdt_limit;
                sregs.idt.base = 0;
                sregs.idt.limit = 0;
                sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
                sregs.cr3 = pml4;
                sregs.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
                sregs.efer = 0x500; // LMA | LME
                regs.rip = user_entry;
                regs.rflags = 0x3002; // IOPL 3 (PVM ignores it; the TSS I/O bitmap rules)
                regs.rdi = start_info;
                regs.rsi = i as u64;
                regs.rdx = count as u64;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err(i, "KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs)
            .map_err(kvm_err(i, "KVM_SET_REGS"))?;
        // With an in-kernel irqchip, secondary vCPUs would otherwise wait for a startup IPI.
        let runnable = kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        self.fd
            .set_mp_state(runnable)
            .map_err(kvm_err(i, "KVM_SET_MP_STATE"))
    }

    /// Reads every register set of a vCPU that is not running.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let i = self.index;
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(kvm_err(i, "KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err(i, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err(i, "KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm_err(i, "KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err(i, "KVM_GET_XCRS"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm_err(i, "KVM_GET_DEBUGREGS"))?;
        let lapic = if self.has_lapic {
            Some(fd.get_lapic().map_err(kvm_err(i, "KVM_GET_LAPIC"))?)
        } else {
            None
        };
        let mut msrs = Msrs::from_entries(
            &self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| VcpuError::BadState {
            index: i,
            msg: format!("MSR list: {e:?}"),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err(i, "KVM_GET_MSRS"))?;
        if n != self.msr_list.len() {
            return Err(VcpuError::BadState {
                index: i,
                msg: format!("KVM read {n} of {} MSRs", self.msr_list.len()),
            });
        }
        let msrs = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err(i, "KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Writes a saved register state back (order matters: sregs before regs, LAPIC before
    /// MSRs such as the TSC deadline, events last).
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let i = self.index;
        let fd = &self.fd;
        fd.set_mp_state(s.mp_state)
            .map_err(kvm_err(i, "KVM_SET_MP_STATE"))?;
        fd.set_sregs(&s.sregs)
            .map_err(kvm_err(i, "KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(kvm_err(i, "KVM_SET_REGS"))?;
        // SAFETY: `s.xsave` is the legacy 4 KiB kvm_xsave, exactly what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err(i, "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm_err(i, "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm_err(i, "KVM_SET_DEBUGREGS"))?;
        match (&s.lapic, self.has_lapic) {
            (Some(l), true) => fd.set_lapic(l).map_err(kvm_err(i, "KVM_SET_LAPIC"))?,
            (None, false) => {}
            _ => {
                return Err(VcpuError::BadState {
                    index: i,
                    msg: "saved state and this VM disagree on having a local APIC".into(),
                })
            }
        }
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState {
            index: i,
            msg: format!("MSR list: {e:?}"),
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err(i, "KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::BadState {
                index: i,
                msg: format!(
                    "KVM accepted {n} of {} MSRs (first refused: {:#x})",
                    entries.len(),
                    entries[n].index
                ),
            });
        }
        fd.set_vcpu_events(&s.events)
            .map_err(kvm_err(i, "KVM_SET_VCPU_EVENTS"))
    }

    /// Starts the vCPU thread, paused or running.
    pub fn start(
        self,
        bus: Arc<IoBus>,
        events: Sender<VcpuEvent>,
        start_paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let parked = ParkedThread::spawn(self.index)?;
        self.start_on(parked, bus, events, start_paused)
    }

    /// [`Self::start`] on a thread started ahead.
    pub fn start_on(
        self,
        parked: ParkedThread,
        bus: Arc<IoBus>,
        events: Sender<VcpuEvent>,
        start_paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (req_tx, req_rx) = mpsc::channel();
        let (rep_tx, rep_rx) = mpsc::channel();
        let run = move || {
            let mut t = VcpuThread {
                vcpu: self,
                bus,
                requests: req_rx,
                replies: rep_tx,
                events,
                state: if start_paused {
                    ThreadState::Paused
                } else {
                    ThreadState::Running
                },
                pending: Vec::new(),
                throttle: Throttle {
                    percent: 0,
                    timer: None,
                    run_until: None,
                },
            };
            t.run();
        };
        parked.job.send(Box::new(run)).map_err(|_| {
            VcpuError::Spawn(std::io::Error::other(
                "the vCPU thread ended before its vCPU was given to it",
            ))
        })?;
        Ok(VcpuHandle {
            index,
            requests: req_tx,
            replies: rep_rx,
            thread: Some(parked.thread),
        })
    }
}

/// A vCPU thread started ahead of its vCPU, already under the vCPU seccomp filter, waiting for
/// [`Vcpu::start_on`]: a live update starts its threads while the old process still runs the
/// guest, so that the pause pays neither for creating them nor for installing their filters.
/// Dropped unused, the thread ends.
pub struct ParkedThread {
    job: Sender<Box<dyn FnOnce() + Send>>,
    thread: JoinHandle<()>,
}

impl ParkedThread {
    /// Starts the thread for vCPU `index`.
    pub fn spawn(index: usize) -> Result<Self, VcpuError> {
        install_kick_handler();
        let (job, jobs) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Before the guest runs anything: guest exits and the services they reach run
                // under the vCPU filter.
                crate::seccomp::enter_or_log(crate::seccomp::Role::Vcpu);
                if let Ok(run) = jobs.recv() {
                    run();
                }
            })
            .map_err(VcpuError::Spawn)?;
        Ok(ParkedThread { job, thread })
    }
}

struct VcpuThread {
    vcpu: Vcpu,
    bus: Arc<IoBus>,
    requests: Receiver<Request>,
    replies: Sender<Reply>,
    events: Sender<VcpuEvent>,
    state: ThreadState,
    /// Requests that arrived while an I/O was in flight (during a paravirtual sleep).
    pending: Vec<Request>,
    throttle: Throttle,
}

/// Where a vCPU thread is. Requests move it between `Running` and `Paused`; the guest ending
/// (power-off, reset, an error) makes it `Finished`, which nothing resumes; `Stop` ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadState {
    /// In `KVM_RUN` (or about to be).
    Running,
    /// Waiting for requests; registers are consistent.
    Paused,
    /// The guest stopped for good on this vCPU: it answers requests, never runs again.
    Finished,
    /// The thread ends.
    Stopped,
}

enum Flow {
    Continue,
    Finish(VcpuExitReason),
}

impl VcpuThread {
    fn run(&mut self) {
        KVM_RUN.with(|r| r.set(self.vcpu.fd.get_kvm_run() as *mut kvm_run));
        loop {
            match self.state {
                ThreadState::Stopped => break,
                ThreadState::Paused | ThreadState::Finished => match self.requests.recv() {
                    Ok(req) => self.handle(req),
                    Err(_) => break,
                },
                ThreadState::Running => match self.run_once() {
                    Flow::Continue => {}
                    Flow::Finish(reason) => {
                        let _ = self.events.send(VcpuEvent {
                            index: self.vcpu.index,
                            reason,
                        });
                        self.state = ThreadState::Finished;
                    }
                },
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        if let Some(t) = self.throttle.timer.take() {
            // SAFETY: a timer this thread created and nothing else holds.
            unsafe { libc::timer_delete(t) };
        }
    }

    /// Handles a request, moving the thread's state.
    fn handle(&mut self, req: Request) {
        let reply = match req {
            Request::Pause => {
                if self.state == ThreadState::Running {
                    self.state = ThreadState::Paused;
                }
                Reply::Done
            }
            Request::Resume => {
                if self.state == ThreadState::Paused {
                    self.state = ThreadState::Running;
                }
                Reply::Done
            }
            Request::Save if self.state == ThreadState::Running => {
                Reply::Refused("pause the vCPU before saving it".into())
            }
            Request::Save => match self.vcpu.save() {
                Ok(s) => Reply::State(Box::new(s)),
                Err(e) => Reply::Refused(e.to_string()),
            },
            Request::PauseSave => {
                if self.state == ThreadState::Running {
                    self.state = ThreadState::Paused;
                }
                match self.vcpu.save() {
                    Ok(s) => Reply::State(Box::new(s)),
                    Err(e) => Reply::Refused(e.to_string()),
                }
            }
            Request::Throttle(percent) => match self.set_throttle(percent) {
                Ok(()) => Reply::Done,
                Err(e) => Reply::Refused(e),
            },
            Request::Stop => {
                self.state = ThreadState::Stopped;
                Reply::Done
            }
        };
        let _ = self.replies.send(reply);
    }

    /// Where the vCPU is, for error messages.
    fn where_now(&self) -> String {
        let fd = &self.vcpu.fd;
        match (fd.get_regs(), fd.get_sregs(), fd.get_vcpu_events()) {
            (Ok(r), Ok(s), Ok(e)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cpl={} cr0={:#x} cr3={:#x} cr4={:#x} \
                 efer={:#x} last exception vector {} error code {:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                s.cs.selector,
                s.cs.dpl,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer,
                e.exception.nr,
                e.exception.error_code
            ),
            _ => "registers unreadable".into(),
        }
    }

    /// Sets the throttle's share and starts a run (at 0, disarms the timer).
    fn set_throttle(&mut self, percent: u8) -> Result<(), String> {
        self.start_throttled_run(percent)?;
        self.throttle.percent = percent;
        Ok(())
    }

    /// Arms this thread's throttle timer to end a run [`THROTTLE_RUN`] from now (at 0,
    /// disarms it).
    fn start_throttled_run(&mut self, percent: u8) -> Result<(), String> {
        let timer = match self.throttle.timer {
            Some(t) => t,
            None if percent == 0 => return Ok(()),
            None => {
                // SAFETY: a zeroed sigevent is valid; the fields set make it thread-directed.
                let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
                ev.sigev_notify = libc::SIGEV_THREAD_ID;
                ev.sigev_signo = kick_signal();
                // SAFETY: gettid has no preconditions.
                ev.sigev_notify_thread_id = unsafe { libc::gettid() };
                let mut t: libc::timer_t = std::ptr::null_mut();
                // SAFETY: valid pointers to a sigevent and to the timer id it fills.
                if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut t) } != 0 {
                    return Err(format!(
                        "cannot create the throttle timer: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                self.throttle.timer = Some(t);
                t
            }
        };
        // One tick, at the run's end; zero disarms.
        let run = if percent > 0 {
            THROTTLE_RUN
        } else {
            Duration::ZERO
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: run.as_secs() as libc::time_t,
                tv_nsec: run.subsec_nanos() as libc::c_long,
            },
        };
        let now = std::time::Instant::now();
        // SAFETY: the timer is this thread's; the spec is a valid pointer.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(format!(
                "cannot set the throttle timer: {}",
                std::io::Error::last_os_error()
            ));
        }
        self.throttle.run_until = (percent > 0).then_some(now + run);
        Ok(())
    }

    /// A throttled vCPU whose run has ended sleeps its share of the cycle (waking early for
    /// a request), then starts the next run.
    fn throttled_sleep(&mut self) {
        let run_ended = self
            .throttle
            .run_until
            .is_some_and(|t| std::time::Instant::now() >= t);
        if self.state != ThreadState::Running || !run_ended {
            return;
        }
        let start = std::time::Instant::now();
        self.sleep(throttle_sleep(self.throttle.percent));
        self.bus.throttled_us.fetch_add(
            start.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Err(e) = self.start_throttled_run(self.throttle.percent) {
            // Not expected once the timer exists; the vCPU then runs unthrottled.
            tracing::warn!("vCPU {}: {e}", self.vcpu.index);
            self.throttle.run_until = None;
        }
    }

    fn set_immediate_exit(&mut self, v: u8) {
        self.vcpu.fd.set_kvm_immediate_exit(v);
    }

    fn run_once(&mut self) -> Flow {
        let index = self.vcpu.index;
        let bus = &self.bus;
        crate::startup::mark_first(&crate::startup::FIRST_RUNS, 1, "first KVM_RUN");
        let exit = self.vcpu.fd.run();
        crate::startup::mark_first(&crate::startup::FIRST_EXITS, 2, "exit");
        bus.exits.count(match &exit {
            Ok(VcpuExit::IoIn(..)) => ExitKind::IoIn,
            Ok(VcpuExit::IoOut(..)) => ExitKind::IoOut,
            Ok(VcpuExit::MmioRead(..)) => ExitKind::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => ExitKind::MmioWrite,
            Err(e) if e.errno() == libc::EINTR => ExitKind::Kick,
            _ => ExitKind::Other,
        });
        let action = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                IoAction::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                IoAction::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                IoAction::Continue
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                // The guest dirtied a ring's worth of pages since the last harvest: take them
                // into the pending set, and the vCPU goes on.
                let Some(rings) = &self.vcpu.dirty_rings else {
                    return Flow::Finish(VcpuExitReason::Error(format!(
                        "vCPU {index}: dirty ring full, but this VM has no dirty ring"
                    )));
                };
                if let Err(e) = rings.on_full() {
                    return Flow::Finish(VcpuExitReason::Error(format!("vCPU {index}: {e}")));
                }
                IoAction::Continue
            }
            Ok(VcpuExit::Hlt) => return Flow::Finish(VcpuExitReason::Halted),
            Ok(VcpuExit::Shutdown) => {
                return Flow::Finish(VcpuExitReason::Error(format!(
                    "vCPU {index}: the guest triple-faulted ({})",
                    self.where_now()
                )))
            }
            Ok(other) => {
                return Flow::Finish(VcpuExitReason::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked: any in-flight I/O is complete now. Serve what was asked.
                self.set_immediate_exit(0);
                let mut reqs = std::mem::take(&mut self.pending);
                reqs.extend(self.requests.try_iter());
                for r in reqs {
                    self.handle(r);
                    if self.state == ThreadState::Stopped {
                        break;
                    }
                }
                self.throttled_sleep();
                return Flow::Continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => IoAction::Continue,
            Err(e) => {
                return Flow::Finish(VcpuExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                )))
            }
        };
        match action {
            IoAction::Continue => Flow::Continue,
            IoAction::Sleep(d) => {
                self.sleep(d);
                Flow::Continue
            }
            IoAction::PowerOff(code) => Flow::Finish(VcpuExitReason::PowerOff(code)),
            IoAction::Reset => Flow::Finish(VcpuExitReason::Reset),
        }
    }

    /// Parks the vCPU for a paravirtual sleep, waking early for a request. The `out` that asked
    /// for the sleep is still in flight, so the request waits until KVM_RUN has completed it.
    fn sleep(&mut self, d: Duration) {
        match self.requests.recv_timeout(d) {
            Ok(req) => {
                self.pending.push(req);
                self.set_immediate_exit(1);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.set_immediate_exit(1),
        }
    }
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    index: usize,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// Hands `req` to the thread and kicks it out of KVM_RUN; [`Self::answer`] waits for the
    /// reply.
    fn post(&self, req: Request) -> Result<(), VcpuError> {
        self.requests
            .send(req)
            .map_err(|_| VcpuError::NoAnswer(self.index))?;
        if let Some(t) = &self.thread {
            // A failed kick only means the thread already left KVM_RUN.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    fn answer(&self) -> Result<Reply, VcpuError> {
        self.replies
            .recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| VcpuError::NoAnswer(self.index))
    }

    fn ask(&self, req: Request) -> Result<Reply, VcpuError> {
        self.post(req)?;
        self.answer()
    }

    fn done(&self, reply: Reply) -> Result<(), VcpuError> {
        match reply {
            Reply::Done => Ok(()),
            Reply::Refused(msg) => Err(VcpuError::BadState {
                index: self.index,
                msg,
            }),
            Reply::State(_) => Err(VcpuError::NoAnswer(self.index)),
        }
    }

    /// Reads the registers of a paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        match self.ask(Request::Save)? {
            Reply::State(s) => Ok(*s),
            Reply::Refused(msg) => Err(VcpuError::BadState {
                index: self.index,
                msg,
            }),
            Reply::Done => Err(VcpuError::NoAnswer(self.index)),
        }
    }

    /// Asks every vCPU at once: all are kicked before any answer is awaited, so that they
    /// stop (or save) side by side rather than one after the other. Every answer is collected
    /// before an error is returned, so that none is left for the next request.
    fn ask_all(vcpus: &[VcpuHandle], req: Request) -> Vec<Result<Reply, VcpuError>> {
        let posted: Vec<_> = vcpus.iter().map(|v| v.post(req)).collect();
        vcpus
            .iter()
            .zip(posted)
            .map(|(v, p)| p.and_then(|()| v.answer()))
            .collect()
    }

    fn all_done(vcpus: &[VcpuHandle], req: Request) -> Result<(), VcpuError> {
        vcpus
            .iter()
            .zip(Self::ask_all(vcpus, req))
            .try_for_each(|(v, r)| v.done(r?))
    }

    /// Stops every vCPU at an instruction boundary with no I/O in flight, in parallel.
    pub fn pause_all(vcpus: &[VcpuHandle]) -> Result<(), VcpuError> {
        Self::all_done(vcpus, Request::Pause)
    }

    /// Lets every paused vCPU run again, in parallel.
    pub fn resume_all(vcpus: &[VcpuHandle]) -> Result<(), VcpuError> {
        Self::all_done(vcpus, Request::Resume)
    }

    /// [`Self::save`] on every vCPU, in parallel.
    pub fn save_all(vcpus: &[VcpuHandle]) -> Result<Vec<VcpuState>, VcpuError> {
        Self::states_of(vcpus, Request::Save)
    }

    /// [`Self::pause_all`] and [`Self::save_all`] in one round trip: each vCPU thread saves
    /// its registers as soon as it stopped.
    pub fn pause_save_all(vcpus: &[VcpuHandle]) -> Result<Vec<VcpuState>, VcpuError> {
        Self::states_of(vcpus, Request::PauseSave)
    }

    fn states_of(vcpus: &[VcpuHandle], req: Request) -> Result<Vec<VcpuState>, VcpuError> {
        vcpus
            .iter()
            .zip(Self::ask_all(vcpus, req))
            .map(|(v, r)| match r? {
                Reply::State(s) => Ok(*s),
                other => v.done(other).and(Err(VcpuError::NoAnswer(v.index))),
            })
            .collect()
    }

    /// Throttles every vCPU to sleep `percent` % of the time (at most [`MAX_THROTTLE`]; 0:
    /// lifted), in parallel.
    pub fn throttle_all(vcpus: &[VcpuHandle], percent: u8) -> Result<(), VcpuError> {
        Self::all_done(vcpus, Request::Throttle(percent))
    }

    /// Ends the thread.
    pub fn stop(mut self) {
        let _ = self.ask(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pv::{PvDevice, PvState, PV_BASE, PV_LEN};
    use crate::dirty_ring::DirtyLogMode;
    use crate::memory::GuestRam;
    use crate::vm::Vm;
    use std::sync::Mutex;

    const TSS_LIMIT: u32 = 104 + 8192;

    /// Remembers the last value written to it.
    struct Counter(u64);
    impl crate::devices::PioDevice for Counter {
        fn pio_read(&mut self, _: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn pio_write(&mut self, _: u16, data: &[u8]) -> IoAction {
            self.0 = crate::devices::le_value(data);
            IoAction::Continue
        }
    }

    /// Builds a tiny long-mode world by hand (page tables, GDT, TSS) and a CPL3 program that
    /// writes the exit-storm port, then powers off with status 7.
    fn tiny_guest(ram: &GuestRam) -> BootEntry {
        let w64 = |addr: u64, vals: &[u64]| {
            let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            ram.write(addr, &b).unwrap();
        };
        w64(0x1000, &[0x2000 | 0x7]); // PML4 -> PDPT
        w64(0x2000, &[0x3000 | 0x7]); // PDPT -> PD
        w64(0x3000, &[0x87, 0x20_0000 | 0x87]); // 2 MiB pages, user
        let tss = 0x5000u64;
        let tss_desc_lo =
            TSS_LIMIT as u64 | (tss & 0xff_ffff) << 16 | 0x89 << 40 | (tss >> 24 & 0xff) << 56;
        w64(
            0x4000,
            &[
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0,
                0x00cf_f300_0000_ffff,
                0x00af_fb00_0000_ffff,
                tss_desc_lo,
                tss >> 32,
            ],
        );
        // The I/O permission bitmap: PVM ignores IOPL, but its instruction emulator lets CPL3
        // port I/O through when the TSS bitmap allows the port (all zeros: every port).
        ram.write(tss + 102, &104u16.to_le_bytes()).unwrap();
        ram.write(tss + 104 + 8192, &[0xff]).unwrap();
        let code: [u8; 20] = [
            0x66, 0xba, 0xd0, 0x0a, // mov dx, 0x0ad0
            0xb8, 0x34, 0x12, 0x00, 0x00, // mov eax, 0x1234
            0xef, // out dx, eax
            0x66, 0xba, 0xc8, 0x0a, // mov dx, 0x0ac8
            0xb0, 0x07, // mov al, 7
            0xee, // out dx, al
            0xeb, 0xfe, // jmp $
            0x90,
        ];
        ram.write(0x10000, &code).unwrap();
        // A second program: store to 0x30_0000 and 0x30_5008, then power off.
        let store: [u8; 29] = [
            0xb8, 0x78, 0x56, 0x34, 0x12, // mov eax, 0x12345678
            0xa3, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // movabs [0x300000], eax
            0xa3, 0x08, 0x50, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // movabs [0x305008], eax
            0x66, 0xba, 0xc8, 0x0a, // mov dx, 0x0ac8
            0xee, // out dx, al
            0xeb, // jmp $ (second byte below)
        ];
        ram.write(0x10100, &store).unwrap();
        ram.write(0x10100 + 29, &[0xfe]).unwrap();
        BootEntry::Direct {
            user_entry: 0x10000,
            pml4: 0x1000,
            gdt_base: 0x4000,
            gdt_limit: 8 * 8 - 1,
            tss_base: tss,
            tss_limit: TSS_LIMIT,
            start_info: 0,
        }
    }

    #[test]
    fn direct_cpl3_entry_runs_port_io_and_powers_off() {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let entry = tiny_guest(&ram);
        let mut vm = Vm::new(ram).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure_boot(&entry, 1).unwrap();
        vm.ready().unwrap();
        let pv = Arc::new(Mutex::new(PvDevice::new(1, PvState::default())));
        let storm = Arc::new(Mutex::new(Counter(0)));
        let mut bus = IoBus::default();
        bus.insert(PV_BASE, PV_LEN, pv).unwrap();
        bus.insert(0x0ad0, 1, storm.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = vcpu.start(Arc::new(bus), tx, false).unwrap();
        let ev = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("guest must power off");
        assert_eq!(ev.reason, VcpuExitReason::PowerOff(7));
        assert_eq!(
            storm.lock().unwrap().0,
            0x1234,
            "the CPL3 out delivered its value"
        );
        // The finished vCPU still answers: its state is readable and it stops cleanly.
        let st = handle.save().unwrap();
        assert_eq!(st.sregs.cs.dpl, 3);
        assert_eq!(st.regs.rip, 0x10000 + 17, "RIP after the completed OUT");
        handle.stop();
    }

    #[test]
    fn a_throttled_vcpu_sleeps_its_share_runs_the_rest_and_is_released() {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let mut entry = tiny_guest(&ram);
        // A CPL3 loop without exits: inc qword [0x300000]; jmp back.
        let spin: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0xeb, 0xf6];
        ram.write(0x10200, &spin).unwrap();
        if let BootEntry::Direct { user_entry, .. } = &mut entry {
            *user_entry = 0x10200;
        }
        let mut vm = Vm::new(ram.clone()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure_boot(&entry, 1).unwrap();
        vm.ready().unwrap();
        let bus = Arc::new(IoBus::default());
        let (tx, _rx) = mpsc::channel();
        let handle = vcpu.start(bus.clone(), tx, false).unwrap();
        let all = std::slice::from_ref(&handle);
        let count = || {
            let mut b = [0u8; 8];
            ram.read(0x30_0000, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        let slept = || bus.throttled_us.load(std::sync::atomic::Ordering::Relaxed);
        let kicks = || {
            bus.exits
                .get()
                .into_iter()
                .find(|(k, _)| *k == ExitKind::Kick)
                .map_or(0, |(_, n)| n)
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(slept(), 0, "no throttle, no sleep");
        assert_eq!(throttle_sleep(50), Duration::from_millis(10));
        assert_eq!(throttle_sleep(90), Duration::from_millis(90));
        assert_eq!(
            throttle_sleep(100),
            Duration::from_millis(990),
            "capped at 99 %"
        );
        for (percent, cycles) in [(50, 15), (90, 5)] {
            VcpuHandle::throttle_all(all, percent).unwrap();
            let (c0, s0, k0) = (count(), slept(), kicks());
            let cycle = THROTTLE_RUN + throttle_sleep(percent);
            std::thread::sleep(cycle * cycles);
            // Mechanisms, not speed: the timer kicked it out of KVM_RUN, it slept whole
            // sleeps, and the guest still made progress between them.
            let (k, s) = (kicks() - k0, slept() - s0);
            assert!(k >= 2, "{percent}%: {k} kicks");
            assert!(
                s >= throttle_sleep(percent).as_micros() as u64,
                "{percent}%: slept {s} us"
            );
            assert!(count() > c0, "{percent}%: the guest ran between the sleeps");
        }
        // A throttled vCPU pauses and resumes as usual.
        VcpuHandle::pause_all(all).unwrap();
        let c = count();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(count(), c, "paused");
        VcpuHandle::resume_all(all).unwrap();
        // Lifted: no more sleeps (one already begun may finish).
        VcpuHandle::throttle_all(all, 0).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let s = slept();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(slept(), s, "lifted");
        assert!(count() > c, "runs on");
        handle.stop();
    }

    #[test]
    fn batched_msr_probe_finds_what_one_by_one_reads_find() {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let vm = Vm::new(ram).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let one_by_one: Vec<u32> = vm
            .listed_msrs()
            .iter()
            .copied()
            .filter(|&index| {
                let mut one = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .unwrap();
                matches!(vcpu.fd.get_msrs(&mut one), Ok(1))
            })
            .collect();
        assert!(!one_by_one.is_empty());
        assert_eq!(vcpu.readable_msrs(vm.listed_msrs()), one_by_one);
        assert_eq!(
            *vm.host_msrs(),
            one_by_one,
            "the VM's first vCPU probed them"
        );
        assert_eq!(**vcpu.msr_list(), one_by_one);
        // Unreadable ones anywhere (first, between, last) are each skipped once.
        let bogus = 0x4b56_4eff;
        let mut mixed = vec![bogus];
        for m in &one_by_one {
            mixed.extend([*m, bogus]);
        }
        assert_eq!(vcpu.readable_msrs(&mixed), one_by_one);
        assert!(vcpu.readable_msrs(&[]).is_empty());
    }

    #[test]
    fn dirty_log_merges_guest_and_vmm_writes() {
        dirty_log_merges(DirtyLogMode::Bitmap);
    }

    #[test]
    fn dirty_ring_merges_guest_and_vmm_writes() {
        if !crate::vm::ring_offered() {
            // Not offered here: asking for it must fail clearly, not fall back.
            let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
            let e = Vm::new_with(ram, DirtyLogMode::Ring).err().unwrap();
            assert!(e.to_string().contains("offers no dirty ring"), "{e}");
            return;
        }
        dirty_log_merges(DirtyLogMode::Ring);
    }

    /// A guest that writes a word in each of `pages` pages from 4 MiB up, then powers off with
    /// status 9 (the page tables map 128 MiB).
    fn page_writer(ram: &GuestRam, pages: u32) -> BootEntry {
        let mut entry = tiny_guest(ram);
        let pd: Vec<u8> = (0..64u64)
            .flat_map(|i| (i << 21 | 0x87).to_le_bytes())
            .collect();
        ram.write(0x3000, &pd).unwrap();
        let mut code = vec![0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9]; // mov edi, 0x400000; mov ecx,
        code.extend(pages.to_le_bytes()); // pages
        code.extend([
            0x89, 0x07, // mov [rdi], eax
            0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
            0xff, 0xc9, // dec ecx
            0x75, 0xf3, // jnz back to the mov
            0x66, 0xba, 0xc8, 0x0a, // mov dx, 0x0ac8
            0xb0, 0x09, // mov al, 9
            0xee, // out dx, al
            0xeb, 0xfe, // jmp $
        ]);
        ram.write(0x10200, &code).unwrap();
        if let BootEntry::Direct { user_entry, .. } = &mut entry {
            *user_entry = 0x10200;
        }
        entry
    }

    #[test]
    fn dirty_ring_full_exits_lose_no_page() {
        if !crate::vm::ring_offered() {
            return; // dirty_ring_merges_guest_and_vmm_writes checks the refusal
        }
        // A ring and a quarter's worth: the vCPU stops at least once with its ring full.
        let pages = crate::dirty_ring::RING_ENTRIES + crate::dirty_ring::RING_ENTRIES / 4;
        let ram = Arc::new(GuestRam::new(128 << 20).unwrap());
        let entry = page_writer(&ram, pages);
        let mut vm = Vm::new_with(ram.clone(), DirtyLogMode::Ring).unwrap();
        assert_eq!(vm.dirty_log_mode(), DirtyLogMode::Ring);
        vm.set_dirty_logging(true).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure_boot(&entry, 1).unwrap();
        let pv = Arc::new(Mutex::new(PvDevice::new(1, PvState::default())));
        let mut bus = IoBus::default();
        bus.insert(PV_BASE, PV_LEN, pv).unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = vcpu.start(Arc::new(bus), tx, false).unwrap();
        let ev = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(ev.reason, VcpuExitReason::PowerOff(9));
        handle.stop();
        assert!(
            vm.dirty_ring_full_exits() >= 1,
            "{pages} pages must fill a ring of {}",
            crate::dirty_ring::RING_ENTRIES
        );
        let bits = vm.harvest_dirty().unwrap();
        let dirty = |page: u64| bits[(page / 64) as usize] >> (page % 64) & 1 == 1;
        let first = 0x400;
        let missing = (first..first + u64::from(pages))
            .filter(|&p| !dirty(p))
            .count();
        assert_eq!(missing, 0, "every page written is harvested once");
        assert!(
            !dirty(first + u64::from(pages)),
            "the next page was not written"
        );
        assert!(vm.harvest_dirty().unwrap().iter().all(|w| *w == 0));
    }

    fn dirty_log_merges(mode: DirtyLogMode) {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let mut entry = tiny_guest(&ram);
        if let BootEntry::Direct { user_entry, .. } = &mut entry {
            *user_entry = 0x10100;
        }
        let mut vm = Vm::new_with(ram.clone(), mode).unwrap();
        assert_eq!(vm.dirty_log_mode(), mode);
        assert!(vm.harvest_dirty().is_err(), "harvest needs logging on");
        vm.set_dirty_logging(true).unwrap();
        vm.harvest_dirty().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure_boot(&entry, 1).unwrap();
        let pv = Arc::new(Mutex::new(PvDevice::new(1, PvState::default())));
        let mut bus = IoBus::default();
        bus.insert(PV_BASE, PV_LEN, pv).unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = vcpu.start(Arc::new(bus), tx, false).unwrap();
        let ev = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(ev.reason, VcpuExitReason::PowerOff(0x78));
        handle.stop();
        ram.write(0x3f_f000, &[1]).unwrap(); // the VMM's own write
        let bits = vm.harvest_dirty().unwrap();
        let dirty = |page: u64| bits[(page / 64) as usize] >> (page % 64) & 1 == 1;
        assert!(dirty(0x300) && dirty(0x305), "guest stores must be logged");
        assert!(dirty(0x3ff), "VMM writes must be logged");
        assert!(
            !dirty(0x301) && !dirty(0x200),
            "untouched pages must be clean"
        );
        let again = vm.harvest_dirty().unwrap();
        assert!(again.iter().all(|w| *w == 0), "harvest clears the log");
        let mut v = [0u8; 4];
        ram.read(0x30_5008, &mut v).unwrap();
        assert_eq!(u32::from_le_bytes(v), 0x1234_5678);
    }
}
