//! The VM state as one tree of named, versioned sections, and its one codec.
//!
//! A VM is saved as sections: `vm` (machine shape, KVM VM state, CPU model, API secrets),
//! `vcpu/N`, `device/serial`, `device/pv`, `device/virtio/N` (by slot) and `service/<name>`
//! (an attached service's hand-over, opaque here: l1-services owns its payload). Each
//! component's state type implements [`Snapshottable`]: its section kind, the newest version
//! this build writes and reads, and its save/restore (JSON payload: the whole state is tens
//! of KiB, and JSON keeps it inspectable). The snapshot state file, the migration `state`
//! frame and the live-update takeover all carry [`VmState::to_bytes`].
//!
//! Encoding (docs/snapshot-format.md): magic `SPANVMTR`, codec version (u32 LE), section
//! count (u32), CRC-32 of the table (u32), the table (per section: id length u16, id, section
//! version u32, payload length u32, payload CRC-32 u32), then the payloads in table order.
//! Everything is checked before a payload is parsed: a truncated or corrupted state is refused
//! naming the section, and so is a section this build does not know or a section version
//! newer than it understands (never silently dropped: the guest would lose that state).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cpu::CpuModel;
use crate::devices::pv::PvState;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::VirtioDeviceState;
use crate::vcpu::VcpuState;
use crate::vm::VmKvmState;

/// Magic of an encoded state tree.
pub const STATE_MAGIC: &[u8; 8] = b"SPANVMTR";
/// Magic of the flat VM state an older spanvmm wrote (format 1): recognised only to say so.
const OLD_STATE_MAGIC: &[u8; 8] = b"SPANVMST";
/// Version of the tree codec (the framing; sections carry their own versions). The flat
/// format before it was 1.
pub const STATE_VERSION: u32 = 2;
/// Largest encoded state accepted (a real one is tens of KiB; services' states add a little).
const MAX_STATE: usize = 64 << 20;
/// Most sections accepted.
const MAX_SECTIONS: u32 = 4096;
/// Longest section id accepted.
const MAX_ID: usize = 256;
const HEADER_LEN: usize = 8 + 4 + 4 + 4;
/// File names inside a snapshot layer directory.
pub const STATE_FILE: &str = "state";
/// Memory image inside a snapshot layer directory.
pub const MEMORY_FILE: &str = "memory";

/// State errors: each names what was being read and, where one is at fault, the section.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The framing is wrong (truncated, corrupted, foreign, wrong codec version).
    #[error("{what}: invalid VM state: {why}")]
    Invalid {
        /// What was read (a file, "migration stream", ...).
        what: String,
        /// What is wrong.
        why: String,
    },
    /// One section is damaged or does not parse.
    #[error("{what}: section {id} is invalid: {why}")]
    Section {
        /// What was read.
        what: String,
        /// The section.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// A section this build does not know (written by a newer spanvmm).
    #[error(
        "{what}: section {id} is unknown to this spanvmm (written by a newer one?): refused, \
         its state would be lost"
    )]
    Unknown {
        /// What was read.
        what: String,
        /// The section.
        id: String,
    },
    /// A section version newer than this build understands.
    #[error("{what}: section {id} v{version} is newer than this spanvmm understands (v{known})")]
    Newer {
        /// What was read.
        what: String,
        /// The section.
        id: String,
        /// Its version.
        version: u32,
        /// The newest this build reads.
        known: u32,
    },
    /// A state the sections do not make whole (a missing section, a vCPU count that differs).
    #[error("{what}: inconsistent VM state: {why}")]
    Inconsistent {
        /// What was read.
        what: String,
        /// What is wrong.
        why: String,
    },
}

/// One section of the tree: an id, the version of its payload, the payload (JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// `vm`, `vcpu/0`, `device/serial`, `service/exit-stats`, ...
    pub id: String,
    /// Version of the payload's shape.
    pub version: u32,
    /// The payload.
    pub data: Vec<u8>,
}

