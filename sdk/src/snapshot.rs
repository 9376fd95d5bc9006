//! The snapshot engine (`wit/snapshot.wit`, capability `snapshot`): a checkpoint service opens
//! a layer, queues page batches (as a dirty bitmap) and a commit, and polls the status from its
//! ticks; the host writes the bytes on its own thread. Wasm and native services alike (the
//! native host table carries these calls since they were appended to ABI version 1).

/// A new layer.
#[derive(Debug, Clone, Default)]
pub struct LayerOptions {
    /// Layer directory.
    pub dir: String,
    /// Parent layer directory (incremental layer).
    pub parent: Option<String>,
    /// Key file: encrypt the layer.
    pub key_file: Option<String>,
    /// Seconds until restore is refused.
    pub expires_in_s: Option<u64>,
}

/// Progress of a layer.
#[derive(Debug, Clone, Default)]
pub struct JobStatus {
    /// The layer's id.
    pub layer_id: String,
    /// Batches and commits queued and not yet done.
    pub pending: u32,
    /// Write rounds done.
    pub rounds: u32,
    /// Bytes written so far.
    pub bytes_written: u64,
    /// Every batch queued before the commit is written: the guest may run again.
    pub copied: bool,
    /// The layer is complete and valid.
    pub committed: bool,
    /// The job failed.
    pub error: Option<String>,
}

impl From<&JobStatus> for crate::abi::CJobStatus {
    fn from(s: &JobStatus) -> Self {
        crate::abi::CJobStatus {
            pending: s.pending,
            rounds: s.rounds,
            bytes_written: s.bytes_written,
            copied: s.copied as u8,
            committed: s.committed as u8,
            failed: s.error.is_some() as u8,
            reserved: [0; 5],
        }
    }
}

impl JobStatus {
    /// The status a C status, its layer id and (when it failed) its failure describe.
    pub fn from_c(s: &crate::abi::CJobStatus, layer_id: String, failure: String) -> JobStatus {
        JobStatus {
            layer_id,
            pending: s.pending,
            rounds: s.rounds,
            bytes_written: s.bytes_written,
            copied: s.copied != 0,
            committed: s.committed != 0,
            error: (s.failed != 0).then_some(failure),
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{JobStatus, LayerOptions};
    use crate::wasm::bindings::spanvmm::service::snapshot as s;

    pub fn begin(o: &LayerOptions) -> Result<u32, String> {
        s::begin(&s::LayerOptions {
            dir: o.dir.clone(),
            parent: o.parent.clone(),
            key_file: o.key_file.clone(),
            expires_in_s: o.expires_in_s,
        })
    }
    pub fn write_pages(job: u32, bitmap: &[u64]) -> Result<(), String> {
        s::write_pages(job, bitmap)
    }
    pub fn commit(job: u32) -> Result<(), String> {
        s::commit(job)
    }
    pub fn status(job: u32) -> Result<JobStatus, String> {
        s::status(job).map(|j| JobStatus {
            layer_id: j.layer_id,
            pending: j.pending,
            rounds: j.rounds,
            bytes_written: j.bytes_written,
            copied: j.copied,
            committed: j.committed,
            error: j.error,
        })
    }
    pub fn close(job: u32) {
        s::close(job)
    }
    pub fn merge(top: &str, out: &str, key_file: Option<&str>) -> Result<u32, String> {
        s::merge(top, out, key_file)
    }
    pub fn remove(dir: &str) -> Result<(), String> {
        s::remove(dir)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::{JobStatus, LayerOptions};
    use crate::native::imports as n;

    pub fn begin(o: &LayerOptions) -> Result<u32, String> {
        n::snapshot_begin(o)
    }
    pub fn write_pages(job: u32, bitmap: &[u64]) -> Result<(), String> {
        n::snapshot_write_pages(job, bitmap)
    }
    pub fn commit(job: u32) -> Result<(), String> {
        n::snapshot_commit(job)
    }
    pub fn status(job: u32) -> Result<JobStatus, String> {
        n::snapshot_status(job)
    }
    pub fn close(job: u32) {
        n::snapshot_close(job)
    }
    pub fn merge(top: &str, out: &str, key_file: Option<&str>) -> Result<u32, String> {
        n::snapshot_merge(top, out, key_file)
    }
    pub fn remove(dir: &str) -> Result<(), String> {
        n::snapshot_remove(dir)
    }
}

/// Opens a layer; returns its job handle.
pub fn begin(opts: &LayerOptions) -> Result<u32, String> {
    imp::begin(opts)
}

/// Queues writing the pages set in `bitmap` (one bit per page); empty means every page.
pub fn write_pages(job: u32, bitmap: &[u64]) -> Result<(), String> {
    imp::write_pages(job, bitmap)
}

/// Captures the VM state now (the VM must be paused) and queues the state file.
pub fn commit(job: u32) -> Result<(), String> {
    imp::commit(job)
}

/// Progress of a job.
pub fn status(job: u32) -> Result<JobStatus, String> {
    imp::status(job)
}

/// Drops a job.
pub fn close(job: u32) {
    imp::close(job)
}

/// Folds the chain ending in `top` into one full layer in `out` on a host thread; returns a
/// job to poll with [`status`] (committed: done).
pub fn merge(top: &str, out: &str, key_file: Option<&str>) -> Result<u32, String> {
    imp::merge(top, out, key_file)
}

/// Deletes the layer in `dir` (retention of layers a merge superseded).
pub fn remove(dir: &str) -> Result<(), String> {
    imp::remove(dir)
}
