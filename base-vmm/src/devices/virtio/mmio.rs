//! The virtio-mmio transport, register layout version 2 (virtio 1.x §4.2.2), modern only: a
//! driver that does not accept VIRTIO_F_VERSION_1 never gets FEATURES_OK.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceInfo, VirtioDevice, VirtioDeviceState, VIRTIO_F_VERSION_1};
use crate::devices::{le_value, MmioDevice};
use crate::memory::GuestRam;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (modern).
const VERSION: u32 = 2;
/// Vendor ID the device reports ("SPAN" would not fit the spirit; QEMU reports 0x554d4551).
const VENDOR: u32 = 0x4e41_5053;

/// The transport's registers and queues, as saved in the VM state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueRegs>,
}

/// One queue's registers and ring positions.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueRegs {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table GPA.
    pub desc_table: u64,
    /// Driver (available) ring GPA.
    pub avail_ring: u64,
    /// Device (used) ring GPA.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

impl From<QueueState> for QueueRegs {
    fn from(s: QueueState) -> Self {
        QueueRegs {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

/// A virtio device on its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestRam>,
    base: u64,
    gsi: u32,
    queues: Vec<Queue>,
    regs: TransportState,
    /// Signalled when the used ring moved (an irqfd, when the VM has an irqchip).
    irq: Option<EventFd>,
    /// The ioeventfd KVM signals on QueueNotify (re-signalled on resume when a notification
    /// came in while paused).
    notify: Option<EventFd>,
    /// While the VM is paused the device does not touch guest memory or the backend, so that
    /// a saved state and memory image agree; notifications received meanwhile are served on
    /// resume.
    paused: bool,
    pending: bool,
}

/// A saved transport that does not fit the device it is restored onto.
#[derive(Debug, thiserror::Error)]
#[error("virtio device at {base:#x}: {why}")]
pub struct RestoreError {
    /// Register window.
    pub base: u64,
    /// What does not fit.
    pub why: String,
}

impl MmioTransport {
    /// A fresh transport (device reset) for `device` at `base`, interrupting through `gsi`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestRam>, base: u64, gsi: u32) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // A max size that is not a power of two up to 32768 is a bug of the device model.
            .map(|&m| Queue::new(m).expect("device queue sizes are valid"))
            .collect();
        MmioTransport {
            device,
            mem,
            base,
            gsi,
            queues,
            regs: TransportState::default(),
            irq: None,
            notify: None,
            paused: false,
            pending: false,
        }
    }

    /// A transport whose registers and queues come from a saved state.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestRam>,
        s: &VirtioDeviceState,
    ) -> Result<Self, RestoreError> {
        let mut t = Self::new(device, mem, s.mmio_base, s.gsi);
        let err = |why: String| RestoreError {
            base: s.mmio_base,
            why,
        };
        if s.transport.queues.len() != t.queues.len() {
            return Err(err(format!(
                "{} queues saved, the device has {}",
                s.transport.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (q, r)) in t.queues.iter_mut().zip(&s.transport.queues).enumerate() {
            if r.max_size != q.max_size() {
                return Err(err(format!(
                    "queue {i} had {} entries at most, the device offers {}",
                    r.max_size,
                    q.max_size()
                )));
            }
            let state = QueueState {
                max_size: r.max_size,
                next_avail: r.next_avail,
                next_used: r.next_used,
                event_idx_enabled: false,
                size: r.size,
                ready: r.ready,
                desc_table: r.desc_table,
                avail_ring: r.avail_ring,
                used_ring: r.used_ring,
            };
            *q = Queue::try_from(state).map_err(|e| err(format!("queue {i}: {e}")))?;
        }
        let mut space = vec![0u8; t.device.config_len()];
        t.device.read_config(0, &mut space);
        if !s.config_space.is_empty() && s.config_space != space {
            return Err(err(format!(
                "the backend shows the guest another configuration than it saw (a disk of \
                 another size?): {:02x?} now, {:02x?} saved",
                space, s.config_space
            )));
        }
        t.regs = s.transport.clone();
        t.regs.queues.clear();
        Ok(t)
    }

    /// The state to save (the VM is paused: nothing is in flight).
    pub fn state(&self) -> VirtioDeviceState {
        let mut transport = self.regs.clone();
        transport.queues = self.queues.iter().map(|q| q.state().into()).collect();
        let mut config_space = vec![0u8; self.device.config_len()];
        self.device.read_config(0, &mut config_space);
        VirtioDeviceState {
            config_space,
            mmio_base: self.base,
            gsi: self.gsi,
            config: self.device.config(),
            transport,
        }
    }

    /// What `GET /vm` shows.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            mmio_base: self.base,
            gsi: self.gsi,
            config: self.device.config(),
            active: self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK != 0,
            driver_features: self.regs.driver_features,
            counters: self.device.counters(),
        }
    }

    /// The backend fd the event loop watches, if the device has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// The disk's write tracking, if the device is a disk.
    pub fn disk_track(&self) -> Option<std::sync::Arc<super::disk_track::DiskTrack>> {
        self.device.disk_track()
    }

    /// The fd a live update hands over, with its name.
    pub fn handover_fd(&self) -> Option<(String, std::os::fd::RawFd)> {
        self.device.handover_fd()
    }

    /// Guest-physical address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The GSI the device interrupts through.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Sets the eventfd to signal when the used ring moves.
    pub fn set_irq(&mut self, irq: EventFd) {
        self.irq = Some(irq);
    }

    /// Sets the ioeventfd KVM signals on QueueNotify.
    pub fn set_notify(&mut self, notify: EventFd) {
        self.notify = Some(notify);
    }

    /// Stops or restarts the device with the VM. A restart serves what the driver notified
    /// while the VM was paused.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            self.device.resumed();
        }
        if !paused && std::mem::take(&mut self.pending) {
            self.kick();
        }
    }

    /// Makes the next resume (or [`Self::set_paused`]`(false)`) look at the queues.
    pub fn mark_pending(&mut self) {
        self.pending = true;
    }

    /// Has the device look at its queues again: through the event loop when there is one,
    /// here otherwise. Used after a restore, where a notification may have been consumed by
    /// the process that saved the VM.
    pub fn kick(&mut self) {
        match &self.notify {
            Some(fd) => {
                // An eventfd write fails only on counter overflow: a wake-up is pending anyway.
                let _ = fd.write(1);
            }
            None => self.process(),
        }
    }

    /// Serves every ready queue (the driver notified). Nothing happens before DRIVER_OK, and
    /// a queue whose rings lie outside guest memory is left alone.
    pub fn process(&mut self) {
        if self.paused {
            self.pending = true;
            return;
        }
        if self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return;
        }
        let mem = self.mem.guest_memory();
        let mut used = false;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && q.is_valid(mem) {
                used |= self.device.process_queue(i, q, mem);
            }
        }
        if used {
            // Level semantics over an edge irqfd: a new edge only when the driver acknowledged
            // the last one. A polling guest that never acknowledges (spanguest on PVM) then
            // costs one injection in all, not one per request.
            let raise = self.regs.interrupt_status & VIRTIO_MMIO_INT_VRING == 0;
            self.regs.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            if let (true, Some(irq)) = (raise, &self.irq) {
                // See kick(): overflow means an interrupt is pending already.
                let _ = irq.write(1);
            }
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        let generation = self.regs.config_generation;
        self.regs = TransportState {
            config_generation: generation,
            ..TransportState::default()
        };
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let features = self.device.features() | 1 << VIRTIO_F_VERSION_1;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.regs.interrupt_status,
            VIRTIO_MMIO_STATUS => self.regs.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.regs.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        let status = self.regs.status;
        let negotiating =
            status & VIRTIO_CONFIG_S_DRIVER != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        // Queue registers may change only before the driver is done setting up.
        let configuring = status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.regs.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if negotiating => match self.regs.driver_features_sel {
                0 => {
                    self.regs.driver_features = self.regs.driver_features & !0xffff_ffff | v as u64
                }
                1 => {
                    self.regs.driver_features =
                        self.regs.driver_features & 0xffff_ffff | (v as u64) << 32
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.regs.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                if let Some(q) = self.selected_queue() {
                    // Refused sizes (not a power of two, above the max) leave it unchanged.
                    let _ = q.try_set_size(v.min(u16::MAX as u32) as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if configuring =>
            {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                if q.ready() {
                    return;
                }
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.process(),
            VIRTIO_MMIO_INTERRUPT_ACK => self.regs.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.regs.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features() | 1 << VIRTIO_F_VERSION_1;
            let wanted = self.regs.driver_features;
            // Modern only, and nothing the device did not offer.
            if wanted & !offered != 0 || wanted & 1 << VIRTIO_F_VERSION_1 == 0 {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.regs.status = v;
    }
}

impl MmioDevice for MmioTransport {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            data.fill(0);
            self.device
                .read_config(offset - VIRTIO_MMIO_CONFIG as u64, data);
            return;
        }
        // Registers are 32 bits wide and aligned; anything else reads as 0.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        // The configuration space of the devices here is read-only; odd-sized register
        // writes are ignored.
        if offset >= VIRTIO_MMIO_CONFIG as u64 || data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset as u32, le_value(data) as u32);
    }
}
