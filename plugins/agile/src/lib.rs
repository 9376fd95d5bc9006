//! agile: the policy of agile migration's cold-page parking; the host moves the bytes.
//!
//! On each tick the service takes the dirty bitmap and stamps every dirtied page with the
//! time; a page not dirtied for `cold_ms` and not parked yet is cold. At most `max_evict_mb`
//! of cold pages per park (and one park per `cold_ms / 4`) go to the host's `agile::park`,
//! which pushes them to the intermediaries in the background with the guest running (each
//! tick asks how far it got) and, at the tick after the push, evicts, with the guest paused,
//! those still holding what was pushed. A parked page the guest writes again comes back (the
//! host faults it in) and is hot again; it is parked again once cold.
//!
//! Parked pages survive a snapshot or a migration's state capture (the host keeps the engine
//! for this service's successor) and migrate as references. At a migration's destination the
//! host cannot open while the parked pages are still being gathered there: the service then
//! opens once it can (retried every second).
//!
//! Configuration (JSON): `{"intermediaries": ["ip:port", ...], "replicas": 1, "encrypt":
//! false, "ttl_secs": 3600, "cold_ms": 2000, "max_evict_mb": 64}`.
//!
//! Methods: `stats` → the host's report (resident and evicted pages, memfd bytes, faults,
//! fault-ins, pushed, dedup, bytes to and from the intermediaries) and this service's
//! counters (`parks`, `cold_pages` at the last scan). `park_now` parks the cold pages at once
//! (tests, benchmarks). Detaching brings every page back.

use serde::Deserialize;
use serde_json::{json, Value};
use spanvmm_sdk::{agile, export_service, host, Capability, Event, EventReply, Manifest, Service};

const PAGE: u64 = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    intermediaries: Vec<String>,
    #[serde(default = "one")]
    replicas: usize,
    #[serde(default)]
    encrypt: bool,
    #[serde(default = "hour")]
    ttl_secs: u64,
    #[serde(default = "cold")]
    cold_ms: u64,
    #[serde(default = "max_mb")]
    max_evict_mb: u64,
}

fn one() -> usize {
    1
}
fn hour() -> u64 {
    3600
}
fn cold() -> u64 {
    2000
}
fn max_mb() -> u64 {
    64
}

#[derive(Default)]
struct Agile {
    cold_ms: u64,
    max_pages: u64,
    /// Per page: when it was last dirtied (ms since attach; attach counts as a write).
    last: Vec<u32>,
    /// Pages parked and not dirtied since.
    parked: Vec<u64>,
    start_ns: u64,
    next_scan_ms: u64,
    open: bool,
    parks: u64,
    cold_pages: u64,
    last_park: Value,
    error: Option<String>,
    /// A park's push runs at the host: each tick asks how far it got.
    parking: bool,
    /// The store's configuration, while `open` waits to be retried.
    store: Option<String>,
    next_open_ms: u64,
}

impl Agile {
    fn now_ms(&self) -> u64 {
        host::now_ns().saturating_sub(self.start_ns) / 1_000_000
    }

    /// Stamps the pages dirtied since the last harvest.
    fn harvest(&mut self) -> Result<(), String> {
        let bits = host::dirty_bitmap()?;
        let now = self.now_ms() as u32;
        for (i, &w) in bits.iter().enumerate() {
            if w == 0 {
                continue;
            }
            if let Some(p) = self.parked.get_mut(i) {
                *p &= !w;
            }
            let mut w = w;
            while w != 0 {
                let b = w.trailing_zeros() as usize;
                if let Some(t) = self.last.get_mut(i * 64 + b) {
                    *t = now;
                }
                w &= w - 1;
            }
        }
        Ok(())
    }