/// A component's part of the VM state (the seam every saved component implements).
pub trait Snapshottable: Serialize + DeserializeOwned {
    /// Kind of section: its id, or the prefix of its ids (`vcpu` → `vcpu/N`).
    const KIND: &'static str;
    /// Newest version of the section this build writes and reads. Bump it on a change an
    /// older build cannot read; keep reading older versions (or refuse them clearly).
    const VERSION: u32;

    /// Saves into the section `id`.
    fn save(&self, id: String) -> Section {
        Section {
            id,
            version: Self::VERSION,
            data: serde_json::to_vec(self).expect("a component's state always serializes"),
        }
    }

    /// Restores from a section (its version was checked against [`Self::VERSION`] when the
    /// tree was decoded; checked again here for sections built by hand).
    fn restore(section: &Section, what: &str) -> Result<Self, StateError> {
        if section.version > Self::VERSION {
            return Err(StateError::Newer {
                what: what.into(),
                id: section.id.clone(),
                version: section.version,
                known: Self::VERSION,
            });
        }
        serde_json::from_slice(&section.data).map_err(|e| StateError::Section {
            what: what.into(),
            id: section.id.clone(),
            why: format!("does not parse: {e}"),
        })
    }
}

/// The section kinds this build reads, with their newest versions. `service` sections are
/// opaque here (the service manager reads them); it is the only open-ended kind.
fn known_version(id: &str) -> Option<u32> {
    let (kind, rest) = match id.split_once('/') {
        Some((k, r)) => (k, Some(r)),
        None => (id, None),
    };
    let numbered = |r: Option<&str>| r.is_some_and(|n| n.parse::<u32>().is_ok());
    match (kind, rest) {
        ("vm", None) => Some(VmSection::VERSION),
        ("vcpu", r) if numbered(r) => Some(VcpuState::VERSION),
        ("device", Some("serial")) => Some(SerialDeviceState::VERSION),
        ("device", Some("pv")) => Some(PvState::VERSION),
        ("device", Some(r)) => r
            .strip_prefix("virtio/")
            .filter(|n| n.parse::<u32>().is_ok())
            .map(|_| VirtioDeviceState::VERSION),
        ("service", Some(r)) if !r.is_empty() => Some(SERVICE_SECTION_VERSION),
        _ => None,
    }
}

/// Version of a `service/<name>` section's framing (its payload is the service manager's).
pub const SERVICE_SECTION_VERSION: u32 = 1;

/// Encodes sections (the one codec).
pub fn encode(sections: &[Section]) -> Vec<u8> {
    let mut table = Vec::new();
    for s in sections {
        table.extend_from_slice(&(s.id.len() as u16).to_le_bytes());
        table.extend_from_slice(s.id.as_bytes());
        table.extend_from_slice(&s.version.to_le_bytes());
        table.extend_from_slice(&(s.data.len() as u32).to_le_bytes());
        table.extend_from_slice(&crc32fast::hash(&s.data).to_le_bytes());
    }
    let body: usize = sections.iter().map(|s| s.data.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + table.len() + body);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&table).to_le_bytes());
    out.extend_from_slice(&table);
    for s in sections {
        out.extend_from_slice(&s.data);
    }
    out
}

