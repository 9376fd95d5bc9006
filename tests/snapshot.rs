//! Snapshots end to end on real VMs: full, incremental chains, live, lazy, merge, encryption,
//! secrets, expiry and damaged files, all through the checkpoint service and `spanvmm ctl`.
//! Every restored guest verifies its memory (bad=0) and reports the stall it saw.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{num, plugin, spanvmm, TempDir, VmProcess};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
/// What spanguest's secret area holds (docs/spanguest-abi.md, `secret=1`).
const SECRET: &[u8] = b"SPANGUEST-SECRET";

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Takes a snapshot; returns the checkpoint service's final status and the largest stall the
/// guest saw around it (from its next `stat` line after a stall reset).
fn snapshot(vm: &VmProcess, args: &[&str]) -> (Value, u64) {
    snapshot_with(vm, &plugin("checkpoint.wasm"), args)
}

/// [`snapshot`] with the checkpoint service from `cp` (Wasm or native).
fn snapshot_with(vm: &VmProcess, cp: &str, args: &[&str]) -> (Value, u64) {
    vm.ctl_ok(&["guest", "reset-stall"]);
    let mut a = vec!["snapshot", "create", "--plugin", cp];
    a.extend_from_slice(args);
    let st = json(&vm.ctl_ok(&a));
    assert_eq!(st["phase"], "done", "{st}");
    let from = vm.mark();
    let stat = vm.wait_line_from(from, "SPANGUEST stat", T);
    (st, num(&stat, "max_stall_us"))
}

/// Bytes the file really occupies on disk (a sparse file's holes do not count).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let data = std::fs::read(e.path()).unwrap();
        data.windows(needle.len()).any(|w| w == needle)
    })
}

fn restore(tag: &str, dir: &Path, extra: &[&str]) -> VmProcess {
    let intro = plugin("introspect.wasm");
    let mut a = vec!["--restore", s(dir), "--plugin", &intro];
    a.extend_from_slice(extra);
    let vm = VmProcess::start(tag, &a);
    // The restored guest reports the gap since the snapshot as a stall, then runs on.
    let gap = num(&vm.wait_line("SPANGUEST stall", T), "us");
    eprintln!("{tag}: restored guest reports a {gap} µs gap");
    vm
}

