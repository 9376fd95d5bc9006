//! Native (C ABI) glue: the adapters the `export_service!` macro expands to on non-Wasm targets,
//! and host calls through the vtable the host passes at attach.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::abi::{self, CEvent, CEventReply, HostVtable, Sink, VecSink};
use crate::{Service, Slot};

/// The host's vtable, set by `attach`, cleared by `detach`.
static HOST: AtomicPtr<HostVtable> = AtomicPtr::new(std::ptr::null_mut());

fn guard<F: FnOnce() -> i32>(err: *const Sink, what: &str, f: F) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(code) => code,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let msg = format!("service panicked in {what}: {msg}");
            // The same line in the VMM's log as a Wasm service's panic (the error carries it too).
            imports::log(crate::LogLevel::Error, &msg);
            // SAFETY: `err` is the sink the host passed with this call (or null).
            unsafe { abi::sink_put(err, msg.as_bytes()) };
            abi::FATAL
        }
    }
}

fn result_code(r: Result<Vec<u8>, String>, out: *const Sink) -> i32 {
    let (code, bytes) = match r {
        Ok(b) => (abi::OK, b),
        Err(e) => (abi::ERR, e.into_bytes()),
    };
    // SAFETY: `out` is the sink the host passed with this call (or null).
    unsafe { abi::sink_put(out, &bytes) };
    code
}

/// `spanvmm_service_describe`.
///
/// # Safety
/// `out` must be null or a valid sink.
pub unsafe fn describe<S: Service>(out: *const Sink) -> i32 {
    guard(out, "describe", || {
        let json = serde_json::to_vec(&S::manifest()).map_err(|e| e.to_string());
        result_code(json, out)
    })
}

/// `spanvmm_service_attach`.
///
/// # Safety
/// `host` must point to a vtable valid until `detach` returns; `config` to `len` bytes; `err`
/// must be null or a valid sink.
pub unsafe fn attach<S: Service>(
    slot: &Slot<S>,
    host: *const HostVtable,
    config: *const u8,
    len: usize,
    err: *const Sink,
) -> i32 {
    guard(err, "attach", || {
        HOST.store(host as *mut HostVtable, Ordering::Release);
        // SAFETY: the caller guarantees `config` points at `len` bytes for this call.
        let cfg = String::from_utf8_lossy(unsafe { abi::bytes(config, len) }).into_owned();
        let r = slot.attach(&cfg);
        if r.is_err() {
            HOST.store(std::ptr::null_mut(), Ordering::Release);
        }
        result_code(r.map(|_| Vec::new()), err)
    })
}

/// `spanvmm_service_on_event`.
///
/// # Safety
/// `ev` and `reply` must be valid pointers.
pub unsafe fn on_event<S: Service>(
    slot: &Slot<S>,
    ev: *const CEvent,
    reply: *mut CEventReply,
) -> i32 {
    guard(std::ptr::null(), "on-event", || {
        if ev.is_null() || reply.is_null() {
            return abi::ERR;
        }
        // SAFETY: the caller guarantees `ev` is valid, and so are a net-frames event's records.
        let Some(event) = (unsafe { (*ev).to_event() }) else {
            return abi::ERR;
        };
        let r = slot.on_event(event);
        // SAFETY: the caller guarantees `reply` is valid for writes.
        unsafe { *reply = r.into() };
        abi::OK
    })
}

/// `spanvmm_service_detach`.
///
/// # Safety
/// `out` must be null or a valid sink.
pub unsafe fn detach<S: Service>(slot: &Slot<S>, out: *const Sink) -> i32 {
    let code = guard(out, "detach", || result_code(Ok(slot.detach()), out));
    HOST.store(std::ptr::null_mut(), Ordering::Release);
    code
}

/// `spanvmm_service_resume_from`.
///
/// # Safety
/// `state` must point at `len` bytes; `err` must be null or a valid sink.
pub unsafe fn resume_from<S: Service>(
    slot: &Slot<S>,
    state: *const u8,
    len: usize,
    err: *const Sink,
) -> i32 {
    guard(err, "resume-from", || {
        // SAFETY: guaranteed by the caller.
        let st = unsafe { abi::bytes(state, len) };
        result_code(slot.resume_from(st).map(|_| Vec::new()), err)
    })
}

