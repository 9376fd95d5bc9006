//! A whole VM: memory, KVM VM, devices and vCPU threads, built from a kernel or from a saved
//! state, and the operations the control API exposes on it.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry, EntryPreference};
use crate::cpu::{CpuModel, CpuModelError, CpuSummary, CpuTemplate};
use crate::devices::i8042::{COMMAND_PORT, DATA_PORT, I8042};
use crate::devices::pv::{
    ConsoleLine, GuestCommand, PvDevice, PvState, PORT_CONSOLE_LINE, PV_BASE, PV_LEN,
    PV_SECRET_BASE, PV_SECRET_LEN,
};
use crate::devices::serial::{self, SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN};
use crate::devices::virtio::{
    self, event_loop::EventLoop, BlockConfig, DeviceConfig, DeviceInfo, MmioTransport, NetConfig,
    VirtioDeviceState,
};
use crate::devices::{lock, IoBus};
use crate::lazy::{FirstTouch, LazyLoader, LazyProgress, Paging};
use crate::memory::GuestRam;
use crate::snapshot::{Chain, RestoreBuffers, SnapshotError, SnapshotKey};
use crate::startup;
use crate::state::{DeviceStates, MachineConfig, VmState};
use crate::vcpu::{ParkedThread, VcpuEvent, VcpuHandle, VcpuState};
use crate::vm::Vm;

/// Largest number of vCPUs a VM may have.
pub const MAX_VCPUS: usize = 8;
/// Largest guest RAM, MiB (1 TiB: one memslot, and far beyond these hosts).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// VMM errors: each says what failed, for the CLI and the API to show as they are.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// KVM VM.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// vCPU.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// State file.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The CPU model: unknown template, or this host cannot offer the guest's CPU.
    #[error(transparent)]
    Cpu(#[from] CpuModelError),
    /// Snapshot store.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Host I/O.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The request does not fit the VM's current state.
    #[error("{0}")]
    Conflict(String),
}

/// Checks a guest RAM size given in MiB (`--memory`).
pub fn check_memory_mib(mib: u64) -> Result<(), VmmError> {
    if mib < 16 || !mib.is_multiple_of(2) || mib > MAX_MEMORY_MIB {
        return Err(VmmError::Config(format!(
            "--memory {mib} MiB: use an even number of MiB from 16 to {MAX_MEMORY_MIB} (1 TiB)"
        )));
    }
    Ok(())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |err| VmmError::Io { what, err }
}

/// How to build a fresh VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel: spanguest ELF, any PVH ELF, or a Linux bzImage.
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Initrd (bzImage only).
    pub initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Console: `stdout`, `none` or a file path.
    pub serial: String,
    /// Entry to use when the kernel offers both.
    pub entry: EntryPreference,
    /// Build the vCPUs paused: the guest runs at the first resume (services attached first).
    pub start_paused: bool,
    /// The CPU the guest is given: everything the host offers, or a portable baseline.
    pub cpu_template: CpuTemplate,
    /// virtio-blk disks, in slot order from [`virtio::MMIO_BASE`] up; each is announced on
    /// the command line (`virtio_mmio.device=`).
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces on taps, in the slots after the disks.
    pub nets: Vec<NetConfig>,
}

/// Run state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// Running or paused.
    pub state: RunState,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Guest TSC frequency, kHz.
    pub tsc_khz: u32,
    /// Whether the guest registered its mailbox (spanguest).
    pub guest_mailbox: bool,
    /// Milliseconds since this process started the VM.
    pub uptime_ms: u64,
    /// The VM came from a saved state.
    pub restored: bool,
    /// The host's KVM is PVM.
    pub pvm: bool,
    /// The VMM process serving this VM (it changes with a live update).
    pub pid: u32,
    /// Times this process paused the guest.
    pub pauses: u64,
    /// Progress of a lazy restore, when the VM came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_restore: Option<LazyProgress>,
    /// The operator paused the VM: only the operator's resume runs it again.
    pub operator_paused: bool,
    /// Why the VM must not run here: it may run in another process (see `resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<String>,
    /// Share of the time the vCPUs sleep now (an outgoing migration's throttle), percent.
    pub throttle_percent: u8,
    /// Milliseconds the vCPUs slept for throttles (all vCPUs together).
    pub throttled_ms: u64,
    /// The CPU the guest was given: template, vendor, family/model, feature bits.
    pub cpu: CpuSummary,
    /// How the guest's writes are logged for dirty-page harvests.
    pub dirty_log: DirtyLogStatus,
    /// Virtio devices.
    pub devices: Vec<DeviceInfo>,
}

/// How a VM logs its guest's writes (see [`crate::dirty_ring`]).
#[derive(Debug, Clone, Serialize)]
pub struct DirtyLogStatus {
    /// `bitmap` or `ring`.
    pub mode: String,
    /// Times a vCPU stopped because its dirty ring was full (0 with the bitmap).
    pub ring_full_exits: u64,
}

/// Whether the vCPUs run, and who may run them again.
///
/// Pauses come from the operator (the API) and from engines and services (a save, a
/// snapshot's final round, a migration's stop-and-copy, a live update). An engine's `resume`
/// undoes only its own pause: a VM the operator paused stays paused until the operator
/// resumes it. A VM whose ownership is in doubt (handed to another process that did not
/// confirm) runs for nobody until the operator resolves it.
#[derive(Debug)]
struct RunCtl {
    run: RunState,
    /// The operator paused the VM (API `pause`), and has not resumed it.
    operator_hold: bool,
    /// Why the VM must not run here (it may run elsewhere on the same memory).
    in_doubt: Option<String>,
}

