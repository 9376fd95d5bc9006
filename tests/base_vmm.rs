//! End-to-end tests of the base VMM: real KVM, real `spanvmm` processes, spanguest inside.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn boot_and_expect(tag: &str, cmdline: &str, expect: &str) -> (VmProcess, String) {
    let vm = VmProcess::boot(tag, cmdline, 256, 1);
    let line = vm.wait_line(expect, T);
    (vm, line)
}

#[test]
fn workload_idle_reports() {
    let (vm, stat) = boot_and_expect(
        "idle",
        "workload=idle mib=16 report_ms=200",
        "SPANGUEST stat",
    );
    assert_eq!(num(&stat, "pages"), 16 * 256, "{stat}");
    vm.assert_verify_clean(1);
}

#[test]
fn workload_dirty_rewrites_pages() {
    let (vm, _) = boot_and_expect(
        "dirty",
        "workload=dirty mib=32 rate=20000 report_ms=200",
        "SPANGUEST stat",
    );
    let from = vm.mark();
    let later = vm.wait_line_from(from, "SPANGUEST stat", T);
    assert!(num(&later, "dirtied") > 0, "{later}");
    vm.assert_verify_clean(1);
}

#[test]
fn workload_verify_checks_periodically() {
    let (_vm, line) = boot_and_expect(
        "verify",
        "workload=dirty,verify mib=16 verify_ms=300",
        "SPANGUEST verify",
    );
    assert_eq!(num(&line, "bad"), 0, "{line}");
    assert!(num(&line, "ok") > 0, "{line}");
}

#[test]
fn the_serial_console_carries_whole_lines_and_a_bad_console_is_refused() {
    // `console=serial`: every byte through the 16550 even on spanvmm (as on QEMU).
    let (vm, stat) = boot_and_expect(
        "console-serial",
        "workload=idle mib=16 report_ms=200 console=serial",
        "SPANGUEST stat",
    );
    assert_eq!(num(&stat, "pages"), 16 * 256, "{stat}");
    vm.assert_verify_clean(1);
    drop(vm);
    let elf = guest_elf();
    let vm = VmProcess::start(
        "console-bad",
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "workload=idle mib=16 console=tty",
            "--memory",
            "64",
        ],
    );
    let line = vm.wait_line("SPANGUEST error", T);
    assert!(line.contains("console= is serial or line"), "{line}");
}

#[test]
fn workload_shared_fills_and_verifies() {
    let (vm, _) = boot_and_expect(
        "shared",
        "workload=shared mib=32 shared_mib=16 report_ms=200",
        "SPANGUEST stat",
    );
    vm.assert_verify_clean(1);
}

#[test]
fn workload_zero_touches_one_page_per_mib() {
    let (vm, stat) = boot_and_expect(
        "zero",
        "workload=zero mib=64 report_ms=200",
        "SPANGUEST stat",
    );
    assert_eq!(num(&stat, "pages"), 64, "{stat}");
    vm.assert_verify_clean(1);
}

#[test]
fn workload_exits_measures_exit_cost() {
    let (_vm, line) = boot_and_expect("exits", "workload=exits exits=2000", "SPANGUEST exits");
    assert_eq!(num(&line, "n"), 2000, "{line}");
    let ns = num(&line, "ns_per_exit");
    assert!(ns > 100 && ns < 10_000_000, "implausible exit cost: {line}");
}

#[test]
fn pause_shows_as_guest_stall_and_memory_survives() {
    let vm = VmProcess::boot(
        "pause",
        "workload=dirty,verify mib=64 rate=20000 stall_us=50000",
        256,
        1,
    );
    std::thread::sleep(Duration::from_millis(300));
    let from = vm.mark();
    let t = Instant::now();
    vm.ctl_ok(&["pause"]);
    assert!(vm.ctl_ok(&["status"]).contains("\"paused\""));
    std::thread::sleep(Duration::from_millis(500));
    vm.ctl_ok(&["resume"]);
    let paused_for = t.elapsed();
    let stall = vm.wait_line_from(from, "SPANGUEST stall", T);
    let us = num(&stall, "us");
    assert!(
        us >= 450_000 && us <= paused_for.as_micros() as u64 + 100_000,
        "guest saw a {us} µs stall for a {paused_for:?} pause: {stall}"
    );
    assert!(vm.ctl_ok(&["status"]).contains("\"running\""));
    vm.assert_verify_clean(1);
}

