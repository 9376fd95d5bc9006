//! Live migration in the binary: the source's `PUT /vm/migrate` (connect, attach the policy
//! service for the duration, hand the report out), the destination's `run --incoming`, and
//! `ctl migrate` (progress line, JSON report, SVG timeline).

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::memory::GuestRam;
use base_vmm::state::VmState;
use base_vmm::vcpu::VcpuEvent;
use base_vmm::vmm::{VmControl, Vmm};
use l1_services::migration::{
    self, report, MigrationDest, MigrationSource, Phase, SourceConfig, SourceVm,
};
use l1_services::{Capability, ServiceManager};
use serde::Deserialize;
use serde_json::{json, Value};

/// `PUT /vm/migrate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination, `HOST:PORT` or `tls://HOST:PORT`.
    pub to: String,
    /// Policy service to attach for the duration; none: the attached `drives-migration`
    /// service (given at `run --plugin`).
    #[serde(default)]
    pub plugin: Option<PathBuf>,
    /// Its configuration.
    #[serde(default)]
    pub config: String,
    /// Directory with `ca.pem`, `node.pem`, `node.key`.
    pub tls_dir: PathBuf,
    /// Bytes per second at most.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// How long a broken post-copy connection is retried, ms.
    #[serde(default = "default_recovery_ms")]
    pub recovery_timeout_ms: u64,
    /// Send `commit` with the state (see `SourceConfig::commit_with_state`).
    #[serde(default)]
    pub commit_with_state: bool,
}

fn default_recovery_ms() -> u64 {
    30_000
}

/// Parses `tls://HOST:PORT` or `HOST:PORT`.
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let hp = s.strip_prefix("tls://").unwrap_or(s);
    hp.to_socket_addrs()
        .with_context(|| format!("address {s:?}"))?
        .next()
        .with_context(|| format!("address {s:?} resolves to nothing"))
}

struct Vm {
    ctl: Arc<VmControl>,
    machine: Vec<u8>,
}

impl SourceVm for Vm {
    fn ram(&self) -> &Arc<GuestRam> {
        self.ctl.ram()
    }
    fn pause(&self) -> Result<(), String> {
        self.ctl.pause().map(|_| ()).map_err(|e| e.to_string())
    }
    fn resume(&self) -> Result<(), String> {
        self.ctl.resume().map(|_| ()).map_err(|e| e.to_string())
    }
    fn machine(&self) -> Vec<u8> {
        self.machine.clone()
    }
    fn capture_state(&self) -> Result<Vec<u8>, String> {
        self.ctl
            .capture_state()
            .map(|s| s.to_bytes())
            .map_err(|e| e.to_string())
    }
}

/// The VM's migrations, as the main loop keeps them.
#[derive(Default)]
pub struct Migrations {
    out: Option<(Arc<MigrationSource>, Option<String>)>,
    /// The last finished outgoing migration's report.
    last: Option<Value>,
    /// The incoming migration this VM arrived by.
    pub incoming: Option<Arc<MigrationDest>>,
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
    /// An outgoing migration runs.
    pub fn outgoing(&self) -> bool {
        self.out.is_some()
    }

    /// A migration needs the main loop to come round often.
    pub fn active(&self) -> bool {
        self.out.is_some()
            || self
                .incoming
                .as_ref()
                .is_some_and(|d| matches!(d.phase(), Phase::Postcopy | Phase::Recovering))
    }

