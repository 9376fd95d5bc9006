//! Snapshots through the control API, on the main loop: `PUT /snapshot/create` attaches the
//! checkpoint service (unless one is attached) and starts a layer; the service drives the
//! host's snapshot engine from its ticks while the client polls the status. The client side
//! (`ctl snapshot`) and the offline commands live in [`crate::ctl::snapshot`].

use std::path::Path;
use std::sync::Mutex;

use base_vmm::vmm::Vmm;
use l1_services::ServiceManager;
use serde_json::{json, Value};

pub use crate::api::routes::{BackgroundBody, CreateBody, LoadBody, SnapshotRequest};
use crate::api::ApiResult;

/// Name of the checkpoint service.
const SERVICE: &str = "checkpoint";

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
