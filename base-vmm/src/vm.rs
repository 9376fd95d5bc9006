//! The KVM VM: guest memory registration, dirty logging, in-kernel irqchip and PIT, clock.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty_ring::{DirtyLogMode, DirtyRings, RingError};
use crate::memory::GuestRam;
use crate::vcpu::{Vcpu, VcpuError};

/// VM errors.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// errno.
        err: kvm_ioctls::Error,
    },
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The dirty ring was asked for and could not be set up.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The saved VM state does not fit this host's VM.
    #[error("{0}")]
    Incompatible(String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// The one memory slot: all of guest RAM.
const RAM_SLOT: u32 = 0;
/// Where KVM may put the VMX TSS (three pages just below 4 GiB, clear of RAM we report).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, IOAPIC; absent when the VM has no in-kernel irqchip.
    pub irqchip: Option<Vec<kvm_irqchip>>,
    /// The in-kernel PIT, when there is one.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest RAM registered.
pub struct Vm {
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    has_irqchip: bool,
    /// Known once [`Vm::ready`] returned.
    has_pit: bool,
    /// The PIT being made (see [`Vm::new`]): whether it is there.
    pending: Option<JoinHandle<Result<bool, VmError>>>,
    dirty_logging: bool,
    /// Set when the VM logs dirty pages through KVM's dirty ring rather than its bitmap.
    dirty_rings: Option<Arc<DirtyRings>>,
    cpuid: CpuId,
    /// The MSRs KVM lists (`KVM_GET_MSR_INDEX_LIST`); some of them fail to read on PVM.
    listed_msrs: Vec<u32>,
    /// Those of them the VMM can save and restore: probed on the first vCPU made with the
    /// host's CPUID (see [`Vm::create_vcpu`]).
    msr_list: OnceLock<Arc<Vec<u32>>>,
}

impl Vm {
    /// Creates a VM on `ram`. The in-kernel irqchip and PIT are created where the host offers
    /// them (PVM hosts may not); their absence is recorded, not an error. Guest memory is
    /// registered first, before the irqchip (see below); the PIT is made on a thread of its
    /// own while the caller goes on building the VM (vCPUs, kernel, lazy-restore
    /// registration): [`Vm::ready`] waits for it.
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, VmError> {
        let mode = dirty_log_mode(ram.size());
        Self::new_with(ram, mode)
    }

    /// [`Vm::new`] logging dirty pages the way `mode` says (the ring must be chosen before any
    /// vCPU exists: KVM allots each vCPU its ring when it is created).
    pub fn new_with(ram: Arc<GuestRam>, mode: DirtyLogMode) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        let dirty_rings = match mode {
            DirtyLogMode::Bitmap => None,
            DirtyLogMode::Ring => Some(Arc::new(DirtyRings::enable(
                &fd,
                RAM_SLOT,
                ram.size() / crate::memory::PAGE_SIZE,
            )?)),
        };
        crate::startup::mark("KVM_CREATE_VM");
        // The memslot before any device goes on KVM's I/O buses. Installing a memslot waits
        // for an expedited SRCU grace period: ~10 µs on a fresh VM. But in this host's kernel
        // (6.18, KVM commit "Avoid synchronize_srcu() in kvm_io_bus_register_dev()") each
        // bus registration (the irqchip's PIC and IOAPIC, the PIT) frees the old bus with
        // call_srcu(), a normal grace period paced in jiffies, and an expedited one asked
        // for within a few jiffies waits behind it: the memslot then took 3.4-15 ms (1-4
        // jiffies at HZ=250) instead of 0.07 ms for 256 MiB (measured with the
        // `vm_setup_cost` example; docs/benchmarks.md, "Where the start-up goes"). Its own
        // cost, the rmap arrays of PVM's shadow MMU, is ~0.3 ms of CPU per GiB.
        register_slot(&fd, &ram, false)?;
        crate::startup::mark("memslot");
        // Only VMX needs it; elsewhere the ioctl is harmless or absent.
        let _ = fd.set_tss_address(KVM_TSS_ADDR);
        // Before any vCPU (KVM's rule), so not on the thread below.
        let has_irqchip = fd.create_irq_chip().is_ok();
        crate::startup::mark("irqchip");
        // The PIT waits for kthreadd to start its worker thread, for milliseconds when the
        // host is busy; nothing before the first KVM_RUN (or a restored state) needs it.
        let bg_fd = fd.clone();
        let pending = std::thread::Builder::new()
            .name("vm-pit".into())
            .spawn(move || {
                let has_pit = has_irqchip
                    && bg_fd
                        .create_pit2(kvm_pit_config {
                            flags: KVM_PIT_SPEAKER_DUMMY,
                            ..Default::default()
                        })
                        .is_ok();
                crate::startup::mark("PIT");
                Ok(has_pit)
            })
            .map_err(|e| VmError::Kvm {
                what: "starting the PIT thread",
                err: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        crate::startup::mark("CPUID");
        let listed = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(Vm {
            fd,
            ram,
            has_irqchip,
            has_pit: false,
            pending: Some(pending),
            dirty_logging: false,
            dirty_rings,
            cpuid,
            listed_msrs: listed.as_slice().to_vec(),
            msr_list: OnceLock::new(),
        })
    }

    /// Waits for the PIT [`Vm::new`] started; once it is there, at once.
    /// Before the first `KVM_RUN`, and before anything reads or restores the VM's state.
    pub fn ready(&mut self) -> Result<(), VmError> {
        if let Some(t) = self.pending.take() {
            self.has_pit = t.join().map_err(|_| VmError::Kvm {
                what: "the PIT thread (it panicked)",
                err: kvm_ioctls::Error::new(libc::EIO),
            })??;
        }
        Ok(())
    }

    fn set_memory_slot(&mut self, log_dirty: bool) -> Result<(), VmError> {
        self.ready()?;
        register_slot(&self.fd, &self.ram, log_dirty)?;
        self.dirty_logging = log_dirty;
        Ok(())
    }

    /// Turns KVM's dirty-page logging on or off (it costs a write fault per page per round).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if on == self.dirty_logging {
            return Ok(());
        }
        // Whatever the rings hold is from an earlier logging period: dropped before logging
        // starts (a write after the start must reach the first harvest) and once it stopped.
        if let (true, Some(r)) = (on, &self.dirty_rings) {
            r.discard()?;
        }
        self.set_memory_slot(on)?;
        if let (false, Some(r)) = (on, &self.dirty_rings) {
            r.discard()?;
        }
        Ok(())
    }

    /// How this VM logs dirty pages.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        if self.dirty_rings.is_some() {
            DirtyLogMode::Ring
        } else {
            DirtyLogMode::Bitmap
        }
    }

    /// Times a vCPU stopped because its dirty ring was full (0 with the bitmap).
    pub fn dirty_ring_full_exits(&self) -> u64 {
        self.dirty_rings.as_ref().map_or(0, |r| r.full_exits())
    }

    /// Pages written since the last harvest, one bit per page: what the guest wrote (KVM's log,
    /// which must be on) plus what the VMM itself wrote. Both logs are cleared.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, VmError> {
        if !self.dirty_logging {
            return Err(VmError::Incompatible(
                "dirty logging is off: turn it on before harvesting".into(),
            ));
        }
        let mut bits = match &self.dirty_rings {
            Some(r) => r.harvest()?,
            None => self
                .fd
                .get_dirty_log(RAM_SLOT, self.ram.size() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?,
        };
        for (w, v) in bits.iter_mut().zip(self.ram.take_vmm_dirty()) {
            *w |= v;
        }
        Ok(bits)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Whether the VM has an in-kernel irqchip.
    pub fn has_irqchip(&self) -> bool {
        self.has_irqchip
    }

    /// Creates vCPU `index` with everything this host offers (CPUID and MSRs). The first one
    /// made answers which of the listed MSRs are saveable (see [`Vcpu::readable_msrs`]): no
    /// throwaway VM for the probe (creating it and its vCPU cost several ms on PVM, on every
    /// start's critical path).
    pub fn create_vcpu(&self, index: usize) -> Result<Vcpu, VmError> {
        let mut vcpu = self.create_vcpu_with(index, &self.cpuid, Arc::new(Vec::new()))?;
        let msrs = self
            .msr_list
            .get_or_init(|| Arc::new(vcpu.readable_msrs(&self.listed_msrs)));
        vcpu.set_msr_list(msrs.clone());
        Ok(vcpu)
    }

    /// Creates vCPU `index` with `cpuid`, saving and restoring `msrs`.
    pub fn create_vcpu_with(
        &self,
        index: usize,
        cpuid: &CpuId,
        msrs: Arc<Vec<u32>>,
    ) -> Result<Vcpu, VmError> {
        let mut vcpu = Vcpu::new(&self.fd, index, cpuid, msrs, self.has_irqchip)?;
        if let Some(r) = &self.dirty_rings {
            vcpu.join_dirty_rings(r.clone())?;
        }
        Ok(vcpu)
    }

    /// The CPUID this host's KVM supports (`KVM_GET_SUPPORTED_CPUID`).
    pub fn host_cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// The MSRs KVM lists on this host (a superset of the saveable ones).
    pub fn listed_msrs(&self) -> &[u32] {
        &self.listed_msrs
    }

    /// The MSRs this host lets the VMM save and restore, probed on the VM's first vCPU made by
    /// [`Vm::create_vcpu`] (empty before).
    pub fn host_msrs(&self) -> Arc<Vec<u32>> {
        self.msr_list.get().cloned().unwrap_or_default()
    }
}

