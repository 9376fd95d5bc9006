//! Snapshots from the command line and the control API. `ctl snapshot create` asks the VMM to
//! attach the checkpoint service (unless one is attached) and to start a layer; the service
//! drives the host's snapshot engine from its ticks while the client polls the status. The
//! offline commands (`spanvmm snapshot info|merge|shred`) work on the files alone.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::snapshot::{self, Chain, SnapshotKey};
use base_vmm::vmm::Vmm;
use clap::Subcommand;
use l1_services::ServiceManager;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{self, parse_body, ApiResult};

/// Name of the checkpoint service.
const SERVICE: &str = "checkpoint";

/// Offline snapshot commands.
#[derive(Subcommand)]
pub enum OfflineOp {
    /// Check a snapshot (the whole chain) and describe it.
    Info {
        /// Layer directory.
        dir: PathBuf,
        /// Key file of an encrypted snapshot.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Merge the chain ending in a layer into one full snapshot.
    Merge {
        /// Top layer of the chain.
        top: PathBuf,
        /// New directory for the merged snapshot.
        #[arg(long)]
        out: PathBuf,
        /// Key file of the chain (and of the merged snapshot unless --out-key is given).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Key file for the merged snapshot.
        #[arg(long)]
        out_key: Option<PathBuf>,
    },
    /// Securely delete a layer: overwrite its files, then unlink them.
    Shred {
        /// Layer directory.
        dir: PathBuf,
    },
}

/// `ctl snapshot` commands.
#[derive(Subcommand)]
pub enum CtlSnapshotOp {
    /// Take a snapshot layer and wait until it is written.
    Create {
        /// Layer directory.
        #[arg(long)]
        dir: PathBuf,
        /// Parent layer: write only the pages dirtied since it (the checkpoint service must
        /// have stayed attached since, see --track).
        #[arg(long)]
        incremental_of: Option<PathBuf>,
        /// Keep the guest running while memory is written (iterative dirty rounds, then a
        /// short final pause).
        #[arg(long)]
        live: bool,
        /// Encrypt with the key in this file (32 raw bytes or 64 hex digits).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Refuse restores this many seconds from now.
        #[arg(long)]
        expires_in: Option<u64>,
        /// Keep the checkpoint service attached afterwards, tracking dirty pages for an
        /// incremental layer on top of this one.
        #[arg(long)]
        track: bool,
        /// Most live rounds before the final pause.
        #[arg(long)]
        max_rounds: Option<u32>,
        /// The checkpoint service's plugin (default: $SPANVMM_CHECKPOINT_PLUGIN, else
        /// checkpoint.wasm next to the spanvmm binary or in target/plugins).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Restore a snapshot into this VMM, started with `run --standby` (what a fresh process
    /// would do with `run --restore`, minus the set-up already done).
    Load {
        /// Layer directory (the top of the chain).
        #[arg(long)]
        dir: PathBuf,
        /// Run at once; guest memory comes in on first touch and in the background.
        #[arg(long)]
        lazy: bool,
        /// Stay paused until `ctl resume`.
        #[arg(long, conflicts_with = "lazy")]
        paused: bool,
        /// Key file of an encrypted snapshot.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Progress of the current snapshot.
    Status,
    /// Write incremental layers in the background (`DIR/layer-NNNN`), at an interval adapted
    /// to the dirty rate, so that a later eviction has little left to write.
    Periodic {
        /// Directory of the layers.
        #[arg(long)]
        dir: PathBuf,
        /// Encrypt with the key in this file.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Pages expected dirty when the next layer is due.
        #[arg(long)]
        target_pages: Option<u64>,
        /// Retention: once the chain has more than K layers it is merged into one full layer
        /// in the background and the superseded layers are removed (default and most 32).
        #[arg(long, value_name = "K")]
        keep: Option<u32>,
        /// The checkpoint service's plugin (see `create`).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Write the pages dirtied since the last periodic layer (all pages without one) into DIR
    /// and stop the VM; restore it later from DIR.
    Evict {
        /// Directory of the final layer.
        #[arg(long)]
        dir: PathBuf,
        /// Encrypt with the key in this file.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The checkpoint service's plugin (see `create`).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Secret regions: left out of snapshots, zero after a restore.
    Secret {
        #[command(subcommand)]
        op: SecretOp,
    },
}

/// Secret-region commands.
#[derive(Subcommand)]
pub enum SecretOp {
    /// Register a region.
    Add {
        /// Guest-physical address (decimal or 0x hex).
        #[arg(long, value_parser = parse_num)]
        gpa: u64,
        /// Length in bytes (decimal or 0x hex).
        #[arg(long, value_parser = parse_num)]
        len: u64,
    },
    /// List the regions (API and guest registered).
    List,
}

fn parse_num(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// A `/snapshot/...` API request.
#[derive(Debug)]
pub enum SnapshotRequest {
    /// `PUT /snapshot/create`
    Create(CreateBody),
    /// `GET /snapshot/status`
    Status,
    /// `PUT /snapshot/periodic` or `/snapshot/evict`: the service's method of that name.
    Background {
        /// `periodic` or `evict`.
        method: &'static str,
        /// Body.
        body: BackgroundBody,
    },
    /// `PUT /snapshot/secret {"gpa", "len"}`
    SecretAdd {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// `GET /snapshot/secrets`
    Secrets,
    /// `PUT /snapshot/load`: only a standby VMM (`run --standby`) serves it.
    Load(LoadBody),
}

/// Body of `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    /// Top layer of the snapshot.
    pub dir: PathBuf,
    /// Run at once, memory on first touch.
    #[serde(default)]
    pub lazy: bool,
    /// Stay paused.
    #[serde(default)]
    pub paused: bool,
    /// Key file of an encrypted snapshot.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Body of `PUT /snapshot/create`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    dir: PathBuf,
    #[serde(default)]
    parent: Option<PathBuf>,
    #[serde(default)]
    live: bool,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    expires_in_s: Option<u64>,
    #[serde(default)]
    track: bool,
    #[serde(default)]
    max_rounds: Option<u32>,
    #[serde(default)]
    plugin: Option<PathBuf>,
}

/// Body of `PUT /snapshot/periodic` and `/snapshot/evict`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundBody {
    dir: PathBuf,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    target_pages: Option<u64>,
    #[serde(default)]
    keep: Option<u32>,
    #[serde(default)]
    plugin: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    gpa: u64,
    len: u64,
}

/// Maps `/snapshot/...` to a request.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<SnapshotRequest, (u16, String)> {
    let put = matches!(method, "PUT" | "POST");
    Ok(match (path, method) {
        ("/snapshot/create", _) if put => {
            let b: CreateBody = parse_body(body)?;
            let paths = [
                Some(&b.dir),
                b.parent.as_ref(),
                b.key_file.as_ref(),
                b.plugin.as_ref(),
            ];
            if paths.into_iter().flatten().any(|p| !p.is_absolute()) {
                return Err((
                    400,
                    "dir, parent, key_file and plugin must be absolute paths".into(),
                ));
            }
            SnapshotRequest::Create(b)
        }
        ("/snapshot/status", "GET") => SnapshotRequest::Status,
        ("/snapshot/periodic" | "/snapshot/evict", _) if put => {
            let b: BackgroundBody = parse_body(body)?;
            let paths = [Some(&b.dir), b.key_file.as_ref(), b.plugin.as_ref()];
            if paths.into_iter().flatten().any(|p| !p.is_absolute()) {
                return Err((
                    400,
                    "dir, key_file and plugin must be absolute paths".into(),
                ));
            }
            let method = if path.ends_with("evict") {
                "evict"
            } else {
                "periodic"
            };
            SnapshotRequest::Background { method, body: b }
        }
        ("/snapshot/secret", _) if put => {
            let b: SecretBody = parse_body(body)?;
            SnapshotRequest::SecretAdd {
                gpa: b.gpa,
                len: b.len,
            }
        }
        ("/snapshot/secrets", "GET") => SnapshotRequest::Secrets,
        ("/snapshot/load", _) if put => {
            let b: LoadBody = parse_body(body)?;
            if [Some(&b.dir), b.key_file.as_ref()]
                .into_iter()
                .flatten()
                .any(|p| !p.is_absolute())
            {
                return Err((400, "dir and key_file must be absolute paths".into()));
            }
            if b.lazy && b.paused {
                return Err((400, "a lazy restore runs at once: not with paused".into()));
            }
            SnapshotRequest::Load(b)
        }
        (
            "/snapshot/create" | "/snapshot/status" | "/snapshot/secret" | "/snapshot/secrets"
            | "/snapshot/periodic" | "/snapshot/evict" | "/snapshot/load",
            m,
        ) => return Err((405, format!("method {m} is not allowed on {path}"))),
        _ => return Err((404, format!("no such endpoint: {path}"))),
    })
}

/// Who attached the checkpoint service, and whether it goes once the snapshot is done.
struct Session {
    /// The API attached it (not a user's `plugin attach`).
    attached_by_api: bool,
    /// Detach it when the current snapshot is done (it was not asked to keep tracking).
    detach_when_done: bool,
}

static SESSION: Mutex<Session> = Mutex::new(Session {
    attached_by_api: false,
    detach_when_done: false,
});

fn attached(manager: &ServiceManager) -> bool {
    manager.list().iter().any(|s| s.name == SERVICE)
}

/// Attaches the checkpoint service from `plugin` unless one is attached.
fn attach(
    manager: &ServiceManager,
    session: &mut Session,
    plugin: Option<&Path>,
) -> Result<(), (u16, String)> {
    if attached(manager) {
        return Ok(());
    }
    let plugin = plugin.ok_or((
        400,
        "no checkpoint service is attached and no plugin was given".to_string(),
    ))?;
    manager
        .attach(plugin, "")
        .map_err(|e| (400, format!("attaching {}: {e}", plugin.display())))?;
    session.attached_by_api = true;
    Ok(())
}

fn call(manager: &ServiceManager, method: &str, args: &str) -> ApiResult {
    let out = manager
        .call(SERVICE, method, args)
        .map_err(|e| (400, e.to_string()))?;
    Ok(serde_json::from_str::<Value>(&out).unwrap_or(Value::String(out)))
}

/// Serves a `/snapshot/...` request on the VMM's main loop.
pub fn handle(vmm: &mut Vmm, manager: &ServiceManager, req: SnapshotRequest) -> ApiResult {
    match req {
        SnapshotRequest::Create(b) => {
            if let Err(e) = vmm.require_memory_loaded() {
                return Err((409, e.to_string()));
            }
            let mut session = SESSION.lock().unwrap_or_else(|p| p.into_inner());
            attach(manager, &mut session, b.plugin.as_deref())?;
            session.detach_when_done = session.attached_by_api && !b.track;
            let args = serde_json::to_string(&b).map_err(|e| (500, e.to_string()))?;
            let r = call(manager, "create", &args);
            if r.is_err() && session.detach_when_done {
                session.attached_by_api = false;
                let _ = manager.detach(SERVICE);
            }
            r
        }
        SnapshotRequest::Status => {
            if !attached(manager) {
                return Err((409, "no checkpoint service is attached".into()));
            }
            let mut v = call(manager, "status", "")?;
            let phase = v.get("phase").and_then(Value::as_str).unwrap_or("");
            let mut session = SESSION.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(phase, "done" | "failed") && session.detach_when_done {
                session.detach_when_done = false;
                session.attached_by_api = false;
                let r = manager.detach(SERVICE);
                v["detached"] = json!(r.is_ok());
            }
            Ok(v)
        }
        SnapshotRequest::Background { method, body } => {
            let mut session = SESSION.lock().unwrap_or_else(|p| p.into_inner());
            attach(manager, &mut session, body.plugin.as_deref())?;
            // Periodic layers need the service to stay; an eviction ends with the VM.
            session.detach_when_done = false;
            let args = serde_json::to_string(&body).map_err(|e| (500, e.to_string()))?;
            call(manager, method, &args)
        }
        SnapshotRequest::SecretAdd { gpa, len } => {
            vmm.control()
                .add_secret(gpa, len)
                .map_err(|e| (400, e.to_string()))?;
            Ok(json!({ "secrets": vmm.control().secrets() }))
        }
        SnapshotRequest::Secrets => Ok(json!({ "secrets": vmm.control().secrets() })),
        SnapshotRequest::Load(_) => Err((
            409,
            "a VM already runs in this process: load a snapshot into a `spanvmm run --standby` VMM"
                .into(),
        )),
    }
}

/// Polls the service's status until the layer is done (the service works from its ticks).
fn wait_done(socket: &Path) -> anyhow::Result<Value> {
    let t = Instant::now();
    loop {
        let v = api::call_checked(socket, "GET", "/snapshot/status", None)?;
        match v.get("phase").and_then(Value::as_str) {
            Some("done") => return Ok(v),
            Some("failed") => anyhow::bail!(
                "snapshot failed: {}",
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            ),
            _ if t.elapsed() > Duration::from_secs(600) => {
                anyhow::bail!("snapshot still not done after 600 s: {v}")
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn default_plugin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPANVMM_CHECKPOINT_PLUGIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("checkpoint.wasm"),
        dir.join("plugins/checkpoint.wasm"),
        PathBuf::from("target/plugins/checkpoint.wasm"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolve {}", p.display()))
}

fn abs_opt(p: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    p.map(|p| abs(&p)).transpose()
}

/// `spanvmm ctl snapshot ...`.
pub fn ctl(socket: &Path, op: CtlSnapshotOp) -> anyhow::Result<()> {
    let out = match op {
        CtlSnapshotOp::Create {
            dir,
            incremental_of,
            live,
            key,
            expires_in,
            track,
            max_rounds,
            plugin,
        } => {
            let plugin = abs_opt(plugin.or_else(default_plugin))?;
            let body = json!({
                "dir": abs(&dir)?,
                "parent": abs_opt(incremental_of)?,
                "live": live,
                "key_file": abs_opt(key)?,
                "expires_in_s": expires_in,
                "track": track,
                "max_rounds": max_rounds,
                "plugin": plugin,
            });
            api::call_checked(socket, "PUT", "/snapshot/create", Some(&body))?;
            wait_done(socket)?
        }
        CtlSnapshotOp::Periodic {
            dir,
            key,
            target_pages,
            keep,
            plugin,
        } => {
            let plugin = abs_opt(plugin.or_else(default_plugin))?;
            let body = json!({
                "dir": abs(&dir)?,
                "key_file": abs_opt(key)?,
                "target_pages": target_pages,
                "keep": keep,
                "plugin": plugin,
            });
            api::call_checked(socket, "PUT", "/snapshot/periodic", Some(&body))?
        }
        CtlSnapshotOp::Evict { dir, key, plugin } => {
            let plugin = abs_opt(plugin.or_else(default_plugin))?;
            let body = json!({
                "dir": abs(&dir)?,
                "key_file": abs_opt(key)?,
                "plugin": plugin,
            });
            let t = Instant::now();
            // A periodic layer in flight finishes first.
            loop {
                match api::call_checked(socket, "PUT", "/snapshot/evict", Some(&body)) {
                    Ok(_) => break,
                    Err(e) if e.to_string().contains("busy") && t.elapsed().as_secs() < 600 => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut v = wait_done(socket)?;
            api::call_checked(socket, "PUT", "/vm/shutdown", None)?;
            v["evict_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
            v
        }
        CtlSnapshotOp::Load {
            dir,
            lazy,
            paused,
            key,
        } => {
            let body = json!({
                "dir": abs(&dir)?,
                "lazy": lazy,
                "paused": paused,
                "key_file": abs_opt(key)?,
            });
            api::call_checked(socket, "PUT", "/snapshot/load", Some(&body))?
        }
        CtlSnapshotOp::Status => api::call_checked(socket, "GET", "/snapshot/status", None)?,
        CtlSnapshotOp::Secret { op } => match op {
            SecretOp::Add { gpa, len } => api::call_checked(
                socket,
                "PUT",
                "/snapshot/secret",
                Some(&json!({ "gpa": gpa, "len": len })),
            )?,
            SecretOp::List => api::call_checked(socket, "GET", "/snapshot/secrets", None)?,
        },
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn key(path: Option<&Path>) -> anyhow::Result<Option<SnapshotKey>> {
    Ok(path.map(SnapshotKey::from_file).transpose()?)
}

/// `spanvmm snapshot ...`.
pub fn offline(op: OfflineOp) -> anyhow::Result<()> {
    let out = match op {
        OfflineOp::Info { dir, key: k } => {
            let chain = Chain::open(&dir, key(k.as_deref())?.as_ref())?;
            let layers: Vec<Value> = chain
                .layers
                .iter()
                .map(|l| {
                    let m = &l.manifest;
                    json!({
                        "dir": l.dir,
                        "id": m.id,
                        "parent": m.parent.as_ref().map(|p| &p.id),
                        "created_unix": m.created_unix,
                        "expires_unix": m.expires_unix,
                        "data_bytes": m.data_bytes,
                        "rounds": m.rounds,
                        "secrets": m.secrets,
                    })
                })
                .collect();
            json!({
                "memory_bytes": chain.mem_bytes(),
                "data_pages": chain.data_pages(),
                "layers": layers,
            })
        }
        OfflineOp::Merge {
            top,
            out,
            key: k,
            out_key,
        } => {
            let k = key(k.as_deref())?;
            let ok = match out_key {
                Some(p) => key(Some(&p))?,
                None => k.clone(),
            };
            let t = Instant::now();
            let s = snapshot::merge(&top, k.as_ref(), &out, ok)?;
            json!({ "merged": s, "ms": t.elapsed().as_secs_f64() * 1e3 })
        }
        OfflineOp::Shred { dir } => {
            let n = snapshot::shred(&dir)?;
            json!({ "shredded": dir, "bytes_overwritten": n })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