    /// Starts an outgoing migration.
    pub fn start(
        &mut self,
        vmm: &Vmm,
        manager: &ServiceManager,
        req: MigrateRequest,
    ) -> Result<Value, (u16, String)> {
        let bad = |e: String| (400, e);
        if self.out.is_some() {
            return Err((409, "a migration is already running".into()));
        }
        vmm.require_memory_loaded()
            .map_err(|e| (409, e.to_string()))?;
        let to = parse_addr(&req.to).map_err(|e| bad(format!("{e:#}")))?;
        let tls = migration::tls::client_config(&req.tls_dir).map_err(bad)?;
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
        let vm = Arc::new(Vm {
            ctl: vmm.control().clone(),
            machine: serde_json::to_vec(vmm.machine()).map_err(|e| (500, e.to_string()))?,
        });
        let session = MigrationSource::start(
            vm,
            SourceConfig {
                to,
                tls,
                max_bandwidth: req.max_bandwidth.filter(|&b| b > 0),
                recovery_timeout: Duration::from_millis(req.recovery_timeout_ms),
                commit_with_state: req.commit_with_state,
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
        self.out = Some((session, attached));
        self.last = None;
        Ok(json!({ "to": to.to_string(), "service": name, "state": "started" }))
    }

    /// Checks on the migrations; call from the main loop between messages.
    pub fn poll(&mut self, manager: &ServiceManager) -> Polled {
        if let Some(d) = &self.incoming {
            if d.phase() == Phase::Failed {
                let e = d.progress().error.unwrap_or_default();
                self.incoming = None;
                return Polled::IncomingLost(e);
            }
        }
        let Some((session, attached)) = &self.out else {
            return Polled::Nothing;
        };
        let phase = session.progress().phase;
        if !matches!(phase, Phase::Completed | Phase::Failed) {
            return Polled::Nothing;
        }
        if let Some(name) = attached {
            if let Err(e) = manager.detach(name) {
                eprintln!("spanvmm: detaching migration service {name}: {e}");
            }
        }
        manager.set_migration(None);
        let report = session.report();
        self.last = Some(json!(report));
        self.out = None;
        if phase == Phase::Completed {
            eprintln!(
                "spanvmm: migrated ({}) in {:.0} ms, downtime {:.2} ms",
                report.handover, report.total_ms, report.downtime_ms
            );
            Polled::Moved
        } else if report.result == "in-doubt" {
            eprintln!(
                "spanvmm: migration {}",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        } else if report.handover == "postcopy" {
            eprintln!(
                "spanvmm: post-copy migration failed: {}",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        } else {
            eprintln!(
                "spanvmm: migration failed: {}; the VM goes on here",
                report.error.clone().unwrap_or_default()
            );
            Polled::Nothing
        }
    }

    /// `GET /vm/migration`.
    pub fn status(&self) -> Value {
        if let Some((s, _)) = &self.out {
            return json!({ "progress": s.progress() });
        }
        if let Some(r) = &self.last {
            return json!({ "report": r });
        }
        if let Some(d) = &self.incoming {
            return json!({ "incoming": d.progress() });
        }
        json!({})
    }

    /// The finished migration moved the guest away (its report has been handed out).
    pub fn moved(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|r| r["result"] == "completed")
    }
}

/// `run --incoming`: waits for the source, builds the VM from what arrives and runs it.
pub fn incoming(
    addr: &str,
    tls_dir: &Path,
    serial: &str,
    events: Sender<VcpuEvent>,
    recovery_timeout: Duration,
    mem_mib: Option<u64>,
) -> anyhow::Result<(Vmm, Arc<MigrationDest>)> {
    let tls = migration::tls::server_config(tls_dir).map_err(anyhow::Error::msg)?;
    let at = parse_addr(addr)?;
    let listener = TcpListener::bind(at).with_context(|| format!("listen on {at}"))?;
    // Operators (and the benchmark) can tell from this line that the destination is ready.
    let prepared = mem_mib
        .map(|m| {
            migration::PreparedRam::start(m << 20, move || {
                eprintln!("spanvmm: guest memory of {m} MiB ready for the incoming migration")
            })
        })
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--memory")?;
    eprintln!(
        "spanvmm: waiting for an incoming migration on {}",
        listener.local_addr()?
    );
    let mut arrived = migration::receive(listener, tls, recovery_timeout, prepared)
        .map_err(anyhow::Error::msg)?;
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
        });
    match built {
        Ok(vmm) => {
            migration::trace(format_args!("dest: VM built"));
            // Dropping `vmm` on an error discards the VM: the guest stays at the source.
            arrived.commit().map_err(anyhow::Error::msg)?;
            vmm.control()
                .resume()
                .context("running the migrated guest")?;
            migration::trace(format_args!("dest: vCPUs resumed"));
            let dest = arrived.running().map_err(anyhow::Error::msg)?;
            eprintln!(
                "spanvmm: incoming migration: the guest runs here ({:.2} ms to build)",
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok((vmm, dest))
        }
        Err(e) => {
            arrived.abort(&format!("the destination cannot build the VM: {e:#}"));
            Err(e.context("building the migrated VM"))
        }
    }
}

/// `ctl migrate`: starts the migration, shows progress, writes the report and its plot.
pub fn ctl_migrate(socket: &Path, body: Value, report_path: &Path) -> anyhow::Result<bool> {
    let (code, v) = crate::api::call(socket, "PUT", "/vm/migrate", Some(&body))?;
    if code != 200 {
        anyhow::bail!(
            "{} (HTTP {code})",
            v.get("error").and_then(Value::as_str).unwrap_or("failed")
        );
    }
    let mut last_line = Instant::now() - Duration::from_secs(1);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let (code, v) = crate::api::call(socket, "GET", "/vm/migration", None)?;
        if code != 200 {
            anyhow::bail!("migration status: HTTP {code}: {v}");
        }
        if let Some(r) = v.get("report") {
            eprintln!();
            std::fs::write(report_path, serde_json::to_string_pretty(r)?)
                .with_context(|| format!("write {}", report_path.display()))?;
            let rep: migration::Report =
                serde_json::from_value(r.clone()).context("the report does not parse")?;
            let svg = report_path.with_extension("svg");
            std::fs::write(&svg, report::svg(&rep))
                .with_context(|| format!("write {}", svg.display()))?;
            println!("{}", serde_json::to_string(r)?);
            return Ok(rep.result == "completed");
        }
        let Some(p) = v.get("progress") else {
            anyhow::bail!("no migration is running: {v}");
        };
        if last_line.elapsed() >= Duration::from_millis(250) {
            last_line = Instant::now();
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            eprint!(
                "\r{:>9} pages sent  {:>7.1} MB/s  round {:>2}  {:>8} pending  {:>8} needed  {:>5} faults  [{}]   ",
                n("pages_sent"),
                n("rate_bytes_per_sec") as f64 / 1e6,
                n("rounds"),
                n("pages_pending"),
                n("pages_needed"),
                n("remote_faults"),
                p["phase"].as_str().unwrap_or("?")
            );
        }
    }
}
