//! Feeds arbitrary bytes to the snapshot state-file parser, without a key and with one: it
//! must answer with a parsed layer or an error, never panic, hang or allocate without bound.
//! The same bytes go in a second time with the header's payload length and CRC-32 made to
//! fit (when there is a header): mutated files almost never keep a valid checksum, and
//! without this the manifest and index parsers behind it were rarely reached.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use base_vmm::snapshot::{parse_state, SnapshotKey, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SnapshotKey {
    static KEY: OnceLock<SnapshotKey> = OnceLock::new();
    KEY.get_or_init(|| SnapshotKey::from_bytes(&[7u8; 32]).expect("a 32-byte key"))
}

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    let _ = parse_state(data, p, None);
    let _ = parse_state(data, p, Some(key()));
    if data.len() >= HEADER_LEN {
        let mut fixed = data.to_vec();
        let body_len = (fixed.len() - HEADER_LEN) as u64;
        let crc = crc32fast::hash(&fixed[HEADER_LEN..]);
        fixed[16..24].copy_from_slice(&body_len.to_le_bytes());
        fixed[24..28].copy_from_slice(&crc.to_le_bytes());
        let _ = parse_state(&fixed, p, None);
    }
});
