//! The service manager: attach, detach and replace services beneath a running VM, route events
//! to their owners (Span ownership of ports, MMIO ranges and exclusive capabilities), and
//! contain services
//! that misbehave.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use spanvmm_sdk::{
    Capability, Event, EventKind, EventReply, Lifecycle, Manifest, MmioRange, PortRange,
};

use crate::backend::{Backend, Fatal};
use crate::ctx::{lock, ClaimSession, DirtyFanout, HostShared, Notifications, ServiceCtx};
use crate::error::ServiceError;
use crate::service_state::ServiceRecord;
use base_vmm::state::Section;

/// Why a snapshot or migration records the service that drives it without its state.
pub const DRIVES_THIS_OPERATION: &str = "drives this operation";
use crate::host::VmHost;
use crate::native::NativeService;
use crate::trust::{FileRules, TrustedFile, MAX_SERVICE_FILE_BYTES};
use crate::wasm::{WasmRuntime, WasmSettings};

/// Knobs of a [`ServiceManager`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Deadline of one event delivery (port, lifecycle, tick) to a Wasm service.
    pub event_deadline: Duration,
    /// Deadline of one control call (describe, attach, call, detach, resume-from) to a Wasm
    /// service.
    pub call_deadline: Duration,
    /// Granularity of the deadlines (the epoch tick).
    pub epoch_tick: Duration,
    /// Linear-memory limit of one Wasm service.
    pub memory_limit: usize,
    /// Most services attached at once.
    pub max_services: usize,
    /// Use wasmtime's pooling allocator (faster instantiation, memory reserved up front).
    pub pooling: bool,
    /// Which service files the operator allows (plugin directories, native services, hashes).
    pub policy: PluginPolicy,
}

/// The operator's rules for service files, fixed when the manager is created (`spanvmm run
/// --plugin-dir DIR --no-native-plugins --plugin-sha256 HEX`). Whatever the policy, a service
/// file must be a regular file of at most [`MAX_SERVICE_FILE_BYTES`], and a native one must
/// pass [`crate::trust::check_trusted_file`]'s owner and mode checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginPolicy {
    /// When not empty, only files under these directories (canonical paths) are loaded, and
    /// Wasm components there get the owner and mode checks of native code too.
    pub dirs: Vec<PathBuf>,
    /// Refuse every native (`.so`) service.
    pub no_native: bool,
    /// When not empty, only files with one of these SHA-256 digests are loaded.
    pub sha256: Vec<[u8; 32]>,
}

impl PluginPolicy {
    /// A policy from the operator's options: each directory must exist (it is canonicalized:
    /// symlinks and `..` resolved), each hash must be 64 hex digits.
    pub fn new(dirs: &[PathBuf], no_native: bool, sha256: &[String]) -> Result<Self, String> {
        let dirs = dirs
            .iter()
            .map(|d| {
                let c = std::fs::canonicalize(d)
                    .map_err(|e| format!("plugin directory {}: {e}", d.display()))?;
                if !c.is_dir() {
                    return Err(format!("plugin directory {}: not a directory", d.display()));
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let sha256 = sha256
            .iter()
            .map(|h| crate::trust::parse_sha256(h).map_err(|e| format!("--plugin-sha256: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(PluginPolicy {
            dirs,
            no_native,
            sha256,
        })
    }

    /// Whether anything is restricted beyond the defaults.
    pub fn is_default(&self) -> bool {
        *self == PluginPolicy::default()
    }
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            event_deadline: Duration::from_millis(50),
            call_deadline: Duration::from_millis(100),
            epoch_tick: Duration::from_millis(5),
            // A JavaScript service (StarlingMonkey) settles at ~70 MiB under a sustained event
            // storm: its GC heap grows to SpiderMonkey's collection thresholds before it is
            // reused (docs/benchmarks.md). 64 MiB detached it; the limit is address space
            // reserved per service, not memory used.
            memory_limit: 128 << 20,
            max_services: 16,
            pooling: true,
            policy: PluginPolicy::default(),
        }
    }
}

/// How a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// A Wasm component in wasmtime (sandboxed).
    Wasm,
    /// A native shared object (trusted).
    Native,
}

impl ServiceKind {
    /// The kind a plugin file has, by extension: `.wasm` or `.so`.
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".wasm") {
            Some(ServiceKind::Wasm)
        } else if name.ends_with(".so") || name.contains(".so.") {
            Some(ServiceKind::Native)
        } else {
            None
        }
    }
}

/// Whether a listed service is working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum ServiceState {
    /// Attached and receiving events.
    Attached,
    /// Detached by the manager after a failure.
    Failed {
        /// What happened.
        reason: String,
    },
}

/// Counters of one service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStats {
    /// Events delivered.
    pub events: u64,
    /// Control-API calls served.
    pub calls: u64,
    /// Time spent inside the service's event handler, ns (estimated from one event in 16).
    pub event_ns: u64,
    /// Port writes queued because the service was waiting on vCPUs (delivered later).
    pub deferred: u64,
    /// Handler time of the timed events (one in 16), cumulative counts per upper bound in
    /// [`EVENT_NS_BOUNDS`] (the last: every timed event).
    pub event_ns_buckets: Vec<u64>,
    /// Sum of the timed events' handler times, ns.
    pub event_ns_timed_sum: u64,
    /// Bytes of Wasm linear memory the service holds (it never shrinks; 0 for native).
    pub memory_bytes: u64,
}

/// Upper bounds of the handler-time histogram's buckets, ns (then +Inf). An exit costs
/// 15-170 µs here: the interesting part is the few µs a handler adds.
pub const EVENT_NS_BOUNDS: [u64; 10] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// A histogram of handler times, filled from any thread.
#[derive(Default)]
struct NsHistogram {
    buckets: [AtomicU64; EVENT_NS_BOUNDS.len() + 1],
    sum: AtomicU64,
}

impl NsHistogram {
    fn observe(&self, ns: u64) {
        let i = EVENT_NS_BOUNDS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, the last being the total.
    fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect()
    }
}

/// A service detached for a hand-over, with what it takes to attach it again elsewhere.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HandedService {
    /// Its name (from its manifest).
    #[serde(default)]
    pub name: String,
    /// Plugin file.
    pub path: PathBuf,
    /// Its attach configuration.
    pub config: String,
    /// Its port writes were delivered asynchronously.
    #[serde(default)]
    pub async_port_writes: bool,
    /// Its attach set the tick period (see [`AttachOptions`]).
    #[serde(default)]
    pub tick_period_ms: Option<u32>,
    /// The state it handed back.
    pub state: Vec<u8>,
}

/// A service as `list` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    /// Port writes are delivered asynchronously (see [`AttachOptions`]).
    pub async_port_writes: bool,
    /// Name from the manifest.
    pub name: String,
    /// Version from the manifest.
    pub version: String,
    /// Wasm or native.
    pub kind: ServiceKind,
    /// Plugin file.
    pub path: PathBuf,
    /// Attached or failed.
    #[serde(flatten)]
    pub state: ServiceState,
    /// Subscribed event classes.
    pub events: Vec<EventKind>,
    /// Owned ports (manifest plus claims made during attach).
    pub ports: Vec<PortRange>,
    /// Owned MMIO ranges (manifest plus claims made during attach).
    pub mmio: Vec<MmioRange>,
    /// Granted capabilities.
    pub capabilities: Vec<Capability>,
    /// Tick period, ms (0: none).
    pub tick_period_ms: u32,
    /// Wall-clock attach time, ms since the Unix epoch.
    pub attached_at_ms: u64,
    /// How long attach took (load, compile or cache hit, instantiate, describe, attach), µs.
    pub attach_us: u64,
    /// Counters.
    pub stats: ServiceStats,
    /// Metrics the service recorded.
    pub metrics: BTreeMap<String, f64>,
}

impl ServiceInfo {
    /// A service a restored or arrived VM's state names that is not back, listed as failed
    /// with why (`path` is empty when it declined to save its state).
    fn missing(name: &str, path: &Path, why: &str) -> Self {
        let wasm = path.extension().is_some_and(|e| e == "wasm");
        ServiceInfo {
            async_port_writes: false,
            name: name.to_string(),
            version: String::new(),
            kind: if wasm {
                ServiceKind::Wasm
            } else {
                ServiceKind::Native
            },
            path: path.to_path_buf(),
            state: ServiceState::Failed {
                reason: why.to_string(),
            },
            events: Vec::new(),
            ports: Vec::new(),
            mmio: Vec::new(),
            capabilities: Vec::new(),
            tick_period_ms: 0,
            attached_at_ms: now_ms(),
            attach_us: 0,
            stats: ServiceStats::default(),
            metrics: BTreeMap::new(),
        }
    }
}

