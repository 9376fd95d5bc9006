//! introspect: looks into a running guest without stopping it for long.
//!
//! Methods (arguments and results are JSON; numbers may be given as `"0x…"` strings):
//! - `info` → the VM's shape
//! - `read {"gpa", "len"}` → `{"gpa", "hex"}` (at most 64 KiB)
//! - `search {"start"?, "len"?, "text" | "hex", "max"?}` → `{"matches": [gpa, …]}`
//! - `translate {"cr3", "gva"}` → `{"present", "gpa", "page_size", "writable", "user", "executable"}`
//! - `regs {"vcpu"?, "pause"?}` → the vCPU's registers (pausing around the read when asked)
//! - `hash {"first", "count"}` / `zero {"first", "count"}` → page hashes / zero-page bitmap
//! - `watch {"gpa", "len"}` → `{"id"}`: report writes to the region (page granularity, found in
//!   the dirty log on every tick) as `write-watch` notifications and in `hits`
//! - `unwatch {"id"}`, `watches` → the regions and their hit counts, `hits` → and clears the
//!   recorded hits
//!
//! Attach config: `{"watch": [{"gpa", "len"}, …]}` or empty. State (detach/resume-from) keeps
//! the watches and unread hits.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spanvmm_sdk::{
    export_service, host, Capability, Event, EventReply, LogLevel, Manifest, Service,
};

const PAGE: u64 = 4096;
/// Most hits kept between two `hits` calls.
const MAX_HITS: usize = 4096;

#[derive(Clone, Serialize, Deserialize)]
struct Watch {
    id: u32,
    gpa: u64,
    len: u64,
    hits: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct Hit {
    watch: u32,
    page_gpa: u64,
    time_ns: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Introspect {
    watches: Vec<Watch>,
    hits: Vec<Hit>,
    next_id: u32,
    ticks: u64,
}

fn num(args: &Value, key: &str) -> Result<Option<u64>, String> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a non-negative integer")),
        Some(Value::String(s)) => {
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.map(Some)
                .map_err(|_| format!("{key}: {s:?} is not a number"))
        }
        Some(_) => Err(format!("{key} must be a number")),
    }
}

