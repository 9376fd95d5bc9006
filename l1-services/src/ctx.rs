//! The per-service side of the host interface: capability checks and the host calls both
//! runtimes (Wasm and native) forward to.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use serde::Serialize;
use spanvmm_sdk::{Capability, LogLevel, MmioRange, PortRange, Translation, VcpuRegs, VmInfo};

use crate::error::HostError;
use crate::host::VmHost;
use crate::memops;
use crate::snapshot::{JobStatus, LayerRequest, MergeRequest, SnapshotEngine};

/// Why a host call failed. Each message names the call; it becomes the `string` of the WIT
/// result or the native error sink's text only at that edge (`String::from`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum CallError {
    /// The service's manifest did not ask for the capability the call needs.
    #[error("{what} denied: service {service} did not ask for capability {cap} in its manifest")]
    Denied {
        /// The call.
        what: &'static str,
        /// The service.
        service: String,
        /// The capability it lacks.
        cap: Capability,
    },
    /// A call that waits for vCPUs, made from a vCPU thread.
    #[error(
        "{0} is not allowed while handling a port or MMIO event (it runs on a vCPU thread); \
         do it from a tick or a call"
    )]
    OnVcpuThread(&'static str),
    /// The VMM's side failed.
    #[error("{what}: {err}")]
    Host {
        /// The call.
        what: &'static str,
        /// What the host reported.
        err: HostError,
    },
    /// A transfer larger than the interface allows.
    #[error("{what} of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The call.
        what: &'static str,
        /// Bytes asked for.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A migration call with no migration in progress.
    #[error("{0}: no migration is in progress")]
    NoMigration(&'static str),
    /// An MMIO range that is empty or wraps.
    #[error("{0} is empty or wraps past the end of the address space")]
    MmioInvalid(MmioRange),
    /// An MMIO range inside guest RAM.
    #[error("{range} lies inside guest RAM (0x0..{ram:#x}), where accesses never reach a service")]
    MmioInRam {
        /// The range.
        range: MmioRange,
        /// Guest RAM size.
        ram: u64,
    },
    /// A request the call refuses (bad argument, wrong moment, conflict), with its message.
    #[error("{0}")]
    Refused(String),
    /// The migration or snapshot engine refused or failed, with its message.
    #[error("{what}: {msg}")]
    Engine {
        /// The call.
        what: &'static str,
        /// The engine's message.
        msg: String,
    },
    /// The host's side panicked.
    #[error("internal host error")]
    Internal,
}

impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.to_string()
    }
}

/// Tags an engine's message with the call.
fn engine<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> CallError {
    move |e| CallError::Engine {
        what,
        msg: e.to_string(),
    }
}

/// Tags an engine's message (a `String`) with the call.
fn engine_err(what: &'static str) -> impl FnOnce(String) -> CallError {
    move |msg| CallError::Engine { what, msg }
}

/// Tags a host error with the call.
fn host_err(what: &'static str) -> impl FnOnce(HostError) -> CallError {
    move |err| CallError::Host { what, err }
}

/// Most notifications kept per service for the control API to read: a service's oldest are
/// dropped first (and counted), so a noisy service never pushes out another's.
pub const NOTIFICATIONS_PER_SERVICE: usize = 256;
/// Most metrics per service.
const MAX_METRICS: usize = 64;
/// Longest log line, metric name or notification field a service may send.
const MAX_TEXT: usize = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A notification a service published with `notify`.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    /// Order among all notifications of this manager's services, from 1.
    pub seq: u64,
    /// Service that sent it.
    pub service: String,
    /// Kind (free form, e.g. `write-watch`).
    pub kind: String,
    /// Detail: the JSON the service sent, as JSON (text that is not JSON is a JSON string).
    pub detail: serde_json::Value,
    /// Host monotonic time, ns since the manager started.
    pub time_ns: u64,
}

