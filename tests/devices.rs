//! Virtio devices end to end: real KVM, real image files, spanguest's polled virtio-blk
//! driver and `disk` workload. Every test ends with the guest verifying memory and disk
//! (`bad=0`, `disk_ok` > 0), and where the disk matters the test reads the image file itself.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const MEM: u64 = 128;
/// Memory and disk; the disk workload writes 8 MiB (2048 blocks) at 2000 blocks/s.
const GUEST: &str =
    "workload=dirty,verify,disk mib=16 rate=5000 disk_mib=8 disk_rate=2000 disk_flush=32 report_ms=200 stall_us=200000";
/// spanguest's disk blocks (docs/spanguest-abi.md).
const BLOCK: u64 = 4096;

/// A sparse raw image of `mib` MiB in `dir`.
fn image(dir: &TempDir, name: &str, mib: u64) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Boots spanguest with `disks` (`--disk` specs) and `cmdline`, waiting for `ready`.
fn boot(tag: &str, cmdline: &str, disks: &[String]) -> VmProcess {
    let kernel = guest_elf();
    let mem = MEM.to_string();
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--memory",
        &mem,
    ];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    let vm = VmProcess::start(tag, &args);
    vm.wait_line("SPANGUEST ready", T);
    vm
}

/// The last `disk` stat line, once its `key` count reached `n`.
fn wait_disk(vm: &VmProcess, key: &str, n: u64) -> String {
    let deadline = std::time::Instant::now() + T;
    loop {
        let last = vm
            .lines()
            .into_iter()
            .rev()
            .find(|l| l.starts_with("SPANGUEST disk "));
        if let Some(l) = last.filter(|l| num(l, key) >= n) {
            return l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's disk {key} did not reach {n}: {:?}\n{}",
            vm.lines().last(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_disk_writes(vm: &VmProcess, n: u64) -> String {
    wait_disk(vm, "writes", n)
}

/// Verifies memory and disk: bad=0 on every line, and the disk was checked.
fn verify_memory_and_disk(vm: &VmProcess) -> u64 {
    let lines = vm.verify(1);
    let l = &lines[0];
    assert_eq!(num(l, "bad"), 0, "memory or disk damaged: {l}");
    assert_eq!(num(l, "disk_bad"), 0, "{l}");
    assert!(
        num(l, "ok") > 0 && num(l, "disk_ok") > 0,
        "nothing checked: {l}"
    );
    num(l, "disk_ok")
}

/// Checks every written block of the image (block number, generation and seed in its first
/// three words, then the pattern; see the guest's disk.rs). Returns the blocks written.
fn check_image(path: &Path, seed: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / BLOCK;
    let mut written = 0;
    let mut buf = vec![0u8; BLOCK as usize];
    for k in 0..blocks {
        f.read_exact_at(&mut buf, k * BLOCK).unwrap();
        let w: Vec<u64> = buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if w.iter().all(|&x| x == 0) {
            continue;
        }
        let (block, g, sd) = (w[0], w[1], w[2]);
        assert_eq!(
            (block, sd),
            (k, seed),
            "block {k} holds another block's data"
        );
        let v = mix(block, g, seed ^ DISK_SALT);
        for (i, &x) in w.iter().enumerate().skip(3) {
            assert_eq!(
                x,
                v.wrapping_add(i as u64 * STEP),
                "block {k} word {i} (generation {g})"
            );
        }
        written += 1;
    }
    written
}

const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
const DISK_SALT: u64 = 0x4449_534b_4449_534b;

/// spanguest's pattern seed (memory.rs `mix`).
fn mix(p: u64, g: u64, seed: u64) -> u64 {
    let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ g.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ seed.wrapping_mul(0x1656_67b1_9e37_79f9);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn device(vm: &VmProcess) -> Value {
    let st = status(vm);
    let devs = st["devices"]
        .as_array()
        .expect("devices in GET /vm")
        .clone();
    assert_eq!(devs.len(), 1, "{st}");
    devs[0].clone()
}

#[test]
fn a_disk_is_written_flushed_and_verified_and_its_file_holds_the_pattern() {
    let dir = TempDir::new("blk");
    let img = image(&dir, "disk.img", 16);
    // O_DIRECT on the first, the page cache on the second: both serve the same guest.
    for (tag, spec) in [
        ("blk-direct", format!("path={},direct=on", s(&img))),
        ("blk", format!("path={}", s(&img))),
    ] {
        let mut vm = boot(tag, GUEST, &[spec]);
        vm.wait_line("SPANGUEST blk addr=0xfeb00000", T);
        wait_disk_writes(&vm, 300);
        let checked = verify_memory_and_disk(&vm);
        let d = device(&vm);
        assert_eq!(d["kind"], "block", "{d}");
        assert_eq!(d["mmio_base"], 0xfeb0_0000u64, "{d}");
        assert_eq!(d["active"], true, "{d}");
        assert_eq!(d["direct"], tag == "blk-direct", "{d}");
        let c = &d["counters"];
        assert!(
            c["flushes"].as_u64().unwrap() > 0,
            "no flush reached the host: {d}"
        );
        assert_eq!(c["errors"], 0, "{d}");
        assert_eq!(c["skipped"], 0, "{d}");
        vm.ctl_ok(&["shutdown"]);
        assert!(vm.wait_exit(T).is_some());
        // Flushed data is in the file, block by block as the guest wrote it.
        let written = check_image(&img, 1);
        assert!(written >= checked.min(300), "{written} blocks in the file");
    }
}

#[test]
fn a_readonly_disk_refuses_the_guests_writes_and_stays_unchanged() {
    let dir = TempDir::new("blk-ro");
    let img = image(&dir, "ro.img", 8);
    std::fs::write(&img, vec![0x5a; 8 << 20]).unwrap();
    let vm = boot("blk-ro", GUEST, &[format!("path={},readonly=on", s(&img))]);
    let blk = vm.wait_line("SPANGUEST blk", T);
    assert_eq!(num(&blk, "readonly"), 1, "{blk}");
    let line = wait_disk(&vm, "errors", 100);
    assert!(num(&line, "errors") >= 100, "{line}");
    assert_eq!(num(&line, "writes"), 0, "{line}");
    let d = device(&vm);
    assert_eq!(d["readonly"], true, "{d}");
    assert!(d["counters"]["errors"].as_u64().unwrap() >= 100, "{d}");
    assert_eq!(d["counters"]["written_bytes"], 0, "{d}");
    // Memory still verifies; the disk has nothing written to check.
    let l = &vm.verify(1)[0];
    assert_eq!(num(l, "bad"), 0, "{l}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn bad_disk_specs_and_missing_files_fail_before_the_guest_boots() {
    let dir = TempDir::new("blk-bad");
    let kernel = guest_elf();
    let missing = dir.path().join("missing.img");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    for (spec, why) in [
        ("readonly=on".to_string(), "path=FILE is missing"),
        (format!("path={},ro", s(&missing)), "`ro` is not one of"),
        (
            format!("path={},direct=maybe", s(&missing)),
            "use on or off",
        ),
        (format!("path={}", s(&missing)), "No such file"),
        (
            format!("path={}", s(&empty)),
            "smaller than one 512-byte sector",
        ),
    ] {
        let (code, err) = run_to_end(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--disk",
            &spec,
        ]);
        assert_ne!(code, Some(0), "{spec}: {err}");
        assert!(err.contains(why), "{spec}: {err}");
        assert!(!err.contains("SPANGUEST"), "the guest ran: {err}");
    }
    // RAM reaching the virtio windows would hide them (one memslot from 0).
    let img = image(&dir, "ok.img", 1);
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "4096",
        "--disk",
        &format!("path={}", s(&img)),
    ]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("--disk needs --memory below 4075 MiB"),
        "{err}"
    );
}

#[test]
fn a_disk_survives_save_and_restore() {
    let dir = TempDir::new("blk-save");
    let img = image(&dir, "disk.img", 16);
    let snap = dir.path().join("snap");
    let vm = boot("blk-save", GUEST, &[format!("path={}", s(&img))]);
    wait_disk_writes(&vm, 300);
    let saved_at = std::time::Instant::now();
    vm.ctl_ok(&["save", "--dir", s(&snap)]);
    vm.ctl_ok(&["shutdown"]);
    let back = VmProcess::start("blk-restore", &["--restore", s(&snap)]);
    // The guest's first disk line after the restore: the VMM serves its API by then.
    let was = num(&back.wait_line_from(0, "SPANGUEST disk ", T), "writes");
    let since_save = saved_at.elapsed().as_micros() as u64;
    let d = device(&back);
    assert_eq!(d["active"], true, "the driver's set-up came back: {d}");
    wait_disk_writes(&back, was + 200);
    verify_memory_and_disk(&back);
    // The restored guest sees the time since the save as one stall (its clock is the host's;
    // printed when 200 ms or more): never more than passed. Its last loop iteration before
    // the pause may precede `saved_at` by a slice it was descheduled for on a busy host.
    let gap = back.max_stall_since(0);
    const DESCHEDULED_US: u64 = 250_000;
    assert!(
        gap <= since_save + DESCHEDULED_US,
        "the guest saw a {gap} µs gap, only {since_save} µs passed"
    );
    eprintln!("restored guest: {gap} µs stall, {since_save} µs since the save");
}

#[test]
fn a_disk_survives_a_live_update() {
    let dir = TempDir::new("blk-lu");
    let img = image(&dir, "disk.img", 16);
    let mut vm = boot("blk-lu", GUEST, &[format!("path={}", s(&img))]);
    wait_disk_writes(&vm, 200);
    let out = vm.ctl_ok(&["live-update", "--binary", spanvmm()]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.stderr());
    assert_eq!(
        vm.serving_pid(),
        Some(report["new_pid"].as_u64().unwrap() as u32)
    );
    let from = vm.mark();
    let was = num(&vm.wait_line_from(from, "SPANGUEST disk ", T), "writes");
    wait_disk_writes(&vm, was + 200);
    verify_memory_and_disk(&vm);
    assert!(device(&vm)["counters"]["ok"].as_u64().unwrap() > 0);
    // The guest prints gaps of 200 ms or more: a live update's pause is far below (generous
    // for a loaded host; the VMM's own pause is in the report).
    let stall = vm.max_stall_since(0);
    assert!(stall < 1_000_000, "the guest stalled {stall} µs: {report}");
    eprintln!(
        "live update with a disk: pause {} ms, guest stall {stall} µs",
        report["pause_ms"]
    );
}

#[test]
fn a_disk_on_shared_storage_moves_with_a_migration() {
    let tmp = TempDir::new("blk-mig");
    let img = image(&tmp, "disk.img", 16);
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination("blk-mig-dst", &[], &addr, &tls, &[]);
    let mut src = boot("blk-mig-src", GUEST, &[format!("path={}", s(&img))]);
    wait_disk_writes(&src, 200);
    let (ok, out, _) = migrate_precopy(&src, &addr, s(&tls));
    assert!(ok, "the migration failed: {out}");
    assert!(src.wait_exit(T).is_some(), "the source did not exit");
    let d = device(&dst);
    assert_eq!(d["path"], s(&img), "{d}");
    let from = dst.mark();
    let was = num(&dst.wait_line_from(from, "SPANGUEST disk ", T), "writes");
    wait_disk_writes(&dst, was + 200);
    verify_memory_and_disk(&dst);
    // The switch-over as the guest saw it (it prints gaps of 200 ms or more; generous for a
    // loaded host).
    let stall = dst.max_stall_since(0);
    assert!(
        stall < 5_000_000,
        "the guest stalled {stall} µs at the destination"
    );
    dst.ctl_ok(&["shutdown"]);
    assert!(dst.wait_exit(T).is_some());
    assert!(check_image(&img, 1) > 0);
}

/// The same ELF under QEMU's microvm with its own virtio-blk-device finds its disk from the
/// command line QEMU writes, and verifies memory and disk.
#[test]
fn the_same_guest_uses_its_disk_under_qemu_microvm() {
    let needs = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|_| ())
        .map_err(|e| format!("qemu-system-x86_64: {e}"));
    if !netlab::can_run("the_same_guest_uses_its_disk_under_qemu_microvm", needs) {
        return;
    }
    let dir = TempDir::new("blk-qemu");
    let img = image(&dir, "q.img", 16);
    let mut q = std::process::Command::new("qemu-system-x86_64")
        // microvm writes virtio_mmio.device= only without ACPI; virtio-mmio is legacy
        // unless told otherwise (spanguest's driver is modern only, as spanvmm's devices).
        .args(["-enable-kvm", "-M", "microvm,acpi=off", "-m", "128"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .arg("-kernel")
        .arg(guest_elf())
        .args([
            "-append",
            "workload=dirty,verify,disk mib=16 rate=5000 disk_mib=8 disk_rate=2000 verify_ms=3000 duration_ms=8000",
        ])
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", s(&img)))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qemu");
    // The guest says `done` and parks (QEMU has no spanvmm power-off port): read up to it.
    let stdout = q.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            out.push_str(&line);
            out.push('\n');
            if line.contains("SPANGUEST done") || line.contains("SPANGUEST error") {
                break;
            }
        }
        out
    });
    let deadline = std::time::Instant::now() + T;
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = q.kill();
    let _ = q.wait();
    let out = reader.join().unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("SPANGUEST")).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("SPANGUEST blk addr=0xfeb0")),
        "{out}"
    );
    let verifies: Vec<&&str> = lines.iter().filter(|l| l.contains("verify ")).collect();
    assert!(!verifies.is_empty(), "no verify pass under QEMU: {out}");
    for l in &verifies {
        let l = &l[l.find("SPANGUEST").unwrap()..];
        assert_eq!(num(l, "bad"), 0, "{l}");
    }
    let last = verifies.last().unwrap();
    let last = &last[last.find("SPANGUEST").unwrap()..];
    assert!(num(last, "disk_ok") > 0, "{last}");
    assert!(lines.iter().any(|l| l.contains("SPANGUEST done")), "{out}");
    assert!(check_image(&img, 1) > 0);
}
