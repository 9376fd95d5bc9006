//! The native C ABI (version [`crate::ABI_VERSION`]), mirrored by `include/spanvmm_service.h`.
//!
//! A native service is a shared object exporting the `spanvmm_service_*` symbols named below.
//! The host first calls [`SYM_ABI_VERSION`] and refuses the object unless it returns
//! [`crate::ABI_VERSION`]. Bytes travel through [`Sink`]s: the receiver passes a sink and the
//! sender calls `put` (possibly several times, appending), so no allocation crosses the boundary.
//! Every function returns [`OK`], [`ERR`] (a message went to the sink) or [`FATAL`] (the service
//! is broken, e.g. it panicked; the host detaches it).

use std::ffi::c_void;

use crate::types::{Event, EventReply, Lifecycle, NetFrame, Translation, VmInfo};

/// Success.
pub const OK: i32 = 0;
/// Failure; a message was written to the error sink.
pub const ERR: i32 = 1;
/// The service is broken (panicked); the host must detach it.
pub const FATAL: i32 = 2;

/// `uint32_t spanvmm_service_abi_version(void)`.
pub const SYM_ABI_VERSION: &str = "spanvmm_service_abi_version";
/// `int32_t spanvmm_service_describe(const spanvmm_sink *manifest_json)`.
pub const SYM_DESCRIBE: &str = "spanvmm_service_describe";
/// `int32_t spanvmm_service_attach(const spanvmm_host *, const uint8_t *cfg, size_t, const spanvmm_sink *err)`.
pub const SYM_ATTACH: &str = "spanvmm_service_attach";
/// `int32_t spanvmm_service_on_event(const spanvmm_event *, spanvmm_event_reply *)`.
pub const SYM_ON_EVENT: &str = "spanvmm_service_on_event";
/// `int32_t spanvmm_service_detach(const spanvmm_sink *state)`.
pub const SYM_DETACH: &str = "spanvmm_service_detach";
/// `int32_t spanvmm_service_resume_from(const uint8_t *state, size_t, const spanvmm_sink *err)`.
pub const SYM_RESUME_FROM: &str = "spanvmm_service_resume_from";
/// `int32_t spanvmm_service_call(const uint8_t *m, size_t, const uint8_t *a, size_t, const spanvmm_sink *out)`.
pub const SYM_CALL: &str = "spanvmm_service_call";

/// A byte receiver: `put(ctx, data, len)` appends `len` bytes.
#[repr(C)]
pub struct Sink {
    /// Receiver's context.
    pub ctx: *mut c_void,
    /// Appends bytes.
    pub put: unsafe extern "C" fn(ctx: *mut c_void, data: *const u8, len: usize),
}

/// Event kinds of [`CEvent::kind`].
pub mod event_kind {
    /// Port write: `port`, `size`, `value`.
    pub const PORT_WRITE: u32 = 0;
    /// Port read: `port`, `size`.
    pub const PORT_READ: u32 = 1;
    /// Lifecycle: `value` is the lifecycle code.
    pub const LIFECYCLE: u32 = 2;
    /// Tick: `value` is the host time in ns.
    pub const TICK: u32 = 3;
    /// MMIO write: `addr`, `size`, `value`.
    pub const MMIO_WRITE: u32 = 4;
    /// MMIO read: `addr`, `size`.
    pub const MMIO_READ: u32 = 5;
    /// Net frames: `value` is the host time in ns, `frames`/`frames_len` the batch,
    /// `dropped` the frames not recorded.
    pub const NET_FRAMES: u32 = 6;
}

/// An event (`spanvmm_event`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CEvent {
    /// One of [`event_kind`].
    pub kind: u32,
    /// Port (port events).
    pub port: u16,
    /// Access width (port events).
    pub size: u8,
    /// Zero.
    pub reserved: u8,
    /// Written value, lifecycle code or time.
    pub value: u64,
    /// Guest-physical address (MMIO events; appended in a minor version, read only for them).
    pub addr: u64,
    /// The batch of a net-frames event (appended in a minor version, read only for it); valid
    /// during the call only.
    pub frames: *const NetFrame,
    /// Records at `frames`.
    pub frames_len: usize,
    /// Frames not recorded (net-frames events).
    pub dropped: u64,
}

impl Default for CEvent {
    fn default() -> Self {
        CEvent {
            kind: 0,
            port: 0,
            size: 0,
            reserved: 0,
            value: 0,
            addr: 0,
            frames: std::ptr::null(),
            frames_len: 0,
            dropped: 0,
        }
    }
}

/// An event reply (`spanvmm_event_reply`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CEventReply {
    /// 0: none, 1: `value` is the port read's result.
    pub has_value: u32,
    /// Zero.
    pub reserved: u32,
    /// Value.
    pub value: u64,
}

