//! The native runtime: a versioned C ABI (`sdk/include/spanvmm_service.h`) over libloading.
//! Native services are trusted code in the VMM's address space: no sandbox, no deadline, no
//! memory limit. The host checks what it can: the ABI handshake comes first, every symbol must
//! be present, panics are caught by the SDK's glue and reported as failures.

use std::ffi::c_void;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use libloading::Library;
use spanvmm_sdk::abi::{
    self, CEvent, CEventReply, CJobStatus, CLayerOptions, CMigrationStatus, CTranslation, CVmInfo,
    HostVtable, Sink, VecSink,
};
use spanvmm_sdk::hostif::HostTrampolines;
use spanvmm_sdk::{Event, EventReply, LogLevel, Manifest, VcpuRegs, ABI_VERSION};

use crate::backend::{Backend, Fatal};
use crate::ctx::{lock, CallError, ServiceCtx};
use crate::error::ServiceError;
use crate::trust::TrustedFile;

/// Native objects loaded in this process by (device, inode), the identity dlopen uses, with
/// the service name using each. An object is loaded once per process (its statics hold the
/// service), whatever path or manager it comes through.
static LOADED: Mutex<Vec<((u64, u64), String)>> = Mutex::new(Vec::new());

/// The service using the native object with (device, inode) `id`, if it is loaded.
pub(crate) fn loaded_by(id: (u64, u64)) -> Option<String> {
    lock(&LOADED)
        .iter()
        .find(|(f, _)| *f == id)
        .map(|(_, user)| user.clone())
}

struct Fns {
    describe: abi::DescribeFn,
    attach: abi::AttachFn,
    on_event: abi::OnEventFn,
    detach: abi::DetachFn,
    resume_from: abi::ResumeFromFn,
    call: abi::CallFn,
}

/// A loaded native service.
pub(crate) struct NativeService {
    fns: Fns,
    vtable: Box<HostVtable>,
    _ctx: Arc<ServiceCtx>,
    id: (u64, u64),
    // Dropped last: the function pointers above point into it.
    _lib: Library,
}

// SAFETY: the raw pointers inside are the vtable's context (an `Arc<ServiceCtx>` this value
// keeps alive; `ServiceCtx` is `Sync`) and function pointers into the library. The C ABI lets
// the host call a service from any thread as long as calls are serialized, which the manager
// does (one lock per service).
unsafe impl Send for NativeService {}

