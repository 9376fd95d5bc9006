//! Fault injection at scale: real `spanvmm` processes on real KVM running spanguest
//! (`workload=dirty,verify`), with faults injected at random points from a seeded RNG (the seed
//! is printed and recorded, so a campaign can be repeated):
//!
//! 1. `precopy`: pre-copy migrations whose link is cut (netlab's `DelayRelay`) or whose
//!    destination is SIGKILLed at a random time;
//! 2. `postcopy-cut`: post-copy migrations whose link goes down for a while, then comes back;
//! 3. `postcopy-death`: post-copy destinations SIGKILLed while pages still flow;
//! 4. `live-update`: live updates whose new process is SIGKILLed at a random delay;
//! 5. `snapshot`: VMMs SIGKILLed while writing a snapshot layer.
//!
//! Every run ends in a named outcome or is *lost* (the guest's memory damaged, no process
//! serving it, two running it, a process or file left behind, a state that breaks the rules of
//! docs/architecture.md and docs/live-update.md). This file is self-contained (std, libc,
//! serde_json, anyhow, netlab) so that `tests/chaos.rs` includes it for a smoke campaign.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use netlab::DelayRelay;
use serde::Serialize;
use serde_json::Value;

/// The guest every run drives: it dirties 32 MiB and checks it on `verify`.
pub const GUEST: &str = "workload=dirty,verify mib=32 rate=10000 report_ms=100";
pub const MEM_MIB: u64 = 128;

/// How many runs of each category.
#[derive(Clone, Debug, Serialize)]
pub struct Counts {
    pub precopy: usize,
    pub postcopy_cut: usize,
    pub postcopy_death: usize,
    pub live_update: usize,
    pub snapshot: usize,
}

/// What a campaign needs.
pub struct Config {
    pub spanvmm: PathBuf,
    pub guest: PathBuf,
    pub plugins: PathBuf,
    pub counts: Counts,
    pub seed: u64,
    /// Print a line per run.
    pub verbose: bool,
}

/// One run: the fault's time, what came of it, how long it took.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub run: usize,
    pub fault: String,
    pub fault_ms: u64,
    pub outcome: String,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Where the guest ran on: the largest stall it saw across the run, and its bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallCheck>,
}

/// What a busy host adds to any gap the guest sees (its vCPU thread descheduled while both
/// cores run other work): the slack on top of each bound's mechanism (as the tests' own:
/// under `stress-ng --cpu 2` with parallel tests, a guest nobody paused once stalled 0.8 s).
pub const DESCHEDULED_MS: f64 = 2500.0;
/// Missing-page faults one step of the guest's loop can wait for in a row (a verify chunk
/// looks at the clock every 16 pages, a dirty chunk every 8).
const FAULTS_PER_STEP: f64 = 24.0;

/// The guest's largest stall across a run it survived, and the bound the outcome's mechanism
/// sets (plus [`DESCHEDULED_MS`]): a stop-and-copy's downtime, a post-copy's downtime and
/// faults, a rollback's attempt, an operator's resume, the time since a snapshot's save.
#[derive(Clone, Debug, Serialize)]
pub struct StallCheck {
    pub guest_ms: f64,
    pub bound_ms: f64,
    /// What the bound is.
    pub by: String,
}

#[derive(Debug, Serialize)]
pub struct Durations {
    pub min_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub total_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Category {
    pub name: &'static str,
    pub runs: usize,
    pub survived: usize,
    pub lost: usize,
    pub outcomes: BTreeMap<String, usize>,
    pub durations: Option<Durations>,
    pub records: Vec<RunRecord>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    pub seed: u64,
    pub unix_time: u64,
    pub host_kernel: String,
    pub guest_cmdline: &'static str,
    pub memory_mib: u64,
    pub counts: Counts,
    pub categories: Vec<Category>,
    pub total_runs: usize,
    pub total_lost: usize,
    pub wall_s: f64,
    pub goal: &'static str,
}

// ---------------------------------------------------------------------------------------
// A seeded RNG (SplitMix64): the same seed injects the same faults at the same offsets.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

// ---------------------------------------------------------------------------------------
// Processes.

/// Pids of processes whose parent is `parent` (zombies included: not yet reaped).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // pid (comm) state ppid ...
            let rest = stat.rsplit(')').next().unwrap_or("");
            let mut f = rest.split_whitespace();
            let _state = f.next();
            if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
                out.push(pid);
            }
        }
    }
    out
}

/// Children of `pid`'s threads, from /proc/PID/task/*/children (cheap enough to poll).
pub fn children_fast(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Whether `pid` runs (a zombie counts as gone).
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

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a pid of a process this campaign started (directly or through a
    // VMM it started).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Reaps `pid` if it is a child of this process (an orphan adopted as subreaper); waits at
/// most `timeout` for it to end. True when it is gone.
fn reap(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut st = 0;
        // SAFETY: waitpid(2) on one pid, no hang.
        let r = unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) };
        if r == pid as i32 || (r < 0 && !pid_alive(pid)) {
            return true;
        }
        if r == 0 || pid_alive(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        return true;
    }
}

fn kill_and_reap(pid: u32) -> bool {
    sigkill(pid);
    reap(pid, Duration::from_secs(10))
}

/// Makes this process the reaper of its descendants' orphans: a live update's new process
/// outlives the old one that started it, and must still be found (and ended) here.
pub fn become_subreaper() {
    // SAFETY: prctl(2) with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// A `spanvmm run` process: its console lines and stderr collected as they come.
pub struct Vmm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    closed: Arc<Mutex<bool>>,
    /// Its stderr reached end of file (all of it is in `stderr`).
    err_closed: Arc<Mutex<bool>>,
    pub api: PathBuf,
    bin: PathBuf,
}

