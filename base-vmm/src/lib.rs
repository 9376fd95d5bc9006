//! spanvmm's L0: the mechanisms beneath every VM and every service. KVM VM and vCPUs, guest RAM
//! on a memfd, kernel loading, port-I/O devices, dirty-page harvest, missing-page service
//! (userfaultfd) and the versioned VM state. Policy (what to send, when to stop) lives above.

#![deny(missing_docs)]

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod lazy;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// True when /dev/kvm is PVM (no hardware virtualization): guest CPL0 is emulated, interrupts
/// cannot be delivered in long mode, and an ordinary Linux kernel cannot boot.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
