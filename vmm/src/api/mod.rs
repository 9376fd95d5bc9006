//! The control API: HTTP/1.1 + JSON on a Unix socket, one request per connection.
//!
//! - [`routes`]: what each endpoint means (typed requests, no I/O);
//! - [`server`]: the socket, its limits, and the hand-off to the main loop;
//! - [`client`]: the other end, for `ctl` and tests.
//!
//! The main loop ([`crate::run`]) uses the server and the routes; the orchestration modules
//! (migrate, snapshot, live update) only the routes' types: no circle through the server.

pub mod client;
pub mod routes;
pub mod server;

pub use client::{call, call_checked};
pub use routes::{route, ApiRequest, ApiResult};
pub use server::{bind, describe, parse_request, serve, set_busy, ApiCall, Reply};