/// `spanvmm_service_call`.
///
/// # Safety
/// `method`/`args` must point at their lengths of bytes; `out` must be null or a valid sink.
pub unsafe fn call<S: Service>(
    slot: &Slot<S>,
    method: *const u8,
    method_len: usize,
    args: *const u8,
    args_len: usize,
    out: *const Sink,
) -> i32 {
    guard(out, "call", || {
        // SAFETY: guaranteed by the caller.
        let (m, a) = unsafe { (abi::bytes(method, method_len), abi::bytes(args, args_len)) };
        let r = slot.call(&String::from_utf8_lossy(m), &String::from_utf8_lossy(a));
        result_code(r.map(String::into_bytes), out)
    })
}

/// Expands to the C ABI exports for `$ty` (used by `export_service!`).
#[doc(hidden)]
#[macro_export]
macro_rules! __spanvmm_export_impl {
    ($ty:ty) => {
        static __SPANVMM_SLOT: $crate::Slot<$ty> = $crate::Slot::new();

        /// Handshake: the C ABI version this plugin speaks.
        #[unsafe(no_mangle)]
        pub extern "C" fn spanvmm_service_abi_version() -> u32 {
            $crate::ABI_VERSION
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with a valid sink.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_describe(out: *const $crate::abi::Sink) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe { $crate::native::describe::<$ty>(out) }
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_attach(
            host: *const $crate::abi::HostVtable,
            config: *const u8,
            len: usize,
            err: *const $crate::abi::Sink,
        ) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe { $crate::native::attach(&__SPANVMM_SLOT, host, config, len, err) }
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_on_event(
            ev: *const $crate::abi::CEvent,
            reply: *mut $crate::abi::CEventReply,
        ) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe { $crate::native::on_event(&__SPANVMM_SLOT, ev, reply) }
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with a valid sink.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_detach(out: *const $crate::abi::Sink) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe { $crate::native::detach(&__SPANVMM_SLOT, out) }
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_resume_from(
            state: *const u8,
            len: usize,
            err: *const $crate::abi::Sink,
        ) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe { $crate::native::resume_from(&__SPANVMM_SLOT, state, len, err) }
        }

        /// See `spanvmm_service.h`.
        ///
        /// # Safety
        /// Called by the host with valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn spanvmm_service_call(
            method: *const u8,
            method_len: usize,
            args: *const u8,
            args_len: usize,
            out: *const $crate::abi::Sink,
        ) -> i32 {
            // SAFETY: forwarded host contract.
            unsafe {
                $crate::native::call(&__SPANVMM_SLOT, method, method_len, args, args_len, out)
            }
        }
    };
}

/// Host calls through the vtable.
pub(crate) mod imports {
    use super::*;
    use crate::types::{LogLevel, Translation, VcpuRegs, VmInfo};

    const NO_HOST: &str = "no host: host calls are only available while the service is attached";