#[test]
fn save_and_restore_in_a_new_process_continues_the_guest() {
    let vm = VmProcess::boot(
        "save",
        "workload=dirty,verify mib=64 rate=20000 report_ms=200 stall_us=1000",
        256,
        1,
    );
    std::thread::sleep(Duration::from_millis(500));
    let snap = TempDir::new("snap");
    let from = vm.mark();
    let out = vm.ctl_ok(&["save", "--dir", snap.path().to_str().unwrap()]);
    assert!(out.contains("memory_bytes_written"), "{out}");
    let saved: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The save pauses the guest: it sees a stall about as long as the save took.
    let stall = num(&vm.wait_line_from(from, "SPANGUEST stall", T), "us");
    let save_us = (saved["ms"].as_f64().unwrap() * 1000.0) as u64;
    eprintln!("save of a 64 MiB working set: {save_us} µs, guest-observed stall {stall} µs");
    // (plus what a busy host's scheduling adds around it)
    assert!(
        stall <= save_us + 1_000_000,
        "stall {stall} µs for a {save_us} µs save"
    );
    // The source keeps running after a save.
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    drop(vm);

    let restored = VmProcess::start("restored", &["--restore", snap.path().to_str().unwrap()]);
    // The restored guest reports the gap since the save as one stall, then runs on.
    let gap = num(&restored.wait_line("SPANGUEST stall", T), "us");
    eprintln!("restored guest reports a {gap} µs gap since the save");
    let from = restored.mark();
    let stat = restored.wait_line_from(from, "SPANGUEST stat", T);
    assert!(num(&stat, "dirtied") > 0, "{stat}");
    assert!(restored.ctl_ok(&["status"]).contains("\"restored\": true"));
    restored.assert_verify_clean(1);
    // The guest keeps dirtying memory after the restore.
    let later = restored.wait_line_from(restored.mark(), "SPANGUEST stat", T);
    assert!(
        num(&later, "dirtied") > num(&stat, "dirtied"),
        "{stat} then {later}"
    );
}

#[test]
fn restore_paused_waits_for_resume() {
    let vm = VmProcess::boot(
        "savep",
        "workload=dirty,verify mib=16 rate=5000 report_ms=100",
        128,
        1,
    );
    let snap = TempDir::new("snapp");
    vm.ctl_ok(&["save", "--dir", snap.path().to_str().unwrap()]);
    drop(vm);
    let r = VmProcess::start(
        "restoredp",
        &["--restore", snap.path().to_str().unwrap(), "--paused"],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(r.ctl_ok(&["status"]).contains("\"paused\""));
    assert!(r.lines().is_empty(), "a paused VM printed: {:?}", r.lines());
    r.ctl_ok(&["resume"]);
    r.wait_line("SPANGUEST stat", T);
    r.assert_verify_clean(1);
}

#[test]
fn two_vcpus_each_run_a_slice() {
    let vm = VmProcess::boot(
        "smp",
        "workload=dirty,verify mib=32 rate=20000 report_ms=200",
        256,
        2,
    );
    let ready = vm.wait_line("SPANGUEST ready", T);
    assert_eq!(num(&ready, "cpus"), 2, "{ready}");
    let stats = vm.wait_lines_from(0, "SPANGUEST stat", 4, T);
    assert!(stats.iter().any(|l| l.contains("cpu=0")), "{stats:?}");
    assert!(stats.iter().any(|l| l.contains("cpu=1")), "{stats:?}");
    vm.assert_verify_clean(2);
    // Pause/save/restore with two vCPUs.
    let snap = TempDir::new("smpsnap");
    vm.ctl_ok(&["save", "--dir", snap.path().to_str().unwrap()]);
    drop(vm);
    let r = VmProcess::start("smprestored", &["--restore", snap.path().to_str().unwrap()]);
    let stalls = r.wait_lines_from(0, "SPANGUEST stall", 2, T);
    eprintln!("restored 2-vCPU guest: {stalls:?}");
    r.wait_lines_from(0, "SPANGUEST stat", 2, T);
    r.assert_verify_clean(2);
}

#[test]
fn pvh_entry_boots_through_the_emulated_setup() {
    let kernel = guest_elf();
    let vm = VmProcess::start(
        "pvh",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "workload=dirty,verify mib=16",
            "--memory",
            "128",
            "--entry",
            "pvh",
        ],
    );
    let boot = vm.wait_line("SPANGUEST boot", T);
    assert!(boot.contains("entry=pvh"), "{boot}");
    vm.wait_line("SPANGUEST ready", T);
    vm.assert_verify_clean(1);
}

