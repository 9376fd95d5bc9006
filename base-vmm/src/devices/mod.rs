//! Port-I/O and MMIO devices and the bus that routes guest port and MMIO accesses to them.

pub mod i8042;
pub mod pv;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What a vCPU must do after a device handled a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: continue running the guest.
    Continue,
    /// Park this vCPU for the given time (spanguest's paravirtual sleep).
    Sleep(Duration),
    /// The guest asked to power off with this exit status.
    PowerOff(u8),
    /// The guest asked for a reset (i8042 pulse); spanvmm treats it as a stop.
    Reset,
}

/// A device reached through x86 port I/O.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes from `port`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// The guest writes `data` to `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]) -> IoAction;
}

/// A shared device on the bus.
pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// A device reached through guest-physical addresses outside RAM.
pub trait MmioDevice: Send {
    /// The guest loads `data.len()` bytes at `offset` into the device's window.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest stores `data` at `offset` into the device's window.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// A shared MMIO device on the bus.
pub type SharedMmioDevice = Arc<Mutex<dyn MmioDevice>>;

struct Range {
    base: u16,
    len: u16,
    dev: SharedDevice,
}

struct MmioRange {
    base: u64,
    len: u64,
    dev: SharedMmioDevice,
}

/// Ports no built-in device owns, and every MMIO access no built-in device (the virtio
/// devices) owns, are offered to a hook: the service layer plugs in
/// here, so services can claim ports and MMIO ranges at run time. Returning false means "not
/// mine either".
pub trait IoHook: Send + Sync {
    /// A guest `out` to an unowned port; true when handled.
    fn write(&self, port: u16, data: &[u8]) -> bool;
    /// A guest `in` from an unowned port; true when `data` was filled.
    fn read(&self, port: u16, data: &mut [u8]) -> bool;
    /// A guest store to `addr` outside RAM; true when handled.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
    /// A guest load from `addr` outside RAM; true when `data` was filled.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
}

/// Routes port and MMIO accesses to the device owning the port or address, then to the hook.
/// Ports and addresses nobody owns read as all-ones and ignore writes, as on real hardware.
#[derive(Default)]
pub struct IoBus {
    ranges: Vec<Range>,
    mmio: Vec<MmioRange>,
    /// Set once, after the VM is built (services need the VM to exist first).
    hook: OnceLock<Arc<dyn IoHook>>,
    /// VM exits of every vCPU, by kind (for metrics).
    pub exits: ExitCounts,
    /// Microseconds the vCPUs slept for a throttle (all vCPUs together).
    pub throttled_us: std::sync::atomic::AtomicU64,
}

/// The kinds of VM exit counted in [`ExitCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `KVM_RUN` left for the VMM (a pause, a register read: the vCPU was kicked).
    Kick,
    /// Anything else (halt, shutdown, errors).
    Other,
}

impl ExitKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ExitKind; 6] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Kick,
        ExitKind::Other,
    ];

    /// The kind's name (a metric label).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Kick => "kick",
            ExitKind::Other => "other",
        }
    }
}

/// VM exits counted by kind: one relaxed atomic add per exit (an exit costs 15-170 µs here).
#[derive(Debug, Default)]
pub struct ExitCounts([std::sync::atomic::AtomicU64; 6]);

