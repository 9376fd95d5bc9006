//! spanvmm's L0: the mechanisms beneath every VM and every service. KVM VM and vCPUs, guest RAM
//! on a memfd, kernel loading, port-I/O devices, dirty-page harvest, missing-page service
//! (userfaultfd) and the versioned VM state. Policy (what to send, when to stop) lives above.

#![deny(missing_docs)]

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod dirty_ring;
pub mod evict;
pub mod lazy;
pub mod memory;
pub mod page_server;
pub mod seccomp;
pub mod snapshot;
pub mod startup;
pub mod state;
mod syscalls_x86_64;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// True when /dev/kvm is PVM (no hardware virtualization): guest CPL0 is emulated, interrupts
/// cannot be delivered in long mode, and an ordinary Linux kernel cannot boot. Looked up once:
/// a jailed VMM (no /sys) asks before it enters the jail.
pub fn host_is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}
