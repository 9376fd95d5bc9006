//! Errors of the service layer.

use std::path::PathBuf;

use spanvmm_sdk::{Capability, MmioRange, PortRange};

/// What the VMM's side of a host call reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The operation does not exist on this host (e.g. no vCPUs behind a memory-only host).
    #[error("{0} is not available on this host")]
    NotAvailable(&'static str),
    /// A guest-physical access fell outside guest RAM.
    #[error(
        "guest memory access at {gpa:#x} (+{len} bytes) is outside the {size:#x}-byte guest RAM"
    )]
    OutOfRange {
        /// Guest-physical address.
        gpa: u64,
        /// Length of the access.
        len: u64,
        /// Guest RAM size.
        size: u64,
    },
    /// A request exceeds a limit of the interface.
    #[error("{0}")]
    Limit(String),
    /// Anything else, with the VMM's message.
    #[error("{0}")]
    Failed(String),
}

/// Errors of [`crate::ServiceManager`] operations. Each message names the service(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The file is neither a `.wasm` component nor a `.so` shared object.
    #[error("{0}: unknown plugin kind; expected a .wasm component or a .so shared object")]
    UnknownKind(PathBuf),
    /// The plugin file cannot be read.
    #[error("cannot read plugin {path}: {err}")]
    Io {
        /// Plugin path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The file is not a usable service (bad component, missing export or symbol, bad manifest).
    #[error("{path}: not a usable spanvmm service: {msg}")]
    Load {
        /// Plugin path.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The plugin speaks another version of the interface.
    #[error("{path}: service ABI version {found} does not match the host's version {expected}")]
    AbiMismatch {
        /// Plugin path.
        path: PathBuf,
        /// Version the plugin reported.
        found: u32,
        /// Version this host speaks.
        expected: u32,
    },
    /// The manifest is malformed.
    #[error("service {name} ({path}): invalid manifest: {msg}")]
    Manifest {
        /// Service name as the manifest gave it.
        name: String,
        /// Plugin path.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A service of that name is attached already.
    #[error("a service named {0} is already attached")]
    Duplicate(String),
    /// A port claim overlaps another owner's ports (a service or the VMM's own devices).
    #[error(
        "service {claimant} cannot claim ports {range}: they overlap {owned} owned by {owner}"
    )]
    PortConflict {
        /// Service asking.
        claimant: String,
        /// Range asked for.
        range: PortRange,
        /// Owner of the overlapping range.
        owner: String,
        /// The owner's range.
        owned: PortRange,
    },
    /// An MMIO claim overlaps another service's MMIO range.
    #[error("service {claimant} cannot claim {range}: it overlaps {owned} owned by {owner}")]
    MmioConflict {
        /// Service asking.
        claimant: String,
        /// Range asked for.
        range: MmioRange,
        /// Owner of the overlapping range.
        owner: String,
        /// The owner's range.
        owned: MmioRange,
    },
    /// An exclusive capability is held by another service.
    #[error("service {claimant} asks for exclusive capability {capability}, already held by service {holder}")]
    CapabilityConflict {
        /// Service asking.
        claimant: String,
        /// The capability.
        capability: Capability,
        /// Current holder.
        holder: String,
    },
    /// The service's `attach` returned an error.
    #[error("service {name} refused to attach: {msg}")]
    AttachRefused {
        /// Service.
        name: String,
        /// Its message.
        msg: String,
    },
    /// No attached service has that name.
    #[error("no service named {0} is attached")]
    NotFound(String),
    /// The service trapped, overran its deadline or memory limit, or panicked, and was detached.
    #[error("service {name} failed and was detached: {reason}")]
    Failed {
        /// Service.
        name: String,
        /// What happened.
        reason: String,
    },
    /// The service's `call` returned an error.
    #[error("service {name}: {method}: {msg}")]
    Call {
        /// Service.
        name: String,
        /// Method.
        method: String,
        /// Its message.
        msg: String,
    },
    /// A replacement refused its predecessor's state.
    #[error("service {name} refused its predecessor's state: {msg}")]
    ResumeRefused {
        /// Service.
        name: String,
        /// Its message.
        msg: String,
    },
    /// A replace failed; `rollback` says what became of the old service.
    #[error("replacing service {name} failed: {cause}; {rollback}")]
    Replace {
        /// Service replaced.
        name: String,
        /// Why the new one could not take over.
        cause: Box<ServiceError>,
        /// Outcome of restoring the old one.
        rollback: String,
    },
    /// The manager's service limit is reached.
    #[error("cannot attach more than {0} services to one VM")]
    TooMany(usize),
    /// The dirty log could not be started for a `dirty-log` service.
    #[error("service {name}: cannot start dirty logging: {err}")]
    DirtyLog {
        /// Service.
        name: String,
        /// Cause.
        err: HostError,
    },
    /// The service file was refused before anything of it was loaded: missing, not a regular
    /// file, too large, not trustworthy for native code, or against the operator's policy.
    #[error("{0}")]
    File(#[from] crate::trust::TrustError),
    /// A replacement holds another service than the one it is to replace.
    #[error(
        "{path} holds service {found}, not {expected}; give the file of {expected}, or \
         allow the new name explicitly (`plugin replace --rename`, \"rename\": true)"
    )]
    NameMismatch {
        /// The replacement's file.
        path: PathBuf,
        /// Name in its manifest.
        found: String,
        /// Name of the service to replace.
        expected: String,
    },
    /// The Wasm runtime could not be set up.
    #[error("wasm runtime: {0}")]
    Runtime(String),
    /// The VMM's own snapshot layer (`PUT /vm/save`) could not be written.
    #[error("save: {0}")]
    Save(#[from] crate::snapshot::SnapshotJobError),
}
