//! Shared end-to-end test harness: spawns real `spanvmm` processes on real KVM with spanguest,
//! collects the guest's serial lines, and drives the control API through `spanvmm ctl`.

#![allow(dead_code)]

pub mod lan;
pub mod wan;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The spanvmm binary under test.
pub fn spanvmm() -> &'static str {
    env!("CARGO_BIN_EXE_spanvmm")
}

/// What a busy host adds to any gap the guest sees (its vCPU thread descheduled while both
/// cores run other work): the slack every stall bound allows on top of its mechanism's share.
/// Under `stress-ng --cpu 2` with parallel tests, a guest nobody paused once stalled 0.8 s.
pub const DESCHEDULED_MS: u64 = 2500;

/// Missing-page faults one step of the guest's loop can wait for in a row: a verify chunk
/// looks at the clock every 16 pages, a dirty chunk every 8 (spanguest's `workload.rs`). A
/// post-copy or parked page's stall is at most this many of the worst fault's latency.
pub const FAULTS_PER_STEP: u64 = 24;

/// spanguest, built by `guest-images/build.sh`.
pub fn guest_elf() -> PathBuf {
    let p = std::env::var_os("SPANGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-images/spanguest.elf")
        });
    assert!(
        p.exists(),
        "spanguest not found at {} — build it with guest-images/build.sh",
        p.display()
    );
    p
}