/// The parts of a running VM that several threads drive: the main loop (API), and services
/// (pause, registers, dirty log) from whatever thread calls them. Lock order: state, vcpus, vm.
pub struct VmControl {
    ram: Arc<GuestRam>,
    vm: Mutex<Vm>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    state: Mutex<RunCtl>,
    machine: MachineConfig,
    /// The CPU the guest was given (recorded in every state captured).
    cpu: CpuModel,
    serial: Arc<Mutex<SerialDevice>>,
    pv: Arc<Mutex<PvDevice>>,
    /// Virtio devices: paused with the vCPUs, saved with them.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// Secret regions registered through the API, `(gpa, len)`.
    secrets: Mutex<Vec<(u64, u64)>>,
    /// How many times the guest was paused (by the API, a save, a live update, a service).
    pauses: std::sync::atomic::AtomicU64,
    /// Dirty pages harvested so far (for metrics: their rate is the guest's dirty rate while
    /// a service tracks it).
    dirty_harvested: std::sync::atomic::AtomicU64,
    /// The port bus (its counters: exits, throttled time).
    bus: Arc<IoBus>,
    /// The vCPUs' throttle now, percent.
    throttle: std::sync::atomic::AtomicU8,
}

impl VmControl {
    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Running or paused.
    pub fn run_state(&self) -> RunState {
        lock(&self.state).run
    }

    fn refuse_on_vcpu_thread(what: &str) -> Result<(), VmmError> {
        if crate::vcpu::on_vcpu_thread() {
            return Err(VmmError::Conflict(format!(
                "{what} is not possible while a vCPU handles an exit (it would wait for itself)"
            )));
        }
        Ok(())
    }

    /// Pauses every vCPU; returns false when it was already paused.
    pub fn pause(&self) -> Result<bool, VmmError> {
        Self::refuse_on_vcpu_thread("pausing the VM")?;
        let mut state = lock(&self.state);
        self.pause_locked(&mut state)
    }

    fn pause_locked(&self, state: &mut RunCtl) -> Result<bool, VmmError> {
        if state.run == RunState::Paused {
            return Ok(false);
        }
        VcpuHandle::pause_all(&lock(&self.vcpus))?;
        // After the vCPUs: no new notification comes in; a request being served completes.
        for d in &self.virtio {
            lock(d).set_paused(true);
        }
        state.run = RunState::Paused;
        self.pauses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Resumes every vCPU after an engine's or a service's own pause; returns false when the
    /// VM was already running or stays paused because the operator paused it. Refused while
    /// the VM is in doubt.
    pub fn resume(&self) -> Result<bool, VmmError> {
        Self::refuse_on_vcpu_thread("resuming the VM")?;
        let mut state = lock(&self.state);
        if let Some(why) = &state.in_doubt {
            return Err(VmmError::Conflict(why.clone()));
        }
        if state.operator_hold {
            return Ok(false);
        }
        self.resume_locked(&mut state)
    }

    fn resume_locked(&self, state: &mut RunCtl) -> Result<bool, VmmError> {
        if state.run == RunState::Running {
            return Ok(false);
        }
        for d in &self.virtio {
            lock(d).set_paused(false);
        }
        VcpuHandle::resume_all(&lock(&self.vcpus))?;
        state.run = RunState::Running;
        Ok(true)
    }

    /// The operator's pause (API): the VM stays paused until [`Self::operator_resume`],
    /// whatever engines and services resume meanwhile. Returns false when already paused.
    pub fn operator_pause(&self) -> Result<bool, VmmError> {
        Self::refuse_on_vcpu_thread("pausing the VM")?;
        let mut state = lock(&self.state);
        state.operator_hold = true;
        self.pause_locked(&mut state)
    }

    /// The operator's resume (API): lifts every pause. Refused while the VM is in doubt.
    /// Returns false when it was already running.
    pub fn operator_resume(&self) -> Result<bool, VmmError> {
        Self::refuse_on_vcpu_thread("resuming the VM")?;
        let mut state = lock(&self.state);
        if let Some(why) = &state.in_doubt {
            return Err(VmmError::Conflict(why.clone()));
        }
        state.operator_hold = false;
        self.resume_locked(&mut state)
    }

    /// The operator paused the VM and has not resumed it.
    pub fn operator_paused(&self) -> bool {
        lock(&self.state).operator_hold
    }

    /// Marks the (paused) VM as possibly running elsewhere: nothing resumes it here until
    /// [`Self::resolve_doubt`]. `why` is the answer every resume gets, saying how to resolve.
    pub fn set_in_doubt(&self, why: String) {
        lock(&self.state).in_doubt = Some(why);
    }

    /// Why the VM is in doubt, if it is.
    pub fn in_doubt(&self) -> Option<String> {
        lock(&self.state).in_doubt.clone()
    }

    /// The operator established that the VM runs nowhere else: it may run here again.
    pub fn resolve_doubt(&self) {
        lock(&self.state).in_doubt = None;
    }

    /// Registers of vCPU `index`; the VM must be paused.
    pub fn vcpu_state(&self, index: usize) -> Result<VcpuState, VmmError> {
        Self::refuse_on_vcpu_thread("reading vCPU registers")?;
        let state = lock(&self.state);
        if state.run != RunState::Paused {
            return Err(VmmError::Conflict(
                "pause the VM before reading vCPU registers".into(),
            ));
        }
        let vcpus = lock(&self.vcpus);
        let v = vcpus.get(index).ok_or_else(|| {
            VmmError::Config(format!("no vCPU {index}: the VM has {}", vcpus.len()))
        })?;
        Ok(v.save()?)
    }

    /// Turns KVM dirty logging on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmmError> {
        Ok(lock(&self.vm).set_dirty_logging(on)?)
    }

