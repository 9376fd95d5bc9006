//! Agile migration's parked pages (`wit/agile.wit`, capability `evict-memory`): a policy
//! service picks a running VM's cold pages; the host pushes them to Redis intermediaries and
//! evicts them from the VM's memory, and brings each back when it is touched. Wasm and native
//! services alike (appended to the native host table).

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::wasm::bindings::spanvmm::service::agile as a;

    pub fn open(config: &str) -> Result<(), String> {
        a::open(config)
    }
    pub fn park(bitmap: &[u64]) -> Result<String, String> {
        a::park(bitmap)
    }
    pub fn report() -> Result<String, String> {
        a::report()
    }
    pub fn close() -> Result<(), String> {
        a::close()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::native::imports as n;

    pub fn open(config: &str) -> Result<(), String> {
        n::agile_open(config)
    }
    pub fn park(bitmap: &[u64]) -> Result<String, String> {
        n::agile_park(bitmap)
    }
    pub fn report() -> Result<String, String> {
        n::agile_report()
    }
    pub fn close() -> Result<(), String> {
        n::agile_close()
    }
}

/// Connects to the intermediaries (`config`: JSON, see `wit/agile.wit`) and starts serving
/// evicted pages.
pub fn open(config: &str) -> Result<(), String> {
    imp::open(config)
}

/// Parks the pages set in `bitmap` (one bit per page), in steps: the first call starts
/// pushing them in the background (the guest runs) and returns `{"state":"pushing",...}`;
/// later calls with an empty bitmap report progress, and the first after the push evicts,
/// the guest paused, those unchanged (`{"state":"done",...}`). See `wit/agile.wit`.
pub fn park(bitmap: &[u64]) -> Result<String, String> {
    imp::park(bitmap)
}

/// Resident and evicted pages, memory held, faults, bytes moved (JSON).
pub fn report() -> Result<String, String> {
    imp::report()
}

/// Brings every evicted page back and stops.
pub fn close() -> Result<(), String> {
    imp::close()
}
