//! Virtio devices (virtio 1.x, modern only) on the virtio-mmio transport (register layout
//! version 2), placed where QEMU's `microvm` machine puts its own, so that one guest finds its
//! devices the same way under both VMMs: from `virtio_mmio.device=512@ADDR:IRQ` on its command
//! line.
//!
//! Queue notifications reach the devices through ioeventfds registered with KVM on the
//! QueueNotify register and served by one event loop thread per VM ([`event_loop`]); a vCPU
//! therefore only exits for the register accesses of set-up. Interrupts go out through an
//! irqfd when the VM has an irqchip, but on PVM a long-mode guest cannot take them: the guest
//! polls its used rings, and the devices never depend on the guest acknowledging an interrupt.

pub mod block;
pub mod disk_track;
pub mod event_loop;
pub mod frames;
pub mod mmio;
pub mod net;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

pub use block::{Block, BlockConfig};
pub use mmio::{MmioTransport, TransportState};
pub use net::{Net, NetConfig};

/// Guest memory as devices see it (writes are tracked in the dirty bitmap).
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

/// First virtio-mmio slot, as on QEMU's microvm.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Bytes of each device's register window.
pub const MMIO_SIZE: u64 = 0x200;
/// Slots available (microvm has 24; a window ends below the IOAPIC at 0xfec00000).
pub const MAX_DEVICES: usize = 24;
/// GSI of slot 0; slot `i` uses `MMIO_GSI_BASE + i` (microvm's legacy numbering).
pub const MMIO_GSI_BASE: u32 = 5;
/// Virtio 1.x: the only mode spanvmm offers.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Guest-physical address of slot `i`.
pub fn slot_addr(i: usize) -> u64 {
    MMIO_BASE + i as u64 * MMIO_SIZE
}

/// GSI of slot `i`.
pub fn slot_gsi(i: usize) -> u32 {
    MMIO_GSI_BASE + i as u32
}

/// The kernel command-line words announcing `count` devices in slots `0..count`, the way
/// microvm announces its own (Linux's `virtio_mmio.device=` parameter; spanguest reads it too).
pub fn cmdline_words(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "virtio_mmio.device={}@{:#x}:{}",
                MMIO_SIZE,
                slot_addr(i),
                slot_gsi(i)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A device model behind the transport: its identity, features, configuration space and what
/// it does with the buffers a driver makes available.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = network, 2 = block).
    fn device_type(&self) -> u32;
    /// Feature bits offered (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Bytes of configuration space (read in one piece for the VM state).
    fn config_len(&self) -> usize;
    /// Serves every chain available on queue `index`; true when any went to the used ring.
    fn process_queue(&mut self, index: usize, queue: &mut virtio_queue::Queue, mem: &Mem) -> bool;
    /// A backend fd to watch (readable: call [`Self::process_queue`] on every queue again),
    /// e.g. a tap whose frames wait for receive buffers.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The fd a live update hands to the new process, with the name the device is reopened
    /// by ([`net::adopt_tap`]).
    fn handover_fd(&self) -> Option<(String, std::os::fd::RawFd)> {
        None
    }
    /// The VM runs again after a pause (a restored net device announces the guest's MAC).
    fn resumed(&mut self) {}
    /// What the device is and how it was configured (for `GET /vm` and the VM state).
    fn config(&self) -> DeviceConfig;
    /// Counters of what the device did.
    fn counters(&self) -> DeviceCounters;
    /// A disk's write tracking (for a migration that moves the disk).
    fn disk_track(&self) -> Option<std::sync::Arc<disk_track::DiskTrack>> {
        None
    }
}

/// How a device was configured: enough to build it again in another process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceConfig {
    /// A virtio-blk disk.
    Block(BlockConfig),
    /// A virtio-net interface on a tap.
    Net(NetConfig),
}

impl DeviceConfig {
    /// Opens the device's backend: a disk by path, a tap by name (or the fd a live update
    /// handed over). `restored`: the device continues a saved one.
    pub fn open(&self, restored: bool) -> Result<Box<dyn VirtioDevice>, String> {
        Ok(match self {
            DeviceConfig::Block(c) => Box::new(Block::open(c).map_err(|e| e.to_string())?),
            DeviceConfig::Net(c) => Box::new(Net::open(c, restored).map_err(|e| e.to_string())?),
        })
    }
}

/// Requests served and refused (for `GET /vm` and tests).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Requests completed with status OK (net: frames received and sent).
    pub ok: u64,
    /// Requests completed with an error status (IOERR or UNSUPP).
    pub errors: u64,
    /// Chains too malformed to carry a status, returned to the guest unanswered.
    pub skipped: u64,
    /// Bytes read from the backend into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the backend.
    pub written_bytes: u64,
    /// Flushes (fdatasync) done.
    pub flushes: u64,
    /// MAC announcements (RARP frames) sent after a restore.
    #[serde(default)]
    pub announces: u64,
}

/// One virtio device in the VM state: where it sits, how it was configured, and the
/// transport's registers and queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Guest-physical address of its register window.
    pub mmio_base: u64,
    /// Its GSI.
    pub gsi: u32,
    /// The device's configuration (a disk is reopened by path).
    pub config: DeviceConfig,
    /// Transport registers, features, queue addresses and indices.
    pub transport: TransportState,
    /// The device's configuration space as the guest saw it (a disk's capacity): a restore
    /// refuses a backend that would show the guest something else.
    #[serde(default)]
    pub config_space: Vec<u8>,
}

/// `GET /vm`'s view of a device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// Guest-physical address of the register window.
    pub mmio_base: u64,
    /// GSI.
    pub gsi: u32,
    /// Configuration.
    #[serde(flatten)]
    pub config: DeviceConfig,
    /// The driver set DRIVER_OK.
    pub active: bool,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// What the device did.
    pub counters: DeviceCounters,
}