/// Registers `ram` as the VM's one memslot, logging dirty pages or not.
fn register_slot(fd: &VmFd, ram: &Arc<GuestRam>, log_dirty: bool) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base() as u64,
    };
    // SAFETY: the region is the live mapping of `ram`; the VM keeps that mapping alive
    // through its Arc for as long as the slot exists.
    unsafe { fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// Guests from this size up log dirty pages through KVM's dirty ring when the host offers it
/// (`run --dirty-log auto`, the default): see docs/benchmarks.md, "Dirty log".
pub const RING_FROM_BYTES: u64 = RING_FROM_GIB << 30;
const RING_FROM_GIB: u64 = 16;

/// The dirty log a VM of `bytes` gets: the one [`set_dirty_log`] chose, else (`auto`) the ring
/// from [`RING_FROM_BYTES`] up where the host offers it, and the bitmap below.
pub fn dirty_log_mode(bytes: u64) -> DirtyLogMode {
    match DIRTY_LOG.load(Ordering::Relaxed) {
        1 => DirtyLogMode::Bitmap,
        2 => DirtyLogMode::Ring,
        _ if bytes >= RING_FROM_BYTES && ring_offered() => DirtyLogMode::Ring,
        _ => DirtyLogMode::Bitmap,
    }
}

/// The operator's choice (`run --dirty-log`): 0 `auto`, 1 `bitmap`, 2 `ring`.
static DIRTY_LOG: AtomicU8 = AtomicU8::new(0);

/// Sets how the VMs this process creates from now on log dirty pages (`None`: `auto`, by
/// size, see [`dirty_log_mode`]).
pub fn set_dirty_log(mode: Option<DirtyLogMode>) {
    let v = match mode {
        None => 0,
        Some(DirtyLogMode::Bitmap) => 1,
        Some(DirtyLogMode::Ring) => 2,
    };
    DIRTY_LOG.store(v, Ordering::Relaxed);
}

/// Whether this host's KVM offers the dirty ring (asked once per process).
pub fn ring_offered() -> bool {
    static OFFERED: OnceLock<bool> = OnceLock::new();
    *OFFERED.get_or_init(|| {
        Kvm::new().is_ok_and(|k| {
            [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
                .iter()
                .any(|&c| k.check_extension_raw(c.into()) > 0)
        })
    })
}

/// What this host's KVM offers, without creating a VM: the CPUID it supports and the MSRs it
/// lists (a superset of those [`Vm::host_msrs`] finds readable). Cheap enough to check a saved
/// CPU model before anything is loaded.
pub fn host_offer() -> Result<(Vec<crate::cpu::CpuidEntry>, Vec<u32>), VmError> {
    let kvm = Kvm::new().map_err(VmError::Open)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let msrs = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok((crate::cpu::entries_of(&cpuid), msrs.as_slice().to_vec()))
}

impl Vm {
    /// Reads the irqchip, PIT and clock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmKvmState, VmError> {
        if self.pending.is_some() {
            return Err(VmError::Incompatible(
                "the VM is still being built (its PIT)".into(),
            ));
        }
        let irqchip = if self.has_irqchip {
            let mut chips = Vec::new();
            for id in [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ] {
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut c)
                    .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
                chips.push(c);
            }
            Some(chips)
        } else {
            None
        };
        let pit = if self.has_pit {
            Some(self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?)
        } else {
            None
        };
        let clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(VmKvmState {
            irqchip,
            pit,
            clock,
        })
    }

    /// Writes saved irqchip, PIT and clock state back.
    pub fn restore_state(&mut self, s: &VmKvmState) -> Result<(), VmError> {
        self.ready()?;
        match (&s.irqchip, self.has_irqchip) {
            (Some(chips), true) => {
                for c in chips {
                    self.fd.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
                }
            }
            (None, false) => {}
            _ => {
                return Err(VmError::Incompatible(
                    "the saved VM and this host disagree on having an in-kernel irqchip".into(),
                ))
            }
        }
        match (&s.pit, self.has_pit) {
            (Some(p), true) => self.fd.set_pit2(p).map_err(kvm_err("KVM_SET_PIT2"))?,
            (None, false) => {}
            _ => {
                return Err(VmError::Incompatible(
                    "the saved VM and this host disagree on having an in-kernel PIT".into(),
                ))
            }
        }
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}
