//! HyperFresh: a new `spanvmm` binary takes over a running VM from this process. Guest memory
//! is handed over as the memfd itself (SCM_RIGHTS), so no page is copied; only the VM state
//! (vCPUs, irqchip, clock, devices) and the services' states cross the socket.
//!
//! Protocol on a socketpair (frames: u32 LE length + JSON; the VM state follows `Takeover` as
//! one binary frame, u32 LE length + the state tree's encoding), old → new and back:
//!
//! 1. `Offer` with the memfd and the API listener attached. The new process maps the memory,
//!    creates its KVM VM and vCPUs (the slow part, while the guest still runs) → `Ready`.
//! 2. The old process pauses the guest, captures the VM state, detaches its services →
//!    `Takeover` + the VM state (the services' states are its `service/<name>` sections, as in
//!    a snapshot or a migration). The new process restores registers and devices, attaches the
//!    services with their states, still paused → `Restored`.
//! 3. Commit point: the old process sends `Go` and can no longer roll back; the new process
//!    resumes the guest → `Running`. The old process answers the API call and exits.
//!
//! The old side's steps are the hand-over every transport shares
//! ([`l1_services::handover`]: prepare → pause → state → ready → commit | rollback); this
//! module is its live-update transport. Any failure or missed deadline before the commit
//! point rolls back: the old process kills
//! the new one (with its whole process group: whatever it started goes too), attaches its
//! services again and resumes the guest, which saw only the pause. Step 1 runs while the main
//! loop serves other calls. A new process that got `Go` but did not confirm leaves the VM
//! *in doubt* here: it may run the guest on the same memory, so the old process refuses to
//! run it until the operator says otherwise (`ctl resume --force`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base_vmm::devices::virtio::disk_track::BaseSince as DiskBase;
use base_vmm::memory::GuestRam;
use base_vmm::state::{MachineConfig, VmState, STATE_VERSION};
use base_vmm::vcpu::VcpuEvent;
use base_vmm::vmm::{monotonic_us, Vmm};
use l1_services::handover::{self, Handover, NotReady, Step};
use l1_services::{HandedService, ServiceManager, ServiceRecord};
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long the new process may spend, before it answers the offer, mapping the guest's
/// memory into itself (lowest addresses first: the guest's code, page tables and stacks): each
/// page mapped ahead is one host page fault less after the hand-over, when the guest touches
/// it again in the new VM. Before the pause, so it costs total time, never guest time.
/// Off by default: measured on a quiet host (docs/benchmarks.md) a 40 ms budget added its
/// 40 ms to the total and did not lower the guest's stall. `SPANVMM_LIVE_UPDATE_MAP_MS` (read
/// by the new process) sets a budget.
const MAP_BUDGET: Duration = Duration::ZERO;

fn map_budget() -> Duration {
    std::env::var("SPANVMM_LIVE_UPDATE_MAP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(MAP_BUDGET, Duration::from_millis)
}

/// Largest frame accepted (the VM state is tens of KiB; services' states are small).
const MAX_FRAME: u32 = 64 << 20;

#[derive(Serialize, Deserialize)]
enum Msg {
    Offer {
        state_version: u32,
        machine: MachineConfig,
        serial: String,
        has_api: bool,
        /// The `--metrics-addr` listener's fd follows the API listener's.
        #[serde(default)]
        has_metrics: bool,
        /// Taps whose fds follow the memfd and the API listener, in order: the guest's
        /// network stays attached through the hand-over, no frame lost.
        #[serde(default)]
        taps: Vec<String>,
    },
    Ready {
        state_version: u32,
        /// When the new process's prepare steps ended ([`monotonic_us`]).
        #[serde(default)]
        marks: Vec<(String, u64)>,
    },
    /// Followed by the VM state as a binary frame.
    Takeover {
        /// The operator had paused the guest: it stays paused in the new process.
        #[serde(default)]
        operator_paused: bool,
        /// The disks' bases and the blocks written since, for an incremental disk migration
        /// later (the stamps were removed when this process opened the images).
        #[serde(default)]
        disk_bases: Vec<DiskBase>,
    },
    Restored {
        restore_us: u64,
        /// When the new process's restore steps ended ([`monotonic_us`]).
        #[serde(default)]
        marks: Vec<(String, u64)>,
    },
    Go,
    Running,
    Failed {
        error: String,
    },
}

/// The new process's disks take the bases the old one had (matched by image); a disk without
/// one is hashed by its next migration, as after a restart.
fn take_disk_bases(vmm: &Vmm, bases: &[DiskBase]) {
    let tracks = vmm.control().disk_tracks();
    for b in bases {
        if !tracks.iter().any(|t| t.take_base_since(b)) {
            tracing::warn!(
                "live update: disk {}: its base was not taken (no such disk here)",
                b.path.display()
            );
        }
    }
}

fn frame(msg: &Msg) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("messages always serialize");
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

fn send(sock: &mut UnixStream, msg: &Msg) -> anyhow::Result<()> {
    sock.write_all(&frame(msg))
        .context("live-update socket write")
}

/// Sends bytes as they are (the VM state): u32 LE length, then the bytes.
fn send_bytes(sock: &mut UnixStream, bytes: &[u8]) -> anyhow::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .context("the VM state is too large for a live update")?;
    let mut f = Vec::with_capacity(4 + bytes.len());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(bytes);
    sock.write_all(&f).context("live-update socket write")
}

