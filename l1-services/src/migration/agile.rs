//! Agile migration's host side (issue #18 item 4): a running VM's cold pages parked in the
//! intermediaries (the Scatter-Gather store, [`PageStore`]: content-addressed Redis, MAC'd,
//! optionally encrypted and replicated) and dropped from its memory by base-vmm's
//! [`Evictor`]; a touch brings a page back from the intermediaries through the evictor's
//! fault service, with [`Parked`] as its page source.
//!
//! Two steps, so that the guest is paused only for the second: [`Parked::push`] stores the
//! current bytes of the chosen pages while the guest runs, and remembers each page's content
//! address and an XXH3-128 of what was stored; [`Parked::evict`], with the vCPUs paused,
//! drops the pages whose bytes still hash to what was stored (the rest were written since:
//! they stay). Which pages are cold, and when, is a policy's (`plugins/agile`).
//!
//! Pages are never deleted from the intermediaries (they are shared by content and expire);
//! the page → address map stays here, on the host that trusts it, and is what a later
//! migration sends instead of the pages (`located` records).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base_vmm::evict::{EvictError, Evicted, Evictor};
use base_vmm::memory::{GuestRam, PAGE_SIZE};
use base_vmm::page_server::{Fetched, PageError, PageSource};
use serde::Serialize;

use super::intermediary::{ContentHash, IntermediaryError, PageStore, StoreConfig, StoreKey};

const PAGE: usize = PAGE_SIZE as usize;

/// What the host knows of a parked page.
#[derive(Debug, Clone, Copy)]
struct Stored {
    /// Content address at the intermediaries.
    addr: ContentHash,
    /// XXH3-128 of the bytes stored: the cheap check of "unchanged since", made while the
    /// guest is paused (SHA-256 of every candidate there would lengthen the pause ~10×).
    sum: u128,
}

/// Counters.
#[derive(Debug, Default)]
pub struct ParkedStats {
    /// Pages pushed to the intermediaries (bytes read from the guest and `put`).
    pub pushed: AtomicU64,
    /// Store reads on behalf of faults (pages).
    pub fetched: AtomicU64,
}

/// Counters, as reported.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ParkedReport {
    /// Pages pushed.
    pub pushed: u64,
    /// Pages read back from the intermediaries.
    pub fetched: u64,
    /// Pages the store holds for this VM (pushed, at their last push).
    pub parked: u64,
    /// Dedup hits at the intermediaries (pages not sent again).
    pub dedup_hits: u64,
    /// Bytes sent to the intermediaries.
    pub wire_out: u64,
    /// Bytes read from them.
    pub wire_in: u64,
}

/// A VM's pages at the intermediaries: the store (one connection set for pushes, one for
/// faults, so a fault never waits behind a push batch) and the page → address map.
pub struct Parked {
    push: Mutex<PageStore>,
    fault: Mutex<PageStore>,
    at: Mutex<HashMap<u64, Stored>>,
    stats: ParkedStats,
    /// The key and the store, for a migration's `store` record (the destination reads the
    /// parked pages under the same key).
    key: StoreKey,
    cfg: StoreConfig,
}

