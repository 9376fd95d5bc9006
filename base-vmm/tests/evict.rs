//! Evicting the cold pages of a running VM: real KVM, spanguest's `dirty,verify` with a small
//! working set in a large region. The cold part is stored in a file on tmpfs (the store),
//! dropped from the VM's memfd, and comes back through the userfaultfd as the guest (and KVM
//! on its behalf: code, page tables) touches it; an on-demand verify reads every page.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base_vmm::boot::EntryPreference;
use base_vmm::cpu::CpuTemplate;
use base_vmm::devices::pv::GuestCommand;
use base_vmm::evict::Evictor;
use base_vmm::memory::PAGE_SIZE;
use base_vmm::page_server::{Fetched, PageError, PageSource};
use base_vmm::vmm::{VmConfig, Vmm};

const T: Duration = Duration::from_secs(60);

fn guest_elf() -> PathBuf {
    let p = std::env::var_os("SPANGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-images/spanguest.elf")
        });
    assert!(
        p.exists(),
        "spanguest not found at {} — build it with guest-images/build.sh",
        p.display()
    );
    p
}

/// The serial console's lines so far.
fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Whole lines only: the last may be half written.
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole.lines().map(str::to_owned).collect()
}

/// Waits for a line holding `what` after the first `from` lines; returns it.
fn wait_line(path: &Path, from: usize, what: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = lines(path)
            .into_iter()
            .skip(from)
            .find(|l| l.contains(what))
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no `{what}` from the guest");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn num(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// The store: pages at their offsets in a tmpfs file, each with its XXH3 (checked on the way
/// back: a store that returns other bytes is an error, not guest memory).
struct FileStore {
    file: File,
    sums: Mutex<HashMap<u64, u64>>,
}

impl FileStore {
    fn put(&self, p: u64, page: &[u8]) {
        self.file.write_all_at(page, p * PAGE_SIZE).unwrap();
        self.sums
            .lock()
            .unwrap()
            .insert(p, xxhash_rust::xxh3::xxh3_64(page));
    }

    fn holds(&self, p: u64, page: &[u8]) -> bool {
        self.sums.lock().unwrap().get(&p) == Some(&xxhash_rust::xxh3::xxh3_64(page))
    }
}

impl PageSource for &FileStore {
    fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
        self.file
            .read_exact_at(buf, run.start * PAGE_SIZE)
            .map_err(|e| PageError::Source(e.to_string()))?;
        for (i, page) in buf.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = run.start + i as u64;
            if !self.holds(p, page) {
                return Err(PageError::Source(format!(
                    "page {p}: the store's copy is bad"
                )));
            }
        }
        Ok(Fetched::Here)
    }
}

