//! `spanvmm run --jail`: a VMM confined before its guest boots (new mount namespace rooted in
//! the jail directory, an unprivileged uid/gid, a cgroup with memory and CPU limits), alone and
//! with its devices (a tap opened before the jail, a disk image inside it).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::lan::*;
use common::*;

const T: Duration = Duration::from_secs(30);
const UID: u32 = 65534;
const GID: u32 = 65534;

/// The group path of `pid` in the hierarchy holding `controller` ("" for v2), from
/// /proc/PID/cgroup.
fn group_of(pid: u32, controller: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, c, p) = (f.next()?, f.next()?, f.next()?);
        let hit = if controller.is_empty() {
            c.is_empty()
        } else {
            c.split(',').any(|x| x == controller)
        };
        hit.then(|| p.to_string())
    })
}

fn v2_has_memory_and_cpu() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.contains("memory") && c.contains("cpu"))
}

#[test]
fn a_jailed_vm_boots_as_its_user_in_its_root_and_cgroup() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the jail test needs root (it sets the jail up)");
    let dir = TempDir::new("jail");
    let jail = dir.path().join("root");
    std::fs::create_dir(&jail).unwrap();
    std::fs::copy(guest_elf(), jail.join("spanguest.elf")).unwrap();
    // The VMM (as UID) makes its API socket in the jail's root.
    std::os::unix::fs::chown(&jail, Some(UID), Some(GID)).unwrap();
    let mem_limit: u64 = 512 << 20;
    let jail_s = jail.to_str().unwrap().to_string();
    let cgroup = format!("mem={mem_limit},cpu=150000/100000");
    let mut vm = VmProcess::start_full(
        dir,
        &[],
        &[
            "--jail",
            &jail_s,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
            "--cgroup",
            &cgroup,
            "--kernel",
            "/spanguest.elf",
            "--cmdline",
            "workload=dirty,verify mib=8 rate=5000 report_ms=200",
            "--memory",
            "64",
        ],
        "/api.sock".into(),
        jail.join("api.sock"),
    );
    vm.wait_line("SPANGUEST ready", Duration::from_secs(60));
    let pid = vm.first_pid();

    // Its user and group.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    assert_eq!(ids("Uid:"), vec![UID.to_string(); 4], "{status}");
    assert_eq!(ids("Gid:"), vec![GID.to_string(); 4], "{status}");
    assert!(
        status.contains("CapEff:\t0000000000000000"),
        "capabilities left: {status}"
    );
    // Its root is the jail: the same directory, and the host's files are not there.
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let host = std::fs::metadata(&jail).unwrap();
    assert_eq!((root.dev(), root.ino()), (host.dev(), host.ino()));
    assert!(Path::new(&format!("/proc/{pid}/root/spanguest.elf")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists());
    // Its cgroup has the limits.
    if v2_has_memory_and_cpu() {
        let g = group_of(pid, "").unwrap();
        assert!(g.ends_with(&format!("spanvmm-{pid}")), "{g}");
        let base = Path::new("/sys/fs/cgroup").join(g.trim_start_matches('/'));
        let mem = std::fs::read_to_string(base.join("memory.max")).unwrap();
        assert_eq!(mem.trim(), mem_limit.to_string());
        let cpu = std::fs::read_to_string(base.join("cpu.max")).unwrap();
        assert_eq!(cpu.trim(), "150000 100000");
    } else {
        let g = group_of(pid, "memory").unwrap();
        assert!(g.ends_with(&format!("spanvmm-{pid}")), "{g}");
        let mem = Path::new("/sys/fs/cgroup/memory").join(g.trim_start_matches('/'));
        let limit = std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), mem_limit.to_string());
        let g = group_of(pid, "cpu").unwrap();
        assert!(g.ends_with(&format!("spanvmm-{pid}")), "{g}");
        let cpu = Path::new("/sys/fs/cgroup/cpu").join(g.trim_start_matches('/'));
        let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap();
        let period = std::fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap();
        assert_eq!((quota.trim(), period.trim()), ("150000", "100000"));
    }
    // The API socket made inside the jail answers from the host; the guest is intact.
    vm.ctl_ok(&["status"]);
    let from = vm.mark();
    vm.wait_line_from(from, "SPANGUEST stat", T);
    vm.assert_verify_clean(1);
    vm.ctl_ok(&["shutdown"]);
    assert_eq!(vm.wait_exit(T), Some(0));
    // The groups outlive the process (it cannot remove them): the operator does.
    for c in ["memory", "cpu"] {
        if let Some(g) = group_of(std::process::id(), c) {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(g.trim_start_matches('/'))
                    .join(format!("spanvmm-{pid}")),
            );
        }
    }
}