/// What a reader takes: the notifications published since the previous take (oldest first)
/// and, per service, how many of its own it pushed out of its full queue meanwhile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Notifications {
    /// The notifications, in publication order.
    pub notifications: Vec<Notification>,
    /// Service name → notifications dropped since the previous take (services that dropped
    /// none are absent).
    pub dropped: BTreeMap<String, u64>,
}

/// One bounded queue per service (by name, so a replacement continues its predecessor's).
#[derive(Default)]
pub(crate) struct NoteQueues {
    queues: BTreeMap<String, (VecDeque<Notification>, u64)>,
    seq: u64,
}

impl NoteQueues {
    fn push(&mut self, mut note: Notification) {
        self.seq += 1;
        note.seq = self.seq;
        let (q, dropped) = self.queues.entry(note.service.clone()).or_default();
        if q.len() >= NOTIFICATIONS_PER_SERVICE {
            q.pop_front();
            *dropped += 1;
        }
        q.push_back(note);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Everything queued, merged in publication order; the queues start empty again.
    pub(crate) fn take(&mut self) -> Notifications {
        let mut out = Notifications::default();
        for (name, (q, dropped)) in std::mem::take(&mut self.queues) {
            if dropped > 0 {
                out.dropped.insert(name, dropped);
            }
            out.notifications.extend(q);
        }
        out.notifications.sort_unstable_by_key(|n| n.seq);
        out
    }
}

/// Hands one dirty harvest out to every `dirty-log` service: each sees every page dirtied since
/// its own previous call.
#[derive(Default)]
pub(crate) struct DirtyFanout {
    holders: BTreeMap<u64, Vec<u64>>,
    /// The last holder leaving does not stop the log (see
    /// [`crate::ServiceManager::leave_dirty_log_on`]).
    pub keep_on: bool,
}

fn or_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

impl DirtyFanout {
    fn spread(&mut self, fresh: &[u64]) {
        for pending in self.holders.values_mut() {
            or_into(pending, fresh);
        }
    }

    /// Adds a holder; its first harvest reports pages dirtied from now on.
    pub(crate) fn register(&mut self, id: u64, host: &dyn VmHost) -> Result<(), HostError> {
        if self.holders.is_empty() {
            host.start_dirty_log()?;
        }
        let fresh = host.harvest_dirty()?;
        self.spread(&fresh);
        self.holders.insert(id, Vec::new());
        Ok(())
    }

    /// Hands holder `from`'s pending pages to `to` (a replacement), registering `to` afresh
    /// when `from` is not a holder.
    pub(crate) fn rename(
        &mut self,
        from: u64,
        to: u64,
        host: &dyn VmHost,
    ) -> Result<(), HostError> {
        match self.holders.remove(&from) {
            Some(pending) => {
                self.holders.insert(to, pending);
                Ok(())
            }
            None => self.register(to, host),
        }
    }

    /// Removes a holder; the last one stops the dirty log.
    pub(crate) fn unregister(&mut self, id: u64, host: &dyn VmHost) {
        if self.holders.remove(&id).is_some() && self.holders.is_empty() && !self.keep_on {
            if let Err(e) = host.stop_dirty_log() {
                tracing::warn!("cannot stop dirty logging: {e}");
            }
        }
    }

