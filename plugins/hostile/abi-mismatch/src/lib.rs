//! A service that claims ABI version 999: the host must refuse it before calling anything else.
//! As a component its manifest says 999; as a native object its handshake returns 999 and no
//! other entry point exists (the host must not look for them).

#[cfg(target_arch = "wasm32")]
mod component {
    use spanvmm_sdk::{export_service, Manifest, Service};

    #[derive(Default)]
    struct Future;

    impl Service for Future {
        fn manifest() -> Manifest {
            let mut m = Manifest::new("abi-mismatch", "9.9.9");
            m.abi_version = 999;
            m
        }

        fn attach(&mut self, _config: &str) -> Result<(), String> {
            Err("attach must never be called on a mismatched ABI".into())
        }
    }

    export_service!(Future);
}

/// Handshake from the future.
#[cfg(not(target_arch = "wasm32"))]
#[unsafe(no_mangle)]
pub extern "C" fn spanvmm_service_abi_version() -> u32 {
    999
}