/// Pages a push stores per `put` (4 MiB): progress shows between them, and a cancel (the
/// engine closing) is seen.
const PUSH_CHUNK: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn sum(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

impl Parked {
    /// Connects to the intermediaries of `cfg` (twice) under `key`.
    pub fn connect(cfg: &StoreConfig, key: &StoreKey) -> Result<Self, IntermediaryError> {
        Ok(Parked {
            push: Mutex::new(PageStore::connect(cfg.clone(), key)?),
            fault: Mutex::new(PageStore::connect(cfg.clone(), key)?),
            at: Mutex::default(),
            stats: ParkedStats::default(),
            key: key.clone(),
            cfg: cfg.clone(),
        })
    }

    /// The `store` record a migration sends before the `located` records of these pages:
    /// the same intermediaries and key, the destination's gather capped at `gather_rate`
    /// bytes/s (0: uncapped).
    pub fn store_record(&self, gather_rate: u64) -> super::wire::Store {
        super::wire::Store {
            key: self.key.clone(),
            encrypt: self.cfg.encrypt,
            cluster: self.cfg.cluster,
            replicas: self.cfg.replicas as u8,
            ttl_secs: self.cfg.ttl_secs.min(u32::MAX as u64) as u32,
            intermediaries: self.cfg.intermediaries.clone(),
            auth: self.cfg.auth.clone(),
            gather_rate,
        }
    }

    /// The store's configuration and key (Scatter-Gather scatters a VM with parked pages
    /// to the same store, so that one `store` record covers both).
    pub fn store(&self) -> (StoreConfig, StoreKey) {
        (self.cfg.clone(), self.key.clone())
    }

    /// The content address of each of `pages` as last pushed (None: never pushed). Only an
    /// evicted page's address is sure to be its content: the caller asks for those.
    pub fn addresses(&self, pages: &[u64]) -> Vec<Option<ContentHash>> {
        let at = lock(&self.at);
        pages.iter().map(|p| at.get(p).map(|s| s.addr)).collect()
    }

    /// Stores the current bytes of `pages` (guest page numbers; holes, pages evicted already
    /// and pages past guest memory are left out) while the guest runs; returns how many were
    /// stored.
    /// A page written meanwhile is stored as some state of it: [`Parked::evict`] finds out.
    pub fn push(&self, ram: &GuestRam, pages: &[u64]) -> Result<u64, IntermediaryError> {
        self.push_with(ram, pages, &AtomicU64::new(0), &AtomicBool::new(false))
    }

    /// [`Parked::push`] by chunks of [`PUSH_CHUNK`] pages, counting the pages stored into
    /// `done` as it goes and stopping early (with the pages stored so far) once `cancel`.
    pub fn push_with(
        &self,
        ram: &GuestRam,
        pages: &[u64],
        done: &AtomicU64,
        cancel: &AtomicBool,
    ) -> Result<u64, IntermediaryError> {
        let n = ram.size() / PAGE_SIZE;
        let mut pages: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&p| p < n && !ram.is_evicted(p))
            .collect();
        pages.sort_unstable();
        pages.dedup();
        // Only pages holding data: reading a hole would allocate it (a zero page, for nothing).
        if let (Some(&lo), Some(&hi)) = (pages.first(), pages.last()) {
            let data = ram.memfd_data_runs(lo, hi + 1);
            let mut runs = data.iter().peekable();
            pages.retain(|&p| {
                while runs.peek().is_some_and(|&&(_, b)| b <= p) {
                    runs.next();
                }
                runs.peek().is_some_and(|&&(a, _)| a <= p)
            });
        }
        let mut bytes = vec![0u8; pages.len().min(PUSH_CHUNK) * PAGE];
        let mut stored = 0;
        for chunk in pages.chunks(PUSH_CHUNK) {
            if cancel.load(Ordering::Acquire) {
                break;
            }
            let bytes = &mut bytes[..chunk.len() * PAGE];
            for (i, &p) in chunk.iter().enumerate() {
                ram.read(p * PAGE_SIZE, &mut bytes[i * PAGE..(i + 1) * PAGE])
                    .map_err(|e| IntermediaryError::Config(e.to_string()))?;
            }
            let views: Vec<&[u8]> = bytes.chunks_exact(PAGE).collect();
            let addrs = lock(&self.push).put(&views)?;
            let mut at = lock(&self.at);
            for ((&p, page), addr) in chunk.iter().zip(&views).zip(addrs) {
                at.insert(
                    p,
                    Stored {
                        addr,
                        sum: sum(page),
                    },
                );
            }
            drop(at);
            let n = chunk.len() as u64;
            stored += n;
            self.stats.pushed.fetch_add(n, Ordering::Relaxed);
            done.fetch_add(n, Ordering::Relaxed);
        }
        Ok(stored)
    }

    /// Evicts the pushed pages of `run` that still hold what was pushed. Call it with the
    /// vCPUs and devices paused (see [`Evictor::evict`]).
    pub fn evict(&self, ev: &Evictor, run: Range<u64>) -> Result<Evicted, EvictError> {
        // `at` is taken per page, inside the evictor's lock, as the fault service takes it
        // (holding it around `evict` would invert that order).
        ev.evict(run, &mut |p, bytes| {
            let want = lock(&self.at).get(&p).map(|s| s.sum);
            want == Some(sum(bytes))
        })
    }

    /// The content address of every evicted page, in page order: what a migration sends
    /// instead of the page.
    pub fn located(&self, ram: &GuestRam) -> Vec<(u64, ContentHash)> {
        let at = lock(&self.at);
        let mut v: Vec<(u64, ContentHash)> = at
            .iter()
            .filter(|&(&p, _)| ram.is_evicted(p))
            .map(|(&p, s)| (p, s.addr))
            .collect();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    }

    /// The counters.
    pub fn report(&self) -> ParkedReport {
        let (push, fault) = (lock(&self.push).stats(), lock(&self.fault).stats());
        let wire = |f: fn(&super::intermediary::IntermediaryStats) -> u64| {
            push.intermediaries.iter().map(f).sum::<u64>()
                + fault.intermediaries.iter().map(f).sum::<u64>()
        };
        ParkedReport {
            pushed: self.stats.pushed.load(Ordering::Relaxed),
            fetched: self.stats.fetched.load(Ordering::Relaxed),
            parked: lock(&self.at).len() as u64,
            dedup_hits: push.dedup_hits(),
            wire_out: wire(|i| i.wire_out),
            wire_in: wire(|i| i.wire_in),
        }
    }
}

