//! port-counter in Rust: the example service of plugins/examples (the same service exists in
//! Python and JavaScript beside this directory). It claims the ports of its config
//! (`{"base": 2768, "len": 1}`), counts the guest's writes to them, answers `stats` with JSON and
//! hands its count to a successor on replace (state: `{"writes": N, "last": V}`, the same in
//! every language, so a Rust service can be replaced by the Python one and back).

use spanvmm_sdk::{export_service, host, Event, EventKind, EventReply, Manifest, Service};

#[derive(Default)]
struct PortCounter {
    writes: u64,
    last: u64,
}

fn field(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .ok_or_else(|| format!("\"{key}\" must be a number"))
}

impl Service for PortCounter {
    fn manifest() -> Manifest {
        Manifest::new("port-counter", env!("CARGO_PKG_VERSION")).events(&[EventKind::PortWrite])
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        let cfg: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
        let base = u16::try_from(field(&cfg, "base")?).map_err(|e| format!("base: {e}"))?;
        let len = match cfg.get("len") {
            Some(_) => u16::try_from(field(&cfg, "len")?).map_err(|e| format!("len: {e}"))?,
            None => 1,
        };
        host::claim_ports(base, len)
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        if let Event::PortWrite { value, .. } = event {
            self.writes += 1;
            self.last = value;
        }
        EventReply::None
    }

    fn detach(&mut self) -> Vec<u8> {
        serde_json::json!({ "writes": self.writes, "last": self.last })
            .to_string()
            .into_bytes()
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        let old: serde_json::Value =
            serde_json::from_slice(state).map_err(|e| format!("bad state: {e}"))?;
        self.writes += field(&old, "writes")?;
        self.last = field(&old, "last")?;
        Ok(())
    }

    fn call(&mut self, method: &str, _args: &str) -> Result<String, String> {
        match method {
            "stats" => Ok(serde_json::json!({
                "language": "rust",
                "writes": self.writes,
                "last": self.last,
            })
            .to_string()),
            m => Err(format!("unknown method {m:?}")),
        }
    }
}

export_service!(PortCounter);
