//! Live migration in the VMM: the source's `PUT /vm/migrate` (connect, attach the policy
//! service for the duration, hand the report out) and the destination's `run --incoming`.
//! The client (`ctl migrate`) lives in [`crate::ctl::migrate`].

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::state::VmState;
use base_vmm::vcpu::VcpuEvent;
use base_vmm::vmm::Vmm;
use l1_services::migration::{
    self, CommitMode, MigrationDest, MigrationSource, Phase, SourceConfig,
};
use l1_services::{Capability, ServiceManager};
use serde_json::{json, Value};

pub use crate::api::routes::{MigrateRequest, MigrateStart};
use crate::api::{ApiCall, ApiRequest, ApiResult};
use crate::inbox::Msg;
use crate::metrics::{Counters, MIGRATION_RESULTS};
use crate::services::VmmHost;

/// How long a source whose guest has moved away waits for the client that started the
/// migration to fetch its report before exiting anyway (that client gone, say).
pub const REPORT_GRACE: Duration = Duration::from_secs(30);

/// Parses `tls://HOST:PORT` or `HOST:PORT`.
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let hp = s.strip_prefix("tls://").unwrap_or(s);
    hp.to_socket_addrs()
        .with_context(|| format!("address {s:?}"))?
        .next()
        .with_context(|| format!("address {s:?} resolves to nothing"))
}

/// An outgoing migration: its engine, the service attached for it, its id.
struct Outgoing {
    session: Arc<MigrationSource>,
    attached: Option<String>,
    id: u64,
}

/// The VM's migrations, as the main loop keeps them.
#[derive(Default)]
pub struct Migrations {
    /// Shared with the API's threads (see [`MigrationWatch`]).
    board: Arc<Mutex<Board>>,
    /// Ids handed out so far.
    ids: u64,
    /// The main loop's inbox: an outgoing migration's news for its service goes there.
    pub(crate) news: Option<std::sync::mpsc::Sender<Msg>>,
    /// A `MigrationNews` waits in the inbox: more news adds none (one tick reads every fault
    /// so far). Without it a post-copy's thousands of faults queued thousands of ticks ahead
    /// of the API's requests (CI, under load: `ctl migrate`'s status poll waited 10 s).
    news_queued: Arc<AtomicBool>,
}

/// What a migration's watchers read: the main loop changes it, the API's threads read it too.
#[derive(Default)]
struct Board {
    out: Option<Outgoing>,
    /// The last finished outgoing migration's id and report.
    last: Option<(u64, Value)>,
    /// The incoming migration this VM arrived by.
    incoming: Option<Arc<MigrationDest>>,
}

impl Board {
    /// `GET /vm/migration`.
    fn status(&self) -> Value {
        if let Some(o) = &self.out {
            return json!({ "id": o.id, "progress": o.session.progress() });
        }
        if let Some((id, r)) = &self.last {
            return json!({ "id": id, "report": r });
        }
        if let Some(d) = &self.incoming {
            return json!({ "incoming": d.progress() });
        }
        json!({})
    }

    /// A starter's poll of migration `id`: its progress, or its report once finished (true
    /// with it when the guest moved away: that client was waited for, this process may go).
    fn poll(&self, id: u64) -> (ApiResult, bool) {
        match (&self.out, &self.last) {
            (Some(o), _) if o.id == id => (
                Ok(json!({ "id": id, "progress": o.session.progress() })),
                false,
            ),
            (_, Some((last, r))) if *last == id => {
                let moved = r["result"] == "completed";
                (Ok(json!({ "id": id, "report": r })), moved)
            }
            _ => (Err((404, format!("no migration {id} here"))), false),
        }
    }
}

/// Answers a migration's watchers from the API's thread, without the main loop: it can be
/// held for seconds (KVM takes that long to turn a memory slot's dirty logging on or off on
/// a loaded host, as a migration's service attaches and detaches), and `ctl migrate`'s polls
/// would wait behind it.
#[derive(Clone)]
pub struct MigrationWatch(Arc<Mutex<Board>>);

