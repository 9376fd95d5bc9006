//! What the guest needs from the CPU at CPL3: port I/O (IOPL is 3), the TSC and CPUID.

use core::arch::asm;

/// Reads the time-stamp counter.
///
/// Not `nomem`: the asm doubles as a compiler barrier, so timed memory work stays between the
/// two reads that bracket it.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the TSC into EDX:EAX; CR4.TSD is clear on both entry paths.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, subleaf 0: (EAX, EBX, ECX, EDX).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, c, d): (u32, u32, u32);
    let b: u64;
    // SAFETY: CPUID reads identification registers only. RBX is reserved by LLVM, so it is
    // saved in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nostack, preserves_flags),
        )
    };
    (a, b as u32, c, d)
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: the TSS I/O bitmap allows every port (and IOPL is 3), so port I/O at CPL3 cannot
    // fault; the devices behind the ports never write to guest memory we use.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Reads a 32-bit value from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Bytes identity-mapped by boot.S's static page tables (from address 0).
pub const MAPPED: u64 = 64 << 30;

/// Whether `addr..addr + len` is inside the identity map (and not the null page's first byte).
pub fn in_map(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED)
}

/// Reads a little-endian `u32` at a guest-physical address, if it is mapped.
pub fn phys_u32(addr: u64) -> Option<u32> {
    // SAFETY: the address is inside the identity map; reading guest RAM has no side effect, and
    // the VMM-provided structures read this way are not written concurrently.
    in_map(addr, 4).then(|| unsafe { core::ptr::read_unaligned(addr as *const u32) })
}

/// Reads a little-endian `u64` at a guest-physical address, if it is mapped.
pub fn phys_u64(addr: u64) -> Option<u64> {
    // SAFETY: as in `phys_u32`.
    in_map(addr, 8).then(|| unsafe { core::ptr::read_unaligned(addr as *const u64) })
}