impl ExitCounts {
    /// Counts one exit.
    pub fn count(&self, kind: ExitKind) {
        self.0[kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Exits so far, by kind.
    pub fn get(&self) -> Vec<(ExitKind, u64)> {
        ExitKind::ALL
            .iter()
            .map(|&k| {
                (
                    k,
                    self.0[k as usize].load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// A port range overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps a range already on the bus")]
pub struct PortConflict {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
}

/// An MMIO window overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("MMIO window {base:#x}+{len:#x} overlaps a window already on the bus")]
pub struct MmioConflict {
    /// First address.
    pub base: u64,
    /// Bytes.
    pub len: u64,
}

impl IoBus {
    /// Adds `dev` for guest-physical addresses `[base, base+len)`.
    pub fn insert_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedMmioDevice,
    ) -> Result<(), MmioConflict> {
        let end = base.checked_add(len).filter(|_| len > 0);
        match end {
            Some(end)
                if !self
                    .mmio
                    .iter()
                    .any(|r| base < r.base + r.len && r.base < end) =>
            {
                self.mmio.push(MmioRange { base, len, dev });
                Ok(())
            }
            _ => Err(MmioConflict { base, len }),
        }
    }

    fn find_mmio(&self, addr: u64) -> Option<(&SharedMmioDevice, u64)> {
        self.mmio
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (&r.dev, addr - r.base))
    }

    /// The MMIO windows built-in devices own, for the service layer to keep off them.
    pub fn owned_mmio(&self) -> Vec<(u64, u64)> {
        self.mmio.iter().map(|r| (r.base, r.len)).collect()
    }
    /// Adds `dev` for ports `[base, base+len)`.
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedDevice) -> Result<(), PortConflict> {
        let end = base as u32 + len as u32;
        if len == 0
            || end > 0x10000
            || self
                .ranges
                .iter()
                .any(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end)
        {
            return Err(PortConflict { base, len });
        }
        self.ranges.push(Range { base, len, dev });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&SharedDevice> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && (port as u32) < r.base as u32 + r.len as u32)
            .map(|r| &r.dev)
    }

    /// Installs the hook for unowned ports and MMIO; a second call is refused.
    pub fn set_hook(&self, hook: Arc<dyn IoHook>) -> Result<(), &'static str> {
        self.hook
            .set(hook)
            .map_err(|_| "the port hook is already installed")
    }

    /// The port ranges built-in devices own, for the service layer to keep off them.
    pub fn owned_ranges(&self) -> Vec<(u16, u16)> {
        self.ranges.iter().map(|r| (r.base, r.len)).collect()
    }

    /// A guest `in`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(dev) => lock(dev).pio_read(port, data),
            None => {
                if !self.hook.get().is_some_and(|h| h.read(port, data)) {
                    data.fill(0xff)
                }
            }
        }
    }

    /// A guest `out`.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        match self.find(port) {
            Some(dev) => lock(dev).pio_write(port, data),
            None => {
                if let Some(h) = self.hook.get() {
                    h.write(port, data);
                }
                IoAction::Continue
            }
        }
    }

    /// A guest load from `addr`, outside RAM.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((dev, offset)) = self.find_mmio(addr) {
            return lock(dev).mmio_read(offset, data);
        }
        if !self.hook.get().is_some_and(|h| h.mmio_read(addr, data)) {
            data.fill(0xff)
        }
    }

    /// A guest store to `addr`, outside RAM.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, offset)) = self.find_mmio(addr) {
            return lock(dev).mmio_write(offset, data);
        }
        if let Some(h) = self.hook.get() {
            h.mmio_write(addr, data);
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking thread stays usable because
/// device state is plain data updated in place.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Little-endian value of up to 8 bytes of port data.
pub fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (*b as u64) << (8 * i))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn pio_write(&mut self, _port: u16, data: &[u8]) -> IoAction {
            self.0 = data[0];
            IoAction::Continue
        }
    }

    #[test]
    fn routes_and_refuses_overlaps() {
        let mut bus = IoBus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x3ff, 1, Arc::new(Mutex::new(Echo(2)))).is_err());
        assert!(bus
            .insert(0xffff, 2, Arc::new(Mutex::new(Echo(2))))
            .is_err());
        bus.write(0x3f9, &[9]);
        let mut d = [0u8; 2];
        bus.read(0x3f8, &mut d);
        assert_eq!(d, [9, 9]);
        bus.read(0x80, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        bus.mmio_read(0x1000, &mut d);
        assert_eq!(d, [0xff, 0xff], "no hook: MMIO reads all-ones");
        struct Hook;
        impl IoHook for Hook {
            fn write(&self, port: u16, _: &[u8]) -> bool {
                port == 0x80
            }
            fn read(&self, port: u16, data: &mut [u8]) -> bool {
                data.fill(0x42);
                port == 0x80
            }
            fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
                false
            }
            fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
                data.fill(0x17);
                addr == 0x1000
            }
        }
        bus.set_hook(Arc::new(Hook)).unwrap();
        assert!(bus.set_hook(Arc::new(Hook)).is_err());
        bus.read(0x80, &mut d);
        assert_eq!(d, [0x42, 0x42]);
        bus.read(0x3f8, &mut d);
        assert_eq!(d, [9, 9], "built-in devices come first");
        bus.mmio_read(0x1000, &mut d);
        assert_eq!(d, [0x17, 0x17]);
        bus.mmio_read(0x2000, &mut d);
        assert_eq!(d, [0xff, 0xff], "an unhandled MMIO read is all-ones");
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
    }
}
