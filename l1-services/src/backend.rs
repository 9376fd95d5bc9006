//! What the manager needs from a loaded service, whatever runtime it lives in.

use spanvmm_sdk::{Event, EventReply, Manifest};

/// The service is broken (trap, deadline or memory limit, panic): the message says which.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Fatal(pub String);

/// Which deadline a call runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// Events (port, lifecycle, tick): short, may hold up a vCPU.
    Event,
    /// Control calls (describe, attach, call, detach, resume-from).
    Control,
}

/// A loaded service instance. The manager serializes calls into it. The inner `String`s are
/// the service's own messages (the WIT `result<_, string>` and the C error sink): the edge.
pub(crate) trait Backend: Send {
    fn describe(&mut self) -> Result<Manifest, Fatal>;
    fn attach(&mut self, config: &str) -> Result<Result<(), String>, Fatal>;
    fn on_event(&mut self, ev: &Event) -> Result<EventReply, Fatal>;
    fn detach(&mut self) -> Result<Vec<u8>, Fatal>;
    fn resume_from(&mut self, state: &[u8]) -> Result<Result<(), String>, Fatal>;
    fn call(&mut self, method: &str, args: &str) -> Result<Result<String, String>, Fatal>;
    /// The manifest's name is known (for messages).
    fn set_name(&mut self, _name: &str) {}
}