/// `spanvmm_vm_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CVmInfo {
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// TSC kHz.
    pub tsc_khz: u32,
}

/// `spanvmm_translation`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CTranslation {
    /// Guest-physical address.
    pub gpa: u64,
    /// Page size.
    pub page_size: u64,
    /// 1 when present.
    pub present: u8,
    /// 1 when writable.
    pub writable: u8,
    /// 1 when user-accessible.
    pub user: u8,
    /// 1 when executable.
    pub executable: u8,
    /// Zero.
    pub reserved: u32,
}

pub use crate::hostif::HostVtable;

/// `spanvmm_layer_options`: strings are UTF-8 pointer + length; a null pointer is "none".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CLayerOptions {
    /// Layer directory.
    pub dir: *const u8,
    /// Its length.
    pub dir_len: usize,
    /// Parent layer directory (incremental layer), or null (full layer).
    pub parent: *const u8,
    /// Its length.
    pub parent_len: usize,
    /// Key file, or null (not encrypted).
    pub key_file: *const u8,
    /// Its length.
    pub key_file_len: usize,
    /// Seconds until restore is refused, when `has_expiry` is 1.
    pub expires_in_s: u64,
    /// 1: `expires_in_s` applies.
    pub has_expiry: u32,
    /// Zero.
    pub reserved: u32,
}

/// `spanvmm_job_status`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CJobStatus {
    /// Batches and commits queued and not yet done.
    pub pending: u32,
    /// Write rounds done.
    pub rounds: u32,
    /// Bytes of pages written so far.
    pub bytes_written: u64,
    /// 1: every batch queued before the commit is written.
    pub copied: u8,
    /// 1: the layer is complete and valid.
    pub committed: u8,
    /// 1: the job failed (its message went to the `job_error` sink).
    pub failed: u8,
    /// Zero.
    pub reserved: [u8; 5],
}

/// `spanvmm_migration_status`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CMigrationStatus {
    /// One of [`migration_phase`].
    pub phase: u32,
    /// Zero.
    pub reserved: u32,
    /// Guest pages.
    pub pages_total: u64,
    /// Pages queued and not sent yet; in pre-copy also those sent and not yet confirmed by
    /// the destination.
    pub pages_pending: u64,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub bytes_sent: u64,
    /// Recent send rate, bytes/s (on a long link no more than the path delivers: 0 until
    /// measured).
    pub rate_bytes_per_sec: u64,
    /// Post-copy: pages the destination still lacks.
    pub pages_needed: u64,
    /// Faults the destination requested.
    pub remote_faults: u64,
    /// ms since the migration started.
    pub elapsed_ms: u64,
}

/// Codes of [`CMigrationStatus::phase`].
pub mod migration_phase {
    /// Pages go out while the guest runs here.
    pub const PRECOPY: u32 = 0;
    /// The guest runs at the destination.
    pub const POSTCOPY: u32 = 1;
    /// Post-copy lost its connection; reconnecting.
    pub const RECOVERING: u32 = 2;
    /// Done.
    pub const COMPLETED: u32 = 3;
    /// Given up.
    pub const FAILED: u32 = 4;
}

/// Codes of `migration_switch_over`'s `mode`.
pub mod switch_mode {
    /// Pause, send the remaining dirty pages and the state, run at the destination.
    pub const STOP_AND_COPY: u32 = 0;
    /// Pause, send the state, run at the destination at once; pages follow.
    pub const POSTCOPY: u32 = 1;
}

/// Whether a host table of `size` bytes holds the field that ends at `field_end` (fields
/// appended in later minor versions are absent from an older host's shorter table).
pub fn table_has(size: u32, field_end: usize) -> bool {
    size as usize >= field_end
}

/// `uint32_t spanvmm_service_abi_version(void)`.
pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
/// `spanvmm_service_describe`.
pub type DescribeFn = unsafe extern "C" fn(out: *const Sink) -> i32;
/// `spanvmm_service_attach`.
pub type AttachFn = unsafe extern "C" fn(
    host: *const HostVtable,
    config: *const u8,
    config_len: usize,
    err: *const Sink,
) -> i32;
/// `spanvmm_service_on_event`.
pub type OnEventFn = unsafe extern "C" fn(ev: *const CEvent, reply: *mut CEventReply) -> i32;
/// `spanvmm_service_detach`.
pub type DetachFn = unsafe extern "C" fn(state: *const Sink) -> i32;
/// `spanvmm_service_resume_from`.
pub type ResumeFromFn =
    unsafe extern "C" fn(state: *const u8, state_len: usize, err: *const Sink) -> i32;