/// The evictor's page source: an evicted page read back from the intermediaries (its MAC
/// and content address checked by the store; garbage is an error, never guest memory).
impl PageSource for &Parked {
    fn fetch(&mut self, run: Range<u64>, buf: &mut [u8]) -> Result<Fetched, PageError> {
        let addrs = {
            let at = lock(&self.at);
            run.clone()
                .map(|p| {
                    at.get(&p).map(|s| s.addr).ok_or_else(|| {
                        PageError::Source(format!("page {p} is not at the intermediaries"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let pages = lock(&self.fault)
            .get(&addrs)
            .map_err(|e| PageError::Source(e.to_string()))?;
        for (out, page) in buf.chunks_exact_mut(PAGE).zip(&pages) {
            out.copy_from_slice(page);
        }
        self.stats
            .fetched
            .fetch_add(run.end - run.start, Ordering::Relaxed);
        Ok(Fetched::Here)
    }
}

/// The `agile` interface's configuration (JSON, kebab-case).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgileConfig {
    /// Redis servers, `ip:port`.
    pub intermediaries: Vec<String>,
    /// Copies of each page (consecutive intermediaries).
    #[serde(default = "one")]
    pub replicas: usize,
    /// Encrypt pages (the MAC is always there).
    #[serde(default)]
    pub encrypt: bool,
    /// Lifetime of a stored page, seconds.
    #[serde(default = "hour")]
    pub ttl_secs: u64,
}

fn one() -> usize {
    1
}

fn hour() -> u64 {
    3600
}

impl AgileConfig {
    /// Parses and checks `json`.
    pub fn parse(json: &str) -> Result<StoreConfig, String> {
        let c: AgileConfig =
            serde_json::from_str(json).map_err(|e| format!("agile configuration: {e}"))?;
        let addrs = c
            .intermediaries
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| format!("agile configuration: intermediary {a:?}: {e}"))
            })
            .collect::<Result<Vec<std::net::SocketAddr>, String>>()?;
        if addrs.is_empty() {
            return Err("agile configuration: no intermediaries".into());
        }
        if c.replicas == 0 || c.replicas > addrs.len() {
            return Err(format!(
                "agile configuration: replicas {} must be 1..={}",
                c.replicas,
                addrs.len()
            ));
        }
        let mut s = StoreConfig::new(addrs);
        s.replicas = c.replicas;
        s.encrypt = c.encrypt;
        s.ttl_secs = c.ttl_secs;
        Ok(s)
    }
}

/// What one park did (its last step, [`Agile::park`] returning [`ParkStep::Done`]).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ParkOutcome {
    /// Pages pushed to the intermediaries.
    pub pushed: u64,
    /// Pages evicted.
    pub evicted: u64,
    /// Pages written since their push: left in.
    pub changed: u64,
    /// How long the guest was paused, µs.
    pub paused_us: u64,
    /// How long the push took, µs.
    pub push_us: u64,
}

/// Where a park is: [`Agile::park`]'s answer.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ParkStep {
    /// No park in progress, none started (an empty bitmap).
    Idle,
    /// The push runs in the background (the guest runs, the VMM answers).
    Pushing {
        /// Pages chosen.
        pages: u64,
        /// Pages stored so far.
        pushed: u64,
    },
    /// The park completed in this call (the guest was paused for its eviction).
    Done(ParkOutcome),
}

/// The park in progress: its push, on a thread of its own.
struct ParkJob {
    pages: Vec<u64>,
    pushed: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, String>>,
    started: std::time::Instant,
}

/// The park in progress, as reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParkProgress {
    /// Pages chosen.
    pub pages: u64,
    /// Pages pushed so far.
    pub pushed: u64,
    /// The push has ended (the next `park` call evicts).
    pub pushed_all: bool,
    /// Since the park began, ms.
    pub elapsed_ms: u64,
}

