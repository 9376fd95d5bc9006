//! `spanvmm ctl snapshot ...` (the client of the `/snapshot/...` endpoints) and the offline
//! `spanvmm snapshot info|merge|shred`, which work on the files alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use base_vmm::snapshot::{self, Chain, SnapshotKey};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::api::client as api;

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