/// Decodes and checks an encoded tree (`what` names it in errors): framing, checksums, and
/// that every section is one this build knows at a version it understands.
pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<Section>, StateError> {
    let invalid = |why: String| StateError::Invalid {
        what: what.into(),
        why,
    };
    if bytes.len() >= 12 && &bytes[..8] == OLD_STATE_MAGIC {
        let v = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
        return Err(invalid(format!(
            "a flat VM state (format {v}) written by an older spanvmm; this one reads only the \
             state tree (format {STATE_VERSION}): use the spanvmm that wrote it"
        )));
    }
    if bytes.len() < HEADER_LEN {
        return Err(invalid(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        )));
    }
    if bytes.len() > MAX_STATE {
        return Err(invalid(format!(
            "{} bytes, more than the {MAX_STATE} accepted",
            bytes.len()
        )));
    }
    if &bytes[..8] != STATE_MAGIC {
        return Err(invalid("not a spanvmm VM state (bad magic)".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let version = u32_at(8);
    if version != STATE_VERSION {
        let who = if version < STATE_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(invalid(format!(
            "state format {version}, written by {who} spanvmm; this one reads format \
             {STATE_VERSION}"
        )));
    }
    let count = u32_at(12);
    if count > MAX_SECTIONS {
        return Err(invalid(format!(
            "{count} sections, more than {MAX_SECTIONS}"
        )));
    }
    let table_crc = u32_at(16);
    // The table, then the payloads: the table's end is found by walking it.
    let mut at = HEADER_LEN;
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let short = || invalid(format!("truncated inside the section table (entry {i})"));
        let idlen = bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(short)?;
        if idlen == 0 || idlen > MAX_ID {
            return Err(invalid(format!("section {i} has an id of {idlen} bytes")));
        }
        let rest = bytes.get(at + 2..at + 2 + idlen + 12).ok_or_else(short)?;
        let id = std::str::from_utf8(&rest[..idlen])
            .map_err(|_| invalid(format!("section {i}'s id is not UTF-8")))?
            .to_string();
        let f = |o: usize| u32::from_le_bytes(rest[idlen + o..idlen + o + 4].try_into().unwrap());
        entries.push((id, f(0), f(4) as usize, f(8)));
        at += 2 + idlen + 12;
    }
    if crc32fast::hash(&bytes[HEADER_LEN..at]) != table_crc {
        return Err(invalid(
            "section table checksum mismatch: the state is corrupted".into(),
        ));
    }
    let mut sections: Vec<Section> = Vec::with_capacity(entries.len());
    for (id, version, len, crc) in entries {
        let section = |why: String| StateError::Section {
            what: what.into(),
            id: id.clone(),
            why,
        };
        let data = bytes.get(at..at.saturating_add(len)).ok_or_else(|| {
            section(format!(
                "truncated: {len} bytes announced, {} left",
                bytes.len() - at
            ))
        })?;
        if crc32fast::hash(data) != crc {
            return Err(section("checksum mismatch: corrupted".into()));
        }
        at += len;
        if sections.iter().any(|s| s.id == id) {
            return Err(section("appears twice".into()));
        }
        let Some(known) = known_version(&id) else {
            return Err(StateError::Unknown {
                what: what.into(),
                id,
            });
        };
        if version > known {
            return Err(StateError::Newer {
                what: what.into(),
                id,
                version,
                known,
            });
        }
        if version == 0 {
            return Err(section("version 0".into()));
        }
        sections.push(Section {
            id,
            version,
            data: data.to_vec(),
        });
    }
    if at != bytes.len() {
        return Err(invalid(format!(
            "{} bytes after the last section",
            bytes.len() - at
        )));
    }
    Ok(sections)
}

/// The payloads of numbered sections `kind/0..n`, in order (each index once).
fn in_order<T>(mut v: Vec<(usize, T)>, kind: &str) -> Result<Vec<T>, String> {
    v.sort_by_key(|(i, _)| *i);
    if v.iter().enumerate().any(|(n, (i, _))| n != *i) {
        return Err(format!("the {kind}/N sections are not numbered 0..n"));
    }
    Ok(v.into_iter().map(|(_, s)| s).collect())
}

/// What the VM was built from (kept for restore and for information).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// TSC frequency the guest was told, kHz.
    pub tsc_khz: u32,
    /// Kernel command line (informational).
    pub cmdline: String,
}

/// Device models' state.
#[derive(Clone)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// spanguest's paravirtual device.
    pub pv: PvState,
    /// Virtio devices, by slot.
    pub virtio: Vec<VirtioDeviceState>,
}

/// The `vm` section: the machine and what KVM holds VM-wide.
#[derive(Serialize, Deserialize)]
struct VmSection {
    machine: MachineConfig,
    kvm: VmKvmState,
    cpu: CpuModel,
    api_secrets: Vec<(u64, u64)>,
}

impl Snapshottable for VmSection {
    const KIND: &'static str = "vm";
    const VERSION: u32 = 1;
}