/// What [`MigrationWatch::answer`] did with a call.
pub(crate) enum Watched {
    /// Answered (or its client gave up on it).
    Answered,
    /// Answered with the report of the migration that moved the guest away, to the client
    /// that started it: the main loop ends once the answer is written (this signals it).
    ReportTaken(Receiver<()>),
    /// Not a watcher's call, or nothing to say yet: the main loop's.
    Forward(ApiCall),
}

impl MigrationWatch {
    /// Answers `PUT /vm/migrate {"poll": id}`, and `GET /vm/migration` once there is a
    /// migration to report on (a destination still waiting for its guest answers it itself);
    /// hands any other call back.
    pub(crate) fn answer(&self, call: ApiCall) -> Watched {
        let board = lock(&self.0);
        let (answer, moved) = match &call.0 {
            ApiRequest::MigrationStatus
                if board.out.is_some() || board.last.is_some() || board.incoming.is_some() =>
            {
                (Ok(board.status()), false)
            }
            ApiRequest::Migrate(MigrateRequest::Poll(id)) => board.poll(*id),
            _ => {
                drop(board);
                return Watched::Forward(call);
            }
        };
        drop(board);
        let (_, reply, written) = call;
        if !reply.claim() {
            return Watched::Answered;
        }
        let _ = reply.send(answer);
        if moved {
            Watched::ReportTaken(written)
        } else {
            Watched::Answered
        }
    }
}

fn lock(board: &Mutex<Board>) -> MutexGuard<'_, Board> {
    board.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a poll found.
pub enum Polled {
    /// Nothing new.
    Nothing,
    /// The guest now lives at the destination: this process should go.
    Moved,
    /// The incoming post-copy failed: the guest cannot go on.
    IncomingLost(String),
}

impl Migrations {
    /// The main loop took a `MigrationNews` up: news from now on queues another.
    pub fn news_taken(&self) {
        self.news_queued.store(false, Ordering::Release);
    }

    /// The watchers' view, for the API's threads.
    pub fn watch(&self) -> MigrationWatch {
        MigrationWatch(self.board.clone())
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        lock(&self.board)
    }

    /// The guest arrived by `dest` (still running in post-copy, maybe).
    pub fn set_incoming(&self, dest: Arc<MigrationDest>) {
        self.board().incoming = Some(dest);
    }

    /// An outgoing migration runs.
    pub fn outgoing(&self) -> bool {
        self.board().out.is_some()
    }

    /// A migration needs the main loop to come round often.
    pub fn active(&self) -> bool {
        let board = self.board();
        board.out.is_some()
            || board
                .incoming
                .as_ref()
                .is_some_and(|d| matches!(d.phase(), Phase::Postcopy | Phase::Recovering))
    }

    /// `PUT /vm/migrate`: start, release, cancel. A poll is the API's threads' to answer
    /// ([`MigrationWatch`]: it hands the final report over and lets this process go).
    pub fn request(
        &mut self,
        vmm: &Vmm,
        manager: &Arc<ServiceManager>,
        req: MigrateRequest,
    ) -> ApiResult {
        match req {
            MigrateRequest::Start(req) => self.start(vmm, manager, req),
            MigrateRequest::Poll(id) => self.board().poll(id).0,
            MigrateRequest::Release(id) => match &self.board().out {
                Some(o) if o.id == id => o
                    .session
                    .release()
                    .map(|stage| json!({ "id": id, "hold": stage }))
                    .map_err(|e| (409, e)),
                _ => Err((404, format!("no running migration {id} here"))),
            },
            MigrateRequest::Cancel(id) => match &self.board().out {
                Some(o) if o.id == id => {
                    // Honoured before the commit only: past it the guest may run there.
                    o.session.cancel();
                    Ok(json!({ "id": id, "state": "cancelling" }))
                }
                _ => Err((404, format!("no running migration {id} here"))),
            },
        }
    }

    /// The switch-over holds the guest paused (or it runs at the destination in post-copy):
    /// pausing or resuming it here now could run it on both hosts.
    pub fn holds_guest(&self) -> bool {
        self.board()
            .out
            .as_ref()
            .is_some_and(|o| o.session.holds_guest())
    }