fn recv_bytes(sock: &mut UnixStream) -> anyhow::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)
        .context("the other VMM process closed the live-update socket")?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        bail!("live-update state of {len} bytes is too large");
    }
    let mut buf = vec![0u8; len as usize];
    sock.read_exact(&mut buf)
        .context("live-update socket closed mid-state")?;
    Ok(buf)
}

fn parse(len: [u8; 4], sock: &mut UnixStream, mut have: Vec<u8>) -> anyhow::Result<Msg> {
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        bail!("live-update frame of {len} bytes is too large");
    }
    let start = have.len();
    have.resize(len as usize, 0);
    sock.read_exact(&mut have[start..])
        .context("live-update socket closed mid-frame")?;
    serde_json::from_slice(&have).context("malformed live-update message")
}

fn recv(sock: &mut UnixStream) -> anyhow::Result<Msg> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)
        .context("the other VMM process closed the live-update socket")?;
    parse(len, sock, Vec::new())
}

/// Receives a frame that carries descriptors; returns the message and the descriptors.
fn recv_with_fds(sock: &mut UnixStream) -> anyhow::Result<(Msg, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut fds: [RawFd; 8] = [-1; 8];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, alive for the call; `fds` has room for 8.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }.context("recvmsg")?;
    // SAFETY: the kernel installed `nfds` new descriptors in this process; we own them now.
    let owned: Vec<OwnedFd> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n < 4 {
        bail!("live-update offer truncated");
    }
    let len = [buf[0], buf[1], buf[2], buf[3]];
    let have = buf[4..n].to_vec();
    Ok((parse(len, sock, have)?, owned))
}

/// What the old process reports after a successful hand-over.
#[derive(Serialize)]
pub struct LiveUpdateReport {
    /// The new process.
    pub new_pid: u32,
    /// From pausing the guest to the new process reporting it running, ms.
    pub pause_ms: f64,
    /// Of which the new process spent restoring registers, devices and services, µs.
    pub restore_us: u64,
    /// From the API call to the hand-over, ms (includes the new process's start and prepare).
    pub total_ms: f64,
    /// Of which before the pause, ms: the new process started, mapped the guest's memory and
    /// built its VM and vCPUs while the guest ran.
    pub prepare_ms: f64,
    /// Services handed over.
    pub services: usize,
    /// Where the time went: each step of both processes, in order, with when it ended in µs
    /// from the guest's pause (negative: before it). Steps named `old:` ran in this process,
    /// `new:` in the new one.
    pub trace: Vec<TraceMark>,
}

/// One step of a live update and when it ended.
#[derive(Serialize, Clone)]
pub struct TraceMark {
    /// What ended.
    pub step: String,
    /// When, µs from the guest's pause (negative: before it).
    pub at_us: i64,
}

/// Steps stamped by both processes on the host's monotonic clock.
#[derive(Default)]
struct Marks(Vec<(String, u64)>);

impl Marks {
    fn old(&mut self, step: &str) {
        self.0.push((format!("old: {step}"), monotonic_us()));
    }

    fn new_side(&mut self, marks: Vec<(String, u64)>) {
        self.0
            .extend(marks.into_iter().map(|(s, t)| (format!("new: {s}"), t)));
    }

    /// In time order, relative to `pause` (µs on the same clock).
    fn relative_to(mut self, pause: u64) -> Vec<TraceMark> {
        self.0.sort_by_key(|(_, t)| *t);
        self.0
            .into_iter()
            .map(|(step, t)| TraceMark {
                step,
                at_us: t as i64 - pause as i64,
            })
            .collect()
    }
}