/// What [`ServiceManager::inspect`] found in a service file.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub file: PathBuf,
    /// Wasm component or native object (by its extension); none for another extension.
    pub kind: Option<ServiceKind>,
    /// The interface version this host speaks (the manifest's `abi_version` must equal it).
    pub host_abi_version: u32,
    /// Whether `attach` would load it (ports and names of other services aside).
    pub loadable: bool,
    /// Why it cannot be loaded.
    pub reason: Option<String>,
    /// Its manifest (name, version, ABI version, events, ports, MMIO, capabilities, tick
    /// period), when `describe` answered.
    pub manifest: Option<Manifest>,
    /// What a Wasm component imports (WIT interfaces), when it is a component.
    pub imports: Option<Vec<String>>,
}

/// A service loaded and described, not attached yet.
struct Loaded {
    t0: Instant,
    id: u64,
    ctx: Arc<ServiceCtx>,
    backend: Box<dyn Backend>,
    kind: ServiceKind,
    manifest: Manifest,
}

/// Options of [`ServiceManager::replace_with`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplaceOptions {
    /// The replacement may be a service of another name (it takes the old one's place, config
    /// and state all the same). Without it, a file holding another service is refused before
    /// the old one is touched.
    #[serde(default)]
    pub rename: bool,
}

struct Slot {
    id: u64,
    order: u64,
    kind: ServiceKind,
    path: PathBuf,
    config: String,
    manifest: Manifest,
    ports: Vec<PortRange>,
    mmio: Vec<MmioRange>,
    ctx: Arc<ServiceCtx>,
    inst: Mutex<Option<Box<dyn Backend>>>,
    failure: OnceLock<String>,
    deferred: Mutex<Vec<Event>>,
    /// `deferred` is not empty (checked without its lock on every event).
    has_deferred: AtomicBool,
    /// Port and MMIO writes are queued by the vCPU and delivered by the manager's delivery
    /// thread.
    async_port_writes: bool,
    /// The attach's tick period (already in `manifest`), to carry over on a replace.
    tick_override: Option<u32>,
    events: AtomicU64,
    calls: AtomicU64,
    event_ns: AtomicU64,
    event_ns_hist: NsHistogram,
    deferred_count: AtomicU64,
    last_tick_ns: AtomicU64,
    attached_at_ms: u64,
    attach_us: u64,
}

impl Slot {
    fn name(&self) -> &str {
        &self.manifest.name
    }

    fn info(&self) -> ServiceInfo {
        ServiceInfo {
            async_port_writes: self.async_port_writes,
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            kind: self.kind,
            path: self.path.clone(),
            state: match self.failure.get() {
                Some(reason) => ServiceState::Failed {
                    reason: reason.clone(),
                },
                None => ServiceState::Attached,
            },
            events: self.manifest.events.clone(),
            ports: self.ports.clone(),
            mmio: self.mmio.clone(),
            capabilities: self.manifest.capabilities.clone(),
            tick_period_ms: self.manifest.tick_period_ms,
            attached_at_ms: self.attached_at_ms,
            attach_us: self.attach_us,
            stats: ServiceStats {
                events: self.events.load(Ordering::Relaxed),
                calls: self.calls.load(Ordering::Relaxed),
                event_ns: self.event_ns.load(Ordering::Relaxed),
                deferred: self.deferred_count.load(Ordering::Relaxed),
                event_ns_buckets: self.event_ns_hist.cumulative(),
                event_ns_timed_sum: self.event_ns_hist.sum.load(Ordering::Relaxed),
                memory_bytes: self.ctx.memory_bytes.load(Ordering::Relaxed),
            },
            metrics: lock(&self.ctx.metrics).clone(),
        }
    }

    fn wants(&self, kind: EventKind) -> bool {
        self.manifest.events.contains(&kind)
    }
}

/// Where a guest access went: the port space or guest-physical MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    Port,
    Mmio,
}

/// An owned range of one space, `[base, base + len)`, and whether its owner wants writes and
/// reads delivered (an owner that does not still swallows them).
struct IoRoute {
    base: u64,
    len: u64,
    slot: Arc<Slot>,
    write: bool,
    read: bool,
}

impl IoRoute {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// The read-mostly snapshot the event paths use.
#[derive(Default)]
struct Routes {
    ports: Vec<IoRoute>,
    mmio: Vec<IoRoute>,
    lifecycle: Vec<Arc<Slot>>,
    ticks: Vec<Arc<Slot>>,
    net_frames: Vec<Arc<Slot>>,
}

#[derive(Default)]
struct Control {
    /// Live services, in attach order.
    services: Vec<Arc<Slot>>,
    /// Services the manager detached after a failure (most recent last).
    failed: VecDeque<ServiceInfo>,
    /// Ports owned by the VMM's own devices.
    reserved: Vec<(PortRange, String)>,
    /// MMIO windows owned by the VMM's own devices (virtio).
    reserved_mmio: Vec<(MmioRange, String)>,
    next_id: u64,
}

/// One event in this many is timed for [`ServiceStats::event_ns`].
const TIME_SAMPLE: u64 = 16;

/// Most failure records kept for `list`.
const MAX_FAILED: usize = 32;

enum Delivery {
    Done(EventReply),
    Deferred,
    Failed,
    Gone,
}

/// Manages the L1 services of one VM. Share it (`Arc<ServiceManager>`) between the VMM's main
/// loop, its API and its vCPU threads: every method takes `&self`.
pub struct ServiceManager {
    shared: Arc<HostShared>,
    config: ManagerConfig,
    cache_dir: PathBuf,
    wasm: OnceLock<Result<WasmRuntime, String>>,
    control: Mutex<Control>,
    routes: RwLock<Arc<Routes>>,
    has_ports: AtomicBool,
    has_mmio: AtomicBool,
    /// Services with queued asynchronous port writes, for the delivery thread.
    async_delivery: OnceLock<AsyncQueue>,
    /// The buffer net frames are drained into (handed back to the devices at each drain).
    frames: Mutex<Vec<base_vmm::devices::virtio::frames::FrameRecord>>,
    /// When frames were last delivered (ns since the epoch).
    frames_at_ns: AtomicU64,
}

/// Host-side options of an attach (policy the VMM chooses, not the service).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct AttachOptions {
    /// Deliver port and MMIO writes asynchronously: the vCPU only queues them (it never waits
    /// for the service), a delivery thread hands them over in order. Reads stay synchronous and see
    /// every earlier write first. For services that only observe writes (counters, tracing).
    pub async_port_writes: bool,
    /// The tick period, ms, instead of the manifest's: whoever attaches knows how often this
    /// VM needs the service's ticks (a watcher polling faster or slower). Kept by a replace,
    /// a live update and a snapshot. Only for a service that subscribes to ticks.
    #[serde(default)]
    pub tick_period_ms: Option<u32>,
}

/// Most writes queued for one service; past that the vCPU delivers synchronously (back-pressure).
const MAX_QUEUED_WRITES: usize = 1 << 16;
/// A queue this long wakes the delivery thread before its next periodic drain.
const WAKE_AT_QUEUED: usize = 4096;
/// How often the delivery thread drains queued writes.
const ASYNC_DRAIN_PERIOD: Duration = Duration::from_millis(1);
/// How often recorded net frames go to their subscribers, as one batch (the devices' buffer
/// holds `frames::CAPACITY` records between two batches).
const NET_FRAMES_PERIOD: Duration = Duration::from_millis(10);
/// Frames per net-frames event at most (a batch goes out in as many events as needed).
const NET_FRAMES_PER_EVENT: usize = 1024;

#[derive(Default)]
struct AsyncQueue {
    pending: Mutex<Vec<Arc<Slot>>>,
    wake: std::sync::Condvar,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (*b as u64) << (8 * i))
}

/// A service speaking another version of the interface is refused before anything else.
fn check_abi(m: &Manifest, path: &Path) -> Result<(), ServiceError> {
    if m.abi_version != spanvmm_sdk::ABI_VERSION {
        return Err(ServiceError::AbiMismatch {
            path: path.into(),
            found: m.abi_version,
            expected: spanvmm_sdk::ABI_VERSION,
        });
    }
    Ok(())
}

impl ServiceManager {
    /// A manager with default settings. `cache_dir` holds compiled Wasm artifacts (created
    /// private to this user on first use).
    pub fn new(host: Arc<dyn VmHost>, cache_dir: PathBuf) -> Self {
        Self::with_config(host, cache_dir, ManagerConfig::default())
    }

