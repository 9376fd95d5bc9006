//! One VM's process: builds the VM from its source (boot, restore, standby, incoming
//! migration, live-update take-over), attaches its `--plugin` services, serves the control API
//! from one main loop that executes every VM operation in turn, and tears down at the end.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::vcpu::{VcpuEvent, VcpuExitReason};
use base_vmm::vmm::{RestoreHow, VmConfig, Vmm, VmmError};
use l1_services::{AttachOptions, Capability, Lifecycle, ServiceManager};
use serde_json::{json, Value};

use crate::api::{self, ApiRequest, ApiResult};
use crate::inbox::Msg;
use crate::metrics::Metrics;
use crate::{live_update, migrate, services, snapshot};

/// Where a VM comes from.
pub enum Source {
    Boot(VmConfig),
    Restore {
        dir: PathBuf,
        paused: bool,
        lazy: bool,
        key: Option<PathBuf>,
    },
    Takeover(i32),
    Standby {
        mem_mib: u64,
        vcpus: usize,
    },
    Incoming {
        addr: String,
        tls_dir: PathBuf,
        recovery: Duration,
        mem_mib: Option<u64>,
    },
}

/// A live update in its first half: the new process prepares while the guest runs on; the
/// API call waits for the outcome.
struct PendingUpdate {
    update: live_update::Preparing,
    reply: api::Reply,
    written: Receiver<()>,
}

/// The operation that owns the VM's run state and memory right now, if any. Migrations,
/// snapshot layers and live updates each pause and resume the guest and read all of its
/// memory: one at a time, or one silently breaks the other.
///
/// `for_snapshot`: the checkpoint service orders its own layers (an eviction waits for a
/// periodic layer in flight), so a layer being written does not keep it out.
fn vm_owner(
    migrations: &migrate::Migrations,
    manager: &ServiceManager,
    update: Option<&PendingUpdate>,
    for_snapshot: bool,
) -> Option<String> {
    if let Some(u) = update {
        return Some(format!(
            "a live update (new process {}) is in progress",
            u.update.pid()
        ));
    }
    if migrations.outgoing() {
        return Some("a migration is in progress (see GET /vm/migration)".into());
    }
    if !for_snapshot && manager.snapshot_in_progress() {
        return Some("a snapshot is being written (see GET /snapshot/status)".into());
    }
    None
}

/// The `--metrics-addr` listener once it serves.
struct MetricsServing {
    /// A clone, for a live update's new process.
    listener: std::net::TcpListener,
    addr: std::net::SocketAddr,
    accepting: api::server::Accepting,
}

impl MetricsServing {
    /// After a live update's hand-over: stop taking scrapes from the shared listener, so the
    /// next one reaches the new process (not this one, on its way out).
    fn stop_accepting(&self) {
        let addr = self.addr;
        if !self
            .accepting
            .stop_with(|| drop(std::net::TcpStream::connect(addr)))
        {
            tracing::warn!("live update: the old metrics thread did not confirm it stopped");
        }
    }
}

/// Serves `GET /metrics` on `listener` (if any).
fn serve_metrics(
    metrics: &Arc<Metrics>,
    listener: Option<std::net::TcpListener>,
) -> anyhow::Result<Option<MetricsServing>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let kept = listener.try_clone()?;
    let (addr, accepting) = api::server::serve_metrics(metrics, listener)?;
    tracing::info!("metrics on http://{addr}/metrics");
    Ok(Some(MetricsServing {
        listener: kept,
        addr,
        accepting,
    }))
}

