//! Wasm component glue (wit-bindgen): the bindings of `wit/service.wit` and the adapters the
//! `export_service!` macro expands to.

#![allow(missing_docs)]

use crate::types::{
    addr_from_halves, Capability, Event, EventKind, EventReply, Lifecycle, LogLevel, Manifest,
    NetFrame, PortRange, Translation, VcpuRegs, VmInfo,
};
use crate::{Service, Slot};

/// Generated bindings of the `service` world.
pub mod bindings {
    wit_bindgen::generate!({
        world: "service",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__spanvmm_wit_export",
        default_bindings_module: "spanvmm_sdk::wasm::bindings",
        runtime_path: "spanvmm_sdk::__wit_bindgen::rt",
    });
}

use bindings::spanvmm::service::host as h;
use bindings::spanvmm::service::types as t;

/// The generated export trait.
pub use bindings::Guest;
/// WIT manifest type.
pub type WitManifest = t::Manifest;
/// WIT event type.
pub type WitEvent = t::Event;
/// WIT event reply type.
pub type WitEventReply = t::EventReply;

fn cap_to_wit(c: Capability) -> t::Capability {
    match c {
        Capability::MemoryRead => t::Capability::MemoryRead,
        Capability::MemoryWrite => t::Capability::MemoryWrite,
        Capability::VcpuState => t::Capability::VcpuState,
        Capability::PauseResume => t::Capability::PauseResume,
        Capability::DirtyLog => t::Capability::DirtyLog,
        Capability::DrivesMigration => t::Capability::DrivesMigration,
        Capability::Snapshot => t::Capability::Snapshot,
        Capability::EvictMemory => t::Capability::EvictMemory,
    }
}

fn kind_to_wit(k: EventKind) -> t::EventKind {
    match k {
        EventKind::PortWrite => t::EventKind::PortWrite,
        EventKind::PortRead => t::EventKind::PortRead,
        EventKind::Lifecycle => t::EventKind::Lifecycle,
        EventKind::Tick => t::EventKind::Tick,
        EventKind::MmioWrite => t::EventKind::MmioWrite,
        EventKind::MmioRead => t::EventKind::MmioRead,
        EventKind::NetFrames => t::EventKind::NetFrames,
    }
}

fn manifest_to_wit(m: Manifest) -> t::Manifest {
    t::Manifest {
        name: m.name,
        version: m.version,
        abi_version: m.abi_version,
        events: m.events.into_iter().map(kind_to_wit).collect(),
        ports: m
            .ports
            .into_iter()
            .map(|p: PortRange| t::PortRange {
                base: p.base,
                len: p.len,
            })
            .collect(),
        mmio: m
            .mmio
            .into_iter()
            .map(|r| t::MmioRange {
                base: r.base,
                len: r.len,
            })
            .collect(),
        capabilities: m.capabilities.into_iter().map(cap_to_wit).collect(),
        tick_period_ms: m.tick_period_ms,
    }
}

fn event_from_wit(e: t::Event) -> Event {
    match e {
        t::Event::PortWrite(w) => Event::PortWrite {
            port: w.port,
            size: w.size,
            value: w.value,
        },
        t::Event::PortRead(r) => Event::PortRead {
            port: r.port,
            size: r.size,
        },
        t::Event::Lifecycle(l) => Event::Lifecycle(match l {
            t::Lifecycle::Paused => Lifecycle::Paused,
            t::Lifecycle::Resumed => Lifecycle::Resumed,
            t::Lifecycle::Migrated => Lifecycle::Migrated,
            t::Lifecycle::Restored => Lifecycle::Restored,
            t::Lifecycle::Shutdown => Lifecycle::Shutdown,
        }),
        t::Event::Tick(now_ns) => Event::Tick { now_ns },
        t::Event::MmioWrite(w) => Event::MmioWrite {
            addr: w.addr,
            size: w.size,
            value: w.value,
        },
        t::Event::MmioRead(r) => Event::MmioRead {
            addr: r.addr,
            size: r.size,
        },
        t::Event::NetFrames(b) => Event::NetFrames {
            now_ns: b.now_ns,
            frames: b
                .frames
                .into_iter()
                .map(|f| NetFrame {
                    src: addr_from_halves(f.src),
                    dst: addr_from_halves(f.dst),
                    len: f.len,
                    ethertype: f.ethertype,
                    src_port: f.src_port,
                    dst_port: f.dst_port,
                    protocol: f.protocol,
                    tcp_flags: f.tcp_flags,
                    direction: match f.direction {
                        t::NetDirection::Rx => NetFrame::RX,
                        t::NetDirection::Tx => NetFrame::TX,
                    },
                    reserved: [0; 3],
                })
                .collect(),
            dropped: b.dropped,
        },
    }
}

fn reply_to_wit(r: EventReply) -> t::EventReply {
    match r {
        EventReply::None => t::EventReply::None,
        EventReply::Value(v) => t::EventReply::Value(v),
    }
}

/// Installs the panic hook (once per instance): a panic's message goes to the host's log at
/// error level, starting with [`crate::PANIC_PREFIX`], just before the panic traps (Wasm has no
/// unwinding), and the host puts that line in the trap's error. Without it the caller would
/// only see "wasm 'unreachable' instruction executed".
fn panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            crate::host::log(LogLevel::Error, &crate::panic_line(info))
        }))
    });
}