    /// A manager with explicit settings.
    pub fn with_config(host: Arc<dyn VmHost>, cache_dir: PathBuf, config: ManagerConfig) -> Self {
        ServiceManager {
            shared: Arc::new(HostShared {
                host,
                dirty: Mutex::new(DirtyFanout::default()),
                notes: Mutex::new(Default::default()),
                notes_added: std::sync::Condvar::new(),
                epoch: Instant::now(),
                migration: Mutex::new(None),
                vm_owner: Mutex::new(None),
                snapshots: Default::default(),
                agile: Mutex::new(None),
                agile_heir: Mutex::new(None),
                manager: OnceLock::new(),
            }),
            config,
            cache_dir,
            wasm: OnceLock::new(),
            control: Mutex::new(Control::default()),
            routes: RwLock::new(Arc::new(Routes::default())),
            has_ports: AtomicBool::new(false),
            has_mmio: AtomicBool::new(false),
            async_delivery: OnceLock::new(),
            frames: Mutex::new(Vec::new()),
            frames_at_ns: AtomicU64::new(0),
        }
    }

    /// Lets snapshot layers committed by a service carry the other services' states (the
    /// engine reaches the manager through this; call once the manager is in its `Arc`).
    pub fn carry_states_in_snapshots(self: &Arc<Self>) {
        let _ = self.shared.manager.set(Arc::downgrade(self));
    }

    /// Makes `m` the migration the `drives-migration` service drives (None: no migration).
    pub fn set_migration(&self, m: Option<Arc<crate::migration::MigrationSource>>) {
        if m.is_some() {
            // A park's push would compete with the migration for the link: stopped.
            if let Some((_, engine)) = lock(&self.shared.agile).as_mut() {
                engine.cancel_park();
            }
        }
        *lock(&self.shared.migration) = m;
    }

    /// Another operation (a live update) owns the VM's run state until `None`: services
    /// cannot begin snapshot layers meanwhile.
    pub fn set_vm_owner(&self, owner: Option<String>) {
        *lock(&self.shared.vm_owner) = owner;
    }

    /// Layers the snapshot engine wrote and failed since the VMM started.
    pub fn snapshot_totals(&self) -> &crate::snapshot::SnapshotTotals {
        self.shared.snapshots.totals()
    }

    /// Saves the VM, paused by the caller, as one full snapshot layer in `dir` through the
    /// snapshot engine (the one checkpoint services drive); returns the layer's id and the
    /// memory bytes written.
    pub fn save_layer(&self, dir: &std::path::Path) -> Result<(String, u64), ServiceError> {
        let s = self
            .shared
            .snapshots
            .save(&*self.shared.host, dir, &self.save_states(None))?;
        Ok((s.layer_id, s.bytes_written))
    }

    /// A snapshot layer is being written (see [`crate::snapshot`]).
    pub fn snapshot_in_progress(&self) -> bool {
        self.shared.snapshots.in_progress()
    }

    /// The outgoing migration the services drive, if any.
    pub fn migration(&self) -> Option<Arc<crate::migration::MigrationSource>> {
        lock(&self.shared.migration).clone()
    }

    /// The manager's settings.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    fn wasm(&self) -> Result<&WasmRuntime, ServiceError> {
        self.wasm
            .get_or_init(|| {
                WasmRuntime::new(
                    &self.cache_dir,
                    WasmSettings {
                        event_deadline: self.config.event_deadline,
                        call_deadline: self.config.call_deadline,
                        epoch_tick: self.config.epoch_tick,
                        memory_limit: self.config.memory_limit,
                        pooling: self.config.pooling,
                        // One more than attached at once: a replacement is loaded and checked
                        // while the service it replaces still runs.
                        max_services: self.config.max_services as u32 + 1,
                    },
                )
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ServiceError::Runtime(e.clone()))
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the event routes from the live services.
    fn publish(&self, c: &Control) {
        let mut r = Routes::default();
        for s in c.services.iter().filter(|s| s.failure.get().is_none()) {
            for range in &s.ports {
                r.ports.push(IoRoute {
                    base: range.base.into(),
                    len: range.len.into(),
                    slot: s.clone(),
                    write: s.wants(EventKind::PortWrite),
                    read: s.wants(EventKind::PortRead),
                });
            }
            for range in &s.mmio {
                r.mmio.push(IoRoute {
                    base: range.base,
                    len: range.len,
                    slot: s.clone(),
                    write: s.wants(EventKind::MmioWrite),
                    read: s.wants(EventKind::MmioRead),
                });
            }
            if s.wants(EventKind::Lifecycle) {
                r.lifecycle.push(s.clone());
            }
            if s.wants(EventKind::Tick) && s.manifest.tick_period_ms > 0 {
                r.ticks.push(s.clone());
            }
            if s.wants(EventKind::NetFrames) {
                r.net_frames.push(s.clone());
            }
        }
        // The devices record frames only while someone listens.
        base_vmm::devices::virtio::frames::set_observed(!r.net_frames.is_empty());
        r.ports.sort_by_key(|p| p.base);
        r.mmio.sort_by_key(|p| p.base);
        let any_ports = !r.ports.is_empty();
        let any_mmio = !r.mmio.is_empty();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(r);
        self.has_ports.store(any_ports, Ordering::Release);
        self.has_mmio.store(any_mmio, Ordering::Release);
    }

    /// Moves failed services out of the live list (their claims end) into the failure records.
    fn sweep(&self, c: &mut Control) {
        if !c.services.iter().any(|s| s.failure.get().is_some()) {
            return;
        }
        let (failed, live): (Vec<_>, Vec<_>) = std::mem::take(&mut c.services)
            .into_iter()
            .partition(|s| s.failure.get().is_some());
        c.services = live;
        for s in failed {
            lock(&self.shared.dirty).unregister(s.id, &*self.shared.host);
            c.failed.retain(|f| f.name != s.name());
            if c.failed.len() >= MAX_FAILED {
                c.failed.pop_front();
            }
            c.failed.push_back(s.info());
        }
        self.publish(c);
    }

    /// Marks `slot` failed and drops its instance (the caller holds the instance lock).
    fn fail(&self, slot: &Slot, inst: &mut Option<Box<dyn Backend>>, reason: String) {
        *inst = None;
        if slot.failure.set(reason.clone()).is_ok() {
            tracing::error!(
                "service {} ({}) failed and is detached: {reason}; the VM keeps running",
                slot.name(),
                slot.path.display()
            );
        }
    }

    /// Cleans up after a failure without ever blocking the caller (a vCPU thread, maybe).
    fn sweep_soon(&self) {
        if let Ok(mut c) = self.control.try_lock() {
            self.sweep(&mut c);
        }
    }

    fn taken_ports(c: &Control) -> Vec<(PortRange, String)> {
        Self::taken_ports_of(&c.reserved, &c.services)
    }

    fn taken_ports_of(
        reserved: &[(PortRange, String)],
        services: &[Arc<Slot>],
    ) -> Vec<(PortRange, String)> {
        let mut taken = reserved.to_vec();
        for s in services {
            for r in &s.ports {
                taken.push((*r, format!("service {}", s.name())));
            }
        }
        taken
    }

    fn taken_mmio(c: &Control) -> Vec<(MmioRange, String)> {
        Self::taken_mmio_of(&c.reserved_mmio, &c.services)
    }

    fn taken_mmio_of(
        reserved: &[(MmioRange, String)],
        services: &[Arc<Slot>],
    ) -> Vec<(MmioRange, String)> {
        let mut taken = reserved.to_vec();
        taken.extend(
            services
                .iter()
                .flat_map(|s| s.mmio.iter().map(|r| (*r, format!("service {}", s.name())))),
        );
        taken
    }

    /// Reserves an MMIO window for the VMM's own devices (the virtio devices), so no service
    /// can claim it; a conflict names both owners.
    pub fn reserve_mmio(&self, base: u64, len: u64, owner: &str) -> Result<(), ServiceError> {
        let range = MmioRange::new(base, len);
        let mut c = self.control();
        self.sweep(&mut c);
        if let Some((owned, who)) = Self::taken_mmio(&c)
            .into_iter()
            .find(|(r, _)| r.overlaps(&range))
        {
            return Err(ServiceError::MmioConflict {
                claimant: owner.to_string(),
                range,
                owner: who,
                owned,
            });
        }
        c.reserved_mmio.push((range, owner.to_string()));
        Ok(())
    }

    /// Reserves ports for the VMM's own devices (e.g. `"vmm:serial"`), so no service can claim
    /// them; a conflict names both owners.
    pub fn reserve_ports(&self, base: u16, len: u16, owner: &str) -> Result<(), ServiceError> {
        let range = PortRange::new(base, len);
        let mut c = self.control();
        self.sweep(&mut c);
        if let Some((owned, who)) = Self::taken_ports(&c)
            .into_iter()
            .find(|(r, _)| r.overlaps(&range))
        {
            return Err(ServiceError::PortConflict {
                claimant: owner.to_string(),
                range,
                owner: who,
                owned,
            });
        }
        c.reserved.push((range, owner.to_string()));
        Ok(())
    }

    /// Opens a service file under the operator's policy; every check runs before anything of
    /// it is read or loaded. Returns the checked file and, for Wasm (and whenever hashes are
    /// allowed-listed), its bytes, read through the checked descriptor.
    fn open_service_file(
        &self,
        path: &Path,
        kind: ServiceKind,
    ) -> Result<(TrustedFile, Option<Vec<u8>>), ServiceError> {
        let policy = &self.config.policy;
        if kind == ServiceKind::Native && policy.no_native {
            return Err(crate::trust::native_disabled(path).into());
        }
        let what = match kind {
            ServiceKind::Wasm => "Wasm plugin",
            ServiceKind::Native => "native plugin",
        };
        let file = crate::trust::open_checked(
            path,
            &FileRules {
                what,
                // Native code runs as the VMM; a Wasm component is sandboxed, but from
                // operator-configured directories it must meet the same rules.
                trusted: kind == ServiceKind::Native || !policy.dirs.is_empty(),
                max_len: Some(MAX_SERVICE_FILE_BYTES),
                under: &policy.dirs,
            },
        )?;
        let bytes = if kind == ServiceKind::Wasm || !policy.sha256.is_empty() {
            Some(file.read_all(what, MAX_SERVICE_FILE_BYTES)?)
        } else {
            None
        };
        if let Some(b) = bytes.as_ref().filter(|_| !policy.sha256.is_empty()) {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(b).into();
            if !policy.sha256.contains(&digest) {
                return Err(crate::trust::not_allow_listed(what, path, &digest).into());
            }
        }
        Ok((file, bytes))
    }

    fn load(
        &self,
        path: &Path,
        ctx: Arc<ServiceCtx>,
    ) -> Result<(Box<dyn Backend>, ServiceKind), ServiceError> {
        let kind = ServiceKind::of(path).ok_or_else(|| ServiceError::UnknownKind(path.into()))?;
        let (file, bytes) = self.open_service_file(path, kind)?;
        match kind {
            ServiceKind::Wasm => {
                let bytes = bytes.expect("read for Wasm");
                let svc = self.wasm()?.instantiate(path, &bytes, ctx)?;
                Ok((Box::new(svc), kind))
            }
            ServiceKind::Native => {
                let svc = NativeService::load(path, &file, ctx)?;
                Ok((Box::new(svc), kind))
            }
        }
    }

    /// Checks a manifest against the host and the services in `c` (but `except`, the one a
    /// replacement will take the place of).
    fn check_manifest(
        &self,
        c: &Control,
        except: Option<u64>,
        m: &Manifest,
        path: &Path,
    ) -> Result<(), ServiceError> {
        let others: Vec<Arc<Slot>> = c
            .services
            .iter()
            .filter(|s| Some(s.id) != except)
            .cloned()
            .collect();
        crate::manifest::validate(m, self.shared.host.info().mem_bytes, path)?;
        if others.iter().any(|s| s.name() == m.name) {
            return Err(ServiceError::Duplicate(m.name.clone()));
        }
        for cap in m.capabilities.iter().filter(|c| c.is_exclusive()) {
            if let Some(holder) = others
                .iter()
                .find(|s| s.manifest.capabilities.contains(cap))
            {
                return Err(ServiceError::CapabilityConflict {
                    claimant: m.name.clone(),
                    capability: *cap,
                    holder: holder.name().to_string(),
                });
            }
        }
        let taken = Self::taken_ports_of(&c.reserved, &others);
        for range in &m.ports {
            if let Some((owned, owner)) = taken.iter().find(|(r, _)| r.overlaps(range)) {
                return Err(ServiceError::PortConflict {
                    claimant: m.name.clone(),
                    range: *range,
                    owner: owner.clone(),
                    owned: *owned,
                });
            }
        }
        let taken = Self::taken_mmio_of(&c.reserved_mmio, &others);
        for range in &m.mmio {
            if let Some((owned, owner)) = taken.iter().find(|(r, _)| r.overlaps(range)) {
                return Err(ServiceError::MmioConflict {
                    claimant: m.name.clone(),
                    range: *range,
                    owner: owner.clone(),
                    owned: *owned,
                });
            }
        }
        Ok(())
    }

    /// Loads, checks and attaches a service; `order` keeps a replaced service's place, `state`
    /// is handed to `resume-from`, `inherit_dirty` passes a predecessor's pending dirty pages.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        c: &mut Control,
        path: &Path,
        config: &str,
        opts: AttachOptions,
        order: Option<u64>,
        state: Option<&[u8]>,
        inherit_dirty: Option<u64>,
    ) -> Result<Arc<Slot>, ServiceError> {
        if c.services.len() >= self.config.max_services {
            return Err(ServiceError::TooMany(self.config.max_services));
        }
        let loaded = self.prepare(c, path)?;
        self.finish(c, loaded, path, config, opts, order, state, inherit_dirty)
    }

