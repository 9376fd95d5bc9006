//! The native host interface, declared once.
//!
//! [`crate::__spanvmm_host_calls!`] is the one table of the host calls a native service can
//! make: each entry names the WIT function it carries (`interface#function`), its field in the
//! C host table and its C parameters (after the implicit `void *ctx`). The order is the ABI: a
//! new call is appended at the end (minor version; `size` tells a service which calls a host
//! offers). From the table come:
//!
//! - [`crate::abi::HostVtable`] (the `spanvmm_host` struct) and its size-checked accessors;
//! - [`HostTrampolines`], the trait the host implements: one `extern "C"` function per call,
//!   so a call the host does not implement is a compile error, and
//!   [`crate::abi::HostVtable::new`] fills the table from it;
//! - [`c_host_table`], the C text of `spanvmm_host` checked into `include/spanvmm_service.h`
//!   (a test regenerates it and fails when the file differs);
//! - [`host_calls`], what the WIT test compares against `wit/*.wit`.
//!
//! Adding a host call: one WIT line, one entry at the end of the table, the host's
//! implementation (Wasm in `l1-services/src/wasm.rs`, native trampoline in
//! `l1-services/src/native.rs`) and the SDK's wrapper; then
//! `SPANVMM_BLESS=1 cargo test -p spanvmm-sdk c_header` rewrites the header.

use std::ffi::c_void;

use crate::abi::{CJobStatus, CLayerOptions, CMigrationStatus, CTranslation, CVmInfo, Sink};
use crate::types::VcpuRegs;

