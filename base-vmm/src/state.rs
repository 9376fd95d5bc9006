//! The saved VM: a versioned, checksummed state file beside a sparse memory image.
//!
//! State file layout: magic `SPANVMST`, format version (u32 LE), reserved (u32), payload length
//! (u64 LE), CRC-32 of the payload (u32 LE), then the payload (JSON of [`VmState`]). Every field
//! is checked before the payload is parsed, so a truncated, corrupted or foreign file is refused
//! with a message that says which.

use serde::{Deserialize, Serialize};

use crate::cpu::CpuModel;
use crate::devices::pv::PvState;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::VirtioDeviceState;
use crate::vcpu::VcpuState;
use crate::vm::VmKvmState;

/// File magic.
pub const STATE_MAGIC: &[u8; 8] = b"SPANVMST";
/// Current format version. Bump on any incompatible change of [`VmState`].
pub const STATE_VERSION: u32 = 1;
/// Largest payload accepted (a real one is tens of KiB).
const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// File names inside a saved-VM directory.
pub const STATE_FILE: &str = "state";
/// Memory image inside a saved-VM directory.
pub const MEMORY_FILE: &str = "memory";

/// State errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file is not a valid state file.
    #[error("state file {path} is invalid: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Device models' state.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// spanguest's paravirtual device.
    pub pv: PvState,
    /// Virtio devices, by slot (none in files written before they existed).
    #[serde(default)]
    pub virtio: Vec<VirtioDeviceState>,
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

/// Everything about a VM except its memory.
#[derive(Clone, Serialize, Deserialize)]
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
    /// in the PV device's state). Absent in files written before it existed.
    #[serde(default)]
    pub api_secrets: Vec<(u64, u64)>,
    /// The CPU the guest was given (CPUID and saved MSRs): a restore, a migration or a live
    /// update refuses a host that cannot offer it, and gives the vCPUs this CPUID again.
    /// Absent in files written before it existed (restored with the host's CPUID, unchecked).
    #[serde(default)]
    pub cpu: Option<CpuModel>,
}

impl VmState {
    /// Serializes into the state-file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = serde_json::to_vec(self).expect("VmState always serializes");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses and checks a state file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, StateError> {
        let invalid = |why: String| StateError::Invalid {
            path: path.to_string(),
            why,
        };
        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!(
                "truncated: {} bytes, the header alone is {HEADER_LEN}",
                bytes.len()
            )));
        }
        if &bytes[0..8] != STATE_MAGIC {
            return Err(invalid("not a spanvmm state file (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != STATE_VERSION {
            return Err(invalid(format!(
                "format version {version}, this spanvmm reads version {STATE_VERSION}"
            )));
        }
        let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let crc = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
        let payload = &bytes[HEADER_LEN..];
        if len > MAX_PAYLOAD || payload.len() as u64 != len {
            return Err(invalid(format!(
                "truncated or padded: header says {len} payload bytes, file has {}",
                payload.len()
            )));
        }
        if crc32fast::hash(payload) != crc {
            return Err(invalid("checksum mismatch: the file is corrupted".into()));
        }
        let state: VmState = serde_json::from_slice(payload)
            .map_err(|e| invalid(format!("payload does not parse: {e}")))?;
        state.check().map_err(invalid)?;
        Ok(state)
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
        if m.mem_bytes == 0 || !m.mem_bytes.is_multiple_of(2 << 20) {
            return Err(format!("memory size {} is invalid", m.mem_bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_without_a_cpu_model_still_reads() {
        // Written before the CPU model was recorded: no "cpu" key at all.
        let state = crate::snapshot::test_vm_state(2 << 20);
        let mut v = serde_json::to_value(&state).unwrap();
        assert!(v.as_object_mut().unwrap().remove("cpu").is_some());
        let old: VmState = serde_json::from_value(v).unwrap();
        assert!(old.cpu.is_none());
        // And the framed file of the same format version reads too.
        let back = VmState::from_bytes(&old.to_bytes(), "t").unwrap();
        assert!(back.cpu.is_none());
    }

    #[test]
    fn header_checks_catch_every_kind_of_damage() {
        let p = "t";
        let err = |b: &[u8]| VmState::from_bytes(b, p).err().unwrap().to_string();
        assert!(err(b"SPAN").contains("truncated"));
        let mut good = Vec::new();
        good.extend_from_slice(STATE_MAGIC);
        good.extend_from_slice(&STATE_VERSION.to_le_bytes());
        good.extend_from_slice(&0u32.to_le_bytes());
        let payload = b"{}";
        good.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        good.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        good.extend_from_slice(payload);
        // A well-framed payload that is not a VmState.
        assert!(err(&good).contains("does not parse"));
        let mut v = good.clone();
        v[8] = 9;
        assert!(err(&v).contains("format version 9"));
        let mut m = good.clone();
        m[0] = b'X';
        assert!(err(&m).contains("bad magic"));
        let mut c = good.clone();
        *c.last_mut().unwrap() ^= 1;
        assert!(err(&c).contains("checksum"));
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("truncated or padded"));
    }
}
