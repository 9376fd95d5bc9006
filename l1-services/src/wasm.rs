//! The Wasm runtime: wasmtime component model, typed bindings of `sdk/wit/service.wit`,
//! a precompiled-artifact cache keyed by content hash, `InstancePre` per component, the pooling
//! allocator, epoch interruption (per-call deadline) and a per-store memory limit.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};
use spanvmm_sdk as sdk;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline,
};

use crate::backend::{Backend, Budget, Fatal};
use crate::ctx::{lock, CallError, ServiceCtx};
use crate::error::ServiceError;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "service",
    });
}

use bindings::spanvmm::service::{agile as wa, host as wh, snapshot as ws, types as wt};
use bindings::{Service as WitService, ServicePre};

/// Settings of the Wasm runtime.
#[derive(Debug, Clone)]
pub(crate) struct WasmSettings {
    pub event_deadline: Duration,
    pub call_deadline: Duration,
    pub epoch_tick: Duration,
    pub memory_limit: usize,
    pub pooling: bool,
    pub max_services: u32,
}

/// Store data: the service context, its resource limits and the host time of the current call.
pub(crate) struct StoreState {
    ctx: Arc<ServiceCtx>,
    limits: StoreLimits,
    /// Time spent in host calls during the current call, ns.
    host_ns: u64,
    /// The current call's deadline in CPU time of the thread running it, ns.
    budget_ns: u64,
    /// The thread's CPU time at the call's first epoch tick (None before it).
    cpu0: Option<u64>,
    /// Epoch ticks seen during the current call, and the most it may take in wall time.
    ticks_seen: u64,
    wall_cap_ticks: u64,
    /// Deny-by-default WASI Preview 2 (clocks, random, stdout/stderr to the log).
    wasi: crate::wasi::WasiState,
    /// The growth `limits` last allowed, bytes: taken back if the growth then fails.
    pending_growth: u64,
}

/// The store's limits, plus the count of linear-memory bytes the service holds
/// (`ServiceCtx::memory_bytes`): wasmtime asks here for every memory's initial size and every
/// `memory.grow`, so the sum is exact without walking the instance's memories.
impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allow = self.limits.memory_growing(current, desired, maximum)?;
        if allow {
            self.pending_growth = desired.saturating_sub(current) as u64;
            self.ctx
                .memory_bytes
                .fetch_add(self.pending_growth, Ordering::Relaxed);
        }
        Ok(allow)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.ctx
            .memory_bytes
            .fetch_sub(std::mem::take(&mut self.pending_growth), Ordering::Relaxed);
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl wasmtime_wasi::WasiView for StoreState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// A call is interrupted after this many times its deadline in wall time even if its thread
/// got less CPU time than the deadline (a service that waits on something forever).
const WALL_FACTOR: u64 = 20;

/// CPU time the calling thread has used, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_THREAD_CPUTIME_ID always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Most host time one call gets credited back to its deadline: work the host does for a
/// service (a search through all of guest RAM) does not count against the service's own
/// deadline, up to this much.
const MAX_HOST_CREDIT_NS: u64 = 2_000_000_000;

impl StoreState {
    /// Runs a host call that may take a while, recording its duration.
    /// Runs a host call, timing it (the time is credited back to the service's deadline); its
    /// error becomes the WIT result's message here, at the edge.
    fn timed<T>(
        &mut self,
        f: impl FnOnce(&ServiceCtx) -> Result<T, CallError>,
    ) -> Result<T, String> {
        let t = std::time::Instant::now();
        let r = f(&self.ctx);
        self.host_ns += t.elapsed().as_nanos() as u64;
        r.map_err(String::from)
    }
}

/// The shared engine, linker, caches and epoch ticker of one manager.
pub(crate) struct WasmRuntime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache_dir: Option<PathBuf>,
    compat: String,
    pres: Mutex<HashMap<[u8; 32], ServicePre<StoreState>>>,
    settings: WasmSettings,
    event_ticks: u64,
    call_ticks: u64,
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.ticker.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a cache directory is not used.
#[derive(Debug, thiserror::Error)]
enum CacheDirError {
    /// It cannot be created or read.
    #[error("cannot use {dir}: {err}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// Someone else owns it.
    #[error("{dir} belongs to uid {owner}, not to us (uid {uid})")]
    NotOurs {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        uid: u32,
    },
}

