//! Not a complete service: as a component it exports a different world (only a `describe`
//! returning a string); as a native object it passes the ABI handshake but lacks every other
//! entry point. The host must refuse both with a clear error.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        inline: "
            package evil:plugin;
            world not-a-service {
                export describe: func() -> string;
            }
        ",
    });

    struct Impostor;

    impl Guest for Impostor {
        fn describe() -> String {
            "I am not a spanvmm service".into()
        }
    }

    export!(Impostor);
}

/// Correct handshake, nothing behind it.
#[cfg(not(target_arch = "wasm32"))]
#[unsafe(no_mangle)]
pub extern "C" fn spanvmm_service_abi_version() -> u32 {
    1
}