#[test]
fn guest_power_off_ends_the_process_with_its_status() {
    let mut vm = VmProcess::boot("poweroff", "workload=idle mib=8 duration_ms=300", 64, 1);
    assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.stderr());
    vm.wait_line("SPANGUEST done", T);
    assert!(!vm.api.exists(), "API socket left behind");
}

/// SIGTERM and SIGINT end the VM as `ctl shutdown` does: status 0, the API socket removed,
/// and the guest had run unharmed up to then.
#[test]
fn sigterm_shuts_the_vm_down_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut vm = VmProcess::boot(
            "sigterm",
            "workload=dirty,verify mib=16 verify_ms=300",
            64,
            1,
        );
        vm.wait_line("SPANGUEST verify", T);
        vm.assert_verify_clean(1);
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(vm.first_pid() as i32, sig) }, 0);
        assert_eq!(vm.wait_exit(T), Some(0), "signal {sig}: {}", vm.stderr());
        assert!(!vm.api.exists(), "signal {sig}: API socket left behind");
        assert!(vm.stderr().contains("shutting down"), "{}", vm.stderr());
    }
}

#[test]
fn bad_command_lines_and_kernels_give_clear_errors() {
    let dir = TempDir::new("bad");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"definitely not a kernel image").unwrap();
    let elf = guest_elf();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--kernel", "/nonexistent/kernel"],
            "cannot read kernel",
        ),
        (
            vec!["run", "--kernel", junk.to_str().unwrap()],
            "neither an ELF nor a bzImage",
        ),
        (
            vec!["run", "--kernel", elf.to_str().unwrap(), "--memory", "15"],
            "--memory",
        ),
        (
            vec!["run", "--kernel", elf.to_str().unwrap(), "--vcpus", "0"],
            "--vcpus",
        ),
        (
            vec!["run", "--kernel", elf.to_str().unwrap(), "--vcpus", "99"],
            "--vcpus",
        ),
        (
            vec!["run", "--restore", "/nonexistent/snapshot"],
            "state file",
        ),
        (
            vec!["ctl", "--api-socket", "/nonexistent/sock", "status"],
            "cannot connect",
        ),
    ];
    for (args, expect) in cases {
        let (code, err) = run_to_end(&args);
        assert_eq!(code, Some(1), "{args:?} should fail: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err:?}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn damaged_state_files_are_refused_and_nothing_runs() {
    let vm = VmProcess::boot("dmg", "workload=dirty,verify mib=16", 64, 1);
    let snap = TempDir::new("dmgsnap");
    vm.ctl_ok(&["save", "--dir", snap.path().to_str().unwrap()]);
    drop(vm);
    let state = snap.path().join("state");
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let mut version = good.clone();
    version[8] = 99;
    let damaged: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 3].to_vec(), "truncated"),
        (flipped, "checksum"),
        (version, "version 99"),
        (b"garbage".to_vec(), "truncated"),
    ];
    for (bytes, expect) in damaged {
        std::fs::write(&state, &bytes).unwrap();
        let (code, err) = run_to_end(&["run", "--restore", snap.path().to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    }
    // A memory image of the wrong size is refused too.
    std::fs::write(&state, &good).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.path().join("memory"))
        .unwrap();
    mem.set_len(4096).unwrap();
    let (code, err) = run_to_end(&["run", "--restore", snap.path().to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("memory image"), "{err}");
}

fn raw_request(api: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn malformed_api_requests_get_errors_and_the_guest_is_unharmed() {
    let vm = VmProcess::boot("api", "workload=dirty,verify mib=16 rate=10000", 64, 1);
    let mode = std::fs::metadata(&vm.api).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let big = format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x00\x01\x02garbage\r\n\r\n".to_vec(), "400"),
        (b"GET /vm\r\n\r\n".to_vec(), "400"),
        (big.into_bytes(), "413"),
        (
            b"PUT /vm/save HTTP/1.1\r\nContent-Length: 3\r\n\r\n{{{".to_vec(),
            "400",
        ),
        (
            b"PUT /vm/save HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            "413",
        ),
        (
            b"PUT /vm/save HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"dir\":\"rel\"}".to_vec(),
            "400",
        ),
        (b"DELETE /vm HTTP/1.1\r\n\r\n".to_vec(), "405"),
        (b"GET /nowhere HTTP/1.1\r\n\r\n".to_vec(), "404"),
        (
            b"PUT /guest/command HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"command\":\"dance\"}"
                .to_vec(),
            "400",
        ),
    ];
    for (req, code) in cases {
        let resp = raw_request(&vm.api, &req);
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {code}")),
            "request {:?} got {resp:?}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
    }
    // A client that connects and says nothing does not block the API for others.
    let _idle = UnixStream::connect(&vm.api).unwrap();
    let (ok, out) = vm.ctl(&["guest", "dance"]);
    assert!(!ok && out.contains("unknown guest command"), "{out}");
    assert!(vm.ctl_ok(&["status"]).contains("\"running\""));
    vm.assert_verify_clean(1);
}

#[test]
fn a_second_vmm_cannot_take_a_live_api_socket() {
    let vm = VmProcess::boot("sock", "workload=idle mib=8", 64, 1);
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "64",
        "--api-socket",
        vm.api.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("in use"), "{err}");
    // It names the process that serves the socket.
    assert!(
        err.contains(&format!("process {}", vm.first_pid())),
        "{err}"
    );
    assert!(vm.ctl_ok(&["status"]).contains("\"running\""));
}

