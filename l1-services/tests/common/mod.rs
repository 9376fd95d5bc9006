//! Test helpers: the built plugins, a real memfd guest RAM host, a fresh manager.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use base_vmm::memory::GuestRam;
use l1_services::{ManagerConfig, RamHost, ServiceManager};

/// The directory holding the built plugins. Builds them once per test binary with
/// `plugins/build.sh` (its own cargo target dir, so no lock fight with this cargo), unless
/// `SPANVMM_PLUGINS_DIR` names prebuilt ones.
pub fn plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Copies left by earlier runs whose process is gone (test binaries of other checkouts
        // may be running at the same time: their copies stay).
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix("spanvmm-l1-native-") else {
                    continue;
                };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if let Some(d) = std::env::var_os("SPANVMM_PLUGINS_DIR") {
            return PathBuf::from(d);
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = Command::new("bash")
            .arg(repo.join("plugins/build.sh"))
            .status()
            .expect("run plugins/build.sh");
        assert!(status.success(), "plugins/build.sh failed");
        repo.join("target/plugins")
    })
}

/// `<name>.wasm`.
pub fn wasm(name: &str) -> PathBuf {
    plugins().join(format!("{name}.wasm"))
}

/// `lib<name>.so`, as the built file itself (loadable once per process at a time).
pub fn native_shared(name: &str) -> PathBuf {
    plugins().join(format!("lib{name}.so"))
}

/// A private copy of `lib<name>.so`: a native object serves once per process, and tests run
/// in parallel in one process, so each gets its own file (its own dlopen instance).
pub fn native(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("spanvmm-l1-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!(
        "{}-lib{name}.so",
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::copy(native_shared(name), &copy).unwrap();
    copy
}

/// Both builds of a plugin.
pub fn both(name: &str) -> [PathBuf; 2] {
    [wasm(name), native(name)]
}

/// A shared compiled-artifact cache for the tests (compiling in a debug build is slow).
pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("spanvmm-l1-test-cache-{}", unsafe_uid()))
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// Guest RAM of `mib` MiB on a memfd and a host over it.
pub fn ram_host(mib: u64) -> (Arc<GuestRam>, Arc<RamHost>) {
    let ram = Arc::new(GuestRam::new(mib << 20).unwrap());
    let host = Arc::new(RamHost::new(ram.clone(), 2, 2_000_000));
    (ram, host)
}

/// A manager over 16 MiB of guest RAM.
pub fn manager() -> (Arc<GuestRam>, ServiceManager) {
    manager_with(ManagerConfig::default())
}

/// A manager with explicit settings.
pub fn manager_with(cfg: ManagerConfig) -> (Arc<GuestRam>, ServiceManager) {
    let (ram, host) = ram_host(16);
    (ram, ServiceManager::with_config(host, cache_dir(), cfg))
}

/// Parses a JSON call result.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}