    /// The answer to a pause or resume while [`Migrations::holds_guest`].
    pub fn refuse_while_held(&self) -> ApiResult {
        Err((
            409,
            "the migration's switch-over holds the VM: it runs at the destination once handed \
             over, or here again if the migration fails (see GET /vm/migration)"
                .into(),
        ))
    }

    /// Starts an outgoing migration.
    fn start(
        &mut self,
        vmm: &Vmm,
        manager: &Arc<ServiceManager>,
        req: MigrateStart,
    ) -> Result<Value, (u16, String)> {
        let bad = |e: String| (400, e);
        if self.outgoing() {
            return Err((409, "a migration is already running".into()));
        }
        vmm.require_memory_loaded()
            .map_err(|e| (409, e.to_string()))?;
        // `commit_with_state` (the older switch) is `commit: with-state`.
        let commit = if req.commit_with_state {
            CommitMode::WithState
        } else {
            req.commit
        };
        if req.hold.is_some() && commit == CommitMode::WithState {
            // The commit must wait at the hold's second gate, not ride with the state.
            return Err(bad(
                "hold and commit with-state exclude each other (auto commits after ready \
                 when held)"
                    .into(),
            ));
        }
        let to = parse_addr(&req.to).map_err(|e| bad(format!("{e:#}")))?;
        let tls = migration::tls::client_config(&req.tls_dir, req.cipher)
            .map_err(|e| bad(e.to_string()))?;
        let driver = manager.list().into_iter().find(|s| {
            s.capabilities.contains(&Capability::DrivesMigration)
                && matches!(s.state, l1_services::ServiceState::Attached)
        });
        if req.plugin.is_none() && driver.is_none() {
            return Err(bad(
                "no migration service: give a plugin (precopy.wasm, postcopy.wasm, hybrid.wasm) \
                 or attach one with `run --plugin`"
                    .into(),
            ));
        }
        // Its state capture carries the services' states (see VmmHost::with_services).
        let vm = Arc::new(
            VmmHost::new(vmm)
                .map_err(|e| (500, format!("{e:#}")))?
                .with_services(manager),
        );
        let session = MigrationSource::start(
            vm,
            SourceConfig {
                to,
                tls,
                max_bandwidth: req.max_bandwidth.filter(|&b| b > 0),
                recovery_timeout: Duration::from_millis(req.recovery_timeout_ms),
                commit,
                hold: req.hold,
                stride_pages: req.stride_pages,
                // Agile: parked pages go as their locations (see `source.rs`).
                parked: manager.parked_pages(),
                news: self.news.clone().map(|tx| {
                    let queued = self.news_queued.clone();
                    Arc::new(move || {
                        if !queued.swap(true, Ordering::AcqRel) {
                            let _ = tx.send(Msg::MigrationNews);
                        }
                    }) as Arc<dyn Fn() + Send + Sync>
                }),
            },
        )
        .map_err(|e| (502, format!("cannot reach the destination {to}: {e}")))?;
        manager.set_migration(Some(session.clone()));
        let attached = match &req.plugin {
            Some(path) => match manager.attach(path, &req.config) {
                Ok(info) => Some(info.name),
                Err(e) => {
                    session.cancel();
                    manager.set_migration(None);
                    return Err(bad(format!("migration service {}: {e}", path.display())));
                }
            },
            None => None,
        };
        let name = attached
            .clone()
            .or(driver.map(|d| d.name))
            .unwrap_or_default();
        self.ids += 1;
        let id = self.ids;
        let mut board = self.board();
        board.out = Some(Outgoing {
            session,
            attached,
            id,
        });
        board.last = None;
        Ok(json!({ "id": id, "to": to.to_string(), "service": name, "state": "started" }))
    }

