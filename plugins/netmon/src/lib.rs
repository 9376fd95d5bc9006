//! netmon: network monitoring beneath a running VM. It subscribes to the `net-frames` event
//! (header summaries of every frame the VM's virtio-net devices move, in batches from the
//! VMM's service thread) and keeps per-flow counters. Detached, the devices record nothing.
//!
//! A flow is the 5-tuple (protocol, both address:port endpoints) with both directions folded
//! together; frames that are not IP count per ethertype. Per flow: frames and bytes in each
//! direction (rx: to the guest, tx: from it), TCP SYN/FIN/RST seen, first and last seen (host
//! monotonic ns of the batch).
//!
//! Methods (`spanvmm ctl plugin call netmon METHOD [ARGS]`):
//! - `top [N] [by=bytes|frames]`: the N (default 10) largest flows;
//! - `flows`: every flow;
//! - `stats`: totals (frames, bytes, batches, frames the host dropped, flows);
//! - `reset`: forget everything.
//!
//! The state (every counter) goes to a successor on replace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::json;
use spanvmm_sdk::{export_service, Event, EventKind, EventReply, Manifest, NetFrame, Service};

/// Flows tracked at most; frames of further flows count only in the totals.
const MAX_FLOWS: usize = 65_536;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct Endpoint {
    addr: [u8; 16],
    port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct FlowKey {
    ethertype: u16,
    protocol: u8,
    /// The lower endpoint (so that both directions are one flow).
    a: Endpoint,
    b: Endpoint,
}

#[derive(Clone, Copy, Default, Serialize, Deserialize)]
struct Counters {
    rx_frames: u64,
    tx_frames: u64,
    rx_bytes: u64,
    tx_bytes: u64,
    syn: u64,
    fin: u64,
    rst: u64,
    first_ns: u64,
    last_ns: u64,
}

impl Counters {
    fn frames(&self) -> u64 {
        self.rx_frames + self.tx_frames
    }
    fn bytes(&self) -> u64 {
        self.rx_bytes + self.tx_bytes
    }
    fn merge(&mut self, o: &Counters) {
        self.rx_frames += o.rx_frames;
        self.tx_frames += o.tx_frames;
        self.rx_bytes += o.rx_bytes;
        self.tx_bytes += o.tx_bytes;
        self.syn += o.syn;
        self.fin += o.fin;
        self.rst += o.rst;
        self.first_ns = match (self.first_ns, o.first_ns) {
            (0, f) | (f, 0) => f,
            (a, b) => a.min(b),
        };
        self.last_ns = self.last_ns.max(o.last_ns);
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Totals {
    frames: u64,
    bytes: u64,
    batches: u64,
    /// Frames the host could not record (its buffer was full between two batches).
    dropped: u64,
    /// Frames of flows beyond MAX_FLOWS.
    untracked: u64,
}

#[derive(Default)]
struct NetMon {
    flows: HashMap<FlowKey, Counters>,
    totals: Totals,
}

/// What goes to a successor.
#[derive(Serialize, Deserialize)]
struct State {
    totals: Totals,
    flows: Vec<(FlowKey, Counters)>,
}

fn key_of(f: &NetFrame) -> FlowKey {
    let s = Endpoint {
        addr: f.src,
        port: f.src_port,
    };
    let d = Endpoint {
        addr: f.dst,
        port: f.dst_port,
    };
    let (a, b) = if s <= d { (s, d) } else { (d, s) };
    FlowKey {
        ethertype: f.ethertype,
        protocol: f.protocol,
        a,
        b,
    }
}

fn ip(addr: &[u8; 16], ethertype: u16) -> String {
    let v6 = Ipv6Addr::from(*addr);
    let ip = match (ethertype, v6.to_ipv4_mapped()) {
        (0x0800, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    ip.to_string()
}

fn endpoint(e: &Endpoint, k: &FlowKey) -> String {
    match ip(&e.addr, k.ethertype) {
        ip if ip.contains(':') => format!("[{ip}]:{}", e.port),
        ip => format!("{ip}:{}", e.port),
    }
}

fn flow_json(k: &FlowKey, c: &Counters) -> serde_json::Value {
    let proto = match (k.ethertype, k.protocol) {
        (0x0800 | 0x86dd, 6) => "tcp".to_string(),
        (0x0800 | 0x86dd, 17) => "udp".to_string(),
        (0x0800 | 0x86dd, 1 | 58) => "icmp".to_string(),
        (0x0800 | 0x86dd, p) => format!("ip-proto-{p}"),
        (0x0806, _) => "arp".to_string(),
        (0x8035, _) => "rarp".to_string(),
        (e, _) => format!("ethertype-{e:#06x}"),
    };
    let ip_flow = matches!(k.ethertype, 0x0800 | 0x86dd);
    json!({
        "proto": proto,
        "a": if ip_flow { endpoint(&k.a, k) } else { String::new() },
        "b": if ip_flow { endpoint(&k.b, k) } else { String::new() },
        "frames": c.frames(),
        "bytes": c.bytes(),
        "rx_frames": c.rx_frames,
        "tx_frames": c.tx_frames,
        "rx_bytes": c.rx_bytes,
        "tx_bytes": c.tx_bytes,
        "syn": c.syn,
        "fin": c.fin,
        "rst": c.rst,
        "first_ns": c.first_ns,
        "last_ns": c.last_ns,
    })
}

impl NetMon {
    fn record(&mut self, now_ns: u64, frames: &[NetFrame], dropped: u64) {
        self.totals.batches += 1;
        self.totals.dropped += dropped;
        for f in frames {
            self.totals.frames += 1;
            self.totals.bytes += f.len as u64;
            let key = key_of(f);
            if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
                self.totals.untracked += 1;
                continue;
            }
            let c = self.flows.entry(key).or_insert_with(|| Counters {
                first_ns: now_ns,
                ..Default::default()
            });
            if f.direction == NetFrame::TX {
                c.tx_frames += 1;
                c.tx_bytes += f.len as u64;
            } else {
                c.rx_frames += 1;
                c.rx_bytes += f.len as u64;
            }
            if f.protocol == 6 {
                c.syn += (f.tcp_flags & 0x02 != 0) as u64;
                c.fin += (f.tcp_flags & 0x01 != 0) as u64;
                c.rst += (f.tcp_flags & 0x04 != 0) as u64;
            }
            c.last_ns = now_ns;
        }
    }

    fn totals_json(&self) -> serde_json::Value {
        json!({
            "frames": self.totals.frames,
            "bytes": self.totals.bytes,
            "batches": self.totals.batches,
            "dropped": self.totals.dropped,
            "untracked": self.totals.untracked,
            "flows": self.flows.len(),
        })
    }

    fn sorted(&self, by_frames: bool) -> Vec<(&FlowKey, &Counters)> {
        let mut v: Vec<_> = self.flows.iter().collect();
        v.sort_by_key(|(_, c)| {
            std::cmp::Reverse(if by_frames {
                (c.frames(), c.bytes())
            } else {
                (c.bytes(), c.frames())
            })
        });
        v
    }

    fn top(&self, args: &str) -> Result<String, String> {
        let (mut n, mut by_frames) = (10usize, false);
        for word in args.split_whitespace() {
            match word {
                "by=bytes" => by_frames = false,
                "by=frames" => by_frames = true,
                w => {
                    n = w.parse().map_err(|_| {
                        format!("top: `{w}` is neither a count nor by=bytes|by=frames")
                    })?
                }
            }
        }
        let flows: Vec<_> = self
            .sorted(by_frames)
            .into_iter()
            .take(n)
            .map(|(k, c)| flow_json(k, c))
            .collect();
        Ok(json!({
            "by": if by_frames { "frames" } else { "bytes" },
            "top": flows,
            "totals": self.totals_json(),
        })
        .to_string())
    }
}

impl Service for NetMon {
    fn manifest() -> Manifest {
        Manifest::new("netmon", env!("CARGO_PKG_VERSION")).events(&[EventKind::NetFrames])
    }

    fn attach(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::NetFrames {
            now_ns,
            frames,
            dropped,
        } = event
        {
            self.record(now_ns, &frames, dropped);
        }
        EventReply::None
    }

    fn detach(&mut self) -> Vec<u8> {
        let state = State {
            totals: std::mem::take(&mut self.totals),
            flows: self.flows.drain().collect(),
        };
        serde_json::to_vec(&state).unwrap_or_default()
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            return Ok(());
        }
        let old: State =
            serde_json::from_slice(state).map_err(|e| format!("bad netmon state: {e}"))?;
        let t = &mut self.totals;
        t.frames += old.totals.frames;
        t.bytes += old.totals.bytes;
        t.batches += old.totals.batches;
        t.dropped += old.totals.dropped;
        t.untracked += old.totals.untracked;
        for (k, c) in old.flows {
            self.flows.entry(k).or_default().merge(&c);
        }
        Ok(())
    }

    fn call(&mut self, method: &str, args: &str) -> Result<String, String> {
        match method {
            "top" => self.top(args),
            "flows" => {
                let flows: Vec<_> = self
                    .sorted(false)
                    .into_iter()
                    .map(|(k, c)| flow_json(k, c))
                    .collect();
                Ok(json!({ "flows": flows, "totals": self.totals_json() }).to_string())
            }
            "stats" => Ok(self.totals_json().to_string()),
            "reset" => {
                self.flows.clear();
                self.totals = Totals::default();
                Ok("{}".into())
            }
            m => Err(format!(
                "unknown method {m:?}; try top [N] [by=bytes|frames], flows, stats or reset"
            )),
        }
    }
}

export_service!(NetMon);