fn need(args: &Value, key: &str) -> Result<u64, String> {
    num(args, key)?.ok_or_else(|| format!("missing argument {key:?}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("hex pattern has an odd number of digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex: {e}")))
        .collect()
}

impl Introspect {
    fn add_watch(&mut self, gpa: u64, len: u64) -> Result<u32, String> {
        let mem = host::vm_info().mem_bytes;
        if len == 0 || gpa.checked_add(len).is_none_or(|end| end > mem) {
            return Err(format!(
                "watch {gpa:#x}+{len:#x} is empty or outside the {mem:#x}-byte guest RAM"
            ));
        }
        self.next_id += 1;
        self.watches.push(Watch {
            id: self.next_id,
            gpa,
            len,
            hits: 0,
        });
        Ok(self.next_id)
    }

    fn scan_dirty(&mut self, now_ns: u64) {
        if self.watches.is_empty() {
            return;
        }
        let bitmap = match host::dirty_bitmap() {
            Ok(b) => b,
            Err(e) => {
                host::log(LogLevel::Warn, &format!("dirty bitmap unavailable: {e}"));
                return;
            }
        };
        let dirty = |page: u64| {
            bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w >> (page % 64) & 1 == 1)
        };
        for w in &mut self.watches {
            for page in w.gpa / PAGE..(w.gpa + w.len).div_ceil(PAGE) {
                if dirty(page) {
                    w.hits += 1;
                    let hit = Hit {
                        watch: w.id,
                        page_gpa: page * PAGE,
                        time_ns: now_ns,
                    };
                    host::notify(
                        "write-watch",
                        &json!({"watch": w.id, "page_gpa": hit.page_gpa}).to_string(),
                    );
                    if self.hits.len() < MAX_HITS {
                        self.hits.push(hit);
                    }
                }
            }
        }
        host::metric(
            "watch_hits",
            self.watches.iter().map(|w| w.hits).sum::<u64>() as f64,
        );
    }

    fn regs(&self, args: &Value) -> Result<Value, String> {
        let vcpu = num(args, "vcpu")?.unwrap_or(0) as u32;
        let pause = args.get("pause").and_then(Value::as_bool).unwrap_or(false);
        if pause {
            host::pause()?;
        }
        let r = host::vcpu_regs(vcpu);
        if pause {
            host::resume()?;
        }
        serde_json::to_value(r?).map_err(|e| e.to_string())
    }
}

impl Service for Introspect {
    fn manifest() -> Manifest {
        Manifest::new("introspect", env!("CARGO_PKG_VERSION"))
            .capabilities(&[
                Capability::MemoryRead,
                Capability::VcpuState,
                Capability::PauseResume,
                Capability::DirtyLog,
            ])
            .tick_every_ms(50)
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        if config.trim().is_empty() {
            return Ok(());
        }
        let cfg: Value =
            serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
        if let Some(list) = cfg.get("watch").and_then(Value::as_array) {
            for w in list {
                self.add_watch(need(w, "gpa")?, need(w, "len")?)?;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::Tick { now_ns } = event {
            self.ticks += 1;
            self.scan_dirty(now_ns);
        }
        EventReply::None
    }

    fn detach(&mut self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            return Ok(());
        }
        *self = serde_json::from_slice(state).map_err(|e| format!("bad introspect state: {e}"))?;
        Ok(())
    }

    fn call(&mut self, method: &str, args: &str) -> Result<String, String> {
        let args: Value = if args.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(args).map_err(|e| format!("arguments are not JSON: {e}"))?
        };
        let out = match method {
            "info" => serde_json::to_value(host::vm_info()).map_err(|e| e.to_string())?,
            "read" => {
                let gpa = need(&args, "gpa")?;
                let len = need(&args, "len")?;
                if len > 64 << 10 {
                    return Err("read: at most 65536 bytes per call".into());
                }
                let bytes = host::read_memory(gpa, len as u32)?;
                json!({"gpa": gpa, "hex": hex(&bytes)})
            }
            "search" => {
                let pattern = match (args.get("text"), args.get("hex")) {
                    (Some(Value::String(t)), _) => t.as_bytes().to_vec(),
                    (_, Some(Value::String(h))) => unhex(h)?,
                    _ => return Err("search: give \"text\" or \"hex\"".into()),
                };
                let mem = host::vm_info().mem_bytes;
                let start = num(&args, "start")?.unwrap_or(0);
                let len = num(&args, "len")?.unwrap_or(mem.saturating_sub(start));
                let max = num(&args, "max")?.unwrap_or(64) as u32;
                json!({"matches": host::search_memory(start, len, &pattern, max)?})
            }
            "translate" => {
                let t = host::translate(need(&args, "cr3")?, need(&args, "gva")?)?;
                serde_json::to_value(t).map_err(|e| e.to_string())?
            }
            "regs" => self.regs(&args)?,
            "hash" => {
                let h = host::hash_pages(need(&args, "first")?, need(&args, "count")? as u32)?;
                json!({"hashes": h})
            }
            "zero" => {
                let z = host::zero_scan(need(&args, "first")?, need(&args, "count")? as u32)?;
                json!({"bitmap": z})
            }
            "watch" => json!({"id": self.add_watch(need(&args, "gpa")?, need(&args, "len")?)?}),
            "unwatch" => {
                let id = need(&args, "id")? as u32;
                let before = self.watches.len();
                self.watches.retain(|w| w.id != id);
                if self.watches.len() == before {
                    return Err(format!("no watch {id}"));
                }
                json!({})
            }
            "watches" => json!({"watches": self.watches, "ticks": self.ticks}),
            "hits" => json!({"hits": std::mem::take(&mut self.hits)}),
            m => {
                return Err(format!(
                    "unknown method {m:?}; methods: info read search translate regs hash zero \
                     watch unwatch watches hits"
                ))
            }
        };
        Ok(out.to_string())
    }
}

export_service!(Introspect);