    fn harvest(&mut self, id: u64, host: &dyn VmHost) -> Result<Vec<u64>, HostError> {
        if !self.holders.contains_key(&id) {
            return Err(HostError::Failed(
                "the service is not a dirty-log holder".into(),
            ));
        }
        let fresh = host.harvest_dirty()?;
        self.spread(&fresh);
        let words = host.info().mem_bytes.div_ceil(memops::PAGE_SIZE * 64) as usize;
        let mut mine = self.holders.insert(id, Vec::new()).unwrap_or_default();
        mine.resize(words, 0);
        Ok(mine)
    }
}

/// State shared by all services of one manager.
pub(crate) struct HostShared {
    pub host: Arc<dyn VmHost>,
    pub dirty: Mutex<DirtyFanout>,
    pub notes: Mutex<NoteQueues>,
    /// Signalled when a notification is queued (for readers that follow them).
    pub notes_added: Condvar,
    pub epoch: Instant,
    /// The outgoing migration, while one runs.
    pub migration: Mutex<Option<Arc<crate::migration::MigrationSource>>>,
    /// Another operation that owns the VM's run state (a live update preparing), if any.
    pub vm_owner: Mutex<Option<String>>,
    pub snapshots: SnapshotEngine,
    /// Agile migration's engine and the service that opened it (one per VM).
    pub agile: Mutex<Option<(u64, crate::migration::agile::Agile)>>,
    /// The engine's owner (id) is being saved and attached again (a snapshot's or a
    /// migration's state capture): its close is not honoured, and its successor (same name)
    /// adopts the engine when it opens, so that parked pages stay parked.
    pub agile_heir: Mutex<Option<(u64, String)>>,
    /// The manager, so that a layer a service commits carries the other services' states.
    pub manager: OnceLock<std::sync::Weak<crate::manager::ServiceManager>>,
}

impl HostShared {
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Why `range` cannot be MMIO on a VM with `ram` bytes of RAM (guest-physical `[0, ram)`):
/// empty, wrapping, or inside RAM, where guest accesses never exit to the VMM.
pub(crate) fn check_mmio_range(range: &MmioRange, ram: u64) -> Result<(), CallError> {
    if !range.is_valid() {
        return Err(CallError::MmioInvalid(*range));
    }
    if range.base < ram {
        return Err(CallError::MmioInRam { range: *range, ram });
    }
    Ok(())
}

/// Port and MMIO claims made during one `attach`.
pub(crate) struct ClaimSession {
    /// Ranges owned by others (services and the VMM's devices) when attach began.
    pub taken: Vec<(PortRange, String)>,
    /// Ranges this service claimed.
    pub mine: Vec<PortRange>,
    /// MMIO ranges owned by other services when attach began.
    pub taken_mmio: Vec<(MmioRange, String)>,
    /// MMIO ranges this service claimed.
    pub mine_mmio: Vec<MmioRange>,
}

/// One service's context: identity, granted capabilities, per-call flags, metrics.
pub(crate) struct ServiceCtx {
    pub shared: Arc<HostShared>,
    pub id: u64,
    name: OnceLock<String>,
    caps: AtomicU32,
    /// The current call is a port or MMIO event on a vCPU thread.
    pub in_vcpu_event: AtomicBool,
    /// The service is inside a host call that waits for vCPUs (pause, resume, registers).
    pub waiting_on_vcpus: AtomicBool,
    pub claims: Mutex<Option<ClaimSession>>,
    pub metrics: Mutex<BTreeMap<String, f64>>,
    /// The panic line the SDK's hook logged during the current call (a Wasm panic traps right
    /// after it, and the trap's error carries it); `has_panic` keeps the per-call check cheap.
    panic: Mutex<Option<String>>,
    has_panic: AtomicBool,
    /// Bytes of Wasm linear memory the service's store holds (its memories only grow; 0 for a
    /// native service): what `ServiceStats::memory_bytes` reports.
    pub memory_bytes: AtomicU64,
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ServiceCtx {
    pub(crate) fn new(shared: Arc<HostShared>, id: u64) -> Self {
        ServiceCtx {
            shared,
            id,
            name: OnceLock::new(),
            caps: AtomicU32::new(0),
            in_vcpu_event: AtomicBool::new(false),
            waiting_on_vcpus: AtomicBool::new(false),
            claims: Mutex::new(None),
            metrics: Mutex::new(BTreeMap::new()),
            panic: Mutex::new(None),
            has_panic: AtomicBool::new(false),
            memory_bytes: AtomicU64::new(0),
        }
    }

    /// The service's name (`?` before its manifest was accepted).
    pub(crate) fn name(&self) -> &str {
        self.name.get().map(String::as_str).unwrap_or("?")
    }

    /// Grants the manifest's identity and capabilities.
    pub(crate) fn grant(&self, name: &str, caps: &[Capability]) {
        let _ = self.name.set(name.to_string());
        let mask = caps.iter().fold(0, |m, c| m | c.bit());
        self.caps.store(mask, Ordering::Release);
    }

    fn host(&self) -> &dyn VmHost {
        &*self.shared.host
    }

    fn require(&self, cap: Capability, what: &'static str) -> Result<(), CallError> {
        if self.caps.load(Ordering::Acquire) & cap.bit() != 0 {
            Ok(())
        } else {
            Err(CallError::Denied {
                what,
                service: self.name().to_string(),
                cap,
            })
        }
    }

    fn vcpu_wait<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn VmHost) -> Result<T, HostError>,
    ) -> Result<T, CallError> {
        if self.in_vcpu_event.load(Ordering::Acquire) {
            return Err(CallError::OnVcpuThread(what));
        }
        self.waiting_on_vcpus.store(true, Ordering::Release);
        let r = f(self.host());
        self.waiting_on_vcpus.store(false, Ordering::Release);
        r.map_err(host_err(what))
    }

