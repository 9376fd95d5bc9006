//! The spanvmm VMM as a library: the per-VM main loop ([`run`]), the control API server and
//! client ([`api`], [`ctl`]), and the orchestration of migrations, snapshots and live updates
//! over base-vmm and l1-services. The `spanvmm` binary only parses its command line and calls
//! in here (fuzz targets and tests reach the same code).

pub mod api;
pub mod ctl;
mod inbox;
pub mod jail;
pub mod live_update;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod plugin_tool;
pub mod run;
pub mod services;
pub mod snapshot;
