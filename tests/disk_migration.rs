//! Storage migration (issue 17, item 5: CloudNet's disk) on the WAN of `tests/cloudnet.rs`
//! (network-namespace hosts on tbf-shaped 100 Mbit/s links, 20 ms round trips through the
//! delay relay). The destination is given a disk file of its own (`--incoming ... --disk`):
//! the source's disk is bulk-copied while the guest writes, the blocks written meanwhile go
//! again, then every guest write is mirrored synchronously while the memory moves, and the
//! blocks written after that go with the guest paused. The guest's `verify` (which re-reads
//! every block it wrote, against the generations in its memory) proves both memory and disk
//! exact at the destination; going back to a host that holds the old image moves only the
//! blocks that changed. A link cut during the synchronous phase leaves the source running,
//! its writes completing locally, its disk intact.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::wan::{relay, Wan};
use common::*;
use netlab::Host;
use serde_json::Value;

const MEM: u64 = 64;
const PORT: u16 = 7470;
/// The disk: 64 MiB, of which the guest's `disk` workload rewrites the first 8 MiB (2048
/// blocks, wrapping) at 1000 blocks/s.
const DISK_MIB: u64 = 64;
const GUEST: &str = "workload=dirty,verify,disk mib=8 rate=1000 disk_mib=8 disk_rate=1000 \
                     disk_flush=32 report_ms=200 stall_us=100000";
const T: Duration = Duration::from_secs(60);

/// A sparse image of `mib` MiB; `static_from_mib..`: pseudo-random data the guest never
/// touches (an application's data set: what an incremental migration need not send again),
/// each MiB different, or (`repeated`) the same MiB over and over.
fn image(
    dir: &TempDir,
    name: &str,
    mib: u64,
    static_from_mib: Option<u64>,
    repeated: bool,
) -> PathBuf {
    let p = dir.path().join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    if let Some(from) = static_from_mib {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for m in from..mib {
            if repeated {
                x = 0x9e37_79b9_7f4a_7c15;
            }
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&chunk, m << 20).unwrap();
        }
    }
    p
}

fn spec(p: &Path) -> String {
    format!("path={}", p.display())
}

/// Boots the guest (`cmdline`) at `host` on `disk`.
fn boot(tag: &str, host: &Host, disk: &Path, cmdline: &str) -> VmProcess {
    boot_vcpus(tag, host, disk, cmdline, 1)
}

/// [`boot`] with `vcpus` vCPUs (the `disk` workload runs on vCPU 0, `dirty` on all).
fn boot_vcpus(tag: &str, host: &Host, disk: &Path, cmdline: &str, vcpus: usize) -> VmProcess {
    let kernel = guest_elf();
    let mem = MEM.to_string();
    let d = spec(disk);
    let n = vcpus.to_string();
    let vm = VmProcess::start_wrapped(
        tag,
        &host.wrapper(),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            &mem,
            "--vcpus",
            &n,
            "--disk",
            &d,
        ],
    );
    vm.wait_line("SPANGUEST ready", T);
    vm
}