    fn host() -> Option<&'static HostVtable> {
        let p = HOST.load(Ordering::Acquire);
        // SAFETY: the host keeps the vtable alive from attach until detach returns, and host
        // calls are only made from inside calls the host makes into this plugin.
        unsafe { p.as_ref() }
    }

    /// The host's context and function `$field`, when a host is attached and its table holds
    /// the call (a host of an earlier minor version has a shorter table).
    macro_rules! host_fn {
        ($field:ident, $what:expr) => {
            match host() {
                None => Err(NO_HOST.to_string()),
                Some(h) => h
                    .$field()
                    .map(|f| (h.ctx, f))
                    .ok_or_else(|| format!("{}: this host's native ABI does not offer it", $what)),
            }
        };
    }

    fn with_sink(f: impl FnOnce(&Sink) -> i32) -> Result<Vec<u8>, String> {
        let mut buf = VecSink::default();
        let sink = buf.sink();
        let code = f(&sink);
        if code == abi::OK {
            Ok(buf.into_bytes())
        } else {
            Err(buf.into_string())
        }
    }

    fn unit(r: Result<Vec<u8>, String>) -> Result<(), String> {
        r.map(|_| ())
    }

    pub fn vm_info() -> VmInfo {
        let Ok((ctx, call)) = host_fn!(vm_info, "vm-info") else {
            return VmInfo::default();
        };
        let mut out = abi::CVmInfo::default();
        // SAFETY: vtable function called with its own context and a valid out pointer.
        unsafe { call(ctx, &mut out) };
        out.into()
    }

    pub fn pause() -> Result<(), String> {
        let (ctx, call) = host_fn!(pause, "pause")?;
        // SAFETY: vtable function called with its own context and a live sink.
        unit(with_sink(|s| unsafe { call(ctx, s) }))
    }

    pub fn resume() -> Result<(), String> {
        let (ctx, call) = host_fn!(resume, "resume")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, s) }))
    }

    pub fn vcpu_regs(index: u32) -> Result<VcpuRegs, String> {
        let (ctx, call) = host_fn!(vcpu_regs, "vcpu-regs")?;
        let mut regs = VcpuRegs::default();
        // SAFETY: as above; `regs` is a valid out pointer.
        with_sink(|s| unsafe { call(ctx, index, &mut regs, s) })?;
        Ok(regs)
    }

    pub fn read_memory(gpa: u64, len: u32) -> Result<Vec<u8>, String> {
        let (ctx, call) = host_fn!(read_memory, "read-memory")?;
        if len > crate::host::MAX_TRANSFER {
            return Err(format!("read of {len} bytes exceeds the 1 MiB limit"));
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: as above; `buf` has `len` writable bytes.
        with_sink(|s| unsafe { call(ctx, gpa, buf.as_mut_ptr(), buf.len(), s) })?;
        Ok(buf)
    }

    pub fn write_memory(gpa: u64, data: &[u8]) -> Result<(), String> {
        let (ctx, call) = host_fn!(write_memory, "write-memory")?;
        // SAFETY: as above; `data` is a live slice.
        unit(with_sink(|s| unsafe {
            call(ctx, gpa, data.as_ptr(), data.len(), s)
        }))
    }

    pub fn translate(cr3: u64, gva: u64) -> Result<Translation, String> {
        let (ctx, call) = host_fn!(translate, "translate")?;
        let mut t = abi::CTranslation::default();
        // SAFETY: as above; `t` is a valid out pointer.
        with_sink(|s| unsafe { call(ctx, cr3, gva, &mut t, s) })?;
        Ok(t.into())
    }

    pub fn dirty_bitmap() -> Result<Vec<u64>, String> {
        let (ctx, call) = host_fn!(dirty_bitmap, "dirty-bitmap")?;
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, s) }).map(|b| abi::bytes_to_words(&b))
    }

    pub fn hash_pages(first: u64, count: u32) -> Result<Vec<u64>, String> {
        let (ctx, call) = host_fn!(hash_pages, "hash-pages")?;
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, first, count, s) }).map(|b| abi::bytes_to_words(&b))
    }

    pub fn zero_scan(first: u64, count: u32) -> Result<Vec<u64>, String> {
        let (ctx, call) = host_fn!(zero_scan, "zero-scan")?;
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, first, count, s) }).map(|b| abi::bytes_to_words(&b))
    }

    pub fn search_memory(
        start: u64,
        len: u64,
        pattern: &[u8],
        max_results: u32,
    ) -> Result<Vec<u64>, String> {
        let (ctx, call) = host_fn!(search_memory, "search-memory")?;
        // SAFETY: as above; `pattern` is a live slice.
        with_sink(|s| unsafe {
            call(
                ctx,
                start,
                len,
                pattern.as_ptr(),
                pattern.len(),
                max_results,
                s,
            )
        })
        .map(|b| abi::bytes_to_words(&b))
    }

    pub fn claim_ports(base: u16, len: u16) -> Result<(), String> {
        let (ctx, call) = host_fn!(claim_ports, "claim-ports")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, base, len, s) }))
    }

    pub fn claim_mmio(base: u64, len: u64) -> Result<(), String> {
        let (ctx, call) = host_fn!(claim_mmio, "claim-mmio")?;
        // SAFETY: as above; the table is long enough to hold the field.
        unit(with_sink(|s| unsafe { call(ctx, base, len, s) }))
    }

    /// A string option as pointer + length (null for none).
    fn opt_str(s: &Option<String>) -> (*const u8, usize) {
        match s {
            Some(s) => (s.as_ptr(), s.len()),
            None => (std::ptr::null(), 0),
        }
    }

    pub fn snapshot_begin(o: &crate::snapshot::LayerOptions) -> Result<u32, String> {
        let (ctx, call) = host_fn!(snapshot_begin, "snapshot begin")?;
        let (parent, parent_len) = opt_str(&o.parent);
        let (key_file, key_file_len) = opt_str(&o.key_file);
        let opts = abi::CLayerOptions {
            dir: o.dir.as_ptr(),
            dir_len: o.dir.len(),
            parent,
            parent_len,
            key_file,
            key_file_len,
            expires_in_s: o.expires_in_s.unwrap_or(0),
            has_expiry: o.expires_in_s.is_some() as u32,
            reserved: 0,
        };
        let mut job = 0u32;
        // SAFETY: as above; the strings `opts` points at live across the call.
        with_sink(|s| unsafe { call(ctx, &opts, &mut job, s) })?;
        Ok(job)
    }

    pub fn snapshot_write_pages(job: u32, bitmap: &[u64]) -> Result<(), String> {
        let (ctx, call) = host_fn!(snapshot_write_pages, "snapshot write-pages")?;
        // SAFETY: as above; `bitmap` is a live slice.
        unit(with_sink(|s| unsafe {
            call(ctx, job, bitmap.as_ptr(), bitmap.len(), s)
        }))
    }

    pub fn snapshot_commit(job: u32) -> Result<(), String> {
        let (ctx, call) = host_fn!(snapshot_commit, "snapshot commit")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, job, s) }))
    }

    pub fn snapshot_status(job: u32) -> Result<crate::snapshot::JobStatus, String> {
        let (ctx, call) = host_fn!(snapshot_status, "snapshot status")?;
        let mut out = abi::CJobStatus::default();
        let (mut id, mut failure) = (VecSink::default(), VecSink::default());
        let (id_sink, failure_sink) = (id.sink(), failure.sink());
        // SAFETY: as above; `out` and both sinks live across the call.
        with_sink(|s| unsafe { call(ctx, job, &mut out, &id_sink, &failure_sink, s) })?;
        Ok(crate::snapshot::JobStatus::from_c(
            &out,
            id.into_string(),
            failure.into_string(),
        ))
    }

    pub fn snapshot_close(job: u32) {
        if let Ok((ctx, call)) = host_fn!(snapshot_close, "snapshot close") {
            // SAFETY: as above.
            unsafe { call(ctx, job) }
        }
    }

    pub fn snapshot_merge(top: &str, out: &str, key_file: Option<&str>) -> Result<u32, String> {
        let (ctx, call) = host_fn!(snapshot_merge, "snapshot merge")?;
        let (key, key_len) = key_file.map_or((std::ptr::null(), 0), |k| (k.as_ptr(), k.len()));
        let mut job = 0u32;
        // SAFETY: as above; the strings live across the call, `job` is a valid out pointer.
        with_sink(|s| unsafe {
            call(
                ctx,
                top.as_ptr(),
                top.len(),
                out.as_ptr(),
                out.len(),
                key,
                key_len,
                &mut job,
                s,
            )
        })?;
        Ok(job)
    }

    pub fn snapshot_remove(dir: &str) -> Result<(), String> {
        let (ctx, call) = host_fn!(snapshot_remove, "snapshot remove")?;
        // SAFETY: as above; `dir` is a live string.
        unit(with_sink(|s| unsafe {
            call(ctx, dir.as_ptr(), dir.len(), s)
        }))
    }

    fn utf8(b: Vec<u8>) -> String {
        String::from_utf8_lossy(&b).into_owned()
    }

    pub fn agile_open(config: &str) -> Result<(), String> {
        let (ctx, call) = host_fn!(agile_open, "agile open")?;
        // SAFETY: as above; `config` is a live string.
        unit(with_sink(|s| unsafe {
            call(ctx, config.as_ptr(), config.len(), s)
        }))
    }

    pub fn agile_park(bitmap: &[u64]) -> Result<String, String> {
        let (ctx, call) = host_fn!(agile_park, "agile park")?;
        // SAFETY: as above; `bitmap` is a live slice.
        with_sink(|s| unsafe { call(ctx, bitmap.as_ptr(), bitmap.len(), s) }).map(utf8)
    }

    pub fn agile_report() -> Result<String, String> {
        let (ctx, call) = host_fn!(agile_report, "agile report")?;
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, s) }).map(utf8)
    }

    pub fn agile_close() -> Result<(), String> {
        let (ctx, call) = host_fn!(agile_close, "agile close")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, s) }))
    }

    pub fn migration_harvest_dirty() -> Result<Vec<u64>, String> {
        let (ctx, call) = host_fn!(migration_harvest_dirty, "harvest-dirty")?;
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, s) }).map(|b| abi::bytes_to_words(&b))
    }

    pub fn migration_set_encoding(
        redundancy: bool,
        deltas: bool,
        cache_bytes: u64,
        blocks: u32,
    ) -> Result<(), String> {
        let (ctx, call) = host_fn!(migration_set_encoding, "set-encoding")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe {
            call(
                ctx,
                redundancy as u32,
                deltas as u32,
                cache_bytes,
                blocks,
                s,
            )
        }))
    }

    pub fn migration_set_scatter(config: &str) -> Result<(), String> {
        let (ctx, call) = host_fn!(migration_set_scatter, "set-scatter")?;
        // SAFETY: as above; `config` is a live string.
        unit(with_sink(|s| unsafe {
            call(ctx, config.as_ptr(), config.len(), s)
        }))
    }

    pub fn migration_throttle_vcpus(percent: u32) -> Result<(), String> {
        let (ctx, call) = host_fn!(migration_throttle_vcpus, "throttle-vcpus")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, percent, s) }))
    }

    pub fn migration_queue_pages(bitmap: &[u64], round: u32) -> Result<u64, String> {
        let (ctx, call) = host_fn!(migration_queue_pages, "queue-pages")?;
        let mut queued = 0u64;
        // SAFETY: as above; `bitmap` is a live slice, `queued` a valid out pointer.
        with_sink(|s| unsafe { call(ctx, bitmap.as_ptr(), bitmap.len(), round, &mut queued, s) })?;
        Ok(queued)
    }

    pub fn migration_queue_range(
        first: u64,
        count: u64,
        urgent: bool,
        round: u32,
    ) -> Result<(), String> {
        let (ctx, call) = host_fn!(migration_queue_range, "queue-range")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe {
            call(ctx, first, count, urgent as u32, round, s)
        }))
    }

    pub fn migration_switch_over(mode: u32) -> Result<(), String> {
        let (ctx, call) = host_fn!(migration_switch_over, "switch-over")?;
        // SAFETY: as above.
        unit(with_sink(|s| unsafe { call(ctx, mode, s) }))
    }

    pub fn migration_take_faults() -> Vec<u64> {
        let Ok((ctx, call)) = host_fn!(migration_take_faults, "take-faults") else {
            return Vec::new();
        };
        // SAFETY: as above.
        with_sink(|s| unsafe { call(ctx, s) })
            .map(|b| abi::bytes_to_words(&b))
            .unwrap_or_default()
    }

    pub fn migration_progress() -> Result<(abi::CMigrationStatus, Option<String>), String> {
        let (ctx, call) = host_fn!(migration_progress, "progress")?;
        let mut out = abi::CMigrationStatus::default();
        let mut failure = VecSink::default();
        let failure_sink = failure.sink();
        // SAFETY: as above; `out` and the sink live across the call.
        with_sink(|s| unsafe { call(ctx, &mut out, &failure_sink, s) })?;
        let failure = failure.into_string();
        Ok((out, (!failure.is_empty()).then_some(failure)))
    }

    pub fn log(level: LogLevel, msg: &str) {
        if let Ok((ctx, call)) = host_fn!(log, "log") {
            // SAFETY: as above; `msg` is a live string.
            unsafe { call(ctx, level.code(), msg.as_ptr(), msg.len()) }
        }
    }

    pub fn metric(name: &str, value: f64) {
        if let Ok((ctx, call)) = host_fn!(metric, "metric") {
            // SAFETY: as above.
            unsafe { call(ctx, name.as_ptr(), name.len(), value) }
        }
    }

    pub fn notify(kind: &str, detail: &str) {
        if let Ok((ctx, call)) = host_fn!(notify, "notify") {
            // SAFETY: as above.
            unsafe {
                call(
                    ctx,
                    kind.as_ptr(),
                    kind.len(),
                    detail.as_ptr(),
                    detail.len(),
                )
            }
        }
    }

    pub fn now_ns() -> u64 {
        match host_fn!(now_ns, "now-ns") {
            // SAFETY: as above.
            Ok((ctx, call)) => unsafe { call(ctx) },
            Err(_) => 0,
        }
    }
}
