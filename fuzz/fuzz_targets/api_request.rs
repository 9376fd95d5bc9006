//! The control API's request parser (`vmm::api::parse_request`, what the server runs on
//! the bytes a client sends: request line, headers, Content-Length, body, routing and the
//! JSON bodies): every input is a request or an HTTP error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err((code, msg)) = vmm::api::parse_request(data) {
        assert!(
            matches!(code, 400 | 404 | 405 | 413),
            "unexpected status {code}: {msg}"
        );
        assert!(!msg.is_empty());
    }
});
