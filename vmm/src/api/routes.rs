//! What every endpoint of the control API means: method + path + JSON body → an
//! [`ApiRequest`] for the main loop, or the HTTP error to answer. No I/O here: the server
//! ([`super::server`]) reads the bytes, the main loop and the orchestration modules (migrate,
//! snapshot, live update) take the typed requests, so none of them imports the server.

use std::path::PathBuf;

use base_vmm::devices::pv::GuestCommand;
use serde::Deserialize;
use serde_json::Value;

/// An operation the VMM's main loop performs for the API.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /vm`
    Status,
    /// `PUT /vm/pause`
    Pause,
    /// `PUT /vm/resume [{"force": true}]`
    Resume {
        /// Also run a VM that is in doubt (see `VmControl::set_in_doubt`).
        force: bool,
    },
    /// `PUT /vm/shutdown`
    Shutdown,
    /// `PUT /vm/save {"dir": ...}`
    Save(PathBuf),
    /// `PUT /guest/command {"command": ...}`
    GuestCommand(GuestCommand),
    /// `GET /plugins`
    PluginList,
    /// `PUT /plugins/attach {"path": ..., "config": ...}`
    PluginAttach {
        /// Plugin file (`.wasm` component or native `.so`).
        path: PathBuf,
        /// Service-specific configuration (JSON by convention).
        config: String,
        /// Deliver the service's port writes asynchronously.
        async_port_writes: bool,
        /// The tick period instead of the manifest's, ms.
        tick_period_ms: Option<u32>,
    },
    /// `PUT /plugins/detach {"name": ...}`
    PluginDetach(String),
    /// `PUT /plugins/replace {"name": ..., "path": ..., "rename": false}`
    PluginReplace {
        /// Service to replace.
        name: String,
        /// New plugin file.
        path: PathBuf,
        /// The new file may hold a service of another name.
        rename: bool,
    },
    /// `PUT /plugins/call {"name": ..., "method": ..., "args": ...}`
    PluginCall {
        /// Service.
        name: String,
        /// Method.
        method: String,
        /// Arguments (JSON by convention).
        args: String,
    },
    /// `GET /plugins/notifications`: what services published since the last call.
    PluginNotifications,
    /// `PUT /vm/migrate {"to": ..., "plugin": ..., "tls_dir": ..., ...}`
    Migrate(MigrateRequest),
    /// `GET /vm/migration`: progress, and the report once done.
    MigrationStatus,
    /// `/snapshot/...`: snapshots through the checkpoint service, secret regions.
    Snapshot(SnapshotRequest),
    /// `PUT /vm/live-update {"binary": ..., "timeout_ms": ...}`
    LiveUpdate {
        /// The new spanvmm binary.
        binary: PathBuf,
        /// Deadline for each step of the new binary's side.
        timeout_ms: u64,
    },
}

