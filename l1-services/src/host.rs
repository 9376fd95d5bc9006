//! The VMM's side of the host interface: the few mechanisms a VMM must provide. Everything else
//! services use (page hashing, zero scan, search, page-table walks, dirty fan-out) is built once
//! on top of these in this crate.

use std::sync::Arc;

use base_vmm::memory::{GuestRam, MemoryError};
use base_vmm::state::VmState;

use crate::error::HostError;
pub use spanvmm_sdk::{VcpuRegs, VmInfo};

/// What the VMM provides to services.
///
/// Re-entrancy: these methods are called from inside service calls, on the thread that called
/// into the [`crate::ServiceManager`]: a vCPU thread for port events, the caller's thread for
/// `call`, `tick`, `lifecycle`, `attach`, `detach`. `pause`, `resume` and `vcpu_regs` are
/// never called from a port event (the manager refuses them there), but they may be called
/// while a vCPU thread waits to deliver an event to the same service: the manager then lets
/// that vCPU finish its exit without the service (writes are queued, reads return all-ones),
/// so an implementation that waits for every vCPU to acknowledge does not deadlock.
pub trait VmHost: Send + Sync + 'static {
    /// The VM's shape.
    fn info(&self) -> VmInfo;
    /// Reads guest-physical memory; an access outside guest RAM is an error, never a crash.
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError>;
    /// Writes guest-physical memory.
    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), HostError>;
    /// Stops all vCPUs at an instruction boundary and returns when they are stopped.
    fn pause(&self) -> Result<(), HostError>;
    /// Lets all vCPUs run again.
    fn resume(&self) -> Result<(), HostError>;
    /// Registers of vCPU `index` (the VM is normally paused).
    fn vcpu_regs(&self, index: u32) -> Result<VcpuRegs, HostError>;
    /// Takes and clears the bitmap of pages dirtied since the previous harvest (one bit per
    /// 4 KiB page, page 0 in bit 0 of word 0). Guest and VMM writes both count.
    fn harvest_dirty(&self) -> Result<Vec<u64>, HostError>;
    /// Starts dirty logging; called when the first `dirty-log` service attaches.
    fn start_dirty_log(&self) -> Result<(), HostError> {
        Ok(())
    }
    /// Stops dirty logging; called when the last `dirty-log` service detaches.
    fn stop_dirty_log(&self) -> Result<(), HostError> {
        Ok(())
    }
    /// Guest RAM itself, for host engines that move bulk data (snapshots).
    fn guest_ram(&self) -> Option<Arc<GuestRam>> {
        None
    }
    /// The VM's state except memory (vCPUs, devices); the VM must be paused.
    fn capture_state(&self) -> Result<VmState, HostError> {
        Err(HostError::NotAvailable("capture-state"))
    }
    /// Guest regions registered as secret, `(gpa, len)`: snapshots leave them out.
    fn secrets(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

fn mem_err(e: MemoryError) -> HostError {
    match e {
        MemoryError::OutOfRange { addr, len, size } => HostError::OutOfRange {
            gpa: addr,
            len,
            size,
        },
        other => HostError::Failed(other.to_string()),
    }
}

/// A [`VmHost`] over guest RAM alone (no vCPUs): memory services work on it (offline
/// introspection of a memory image, tests); pause, resume and registers are not available.
/// Its dirty log is the RAM's own record of VMM writes.
pub struct RamHost {
    ram: Arc<GuestRam>,
    vcpus: u32,
    tsc_khz: u32,
}

impl RamHost {
    /// A host over `ram` that reports `vcpus` vCPUs and a TSC of `tsc_khz`.
    pub fn new(ram: Arc<GuestRam>, vcpus: u32, tsc_khz: u32) -> Self {
        RamHost {
            ram,
            vcpus,
            tsc_khz,
        }
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}

impl VmHost for RamHost {
    fn info(&self) -> VmInfo {
        VmInfo {
            mem_bytes: self.ram.size(),
            vcpus: self.vcpus,
            tsc_khz: self.tsc_khz,
        }
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.ram.read(gpa, buf).map_err(mem_err)
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), HostError> {
        self.ram.write(gpa, data).map_err(mem_err)
    }

    fn pause(&self) -> Result<(), HostError> {
        Err(HostError::NotAvailable(
            "pause (memory-only host without vCPUs)",
        ))
    }

    fn resume(&self) -> Result<(), HostError> {
        Err(HostError::NotAvailable(
            "resume (memory-only host without vCPUs)",
        ))
    }

    fn vcpu_regs(&self, _index: u32) -> Result<VcpuRegs, HostError> {
        Err(HostError::NotAvailable(
            "vcpu-regs (memory-only host without vCPUs)",
        ))
    }

    fn harvest_dirty(&self) -> Result<Vec<u64>, HostError> {
        Ok(self.ram.take_vmm_dirty())
    }

    fn guest_ram(&self) -> Option<Arc<GuestRam>> {
        Some(self.ram.clone())
    }
}
