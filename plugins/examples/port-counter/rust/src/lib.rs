//! port-counter in Rust: the example service of plugins/examples (the same service exists in
//! Python and JavaScript beside this directory). It claims the ports of its config
//! (`{"base": 2768, "len": 1}`), counts the guest's writes to them, answers `stats` with JSON and
//! hands its count to a successor on replace (state: `{"writes": N, "last": V}`, the same in
//! every language, so a Rust service can be replaced by the Python one and back).

use serde::{Deserialize, Serialize};
use spanvmm_sdk::{host, Event, EventKind, EventReply, Manifest, Service};

#[derive(Default, Serialize, Deserialize)]
struct PortCounter {
    writes: u64,
    last: u64,
}

#[derive(Deserialize)]
struct Config {
    base: u16,
    #[serde(default = "one")]
    len: u16,
}

fn one() -> u16 {
    1
}

#[derive(Serialize)]
struct Stats {
    language: &'static str,
    writes: u64,
    last: u64,
}

#[spanvmm_sdk::service(state)]
impl Service for PortCounter {
    fn manifest() -> Manifest {
        Manifest::new("port-counter", env!("CARGO_PKG_VERSION")).events(&[EventKind::PortWrite])
    }

    fn attach(&mut self, cfg: Config) -> Result<(), String> {
        host::claim_ports(cfg.base, cfg.len)
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::PortWrite { value, .. } = event {
            self.writes += 1;
            self.last = value;
        }
        EventReply::None
    }

    #[method]
    fn stats(&self) -> Stats {
        let (writes, last) = (self.writes, self.last);
        Stats {
            language: "rust",
            writes,
            last,
        }
    }
}
