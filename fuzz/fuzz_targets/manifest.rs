//! Services' manifests as the host reads them (`l1_services::manifest`): a native plugin's
//! `describe` JSON (`parse_native`) and the checks every manifest, native or Wasm, passes
//! before anything is granted (`validate`), plus the allow-list digests of `--plugin-sha256`
//! (`trust::parse_sha256`). The first byte chooses: even, the rest is JSON from a plugin;
//! odd, the rest builds a manifest field by field (as a Wasm component's WIT record arrives)
//! and the guest memory size it is checked against. A manifest that passes is sound.
#![no_main]

use std::path::Path;

use l1_services::manifest::{parse_native, valid_name, validate};
use l1_services::{Capability, EventKind, Manifest, MmioRange, PortRange};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const EVENTS: [EventKind; 6] = [
    EventKind::PortWrite,
    EventKind::PortRead,
    EventKind::Lifecycle,
    EventKind::Tick,
    EventKind::MmioWrite,
    EventKind::MmioRead,
];
const CAPS: [Capability; 7] = [
    Capability::MemoryRead,
    Capability::MemoryWrite,
    Capability::VcpuState,
    Capability::PauseResume,
    Capability::DirtyLog,
    Capability::DrivesMigration,
    Capability::Snapshot,
];

fn built(u: &mut Unstructured) -> Result<(Manifest, u64)> {
    let ram = u.arbitrary::<u64>()?;
    let mut m = Manifest::new(u.arbitrary::<&str>()?, u.arbitrary::<&str>()?);
    if u.ratio(1, 8)? {
        m.abi_version = u.arbitrary()?;
    }
    for _ in 0..u.int_in_range(0..=4)? {
        m.events.push(*u.choose(&EVENTS)?);
    }
    for _ in 0..u.int_in_range(0..=4)? {
        m.ports.push(PortRange::new(u.arbitrary()?, u.arbitrary()?));
    }
    for _ in 0..u.int_in_range(0..=4)? {
        m.mmio.push(MmioRange::new(u.arbitrary()?, u.arbitrary()?));
    }
    for _ in 0..u.int_in_range(0..=3)? {
        m.capabilities.push(*u.choose(&CAPS)?);
    }
    m.tick_period_ms = u.arbitrary()?;
    Ok((m, ram))
}

fn check(m: &Manifest, ram: u64) {
    if validate(m, ram, Path::new("fuzz.so")).is_ok() {
        assert_eq!(m.abi_version, l1_services::ABI_VERSION);
        assert!(valid_name(&m.name));
        assert!(m.ports.iter().all(|r| r.len > 0 && r.end() <= 0x10000));
        assert!(m.mmio.iter().all(|r| r.base >= ram && r.end().is_some()));
        assert!(!m.events.contains(&EventKind::Tick) || m.tick_period_ms > 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(m) = parse_native(rest) {
            check(&m, 256 << 20);
            // What the host parsed, it can write back and read again unchanged.
            let json = serde_json::to_vec(&m).expect("a manifest serializes");
            assert_eq!(parse_native(&json).expect("reads back"), m);
        }
        if let Ok(s) = std::str::from_utf8(rest) {
            if let Ok(d) = l1_services::trust::parse_sha256(s) {
                assert_eq!(s.trim().len(), 64);
                assert!(d.iter().zip(s.trim().as_bytes().chunks(2)).all(|(b, h)| {
                    u8::from_str_radix(std::str::from_utf8(h).unwrap_or(""), 16) == Ok(*b)
                }));
            }
        }
    } else if let Ok((m, ram)) = built(&mut Unstructured::new(rest)) {
        check(&m, ram);
    }
});
