//! The main loop's inbox: everything that asks the VMM to act arrives here, in one order.
//! Its own module so that the main loop ([`crate::run`]) and the waits that serve the API
//! before there is a VM (an incoming migration) share it without importing each other.

use base_vmm::vcpu::VcpuEvent;

use crate::api::ApiCall;

/// A message for the main loop.
pub(crate) enum Msg {
    /// A vCPU stopped (power-off, reset, failure).
    Vcpu(VcpuEvent),
    /// An API request, its reply channel and the written signal.
    Api(ApiCall),
    /// The new process of a live update answered its offer (or failed to).
    LiveUpdateAnswer(Result<(), String>),
}