/// `spanvmm_service_call`.
pub type CallFn = unsafe extern "C" fn(
    method: *const u8,
    method_len: usize,
    args: *const u8,
    args_len: usize,
    out: *const Sink,
) -> i32;

impl CEvent {
    /// The C form of `ev`; a net-frames event's `frames` points into `ev`, which must outlive
    /// every use of the result.
    pub fn borrow(ev: &Event) -> Self {
        let (kind, port, size, value, addr) = match *ev {
            Event::PortWrite { port, size, value } => {
                (event_kind::PORT_WRITE, port, size, value, 0)
            }
            Event::PortRead { port, size } => (event_kind::PORT_READ, port, size, 0, 0),
            Event::Lifecycle(l) => (event_kind::LIFECYCLE, 0, 0, l.code(), 0),
            Event::Tick { now_ns } => (event_kind::TICK, 0, 0, now_ns, 0),
            Event::MmioWrite { addr, size, value } => {
                (event_kind::MMIO_WRITE, 0, size, value, addr)
            }
            Event::MmioRead { addr, size } => (event_kind::MMIO_READ, 0, size, 0, addr),
            Event::NetFrames {
                now_ns,
                ref frames,
                dropped,
            } => {
                return CEvent {
                    kind: event_kind::NET_FRAMES,
                    value: now_ns,
                    frames: frames.as_ptr(),
                    frames_len: frames.len(),
                    dropped,
                    ..Default::default()
                }
            }
        };
        CEvent {
            kind,
            port,
            size,
            value,
            addr,
            ..Default::default()
        }
    }

    /// The Rust event, or `None` for an unknown kind or lifecycle code.
    ///
    /// # Safety
    /// For a net-frames event, `frames` must be null or point at `frames_len` readable records.
    pub unsafe fn to_event(&self) -> Option<Event> {
        Some(match self.kind {
            event_kind::PORT_WRITE => Event::PortWrite {
                port: self.port,
                size: self.size,
                value: self.value,
            },
            event_kind::PORT_READ => Event::PortRead {
                port: self.port,
                size: self.size,
            },
            event_kind::LIFECYCLE => Event::Lifecycle(Lifecycle::from_code(self.value)?),
            event_kind::TICK => Event::Tick { now_ns: self.value },
            event_kind::MMIO_WRITE => Event::MmioWrite {
                addr: self.addr,
                size: self.size,
                value: self.value,
            },
            event_kind::MMIO_READ => Event::MmioRead {
                addr: self.addr,
                size: self.size,
            },
            event_kind::NET_FRAMES => Event::NetFrames {
                now_ns: self.value,
                frames: if self.frames.is_null() || self.frames_len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: guaranteed by the caller.
                    unsafe { std::slice::from_raw_parts(self.frames, self.frames_len) }.to_vec()
                },
                dropped: self.dropped,
            },
            _ => return None,
        })
    }
}

impl From<EventReply> for CEventReply {
    fn from(r: EventReply) -> Self {
        match r {
            EventReply::None => CEventReply::default(),
            EventReply::Value(value) => CEventReply {
                has_value: 1,
                reserved: 0,
                value,
            },
        }
    }
}

impl From<CEventReply> for EventReply {
    fn from(r: CEventReply) -> Self {
        if r.has_value != 0 {
            EventReply::Value(r.value)
        } else {
            EventReply::None
        }
    }
}

impl From<CVmInfo> for VmInfo {
    fn from(i: CVmInfo) -> Self {
        VmInfo {
            mem_bytes: i.mem_bytes,
            vcpus: i.vcpus,
            tsc_khz: i.tsc_khz,
        }
    }
}

impl From<VmInfo> for CVmInfo {
    fn from(i: VmInfo) -> Self {
        CVmInfo {
            mem_bytes: i.mem_bytes,
            vcpus: i.vcpus,
            tsc_khz: i.tsc_khz,
        }
    }
}

impl From<Translation> for CTranslation {
    fn from(t: Translation) -> Self {
        CTranslation {
            gpa: t.gpa,
            page_size: t.page_size,
            present: t.present as u8,
            writable: t.writable as u8,
            user: t.user as u8,
            executable: t.executable as u8,
            reserved: 0,
        }
    }
}

impl From<CTranslation> for Translation {
    fn from(t: CTranslation) -> Self {
        Translation {
            present: t.present != 0,
            gpa: t.gpa,
            page_size: t.page_size,
            writable: t.writable != 0,
            user: t.user != 0,
            executable: t.executable != 0,
        }
    }
}

/// A [`Sink`] that appends to a `Vec<u8>`. Keep the `VecSink` alive while the sink is in use.
pub struct VecSink {
    // Boxed so that the pointer a `Sink` holds survives moves of the `VecSink`.
    #[allow(clippy::box_collection)]
    buf: Box<Vec<u8>>,
}

