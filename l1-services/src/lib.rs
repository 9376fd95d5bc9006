//! spanvmm's L1 service runtime: hypervisor services are plugins attached beneath a running
//! VM. A service is a Wasm component (wasmtime, sandboxed: per-call deadline, memory limit,
//! capability-checked host calls) or a native shared object (libloading, trusted, C ABI). Both
//! speak `sdk/wit/service.wit`.
//!
//! The VMM implements [`VmHost`] (memory, pause/resume, registers, dirty harvest) and drives a
//! [`ServiceManager`]: `attach`/`detach`/`replace`/`list`/`call` from its control API, port
//! events from vCPU threads (`on_port_write`/`on_port_read`, one atomic load when no service
//! claims a port), `lifecycle` and `tick` from its main loop. Everything services need beyond
//! the VMM's mechanisms (hashing, zero scan, search, page-table walks, dirty fan-out) lives
//! here, once ([`memops`]).

#![deny(missing_docs)]

mod backend;
mod ctx;
mod error;
pub mod handover;
mod host;
mod manager;
pub mod manifest;
pub mod memops;
pub mod migration;
mod native;
mod service_state;
mod snapshot;
pub mod trust;
mod wasi;
mod wasm;
mod wasm_mem;

pub use ctx::{Notification, Notifications, NOTIFICATIONS_PER_SERVICE};
pub use error::{HostError, ServiceError};
pub use host::{RamHost, VmHost};
pub use manager::{
    AttachOptions, HandedService, Inspection, ManagerConfig, PluginPolicy, ReplaceOptions,
    ServiceInfo, ServiceKind, ServiceManager, ServiceState, ServiceStats, EVENT_NS_BOUNDS,
};
pub use service_state::{ServiceRecord, ServiceSectionError};
pub use snapshot::SnapshotTotals;
/// The one register copy (VcpuRegs from KVM's registers, or to and from the WIT record).
pub use spanvmm_sdk::copy_vcpu_regs;
pub use spanvmm_sdk::{
    Capability, Event, EventKind, EventReply, Lifecycle, Manifest, MmioRange, PortRange,
    Translation, VcpuRegs, VmInfo, ABI_VERSION,
};
pub use trust::{check_trusted_file, TrustError, TrustedFile, MAX_SERVICE_FILE_BYTES};