    pub(crate) fn vm_info(&self) -> VmInfo {
        self.host().info()
    }

    pub(crate) fn pause(&self) -> Result<(), CallError> {
        self.require(Capability::PauseResume, "pause")?;
        self.vcpu_wait("pause", |h| h.pause())
    }

    pub(crate) fn resume(&self) -> Result<(), CallError> {
        self.require(Capability::PauseResume, "resume")?;
        self.vcpu_wait("resume", |h| h.resume())
    }

    pub(crate) fn vcpu_regs(&self, index: u32) -> Result<VcpuRegs, CallError> {
        self.require(Capability::VcpuState, "vcpu-regs")?;
        let n = self.host().info().vcpus;
        if index >= n {
            return Err(CallError::Refused(format!(
                "vcpu-regs: no vCPU {index} (the VM has {n})"
            )));
        }
        self.vcpu_wait("vcpu-regs", |h| h.vcpu_regs(index))
    }

    /// Reads into a caller buffer (the native runtime's zero-copy path).
    pub(crate) fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CallError> {
        self.require(Capability::MemoryRead, "read-memory")?;
        if buf.len() > memops::MAX_TRANSFER {
            return Err(CallError::TooLarge {
                what: "read-memory",
                len: buf.len(),
                max: memops::MAX_TRANSFER,
            });
        }
        self.host()
            .read_memory(gpa, buf)
            .map_err(host_err("read-memory"))
    }

