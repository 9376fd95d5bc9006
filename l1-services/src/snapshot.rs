//! The snapshot engine checkpoint services drive (`sdk/wit/snapshot.wit`): a job per layer,
//! each with its own writer thread. A service queues page batches and a commit; the thread
//! writes them in order (base-vmm's [`LayerWriter`]) while the service polls the status from
//! its ticks, so every host call returns at once and the guest may run meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use base_vmm::snapshot::{self as store, LayerOptions, LayerWriter, SnapshotKey};
use base_vmm::state::VmState;

use crate::ctx::lock;
// The SDK's types, on both sides of the boundary: what a service asks for a new layer, and a
// job's progress.
use crate::error::HostError;
use crate::host::VmHost;
use crate::service_state::ServiceRecord;
pub use spanvmm_sdk::snapshot::{JobStatus, LayerOptions as LayerRequest};

/// Most jobs open at once per VM.
const MAX_JOBS: usize = 8;

/// The owner of the jobs the VMM opens itself ([`SnapshotEngine::save`]); services' ids
/// count up from 1 and never reach it.
const HOST_OWNER: u64 = u64::MAX;

/// Why the snapshot engine refused or failed a job.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotJobError {
    /// The per-VM limit of open jobs is reached.
    #[error("{MAX_JOBS} snapshot jobs are open already: close one")]
    TooManyJobs,
    /// The host gives the engine no guest memory to write.
    #[error("this VMM gives no access to guest memory for snapshots")]
    NoGuestMemory,
    /// The caller owns no job of that id.
    #[error("no snapshot job {0}")]
    NoJob(u32),
    /// Nothing may follow a commit.
    #[error("the layer is committed already")]
    Committed,
    /// The job's writer thread is gone (it failed earlier: see the job's error).
    #[error("the snapshot writer has stopped")]
    WriterStopped,
    /// A thread could not be started.
    #[error("cannot start the snapshot {0}: {1}")]
    Thread(&'static str, std::io::Error),
    /// The VM state could not be captured at commit.
    #[error("commit: {0}")]
    Capture(HostError),
    /// The layer's directory is not a UTF-8 path.
    #[error("dir {0} is not UTF-8")]
    NotUtf8(PathBuf),
    /// The job failed on its writer thread (the message its status carries).
    #[error("{0}")]
    Failed(String),
    /// The store (key file, layer files, merge, removal) failed.
    #[error(transparent)]
    Store(#[from] store::SnapshotError),
}

/// What a service asks to merge: the chain ending in `top` into one full layer in `out`.
#[derive(Debug, Clone, Default)]
pub struct MergeRequest {
    /// Top layer of the chain.
    pub top: String,
    /// Directory of the merged layer.
    pub out: String,
    /// Key file: of the chain, and of the merged layer.
    pub key_file: Option<String>,
}

enum Cmd {
    Pages(Option<Vec<u64>>),
    Commit(Box<VmState>, Vec<(u64, u64)>),
}

struct Job {
    owner: u64,
    tx: Option<Sender<Cmd>>,
    status: Arc<Mutex<JobStatus>>,
}

/// All snapshot jobs of one VM.
#[derive(Default)]
pub(crate) struct SnapshotEngine {
    jobs: Mutex<HashMap<u32, Job>>,
    next: AtomicU32,
    totals: Arc<SnapshotTotals>,
}

/// What the snapshot engine did since the VMM started (for metrics).
#[derive(Debug, Default)]
pub struct SnapshotTotals {
    /// Layers complete.
    pub committed: AtomicU64,
    /// Layers that failed.
    pub failed: AtomicU64,
    /// Bytes written to layers' memory files.
    pub bytes_written: AtomicU64,
}

impl SnapshotEngine {
    /// Opens a layer for service `owner`.
    pub(crate) fn begin(
        &self,
        owner: u64,
        host: &dyn VmHost,
        req: LayerRequest,
    ) -> Result<u32, SnapshotJobError> {
        let mut jobs = lock(&self.jobs);
        if jobs.len() >= MAX_JOBS {
            return Err(SnapshotJobError::TooManyJobs);
        }
        let ram = host.guest_ram().ok_or(SnapshotJobError::NoGuestMemory)?;
        let key = req
            .key_file
            .as_deref()
            .map(|k| SnapshotKey::from_file(k.as_ref()))
            .transpose()?;
        let opts = LayerOptions {
            parent: req.parent.map(PathBuf::from),
            key,
            expires_in_s: req.expires_in_s,
            secrets: host.secrets(),
        };
        let writer = LayerWriter::create(req.dir.as_ref(), ram, opts)?;
        let status = Arc::new(Mutex::new(JobStatus {
            layer_id: writer.id(),
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel::<Cmd>();
        let st = status.clone();
        let totals = self.totals.clone();
        std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Snapshot);
                let mut writer = Some(writer);
                for cmd in rx {
                    let failed = lock(&st).error.is_some();
                    // After a failure the rest of the queue is dropped: the layer stays invalid.
                    let r = if failed {
                        Ok(false)
                    } else {
                        run(&mut writer, cmd, &st)
                    };
                    let mut s = lock(&st);
                    s.pending = s.pending.saturating_sub(1);
                    match r {
                        Ok(true) if !s.committed => {
                            s.committed = true;
                            totals.committed.fetch_add(1, Ordering::Relaxed);
                            totals
                                .bytes_written
                                .fetch_add(s.bytes_written, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            totals.failed.fetch_add(1, Ordering::Relaxed);
                            // The job's status crosses to the service as text.
                            s.error = Some(e.to_string());
                        }
                    }
                }
            })
            .map_err(|e| SnapshotJobError::Thread("writer", e))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        jobs.insert(
            id,
            Job {
                owner,
                tx: Some(tx),
                status,
            },
        );
        Ok(id)
    }

    /// Starts merging a chain on its own thread (reading the layers, not guest memory);
    /// the job is committed once the merged layer is complete. Nothing can be queued on it.
    pub(crate) fn merge(&self, owner: u64, req: MergeRequest) -> Result<u32, SnapshotJobError> {
        let mut jobs = lock(&self.jobs);
        if jobs.len() >= MAX_JOBS {
            return Err(SnapshotJobError::TooManyJobs);
        }
        let status = Arc::new(Mutex::new(JobStatus {
            pending: 1,
            ..Default::default()
        }));
        let st = status.clone();
        std::thread::Builder::new()
            .name("snapshot-merge".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Snapshot);
                let r = merge_chain(&req);
                let mut s = lock(&st);
                s.pending = 0;
                match r {
                    Ok(summary) => {
                        s.layer_id = summary.id;
                        s.bytes_written = summary.bytes_written;
                        s.rounds = 1;
                        s.copied = true;
                        s.committed = true;
                    }
                    Err(e) => s.error = Some(e.to_string()),
                }
            })
            .map_err(|e| SnapshotJobError::Thread("merge", e))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        jobs.insert(
            id,
            Job {
                owner,
                tx: None,
                status,
            },
        );
        Ok(id)
    }

    fn send(&self, owner: u64, job: u32, cmd: Cmd) -> Result<(), SnapshotJobError> {
        let jobs = lock(&self.jobs);
        let j = jobs
            .get(&job)
            .filter(|j| j.owner == owner)
            .ok_or(SnapshotJobError::NoJob(job))?;
        let tx = j.tx.as_ref().ok_or(SnapshotJobError::Committed)?;
        lock(&j.status).pending += 1;
        tx.send(cmd).map_err(|_| {
            lock(&j.status).pending -= 1;
            SnapshotJobError::WriterStopped
        })
    }

    /// Queues a page batch (`None`: every page).
    pub(crate) fn write_pages(
        &self,
        owner: u64,
        job: u32,
        bitmap: Option<Vec<u64>>,
    ) -> Result<(), SnapshotJobError> {
        self.send(owner, job, Cmd::Pages(bitmap))
    }

    /// Captures the VM state now (paused VM) and queues the state file.
    pub(crate) fn commit(
        &self,
        owner: u64,
        job: u32,
        host: &dyn VmHost,
        services: &[ServiceRecord],
    ) -> Result<(), SnapshotJobError> {
        let mut state = host.capture_state().map_err(SnapshotJobError::Capture)?;
        state.services = services.iter().map(ServiceRecord::to_section).collect();
        self.send(owner, job, Cmd::Commit(Box::new(state), host.secrets()))?;
        // Nothing may follow a commit.
        if let Some(j) = lock(&self.jobs).get_mut(&job) {
            j.tx = None;
        }
        Ok(())
    }

    /// A job's progress.
    pub(crate) fn status(&self, owner: u64, job: u32) -> Result<JobStatus, SnapshotJobError> {
        lock(&self.jobs)
            .get(&job)
            .filter(|j| j.owner == owner)
            .map(|j| lock(&j.status).clone())
            .ok_or(SnapshotJobError::NoJob(job))
    }

    /// Drops a job; its writer thread ends once its queue is done.
    pub(crate) fn close(&self, owner: u64, job: u32) {
        let mut jobs = lock(&self.jobs);
        if jobs.get(&job).is_some_and(|j| j.owner == owner) {
            jobs.remove(&job);
        }
    }

    /// Writes one full layer of the paused VM into `dir` and waits until it is complete: the
    /// VMM's own save (`PUT /vm/save`), through the same job and writer a service's layer
    /// takes, so it lands in the format `run --restore` reads and counts in the totals.
    pub(crate) fn save(
        &self,
        host: &dyn VmHost,
        dir: &std::path::Path,
        services: &[ServiceRecord],
    ) -> Result<JobStatus, SnapshotJobError> {
        let dir = dir
            .to_str()
            .ok_or_else(|| SnapshotJobError::NotUtf8(dir.to_path_buf()))?;
        let req = LayerRequest {
            dir: dir.to_string(),
            ..LayerRequest::default()
        };
        let job = self.begin(HOST_OWNER, host, req)?;
        let r = self
            .write_pages(HOST_OWNER, job, None)
            .and_then(|()| self.commit(HOST_OWNER, job, host, services))
            .and_then(|()| self.wait(job));
        self.close(HOST_OWNER, job);
        r
    }

    /// Waits for one of the host's jobs to commit or fail.
    fn wait(&self, job: u32) -> Result<JobStatus, SnapshotJobError> {
        loop {
            let mut s = self.status(HOST_OWNER, job)?;
            if let Some(e) = s.error.take() {
                return Err(SnapshotJobError::Failed(e));
            }
            if s.committed {
                return Ok(s);
            }
            // The writer thread moves the status on; a save is a blocking call anyway.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Layers written and failed since the VMM started.
    pub(crate) fn totals(&self) -> &SnapshotTotals {
        &self.totals
    }

    /// A layer is being written (opened, neither committed nor failed): the VM's memory and
    /// pause state belong to it until it ends.
    pub(crate) fn in_progress(&self) -> bool {
        lock(&self.jobs).values().any(|j| {
            let s = lock(&j.status);
            !s.committed && s.error.is_none()
        })
    }

    /// Drops every job of a service that goes away.
    pub(crate) fn close_owner(&self, owner: u64) {
        lock(&self.jobs).retain(|_, j| j.owner != owner);
    }
}

/// Carries out one command; true when it committed the layer.
fn run(
    writer: &mut Option<LayerWriter>,
    cmd: Cmd,
    st: &Mutex<JobStatus>,
) -> Result<bool, SnapshotJobError> {
    match cmd {
        Cmd::Pages(bits) => {
            let w = writer.as_mut().ok_or(SnapshotJobError::Committed)?;
            let n = w.write_pages(bits.as_deref())?;
            let mut s = lock(st);
            s.bytes_written += n;
            s.rounds += 1;
            Ok(false)
        }
        Cmd::Commit(state, secrets) => {
            let mut w = writer.take().ok_or(SnapshotJobError::Committed)?;
            // The batches before the commit are in the file; what is left does not read
            // guest memory (the state was captured at commit time).
            lock(st).copied = true;
            w.add_secrets(&secrets);
            w.finish(*state)?;
            Ok(true)
        }
    }
}

/// Merges `req.top`'s chain into `req.out`.
fn merge_chain(req: &MergeRequest) -> Result<store::LayerSummary, SnapshotJobError> {
    let key = || {
        req.key_file
            .as_deref()
            .map(|k| SnapshotKey::from_file(k.as_ref()))
            .transpose()
    };
    let read_key = key()?;
    store::merge(
        req.top.as_ref(),
        read_key.as_ref(),
        req.out.as_ref(),
        key()?,
    )
    .map_err(Into::into)
}

/// Deletes one layer (retention); see [`store::remove_layer`].
pub(crate) fn remove_layer(dir: &str) -> Result<(), SnapshotJobError> {
    Ok(store::remove_layer(dir.as_ref())?)
}