    /// Pages dirtied (by the guest or the VMM) since the last harvest.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, VmmError> {
        let bits = lock(&self.vm).harvest_dirty()?;
        let pages: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        self.dirty_harvested
            .fetch_add(pages, std::sync::atomic::Ordering::Relaxed);
        Ok(bits)
    }

    /// Slows the running guest: every vCPU sleeps `percent` of the time, in sleeps of
    /// [`crate::vcpu::throttle_sleep`] between runs of [`crate::vcpu::THROTTLE_RUN`] (at most
    /// [`crate::vcpu::MAX_THROTTLE`] %); 0 lifts it. A migration's lever when the guest
    /// dirties memory faster than the link carries it.
    pub fn set_throttle(&self, percent: u8) -> Result<(), VmmError> {
        Self::refuse_on_vcpu_thread("throttling the VM")?;
        let percent = percent.min(crate::vcpu::MAX_THROTTLE);
        VcpuHandle::throttle_all(&lock(&self.vcpus), percent)?;
        self.throttle
            .store(percent, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Microseconds the vCPUs slept for a throttle so far (all vCPUs together).
    pub fn throttled_us(&self) -> u64 {
        self.bus
            .throttled_us
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Times the guest was paused.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Dirty pages harvested so far.
    pub fn dirty_harvested(&self) -> u64 {
        self.dirty_harvested
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The machine's shape.
    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// Captures the whole VM state except memory (vCPUs must be paused).
    pub fn capture_state(&self) -> Result<VmState, VmmError> {
        Self::refuse_on_vcpu_thread("capturing the VM state")?;
        let state = lock(&self.state);
        if state.run != RunState::Paused {
            return Err(VmmError::Conflict("pause the VM before saving it".into()));
        }
        let vcpus = VcpuHandle::save_all(&lock(&self.vcpus))?;
        self.state_with(vcpus)
    }

    /// [`Self::pause`] then [`Self::capture_state`], with one round trip to the vCPU threads
    /// instead of two (each saves its registers as soon as it stopped): a live update's pause
    /// is a few such round trips. Returns whether the VM was running, and its state.
    pub fn pause_and_capture(&self) -> Result<(bool, VmState), VmmError> {
        Self::refuse_on_vcpu_thread("pausing the VM")?;
        let mut state = lock(&self.state);
        if state.run == RunState::Paused {
            drop(state);
            return Ok((false, self.capture_state()?));
        }
        let vcpus = VcpuHandle::pause_save_all(&lock(&self.vcpus))?;
        // As in pause_locked: after the vCPUs, so that no new notification comes in.
        for d in &self.virtio {
            lock(d).set_paused(true);
        }
        state.run = RunState::Paused;
        self.pauses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((true, self.state_with(vcpus)?))
    }

    /// The VM state around the vCPUs' saved registers (the VM paused).
    fn state_with(&self, vcpus: Vec<VcpuState>) -> Result<VmState, VmmError> {
        Ok(VmState {
            machine: self.machine.clone(),
            vcpus,
            vm: lock(&self.vm).save_state()?,
            devices: DeviceStates {
                serial: lock(&self.serial).state(),
                pv: lock(&self.pv).state.clone(),
                virtio: self.virtio.iter().map(|d| lock(d).state()).collect(),
            },
            api_secrets: lock(&self.secrets).clone(),
            cpu: self.cpu.clone(),
            services: Vec::new(),
        })
    }

    /// Registers a guest region as secret: snapshots leave it out, restores zero it.
    pub fn add_secret(&self, gpa: u64, len: u64) -> Result<(), VmmError> {
        match gpa.checked_add(len) {
            Some(end) if len > 0 && end <= self.ram.size() => {
                lock(&self.secrets).push((gpa, len));
                Ok(())
            }
            _ => Err(VmmError::Config(format!(
                "secret region {gpa:#x}+{len:#x} is empty or outside the {:#x}-byte guest memory",
                self.ram.size()
            ))),
        }
    }

    /// The backend fds a live update hands to the new process (taps), with their names.
    pub fn handover_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        self.virtio
            .iter()
            .filter_map(|d| lock(d).handover_fd())
            .collect()
    }

    /// The disks' write tracking (a migration moving the disks drives it).
    pub fn disk_tracks(&self) -> Vec<Arc<virtio::disk_track::DiskTrack>> {
        self.virtio
            .iter()
            .filter_map(|d| lock(d).disk_track())
            .collect()
    }

    /// The virtio devices as `GET /vm` shows them.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.virtio.iter().map(|d| lock(d).info()).collect()
    }

    /// Secret regions, `(gpa, len)`: registered through the API and by the guest.
    pub fn secrets(&self) -> Vec<(u64, u64)> {
        let mut v = lock(&self.secrets).clone();
        v.extend(lock(&self.pv).state.secrets.iter().copied());
        v
    }
}

/// Microseconds on the host's monotonic clock (`CLOCK_MONOTONIC`, which every process on the
/// host reads alike): the two processes of a live update stamp their steps on one timeline.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Named steps of a restore and when each ended ([`monotonic_us`]): cheap enough to keep on
/// every live update, whose report shows where its pause goes.
pub type StepMarks = Vec<(&'static str, u64)>;

/// A VM whose KVM objects exist but whose registers are not restored yet (see
/// [`Vmm::prepare`]).
pub struct PreparedVm {
    vm: Vm,
    vcpus: Vec<crate::vcpu::Vcpu>,
    /// Their threads, started and filtered ahead (one per vCPU).
    threads: Vec<ParkedThread>,
    machine: MachineConfig,
}

impl PreparedVm {
    /// Checks that this host offers every CPU feature and MSR the guest of `state` was given
    /// (see [`crate::cpu`]).
    pub fn check_cpu(&self, state: &VmState) -> Result<(), VmmError> {
        let host = crate::cpu::host_as_compared(crate::cpu::entries_of(self.vm.host_cpuid()));
        state.cpu.check_against(&host, &self.vm.host_msrs())?;
        Ok(())
    }

    /// Gives the vCPUs the CPU model of `state` (checked against this host first); returns
    /// the model the VM now has.
    fn adopt_cpu(&mut self, state: &VmState) -> Result<CpuModel, VmmError> {
        self.check_cpu(state)?;
        let m = &state.cpu;
        let cpuid = m.kvm_cpuid()?;
        let msrs = Arc::new(m.msrs.clone());
        for v in &mut self.vcpus {
            v.set_cpuid(&cpuid)?;
            v.set_msr_list(msrs.clone());
        }
        Ok(m.clone())
    }

    /// Second half of a restore: the recorded CPU model (refused when this host cannot offer
    /// it), registers, irqchip, clock and devices from `state`, then the vCPU threads
    /// (running, or paused until resumed).
    pub fn finish(
        self,
        state: &VmState,
        serial_spec: &str,
        events: Sender<VcpuEvent>,
        start_paused: bool,
    ) -> Result<Vmm, VmmError> {
        self.finish_marked(state, serial_spec, events, start_paused, &mut Vec::new())
    }

    /// [`Self::finish`], stamping the end of each step in `marks`.
    pub fn finish_marked(
        mut self,
        state: &VmState,
        serial_spec: &str,
        events: Sender<VcpuEvent>,
        start_paused: bool,
        marks: &mut StepMarks,
    ) -> Result<Vmm, VmmError> {
        if state.machine != self.machine {
            return Err(VmmError::Config(
                "the state describes another machine than the one prepared".into(),
            ));
        }
        // The PIT (made meanwhile, see Vm::new) before the VM's state is restored.
        self.vm.ready()?;
        marks.push(("PIT ready", monotonic_us()));
        let cpu = self.adopt_cpu(state)?;
        marks.push(("cpu model set", monotonic_us()));
        // The first vCPU's registers here, the others' on threads of their own: a dozen
        // ioctls each, side by side.
        let mut pairs = self.vcpus.iter().zip(&state.vcpus);
        std::thread::scope(|scope| {
            let first = pairs.next();
            let others: Vec<_> = pairs
                .map(|(v, s)| scope.spawn(move || v.restore(s)))
                .collect();
            first.map_or(Ok(()), |(v, s)| v.restore(s))?;
            others
                .into_iter()
                .try_for_each(|t| t.join().expect("restoring a vCPU panicked"))
        })?;
        marks.push(("registers restored", monotonic_us()));
        self.vm.restore_state(&state.vm)?;
        marks.push(("irqchip and clock restored", monotonic_us()));
        let dev = build_devices(
            &self.vm,
            serial_spec,
            Some(&state.devices.serial),
            self.machine.tsc_khz,
            state.devices.pv.clone(),
            Virtio::Restore(&state.devices.virtio),
            start_paused,
        )?;
        marks.push(("devices built", monotonic_us()));
        let handles = self
            .vcpus
            .into_iter()
            .zip(self.threads)
            .map(|(v, t)| v.start_on(t, dev.bus.clone(), events.clone(), start_paused))
            .collect::<Result<Vec<_>, _>>()?;
        marks.push(("vcpus given to their threads", monotonic_us()));
        let run = if start_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        let vmm = Vmm::assemble(self.vm, handles, dev, self.machine, cpu, run, true);
        *lock(&vmm.ctl.secrets) = state.api_secrets.clone();
        *lock(&vmm.service_sections) = state.services.clone();
        Ok(vmm)
    }
}

/// How to restore a snapshot ([`Vmm::restore`], [`StandbyVm::adopt`]).
pub struct RestoreHow<'a> {
    /// Console: `stdout`, `none` or a file.
    pub serial_spec: &'a str,
    /// Where vCPU threads report.
    pub events: Sender<VcpuEvent>,
    /// Leave the VM paused.
    pub start_paused: bool,
    /// Run at once; memory on first touch and in the background.
    pub lazy: bool,
    /// Key of an encrypted snapshot.
    pub key: Option<&'a SnapshotKey>,
}

/// Opens and checks the snapshot chain ending in `dir`; returns it with its VM state.
fn open_snapshot(
    dir: &Path,
    key: Option<&SnapshotKey>,
    bufs: Option<RestoreBuffers>,
) -> Result<(Chain, VmState), VmmError> {
    let chain = Chain::open_with(dir, key, bufs)?;
    // A copy, so that the chain can move on to the loader.
    let state = chain.vm_state().clone();
    Ok((chain, state))
}

/// Fills fresh guest RAM from `chain`: all of it now (checked page by page), or, with `lazy`,
/// on first touch and in the background.
fn load_memory(
    ram: &Arc<GuestRam>,
    chain: Chain,
    lazy: bool,
    state: &VmState,
) -> Result<Option<LazyLoader>, VmmError> {
    if lazy {
        return LazyLoader::start(ram, chain, first_touches(state))
            .map(Some)
            .map_err(|e| VmmError::Conflict(format!("lazy restore: {e}")));
    }
    chain.load_into(ram).map_err(VmmError::Snapshot)?;
    Ok(None)
}

/// Where each vCPU will touch memory first after a restore: its instruction and stack, its
/// descriptor tables, through its page tables (a lazy restore brings these in before the
/// guest asks; a post-copy migration sends them first).
pub fn first_touches(state: &VmState) -> Vec<FirstTouch> {
    const CR0_PG: u64 = 1 << 31;
    const EFER_LMA: u64 = 1 << 10;
    const CR4_LA57: u64 = 1 << 12;
    state
        .vcpus
        .iter()
        .filter_map(|v| {
            let (r, s) = (&v.regs, &v.sregs);
            let paging = if s.cr0 & CR0_PG == 0 {
                Paging::Off
            } else if s.efer & EFER_LMA != 0 && s.cr4 & CR4_LA57 == 0 {
                Paging::Long4
            } else {
                return None; // 32-bit or 5-level paging: left to the faults
            };
            let (ip, sp) = match paging {
                // Segment bases count outside long mode.
                Paging::Off => (s.cs.base + r.rip, s.ss.base + r.rsp),
                Paging::Long4 => (r.rip, r.rsp),
            };
            let mut addrs = vec![ip, sp, s.gdt.base, s.idt.base, s.tr.base];
            if paging == Paging::Long4 {
                // Then whatever the general registers hold that is mapped: pointers in
                // registers are likely dereferenced next (the rest fails the walk at once).
                addrs.extend([
                    r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11,
                    r.r12, r.r13, r.r14, r.r15,
                ]);
            }
            Some(FirstTouch {
                paging,
                cr3: s.cr3,
                addrs,
            })
        })
        .collect()
}

/// A VM prepared ahead of a restore (Firecracker's "load snapshot" into a started process):
/// see [`Vmm::standby`].
pub struct StandbyVm {
    prepared: PreparedVm,
    ram: Arc<GuestRam>,
    /// Memory the restore needs, faulted in ahead (gone after a refused snapshot used it:
    /// the next restore allocates its own).
    buffers: Option<RestoreBuffers>,
}

/// Why [`StandbyVm::adopt`] failed, and whether the standby VM is still usable.
pub struct AdoptError {
    /// The cause.
    pub error: VmmError,
    /// The standby VM, untouched, when the snapshot was refused before anything was loaded;
    /// `None` when loading had begun (the caller prepares a fresh one).
    pub standby: Option<Box<StandbyVm>>,
}

impl StandbyVm {
    /// Guest memory in bytes and vCPU count this VM was prepared with.
    pub fn shape(&self) -> (u64, usize) {
        (self.prepared.machine.mem_bytes, self.prepared.machine.vcpus)
    }

    /// Restores the snapshot in `dir` into this VM and runs it (or leaves it paused), as
    /// [`Vmm::restore`] does in a new process. A snapshot of another shape, or one that fails
    /// the chain's checks, is refused before guest memory is touched.
    pub fn adopt(mut self, dir: &Path, how: RestoreHow) -> Result<Vmm, AdoptError> {
        let started = std::time::Instant::now();
        let (chain, state) = match open_snapshot(dir, how.key, self.buffers.take()) {
            Ok(cs) => cs,
            Err(error) => {
                return Err(AdoptError {
                    error,
                    standby: Some(Box::new(self)),
                })
            }
        };
        let (mem, vcpus) = self.shape();
        if state.machine.mem_bytes != mem || state.machine.vcpus != vcpus {
            return Err(AdoptError {
                error: VmmError::Config(format!(
                    "the snapshot's VM has {} MiB and {} vCPUs; this standby VMM was prepared for {} MiB and {vcpus}",
                    state.machine.mem_bytes >> 20,
                    state.machine.vcpus,
                    mem >> 20
                )),
                standby: Some(Box::new(self)),
            });
        }
        // Before anything is loaded, so that a refused snapshot leaves the standby VM ready.
        if let Err(error) = self.prepared.check_cpu(&state) {
            return Err(AdoptError {
                error,
                standby: Some(Box::new(self)),
            });
        }
        let lost = |error| AdoptError {
            error,
            standby: None,
        };
        let opened = started.elapsed();
        let loader = load_memory(&self.ram, chain, how.lazy, &state).map_err(lost)?;
        let registered = started.elapsed();
        let mut prepared = self.prepared;
        prepared.machine = state.machine.clone();
        let mut vmm = prepared
            .finish(&state, how.serial_spec, how.events, how.start_paused)
            .map_err(lost)?;
        crate::lazy::trace(format_args!(
            "adopt: chain open at {} µs, memory registered at {}, vCPUs running at {}",
            opened.as_micros(),
            registered.as_micros(),
            started.elapsed().as_micros()
        ));
        vmm.feed_from(loader);
        Ok(vmm)
    }
}

/// A running VM.
pub struct Vmm {
    ctl: Arc<VmControl>,
    /// Serves the virtio devices' notifications (stopped when the VM is dropped).
    _virtio_loop: Option<EventLoop>,
    bus: Arc<IoBus>,
    pv: Arc<Mutex<PvDevice>>,
    machine: MachineConfig,
    started: Instant,
    restored: bool,
    /// The lazy restore feeding guest memory, if any.
    lazy: Option<LazyLoader>,
    /// The `service/<name>` sections of the state this VM was built from, until the service
    /// layer takes them to attach the services again (opaque here).
    service_sections: Mutex<Vec<crate::state::Section>>,
}

/// Devices of a VM, before the bus is sealed.
struct Devices {
    serial: Arc<Mutex<SerialDevice>>,
    pv: Arc<Mutex<PvDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    virtio_loop: Option<EventLoop>,
    bus: Arc<IoBus>,
}

/// The virtio devices to build: fresh ones (disks, then nets), or the devices of a saved VM.
enum Virtio<'a> {
    Fresh(&'a [DeviceConfig]),
    Restore(&'a [VirtioDeviceState]),
}

fn kvm_io(what: String) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Io {
        what,
        err: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The virtio devices of a VM and the loop serving them.
type VirtioSet = (Vec<Arc<Mutex<MmioTransport>>>, Option<EventLoop>);

/// Builds the virtio devices, puts them on the bus and gives each its irqfd (when the VM has
/// an irqchip) and its QueueNotify ioeventfd; returns them with the event loop serving them.
fn build_virtio(
    vm: &Vm,
    bus: &mut IoBus,
    which: Virtio,
    start_paused: bool,
) -> Result<VirtioSet, VmmError> {
    let ram = vm.ram().clone();
    let mut transports = Vec::new();
    match which {
        Virtio::Fresh(devices) => {
            if devices.len() > virtio::MAX_DEVICES {
                return Err(VmmError::Config(format!(
                    "{} disks and nets: at most {} virtio devices",
                    devices.len(),
                    virtio::MAX_DEVICES
                )));
            }
            // One memslot from 0: RAM reaching the windows would hide them from the guest.
            if !devices.is_empty() && ram.size() > virtio::MMIO_BASE {
                return Err(VmmError::Config(format!(
                    "--disk needs --memory below {} MiB (so does --net): the virtio windows sit \
                     at {:#x}, inside the guest's RAM otherwise",
                    virtio::MMIO_BASE >> 20,
                    virtio::MMIO_BASE
                )));
            }
            for (i, d) in devices.iter().enumerate() {
                let dev = d.open(false).map_err(VmmError::Config)?;
                transports.push(MmioTransport::new(
                    dev,
                    ram.clone(),
                    virtio::slot_addr(i),
                    virtio::slot_gsi(i),
                ));
            }
        }
        Virtio::Restore(saved) => {
            let (mut nets, mut disks) = (0, 0);
            for s in saved {
                // A disk is the user's file: on storage both hosts share, opened by path, or
                // this host's copy an incoming migration filled. A tap is opened by name: the
                // one this host was told to use, or the same.
                let config = match &s.config {
                    DeviceConfig::Block(b) => {
                        disks += 1;
                        DeviceConfig::Block(virtio::block::local_disk(disks - 1, b))
                    }
                    DeviceConfig::Net(n) => {
                        nets += 1;
                        DeviceConfig::Net(NetConfig {
                            tap: virtio::net::local_tap(nets - 1, &n.tap),
                            mac: n.mac.clone(),
                        })
                    }
                };
                let dev = config.open(true).map_err(VmmError::Config)?;
                let mut t = MmioTransport::restore(dev, ram.clone(), s)
                    .map_err(|e| VmmError::Config(e.to_string()))?;
                // The process that saved it may have taken a notification it did not serve.
                t.mark_pending();
                transports.push(t);
            }
        }
    }
    let mut served = Vec::new();
    let mut shared = Vec::new();
    for mut t in transports {
        let (base, gsi) = (t.base(), t.gsi());
        if vm.has_irqchip() {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("virtio irqfd"))?;
            vm.fd().register_irqfd(&irq, gsi).map_err(kvm_io(format!(
                "KVM_IRQFD for the virtio device at {base:#x}"
            )))?;
            t.set_irq(irq);
        }
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("virtio ioeventfd"))?;
        let at = kvm_ioctls::IoEventAddress::Mmio(
            base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
        );
        vm.fd()
            .register_ioevent(&notify, &at, kvm_ioctls::NoDatamatch)
            .map_err(kvm_io(format!(
                "KVM_IOEVENTFD for the virtio device at {base:#x}"
            )))?;
        t.set_notify(notify.try_clone().map_err(io_err("virtio ioeventfd"))?);
        // Paused with the vCPUs; a restored device looks at its queues once running.
        t.set_paused(start_paused);
        let t = Arc::new(Mutex::new(t));
        bus.insert_mmio(base, virtio::MMIO_SIZE, t.clone())
            .map_err(|e| VmmError::Config(e.to_string()))?;
        served.push((t.clone(), notify));
        shared.push(t);
    }
    let event_loop = if served.is_empty() {
        None
    } else {
        Some(EventLoop::start(served).map_err(io_err("virtio event loop"))?)
    };
    Ok((shared, event_loop))
}

fn build_devices(
    vm: &Vm,
    serial_spec: &str,
    serial_state: Option<&serial::SerialDeviceState>,
    tsc_khz: u32,
    pv_state: PvState,
    virtio: Virtio,
    start_paused: bool,
) -> Result<Devices, VmmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial eventfd"))?;
    if vm.has_irqchip() {
        vm.fd()
            .register_irqfd(&irq, COM1_GSI)
            .map_err(|e| VmmError::Io {
                what: "KVM_IRQFD for the serial port".into(),
                err: std::io::Error::from_raw_os_error(e.errno()),
            })?;
    }
    let sink =
        serial::open_sink(serial_spec).map_err(io_err(format!("serial output {serial_spec}")))?;
    let uart = match serial_state {
        Some(s) => SerialDevice::from_state(irq, sink, s).map_err(io_err("serial state"))?,
        None => SerialDevice::new(irq, sink),
    };
    let serial = Arc::new(Mutex::new(uart));
    let pv = Arc::new(Mutex::new(PvDevice::new(tsc_khz, pv_state)));
    let mut bus = IoBus::default();
    let conflict = |e: crate::devices::PortConflict| VmmError::Config(e.to_string());
    bus.insert(COM1_BASE, COM1_LEN, serial.clone())
        .map_err(conflict)?;
    bus.insert(PV_BASE, PV_LEN, pv.clone()).map_err(conflict)?;
    bus.insert(PV_SECRET_BASE, PV_SECRET_LEN, pv.clone())
        .map_err(conflict)?;
    let console = ConsoleLine::new(vm.ram().clone(), serial.clone(), COM1_BASE);
    bus.insert(PORT_CONSOLE_LINE, 4, Arc::new(Mutex::new(console)))
        .map_err(conflict)?;
    let kbd = Arc::new(Mutex::new(I8042));
    bus.insert(DATA_PORT, 1, kbd.clone()).map_err(conflict)?;
    bus.insert(COMMAND_PORT, 1, kbd).map_err(conflict)?;
    let (virtio, virtio_loop) = build_virtio(vm, &mut bus, virtio, start_paused)?;
    Ok(Devices {
        serial,
        pv,
        virtio,
        virtio_loop,
        bus: Arc::new(bus),
    })
}