/// Calls `$cb! { … }` with the table of host calls (see the module docs). Each entry is
/// `/// doc` lines, `["interface#wit-name"] field(param: CType, …) -> Ret;` (no `-> Ret`: void).
#[doc(hidden)]
#[macro_export]
macro_rules! __spanvmm_host_calls {
    ($cb:ident) => {
        $cb! {
            /// The VM's shape.
            ["host#vm-info"] vm_info(out: *mut $crate::abi::CVmInfo);
            /// Stops all vCPUs.
            ["host#pause"] pause(err: *const $crate::abi::Sink) -> i32;
            /// Restarts all vCPUs.
            ["host#resume"] resume(err: *const $crate::abi::Sink) -> i32;
            /// One vCPU's registers.
            ["host#vcpu-regs"] vcpu_regs(
                index: u32,
                out: *mut $crate::types::VcpuRegs,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// len <= 1 MiB; the host writes straight into buf.
            ["host#read-memory"] read_memory(
                gpa: u64,
                buf: *mut u8,
                len: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Writes len (<= 1 MiB) bytes at gpa.
            ["host#write-memory"] write_memory(
                gpa: u64,
                data: *const u8,
                len: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Guest page-table walk.
            ["host#translate"] translate(
                cr3: u64,
                gva: u64,
                out: *mut $crate::abi::CTranslation,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// u64 words to out (or the error message).
            ["host#dirty-bitmap"] dirty_bitmap(out: *const $crate::abi::Sink) -> i32;
            /// u64 words to out (or the error message).
            ["host#hash-pages"] hash_pages(
                first: u64,
                count: u32,
                out: *const $crate::abi::Sink,
            ) -> i32;
            /// u64 words to out (or the error message).
            ["host#zero-scan"] zero_scan(
                first: u64,
                count: u32,
                out: *const $crate::abi::Sink,
            ) -> i32;
            /// u64 addresses to out (or the error message).
            ["host#search-memory"] search_memory(
                start: u64,
                len: u64,
                pattern: *const u8,
                pattern_len: usize,
                max_results: u32,
                out: *const $crate::abi::Sink,
            ) -> i32;
            /// Only during attach.
            ["host#claim-ports"] claim_ports(
                base: u16,
                len: u16,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// level: SPANVMM_LOG_*.
            ["host#log"] log(level: u32, msg: *const u8, len: usize);
            /// A named metric.
            ["host#metric"] metric(name: *const u8, len: usize, value: f64);
            /// A notification (kind, JSON detail).
            ["host#notify"] notify(
                kind: *const u8,
                kind_len: usize,
                detail: *const u8,
                detail_len: usize,
            );
            /// Host monotonic time, ns.
            ["host#now-ns"] now_ns() -> u64;
            /// Appended: only during attach; outside guest RAM.
            ["host#claim-mmio"] claim_mmio(
                base: u64,
                len: u64,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Appended: the snapshot engine (wit/snapshot.wit). Opens a layer.
            ["snapshot#begin"] snapshot_begin(
                opts: *const $crate::abi::CLayerOptions,
                job: *mut u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// words == 0: every page.
            ["snapshot#write-pages"] snapshot_write_pages(
                job: u32,
                bitmap: *const u64,
                words: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Captures the VM state (paused VM) and queues the state file.
            ["snapshot#commit"] snapshot_commit(job: u32, err: *const $crate::abi::Sink) -> i32;
            /// The layer id to layer_id; when out->failed, the job's failure to job_error.
            ["snapshot#status"] snapshot_status(
                job: u32,
                out: *mut $crate::abi::CJobStatus,
                layer_id: *const $crate::abi::Sink,
                job_error: *const $crate::abi::Sink,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Drops a job.
            ["snapshot#close"] snapshot_close(job: u32);
            /// Merges the chain ending in top into a full layer in out; key_file NULL: plain.
            ["snapshot#merge"] snapshot_merge(
                top: *const u8,
                top_len: usize,
                out: *const u8,
                out_len: usize,
                key_file: *const u8,
                key_file_len: usize,
                job: *mut u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Deletes the layer in dir (retention of layers a merge superseded).
            ["snapshot#remove"] snapshot_remove(
                dir: *const u8,
                dir_len: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Appended: the migration engine (wit/migration.wit). u64 words to out.
            ["migration#harvest-dirty"] migration_harvest_dirty(
                out: *const $crate::abi::Sink,
            ) -> i32;
            /// How many pages were not queued already goes to queued.
            ["migration#queue-pages"] migration_queue_pages(
                bitmap: *const u64,
                words: usize,
                round: u32,
                queued: *mut u64,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// urgent != 0: before everything but faults.
            ["migration#queue-range"] migration_queue_range(
                first: u64,
                count: u64,
                urgent: u32,
                round: u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// mode: SPANVMM_SWITCH_*.
            ["migration#switch-over"] migration_switch_over(
                mode: u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// u64 words to out.
            ["migration#take-faults"] migration_take_faults(out: *const $crate::abi::Sink) -> i32;
            /// When the migration failed, the reason to failure.
            ["migration#progress"] migration_progress(
                out: *mut $crate::abi::CMigrationStatus,
                failure: *const $crate::abi::Sink,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Appended: CloudNet's page encodings (redundancy, deltas: 0 or 1).
            ["migration#set-encoding"] migration_set_encoding(
                redundancy: u32,
                deltas: u32,
                cache_bytes: u64,
                blocks: u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Appended: Scatter-Gather (config: JSON text, see wit/migration.wit).
            ["migration#set-scatter"] migration_set_scatter(
                config: *const u8,
                config_len: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// Appended: agile migration's parked pages (wit/agile.wit). config: JSON.
            ["agile#open"] agile_open(
                config: *const u8,
                config_len: usize,
                err: *const $crate::abi::Sink,
            ) -> i32;
            /// What it did (JSON) to out (or the error message).
            ["agile#park"] agile_park(
                bitmap: *const u64,
                words: usize,
                out: *const $crate::abi::Sink,
            ) -> i32;
            /// JSON to out (or the error message).
            ["agile#report"] agile_report(out: *const $crate::abi::Sink) -> i32;
            /// Brings every page back and stops.
            ["agile#close"] agile_close(err: *const $crate::abi::Sink) -> i32;
            /// Appended: slows the guest during pre-copy (percent of the time asleep).
            ["migration#throttle-vcpus"] migration_throttle_vcpus(
                percent: u32,
                err: *const $crate::abi::Sink,
            ) -> i32;
        }
    };
}

/// A Rust type as the C header spells it.
pub trait CType {
    /// The C spelling (`uint32_t`, `const spanvmm_sink *`, …).
    fn c() -> String;
}

macro_rules! c_names {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CType for $t {
            fn c() -> String {
                $c.into()
            }
        })*
    };
}

c_names! {
    u8 => "uint8_t", u16 => "uint16_t", u32 => "uint32_t", u64 => "uint64_t", i32 => "int32_t",
    usize => "size_t", f64 => "double", c_void => "void", Sink => "spanvmm_sink",
    CVmInfo => "spanvmm_vm_info", VcpuRegs => "spanvmm_vcpu_regs",
    CTranslation => "spanvmm_translation", CLayerOptions => "spanvmm_layer_options",
    CJobStatus => "spanvmm_job_status", CMigrationStatus => "spanvmm_migration_status",
}

impl<T: CType> CType for *const T {
    fn c() -> String {
        format!("const {} *", T::c())
    }
}

impl<T: CType> CType for *mut T {
    fn c() -> String {
        format!("{} *", T::c())
    }
}

/// One entry of the table, as data.
#[derive(Debug, Clone)]
pub struct HostCall {
    /// `interface#function` in `wit/*.wit`.
    pub wit: &'static str,
    /// Field of `spanvmm_host`.
    pub field: &'static str,
    /// The doc line(s).
    pub doc: Vec<&'static str>,
    /// C parameters after `void *ctx`: (name, C type).
    pub params: Vec<(&'static str, String)>,
    /// C return type.
    pub ret: String,
}

macro_rules! calls_as_data {
    ($( $(#[doc = $doc:literal])* [$wit:literal] $name:ident ( $($p:ident : $t:ty),* $(,)? )
        $(-> $ret:ty)? ; )*) => {
        /// The table as data, in ABI order.
        pub fn host_calls() -> Vec<HostCall> {
            vec![$(HostCall {
                wit: $wit,
                field: stringify!($name),
                doc: vec![$($doc.trim()),*],
                params: vec![$((stringify!($p), <$t as CType>::c())),*],
                ret: calls_as_data!(@ret $($ret)?),
            }),*]
        }
    };
    (@ret) => { "void".to_string() };
    (@ret $ret:ty) => { <$ret as CType>::c() };
}
crate::__spanvmm_host_calls!(calls_as_data);

macro_rules! declare_trampolines {
    ($( $(#[doc = $doc:literal])* [$wit:literal] $name:ident ( $($p:ident : $t:ty),* $(,)? )
        $(-> $ret:ty)? ; )*) => {
        /// The host's side of the table: one C function per host call, each receiving the
        /// `ctx` of [`HostVtable::new`]. Implementing this trait is implementing the native
        /// host interface; [`HostVtable::new`] builds the table from it.
        pub trait HostTrampolines {
            $(
                $(#[doc = $doc])*
                ///
                /// # Safety
                /// Called by a service with the `ctx` of the table and pointers valid for the
                /// call (see `include/spanvmm_service.h`).
                unsafe extern "C" fn $name(ctx: *mut c_void, $($p: $t),*) $(-> $ret)?;
            )*
        }

        /// The host's functions (`spanvmm_host`), valid from `attach` until `detach` returns.
        /// They may only be called from inside a call the host made into the service, on that
        /// thread. Generated from the table: see [`crate::hostif`].
        #[repr(C)]
        pub struct HostVtable {
            /// [`crate::ABI_VERSION`].
            pub abi_version: u32,
            /// `sizeof(spanvmm_host)`: later minor versions append fields.
            pub size: u32,
            /// Host context, first argument of every function.
            pub ctx: *mut c_void,
            $(
                $(#[doc = $doc])*
                pub $name: unsafe extern "C" fn(ctx: *mut c_void, $($p: $t),*) $(-> $ret)?,
            )*
        }

        impl HostVtable {
            /// The table of host `H` with context `ctx`, this ABI version and size.
            pub fn new<H: HostTrampolines>(ctx: *mut c_void) -> Self {
                HostVtable {
                    abi_version: crate::ABI_VERSION,
                    size: std::mem::size_of::<HostVtable>() as u32,
                    ctx,
                    $($name: H::$name,)*
                }
            }

            $(
                $(#[doc = $doc])*
                ///
                /// `None` when this host's table does not hold the call (a host of an earlier
                /// minor version has a shorter table).
                pub fn $name(&self) -> Option<unsafe extern "C" fn(*mut c_void, $($t),*) $(-> $ret)?> {
                    let end = std::mem::offset_of!(HostVtable, $name) + std::mem::size_of::<usize>();
                    crate::abi::table_has(self.size, end).then_some(self.$name)
                }
            )*
        }
    };
}
crate::__spanvmm_host_calls!(declare_trampolines);

/// Where the generated text sits in `include/spanvmm_service.h`.
pub const C_BEGIN: &str =
    "/* ---- generated from sdk/src/hostif.rs (the host-call table): do not edit by hand ---- */";
/// End marker of the generated text.
pub const C_END: &str = "/* ---- end of generated text ---- */";

/// `type name`, with the `*` of a pointer type against the name.
fn c_decl(ty: &str, name: &str) -> String {
    if ty.ends_with('*') {
        format!("{ty}{name}")
    } else {
        format!("{ty} {name}")
    }
}

/// Joins `parts` after `head` with ", ", wrapping at 100 columns under the first part.
fn wrap(head: &str, parts: &[String], tail: &str) -> String {
    let one = format!("{head}{}{tail}", parts.join(", "));
    if one.len() <= 100 {
        return one;
    }
    let indent = " ".repeat(head.len());
    let mut out = head.to_string();
    let mut col = head.len();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let piece = if last {
            format!("{p}{tail}")
        } else {
            format!("{p},")
        };
        if i > 0 {
            if col + 1 + piece.len() > 100 {
                out.push('\n');
                out.push_str(&indent);
                col = indent.len();
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(&piece);
        col += piece.len();
    }
    out
}

/// The C text of `struct spanvmm_host`, between [`C_BEGIN`] and [`C_END`].
pub fn c_host_table() -> String {
    let mut s = String::new();
    s.push_str(C_BEGIN);
    s.push_str(
        "\n/* What the VMM offers. Each call checks the capabilities the manifest asked for. */\n",
    );
    s.push_str("typedef struct spanvmm_host {\n");
    s.push_str("    uint32_t abi_version; /* SPANVMM_SERVICE_ABI_VERSION */\n");
    s.push_str(
        "    uint32_t size;        /* sizeof(spanvmm_host); later minor versions append fields */\n",
    );
    s.push_str("    void *ctx;            /* first argument of every function below */\n");
    for call in host_calls() {
        s.push_str(&format!("    /* {}: {} */\n", call.wit, call.doc.join(" ")));
        let mut params = vec!["void *ctx".to_string()];
        params.extend(call.params.iter().map(|(n, t)| c_decl(t, n)));
        let head = format!("    {} (*{})(", call.ret, call.field);
        s.push_str(&wrap(&head, &params, ");"));
        s.push('\n');
    }
    s.push_str("} spanvmm_host;\n");
    s.push_str(C_END);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include/spanvmm_service.h");

    /// The checked-in header holds exactly the text the table generates.
    #[test]
    fn c_header_matches_the_table() {
        let text = std::fs::read_to_string(HEADER).expect("read the header");
        let (Some(b), Some(e)) = (text.find(C_BEGIN), text.find(C_END)) else {
            panic!("{HEADER} lacks the generated-text markers ({C_BEGIN} … {C_END})");
        };
        let want = format!(
            "{}{}{}",
            &text[..b],
            c_host_table(),
            &text[e + C_END.len()..]
        );
        if want != text {
            if std::env::var_os("SPANVMM_BLESS").is_some() {
                std::fs::write(HEADER, &want).expect("write the header");
                return;
            }
            panic!(
                "{HEADER} is out of date with the host-call table (sdk/src/hostif.rs): run \
                 `SPANVMM_BLESS=1 cargo test -p spanvmm-sdk c_header` and commit the header"
            );
        }
    }

    /// A host whose every call does nothing, generated from the table.
    struct Idle;

    macro_rules! idle_host {
        ($( $(#[doc = $doc:literal])* [$wit:literal] $name:ident ( $($p:ident : $t:ty),* $(,)? )
            $(-> $ret:ty)? ; )*) => {
            impl HostTrampolines for Idle {
                $(unsafe extern "C" fn $name(_ctx: *mut c_void, $($p: $t),*) $(-> $ret)? {
                    let _ = ($($p,)*);
                    Default::default()
                })*
            }
        };
    }
    crate::__spanvmm_host_calls!(idle_host);

    /// Appending keeps older hosts usable: a service sees exactly the calls a shorter table
    /// (an earlier minor version's host) holds, and no others.
    #[test]
    fn a_shorter_host_table_offers_only_its_calls() {
        let mut t = HostVtable::new::<Idle>(std::ptr::null_mut());
        assert_eq!(t.size as usize, std::mem::size_of::<HostVtable>());
        assert!(t.now_ns().is_some() && t.migration_set_encoding().is_some());
        // The first minor version ended with now_ns.
        t.size = std::mem::offset_of!(HostVtable, claim_mmio) as u32;
        assert!(t.now_ns().is_some() && t.pause().is_some());
        assert!(t.claim_mmio().is_none());
        assert!(t.snapshot_begin().is_none());
        assert!(t.migration_set_encoding().is_none());
        // SAFETY: `Idle`'s functions ignore their arguments.
        assert_eq!(unsafe { (t.now_ns().unwrap())(t.ctx) }, 0);
    }

    #[test]
    fn table_fields_are_unique_and_the_vtable_has_them_all() {
        let calls = host_calls();
        let mut names: Vec<_> = calls.iter().map(|c| c.field).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            calls.len(),
            "a field appears twice in the table"
        );
        // abi_version, size, ctx, then one pointer per call.
        assert_eq!(
            std::mem::size_of::<HostVtable>(),
            16 + calls.len() * std::mem::size_of::<usize>()
        );
    }
}