impl Default for VecSink {
    fn default() -> Self {
        VecSink {
            buf: Box::new(Vec::new()),
        }
    }
}

unsafe extern "C" fn vec_put(ctx: *mut c_void, data: *const u8, len: usize) {
    if ctx.is_null() || (data.is_null() && len > 0) {
        return;
    }
    // SAFETY: `ctx` is the `Vec<u8>` boxed in a live `VecSink` (see `VecSink::sink`), and the
    // caller promises `data` points at `len` readable bytes.
    unsafe {
        let v = &mut *(ctx as *mut Vec<u8>);
        if len > 0 {
            v.extend_from_slice(std::slice::from_raw_parts(data, len));
        }
    }
}

impl VecSink {
    /// A sink writing into this buffer; valid while `self` is alive and not moved out of.
    pub fn sink(&mut self) -> Sink {
        Sink {
            ctx: &mut *self.buf as *mut Vec<u8> as *mut c_void,
            put: vec_put,
        }
    }

    /// The bytes received.
    pub fn into_bytes(self) -> Vec<u8> {
        *self.buf
    }

    /// The bytes received, as (lossy) UTF-8.
    pub fn into_string(self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// Sends `data` to `sink` (ignores a null sink).
///
/// # Safety
/// `sink` must be null or point to a valid [`Sink`] whose `put` accepts the call.
pub unsafe fn sink_put(sink: *const Sink, data: &[u8]) {
    if sink.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `sink` is valid; `data` is a live slice.
    unsafe { ((*sink).put)((*sink).ctx, data.as_ptr(), data.len()) }
}

/// Bytes of a list of u64 words (native endian), as hash/zero/dirty/search results travel.
pub fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Inverse of [`words_to_bytes`] (a trailing partial word is dropped).
pub fn bytes_to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Borrowed bytes from a C pointer and length (empty for a null pointer).
///
/// # Safety
/// `ptr` must be null or point to `len` readable bytes that stay valid for `'a`.
pub unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VcpuRegs;

    /// Sizes as a C compiler lays out `include/spanvmm_service.h` on x86-64.
    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(std::mem::size_of::<HostVtable>(), 312);
        assert_eq!(std::mem::size_of::<CLayerOptions>(), 64);
        assert_eq!(std::mem::size_of::<CJobStatus>(), 24);
        assert_eq!(std::mem::size_of::<CMigrationStatus>(), 72);
        assert_eq!(std::mem::size_of::<CEvent>(), 48);
        assert_eq!(std::mem::size_of::<NetFrame>(), 48);
        assert_eq!(std::mem::size_of::<CEventReply>(), 16);
        assert_eq!(std::mem::size_of::<CVmInfo>(), 16);
        assert_eq!(std::mem::size_of::<VcpuRegs>(), 192);
        assert_eq!(std::mem::size_of::<CTranslation>(), 24);
        assert_eq!(std::mem::size_of::<Sink>(), 16);
    }

    #[test]
    fn events_round_trip() {
        for ev in [
            Event::PortWrite {
                port: 0x700,
                size: 2,
                value: 0xbeef,
            },
            Event::PortRead { port: 1, size: 4 },
            Event::MmioWrite {
                addr: 63 << 30,
                size: 8,
                value: u64::MAX,
            },
            Event::MmioRead {
                addr: 0xfee0_0000,
                size: 2,
            },
            Event::Lifecycle(Lifecycle::Restored),
            Event::Tick { now_ns: 42 },
            Event::NetFrames {
                now_ns: 7,
                frames: vec![
                    NetFrame {
                        len: 60,
                        dst_port: 6379,
                        ..Default::default()
                    };
                    3
                ],
                dropped: 2,
            },
            Event::NetFrames {
                now_ns: 8,
                frames: Vec::new(),
                dropped: 0,
            },
        ] {
            // SAFETY: the C event borrows `ev`, alive here.
            assert_eq!(unsafe { CEvent::borrow(&ev).to_event() }, Some(ev));
        }
        let bad = CEvent {
            kind: 9,
            ..Default::default()
        };
        // SAFETY: not a net-frames event.
        assert_eq!(unsafe { bad.to_event() }, None);
        let mut s = VecSink::default();
        let sink = s.sink();
        // SAFETY: `sink` points into `s`, alive here.
        unsafe {
            sink_put(&sink, b"ab");
            sink_put(&sink, b"c");
        }
        assert_eq!(s.into_bytes(), b"abc");
        assert_eq!(
            bytes_to_words(&words_to_bytes(&[1, u64::MAX])),
            [1, u64::MAX]
        );
    }
}