/// Stops the fault server when the scope's body ends, a failed assertion included: the scope
/// would otherwise wait for the server for ever (a hang instead of a failure).
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn cold_pages_leave_a_running_vm_and_come_back_on_touch() {
    const MIB: u64 = 96;
    const WSS: u64 = 8;
    let dir = tempdir();
    let serial = dir.join("serial");
    let cfg = VmConfig {
        kernel: guest_elf(),
        cmdline: format!("workload=dirty,verify mib={MIB} wss={WSS} rate=50000 report_ms=200"),
        initrd: None,
        mem_mib: 128,
        vcpus: 1,
        serial: serial.display().to_string(),
        entry: EntryPreference::Direct,
        start_paused: false,
        cpu_template: CpuTemplate::Host,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let (events, _events_rx) = std::sync::mpsc::channel();
    let vmm = Vmm::boot(&cfg, events).unwrap();
    // The workload's memory is written once the first stat comes.
    wait_line(&serial, 0, "SPANGUEST stat");
    let ctl = vmm.control().clone();
    let ram = ctl.ram().clone();
    let pages = ram.size() / PAGE_SIZE;
    let ev = Evictor::register(&ram).unwrap();
    let store = FileStore {
        file: File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("store"))
            .unwrap(),
        sums: Mutex::default(),
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| ev.serve_until(&mut &store, &stop));
        let _stop_on_exit = StopOnExit(&stop);
        // Cold: not dirtied for a second.
        ctl.set_dirty_logging(true).unwrap();
        ctl.harvest_dirty().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let dirty = ctl.harvest_dirty().unwrap();
        let is_dirty = |p: u64| {
            dirty
                .get((p / 64) as usize)
                .is_some_and(|w| w >> (p % 64) & 1 == 1)
        };
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut cold = 0;
        for (a, b) in ram.memfd_data_runs(0, pages) {
            for p in (a..b).filter(|&p| !is_dirty(p)) {
                ram.read(p * PAGE_SIZE, &mut page).unwrap();
                store.put(p, &page);
                cold += 1;
            }
        }
        let before = ram.allocated_bytes();
        // Stored while the guest ran; dropped only if unchanged since, the guest paused.
        let t = Instant::now();
        assert!(ctl.pause().unwrap());
        let r = ev.evict(0..pages, &mut |p, bytes| store.holds(p, bytes));
        assert!(ctl.resume().unwrap());
        let paused = t.elapsed();
        let r = r.unwrap();
        let after = ram.allocated_bytes();
        let rep = ev.report();
        eprintln!(
            "cold {cold} pages stored; evicted {} (changed {}) with the guest paused {paused:?}; \
             memfd {before} -> {after} bytes; {rep:?}",
            r.evicted, r.changed
        );
        let cold_set = (MIB - WSS) * 256;
        assert!(r.evicted >= cold_set * 95 / 100, "{r:?}");
        assert!(r.evicted <= cold, "{r:?}");
        assert!(
            before - after >= r.evicted * PAGE_SIZE * 9 / 10,
            "memfd {before} -> {after} for {} pages evicted",
            r.evicted
        );
        // The guest keeps running on its hot set (its code and page tables come back first).
        let from = lines(&serial).len();
        let s1 = wait_line(&serial, from, "SPANGUEST stat");
        let from = lines(&serial).len();
        let s2 = wait_line(&serial, from, "SPANGUEST stat");
        assert!(num(&s2, "dirtied") > num(&s1, "dirtied"), "{s1} / {s2}");
        // Every written page checked: the cold ones come back from the store, intact.
        let from = lines(&serial).len();
        vmm.guest_command(GuestCommand::Verify).unwrap();
        let v = wait_line(&serial, from, "SPANGUEST verify");
        assert_eq!(num(&v, "bad"), 0, "guest memory damaged: {v}");
        assert!(num(&v, "ok") > 0, "{v}");
        let rep = ev.report();
        eprintln!("after verify: {rep:?}");
        assert!(rep.faulted_in >= cold_set * 95 / 100, "{rep:?}");
        assert!(
            rep.fault_runs > 0 && rep.fault_runs <= rep.faulted_in,
            "{rep:?}"
        );
        assert_eq!(rep.clobbered, 0, "{rep:?}");
        assert_eq!(rep.evicted_now, rep.evicted - rep.faulted_in, "{rep:?}");
        // Paused (its faults served first), the rest comes back and the evictor lets go.
        ctl.pause().unwrap();
        stop.store(true, Ordering::Release);
        server.join().unwrap().unwrap();
        // Read with the guest paused and the server stopped: while the guest runs, a page
        // faulted in between the two reads makes them differ.
        assert_eq!(ram.evicted_pages(), ev.report().evicted_now);
    });
    ev.finish(&mut &store).unwrap();
    assert_eq!(ram.evicted_pages(), 0);
    ctl.resume().unwrap();
    let from = lines(&serial).len();
    vmm.guest_command(GuestCommand::Verify).unwrap();
    let v = wait_line(&serial, from, "SPANGUEST verify");
    assert_eq!(num(&v, "bad"), 0, "{v}");
    vmm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("spanvmm-evict-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
