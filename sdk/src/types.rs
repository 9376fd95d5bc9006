//! Plain Rust types of the service interface, shared by plugins (both targets) and the host.
//! They mirror `wit/service.wit` one to one.

use serde::{Deserialize, Serialize};

/// Event classes a service can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Guest `out` to a claimed port.
    PortWrite,
    /// Guest `in` from a claimed port.
    PortRead,
    /// VM lifecycle changes.
    Lifecycle,
    /// Periodic ticks.
    Tick,
    /// Guest store into a claimed MMIO range.
    MmioWrite,
    /// Guest load from a claimed MMIO range.
    MmioRead,
    /// Header summaries of the frames the VM's virtio-net devices move, in batches.
    NetFrames,
}

/// What a service may do to the VM; host calls outside the granted set fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Read guest memory, walk page tables, hash, zero-scan and search memory.
    MemoryRead,
    /// Write guest memory.
    MemoryWrite,
    /// Read vCPU registers.
    VcpuState,
    /// Pause and resume the VM.
    PauseResume,
    /// Read the dirty-page bitmap.
    DirtyLog,
    /// Move the VM to another host (exclusive: one holder per VM).
    DrivesMigration,
    /// Write snapshot layers through the snapshot engine.
    Snapshot,
    /// Park guest pages at intermediaries and evict them (agile interface).
    EvictMemory,
}

impl Capability {
    /// Every capability, in declaration order.
    pub const ALL: [Capability; 8] = [
        Capability::MemoryRead,
        Capability::MemoryWrite,
        Capability::VcpuState,
        Capability::PauseResume,
        Capability::DirtyLog,
        Capability::DrivesMigration,
        Capability::Snapshot,
        Capability::EvictMemory,
    ];

    /// True when at most one service per VM may hold the capability.
    pub fn is_exclusive(self) -> bool {
        matches!(self, Capability::DrivesMigration)
    }

    /// The WIT name (`memory-read`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Capability::MemoryRead => "memory-read",
            Capability::MemoryWrite => "memory-write",
            Capability::VcpuState => "vcpu-state",
            Capability::PauseResume => "pause-resume",
            Capability::DirtyLog => "dirty-log",
            Capability::DrivesMigration => "drives-migration",
            Capability::Snapshot => "snapshot",
            Capability::EvictMemory => "evict-memory",
        }
    }

    /// Bit of this capability in a capability mask.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Ports `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
}

impl PortRange {
    /// The range `[base, base + len)`.
    pub fn new(base: u16, len: u16) -> Self {
        PortRange { base, len }
    }

    /// One past the last port (may be 0x10000).
    pub fn end(&self) -> u32 {
        self.base as u32 + self.len as u32
    }

    /// True when `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        port >= self.base && (port as u32) < self.end()
    }

    /// True when the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        (self.base as u32) < other.end() && (other.base as u32) < self.end()
    }

    /// True when the range is non-empty and ends within the 64 Ki port space.
    pub fn is_valid(&self) -> bool {
        self.len > 0 && self.end() <= 0x10000
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// Guest-physical MMIO addresses `[base, base + len)` (outside guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MmioRange {
    /// First address.
    pub base: u64,
    /// Number of bytes.
    pub len: u64,
}

impl MmioRange {
    /// The range `[base, base + len)`.
    pub fn new(base: u64, len: u64) -> Self {
        MmioRange { base, len }
    }

    /// One past the last address (`None` when it would wrap).
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.len)
    }

    /// True when `addr` is inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    /// True when the two ranges share an address.
    pub fn overlaps(&self, other: &MmioRange) -> bool {
        self.base < other.base.saturating_add(other.len)
            && other.base < self.base.saturating_add(self.len)
    }

    /// True when the range is non-empty and does not wrap.
    pub fn is_valid(&self) -> bool {
        self.len > 0 && self.end().is_some()
    }
}

impl std::fmt::Display for MmioRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mmio {:#x}+{:#x}", self.base, self.len)
    }
}

/// What a service is and what it wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Unique service name on a VM (letters, digits, `-`, `_`; at most 64 characters).
    pub name: String,
    /// Service version.
    pub version: String,
    /// Interface version; [`crate::ABI_VERSION`] unless the plugin is lying.
    pub abi_version: u32,
    /// Event classes wanted.
    pub events: Vec<EventKind>,
    /// Port ranges owned from attach on.
    pub ports: Vec<PortRange>,
    /// MMIO ranges owned from attach on (absent in a manifest means none).
    #[serde(default)]
    pub mmio: Vec<MmioRange>,
    /// Capabilities needed.
    pub capabilities: Vec<Capability>,
    /// Tick period in milliseconds (0: none).
    pub tick_period_ms: u32,
}

