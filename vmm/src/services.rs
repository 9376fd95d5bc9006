//! Where the base VMM meets the service layer: the one adapter over base-vmm's [`VmControl`]
//! ([`VmmHost`], which services see as their [`VmHost`] and the migration engine as its
//! [`SourceVm`]), and guest ports no built-in device owns routed to the services that claim
//! them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use base_vmm::devices::IoHook;
use base_vmm::memory::GuestRam;
use base_vmm::state::VmState;
use base_vmm::vmm::{RunState, VmControl, Vmm, VmmError};
use l1_services::migration::SourceVm;
use l1_services::{
    HostError, ManagerConfig, PluginPolicy, ServiceManager, ServiceRecord, VcpuRegs, VmHost, VmInfo,
};

/// The VMM's side of every engine that drives the VM from outside its main loop (services,
/// the outgoing migration), over a running VM's controls. Each [`VmControl`] call is made
/// here once; the trait impls below only translate errors.
pub struct VmmHost {
    ctl: Arc<VmControl>,
    info: VmInfo,
    /// The machine's shape, JSON (what a migration sends first).
    machine: Vec<u8>,
    /// The services whose states the migration's state frame carries (weak: the manager
    /// owns the adapter it gives its services).
    services: Option<Weak<ServiceManager>>,
}

impl VmmHost {
    /// The adapter over `vmm`'s controls.
    pub fn new(vmm: &Vmm) -> anyhow::Result<Self> {
        let m = vmm.machine();
        Ok(VmmHost {
            ctl: vmm.control().clone(),
            info: VmInfo {
                mem_bytes: m.mem_bytes,
                vcpus: m.vcpus as u32,
                tsc_khz: m.tsc_khz,
            },
            machine: serde_json::to_vec(m)?,
            services: None,
        })
    }

    /// The adapter of an outgoing migration: its state capture asks `manager`'s services for
    /// their states (they stay attached here; the driving migration service is recorded as
    /// declined, see [`ServiceManager::save_states`]).
    pub fn with_services(mut self, manager: &Arc<ServiceManager>) -> Self {
        self.services = Some(Arc::downgrade(manager));
        self
    }

    /// Stops every vCPU; true when they ran.
    fn pause_vcpus(&self) -> Result<bool, VmmError> {
        self.ctl.pause()
    }

    /// Lets the vCPUs run again.
    fn resume_vcpus(&self) -> Result<(), VmmError> {
        self.ctl.resume().map(|_| ())
    }

    /// The VM's state (vCPUs paused).
    fn state(&self) -> Result<VmState, VmmError> {
        self.ctl.capture_state()
    }

    /// The migration `state` frame's bytes, with the services' states: the one place they
    /// are produced.
    fn state_bytes(&self, mut state: VmState) -> Vec<u8> {
        if let Some(m) = self.services.as_ref().and_then(Weak::upgrade) {
            state.services = m
                .save_states(None)
                .iter()
                .map(ServiceRecord::to_section)
                .collect();
        }
        state.to_bytes()
    }

    fn out_of_range(&self, gpa: u64, len: u64) -> HostError {
        HostError::OutOfRange {
            gpa,
            len,
            size: self.info.mem_bytes,
        }
    }
}

fn host_err(e: VmmError) -> HostError {
    HostError::Failed(e.to_string())
}

impl VmHost for VmmHost {
    fn info(&self) -> VmInfo {
        self.info
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let len = buf.len() as u64;
        self.ctl
            .ram()
            .read(gpa, buf)
            .map_err(|_| self.out_of_range(gpa, len))
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), HostError> {
        let len = data.len() as u64;
        self.ctl
            .ram()
            .write(gpa, data)
            .map_err(|_| self.out_of_range(gpa, len))
    }

    fn pause(&self) -> Result<(), HostError> {
        self.pause_vcpus().map(|_| ()).map_err(host_err)
    }

    fn resume(&self) -> Result<(), HostError> {
        self.resume_vcpus().map_err(host_err)
    }

    fn vcpu_regs(&self, index: u32) -> Result<VcpuRegs, HostError> {
        let s = self.ctl.vcpu_state(index as usize).map_err(host_err)?;
        Ok(l1_services::copy_vcpu_regs!(VcpuRegs {
            gprs: s.regs,
            cr: s.sregs,
            cpl: s.sregs.cs.dpl,
        }))
    }

    fn harvest_dirty(&self) -> Result<Vec<u64>, HostError> {
        self.ctl.harvest_dirty().map_err(host_err)
    }

    fn start_dirty_log(&self) -> Result<(), HostError> {
        self.ctl.set_dirty_logging(true).map_err(host_err)
    }

    fn stop_dirty_log(&self) -> Result<(), HostError> {
        self.ctl.set_dirty_logging(false).map_err(host_err)
    }

    fn guest_ram(&self) -> Option<Arc<GuestRam>> {
        Some(self.ctl.ram().clone())
    }

