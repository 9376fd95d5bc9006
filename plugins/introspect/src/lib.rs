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
use spanvmm_sdk::call::Num;
use spanvmm_sdk::{host, Capability, Event, EventReply, Manifest, Service, VcpuRegs};

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

/// Attach config: regions to watch from the start.
#[derive(Default, Deserialize)]
struct Config {
    #[serde(default)]
    watch: Vec<Region>,
}

#[derive(Deserialize)]
struct Region {
    gpa: Num<u64>,
    len: Num<u64>,
}

#[derive(Default, Serialize, Deserialize)]
struct Introspect {
    watches: Vec<Watch>,
    hits: Vec<Hit>,
    next_id: u32,
    ticks: u64,
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
                spanvmm_sdk::warn!("dirty bitmap unavailable: {e}");
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
}

#[spanvmm_sdk::service(state)]
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

    fn attach(&mut self, cfg: Config) -> Result<(), String> {
        for w in cfg.watch {
            self.add_watch(w.gpa.0, w.len.0)?;
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

    #[method]
    fn info(&self) -> spanvmm_sdk::VmInfo {
        host::vm_info()
    }

    /// At most 64 KiB.
    #[method]
    fn read(&self, gpa: Num<u64>, len: Num<u32>) -> Result<Value, String> {
        if len.0 > 64 << 10 {
            return Err("read: at most 65536 bytes per call".into());
        }
        let bytes = host::read_memory(gpa.0, len.0)?;
        Ok(json!({"gpa": gpa.0, "hex": hex(&bytes)}))
    }

    #[method]
    fn search(
        &self,
        text: Option<String>,
        hex: Option<String>,
        start: Option<Num<u64>>,
        len: Option<Num<u64>>,
        max: Option<Num<u32>>,
    ) -> Result<Value, String> {
        let pattern = match (text, hex) {
            (Some(t), _) => t.into_bytes(),
            (_, Some(h)) => unhex(&h)?,
            _ => return Err("search: give \"text\" or \"hex\"".into()),
        };
        let start = start.map_or(0, |n| n.0);
        let len = len.map_or(host::vm_info().mem_bytes.saturating_sub(start), |n| n.0);
        let max = max.map_or(64, |n| n.0);
        Ok(json!({"matches": host::search_memory(start, len, &pattern, max)?}))
    }

    #[method]
    fn translate(&self, cr3: Num<u64>, gva: Num<u64>) -> Result<spanvmm_sdk::Translation, String> {
        host::translate(cr3.0, gva.0)
    }

    /// Pauses the VM around the read when `pause` is true.
    #[method]
    fn regs(&self, vcpu: Option<Num<u32>>, pause: Option<bool>) -> Result<VcpuRegs, String> {
        let pause = pause.unwrap_or(false);
        if pause {
            host::pause()?;
        }
        let r = host::vcpu_regs(vcpu.map_or(0, |n| n.0));
        if pause {
            host::resume()?;
        }
        r
    }

    #[method]
    fn hash(&self, first: Num<u64>, count: Num<u32>) -> Result<Value, String> {
        Ok(json!({"hashes": host::hash_pages(first.0, count.0)?}))
    }

    #[method]
    fn zero(&self, first: Num<u64>, count: Num<u32>) -> Result<Value, String> {
        Ok(json!({"bitmap": host::zero_scan(first.0, count.0)?}))
    }

    #[method]
    fn watch(&mut self, gpa: Num<u64>, len: Num<u64>) -> Result<Value, String> {
        Ok(json!({"id": self.add_watch(gpa.0, len.0)?}))
    }

    #[method]
    fn unwatch(&mut self, id: Num<u32>) -> Result<Value, String> {
        let before = self.watches.len();
        self.watches.retain(|w| w.id != id.0);
        if self.watches.len() == before {
            return Err(format!("no watch {}", id.0));
        }
        Ok(json!({}))
    }

    #[method]
    fn watches(&self) -> Value {
        json!({"watches": self.watches, "ticks": self.ticks})
    }

    /// The hits recorded since the previous call (and clears them).
    #[method]
    fn hits(&mut self) -> Value {
        json!({"hits": std::mem::take(&mut self.hits)})
    }
}
