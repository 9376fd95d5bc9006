//! The VM-state codec (`base_vmm::state`, the tree a snapshot, a migration and a live update
//! carry): arbitrary bytes must be refused or parsed, never panic. The first byte chooses how
//! the rest is used: even, as a whole encoded tree (header, table, CRC-32s); odd, as section
//! payloads (split at 0xff bytes) under the known section ids, framed by the codec so that the
//! JSON and the consistency checks are reached. A state that parses must survive a round trip
//! unchanged.
#![no_main]

use base_vmm::state::{encode, Section, VmState};
use libfuzzer_sys::fuzz_target;

const IDS: [&str; 7] = [
    "vm",
    "vcpu/0",
    "device/serial",
    "device/pv",
    "device/virtio/0",
    "service/x",
    "vcpu/1",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = if mode & 1 == 0 {
        VmState::from_bytes(rest, "fuzz")
    } else {
        let sections: Vec<Section> = rest
            .split(|&b| b == 0xff)
            .zip(IDS)
            .map(|(data, id)| Section {
                id: id.into(),
                version: 1,
                data: data.to_vec(),
            })
            .collect();
        VmState::from_bytes(&encode(&sections), "fuzz")
    };
    if let Ok(state) = parsed {
        let bytes = state.to_bytes();
        let again = VmState::from_bytes(&bytes, "round trip").expect("a saved state reads back");
        assert_eq!(again.to_bytes(), bytes, "a state changes on a round trip");
        assert_eq!(again.machine, state.machine);
    }
});
