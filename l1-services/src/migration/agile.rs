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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
}

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
        })
    }

    /// Stores the current bytes of `pages` (guest page numbers; holes, pages evicted already
    /// and pages past guest memory are left out) while the guest runs; returns how many were
    /// stored.
    /// A page written meanwhile is stored as some state of it: [`Parked::evict`] finds out.
    pub fn push(&self, ram: &GuestRam, pages: &[u64]) -> Result<u64, IntermediaryError> {
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
        let mut bytes = vec![0u8; pages.len() * PAGE];
        for (i, &p) in pages.iter().enumerate() {
            ram.read(p * PAGE_SIZE, &mut bytes[i * PAGE..(i + 1) * PAGE])
                .map_err(|e| IntermediaryError::Config(e.to_string()))?;
        }
        let views: Vec<&[u8]> = bytes.chunks_exact(PAGE).collect();
        let addrs = lock(&self.push).put(&views)?;
        let mut at = lock(&self.at);
        for ((&p, page), addr) in pages.iter().zip(&views).zip(addrs) {
            at.insert(
                p,
                Stored {
                    addr,
                    sum: sum(page),
                },
            );
        }
        self.stats
            .pushed
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Ok(pages.len() as u64)
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

/// What one [`Agile::park`] did.
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
}

/// One VM's agile engine: the parked pages, the evictor and its fault thread.
pub struct Agile {
    parked: std::sync::Arc<Parked>,
    ev: std::sync::Arc<Evictor>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    parks: u64,
    paused_us: u64,
}

impl Agile {
    /// Connects to the intermediaries of `cfg` under a fresh key, registers `ram` and starts
    /// serving its evicted pages on a thread of its own.
    pub fn open(ram: &std::sync::Arc<GuestRam>, cfg: &StoreConfig) -> Result<Self, String> {
        use std::sync::Arc;
        let key = StoreKey::generate().map_err(|e| e.to_string())?;
        let parked = Arc::new(Parked::connect(cfg, &key).map_err(|e| e.to_string())?);
        let ev = Arc::new(Evictor::register(ram).map_err(|e| e.to_string())?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
            parks: 0,
            paused_us: 0,
        })
    }

    /// Parks the pages set in `bitmap`: pushed now, then evicted between `pause` and
    /// `resume` where unchanged.
    pub fn park(
        &mut self,
        bitmap: &[u64],
        pause: &mut dyn FnMut() -> Result<(), String>,
        resume: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<ParkOutcome, String> {
        let ram = self.ev.ram().clone();
        let n = ram.size() / PAGE_SIZE;
        let pages: Vec<u64> = (0..n)
            .filter(|&p| {
                bitmap
                    .get((p / 64) as usize)
                    .is_some_and(|w| w >> (p % 64) & 1 == 1)
            })
            .collect();
        let mut out = ParkOutcome::default();
        if pages.is_empty() {
            return Ok(out);
        }
        let t = std::time::Instant::now();
        out.pushed = self.parked.push(&ram, &pages).map_err(|e| e.to_string())?;
        out.push_us = t.elapsed().as_micros() as u64;
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
        }
    }

    /// The evicted pages' addresses, for a migration.
    pub fn located(&self) -> Vec<(u64, ContentHash)> {
        self.parked.located(self.ev.ram())
    }

    /// Brings every page back and unregisters. (Dropped without it, the fault thread keeps
    /// serving: no page is lost.)
    pub fn close(self) -> Result<(), String> {
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
        match std::sync::Arc::try_unwrap(ev) {
            Ok(ev) => ev.finish(&mut &*parked).map_err(|e| e.to_string()),
            Err(_) => Err("agile: the evictor is still in use".into()),
        }
    }
}
