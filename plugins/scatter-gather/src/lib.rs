//! scatter-gather: Scatter-Gather live migration (Deshpande et al., IEEE TCC 2015). The guest
//! is handed over at once (post-copy); the source then pushes every page once at its full
//! rate, on the link while the link keeps up and to Redis intermediaries otherwise, and
//! leaves as soon as every page is at the destination or at an intermediary (eviction). The
//! destination gathers the scattered pages at its own pace, at most `gather_rate` bytes/s.
//!
//! This service holds the policy (which intermediaries, how many copies, encryption, when the
//! link counts as behind, the gather cap); the host's engine moves the pages
//! (`docs/scatter-gather.md`). Config (JSON): `intermediaries` (required, "host:port" list),
//! `replicas` (1), `encrypt` (false), `cluster` (false), `ttl_secs` (3600), `high_water`
//! (bytes, 262144; 0: never the link, every data page through the intermediaries),
//! `gather_rate` (bytes/s, 0: uncapped), `key` (64 hex digits: a store key shared by a group
//! of migrations, whose identical pages are then stored once), `workers` (4: threads storing
//! batches at the intermediaries in parallel, 1..=16), `reserve` (a page found absent is
//! reserved before it is written, so that migrations sharing `key` send it once; default: on
//! with a shared key).

use serde::Deserialize;
use spanvmm_sdk::migration::{self as mig, Phase, SwitchMode};
use spanvmm_sdk::{host, Capability, LogLevel};

/// The attach configuration, checked here so that a bad one is refused at attach (the host
/// checks it again).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    intermediaries: Vec<std::net::SocketAddr>,
    #[serde(default = "one")]
    replicas: usize,
    #[serde(default)]
    encrypt: bool,
    #[serde(default)]
    cluster: bool,
    #[serde(default)]
    #[allow(dead_code)]
    ttl_secs: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    high_water: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    gather_rate: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    key: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    reserve: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    workers: Option<usize>,
}

fn one() -> usize {
    1
}

#[derive(Default)]
struct ScatterGather {
    /// The configuration as given (passed on to the host).
    config: String,
    started: bool,
    failed: bool,
}

impl ScatterGather {
    fn tick(&mut self) -> Result<(), String> {
        // No migration (attached with `run --plugin`): start afresh with the next one.
        let Ok(p) = mig::progress() else {
            self.started = false;
            self.failed = false;
            return Ok(());
        };
        if p.phase != Phase::Precopy || self.started || self.failed {
            return Ok(());
        }
        self.started = true;
        if let Err(e) = mig::set_scatter(&self.config) {
            // Not handed over: the guest stays at the source.
            self.failed = true;
            return Err(format!("scatter-gather refused: {e}"));
        }
        host::log(LogLevel::Info, "scatter-gather: handing over at once");
        mig::switch_over(SwitchMode::Postcopy)
    }
}

impl spanvmm_sdk::Service for ScatterGather {
    fn manifest() -> spanvmm_sdk::Manifest {
        spanvmm_sdk::Manifest::new("scatter-gather", env!("CARGO_PKG_VERSION"))
            .events(&[spanvmm_sdk::EventKind::Tick])
            .capabilities(&[Capability::DrivesMigration])
            .tick_every_ms(5)
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        let c: Config = serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        let n = c.intermediaries.len();
        if n == 0 {
            return Err("config: name at least one intermediary (\"host:port\")".into());
        }
        if c.replicas == 0 || c.replicas > n || (c.cluster && c.replicas != 1) {
            return Err(format!(
                "config: {} replicas on {n} intermediaries (a cluster keeps its own: 1)",
                c.replicas
            ));
        }
        host::log(
            LogLevel::Info,
            &format!(
                "scatter-gather: {n} intermediaries, {} replicas, encrypt {}",
                c.replicas, c.encrypt
            ),
        );
        self.config = config.to_string();
        Ok(())
    }

    fn on_event(&mut self, ev: spanvmm_sdk::Event) -> spanvmm_sdk::EventReply {
        if let spanvmm_sdk::Event::Tick { .. } = ev {
            if let Err(e) = self.tick() {
                host::log(LogLevel::Error, &e);
            }
        }
        spanvmm_sdk::EventReply::None
    }
}

spanvmm_sdk::export_service!(ScatterGather);