/// How a live update ended, for the old process.
pub enum Outcome {
    /// The new process runs the guest: exit without touching the VM again.
    HandedOver(LiveUpdateReport),
    /// Before the commit point: the new process is gone and the guest is as it was here.
    RolledBack(anyhow::Error),
    /// After the commit point the new process did not confirm: it may run the guest on the
    /// same memory, so this process must never run it again on its own (the message says how
    /// the operator resolves it).
    InDoubt(String),
}

/// A live update whose new process starts and prepares while the guest runs on; the main
/// loop serves other calls meanwhile and finishes it once the new process answered.
pub struct Preparing {
    sock: UnixStream,
    child: Child,
    t0: Instant,
    /// Steps before the pause, both processes' (the new one's come with its answer).
    marks: Arc<std::sync::Mutex<Marks>>,
}

/// Old side, first half: starts `binary` in a process group of its own (so that a rollback
/// also ends whatever it started) and offers it the VM. `on_answer` is called from a thread
/// of its own with the new process's answer (or its failure, or the missed deadline); the
/// caller then hands that to [`Preparing::finish`].
pub fn start(
    vmm: &Vmm,
    binary: &Path,
    serial: &str,
    api: Option<&UnixListener>,
    metrics: Option<&TcpListener>,
    deadline: Duration,
    on_answer: impl FnOnce(Result<(), String>) + Send + 'static,
) -> anyhow::Result<Preparing> {
    let t0 = Instant::now();
    let mut marks = Marks::default();
    marks.old("api call");
    // The new binary will own the guest: only a file nobody but root and this VMM's user can
    // have written (the same rule as for native services).
    let binary = l1_services::check_trusted_file(binary, "live-update binary")?;
    let binary = binary.path();
    let (mut sock, theirs) = UnixStream::pair().context("socketpair")?;
    // The child inherits its end: clear close-on-exec on it only.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let child = Command::new(binary)
        .args(["run", "--takeover-fd", &theirs.as_raw_fd().to_string()])
        .args(crate::logging::args())
        .args(["--seccomp", base_vmm::seccomp::mode().name()])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    drop(theirs);
    marks.old("new process spawned");
    let marks = Arc::new(std::sync::Mutex::new(marks));
    let mut preparing = Preparing {
        sock: sock.try_clone().context("socketpair")?,
        child,
        t0,
        marks: marks.clone(),
    };
    let offered = (|| -> anyhow::Result<()> {
        sock.set_read_timeout(Some(deadline))?;
        let taps = vmm.control().handover_fds();
        let offer = frame(&Msg::Offer {
            state_version: STATE_VERSION,
            machine: vmm.machine().clone(),
            serial: serial.to_string(),
            has_api: api.is_some(),
            has_metrics: metrics.is_some(),
            taps: taps.iter().map(|(name, _)| name.clone()).collect(),
        });
        let mut fds = vec![vmm.control().ram().memfd().as_raw_fd()];
        fds.extend(api.map(|l| l.as_raw_fd()));
        fds.extend(metrics.map(|l| l.as_raw_fd()));
        fds.extend(taps.iter().map(|(_, fd)| *fd));
        sock.send_with_fds(&[&offer[..]], &fds)
            .context("the new binary did not take the offer (did it start?)")?;
        lock(&marks).old("offer sent");
        Ok(())
    })();
    if let Err(e) = offered {
        preparing.kill();
        return Err(e);
    }
    std::thread::Builder::new()
        .name("live-update".into())
        .spawn(move || {
            base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Helper);
            let answer = match recv(&mut sock) {
                Ok(Msg::Ready {
                    state_version,
                    marks: theirs,
                }) if state_version == STATE_VERSION => {
                    let mut m = lock(&marks);
                    m.new_side(theirs);
                    m.old("ready received");
                    Ok(())
                }
                Ok(Msg::Ready { state_version, .. }) => Err(format!(
                    "the new binary speaks VM state version {state_version}, this one \
                     {STATE_VERSION}"
                )),
                Ok(Msg::Failed { error }) => {
                    Err(format!("the new binary failed to prepare: {error}"))
                }
                Ok(_) => Err("the new binary answered out of turn".into()),
                Err(e) => Err(format!("{e:#}")),
            };
            on_answer(answer);
        })
        .context("cannot start the live-update thread")?;
    Ok(preparing)
}

