//! Service files are checked before anything of them is loaded or read (issues #19, #20):
//! native code only from files and directories nobody but root and the VMM's user can write,
//! nothing but regular files (a FIFO must not block), nothing larger than the cap, the
//! operator's directory, native and hash policy, and a replace that checks its new file while
//! the old service keeps running.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use l1_services::trust::{check_trusted_file, TrustProblem};
use l1_services::{ManagerConfig, PluginPolicy, ReplaceOptions, ServiceError, ServiceManager};

const STATS: &str = r#"{"base":1792,"len":4}"#;

/// A fresh scratch directory (mode 0755) under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "spanvmm-l1-trust-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        chmod(&p, 0o755);
        Scratch(p)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn problem(err: &ServiceError) -> Option<TrustProblem> {
    match err {
        ServiceError::File(e) => Some(e.problem),
        ServiceError::Replace { cause, .. } => problem(cause),
        _ => None,
    }
}

/// Builds a shared object whose constructor writes `marker`: not a service (no symbols), so
/// a load that gets as far as dlopen fails on the handshake, but only after the constructor
/// ran.
fn marker_object(dir: &Path, name: &str, marker: &Path) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(
        &src,
        r#"#include <stdio.h>
__attribute__((constructor)) static void spanvmm_test_mark(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"#,
    )
    .unwrap();
    let so = dir.join(format!("{name}.so"));
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(format!("-DMARKER=\"{}\"", marker.display()))
        .arg(&src)
        .output()
        .expect("run cc (a C compiler is needed to build the test object)");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&src).unwrap();
    chmod(&so, 0o755);
    so
}

#[test]
fn untrusted_native_objects_are_refused_before_their_constructor_runs() {
    let (_ram, m) = manager();
    let marks = Scratch::new("marks");
    // Each case: a directory set up as given, the object in it, the problem expected.
    type Case = (
        &'static str,
        u32,
        u32,
        Option<u32>,
        TrustProblem,
        &'static str,
    );
    let cases: [Case; 4] = [
        // (tag, dir mode, file mode, file owner, problem, words in the message)
        (
            "world-writable-dir",
            0o777,
            0o755,
            None,
            TrustProblem::Directory,
            "writable by",
        ),
        (
            "sticky-dir",
            0o1777,
            0o755,
            None,
            TrustProblem::Directory,
            "sticky",
        ),
        (
            "other-owner",
            0o755,
            0o755,
            Some(65534),
            TrustProblem::Owner,
            "uid 65534",
        ),
        (
            "group-writable",
            0o755,
            0o775,
            None,
            TrustProblem::Writable,
            "chmod go-w",
        ),
    ];
    let mut dirs = Vec::new();
    for (tag, dir_mode, file_mode, owner, expected, words) in cases {
        let dir = Scratch::new(tag);
        let marker = marks.join(&format!("{tag}.ran"));
        let so = marker_object(&dir.0, &format!("lib{tag}"), &marker);
        chmod(&so, file_mode);
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&so, Some(uid), Some(uid)).unwrap();
        }
        chmod(&dir.0, dir_mode);
        let err = m.attach(&so, "").unwrap_err();
        let msg = err.to_string();
        assert_eq!(problem(&err), Some(expected), "{tag}: {msg}");
        assert!(
            msg.contains(so.to_str().unwrap()) && msg.contains(words),
            "{tag}: the message must name the file and say what is wrong: {msg}"
        );
        assert!(
            !marker.exists(),
            "{tag}: the object's constructor ran although the object was refused"
        );
        // The public check says the same.
        let err = check_trusted_file(&so, "native plugin").unwrap_err();
        assert_eq!(err.problem, expected, "{tag}: {err}");
        // A symlink from a trusted directory does not launder it.
        let link = marks.join(&format!("lib{tag}-link.so"));
        std::os::unix::fs::symlink(&so, &link).unwrap();
        let err = m.attach(&link, "").unwrap_err();
        assert_eq!(problem(&err), Some(expected), "{tag} via a symlink: {err}");
        assert!(!marker.exists(), "{tag}: constructor ran via a symlink");
        dirs.push(dir);
    }
    // Control: the same kind of object from a trusted directory is loaded (its constructor
    // runs) and refused only for not being a service, so the marker above would have shown.
    let dir = Scratch::new("trusted");
    let marker = marks.join("trusted.ran");
    let so = marker_object(&dir.0, "libtrusted", &marker);
    let err = m.attach(&so, "").unwrap_err();
    assert!(
        err.to_string()
            .contains("missing symbol spanvmm_service_abi_version"),
        "{err}"
    );
    assert!(marker.exists(), "the control object's constructor must run");
    let checked = check_trusted_file(&so, "native plugin").unwrap();
    assert_eq!(checked.path(), std::fs::canonicalize(&so).unwrap());
    assert!(m.list().is_empty());
}