impl Vmm {
    /// Builds and starts a VM: KVM → memory → kernel → devices → vCPUs.
    pub fn boot(cfg: &VmConfig, events: Sender<VcpuEvent>) -> Result<Self, VmmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "--vcpus {} is out of range 1..={MAX_VCPUS}",
                cfg.vcpus
            )));
        }
        check_memory_mib(cfg.mem_mib)?;
        let ram = Arc::new(GuestRam::new(cfg.mem_mib << 20)?);
        startup::mark("guest RAM");
        let mut vm = Vm::new(ram.clone())?;
        startup::mark("KVM VM created");
        // Devices are announced the way microvm announces them, so that one guest (spanguest
        // or Linux) finds them under both VMMs.
        let devices: Vec<DeviceConfig> = (cfg.disks.iter().cloned().map(DeviceConfig::Block))
            .chain(cfg.nets.iter().cloned().map(DeviceConfig::Net))
            .collect();
        let cmdline = boot::kernel_cmdline(&cfg.cmdline, devices.len());
        let entry = boot::load_kernel(
            &ram,
            &cfg.kernel,
            &cmdline,
            cfg.initrd.as_deref(),
            cfg.entry,
        )?;
        if cfg.vcpus > 1 && !matches!(entry, BootEntry::Direct { .. }) && crate::host_is_pvm() {
            return Err(VmmError::Config(
                "more than one vCPU needs spanguest's direct entry on this host (PVM cannot \
                 deliver the startup IPIs a PVH or Linux guest would send)"
                    .into(),
            ));
        }
        // Loading the kernel is not the guest's doing: start the VMM's dirty log clean.
        ram.take_vmm_dirty();
        startup::mark("kernel loaded");
        let cpuid = cfg
            .cpu_template
            .apply(&crate::cpu::entries_of(vm.host_cpuid()));
        let kvm_cpuid = crate::cpu::to_kvm(&cpuid)?;
        let mut vcpus = (0..cfg.vcpus)
            .map(|i| vm.create_vcpu_with(i, &kvm_cpuid, Arc::new(Vec::new())))
            .collect::<Result<Vec<_>, _>>()?;
        // Saved: the listed MSRs the guest's CPUID lets the VMM read (a feature a template
        // hides can make its MSRs unreadable), asked of vCPU 0 before it ever runs.
        let msrs = Arc::new(vcpus[0].readable_msrs(vm.listed_msrs()));
        for v in &mut vcpus {
            v.set_msr_list(msrs.clone());
        }
        let cpu = CpuModel {
            template: cfg.cpu_template,
            cpuid,
            msrs: vcpus[0].msr_list().to_vec(),
        };
        startup::mark("vCPUs created");
        for v in &vcpus {
            v.configure_boot(&entry, cfg.vcpus)?;
        }
        let tsc_khz = vcpus[0].tsc_khz()?;
        startup::mark("boot registers set");
        let dev = build_devices(
            &vm,
            &cfg.serial,
            None,
            tsc_khz,
            PvState::default(),
            Virtio::Fresh(&devices),
            cfg.start_paused,
        )?;
        startup::mark("devices built");
        let machine = MachineConfig {
            mem_bytes: ram.size(),
            vcpus: cfg.vcpus,
            tsc_khz,
            cmdline,
        };
        // The PIT (made meanwhile, see Vm::new) before the first instruction.
        vm.ready()?;
        startup::mark("PIT ready");
        let handles = vcpus
            .into_iter()
            .map(|v| v.start(dev.bus.clone(), events.clone(), cfg.start_paused))
            .collect::<Result<Vec<_>, _>>()?;
        startup::mark("vCPU threads started");
        let run = if cfg.start_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(Vmm::assemble(vm, handles, dev, machine, cpu, run, false))
    }

    /// Rebuilds a VM from the snapshot layer in `dir` (and its ancestors) and runs it (or
    /// leaves it paused). The whole chain is checked first; eagerly loaded memory is checked
    /// page by page before any vCPU runs. With `lazy`, the guest starts before its memory
    /// is loaded: pages come in (checked) on first touch while a background thread copies the
    /// rest (see [`crate::lazy`]).
    pub fn restore(dir: &Path, how: RestoreHow) -> Result<Self, VmmError> {
        let (chain, state) = open_snapshot(dir, how.key, None)?;
        startup::mark("snapshot opened");
        // An eager restore is refused before guest memory is even allocated and loaded
        // (finish checks again, precisely: against the MSRs this host lets the VMM read, not
        // only those KVM lists). Not a lazy one: asking KVM costs ~0.4 ms on PVM, a tenth of
        // its path to the guest's first instruction, and it loads nothing before finish.
        if !how.lazy {
            let (cpuid, msrs) = crate::vm::host_offer()?;
            state
                .cpu
                .check_against(&crate::cpu::host_as_compared(cpuid), &msrs)?;
        }
        let ram = Arc::new(GuestRam::new(state.machine.mem_bytes)?);
        startup::mark("guest RAM");
        // The KVM VM first: its PIT is made on a thread of its own while the memory
        // loads (or registers for the lazy load).
        let prepared = Vmm::prepare(ram.clone(), &state.machine)?;
        startup::mark("KVM VM and vCPUs prepared");
        let loader = load_memory(&ram, chain, how.lazy, &state)?;
        startup::mark(if how.lazy {
            "memory registered for the lazy load"
        } else {
            "memory loaded"
        });
        // A VM saved with services waits for them (the caller resumes it once they are back).
        let mut marks = StepMarks::new();
        let mut vmm = prepared.finish_marked(
            &state,
            how.serial_spec,
            how.events,
            how.start_paused || !state.services.is_empty(),
            &mut marks,
        )?;
        for (step, at) in marks {
            startup::mark_at(step, at);
        }
        vmm.feed_from(loader);
        Ok(vmm)
    }

    /// A VM made ready for a snapshot not chosen yet: guest RAM, the KVM VM with its memslot
    /// and `vcpus` vCPUs — everything a restore does that does not depend on the snapshot's
    /// contents, so that [`StandbyVm::adopt`] only checks, loads and starts.
    pub fn standby(mem_mib: u64, vcpus: usize) -> Result<StandbyVm, VmmError> {
        check_memory_mib(mem_mib)?;
        let machine = MachineConfig {
            mem_bytes: mem_mib << 20,
            vcpus,
            tsc_khz: 0,
            cmdline: String::new(),
        };
        let ram = Arc::new(GuestRam::new(machine.mem_bytes)?);
        Ok(StandbyVm {
            prepared: Vmm::prepare(ram.clone(), &machine)?,
            ram,
            buffers: Some(RestoreBuffers::new(machine.mem_bytes)),
        })
    }

    /// Progress of a lazy restore, if this VM came from one.
    pub fn lazy_progress(&self) -> Option<LazyProgress> {
        self.lazy.as_ref().map(LazyLoader::progress)
    }

    /// Refuses operations that need all of guest memory in the memfd (a live update: the new
    /// process would see pages not yet loaded as zeros).
    pub fn require_memory_loaded(&self) -> Result<(), VmmError> {
        match &self.lazy {
            Some(l) if !l.done() => Err(VmmError::Conflict(
                "the lazy restore is still loading guest memory; try again when `status` shows it done"
                    .into(),
            )),
            Some(l) => match l.error() {
                Some(e) => Err(VmmError::Conflict(format!("the lazy restore failed: {e}"))),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Refuses operations that need every page of guest memory in the memfd itself (a live
    /// update: the new process's mapping is not watched by the evictor, so an evicted page
    /// would read there as a fresh zero page).
    pub fn require_all_resident(&self) -> Result<(), VmmError> {
        match self.ctl.ram.evicted_pages() {
            0 => Ok(()),
            n => Err(VmmError::Conflict(format!(
                "{n} guest pages are evicted to a store: a new process would see them as zeros; \
                 detach the service that evicted them (it brings them back) first"
            ))),
        }
    }

    /// First half of a restore: a KVM VM and its vCPUs on `ram` (whose contents are the
    /// guest's), with no register state yet. It is the slow half, so a live update does it
    /// before the old VMM pauses the guest.
    pub fn prepare(ram: Arc<GuestRam>, machine: &MachineConfig) -> Result<PreparedVm, VmmError> {
        if machine.vcpus == 0 || machine.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "saved VM has {} vCPUs, 1..={MAX_VCPUS} supported",
                machine.vcpus
            )));
        }
        if ram.size() != machine.mem_bytes {
            return Err(VmmError::Config(format!(
                "guest RAM has {} bytes but the VM had {}",
                ram.size(),
                machine.mem_bytes
            )));
        }
        let vm = Vm::new(ram)?;
        startup::mark("KVM VM created");
        let vcpus = (0..machine.vcpus)
            .map(|i| vm.create_vcpu(i))
            .collect::<Result<Vec<_>, _>>()?;
        startup::mark("vCPUs created");
        let threads = (0..machine.vcpus)
            .map(ParkedThread::spawn)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreparedVm {
            vm,
            vcpus,
            threads,
            machine: machine.clone(),
        })
    }

    /// Keeps the lazy restore feeding guest memory (if any) and starts its background copy:
    /// the vCPUs exist now (started earlier, its copies slowed restoring their registers).
    fn feed_from(&mut self, loader: Option<LazyLoader>) {
        self.lazy = loader.map(|mut l| {
            l.begin_background();
            l
        });
    }

    fn assemble(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        dev: Devices,
        machine: MachineConfig,
        cpu: CpuModel,
        state: RunState,
        restored: bool,
    ) -> Self {
        Vmm {
            ctl: Arc::new(VmControl {
                ram: vm.ram().clone(),
                vm: Mutex::new(vm),
                vcpus: Mutex::new(vcpus),
                state: Mutex::new(RunCtl {
                    run: state,
                    operator_hold: false,
                    in_doubt: None,
                }),
                machine: machine.clone(),
                cpu,
                serial: dev.serial.clone(),
                pv: dev.pv.clone(),
                virtio: dev.virtio,
                secrets: Mutex::new(Vec::new()),
                pauses: Default::default(),
                dirty_harvested: Default::default(),
                bus: dev.bus.clone(),
                throttle: Default::default(),
            }),
            _virtio_loop: dev.virtio_loop,
            bus: dev.bus,
            pv: dev.pv,
            machine,
            started: Instant::now(),
            restored,
            lazy: None,
            service_sections: Mutex::new(Vec::new()),
        }
    }

    /// The thread-safe controls of this VM (for services).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.ctl
    }

    /// The port bus (to install the service hook and learn which ports devices own).
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: self.ctl.run_state(),
            vcpus: self.machine.vcpus,
            memory_mib: self.machine.mem_bytes >> 20,
            tsc_khz: self.machine.tsc_khz,
            guest_mailbox: lock(&self.pv).state.mailbox.is_some(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            restored: self.restored,
            pvm: crate::host_is_pvm(),
            pid: std::process::id(),
            pauses: self.ctl.pauses.load(std::sync::atomic::Ordering::Relaxed),
            lazy_restore: self.lazy_progress(),
            operator_paused: self.ctl.operator_paused(),
            in_doubt: self.ctl.in_doubt(),
            throttle_percent: self.ctl.throttle.load(std::sync::atomic::Ordering::Relaxed),
            throttled_ms: self.ctl.throttled_us() / 1000,
            cpu: self.ctl.cpu.summary(),
            dirty_log: {
                let vm = lock(&self.ctl.vm);
                DirtyLogStatus {
                    mode: vm.dirty_log_mode().to_string(),
                    ring_full_exits: vm.dirty_ring_full_exits(),
                }
            },
            devices: self.ctl.devices(),
        }
    }

    /// Pauses every vCPU (no-op when paused).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.ctl.pause().map(|_| ())
    }

    /// Resumes every vCPU (no-op when running).
    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.ctl.resume().map(|_| ())
    }

    /// Captures the whole VM state except memory (vCPUs must be paused).
    pub fn capture_state(&self) -> Result<VmState, VmmError> {
        self.ctl.capture_state()
    }

    /// Takes the `service/<name>` sections of the state this VM was restored from (empty
    /// for a booted VM, and after the first call): the service layer attaches them again.
    pub fn take_service_sections(&self) -> Vec<crate::state::Section> {
        std::mem::take(&mut *lock(&self.service_sections))
    }

    /// Posts a command to the guest's mailbox (spanguest).
    pub fn guest_command(&self, cmd: GuestCommand) -> Result<u64, VmmError> {
        let mut pv = lock(&self.pv);
        let mailbox = pv.state.mailbox.ok_or_else(|| {
            VmmError::Conflict("the guest has not registered a mailbox (is it spanguest?)".into())
        })?;
        let seq = pv.state.command_seq + 1;
        let ram = &self.ctl.ram;
        ram.write(mailbox + 8, &(cmd as u64).to_le_bytes())?;
        // The guest reads the command once it sees the new sequence number.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.write(mailbox, &seq.to_le_bytes())?;
        pv.state.command_seq = seq;
        Ok(seq)
    }

    /// The machine's shape.
    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// Stops every vCPU thread.
    pub fn shutdown(self) {
        for v in std::mem::take(&mut *lock(&self.ctl.vcpus)) {
            v.stop();
        }
    }
}