/// A jailed VMM with a tap and a disk: the tap is opened before the jail (its root has no
/// /dev/net/tun, its user may not attach one), the disk image is a file in the jail. The guest
/// serves redis-benchmark with no error, writes its disk, and verifies memory and disk.
#[test]
fn a_jailed_vm_serves_redis_on_its_tap_and_writes_its_disk() {
    let Some(lan) = Lan::new("jail-net", &["tap0"]) else {
        return;
    };
    let dir = TempDir::new("jail-net");
    let jail = dir.path().join("root");
    std::fs::create_dir(&jail).unwrap();
    std::fs::copy(guest_elf(), jail.join("spanguest.elf")).unwrap();
    let img = jail.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // The VMM (as UID) makes its API socket in the jail's root and writes the disk.
    for p in [&jail, &img] {
        std::os::unix::fs::chown(p, Some(UID), Some(GID)).unwrap();
    }
    let jail_s = jail.to_str().unwrap().to_string();
    let (uid, gid) = (UID.to_string(), GID.to_string());
    let net = format!("tap=tap0,mac={MAC}");
    let mut vm = VmProcess::start_full(
        dir,
        &lan.wrapper(),
        &[
            "--jail",
            &jail_s,
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--kernel",
            "/spanguest.elf",
            "--cmdline",
            "workload=dirty,verify,kv,disk mib=16 rate=2000 disk_mib=4 disk_rate=500 \
             disk_flush=32 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=500",
            "--memory",
            "128",
            "--net",
            &net,
            "--disk",
            "path=/disk.img",
        ],
        "/api.sock".into(),
        jail.join("api.sock"),
    );
    vm.wait_line("SPANGUEST net ", Duration::from_secs(60));
    vm.wait_line("SPANGUEST ready", Duration::from_secs(60));
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.first_pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&UID.to_string())),
        "not running as {UID}: {status}"
    );
    // The tap it serves was opened before the jail: there is no /dev/net/tun inside.
    assert!(!Path::new(&format!("/proc/{}/root/dev/net/tun", vm.first_pid())).exists());
    assert_eq!(lan.cli(&["SET", "jailed", "yes"]), "OK");
    lan.cli(&["DEL", COUNTER]);
    finish(lan.bench(20_000, &[]), "jailed");
    assert_eq!(lan.incr_count(), 20_000);
    assert_eq!(lan.cli(&["GET", "jailed"]), "yes");
    let disk = vm.wait_line("SPANGUEST disk ", T);
    assert_eq!(num(&disk, "errors"), 0, "{disk}");
    verify_clean(&vm, true);
    let d = net_device(&vm);
    assert_eq!(d["tap"], "tap0", "{d}");
    vm.ctl_ok(&["shutdown"]);
    assert_eq!(vm.wait_exit(T), Some(0));
    // The guest's blocks reached the file.
    assert!(std::fs::read(&img).unwrap().iter().any(|&b| b != 0));
}

#[test]
fn a_jail_that_cannot_be_made_fails_start_up_with_the_step_named() {
    let (code, out) = run_to_end(&[
        "run",
        "--jail",
        "/nonexistent-jail",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--kernel",
        "/spanguest.elf",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--jail /nonexistent-jail"), "{out}");
    let (code, out) = run_to_end(&[
        "run", "--jail", "/tmp", "--uid", "65534", "--gid", "65534", "--cgroup", "mem=1",
        "--kernel", "/x",
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("at least 16 MiB"), "{out}");
}