fn secret_bytes(vm: &VmProcess, gpa: u64) -> String {
    let out = json(&vm.ctl_ok(&[
        "introspect",
        "read",
        &format!(r#"{{"gpa":{gpa},"len":64}}"#),
    ]));
    out["result"]["hex"].as_str().unwrap().to_string()
}

fn run_fails(args: &[&str]) -> String {
    let (code, err) = common::run_to_end(args);
    assert!(
        code.is_some_and(|c| c != 0),
        "spanvmm {args:?} should have failed with an error, ended {code:?}: {err}"
    );
    err
}

#[test]
fn chain_live_lazy_merge_and_secrets() {
    let vm = VmProcess::boot(
        "chain",
        "workload=dirty,verify mib=32 wss=4 rate=20000 report_ms=100 stall_us=1000 secret=1",
        256,
        1,
    );
    let secret = vm.wait_line("SPANGUEST secret", T);
    let gpa =
        u64::from_str_radix(common::fields(&secret)["gpa"].trim_start_matches("0x"), 16).unwrap();
    // And one region registered through the API: a page of never-used RAM.
    vm.ctl_ok(&[
        "snapshot",
        "secret",
        "add",
        "--gpa",
        "0x8000000",
        "--len",
        "4096",
    ]);
    let root = TempDir::new("chain");
    let (l0, l1, l2) = (root.0.join("l0"), root.0.join("l1"), root.0.join("l2"));

    // Stop the world, full.
    let (full, full_stall) = snapshot(&vm, &["--dir", s(&l0), "--track"]);
    // Live incremental layers while the guest keeps dirtying its working set.
    std::thread::sleep(Duration::from_millis(300));
    let (live1, live_stall) = snapshot(
        &vm,
        &[
            "--dir",
            s(&l1),
            "--incremental-of",
            s(&l0),
            "--live",
            "--track",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (live2, _) = snapshot(
        &vm,
        &["--dir", s(&l2), "--incremental-of", s(&l1), "--live"],
    );
    eprintln!(
        "full stop-the-world: pause {:.1} ms, guest stall {full_stall} µs; live: pause {:.1} ms \
         in {} rounds, guest stall {live_stall} µs",
        full["pause_ms"].as_f64().unwrap(),
        live1["pause_ms"].as_f64().unwrap(),
        live1["rounds"]
    );
    assert!(live1["rounds"].as_u64().unwrap() >= 2, "{live1}");
    assert!(
        live_stall < full_stall,
        "live stall {live_stall} µs vs stop-the-world {full_stall} µs"
    );
    // The service attached for the snapshots is gone after the last one (no --track).
    assert!(!vm.ctl_ok(&["plugin", "list"]).contains("checkpoint"));
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);

    // Incremental layers hold only what the guest dirtied: its 4 MiB working set, its
    // generation counters and its stack, far from the 32 MiB the full layer holds.
    let full_bytes = allocated(&l0.join("memory"));
    assert!(full_bytes >= 32 << 20, "full layer {full_bytes} bytes");
    for l in [&l1, &l2] {
        let b = allocated(&l.join("memory"));
        assert!(
            b <= 6 << 20,
            "{}: {b} bytes for a 4 MiB working set",
            l.display()
        );
    }
    assert!(live2["bytes_written"].as_u64().unwrap() > 0);
    // Secrets are in none of the files.
    for l in [&l0, &l1, &l2] {
        assert!(
            !files_contain(l, SECRET),
            "secret pattern found in {}",
            l.display()
        );
    }

    // Restore from the middle of the chain (eager), then from its top (lazy).
    let mid = restore("mid", &l1, &[]);
    mid.assert_verify_clean(1);
    assert_eq!(secret_bytes(&mid, gpa), "00".repeat(64), "secret not zero");
    drop(mid);
    let top = restore("top", &l2, &["--lazy"]);
    top.assert_verify_clean(1);
    assert_eq!(secret_bytes(&top, gpa), "00".repeat(64));
    drop(top);

    // Merge the chain into one full snapshot and restore that.
    let merged = root.0.join("merged");
    let out = std::process::Command::new(spanvmm())
        .args(["snapshot", "merge", s(&l2), "--out", s(&merged)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = std::process::Command::new(spanvmm())
        .args(["snapshot", "info", s(&merged)])
        .output()
        .unwrap();
    let info = json(&String::from_utf8_lossy(&info.stdout));
    assert_eq!(info["layers"].as_array().unwrap().len(), 1, "{info}");
    assert!(!files_contain(&merged, SECRET));
    let m = restore("merged", &merged, &[]);
    m.assert_verify_clean(1);
}

/// The checkpoint service built as a native shared object drives the same engine through the
/// C ABI: a full layer, then a live incremental one on top, restored lazily with memory intact.
#[test]
fn live_layers_through_the_dirty_ring_restore_clean() {
    // KVM's dirty ring instead of its bitmap (`auto` picks it only for large guests).
    let kernel = common::guest_elf();
    let vm = VmProcess::start(
        "ring",
        &[
            "--kernel",
            s(&kernel),
            "--cmdline",
            "workload=dirty,verify mib=32 wss=8 rate=20000 report_ms=100 stall_us=1000",
            "--memory",
            "128",
            "--dirty-log",
            "ring",
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    let status = json(&vm.ctl_ok(&["status"]));
    assert_eq!(status["dirty_log"]["mode"], "ring", "{status}");
    let root = TempDir::new("ring");
    let (l0, l1) = (root.0.join("l0"), root.0.join("l1"));
    snapshot(&vm, &["--dir", s(&l0), "--track"]);
    std::thread::sleep(Duration::from_millis(300));
    let (live, _) = snapshot(
        &vm,
        &["--dir", s(&l1), "--incremental-of", s(&l0), "--live"],
    );
    // Rounds while the guest ran, each harvesting the ring: the layer holds the pages dirtied
    // since l0 (the 8 MiB working set, its generation counters, its stack), not all 32 MiB.
    assert!(live["rounds"].as_u64().unwrap() >= 2, "{live}");
    assert!(live["bytes_written"].as_u64().unwrap() > 0, "{live}");
    let b = allocated(&l1.join("memory"));
    assert!(b <= 12 << 20, "{b} bytes for an 8 MiB working set");
    drop(vm);
    let back = restore("ring-back", &l1, &["--lazy"]);
    back.assert_verify_clean(1);
}

#[test]
fn a_native_checkpoint_service_takes_restorable_snapshots() {
    let vm = VmProcess::boot(
        "native-cp",
        "workload=dirty,verify mib=16 wss=4 rate=20000 report_ms=100 stall_us=1000",
        128,
        1,
    );
    let root = TempDir::new("native-cp");
    let (l0, l1) = (root.0.join("l0"), root.0.join("l1"));
    let cp = plugin("libcheckpoint.so");
    let (full, full_stall) = snapshot_with(&vm, &cp, &["--dir", s(&l0), "--track"]);
    let list = vm.ctl_ok(&["plugin", "list"]);
    assert!(
        list.contains("checkpoint") && list.contains("native"),
        "{list}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let (live, live_stall) = snapshot_with(
        &vm,
        &cp,
        &["--dir", s(&l1), "--incremental-of", s(&l0), "--live"],
    );
    eprintln!(
        "native checkpoint: full pause {:.1} ms (guest stall {full_stall} µs), live pause {:.1} ms \
         in {} rounds (guest stall {live_stall} µs)",
        full["pause_ms"].as_f64().unwrap(),
        live["pause_ms"].as_f64().unwrap(),
        live["rounds"]
    );
    assert!(live["rounds"].as_u64().unwrap() >= 1, "{live}");
    assert_eq!(live["layer_id"].as_str().unwrap().len(), 32, "{live}");
    assert!(allocated(&l1.join("memory")) <= 6 << 20);
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);
    let top = restore("native-cp-top", &l1, &["--lazy"]);
    top.assert_verify_clean(1);
}

#[test]
fn encrypted_expired_and_damaged_snapshots_are_refused() {
    let vm = VmProcess::boot(
        "crypt",
        "workload=dirty,verify mib=16 rate=5000 report_ms=100 stall_us=1000",
        128,
        1,
    );
    let root = TempDir::new("crypt");
    let (key, other) = (root.0.join("key"), root.0.join("other"));
    std::fs::write(&key, "11".repeat(32)).unwrap();
    std::fs::write(&other, [7u8; 32]).unwrap();
    let enc = root.0.join("enc");
    snapshot(&vm, &["--dir", s(&enc), "--key", s(&key), "--live"]);
    let short = root.0.join("short");
    snapshot(&vm, &["--dir", s(&short), "--expires-in", "1"]);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);

    let restore_err = |dir: &Path, extra: &[&str]| {
        let mut a = vec!["run", "--restore", s(dir), "--serial", "none"];
        a.extend_from_slice(extra);
        run_fails(&a)
    };
    assert!(restore_err(&enc, &[]).contains("encrypted: give its key"));
    assert!(restore_err(&enc, &["--key", s(&other)]).contains("wrong key"));

    // A copy with one flipped byte of page data: refused before the guest runs.
    let bad = copy_dir(&enc, &root.0.join("tampered"));
    flip_data_byte(&bad.join("memory"));
    let e = restore_err(&bad, &["--key", s(&key)]);
    assert!(e.contains("tampered"), "{e}");
    // Truncated and wrong-version state files.
    let st = std::fs::read(enc.join("state")).unwrap();
    let t = copy_dir(&enc, &root.0.join("trunc"));
    std::fs::write(t.join("state"), &st[..st.len() / 2]).unwrap();
    assert!(restore_err(&t, &["--key", s(&key)]).contains("truncated"));
    let mut v = st.clone();
    v[8] = 9;
    std::fs::write(t.join("state"), &v).unwrap();
    assert!(restore_err(&t, &["--key", s(&key)]).contains("format version 9"));
    // A broken chain: see a_chain_with_a_broken_middle_layer_is_refused_naming_the_layer.

    // The right key restores, and the guest's memory is intact.
    let ok = restore("enc", &enc, &["--key", s(&key)]);
    ok.assert_verify_clean(1);
    drop(ok);

    // Expired: refused, then shredded.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(restore_err(&short, &[]).contains("expired"));
    let out = std::process::Command::new(spanvmm())
        .args(["snapshot", "shred", s(&short)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!short.exists());
}

/// A chain whose middle layer is damaged, gone or replaced is refused, eagerly and lazily,
/// with an error naming that layer, before any guest code runs; the intact chain restores.
#[test]
fn a_chain_with_a_broken_middle_layer_is_refused_naming_the_layer() {
    let vm = VmProcess::boot(
        "broken",
        "workload=dirty,verify mib=16 wss=4 rate=20000 report_ms=100 stall_us=1000",
        128,
        1,
    );
    let root = TempDir::new("broken");
    let (l0, l1, l2) = (root.0.join("l0"), root.0.join("l1"), root.0.join("l2"));
    snapshot(&vm, &["--dir", s(&l0), "--track"]);
    snapshot(
        &vm,
        &["--dir", s(&l1), "--incremental-of", s(&l0), "--track"],
    );
    snapshot(&vm, &["--dir", s(&l2), "--incremental-of", s(&l1)]);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);

    // Restores the top layer; must fail naming l1, and the guest must never have run.
    let refused = |what: &str, needle: &str| {
        for lazy in [false, true] {
            let mut a = vec!["run", "--restore", s(&l2), "--serial", "stdout"];
            if lazy {
                a.push("--lazy");
            }
            let out = std::process::Command::new(spanvmm())
                .args(&a)
                .output()
                .unwrap();
            let (stdout, err) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(
                !out.status.success(),
                "{what} (lazy {lazy}): restored\n{err}"
            );
            assert!(
                err.contains(s(&l1)) && err.contains(needle),
                "{what} (lazy {lazy}): the error does not name {} with {needle:?}: {err}",
                l1.display()
            );
            assert!(
                !stdout.contains("SPANGUEST"),
                "{what} (lazy {lazy}): the guest ran: {stdout}"
            );
            eprintln!("{what} (lazy {lazy}): {}", err.trim());
        }
    };
    let state = l1.join("state");
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    std::fs::write(&state, &flipped).unwrap();
    refused("corrupted state", "checksum");
    std::fs::write(&state, &good[..good.len() - 100]).unwrap();
    refused("truncated state", "truncated");
    // Another valid layer in its place (l0's files): the link check catches it.
    std::fs::write(&state, std::fs::read(l0.join("state")).unwrap()).unwrap();
    refused("replaced layer", "not the parent");
    let held = root.0.join("held");
    std::fs::write(&state, &good).unwrap();
    std::fs::rename(&l1, &held).unwrap();
    refused("deleted layer", "parent");

    // Put back, the chain restores with its memory intact.
    std::fs::rename(&held, &l1).unwrap();
    let top = restore("broken-fixed", &l2, &["--lazy"]);
    top.assert_verify_clean(1);
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

/// Flips one byte inside the first data extent of a sparse file.
fn flip_data_byte(p: &Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    // SAFETY: lseek on a valid descriptor.
    let off = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert!(off >= 0, "no data in {}", p.display());
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off as u64 + 100).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off as u64 + 100).unwrap();
}

#[test]
fn eviction_after_periodic_layers_writes_only_recent_pages() {
    let vm = VmProcess::boot(
        "evict",
        "workload=dirty,verify mib=48 wss=4 rate=20000 report_ms=100 stall_us=1000",
        256,
        1,
    );
    let root = TempDir::new("evict");
    let bg = root.0.join("bg");
    let cp = plugin("checkpoint.wasm");
    vm.ctl_ok(&["snapshot", "periodic", "--dir", s(&bg), "--plugin", &cp]);
    std::thread::sleep(Duration::from_millis(1500));
    let ev = root.0.join("evicted");
    let out = json(&vm.ctl_ok(&["snapshot", "evict", "--dir", s(&ev)]));
    eprintln!(
        "eviction after periodic layers: {:.1} ms, {} bytes",
        out["evict_ms"].as_f64().unwrap(),
        out["bytes_written"]
    );
    let mut vm = vm;
    assert_eq!(vm.wait_exit(T), Some(0), "the VM stops after an eviction");
    // Only what the guest dirtied since the last periodic layer: a fraction of its 48 MiB.
    assert!(allocated(&ev.join("memory")) <= 8 << 20);
    assert!(bg.join("layer-0000").join("state").exists());
    let back = restore("evicted", &ev, &[]);
    back.assert_verify_clean(1);
}

/// Periodic layers with `--keep 2`: the chain is merged in the background whenever it grows
/// past two layers, superseded layers are removed, so the directory stays bounded while
/// layers keep coming; the eviction on top of the merged chain restores with memory intact.
#[test]
fn periodic_layers_stay_bounded_by_background_merges() {
    const KEEP: usize = 2;
    let vm = VmProcess::boot(
        "keep",
        "workload=dirty,verify mib=48 wss=4 rate=20000 report_ms=100 stall_us=1000",
        256,
        1,
    );
    let root = TempDir::new("keep");
    let bg = root.0.join("bg");
    let cp = plugin("checkpoint.wasm");
    vm.ctl_ok(&[
        "snapshot",
        "periodic",
        "--dir",
        s(&bg),
        "--plugin",
        &cp,
        "--keep",
        "2",
        "--target-pages",
        "64",
    ]);
    vm.ctl_ok(&["guest", "reset-stall"]);
    let (mut most, mut merges, mut layers) = (0, 0, 0);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(3) || merges < 3 {
        assert!(t.elapsed() < T, "fewer than 3 merges in {T:?}");
        // The chain (at most KEEP + 1 layers) and a merged layer being written.
        let on_disk = std::fs::read_dir(&bg).unwrap().count();
        most = most.max(on_disk);
        assert!(on_disk <= KEEP + 2, "{on_disk} layers in {}", bg.display());
        let st = json(&vm.ctl_ok(&["snapshot", "status"]));
        merges = st["periodic"]["merges"].as_u64().unwrap();
        layers = st["periodic"]["layers"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let stat = vm.wait_line_from(vm.mark(), "SPANGUEST stat", T);
    eprintln!(
        "keep {KEEP}: {layers} layers, {merges} merges, at most {most} directories; guest stall \
         {} µs",
        num(&stat, "max_stall_us")
    );
    assert!(layers as usize > 3 * KEEP, "only {layers} layers");
    let ev = root.0.join("evicted");
    vm.ctl_ok(&["snapshot", "evict", "--dir", s(&ev)]);
    let mut vm = vm;
    assert_eq!(vm.wait_exit(T), Some(0), "the VM stops after an eviction");
    let info = std::process::Command::new(spanvmm())
        .args(["snapshot", "info", s(&ev)])
        .output()
        .unwrap();
    let info = json(&String::from_utf8_lossy(&info.stdout));
    let chain = info["layers"].as_array().unwrap().len();
    assert!(
        chain <= KEEP + 2,
        "the evicted chain has {chain} layers: {info}"
    );
    let back = restore("keep-evicted", &ev, &[]);
    back.assert_verify_clean(1);
}

/// `run --standby` prepares a VM ahead; `ctl snapshot load` restores into it. A snapshot that
/// fails its checks, or does not fit, is refused and leaves the standby VMM ready for the next.
#[test]
fn a_standby_vmm_adopts_a_snapshot_and_survives_refused_ones() {
    let vm = VmProcess::boot(
        "standby-src",
        "workload=dirty,verify mib=32 wss=4 rate=20000 report_ms=100 stall_us=1000",
        256,
        1,
    );
    let root = TempDir::new("standby");
    let good = root.0.join("good");
    vm.ctl_ok(&["save", "--dir", s(&good)]);
    vm.ctl_ok(&["shutdown"]);
    // A copy whose state file is damaged.
    let bad = root.0.join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(good.join(f), bad.join(f)).unwrap();
    }
    let mut state = std::fs::read(bad.join("state")).unwrap();
    let mid = state.len() / 2;
    state[mid] ^= 0x55;
    std::fs::write(bad.join("state"), state).unwrap();

    let standby = VmProcess::start("standby", &["--standby", "--memory", "256"]);
    let t = std::time::Instant::now();
    let status = loop {
        match standby.ctl(&["status"]) {
            (true, out) => break json(&out),
            _ if t.elapsed() < T => std::thread::sleep(Duration::from_millis(20)),
            (false, e) => panic!("standby VMM never answered: {e}\n{}", standby.stderr()),
        }
    };
    assert_eq!(status["state"], "standby", "{status}");
    // Nothing but status, shutdown and load before a VM exists.
    let (ok, out) = standby.ctl(&["pause"]);
    assert!(!ok && out.contains("standby"), "{out}");
    let (ok, out) = standby.ctl(&["snapshot", "load", "--dir", s(&bad), "--lazy"]);
    assert!(!ok && out.contains("checksum"), "{out}");
    // A snapshot of another shape (a 128 MiB guest) is refused the same way.
    let small = VmProcess::boot("standby-small", "workload=idle", 128, 1);
    let other = root.0.join("other");
    small.ctl_ok(&["save", "--dir", s(&other)]);
    drop(small);
    let (ok, out) = standby.ctl(&["snapshot", "load", "--dir", s(&other)]);
    assert!(!ok && out.contains("prepared for 256 MiB"), "{out}");

    let r = json(&standby.ctl_ok(&["snapshot", "load", "--dir", s(&good), "--lazy"]));
    assert_eq!(r["state"], "running", "{r}");
    eprintln!("standby load: {} ms in the VMM", r["ms"]);
    let gap = num(&standby.wait_line("SPANGUEST stall", T), "us");
    eprintln!("standby: restored guest reports a {gap} µs gap");
    standby.wait_line_from(standby.mark(), "SPANGUEST stat", T);
    standby.assert_verify_clean(1);
    // A second load into the now running VM is refused.
    let (ok, out) = standby.ctl(&["snapshot", "load", "--dir", s(&good)]);
    assert!(!ok && out.contains("already runs"), "{out}");
}

/// A snapshot never runs a VM the operator paused; its files are readable by their owner
/// only (they hold the guest's memory); a key given for a plain snapshot is a mistake that is
/// said, not ignored.
#[test]
fn a_paused_vm_stays_paused_through_snapshots_whose_files_are_private() {
    let vm = VmProcess::boot(
        "snappause",
        "workload=dirty,verify mib=16 rate=10000 stall_us=50000",
        64,
        1,
    );
    vm.ctl_ok(&["pause"]);
    let dir = TempDir::new("snappause-layers");
    let cp = plugin("checkpoint.wasm");
    for live in [false, true] {
        let layer = dir.path().join(if live { "live" } else { "stopped" });
        let mut a = vec!["snapshot", "create", "--plugin", &cp, "--dir", s(&layer)];
        if live {
            a.push("--live");
        }
        let st = json(&vm.ctl_ok(&a));
        assert_eq!(st["phase"], "done", "{st}");
        let status = json(&vm.ctl_ok(&["status"]));
        assert_eq!(status["state"], "paused", "live={live}: {status}");
        for f in ["memory", "state"] {
            let mode = std::fs::metadata(layer.join(f)).unwrap();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
                0o600,
                "{f} of {}",
                layer.display()
            );
        }
    }
    vm.ctl_ok(&["resume"]);
    assert_eq!(json(&vm.ctl_ok(&["status"]))["state"], "running");
    vm.assert_verify_clean(1);

    let key = dir.path().join("key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    let layer = dir.path().join("stopped");
    for args in [
        vec!["run", "--restore", s(&layer), "--key", s(&key)],
        vec!["snapshot", "info", s(&layer), "--key", s(&key)],
    ] {
        let (code, err) = common::run_to_end(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("not encrypted"), "{args:?}: {err}");
    }
}

/// Boots spanguest on 2 vCPUs with `--cpu-template x86-64-v2` and saves it with `ctl save`.
fn save_v2_vm(tag: &str, dir: &Path) -> Value {
    let kernel = common::guest_elf();
    let vm = VmProcess::start(
        tag,
        &[
            "--kernel",
            s(&kernel),
            "--cmdline",
            "workload=dirty,verify mib=16 rate=5000 report_ms=100",
            "--memory",
            "128",
            "--vcpus",
            "2",
            "--cpu-template",
            "x86-64-v2",
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    let status = json(&vm.ctl_ok(&["status"]));
    assert_eq!(status["cpu"]["template"], "x86-64-v2", "{status}");
    vm.ctl_ok(&["save", "--dir", s(dir)]);
    vm.ctl_ok(&["shutdown"]);
    status
}

/// A VM booted with a CPU template keeps its CPU: the state file records the CPUID its vCPUs
/// were given (masked to the baseline) and the MSRs saved; a restore in a new process gives
/// the guest the same CPU (status: same template, vendor, family/model, feature bits), and
/// the guest's memory is intact.
#[test]
fn a_cpu_template_is_recorded_and_kept_by_a_restore() {
    let root = TempDir::new("cpu-v2");
    let dir = root.0.join("snap");
    let booted = save_v2_vm("cpu-v2", &dir);

    let chain = base_vmm::snapshot::Chain::open(&dir, None).unwrap();
    let model = chain.vm_state().cpu.clone();
    assert_eq!(model.template, base_vmm::cpu::CpuTemplate::X86_64V2);
    assert!(!model.msrs.is_empty());
    // Exactly what the template makes of this host's CPUID: the host's features masked down
    // to the baseline (this PVM host's KVM offers no sse3/ssse3/sse4/popcnt in leaf 1: the
    // status says which baseline features the guest lacks).
    let (host, _) = base_vmm::vm::host_offer().unwrap();
    assert_eq!(
        model.cpuid,
        base_vmm::cpu::CpuTemplate::X86_64V2.apply(&host)
    );
    let names = |c: &[base_vmm::cpu::CpuidEntry]| -> Vec<String> {
        base_vmm::cpu::features(c)
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let (ours, hosts) = (names(&model.cpuid), names(&host));
    for want in [
        "fpu", "cx8", "cmov", "mmx", "fxsr", "sse", "sse2", "syscall", "lm",
    ] {
        assert!(ours.iter().any(|n| n == want), "{want} not in {ours:?}");
    }
    let beyond = [
        "avx",
        "avx2",
        "avx512f",
        "x2apic",
        "xsave",
        "xsave:avx",
        "tsc_deadline_timer",
        "clflushopt",
        "gfni",
        "umip",
        "constant_tsc",
        "clzero",
        "pdpe1gb",
        "rdtscp",
    ];
    for gone in beyond {
        assert!(!ours.iter().any(|n| n == gone), "{gone} in {ours:?}");
    }
    assert!(
        hosts.iter().any(|n| beyond.contains(&n.as_str())),
        "this host offers nothing beyond the baseline: {hosts:?}"
    );
    assert!(ours.len() < hosts.len(), "{ours:?} vs {hosts:?}");
    assert_eq!(booted["cpu"]["feature_bits"], ours.len());
    let lacks = base_vmm::cpu::CpuTemplate::X86_64V2.lacking(&host);
    assert_eq!(
        booted["cpu"]["template_lacks"]
            .as_array()
            .map_or(0, Vec::len),
        lacks.len(),
        "{booted}"
    );

    let back = restore("cpu-v2-back", &dir, &[]);
    let status = json(&back.ctl_ok(&["status"]));
    for k in [
        "template",
        "vendor",
        "family",
        "model",
        "stepping",
        "feature_bits",
        "msrs",
    ] {
        assert_eq!(
            status["cpu"][k], booted["cpu"][k],
            "{k}: {status} vs {booted}"
        );
    }
    assert_eq!(status["restored"], true);
    back.assert_verify_clean(2);
    // What it saves again is the same model.
    let again = root.0.join("again");
    back.ctl_ok(&["save", "--dir", s(&again)]);
    let chain = base_vmm::snapshot::Chain::open(&again, None).unwrap();
    assert_eq!(chain.vm_state().cpu, model);
}

/// A snapshot whose recorded CPU has a feature (and an MSR) this host lacks is refused before
/// the guest runs — eagerly, lazily and by a standby VMM, which stays ready — with an error
/// naming the feature and saying what to do; the genuine snapshot then restores.
#[test]
fn a_snapshot_of_a_cpu_this_host_lacks_is_refused_naming_the_features() {
    use base_vmm::cpu::{Feature, Reg, FEATURE_REGS};
    let root = TempDir::new("cpu-forge");
    let good = root.0.join("good");
    save_v2_vm("cpu-forge", &good);

    // A named feature this host does not offer, in a leaf the model has.
    let (host, host_msrs) = base_vmm::vm::host_offer().unwrap();
    let model = base_vmm::snapshot::Chain::open(&good, None)
        .unwrap()
        .vm_state()
        .cpu
        .clone();
    let has = |entries: &[base_vmm::cpu::CpuidEntry], f: &Feature| {
        base_vmm::cpu::features(entries).contains(f)
    };
    let lacking = FEATURE_REGS
        .iter()
        .flat_map(|&(leaf, subleaf, reg)| {
            (0..32u8).map(move |bit| Feature {
                leaf,
                subleaf,
                reg,
                bit,
            })
        })
        .find(|f| {
            f.name().is_some()
                && !has(&host, f)
                && model
                    .cpuid
                    .iter()
                    .any(|e| e.function == f.leaf && e.index == f.subleaf)
        })
        .expect("this host lacks some named feature");
    let name = lacking.name().unwrap();
    let bogus_msr = (0x4b56_4e00u32..).find(|m| !host_msrs.contains(m)).unwrap();
    eprintln!("forging a CPU with {name} and MSR {bogus_msr:#x}, which this host lacks");

    let forged = copy_dir(&good, &root.0.join("forged"));
    base_vmm::snapshot::rewrite_vm_state(&forged, None, |vm| {
        let cpu = &mut vm.cpu;
        let e = cpu
            .cpuid
            .iter_mut()
            .find(|e| e.function == lacking.leaf && e.index == lacking.subleaf)
            .unwrap();
        let r = match lacking.reg {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        };
        *r |= 1 << lacking.bit;
        cpu.msrs.push(bogus_msr);
    })
    .unwrap();

    for extra in [&[][..], &["--lazy"][..]] {
        let console = root.0.join("console");
        let mut a = vec!["run", "--restore", s(&forged), "--serial", s(&console)];
        a.extend_from_slice(extra);
        let e = run_fails(&a);
        assert!(
            e.contains("this host cannot offer the CPU"),
            "{extra:?}: {e}"
        );
        assert!(
            e.contains(&format!("missing CPU features: {name}")),
            "{extra:?}: {e}"
        );
        assert!(e.contains(&format!("{bogus_msr:#x}")), "{extra:?}: {e}");
        assert!(
            e.contains("below the template's baseline") && e.contains("a host with these features"),
            "{extra:?}: {e}"
        );
        // Nothing ran: the console was never even opened.
        assert!(
            !console.exists(),
            "{extra:?}: the refused guest had a console"
        );
    }

    // A standby VMM refuses it before loading anything and stays ready for the genuine one.
    let standby = VmProcess::start(
        "cpu-standby",
        &["--standby", "--memory", "128", "--vcpus", "2"],
    );
    let t = std::time::Instant::now();
    while !standby.ctl(&["status"]).0 {
        assert!(
            t.elapsed() < T,
            "standby VMM never answered: {}",
            standby.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, out) = standby.ctl(&["snapshot", "load", "--dir", s(&forged)]);
    assert!(
        !ok && out.contains(&format!("missing CPU features: {name}")),
        "{out}"
    );
    assert!(
        standby.lines().is_empty(),
        "the refused guest printed {:?}",
        standby.lines()
    );
    let r = json(&standby.ctl_ok(&["snapshot", "load", "--dir", s(&good)]));
    assert_eq!(r["state"], "running", "{r}");
    standby.wait_line("SPANGUEST stall", T);
    let status = json(&standby.ctl_ok(&["status"]));
    assert_eq!(status["cpu"]["template"], "x86-64-v2", "{status}");
    standby.assert_verify_clean(2);
}

/// A state tree with a section this spanvmm does not know (as a newer one would write), or a
/// known section at a newer version, is refused by a restore naming the section, before any
/// guest runs; the VM it was taken from runs on untouched, and the genuine snapshot restores.
#[test]
fn a_state_with_an_unknown_section_is_refused() {
    use base_vmm::state::Section;
    let vm = VmProcess::boot(
        "unknown-section",
        "workload=dirty,verify mib=16 rate=5000 report_ms=100",
        128,
        1,
    );
    let root = TempDir::new("unknown-section");
    let good = root.0.join("good");
    vm.ctl_ok(&["save", "--dir", s(&good)]);

    let unknown = copy_dir(&good, &root.0.join("unknown"));
    base_vmm::snapshot::rewrite_state_sections(&unknown, None, |sections| {
        sections.push(Section {
            id: "device/virtio-net".into(),
            version: 1,
            data: b"{}".to_vec(),
        })
    })
    .unwrap();
    let newer = copy_dir(&good, &root.0.join("newer"));
    base_vmm::snapshot::rewrite_state_sections(&newer, None, |sections| {
        let serial = sections
            .iter_mut()
            .find(|s| s.id == "device/serial")
            .unwrap();
        serial.version = 2;
    })
    .unwrap();
    for (dir, want) in [
        (
            &unknown,
            "section device/virtio-net is unknown to this spanvmm",
        ),
        (
            &newer,
            "section device/serial v2 is newer than this spanvmm understands (v1)",
        ),
    ] {
        for extra in [&[][..], &["--lazy"][..]] {
            let console = root.0.join("console");
            let mut a = vec!["run", "--restore", s(dir), "--serial", s(&console)];
            a.extend_from_slice(extra);
            let e = run_fails(&a);
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(
                !console.exists(),
                "{extra:?}: the refused guest had a console"
            );
        }
    }
    // The source never noticed; the genuine snapshot restores.
    vm.assert_verify_clean(1);
    let back = restore("unknown-section-back", &good, &[]);
    back.assert_verify_clean(1);
}

/// exit-stats's port (`workload=exits` writes it continuously).
const STORM: &str = r#"{"base":2768,"len":1}"#;

/// exit-stats's count of the guest's port writes: its own state, which it hands over.
fn writes(vm: &VmProcess) -> u64 {
    let out = json(&vm.ctl_ok(&["plugin", "call", "exit-stats", "stats"]));
    out["result"]["writes"].as_u64().unwrap()
}

#[test]
fn a_snapshot_carries_a_services_state() {
    let vm = VmProcess::boot(
        "svc-state",
        "workload=dirty,exits,verify mib=16 wss=4 rate=20000 exits=500 report_ms=100 stall_us=1000",
        128,
        1,
    );
    let exit_stats = plugin("libexit-stats.so");
    vm.ctl_ok(&["plugin", "attach", &exit_stats, "--config", STORM]);
    let deadline = std::time::Instant::now() + T;
    while writes(&vm) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let root = TempDir::new("svc-state");
    let dir = root.0.join("l0");
    let before = writes(&vm);
    snapshot(&vm, &["--dir", s(&dir)]);
    // The VM keeps running with its service: asked for its state, not detached.
    let after = writes(&vm);
    assert!(
        after >= before,
        "the source's count went back: {before} -> {after}"
    );
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);
    // Restored paused: the guest has not written once here, so the count is the saved one.
    let back = VmProcess::start("svc-state-back", &["--restore", s(&dir), "--paused"]);
    let deadline = std::time::Instant::now() + T;
    while !back.api.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", back.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = back.ctl_ok(&["plugin", "list"]);
    assert!(list.contains("exit-stats"), "{list}");
    // The checkpoint service drove the snapshot: not attached again, and not listed failed.
    assert!(!list.contains("checkpoint"), "{list}");
    let restored = writes(&back);
    assert!(
        restored >= before,
        "exit-stats did not get its state back: {restored} < {before}"
    );
    back.ctl_ok(&["resume"]);
    let deadline = std::time::Instant::now() + T;
    while writes(&back) <= restored {
        assert!(
            std::time::Instant::now() < deadline,
            "the count does not go on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    back.assert_verify_clean(1);
    back.ctl_ok(&["shutdown"]);
    drop(back);
    // A service the restoring VMM may not attach (its policy refuses native files) does not
    // stop the VM (a lazy restore here): it runs, and the service is listed as failed, saying
    // why.
    let refused = VmProcess::start(
        "svc-state-refused",
        &["--restore", s(&dir), "--lazy", "--no-native-plugins"],
    );
    refused.wait_line("SPANGUEST stat", T);
    let list = json(&refused.ctl_ok(&["plugin", "list"]));
    let entry = list
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == "exit-stats"))
        .unwrap_or_else(|| panic!("exit-stats not listed: {list}"));
    assert_eq!(entry["state"], "failed", "{entry}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("not attached again"), "{reason}");
    refused.assert_verify_clean(1);
}

/// `PUT /vm/save` carries the services' states too (the checkpoint service attached by an
/// earlier snapshot is one of them now: it does not drive this save), and a standby VMM's
/// `snapshot load` attaches them again.
#[test]
fn a_save_and_a_standby_load_carry_the_services_states() {
    let vm = VmProcess::boot(
        "svc-save",
        "workload=dirty,exits,verify mib=16 wss=4 rate=20000 exits=500 report_ms=100 stall_us=1000",
        128,
        1,
    );
    vm.ctl_ok(&[
        "plugin",
        "attach",
        &plugin("libexit-stats.so"),
        "--config",
        STORM,
    ]);
    let root = TempDir::new("svc-save");
    // --track: the checkpoint service stays attached, tracking dirty pages.
    snapshot(&vm, &["--dir", s(&root.0.join("cp")), "--track"]);
    let deadline = std::time::Instant::now() + T;
    while writes(&vm) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.ctl_ok(&["pause"]);
    let before = writes(&vm);
    let dir = root.0.join("saved");
    vm.ctl_ok(&["save", "--dir", s(&dir)]);
    assert_eq!(
        writes(&vm),
        before,
        "the paused VM's service lost or gained counts"
    );
    vm.ctl_ok(&["shutdown"]);
    drop(vm);
    let standby = VmProcess::start("svc-standby", &["--standby", "--memory", "128"]);
    let t = std::time::Instant::now();
    while !standby.ctl(&["status"]).0 {
        assert!(t.elapsed() < T, "{}", standby.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = json(&standby.ctl_ok(&["snapshot", "load", "--dir", s(&dir), "--paused"]));
    assert_eq!(r["state"], "paused", "{r}");
    let list = standby.ctl_ok(&["plugin", "list"]);
    assert!(
        list.contains("exit-stats") && list.contains("checkpoint"),
        "{list}"
    );
    assert_eq!(
        writes(&standby),
        before,
        "exit-stats did not get its state back"
    );
    standby.ctl_ok(&["resume"]);
    let deadline = std::time::Instant::now() + T;
    while writes(&standby) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the count does not go on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    standby.assert_verify_clean(1);
}
