//! `spanvmm ctl`: the command-line client of a VM's control API (and the offline snapshot
//! commands); it only speaks HTTP to the VMM through [`crate::api::client`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::api::client as api;

pub mod group;
pub mod migrate;
pub mod snapshot;

/// `spanvmm ctl` commands.
#[derive(Subcommand)]
pub enum CtlOp {
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
        /// instead of running on there. The same as `--commit with-state`.
        #[arg(long)]
        commit_with_state: bool,
        /// When the hand-over's commit goes: `auto` (with the state when the link's round
        /// trip is 1 ms or more, else after ready), `after-ready` or `with-state`.
        #[arg(long, default_value = "auto")]
        commit: l1_services::migration::CommitMode,
        /// The link's TLS 1.3 cipher suite: aes-128-gcm (default), aes-256-gcm or
        /// chacha20-poly1305 (the fastest on hosts without AES instructions).
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: l1_services::migration::tls::Cipher,
        /// Send pre-copy pages whose 64-bit words form an arithmetic progression (a constant
        /// fill included) as their first word and step, 16 bytes (the `stride` page codec;
        /// the destination must know it).
        #[arg(long)]
        stride_pages: bool,
        /// Hold at the switch-over point until `ctl migrate-release` (twice: once to switch
        /// over, once to commit), giving up after this many ms at the first gate.
        #[arg(long, value_name = "MS")]
        hold_timeout_ms: Option<u64>,
        /// Where to write the JSON report (the SVG plot goes beside it).
        #[arg(long, default_value = "migration-report.json")]
        report: PathBuf,
    },
    /// Open the gate a held migration waits at (`ready`: switch over; `prepared`: commit).
    MigrateRelease {
        /// The migration (default: the running one).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Give the running migration up before its commit: the guest stays (runs) here.
    MigrateCancel {
        /// The migration (default: the running one).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Migrate several VMs so that they switch over together (synchronized arrival): each
    /// `--vm` names a source VMM's API socket and its destination; --api-socket is not used.
    /// Every member holds at its switch-over point until all are ready, then all switch over
    /// and commit together; a member that fails first leaves every guest at its source.
    MigrateGroup {
        /// `SOCK=tls://HOST:PORT[,plugin=P][,max_bandwidth=R][,config=JSON]` (config last).
        #[arg(long = "vm", value_name = "SOCK=DEST[,...]")]
        vms: Vec<group::MemberSpec>,
        /// The group as a JSON file (a `GroupSpec`: members, tls_dir, ...) instead of flags.
        #[arg(long, conflicts_with = "vms")]
        spec: Option<PathBuf>,
        /// Policy service for members that name none (precopy.wasm, hybrid.wasm, ...).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Its configuration (JSON).
        #[arg(long, default_value = "")]
        config: String,
        /// Directory with ca.pem, node.pem, node.key.
        #[arg(long, required_unless_present = "spec")]
        tls_dir: Option<PathBuf>,
        /// Bytes per second at most, per member (suffixes K, M, G).
        #[arg(long)]
        max_bandwidth: Option<String>,
        /// The links' TLS 1.3 cipher suite.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: l1_services::migration::tls::Cipher,
        /// Migrate them independently (no hold): the baseline synchronization is measured
        /// against.
        #[arg(long)]
        no_sync: bool,
        /// Every member must be ready within this (ms), or the group is cancelled.
        #[arg(long, default_value_t = 300_000)]
        ready_timeout_ms: u64,
        /// Every member must be prepared within this after the release (ms; their guests are
        /// paused meanwhile), or all roll back.
        #[arg(long, default_value_t = 5_000)]
        commit_timeout_ms: u64,
        /// Bytes per second each member's held rounds may send while it waits for the others
        /// (suffixes K, M, G; default: a tenth of its send rate when it became ready).
        #[arg(long)]
        held_rate: Option<String>,
        /// Gang migration: one fresh store key for the whole group, given to every member's
        /// service as `key` (scatter-gather.wasm: their identical pages are stored and sent
        /// once). Usually with `--no-sync`.
        #[arg(long)]
        share_key: bool,
        /// Where to write the group's JSON report.
        #[arg(long, default_value = "group-report.json")]
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
        /// Arguments: one JSON value (e.g. an object), or several, sent as a JSON array (each
        /// JSON if it parses, else a string): `read 0x1000 16`.
        args: Vec<String>,
    },
}

/// `spanvmm ctl plugin` commands.
#[derive(Subcommand)]
pub enum PluginOp {
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
        /// Tick the service this often (ms) instead of its manifest's period.
        #[arg(long, value_name = "MS")]
        tick_ms: Option<u32>,
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
    /// Show what services published since the last look (each service's queue keeps its
    /// newest 256; `dropped` counts what a full queue pushed out).
    Notifications {
        /// Stream them as they are published, one JSON object a line, until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

/// How long `ctl` waits for an answer unless `--timeout` says otherwise: a minute, ten for
/// what may legitimately take long (saving a large VM, compiling a new component).
fn default_timeout(op: &CtlOp) -> Duration {
    match op {
        CtlOp::Save { .. }
        | CtlOp::LiveUpdate { .. }
        | CtlOp::Plugin {
            op: PluginOp::Attach { .. } | PluginOp::Replace { .. },
        } => Duration::from_secs(600),
        _ => Duration::from_secs(60),
    }
}

/// `ctl introspect METHOD ARGS...`: one argument as given (JSON, e.g. an object); several as a
/// JSON array of them, each JSON if it parses and a string otherwise (`read 0x1000 16`).
fn introspect_args(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        many => Value::Array(
            many.iter()
                .map(|a| serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone())))
                .collect(),
        )
        .to_string(),
    }
}