/// A cache directory is used only when it is ours and nobody else can write to it: artifacts
/// in it are deserialized as trusted native code.
fn private_dir(dir: &Path) -> Result<(), CacheDirError> {
    let io = |err| CacheDirError::Io {
        dir: dir.to_path_buf(),
        err,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let meta = fs::metadata(dir).map_err(io)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(CacheDirError::NotOurs {
            dir: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).max(1)
}

impl WasmRuntime {
    pub(crate) fn new(cache_dir: &Path, settings: WasmSettings) -> Result<Self, ServiceError> {
        let rt = |e: wasmtime::Error| ServiceError::Runtime(format!("{e:#}"));
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .concurrency_support(false)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        // How linear memories are allocated: `SPANVMM_WASM_ALLOC=pooling|ondemand|thp`
        // overrides the setting, for the dispatch-cost comparison of docs/benchmarks.md
        // (`thp`: on-demand, memories on 2 MiB transparent huge pages, crate::wasm_mem).
        let alloc = std::env::var("SPANVMM_WASM_ALLOC").ok();
        let pooling = match alloc.as_deref() {
            Some("pooling") => true,
            Some("ondemand") => false,
            Some("thp") => {
                config
                    .with_host_memory(Arc::new(crate::wasm_mem::HugePageMemories {
                        reserve: settings.memory_limit,
                    }))
                    // Explicit bounds checks against the memory's size (crate::wasm_mem).
                    .memory_reservation(0)
                    .memory_guard_size(0)
                    .memory_reservation_for_growth(0)
                    // Copy-on-write images need wasmtime's own mappings.
                    .memory_init_cow(false);
                false
            }
            Some(other) => {
                return Err(ServiceError::Runtime(format!(
                    "SPANVMM_WASM_ALLOC={other}: expected pooling, ondemand or thp"
                )))
            }
            None => settings.pooling,
        };
        if pooling {
            let n = settings.max_services.max(1);
            let mut pool = PoolingAllocationConfig::new();
            // Components of language toolchains hold many core instances and tables
            // (componentize-py: 14 instances); slots cost little until used.
            pool.total_component_instances(n)
                .total_core_instances(n * 32)
                .total_memories(n * 2)
                .total_tables(n * 32)
                .max_memory_size(settings.memory_limit)
                .max_memories_per_component(2)
                .max_tables_per_component(32)
                .max_core_instances_per_component(32);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).map_err(rt)?;
        let mut linker = Linker::new(&engine);
        WitService::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
            .map_err(rt)?;
        // What standard toolchains import; everything that reaches outside is refused by the
        // store's WasiCtx (crate::wasi), not by leaving imports out.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(rt)?;
        let compat = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let cache_dir = match private_dir(cache_dir) {
            Ok(()) => Some(cache_dir.to_path_buf()),
            Err(e) => {
                tracing::warn!("not caching compiled services: {e}");
                None
            }
        };
        let event_ticks = ticks(settings.event_deadline, settings.epoch_tick);
        let call_ticks = ticks(settings.call_deadline, settings.epoch_tick);
        let (stop, rx) = mpsc::channel::<()>();
        let e2 = engine.clone();
        let tick = settings.epoch_tick;
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Service);
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
                    e2.increment_epoch();
                }
            })
            .map_err(|e| ServiceError::Runtime(format!("cannot start the epoch thread: {e}")))?;
        Ok(WasmRuntime {
            engine,
            linker,
            cache_dir,
            compat,
            pres: Mutex::new(HashMap::new()),
            settings,
            event_ticks,
            call_ticks,
            ticker: Some((stop, thread)),
        })
    }

    /// The compiled component for `bytes`: from the artifact cache when present, else compiled
    /// and stored there.
    fn component(
        &self,
        path: &Path,
        bytes: &[u8],
        digest: &[u8],
    ) -> Result<Component, ServiceError> {
        let load = |msg: String| ServiceError::Load {
            path: path.to_path_buf(),
            msg,
        };
        let cached = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{}.cwasm", hex(digest), self.compat)));
        // The artifact is read into memory rather than mapped (`deserialize_file`): a mapped
        // file truncated behind our back would kill the VMM with SIGBUS; a copy costs ~50 µs.
        if let Some((file, art)) = cached
            .as_ref()
            .and_then(|f| fs::read(f).ok().map(|a| (f, a)))
        {
            // SAFETY: the bytes come from our private cache directory (owned by us, not
            // writable by others, checked in `private_dir`), where only `precompile_component`
            // of an engine with the same compatibility hash (part of the name) writes, with an
            // atomic rename. wasmtime also checks the artifact's header against this engine.
            match unsafe { Component::deserialize(&self.engine, &art) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(
                        "dropping unusable cached artifact {}: {e:#}",
                        file.display()
                    );
                    let _ = fs::remove_file(file);
                }
            }
        }
        let artifact = self.engine.precompile_component(bytes).map_err(|e| {
            // A core module (version 1, layer 0) is the usual mistake: say what to do.
            let hint = if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
                " (this is a core WebAssembly module, not a component: build the service \
                     with `cargo build --target wasm32-wasip2`, see docs/plugin-guide.md)"
            } else {
                ""
            };
            load(format!("not a valid WebAssembly component: {e:#}{hint}"))
        })?;
        if let Some(file) = &cached {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let tmp = file.with_extension(format!(
                "tmp{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let written = fs::File::create(&tmp)
                .and_then(|mut f| f.write_all(&artifact).and_then(|_| f.sync_all()))
                .and_then(|_| fs::rename(&tmp, file));
            if let Err(e) = written {
                tracing::warn!("cannot cache compiled service at {}: {e}", file.display());
                let _ = fs::remove_file(&tmp);
            }
        }
        // SAFETY: `artifact` was produced just now by `precompile_component` of this engine.
        unsafe { Component::deserialize(&self.engine, &artifact) }
            .map_err(|e| load(format!("cannot load the compiled component: {e:#}")))
    }

    /// The names of what the component `bytes` imports (interfaces and functions), read from
    /// its type: `plugin inspect` shows them beside what the host offers.
    pub(crate) fn imports(&self, path: &Path, bytes: &[u8]) -> Result<Vec<String>, ServiceError> {
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let component = self.component(path, bytes, &digest)?;
        Ok(component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect())
    }

    fn pre(&self, path: &Path, bytes: &[u8]) -> Result<ServicePre<StoreState>, ServiceError> {
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(pre) = lock(&self.pres).get(&digest) {
            return Ok(pre.clone());
        }
        let component = self.component(path, bytes, &digest)?;
        let load = |what: &str, e: wasmtime::Error| ServiceError::Load {
            path: path.to_path_buf(),
            msg: format!("{what}: {e:#}"),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load(
                "its imports are neither spanvmm:service@0.1.0 nor the WASI Preview 2 the host offers",
                e,
            ))?;
        let pre = ServicePre::new(pre).map_err(|e| {
            load(
                "it does not export the spanvmm:service@0.1.0 `service` world",
                e,
            )
        })?;
        lock(&self.pres).insert(digest, pre.clone());
        Ok(pre)
    }

    /// Instantiates the component `bytes` (read from `path`, checked by the manager) for a
    /// service with context `ctx`.
    pub(crate) fn instantiate(
        &self,
        path: &Path,
        bytes: &[u8],
        ctx: Arc<ServiceCtx>,
    ) -> Result<WasmService, ServiceError> {
        let pre = self.pre(path, bytes)?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.settings.memory_limit)
            .table_elements(1 << 20)
            .instances(64)
            .tables(64)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            StoreState {
                wasi: crate::wasi::deny_by_default(&ctx),
                ctx,
                limits,
                host_ns: 0,
                budget_ns: self.settings.call_deadline.as_nanos() as u64,
                cpu0: None,
                ticks_seen: 0,
                wall_cap_ticks: self.call_ticks * WALL_FACTOR,
                pending_growth: 0,
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        let tick_ns = (self.settings.epoch_tick.as_nanos() as u64).max(1);
        // Every epoch tick during a call: the deadline is the CPU time of the thread running
        // the call, less the time spent in host functions (bounded): a service descheduled by
        // a busy host, or one whose garbage collector pauses while both cores are taken, is
        // not charged for the wait. A call that ran less than a tick never gets here.
        store.epoch_deadline_callback(move |mut cx| {
            let s = cx.data_mut();
            s.ticks_seen += 1;
            let now = thread_cpu_ns();
            let cpu0 = *s.cpu0.get_or_insert(now);
            let credit = s.host_ns.min(MAX_HOST_CREDIT_NS);
            // Before the first tick the call ran at most one tick: count it whole.
            let used = (now.saturating_sub(cpu0) + tick_ns).saturating_sub(credit);
            let wall_cap = s.wall_cap_ticks + credit / tick_ns;
            if used >= s.budget_ns || s.ticks_seen >= wall_cap {
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        let bindings = pre
            .instantiate(&mut store)
            .map_err(|e| ServiceError::Load {
                path: path.to_path_buf(),
                msg: format!("instantiation failed: {e:#}"),
            })?;
        Ok(WasmService {
            store,
            bindings,
            event_ticks: self.event_ticks,
            call_ticks: self.call_ticks,
            event_ms: self.settings.event_deadline.as_millis() as u64,
            call_ms: self.settings.call_deadline.as_millis() as u64,
            memory_mib: self.settings.memory_limit >> 20,
        })
    }
}

/// One instantiated Wasm service.
pub(crate) struct WasmService {
    store: Store<StoreState>,
    bindings: WitService,
    event_ticks: u64,
    call_ticks: u64,
    event_ms: u64,
    call_ms: u64,
    memory_mib: usize,
}

impl WasmService {
    fn arm(&mut self, budget: Budget) {
        let (t, ms) = match budget {
            Budget::Event => (self.event_ticks, self.event_ms),
            Budget::Control => (self.call_ticks, self.call_ms),
        };
        let d = self.store.data_mut();
        d.host_ns = 0;
        d.budget_ns = ms * 1_000_000;
        d.cpu0 = None;
        d.ticks_seen = 0;
        d.wall_cap_ticks = t * WALL_FACTOR;
        // A panic line from an earlier call that did not trap is not this call's.
        d.ctx.take_panic();
        self.store.set_epoch_deadline(1);
    }

    fn fatal(&self, what: &str, budget: Budget, e: wasmtime::Error) -> Fatal {
        let ms = match budget {
            Budget::Event => self.event_ms,
            Budget::Control => self.call_ms,
        };
        if let Some(trap) = e.downcast_ref::<Trap>() {
            if *trap == Trap::Interrupt {
                return Fatal(format!(
                    "{what} exceeded its {ms} ms deadline and was interrupted"
                ));
            }
            // A Rust panic logs its message (the SDK's hook) just before it traps.
            if let Some(line) = self.store.data().ctx.take_panic() {
                return Fatal(format!("{what} {line} (trap: {trap})"));
            }
            return Fatal(format!("{what} trapped: {trap}"));
        }
        let msg = format!("{e:#}");
        if msg.contains("growing memory") || msg.contains("memory growth") {
            return Fatal(format!(
                "{what} exceeded the {} MiB memory limit ({msg})",
                self.memory_mib
            ));
        }
        Fatal(format!("{what} failed: {msg}"))
    }
}

fn manifest_from_wit(m: wt::Manifest) -> sdk::Manifest {
    sdk::Manifest {
        name: m.name,
        version: m.version,
        abi_version: m.abi_version,
        events: m
            .events
            .into_iter()
            .map(|k| match k {
                wt::EventKind::PortWrite => sdk::EventKind::PortWrite,
                wt::EventKind::PortRead => sdk::EventKind::PortRead,
                wt::EventKind::Lifecycle => sdk::EventKind::Lifecycle,
                wt::EventKind::Tick => sdk::EventKind::Tick,
                wt::EventKind::MmioWrite => sdk::EventKind::MmioWrite,
                wt::EventKind::MmioRead => sdk::EventKind::MmioRead,
                wt::EventKind::NetFrames => sdk::EventKind::NetFrames,
            })
            .collect(),
        ports: m
            .ports
            .into_iter()
            .map(|p| sdk::PortRange::new(p.base, p.len))
            .collect(),
        mmio: m
            .mmio
            .into_iter()
            .map(|r| sdk::MmioRange::new(r.base, r.len))
            .collect(),
        capabilities: m
            .capabilities
            .into_iter()
            .map(|c| match c {
                wt::Capability::MemoryRead => sdk::Capability::MemoryRead,
                wt::Capability::MemoryWrite => sdk::Capability::MemoryWrite,
                wt::Capability::VcpuState => sdk::Capability::VcpuState,
                wt::Capability::PauseResume => sdk::Capability::PauseResume,
                wt::Capability::DirtyLog => sdk::Capability::DirtyLog,
                wt::Capability::DrivesMigration => sdk::Capability::DrivesMigration,
                wt::Capability::Snapshot => sdk::Capability::Snapshot,
                wt::Capability::EvictMemory => sdk::Capability::EvictMemory,
            })
            .collect(),
        tick_period_ms: m.tick_period_ms,
    }
}

fn event_to_wit(ev: &sdk::Event) -> wt::Event {
    match *ev {
        sdk::Event::PortWrite { port, size, value } => {
            wt::Event::PortWrite(wt::PortWrite { port, size, value })
        }
        sdk::Event::PortRead { port, size } => wt::Event::PortRead(wt::PortRead { port, size }),
        sdk::Event::Lifecycle(l) => wt::Event::Lifecycle(match l {
            sdk::Lifecycle::Paused => wt::Lifecycle::Paused,
            sdk::Lifecycle::Resumed => wt::Lifecycle::Resumed,
            sdk::Lifecycle::Migrated => wt::Lifecycle::Migrated,
            sdk::Lifecycle::Restored => wt::Lifecycle::Restored,
            sdk::Lifecycle::Shutdown => wt::Lifecycle::Shutdown,
        }),
        sdk::Event::Tick { now_ns } => wt::Event::Tick(now_ns),
        sdk::Event::MmioWrite { addr, size, value } => {
            wt::Event::MmioWrite(wt::MmioWrite { addr, size, value })
        }
        sdk::Event::MmioRead { addr, size } => wt::Event::MmioRead(wt::MmioRead { addr, size }),
        sdk::Event::NetFrames {
            now_ns,
            ref frames,
            dropped,
        } => wt::Event::NetFrames(wt::NetFrames {
            now_ns,
            frames: frames
                .iter()
                .map(|f| wt::NetFrame {
                    direction: if f.direction == sdk::NetFrame::TX {
                        wt::NetDirection::Tx
                    } else {
                        wt::NetDirection::Rx
                    },
                    len: f.len,
                    ethertype: f.ethertype,
                    protocol: f.protocol,
                    src: sdk::types::addr_to_halves(&f.src),
                    dst: sdk::types::addr_to_halves(&f.dst),
                    src_port: f.src_port,
                    dst_port: f.dst_port,
                    tcp_flags: f.tcp_flags,
                })
                .collect(),
            dropped,
        }),
    }
}

impl Backend for WasmService {
    fn describe(&mut self) -> Result<sdk::Manifest, Fatal> {
        self.arm(Budget::Control);
        match self.bindings.call_describe(&mut self.store) {
            Ok(m) => Ok(manifest_from_wit(m)),
            Err(e) => Err(self.fatal("describe", Budget::Control, e)),
        }
    }

    fn attach(&mut self, config: &str) -> Result<Result<(), String>, Fatal> {
        self.arm(Budget::Control);
        self.bindings
            .call_attach(&mut self.store, config)
            .map_err(|e| self.fatal("attach", Budget::Control, e))
    }

    fn on_event(&mut self, ev: &sdk::Event) -> Result<sdk::EventReply, Fatal> {
        self.arm(Budget::Event);
        match self
            .bindings
            .call_on_event(&mut self.store, &event_to_wit(ev))
        {
            Ok(wt::EventReply::None) => Ok(sdk::EventReply::None),
            Ok(wt::EventReply::Value(v)) => Ok(sdk::EventReply::Value(v)),
            Err(e) => Err(self.fatal("on-event", Budget::Event, e)),
        }
    }

    fn detach(&mut self) -> Result<Vec<u8>, Fatal> {
        self.arm(Budget::Control);
        self.bindings
            .call_detach(&mut self.store)
            .map_err(|e| self.fatal("detach", Budget::Control, e))
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<Result<(), String>, Fatal> {
        self.arm(Budget::Control);
        self.bindings
            .call_resume_from(&mut self.store, state)
            .map_err(|e| self.fatal("resume-from", Budget::Control, e))
    }

    fn call(&mut self, method: &str, args: &str) -> Result<Result<String, String>, Fatal> {
        self.arm(Budget::Control);
        self.bindings
            .call_call(&mut self.store, method, args)
            .map_err(|e| self.fatal("call", Budget::Control, e))
    }
}

impl wt::Host for StoreState {}

fn level_from_wit(l: wt::LogLevel) -> sdk::LogLevel {
    match l {
        wt::LogLevel::Error => sdk::LogLevel::Error,
        wt::LogLevel::Warn => sdk::LogLevel::Warn,
        wt::LogLevel::Info => sdk::LogLevel::Info,
        wt::LogLevel::Debug => sdk::LogLevel::Debug,
        wt::LogLevel::Trace => sdk::LogLevel::Trace,
    }
}

impl wh::Host for StoreState {
    fn vm_info(&mut self) -> wt::VmDetails {
        let i = self.ctx.vm_info();
        wt::VmDetails {
            mem_bytes: i.mem_bytes,
            vcpus: i.vcpus,
            tsc_khz: i.tsc_khz,
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        self.timed(|c| c.pause())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.timed(|c| c.resume())
    }

    fn vcpu_regs(&mut self, index: u32) -> Result<wt::VcpuRegisters, String> {
        let r = self.timed(|c| c.vcpu_regs(index))?;
        Ok(spanvmm_sdk::copy_vcpu_regs!(wt::VcpuRegisters {
            gprs: r,
            cr: r,
            cpl: r.cpl,
        }))
    }

    fn read_memory(&mut self, gpa: u64, len: u32) -> Result<Vec<u8>, String> {
        self.timed(|c| c.read_memory(gpa, len))
    }

    fn write_memory(&mut self, gpa: u64, data: Vec<u8>) -> Result<(), String> {
        self.timed(|c| c.write_memory(gpa, &data))
    }

    fn translate(&mut self, cr3: u64, gva: u64) -> Result<wt::Translation, String> {
        let t = self.timed(|c| c.translate(cr3, gva))?;
        Ok(wt::Translation {
            present: t.present,
            gpa: t.gpa,
            page_size: t.page_size,
            writable: t.writable,
            user: t.user,
            executable: t.executable,
        })
    }

    fn dirty_bitmap(&mut self) -> Result<Vec<u64>, String> {
        self.timed(|c| c.dirty_bitmap())
    }

    fn hash_pages(&mut self, first: u64, count: u32) -> Result<Vec<u64>, String> {
        self.timed(|c| c.hash_pages(first, count))
    }

    fn zero_scan(&mut self, first: u64, count: u32) -> Result<Vec<u64>, String> {
        self.timed(|c| c.zero_scan(first, count))
    }

    fn search_memory(
        &mut self,
        start: u64,
        len: u64,
        pattern: Vec<u8>,
        max_results: u32,
    ) -> Result<Vec<u64>, String> {
        self.timed(|c| c.search_memory(start, len, &pattern, max_results))
    }

    fn claim_ports(&mut self, base: u16, len: u16) -> Result<(), String> {
        Ok(self.ctx.claim_ports(base, len)?)
    }

    fn claim_mmio(&mut self, base: u64, len: u64) -> Result<(), String> {
        Ok(self.ctx.claim_mmio(base, len)?)
    }

    fn log(&mut self, level: wt::LogLevel, msg: String) {
        self.ctx.log(level_from_wit(level), &msg)
    }

    fn metric(&mut self, name: String, value: f64) {
        self.ctx.metric(&name, value)
    }

    fn notify(&mut self, kind: String, detail: String) {
        self.ctx.notify(&kind, &detail)
    }

    fn now_ns(&mut self) -> u64 {
        self.ctx.now_ns()
    }
}

use bindings::spanvmm::service::migration as wm;

fn phase_to_wit(p: crate::migration::Phase) -> wm::Phase {
    use crate::migration::Phase;
    match p {
        Phase::Precopy => wm::Phase::Precopy,
        Phase::Postcopy => wm::Phase::Postcopy,
        Phase::Recovering => wm::Phase::Recovering,
        Phase::Completed => wm::Phase::Completed,
        Phase::Failed => wm::Phase::Failed,
    }
}

impl wm::Host for StoreState {
    fn harvest_dirty(&mut self) -> Result<Vec<u64>, String> {
        self.timed(|c| c.migration_harvest())
    }

    fn set_encoding(&mut self, e: wm::Encoding) -> Result<(), String> {
        let enc = crate::migration::cnet::Encoding {
            redundancy: e.redundancy,
            deltas: e.deltas,
            cache_bytes: e.cache_bytes,
            blocks: e.blocks,
        };
        self.timed(|c| {
            c.migration("set-encoding")?
                .set_encoding(enc)
                .map_err(|e| CallError::Refused(e.to_string()))
        })
    }

    fn set_scatter(&mut self, config: String) -> Result<(), String> {
        self.timed(|c| c.migration_set_scatter(&config))
    }

    fn throttle_vcpus(&mut self, percent: u32) -> Result<(), String> {
        self.timed(|c| c.migration_throttle(percent))
    }

    fn queue_pages(&mut self, bitmap: Vec<u64>, round: u32) -> Result<u64, String> {
        self.timed(|c| {
            c.migration("queue-pages")?
                .queue_bitmap(&bitmap, round)
                .map_err(|e| CallError::Refused(e.to_string()))
        })
    }

    fn queue_range(
        &mut self,
        first: u64,
        count: u64,
        urgent: bool,
        round: u32,
    ) -> Result<(), String> {
        self.timed(|c| {
            c.migration("queue-range")?
                .queue_range(first, count, urgent, round)
                .map_err(|e| CallError::Refused(e.to_string()))
        })
    }

    fn switch_over(&mut self, mode: wm::SwitchMode) -> Result<(), String> {
        use crate::migration::SwitchMode;
        let mode = match mode {
            wm::SwitchMode::StopAndCopy => SwitchMode::StopAndCopy,
            wm::SwitchMode::Postcopy => SwitchMode::Postcopy,
        };
        self.timed(|c| c.migration_switch(mode))
    }

    fn take_faults(&mut self) -> Vec<u64> {
        self.ctx
            .migration("take-faults")
            .map(|m| m.take_faults())
            .unwrap_or_default()
    }

    fn progress(&mut self) -> Result<wm::Status, String> {
        let p = self.ctx.migration("progress")?.progress().status;
        Ok(wm::Status {
            phase: phase_to_wit(p.phase),
            pages_total: p.pages_total,
            pages_pending: p.pages_pending,
            pages_sent: p.pages_sent,
            bytes_sent: p.bytes_sent,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            pages_needed: p.pages_needed,
            remote_faults: p.remote_faults,
            elapsed_ms: p.elapsed_ms,
            error: p.error,
        })
    }
}

impl ws::Host for StoreState {
    fn begin(&mut self, o: ws::LayerOptions) -> Result<u32, String> {
        let req = crate::snapshot::LayerRequest {
            dir: o.dir,
            parent: o.parent,
            key_file: o.key_file,
            expires_in_s: o.expires_in_s,
        };
        self.timed(|c| c.snapshot_begin(req))
    }

    fn write_pages(&mut self, job: u32, bitmap: Vec<u64>) -> Result<(), String> {
        self.timed(|c| c.snapshot_write_pages(job, bitmap))
    }

    fn commit(&mut self, job: u32) -> Result<(), String> {
        self.timed(|c| c.snapshot_commit(job))
    }

    fn status(&mut self, job: u32) -> Result<ws::JobStatus, String> {
        let s = self.ctx.snapshot_status(job)?;
        Ok(ws::JobStatus {
            layer_id: s.layer_id,
            pending: s.pending,
            rounds: s.rounds,
            bytes_written: s.bytes_written,
            copied: s.copied,
            committed: s.committed,
            error: s.error,
        })
    }

    fn close(&mut self, job: u32) {
        self.ctx.snapshot_close(job)
    }

    fn merge(&mut self, top: String, out: String, key_file: Option<String>) -> Result<u32, String> {
        let req = crate::snapshot::MergeRequest { top, out, key_file };
        self.timed(|c| c.snapshot_merge(req))
    }

    fn remove(&mut self, dir: String) -> Result<(), String> {
        self.timed(|c| c.snapshot_remove(&dir))
    }
}

impl wa::Host for StoreState {
    fn open(&mut self, config: String) -> Result<(), String> {
        self.timed(|c| c.agile_open(&config))
    }

    fn park(&mut self, bitmap: Vec<u64>) -> Result<String, String> {
        self.timed(|c| c.agile_park(bitmap))
    }

    fn report(&mut self) -> Result<String, String> {
        self.timed(|c| c.agile_report())
    }

    fn close(&mut self) -> Result<(), String> {
        self.timed(|c| c.agile_close())
    }
}