impl Preparing {
    /// The new process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the new process and everything it started (its process group).
    pub fn kill(&mut self) {
        // SAFETY: signals the process group the child leads (created at spawn); no memory
        // is involved.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// Old side, second half, on the main loop once the new process answered: the shared
    /// hand-over steps ([`l1_services::handover`]) over the live-update socket. Before the
    /// commit point any failure rolls back.
    pub fn finish(
        mut self,
        answer: Result<(), String>,
        vmm: &mut Vmm,
        manager: &ServiceManager,
    ) -> Outcome {
        let marks = std::mem::take(&mut *lock(&self.marks));
        let mut steps = Takeover {
            answer: Some(answer),
            sock: &mut self.sock,
            vmm,
            manager,
            t0: self.t0,
            paused_at: None,
            paused_mono: 0,
            prepare_ms: 0.0,
            operator_paused: false,
            services: Vec::new(),
            restore_us: 0,
            marks,
            captured: None,
        };
        let result = handover::hand_over(&mut steps);
        let (paused_at, prepare_ms, restore_us, services) = (
            steps.paused_at,
            steps.prepare_ms,
            steps.restore_us,
            steps.services.len(),
        );
        let trace = std::mem::take(&mut steps.marks).relative_to(steps.paused_mono);
        match result {
            Ok(_) => {
                let report = LiveUpdateReport {
                    new_pid: self.child.id(),
                    pause_ms: paused_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
                    restore_us,
                    total_ms: self.t0.elapsed().as_secs_f64() * 1e3,
                    prepare_ms,
                    services,
                    trace,
                };
                // The new process lives on; nobody here waits for it.
                std::mem::forget(self.child);
                Outcome::HandedOver(report)
            }
            Err(f) if f.step == Step::Prepare => {
                let status = self.child.try_wait().ok().flatten();
                self.kill();
                Outcome::RolledBack(anyhow::anyhow!(
                    "live update aborted; the guest was never paused: {} (new binary's exit \
                     status: {status:?})",
                    f.error
                ))
            }
            Err(f) if !f.in_doubt => {
                self.kill();
                let e = match (f.step, f.resume_error) {
                    (Step::Pause, _) => f.error,
                    (_, Some(re)) => f
                        .error
                        .context(format!("and resuming the guest failed: {re}")),
                    (_, None) => f
                        .error
                        .context("live update rolled back; the guest runs on in the old process"),
                };
                Outcome::RolledBack(e)
            }
            Err(f) => Outcome::InDoubt(self.in_doubt(f.error)),
        }
    }

    /// After the commit point the new process did not confirm: say so, and reap it whenever
    /// it ends.
    fn in_doubt(self, e: anyhow::Error) -> String {
        let mut child = self.child;
        let pid = child.id();
        // A dying process's socket closes a moment before it can be waited for (the kernel
        // closes its files, then makes it a zombie): give it that moment, or a process
        // SIGKILLed right after the go-ahead is reported "still alive".
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut exited = child.try_wait().ok().flatten();
        while exited.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            exited = child.try_wait().ok().flatten();
        }
        let alive = exited.is_none();
        let why = format!(
            "live update in doubt: the new process {pid} was told to run the guest but did not \
             confirm ({e:#}); it is {}. It may have run the guest on this same memory, so this \
             process will not run it again on its own. If process {pid} runs the guest, it owns \
             it: shut this process down. If it never did, resume here with `spanvmm ctl resume \
             --force`.",
            if alive { "still alive" } else { "gone" }
        );
        // Whatever it does next is not ours to decide, but it is our child: reap it when it
        // ends, on a thread of its own, so that no zombie is left behind (a forgotten child
        // stayed a zombie for as long as this process lived).
        if alive {
            let _ = std::thread::Builder::new()
                .name("live-update-reaper".into())
                .spawn(move || {
                    base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Helper);
                    let _ = child.wait();
                });
        }
        why
    }
}

/// The old side's hand-over steps over the live-update socket: the memory went with the
/// offer (the memfd), so the state carries the VM state and the services.
struct Takeover<'a> {
    /// The new process's answer to the offer: the outcome of the prepare step, which ran
    /// while the main loop served other calls.
    answer: Option<Result<(), String>>,
    sock: &'a mut UnixStream,
    vmm: &'a mut Vmm,
    manager: &'a ServiceManager,
    t0: Instant,
    paused_at: Option<Instant>,
    /// The pause on the monotonic clock the trace is relative to.
    paused_mono: u64,
    prepare_ms: f64,
    /// The operator had paused the guest: it stays paused in the new process.
    operator_paused: bool,
    /// Services handed over with the state (re-attached here on a rollback).
    services: Vec<HandedService>,
    restore_us: u64,
    marks: Marks,
    /// The state captured with the pause.
    captured: Option<VmState>,
}

