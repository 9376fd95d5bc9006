//! exit-stats: claims the port range and/or the MMIO range named in its attach config and counts
//! the guest's writes and reads there. A port read returns the number of writes seen so far on
//! that port; an MMIO read returns the number of MMIO writes.
//!
//! Config: `{"base": 1792, "len": 4}` for ports (`base` may also be a string such as
//! `"0x700"`), `{"mmio_base": "0xfc0000000", "mmio_len": 4096}` for MMIO, or both.
//! Methods: `stats` → `{"writes":…, "reads":…, "last_write":…, "ports":{"0x700":{…}},
//! "mmio_writes":…, "mmio_reads":…, "mmio_last_addr":…}`, `port` (`{"port": "0x700"}` → that
//! port's `{"writes":…, "reads":…}`), `reset`. The state (the whole value, JSON) carries the
//! counters across a replace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spanvmm_sdk::call::Num;
use spanvmm_sdk::{host, Event, EventKind, EventReply, Manifest, Service};

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

#[derive(Deserialize)]
struct Config {
    base: Option<Num<u16>>,
    len: Option<Num<u16>>,
    mmio_base: Option<Num<u64>>,
    mmio_len: Option<Num<u64>>,
}

#[spanvmm_sdk::service(state)]
impl Service for ExitStats {
    fn manifest() -> Manifest {
        Manifest::new("exit-stats", env!("CARGO_PKG_VERSION")).events(&[
            EventKind::PortWrite,
            EventKind::PortRead,
            EventKind::MmioWrite,
            EventKind::MmioRead,
        ])
    }

    fn attach(&mut self, cfg: Config) -> Result<(), String> {
        if cfg.base.is_none() && cfg.mmio_base.is_none() {
            return Err("config: give \"base\" (ports), \"mmio_base\" (MMIO) or both".into());
        }
        if let Some(Num(base)) = cfg.base {
            let len = cfg.len.map_or(1, |n| n.0);
            host::claim_ports(base, len)?;
            (self.base, self.len) = (base, len);
        }
        if let Some(Num(base)) = cfg.mmio_base {
            host::claim_mmio(base, cfg.mmio_len.map_or(4096, |n| n.0))?;
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

    #[method]
    fn stats(&self) -> Value {
        let ports: BTreeMap<String, PortCount> = self
            .ports
            .iter()
            .map(|(p, c)| (format!("{p:#x}"), *c))
            .collect();
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["ports"] = json!(ports);
        v
    }

    #[method]
    fn port(&self, port: Num<u16>) -> Result<PortCount, String> {
        let range = u32::from(self.base)..u32::from(self.base) + u32::from(self.len);
        if !range.contains(&u32::from(port.0)) {
            return Err(format!("port {:#x} is not in this service's range", port.0));
        }
        Ok(self.ports.get(&port.0).copied().unwrap_or_default())
    }

    #[method]
    fn reset(&mut self) {
        *self = ExitStats {
            base: self.base,
            len: self.len,
            last_write: self.last_write,
            mmio_last_addr: self.mmio_last_addr,
            ..Default::default()
        };
    }
}
