//! Multi-host set-ups on one machine: hosts as network namespaces on shaped links
//! ([`NetLab`]) and a TCP relay that adds latency ([`DelayRelay`]), since this kernel has no
//! netem. Used by spanvmm's migration tests and benchmarks.

mod ns;
mod relay;

pub use ns::{Host, NetLab};
pub use relay::DelayRelay;