    /// Loads a service and reads its manifest; nothing is attached or claimed yet.
    fn prepare(&self, c: &mut Control, path: &Path) -> Result<Loaded, ServiceError> {
        let t0 = Instant::now();
        c.next_id += 1;
        let id = c.next_id;
        let ctx = Arc::new(ServiceCtx::new(self.shared.clone(), id));
        let (mut backend, kind) = self.load(path, ctx.clone())?;
        let manifest = backend
            .describe()
            .map_err(|Fatal(msg)| ServiceError::Load {
                path: path.into(),
                msg: format!("describe failed: {msg}"),
            })?;
        Ok(Loaded {
            t0,
            id,
            ctx,
            backend,
            kind,
            manifest,
        })
    }

    /// Checks a prepared service against the others and attaches it (see `start`).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        c: &mut Control,
        loaded: Loaded,
        path: &Path,
        config: &str,
        opts: AttachOptions,
        order: Option<u64>,
        state: Option<&[u8]>,
        inherit_dirty: Option<u64>,
    ) -> Result<Arc<Slot>, ServiceError> {
        let Loaded {
            t0,
            id,
            ctx,
            mut backend,
            kind,
            mut manifest,
        } = loaded;
        self.check_manifest(c, None, &manifest, path)?;
        if let Some(ms) = opts.tick_period_ms {
            if !manifest.events.contains(&EventKind::Tick) || ms == 0 {
                return Err(ServiceError::Manifest {
                    name: manifest.name,
                    path: path.into(),
                    msg: format!(
                        "a tick period of {ms} ms was asked at attach, but the service {}",
                        if ms == 0 {
                            "needs a period of at least 1 ms"
                        } else {
                            "does not subscribe to ticks"
                        }
                    ),
                });
            }
            manifest.tick_period_ms = ms;
        }
        let name = manifest.name.clone();
        backend.set_name(&name);
        ctx.grant(&name, &manifest.capabilities);
        *lock(&ctx.claims) = Some(ClaimSession {
            taken: Self::taken_ports(c),
            mine: manifest.ports.clone(),
            taken_mmio: Self::taken_mmio(c),
            mine_mmio: manifest.mmio.clone(),
        });
        let attached = backend.attach(config);
        let (ports, mmio) = lock(&ctx.claims)
            .take()
            .map(|s| (s.mine, s.mine_mmio))
            .unwrap_or_default();
        match attached {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(ServiceError::AttachRefused { name, msg }),
            Err(Fatal(reason)) => return Err(ServiceError::Failed { name, reason }),
        }
        // From here on the service is attached: undo with detach on any error.
        let undo = |backend: &mut Box<dyn Backend>| {
            let _ = backend.detach();
        };
        let dirty = manifest.capabilities.contains(&Capability::DirtyLog);
        if dirty {
            let mut d = lock(&self.shared.dirty);
            let r = match inherit_dirty {
                Some(old) => d.rename(old, id, &*self.shared.host),
                None => d.register(id, &*self.shared.host),
            };
            if let Err(err) = r {
                drop(d);
                undo(&mut backend);
                return Err(ServiceError::DirtyLog { name, err });
            }
        }
        let undo_dirty = |this: &Self| {
            if dirty {
                let mut d = lock(&this.shared.dirty);
                match inherit_dirty {
                    Some(old) => {
                        let _ = d.rename(id, old, &*this.shared.host);
                    }
                    None => d.unregister(id, &*this.shared.host),
                }
            }
        };
        if let Some(state) = state {
            match backend.resume_from(state) {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => {
                    undo(&mut backend);
                    undo_dirty(self);
                    return Err(ServiceError::ResumeRefused { name, msg });
                }
                Err(Fatal(reason)) => {
                    undo_dirty(self);
                    return Err(ServiceError::Failed { name, reason });
                }
            }
        }
        let now_ns = self.shared.now_ns();
        Ok(Arc::new(Slot {
            id,
            order: order.unwrap_or(id),
            kind,
            path: path.to_path_buf(),
            config: config.to_string(),
            ports,
            mmio,
            ctx,
            inst: Mutex::new(Some(backend)),
            failure: OnceLock::new(),
            deferred: Mutex::new(Vec::new()),
            has_deferred: AtomicBool::new(false),
            async_port_writes: opts.async_port_writes,
            tick_override: opts.tick_period_ms,
            events: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            event_ns: AtomicU64::new(0),
            event_ns_hist: NsHistogram::default(),
            deferred_count: AtomicU64::new(0),
            last_tick_ns: AtomicU64::new(now_ns),
            attached_at_ms: now_ms(),
            attach_us: t0.elapsed().as_micros() as u64,
            manifest,
        }))
    }

    fn insert(&self, c: &mut Control, slot: Arc<Slot>) -> ServiceInfo {
        let info = slot.info();
        c.failed.retain(|f| f.name != info.name);
        let at = c.services.partition_point(|s| s.order < slot.order);
        c.services.insert(at, slot);
        self.publish(c);
        info
    }

    /// Attaches the service in `path` (`.wasm` component or `.so` native object) with `config`.
    pub fn attach(&self, path: &Path, config: &str) -> Result<ServiceInfo, ServiceError> {
        self.attach_with(path, config, AttachOptions::default())
    }

    /// [`ServiceManager::attach`] with host-side delivery options.
    pub fn attach_with(
        &self,
        path: &Path,
        config: &str,
        opts: AttachOptions,
    ) -> Result<ServiceInfo, ServiceError> {
        if opts.async_port_writes && self.async_delivery.get().is_none() {
            return Err(ServiceError::Runtime(
                "asynchronous port-write delivery is not running in this VMM".into(),
            ));
        }
        let mut c = self.control();
        self.sweep(&mut c);
        let slot = self.start(&mut c, path, config, opts, None, None, None)?;
        let info = self.insert(&mut c, slot);
        tracing::info!(
            "service {} {} attached from {} in {} µs",
            info.name,
            info.version,
            info.path.display(),
            info.attach_us
        );
        Ok(info)
    }

    fn find(&self, c: &mut Control, name: &str) -> Result<usize, ServiceError> {
        self.sweep(c);
        if let Some(i) = c.services.iter().position(|s| s.name() == name) {
            return Ok(i);
        }
        match c.failed.iter().position(|f| f.name == name) {
            Some(i) => {
                let f = c.failed.remove(i).expect("index from position");
                let reason = match f.state {
                    ServiceState::Failed { reason } => reason,
                    ServiceState::Attached => String::new(),
                };
                Err(ServiceError::Failed {
                    name: name.into(),
                    reason,
                })
            }
            None => Err(ServiceError::NotFound(name.into())),
        }
    }

    /// Takes a service out of the routes and stops it; returns its state. The caller holds the
    /// control lock. Dirty-log registration is left to the caller.
    fn stop(&self, c: &mut Control, index: usize) -> (Arc<Slot>, Result<Vec<u8>, ServiceError>) {
        let slot = c.services.remove(index);
        self.publish(c);
        let mut inst = lock(&slot.inst);
        self.drain_deferred(&slot, &mut inst);
        let r = match inst.take() {
            Some(mut b) => b.detach().map_err(|Fatal(reason)| ServiceError::Failed {
                name: slot.name().into(),
                reason,
            }),
            None => Err(ServiceError::Failed {
                name: slot.name().into(),
                reason: slot.failure.get().cloned().unwrap_or_default(),
            }),
        };
        drop(inst);
        (slot, r)
    }

    /// Detaches a service and returns the state it handed back. A service the manager already
    /// detached after a failure is forgotten and its failure returned.
    pub fn detach(&self, name: &str) -> Result<Vec<u8>, ServiceError> {
        let mut c = self.control();
        let i = self.find(&mut c, name)?;
        let (slot, r) = self.stop(&mut c, i);
        lock(&self.shared.dirty).unregister(slot.id, &*self.shared.host);
        tracing::info!("service {name} detached");
        r
    }

    /// Replaces a service by the one in `new_path`: the new one is loaded and its manifest
    /// checked first (same name as the old one) while the old one keeps running, so a missing,
    /// refused or unloadable file, or another service, leaves the old one attached and
    /// untouched. Then the old one detaches, its state goes to the new one's `resume-from`
    /// (after `attach` with the old configuration), and the new one takes the old one's place
    /// in the event order. If the new one fails from there on, the old one is attached again
    /// with its state.
    pub fn replace(&self, name: &str, new_path: &Path) -> Result<ServiceInfo, ServiceError> {
        self.replace_with(name, new_path, ReplaceOptions::default())
    }

    /// [`ServiceManager::replace`] with options (a replacement of another name).
    pub fn replace_with(
        &self,
        name: &str,
        new_path: &Path,
        ropts: ReplaceOptions,
    ) -> Result<ServiceInfo, ServiceError> {
        let mut c = self.control();
        let i = self.find(&mut c, name)?;
        let untouched = |cause: ServiceError| ServiceError::Replace {
            name: name.into(),
            cause: Box::new(cause),
            rollback: "the old service stays attached, untouched".into(),
        };
        let old_id = c.services[i].id;
        let new_kind = ServiceKind::of(new_path)
            .ok_or_else(|| untouched(ServiceError::UnknownKind(new_path.into())))?;
        // The very native object the old service runs from cannot be loaded a second time
        // while it serves: it is checked now, loaded once the old one let go of it.
        let same_object =
            new_kind == ServiceKind::Native && c.services[i].kind == ServiceKind::Native && {
                let (file, _) = self
                    .open_service_file(new_path, new_kind)
                    .map_err(untouched)?;
                crate::native::loaded_by(file.id()).as_deref() == Some(name)
            };
        let prepared = if same_object {
            None
        } else {
            let l = self.prepare(&mut c, new_path).map_err(untouched)?;
            check_abi(&l.manifest, new_path).map_err(untouched)?;
            if l.manifest.name != name && !ropts.rename {
                return Err(untouched(ServiceError::NameMismatch {
                    path: new_path.into(),
                    found: l.manifest.name.clone(),
                    expected: name.into(),
                }));
            }
            self.check_manifest(&c, Some(old_id), &l.manifest, new_path)
                .map_err(untouched)?;
            Some(l)
        };
        let i = c
            .services
            .iter()
            .position(|s| s.id == old_id)
            .expect("the control lock is held");
        let (old, state) = self.stop(&mut c, i);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                lock(&self.shared.dirty).unregister(old.id, &*self.shared.host);
                return Err(e);
            }
        };
        let had_dirty = old.manifest.capabilities.contains(&Capability::DirtyLog);
        let inherit = had_dirty.then_some(old.id);
        let opts = AttachOptions {
            async_port_writes: old.async_port_writes,
            tick_period_ms: old.tick_override,
        };
        let started = match prepared {
            Some(l) => self.finish(
                &mut c,
                l,
                new_path,
                &old.config,
                opts,
                Some(old.order),
                Some(&state),
                inherit,
            ),
            None => self.start(
                &mut c,
                new_path,
                &old.config,
                opts,
                Some(old.order),
                Some(&state),
                inherit,
            ),
        };
        match started {
            Ok(slot) => {
                if had_dirty && !slot.manifest.capabilities.contains(&Capability::DirtyLog) {
                    lock(&self.shared.dirty).unregister(old.id, &*self.shared.host);
                }
                let info = self.insert(&mut c, slot);
                tracing::info!(
                    "service {name} replaced by {} {} from {}",
                    info.name,
                    info.version,
                    info.path.display()
                );
                Ok(info)
            }
            Err(cause) => {
                let back = self.start(
                    &mut c,
                    &old.path,
                    &old.config,
                    opts,
                    Some(old.order),
                    Some(&state),
                    inherit,
                );
                let rollback = match back {
                    Ok(slot) => {
                        self.insert(&mut c, slot);
                        "the old service is attached again with its state".to_string()
                    }
                    Err(e) => {
                        if had_dirty {
                            lock(&self.shared.dirty).unregister(old.id, &*self.shared.host);
                        }
                        format!("the old service could not be attached again either: {e}")
                    }
                };
                Err(ServiceError::Replace {
                    name: name.into(),
                    cause: Box::new(cause),
                    rollback,
                })
            }
        }
    }

    /// Starts the thread that delivers asynchronous port writes (see [`AttachOptions`]).
    pub fn start_async_delivery(self: &Arc<Self>) -> Result<(), ServiceError> {
        if self.async_delivery.set(AsyncQueue::default()).is_err() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("service-writes".into())
            .spawn(move || {
                // Services' code runs here: the service filter, before the first delivery.
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Service);
                loop {
                    let Some(m) = weak.upgrade() else { return };
                    let q = m.async_delivery.get().expect("set above");
                    let slots = {
                        let p = lock(&q.pending);
                        let mut p = q
                            .wake
                            .wait_timeout(p, ASYNC_DRAIN_PERIOD)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                        std::mem::take(&mut *p)
                    };
                    if slots.is_empty() && Arc::strong_count(&m) == 1 {
                        return; // the manager is gone but for us
                    }
                    for slot in slots {
                        let mut inst = lock(&slot.inst);
                        m.drain_deferred(&slot, &mut inst);
                        drop(inst);
                        if slot.failure.get().is_some() {
                            m.sweep_soon();
                        }
                    }
                }
            })
            .map_err(|e| {
                ServiceError::Runtime(format!("cannot start the write-delivery thread: {e}"))
            })?;
        Ok(())
    }

    /// Detaches every attached service for a hand-over to another VMM process (live update):
    /// returns, in attach order, what [`ServiceManager::attach_handed`] needs to bring each
    /// back there. A service that fails to hand its state back is reported, not returned.
    pub fn hand_over(&self) -> (Vec<HandedService>, Vec<(String, ServiceError)>) {
        let mut c = self.control();
        self.sweep(&mut c);
        let (mut handed, mut failed) = (Vec::new(), Vec::new());
        while !c.services.is_empty() {
            let (slot, r) = self.stop(&mut c, 0);
            lock(&self.shared.dirty).unregister(slot.id, &*self.shared.host);
            match r {
                Ok(state) => handed.push(HandedService {
                    name: slot.name().to_string(),
                    path: slot.path.clone(),
                    config: slot.config.clone(),
                    async_port_writes: slot.async_port_writes,
                    tick_period_ms: slot.tick_override,
                    state,
                }),
                Err(e) => failed.push((slot.name().to_string(), e)),
            }
        }
        (handed, failed)
    }

    /// Asks every attached service for its state without taking it from the VM (a snapshot,
    /// a migration's state capture): each one detaches, handing its state back, and is at
    /// once attached again from the same file, resumed from that state, in its place in the
    /// event order. `driver` (the service whose host call commits the snapshot) and, while a
    /// migration runs, the `drives-migration` service are not asked: calling into a service
    /// that is inside a call of its own would deadlock. They are recorded as
    /// `Declined("drives this operation")`, so a restore says why they are missing. A service
    /// whose detach fails is recorded as declined with its reason (and is gone, as after any
    /// failure). Call with the vCPUs paused.
    pub fn save_states(&self, driver: Option<u64>) -> Vec<ServiceRecord> {
        let t0 = Instant::now();
        let migrating = lock(&self.shared.migration).is_some();
        let mut c = self.control();
        self.sweep(&mut c);
        let slots: Vec<Arc<Slot>> = c.services.clone();
        let mut out = Vec::with_capacity(slots.len());
        for old in slots {
            let name = old.name().to_string();
            let drives = Some(old.id) == driver
                || (migrating
                    && old
                        .manifest
                        .capabilities
                        .contains(&Capability::DrivesMigration));
            if drives {
                out.push(ServiceRecord::Declined {
                    name,
                    reason: DRIVES_THIS_OPERATION.into(),
                });
                continue;
            }
            let Some(i) = c.services.iter().position(|s| s.id == old.id) else {
                continue;
            };
            // Parked pages stay parked: the agile engine waits for the service's successor.
            self.hold_agile(old.id, &name);
            let (old, r) = self.stop(&mut c, i);
            let state = match r {
                Ok(state) => state,
                Err(e) => {
                    self.settle_agile(old.id);
                    lock(&self.shared.dirty).unregister(old.id, &*self.shared.host);
                    tracing::warn!("service {name} declined to save its state: {e}");
                    out.push(ServiceRecord::Declined {
                        name,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let had_dirty = old.manifest.capabilities.contains(&Capability::DirtyLog);
            let opts = AttachOptions {
                async_port_writes: old.async_port_writes,
                tick_period_ms: old.tick_override,
            };
            let again = self.start(
                &mut c,
                &old.path,
                &old.config,
                opts,
                Some(old.order),
                Some(&state),
                had_dirty.then_some(old.id),
            );
            match again {
                Ok(slot) => {
                    self.insert(&mut c, slot);
                }
                Err(e) => {
                    // Its own state refused by the same file: it is broken, not the snapshot.
                    lock(&self.shared.dirty).unregister(old.id, &*self.shared.host);
                    tracing::error!("service {name} lost: not resumed from its own state: {e}");
                }
            }
            self.settle_agile(old.id);
            out.push(ServiceRecord::Handed(HandedService {
                name,
                path: old.path.clone(),
                config: old.config.clone(),
                async_port_writes: old.async_port_writes,
                tick_period_ms: old.tick_override,
                state,
            }));
        }
        if !out.is_empty() {
            // What asking the services adds to the pause of a snapshot or migration.
            tracing::info!(
                "{} service state(s) saved in {} µs",
                out.len(),
                t0.elapsed().as_micros()
            );
        }
        out
    }

    /// Keeps the agile engine of service `id` (if it owns it) for its successor `name`.
    fn hold_agile(&self, id: u64, name: &str) {
        if lock(&self.shared.agile)
            .as_ref()
            .is_some_and(|(owner, _)| *owner == id)
        {
            *lock(&self.shared.agile_heir) = Some((id, name.to_string()));
        }
    }

    /// After service `id` was attached again: an engine its successor did not adopt is
    /// closed (every page comes back), as if `id` had closed it.
    fn settle_agile(&self, id: u64) {
        let mut heir = lock(&self.shared.agile_heir);
        if heir.as_ref().is_none_or(|(h, _)| *h != id) {
            return;
        }
        *heir = None;
        drop(heir);
        let mut agile = lock(&self.shared.agile);
        if agile.as_ref().is_some_and(|(owner, _)| *owner == id) {
            let (_, engine) = agile.take().expect("checked above");
            drop(agile);
            tracing::warn!("agile: the service's successor did not take its parked pages over");
            if let Err(e) = engine.close() {
                tracing::error!("agile close: {e}");
            }
        }
    }

    /// The pages parked by the agile engine, if one is open: a migration sends their
    /// locations instead of reading them.
    pub fn parked_pages(&self) -> Option<Arc<crate::migration::agile::Parked>> {
        lock(&self.shared.agile).as_ref().map(|(_, e)| e.parked())
    }

    /// The guest runs at a migration's destination now and this process goes: dirty logging
    /// stays on when its holders detach (turning it off changes the memory slots, which waits
    /// for every vCPU thread in KVM: seconds on a loaded host, and for nothing now).
    pub fn leave_dirty_log_on(&self) {
        lock(&self.shared.dirty).keep_on = true;
    }

    /// The guest has migrated away: the agile engine is dropped without bringing its pages
    /// back (the destination has them, or reads them from the intermediaries).
    pub fn guest_left(&self) {
        let engine = lock(&self.shared.agile).take();
        if let Some((_, engine)) = engine {
            engine.abandon();
        }
    }

    /// Attaches again the services a restored or arrived VM's state names (`service/<name>`
    /// sections), each resumed from its state, with the same file policy as any attach. One
    /// that cannot be attached (declined when saved, refused, unreadable) does not stop the
    /// VM: it is logged, listed among the failed services with why, and returned.
    pub fn restore_states(&self, sections: &[Section]) -> Vec<(String, String)> {
        let mut missing = Vec::new();
        for s in sections {
            let (name, path, why) = match ServiceRecord::from_section(s) {
                Ok(ServiceRecord::Handed(h)) if self.is_attached(&h.name) => {
                    tracing::info!(
                        "service {} was attached anew: its saved state is not used",
                        h.name
                    );
                    continue;
                }
                Ok(ServiceRecord::Handed(h)) => match self.attach_handed(&h) {
                    Ok(info) => {
                        tracing::info!("service {} attached again with its state", info.name);
                        continue;
                    }
                    Err(e) => (h.name.clone(), h.path, format!("not attached again: {e}")),
                },
                Ok(ServiceRecord::Declined { name, reason }) if reason == DRIVES_THIS_OPERATION => {
                    // The checkpoint or migration service that made the state: it was never
                    // meant to come back with the VM.
                    tracing::info!("service {name} drove the save: not attached again");
                    continue;
                }
                Ok(ServiceRecord::Declined { name, reason }) => (
                    name,
                    PathBuf::new(),
                    format!("declined to save its state: {reason}"),
                ),
                Err(e) => (
                    s.id.strip_prefix("service/").unwrap_or(&s.id).to_string(),
                    PathBuf::new(),
                    e.to_string(),
                ),
            };
            tracing::warn!("service {name} is not back: {why}");
            let mut c = self.control();
            c.failed.retain(|f| f.name != name);
            if c.failed.len() >= MAX_FAILED {
                c.failed.pop_front();
            }
            c.failed.push_back(ServiceInfo::missing(&name, &path, &why));
            missing.push((name, why));
        }
        missing
    }

    fn is_attached(&self, name: &str) -> bool {
        self.control().services.iter().any(|s| s.name() == name)
    }

    /// Attaches a service handed over by another VMM process and resumes it from its state.
    pub fn attach_handed(&self, h: &HandedService) -> Result<ServiceInfo, ServiceError> {
        let opts = AttachOptions {
            async_port_writes: h.async_port_writes && self.async_delivery.get().is_some(),
            tick_period_ms: h.tick_period_ms,
        };
        let mut c = self.control();
        self.sweep(&mut c);
        let slot = self.start(&mut c, &h.path, &h.config, opts, None, Some(&h.state), None)?;
        Ok(self.insert(&mut c, slot))
    }

    /// Reads a service file as `attach` would (the operator's policy, loading, the ABI
    /// handshake, `describe`, the manifest's own checks) without attaching it: what it is,
    /// what it asks for and imports, or why it cannot be loaded. A native object is loaded
    /// (its code runs), so it must pass the checks of native code first.
    pub fn inspect(&self, path: &Path) -> Inspection {
        let kind = ServiceKind::of(path);
        let mut out = Inspection {
            file: path.to_path_buf(),
            kind,
            host_abi_version: spanvmm_sdk::ABI_VERSION,
            loadable: false,
            reason: None,
            manifest: None,
            imports: None,
        };
        let Some(kind) = kind else {
            out.reason = Some(ServiceError::UnknownKind(path.into()).to_string());
            return out;
        };
        let r = (|| {
            if kind == ServiceKind::Wasm {
                let (_, bytes) = self.open_service_file(path, kind)?;
                let bytes = bytes.expect("read for Wasm");
                out.imports = Some(self.wasm()?.imports(path, &bytes)?);
            }
            let loaded = self.prepare(&mut self.control(), path)?;
            out.manifest = Some(loaded.manifest.clone());
            crate::manifest::validate(&loaded.manifest, self.shared.host.info().mem_bytes, path)
        })();
        match r {
            Ok(()) => out.loadable = true,
            Err(e) => out.reason = Some(e.to_string()),
        }
        out
    }

    /// Attached services in attach order, then the ones detached after a failure.
    pub fn list(&self) -> Vec<ServiceInfo> {
        let mut c = self.control();
        self.sweep(&mut c);
        c.services
            .iter()
            .map(|s| s.info())
            .chain(c.failed.iter().cloned())
            .collect()
    }

    /// Notifications services published since the previous call (oldest first), with what
    /// each service's full queue dropped meanwhile. Needs no service: a stuck one does not
    /// hold it up.
    pub fn take_notifications(&self) -> Notifications {
        lock(&self.shared.notes).take()
    }

    /// Like [`Self::take_notifications`], but waits up to `timeout` for one to be published
    /// when none is queued (for a reader that follows them).
    pub fn wait_notifications(&self, timeout: Duration) -> Notifications {
        let q = lock(&self.shared.notes);
        let (mut q, _) = self
            .shared
            .notes_added
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        q.take()
    }

    /// Runs a control-API command on a service.
    pub fn call(&self, name: &str, method: &str, args: &str) -> Result<String, ServiceError> {
        let slot = {
            let mut c = self.control();
            let i = self.find(&mut c, name)?;
            c.services[i].clone()
        };
        let mut inst = lock(&slot.inst);
        self.drain_deferred(&slot, &mut inst);
        let r = match inst.as_mut() {
            None => Err(ServiceError::NotFound(name.into())),
            Some(b) => {
                slot.calls.fetch_add(1, Ordering::Relaxed);
                let traps = base_vmm::seccomp::thread_traps();
                let r = b.call(method, args);
                // A forbidden syscall failed with EPERM inside the service: it is not trusted
                // with the VM any longer, whatever it answered.
                let r =
                    match base_vmm::seccomp::forbidden_since(traps, &format!("service '{name}'")) {
                        Some(why) => Err(Fatal(why)),
                        None => r,
                    };
                match r {
                    Ok(Ok(out)) => Ok(out),
                    Ok(Err(msg)) => Err(ServiceError::Call {
                        name: name.into(),
                        method: method.into(),
                        msg,
                    }),
                    Err(Fatal(reason)) => {
                        let reason = format!("call {method:?}: {reason}");
                        self.fail(&slot, &mut inst, reason.clone());
                        Err(ServiceError::Failed {
                            name: name.into(),
                            reason,
                        })
                    }
                }
            }
        };
        self.drain_deferred(&slot, &mut inst);
        drop(inst);
        self.sweep_soon();
        r
    }

    /// Delivers one event with the instance lock held.
    fn run_event(
        &self,
        slot: &Slot,
        inst: &mut Option<Box<dyn Backend>>,
        ev: &Event,
        vcpu_event: bool,
    ) -> Delivery {
        let Some(b) = inst.as_mut() else {
            return Delivery::Gone;
        };
        slot.ctx.in_vcpu_event.store(vcpu_event, Ordering::Relaxed);
        // Time one event in TIME_SAMPLE: two clock reads cost about as much as a native call.
        let n = slot.events.fetch_add(1, Ordering::Relaxed);
        let traps = base_vmm::seccomp::thread_traps();
        let r = if n.is_multiple_of(TIME_SAMPLE) {
            let t = Instant::now();
            let r = b.on_event(ev);
            let ns = t.elapsed().as_nanos() as u64;
            slot.event_ns_hist.observe(ns);
            slot.event_ns.fetch_add(ns * TIME_SAMPLE, Ordering::Relaxed);
            r
        } else {
            b.on_event(ev)
        };
        slot.ctx.in_vcpu_event.store(false, Ordering::Relaxed);
        let r = match base_vmm::seccomp::forbidden_since(
            traps,
            &format!("service '{}'", slot.name()),
        ) {
            Some(why) => Err(Fatal(why)),
            None => r,
        };
        match r {
            Ok(reply) => Delivery::Done(reply),
            Err(Fatal(reason)) => {
                let what = match ev.kind() {
                    EventKind::PortWrite => "port-write",
                    EventKind::PortRead => "port-read",
                    EventKind::Lifecycle => "lifecycle",
                    EventKind::Tick => "tick",
                    EventKind::MmioWrite => "mmio-write",
                    EventKind::MmioRead => "mmio-read",
                    EventKind::NetFrames => "net-frames",
                };
                self.fail(slot, inst, format!("{what} event: {reason}"));
                Delivery::Failed
            }
        }
    }

    /// Delivers port writes queued while the service waited on vCPUs.
    fn drain_deferred(&self, slot: &Slot, inst: &mut Option<Box<dyn Backend>>) {
        if !slot.has_deferred.swap(false, Ordering::AcqRel) {
            return;
        }
        let queued = std::mem::take(&mut *lock(&slot.deferred));
        for ev in queued {
            if let Delivery::Failed | Delivery::Gone = self.run_event(slot, inst, &ev, true) {
                break;
            }
        }
    }

    /// Delivers a port or MMIO event from a vCPU thread. If the service is busy inside a host call that
    /// waits for vCPUs (pause, resume, registers), the vCPU does not wait for it: a write is
    /// queued for later delivery and a read answers all-ones.
    fn deliver_io(&self, slot: &Arc<Slot>, ev: Event) -> Delivery {
        let mut spins = 0u32;
        let mut inst = loop {
            match slot.inst.try_lock() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    if slot.ctx.waiting_on_vcpus.load(Ordering::Acquire) {
                        slot.deferred_count.fetch_add(1, Ordering::Relaxed);
                        if ev.is_write() {
                            lock(&slot.deferred).push(ev);
                            slot.has_deferred.store(true, Ordering::Release);
                            // The holder may have finished meanwhile: deliver it ourselves.
                            if let Ok(mut g) = slot.inst.try_lock() {
                                self.drain_deferred(slot, &mut g);
                            }
                        }
                        return Delivery::Deferred;
                    }
                    spins += 1;
                    if spins < 100 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            }
        };
        self.drain_deferred(slot, &mut inst);
        let d = self.run_event(slot, &mut inst, &ev, true);
        drop(inst);
        if let Delivery::Failed = d {
            self.sweep_soon();
        }
        d
    }

    fn route(&self, space: Space, addr: u64, write: bool) -> Option<(Arc<Slot>, bool)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let list = match space {
            Space::Port => &routes.ports,
            Space::Mmio => &routes.mmio,
        };
        list.iter()
            .find(|r| r.contains(addr))
            .map(|r| (r.slot.clone(), if write { r.write } else { r.read }))
    }

    fn claimed(&self, space: Space) -> bool {
        match space {
            Space::Port => self.has_ports.load(Ordering::Acquire),
            Space::Mmio => self.has_mmio.load(Ordering::Acquire),
        }
    }

    /// A guest write to `addr` of `space`. Returns false when no service owns it (the VMM's bus
    /// handles it); costs one atomic load when no service claims anything in that space.
    fn on_write(&self, space: Space, addr: u64, data: &[u8]) -> bool {
        if !self.claimed(space) {
            return false;
        }
        let Some((slot, wanted)) = self.route(space, addr, true) else {
            return false;
        };
        if !wanted {
            return true;
        }
        let (size, value) = (data.len() as u8, le_value(data));
        let ev = match space {
            Space::Port => Event::PortWrite {
                port: addr as u16,
                size,
                value,
            },
            Space::Mmio => Event::MmioWrite { addr, size, value },
        };
        if slot.async_port_writes {
            if let Some(q) = self.async_delivery.get() {
                let mut queued = lock(&slot.deferred);
                if queued.len() < MAX_QUEUED_WRITES {
                    queued.push(ev);
                    let long = queued.len() == WAKE_AT_QUEUED;
                    drop(queued);
                    // The first write since the last drain hands the service to the thread,
                    // which drains every millisecond: no wake-up syscall on the exit path,
                    // unless the queue grows long.
                    if !slot.has_deferred.swap(true, Ordering::AcqRel) {
                        lock(&q.pending).push(slot);
                    } else if long {
                        q.wake.notify_one();
                    }
                    return true;
                }
            }
        }
        !matches!(self.deliver_io(&slot, ev), Delivery::Gone)
    }

    /// A guest read from `addr` of `space`: fills `data` and returns true when a service owns
    /// it (all-ones when it has no answer); false when none does.
    fn on_read(&self, space: Space, addr: u64, data: &mut [u8]) -> bool {
        if !self.claimed(space) {
            return false;
        }
        let Some((slot, wanted)) = self.route(space, addr, false) else {
            return false;
        };
        if !wanted {
            data.fill(0xff);
            return true;
        }
        let size = data.len() as u8;
        let ev = match space {
            Space::Port => Event::PortRead {
                port: addr as u16,
                size,
            },
            Space::Mmio => Event::MmioRead { addr, size },
        };
        match self.deliver_io(&slot, ev) {
            Delivery::Gone => false,
            Delivery::Done(EventReply::Value(v)) => {
                let bytes = v.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = bytes.get(i).copied().unwrap_or(0);
                }
                true
            }
            _ => {
                data.fill(0xff);
                true
            }
        }
    }

    /// A guest port write. Returns false when no service owns `port` (the VMM's bus handles
    /// it); costs one atomic load when no service claims any port.
    pub fn on_port_write(&self, port: u16, data: &[u8]) -> bool {
        self.on_write(Space::Port, port.into(), data)
    }

    /// A guest port read: fills `data` and returns true when a service owns `port` (all-ones
    /// when it has no answer); false when none does.
    pub fn on_port_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.on_read(Space::Port, port.into(), data)
    }

    /// A guest store to guest-physical `addr` outside RAM; false when no service owns it.
    /// Costs one atomic load when no service claims any MMIO.
    pub fn on_mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.on_write(Space::Mmio, addr, data)
    }

    /// A guest load from guest-physical `addr` outside RAM: fills `data` and returns true when
    /// a service owns it (all-ones when it has no answer); false when none does.
    pub fn on_mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.on_read(Space::Mmio, addr, data)
    }

    fn deliver_all(&self, slots: &[Arc<Slot>], ev: impl Fn(&Slot) -> Option<Event>) {
        let mut failed = false;
        for slot in slots {
            let Some(e) = ev(slot) else { continue };
            let mut inst = lock(&slot.inst);
            self.drain_deferred(slot, &mut inst);
            failed |= matches!(self.run_event(slot, &mut inst, &e, false), Delivery::Failed);
            self.drain_deferred(slot, &mut inst);
        }
        if failed {
            self.sweep_soon();
        }
    }

    /// Tells the services subscribed to lifecycle events, in attach order.
    pub fn lifecycle(&self, ev: Lifecycle) {
        let routes = self.routes();
        self.deliver_all(&routes.lifecycle, |_| Some(Event::Lifecycle(ev)));
    }

    /// Delivers ticks that are due at `now` (call it at least as often as the shortest tick
    /// period; [`ServiceManager::next_tick_in`] says when the next one is due).
    pub fn tick(&self, now: Instant) {
        let routes = self.routes();
        let now_ns = now.saturating_duration_since(self.shared.epoch).as_nanos() as u64;
        if !routes.net_frames.is_empty() {
            self.deliver_frames(&routes.net_frames, now_ns);
        }
        if routes.ticks.is_empty() {
            return;
        }
        self.deliver_all(&routes.ticks, |slot| {
            let period = slot.manifest.tick_period_ms as u64 * 1_000_000;
            let last = slot.last_tick_ns.load(Ordering::Relaxed);
            if now_ns < last.saturating_add(period) {
                return None;
            }
            slot.last_tick_ns.store(now_ns, Ordering::Relaxed);
            Some(Event::Tick { now_ns })
        });
    }

    /// Delivers a tick now to the ticking services granted `cap`, whatever their period (the
    /// next periodic one counts from this): a host engine with news for its policy service
    /// (a post-copy fault, see `SourceConfig::news`) does not wait for the period.
    pub fn tick_now(&self, cap: Capability, now: Instant) {
        let routes = self.routes();
        let now_ns = now.saturating_duration_since(self.shared.epoch).as_nanos() as u64;
        self.deliver_all(&routes.ticks, |slot| {
            if !slot.manifest.capabilities.contains(&cap) {
                return None;
            }
            slot.last_tick_ns.store(now_ns, Ordering::Relaxed);
            Some(Event::Tick { now_ns })
        });
    }

    /// Delivers the net frames recorded since the last batch, when one is due.
    fn deliver_frames(&self, slots: &[Arc<Slot>], now_ns: u64) {
        let last = self.frames_at_ns.load(Ordering::Relaxed);
        if now_ns < last.saturating_add(NET_FRAMES_PERIOD.as_nanos() as u64) {
            return;
        }
        self.frames_at_ns.store(now_ns, Ordering::Relaxed);
        let events: Vec<Event> = {
            let mut buf = lock(&self.frames);
            let dropped = base_vmm::devices::virtio::frames::drain(&mut buf);
            if buf.is_empty() && dropped == 0 {
                return;
            }
            // In pieces, each event under its own deadline: a full buffer in one call could
            // overrun a Wasm service's event deadline on a busy host. `dropped` goes with the
            // first piece.
            let mut pieces: Vec<Event> = buf
                .chunks(NET_FRAMES_PER_EVENT)
                .enumerate()
                .map(|(i, c)| Event::NetFrames {
                    now_ns,
                    frames: c.iter().map(net_frame).collect(),
                    dropped: if i == 0 { dropped } else { 0 },
                })
                .collect();
            if pieces.is_empty() {
                pieces.push(Event::NetFrames {
                    now_ns,
                    frames: Vec::new(),
                    dropped,
                });
            }
            pieces
        };
        for ev in &events {
            self.deliver_all(slots, |_| Some(ev.clone()));
        }
    }

    /// Time until the next tick or net-frames batch is due (None: no service wants either).
    pub fn next_tick_in(&self, now: Instant) -> Option<Duration> {
        let now_ns = now.saturating_duration_since(self.shared.epoch).as_nanos() as u64;
        let routes = self.routes();
        let frames = (!routes.net_frames.is_empty()).then(|| {
            let due = self
                .frames_at_ns
                .load(Ordering::Relaxed)
                .saturating_add(NET_FRAMES_PERIOD.as_nanos() as u64);
            Duration::from_nanos(due.saturating_sub(now_ns))
        });
        routes
            .ticks
            .iter()
            .map(|s| {
                let due = s
                    .last_tick_ns
                    .load(Ordering::Relaxed)
                    .saturating_add(s.manifest.tick_period_ms as u64 * 1_000_000);
                Duration::from_nanos(due.saturating_sub(now_ns))
            })
            .chain(frames)
            .min()
    }

    /// Detaches every service, last attached first (VM shutdown); returns each one's outcome.
    pub fn detach_all(&self) -> Vec<(String, Result<Vec<u8>, ServiceError>)> {
        let mut c = self.control();
        self.sweep(&mut c);
        let mut out = Vec::new();
        while !c.services.is_empty() {
            let i = c.services.len() - 1;
            let (slot, r) = self.stop(&mut c, i);
            lock(&self.shared.dirty).unregister(slot.id, &*self.shared.host);
            out.push((slot.name().to_string(), r));
        }
        out
    }
}

/// The SDK's form of a device's frame record.
fn net_frame(r: &base_vmm::devices::virtio::frames::FrameRecord) -> spanvmm_sdk::NetFrame {
    spanvmm_sdk::NetFrame {
        src: r.src,
        dst: r.dst,
        len: r.len,
        ethertype: r.ethertype,
        src_port: r.src_port,
        dst_port: r.dst_port,
        protocol: r.protocol,
        tcp_flags: r.tcp_flags,
        direction: r.direction,
        reserved: [0; 3],
    }
}