impl Snapshottable for VcpuState {
    const KIND: &'static str = "vcpu";
    const VERSION: u32 = 1;
}

impl Snapshottable for SerialDeviceState {
    const KIND: &'static str = "device/serial";
    const VERSION: u32 = 1;
}

impl Snapshottable for PvState {
    const KIND: &'static str = "device/pv";
    const VERSION: u32 = 1;
}

impl Snapshottable for VirtioDeviceState {
    const KIND: &'static str = "device/virtio";
    const VERSION: u32 = 1;
}

/// Everything about a VM except its memory: the decoded tree.
#[derive(Clone)]
pub struct VmState {
    /// Machine shape.
    pub machine: MachineConfig,
    /// vCPU register state, by index.
    pub vcpus: Vec<VcpuState>,
    /// irqchip, PIT, clock.
    pub vm: VmKvmState,
    /// Devices.
    pub devices: DeviceStates,
    /// Secret regions registered through the API, `(gpa, len)`, so that a restored, migrated or
    /// live-updated VM keeps leaving them out of snapshots (the guest's own registrations travel
    /// in the PV device's state).
    pub api_secrets: Vec<(u64, u64)>,
    /// The CPU the guest was given (CPUID and saved MSRs): a restore, a migration or a live
    /// update refuses a host that cannot offer it, and gives the vCPUs this CPUID again.
    pub cpu: CpuModel,
    /// `service/<name>` sections: attached services' hand-overs (payload owned by the service
    /// manager), in attach order.
    pub services: Vec<Section>,
}

impl VmState {
    /// The sections of the tree, in a fixed order.
    pub fn to_sections(&self) -> Vec<Section> {
        let mut out = Vec::with_capacity(4 + self.vcpus.len() + self.devices.virtio.len());
        let vm = VmSection {
            machine: self.machine.clone(),
            kvm: self.vm.clone(),
            cpu: self.cpu.clone(),
            api_secrets: self.api_secrets.clone(),
        };
        out.push(vm.save(VmSection::KIND.into()));
        for (i, v) in self.vcpus.iter().enumerate() {
            out.push(v.save(format!("{}/{i}", VcpuState::KIND)));
        }
        let d = &self.devices;
        out.push(d.serial.save(SerialDeviceState::KIND.into()));
        out.push(d.pv.save(PvState::KIND.into()));
        for (i, v) in d.virtio.iter().enumerate() {
            out.push(v.save(format!("{}/{i}", VirtioDeviceState::KIND)));
        }
        out.extend(self.services.iter().cloned());
        out
    }

    /// Builds the state from decoded sections (`what` names the source in errors).
    pub fn from_sections(sections: Vec<Section>, what: &str) -> Result<Self, StateError> {
        let inconsistent = |why: String| StateError::Inconsistent {
            what: what.into(),
            why,
        };
        let (mut vm, mut serial, mut pv) = (None, None, None);
        let (mut vcpus, mut virtio, mut services) = (Vec::new(), Vec::new(), Vec::new());
        for s in sections {
            let (kind, index) = match s.id.rsplit_once('/') {
                Some((k, n)) => (k, n.parse::<usize>().ok()),
                None => (s.id.as_str(), None),
            };
            match (kind, index) {
                ("vm", None) => vm = Some(VmSection::restore(&s, what)?),
                ("device", None) if s.id == SerialDeviceState::KIND => {
                    serial = Some(SerialDeviceState::restore(&s, what)?)
                }
                ("device", None) if s.id == PvState::KIND => pv = Some(PvState::restore(&s, what)?),
                ("vcpu", Some(i)) => vcpus.push((i, VcpuState::restore(&s, what)?)),
                ("device/virtio", Some(i)) => {
                    virtio.push((i, VirtioDeviceState::restore(&s, what)?))
                }
                _ if s.id.starts_with("service/") => services.push(s),
                _ => {
                    return Err(StateError::Unknown {
                        what: what.into(),
                        id: s.id,
                    })
                }
            }
        }
        let vm = vm.ok_or_else(|| inconsistent("no `vm` section".into()))?;
        let serial = serial.ok_or_else(|| inconsistent("no `device/serial` section".into()))?;
        let pv = pv.ok_or_else(|| inconsistent("no `device/pv` section".into()))?;
        // Numbered sections must be 0..n, each once (decode refused duplicates).
        let vcpus = in_order(vcpus, "vcpu").map_err(inconsistent)?;
        let virtio = in_order(virtio, "device/virtio").map_err(inconsistent)?;
        let state = VmState {
            machine: vm.machine,
            vcpus,
            vm: vm.kvm,
            devices: DeviceStates { serial, pv, virtio },
            api_secrets: vm.api_secrets,
            cpu: vm.cpu,
            services,
        };
        state.check().map_err(inconsistent)?;
        Ok(state)
    }

