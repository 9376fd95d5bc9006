//! The state file: header checks, decryption, manifest, VM state and page index.

use super::*;

/// A run of the index.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) start: u64,
    pub(super) count: u64,
    pub(super) data: bool,
    pub(super) round: u32,
    /// Offset of the run's first check in the payload: 16 bytes for each page (encrypted) or
    /// each aligned group the run touches (plain).
    pub(super) checks_at: usize,
}

/// Parsed state file of one layer.
pub struct ParsedState {
    /// The manifest.
    pub manifest: LayerManifest,
    /// The VM state (vCPUs, devices, machine, services).
    pub vm: VmState,
    /// Where the index starts in the payload.
    pub(super) index_at: usize,
    pub(super) runs: Vec<Run>,
    /// The payload when it had to be decrypted; `None`: it is the file's bytes after the
    /// header (the checks are read in place rather than copied: a restore waits for this).
    pub(super) decrypted: Option<Vec<u8>>,
    pub(super) salt: [u8; 12],
    pub(super) encrypted: bool,
}

/// Parses and checks a state file's bytes (`path` names it in errors). Everything is checked
/// before it is used: a truncated, corrupted, foreign, wrong-version, wrong-key or tampered
/// file is refused, and an index that does not fit the machine is too.
pub fn parse_state(
    bytes: &[u8],
    path: &Path,
    key: Option<&SnapshotKey>,
) -> Result<ParsedState, SnapshotError> {
    parse_state_with(bytes, None, path, key)
}

/// [`parse_state`], given the checksum of the bytes after the header when the reader
/// computed it already.
pub(super) fn parse_state_with(
    bytes: &[u8],
    body_crc: Option<u32>,
    path: &Path,
    key: Option<&SnapshotKey>,
) -> Result<ParsedState, SnapshotError> {
    let bad = |why: String| invalid(path, why);
    if bytes.len() < 12 {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    if &bytes[0..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a spanvmm snapshot state file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
    if version != SNAPSHOT_VERSION {
        let hint = match version {
            1 => " (a single-image snapshot of an older spanvmm; restore it with that version)",
            2 => " (checked page by page, by an older spanvmm; restore it with that version)",
            3 => {
                " (written by an older spanvmm, before the VM state tree; restore it with that \
                 version)"
            }
            _ => "",
        };
        return Err(bad(format!(
            "format version {version}, this spanvmm reads version {SNAPSHOT_VERSION}{hint}"
        )));
    }
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let flags = u32_at(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    let crc = u32_at(24);
    let key_id: [u8; 8] = bytes[28..36].try_into().unwrap_or([0; 8]);
    let salt: [u8; 12] = bytes[36..48].try_into().unwrap_or([0; 12]);
    if flags & !FLAG_ENCRYPTED != 0 {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    let body = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || body.len() as u64 != len {
        return Err(bad(format!(
            "truncated or padded: header says {len} payload bytes, file has {}",
            body.len()
        )));
    }
    if body_crc.unwrap_or_else(|| crc32fast::hash(body)) != crc {
        return Err(bad("checksum mismatch: the file is corrupted".into()));
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let keyerr = |why: &str| SnapshotError::Key {
        path: path.display().to_string(),
        why: why.to_string(),
    };
    let payload = if encrypted {
        let Some(k) = key else {
            return Err(keyerr(
                "the snapshot is encrypted: give its key (--key FILE)",
            ));
        };
        if k.id != key_id {
            return Err(keyerr(
                "wrong key: the snapshot was encrypted with another key",
            ));
        }
        if body.len() < 16 {
            return Err(bad("encrypted payload shorter than its tag".into()));
        }
        let (ct, tag) = body.split_at(body.len() - 16);
        let mut pt = ct.to_vec();
        let aad = aad_of(bytes, &key_id, &salt);
        k.cipher
            .decrypt_in_place_detached(
                &nonce(&salt, u32::MAX, 0),
                &aad,
                &mut pt,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                keyerr("authentication failed: the state file was tampered with (or damaged)")
            })?;
        Some(pt)
    } else {
        if key.is_some() {
            tracing::info!("{}: not encrypted; the key is not needed", path.display());
        }
        None
    };
    let mut parsed = parse_payload(payload.as_deref().unwrap_or(body), path, salt, encrypted)?;
    parsed.decrypted = payload;
    Ok(parsed)
}

pub(super) fn parse_payload(
    payload: &[u8],
    path: &Path,
    salt: [u8; 12],
    encrypted: bool,
) -> Result<ParsedState, SnapshotError> {
    let bad = |why: String| invalid(path, why);
    if payload.len() < 4 {
        return Err(bad("payload shorter than its manifest length".into()));
    }
    let jlen = u32::from_le_bytes(payload[..4].try_into().unwrap_or([0; 4])) as usize;
    let json = payload
        .get(4..4usize.saturating_add(jlen))
        .ok_or_else(|| bad(format!("manifest length {jlen} runs past the payload")))?;
    let manifest: LayerManifest =
        serde_json::from_slice(json).map_err(|e| bad(format!("manifest does not parse: {e}")))?;
    let after = &payload[4 + jlen..];
    if after.len() < 4 {
        return Err(bad("payload ends before the VM state's length".into()));
    }
    let tlen = u32::from_le_bytes(after[..4].try_into().unwrap_or([0; 4])) as usize;
    let tree = after
        .get(4..4usize.saturating_add(tlen))
        .ok_or_else(|| bad(format!("VM state length {tlen} runs past the payload")))?;
    // The state tree's own checks (sections, versions, consistency) name the section at fault.
    let vm = VmState::from_bytes(tree, &path.display().to_string())
        .map_err(|e| SnapshotError::State(Box::new(e)))?;
    let pages = vm.machine.mem_bytes / PAGE_SIZE;
    let index_at = 4 + jlen + 4 + tlen;
    let mut rest = &payload[index_at..];
    let mut runs = Vec::new();
    let mut next = 0u64;
    while !rest.is_empty() {
        if rest.len() < RUN_HEADER {
            return Err(bad("index ends inside a run header".into()));
        }
        let start = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8]));
        let count = u32::from_le_bytes(rest[8..12].try_into().unwrap_or([0; 4])) as u64;
        let kind = rest[12];
        let round = u32::from_le_bytes(rest[13..17].try_into().unwrap_or([0; 4]));
        rest = &rest[RUN_HEADER..];
        if count == 0 || start < next || start.checked_add(count).is_none_or(|e| e > pages) {
            return Err(bad(format!(
                "index run {start}+{count} overlaps another or lies outside the {pages}-page guest"
            )));
        }
        if kind > 1 || (kind == 1 && round == u32::MAX) {
            return Err(bad(format!(
                "index run {start}+{count} has kind {kind}, round {round}"
            )));
        }
        let data = kind == 1;
        let checks_at = payload.len() - rest.len();
        if data {
            let checks = if encrypted {
                count
            } else {
                groups_of(start, count)
            };
            let need = checks as usize * 16;
            if rest.len() < need {
                return Err(bad("index ends inside a run's checks".into()));
            }
            rest = &rest[need..];
        }
        runs.push(Run {
            start,
            count,
            data,
            round,
            checks_at,
        });
        next = start + count;
    }
    Ok(ParsedState {
        manifest,
        vm,
        index_at,
        runs,
        decrypted: None,
        salt,
        encrypted,
    })
}