    /// Checks on the migrations; call from the main loop between messages.
    pub fn poll(&mut self, manager: &ServiceManager, counters: &Counters) -> Polled {
        let mut board = self.board();
        if let Some(d) = &board.incoming {
            if d.phase() == Phase::Failed {
                let e = d.progress().error.unwrap_or_default();
                board.incoming = None;
                return Polled::IncomingLost(e);
            }
        }
        let Some(o) = &board.out else {
            return Polled::Nothing;
        };
        let phase = o.session.progress().phase;
        if !matches!(phase, Phase::Completed | Phase::Failed) {
            return Polled::Nothing;
        }
        // The report goes out before the service detaches, which may take long.
        let Outgoing {
            session,
            attached,
            id,
        } = board.out.take().expect("checked above");
        let report = session.report();
        board.last = Some((id, json!(report)));
        drop(board);
        if let Some(i) = MIGRATION_RESULTS.iter().position(|r| *r == report.result) {
            counters.migrations[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if phase == Phase::Completed {
            manager.leave_dirty_log_on();
        }
        if let Some(name) = attached {
            if let Err(e) = manager.detach(&name) {
                tracing::warn!(migration = id, "detaching migration service {name}: {e}");
            }
        }
        manager.set_migration(None);
        if phase == Phase::Completed {
            // Pages parked by agile migration are the destination's now: not brought back.
            manager.guest_left();
            tracing::info!(
                migration = id,
                "migrated ({}) in {:.0} ms, downtime {:.2} ms",
                report.handover,
                report.total_ms,
                report.downtime_ms
            );
            Polled::Moved
        } else if report.result == "in-doubt" {
            tracing::error!(
                migration = id,
                "migration {}",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        } else if report.handover == "postcopy" {
            tracing::error!(
                migration = id,
                "post-copy migration failed: {}",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        } else {
            tracing::warn!(
                migration = id,
                "migration failed: {}; the VM goes on here",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        }
    }

    /// `GET /vm/migration`.
    pub fn status(&self) -> Value {
        self.board().status()
    }
}

/// `run --incoming`: waits for the source, builds the VM from what arrives and runs it (or
/// keeps it paused, as it was at the source). Meanwhile the API (calls come in on `rx`)
/// answers status and shutdown; a shutdown cancels the wait (returns `None`). Events of the
/// arrived guest's vCPUs seen here go back into `tx` for the main loop.
#[allow(clippy::too_many_arguments)]
pub(crate) fn incoming(
    addr: &str,
    tls_dir: &Path,
    serial: &str,
    events: Sender<VcpuEvent>,
    recovery_timeout: Duration,
    mem_mib: Option<u64>,
    rx: &Receiver<Msg>,
    tx: &Sender<Msg>,
) -> anyhow::Result<Option<(Vmm, Arc<MigrationDest>)>> {
    let tls = migration::tls::server_config(tls_dir)?;
    let at = parse_addr(addr)?;
    let listener = TcpListener::bind(at).with_context(|| format!("listen on {at}"))?;
    let listen = listener.local_addr()?;
    // Operators (and the benchmark) can tell from this line that the destination is ready.
    let prepared = mem_mib
        .map(|m| {
            migration::PreparedRam::start(m << 20, move || {
                tracing::info!("guest memory of {m} MiB ready for the incoming migration")
            })
        })
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--memory")?;
    tracing::info!("waiting for an incoming migration on {listen}");
    let dest = MigrationDest::waiting();
    // The migration runs on a thread of its own (the guest runs as soon as it is committed,
    // whatever this thread does); this one serves the API meanwhile.
    let worker = {
        let (dest, serial) = (dest.clone(), serial.to_string());
        let d = dest.clone();
        let receive = move || migration::receive(listener, tls, recovery_timeout, prepared, d);
        std::thread::Builder::new()
            .name("migrate-incoming".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                arrive(receive, dest, &serial, events)
            })
            .context("starting the incoming migration")?
    };
    let join = |w: std::thread::JoinHandle<anyhow::Result<Vmm>>| {
        w.join()
            .map_err(|_| anyhow::anyhow!("the incoming migration panicked"))?
    };
    loop {
        let msg = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(m) => m,
            Err(e) => {
                if worker.is_finished() {
                    return join(worker).map(|vmm| Some((vmm, dest)));
                }
                if e == RecvTimeoutError::Disconnected {
                    // Nothing can come in any more: only the migration is left to wait for.
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
        };
        let (req, reply, written) = match msg {
            Msg::Api(call) if call.1.claim() => call,
            Msg::Api(_) => continue,
            // No live update (nor outgoing migration) without a VM.
            Msg::LiveUpdateAnswer(_) | Msg::MigrationNews | Msg::ReportTaken(_) => continue,
            Msg::Stop(_) => {
                // SIGTERM/SIGINT: as a shutdown request, without a client to answer.
                dest.cancel();
                if let Ok(vmm) = join(worker) {
                    vmm.shutdown();
                }
                return Ok(None);
            }
            Msg::Vcpu(ev) => {
                // The guest runs here already: its event is the main loop's.
                let arrived = join(worker);
                let _ = tx.send(Msg::Vcpu(ev));
                return arrived.map(|vmm| Some((vmm, dest)));
            }
        };
        let answer = match req {
            ApiRequest::Status => Ok(json!({
                "state": "incoming",
                "listen": listen.to_string(),
                "memory_mib": mem_mib,
                "pid": std::process::id(),
                "progress": dest.progress(),
            })),
            ApiRequest::MigrationStatus => Ok(json!({ "incoming": dest.progress() })),
            ApiRequest::Shutdown => {
                dest.cancel();
                if let Ok(vmm) = join(worker) {
                    // The guest was committed here just before: shut down, as asked.
                    vmm.shutdown();
                }
                let _ = reply.send(Ok(json!({"state": "shutdown"})));
                let _ = written.recv_timeout(Duration::from_secs(5));
                return Ok(None);
            }
            _ => Err((
                409,
                "this VMM waits for an incoming migration and has no VM yet: only GET /vm, \
                 GET /vm/migration and PUT /vm/shutdown are served until the guest arrives"
                    .into(),
            )),
        };
        let _ = reply.send(answer);
    }
}

/// The incoming migration's thread: receive, build the VM, take the hand-over.
fn arrive(
    receive: impl FnOnce() -> Result<migration::Arrived, migration::DestError>,
    dest: Arc<MigrationDest>,
    serial: &str,
    events: Sender<VcpuEvent>,
) -> anyhow::Result<Vmm> {
    let mut arrived = receive()?;
    let t = Instant::now();
    let built = VmState::from_bytes(&arrived.state, "migration stream")
        .map_err(anyhow::Error::from)
        .and_then(|state| {
            let prepared = match arrived.prepared.take() {
                Some(p) => Ok(p),
                None => Vmm::prepare(arrived.ram.clone(), &state.machine),
            };
            migration::trace(format_args!("dest: state parsed"));
            // Paused until the source commits the hand-over.
            prepared
                .and_then(|p| p.finish(&state, serial, events, true))
                .map_err(anyhow::Error::from)
        })
        .and_then(|vmm| {
            // Shut down before the hand-over: the source keeps the guest.
            anyhow::ensure!(!dest.cancelled(), "{}", migration::CANCELLED);
            Ok(vmm)
        });
    match built {
        Ok(vmm) => {
            migration::trace(format_args!("dest: VM built"));
            // Dropping `vmm` on an error discards the VM: the guest stays at the source.
            let run = arrived.commit()?;
            if run {
                vmm.control()
                    .resume()
                    .context("running the migrated guest")?;
                migration::trace(format_args!("dest: vCPUs resumed"));
            }
            arrived.running()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if run {
                tracing::info!("incoming migration: the guest runs here ({ms:.2} ms to build)");
            } else {
                tracing::info!(
                    "incoming migration: the guest is here, paused as it was at the \
                     source (`ctl resume` runs it; {ms:.2} ms to build)"
                );
            }
            Ok(vmm)
        }
        Err(e) => {
            let why = if dest.cancelled() {
                "the destination is shutting down".to_string()
            } else {
                format!("the destination cannot build the VM: {e:#}")
            };
            arrived.abort(&why);
            Err(e.context("building the migrated VM"))
        }
    }
}