/// Runs a VM until it powers off or is shut down; returns the process exit status.
pub fn run(
    source: Source,
    serial: &str,
    api_socket: Option<&Path>,
    plugins: &[String],
    metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<u8> {
    // Bind first: a busy socket must fail before a VM exists.
    let mut listener = api_socket.map(api::bind).transpose()?;
    let metrics = Metrics::new();
    let mut metrics_listener = metrics_addr.map(api::server::bind_metrics).transpose()?;
    // A live update's successor gets the metrics listener (kept here as a clone) and serves
    // it with its own counters; a successor's listener comes from the old process.
    let mut metrics_handover = None;
    if !matches!(source, Source::Takeover(_)) {
        metrics_handover = serve_metrics(&metrics, metrics_listener.take())?;
    }
    // A start-up that fails from here on leaves no socket file behind.
    let _socket_file = api_socket.map(SocketFile);
    base_vmm::startup::mark("API socket bound");
    let mut serial = serial.to_string();
    let mut migrations = migrate::Migrations::default();
    let (tx, rx) = mpsc::channel::<Msg>();
    migrations.news = Some(tx.clone());
    let (vcpu_tx, vcpu_rx) = mpsc::channel::<VcpuEvent>();
    crate::inbox::forward_stop_signals(tx.clone()).context("handling SIGTERM and SIGINT")?;
    let fwd = tx.clone();
    std::thread::spawn(move || {
        base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Helper);
        for ev in vcpu_rx {
            if fwd.send(Msg::Vcpu(ev)).is_err() {
                break;
            }
        }
    });
    // A standby VMM and a migration destination answer their API before there is a VM; the
    // others start serving once the VM runs (a live update's listener comes from the old
    // process).
    let mut api = ApiServing::default();
    if matches!(source, Source::Standby { .. } | Source::Incoming { .. }) {
        api.start(listener.take(), &tx, &metrics, migrations.watch())?;
    }
    // A booted or restored guest waits for its --plugin services before its first instruction.
    let not_started = matches!(source, Source::Boot(_) | Source::Restore { .. });
    let restored = matches!(source, Source::Restore { .. });
    let (mut vmm, manager) = match source {
        Source::Boot(cfg) => {
            let vmm = Vmm::boot(&cfg, vcpu_tx)?;
            let lacks = vmm.status().cpu.template_lacks;
            if !lacks.is_empty() {
                tracing::warn!(
                    "CPU template {}: this host's KVM does not offer {} of the baseline; the \
                     guest is told it lacks them",
                    cfg.cpu_template,
                    lacks.join(", ")
                );
            }
            let manager = services::manager_for(&vmm)?;
            (vmm, manager)
        }
        Source::Restore {
            dir,
            paused,
            lazy,
            key,
        } => {
            let key = key
                .map(|k| base_vmm::snapshot::SnapshotKey::from_file(&k))
                .transpose()?;
            let how = RestoreHow {
                serial_spec: &serial,
                events: vcpu_tx,
                // It waits for its --plugin services (and base-vmm keeps one saved with
                // services paused for them) before it runs.
                start_paused: paused || !plugins.is_empty(),
                lazy,
                key: key.as_ref(),
            };
            let vmm = Vmm::restore(&dir, how)
                .with_context(|| format!("cannot restore the VM saved in {}", dir.display()))?;
            if paused {
                // `--paused` is the operator's: it waits for `ctl resume`.
                vmm.control().operator_pause()?;
            }
            let manager = services::manager_for(&vmm)?;
            manager.lifecycle(Lifecycle::Restored);
            (vmm, manager)
        }
        Source::Takeover(fd) => {
            let t = live_update::take_over(fd, vcpu_tx).context("live update: taking over")?;
            metrics
                .counters
                .takeover_restore_us
                .store(t.restore_us.max(1), Ordering::Relaxed);
            listener = t.api;
            metrics_listener = t.metrics;
            serial = t.serial;
            (t.vmm, t.manager)
        }
        Source::Standby { mem_mib, vcpus } => {
            match standby(mem_mib, vcpus, &serial, vcpu_tx, &rx)? {
                Some(vmm) => {
                    let manager = services::manager_for(&vmm)?;
                    manager.lifecycle(Lifecycle::Restored);
                    (vmm, manager)
                }
                None => {
                    api.remove_socket();
                    return Ok(0);
                }
            }
        }
        Source::Incoming {
            addr,
            tls_dir,
            recovery,
            mem_mib,
        } => {
            let r = migrate::incoming(
                &addr, &tls_dir, &serial, vcpu_tx, recovery, mem_mib, &rx, &tx,
            );
            let (vmm, dest) = match r {
                Ok(Some(arrived)) => arrived,
                Ok(None) => {
                    api.remove_socket();
                    return Ok(0);
                }
                Err(e) => {
                    api.remove_socket();
                    return Err(e.context("incoming migration"));
                }
            };
            migrations.set_incoming(dest);
            let manager = services::manager_for(&vmm)?;
            manager.lifecycle(Lifecycle::Migrated);
            (vmm, manager)
        }
    };
    base_vmm::startup::mark("VM built");
    for spec in plugins {
        // The configuration follows the first ':' (JSON has more), unless the whole spec
        // names a file: a path with ':' in it then works without a configuration.
        let (path, config) = match spec.split_once(':') {
            Some((path, config)) if !Path::new(spec).is_file() => (path, config),
            _ => (spec.as_str(), ""),
        };
        if let Err(e) = manager.attach(Path::new(path), config) {
            // A booted or restored guest has not run yet (it waits for its services); an
            // arriving or loaded one already runs and is not given up for a service.
            if not_started {
                vmm.shutdown();
                anyhow::bail!("--plugin {path}: {e} (the guest was not started)");
            }
            tracing::warn!("--plugin {path}: {e}; the guest runs on without it");
        }
    }
    // The services a restored or arrived VM's state names come back with their states (a
    // live update's successor attached them already); one that --plugin attached again
    // keeps the operator's fresh instance.
    manager.restore_states(&vmm.take_service_sections());
    if !plugins.is_empty() || restored {
        // No-op for a guest that already runs or that the operator keeps paused.
        vmm.control().resume()?;
    }
    metrics.set_vm(vmm.control().clone(), vmm.bus().clone(), manager.clone());
    if metrics_listener.is_some() {
        metrics_handover = serve_metrics(&metrics, metrics_listener.take())?;
    }
    api.start(listener, &tx, &metrics, migrations.watch())?;
    base_vmm::startup::mark("API serving");
    // Live-update answers come from a thread of their own; the loop ends once every sender
    // (the API's, the vCPUs', this one) is gone.
    let answers = tx;
    let mut pending_update: Option<PendingUpdate> = None;
    let mut handed_over = false;
    let mut moved_at: Option<Instant> = None;
    let mut traps_seen = 0;
    let code = loop {
        // Forbidden syscalls any thread made (they failed with EPERM); a service's own are
        // also reported with its failure.
        let (traps, last) = base_vmm::seccomp::process_traps();
        if traps > traps_seen {
            let nr = last.unwrap_or(-1);
            tracing::warn!(
                "seccomp: {} forbidden syscall(s) refused with EPERM, the last {} ({nr})",
                traps - traps_seen,
                base_vmm::seccomp::syscall_name(nr)
            );
            traps_seen = traps;
        }
        api::set_busy(Some("checking on the migrations".into()));
        match migrations.poll(&manager, &metrics.counters) {
            migrate::Polled::Nothing => {}
            migrate::Polled::Moved => {
                // Wait (a little) for `ctl migrate` to fetch the report, then go.
                moved_at.get_or_insert_with(Instant::now);
            }
            migrate::Polled::IncomingLost(e) => {
                tracing::error!("the incoming migration failed, the guest cannot go on: {e}");
                break 1;
            }
        }
        if moved_at.is_some_and(|t| t.elapsed() > migrate::REPORT_GRACE) {
            break 0;
        }
        // Services with a tick period are served from here, between messages.
        let mut wait = manager
            .next_tick_in(Instant::now())
            .unwrap_or(Duration::from_secs(3600));
        if migrations.active() || moved_at.is_some() {
            wait = wait.min(Duration::from_millis(20));
        }
        api::set_busy(None);
        let msg = match rx.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {
                api::set_busy(Some("services' ticks".into()));
                manager.tick(Instant::now());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => Err(()),
            Ok(m) => Ok(m),
        };
        if let Ok(Msg::Api((req, reply, _))) = &msg {
            if !reply.claim() {
                continue;
            }
            api::set_busy(Some(api::describe(req)));
        }
        match msg {
            Ok(Msg::Api((ApiRequest::Shutdown, reply, written))) => {
                let _ = reply.send(Ok(json!({"state": "shutdown"})));
                // The client gets its answer before the process goes away.
                let _ = written.recv_timeout(Duration::from_secs(5));
                break 0;
            }
            Ok(Msg::Api((ApiRequest::LiveUpdate { binary, timeout_ms }, reply, written))) => {
                if let Some(busy) = vm_owner(&migrations, &manager, pending_update.as_ref(), false)
                {
                    let _ = reply.send(Err((409, format!("no live update now: {busy}"))));
                    continue;
                }
                if let Err(e) = vmm
                    .require_memory_loaded()
                    .and_then(|_| vmm.require_all_resident())
                {
                    let _ = reply.send(Err((409, e.to_string())));
                    continue;
                }
                let answer_tx = answers.clone();
                let started = live_update::start(
                    &vmm,
                    &binary,
                    &serial,
                    api.handover.as_ref(),
                    metrics_handover.as_ref().map(|m| &m.listener),
                    Duration::from_millis(timeout_ms),
                    move |answer| {
                        let _ = answer_tx.send(Msg::LiveUpdateAnswer(answer));
                    },
                );
                match started {
                    Ok(update) => {
                        manager.set_vm_owner(Some(format!(
                            "a live update (new process {})",
                            update.pid()
                        )));
                        pending_update = Some(PendingUpdate {
                            update,
                            reply,
                            written,
                        })
                    }
                    Err(e) => {
                        tracing::warn!("live update failed: {e:#}");
                        let _ = reply.send(Err((409, format!("{e:#}"))));
                    }
                }
            }
            Ok(Msg::Stop(sig)) => {
                tracing::info!("signal {sig}: shutting down");
                break 0;
            }
            Ok(Msg::ReportTaken(written)) => {
                // The migration's starter has the report: the guest lives elsewhere now.
                let _ = written.recv_timeout(Duration::from_secs(5));
                break 0;
            }
            Ok(Msg::MigrationNews) => {
                migrations.news_taken();
                api::set_busy(Some("services' ticks".into()));
                manager.tick_now(Capability::DrivesMigration, Instant::now());
            }
            Ok(Msg::LiveUpdateAnswer(answer)) => {
                let Some(p) = pending_update.take() else {
                    continue;
                };
                manager.set_vm_owner(None);
                match p.update.finish(answer, &mut vmm, &manager) {
                    live_update::Outcome::HandedOver(report) => {
                        api.stop_accepting();
                        if let Some(m) = &metrics_handover {
                            m.stop_accepting();
                        }
                        let _ = p.reply.send(Ok(json!(report)));
                        // Exit only once the client has its answer.
                        let _ = p.written.recv_timeout(Duration::from_secs(5));
                        handed_over = true;
                        break 0;
                    }
                    live_update::Outcome::RolledBack(e) => {
                        metrics
                            .counters
                            .live_update_rollbacks
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("live update failed: {e:#}");
                        let _ = p.reply.send(Err((409, format!("{e:#}"))));
                    }
                    live_update::Outcome::InDoubt(why) => {
                        metrics
                            .counters
                            .live_updates_in_doubt
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!("{why}");
                        vmm.control().set_in_doubt(why.clone());
                        let _ = p.reply.send(Err((409, why)));
                    }
                }
            }
            Ok(Msg::Api((ApiRequest::Migrate(req), reply, _))) => {
                let busy = match &req {
                    migrate::MigrateRequest::Start(_) => {
                        vm_owner(&migrations, &manager, pending_update.as_ref(), false)
                    }
                    migrate::MigrateRequest::Poll(_)
                    | migrate::MigrateRequest::Release(_)
                    | migrate::MigrateRequest::Cancel(_) => None,
                };
                if let Some(busy) = busy {
                    let _ = reply.send(Err((409, format!("no migration now: {busy}"))));
                    continue;
                }
                let _ = reply.send(migrations.request(&vmm, &manager, req));
            }
            Ok(Msg::Api((ApiRequest::MigrationStatus, reply, _))) => {
                let _ = reply.send(Ok(migrations.status()));
            }
            Ok(Msg::Api((ApiRequest::Pause | ApiRequest::Resume { .. }, reply, _)))
                if migrations.holds_guest() =>
            {
                let _ = reply.send(migrations.refuse_while_held());
            }
            Ok(Msg::Api((ApiRequest::Snapshot(req), reply, _))) => {
                let owner = vm_owner(&migrations, &manager, pending_update.as_ref(), true);
                let answer = match (&req, owner) {
                    (snapshot::SnapshotRequest::Create(_), Some(busy))
                    | (snapshot::SnapshotRequest::Background { .. }, Some(busy)) => {
                        Err((409, format!("no snapshot now: {busy}")))
                    }
                    _ => snapshot::handle(&mut vmm, &manager, req),
                };
                let _ = reply.send(answer);
            }
            Ok(Msg::Api((ApiRequest::Save(dir), reply, _))) => {
                let answer = match vm_owner(&migrations, &manager, pending_update.as_ref(), false) {
                    Some(busy) => Err((409, format!("no save now: {busy}"))),
                    None => handle(&mut vmm, &manager, ApiRequest::Save(dir)),
                };
                let _ = reply.send(answer);
            }
            Ok(Msg::Api((req, reply, _))) => {
                let _ = reply.send(handle(&mut vmm, &manager, req));
            }
            Ok(Msg::Vcpu(ev)) => match ev.reason {
                VcpuExitReason::PowerOff(code) => break code,
                VcpuExitReason::Reset => break 0,
                other => {
                    tracing::error!("vCPU {} stopped: {other:?}", ev.index);
                    break 1;
                }
            },
            Err(_) => break 0,
        }
    };
    if let Some(mut p) = pending_update.take() {
        // The VM ends here: the half-started new process has nothing to take over.
        p.update.kill();
        let _ = p
            .reply
            .send(Err((409, "the VM stopped during the live update".into())));
    }
    if handed_over {
        // The guest, its memory, its services and the API socket belong to the new process.
        // Exit at once: a graceful teardown of a large VM takes long, and meanwhile this
        // process's API thread would keep accepting connections meant for the new process.
        // Exiting kills that thread first; connections not yet accepted stay queued on the
        // shared socket for the new process.
        std::process::exit(i32::from(code));
    }
    manager.lifecycle(Lifecycle::Shutdown);
    for (name, r) in manager.detach_all() {
        if let Err(e) = r {
            tracing::warn!("detaching service {name}: {e}");
        }
    }
    vmm.shutdown();
    api.remove_socket();
    Ok(code)
}