    pub(crate) fn read_memory(&self, gpa: u64, len: u32) -> Result<Vec<u8>, CallError> {
        self.require(Capability::MemoryRead, "read-memory")?;
        if len as usize > memops::MAX_TRANSFER {
            return Err(CallError::TooLarge {
                what: "read-memory",
                len: len as usize,
                max: memops::MAX_TRANSFER,
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.read_into(gpa, &mut buf)?;
        Ok(buf)
    }

    pub(crate) fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), CallError> {
        self.require(Capability::MemoryWrite, "write-memory")?;
        if data.len() > memops::MAX_TRANSFER {
            return Err(CallError::TooLarge {
                what: "write-memory",
                len: data.len(),
                max: memops::MAX_TRANSFER,
            });
        }
        self.host()
            .write_memory(gpa, data)
            .map_err(host_err("write-memory"))
    }

    pub(crate) fn translate(&self, cr3: u64, gva: u64) -> Result<Translation, CallError> {
        self.require(Capability::MemoryRead, "translate")?;
        memops::translate(self.host(), cr3, gva).map_err(host_err("translate"))
    }

    pub(crate) fn dirty_bitmap(&self) -> Result<Vec<u64>, CallError> {
        self.require(Capability::DirtyLog, "dirty-bitmap")?;
        lock(&self.shared.dirty)
            .harvest(self.id, self.host())
            .map_err(host_err("dirty-bitmap"))
    }

    pub(crate) fn hash_pages(&self, first: u64, count: u32) -> Result<Vec<u64>, CallError> {
        self.require(Capability::MemoryRead, "hash-pages")?;
        memops::hash_pages(self.host(), first, count).map_err(host_err("hash-pages"))
    }

    pub(crate) fn zero_scan(&self, first: u64, count: u32) -> Result<Vec<u64>, CallError> {
        self.require(Capability::MemoryRead, "zero-scan")?;
        memops::zero_scan(self.host(), first, count).map_err(host_err("zero-scan"))
    }

    pub(crate) fn search_memory(
        &self,
        start: u64,
        len: u64,
        pattern: &[u8],
        max_results: u32,
    ) -> Result<Vec<u64>, CallError> {
        self.require(Capability::MemoryRead, "search-memory")?;
        memops::search(self.host(), start, len, pattern, max_results)
            .map_err(host_err("search-memory"))
    }

    pub(crate) fn claim_ports(&self, base: u16, len: u16) -> Result<(), CallError> {
        let range = PortRange::new(base, len);
        let mut claims = lock(&self.claims);
        let Some(session) = claims.as_mut() else {
            return Err(CallError::Refused(format!(
                "claim-ports {range}: ports can only be claimed during attach"
            )));
        };
        if !range.is_valid() {
            return Err(CallError::Refused(format!(
                "claim-ports: range {base:#x}+{len} is empty or runs past port 0xffff"
            )));
        }
        if let Some((owned, owner)) = session.taken.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(CallError::Refused(format!(
                "claim-ports: service {} cannot claim ports {range}: they overlap {owned} owned by {owner}",
                self.name()
            )));
        }
        let contained = |r: &PortRange| r.base <= range.base && range.end() <= r.end();
        if session.mine.iter().any(contained) {
            return Ok(()); // claimed already
        }
        if let Some(own) = session.mine.iter().find(|r| r.overlaps(&range)) {
            return Err(CallError::Refused(format!(
                "claim-ports: {range} partly overlaps {own}, which this service claimed already; \
                 claim disjoint ranges"
            )));
        }
        session.mine.push(range);
        Ok(())
    }

    pub(crate) fn claim_mmio(&self, base: u64, len: u64) -> Result<(), CallError> {
        let range = MmioRange::new(base, len);
        let mut claims = lock(&self.claims);
        let Some(session) = claims.as_mut() else {
            return Err(CallError::Refused(format!(
                "claim-mmio {range}: MMIO can only be claimed during attach"
            )));
        };
        let ram = self.host().info().mem_bytes;
        check_mmio_range(&range, ram)
            .map_err(|e| CallError::Refused(format!("claim-mmio: {e}")))?;
        if let Some((owned, owner)) = session.taken_mmio.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(CallError::Refused(format!(
                "claim-mmio: service {} cannot claim {range}: it overlaps {owned} owned by {owner}",
                self.name()
            )));
        }
        if let Some(own) = session.mine_mmio.iter().find(|r| r.overlaps(&range)) {
            if own.base <= range.base && range.end() <= own.end() {
                return Ok(()); // claimed already
            }
            return Err(CallError::Refused(format!(
                "claim-mmio: {range} partly overlaps {own}, which this service claimed already; \
                 claim disjoint ranges"
            )));
        }
        session.mine_mmio.push(range);
        Ok(())
    }

    /// A service's log line goes to the VMM's log under the service's name (target
    /// `spanvmm::service`, field `service`), so an operator can filter one service.
    pub(crate) fn log(&self, level: LogLevel, msg: &str) {
        let (service, msg) = (self.name(), truncate(msg));
        if level == LogLevel::Error && msg.starts_with(spanvmm_sdk::PANIC_PREFIX) {
            *lock(&self.panic) = Some(msg.to_string());
            self.has_panic.store(true, Ordering::Release);
        }
        match level {
            LogLevel::Error => tracing::error!(target: "spanvmm::service", service, "{msg}"),
            LogLevel::Warn => tracing::warn!(target: "spanvmm::service", service, "{msg}"),
            LogLevel::Info => tracing::info!(target: "spanvmm::service", service, "{msg}"),
            LogLevel::Debug => tracing::debug!(target: "spanvmm::service", service, "{msg}"),
            LogLevel::Trace => tracing::trace!(target: "spanvmm::service", service, "{msg}"),
        }
    }