#[test]
fn fifos_devices_and_directories_are_refused_without_blocking() {
    let (_ram, m) = manager();
    let m = std::sync::Arc::new(m);
    let dir = Scratch::new("special");
    let fifo = dir.join("fifo.wasm");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let fifo_so = dir.join("libfifo.so");
    let c = std::ffi::CString::new(fifo_so.to_str().unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let zero = dir.join("zero.wasm");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let subdir = dir.join("dir.wasm");
    std::fs::create_dir(&subdir).unwrap();
    for (path, kind) in [
        (fifo, "a FIFO"),
        (fifo_so, "a FIFO"),
        (zero, "a character device"),
        (subdir, "a directory"),
    ] {
        // Nobody opens the FIFO's other end: a blocking open or read would never return.
        let (tx, rx) = mpsc::channel();
        let (m2, p2) = (m.clone(), path.clone());
        std::thread::spawn(move || {
            let _ = tx.send(m2.attach(&p2, "").map(|_| ()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("attaching {} blocked", path.display()));
        let err = r.unwrap_err();
        assert_eq!(problem(&err), Some(TrustProblem::NotRegular), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(path.to_str().unwrap()) && msg.contains(kind),
            "{msg}"
        );
    }
    // The manager is not stuck: a real service attaches.
    m.attach(&wasm("exit-stats"), STATS).unwrap();
}

#[test]
fn oversized_service_files_are_refused_before_reading() {
    let (_ram, m) = manager();
    let dir = Scratch::new("big");
    for name in ["big.wasm", "libbig.so"] {
        let p = dir.join(name);
        // 2 GiB, sparse: reading it whole would take 2 GiB of memory.
        std::fs::File::create(&p).unwrap().set_len(2 << 30).unwrap();
        let err = m.attach(&p, "").unwrap_err();
        assert_eq!(problem(&err), Some(TrustProblem::TooLarge), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(p.to_str().unwrap())
                && msg.contains("2147483648 bytes")
                && msg.contains("64 MiB"),
            "{msg}"
        );
    }
    // Just under the cap is read (and refused for what it is, not for its size).
    let p = dir.join("edge.wasm");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(l1_services::MAX_SERVICE_FILE_BYTES)
        .unwrap();
    let err = m.attach(&p, "").unwrap_err();
    assert!(
        err.to_string()
            .contains("not a valid WebAssembly component"),
        "{err}"
    );
}

fn manager_with_policy(
    policy: PluginPolicy,
) -> (std::sync::Arc<base_vmm::memory::GuestRam>, ServiceManager) {
    manager_with(ManagerConfig {
        policy,
        ..Default::default()
    })
}

#[test]
fn plugin_directories_confine_service_files() {
    let allowed = Scratch::new("allowed");
    let outside = Scratch::new("outside");
    for f in ["exit-stats.wasm", "template.wasm"] {
        std::fs::copy(plugins().join(f), allowed.join(f)).unwrap();
        std::fs::copy(plugins().join(f), outside.join(f)).unwrap();
    }
    std::fs::copy(
        native_shared("exit-stats"),
        allowed.join("libexit-stats.so"),
    )
    .unwrap();
    // Given through a symlink and `..`: stored canonical.
    let via = allowed.0.join("..").join(allowed.0.file_name().unwrap());
    let policy = PluginPolicy::new(&[via], false, &[]).unwrap();
    assert_eq!(policy.dirs, [std::fs::canonicalize(&allowed.0).unwrap()]);
    let (_ram, m) = manager_with_policy(policy);
    m.attach(&allowed.join("exit-stats.wasm"), STATS).unwrap();
    m.detach("exit-stats").unwrap();
    m.attach(&allowed.join("libexit-stats.so"), STATS).unwrap();
    m.detach("exit-stats").unwrap();
    let outside_file = outside.join("exit-stats.wasm");
    let link = allowed.join("escape.wasm");
    std::os::unix::fs::symlink(&outside_file, &link).unwrap();
    let dotdot = allowed
        .0
        .join("..")
        .join(outside.0.file_name().unwrap())
        .join("exit-stats.wasm");
    for p in [&outside_file, &link, &dotdot] {
        let err = m.attach(p, STATS).unwrap_err();
        assert_eq!(
            problem(&err),
            Some(TrustProblem::OutsideAllowedDirs),
            "{}: {err}",
            p.display()
        );
        let msg = err.to_string();
        assert!(
            msg.contains(p.to_str().unwrap()) && msg.contains("--plugin-dir"),
            "{msg}"
        );
    }
    // Inside the directory, Wasm gets the owner and mode checks too.
    let gw = allowed.join("template.wasm");
    chmod(&gw, 0o664);
    let err = m.attach(&gw, "").unwrap_err();
    assert_eq!(problem(&err), Some(TrustProblem::Writable), "{err}");
    // Replace is confined as well, and the old service stays.
    m.attach(&allowed.join("exit-stats.wasm"), STATS).unwrap();
    let err = m.replace("exit-stats", &outside_file).unwrap_err();
    assert_eq!(
        problem(&err),
        Some(TrustProblem::OutsideAllowedDirs),
        "{err}"
    );
    assert_eq!(m.list().len(), 1);
    // Outside a plugin directory a Wasm component is sandboxed: no owner or mode checks.
    let (_ram, free) = manager();
    let gw2 = outside.join("template.wasm");
    chmod(&gw2, 0o666);
    free.attach(&gw2, "").unwrap();
}

#[test]
fn no_native_plugins_refuses_every_shared_object() {
    let policy = PluginPolicy::new(&[], true, &[]).unwrap();
    let (_ram, m) = manager_with_policy(policy);
    let so = native("exit-stats");
    let err = m.attach(&so, STATS).unwrap_err();
    assert_eq!(problem(&err), Some(TrustProblem::NativeDisabled), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(so.to_str().unwrap()) && msg.contains("--no-native-plugins"),
        "{msg}"
    );
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    let err = m.replace("exit-stats", &so).unwrap_err();
    assert_eq!(problem(&err), Some(TrustProblem::NativeDisabled), "{err}");
    assert_eq!(m.list().len(), 1);
}

#[test]
fn a_sha256_allow_list_admits_only_listed_files() {
    use sha2::Digest;
    let bytes = std::fs::read(wasm("exit-stats")).unwrap();
    let hex: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(PluginPolicy::new(&[], false, &["abc".into()]).is_err());
    let policy = PluginPolicy::new(&[], false, &[hex.to_uppercase()]).unwrap();
    let (_ram, m) = manager_with_policy(policy);
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    for p in [wasm("template"), native("template")] {
        let err = m.attach(&p, "").unwrap_err();
        assert_eq!(problem(&err), Some(TrustProblem::NotAllowListed), "{err}");
        assert!(err.to_string().contains("--plugin-sha256"), "{err}");
    }
}

#[test]
fn a_failing_replace_leaves_the_old_service_attached_and_untouched() {
    let (_ram, m) = manager();
    let dir = Scratch::new("replace");
    m.attach(&wasm("exit-stats"), STATS).unwrap();
    assert!(m.on_port_write(0x700, &[1]));
    let before = m.list()[0].clone();
    let untrusted = {
        let d = Scratch::new("replace-ww");
        let so = d.join("libexit-stats.so");
        std::fs::copy(native_shared("exit-stats"), &so).unwrap();
        chmod(&d.0, 0o777);
        (d, so)
    };
    let bad: [(PathBuf, &str); 5] = [
        (dir.join("absent.wasm"), "no such file"),
        (wasm("template"), "holds service hello, not exit-stats"),
        (wasm("abi-mismatch"), "ABI version 999"),
        (untrusted.1.clone(), "writable by"),
        (dir.join("x.txt"), "unknown plugin kind"),
    ];
    for (p, words) in &bad {
        let err = m.replace("exit-stats", p).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(words) && msg.contains("stays attached, untouched"),
            "{}: {msg}",
            p.display()
        );
        let now = m.list();
        assert_eq!(now.len(), 1, "{now:?}");
        // The very instance that was attached: same attach time, same counters going on.
        assert_eq!(now[0].name, "exit-stats");
        assert_eq!(now[0].attached_at_ms, before.attached_at_ms);
        assert_eq!(now[0].attach_us, before.attach_us);
        assert_eq!(now[0].kind, before.kind);
    }
    assert!(m.on_port_write(0x700, &[1]));
    assert_eq!(
        json(&m.call("exit-stats", "stats", "").unwrap())["writes"],
        2,
        "the old instance counted every write"
    );
    // Another service by name, when allowed: it takes the place, config and state.
    let info = m
        .replace_with(
            "exit-stats",
            &wasm("template"),
            ReplaceOptions { rename: true },
        )
        .unwrap();
    assert_eq!(info.name, "hello");
    let names: Vec<_> = m.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["hello"]);
}

#[test]
fn the_running_binary_passes_the_trusted_file_check() {
    // What the live update's `--binary` check sees for a binary installed by its owner.
    let exe = std::env::current_exe().unwrap();
    let f = check_trusted_file(&exe, "live-update binary").unwrap();
    assert!(!f.is_empty());
    let err =
        check_trusted_file(Path::new("/nonexistent/spanvmm"), "live-update binary").unwrap_err();
    assert_eq!(err.problem, TrustProblem::Missing);
    assert!(
        err.to_string()
            .starts_with("live-update binary /nonexistent/spanvmm: no such file"),
        "{err}"
    );
}
