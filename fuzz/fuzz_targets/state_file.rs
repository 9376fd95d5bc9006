//! Feeds arbitrary bytes to the snapshot state-file parser, without a key and with one: it
//! must answer with a parsed layer or an error, never panic, hang or allocate without bound.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use base_vmm::snapshot::{parse_state, SnapshotKey};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SnapshotKey {
    static KEY: OnceLock<SnapshotKey> = OnceLock::new();
    KEY.get_or_init(|| SnapshotKey::from_bytes(&[7u8; 32]).expect("a 32-byte key"))
}

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    let _ = parse_state(data, p, None);
    let _ = parse_state(data, p, Some(key()));
});