fn sym<T: Copy>(lib: &Library, path: &Path, name: &str) -> Result<T, ServiceError> {
    let cname = format!("{name}\0");
    // SAFETY: `T` is the function type the C ABI (version-checked by the caller, or the
    // handshake itself) defines for `name`; the symbol stays valid while `lib` is loaded, and
    // `NativeService` keeps `lib` alive longer than any copy of the pointer.
    unsafe { lib.get::<T>(cname.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| ServiceError::Load {
            path: path.to_path_buf(),
            msg: format!(
                "missing symbol {name}: not a spanvmm native service (see spanvmm_service.h)"
            ),
        })
}

impl NativeService {
    /// Loads `file` (opened from `path` and checked by `trust::open_checked` as trusted code:
    /// owner, mode, directories), checks the ABI handshake and resolves every entry point.
    pub(crate) fn load(
        path: &Path,
        file: &TrustedFile,
        ctx: Arc<ServiceCtx>,
    ) -> Result<Self, ServiceError> {
        let id = file.id();
        let mut loaded = lock(&LOADED);
        if let Some((_, user)) = loaded.iter().find(|(f, _)| *f == id) {
            return Err(ServiceError::Load {
                path: path.to_path_buf(),
                msg: format!(
                    "this shared object is already loaded (by service {user}); a native object \
                     serves once per process"
                ),
            });
        }
        // The checked file by its canonical path: it and every directory above it are writable
        // only by root and the VMM's user (checked), so nobody else can have swapped it since.
        let canonical = file.path();
        if std::fs::metadata(canonical)
            .map(|m| (m.dev(), m.ino()))
            .ok()
            != Some(id)
        {
            return Err(ServiceError::Load {
                path: path.to_path_buf(),
                msg: format!(
                    "{} changed while it was being loaded; try again",
                    canonical.display()
                ),
            });
        }
        // SAFETY: loading runs the object's initializers. Native services are trusted code by
        // definition (docs/plugin-guide.md), and the file passed the trust checks (owner,
        // mode, directories) just before; everything after this point is checked.
        let lib = unsafe { Library::new(canonical) }.map_err(|e| ServiceError::Load {
            path: path.to_path_buf(),
            msg: format!("cannot load shared object: {e}"),
        })?;
        let version: abi::AbiVersionFn = sym(&lib, path, abi::SYM_ABI_VERSION)?;
        // SAFETY: the handshake function takes nothing and returns a u32 in every version.
        let found = unsafe { version() };
        if found != ABI_VERSION {
            return Err(ServiceError::AbiMismatch {
                path: path.to_path_buf(),
                found,
                expected: ABI_VERSION,
            });
        }
        let fns = Fns {
            describe: sym(&lib, path, abi::SYM_DESCRIBE)?,
            attach: sym(&lib, path, abi::SYM_ATTACH)?,
            on_event: sym(&lib, path, abi::SYM_ON_EVENT)?,
            detach: sym(&lib, path, abi::SYM_DETACH)?,
            resume_from: sym(&lib, path, abi::SYM_RESUME_FROM)?,
            call: sym(&lib, path, abi::SYM_CALL)?,
        };
        let vtable = Box::new(HostVtable::new::<Trampolines>(
            Arc::as_ptr(&ctx) as *mut c_void
        ));
        loaded.push((id, "?".into()));
        Ok(NativeService {
            fns,
            vtable,
            _ctx: ctx,
            id,
            _lib: lib,
        })
    }
}

impl Drop for NativeService {
    fn drop(&mut self) {
        lock(&LOADED).retain(|(f, _)| *f != self.id);
    }
}

fn outcome(code: i32, what: &str, sink: VecSink) -> Result<Result<Vec<u8>, String>, Fatal> {
    match code {
        abi::OK => Ok(Ok(sink.into_bytes())),
        abi::ERR => Ok(Err(sink.into_string())),
        abi::FATAL => {
            let msg = sink.into_string();
            Err(Fatal(if msg.is_empty() {
                format!("{what} failed fatally (the service panicked)")
            } else {
                msg
            }))
        }
        other => Err(Fatal(format!("{what} returned unknown status {other}"))),
    }
}

impl Backend for NativeService {
    fn set_name(&mut self, name: &str) {
        if let Some(e) = lock(&LOADED).iter_mut().find(|(f, _)| *f == self.id) {
            e.1 = name.to_string();
        }
    }

    fn describe(&mut self) -> Result<Manifest, Fatal> {
        let mut out = VecSink::default();
        let sink = out.sink();
        // SAFETY: entry point of a version-checked library; `sink` lives across the call.
        let code = unsafe { (self.fns.describe)(&sink) };
        match outcome(code, "describe", out)? {
            Ok(json) => crate::manifest::parse_native(&json).map_err(|e| Fatal(e.to_string())),
            Err(msg) => Err(Fatal(format!("describe failed: {msg}"))),
        }
    }

    fn attach(&mut self, config: &str) -> Result<Result<(), String>, Fatal> {
        let mut err = VecSink::default();
        let sink = err.sink();
        // SAFETY: as above; the vtable is boxed in `self` and outlives the service's use of it
        // (until `detach` returns or `self` is dropped).
        let code =
            unsafe { (self.fns.attach)(&*self.vtable, config.as_ptr(), config.len(), &sink) };
        outcome(code, "attach", err).map(|r| r.map(|_| ()))
    }

    fn on_event(&mut self, ev: &Event) -> Result<EventReply, Fatal> {
        // Borrows a net-frames batch from `ev`, which outlives the call.
        let cev = CEvent::borrow(ev);
        let mut reply = CEventReply::default();
        // SAFETY: as above; both pointers are valid for the call.
        let code = unsafe { (self.fns.on_event)(&cev, &mut reply) };
        match code {
            abi::OK => Ok(reply.into()),
            abi::FATAL => Err(Fatal("on-event panicked".into())),
            other => Err(Fatal(format!("on-event returned status {other}"))),
        }
    }

    fn detach(&mut self) -> Result<Vec<u8>, Fatal> {
        let mut out = VecSink::default();
        let sink = out.sink();
        // SAFETY: as above.
        let code = unsafe { (self.fns.detach)(&sink) };
        match outcome(code, "detach", out)? {
            Ok(state) => Ok(state),
            Err(msg) => Err(Fatal(format!("detach failed: {msg}"))),
        }
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<Result<(), String>, Fatal> {
        let mut err = VecSink::default();
        let sink = err.sink();
        // SAFETY: as above.
        let code = unsafe { (self.fns.resume_from)(state.as_ptr(), state.len(), &sink) };
        outcome(code, "resume-from", err).map(|r| r.map(|_| ()))
    }

    fn call(&mut self, method: &str, args: &str) -> Result<Result<String, String>, Fatal> {
        let mut out = VecSink::default();
        let sink = out.sink();
        // SAFETY: as above.
        let code = unsafe {
            (self.fns.call)(
                method.as_ptr(),
                method.len(),
                args.as_ptr(),
                args.len(),
                &sink,
            )
        };
        outcome(code, "call", out).map(|r| r.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

// ---- host functions handed to the plugin ----

/// Runs `f` on the service context, turning a panic into `default` (a panic must not unwind
/// into C).
fn with_ctx<T>(ctx: *mut c_void, default: T, f: impl FnOnce(&ServiceCtx) -> T) -> T {
    if ctx.is_null() {
        return default;
    }
    // SAFETY: `ctx` is the `Arc<ServiceCtx>` pointer placed in the vtable by `load`, kept alive
    // by the `NativeService` for as long as the plugin may call us.
    let ctx = unsafe { &*(ctx as *const ServiceCtx) };
    catch_unwind(AssertUnwindSafe(|| f(ctx))).unwrap_or(default)
}

/// Reports `r` through `sink`: bytes on success, the message on error.
fn report<E: Into<String>>(sink: *const Sink, r: Result<Vec<u8>, E>) -> i32 {
    let (code, bytes) = match r {
        Ok(b) => (abi::OK, b),
        Err(e) => (abi::ERR, e.into().into_bytes()),
    };
    // SAFETY: `sink` is the plugin's sink for this call (or null), valid during the call.
    unsafe { abi::sink_put(sink, &bytes) };
    code
}

/// A host call that answers through `sink`: `f` on the service context, its bytes or its error.
fn call(
    ctx: *mut c_void,
    sink: *const Sink,
    f: impl FnOnce(&ServiceCtx) -> Result<Vec<u8>, CallError>,
) -> i32 {
    report(sink, with_ctx(ctx, Err(CallError::Internal), f))
}

fn words<E>(r: Result<Vec<u64>, E>) -> Result<Vec<u8>, E> {
    r.map(|w| abi::words_to_bytes(&w))
}

fn unit<E>(r: Result<(), E>) -> Result<Vec<u8>, E> {
    r.map(|_| Vec::new())
}

fn text(ptr: *const u8, len: usize) -> String {
    // SAFETY: the plugin passes `len` readable bytes at `ptr` for the duration of the call.
    String::from_utf8_lossy(unsafe { abi::bytes(ptr, len) }).into_owned()
}

// ---- helpers of the snapshot and migration calls ----

/// An optional string from the plugin (null pointer: none).
fn opt_text(ptr: *const u8, len: usize) -> Option<String> {
    (!ptr.is_null()).then(|| text(ptr, len))
}

/// A bitmap from the plugin.
fn bitmap(ptr: *const u64, words: usize) -> Result<Vec<u64>, CallError> {
    if words == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(CallError::Refused("null bitmap".into()));
    }
    // SAFETY: the plugin passes `words` readable u64 words at `ptr` for this call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, words) }.to_vec())
}

/// The native host interface: the trampolines a service calls through its `spanvmm_host`
/// table (`spanvmm_sdk::hostif`: the table declares them, this implements them).
pub(crate) struct Trampolines;

impl HostTrampolines for Trampolines {
    unsafe extern "C" fn vm_info(ctx: *mut c_void, out: *mut CVmInfo) {
        if let Some(info) = with_ctx(ctx, None, |c| Some(c.vm_info())) {
            if !out.is_null() {
                // SAFETY: `out` is a valid out pointer from the plugin.
                unsafe { *out = info.into() };
            }
        }
    }

    unsafe extern "C" fn pause(ctx: *mut c_void, err: *const Sink) -> i32 {
        call(ctx, err, |c| unit(c.pause()))
    }

    unsafe extern "C" fn resume(ctx: *mut c_void, err: *const Sink) -> i32 {
        call(ctx, err, |c| unit(c.resume()))
    }

    unsafe extern "C" fn vcpu_regs(
        ctx: *mut c_void,
        index: u32,
        out: *mut VcpuRegs,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| {
            c.vcpu_regs(index).map(|regs| {
                if !out.is_null() {
                    // SAFETY: `out` is a valid out pointer from the plugin.
                    unsafe { *out = regs };
                }
                Vec::new()
            })
        })
    }

    unsafe extern "C" fn read_memory(
        ctx: *mut c_void,
        gpa: u64,
        buf: *mut u8,
        len: usize,
        err: *const Sink,
    ) -> i32 {
        if buf.is_null() && len > 0 {
            return report(
                err,
                Err(CallError::Refused("read-memory: null buffer".into())),
            );
        }
        call(ctx, err, |c| {
            let dst: &mut [u8] = if len == 0 {
                &mut []
            } else {
                // SAFETY: the plugin passes `len` writable bytes at `buf` for this call.
                unsafe { std::slice::from_raw_parts_mut(buf, len) }
            };
            unit(c.read_into(gpa, dst))
        })
    }

    unsafe extern "C" fn write_memory(
        ctx: *mut c_void,
        gpa: u64,
        data: *const u8,
        len: usize,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| {
            // SAFETY: the plugin passes `len` readable bytes at `data` for this call.
            unit(c.write_memory(gpa, unsafe { abi::bytes(data, len) }))
        })
    }

    unsafe extern "C" fn translate(
        ctx: *mut c_void,
        cr3: u64,
        gva: u64,
        out: *mut CTranslation,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| {
            c.translate(cr3, gva).map(|t| {
                if !out.is_null() {
                    // SAFETY: `out` is a valid out pointer from the plugin.
                    unsafe { *out = t.into() };
                }
                Vec::new()
            })
        })
    }

    unsafe extern "C" fn dirty_bitmap(ctx: *mut c_void, out: *const Sink) -> i32 {
        call(ctx, out, |c| words(c.dirty_bitmap()))
    }

    unsafe extern "C" fn hash_pages(
        ctx: *mut c_void,
        first: u64,
        count: u32,
        out: *const Sink,
    ) -> i32 {
        call(ctx, out, |c| words(c.hash_pages(first, count)))
    }

    unsafe extern "C" fn zero_scan(
        ctx: *mut c_void,
        first: u64,
        count: u32,
        out: *const Sink,
    ) -> i32 {
        call(ctx, out, |c| words(c.zero_scan(first, count)))
    }

    unsafe extern "C" fn search_memory(
        ctx: *mut c_void,
        start: u64,
        len: u64,
        pattern: *const u8,
        pattern_len: usize,
        max_results: u32,
        out: *const Sink,
    ) -> i32 {
        call(ctx, out, |c| {
            // SAFETY: the plugin passes `pattern_len` readable bytes at `pattern` for this call.
            let pat = unsafe { abi::bytes(pattern, pattern_len) };
            words(c.search_memory(start, len, pat, max_results))
        })
    }

    unsafe extern "C" fn claim_ports(
        ctx: *mut c_void,
        base: u16,
        len: u16,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| unit(c.claim_ports(base, len)))
    }

    unsafe extern "C" fn claim_mmio(
        ctx: *mut c_void,
        base: u64,
        len: u64,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| unit(c.claim_mmio(base, len)))
    }

    unsafe extern "C" fn log(ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
        with_ctx(ctx, (), |c| {
            c.log(LogLevel::from_code(level), &text(msg, len))
        })
    }

    unsafe extern "C" fn metric(ctx: *mut c_void, name: *const u8, len: usize, value: f64) {
        with_ctx(ctx, (), |c| c.metric(&text(name, len), value))
    }

    unsafe extern "C" fn notify(
        ctx: *mut c_void,
        kind: *const u8,
        kind_len: usize,
        detail: *const u8,
        detail_len: usize,
    ) {
        with_ctx(ctx, (), |c| {
            c.notify(&text(kind, kind_len), &text(detail, detail_len))
        })
    }

    unsafe extern "C" fn now_ns(ctx: *mut c_void) -> u64 {
        with_ctx(ctx, 0, |c| c.now_ns())
    }

    unsafe extern "C" fn snapshot_begin(
        ctx: *mut c_void,
        opts: *const CLayerOptions,
        job: *mut u32,
        err: *const Sink,
    ) -> i32 {
        if opts.is_null() || job.is_null() {
            return report(
                err,
                Err(CallError::Refused(
                    "snapshot begin: null options or job pointer".into(),
                )),
            );
        }
        // SAFETY: `opts` is the plugin's valid options for this call.
        let o = unsafe { *opts };
        let req = crate::snapshot::LayerRequest {
            dir: text(o.dir, o.dir_len),
            parent: opt_text(o.parent, o.parent_len),
            key_file: opt_text(o.key_file, o.key_file_len),
            expires_in_s: (o.has_expiry != 0).then_some(o.expires_in_s),
        };
        call(ctx, err, |c| {
            c.snapshot_begin(req).map(|id| {
                // SAFETY: `job` is a valid out pointer from the plugin.
                unsafe { *job = id };
                Vec::new()
            })
        })
    }

    unsafe extern "C" fn snapshot_write_pages(
        ctx: *mut c_void,
        job: u32,
        bits: *const u64,
        words: usize,
        err: *const Sink,
    ) -> i32 {
        let r = bitmap(bits, words).and_then(|b| {
            with_ctx(ctx, Err(CallError::Internal), |c| {
                c.snapshot_write_pages(job, b)
            })
        });
        report(err, unit(r))
    }

    unsafe extern "C" fn snapshot_commit(ctx: *mut c_void, job: u32, err: *const Sink) -> i32 {
        call(ctx, err, |c| unit(c.snapshot_commit(job)))
    }

    unsafe extern "C" fn snapshot_status(
        ctx: *mut c_void,
        job: u32,
        out: *mut CJobStatus,
        layer_id: *const Sink,
        job_error: *const Sink,
        err: *const Sink,
    ) -> i32 {
        if out.is_null() {
            return report(
                err,
                Err(CallError::Refused(
                    "snapshot status: null status pointer".into(),
                )),
            );
        }
        call(ctx, err, |c| {
            c.snapshot_status(job).map(|s| {
                // SAFETY: `out` is a valid out pointer; the sinks are the plugin's (or null).
                unsafe {
                    *out = CJobStatus::from(&s);
                    abi::sink_put(layer_id, s.layer_id.as_bytes());
                    if let Some(e) = &s.error {
                        abi::sink_put(job_error, e.as_bytes());
                    }
                }
                Vec::new()
            })
        })
    }

    unsafe extern "C" fn snapshot_close(ctx: *mut c_void, job: u32) {
        with_ctx(ctx, (), |c| c.snapshot_close(job))
    }

    unsafe extern "C" fn snapshot_merge(
        ctx: *mut c_void,
        top: *const u8,
        top_len: usize,
        out: *const u8,
        out_len: usize,
        key_file: *const u8,
        key_file_len: usize,
        job: *mut u32,
        err: *const Sink,
    ) -> i32 {
        if job.is_null() {
            return report(
                err,
                Err(CallError::Refused(
                    "snapshot merge: null job pointer".into(),
                )),
            );
        }
        let req = crate::snapshot::MergeRequest {
            top: text(top, top_len),
            out: text(out, out_len),
            key_file: opt_text(key_file, key_file_len),
        };
        call(ctx, err, |c| {
            c.snapshot_merge(req).map(|id| {
                // SAFETY: `job` is a valid out pointer from the plugin.
                unsafe { *job = id };
                Vec::new()
            })
        })
    }

    unsafe extern "C" fn snapshot_remove(
        ctx: *mut c_void,
        dir: *const u8,
        dir_len: usize,
        err: *const Sink,
    ) -> i32 {
        let dir = text(dir, dir_len);
        call(ctx, err, |c| unit(c.snapshot_remove(&dir)))
    }

    unsafe extern "C" fn migration_harvest_dirty(ctx: *mut c_void, out: *const Sink) -> i32 {
        call(ctx, out, |c| words(c.migration_harvest()))
    }

    unsafe extern "C" fn migration_queue_pages(
        ctx: *mut c_void,
        bits: *const u64,
        nwords: usize,
        round: u32,
        queued: *mut u64,
        err: *const Sink,
    ) -> i32 {
        let r = bitmap(bits, nwords).and_then(|b| {
            with_ctx(ctx, Err(CallError::Internal), |c| {
                c.migration("queue-pages")?
                    .queue_bitmap(&b, round)
                    .map_err(|e| CallError::Refused(e.to_string()))
            })
        });
        report(
            err,
            r.map(|n| {
                if !queued.is_null() {
                    // SAFETY: `queued` is a valid out pointer from the plugin.
                    unsafe { *queued = n };
                }
                Vec::new()
            }),
        )
    }

    unsafe extern "C" fn migration_queue_range(
        ctx: *mut c_void,
        first: u64,
        count: u64,
        urgent: u32,
        round: u32,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| {
            let migration = c.migration("queue-range")?;
            unit(
                migration
                    .queue_range(first, count, urgent != 0, round)
                    .map_err(|e| CallError::Refused(e.to_string())),
            )
        })
    }

    unsafe extern "C" fn migration_set_encoding(
        ctx: *mut c_void,
        redundancy: u32,
        deltas: u32,
        cache_bytes: u64,
        blocks: u32,
        err: *const Sink,
    ) -> i32 {
        let enc = crate::migration::cnet::Encoding {
            redundancy: redundancy != 0,
            deltas: deltas != 0,
            cache_bytes,
            blocks,
        };
        call(ctx, err, |c| {
            let migration = c.migration("set-encoding")?;
            unit(
                migration
                    .set_encoding(enc)
                    .map_err(|e| CallError::Refused(e.to_string())),
            )
        })
    }

    unsafe extern "C" fn migration_set_scatter(
        ctx: *mut c_void,
        config: *const u8,
        config_len: usize,
        err: *const Sink,
    ) -> i32 {
        let config = text(config, config_len);
        call(ctx, err, |c| unit(c.migration_set_scatter(&config)))
    }

    unsafe extern "C" fn migration_throttle_vcpus(
        ctx: *mut c_void,
        percent: u32,
        err: *const Sink,
    ) -> i32 {
        call(ctx, err, |c| unit(c.migration_throttle(percent)))
    }

    unsafe extern "C" fn migration_switch_over(
        ctx: *mut c_void,
        mode: u32,
        err: *const Sink,
    ) -> i32 {
        let Some(mode) = crate::migration::SwitchMode::from_code(mode) else {
            return report(
                err,
                Err(CallError::Refused(format!(
                    "switch-over: unknown mode {mode}"
                ))),
            );
        };
        call(ctx, err, |c| unit(c.migration_switch(mode)))
    }

    unsafe extern "C" fn migration_take_faults(ctx: *mut c_void, out: *const Sink) -> i32 {
        let faults = with_ctx(ctx, Vec::new(), |c| {
            c.migration("take-faults")
                .map(|m| m.take_faults())
                .unwrap_or_default()
        });
        report(out, words(Ok::<_, CallError>(faults)))
    }

    unsafe extern "C" fn migration_progress(
        ctx: *mut c_void,
        out: *mut CMigrationStatus,
        failure: *const Sink,
        err: *const Sink,
    ) -> i32 {
        if out.is_null() {
            return report(
                err,
                Err(CallError::Refused("progress: null status pointer".into())),
            );
        }
        let r = with_ctx(ctx, Err(CallError::Internal), |c| {
            Ok(c.migration("progress")?.progress())
        });
        report(
            err,
            r.map(|p| {
                // SAFETY: `out` is a valid out pointer; `failure` the plugin's sink (or null).
                unsafe {
                    *out = CMigrationStatus::from(&p.status);
                    if let Some(e) = &p.error {
                        abi::sink_put(failure, e.as_bytes());
                    }
                }
                Vec::new()
            }),
        )
    }

    unsafe extern "C" fn agile_open(
        ctx: *mut c_void,
        config: *const u8,
        config_len: usize,
        err: *const Sink,
    ) -> i32 {
        let config = text(config, config_len);
        report(
            err,
            with_ctx(ctx, Err(CallError::Internal), |c| {
                unit(c.agile_open(&config))
            }),
        )
    }

    unsafe extern "C" fn agile_park(
        ctx: *mut c_void,
        bits: *const u64,
        words: usize,
        out: *const Sink,
    ) -> i32 {
        let r = bitmap(bits, words)
            .and_then(|b| with_ctx(ctx, Err(CallError::Internal), |c| c.agile_park(b)));
        report(out, r.map(String::into_bytes))
    }

    unsafe extern "C" fn agile_report(ctx: *mut c_void, out: *const Sink) -> i32 {
        report(
            out,
            with_ctx(ctx, Err(CallError::Internal), |c| c.agile_report()).map(String::into_bytes),
        )
    }

    unsafe extern "C" fn agile_close(ctx: *mut c_void, err: *const Sink) -> i32 {
        report(
            err,
            with_ctx(ctx, Err(CallError::Internal), |c| unit(c.agile_close())),
        )
    }
}
