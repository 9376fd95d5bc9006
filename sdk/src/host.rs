//! What a service can ask of the VMM. The same functions work in a Wasm component (they call
//! the WIT imports) and in a native plugin (they call the host's vtable). Each host call checks
//! the capabilities the service's manifest asked for; denied calls return an error message.

use crate::types::{LogLevel, Translation, VcpuRegs, VmInfo};

#[cfg(target_arch = "wasm32")]
use crate::wasm::imports as imp;

#[cfg(not(target_arch = "wasm32"))]
use crate::native::imports as imp;

/// Largest single `read_memory`/`write_memory` transfer (1 MiB).
pub const MAX_TRANSFER: u32 = 1 << 20;

/// The VM's shape.
pub fn vm_info() -> VmInfo {
    imp::vm_info()
}

/// Pauses all vCPUs (capability `pause-resume`; not from a port event).
pub fn pause() -> Result<(), String> {
    imp::pause()
}

/// Resumes all vCPUs (capability `pause-resume`; not from a port event).
pub fn resume() -> Result<(), String> {
    imp::resume()
}

/// Registers of vCPU `index` (capability `vcpu-state`; the VM should be paused).
pub fn vcpu_regs(index: u32) -> Result<VcpuRegs, String> {
    imp::vcpu_regs(index)
}

/// Reads `len` (≤ 1 MiB) bytes of guest memory at `gpa` (capability `memory-read`).
pub fn read_memory(gpa: u64, len: u32) -> Result<Vec<u8>, String> {
    imp::read_memory(gpa, len)
}

/// Writes at most 1 MiB at `gpa` (capability `memory-write`).
pub fn write_memory(gpa: u64, data: &[u8]) -> Result<(), String> {
    imp::write_memory(gpa, data)
}

/// Walks the guest's 4-level page tables at `cr3` for `gva` (capability `memory-read`).
pub fn translate(cr3: u64, gva: u64) -> Result<Translation, String> {
    imp::translate(cr3, gva)
}

/// Pages dirtied since this service last asked, one bit per page (capability `dirty-log`).
pub fn dirty_bitmap() -> Result<Vec<u64>, String> {
    imp::dirty_bitmap()
}

/// XXH3-64 of each of `count` pages from page `first` (capability `memory-read`).
pub fn hash_pages(first: u64, count: u32) -> Result<Vec<u64>, String> {
    imp::hash_pages(first, count)
}

/// Bitmap of all-zero pages among `count` from page `first` (capability `memory-read`).
pub fn zero_scan(first: u64, count: u32) -> Result<Vec<u64>, String> {
    imp::zero_scan(first, count)
}

/// Addresses of `pattern` in `[start, start + len)`, at most `max_results` (capability
/// `memory-read`).
pub fn search_memory(
    start: u64,
    len: u64,
    pattern: &[u8],
    max_results: u32,
) -> Result<Vec<u64>, String> {
    imp::search_memory(start, len, pattern, max_results)
}

/// Claims ports `[base, base + len)` for this service; only while attaching.
pub fn claim_ports(base: u16, len: u16) -> Result<(), String> {
    imp::claim_ports(base, len)
}

/// Claims guest-physical MMIO `[base, base + len)` (outside guest RAM) for this service; only
/// while attaching.
pub fn claim_mmio(base: u64, len: u64) -> Result<(), String> {
    imp::claim_mmio(base, len)
}

/// Writes a line to the VMM's log.
pub fn log(level: LogLevel, msg: &str) {
    imp::log(level, msg)
}

/// Records a named metric shown with the service in the control API.
pub fn metric(name: &str, value: f64) {
    imp::metric(name, value)
}

/// Publishes a notification (`kind`, JSON `detail`) for the control API.
pub fn notify(kind: &str, detail: &str) {
    imp::notify(kind, detail)
}

/// Host monotonic time in ns.
pub fn now_ns() -> u64 {
    imp::now_ns()
}