/// `--api-socket` at a path that holds something else than a socket: refused, and the file
/// is left as it was. A stale socket (its VMM is gone) is replaced.
#[test]
fn the_api_socket_never_replaces_a_file_and_replaces_a_stale_socket() {
    let dir = TempDir::new("sockfile");
    let file = dir.path().join("precious");
    std::fs::write(&file, b"an operator's file").unwrap();
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "64",
        "--api-socket",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"an operator's file");

    // A socket nobody listens on any more (its listener dropped, the file left behind).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let elf = guest_elf();
    let mut vmm = Command::new(spanvmm())
        .args(["run", "--kernel", elf.to_str().unwrap(), "--memory", "64"])
        .args([
            "--cmdline",
            "workload=idle mib=8",
            "--serial",
            "none",
            "--api-socket",
        ])
        .arg(&stale)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let (ok, out) = ctl(&stale, &["status"]);
        if ok {
            assert!(out.contains("\"running\""), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline && vmm.try_wait().unwrap().is_none(),
            "no VMM took the stale socket: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = vmm.kill();
    let _ = vmm.wait();
}

/// 16 clients dribbling a request a byte at a time (each byte inside the per-read timeout)
/// must not lock the API out: the deadline is for the whole request.
#[test]
fn slow_clients_cannot_lock_the_api_out() {
    let vm = VmProcess::boot("slowapi", "workload=dirty,verify mib=16 rate=10000", 64, 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let (api, stop, answers) = (vm.api.clone(), stop.clone(), answers.clone());
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&api).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let req = b"GET /vm HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                let mut answer = Vec::new();
                for &b in req.iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if s.write_all(&[b]).is_err() {
                        // The server answered and closed: what it said is still to be read.
                        let _ = s.read_to_end(&mut answer);
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                    std::thread::sleep(Duration::from_millis(900));
                }
                // Whatever the server said, up to its close (its deadline comes in 5 s).
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let _ = s.read_to_end(&mut answer);
                answers
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&answer).to_string());
            })
        })
        .collect();
    // While they keep dribbling, an ordinary client gets through once their deadline passed.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let status = loop {
        let (ok, out) = vm.ctl(&["status"]);
        if ok {
            break out;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "the API stayed locked by slow clients: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.contains("\"running\""), "{status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in slow {
        h.join().unwrap();
    }
    // Each slow client was told why it was dropped.
    for a in answers.lock().unwrap().iter() {
        assert!(a.starts_with("HTTP/1.1 408"), "{a:?}");
    }
    vm.assert_verify_clean(1);
}