/// The API socket's path, removed when `run` returns (not at a live update's hand-over, which
/// leaves the process without returning).
struct SocketFile<'a>(&'a Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The API listener once it serves: its socket path (removed at exit; a taken-over listener
/// knows its own) and a second handle for a live update's new process.
#[derive(Default)]
struct ApiServing {
    socket_path: Option<PathBuf>,
    handover: Option<UnixListener>,
    accepting: Option<api::server::Accepting>,
}

impl ApiServing {
    /// Serves `listener` (if any, and unless serving already), forwarding calls into `tx`.
    fn start(
        &mut self,
        listener: Option<UnixListener>,
        tx: &Sender<Msg>,
        metrics: &Arc<Metrics>,
        watch: migrate::MigrationWatch,
    ) -> anyhow::Result<()> {
        let Some(listener) = listener else {
            return Ok(());
        };
        self.socket_path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        self.handover = Some(listener.try_clone()?);
        let fwd = tx.clone();
        self.accepting = Some(api::serve(
            listener,
            move |call| match watch.answer(call) {
                migrate::Watched::Answered => true,
                migrate::Watched::ReportTaken(written) => {
                    fwd.send(Msg::ReportTaken(written)).is_ok()
                }
                migrate::Watched::Forward(call) => fwd.send(Msg::Api(call)).is_ok(),
            },
            metrics.clone(),
        ));
        Ok(())
    }

    /// After a live update's hand-over: this process stops taking connections from the shared
    /// listener, so a client's next call (after it has the answer) reaches the new process.
    fn stop_accepting(&self) {
        if let (Some(a), Some(path)) = (&self.accepting, &self.socket_path) {
            if !a.stop(path) {
                tracing::warn!("live update: the old API thread did not confirm it stopped");
            }
        }
    }

    fn remove_socket(&self) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A standby VMM: prepares a VM of the given shape, then serves the API until a snapshot is
/// loaded into it (returns the running VM) or it is shut down (returns `None`). A refused
/// snapshot leaves the prepared VM as it was; one that failed while loading costs a fresh one.
fn standby(
    mem_mib: u64,
    vcpus: usize,
    serial: &str,
    vcpu_tx: Sender<VcpuEvent>,
    rx: &Receiver<Msg>,
) -> anyhow::Result<Option<Vmm>> {
    let prepare = || Vmm::standby(mem_mib, vcpus).context("preparing the standby VM");
    let mut ready = prepare()?;
    loop {
        let (req, reply, written) = match rx.recv() {
            Ok(Msg::Api(call)) if call.1.claim() => call,
            Ok(Msg::Api(_)) => continue,
            Ok(
                Msg::Vcpu(_) | Msg::LiveUpdateAnswer(_) | Msg::MigrationNews | Msg::ReportTaken(_),
            ) => continue,
            Ok(Msg::Stop(_)) | Err(_) => return Ok(None),
        };
        let answer = match req {
            ApiRequest::Status => Ok(json!({
                "state": "standby",
                "memory_mib": mem_mib,
                "vcpus": vcpus,
                "pid": std::process::id(),
            })),
            ApiRequest::Shutdown => {
                let _ = reply.send(Ok(json!({"state": "shutdown"})));
                let _ = written.recv_timeout(Duration::from_secs(5));
                return Ok(None);
            }
            ApiRequest::Snapshot(snapshot::SnapshotRequest::Load(b)) => {
                let t = Instant::now();
                let key = match b
                    .key_file
                    .as_deref()
                    .map(base_vmm::snapshot::SnapshotKey::from_file)
                    .transpose()
                {
                    Ok(k) => k,
                    Err(e) => {
                        let _ = reply.send(Err((400, e.to_string())));
                        continue;
                    }
                };
                let how = RestoreHow {
                    serial_spec: serial,
                    events: vcpu_tx.clone(),
                    start_paused: b.paused,
                    lazy: b.lazy,
                    key: key.as_ref(),
                };
                match ready.adopt(&b.dir, how) {
                    Ok(vmm) => {
                        let _ = reply.send(Ok(json!({
                            "state": if b.paused { "paused" } else { "running" },
                            "dir": b.dir,
                            "ms": t.elapsed().as_secs_f64() * 1e3,
                        })));
                        return Ok(Some(vmm));
                    }
                    Err(e) => {
                        ready = match e.standby {
                            Some(untouched) => *untouched,
                            None => prepare()?,
                        };
                        Err((
                            400,
                            format!("cannot restore {}: {}", b.dir.display(), e.error),
                        ))
                    }
                }
            }
            _ => Err((
                409,
                "this VMM is on standby with no VM yet: load a snapshot first (PUT /snapshot/load)"
                    .into(),
            )),
        };
        let _ = reply.send(answer);
    }
}

fn handle(vmm: &mut Vmm, manager: &ServiceManager, req: ApiRequest) -> ApiResult {
    let status = |vmm: &Vmm| serde_json::to_value(vmm.status()).map_err(|e| (500, e.to_string()));
    let fail = |e: VmmError| {
        let code = match e {
            VmmError::Conflict(_) => 409,
            VmmError::Io { .. } | VmmError::State(_) | VmmError::Snapshot(_) => 400,
            _ => 500,
        };
        (code, e.to_string())
    };
    match req {
        ApiRequest::Status => status(vmm),
        ApiRequest::Pause => {
            if vmm.control().operator_pause().map_err(fail)? {
                manager.lifecycle(Lifecycle::Paused);
            }
            status(vmm)
        }
        ApiRequest::Resume { force } => {
            if force {
                if let Some(why) = vmm.control().in_doubt() {
                    tracing::warn!("resuming by force a VM in doubt ({why})");
                }
                vmm.control().resolve_doubt();
            }
            if vmm.control().operator_resume().map_err(fail)? {
                manager.lifecycle(Lifecycle::Resumed);
            }
            status(vmm)
        }
        ApiRequest::PluginList => Ok(json!(manager.list())),
        ApiRequest::PluginNotifications => Ok(json!(manager.take_notifications())),
        ApiRequest::PluginAttach {
            path,
            config,
            async_port_writes,
            tick_period_ms,
        } => manager
            .attach_with(
                &path,
                &config,
                AttachOptions {
                    async_port_writes,
                    tick_period_ms,
                },
            )
            .map(|i| json!(i))
            .map_err(|e| (400, e.to_string())),
        ApiRequest::PluginDetach(name) => manager
            .detach(&name)
            .map(|state| json!({ "name": name, "state_bytes": state.len() }))
            .map_err(|e| (400, e.to_string())),
        ApiRequest::PluginReplace { name, path, rename } => manager
            .replace_with(&name, &path, l1_services::ReplaceOptions { rename })
            .map(|i| json!(i))
            .map_err(|e| (400, e.to_string())),
        ApiRequest::PluginCall { name, method, args } => manager
            .call(&name, &method, &args)
            .map(|out| {
                // Services answer JSON by convention; pass anything else through as a string.
                let result = serde_json::from_str::<Value>(&out).unwrap_or(Value::String(out));
                json!({ "result": result })
            })
            .map_err(|e| (400, e.to_string())),
        ApiRequest::Save(dir) => {
            if !dir.is_absolute() {
                return Err((
                    400,
                    format!("save dir {} must be an absolute path", dir.display()),
                ));
            }
            let t = std::time::Instant::now();
            // Through the snapshot engine the checkpoint service drives: one full layer of
            // the paused guest, in the format `run --restore` reads.
            let ran = vmm.control().pause().map_err(fail)?;
            let saved = manager.save_layer(&dir);
            if ran {
                vmm.control().resume().map_err(fail)?;
            }
            let (id, bytes) = saved.map_err(|e| (400, e.to_string()))?;
            Ok(json!({
                "dir": dir,
                "id": id,
                "memory_bytes_written": bytes,
                "ms": t.elapsed().as_secs_f64() * 1e3,
            }))
        }
        ApiRequest::GuestCommand(cmd) => vmm
            .guest_command(cmd)
            .map(|seq| json!({ "seq": seq }))
            .map_err(fail),
        ApiRequest::Shutdown
        | ApiRequest::LiveUpdate { .. }
        | ApiRequest::Migrate(_)
        | ApiRequest::MigrationStatus
        | ApiRequest::Snapshot(_) => {
            unreachable!("handled by the main loop")
        }
    }
}
