//! Multi-host set-ups on one machine: hosts as network namespaces on shaped links
//! ([`NetLab`]) and a TCP relay that adds latency ([`DelayRelay`]), since this kernel has no
//! netem, and real `redis-server` processes ([`RedisServer`]). Used by spanvmm's migration
//! tests and benchmarks.

mod ns;
mod racks;
mod redis;
mod relay;

pub use ns::{Host, NetLab};
pub use racks::{RackHost, Racks};
pub use redis::RedisServer;
pub use relay::DelayRelay;

/// Whether a test that needs something of the machine (a tool, a privilege) can run. When it
/// cannot: under CI (`CI=true`, whose set-up installs what every test needs) the test fails
/// here, since a test must never pass by skipping; elsewhere (a developer's machine without
/// the tool) it says why on stderr and the caller returns.
pub fn can_run(test: &str, needs: Result<(), String>) -> bool {
    match needs {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test} cannot run under CI: {why} (.ci/setup must install it)")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}
