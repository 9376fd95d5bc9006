//! The snapshot store, format version 3 (docs/snapshot-format.md): a snapshot is a chain of
//! *layers*, each a directory holding a `state` file and a sparse `memory` file. A full layer
//! holds every non-zero page; an incremental layer holds only the pages dirtied since its
//! parent, which it names by id and by the SHA-256 of the parent's state file.
//!
//! Every page written is covered by a 128-bit check in the state file's index: in a plain layer
//! one check per aligned 64 KiB group of pages (XXH3-128 of the pages' XXH3-128s), in an
//! encrypted layer each page's Poly1305 tag from XChaCha20-Poly1305 (the state payload is
//! encrypted the same way). A chain is opened and checked as a whole
//! (versions, checksums, parent links, key, expiry, file sizes) before anything is restored,
//! and every page is checked as it is loaded, before the guest can see it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::state::{VmState, MEMORY_FILE, STATE_FILE};

/// Magic of a layer's state file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"SPANVMST";

/// State-file format version of layered snapshots (version 1 was a single full image; version
/// 2 checked plain pages one by one; version 3 held the VM state as one JSON object).
pub const SNAPSHOT_VERSION: u32 = 4;
/// Header: magic, version, flags, payload length, CRC-32, key id, salt.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 8 + 12;
/// Flag: payload and pages are encrypted.
const FLAG_ENCRYPTED: u32 = 1;
/// Largest state payload accepted (a 4 GiB guest's index is ~16 MiB).
const MAX_PAYLOAD: u64 = 256 << 20;
/// Longest chain accepted.
pub const MAX_CHAIN: usize = 64;
/// Pages copied, checked and written per batch (8 MiB).
const BATCH_PAGES: u64 = 2048;
/// Bytes of an index run header: start page, count, kind, round.
const RUN_HEADER: usize = 8 + 4 + 1 + 4;
/// Pages of an aligned group that one check covers in a plain layer (64 KiB): a 16th of the
/// index a check per page needs, which a restore reads and checksums before the guest runs
/// (a 4 GiB guest's took 2-3 ms); a page is then loaded with its group's other pages.
pub const GROUP_PAGES: u64 = 16;

/// Snapshot errors: each says which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O on a snapshot file failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// A file is not a valid snapshot file (truncated, corrupted, foreign, wrong version).
    #[error("{path} is invalid: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The key is missing, wrong, or the file was tampered with.
    #[error("{path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The layers do not form a chain.
    #[error("broken snapshot chain: {0}")]
    Chain(String),
    /// The snapshot's expiry has passed.
    #[error("snapshot {dir} expired {ago} s ago (at unix time {at}); it can only be shredded (`spanvmm snapshot shred {dir}`)")]
    Expired {
        /// The layer.
        dir: String,
        /// Expiry, unix seconds.
        at: u64,
        /// Seconds since.
        ago: u64,
    },
    /// The request does not fit (bad options, wrong guest size).
    #[error("{0}")]
    Usage(String),
    /// Pages of a memory file fail their checksum (the file is corrupted).
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// Which pages.
        why: String,
    },
    /// A loader thread panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// The VM state inside a state file is refused (the message names the section).
    #[error(transparent)]
    State(Box<crate::state::StateError>),
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.display().to_string(),
        err,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if r > 0 {
            got += r as usize;
        }
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The parent of an incremental layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent layer's directory (absolute).
    pub dir: PathBuf,
    /// The parent layer's id.
    pub id: String,
    /// SHA-256 of the parent's state file.
    pub state_sha256: String,
}

/// What a layer is (the JSON part of the state payload).
#[derive(Serialize, Deserialize)]
pub struct LayerManifest {
    /// Random id of this layer.
    pub id: String,
    /// Parent layer (incremental), or none (full).
    pub parent: Option<ParentRef>,
    /// Creation time, unix seconds.
    pub created_unix: u64,
    /// Restore is refused after this time (unix seconds).
    pub expires_unix: Option<u64>,
    /// Guest regions excluded from the snapshot, page-aligned `(gpa, len)`; zero on restore.
    pub secrets: Vec<(u64, u64)>,
    /// Write rounds (1 for a stop-the-world layer).
    pub rounds: u32,
    /// Bytes of page data written (the last copy of each page).
    pub data_bytes: u64,
}

/// What one page of a layer is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PageEntry {
    /// Not in this layer (the parent's copy stands; zero for a full layer).
    Absent,
    /// Zero in this layer (not written).
    Zero,
    /// Written in `round`, with its check.
    Data { round: u32, check: [u8; 16] },
}