impl Handover for Takeover<'_> {
    type Error = anyhow::Error;

    fn prepare(&mut self) -> anyhow::Result<()> {
        match self.answer.take() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(anyhow::anyhow!(e)),
            None => Err(anyhow::anyhow!("the new binary never answered the offer")),
        }
    }

    fn pause(&mut self) -> anyhow::Result<bool> {
        // The guest stops here.
        self.paused_at = Some(Instant::now());
        self.paused_mono = monotonic_us();
        self.prepare_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        self.operator_paused = self.vmm.control().operator_paused();
        // Paused and captured in one round trip to the vCPU threads.
        let (paused, state) = self.vmm.control().pause_and_capture()?;
        self.captured = Some(state);
        self.marks.old("vcpus paused and state captured");
        Ok(paused)
    }

    fn send_state(&mut self) -> anyhow::Result<()> {
        let mut state = match self.captured.take() {
            Some(s) => s,
            None => self.vmm.capture_state()?,
        };
        let (services, lost) = self.manager.hand_over();
        for (name, e) in &lost {
            tracing::warn!("live update: service {name} could not hand its state over: {e}");
        }
        self.services = services;
        state.services = ServiceRecord::of_hand_over(&self.services, &[])
            .iter()
            .map(ServiceRecord::to_section)
            .collect();
        let takeover = Msg::Takeover {
            operator_paused: self.operator_paused,
            // Taken with the guest paused: nothing writes the images until the new process
            // runs it (or this one again, after a rollback, still tracking them).
            disk_bases: self
                .vmm
                .control()
                .disk_tracks()
                .iter()
                .filter_map(|t| t.base_since())
                .collect(),
        };
        self.marks.old("services detached");
        send(self.sock, &takeover)?;
        send_bytes(self.sock, &state_bytes(&state))?;
        self.marks.old("state sent");
        Ok(())
    }

    fn await_ready(&mut self) -> Result<(), NotReady<anyhow::Error>> {
        match recv(self.sock) {
            Ok(Msg::Restored { restore_us, marks }) => {
                self.restore_us = restore_us;
                self.marks.new_side(marks);
                self.marks.old("restored received");
                Ok(())
            }
            Ok(Msg::Failed { error }) => Err(NotReady::Refused(anyhow::anyhow!(
                "the new binary failed to restore: {error}"
            ))),
            Ok(_) => Err(NotReady::Refused(anyhow::anyhow!(
                "the new binary answered out of turn"
            ))),
            Err(e) => Err(NotReady::Lost(e)),
        }
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        // From here on, the new process owns the guest (the go-ahead may or may not have
        // reached it if this fails).
        send(self.sock, &Msg::Go)?;
        self.marks.old("go sent");
        Ok(())
    }

    fn await_running(&mut self) -> anyhow::Result<()> {
        match recv(self.sock)? {
            Msg::Running => {
                self.marks.old("running received");
                Ok(())
            }
            _ => bail!("unexpected answer"),
        }
    }

    fn undo(&mut self) {
        for s in &self.services {
            if let Err(e) = self.manager.attach_handed(s) {
                tracing::error!(
                    "rollback: service {} not re-attached: {e}",
                    s.path.display()
                );
            }
        }
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.vmm.control().resume()?;
        Ok(())
    }
}

/// The VM state as the takeover carries it: the one place the old side produces its bytes.
fn state_bytes(state: &VmState) -> Vec<u8> {
    state.to_bytes()
}

/// The VM state from the takeover's bytes: the one place the new side parses them.
fn parse_state(bytes: &[u8]) -> anyhow::Result<VmState> {
    Ok(VmState::from_bytes(bytes, "live-update stream")?)
}

/// What the new process takes over.
pub struct TakenOver {
    /// The VM, running.
    pub vmm: Vmm,
    /// Its services, attached with their states.
    pub manager: Arc<ServiceManager>,
    /// Where the console goes.
    pub serial: String,
    /// The API listener, if the old process had one.
    pub api: Option<UnixListener>,
    /// The `--metrics-addr` listener, if the old process had one.
    pub metrics: Option<TcpListener>,
    /// How long restoring registers, devices and services took here, µs.
    pub restore_us: u64,
}

