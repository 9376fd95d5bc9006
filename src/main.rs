//! spanvmm: the command line. `spanvmm run` starts a VM (one process per VM) and serves its
//! control API; `spanvmm ctl` talks to that API.

mod api;
mod live_update;
mod migrate;
mod services;
mod snapshot;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::boot::EntryPreference;
use base_vmm::cpu::CpuTemplate;
use base_vmm::vcpu::{VcpuEvent, VcpuExitReason};
use base_vmm::vmm::{RestoreHow, VmConfig, Vmm, VmmError};
use clap::{Parser, Subcommand, ValueEnum};
use l1_services::{AttachOptions, Lifecycle, ServiceManager};
use serde_json::{json, Value};

use api::{ApiCall, ApiRequest, ApiResult};

/// Guest memory when `run` is not given --memory, in MiB.
const DEFAULT_MEMORY_MIB: u64 = 256;

#[derive(Parser)]
#[command(
    name = "spanvmm",
    version,
    about = "A minimal KVM VMM with plug-in hypervisor services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Entry {
    /// spanguest's direct 64-bit CPL3 entry when the kernel has it, else PVH.
    Direct,
    /// Always the PVH 32-bit entry (what QEMU does).
    Pvh,
}

#[derive(Subcommand)]
enum Command {
    /// Start a VM, from a kernel or from a saved state.
    Run {
        /// Kernel: spanguest ELF, another PVH ELF, or a Linux bzImage.
        #[arg(long, required_unless_present_any = ["restore", "takeover_fd", "incoming", "standby"])]
        kernel: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Initrd for a bzImage kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Guest memory in MiB (default 256). With --incoming: the size of the guest expected,
        /// allocated before the source connects; a guest of another size is refused.
        #[arg(long)]
        memory: Option<u64>,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Serial console output: stdout, none, or a file path.
        #[arg(long, default_value = "stdout")]
        serial: String,
        /// Control API socket.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Restore the VM saved in this directory instead of booting.
        #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
        restore: Option<PathBuf>,
        /// With --restore: stay paused until `spanvmm ctl resume`.
        #[arg(long, requires = "restore")]
        paused: bool,
        /// With --restore: run at once and load guest memory on demand (userfaultfd) while
        /// the rest streams in.
        #[arg(long, requires = "restore")]
        lazy: bool,
        /// With --restore: the key file of an encrypted snapshot.
        #[arg(long, requires = "restore")]
        key: Option<PathBuf>,
        /// Prepare a VM of --memory MiB and --vcpus vCPUs, then wait for a snapshot to restore
        /// into it (`ctl snapshot load`, `PUT /snapshot/load`); needs --api-socket.
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "restore", "incoming"], requires = "api_socket")]
        standby: bool,
        /// Boot entry for kernels that offer several.
        #[arg(long, value_enum, default_value = "direct")]
        entry: Entry,
        /// Attach a service once the VM runs: `PATH` or `PATH:CONFIG` (a `.wasm` component or a
        /// native `.so`). Repeatable; services attach in the order given.
        #[arg(long = "plugin", value_name = "PATH[:CONFIG]")]
        plugins: Vec<String>,
        /// Load services (`--plugin`, `plugin attach`, `plugin replace`) only from under this
        /// directory (repeatable; symlinks and `..` leading out are refused). Wasm components
        /// there must then pass the owner and mode checks of native ones.
        #[arg(long = "plugin-dir", value_name = "DIR")]
        plugin_dirs: Vec<PathBuf>,
        /// Refuse every native (`.so`) service: only sandboxed Wasm components attach.
        #[arg(long)]
        no_native_plugins: bool,
        /// Load only service files with this SHA-256 (64 hex digits; repeatable).
        #[arg(long = "plugin-sha256", value_name = "HEX")]
        plugin_sha256: Vec<String>,
        /// Internal: take a running VM over from another spanvmm process (live update).
        #[arg(long, hide = true, conflicts_with_all = ["kernel", "restore"])]
        takeover_fd: Option<i32>,
        /// Receive the VM by live migration: listen on `tls://HOST:PORT` (needs --tls-dir).
        #[arg(long, value_name = "tls://HOST:PORT", conflicts_with_all = ["kernel", "restore"], requires = "tls_dir")]
        incoming: Option<String>,
        /// With --incoming: directory with ca.pem, node.pem, node.key (`spanvmm migrate-certs`).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// With --incoming: how long to wait for a source that lost its post-copy connection.
        #[arg(long, default_value_t = 30_000)]
        recovery_timeout_ms: u64,
        /// The CPU the guest is given: `host` (everything this host offers) or `x86-64-v2`
        /// (a portable baseline, so the VM can move to older hosts). Boot only: a restored,
        /// migrated or live-updated VM keeps the CPU it was booted with.
        #[arg(long, value_name = "NAME", value_parser = parse_cpu_template,
              conflicts_with_all = ["restore", "standby", "incoming", "takeover_fd"])]
        cpu_template: Option<CpuTemplate>,
    },
    /// Make the TLS material for migration: a CA and a node certificate signed by it.
    MigrateCerts {
        /// Output directory (copy it, without ca.key, to every node).
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline snapshot tools: inspect, merge a chain, shred.
    Snapshot {
        #[command(subcommand)]
        op: snapshot::OfflineOp,
    },
    /// Control a running VM through its API socket.
    Ctl {
        /// The VM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Subcommand)]
enum CtlOp {
    /// Show the VM's status.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume {
        /// Run a VM that is in doubt after a live update whose new process did not confirm
        /// (only once that process is known never to have run the guest).
        #[arg(long)]
        force: bool,
    },
    /// Stop the VM and its process.
    Shutdown,
    /// Save the VM (state + memory) to a directory; it keeps running afterwards.
    Save {
        /// Target directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Snapshots through the checkpoint service (attached for the duration).
    Snapshot {
        #[command(subcommand)]
        op: snapshot::CtlSnapshotOp,
    },
    /// Send a command to the guest (spanguest's mailbox).
    Guest {
        /// verify, reset-stall or power-off.
        command: String,
    },
    /// Replace this VMM process by a new binary beneath the running VM (HyperFresh).
    LiveUpdate {
        /// The new spanvmm binary.
        #[arg(long)]
        binary: PathBuf,
        /// How long the new binary may take for each step before the update rolls back.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Move the VM to another host (`spanvmm run --incoming` there), showing progress; the
    /// report goes to --report (JSON) with its timeline plot beside it (SVG). This process
    /// exits after a successful migration; a failed one leaves the VM running here.
    Migrate {
        /// Destination, `tls://HOST:PORT`.
        #[arg(long)]
        to: String,
        /// Policy service for the duration: precopy.wasm, postcopy.wasm or hybrid.wasm
        /// (default: the one attached with `run --plugin`).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Its configuration (JSON).
        #[arg(long, default_value = "")]
        config: String,
        /// Directory with ca.pem, node.pem, node.key.
        #[arg(long)]
        tls_dir: PathBuf,
        /// Bytes per second at most (suffixes K, M, G: powers of 1000).
        #[arg(long)]
        max_bandwidth: Option<String>,
        /// How long a broken post-copy connection is retried, ms.
        #[arg(long, default_value_t = 30_000)]
        recovery_timeout_ms: u64,
        /// Send the hand-over's commit with the state instead of after the destination is
        /// ready: one round trip less of downtime (worth it on long links), but a link lost
        /// before the destination answers leaves the VM paused "in doubt" at the source
        /// instead of running on there.
        #[arg(long)]
        commit_with_state: bool,
        /// Where to write the JSON report (the SVG plot goes beside it).
        #[arg(long, default_value = "migration-report.json")]
        report: PathBuf,
    },
    /// Manage the services attached beneath the VM.
    Plugin {
        #[command(subcommand)]
        op: PluginOp,
    },
    /// Ask the `introspect` service (attach it first): e.g. `regs 0`, `read GPA LEN`,
    /// `translate CR3 GVA`, `search START LEN HEX`, `watch GPA LEN`.
    Introspect {
        /// Method.
        method: String,
        /// Arguments, joined by spaces.
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PluginOp {
    /// List attached services.
    List,
    /// Attach a service beneath the running VM.
    Attach {
        /// `.wasm` component or native `.so`.
        path: PathBuf,
        /// Service configuration (JSON by convention).
        #[arg(long, default_value = "")]
        config: String,
        /// Deliver its port writes asynchronously: the vCPU never waits for the service
        /// (reads stay synchronous and see every earlier write first).
        #[arg(long)]
        async_writes: bool,
    },
    /// Detach a service (its state is handed back and dropped).
    Detach {
        /// Service name.
        name: String,
    },
    /// Replace a service by a new version, handing its state over.
    Replace {
        /// Service name.
        name: String,
        /// New plugin file.
        path: PathBuf,
        /// The new file may hold a service of another name (it takes the old one's place).
        #[arg(long)]
        rename: bool,
    },
    /// Call a service's method.
    Call {
        /// Service name.
        name: String,
        /// Method.
        method: String,
        /// Arguments (JSON by convention).
        #[arg(default_value = "")]
        args: String,
    },
    /// Show what services published since the last look.
    Notifications,
}

fn parse_cpu_template(s: &str) -> Result<CpuTemplate, String> {
    s.parse()
        .map_err(|e: base_vmm::cpu::CpuModelError| e.to_string())
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Command::Run {
            kernel,
            cmdline,
            initrd,
            memory,
            vcpus,
            serial,
            api_socket,
            restore,
            paused,
            lazy,
            key,
            standby,
            entry,
            plugins,
            plugin_dirs,
            no_native_plugins,
            plugin_sha256,
            takeover_fd,
            incoming,
            tls_dir,
            recovery_timeout_ms,
            cpu_template,
        } => {
            if let Some(Err(e)) = memory.map(base_vmm::vmm::check_memory_mib) {
                eprintln!("spanvmm: {e}");
                return ExitCode::FAILURE;
            }
            let start_paused = !plugins.is_empty();
            if let Err(e) = services::set_plugin_policy(
                &plugin_dirs,
                no_native_plugins,
                &plugin_sha256,
                takeover_fd.is_some(),
            ) {
                eprintln!("spanvmm: {e:#}");
                return ExitCode::FAILURE;
            }
            let source = match (takeover_fd, restore, kernel) {
                (Some(fd), _, _) => Source::Takeover(fd),
                _ if standby => Source::Standby {
                    mem_mib: memory.unwrap_or(DEFAULT_MEMORY_MIB),
                    vcpus,
                },
                _ if incoming.is_some() => Source::Incoming {
                    addr: incoming.unwrap_or_default(),
                    tls_dir: tls_dir.unwrap_or_default(),
                    recovery: Duration::from_millis(recovery_timeout_ms),
                    mem_mib: memory,
                },
                (None, Some(dir), _) => Source::Restore {
                    dir,
                    paused,
                    lazy,
                    key,
                },
                (None, None, Some(kernel)) => Source::Boot(VmConfig {
                    kernel,
                    cmdline,
                    initrd,
                    mem_mib: memory.unwrap_or(DEFAULT_MEMORY_MIB),
                    vcpus,
                    serial: serial.clone(),
                    entry: match entry {
                        Entry::Direct => EntryPreference::Direct,
                        Entry::Pvh => EntryPreference::Pvh,
                    },
                    // Services given with --plugin attach before the guest's first instruction.
                    start_paused,
                    cpu_template: cpu_template.unwrap_or_default(),
                }),
                (None, None, None) => unreachable!("clap requires --kernel without --restore"),
            };
            match run(source, &serial, api_socket.as_deref(), &plugins) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("spanvmm: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::MigrateCerts { out } => match l1_services::migration::tls::generate(&out) {
            Ok(()) => {
                println!(
                    "wrote ca.pem, ca.key, node.pem, node.key to {}",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spanvmm migrate-certs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Snapshot { op } => match snapshot::offline(op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm snapshot: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            api_socket,
            op: CtlOp::Snapshot { op },
        } => match snapshot::ctl(&api_socket, op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm ctl snapshot: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl { api_socket, op } => match ctl(&api_socket, op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm ctl: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

enum Source {
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

enum Msg {
    Vcpu(VcpuEvent),
    Api(ApiCall),
    /// The new process of a live update answered its offer (or failed to).
    LiveUpdateAnswer(Result<(), String>),
}

/// A live update in its first half: the new process prepares while the guest runs on; the
/// API call waits for the outcome.
struct PendingUpdate {
    update: live_update::Preparing,
    reply: std::sync::mpsc::Sender<ApiResult>,
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

/// Runs a VM until it powers off or is shut down; returns the process exit status.
fn run(
    source: Source,
    serial: &str,
    api_socket: Option<&Path>,
    plugins: &[String],
) -> anyhow::Result<u8> {
    // Bind first: a busy socket must fail before a VM exists.
    let mut listener = api_socket.map(api::bind).transpose()?;
    // A start-up that fails from here on leaves no socket file behind.
    let _socket_file = api_socket.map(SocketFile);
    let mut serial = serial.to_string();
    let mut migrations = migrate::Migrations::default();
    let (tx, rx) = mpsc::channel::<Msg>();
    let (vcpu_tx, vcpu_rx) = mpsc::channel::<VcpuEvent>();
    let fwd = tx.clone();
    std::thread::spawn(move || {
        for ev in vcpu_rx {
            if fwd.send(Msg::Vcpu(ev)).is_err() {
                break;
            }
        }
    });
    // A standby VMM answers its API before there is a VM; the others start serving once the
    // VM runs (a live update's listener comes from the old process).
    let mut api = ApiServing::default();
    if matches!(source, Source::Standby { .. }) {
        api.start(listener.take(), &tx)?;
    }
    // A booted or restored guest waits for its --plugin services before its first instruction.
    let not_started = matches!(source, Source::Boot(_) | Source::Restore { .. });
    let (mut vmm, manager) = match source {
        Source::Boot(cfg) => {
            let vmm = Vmm::boot(&cfg, vcpu_tx)?;
            let lacks = vmm.status().cpu.template_lacks;
            if !lacks.is_empty() {
                eprintln!(
                    "spanvmm: warning: CPU template {}: this host's KVM does not offer {} of \
                     the baseline; the guest is told it lacks them",
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
            listener = t.api;
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
            let (vmm, dest) =
                migrate::incoming(&addr, &tls_dir, &serial, vcpu_tx, recovery, mem_mib)
                    .context("incoming migration")?;
            migrations.incoming = Some(dest);
            let manager = services::manager_for(&vmm)?;
            manager.lifecycle(Lifecycle::Migrated);
            (vmm, manager)
        }
    };
    for spec in plugins {
        let (path, config) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        if let Err(e) = manager.attach(Path::new(path), config) {
            // A booted or restored guest has not run yet (it waits for its services); an
            // arriving or loaded one already runs and is not given up for a service.
            if not_started {
                vmm.shutdown();
                anyhow::bail!("--plugin {path}: {e} (the guest was not started)");
            }
            eprintln!("spanvmm: --plugin {path}: {e}; the guest runs on without it");
        }
    }
    if !plugins.is_empty() {
        // No-op for a guest that already runs or that the operator keeps paused.
        vmm.control().resume()?;
    }
    api.start(listener, &tx)?;
    // Live-update answers come from a thread of their own; the loop ends once every sender
    // (the API's, the vCPUs', this one) is gone.
    let answers = tx;
    let mut pending_update: Option<PendingUpdate> = None;
    let mut handed_over = false;
    let mut moved_at: Option<Instant> = None;
    let code = loop {
        match migrations.poll(&manager) {
            migrate::Polled::Nothing => {}
            migrate::Polled::Moved => {
                // Wait (a little) for `ctl migrate` to fetch the report, then go.
                moved_at.get_or_insert_with(Instant::now);
            }
            migrate::Polled::IncomingLost(e) => {
                eprintln!("spanvmm: the incoming migration failed, the guest cannot go on: {e}");
                break 1;
            }
        }
        if moved_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            break 0;
        }
        // Services with a tick period are served from here, between messages.
        let mut wait = manager
            .next_tick_in(Instant::now())
            .unwrap_or(Duration::from_secs(3600));
        if migrations.active() || moved_at.is_some() {
            wait = wait.min(Duration::from_millis(20));
        }
        let msg = match rx.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {
                manager.tick(Instant::now());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => Err(()),
            Ok(m) => Ok(m),
        };
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
                if let Err(e) = vmm.require_memory_loaded() {
                    let _ = reply.send(Err((409, e.to_string())));
                    continue;
                }
                let answer_tx = answers.clone();
                let started = live_update::start(
                    &vmm,
                    &binary,
                    &serial,
                    api.handover.as_ref(),
                    Duration::from_millis(timeout_ms),
                    move |answer| {
                        let _ = answer_tx.send(Msg::LiveUpdateAnswer(answer));
                    },
                );
                match started {
                    Ok(update) => {
                        pending_update = Some(PendingUpdate {
                            update,
                            reply,
                            written,
                        })
                    }
                    Err(e) => {
                        eprintln!("spanvmm: live update failed: {e:#}");
                        let _ = reply.send(Err((409, format!("{e:#}"))));
                    }
                }
            }
            Ok(Msg::LiveUpdateAnswer(answer)) => {
                let Some(p) = pending_update.take() else {
                    continue;
                };
                match p.update.finish(answer, &mut vmm, &manager) {
                    live_update::Outcome::HandedOver(report) => {
                        let _ = p.reply.send(Ok(json!(report)));
                        // Exit only once the client has its answer.
                        let _ = p.written.recv_timeout(Duration::from_secs(5));
                        handed_over = true;
                        break 0;
                    }
                    live_update::Outcome::RolledBack(e) => {
                        eprintln!("spanvmm: live update failed: {e:#}");
                        let _ = p.reply.send(Err((409, format!("{e:#}"))));
                    }
                    live_update::Outcome::InDoubt(why) => {
                        eprintln!("spanvmm: {why}");
                        vmm.control().set_in_doubt(why.clone());
                        let _ = p.reply.send(Err((409, why)));
                    }
                }
            }
            Ok(Msg::Api((ApiRequest::Migrate(req), reply, _))) => {
                let answer = match vm_owner(&migrations, &manager, pending_update.as_ref(), false) {
                    Some(busy) => Err((409, format!("no migration now: {busy}"))),
                    None => migrations.start(&vmm, &manager, req),
                };
                let _ = reply.send(answer);
            }
            Ok(Msg::Api((ApiRequest::MigrationStatus, reply, written))) => {
                let _ = reply.send(Ok(migrations.status()));
                if migrations.moved() {
                    // The report is out: the guest lives elsewhere now.
                    let _ = written.recv_timeout(Duration::from_secs(5));
                    break 0;
                }
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
                    eprintln!("spanvmm: vCPU {} stopped: {other:?}", ev.index);
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
            eprintln!("spanvmm: detaching service {name}: {e}");
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
}

impl ApiServing {
    /// Serves `listener` (if any, and unless serving already), forwarding calls into `tx`.
    fn start(&mut self, listener: Option<UnixListener>, tx: &Sender<Msg>) -> anyhow::Result<()> {
        let Some(listener) = listener else {
            return Ok(());
        };
        self.socket_path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        self.handover = Some(listener.try_clone()?);
        let fwd = tx.clone();
        api::serve(listener, move |call| fwd.send(Msg::Api(call)).is_ok());
        Ok(())
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
            Ok(Msg::Api(call)) => call,
            Ok(Msg::Vcpu(_) | Msg::LiveUpdateAnswer(_)) => continue,
            Err(_) => return Ok(None),
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
                    eprintln!("spanvmm: resuming by force a VM in doubt ({why})");
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
        } => manager
            .attach_with(&path, &config, AttachOptions { async_port_writes })
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
            let summary = vmm.save(&dir, Default::default()).map_err(fail)?;
            Ok(json!({
                "dir": dir,
                "id": summary.id,
                "memory_bytes_written": summary.bytes_written,
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

/// `100M` → 100_000_000.
fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("--max-bandwidth {s:?}: not a number"))?;
    anyhow::ensure!(v > 0.0, "--max-bandwidth must be positive");
    Ok((v * mult) as u64)
}

fn ctl(socket: &Path, op: CtlOp) -> anyhow::Result<()> {
    if let CtlOp::Migrate {
        to,
        plugin,
        config,
        tls_dir,
        max_bandwidth,
        recovery_timeout_ms,
        commit_with_state,
        report,
    } = &op
    {
        let plugin = plugin
            .as_ref()
            .map(std::path::absolute)
            .transpose()
            .context("resolve --plugin")?;
        let body = json!({
            "to": to,
            "plugin": plugin,
            "config": config,
            "tls_dir": std::path::absolute(tls_dir).context("resolve --tls-dir")?,
            "max_bandwidth": max_bandwidth.as_deref().map(parse_rate).transpose()?,
            "recovery_timeout_ms": recovery_timeout_ms,
            "commit_with_state": commit_with_state,
        });
        return match migrate::ctl_migrate(socket, body, report)? {
            true => Ok(()),
            false => anyhow::bail!(
                "the migration failed; the VM runs on at the source (report in {})",
                report.display()
            ),
        };
    }
    let (method, path, body): (&str, &str, Option<Value>) = match &op {
        CtlOp::Migrate { .. } => unreachable!("handled above"),
        CtlOp::Status => ("GET", "/vm", None),
        CtlOp::Pause => ("PUT", "/vm/pause", None),
        CtlOp::Resume { force } => ("PUT", "/vm/resume", force.then(|| json!({ "force": true }))),
        CtlOp::Shutdown => ("PUT", "/vm/shutdown", None),
        CtlOp::Save { dir } => {
            let dir = std::path::absolute(dir).context("resolve --dir")?;
            ("PUT", "/vm/save", Some(json!({ "dir": dir })))
        }
        CtlOp::Guest { command } => ("PUT", "/guest/command", Some(json!({ "command": command }))),
        CtlOp::LiveUpdate { binary, timeout_ms } => {
            let binary = std::path::absolute(binary).context("resolve --binary")?;
            (
                "PUT",
                "/vm/live-update",
                Some(json!({ "binary": binary, "timeout_ms": timeout_ms })),
            )
        }
        CtlOp::Plugin { op } => match op {
            PluginOp::List => ("GET", "/plugins", None),
            PluginOp::Notifications => ("GET", "/plugins/notifications", None),
            PluginOp::Attach {
                path,
                config,
                async_writes,
            } => {
                let path = std::path::absolute(path).context("resolve plugin path")?;
                let body =
                    json!({ "path": path, "config": config, "async_port_writes": async_writes });
                ("PUT", "/plugins/attach", Some(body))
            }
            PluginOp::Detach { name } => ("PUT", "/plugins/detach", Some(json!({ "name": name }))),
            PluginOp::Replace { name, path, rename } => {
                let path = std::path::absolute(path).context("resolve plugin path")?;
                (
                    "PUT",
                    "/plugins/replace",
                    Some(json!({ "name": name, "path": path, "rename": rename })),
                )
            }
            PluginOp::Call { name, method, args } => (
                "PUT",
                "/plugins/call",
                Some(json!({ "name": name, "method": method, "args": args })),
            ),
        },
        CtlOp::Snapshot { .. } => unreachable!("handled by snapshot::ctl"),
        CtlOp::Introspect { method, args } => (
            "PUT",
            "/plugins/call",
            Some(json!({ "name": "introspect", "method": method, "args": args.join(" ") })),
        ),
    };
    let (code, value) = api::call(socket, method, path, body.as_ref())?;
    if code != 200 {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        anyhow::bail!("{msg} (HTTP {code})");
    }
    // A closed stdout (e.g. `| head`) is the reader's choice, not an error worth a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string_pretty(&value)?
    );
    Ok(())
}
