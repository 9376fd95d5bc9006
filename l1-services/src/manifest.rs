//! A service's manifest as the host reads it: a native plugin's `describe` hands JSON over the
//! C ABI ([`parse_native`]); a Wasm component's arrives as a WIT record. Either way the host
//! checks it ([`validate`]) before anything is granted or claimed; the checks against the
//! services already attached (names, exclusive capabilities, port and MMIO overlaps) follow
//! in the manager. The fuzz target `manifest` feeds both functions.

use std::path::Path;

use spanvmm_sdk::{EventKind, Manifest};

use crate::error::ServiceError;

/// Largest manifest JSON a native plugin may hand over (a real one is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;

/// Why a native plugin's manifest JSON is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Longer than [`MAX_MANIFEST_BYTES`].
    #[error("describe returned a manifest of {0} bytes (at most {MAX_MANIFEST_BYTES})")]
    TooLarge(usize),
    /// Not the JSON form of a manifest.
    #[error("describe returned an unreadable manifest: {0}")]
    Unreadable(#[from] serde_json::Error),
}

/// Parses the manifest JSON a native plugin's `describe` returned.
pub fn parse_native(json: &[u8]) -> Result<Manifest, ManifestError> {
    if json.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(json.len()));
    }
    Ok(serde_json::from_slice(json)?)
}

/// A valid service name: 1-64 ASCII letters, digits, `-` or `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a manifest on its own, for a VM with `ram` bytes of guest memory: the interface
/// version, the name, every port and MMIO range, the tick period. `path` names the plugin in
/// errors.
pub fn validate(m: &Manifest, ram: u64, path: &Path) -> Result<(), ServiceError> {
    if m.abi_version != spanvmm_sdk::ABI_VERSION {
        return Err(ServiceError::AbiMismatch {
            path: path.into(),
            found: m.abi_version,
            expected: spanvmm_sdk::ABI_VERSION,
        });
    }
    let bad = |msg: String| ServiceError::Manifest {
        name: m.name.clone(),
        path: path.into(),
        msg,
    };
    if !valid_name(&m.name) {
        return Err(bad(format!(
            "name {:?} must be 1-64 letters, digits, '-' or '_'",
            m.name
        )));
    }
    if let Some(r) = m.ports.iter().find(|r| !r.is_valid()) {
        return Err(bad(format!(
            "port range {:#x}+{} is empty or runs past port 0xffff",
            r.base, r.len
        )));
    }
    if let Some(e) = m
        .mmio
        .iter()
        .find_map(|r| crate::ctx::check_mmio_range(r, ram).err())
    {
        return Err(bad(format!("MMIO claim: {e}")));
    }
    if m.events.contains(&EventKind::Tick) && m.tick_period_ms == 0 {
        return Err(bad("subscribes to ticks with a tick period of 0 ms".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_parsed_and_checked() {
        let p = Path::new("t.so");
        let mut m = Manifest::new("ok-1", "1");
        m.ports.push(spanvmm_sdk::PortRange::new(0xfff0, 0x10));
        m.mmio.push(spanvmm_sdk::MmioRange::new(1 << 30, 4096));
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(parse_native(&json).unwrap(), m);
        assert!(validate(&m, 1 << 20, p).is_ok());
        assert!(parse_native(b"{").is_err());
        assert!(parse_native(&vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
        let refused = |f: &dyn Fn(&mut Manifest)| {
            let mut b = m.clone();
            f(&mut b);
            validate(&b, 1 << 20, p).unwrap_err().to_string()
        };
        assert!(refused(&|b| b.abi_version += 1).contains("version"));
        assert!(refused(&|b| b.name = "a b".into()).contains("name"));
        assert!(refused(&|b| b.name = "x".repeat(65)).contains("name"));
        assert!(refused(&|b| b.ports[0].len = 0x11).contains("port range"));
        assert!(refused(&|b| b.mmio[0].base = 0).contains("guest RAM"));
        assert!(refused(&|b| b.mmio[0].base = u64::MAX).contains("wraps"));
        assert!(refused(&|b| b.events.push(EventKind::Tick)).contains("tick period"));
    }
}