    /// Encodes the tree (the one codec).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(&self.to_sections())
    }

    /// Decodes and checks an encoded tree; `what` names it in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, StateError> {
        Self::from_sections(decode(bytes, what)?, what)
    }

    /// Consistency checks beyond parsing.
    fn check(&self) -> Result<(), String> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus != self.vcpus.len() {
            return Err(format!(
                "machine has {} vCPUs but {} vCPU states are saved",
                m.vcpus,
                self.vcpus.len()
            ));
        }
        if m.mem_bytes == 0 || !m.mem_bytes.is_multiple_of(2 << 20) || m.mem_bytes > 1 << 40 {
            return Err(format!("memory size {} is invalid", m.mem_bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VmState {
        let mut s = crate::snapshot::test_vm_state(2 << 20);
        s.services.push(Section {
            id: "service/counter".into(),
            version: SERVICE_SECTION_VERSION,
            data: b"{\"n\":3}".to_vec(),
        });
        s
    }

    #[test]
    fn a_state_round_trips_through_the_codec() {
        let s = state();
        let bytes = s.to_bytes();
        let back = VmState::from_bytes(&bytes, "t").unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.services, s.services);
        assert_eq!(back.machine, s.machine);
    }

    #[test]
    fn unknown_and_newer_sections_are_refused_by_name() {
        let mut sections = state().to_sections();
        sections.push(Section {
            id: "device/virtio-net".into(),
            version: 1,
            data: b"{}".to_vec(),
        });
        let e = VmState::from_bytes(&encode(&sections), "t").err().unwrap();
        assert!(
            e.to_string()
                .contains("section device/virtio-net is unknown"),
            "{e}"
        );
        let mut sections = state().to_sections();
        sections[1].version = 2;
        let e = VmState::from_bytes(&encode(&sections), "t").err().unwrap();
        assert!(
            e.to_string()
                .contains("section vcpu/0 v2 is newer than this spanvmm understands (v1)"),
            "{e}"
        );
    }

    #[test]
    fn every_kind_of_damage_is_refused() {
        let good = state().to_bytes();
        let err = |b: &[u8]| VmState::from_bytes(b, "t").err().unwrap().to_string();
        assert!(err(&good[..10]).contains("truncated"));
        assert!(err(&good[..good.len() - 1]).contains("section service/counter"));
        let mut m = good.clone();
        m[0] = b'X';
        assert!(err(&m).contains("bad magic"));
        let mut v = good.clone();
        v[8] = 9;
        assert!(err(&v).contains("written by a newer spanvmm"));
        let mut old = good.clone();
        old[..8].copy_from_slice(OLD_STATE_MAGIC);
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(&old).contains("written by an older spanvmm"));
        let mut t = good.clone();
        t[HEADER_LEN + 3] ^= 1;
        assert!(err(&t).contains("table checksum"));
        let mut c = good.clone();
        *c.last_mut().unwrap() ^= 1;
        let e = err(&c);
        assert!(
            e.contains("service/counter") && e.contains("checksum"),
            "{e}"
        );
        let mut pad = good.clone();
        pad.push(0);
        assert!(err(&pad).contains("after the last section"));
        // A whole tree whose sections do not make a VM.
        let mut s = state().to_sections();
        s.retain(|s| s.id != "vcpu/0");
        assert!(err(&encode(&s)).contains("vCPU"));
    }
}