/// A service given with `--plugin` that cannot attach stops the start-up before the guest's
/// first instruction, and leaves no API socket behind.
#[test]
fn a_plugin_that_cannot_attach_fails_the_start_before_the_guest_runs() {
    let dir = TempDir::new("badplugin");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let api = dir.path().join("api.sock");
    let console = dir.path().join("console");
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "64",
        "--cmdline",
        "workload=idle mib=8",
        "--serial",
        console.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
        "--plugin",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--plugin") && err.contains("not started"),
        "{err}"
    );
    assert!(!api.exists(), "the API socket was left behind");
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        !out.contains("SPANGUEST"),
        "the guest ran before its services: {out}"
    );
}

#[test]
fn an_absurd_memory_size_names_the_limit() {
    let (code, err) = run_to_end(&[
        "run",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "1000000000",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1048576"), "{err}");
    let (code, err) = run_to_end(&[
        "run",
        "--standby",
        "--memory",
        "1000000000",
        "--api-socket",
        "/tmp/never-bound.sock",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1048576"), "{err}");
}

/// Run with `cargo test -- --ignored` on a host with hardware virtualization, with
/// SPANVMM_LINUX_KERNEL pointing at a bzImage.
#[test]
#[ignore = "needs hardware virtualization: on PVM (this project's machines) guest CPL0 is \
            emulated and interrupts cannot be delivered, so Linux cannot boot; the bzImage \
            loader is unit-tested in base-vmm boot::tests"]
fn linux_bzimage_boots_where_hardware_virtualization_exists() {
    assert!(
        !base_vmm::host_is_pvm(),
        "this host's KVM is PVM: a Linux kernel cannot boot here"
    );
    let kernel = std::env::var("SPANVMM_LINUX_KERNEL")
        .expect("set SPANVMM_LINUX_KERNEL to a bzImage to run this test");
    let vm = VmProcess::start(
        "linux",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--memory",
            "512",
        ],
    );
    vm.wait_line("Linux version", Duration::from_secs(60));
}

#[test]
fn qemu_boots_the_same_spanguest_elf() {
    let elf = guest_elf();
    // QEMU's default CPU model: `-cpu host` makes QEMU set MSR 0x10a, which PVM refuses.
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-enable-kvm", "-M", "microvm", "-m", "128", "-nodefaults"])
        .args([
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&elf)
        .args(["-append", "workload=dirty,verify mib=16 verify_ms=500"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (.ci/setup installs it)");
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            // Stop once a whole verify line has arrived.
            if let Some(at) = all.find("SPANGUEST verify") {
                if all[at..].contains('\n') {
                    break;
                }
            }
        }
        let _ = tx.send(all);
    });
    let got = rx.recv_timeout(Duration::from_secs(90)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.contains("SPANGUEST ready"), "QEMU output: {got}");
    assert!(got.contains("bad=0"), "QEMU output: {got}");
}

#[test]
fn lazy_restore_runs_the_guest_while_memory_streams_in() {
    let vm = VmProcess::boot(
        "lazysrc",
        "workload=dirty,verify mib=192 rate=20000 report_ms=200",
        256,
        1,
    );
    std::thread::sleep(Duration::from_millis(300));
    let snap = TempDir::new("lazysnap");
    vm.ctl_ok(&["save", "--dir", snap.path().to_str().unwrap()]);
    drop(vm);
    let r = VmProcess::start(
        "lazy",
        &["--restore", snap.path().to_str().unwrap(), "--lazy"],
    );
    // The guest runs: it reports the gap since the save as a stall, then carries on.
    r.wait_line("SPANGUEST stall", T);
    r.wait_line("SPANGUEST stat", T);
    r.assert_verify_clean(1);
    let deadline = Instant::now() + T;
    let status = loop {
        let s: serde_json::Value = serde_json::from_str(&r.ctl_ok(&["status"])).unwrap();
        if s["lazy_restore"]["done"] == true {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "lazy restore never finished: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let l = &status["lazy_restore"];
    assert!(
        l["pages_copied"].as_u64() >= l["pages_total"].as_u64(),
        "not every page of the image was loaded: {l}"
    );
    // Once loaded, everything works as after an eager restore, a live update included.
    r.ctl_ok(&["live-update", "--binary", spanvmm()]);
    r.wait_line_from(r.mark(), "SPANGUEST stat", T);
    r.assert_verify_clean(1);
}