    /// The panic line logged during this call, if any (see `panic`).
    pub(crate) fn take_panic(&self) -> Option<String> {
        // A plain load first: this runs at the start of every call, also on the event path.
        if !self.has_panic.load(Ordering::Acquire) || !self.has_panic.swap(false, Ordering::AcqRel)
        {
            return None;
        }
        lock(&self.panic).take()
    }

    pub(crate) fn metric(&self, name: &str, value: f64) {
        let mut m = lock(&self.metrics);
        let name = truncate(name);
        if m.len() < MAX_METRICS || m.contains_key(name) {
            m.insert(name.to_string(), value);
        }
    }

    pub(crate) fn notify(&self, kind: &str, detail: &str) {
        let detail = truncate(detail);
        let note = Notification {
            seq: 0,
            service: self.name().to_string(),
            kind: truncate(kind).to_string(),
            detail: serde_json::from_str(detail)
                .unwrap_or_else(|_| serde_json::Value::String(detail.to_string())),
            time_ns: self.shared.now_ns(),
        };
        lock(&self.shared.notes).push(note);
        self.shared.notes_added.notify_all();
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// The migration in progress, for a service holding `drives-migration`.
    pub(crate) fn migration(
        &self,
        what: &'static str,
    ) -> Result<Arc<crate::migration::MigrationSource>, CallError> {
        self.require(Capability::DrivesMigration, what)?;
        lock(&self.shared.migration)
            .clone()
            .ok_or(CallError::NoMigration(what))
    }

    /// `set-scatter`: the request is read and checked here, the engine takes it up.
    pub(crate) fn migration_set_scatter(&self, config: &str) -> Result<(), CallError> {
        let m = self.migration("set-scatter")?;
        let req =
            crate::migration::scatter::ScatterRequest::parse(config).map_err(CallError::Refused)?;
        m.set_scatter(req)
            .map_err(|e| CallError::Refused(e.to_string()))
    }

    /// `throttle-vcpus`: the engine applies it on its own thread.
    pub(crate) fn migration_throttle(&self, percent: u32) -> Result<(), CallError> {
        let m = self.migration("throttle-vcpus")?;
        let percent = percent.min(u32::from(base_vmm::vcpu::MAX_THROTTLE)) as u8;
        m.set_throttle(percent)
            .map_err(|e| CallError::Refused(e.to_string()))
    }

    pub(crate) fn migration_harvest(&self) -> Result<Vec<u64>, CallError> {
        let m = self.migration("harvest-dirty")?;
        let mut bits = self.dirty_bitmap()?;
        m.unqueued(&mut bits);
        Ok(bits)
    }

    pub(crate) fn migration_switch(
        &self,
        mode: crate::migration::SwitchMode,
    ) -> Result<(), CallError> {
        let m = self.migration("switch-over")?;
        // The final harvest runs on the migration thread once the guest is paused.
        let harvest: Option<crate::migration::Harvest> =
            if self.caps.load(Ordering::Acquire) & Capability::DirtyLog.bit() != 0 {
                let shared = self.shared.clone();
                let id = self.id;
                Some(Box::new(move || {
                    lock(&shared.dirty).harvest(id, &*shared.host)
                }))
            } else {
                None
            };
        m.switch_over(mode, harvest)
            .map_err(|e| CallError::Refused(e.to_string()))
    }

    pub(crate) fn snapshot_begin(&self, req: LayerRequest) -> Result<u32, CallError> {
        self.require(Capability::Snapshot, "snapshot begin")?;
        // A layer pauses and resumes the guest: not while a migration or a live update owns
        // it (a periodic layer's resume would run the guest in their stop-and-copy).
        if lock(&self.shared.migration).is_some() {
            return Err(CallError::Refused(
                "snapshot begin: a migration is in progress".into(),
            ));
        }
        if let Some(owner) = lock(&self.shared.vm_owner).as_deref() {
            return Err(CallError::Refused(format!(
                "snapshot begin: {owner} is in progress"
            )));
        }
        self.shared
            .snapshots
            .begin(self.id, self.host(), req)
            .map_err(engine("snapshot begin"))
    }

    pub(crate) fn snapshot_write_pages(&self, job: u32, bitmap: Vec<u64>) -> Result<(), CallError> {
        self.require(Capability::Snapshot, "snapshot write-pages")?;
        let words = self
            .host()
            .info()
            .mem_bytes
            .div_ceil(memops::PAGE_SIZE * 64) as usize;
        if bitmap.len() > words {
            return Err(CallError::Refused(format!(
                "snapshot write-pages: the bitmap has {} words, the guest needs {words}",
                bitmap.len()
            )));
        }
        let bits = (!bitmap.is_empty()).then_some(bitmap);
        self.shared
            .snapshots
            .write_pages(self.id, job, bits)
            .map_err(|e| CallError::Refused(e.to_string()))
    }

    pub(crate) fn snapshot_commit(&self, job: u32) -> Result<(), CallError> {
        self.require(Capability::Snapshot, "snapshot commit")?;
        // Not from a vCPU thread (vcpu_wait refuses it too, but only after the services would
        // have been asked).
        if self.in_vcpu_event.load(Ordering::Acquire) {
            return Err(CallError::OnVcpuThread("snapshot commit"));
        }
        // This service is inside its own call: it is recorded as driving the snapshot.
        let services = self
            .shared
            .manager
            .get()
            .and_then(|m| m.upgrade())
            .map(|m| m.save_states(Some(self.id)))
            .unwrap_or_default();
        self.vcpu_wait("snapshot commit", |h| {
            self.shared
                .snapshots
                .commit(self.id, job, h, &services)
                .map_err(|e| HostError::Failed(e.to_string()))
        })
    }

    pub(crate) fn snapshot_merge(&self, req: MergeRequest) -> Result<u32, CallError> {
        self.require(Capability::Snapshot, "snapshot merge")?;
        self.shared
            .snapshots
            .merge(self.id, req)
            .map_err(engine("snapshot merge"))
    }

    pub(crate) fn snapshot_remove(&self, dir: &str) -> Result<(), CallError> {
        self.require(Capability::Snapshot, "snapshot remove")?;
        crate::snapshot::remove_layer(dir).map_err(engine("snapshot remove"))
    }

    pub(crate) fn snapshot_status(&self, job: u32) -> Result<JobStatus, CallError> {
        self.require(Capability::Snapshot, "snapshot status")?;
        self.shared
            .snapshots
            .status(self.id, job)
            .map_err(|e| CallError::Refused(e.to_string()))
    }

    pub(crate) fn snapshot_close(&self, job: u32) {
        self.shared.snapshots.close(self.id, job)
    }

    /// Refuses when another operation owns the guest's run state (`what` pauses it).
    fn refuse_if_vm_owned(&self, what: &'static str) -> Result<(), CallError> {
        if lock(&self.shared.migration).is_some() {
            return Err(CallError::Refused(format!(
                "{what}: a migration is in progress"
            )));
        }
        if let Some(owner) = lock(&self.shared.vm_owner).as_deref() {
            return Err(CallError::Refused(format!(
                "{what}: {owner} is in progress"
            )));
        }
        Ok(())
    }

    pub(crate) fn agile_open(&self, config: &str) -> Result<(), CallError> {
        self.require(Capability::EvictMemory, "agile open")?;
        let mut agile = lock(&self.shared.agile);
        if let Some((owner, _)) = agile.as_mut() {
            let mut heir = lock(&self.shared.agile_heir);
            if heir
                .as_ref()
                .is_some_and(|(id, name)| *id == *owner && name == self.name())
            {
                // Our predecessor's engine, kept across a state capture: adopted as it is.
                *owner = self.id;
                *heir = None;
                return Ok(());
            }
            return Err(CallError::Refused(format!(
                "agile open: already open (service {owner})"
            )));
        }
        let ram = self.host().guest_ram().ok_or_else(|| {
            CallError::Refused("agile open: this host does not share guest memory".into())
        })?;
        let cfg =
            crate::migration::agile::AgileConfig::parse(config).map_err(CallError::Refused)?;
        let eng =
            crate::migration::agile::Agile::open(&ram, &cfg).map_err(engine_err("agile open"))?;
        *agile = Some((self.id, eng));
        Ok(())
    }

    pub(crate) fn agile_park(&self, bitmap: Vec<u64>) -> Result<String, CallError> {
        self.require(Capability::EvictMemory, "agile park")?;
        if self.in_vcpu_event.load(Ordering::Acquire) {
            return Err(CallError::OnVcpuThread("agile park"));
        }
        self.refuse_if_vm_owned("agile park")?;
        let mut agile = lock(&self.shared.agile);
        let Some((owner, engine)) = agile.as_mut() else {
            return Err(CallError::Refused("agile park: call open first".into()));
        };
        if *owner != self.id {
            return Err(CallError::Refused(
                "agile park: another service opened it".into(),
            ));
        }
        let host = self.host();
        self.waiting_on_vcpus.store(true, Ordering::Release);
        let r = engine.park(
            &bitmap,
            &mut || host.pause().map_err(|e| e.to_string()),
            &mut || host.resume().map_err(|e| e.to_string()),
        );
        self.waiting_on_vcpus.store(false, Ordering::Release);
        let out = r.map_err(engine_err("agile park"))?;
        serde_json::to_string(&out).map_err(|_| CallError::Internal)
    }

    pub(crate) fn agile_report(&self) -> Result<String, CallError> {
        self.require(Capability::EvictMemory, "agile report")?;
        let agile = lock(&self.shared.agile);
        let Some((_, engine)) = agile.as_ref() else {
            return Err(CallError::Refused("agile report: not open".into()));
        };
        serde_json::to_string(&engine.report()).map_err(|_| CallError::Internal)
    }

    pub(crate) fn agile_close(&self) -> Result<(), CallError> {
        self.require(Capability::EvictMemory, "agile close")?;
        self.close_agile().map_err(engine_err("agile close"))
    }

    /// Closes the agile engine if this service opened it (every page comes back), unless
    /// it is kept for this service's successor (see `agile_heir`).
    fn close_agile(&self) -> Result<(), String> {
        let mut agile = lock(&self.shared.agile);
        if agile.as_ref().is_none_or(|(owner, _)| *owner != self.id) {
            return Ok(());
        }
        if lock(&self.shared.agile_heir)
            .as_ref()
            .is_some_and(|(id, _)| *id == self.id)
        {
            return Ok(());
        }
        let (_, engine) = agile.take().expect("checked above");
        engine.close()
    }
}

impl Drop for ServiceCtx {
    fn drop(&mut self) {
        // A service that goes away takes its snapshot jobs with it, and brings back the
        // pages it evicted.
        self.shared.snapshots.close_owner(self.id);
        if let Err(e) = self.close_agile() {
            tracing::error!(service = self.name(), "agile close: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    /// What the SDK tells a policy a throttle's sleep lasts is what the vCPUs sleep.
    #[test]
    fn the_sdk_and_the_vcpus_agree_on_a_throttle_sleep() {
        for p in [0u8, 33, 50, 90, 99, 100] {
            let sdk = spanvmm_sdk::migration::throttle_sleep_ms(u32::from(p));
            let vcpu = base_vmm::vcpu::throttle_sleep(p).as_nanos() as f64 / 1e6;
            assert!(
                (sdk - vcpu).abs() < 1e-3,
                "{p} %: SDK {sdk} ms, vCPU {vcpu} ms"
            );
        }
    }
}