/// A fresh scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("spanvmm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// A running `spanvmm run` process.
pub struct VmProcess {
    child: Child,
    out: Arc<(Mutex<Output>, Condvar)>,
    pub api: PathBuf,
    pub dir: TempDir,
    stderr: Arc<Mutex<String>>,
    /// The process's stderr reached its end (everything it wrote is in `stderr`).
    stderr_closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Parses `key=value` fields of a spanguest line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A numeric field of a spanguest line.
pub fn num(line: &str, key: &str) -> u64 {
    fields(line)
        .get(key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not a number in {line:?}"))
}

impl VmProcess {
    /// Starts `spanvmm run` with `args` plus a console on stdout and an API socket.
    pub fn start(tag: &str, args: &[&str]) -> Self {
        Self::start_wrapped(tag, &[], args)
    }

    /// Like [`VmProcess::start`], run under `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_wrapped(tag: &str, wrapper: &[&str], args: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let api = dir.path().join("api.sock");
        Self::start_full(dir, wrapper, args, api.clone(), api)
    }

    /// Like [`VmProcess::start`] for a VMM that sees its file system elsewhere (a jail): it is
    /// given `--api-socket api_arg`, the test reaches the socket at `api`; `dir` is the scratch
    /// directory the test keeps with the process.
    pub fn start_full(
        dir: TempDir,
        wrapper: &[&str],
        args: &[&str],
        api_arg: PathBuf,
        api: PathBuf,
    ) -> Self {
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(spanvmm());
                c
            }
            None => Command::new(spanvmm()),
        };
        let mut child = cmd
            .arg("run")
            .args(args)
            .args(["--serial", "stdout", "--api-socket"])
            .arg(&api_arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spanvmm");
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let o = out.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (m, c) = &*o;
                m.lock().unwrap().lines.push(line);
                c.notify_all();
            }
            let (m, c) = &*o;
            m.lock().unwrap().closed = true;
            c.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        let child_err = child.stderr.take().unwrap();
        let stderr_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed = stderr_closed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(child_err).lines().map_while(Result::ok) {
                e.lock().unwrap().push_str(&line);
                e.lock().unwrap().push('\n');
            }
            closed.store(true, std::sync::atomic::Ordering::Release);
        });
        VmProcess {
            child,
            out,
            api,
            dir,
            stderr,
            stderr_closed,
        }
    }

    /// Boots spanguest with `cmdline` on `mem_mib` MiB and `vcpus` vCPUs, waiting for `ready`.
    pub fn boot(tag: &str, cmdline: &str, mem_mib: u64, vcpus: usize) -> Self {
        Self::boot_wrapped(tag, &[], cmdline, mem_mib, vcpus)
    }

    /// Like [`VmProcess::boot`], run under `wrapper` (e.g. `ip netns exec NS`).
    pub fn boot_wrapped(
        tag: &str,
        wrapper: &[&str],
        cmdline: &str,
        mem_mib: u64,
        vcpus: usize,
    ) -> Self {
        let kernel = guest_elf();
        let mem = mem_mib.to_string();
        let n = vcpus.to_string();
        let vm = Self::start_wrapped(
            tag,
            wrapper,
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--cmdline",
                cmdline,
                "--memory",
                &mem,
                "--vcpus",
                &n,
            ],
        );
        vm.wait_line("SPANGUEST ready", Duration::from_secs(60));
        vm
    }

    /// Index of the next line to be printed (for waiting on lines after some point).
    pub fn mark(&self) -> usize {
        self.out.0.lock().unwrap().lines.len()
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.0.lock().unwrap().lines.clone()
    }

    /// Waits for a line at index ≥ `from` that contains `needle`.
    pub fn wait_line_from(&self, from: usize, needle: &str, timeout: Duration) -> String {
        self.wait_matching(from, timeout, needle, |l| l.contains(needle))
    }

    /// Waits for any line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_line_from(0, needle, timeout)
    }

    /// Waits for `n` distinct lines at index ≥ `from` containing `needle`.
    pub fn wait_lines_from(
        &self,
        from: usize,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<String> = self.lines()[from.min(self.mark())..]
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{n} lines with {needle:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_matching(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let (m, c) = &*self.out;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(l) = g.lines.iter().skip(from).find(|l| f(l)) {
                return l.clone();
            }
            if g.lines.iter().any(|l| l.contains("SPANGUEST error")) || g.closed {
                drop(g);
                self.fail(what);
            }
            let now = Instant::now();
            if now > deadline {
                drop(g);
                self.fail(what);
            }
            g = c.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn fail(&self, what: &str) -> ! {
        let lines = self.lines();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        panic!(
            "waiting for {what}: not seen.\n--- guest output (last 30 lines) ---\n{tail}\n--- spanvmm stderr ---\n{}",
            self.stderr.lock().unwrap()
        );
    }

    /// Runs `spanvmm ctl` against this VM; returns (success, stdout+stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        ctl(&self.api, args)
    }

    /// Like [`VmProcess::ctl`] but the call must succeed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl(args);
        assert!(ok, "spanvmm ctl {args:?} failed: {out}");
        out
    }

    /// Asks the guest to verify its memory and returns the `verify` lines of every vCPU.
    pub fn verify(&self, vcpus: usize) -> Vec<String> {
        let from = self.mark();
        self.ctl_ok(&["guest", "verify"]);
        self.wait_lines_from(from, "SPANGUEST verify", vcpus, Duration::from_secs(60))
    }

    /// The largest stall the guest reported since line `from`, µs (0: none above its
    /// `stall_us` threshold).
    pub fn max_stall_since(&self, from: usize) -> u64 {
        self.lines()[from.min(self.mark())..]
            .iter()
            .filter(|l| l.contains("SPANGUEST stall"))
            .map(|l| num(l, "us"))
            .max()
            .unwrap_or(0)
    }

    /// The guest's largest stall since line `from`, printed, and asserted below `bound_ms`:
    /// the bound the operation's mechanism sets (each caller says which). Returns it, µs.
    pub fn assert_stall_below(&self, from: usize, bound_ms: u64, what: &str) -> u64 {
        self.assert_stall_in(from..self.mark(), bound_ms, what)
    }

    /// [`Self::assert_stall_below`] over the lines of `range` only.
    pub fn assert_stall_in(&self, range: std::ops::Range<usize>, bound_ms: u64, what: &str) -> u64 {
        let lines = self.lines();
        let stalls: Vec<&String> = lines[range.start.min(lines.len())..range.end.min(lines.len())]
            .iter()
            .filter(|l| l.contains("SPANGUEST stall"))
            .collect();
        let stall = stalls.iter().map(|l| num(l, "us")).max().unwrap_or(0);
        eprintln!(
            "{what}: largest guest stall {:.1} ms (bound {bound_ms} ms)",
            stall as f64 / 1e3
        );
        assert!(
            stall < bound_ms * 1000,
            "{what}: the guest stalled {stall} µs (bound {bound_ms} ms): {stalls:?}"
        );
        stall
    }

    /// After an operation that failed and left the guest running here (begun at line `from`,
    /// the VMM's pause counter `pauses_before` then, `took` from its start to the failure's
    /// answer): a guest the VMM never paused saw nothing but a busy host's gaps; one paused
    /// for a switch-over that was rolled back saw at most that attempt (the VMM resumed it
    /// before answering). Call it once a `stat` line came after the failure. Returns the
    /// largest stall, µs.
    pub fn assert_ran_on(
        &self,
        from: usize,
        pauses_before: u64,
        took: Duration,
        what: &str,
    ) -> u64 {
        let paused = self.pauses() - pauses_before;
        let bound = if paused == 0 {
            DESCHEDULED_MS
        } else {
            took.as_millis() as u64 + DESCHEDULED_MS
        };
        self.assert_stall_below(from, bound, &format!("{what} (paused {paused} times)"))
    }

    /// The VMM's pause counter (`ctl status`'s `pauses`): how often it stopped the vCPUs.
    pub fn pauses(&self) -> u64 {
        let out = self.ctl_ok(&["status"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("status ({e}): {out}"));
        v["pauses"]
            .as_u64()
            .unwrap_or_else(|| panic!("no pauses: {v}"))
    }

    /// Like [`Self::max_stall_since`], less the part of each stall the guest spent in its own
    /// disk requests (`disk_us`: a host flush it waited for, not a gap in its running).
    pub fn max_stall_without_disk_since(&self, from: usize) -> u64 {
        self.lines()[from.min(self.mark())..]
            .iter()
            .filter(|l| l.contains("SPANGUEST stall"))
            .map(|l| {
                let f = fields(l);
                let us = num(l, "us");
                let disk = f.get("disk_us").map_or(0, |_| num(l, "disk_us"));
                assert!(disk <= us, "disk wait longer than the stall: {l}");
                us - disk
            })
            .max()
            .unwrap_or(0)
    }

    /// Asserts every vCPU's verify line says bad=0 and checked something.
    pub fn assert_verify_clean(&self, vcpus: usize) {
        for l in self.verify(vcpus) {
            assert_eq!(num(&l, "bad"), 0, "guest memory damaged: {l}");
            assert!(num(&l, "ok") > 0, "verify checked nothing: {l}");
        }
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Its last lines may still be on their way to `stderr` (a process it handed
                // its stderr to, by a live update, may hold the pipe: not waited for long).
                let read_by = Instant::now() + Duration::from_secs(2);
                while !self
                    .stderr_closed
                    .load(std::sync::atomic::Ordering::Acquire)
                    && Instant::now() < read_by
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process now (a VMM that never serves its API, e.g. one still waiting for an
    /// incoming migration, cannot be asked for its pid at drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl VmProcess {
    /// The pid of the process serving the API now (another one after a live update).
    pub fn serving_pid(&self) -> Option<u32> {
        let (ok, out) = self.ctl(&["status"]);
        if !ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["pid"].as_u64().map(|p| p as u32)
    }

    /// The pid of the process this harness started.
    pub fn first_pid(&self) -> u32 {
        self.child.id()
    }
}

/// Whether `pid` still runs (a zombie counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        // After a live update the VM lives in a process this harness did not start.
        if self.api.exists() {
            if let Some(pid) = self.serving_pid() {
                if pid != self.child.id() {
                    // SAFETY: plain kill(2) on a pid we just read from the VMM itself.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `spanvmm ctl --api-socket SOCK args...`.
pub fn ctl(api: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(spanvmm())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run spanvmm ctl");
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Runs spanvmm with `args` to completion; returns (exit code, stderr).
pub fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(spanvmm())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run spanvmm");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    // A command expected to end that runs on (a VM that should have been refused) fails the
    // test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for spanvmm") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap_or_default();
    match status {
        Some(s) => (s.code(), err),
        None => (
            None,
            format!("spanvmm {args:?} was still running after 60 s\n{err}"),
        ),
    }
}

/// A plugin built by `plugins/build.sh` into `target/plugins`.
pub fn plugin(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/plugins")
        .join(file);
    assert!(
        p.exists(),
        "{} not found — build the plugins with plugins/build.sh",
        p.display()
    );
    p.to_str().unwrap().to_string()
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a node certificate in `dir/name`, made by `spanvmm migrate-certs`.
pub fn certs(dir: &TempDir, name: &str) -> PathBuf {
    let out = dir.path().join(name);
    let (code, err) = run_to_end(&["migrate-certs", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "migrate-certs failed: {err}");
    out
}

/// Waits until `vm`'s stderr contains `needle` `n` times.
pub fn wait_stderr_n(vm: &VmProcess, needle: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while vm.stderr().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "waiting for {n}× {needle:?} on stderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `vm`'s stderr contains `needle`.
pub fn wait_stderr(vm: &VmProcess, needle: &str, timeout: Duration) {
    wait_stderr_n(vm, needle, 1, timeout)
}

/// A migration destination (`run --incoming ADDR --tls-dir TLS EXTRA...`, under `wrapper`,
/// e.g. `ip netns exec NS`), waiting for its source.
pub fn destination(
    tag: &str,
    wrapper: &[&str],
    addr: &str,
    tls: &Path,
    extra: &[&str],
) -> VmProcess {
    let mut args = vec!["--incoming", addr, "--tls-dir", tls.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vm = VmProcess::start_wrapped(tag, wrapper, &args);
    wait_stderr(
        &vm,
        "waiting for an incoming migration",
        Duration::from_secs(10),
    );
    vm
}

/// `spanvmm ctl migrate ARGS` from `src`: (success, output, report).
pub fn migrate(src: &VmProcess, args: &[&str]) -> (bool, String, Option<serde_json::Value>) {
    let report = src.dir.path().join("report.json");
    let mut a = vec!["migrate", "--report", report.to_str().unwrap()];
    a.extend_from_slice(args);
    let (ok, out) = src.ctl(&a);
    let r = std::fs::read_to_string(&report)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("the report is JSON"));
    (ok, out, r)
}

/// `ctl migrate` to `addr` with the pre-copy service over mutual TLS from `tls_dir`: the
/// migration most tests drive.
pub fn migrate_precopy(
    src: &VmProcess,
    addr: &str,
    tls_dir: &str,
) -> (bool, String, Option<serde_json::Value>) {
    let precopy = plugin("precopy.wasm");
    migrate(
        src,
        &["--to", addr, "--plugin", &precopy, "--tls-dir", tls_dir],
    )
}

/// `ctl status` as JSON.
pub fn status(vm: &VmProcess) -> serde_json::Value {
    let out = vm.ctl_ok(&["status"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// `GET path` on a VMM's API socket, as a client other than `spanvmm ctl` (None: no answer,
/// e.g. the process is gone).
pub fn api_get(api: &Path, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok()
}
