//! Keys, nonces and the sealing of a state payload (XChaCha20-Poly1305).

use super::*;

/// A snapshot key: 32 bytes from a key file.
#[derive(Clone)]
pub struct SnapshotKey {
    pub(super) cipher: XChaCha20Poly1305,
    pub(super) id: [u8; 8],
}

impl SnapshotKey {
    /// Reads a key file: 32 raw bytes, or 64 hex digits (a trailing newline is fine).
    pub fn from_file(path: &Path) -> Result<Self, SnapshotError> {
        let bytes = std::fs::read(path).map_err(io_at(path))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            // Name the key file rather than the contents.
            SnapshotError::Key { why, .. } => SnapshotError::Key {
                path: path.display().to_string(),
                why,
            },
            other => other,
        })
    }

    /// A key from a key file's contents.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
        let key: [u8; 32] = if text.len() == 64 && text.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut k = [0u8; 32];
            for (i, k) in k.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            k
        } else if bytes.len() == 32 {
            bytes.try_into().unwrap_or([0; 32])
        } else {
            return Err(SnapshotError::Key {
                path: "key".into(),
                why: format!(
                    "a key file holds 32 raw bytes or 64 hex digits, not {} bytes",
                    bytes.len()
                ),
            });
        };
        let mut h = Sha256::new();
        h.update(b"spanvmm snapshot key id");
        h.update(key);
        let id: [u8; 8] = h.finalize()[..8].try_into().unwrap_or([0; 8]);
        Ok(SnapshotKey {
            cipher: XChaCha20Poly1305::new((&key).into()),
            id,
        })
    }
}

/// Nonce of page `page` written in `round` of a layer with `salt`; the payload uses round
/// `u32::MAX`, which no page round reaches.
pub(super) fn nonce(salt: &[u8; 12], round: u32, page: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..12].copy_from_slice(salt);
    n[12..16].copy_from_slice(&round.to_le_bytes());
    n[16..].copy_from_slice(&page.to_le_bytes());
    n.into()
}

/// Frames (and encrypts) a state payload.
pub(super) fn seal(
    payload: &[u8],
    key: Option<&SnapshotKey>,
    salt: &[u8; 12],
) -> Result<Vec<u8>, SnapshotError> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(SNAPSHOT_MAGIC);
    head.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    head.extend_from_slice(&(if key.is_some() { FLAG_ENCRYPTED } else { 0 }).to_le_bytes());
    let body = match key {
        None => payload.to_vec(),
        Some(k) => {
            let mut body = payload.to_vec();
            let aad = aad_of(&head, &k.id, salt);
            let tag = k
                .cipher
                .encrypt_in_place_detached(&nonce(salt, u32::MAX, 0), &aad, &mut body)
                .map_err(|_| SnapshotError::Usage("state encryption failed".into()))?;
            body.extend_from_slice(&tag);
            body
        }
    };
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    head.extend_from_slice(&key.map(|k| k.id).unwrap_or([0; 8]));
    head.extend_from_slice(salt);
    head.extend_from_slice(&body);
    Ok(head)
}

/// Authenticated data of an encrypted payload: the header fields before the length, the key
/// id and the salt.
pub(super) fn aad_of(head16: &[u8], key_id: &[u8; 8], salt: &[u8; 12]) -> Vec<u8> {
    let mut aad = head16[..16].to_vec();
    aad.extend_from_slice(key_id);
    aad.extend_from_slice(salt);
    aad
}
