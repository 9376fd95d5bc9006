//! hello: the smallest useful spanvmm service. It claims the port given in its config, answers
//! reads with a greeting counter, logs every tick, says hello through `call`, and hands its
//! counter to a successor on replace.

use serde::{Deserialize, Serialize};
use spanvmm_sdk::{host, info, Event, EventKind, EventReply, Manifest, Service};

// The state handed to a successor (JSON); `default`: what a predecessor lacks starts at zero.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Hello {
    greetings: u64,
}

/// Attach config (JSON), e.g. `{"port": 1536}` (0x600); `{}` or nothing: no port.
#[derive(Deserialize)]
struct Config {
    port: Option<u16>,
}

#[spanvmm_sdk::service(state)]
impl Service for Hello {
    fn manifest() -> Manifest {
        Manifest::new("hello", env!("CARGO_PKG_VERSION"))
            .events(&[EventKind::PortRead, EventKind::PortWrite])
            .tick_every_ms(1000)
    }

    fn attach(&mut self, cfg: Config) -> Result<(), String> {
        if let Some(port) = cfg.port {
            host::claim_ports(port, 1)?;
        }
        info!("hello attached (port {:?})", cfg.port);
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        match event {
            Event::PortWrite { .. } => self.greetings += 1,
            Event::PortRead { .. } => return EventReply::Value(self.greetings),
            Event::Tick { now_ns } => spanvmm_sdk::debug!("tick at {now_ns} ns"),
            // Events this service did not subscribe to never arrive; the wildcard also keeps
            // the source building when the interface grows new event kinds.
            _ => {}
        }
        EventReply::None
    }

    /// `hello` with a name (`"world"` or `{"name": "world"}`) answers a greeting.
    #[method]
    fn hello(&mut self, name: String) -> String {
        self.greetings += 1;
        format!("hello, {name}! greeting #{}", self.greetings)
    }
}
