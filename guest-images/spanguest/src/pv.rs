//! spanvmm's paravirtual ports and the mailbox (docs/spanguest-abi.md). On other VMMs (QEMU) the
//! ID port reads something else and the guest falls back: TSC spins instead of sleeps, no
//! mailbox.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{inl, outb, outl, rdtsc};

/// `in`: reads [`MAGIC`] on spanvmm.
pub const PORT_ID: u16 = 0x0ac0;
/// `out`: sleep N µs; `in`: TSC kHz.
pub const PORT_SLEEP: u16 = 0x0ac4;
/// `out` (8-bit): power off with this exit status.
pub const PORT_POWER_OFF: u16 = 0x0ac8;
/// `out`: guest-physical address of the mailbox page.
pub const PORT_MAILBOX: u16 = 0x0acc;
/// `out`: does nothing but exit.
pub const PORT_EXIT_STORM: u16 = 0x0ad0;
/// The MMIO exit-storm target (the `mmio` workload): a guest-physical address above any RAM the
/// VMM gives (63 GiB) but inside the static identity map, so every write exits to the VMM.
pub const MMIO_EXIT_STORM: u64 = 63 << 30;
/// "SPAN", little-endian.
pub const MAGIC: u32 = 0x4e41_5053;

/// Mailbox command: verify every page now.
pub const CMD_VERIFY: u64 = 1;
/// Mailbox command: reset the largest stall.
pub const CMD_RESET_STALL: u64 = 2;
/// Mailbox command: print `done` and power off.
pub const CMD_POWER_OFF: u64 = 3;

/// The page the VMM posts commands into. Only vCPU 0 reads it.
#[repr(C, align(4096))]
pub struct Mailbox {
    /// Written last by the VMM: a new command is there when this changes.
    pub seq: AtomicU64,
    /// The command.
    pub cmd: AtomicU64,
    /// Written by the guest: the last sequence number handled.
    pub ack: AtomicU64,
}

/// The mailbox (in .bss, so zero at boot).
pub static MAILBOX: Mailbox = Mailbox {
    seq: AtomicU64::new(0),
    cmd: AtomicU64::new(0),
    ack: AtomicU64::new(0),
};

/// `out`: guest-physical address of a console line (u16 length, then the bytes).
pub const PORT_CONSOLE_LINE: u16 = 0x0ad4;
/// `out`: first page of a secret region; then `out` its page count to register it.
pub const PORT_SECRET_PAGE: u16 = 0x0ad8;
/// `out`: page count of the secret region whose first page was just given.
pub const PORT_SECRET_PAGES: u16 = 0x0adc;

/// Bytes of the secret area.
pub const SECRET_LEN: usize = 16384;
/// What the secret area holds (repeated), in lower case: the area gets it in upper case, so
/// that the image itself never contains the pattern a test looks for in snapshot files.
pub const SECRET_PATTERN_LOWER: &[u8; 16] = b"spanguest-secret";

/// The secret area (in .bss, so zero until filled; never verified).
#[repr(C, align(4096))]
pub struct SecretArea(pub core::cell::UnsafeCell<[u8; SECRET_LEN]>);

// SAFETY: only vCPU 0 writes the area, once, before any other vCPU could look at it.
unsafe impl Sync for SecretArea {}

/// The secret area.
pub static SECRET: SecretArea = SecretArea(core::cell::UnsafeCell::new([0; SECRET_LEN]));

/// Fills the secret area with `SPANGUEST-SECRET` and registers it as secret with the VMM;
/// returns its address.
pub fn register_secret() -> u64 {
    let area = SECRET.0.get();
    // SAFETY: vCPU 0 alone runs this, once, during set-up.
    unsafe {
        for (i, b) in (*area).iter_mut().enumerate() {
            let c = SECRET_PATTERN_LOWER[i % SECRET_PATTERN_LOWER.len()];
            // Read through a volatile load so the compiler cannot fold the upper-case
            // pattern back into the image.
            let c = core::ptr::read_volatile(&c);
            *b = c.to_ascii_uppercase();
        }
    }
    let addr = area as u64;
    outl(PORT_SECRET_PAGE, (addr / 4096) as u32);
    outl(PORT_SECRET_PAGES, (SECRET_LEN / 4096) as u32);
    addr
}

/// Whether the VMM is spanvmm (one exit).
pub fn detect() -> bool {
    inl(PORT_ID) == MAGIC
}

/// Tells the VMM where the mailbox is.
pub fn register_mailbox() {
    let addr = &MAILBOX as *const Mailbox as u64;
    // The image lives below 4 GiB (linked at 1 MiB), so the address fits the 32-bit port.
    outl(PORT_MAILBOX, addr as u32);
}

/// Idles for `us` µs: one sleep exit on spanvmm, a TSC spin elsewhere (`ticks` = `us` in TSC
/// ticks).
pub fn sleep(pv: bool, us: u32, ticks: u64) {
    if pv {
        outl(PORT_SLEEP, us);
    } else {
        let start = rdtsc();
        while rdtsc().wrapping_sub(start) < ticks {
            core::hint::spin_loop();
        }
    }
}

/// Asks the VMM to power off with `status`, then parks for good. Under QEMU the port needs
/// `-device isa-debug-exit,iobase=0xac8,iosize=1` (QEMU then exits with `status * 2 + 1`).
pub fn power_off(status: u8) -> ! {
    outb(PORT_POWER_OFF, status);
    park()
}

/// Never returns, costing as little as possible: long sleeps on spanvmm, a pause loop elsewhere.
pub fn park() -> ! {
    let pv = detect();
    loop {
        if pv {
            outl(PORT_SLEEP, 1_000_000);
        } else {
            core::hint::spin_loop();
        }
    }
}

/// Records that the command `seq` has been handled.
pub fn ack(seq: u64) {
    MAILBOX.ack.store(seq, Ordering::Release);
}
