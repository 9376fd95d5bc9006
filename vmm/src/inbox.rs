//! The main loop's inbox: everything that asks the VMM to act arrives here, in one order.
//! Its own module so that the main loop ([`crate::run`]) and the waits that serve the API
//! before there is a VM (an incoming migration) share it without importing each other.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

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
    /// SIGTERM or SIGINT (its number): shut down as `ctl shutdown` does.
    Stop(i32),
    /// The outgoing migration has news for its service (a post-copy fault, to pre-page
    /// around): tick it now rather than at its next period.
    MigrationNews,
    /// The client that started the migration that moved the guest away has its report (see
    /// [`crate::migrate::MigrationWatch`]): the process goes once this signals it is written.
    ReportTaken(std::sync::mpsc::Receiver<()>),
}

/// The write end of the pipe the stop-signal handler writes to (-1 before it exists).
static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let fd = STOP_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe and `b` outlives the call; a full pipe (a
        // signal storm) only loses signals that would ask for the same shutdown.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// How long a stop may wait for a main loop held by a service before the process exits
/// without it.
const STUCK_GRACE: Duration = Duration::from_secs(5);

/// A service's call (or tick, attach, replace) that never returns holds the main loop, which
/// then never takes the stop up: a native service cannot be interrupted, so after
/// [`STUCK_GRACE`] the process exits (status 3) without it, saying which service held it. The
/// vCPUs stop with the process; the guest's disk writes are already in the host's page cache
/// (the main loop flushes nothing more at a shutdown); the other services get no `shutdown`
/// event; the API socket file stays behind and is replaced by the next VMM that binds it.
fn exit_if_held_by_a_service(asked: Instant) {
    let service = |what: &str| {
        what.starts_with("service ")
            || what.starts_with("services'")
            || what.starts_with("attaching ")
            || what.starts_with("detaching service ")
            || what.starts_with("replacing service ")
    };
    let deadline = asked + STUCK_GRACE;
    while Instant::now() < deadline {
        match crate::api::server::busy() {
            // Held since before the stop, by a service: keep watching.
            Some((what, since)) if since <= asked && service(&what) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            // Free, or busy with something else: the main loop takes the stop up.
            _ => return,
        }
    }
    if let Some((what, since)) = crate::api::server::busy() {
        if since <= asked && service(&what) {
            tracing::error!(
                "shutting down without the main loop: it has been held by {what} for {:.1} s \
                 (a service that does not return); exiting",
                since.elapsed().as_secs_f64()
            );
            std::process::exit(3);
        }
    }
}

/// Turns SIGTERM and SIGINT into [`Msg::Stop`] on `tx`. The handler only writes to a pipe
/// (whatever thread it interrupts, a vCPU's included, which sees a kick); a thread of its
/// own reads the pipe and posts the message, so the shutdown is the main loop's, in order.
pub(crate) fn forward_stop_signals(tx: Sender<Msg>) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fds[0] was just created and is owned by nothing else.
    let mut read_end = unsafe { File::from_raw_fd(fds[0]) };
    STOP_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler and flags are set before use.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: installs a handler that only does an async-signal-safe write.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Helper);
            let mut b = [0u8; 1];
            while let Ok(1) = read_end.read(&mut b) {
                let asked = Instant::now();
                if tx.send(Msg::Stop(i32::from(b[0]))).is_err() {
                    break;
                }
                exit_if_held_by_a_service(asked);
            }
        })?;
    Ok(())
}