/// `100M` → 100_000_000.
pub(crate) fn parse_rate(s: &str) -> anyhow::Result<u64> {
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

/// Runs one `ctl` command against the API socket, waiting at most `timeout` for the answer
/// (default: [`default_timeout`]).
pub fn ctl(socket: &Path, op: CtlOp, timeout: Option<Duration>) -> anyhow::Result<()> {
    let timeout = timeout.unwrap_or_else(|| default_timeout(&op));
    if let CtlOp::Plugin {
        op: PluginOp::Notifications { follow: true },
    } = &op
    {
        // Three heartbeats missed: the VMM is gone or stuck.
        return api::follow(
            socket,
            "/plugins/notifications?follow=true",
            Duration::from_secs(15),
            |line| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
                Ok(())
            },
        );
    }
    if let CtlOp::Migrate {
        to,
        plugin,
        config,
        tls_dir,
        max_bandwidth,
        recovery_timeout_ms,
        commit_with_state,
        commit,
        cipher,
        stride_pages,
        hold_timeout_ms,
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
            "commit": commit,
            "cipher": cipher,
            "stride_pages": stride_pages,
            "hold": hold_timeout_ms.map(|ms| json!({ "timeout_ms": ms })),
        });
        return migrate::ctl_migrate(socket, body, report);
    }
    if let CtlOp::MigrateRelease { id } | CtlOp::MigrateCancel { id } = &op {
        let verb = if matches!(op, CtlOp::MigrateRelease { .. }) {
            "release"
        } else {
            "cancel"
        };
        let id = match id {
            Some(id) => *id,
            None => {
                let v = api::call_checked_within(socket, "GET", "/vm/migration", None, timeout)?;
                anyhow::ensure!(
                    v.get("progress").is_some(),
                    "no migration is running here: {v}"
                );
                v["id"].as_u64().context("the status names no migration")?
            }
        };
        let v = api::call_checked_within(
            socket,
            "PUT",
            "/vm/migrate",
            Some(&json!({ verb: id })),
            timeout,
        )?;
        let _ = writeln!(std::io::stdout(), "{v}");
        return Ok(());
    }
    let (method, path, body): (&str, &str, Option<Value>) = match &op {
        CtlOp::Migrate { .. } | CtlOp::MigrateRelease { .. } | CtlOp::MigrateCancel { .. } => {
            unreachable!("handled above")
        }
        CtlOp::MigrateGroup { .. } => unreachable!("handled by group_command"),
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
            PluginOp::Notifications { .. } => ("GET", "/plugins/notifications", None),
            PluginOp::Attach {
                path,
                config,
                async_writes,
                tick_ms,
            } => {
                let path = std::path::absolute(path).context("resolve plugin path")?;
                let mut body =
                    json!({ "path": path, "config": config, "async_port_writes": async_writes });
                if let Some(ms) = tick_ms {
                    body["tick_period_ms"] = json!(ms);
                }
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
            Some(json!({ "name": "introspect", "method": method, "args": introspect_args(args) })),
        ),
    };
    let value = api::call_checked_within(socket, method, path, body.as_ref(), timeout)?;
    // A closed stdout (e.g. `| head`) is the reader's choice, not an error worth a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string_pretty(&value)?
    );
    Ok(())
}

/// `ctl migrate-group`: the group from its flags or its `--spec` file.
pub fn group_command(op: CtlOp) -> anyhow::Result<()> {
    let CtlOp::MigrateGroup {
        vms,
        spec,
        plugin,
        config,
        tls_dir,
        max_bandwidth,
        cipher,
        no_sync,
        ready_timeout_ms,
        commit_timeout_ms,
        held_rate,
        share_key,
        report,
    } = op
    else {
        anyhow::bail!("not a migrate-group command");
    };
    let spec = match spec {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?
        }
        None => group::GroupSpec {
            members: vms,
            tls_dir: tls_dir.context("--tls-dir is needed")?,
            plugin,
            config,
            max_bandwidth: max_bandwidth.as_deref().map(parse_rate).transpose()?,
            cipher,
            sync: !no_sync,
            ready_timeout_ms,
            commit_timeout_ms,
            held_rate: held_rate.as_deref().map(parse_rate).transpose()?,
            share_key,
        },
    };
    group::ctl_migrate_group(&spec, &report)
}