impl Vmm {
    pub fn start(bin: &Path, api: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(api);
        let mut child = Command::new(bin)
            .arg("run")
            .args(args)
            .args(["--serial", "stdout", "--api-socket"])
            .arg(api)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(false));
        let (l, c) = (lines.clone(), closed.clone());
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
            *c.lock().unwrap() = true;
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_closed = Arc::new(Mutex::new(false));
        let (e, ec) = (stderr.clone(), err_closed.clone());
        let err = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = e.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
            *ec.lock().unwrap() = true;
        });
        Ok(Vmm {
            child,
            lines,
            stderr,
            closed,
            err_closed,
            api: api.to_path_buf(),
            bin: bin.to_path_buf(),
        })
    }

    /// The largest stall the guest reported since line `from`, ms (0: none above its
    /// threshold).
    pub fn max_stall_ms(&self, from: usize) -> f64 {
        let lines = self.lines.lock().unwrap();
        lines[from.min(lines.len())..]
            .iter()
            .filter(|l| l.contains("SPANGUEST stall"))
            .filter_map(|l| field(l, "us"))
            .max()
            .unwrap_or(0) as f64
            / 1e3
    }

    /// The VMM's pause counter (None: it does not answer).
    pub fn pauses(&self) -> Option<u64> {
        self.status().and_then(|s| s["pauses"].as_u64())
    }

    /// Boots spanguest and waits for `ready`.
    pub fn boot(bin: &Path, api: &Path, guest: &Path) -> anyhow::Result<Self> {
        let mem = MEM_MIB.to_string();
        let vm = Self::start(
            bin,
            api,
            &[
                "--kernel",
                guest.to_str().context("guest path")?,
                "--cmdline",
                GUEST,
                "--memory",
                &mem,
            ],
        )?;
        vm.wait_line(0, "SPANGUEST ready", Duration::from_secs(60))?;
        Ok(vm)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// All of stderr, once the process has ended (its reader may lag behind the exit).
    pub fn final_stderr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !*self.err_closed.lock().unwrap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stderr()
    }

    fn tail(&self) -> String {
        let l = self.lines.lock().unwrap();
        let t = l[l.len().saturating_sub(5)..].join(" | ");
        let e = self.stderr();
        let e: Vec<&str> = e.lines().collect();
        format!(
            "console: {t}; stderr: {}",
            e[e.len().saturating_sub(5)..].join(" | ")
        )
    }

    /// Waits for a console line at index ≥ `from` containing `needle`.
    pub fn wait_line(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = {
                let g = self.lines.lock().unwrap();
                g[from.min(g.len())..]
                    .iter()
                    .find(|l| l.contains(needle))
                    .cloned()
            };
            if let Some(l) = found {
                return Ok(l);
            }
            if *self.closed.lock().unwrap() {
                bail!("no {needle:?}: the console closed ({})", self.tail());
            }
            if Instant::now() > deadline {
                bail!("no {needle:?} within {timeout:?} ({})", self.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if Instant::now() > deadline || !self.alive() {
                bail!("no {needle:?} on stderr ({})", self.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Console lines with `needle` since `from`.
    pub fn count_since(&self, from: usize, needle: &str) -> usize {
        let g = self.lines.lock().unwrap();
        g[from.min(g.len())..]
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        ctl(&self.bin, &self.api, args)
    }

    /// `ctl status` as JSON (None: nobody answers).
    pub fn status(&self) -> Option<Value> {
        let (ok, out) = self.ctl(&["status"]);
        if !ok {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// The guest checks its memory: bad=0 and something checked, else an error.
    pub fn verify(&self) -> anyhow::Result<String> {
        let from = self.mark();
        let (ok, out) = self.ctl(&["guest", "verify"]);
        if !ok {
            bail!("guest verify refused: {out}");
        }
        let l = self.wait_line(from, "SPANGUEST verify", Duration::from_secs(60))?;
        let bad = field(&l, "bad").context("verify line without bad=")?;
        let ok = field(&l, "ok").context("verify line without ok=")?;
        if bad != 0 || ok == 0 {
            bail!("guest memory damaged: {l}");
        }
        Ok(l)
    }

    /// The guest runs: a new `stat` line comes.
    pub fn runs(&self) -> anyhow::Result<()> {
        let from = self.mark();
        self.wait_line(from, "SPANGUEST stat", Duration::from_secs(10))
            .map(|_| ())
    }

    /// The guest does not run: no `stat` line for `ms`.
    pub fn stays_paused(&self, ms: u64) -> anyhow::Result<()> {
        let from = self.mark();
        std::thread::sleep(Duration::from_millis(ms));
        let n = self.count_since(from, "SPANGUEST stat");
        if n > 0 {
            bail!("the guest ran while it should be paused ({n} stat lines)");
        }
        Ok(())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to end by itself: its exit code (None: signal or timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>, ()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Ok(s.code());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spanvmm ctl --api-socket API ARGS`: (success, stdout+stderr).
pub fn ctl(bin: &Path, api: &Path, args: &[&str]) -> (bool, String) {
    match Command::new(bin)
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let mut s = String::from_utf8_lossy(&out.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.success(), s)
        }
        Err(e) => (false, format!("spawn ctl: {e}")),
    }
}

/// `ctl` on a thread of its own, so the caller can inject a fault meanwhile.
fn ctl_bg(bin: &Path, api: &Path, args: Vec<String>) -> std::thread::JoinHandle<(bool, String)> {
    let (bin, api) = (bin.to_path_buf(), api.to_path_buf());
    std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&bin, &api, &a)
    })
}

pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sleeps until `ms` after `t0`.
fn sleep_until(t0: Instant, ms: u64) {
    let at = t0 + Duration::from_millis(ms);
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// The last non-empty line (after the last carriage return of a progress display).
fn first_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .rsplit('\r')
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(300)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The campaign.

struct Ctx<'a> {
    cfg: &'a Config,
    rng: Rng,
    root: PathBuf,
    tls: PathBuf,
    me: u32,
    n: usize,
    /// The last unfaulted live update: ms from the new process's appearance to the answer.
    last_window_ms: u64,
    /// The run's stall check, for its record.
    stall: Option<StallCheck>,
}

impl Ctx<'_> {
    fn bin(&self) -> &Path {
        &self.cfg.spanvmm
    }
    fn plugin(&self, f: &str) -> String {
        self.cfg.plugins.join(f).display().to_string()
    }
    /// Records the guest's largest stall in `vm` since line `from` against `mechanism_ms`
    /// (what `by` says bounds it) plus [`DESCHEDULED_MS`].
    fn check_stall(&mut self, vm: &Vmm, from: usize, mechanism_ms: f64, by: &str) {
        self.stall = Some(StallCheck {
            guest_ms: vm.max_stall_ms(from),
            bound_ms: mechanism_ms + DESCHEDULED_MS,
            by: by.to_string(),
        });
    }
    /// A fresh directory for one run.
    fn run_dir(&mut self, tag: &str) -> anyhow::Result<PathBuf> {
        self.n += 1;
        let d = self.root.join(format!("{tag}-{}", self.n));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
    /// No process of this campaign left but `expected` (ctl clients are all joined by now),
    /// and no zombie under those; adopted orphans that ended are reaped.
    fn no_leftovers(&self, expected: &[u32]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let extra: Vec<u32> = children_of(self.me)
                .into_iter()
                .filter(|p| !expected.contains(p))
                .filter(|&p| {
                    if pid_alive(p) {
                        true
                    } else {
                        // A zombie: an adopted orphan, or a child whose handle is gone.
                        reap(p, Duration::ZERO);
                        false
                    }
                })
                .collect();
            // A VMM kept running must not keep dead children unreaped either (zombies).
            let zombies: Vec<u32> = expected
                .iter()
                .filter(|&&p| pid_alive(p))
                .flat_map(|&p| children_fast(p))
                .filter(|&k| !pid_alive(k) && Path::new(&format!("/proc/{k}")).exists())
                .collect();
            if extra.is_empty() && zombies.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline && !zombies.is_empty() {
                bail!("zombies left under the VMM: {zombies:?}");
            }
            if Instant::now() > deadline {
                let names: Vec<String> = extra
                    .iter()
                    .map(|p| {
                        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                        format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
                    })
                    .collect();
                bail!("processes left behind: {}", names.join("; "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs the whole campaign and returns its report (lost runs are in it, not errors).
pub fn campaign(cfg: &Config) -> anyhow::Result<Report> {
    become_subreaper();
    let t0 = Instant::now();
    let root = std::env::temp_dir().join(format!("spanvmm-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let tls = root.join("tls");
    let out = Command::new(&cfg.spanvmm)
        .args(["migrate-certs", "--out"])
        .arg(&tls)
        .output()?;
    if !out.status.success() {
        bail!(
            "migrate-certs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!("chaos: seed {} (repeat with --seed {})", cfg.seed, cfg.seed);
    let mut ctx = Ctx {
        cfg,
        rng: Rng::new(cfg.seed),
        root: root.clone(),
        tls,
        me: std::process::id(),
        n: 0,
        last_window_ms: 0,
        stall: None,
    };
    let c = cfg.counts.clone();
    let categories = vec![
        run_category(&mut ctx, "precopy", c.precopy, precopy_series)?,
        run_category(
            &mut ctx,
            "postcopy-cut",
            c.postcopy_cut,
            postcopy_cut_series,
        )?,
        run_category(
            &mut ctx,
            "postcopy-death",
            c.postcopy_death,
            postcopy_death_series,
        )?,
        run_category(&mut ctx, "live-update", c.live_update, live_update_series)?,
        run_category(&mut ctx, "snapshot", c.snapshot, snapshot_series)?,
    ];
    let total_lost = categories.iter().map(|c| c.lost).sum();
    let total_runs = categories.iter().map(|c| c.runs).sum();
    // Lost runs keep their directories for a look; a clean campaign leaves nothing.
    if total_lost == 0 {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(Report {
        benchmark: "chaos",
        seed: cfg.seed,
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        guest_cmdline: GUEST,
        memory_mib: MEM_MIB,
        counts: c,
        categories,
        total_runs,
        total_lost,
        wall_s: t0.elapsed().as_secs_f64(),
        goal: "0 lost: every run ends running (bad=0), rolled back, completed or in doubt per the rules",
    })
}

/// A category's runs: `series` runs them all (it may keep a VM across runs) and returns one
/// record per run; an outcome starting with `lost` is a loss.
type Series = fn(&mut Ctx, usize, &mut dyn FnMut(RunRecord)) -> anyhow::Result<()>;

fn run_category(
    ctx: &mut Ctx,
    name: &'static str,
    runs: usize,
    series: Series,
) -> anyhow::Result<Category> {
    let mut records = Vec::new();
    let verbose = ctx.cfg.verbose;
    if runs > 0 {
        series(ctx, runs, &mut |r: RunRecord| {
            if verbose {
                eprintln!(
                    "chaos {name} #{}: {} at {} ms -> {} ({:.0} ms){}{}",
                    r.run,
                    r.fault,
                    r.fault_ms,
                    r.outcome,
                    r.duration_ms,
                    r.stall.as_ref().map_or(String::new(), |s| format!(
                        "; guest stall {:.1} ms (bound {:.0} ms: {})",
                        s.guest_ms, s.bound_ms, s.by
                    )),
                    if r.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.detail)
                    }
                );
            }
            records.push(r);
        })?;
    }
    let lost = records
        .iter()
        .filter(|r| r.outcome.starts_with("lost"))
        .count();
    let mut outcomes = BTreeMap::new();
    for r in &records {
        *outcomes.entry(r.outcome.clone()).or_insert(0) += 1;
    }
    let mut d: Vec<f64> = records.iter().map(|r| r.duration_ms).collect();
    d.sort_by(f64::total_cmp);
    let durations = (!d.is_empty()).then(|| Durations {
        min_ms: d[0],
        median_ms: d[d.len() / 2],
        p90_ms: d[((d.len() as f64 - 1.0) * 0.9).round() as usize],
        max_ms: d[d.len() - 1],
        total_s: d.iter().sum::<f64>() / 1e3,
    });
    Ok(Category {
        name,
        runs: records.len(),
        survived: records.len() - lost,
        lost,
        outcomes,
        durations,
        records,
    })
}

/// One run's result: Ok(outcome, detail) or a loss.
type RunResult = anyhow::Result<(String, String)>;

fn record(
    ctx: &mut Ctx,
    run: usize,
    fault: String,
    fault_ms: u64,
    t0: Instant,
    r: RunResult,
) -> RunRecord {
    let stall = ctx.stall.take();
    let (outcome, detail) = match r {
        Ok((o, d)) => (o, d),
        Err(e) => ("lost".to_string(), format!("{e:#}")),
    };
    RunRecord {
        run,
        fault,
        fault_ms,
        outcome,
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
        detail,
        stall,
    }
}

// ---------------------------------------------------------------------------------------
// 1. Pre-copy: link cut or destination killed.

/// A destination waiting on `port` with its API on `dir/dst.sock`.
fn destination(ctx: &Ctx, dir: &Path, port: u16, extra: &[&str]) -> anyhow::Result<Vmm> {
    let addr = format!("tls://127.0.0.1:{port}");
    let mut args = vec!["--incoming", &addr, "--tls-dir", ctx.tls.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut d = Vmm::start(ctx.bin(), &dir.join("dst.sock"), &args)?;
    d.wait_stderr("waiting for an incoming migration", Duration::from_secs(20))?;
    Ok(d)
}

fn relay_to(port: u16) -> anyhow::Result<DelayRelay> {
    Ok(DelayRelay::start(
        "127.0.0.1:0".parse()?,
        format!("127.0.0.1:{port}").parse()?,
        Duration::ZERO,
        4 << 20,
    )?)
}

fn migrate_args(ctx: &Ctx, to: &str, plugin: &str, bw: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "migrate",
        "--to",
        to,
        "--plugin",
        &ctx.plugin(plugin),
        "--tls-dir",
        ctx.tls.to_str().unwrap(),
        "--max-bandwidth",
        bw,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn precopy_series(
    ctx: &mut Ctx,
    runs: usize,
    out: &mut dyn FnMut(RunRecord),
) -> anyhow::Result<()> {
    // One source serves run after run while migrations fail (it runs on); a new one is booted
    // when a migration completed or the source was lost.
    let src_dir = ctx.run_dir("precopy-src")?;
    let mut src: Option<Vmm> = None;
    for run in 0..runs {
        let t0 = Instant::now();
        let kill = ctx.rng.coin();
        let at = ctx.rng.range(0, 900);
        let fault = if kill {
            "destination SIGKILL"
        } else {
            "link cut"
        }
        .to_string();
        let dir = ctx.run_dir("precopy")?;
        let r = precopy_run(ctx, &src_dir, &mut src, &dir, kill, at);
        let lost = r.is_err();
        out(record(ctx, run, fault, at, t0, r));
        if lost {
            src = None; // boot afresh; the lost run's directory stays
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&src_dir);
    Ok(())
}

fn precopy_run(
    ctx: &mut Ctx,
    src_dir: &Path,
    src: &mut Option<Vmm>,
    dir: &Path,
    kill: bool,
    at: u64,
) -> RunResult {
    if src.is_none() {
        *src = Some(Vmm::boot(
            ctx.bin(),
            &src_dir.join("src.sock"),
            &ctx.cfg.guest,
        )?);
    }
    ctx.stall = None;
    let s = src.as_mut().unwrap();
    let (from, pauses) = (s.mark(), s.pauses());
    let port = free_port()?;
    let mut dst = destination(ctx, dir, port, &[])?;
    let relay = relay_to(port)?;
    let report = dir.join("report.json");
    let mut args = migrate_args(
        ctx,
        &format!("tls://{}", relay.addr()),
        "precopy.wasm",
        "60M",
        &[],
    );
    args.extend(["--report".into(), report.display().to_string()]);
    let t0 = Instant::now();
    let job = ctl_bg(ctx.bin(), &s.api, args);
    sleep_until(t0, at);
    // A migration already over is not faulted: killing its destination would kill the
    // guest's only home.
    let finished_first = job.is_finished();
    if finished_first {
    } else if kill {
        dst.kill();
    } else {
        relay.set_down(true);
    }
    let (ok, msg) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    let took_ms = t0.elapsed().as_secs_f64() * 1e3;
    let rep: Option<Value> = std::fs::read_to_string(&report)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let result = rep
        .as_ref()
        .and_then(|r| r["result"].as_str())
        .unwrap_or("")
        .to_string();
    let outcome;
    if ok {
        // Done before the fault landed: the guest runs at the destination only.
        if kill && !finished_first {
            // Done between the check and the kill: the guest died with its only home.
            drop((dst, relay));
            *src = None;
            ctx.no_leftovers(&[])?;
            return Ok(("completed-then-killed (race)".into(), first_line(&msg)));
        }
        match s.wait_exit(Duration::from_secs(40)) {
            Ok(Some(0)) => {}
            other => bail!("the source did not exit 0 after success: {other:?}"),
        }
        dst.runs()?;
        dst.verify()?;
        let downtime = rep.as_ref().and_then(|r| r["downtime_ms"].as_f64());
        ctx.check_stall(&dst, 0, downtime.unwrap_or(0.0), "the downtime");
        let (ok, m) = dst.ctl(&["shutdown"]);
        if !ok {
            bail!("destination shutdown: {m}");
        }
        dst.wait_exit(Duration::from_secs(10))
            .map_err(|_| anyhow!("the destination did not shut down"))?;
        *src = None;
        outcome = "completed-before-fault".to_string();
    } else if result == "in-doubt" {
        // The link was lost at the hand-over: the source keeps the guest paused.
        let st = s.status().context("the source does not answer")?;
        if st["state"] != "paused" {
            bail!("in doubt but the source is {}: {st}", st["state"]);
        }
        s.stays_paused(300)?;
        if !kill {
            // The destination may have the commit: it runs the guest, and only it.
            match dst.wait_exit(Duration::from_secs(5)) {
                Ok(_) => {}
                Err(()) => {
                    dst.runs()?;
                    dst.verify()?;
                    // It runs there since the commit, inside the attempt.
                    let window = t0.elapsed().as_secs_f64() * 1e3;
                    ctx.check_stall(&dst, 0, window, "the attempt (committed, in doubt)");
                    drop(relay);
                    let _ = s.ctl(&["shutdown"]);
                    let _ = s.wait_exit(Duration::from_secs(10));
                    let _ = dst.ctl(&["shutdown"]);
                    let _ = dst.wait_exit(Duration::from_secs(10));
                    *src = None;
                    ctx.no_leftovers(&[])?;
                    return Ok(("in-doubt-destination-runs".into(), String::new()));
                }
            }
        }
        // The destination is gone and never ran the guest on: the operator resumes here.
        let (ok, m) = s.ctl(&["resume"]);
        if !ok {
            bail!("resume after in-doubt: {m}");
        }
        let window = t0.elapsed().as_secs_f64() * 1e3;
        s.runs()?;
        s.verify()?;
        ctx.check_stall(s, from, window, "the operator's resume");
        outcome = "in-doubt-resumed".to_string();
    } else {
        // Failed before the hand-over: the source runs on, the destination leaves (or, cut
        // before any peer got through its handshake, goes on waiting for one).
        let refused_at_connect = msg.contains("cannot reach the destination");
        if !msg.contains("runs on at the source") && !refused_at_connect {
            bail!("ctl migrate's failure does not say the VM runs on: {msg}");
        }
        let st = s.status().context("the source does not answer")?;
        if st["state"] != "running" {
            bail!(
                "the source is {} after a failed migration: {st}",
                st["state"]
            );
        }
        s.runs()?;
        s.verify()?;
        // Never paused, or paused for a switch-over rolled back before `ctl` answered.
        if s.pauses() == pauses {
            ctx.check_stall(s, from, 0.0, "never paused");
        } else {
            ctx.check_stall(s, from, took_ms, "the rolled-back attempt");
        }
        let mut dest_note = "";
        if !kill {
            let wait = if refused_at_connect { 2 } else { 20 };
            match dst.wait_exit(Duration::from_secs(wait)) {
                Ok(Some(c)) if c != 0 => {}
                Err(()) => {
                    // Still there: it must still be waiting, serving its API, and leave when
                    // told to.
                    let st = dst
                        .status()
                        .context("a destination still running does not answer")?;
                    if st["state"] != "incoming" {
                        bail!("the destination runs on in state {}: {st}", st["state"]);
                    }
                    let (ok, m) = dst.ctl(&["shutdown"]);
                    if !ok {
                        bail!("a waiting destination refused to shut down: {m}");
                    }
                    match dst.wait_exit(Duration::from_secs(10)) {
                        Ok(_) => {}
                        Err(()) => bail!("a waiting destination did not shut down"),
                    }
                    dest_note = ", destination still waiting";
                }
                other => bail!(
                    "the destination did not leave with a failure: {other:?} ({})",
                    dst.tail()
                ),
            }
            if dst.api.exists() {
                bail!("the destination left its API socket {}", dst.api.display());
            }
        }
        let how = if refused_at_connect {
            "cut at connect"
        } else if kill {
            "destination killed"
        } else {
            "link cut"
        };
        outcome = format!("failed-source-runs ({how}{dest_note})");
    }
    drop(dst);
    drop(relay);
    let keep: Vec<u32> = src.iter().map(Vmm::pid).collect();
    ctx.no_leftovers(&keep)?;
    Ok((outcome, first_line(&msg)))
}

// ---------------------------------------------------------------------------------------
// 2. Post-copy: link cut then restored.

fn postcopy_cut_series(
    ctx: &mut Ctx,
    runs: usize,
    out: &mut dyn FnMut(RunRecord),
) -> anyhow::Result<()> {
    for run in 0..runs {
        let t0 = Instant::now();
        let at = ctx.rng.range(0, 1000);
        let down = ctx.rng.range(100, 1500);
        let dir = ctx.run_dir("postcopy-cut")?;
        let r = postcopy_cut_run(ctx, &dir, at, down);
        let lost = r.is_err();
        out(record(ctx, run, format!("link down {down} ms"), at, t0, r));
        if !lost {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// The bound of a post-copy's stall at its destination: the downtime, then a loop step's
/// faults at the worst fault's latency (a fault that waited out a cut included).
fn postcopy_bound_ms(rep: &Value) -> f64 {
    rep["downtime_ms"].as_f64().unwrap_or(0.0)
        + FAULTS_PER_STEP * rep["fault_latency_max_us"].as_f64().unwrap_or(0.0) / 1e3
}

fn postcopy_cut_run(ctx: &mut Ctx, dir: &Path, at: u64, down: u64) -> RunResult {
    ctx.stall = None;
    let mut src = Vmm::boot(ctx.bin(), &dir.join("src.sock"), &ctx.cfg.guest)?;
    let port = free_port()?;
    let mut dst = destination(ctx, dir, port, &[])?;
    let relay = relay_to(port)?;
    let report = dir.join("report.json");
    let mut args = migrate_args(
        ctx,
        &format!("tls://{}", relay.addr()),
        "postcopy.wasm",
        "20M",
        &[],
    );
    args.extend(["--report".into(), report.display().to_string()]);
    let job = ctl_bg(ctx.bin(), &src.api, args);
    dst.wait_stderr("the guest runs here", Duration::from_secs(30))?;
    let t0 = Instant::now();
    sleep_until(t0, at);
    let cut = !job.is_finished();
    if cut {
        relay.set_down(true);
        std::thread::sleep(Duration::from_millis(down));
        relay.set_down(false);
    }
    let (ok, msg) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    if !ok {
        bail!("post-copy did not recover: {}", first_line(&msg));
    }
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let recoveries = rep["recoveries"].as_u64().unwrap_or(0);
    match src.wait_exit(Duration::from_secs(40)) {
        Ok(Some(0)) => {}
        other => bail!("the source did not exit 0 after success: {other:?}"),
    }
    if src.api.exists() {
        bail!("the source left its API socket");
    }
    dst.runs()?;
    let v = dst.verify()?;
    ctx.check_stall(&dst, 0, postcopy_bound_ms(&rep), "downtime + faults");
    let (ok, m) = dst.ctl(&["shutdown"]);
    if !ok {
        bail!("destination shutdown: {m}");
    }
    dst.wait_exit(Duration::from_secs(10))
        .map_err(|_| anyhow!("the destination did not shut down"))?;
    drop((src, dst, relay));
    ctx.no_leftovers(&[])?;
    let outcome = if !cut {
        "completed-before-fault"
    } else if recoveries > 0 {
        "recovered"
    } else {
        // The cut hit between the last page and the end (nothing to recover) or the link
        // was idle: the migration completed without reconnecting.
        "completed-without-reconnect"
    };
    Ok((outcome.into(), format!("recoveries={recoveries}; {v}")))
}

// ---------------------------------------------------------------------------------------
// 2b. Post-copy: the destination dies.

fn postcopy_death_series(
    ctx: &mut Ctx,
    runs: usize,
    out: &mut dyn FnMut(RunRecord),
) -> anyhow::Result<()> {
    for run in 0..runs {
        let t0 = Instant::now();
        let at = ctx.rng.range(0, 1000);
        let dir = ctx.run_dir("postcopy-death")?;
        let r = postcopy_death_run(ctx, &dir, at);
        let lost = r.is_err();
        out(record(ctx, run, "destination SIGKILL".into(), at, t0, r));
        if !lost {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

fn postcopy_death_run(ctx: &mut Ctx, dir: &Path, at: u64) -> RunResult {
    ctx.stall = None;
    let mut src = Vmm::boot(ctx.bin(), &dir.join("src.sock"), &ctx.cfg.guest)?;
    let from = src.mark();
    let port = free_port()?;
    let mut dst = destination(ctx, dir, port, &[])?;
    let report = dir.join("report.json");
    let mut args = migrate_args(
        ctx,
        &format!("tls://127.0.0.1:{port}"),
        "postcopy.wasm",
        "20M",
        &["--recovery-timeout-ms", "1500"],
    );
    args.extend(["--report".into(), report.display().to_string()]);
    let started = Instant::now();
    let job = ctl_bg(ctx.bin(), &src.api, args);
    dst.wait_stderr("the guest runs here", Duration::from_secs(30))?;
    let t0 = Instant::now();
    sleep_until(t0, at);
    if job.is_finished() {
        // Every page arrived before the fault: killing the destination now would kill the
        // guest's only home, not test the migration.
        let (ok, msg) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
        if !ok {
            bail!("post-copy failed without a fault: {}", first_line(&msg));
        }
        let _ = src.wait_exit(Duration::from_secs(40));
        dst.verify()?;
        if let Ok(rep) = std::fs::read_to_string(&report)
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(serde_json::from_str::<Value>(&t)?))
        {
            ctx.check_stall(&dst, 0, postcopy_bound_ms(&rep), "downtime + faults");
        }
        let _ = dst.ctl(&["shutdown"]);
        let _ = dst.wait_exit(Duration::from_secs(10));
        drop((src, dst));
        ctx.no_leftovers(&[])?;
        return Ok(("completed-before-fault".into(), String::new()));
    }
    dst.kill();
    let (ok, msg) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    if ok {
        // Finished between the check and the kill: the guest died with its only home.
        drop((src, dst));
        ctx.no_leftovers(&[])?;
        return Ok(("completed-then-killed (race)".into(), first_line(&msg)));
    }
    let rep: Value = serde_json::from_str(
        &std::fs::read_to_string(&report).context("no report after a failed post-copy")?,
    )?;
    if rep["source_vm"] != "paused" {
        bail!("report source_vm={} (want paused): {rep}", rep["source_vm"]);
    }
    if !msg.contains("paused at the source") || msg.contains("runs on at the source") {
        bail!("ctl migrate misreports where the guest is: {msg}");
    }
    if !src.alive() {
        bail!("the source died: the guest is lost");
    }
    let st = src.status().context("the source does not answer")?;
    if st["state"] != "paused" {
        bail!(
            "the source is {} after the destination died: {st}",
            st["state"]
        );
    }
    // Paused means paused: not resumed on its own (and the destination is dead: no split
    // brain).
    src.stays_paused(500)?;
    // The operator, knowing the destination dead, resumes it here; the memory is whole.
    let (ok, m) = src.ctl(&["resume"]);
    if !ok {
        bail!("resume: {m}");
    }
    let window = started.elapsed().as_secs_f64() * 1e3;
    src.runs()?;
    let v = src.verify()?;
    ctx.check_stall(&src, from, window, "the operator's resume");
    let _ = src.ctl(&["shutdown"]);
    let _ = src.wait_exit(Duration::from_secs(10));
    drop((src, dst));
    ctx.no_leftovers(&[])?;
    Ok((
        "reported-source-paused, resumed by operator".into(),
        format!("{}; {v}", rep["result"]),
    ))
}

// ---------------------------------------------------------------------------------------
// 3. Live update: the new process killed.

fn live_update_series(
    ctx: &mut Ctx,
    runs: usize,
    out: &mut dyn FnMut(RunRecord),
) -> anyhow::Result<()> {
    let dir = ctx.run_dir("live-update")?;
    let mut vm: Option<Vmm> = None;
    // The process serving the VM now (the first one, or a live update's new one).
    let mut serving = 0u32;
    // Calibration: three updates without a fault measure how long the new process lives
    // before the old one has its confirmation; kills are drawn over 1.5 times the median, so
    // that they land before, around and past the commit point (the shortest alone put every
    // kill before it: all rollbacks; a single slow measurement put half past the end).
    let mut seen = Vec::new();
    for _ in 0..3 {
        if let Err(e) = live_update_run(ctx, &dir, &mut vm, &mut serving, None) {
            // The VM may live in a process this campaign did not start (a new one that took
            // it over): end it too, not only the first.
            if serving != 0 {
                kill_and_reap(serving);
            }
            bail!("live-update calibration failed: {e:#}");
        }
        seen.push(ctx.last_window_ms.max(4));
    }
    seen.sort_unstable();
    let window = seen[1] * 3 / 2;
    eprintln!(
        "chaos live-update: the new process lives {seen:?} ms before confirming; kills drawn in [0, {window}] ms"
    );
    for run in 0..runs {
        let t0 = Instant::now();
        let at = ctx.rng.range(0, window);
        let r = live_update_run(ctx, &dir, &mut vm, &mut serving, Some(at));
        let lost = r.is_err();
        out(record(
            ctx,
            run,
            "new process SIGKILL (ms after it appeared)".into(),
            at,
            t0,
            r,
        ));
        if lost {
            if serving != 0 {
                kill_and_reap(serving);
            }
            vm = None;
        }
    }
    if serving != 0 {
        kill_and_reap(serving);
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One live update; `at`: kill the new process that many ms after it appeared (None: no
/// fault, the window is measured into `ctx.last_window_ms`).
fn live_update_run(
    ctx: &mut Ctx,
    dir: &Path,
    vm: &mut Option<Vmm>,
    serving: &mut u32,
    at: Option<u64>,
) -> RunResult {
    if vm.is_none() {
        let v = Vmm::boot(ctx.bin(), &dir.join("vm.sock"), &ctx.cfg.guest)?;
        *serving = v.pid();
        *vm = Some(v);
    }
    ctx.stall = None;
    let v = vm.as_ref().unwrap();
    let old = *serving;
    let from = v.mark();
    let started = Instant::now();
    let bin = ctx.bin().display().to_string();
    let job = ctl_bg(
        ctx.bin(),
        &v.api,
        vec!["live-update".into(), "--binary".into(), bin],
    );
    // Find the new process (a child of the serving one), then kill it at the drawn time.
    let mut new_pid = None;
    let mut seen = Instant::now();
    let mut killed = false;
    loop {
        if new_pid.is_none() {
            new_pid = children_fast(old).into_iter().find(|&p| pid_alive(p));
            seen = Instant::now();
        }
        if let (Some(p), Some(at)) = (new_pid, at) {
            if seen.elapsed() >= Duration::from_millis(at) {
                // Only while the hand-over is under way: once the old process has gone, the
                // new one is the guest's only home.
                if !job.is_finished() && pid_alive(old) {
                    sigkill(p);
                    killed = true;
                }
                break;
            }
        }
        if job.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let (ok, msg) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    let answered_ms = started.elapsed().as_secs_f64() * 1e3;
    if at.is_none() {
        ctx.last_window_ms = seen.elapsed().as_millis() as u64;
    }
    let fault_note = if killed { "" } else { " (no kill: done first)" };
    if ok {
        let answered: Option<u32> = serde_json::from_str::<Value>(&msg)
            .ok()
            .and_then(|j| j["new_pid"].as_u64())
            .map(|p| p as u32)
            .or(new_pid);
        let st = v.status();
        if killed {
            // The kill landed after the old process had its confirmation: the guest's only
            // home is gone (inherent to killing a VMM; not a hand-over fault).
            if st.is_none() {
                *vm = None;
                *serving = 0;
                reap(answered.unwrap_or(0), Duration::from_secs(5));
                let _ = reap(old, Duration::from_secs(5));
                ctx.no_leftovers(&[])?;
                return Ok(("completed-then-killed (race)".into(), first_line(&msg)));
            }
        }
        let st = st.context("nobody serves the VM after a completed live update")?;
        let pid = st["pid"].as_u64().unwrap_or(0) as u32;
        if Some(pid) != answered || pid == old {
            bail!("completed but pid {pid} serves (new {answered:?}, old {old}): {st}");
        }
        if !reap(old, Duration::from_secs(10)) {
            bail!("the old process {old} still runs after completion: two processes");
        }
        if st["state"] != "running" {
            bail!("completed but the guest is {}", st["state"]);
        }
        v.runs()?;
        let vl = v.verify()?;
        // The hand-over's pause, as the old process measured it.
        let pause = serde_json::from_str::<Value>(&msg)
            .ok()
            .and_then(|j| j["pause_ms"].as_f64());
        match pause {
            Some(p) => ctx.check_stall(v, from, p, "the hand-over's pause"),
            None => ctx.check_stall(v, from, answered_ms, "the update (no pause_ms)"),
        }
        *serving = pid;
        ctx.no_leftovers(&[v.pid(), pid])?;
        return Ok((format!("completed{fault_note}"), vl));
    }
    // Failed: rollback or in doubt, both in the old process; rolled back before `ctl`
    // answered, or resumed by the operator.
    let mut resumed_ms = answered_ms;
    if !pid_alive(old) {
        bail!("the live update failed and the old process is gone: {msg}");
    }
    if let Some(p) = new_pid {
        if !reap(p, Duration::from_secs(10)) {
            bail!("the new process {p} still runs after a failed update: {msg}");
        }
    }
    let st = v.status().context("the old process does not answer")?;
    if st["pid"].as_u64() != Some(u64::from(old)) {
        bail!("failed update but another process serves: {st}");
    }
    let outcome = if st.get("in_doubt").is_some_and(|d| !d.is_null()) {
        if st["state"] != "paused" {
            bail!("in doubt but the guest is {}: {st}", st["state"]);
        }
        if !(msg.contains("in doubt") && msg.contains("--force")) {
            bail!("the in-doubt answer does not say what to do: {msg}");
        }
        v.stays_paused(300)?;
        let (ok, m) = v.ctl(&["resume"]);
        if ok || !m.contains("in doubt") {
            bail!("a plain resume of an in-doubt VM was not refused: {m}");
        }
        // The new process is dead (killed above): it cannot run the guest any more.
        let (ok, m) = v.ctl(&["resume", "--force"]);
        if !ok {
            bail!("resume --force: {m}");
        }
        resumed_ms = started.elapsed().as_secs_f64() * 1e3;
        "in-doubt, resumed with --force"
    } else {
        if st["state"] != "running" {
            bail!("rolled back but the guest is {}: {st}", st["state"]);
        }
        "rollback"
    };
    v.runs()?;
    let vl = v.verify()?;
    ctx.check_stall(v, from, resumed_ms, "the failed update's attempt");
    ctx.no_leftovers(&[v.pid(), old])?;
    Ok((
        format!("{outcome}{fault_note}"),
        format!("{}; {vl}", first_line(&msg)),
    ))
}

// ---------------------------------------------------------------------------------------
// 4. Snapshot writer killed.

fn snapshot_series(
    ctx: &mut Ctx,
    runs: usize,
    out: &mut dyn FnMut(RunRecord),
) -> anyhow::Result<()> {
    for run in 0..runs {
        let t0 = Instant::now();
        // Where to kill, in thousandths (scaled in the run by the first layer's timings).
        let frac = ctx.rng.range(0, 999);
        let kind = match ctx.rng.range(0, 2) {
            0 => "incremental",
            1 => "incremental --live",
            _ => "full",
        };
        let dir = ctx.run_dir("snapshot")?;
        let mut at = 0;
        let r = snapshot_run(ctx, &dir, kind, frac, &mut at);
        let lost = r.is_err();
        out(record(
            ctx,
            run,
            format!("VMM SIGKILL during {kind} layer"),
            at,
            t0,
            r,
        ));
        if !lost {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// Restores `layer` and checks the guest: Ok(Ok((verify line, largest stall ms))) if it
/// runs clean, Ok(Err) with the refusal when it is refused, Err when it runs damaged or
/// neither.
fn restore_check(
    ctx: &Ctx,
    dir: &Path,
    layer: &Path,
    tag: &str,
) -> anyhow::Result<Result<(String, f64), String>> {
    let mut vm = Vmm::start(
        ctx.bin(),
        &dir.join(format!("{tag}.sock")),
        &["--restore", layer.to_str().unwrap()],
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if vm.count_since(0, "SPANGUEST stat") > 0 {
            break;
        }
        if let Ok(Some(s)) = vm.child.try_wait() {
            if s.success() {
                bail!("restore of {} exited 0 without running", layer.display());
            }
            let err = vm.final_stderr();
            let msg = first_line(&err);
            if msg.is_empty() {
                bail!("restore of {} refused without a message", layer.display());
            }
            if vm.api.exists() {
                bail!("a refused restore left its API socket");
            }
            return Ok(Err(msg));
        }
        if Instant::now() > deadline {
            bail!(
                "restore of {} neither ran nor ended ({})",
                layer.display(),
                vm.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let v = vm
        .verify()
        .with_context(|| format!("restored {}", layer.display()))?;
    let stall = vm.max_stall_ms(0);
    let _ = vm.ctl(&["shutdown"]);
    let _ = vm.wait_exit(Duration::from_secs(10));
    Ok(Ok((v, stall)))
}

/// Kills the VMM during the second layer: `frac` < 200 before its directory appears, else at
/// a point of the first layer's writing time after it appears.
fn snapshot_run(ctx: &mut Ctx, dir: &Path, kind: &str, frac: u64, at: &mut u64) -> RunResult {
    ctx.stall = None;
    let mut vm = Vmm::boot(ctx.bin(), &dir.join("vm.sock"), &ctx.cfg.guest)?;
    let d1 = dir.join("d1");
    let d2 = dir.join("d2");
    let cp = ctx.plugin("checkpoint.wasm");
    // The first layer, timed: from the call to its directory appearing (attaching the
    // service, the first round), and from there to the end (writing the layer).
    let t1 = Instant::now();
    let job = ctl_bg(
        ctx.bin(),
        &vm.api,
        // --track: the service keeps the dirty log from this layer on, for an incremental
        // one on top of it.
        [
            "snapshot",
            "create",
            "--plugin",
            &cp,
            "--dir",
            d1.to_str().unwrap(),
            "--track",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let mut appear_ms = None;
    while !job.is_finished() {
        if appear_ms.is_none() && d1.exists() {
            appear_ms = Some(t1.elapsed().as_millis() as u64);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let (ok, m) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    if !ok {
        bail!("the first layer failed: {m}");
    }
    let done_ms = t1.elapsed().as_millis() as u64;
    let appear_ms = appear_ms.unwrap_or(done_ms);
    let write_ms = (done_ms - appear_ms).max(1);
    // Let the guest dirty some pages for the incremental layer.
    vm.runs()?;
    let mut args: Vec<String> = ["snapshot", "create", "--plugin", &cp, "--dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(d2.display().to_string());
    if kind != "full" {
        args.extend(["--incremental-of".into(), d1.display().to_string()]);
    }
    if kind.ends_with("--live") {
        args.push("--live".into());
    }
    let t0 = Instant::now();
    let job = ctl_bg(ctx.bin(), &vm.api, args);
    if frac < 200 {
        // One run in five: before the layer's directory exists (attach, first round).
        sleep_until(t0, appear_ms * frac / 200);
    } else {
        // Else while it is written: a random point of the first layer's writing time after
        // the new directory appears.
        while !d2.exists() && !job.is_finished() {
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(write_ms * (frac - 200) / 800));
    }
    *at = t0.elapsed().as_millis() as u64;
    let written_first = job.is_finished();
    vm.kill();
    let (_, second) = job.join().map_err(|_| anyhow!("ctl thread panicked"))?;
    drop(vm);
    // The previous chain still restores. Its guest sees the time since the save as one
    // gap: never more than passed since the layer was begun.
    let (d1v, stall) = match restore_check(ctx, dir, &d1, "r1")? {
        Ok(v) => v,
        Err(why) => bail!("the previous layer no longer restores: {why}"),
    };
    ctx.stall = Some(StallCheck {
        guest_ms: stall,
        bound_ms: t1.elapsed().as_secs_f64() * 1e3 + DESCHEDULED_MS,
        by: "the time since the save".into(),
    });
    // The torn layer is refused with a message, or restores whole.
    let outcome = if !d2.exists() {
        if written_first {
            bail!("the second layer was not written: {}", first_line(&second));
        }
        "no-layer-yet; previous restores"
    } else {
        match restore_check(ctx, dir, &d2, "r2")? {
            Ok(_) if written_first => "layer-complete-restores; previous restores",
            Ok(_) => "torn-layer-restores-clean; previous restores",
            Err(why) => {
                ctx.no_leftovers(&[])?;
                return Ok(("torn-layer-refused; previous restores".into(), why));
            }
        }
    };
    ctx.no_leftovers(&[])?;
    Ok((outcome.into(), d1v))
}

// ---------------------------------------------------------------------------------------

/// The table printed after a campaign.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "chaos campaign, seed {}: {} runs, {} lost, {:.0} s\n",
        r.seed, r.total_runs, r.total_lost, r.wall_s
    );
    s += &format!(
        "{:<16} {:>5} {:>9} {:>5} {:>10} {:>10}  outcomes\n",
        "category", "runs", "survived", "lost", "median ms", "max ms"
    );
    for c in &r.categories {
        let (med, max) = c
            .durations
            .as_ref()
            .map(|d| (d.median_ms, d.max_ms))
            .unwrap_or((0.0, 0.0));
        let outcomes: Vec<String> = c
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        s += &format!(
            "{:<16} {:>5} {:>9} {:>5} {:>10.0} {:>10.0}  {}\n",
            c.name,
            c.runs,
            c.survived,
            c.lost,
            med,
            max,
            outcomes.join("; ")
        );
    }
    for c in &r.categories {
        for rec in c.records.iter().filter(|r| r.outcome.starts_with("lost")) {
            s += &format!(
                "LOST {} #{} ({} at {} ms): {}\n",
                c.name, rec.run, rec.fault, rec.fault_ms, rec.detail
            );
        }
    }
    s
}
