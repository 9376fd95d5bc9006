//! exit-stats: claims the port range and/or the MMIO range named in its attach config and counts
//! the guest's writes and reads there. A port read returns the number of writes seen so far on
//! that port; an MMIO read returns the number of MMIO writes.
//!
//! Config: `{"base": 1792, "len": 4}` for ports (`base` may also be a string such as
//! `"0x700"`), `{"mmio_base": "0xfc0000000", "mmio_len": 4096}` for MMIO, or both.
//! Methods: `stats` → `{"writes":…, "reads":…, "last_write":…, "ports":{"0x700":{…}},
//! "mmio_writes":…, "mmio_reads":…, "mmio_last_addr":…}`, `reset`. State (detach/resume-from)
//! carries the counters across a replace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use spanvmm_sdk::{export_service, host, Event, EventKind, EventReply, Manifest, Service};

#[derive(Default, Clone, Copy, Serialize, Deserialize)]
struct PortCount {
    writes: u64,
    reads: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct ExitStats {
    base: u16,
    len: u16,
    writes: u64,
    reads: u64,
    last_write: u64,
    ports: BTreeMap<u16, PortCount>,
    #[serde(default)]
    mmio_writes: u64,
    #[serde(default)]
    mmio_reads: u64,
    #[serde(default)]
    mmio_last_addr: u64,
}

/// A number given as JSON number or as a decimal or `0x` hex string.
fn number(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => s.parse().ok(),
        },
        _ => None,
    }
}

fn port_number(v: &serde_json::Value, what: &str) -> Result<u16, String> {
    number(v)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| format!("config: {what} must be a port number (0..=65535)"))
}

impl Service for ExitStats {
    fn manifest() -> Manifest {
        Manifest::new("exit-stats", env!("CARGO_PKG_VERSION")).events(&[
            EventKind::PortWrite,
            EventKind::PortRead,
            EventKind::MmioWrite,
            EventKind::MmioRead,
        ])
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        let cfg: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
        let mmio_base = cfg.get("mmio_base");
        if cfg.get("base").is_none() && mmio_base.is_none() {
            return Err("config: give \"base\" (ports), \"mmio_base\" (MMIO) or both".into());
        }
        if let Some(base) = cfg.get("base") {
            let base = port_number(base, "base")?;
            let len = match cfg.get("len") {
                Some(v) => port_number(v, "len")?,
                None => 1,
            };
            host::claim_ports(base, len)?;
            self.base = base;
            self.len = len;
        }
        if let Some(base) = mmio_base {
            let base = number(base).ok_or("config: mmio_base must be an address")?;
            let len = match cfg.get("mmio_len") {
                Some(v) => number(v).ok_or("config: mmio_len must be a number")?,
                None => 4096,
            };
            host::claim_mmio(base, len)?;
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        match event {
            Event::PortWrite { port, value, .. } => {
                self.writes += 1;
                self.last_write = value;
                self.ports.entry(port).or_default().writes += 1;
                EventReply::None
            }
            Event::PortRead { port, .. } => {
                self.reads += 1;
                let c = self.ports.entry(port).or_default();
                c.reads += 1;
                EventReply::Value(c.writes)
            }
            Event::MmioWrite { addr, .. } => {
                self.mmio_writes += 1;
                self.mmio_last_addr = addr;
                EventReply::None
            }
            Event::MmioRead { .. } => {
                self.mmio_reads += 1;
                EventReply::Value(self.mmio_writes)
            }
            _ => EventReply::None,
        }
    }

    fn detach(&mut self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            return Ok(());
        }
        let old: ExitStats =
            serde_json::from_slice(state).map_err(|e| format!("bad exit-stats state: {e}"))?;
        self.writes += old.writes;
        self.reads += old.reads;
        self.last_write = old.last_write;
        self.mmio_writes += old.mmio_writes;
        self.mmio_reads += old.mmio_reads;
        self.mmio_last_addr = old.mmio_last_addr;
        for (port, c) in old.ports {
            let e = self.ports.entry(port).or_default();
            e.writes += c.writes;
            e.reads += c.reads;
        }
        Ok(())
    }

    fn call(&mut self, method: &str, _args: &str) -> Result<String, String> {
        match method {
            "stats" => {
                let ports: BTreeMap<String, PortCount> = self
                    .ports
                    .iter()
                    .map(|(p, c)| (format!("{p:#x}"), *c))
                    .collect();
                Ok(serde_json::json!({
                    "base": self.base,
                    "len": self.len,
                    "writes": self.writes,
                    "reads": self.reads,
                    "last_write": self.last_write,
                    "ports": ports,
                    "mmio_writes": self.mmio_writes,
                    "mmio_reads": self.mmio_reads,
                    "mmio_last_addr": self.mmio_last_addr,
                })
                .to_string())
            }
            "reset" => {
                self.writes = 0;
                self.reads = 0;
                self.ports.clear();
                self.mmio_writes = 0;
                self.mmio_reads = 0;
                Ok("{}".into())
            }
            m => Err(format!("unknown method {m:?}; try \"stats\" or \"reset\"")),
        }
    }
}

export_service!(ExitStats);