impl Manifest {
    /// A manifest with this crate's ABI version and nothing subscribed or claimed.
    pub fn new(name: &str, version: &str) -> Self {
        Manifest {
            name: name.into(),
            version: version.into(),
            abi_version: crate::ABI_VERSION,
            events: Vec::new(),
            ports: Vec::new(),
            mmio: Vec::new(),
            capabilities: Vec::new(),
            tick_period_ms: 0,
        }
    }

    /// Adds subscribed event classes.
    pub fn events(mut self, events: &[EventKind]) -> Self {
        self.events.extend_from_slice(events);
        self
    }

    /// Adds a claimed port range.
    pub fn port_range(mut self, base: u16, len: u16) -> Self {
        self.ports.push(PortRange { base, len });
        self
    }

    /// Adds a claimed MMIO range.
    pub fn mmio_range(mut self, base: u64, len: u64) -> Self {
        self.mmio.push(MmioRange { base, len });
        self
    }

    /// Adds requested capabilities.
    pub fn capabilities(mut self, caps: &[Capability]) -> Self {
        self.capabilities.extend_from_slice(caps);
        self
    }

    /// Sets the tick period (and subscribes to ticks).
    pub fn tick_every_ms(mut self, ms: u32) -> Self {
        self.tick_period_ms = ms;
        if !self.events.contains(&EventKind::Tick) {
            self.events.push(EventKind::Tick);
        }
        self
    }
}

/// VM lifecycle changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// All vCPUs stopped.
    Paused,
    /// vCPUs running again.
    Resumed,
    /// The VM arrived by migration.
    Migrated,
    /// The VM was restored from a snapshot.
    Restored,
    /// The VM is shutting down.
    Shutdown,
}

impl Lifecycle {
    /// Code used by the C ABI.
    pub fn code(self) -> u64 {
        self as u64
    }

    /// Inverse of [`Lifecycle::code`].
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Lifecycle::Paused,
            1 => Lifecycle::Resumed,
            2 => Lifecycle::Migrated,
            3 => Lifecycle::Restored,
            4 => Lifecycle::Shutdown,
            _ => return None,
        })
    }
}

/// One frame a virtio-net device moved, summarized (`spanvmm_net_frame`; the WIT's
/// `net-frame`). Addresses are IPv6, or IPv4-mapped IPv6 (`::ffff:a.b.c.d`); all zero when the
/// frame is not IP. Ports and flags are zero when the frame is not TCP or UDP.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct NetFrame {
    /// Source IP address.
    pub src: [u8; 16],
    /// Destination IP address.
    pub dst: [u8; 16],
    /// Bytes of the Ethernet frame.
    pub len: u32,
    /// Ethertype (inside one VLAN tag, if any).
    pub ethertype: u16,
    /// TCP/UDP source port.
    pub src_port: u16,
    /// TCP/UDP destination port.
    pub dst_port: u16,
    /// IP protocol number (6 TCP, 17 UDP), 0 when not IP.
    pub protocol: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub tcp_flags: u8,
    /// [`NetFrame::RX`] (tap to guest) or [`NetFrame::TX`] (guest to tap).
    pub direction: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

impl NetFrame {
    /// The frame went from the network to the guest.
    pub const RX: u8 = 0;
    /// The guest sent the frame.
    pub const TX: u8 = 1;

    /// The source address as an `IpAddr` (IPv4 for a mapped address); None when not IP.
    pub fn src_ip(&self) -> Option<std::net::IpAddr> {
        ip(&self.src, self.ethertype)
    }

    /// The destination address (see [`NetFrame::src_ip`]).
    pub fn dst_ip(&self) -> Option<std::net::IpAddr> {
        ip(&self.dst, self.ethertype)
    }
}

/// A 16-byte address as the WIT carries it: big-endian (high, low) halves.
pub fn addr_to_halves(a: &[u8; 16]) -> (u64, u64) {
    let v = u128::from_be_bytes(*a);
    ((v >> 64) as u64, v as u64)
}

/// Inverse of [`addr_to_halves`].
pub fn addr_from_halves((hi, lo): (u64, u64)) -> [u8; 16] {
    (((hi as u128) << 64) | lo as u128).to_be_bytes()
}

fn ip(a: &[u8; 16], ethertype: u16) -> Option<std::net::IpAddr> {
    let v6 = std::net::Ipv6Addr::from(*a);
    match ethertype {
        0x0800 => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
        0x86dd => Some(std::net::IpAddr::V6(v6)),
        _ => None,
    }
}

