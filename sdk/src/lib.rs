//! spanvmm-sdk: write an L1 service once, build it as a Wasm component (sandboxed, the default)
//! and as a native shared object (trusted, for hot paths).
//!
//! ```ignore
//! use spanvmm_sdk::{export_service, host, Event, EventKind, EventReply, Manifest, Service};
//!
//! #[derive(Default)]
//! struct Hello { writes: u64 }
//!
//! impl Service for Hello {
//!     fn manifest() -> Manifest {
//!         Manifest::new("hello", "0.1.0").events(&[EventKind::PortWrite]).port_range(0x600, 1)
//!     }
//!     fn attach(&mut self, _config: &str) -> Result<(), String> { Ok(()) }
//!     fn on_event(&mut self, _ev: Event) -> EventReply { self.writes += 1; EventReply::None }
//! }
//!
//! export_service!(Hello);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2` for a component, or for the host target for
//! a `cdylib`; see `docs/plugin-guide.md`.

#![deny(missing_docs)]

extern crate self as spanvmm_sdk;

pub mod abi;
pub mod agile;
pub mod call;
pub mod host;
pub mod hostif;
pub mod migration;
pub mod snapshot;
pub mod types;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod native;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Takes the boilerplate out of `impl Service for T`: a typed `attach` config, `#[method]`
/// functions dispatched from `call` with typed arguments and JSON results, `#[service(state)]`
/// for a serde state hand-over, and the export. See [`call`] for what it expands to.
///
/// ```ignore
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { writes: u64 }
///
/// #[derive(Deserialize)]
/// struct Config { port: u16 }
///
/// #[spanvmm_sdk::service(state)]
/// impl Service for Counter {
///     fn manifest() -> Manifest { Manifest::new("counter", "0.1.0").events(&[EventKind::PortWrite]) }
///     fn attach(&mut self, cfg: Config) -> Result<(), String> { host::claim_ports(cfg.port, 1) }
///     fn on_event(&mut self, _: Event) -> EventReply { self.writes += 1; EventReply::None }
///     #[method]
///     fn stats(&self) -> u64 { self.writes }
///     #[method(name = "add")]
///     fn add_writes(&mut self, n: u64) -> Result<u64, String> { self.writes += n; Ok(self.writes) }
/// }
/// ```
pub use spanvmm_sdk_macros::service;

/// How the SDK's panic hook starts the line it logs at error level before a Wasm service traps:
/// the host attaches that line to the trap's error, so the panic's message reaches the caller.
pub const PANIC_PREFIX: &str = "panicked at ";

/// Logs at `error` level through [`host::log`], formatting like `format!`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::host::log($crate::LogLevel::Error, &::std::format!($($arg)*)) };
}

/// Logs at `warn` level through [`host::log`], formatting like `format!`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::host::log($crate::LogLevel::Warn, &::std::format!($($arg)*)) };
}

/// Logs at `info` level through [`host::log`], formatting like `format!`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::host::log($crate::LogLevel::Info, &::std::format!($($arg)*)) };
}

/// Logs at `debug` level through [`host::log`], formatting like `format!`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::host::log($crate::LogLevel::Debug, &::std::format!($($arg)*)) };
}

/// Logs at `trace` level through [`host::log`], formatting like `format!`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::host::log($crate::LogLevel::Trace, &::std::format!($($arg)*)) };
}

/// A panic's payload and place as one line, `panicked at FILE:LINE:COL: MESSAGE`.
pub fn panic_line(info: &std::panic::PanicHookInfo<'_>) -> String {
    let p = info.payload();
    let msg = p
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    match info.location() {
        Some(l) => format!(
            "{PANIC_PREFIX}{}:{}:{}: {msg}",
            l.file(),
            l.line(),
            l.column()
        ),
        None => format!("{PANIC_PREFIX}(unknown place): {msg}"),
    }
}

pub use types::{
    Capability, Event, EventKind, EventReply, Lifecycle, LogLevel, Manifest, MmioRange, NetFrame,
    PortRange, Translation, VcpuRegs, VmInfo,
};

/// Version of the service interface: the `abi-version` of the WIT manifest and the value the
/// native `spanvmm_service_abi_version()` returns. The host refuses any other.
pub const ABI_VERSION: u32 = 1;

/// An L1 service. One value of the type lives from `attach` to `detach`; the host serializes
/// calls into it, so `&mut self` needs no locking.
pub trait Service: Default + Send + 'static {
    /// Who the service is and what it claims (called before `attach`; no host calls here).
    fn manifest() -> Manifest;

    /// Starts the service; `config` is free form (JSON by convention). Ports may be claimed
    /// here with [`host::claim_ports`].
    fn attach(&mut self, config: &str) -> Result<(), String>;

    /// Handles one subscribed event. Port events run on a vCPU thread: keep them short.
    fn on_event(&mut self, _event: Event) -> EventReply {
        EventReply::None
    }

    /// Stops the service; the returned bytes go to a successor's [`Service::resume_from`].
    fn detach(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes over a predecessor's state (called after `attach`).
    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err("this service does not take over state".into())
        }
    }

    /// A control-API command; arguments and result are JSON by convention.
    fn call(&mut self, method: &str, _args: &str) -> Result<String, String> {
        Err(format!("unknown method {method:?}"))
    }
}

/// The one live value of a service type (used by the glue `export_service!` generates).
#[doc(hidden)]
pub struct Slot<S>(std::sync::Mutex<Option<S>>);

impl<S: Service> Default for Slot<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Service> Slot<S> {
    /// An empty slot.
    pub const fn new() -> Self {
        Slot(std::sync::Mutex::new(None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<S>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `attach`: creates the value and starts it.
    pub fn attach(&self, config: &str) -> Result<(), String> {
        let mut g = self.lock();
        if g.is_some() {
            return Err("the service is already attached".into());
        }
        let mut s = S::default();
        s.attach(config)?;
        *g = Some(s);
        Ok(())
    }

    /// `on-event`.
    pub fn on_event(&self, ev: Event) -> EventReply {
        match self.lock().as_mut() {
            Some(s) => s.on_event(ev),
            None => EventReply::None,
        }
    }

    /// `detach`: stops and drops the value.
    pub fn detach(&self) -> Vec<u8> {
        let s = self.lock().take();
        s.map(|mut s| s.detach()).unwrap_or_default()
    }

    /// `resume-from`.
    pub fn resume_from(&self, state: &[u8]) -> Result<(), String> {
        match self.lock().as_mut() {
            Some(s) => s.resume_from(state),
            None => Err("the service is not attached".into()),
        }
    }

    /// `call`.
    pub fn call(&self, method: &str, args: &str) -> Result<String, String> {
        match self.lock().as_mut() {
            Some(s) => s.call(method, args),
            None => Err("the service is not attached".into()),
        }
    }
}

/// Exports `$ty` (a [`Service`]) as a spanvmm service: the component exports of the WIT world
/// on `wasm32`, the `spanvmm_service_*` C ABI symbols elsewhere. Use it once per plugin crate.
#[macro_export]
macro_rules! export_service {
    ($ty:ty) => {
        const _: () = {
            $crate::__spanvmm_export_impl!($ty);
        };
    };
}
