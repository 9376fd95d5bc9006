//! The VM-state codec (`base_vmm::state::VmState`, the `state` a migration carries and a live
//! update hands over): arbitrary bytes must be refused or parsed, never panic. The first byte
//! chooses how the rest is used: even, as a whole state file (header, CRC-32, JSON); odd, as
//! the JSON payload behind a header made to fit, so the JSON and the consistency checks are
//! reached. A state that parses must survive a round trip unchanged.
#![no_main]

use base_vmm::state::{VmState, STATE_MAGIC, STATE_VERSION};
use libfuzzer_sys::fuzz_target;

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = if mode & 1 == 0 {
        VmState::from_bytes(rest, "fuzz")
    } else {
        VmState::from_bytes(&framed(rest), "fuzz")
    };
    if let Ok(state) = parsed {
        let bytes = state.to_bytes();
        let again = VmState::from_bytes(&bytes, "round trip").expect("a saved state reads back");
        assert_eq!(again.to_bytes(), bytes, "a state changes on a round trip");
        assert_eq!(again.machine, state.machine);
    }
});
