//! A test service that wants what others may want too: the exclusive `drives-migration`
//! capability, ports 0x6e0..0x6e8 and MMIO 0xfc0000000..0xfc0001000 (63 GiB; in its manifest). Its name differs per build
//! (`greedy-wasm`, `greedy-native`) so both builds can be attached side by side, to test that
//! the second one is refused with an error naming both.

use spanvmm_sdk::{export_service, Capability, EventKind, Manifest, Service};

#[derive(Default)]
struct Greedy;

#[cfg(target_arch = "wasm32")]
const NAME: &str = "greedy-wasm";
#[cfg(not(target_arch = "wasm32"))]
const NAME: &str = "greedy-native";

impl Service for Greedy {
    fn manifest() -> Manifest {
        Manifest::new(NAME, "0.1.0")
            .events(&[EventKind::PortWrite])
            .port_range(0x6e0, 8)
            .mmio_range(63 << 30, 0x1000)
            .capabilities(&[Capability::DrivesMigration])
    }

    fn attach(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }
}

export_service!(Greedy);