/// How a layer is written.
#[derive(Default, Clone)]
pub struct LayerOptions {
    /// Parent layer directory (incremental layer), or none (full layer).
    pub parent: Option<PathBuf>,
    /// Encrypt with this key.
    pub key: Option<SnapshotKey>,
    /// Seconds until restore is refused.
    pub expires_in_s: Option<u64>,
    /// Guest regions `(gpa, len)` never written; rounded out to whole pages.
    pub secrets: Vec<(u64, u64)>,
}

mod chain;
mod crypto;
mod format;
mod merge;
mod writer;

pub use chain::{Chain, Layer, RestoreBuffers};
pub use crypto::SnapshotKey;
pub use format::{parse_state, ParsedState};
pub use merge::{merge, remove_layer, rewrite_state_sections, rewrite_vm_state, shred};
pub use writer::{LayerSummary, LayerWriter};

use crypto::*;
use format::*;
use writer::*;

/// A VM state for tests that need a layer without a real VM.
#[cfg(test)]
pub(crate) fn test_vm_state(mem_bytes: u64) -> VmState {
    use crate::state::{DeviceStates, MachineConfig};
    VmState {
        machine: MachineConfig {
            mem_bytes,
            vcpus: 1,
            tsc_khz: 1_000_000,
            cmdline: String::new(),
        },
        vcpus: vec![crate::vcpu::VcpuState {
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: None,
            msrs: vec![],
            events: Default::default(),
        }],
        vm: crate::vm::VmKvmState {
            irqchip: None,
            pit: None,
            clock: Default::default(),
        },
        devices: DeviceStates {
            serial: Default::default(),
            pv: Default::default(),
            virtio: Vec::new(),
        },
        api_secrets: Vec::new(),
        cpu: crate::cpu::CpuModel {
            template: crate::cpu::CpuTemplate::Host,
            cpuid: Vec::new(),
            msrs: Vec::new(),
        },
        services: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("spanvmm-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn fill(ram: &GuestRam, page: u64, v: u8) {
        ram.write(page * PAGE_SIZE, &[v; 4096]).unwrap();
    }

    fn full_layer(ram: &Arc<GuestRam>, dir: &Path, opts: LayerOptions) -> LayerSummary {
        let mut w = LayerWriter::create(dir, ram.clone(), opts).unwrap();
        w.write_pages(None).unwrap();
        w.finish(test_vm_state(ram.size())).unwrap()
    }

    fn same(a: &GuestRam, b: &GuestRam) -> bool {
        let mut x = vec![0u8; a.size() as usize];
        let mut y = vec![0u8; b.size() as usize];
        a.read(0, &mut x).unwrap();
        b.read(0, &mut y).unwrap();
        x == y
    }

    #[test]
    fn chain_restores_from_any_layer_and_merges() {
        let root = tmp("chain");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 3, 1);
        fill(&ram, 700, 2);
        let base = full_layer(&ram, &root.join("l0"), LayerOptions::default());
        assert_eq!(base.data_pages, 2);
        let before = GuestRam::new(4 << 20).unwrap();
        Chain::open(&root.join("l0"), None)
            .unwrap()
            .load_into(&before)
            .unwrap();
        assert!(same(&ram, &before));

        // Layer 1: page 700 rewritten, page 3 zeroed, page 5 new.
        fill(&ram, 700, 9);
        fill(&ram, 3, 0);
        fill(&ram, 5, 4);
        let mut dirty = vec![0u64; 16];
        for p in [3u64, 5, 700] {
            dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut w = LayerWriter::create(
            &root.join("l1"),
            ram.clone(),
            LayerOptions {
                parent: Some(root.join("l0")),
                ..Default::default()
            },
        )
        .unwrap();
        w.write_pages(Some(&dirty)).unwrap();
        let s1 = w.finish(test_vm_state(ram.size())).unwrap();
        assert_eq!((s1.data_pages, s1.zero_pages), (2, 1));
        assert_eq!(
            s1.bytes_written,
            2 * PAGE_SIZE,
            "only dirtied pages are written"
        );

        let top = GuestRam::new(4 << 20).unwrap();
        let chain = Chain::open(&root.join("l1"), None).unwrap();
        assert_eq!(chain.layers.len(), 2);
        chain.load_into(&top).unwrap();
        assert!(same(&ram, &top));
        // The base still restores to its own time.
        let mid = GuestRam::new(4 << 20).unwrap();
        Chain::open(&root.join("l0"), None)
            .unwrap()
            .load_into(&mid)
            .unwrap();
        assert!(same(&before, &mid));

        let m = merge(&root.join("l1"), None, &root.join("merged"), None).unwrap();
        assert_eq!(m.data_pages, 2);
        let merged = GuestRam::new(4 << 20).unwrap();
        let c = Chain::open(&root.join("merged"), None).unwrap();
        assert_eq!(c.layers.len(), 1);
        c.load_into(&merged).unwrap();
        assert!(same(&ram, &merged));

        // A replaced parent breaks the chain.
        full_layer(&ram, &root.join("l0"), LayerOptions::default());
        let e = Chain::open(&root.join("l1"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("broken snapshot chain"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rewritten_vm_state_is_sealed_again_and_the_pages_still_load() {
        use crate::cpu::{CpuModel, CpuTemplate, CpuidEntry};
        let root = tmp("rewrite");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 3, 1);
        fill(&ram, 700, 2);
        let key = SnapshotKey::from_bytes(&[5u8; 32]).unwrap();
        for (name, k) in [("plain", None), ("enc", Some(&key))] {
            let dir = root.join(name);
            full_layer(
                &ram,
                &dir,
                LayerOptions {
                    key: k.cloned(),
                    ..Default::default()
                },
            );
            let model = CpuModel {
                template: CpuTemplate::X86_64V2,
                cpuid: vec![CpuidEntry {
                    function: 7,
                    index: 0,
                    flags: 1,
                    eax: 0,
                    ebx: 1 << 16,
                    ecx: 0,
                    edx: 0,
                }],
                msrs: vec![0x10],
            };
            let id = Chain::open(&dir, k).unwrap().top().manifest.id.clone();
            rewrite_vm_state(&dir, k, |vm| vm.cpu = model.clone()).unwrap();
            let chain = Chain::open(&dir, k).unwrap();
            assert_eq!(chain.vm_state().cpu, model, "{name}");
            assert_eq!(chain.top().manifest.id, id, "{name}");
            let back = GuestRam::new(4 << 20).unwrap();
            chain.load_into(&back).unwrap();
            assert!(same(&ram, &back), "{name}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn encryption_secrets_and_damage() {
        let root = tmp("crypt");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        fill(&ram, 10, 0x5a);
        fill(&ram, 11, 0xa5);
        let key = SnapshotKey::from_bytes(&[1u8; 32]).unwrap();
        let other = SnapshotKey::from_bytes(&[2u8; 32]).unwrap();
        let dir = root.join("e");
        full_layer(
            &ram,
            &dir,
            LayerOptions {
                key: Some(key.clone()),
                secrets: vec![(11 * PAGE_SIZE + 8, 16)],
                ..Default::default()
            },
        );
        let mem = std::fs::read(dir.join(MEMORY_FILE)).unwrap();
        assert!(
            !mem.windows(64).any(|w| w == [0x5a; 64]),
            "plaintext in the file"
        );
        assert!(
            !mem.windows(64).any(|w| w == [0xa5; 64]),
            "secret in the file"
        );
        let err = |k: Option<&SnapshotKey>| Chain::open(&dir, k).err().unwrap().to_string();
        assert!(err(None).contains("encrypted"));
        assert!(err(Some(&other)).contains("wrong key"));
        let back = GuestRam::new(4 << 20).unwrap();
        Chain::open(&dir, Some(&key))
            .unwrap()
            .load_into(&back)
            .unwrap();
        let mut b = [0u8; 4096];
        back.read(10 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0x5a; 4096]);
        back.read(11 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 4096], "a secret page is zero after restore");

        // A flipped byte in the memory file is caught before the guest sees it.
        let mut m = mem.clone();
        m[10 * 4096 + 7] ^= 1;
        std::fs::write(dir.join(MEMORY_FILE), &m).unwrap();
        let fresh = GuestRam::new(4 << 20).unwrap();
        let e = Chain::open(&dir, Some(&key))
            .unwrap()
            .load_into(&fresh)
            .unwrap_err();
        assert!(matches!(e, SnapshotError::Key { .. }), "{e}");
        assert!(e.to_string().contains("tampered"), "{e}");
        std::fs::write(dir.join(MEMORY_FILE), &mem).unwrap();

        // A state file with its CRC fixed up after tampering fails authentication.
        let st = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let mut t = st.clone();
        let n = t.len();
        t[n - 20] ^= 1;
        let crc = crc32fast::hash(&t[HEADER_LEN..]);
        t[24..28].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.join(STATE_FILE), &t).unwrap();
        assert!(err(Some(&key)).contains("tampered"));
        // Truncated and wrong version.
        std::fs::write(dir.join(STATE_FILE), &st[..st.len() - 1]).unwrap();
        assert!(err(Some(&key)).contains("truncated"));
        let mut v = st.clone();
        v[8] = 1;
        std::fs::write(dir.join(STATE_FILE), &v).unwrap();
        assert!(err(Some(&key)).contains("format version 1"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn expired_snapshots_are_refused_and_shred_removes_them() {
        let root = tmp("exp");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        let dir = root.join("x");
        full_layer(
            &ram,
            &dir,
            LayerOptions {
                expires_in_s: Some(0),
                ..Default::default()
            },
        );
        let e = Chain::open(&dir, None).err().unwrap().to_string();
        assert!(e.contains("expired"), "{e}");
        let state_len = std::fs::metadata(dir.join(STATE_FILE)).unwrap().len();
        assert!(shred(&dir).unwrap() >= PAGE_SIZE + state_len);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Retention removes a layer's own files only, and refuses a directory holding no layer.
    #[test]
    fn remove_layer_deletes_a_layer_and_nothing_else() {
        let root = tmp("remove");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let other = root.join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("keep"), b"x").unwrap();
        let e = remove_layer(&other).err().unwrap().to_string();
        assert!(e.contains("no snapshot here"), "{e}");
        assert!(other.join("keep").exists());
        remove_layer(&dir).unwrap();
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A chain opened into buffers prepared ahead (a standby VMM's) is the same chain.
    #[test]
    fn chains_open_the_same_into_prepared_buffers() {
        let root = tmp("bufs");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in [0, 5, 700] {
            fill(&ram, p, p as u8 + 1);
        }
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let plain = Chain::open(&dir, None).unwrap();
        let prepared = Chain::open_with(&dir, None, Some(RestoreBuffers::new(ram.size()))).unwrap();
        assert_eq!(plain.data_extents(), prepared.data_extents());
        let back = GuestRam::new(4 << 20).unwrap();
        prepared.load_into(&back).unwrap();
        assert!(same(&ram, &back));
        // Buffers for another guest size are not used, and nothing breaks.
        let other = Chain::open_with(&dir, None, Some(RestoreBuffers::new(2 << 20))).unwrap();
        assert_eq!(other.data_pages(), plain.data_pages());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A single layer finds its pages through its runs (no per-page tables) and gives the same
    /// pages as through tables; a damaged state file is still refused up front, and an
    /// incremental layer is opened with the tables.
    #[test]
    fn a_single_layer_is_read_through_its_runs() {
        let root = tmp("runs");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in [0, 5, 6, 700, 1023] {
            fill(&ram, p, (p % 200) as u8 + 1);
        }
        let dir = root.join("x");
        full_layer(&ram, &dir, LayerOptions::default());
        let tables = Chain::open_chain(&dir, None, None, false).unwrap();
        let runs = Chain::open_with(&dir, None, Some(RestoreBuffers::new(ram.size()))).unwrap();
        assert!(tables.tables.is_some() && runs.tables.is_none());
        assert_eq!(tables.data_extents(), runs.data_extents());
        assert_eq!(runs.data_pages(), 5);
        let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
        tables.read_pages(0, 1024, &mut a, true).unwrap();
        runs.read_pages(0, 1024, &mut b, true).unwrap();
        assert!(a == b);
        // Any piece, across run boundaries.
        let mut piece = vec![0u8; 10 * 4096];
        runs.read_pages(2, 10, &mut piece, true).unwrap();
        assert!(piece[..] == a[2 * 4096..12 * 4096]);

        let state = dir.join(STATE_FILE);
        let good = std::fs::read(&state).unwrap();
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x40;
        std::fs::write(&state, &bad).unwrap();
        let e = Chain::open(&dir, None).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        std::fs::write(&state, &good).unwrap();

        fill(&ram, 9, 77);
        let child = root.join("y");
        let mut w = LayerWriter::create(
            &child,
            ram.clone(),
            LayerOptions {
                parent: Some(dir.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let mut dirty = vec![0u64; 16];
        dirty[0] = 1 << 9;
        w.write_pages(Some(&dirty)).unwrap();
        w.finish(test_vm_state(4 << 20)).unwrap();
        let chain = Chain::open(&child, None).unwrap();
        assert!(chain.tables.is_some() && chain.layers.len() == 2);
        let mut page = vec![0u8; 4096];
        chain.read_pages(9, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 77);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The parser meets random, truncated and bit-flipped input with an error, never a panic.
    #[test]
    fn plain_layers_check_aligned_groups() {
        let root = tmp("groups");
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        for p in (0..40).chain([100]) {
            fill(&ram, p, (p % 200) as u8 + 1);
        }
        let dir = root.join("x");
        let mut w = LayerWriter::create(&dir, ram.clone(), LayerOptions::default()).unwrap();
        w.write_pages(None).unwrap();
        // A second round rewrites page 5: a plain layer's runs do not split on rounds.
        fill(&ram, 5, 99);
        let mut dirty = vec![0u64; 16];
        dirty[0] = 1 << 5;
        w.write_pages(Some(&dirty)).unwrap();
        w.finish(test_vm_state(4 << 20)).unwrap();
        let chain = Chain::open(&dir, None).unwrap();
        let runs: Vec<(u64, u64)> = chain.layers[0]
            .runs
            .iter()
            .map(|r| (r.start, r.count))
            .collect();
        assert_eq!(runs, [(0, 40), (100, 1)]);
        // Checks: 3 groups for pages 0-39, 1 for page 100 (the parser refuses any other size).
        let state = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let jlen = u32::from_le_bytes(state[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap());
        let at = HEADER_LEN + 4 + jlen as usize;
        let tlen = u32::from_le_bytes(state[at..at + 4].try_into().unwrap());
        assert_eq!(
            state.len(),
            at + 4 + tlen as usize + 2 * RUN_HEADER + 4 * 16
        );
        let mut page = vec![0u8; 4096];
        chain.read_pages(5, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 99);

        // A flipped byte in page 5 fails every read of its group, and only of its group.
        let mem = dir.join(MEMORY_FILE);
        let mut m = std::fs::read(&mem).unwrap();
        m[5 * 4096 + 9] ^= 1;
        std::fs::write(&mem, &m).unwrap();
        let e = chain
            .read_pages(3, 1, &mut page, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pages 0x0-0xf fail their checksum"), "{e}");
        chain.read_pages(16, 1, &mut page, true).unwrap();
        chain.read_pages(100, 1, &mut page, true).unwrap();
        assert_eq!(page[0], 101);
        let e = chain
            .load_into(&GuestRam::new(4 << 20).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupted"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn parser_survives_garbage() {
        let root = tmp("fuzz");
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        fill(&ram, 1, 3);
        fill(&ram, 9, 4);
        full_layer(&ram, &root, LayerOptions::default());
        let good = std::fs::read(root.join(STATE_FILE)).unwrap();
        let path = Path::new("x");
        assert!(parse_state(&good, path, None).is_ok());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut b = good.clone();
            match i % 3 {
                0 => b.truncate((rnd() % good.len() as u64) as usize),
                1 => {
                    for _ in 0..1 + rnd() % 4 {
                        let at = (rnd() % b.len() as u64) as usize;
                        b[at] ^= 1 << (rnd() % 8);
                    }
                }
                _ => {
                    b = (0..rnd() % 512).map(|_| rnd() as u8).collect();
                    if i % 2 == 0 && b.len() > 12 {
                        b[..8].copy_from_slice(SNAPSHOT_MAGIC);
                        b[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
                    }
                }
            }
            if b != good {
                // Flips inside the payload are caught by the CRC; the parser must not panic
                // on any of it, and a frame it accepts must still describe this machine.
                if let Ok(p) = parse_state(&b, path, None) {
                    assert_eq!(p.vm.machine.mem_bytes, 2 << 20);
                }
            }
        }
        // Garbage behind a valid frame (CRC fixed up) reaches the payload parser.
        for _ in 0..2000 {
            let mut payload: Vec<u8> = (0..rnd() % 300).map(|_| rnd() as u8).collect();
            if payload.len() >= 4 && rnd() % 2 == 0 {
                let n = (rnd() % 64) as u32;
                payload[..4].copy_from_slice(&n.to_le_bytes());
            }
            let framed = seal(&payload, None, &[0; 12]).unwrap();
            assert!(parse_state(&framed, path, None).is_err());
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn secrets_are_rounded_out_and_merged() {
        let s = normalize_secrets(&[(5000, 10), (4096, 100), (3 << 12, 1), (0, 0)], 1 << 20);
        assert_eq!(s, vec![(4096, 4096), (3 << 12, 4096)]);
    }

    #[test]
    fn key_files_are_raw_or_hex() {
        assert!(SnapshotKey::from_bytes(&[7u8; 32]).is_ok());
        let hexkey = format!("{}\n", "ab".repeat(32));
        let a = SnapshotKey::from_bytes(hexkey.as_bytes()).unwrap();
        let b = SnapshotKey::from_bytes(&[0xab; 32]).unwrap();
        assert_eq!(a.id, b.id);
        assert!(SnapshotKey::from_bytes(b"short").is_err());
    }
}
