//! Removing, shredding, merging and (for tests) rewriting layers.

use super::*;

/// Deletes the snapshot layer in `dir` (its state and memory files, then the directory when
/// nothing else is in it), without overwriting anything: retention of superseded layers,
/// where [`shred`] would double the I/O. Refuses a directory that holds no layer.
pub fn remove_layer(dir: &Path) -> Result<(), SnapshotError> {
    if !dir.join(STATE_FILE).exists() {
        return Err(invalid(dir, "no snapshot here (no state file)"));
    }
    // The state file first: a layer without it is no layer, whatever else is left.
    for name in [STATE_FILE, MEMORY_FILE, "state.tmp"] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(&path)(e)),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Securely deletes the snapshot layer in `dir`: its files' data are overwritten with zeros
/// and flushed, then unlinked; the directory is removed when empty. The chain is not followed.
pub fn shred(dir: &Path) -> Result<u64, SnapshotError> {
    let mut overwritten = 0;
    for name in [MEMORY_FILE, STATE_FILE, "state.tmp"] {
        let path = dir.join(name);
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(&path)(e)),
        };
        let len = file.metadata().map_err(io_at(&path))?.len();
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0u64;
        // Only the data extents hold anything (holes were never written).
        while off < len {
            let Some(data) = seek(&file, off, libc::SEEK_DATA) else {
                break;
            };
            let hole = seek(&file, data, libc::SEEK_HOLE).unwrap_or(len).min(len);
            let mut o = data;
            while o < hole {
                let n = (hole - o).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], o).map_err(io_at(&path))?;
                o += n as u64;
            }
            overwritten += hole - data;
            off = hole;
        }
        file.sync_all().map_err(io_at(&path))?;
        drop(file);
        std::fs::remove_file(&path).map_err(io_at(&path))?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(overwritten)
}

pub(super) fn seek(file: &File, off: u64, whence: libc::c_int) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid descriptor has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Merges the chain ending in `top` into one full layer in `out` (same state, same secrets,
/// same expiry; encrypted with `out_key` when given).
pub fn merge(
    top: &Path,
    key: Option<&SnapshotKey>,
    out: &Path,
    out_key: Option<SnapshotKey>,
) -> Result<LayerSummary, SnapshotError> {
    let chain = Chain::open(top, key)?;
    let out_abs = std::path::absolute(out).map_err(io_at(out))?;
    if chain
        .layers
        .iter()
        .any(|l| std::path::absolute(&l.dir).is_ok_and(|d| d == out_abs))
    {
        return Err(SnapshotError::Usage(format!(
            "{} is part of the chain: merge into a new directory",
            out.display()
        )));
    }
    let ram = Arc::new(
        GuestRam::new(chain.mem_bytes()).map_err(|e| SnapshotError::Usage(e.to_string()))?,
    );
    chain.load_into(&ram)?;
    let m = &chain.top().manifest;
    let secrets: Vec<(u64, u64)> = chain
        .layers
        .iter()
        .flat_map(|l| l.manifest.secrets.iter().copied())
        .collect();
    let mut w = LayerWriter::create(
        out,
        ram,
        LayerOptions {
            parent: None,
            key: out_key,
            expires_in_s: m.expires_unix.map(|at| at.saturating_sub(unix_now())),
            secrets,
        },
    )?;
    w.write_pages(None)?;
    w.finish(chain.top().vm.clone())
}

/// Rewrites the VM state recorded in the layer `dir` (`edit` changes it) and seals the state
/// file again (checksum, or encryption with `key`), keeping the manifest, the index and the
/// memory file. For tests that need a snapshot of a VM that could not exist here (e.g. one
/// whose CPU had features this host lacks); a child layer of `dir` no longer matches it (it
/// records the old state file's SHA-256).
#[doc(hidden)]
pub fn rewrite_vm_state(
    dir: &Path,
    key: Option<&SnapshotKey>,
    edit: impl FnOnce(&mut VmState),
) -> Result<(), SnapshotError> {
    rewrite_state_sections(dir, key, |sections| {
        let mut vm = VmState::from_sections(std::mem::take(sections), "rewrite")
            .expect("the layer's state was checked when it was opened");
        edit(&mut vm);
        *sections = vm.to_sections();
    })
}

/// [`rewrite_vm_state`] at the level of the state tree's sections: for tests that need a state
/// this build would never write (a section from a newer spanvmm, say).
#[doc(hidden)]
pub fn rewrite_state_sections(
    dir: &Path,
    key: Option<&SnapshotKey>,
    edit: impl FnOnce(&mut Vec<crate::state::Section>),
) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_at(&path))?;
    let parsed = parse_state(&bytes, &path, key)?;
    let payload = parsed.decrypted.as_deref().unwrap_or(&bytes[HEADER_LEN..]);
    let index = &payload[parsed.index_at..];
    let mut sections = parsed.vm.to_sections();
    edit(&mut sections);
    let new = payload_of(&parsed.manifest, &crate::state::encode(&sections), index);
    let sealed = seal(&new, key, &parsed.salt)?;
    let tmp = dir.join("state.tmp");
    owner_only_file(&tmp)
        .and_then(|mut f| f.write_all(&sealed).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(io_at(&path))
}