    fn capture_state(&self) -> Result<VmState, HostError> {
        self.state().map_err(host_err)
    }

    fn secrets(&self) -> Vec<(u64, u64)> {
        self.ctl.secrets()
    }
}

impl SourceVm for VmmHost {
    fn ram(&self) -> &Arc<GuestRam> {
        self.ctl.ram()
    }

    fn pause(&self) -> Result<bool, HostError> {
        self.pause_vcpus().map_err(host_err)
    }

    fn resume(&self) -> Result<(), HostError> {
        self.resume_vcpus().map_err(host_err)
    }

    fn running(&self) -> bool {
        self.ctl.run_state() == RunState::Running
    }

    fn machine(&self) -> Vec<u8> {
        self.machine.clone()
    }

    fn disks(&self) -> Vec<Arc<base_vmm::devices::virtio::disk_track::DiskTrack>> {
        self.ctl.disk_tracks()
    }

    fn set_throttle(&self, percent: u8) -> Result<(), HostError> {
        self.ctl.set_throttle(percent).map_err(host_err)
    }

    fn throttled_ms(&self) -> f64 {
        self.ctl.throttled_us() as f64 / 1e3
    }

    fn capture_state(&self) -> Result<Vec<u8>, HostError> {
        let state = self.state().map_err(host_err)?;
        Ok(self.state_bytes(state))
    }

    fn pause_and_capture(&self) -> Result<(bool, Vec<u8>), HostError> {
        let (ran, state) = self.ctl.pause_and_capture().map_err(host_err)?;
        Ok((ran, self.state_bytes(state)))
    }
}

/// Guest ports that no built-in device owns, and MMIO, go to the services that claim them.
struct ServiceIo(Arc<ServiceManager>);

impl IoHook for ServiceIo {
    fn write(&self, port: u16, data: &[u8]) -> bool {
        self.0.on_port_write(port, data)
    }

    fn read(&self, port: u16, data: &mut [u8]) -> bool {
        self.0.on_port_read(port, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.0.on_mmio_write(addr, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.0.on_mmio_read(addr, data)
    }
}

/// Where precompiled Wasm services are cached: `$SPANVMM_CACHE`, else `~/.cache/spanvmm`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SPANVMM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/spanvmm")))
        .unwrap_or_else(|| std::env::temp_dir().join("spanvmm-cache"))
        .join("services")
}

/// The operator's service-file policy of this process (`run --plugin-dir`, ...).
static POLICY: OnceLock<PluginPolicy> = OnceLock::new();

/// Carries the policy to a live update's successor, which is started with `--takeover-fd`
/// only (it inherits this process's environment).
const POLICY_ENV: &str = "SPANVMM_PLUGIN_POLICY";

/// Sets the service-file policy every manager of this process gets, from `run`'s options; a
/// live update's successor (`takeover`) without options of its own keeps its predecessor's.
/// Call it before any thread starts (it sets an environment variable).
pub fn set_plugin_policy(
    dirs: &[PathBuf],
    no_native: bool,
    sha256: &[String],
    takeover: bool,
) -> anyhow::Result<()> {
    let mut policy = PluginPolicy::new(dirs, no_native, sha256).map_err(anyhow::Error::msg)?;
    if takeover && policy.is_default() {
        if let Some(inherited) = std::env::var_os(POLICY_ENV) {
            policy = serde_json::from_str(&inherited.to_string_lossy())
                .map_err(|e| anyhow::anyhow!("{POLICY_ENV}: {e}"))?;
        }
    }
    if policy.is_default() {
        std::env::remove_var(POLICY_ENV);
    } else {
        std::env::set_var(POLICY_ENV, serde_json::to_string(&policy)?);
    }
    let _ = POLICY.set(policy);
    Ok(())
}

/// Builds the service manager of `vmm`: built-in device ports are reserved, and the bus hands
/// every other port, and all MMIO, to the manager.
pub fn manager_for(vmm: &Vmm) -> anyhow::Result<Arc<ServiceManager>> {
    let host = Arc::new(VmmHost::new(vmm)?);
    let config = ManagerConfig {
        policy: POLICY.get().cloned().unwrap_or_default(),
        ..ManagerConfig::default()
    };
    let manager = Arc::new(ServiceManager::with_config(host, cache_dir(), config));
    manager.start_async_delivery()?;
    manager.carry_states_in_snapshots();
    for (base, len) in vmm.bus().owned_ranges() {
        manager.reserve_ports(base, len, "spanvmm (built-in device)")?;
    }
    for (base, len) in vmm.bus().owned_mmio() {
        manager.reserve_mmio(base, len, "spanvmm (virtio device)")?;
    }
    vmm.bus()
        .set_hook(Arc::new(ServiceIo(manager.clone())))
        .map_err(anyhow::Error::msg)?;
    Ok(manager)
}