    /// Parks up to `max_pages` cold pages; returns how many were chosen.
    fn park(&mut self) -> Result<u64, String> {
        let now = self.now_ms();
        let mut bitmap = vec![0u64; self.parked.len()];
        let mut n = 0;
        let mut cold = 0;
        for (p, &t) in self.last.iter().enumerate() {
            if u64::from(t) + self.cold_ms > now || self.parked[p / 64] >> (p % 64) & 1 == 1 {
                continue;
            }
            cold += 1;
            if n < self.max_pages {
                bitmap[p / 64] |= 1 << (p % 64);
                n += 1;
            }
        }
        self.cold_pages = cold;
        if n == 0 {
            return Ok(0);
        }
        let r = match agile::park(&bitmap) {
            Ok(r) => r,
            // Our predecessor's park (before a snapshot or migration's state capture):
            // followed to its end first.
            Err(e) if e.contains("a park is in progress") => {
                self.parking = true;
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        for (p, b) in self.parked.iter_mut().zip(&bitmap) {
            *p |= b;
        }
        self.step(&r);
        Ok(n)
    }

    /// Takes in where the host's park is (`pushing`, `done`, `idle`).
    fn step(&mut self, r: &str) {
        let v: Value = serde_json::from_str(r).unwrap_or(Value::Null);
        match v["state"].as_str() {
            Some("pushing") => self.parking = true,
            Some("done") => {
                self.parking = false;
                self.parks += 1;
                self.last_park = v;
            }
            _ => self.parking = false,
        }
    }

    /// Asks the host how far the park got; the call after its push evicts.
    fn advance(&mut self) -> Result<(), String> {
        let r = agile::park(&[])?;
        self.step(&r);
        Ok(())
    }

    /// Opens the host's engine; an incoming migration still filling guest memory makes it
    /// wait (true: open now).
    fn try_open(&mut self, store: &str) -> Result<bool, String> {
        match agile::open(store) {
            Ok(()) => {
                self.open = true;
                self.store = None;
                self.error = None;
                // Opening counts as a write of every page.
                let now = self.now_ms() as u32;
                self.last.iter_mut().for_each(|t| *t = now);
                self.next_scan_ms = self.now_ms() + self.cold_ms;
                Ok(true)
            }
            Err(e) if e.contains("retry") => {
                self.store = Some(store.to_string());
                self.next_open_ms = self.now_ms() + 1000;
                self.error = Some(e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn tick(&mut self) -> Result<(), String> {
        if !self.open {
            if let Some(store) = self.store.clone() {
                if self.now_ms() >= self.next_open_ms {
                    self.try_open(&store)?;
                }
            }
            return Ok(());
        }
        self.harvest()?;
        if self.parking {
            return self.advance();
        }
        let now = self.now_ms();
        if now >= self.next_scan_ms {
            self.next_scan_ms = now + (self.cold_ms / 4).max(50);
            self.park()?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<String, String> {
        let mut v: Value = if self.open {
            serde_json::from_str(&agile::report()?).map_err(|e| e.to_string())?
        } else {
            json!({})
        };
        v["parks"] = json!(self.parks);
        v["cold_pages"] = json!(self.cold_pages);
        v["last_park"] = self.last_park.clone();
        v["parking"] = json!(self.parking);
        v["open"] = json!(self.open);
        v["error"] = json!(self.error);
        Ok(v.to_string())
    }
}

impl Service for Agile {
    fn manifest() -> Manifest {
        Manifest::new("agile", env!("CARGO_PKG_VERSION"))
            .capabilities(&[Capability::DirtyLog, Capability::EvictMemory])
            .tick_every_ms(100)
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        let c: Config =
            serde_json::from_str(config).map_err(|e| format!("agile configuration: {e}"))?;
        if c.cold_ms == 0 || c.max_evict_mb == 0 {
            return Err("agile configuration: cold_ms and max_evict_mb must be positive".into());
        }
        let pages = host::vm_info().mem_bytes / PAGE;
        self.cold_ms = c.cold_ms;
        self.max_pages = c.max_evict_mb * (1 << 20) / PAGE;
        self.last = vec![0; pages as usize];
        self.parked = vec![0; pages.div_ceil(64) as usize];
        self.start_ns = host::now_ns();
        self.next_scan_ms = c.cold_ms;
        let store = json!({
            "intermediaries": c.intermediaries,
            "replicas": c.replicas,
            "encrypt": c.encrypt,
            "ttl-secs": c.ttl_secs,
        });
        self.try_open(&store.to_string())?;
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::Tick { .. } = event {
            if let Err(e) = self.tick() {
                // Once per distinct error (a park refused during a migration repeats).
                if self.error.as_deref() != Some(e.as_str()) {
                    host::log(spanvmm_sdk::LogLevel::Error, &format!("agile: {e}"));
                }
                self.error = Some(e);
            }
        }
        EventReply::None
    }

    fn detach(&mut self) -> Vec<u8> {
        if self.open {
            if let Err(e) = agile::close() {
                host::log(spanvmm_sdk::LogLevel::Error, &format!("agile close: {e}"));
            }
            self.open = false;
        }
        Vec::new()
    }

    fn call(&mut self, method: &str, _args: &str) -> Result<String, String> {
        match method {
            "stats" => self.stats(),
            "park_now" => {
                if !self.open {
                    return Err("not open".into());
                }
                self.harvest()?;
                if self.parking {
                    self.advance()?;
                    return Ok(
                        json!({"chosen": 0, "parking": self.parking, "last_park": self.last_park})
                            .to_string(),
                    );
                }
                let n = self.park()?;
                Ok(
                    json!({"chosen": n, "parking": self.parking, "last_park": self.last_park})
                        .to_string(),
                )
            }
            other => Err(format!("unknown method {other:?} (stats, park_now)")),
        }
    }
}

export_service!(Agile);
