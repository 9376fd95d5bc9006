//! Output: whole `SPANGUEST ...` lines on the 16550 at 0x3f8, one vCPU at a time.
//!
//! On the 16550 every byte is one port write, so one VM exit: lines stay short. On spanvmm a
//! line goes out in one exit instead, through the paravirtual console-line port (the VMM reads
//! it from guest memory and feeds the same serial output). The line is built in a buffer first
//! so the lock is held only while it goes out.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{outb, outl, rdtsc};
use crate::pv::PORT_CONSOLE_LINE;

const COM1_DATA: u16 = 0x3f8;
const CAPACITY: usize = 160;

/// Guards the serial port so lines from several vCPUs never interleave.
static LOCK: AtomicBool = AtomicBool::new(false);

/// Set once the VMM is known to be spanvmm: lines go through the console-line port.
static PV_LINES: AtomicBool = AtomicBool::new(false);

/// What the console-line port reads: a little-endian u16 length, then the line and its newline.
/// In the image (below 4 GiB, identity-mapped), so its address fits the 32-bit port.
struct PvLine(UnsafeCell<[u8; 2 + CAPACITY + 1]>);

// SAFETY: only written while `LOCK` is held.
unsafe impl Sync for PvLine {}

static PV_LINE: PvLine = PvLine(UnsafeCell::new([0; 2 + CAPACITY + 1]));

/// From now on, lines go out in one exit each (call once the VMM is known to be spanvmm).
pub fn use_pv_lines() {
    PV_LINES.store(true, Ordering::Relaxed);
}

/// One output line under construction: `SPANGUEST <event> key=value ...`.
pub struct Line {
    buf: [u8; CAPACITY],
    len: usize,
}

impl Line {
    /// Starts a line for `event` (`boot`, `stat`, ...).
    pub fn new(event: &str) -> Self {
        let mut line = Line {
            buf: [0; CAPACITY],
            len: 0,
        };
        line.push(b"SPANGUEST ");
        line.push(event.as_bytes());
        line
    }

    fn push(&mut self, bytes: &[u8]) {
        // Truncate rather than fail: a clipped line is still useful.
        let n = bytes.len().min(CAPACITY - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    /// Appends ` text`.
    pub fn text(mut self, text: &str) -> Self {
        self.push(b" ");
        self.push(text.as_bytes());
        self
    }

    /// Appends raw bytes (from the command line) with no separator, non-printables as `?`.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        for &b in bytes.iter().take(CAPACITY) {
            self.push(&[if b.is_ascii_graphic() { b } else { b'?' }]);
        }
        self
    }

    /// Appends ` key=value`.
    pub fn kv(mut self, key: &str, value: &str) -> Self {
        self.push(b" ");
        self.push(key.as_bytes());
        self.push(b"=");
        self.push(value.as_bytes());
        self
    }

    /// Appends ` key=<decimal>`.
    pub fn num(mut self, key: &str, value: u64) -> Self {
        self.push(b" ");
        self.push(key.as_bytes());
        self.push(b"=");
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = value;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
        self
    }

    /// Appends ` key=0x<hex>`.
    pub fn hex(mut self, key: &str, value: u64) -> Self {
        self.push(b" ");
        self.push(key.as_bytes());
        self.push(b"=0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as usize;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.push(&[b"0123456789abcdef"[nibble]]);
            }
        }
        self
    }

    /// Sends the line and a newline. Returns the TSC ticks spent waiting for other vCPUs' lines
    /// and the ticks spent sending this one.
    pub fn send(self) -> (u64, u64) {
        let start = rdtsc();
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let locked = rdtsc();
        if PV_LINES.load(Ordering::Relaxed) {
            // SAFETY: `LOCK` is held, so no other vCPU touches the buffer.
            let out = unsafe { &mut *PV_LINE.0.get() };
            let n = self.len + 1;
            out[..2].copy_from_slice(&(n as u16).to_le_bytes());
            out[2..2 + self.len].copy_from_slice(&self.buf[..self.len]);
            out[2 + self.len] = b'\n';
            outl(PORT_CONSOLE_LINE, PV_LINE.0.get() as u64 as u32);
        } else {
            for &b in &self.buf[..self.len] {
                outb(COM1_DATA, b);
            }
            outb(COM1_DATA, b'\n');
        }
        LOCK.store(false, Ordering::Release);
        (locked.wrapping_sub(start), rdtsc().wrapping_sub(locked))
    }

    /// Sends the line, for callers that do not measure stalls.
    pub fn emit(self) {
        self.send();
    }
}