/// The main loop's answer: a JSON body, or an HTTP status with a message.
pub type ApiResult = Result<Value, (u16, String)>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveBody {
    dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    command: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    path: PathBuf,
    #[serde(default)]
    config: String,
    #[serde(default)]
    async_port_writes: bool,
    #[serde(default)]
    tick_period_ms: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveUpdateBody {
    binary: PathBuf,
    #[serde(default = "default_live_update_timeout")]
    timeout_ms: u64,
}

fn default_live_update_timeout() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceBody {
    name: String,
    path: PathBuf,
    #[serde(default)]
    rename: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    name: String,
    method: String,
    #[serde(default)]
    args: String,
}

pub(crate) fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, (u16, String)> {
    serde_json::from_slice(body).map_err(|e| (400, format!("invalid JSON body: {e}")))
}

/// Maps method + path + body to a request, or an HTTP error.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, (u16, String)> {
    let put = matches!(method, "PUT" | "POST");
    let req = match (path, method) {
        ("/vm", "GET") => ApiRequest::Status,
        ("/vm/pause", _) if put => ApiRequest::Pause,
        ("/vm/resume", _) if put => ApiRequest::Resume {
            force: body.iter().any(|b| !b.is_ascii_whitespace())
                && parse_body::<ResumeBody>(body)?.force,
        },
        ("/vm/shutdown", _) if put => ApiRequest::Shutdown,
        ("/vm/save", _) if put => ApiRequest::Save(parse_body::<SaveBody>(body)?.dir),
        ("/guest/command", _) if put => {
            let c: CommandBody = parse_body(body)?;
            ApiRequest::GuestCommand(match c.command.as_str() {
                "verify" => GuestCommand::Verify,
                "reset-stall" => GuestCommand::ResetStall,
                "power-off" => GuestCommand::PowerOff,
                other => {
                    return Err((
                        400,
                        format!("unknown guest command {other:?} (verify, reset-stall, power-off)"),
                    ))
                }
            })
        }
        ("/vm/live-update", _) if put => {
            let b: LiveUpdateBody = parse_body(body)?;
            if !b.binary.is_absolute() {
                return Err((400, "binary must be an absolute path".into()));
            }
            ApiRequest::LiveUpdate {
                binary: b.binary,
                timeout_ms: b.timeout_ms.clamp(100, 120_000),
            }
        }
        ("/vm/migrate", _) if put => ApiRequest::Migrate(parse_body(body)?),
        ("/vm/migration", "GET") => ApiRequest::MigrationStatus,
        (p, m) if p.starts_with("/snapshot/") => ApiRequest::Snapshot(route_snapshot(m, p, body)?),
        ("/plugins", "GET") => ApiRequest::PluginList,
        ("/plugins/notifications", "GET") => ApiRequest::PluginNotifications,
        ("/plugins/attach", _) if put => {
            let b: AttachBody = parse_body(body)?;
            ApiRequest::PluginAttach {
                path: b.path,
                config: b.config,
                async_port_writes: b.async_port_writes,
                tick_period_ms: b.tick_period_ms,
            }
        }
        ("/plugins/detach", _) if put => {
            ApiRequest::PluginDetach(parse_body::<NameBody>(body)?.name)
        }
        ("/plugins/replace", _) if put => {
            let b: ReplaceBody = parse_body(body)?;
            ApiRequest::PluginReplace {
                name: b.name,
                path: b.path,
                rename: b.rename,
            }
        }
        ("/plugins/call", _) if put => {
            let b: CallBody = parse_body(body)?;
            ApiRequest::PluginCall {
                name: b.name,
                method: b.method,
                args: b.args,
            }
        }
        (
            "/vm"
            | "/vm/pause"
            | "/vm/resume"
            | "/vm/shutdown"
            | "/vm/save"
            | "/vm/migrate"
            | "/vm/migration"
            | "/guest/command"
            | "/plugins"
            | "/plugins/notifications"
            | "/plugins/attach"
            | "/plugins/detach"
            | "/plugins/replace"
            | "/plugins/call",
            m,
        ) => return Err((405, format!("method {m} is not allowed on {path}"))),
        _ => return Err((404, format!("no such endpoint: {path}"))),
    };
    Ok(req)
}

/// `PUT /vm/migrate`: start a migration, or (`{"poll": ID}`) the progress and then the report
/// of migration `ID` for the client that started it. Only that poll lets a source whose
/// guest has moved exit (`GET /vm/migration` is for anyone and never does).
#[derive(Debug, Deserialize)]
#[serde(try_from = "Value")]
pub enum MigrateRequest {
    /// Start one.
    Start(MigrateStart),
    /// The starter's poll of migration `ID`.
    Poll(u64),
    /// `{release: ID}`: opens the gate held migration `ID` waits at (synchronized arrival).
    Release(u64),
    /// `{cancel: ID}`: gives migration `ID` up before its commit; the guest stays here.
    Cancel(u64),
}

impl TryFrom<Value> for MigrateRequest {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        // `{poll: ID}`, `{release: ID}`, `{cancel: ID}`: the verb alone with its id.
        type Verb = fn(u64) -> MigrateRequest;
        let verbs: [(&str, Verb); 3] = [
            ("poll", MigrateRequest::Poll),
            ("release", MigrateRequest::Release),
            ("cancel", MigrateRequest::Cancel),
        ];
        for (verb, make) in verbs {
            if let Some(id) = v.get(verb) {
                let id = id
                    .as_u64()
                    .ok_or_else(|| format!("{verb}: a migration id (a number)"))?;
                if v.as_object().is_some_and(|o| o.len() != 1) {
                    return Err(format!("{verb}: no other field goes with it"));
                }
                return Ok(make(id));
            }
        }
        serde_json::from_value(v)
            .map(MigrateRequest::Start)
            .map_err(|e| e.to_string())
    }
}