/// An event delivered to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// Guest wrote `value` (`size` bytes, little-endian) to `port`.
    PortWrite {
        /// Port.
        port: u16,
        /// Access width in bytes.
        size: u8,
        /// Value written.
        value: u64,
    },
    /// Guest reads `size` bytes from `port`.
    PortRead {
        /// Port.
        port: u16,
        /// Access width in bytes.
        size: u8,
    },
    /// Lifecycle change.
    Lifecycle(Lifecycle),
    /// Periodic tick at host monotonic time `now_ns`.
    Tick {
        /// Host monotonic time, ns.
        now_ns: u64,
    },
    /// Guest stored `value` (`size` bytes, little-endian) at guest-physical `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Access width in bytes (1, 2, 4 or 8).
        size: u8,
        /// Value written.
        value: u64,
    },
    /// Guest loads `size` bytes from guest-physical `addr`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access width in bytes (1, 2, 4 or 8).
        size: u8,
    },
    /// Frames the virtio-net devices moved since the previous batch, delivered from the
    /// VMM's service thread (never on the device's path).
    NetFrames {
        /// Host monotonic time of the batch, ns (as `Tick`'s).
        now_ns: u64,
        /// The frames, oldest first.
        frames: Vec<NetFrame>,
        /// Frames not recorded since the previous batch (the buffer was full).
        dropped: u64,
    },
}

impl Event {
    /// The event's class.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::PortWrite { .. } => EventKind::PortWrite,
            Event::PortRead { .. } => EventKind::PortRead,
            Event::Lifecycle(_) => EventKind::Lifecycle,
            Event::Tick { .. } => EventKind::Tick,
            Event::MmioWrite { .. } => EventKind::MmioWrite,
            Event::MmioRead { .. } => EventKind::MmioRead,
            Event::NetFrames { .. } => EventKind::NetFrames,
        }
    }

    /// True for guest writes (port or MMIO): the events that may be queued for later delivery.
    pub fn is_write(&self) -> bool {
        matches!(self, Event::PortWrite { .. } | Event::MmioWrite { .. })
    }
}

/// A service's answer to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EventReply {
    /// Nothing to say; a port read returns all-ones.
    #[default]
    None,
    /// The value a port read returns.
    Value(u64),
}

/// The VM's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmInfo {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest TSC frequency, kHz.
    pub tsc_khz: u32,
}

/// A vCPU's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[repr(C)]
#[allow(missing_docs)]
pub struct VcpuRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Current privilege level (0-3).
    pub cpl: u8,
}

/// Builds a struct with [`VcpuRegs`]' fields (`VcpuRegs` itself, or the WIT bindings'
/// `vcpu-registers` on either side of the component boundary): the 18 general registers from
/// `gprs`, cr0/cr2/cr3/cr4/efer from `cr` (any values with fields of those names, such as KVM's
/// `kvm_regs` and `kvm_sregs`), and `cpl`. The one field-by-field register copy of the tree.
#[macro_export]
macro_rules! copy_vcpu_regs {
    ($($ty:ident)::+ { gprs: $g:expr, cr: $c:expr, cpl: $cpl:expr $(,)? }) => {{
        let (g, c) = (&$g, &$c);
        $($ty)::+ {
            rax: g.rax, rbx: g.rbx, rcx: g.rcx, rdx: g.rdx,
            rsi: g.rsi, rdi: g.rdi, rsp: g.rsp, rbp: g.rbp,
            r8: g.r8, r9: g.r9, r10: g.r10, r11: g.r11,
            r12: g.r12, r13: g.r13, r14: g.r14, r15: g.r15,
            rip: g.rip, rflags: g.rflags,
            cr0: c.cr0, cr2: c.cr2, cr3: c.cr3, cr4: c.cr4, efer: c.efer,
            cpl: $cpl,
        }
    }};
}

/// Result of a guest page-table walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Translation {
    /// Every level was present.
    pub present: bool,
    /// Guest-physical address (when present).
    pub gpa: u64,
    /// 4096, 2 MiB or 1 GiB (when present).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// No NX bit at any level.
    pub executable: bool,
}

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Error.
    Error,
    /// Warning.
    Warn,
    /// Information.
    Info,
    /// Debugging detail.
    Debug,
    /// Tracing detail.
    Trace,
}

impl LogLevel {
    /// Code used by the C ABI.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Inverse of [`LogLevel::code`] (unknown codes become `Info`).
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => LogLevel::Error,
            1 => LogLevel::Warn,
            3 => LogLevel::Debug,
            4 => LogLevel::Trace,
            _ => LogLevel::Info,
        }
    }
}