/// New side: `spanvmm run --takeover-fd FD`.
pub fn take_over(fd: RawFd, events: Sender<VcpuEvent>) -> anyhow::Result<TakenOver> {
    // SAFETY: the old process handed us this descriptor on the command line; nothing else
    // in this process uses it.
    let mut sock = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    match take_over_inner(&mut sock, events) {
        Ok(t) => Ok(t),
        Err(e) => {
            let _ = send(
                &mut sock,
                &Msg::Failed {
                    error: format!("{e:#}"),
                },
            );
            Err(e)
        }
    }
}

fn take_over_inner(sock: &mut UnixStream, events: Sender<VcpuEvent>) -> anyhow::Result<TakenOver> {
    let (offer, mut fds) = recv_with_fds(sock)?;
    let mut marks: Vec<(String, u64)> = vec![("offer received".into(), monotonic_us())];
    let Msg::Offer {
        state_version,
        machine,
        serial,
        has_api,
        has_metrics,
        taps,
    } = offer
    else {
        bail!("expected an offer");
    };
    if state_version != STATE_VERSION {
        send(
            sock,
            &Msg::Ready {
                state_version: STATE_VERSION,
                marks: Vec::new(),
            },
        )?;
        bail!("VM state version {state_version} offered, this binary speaks {STATE_VERSION}");
    }
    let listeners = usize::from(has_api) + usize::from(has_metrics);
    if fds.len() != 1 + listeners + taps.len() {
        bail!("the offer carried {} descriptors", fds.len());
    }
    for (name, fd) in taps.iter().zip(fds.split_off(1 + listeners)) {
        base_vmm::devices::virtio::net::adopt_tap(name, fd);
    }
    let metrics = has_metrics.then(|| TcpListener::from(fds.pop().expect("counted")));
    let api = has_api.then(|| UnixListener::from(fds.pop().expect("counted")));
    let ram = Arc::new(GuestRam::from_memfd(
        fds.pop().expect("counted"),
        machine.mem_bytes,
    )?);
    marks.push(("memory mapped".into(), monotonic_us()));
    let prepared = Vmm::prepare(ram.clone(), &machine)?;
    marks.push(("vm and vcpus created".into(), monotonic_us()));
    let pages = ram.map_data_within(map_budget());
    marks.push(("guest data mapped ahead".into(), monotonic_us()));
    tracing::debug!("live update: {} MiB of guest data mapped ahead", pages >> 8);
    send(
        sock,
        &Msg::Ready {
            state_version: STATE_VERSION,
            marks: std::mem::take(&mut marks),
        },
    )?;

    let Msg::Takeover {
        operator_paused,
        disk_bases,
    } = recv(sock)?
    else {
        bail!("expected the takeover");
    };
    let state = recv_bytes(sock)?;
    let t = Instant::now();
    let mut steps = vec![("state received", monotonic_us())];
    let state = parse_state(&state)?;
    steps.push(("state parsed", monotonic_us()));
    let vmm = prepared.finish_marked(&state, &serial, events, true, &mut steps)?;
    take_disk_bases(&vmm, &disk_bases);
    let manager = crate::services::manager_for(&vmm)?;
    steps.push(("service manager ready", monotonic_us()));
    for s in &vmm.take_service_sections() {
        // The old process sends only services that handed their state over.
        let ServiceRecord::Handed(h) = ServiceRecord::from_section(s)? else {
            bail!("{}: a declined service in a live update", s.id);
        };
        manager
            .attach_handed(&h)
            .with_context(|| format!("service {}", h.path.display()))?;
    }
    steps.push(("services attached", monotonic_us()));
    let restore_us = t.elapsed().as_micros() as u64;
    send(
        sock,
        &Msg::Restored {
            restore_us,
            marks: steps.into_iter().map(|(s, t)| (s.to_string(), t)).collect(),
        },
    )?;
    let Msg::Go = recv(sock)? else {
        bail!("expected the go-ahead");
    };
    // Past the commit point this process outlives the old one: leave the process group the
    // old one started it in (which a rollback kills) for the old one's own, as if it had
    // been there from the start (a terminal's Ctrl-C still reaches it).
    // SAFETY: plain process-group syscalls on this process and its parent.
    unsafe { libc::setpgid(0, libc::getpgid(libc::getppid())) };
    if operator_paused {
        vmm.control().operator_pause()?;
    } else {
        vmm.control().resume()?;
    }
    let _ = send(sock, &Msg::Running);
    Ok(TakenOver {
        vmm,
        manager,
        serial,
        api,
        metrics,
        restore_us,
    })
}