/// The `agile` interface's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgileReport {
    /// Resident vs evicted, faults.
    #[serde(flatten)]
    pub evict: base_vmm::evict::EvictReport,
    /// The intermediaries' side.
    pub store: ParkedReport,
    /// Parks done.
    pub parks: u64,
    /// Guest pause for parks, in all, µs.
    pub paused_us: u64,
    /// The park in progress, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub park: Option<ParkProgress>,
    /// The last park completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_park: Option<ParkOutcome>,
}

/// One VM's agile engine: the parked pages, the evictor and its fault thread.
pub struct Agile {
    parked: Arc<Parked>,
    ev: Arc<Evictor>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    job: Option<ParkJob>,
    parks: u64,
    paused_us: u64,
    last: Option<ParkOutcome>,
}

impl Agile {
    /// Connects to the intermediaries of `cfg` under a fresh key, registers `ram` and starts
    /// serving its evicted pages on a thread of its own.
    pub fn open(ram: &Arc<GuestRam>, cfg: &StoreConfig) -> Result<Self, String> {
        let key = StoreKey::generate().map_err(|e| e.to_string())?;
        let parked = Arc::new(Parked::connect(cfg, &key).map_err(|e| e.to_string())?);
        let ev = Arc::new(Evictor::register(ram).map_err(|e| match e {
            // Another userfaultfd holds guest memory: an incoming post-copy or gather still
            // fills it. The service may open again once that has completed.
            EvictError::Uffd(base_vmm::uffd::UffdError::Sys { ref err, .. })
                if err.raw_os_error() == Some(libc::EBUSY) =>
            {
                format!("{e}: guest memory is still being filled by an incoming migration; retry once it has completed")
            }
            e => e.to_string(),
        })?);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, e, s) = (parked.clone(), ev.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("agile-fault".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                if let Err(err) = e.serve_until(&mut &*p, &s) {
                    // A faulting vCPU waits for a page that cannot come: stop here rather
                    // than let the guest run on memory that is not its own.
                    eprintln!("spanvmm: agile: {err}; stopping the VM");
                    std::process::exit(3);
                }
            })
            .map_err(|e| format!("agile: cannot start the fault thread: {e}"))?;
        Ok(Agile {
            parked,
            ev,
            stop,
            thread: Some(thread),
            job: None,
            parks: 0,
            paused_us: 0,
            last: None,
        })
    }

    /// Parks the pages set in `bitmap`, in steps, so that the caller (the VMM's main loop)
    /// is never held for the push: the first call starts pushing their bytes to the
    /// intermediaries on a thread of its own (the guest runs) and returns at once; later
    /// calls (with an empty bitmap) report the push's progress, and the first call after
    /// the push has ended evicts, between `pause` and `resume`, the pages still holding what
    /// was pushed. A non-empty bitmap while a park is in progress is refused.
    pub fn park(
        &mut self,
        bitmap: &[u64],
        pause: &mut dyn FnMut() -> Result<(), String>,
        resume: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<ParkStep, String> {
        let any = bitmap.iter().any(|&w| w != 0);
        if let Some(job) = &self.job {
            if any {
                return Err(format!(
                    "agile park: a park is in progress ({} of {} pages pushed)",
                    job.pushed.load(Ordering::Relaxed),
                    job.pages.len()
                ));
            }
            if !job.thread.is_finished() {
                return Ok(ParkStep::Pushing {
                    pages: job.pages.len() as u64,
                    pushed: job.pushed.load(Ordering::Relaxed),
                });
            }
            let job = self.job.take().expect("checked above");
            let push_us = job.started.elapsed().as_micros() as u64;
            let pushed = job
                .thread
                .join()
                .map_err(|_| "agile park: the push thread panicked".to_string())??;
            return self.evict(&job.pages, pause, resume).map(|mut out| {
                out.pushed = pushed;
                out.push_us = push_us;
                self.last = Some(out.clone());
                ParkStep::Done(out)
            });
        }
        if !any {
            return Ok(ParkStep::Idle);
        }
        let ram = self.ev.ram().clone();
        let n = ram.size() / PAGE_SIZE;
        let pages: Vec<u64> = (0..n)
            .filter(|&p| {
                bitmap
                    .get((p / 64) as usize)
                    .is_some_and(|w| w >> (p % 64) & 1 == 1)
            })
            .collect();
        let pushed = Arc::new(AtomicU64::new(0));
        let cancel = Arc::new(AtomicBool::new(false));
        let (parked, chosen, done, stop) = (
            self.parked.clone(),
            pages.clone(),
            pushed.clone(),
            cancel.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("agile-push".into())
            .spawn(move || {
                base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Migration);
                parked
                    .push_with(&ram, &chosen, &done, &stop)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| format!("agile park: cannot start the push thread: {e}"))?;
        let step = ParkStep::Pushing {
            pages: pages.len() as u64,
            pushed: 0,
        };
        self.job = Some(ParkJob {
            pages,
            pushed,
            cancel,
            thread,
            started: std::time::Instant::now(),
        });
        Ok(step)
    }

    /// Evicts the pushed `pages` still holding what was pushed, the guest paused.
    fn evict(
        &mut self,
        pages: &[u64],
        pause: &mut dyn FnMut() -> Result<(), String>,
        resume: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<ParkOutcome, String> {
        let mut out = ParkOutcome::default();
        if pages.is_empty() {
            return Ok(out);
        }
        let t = std::time::Instant::now();
        pause()?;
        let mut r = Ok(());
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            match self.parked.evict(&self.ev, pages[i]..pages[j - 1] + 1) {
                Ok(e) => {
                    out.evicted += e.evicted;
                    out.changed += e.changed;
                }
                Err(e) => {
                    r = Err(e.to_string());
                    break;
                }
            }
            i = j;
        }
        let resumed = resume();
        out.paused_us = t.elapsed().as_micros() as u64;
        self.parks += 1;
        self.paused_us += out.paused_us;
        r.and(resumed).map(|_| out)
    }

    /// The counters.
    pub fn report(&self) -> AgileReport {
        AgileReport {
            evict: self.ev.report(),
            store: self.parked.report(),
            parks: self.parks,
            paused_us: self.paused_us,
            park: self.job.as_ref().map(|j| ParkProgress {
                pages: j.pages.len() as u64,
                pushed: j.pushed.load(Ordering::Relaxed),
                pushed_all: j.thread.is_finished(),
                elapsed_ms: j.started.elapsed().as_millis() as u64,
            }),
            last_park: self.last.clone(),
        }
    }

    /// The evicted pages' addresses, for a migration.
    pub fn located(&self) -> Vec<(u64, ContentHash)> {
        self.parked.located(self.ev.ram())
    }

    /// The parked pages, for a migration: it sends their `located` records instead of
    /// reading them (which would bring them back).
    pub fn parked(&self) -> Arc<Parked> {
        self.parked.clone()
    }

    /// Stops the park in progress, if any (a migration starts: the push would compete with
    /// it for the source's link, and nothing may be evicted during it). Its pages stored so
    /// far stay at the intermediaries; none is evicted.
    pub fn cancel_park(&mut self) {
        self.stop_job();
    }

    /// Stops a push in progress (its pages stored so far stay at the intermediaries, none is
    /// evicted).
    fn stop_job(&mut self) {
        if let Some(job) = self.job.take() {
            job.cancel.store(true, Ordering::Release);
            let _ = job.thread.join();
        }
    }

    /// Brings every page back and unregisters. (Dropped without it, the fault thread keeps
    /// serving: no page is lost.)
    pub fn close(mut self) -> Result<(), String> {
        self.stop_job();
        let Agile {
            parked,
            ev,
            stop,
            thread,
            ..
        } = self;
        let pages = ev.ram().size() / PAGE_SIZE;
        // With the fault thread still serving: a fault meanwhile is not left waiting.
        let back = ev.bring_back(&mut &*parked, 0..pages);
        stop.store(true, Ordering::Release);
        if let Some(t) = thread {
            let _ = t.join();
        }
        back.map_err(|e| e.to_string())?;
        match Arc::try_unwrap(ev) {
            Ok(ev) => ev.finish(&mut &*parked).map_err(|e| e.to_string()),
            Err(_) => Err("agile: the evictor is still in use".into()),
        }
    }

    /// The guest has left this host (migrated away): nothing is brought back. A push in
    /// progress stops; the fault thread goes on serving until the process exits (nothing
    /// should touch the memory now, but whatever does gets its page, not a hang).
    pub fn abandon(mut self) {
        self.stop_job();
    }
}