/// `describe` export.
pub fn describe<S: Service>() -> t::Manifest {
    panic_hook();
    manifest_to_wit(S::manifest())
}

/// `attach` export (every instance is attached before any other call but `describe`).
pub fn attach<S: Service>(slot: &Slot<S>, config: String) -> Result<(), String> {
    panic_hook();
    slot.attach(&config)
}

/// `on-event` export.
pub fn on_event<S: Service>(slot: &Slot<S>, ev: t::Event) -> t::EventReply {
    reply_to_wit(slot.on_event(event_from_wit(ev)))
}

/// `detach` export.
pub fn detach<S: Service>(slot: &Slot<S>) -> Vec<u8> {
    slot.detach()
}

/// `resume-from` export.
pub fn resume_from<S: Service>(slot: &Slot<S>, state: Vec<u8>) -> Result<(), String> {
    slot.resume_from(&state)
}

/// `call` export.
pub fn call<S: Service>(slot: &Slot<S>, method: String, args: String) -> Result<String, String> {
    slot.call(&method, &args)
}

/// Host calls through the WIT imports.
pub(crate) mod imports {
    use super::*;

    pub fn vm_info() -> VmInfo {
        let i = h::vm_info();
        VmInfo {
            mem_bytes: i.mem_bytes,
            vcpus: i.vcpus,
            tsc_khz: i.tsc_khz,
        }
    }

    pub fn pause() -> Result<(), String> {
        h::pause()
    }

    pub fn resume() -> Result<(), String> {
        h::resume()
    }

    pub fn vcpu_regs(index: u32) -> Result<VcpuRegs, String> {
        let r = h::vcpu_regs(index)?;
        Ok(crate::copy_vcpu_regs!(VcpuRegs {
            gprs: r,
            cr: r,
            cpl: r.cpl,
        }))
    }

    pub fn read_memory(gpa: u64, len: u32) -> Result<Vec<u8>, String> {
        h::read_memory(gpa, len)
    }

    pub fn write_memory(gpa: u64, data: &[u8]) -> Result<(), String> {
        h::write_memory(gpa, data)
    }

    pub fn translate(cr3: u64, gva: u64) -> Result<Translation, String> {
        let t = h::translate(cr3, gva)?;
        Ok(Translation {
            present: t.present,
            gpa: t.gpa,
            page_size: t.page_size,
            writable: t.writable,
            user: t.user,
            executable: t.executable,
        })
    }

    pub fn dirty_bitmap() -> Result<Vec<u64>, String> {
        h::dirty_bitmap()
    }

    pub fn hash_pages(first: u64, count: u32) -> Result<Vec<u64>, String> {
        h::hash_pages(first, count)
    }

    pub fn zero_scan(first: u64, count: u32) -> Result<Vec<u64>, String> {
        h::zero_scan(first, count)
    }

    pub fn search_memory(
        start: u64,
        len: u64,
        pattern: &[u8],
        max_results: u32,
    ) -> Result<Vec<u64>, String> {
        h::search_memory(start, len, pattern, max_results)
    }

    pub fn claim_ports(base: u16, len: u16) -> Result<(), String> {
        h::claim_ports(base, len)
    }

    pub fn claim_mmio(base: u64, len: u64) -> Result<(), String> {
        h::claim_mmio(base, len)
    }

    pub fn log(level: LogLevel, msg: &str) {
        let l = match level {
            LogLevel::Error => t::LogLevel::Error,
            LogLevel::Warn => t::LogLevel::Warn,
            LogLevel::Info => t::LogLevel::Info,
            LogLevel::Debug => t::LogLevel::Debug,
            LogLevel::Trace => t::LogLevel::Trace,
        };
        h::log(l, msg)
    }

    pub fn metric(name: &str, value: f64) {
        h::metric(name, value)
    }

    pub fn notify(kind: &str, detail: &str) {
        h::notify(kind, detail)
    }

    pub fn now_ns() -> u64 {
        h::now_ns()
    }
}

/// Expands to the component exports for `$ty` (used by `export_service!`).
#[doc(hidden)]
#[macro_export]
macro_rules! __spanvmm_export_impl {
    ($ty:ty) => {
        static __SPANVMM_SLOT: $crate::Slot<$ty> = $crate::Slot::new();
        struct __SpanvmmExport;
        impl $crate::wasm::Guest for __SpanvmmExport {
            fn describe() -> $crate::wasm::WitManifest {
                $crate::wasm::describe::<$ty>()
            }
            fn attach(config: String) -> Result<(), String> {
                $crate::wasm::attach(&__SPANVMM_SLOT, config)
            }
            fn on_event(ev: $crate::wasm::WitEvent) -> $crate::wasm::WitEventReply {
                $crate::wasm::on_event(&__SPANVMM_SLOT, ev)
            }
            fn detach() -> Vec<u8> {
                $crate::wasm::detach(&__SPANVMM_SLOT)
            }
            fn resume_from(state: Vec<u8>) -> Result<(), String> {
                $crate::wasm::resume_from(&__SPANVMM_SLOT, state)
            }
            fn call(method: String, args: String) -> Result<String, String> {
                $crate::wasm::call(&__SPANVMM_SLOT, method, args)
            }
        }
        $crate::wasm::bindings::__spanvmm_wit_export!(
            __SpanvmmExport with_types_in $crate::wasm::bindings
        );
    };
}