/// The guest's disk writes so far (its last `disk` line), once at least `n`.
fn wait_disk_writes(vm: &VmProcess, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let last = vm
            .lines()
            .into_iter()
            .rev()
            .find(|l| l.starts_with("SPANGUEST disk "));
        if let Some(w) = last.map(|l| num(&l, "writes")).filter(|&w| w >= n) {
            return w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's disk writes did not reach {n}: {:?}\n{}",
            vm.lines().last(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// At a migration's destination: memory and disk verify (bad=0, the disk checked), and the
/// guest's one stall, the switch-over (the disk's last writes acknowledged over a 20 ms round
/// trip, then the hand-over), stays bounded (generous: a loaded host stretches it).
fn verify_memory_and_disk(vm: &VmProcess, what: &str) {
    verify_memory_and_disk_vcpus(vm, 1, what);
    vm.assert_stall_below(0, 5_000, what);
}

/// [`verify_memory_and_disk`] for a guest of `vcpus` vCPUs (vCPU 0 checks the disk).
fn verify_memory_and_disk_vcpus(vm: &VmProcess, vcpus: usize, what: &str) {
    let lines = vm.verify(vcpus);
    for l in &lines {
        assert_eq!(num(l, "bad"), 0, "{what}: memory or disk damaged: {l}");
        assert_eq!(num(l, "disk_bad"), 0, "{what}: {l}");
        assert!(num(l, "ok") > 0, "{what}: nothing checked: {l}");
    }
    assert!(
        lines.iter().any(|l| num(l, "disk_ok") > 0),
        "{what}: the disk was not checked: {lines:?}"
    );
}

/// Migrates `vm` (pre-copy) across the WAN to a destination `tag` at `host` whose disk is
/// `disk`: the report, once completed, and the destination.
fn migrate_disk(
    vm: &VmProcess,
    host: &Host,
    tls: &Path,
    disk: &Path,
    tag: &str,
) -> (Value, VmProcess) {
    let relay = relay(host, PORT);
    let dst = destination(
        tag,
        &host.wrapper(),
        &format!("tls://{}:{PORT}", host.ip),
        tls,
        &["--disk", &spec(disk)],
    );
    let to = format!("tls://{}", relay.addr());
    let (ok, out, report) = migrate_precopy(vm, &to, tls.to_str().unwrap());
    let report = report.unwrap_or(Value::Null);
    assert!(ok, "{tag}: migration failed: {out}\n{}", vm.stderr());
    assert_eq!(report["result"], "completed", "{tag}: {report}");
    eprintln!(
        "{tag}: {:.0} ms, {} bytes, downtime {:.1} ms; disk {}",
        report["total_ms"].as_f64().unwrap_or(0.0),
        report["bytes"],
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["disk"]
    );
    (report, dst)
}

/// Waits until `vm`, a destination, has taken the guest over (it arrives paused when it left
/// paused).
fn wait_taken_over(vm: &VmProcess) {
    let deadline = std::time::Instant::now() + T;
    while status(vm)["state"] == "incoming" {
        assert!(std::time::Instant::now() < deadline, "{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An image's base stamp.
fn stamp(image: &Path) -> PathBuf {
    base_vmm::devices::virtio::disk_track::stamp_path(image)
}

/// Stamps `image` as a base (`spanvmm disk-stamp`) and copies it with its stamp to `name`,
/// as an operator seeds a second host: the copy holds the base.
fn stamped_copy(tmp: &TempDir, image: &Path, name: &str) -> PathBuf {
    let out = std::process::Command::new(spanvmm())
        .arg("disk-stamp")
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let g = u128::from_str_radix(String::from_utf8_lossy(&out.stdout).trim(), 16).unwrap();
    let copy = tmp.path().join(name);
    for (from, to) in [
        (image.to_path_buf(), copy.clone()),
        (stamp(image), stamp(&copy)),
    ] {
        let st = std::process::Command::new("cp")
            .args(["--sparse=always", "--preserve=timestamps"])
            .arg(&from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success(), "cp {}", from.display());
    }
    let read_stamp = base_vmm::devices::virtio::disk_track::read_stamp;
    assert_eq!(read_stamp(&copy), Some(g), "the copy holds the base");
    copy
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn the_disk_moves_with_the_vm_and_back_incrementally() {
    let Some(wan) = Wan::new("disk-mig") else {
        return;
    };
    let tmp = TempDir::new("disk-mig");
    let tls = certs(&tmp, "tls");
    // The source's image carries 56 MiB of data the guest never writes; the destination
    // starts from an empty file.
    let a = image(&tmp, "a.img", DISK_MIB, Some(8), false);
    let b = tmp.path().join("b.img");
    std::fs::File::create(&b).unwrap();
    let mut src = boot("disk-mig-src", &wan.src, &a, GUEST);
    wait_disk_writes(&src, 1000);
    let (report, dst) = migrate_disk(&src, &wan.dst, &tls, &b, "disk-mig-dst");
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    let d = &report["disk"];
    assert_eq!(n(d, "disks"), 1, "{d}");
    assert_eq!(n(d, "base_held"), 0, "an empty file holds no base: {d}");
    assert_eq!(n(d, "blocks_total"), DISK_MIB * 16, "{d}");
    // The static data (896 blocks) and the guest's written blocks went; the empty rest of
    // the guest's region matched the empty destination.
    assert!(n(d, "blocks_sent") >= 896, "{d}");
    assert!(n(d, "sync_writes") > 0, "no write was mirrored: {d}");
    eprintln!(
        "mirrored writes: {} ({} on the mirror's own connection), mean ack wait {} µs",
        n(d, "sync_writes"),
        n(d, "sync_writes_own_link"),
        n(d, "sync_ack_mean_us")
    );
    assert_eq!(
        std::fs::metadata(&b).unwrap().len(),
        DISK_MIB << 20,
        "the destination's file took the source's size"
    );
    // The hand-over's generation: stamped on the source's image once the destination
    // resumed; the destination's stamp was taken into the arriving VM's tracking.
    assert!(stamp(&a).exists(), "the source's image was not stamped");
    assert!(
        !stamp(&b).exists(),
        "the arriving VM left its image's stamp"
    );
    // At the destination: memory and every block the guest wrote, exact.
    dst.wait_line("SPANGUEST stat", T);
    verify_memory_and_disk(&dst, "at the destination");
    let moved = wait_disk_writes(&dst, 0);
    wait_disk_writes(&dst, moved + 300);

    // Back to the first host, which holds the image as it was at the switch-over: paused
    // (so that what changed is what the guest wrote there), the migration moves only the
    // blocks written since.
    dst.ctl_ok(&["pause"]);
    let (report2, back) = migrate_disk(&dst, &wan.src, &tls, &a, "disk-mig-back");
    let d2 = &report2["disk"];
    // At most the guest's 8 MiB region (128 blocks) changed; the static data stayed. The
    // first host's image still holds the generation of the hand-over: neither image was
    // read to find what changed.
    assert_eq!(n(d2, "base_held"), 1, "{d2}");
    assert!(n(d2, "blocks_sent") <= 128, "{d2}");
    assert!(n(d2, "blocks_same") >= 896, "{d2}");
    assert!(
        n(d2, "bytes") * 4 < n(d, "bytes"),
        "not incremental: {d2} vs {d}"
    );
    // It arrived paused, as it was: run it and check it.
    wait_taken_over(&back);
    back.ctl_ok(&["resume"]);
    let from = wait_disk_writes(&back, 0);
    wait_disk_writes(&back, from + 100);
    verify_memory_and_disk(&back, "back at the first host");
}

/// `spanvmm disk-stamp` and a copy kept with its timestamps make a base both hosts hold: the
/// migration there sends only the blocks the guest wrote since its VMM took the image. An
/// image changed after its stamp is not trusted: back at the first host, whose image had a
/// block of its static data overwritten after the hand-over, the migration hashes both
/// images, sends that block, and leaves the static data of both images equal.
#[test]
fn a_stamped_copy_is_trusted_only_while_unchanged() {
    let Some(wan) = Wan::new("disk-stamp") else {
        return;
    };
    let tmp = TempDir::new("disk-stamp");
    let tls = certs(&tmp, "tls");
    let a = image(&tmp, "a.img", DISK_MIB, Some(8), false);
    let b = stamped_copy(&tmp, &a, "b.img");
    let read_stamp = base_vmm::devices::virtio::disk_track::read_stamp;

    let mut src = boot("disk-stamp-src", &wan.src, &a, GUEST);
    assert!(!stamp(&a).exists(), "the VMM took its image's stamp");
    wait_disk_writes(&src, 1000);
    let (report, dst) = migrate_disk(&src, &wan.dst, &tls, &b, "disk-stamp-dst");
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    let d = &report["disk"];
    assert_eq!(n(d, "base_held"), 1, "{d}");
    assert!(
        n(d, "blocks_sent") <= 128,
        "more than the guest's region: {d}"
    );
    assert!(n(d, "blocks_same") >= 896, "{d}");
    dst.wait_line("SPANGUEST stat", T);
    verify_memory_and_disk(&dst, "at the stamped copy");

    // The first host's image, stamped at the hand-over, is changed behind its stamp (a tick
    // later: a write in the stamp's own tick of the file clock is not seen, see
    // docs/migration-wire.md).
    assert!(
        read_stamp(&a).is_some(),
        "the source's image was not stamped"
    );
    std::thread::sleep(Duration::from_millis(50));
    let damaged = 40u64 << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(&[0xee; 4096], damaged)
        .unwrap();
    assert_eq!(read_stamp(&a), None, "a changed image keeps a valid stamp");
    let moved = wait_disk_writes(&dst, 0);
    wait_disk_writes(&dst, moved + 300);
    dst.ctl_ok(&["pause"]);
    let (report2, back) = migrate_disk(&dst, &wan.src, &tls, &a, "disk-stamp-back");
    let d2 = &report2["disk"];
    assert_eq!(n(d2, "base_held"), 0, "a changed image was trusted: {d2}");
    assert!(n(d2, "blocks_sent") >= 1, "{d2}");
    wait_taken_over(&back);
    // The static data (never written by the guest) is the source's again, byte for byte.
    let read = |p: &Path| {
        let mut v = vec![0u8; ((DISK_MIB - 8) << 20) as usize];
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut v, 8 << 20)
            .unwrap();
        v
    };
    assert!(
        read(&a) == read(&b),
        "the static data differs after the migration"
    );
    back.ctl_ok(&["resume"]);
    let from = wait_disk_writes(&back, 0);
    wait_disk_writes(&back, from + 100);
    verify_memory_and_disk(&back, "back at the changed image");
}

#[test]
fn a_live_update_keeps_the_disks_base() {
    let Some(wan) = Wan::new("disk-lu") else {
        return;
    };
    let tmp = TempDir::new("disk-lu");
    let tls = certs(&tmp, "tls");
    let a = image(&tmp, "a.img", DISK_MIB, Some(8), false);
    let b = stamped_copy(&tmp, &a, "b.img");
    let mut src = boot("disk-lu-src", &wan.src, &a, GUEST);
    wait_disk_writes(&src, 500);
    // The new process opens the image after the old one removed its stamp: the base and the
    // blocks written so far come with the hand-over.
    let out = src.ctl_ok(&["live-update", "--binary", spanvmm()]);
    let lu: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(src.wait_exit(T), Some(0), "{}", src.stderr());
    assert_eq!(
        src.serving_pid(),
        Some(lu["new_pid"].as_u64().unwrap() as u32)
    );
    let was = wait_disk_writes(&src, 0);
    wait_disk_writes(&src, was + 300);
    let (report, dst) = migrate_disk(&src, &wan.dst, &tls, &b, "disk-lu-dst");
    let d = &report["disk"];
    assert_eq!(n(d, "base_held"), 1, "the base was lost: {d}");
    assert!(
        n(d, "blocks_sent") <= 128,
        "more than the guest's region: {d}"
    );
    dst.wait_line("SPANGUEST stat", T);
    verify_memory_and_disk(&dst, "after a live update, from the base");
}

#[test]
fn a_block_sent_again_carries_only_its_changed_units() {
    let Some(wan) = Wan::new("disk-units") else {
        return;
    };
    let tmp = TempDir::new("disk-units");
    let tls = certs(&tmp, "tls");
    let a = image(&tmp, "a.img", DISK_MIB, Some(8), false);
    let b = tmp.path().join("b.img");
    std::fs::File::create(&b).unwrap();
    let to_dst = relay(&wan.dst, PORT);
    let dst = destination(
        "disk-units-dst",
        &wan.dst.wrapper(),
        &format!("tls://{}:{PORT}", wan.dst.ip),
        &tls,
        &["--disk", &spec(&b)],
    );
    // 4 KiB writes 17 blocks apart: between two passes each 64 KiB block of the region gets
    // a few of its 16 units rewritten, not all.
    let guest = GUEST.replace("disk_flush=32", "disk_flush=32 disk_stride=17");
    let mut src = boot("disk-units-src", &wan.src, &a, &guest);
    wait_disk_writes(&src, 1000);
    let (ok, out, report) = migrate_precopy(
        &src,
        &format!("tls://{}", to_dst.addr()),
        tls.to_str().unwrap(),
    );
    let report = report.unwrap_or(Value::Null);
    assert!(ok, "migration failed: {out}\n{}", src.stderr());
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    let d = &report["disk"];
    let (blocks, sent, same, bytes) = (
        n(d, "blocks_resent"),
        n(d, "units_resent"),
        n(d, "units_unchanged"),
        n(d, "bytes_resent"),
    );
    eprintln!(
        "re-sent: {blocks} blocks, {sent} units sent, {same} unchanged, {bytes} bytes \
         ({} per block); disk {d}",
        bytes / blocks.max(1)
    );
    assert!(blocks > 0, "no block went again: {d}");
    // Every unit of a re-sent block is counted once, sent or not.
    assert_eq!(sent + same, blocks * 16, "{d}");
    // The unchanged units stayed home: a re-sent block cost what changed in it, well under
    // a whole block on average (a block's 16 units and headers: ~65.6 KB).
    assert!(same > 0, "{d}");
    assert!(bytes <= sent * 4096 + blocks * 200, "{d}");
    assert!(
        bytes * 4 < blocks * 3 * (64 << 10),
        "{bytes} bytes for {blocks} blocks: {d}"
    );
    dst.wait_line("SPANGUEST stat", T);
    verify_memory_and_disk(&dst, "at the destination");
}

#[test]
fn the_redundancy_cache_covers_disk_blocks() {
    let Some(wan) = Wan::new("disk-cbr") else {
        return;
    };
    let tmp = TempDir::new("disk-cbr");
    let tls = certs(&tmp, "tls");
    // 56 MiB of data that repeats every MiB: after the first MiB, every unit is a hit.
    let a = image(&tmp, "a.img", DISK_MIB, Some(8), true);
    let b = tmp.path().join("b.img");
    std::fs::File::create(&b).unwrap();
    let to_dst = relay(&wan.dst, PORT);
    let dst = destination(
        "disk-cbr-dst",
        &wan.dst.wrapper(),
        &format!("tls://{}:{PORT}", wan.dst.ip),
        &tls,
        &["--disk", &spec(&b)],
    );
    let mut src = boot("disk-cbr-src", &wan.src, &a, GUEST);
    wait_disk_writes(&src, 500);
    let (ok, out, report) = migrate(
        &src,
        &[
            "--to",
            &format!("tls://{}", to_dst.addr()),
            "--plugin",
            &plugin("precopy.wasm"),
            "--config",
            r#"{"redundancy":true}"#,
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
    );
    let report = report.unwrap_or(Value::Null);
    assert!(ok, "migration failed: {out}\n{}", src.stderr());
    assert_eq!(src.wait_exit(Duration::from_secs(15)), Some(0));
    let d = &report["disk"];
    let e = &d["encoding"];
    eprintln!("cbr: disk {d}");
    // 55 repeated MiB hit; the first MiB and the guest's own blocks miss.
    assert!(n(e, "cache_hits") > 2 * n(e, "cache_misses"), "{e}");
    assert!(
        n(d, "bytes") < 24 << 20,
        "the repeated data went whole: {d}"
    );
    dst.wait_line("SPANGUEST stat", T);
    verify_memory_and_disk(&dst, "at the destination");
}

#[test]
fn a_cut_link_in_the_synchronous_phase_leaves_the_source_running_and_intact() {
    let Some(wan) = Wan::new("disk-cut") else {
        return;
    };
    let tmp = TempDir::new("disk-cut");
    let tls = certs(&tmp, "tls");
    let a = image(&tmp, "a.img", DISK_MIB, None, false);
    let b = tmp.path().join("b.img");
    std::fs::File::create(&b).unwrap();
    let to_dst = relay(&wan.dst, PORT);
    let mut dst = destination(
        "disk-cut-dst",
        &wan.dst.wrapper(),
        &format!("tls://{}:{PORT}", wan.dst.ip),
        &tls,
        &["--disk", &spec(&b)],
    );
    // The guest dirties its 8 MiB faster than the link drains them (20000 pages/s), on its
    // second vCPU too: vCPU 0 waits for each mirrored disk write, and a guest idle meanwhile
    // would let the pre-copy converge.
    let src = boot_vcpus(
        "disk-cut-src",
        &wan.src,
        &a,
        &GUEST.replacen(" rate=1000 ", " rate=20000 ", 1),
        2,
    );
    wait_disk_writes(&src, 500);
    // A pre-copy that never stops by itself (the guest dirties memory faster than the link
    // drains it, the rounds are not capped, and only a round that leaves nothing dirty would
    // count as converged): the synchronous phase lasts until the cut.
    let api = src.api.clone();
    let report_file = src.dir.path().join("report.json");
    let (to, tls_dir, precopy) = (
        format!("tls://{}", to_dst.addr()),
        tls.to_str().unwrap().to_string(),
        plugin("precopy.wasm"),
    );
    let rf = report_file.to_str().unwrap().to_string();
    let ctl = std::thread::spawn(move || {
        common::ctl(
            &api,
            &[
                "migrate",
                "--report",
                &rf,
                "--to",
                &to,
                "--plugin",
                &precopy,
                "--config",
                r#"{"max_rounds":100000,"stall_rounds":100000,"min_pages":0,"downtime_ms":0}"#,
                "--tls-dir",
                &tls_dir,
            ],
        )
    });
    // Writes go through the mirror now, each waiting for the destination's acknowledgement:
    // cut once they go on the mirror's own connection.
    wait_stderr(&src, "disks in sync", T);
    wait_stderr(&src, "first mirrored disk write acknowledged", T);
    // Then the writes move to the mirror's own connection (not queued behind the pages).
    wait_stderr(&src, "go on the mirror's own connection", T);
    // The disk's progress shows in GET /vm/migration: the synchronous phase, the bulk copy
    // done, writes mirrored, on their own connection.
    let deadline = std::time::Instant::now() + T;
    let p = loop {
        let p = api_get(&src.api, "/vm/migration").expect("GET /vm/migration");
        if p["progress"]["disk"]["sync_writes_own_link"].as_u64() > Some(0) {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "{p}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let d = &p["progress"]["disk"];
    assert_eq!(d["phase"], "sync", "{p}\n{}", src.stderr());
    assert_eq!(n(d, "blocks_total"), DISK_MIB * 16, "{p}");
    assert!(
        n(d, "blocks_sent") + n(d, "blocks_same") >= DISK_MIB * 16,
        "{p}"
    );
    assert!(n(d, "sync_writes") > 0, "{p}");
    let before = wait_disk_writes(&src, 0);
    to_dst.cut();
    let (ok, out) = ctl.join().unwrap();
    assert!(!ok, "the migration cannot succeed over a cut link: {out}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    assert_eq!(report["result"], "failed", "{report}");
    assert_eq!(report["source_vm"], "running", "{report}");
    let d = &report["disk"];
    eprintln!("cut: {}; disk {d}", report["error"]);
    assert!(
        n(d, "sync_writes") > 0,
        "nothing was mirrored before the cut: {d}"
    );
    // The source goes on writing its own disk, and everything verifies.
    wait_disk_writes(&src, before + 500);
    verify_memory_and_disk_vcpus(&src, 2, "at the source after the cut");
    assert!(dst
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|c| c != 0));
}

#[test]
fn a_hostile_source_cannot_write_outside_the_destinations_disk() {
    use l1_services::migration::disk::DiskFrame;
    use l1_services::migration::wire::{self, Frame, PAGE, VERSION};
    use l1_services::migration::{tls, Link};

    let tmp = TempDir::new("disk-hostile");
    let tls_dir = certs(&tmp, "tls");
    let disk_bytes = 1u64 << 20;
    let units = disk_bytes / PAGE as u64;
    let blocks = |first: u64, span: u16| {
        Frame::Disk(DiskFrame::Blocks {
            disk: 0,
            first,
            span,
            codec: wire::CODEC_RAW,
            present: vec![(1u64 << span) - 1],
            zero: vec![0],
            data: vec![0x77; span as usize * PAGE],
        })
    };
    // (case, frames after the offer, what the destination answers)
    let cases: Vec<(&str, Frame, &str)> = vec![
        (
            "units past the end",
            blocks(units - 4, 16),
            "disk-blocks for disk 0: units 252+16 runs past its 1048576 bytes",
        ),
        (
            "a write past the end",
            Frame::Disk(DiskFrame::Write {
                seq: 1,
                disk: 0,
                offset: disk_bytes - 512,
                data: vec![0x77; 1024],
            }),
            "disk-write for disk 0: 1024 bytes at 1048064 runs past its 1048576 bytes",
        ),
        (
            "a write for a disk never offered",
            Frame::Disk(DiskFrame::Write {
                seq: 1,
                disk: 3,
                offset: 0,
                data: vec![0x77; 512],
            }),
            "disk-write for disk 3, which this destination does not receive",
        ),
    ];
    for (i, (case, frame, want)) in cases.into_iter().enumerate() {
        let img = tmp.path().join(format!("d{i}.img"));
        std::fs::File::create(&img).unwrap();
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let mut dst = destination(
            &format!("disk-hostile-{i}"),
            &[],
            &addr,
            &tls_dir,
            &["--disk", &spec(&img)],
        );
        let cfg = tls::client_config(&tls_dir, tls::Cipher::default()).unwrap();
        let mut link = Link::connect(
            addr.trim_start_matches("tls://").parse().unwrap(),
            cfg,
            Duration::from_secs(10),
        )
        .unwrap();
        link.send(&Frame::Hello {
            version: VERSION,
            mem_bytes: MEM << 20,
            session: 7,
            resume: false,
        })
        .unwrap();
        assert!(matches!(
            link.recv(Duration::from_secs(20)),
            Ok(Some(Frame::Welcome { .. }))
        ));
        link.send(&Frame::Disk(DiskFrame::Offer {
            disk: 0,
            bytes: disk_bytes,
            block: 65536,
            base: 0,
            generation: 1,
        }))
        .unwrap();
        match link.recv(Duration::from_secs(20)) {
            Ok(Some(Frame::Disk(DiskFrame::Hashes {
                disk: 0,
                receiving: true,
                holds_base: false,
                first: 0,
                hashes,
            }))) => assert_eq!(hashes.len(), 16, "{case}"),
            other => panic!("{case}: expected disk-hashes, got {other:?}"),
        }
        link.send(&frame).unwrap();
        match link.recv(Duration::from_secs(20)) {
            Ok(Some(Frame::Error(msg))) => assert!(msg.contains(want), "{case}: {msg}"),
            other => panic!("{case}: expected an error frame, got {other:?}"),
        }
        assert!(dst
            .wait_exit(Duration::from_secs(20))
            .is_some_and(|c| c != 0));
        assert!(!dst.stderr().contains("panicked"), "{}", dst.stderr());
        // The file took the offered size and nothing beyond it.
        assert_eq!(std::fs::metadata(&img).unwrap().len(), disk_bytes, "{case}");
    }
}