/// `PUT /vm/migrate` starting a migration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateStart {
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
    /// Send `commit` with the state: the same as `commit: with-state` (kept for older
    /// callers).
    #[serde(default)]
    pub commit_with_state: bool,
    /// When the hand-over's `commit` goes (see `SourceConfig::commit`).
    #[serde(default)]
    pub commit: l1_services::migration::CommitMode,
    /// The link's TLS 1.3 cipher suite.
    #[serde(default)]
    pub cipher: l1_services::migration::tls::Cipher,
    /// Send pre-copy pages that are arithmetic progressions as 16 bytes (see
    /// `SourceConfig::stride_pages`).
    #[serde(default)]
    pub stride_pages: bool,
    /// Hold at the switch-over point until released (`{release: ID}`): synchronized arrival.
    #[serde(default)]
    pub hold: Option<l1_services::migration::hold::HoldSpec>,
}

fn default_recovery_ms() -> u64 {
    30_000
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
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) parent: Option<PathBuf>,
    #[serde(default)]
    pub(crate) live: bool,
    #[serde(default)]
    pub(crate) key_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) expires_in_s: Option<u64>,
    #[serde(default)]
    pub(crate) track: bool,
    #[serde(default)]
    pub(crate) max_rounds: Option<u32>,
    #[serde(default)]
    pub(crate) plugin: Option<PathBuf>,
}

/// Body of `PUT /snapshot/periodic` and `/snapshot/evict`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundBody {
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) key_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) target_pages: Option<u64>,
    #[serde(default)]
    pub(crate) keep: Option<u32>,
    #[serde(default)]
    pub(crate) plugin: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    gpa: u64,
    len: u64,
}

/// Maps `/snapshot/...` to a request.
pub fn route_snapshot(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<SnapshotRequest, (u16, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_rejects() {
        assert!(matches!(route("GET", "/vm", b""), Ok(ApiRequest::Status)));
        assert!(matches!(
            route("PUT", "/vm/pause", b""),
            Ok(ApiRequest::Pause)
        ));
        assert!(matches!(
            route("PUT", "/vm/save", br#"{"dir":"/tmp/x"}"#),
            Ok(ApiRequest::Save(_))
        ));
        assert!(matches!(
            route(
                "PUT",
                "/snapshot/create",
                br#"{"dir":"/tmp/x","live":true}"#
            ),
            Ok(ApiRequest::Snapshot(_))
        ));
        assert_eq!(
            route("PUT", "/snapshot/create", br#"{"dir":"rel"}"#)
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(route("GET", "/snapshot/evict", b"").unwrap_err().0, 405);
        assert_eq!(route("GET", "/snapshot/nope", b"").unwrap_err().0, 404);
        assert_eq!(route("DELETE", "/vm", b"").unwrap_err().0, 405);
        assert_eq!(route("GET", "/nope", b"").unwrap_err().0, 404);
        assert_eq!(route("PUT", "/vm/save", b"{").unwrap_err().0, 400);
        assert_eq!(
            route("PUT", "/vm/save", br#"{"dir":"/x","y":1}"#)
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            route("PUT", "/guest/command", br#"{"command":"dance"}"#)
                .unwrap_err()
                .0,
            400
        );
    }

    #[test]
    fn migrate_verbs_stand_alone() {
        let verb = |body: &[u8]| match route("PUT", "/vm/migrate", body) {
            Ok(ApiRequest::Migrate(m)) => Ok(m),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.0),
        };
        assert!(matches!(
            verb(br#"{"poll":3}"#),
            Ok(MigrateRequest::Poll(3))
        ));
        assert!(matches!(
            verb(br#"{"release":4}"#),
            Ok(MigrateRequest::Release(4))
        ));
        assert!(matches!(
            verb(br#"{"cancel":5}"#),
            Ok(MigrateRequest::Cancel(5))
        ));
        assert_eq!(verb(br#"{"release":"x"}"#).unwrap_err(), 400);
        assert_eq!(verb(br#"{"release":1,"poll":1}"#).unwrap_err(), 400);
        let held = br#"{"to":"h:1","tls_dir":"/t","hold":{"timeout_ms":10}}"#;
        match verb(held) {
            Ok(MigrateRequest::Start(s)) => {
                let h = s.hold.expect("a hold");
                assert_eq!((h.timeout_ms, h.commit_timeout_ms), (10, 5000));
            }
            _ => panic!("a start"),
        }
        let bad = br#"{"to":"h:1","tls_dir":"/t","hold":{"deadline":1}}"#;
        assert_eq!(verb(bad).unwrap_err(), 400);
    }
}
