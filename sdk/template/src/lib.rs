//! hello: the smallest useful spanvmm service. It claims one port given in its config, answers
//! reads with a greeting counter, logs every tick, and says hello through `call`.

use spanvmm_sdk::{
    export_service, host, Event, EventKind, EventReply, LogLevel, Manifest, Service,
};

#[derive(Default)]
struct Hello {
    greetings: u64,
}

impl Service for Hello {
    fn manifest() -> Manifest {
        Manifest::new("hello", env!("CARGO_PKG_VERSION"))
            .events(&[EventKind::PortRead, EventKind::PortWrite])
            .tick_every_ms(1000)
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        // Config: a port number, e.g. "1536" (0x600). Empty: no port.
        if let Ok(port) = config.trim().parse::<u16>() {
            host::claim_ports(port, 1)?;
        }
        host::log(LogLevel::Info, "hello attached");
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> EventReply {
        match event {
            Event::PortWrite { .. } => {
                self.greetings += 1;
                EventReply::None
            }
            Event::PortRead { .. } => EventReply::Value(self.greetings),
            Event::Tick { now_ns } => {
                host::log(LogLevel::Debug, &format!("tick at {now_ns} ns"));
                EventReply::None
            }
            // Events this service did not subscribe to never arrive; the wildcard also keeps
            // the source building when the interface grows new event kinds.
            _ => EventReply::None,
        }
    }

    fn detach(&mut self) -> Vec<u8> {
        self.greetings.to_le_bytes().to_vec()
    }

    fn resume_from(&mut self, state: &[u8]) -> Result<(), String> {
        if let Ok(b) = <[u8; 8]>::try_from(state) {
            self.greetings = u64::from_le_bytes(b);
        }
        Ok(())
    }

    fn call(&mut self, method: &str, args: &str) -> Result<String, String> {
        match method {
            "hello" => {
                self.greetings += 1;
                Ok(format!("\"hello, {args}! greeting #{}\"", self.greetings))
            }
            m => Err(format!("unknown method {m:?}")),
        }
    }
}

export_service!(Hello);
