//! Per-thread seccomp filters (Firecracker's approach): one BPF program per thread role, compiled
//! by `seccompiler` once (the main thread's at start-up, each other role's when its first thread
//! enters it: compiling all nine was most of the 0.68 ms the quiet start-up trace spent on
//! seccomp) and installed by each thread before it runs guest-driven or untrusted work. A
//! forbidden syscall does not kill the process: the kernel sends SIGSYS (`SECCOMP_RET_TRAP`),
//! our handler records the syscall in the thread and makes it fail with `EPERM`; the thread's
//! owner then reports it (a service that made it is failed and detached).
//!
//! Filters stack: a thread inherits the filter of the thread that created it and can only narrow
//! it. The main thread installs its filter first and creates every other thread, so its list is
//! the union of all roles' (see [`Role::allowed`]); each other role's list holds what its own
//! threads (and the threads they create) were seen to need.
//!
//! The lists started from the syscalls each role's code makes and were completed by running the
//! whole `spanvmm` test suite with `--seccomp log` and reading the kernel's audit records
//! (`dmesg | grep type=1326`, the thread's name in `comm`); that run found the API threads'
//! `clone3`/`set_robust_list`/`geteuid`, the lazy loader's `setpriority`, the snapshot
//! engine's `rmdir` and what a live update's new binary (and a wrapper script around it) needs
//! right after `execve`. The kernel rate-limits those records (`kauditd_printk_skb: N callbacks
//! suppressed`): set `kernel.printk_ratelimit=0` while collecting.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::syscalls_x86_64::SYSCALLS;

/// What a thread's forbidden syscall does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// It fails with EPERM and is reported (SIGSYS handler); the process runs on.
    #[default]
    On,
    /// It is allowed and the kernel logs it (audit type 1326 in the kernel log): for finding
    /// what a new code path needs.
    Log,
    /// No filters.
    Off,
}

impl Mode {
    /// As given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("seccomp mode must be on, log or off, not {s:?}")),
        }
    }
}

/// The kind of work a thread does; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main loop: start-up, API calls, services' ticks and calls, live update (creates
    /// every other thread, so its list is the union of all).
    Main,
    /// A vCPU: KVM_RUN, port I/O and MMIO, the services those reach (native or Wasm).
    Vcpu,
    /// The API listener and its connection threads: parse HTTP, hand the call to the main loop.
    Api,
    /// The Prometheus listener (`--metrics-addr`).
    Metrics,
    /// Service helpers: the Wasm epoch ticker and asynchronous delivery of guest writes.
    Service,
    /// Migration source and destination: TLS sockets, guest memory, userfaultfd (post-copy).
    Migration,
    /// Snapshot writers and mergers, lazy restore: files and userfaultfd.
    Snapshot,
    /// Small helpers: event forwarding, waiting on the live-update peer, reaping.
    Helper,
    /// The virtio devices' event loop: queue notifications (eventfds), disk file I/O.
    Device,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 9] = [
        Role::Main,
        Role::Vcpu,
        Role::Api,
        Role::Metrics,
        Role::Service,
        Role::Migration,
        Role::Snapshot,
        Role::Helper,
        Role::Device,
    ];

    /// The role's name in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::Api => "api",
            Role::Metrics => "metrics",
            Role::Service => "service",
            Role::Migration => "migration",
            Role::Snapshot => "snapshot",
            Role::Helper => "helper",
            Role::Device => "device",
        }
    }

    fn groups(self) -> &'static [&'static [&'static str]] {
        match self {
            Role::Main => &[], // the union of all: see allowed()
            Role::Vcpu => &[BASE, MEMORY, FILES_READ, KVM, SIGNALS, SERVICE_CODE],
            Role::Api => &[BASE, MEMORY, SOCKET_SERVE, FILES_READ, THREADS, PEER_IDS],
            Role::Metrics => &[BASE, MEMORY, SOCKET_SERVE],
            Role::Service => &[BASE, MEMORY, FILES_READ, SERVICE_CODE],
            Role::Migration => &[
                BASE,
                MEMORY,
                FILES_READ,
                FILES_WRITE,
                SOCKET_SERVE,
                SOCKET_CONNECT,
                KVM,
                UFFD,
                SIGNALS,
                THREADS,
            ],
            Role::Snapshot => &[
                BASE,
                MEMORY,
                FILES_READ,
                FILES_WRITE,
                KVM,
                UFFD,
                THREADS,
                PRIORITY,
            ],
            Role::Helper => &[BASE, MEMORY, SOCKET_SERVE, PROCESSES],
            Role::Device => &[BASE, MEMORY, FILES_READ, FILES_WRITE],
        }
    }

    /// The syscalls this role's threads may make, sorted by name.
    pub fn allowed(self) -> Vec<&'static str> {
        let mut v: Vec<&str> = match self {
            Role::Main => Role::ALL[1..]
                .iter()
                .flat_map(|r| r.groups().iter().copied().flatten().copied())
                .chain(MAIN_ONLY.iter().copied())
                .collect(),
            r => r.groups().iter().copied().flatten().copied().collect(),
        };
        v.sort_unstable();
        v.dedup();
        v
    }
}

// What every Rust thread needs to run, block and end: locks, channels, sleeping, its stack.
const BASE: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "close",
    "futex",
    "sched_yield",
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "gettid",
    "getpid",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "exit",
    "exit_group",
    "restart_syscall",
    "poll",
    "ppoll",
    "epoll_wait",
    "epoll_ctl",
    "epoll_create1",
    "eventfd2",
    "getrandom",
    "fcntl",
    "prctl",
    "sched_getaffinity",
    "rseq",
    // Narrowing its own filter (a thread entering its role): only ever takes rights away.
    "seccomp",
];

// The allocator and thread stacks.
const MEMORY: &[&str] = &["mmap", "munmap", "mremap", "madvise", "brk", "mprotect"];

// Opening and reading files (kernels, snapshots, service files, /proc).
const FILES_READ: &[&str] = &[
    "openat",
    "open",
    "statx",
    "fstat",
    "newfstatat",
    "lseek",
    "pread64",
    "preadv",
    "getdents64",
    "readlink",
    "readlinkat",
    "access",
    "faccessat2",
    "getcwd",
    "dup",
    "dup3",
];

// Writing files (snapshots, received memory): create, size, sync, rename, remove.
const FILES_WRITE: &[&str] = &[
    "pwrite64",
    "pwritev",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "mkdir",
    "mkdirat",
    "fchmod",
    "fchmodat",
    "copy_file_range",
    "sendfile",
];

// KVM's ioctls, and the memfd holding guest RAM.
const KVM: &[&str] = &["ioctl", "memfd_create"];

// The vCPU kick (a signal to leave KVM_RUN) and timers.
const SIGNALS: &[&str] = &[
    "rt_sigaction",
    "tgkill",
    "timer_create",
    "timer_settime",
    "timer_delete",
];

// What a service's code (native `.so` or Wasm JIT code with its traps) may do on the thread
// that delivers its events: memory and the signals wasmtime uses for traps.
const SERVICE_CODE: &[&str] = &["rt_sigaction", "membarrier"];

// Serving a connected or listening socket.
const SOCKET_SERVE: &[&str] = &[
    "accept",
    "accept4",
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
];

// Opening connections and listeners (migration).
const SOCKET_CONNECT: &[&str] = &["socket", "connect", "bind", "listen"];

// Comparing a caller's uid with our own (SO_PEERCRED check).
const PEER_IDS: &[&str] = &["geteuid", "getuid"];

// Missing-page service (post-copy, lazy restore).
const UFFD: &[&str] = &["userfaultfd"];

// Creating threads.
const THREADS: &[&str] = &["clone", "clone3", "set_robust_list"];

// Child processes (live update's new binary).
const PROCESSES: &[&str] = &["wait4", "waitid", "kill", "pidfd_open", "pidfd_send_signal"];

// The lazy loader's background copy lowers its own priority.
const PRIORITY: &[&str] = &["setpriority"];

// Only the main thread: start-up, binding the API socket, loading services, live update's exec.
// A filter survives execve: the live update's new binary starts under this one (then narrows
// it), so its process start-up (dynamic loader, libc, a wrapper script) is listed here too.
const MAIN_ONLY: &[&str] = &[
    "execve",
    "vfork",
    "socketpair",
    "pipe2",
    "chmod",
    "umask",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "setsid",
    "setpgid",
    "uname",
    "sysinfo",
    "prlimit64",
    "getrlimit",
    "sched_setaffinity",
    // The new binary's start-up after execve.
    "arch_prctl",
    "set_tid_address",
    "getppid",
    "getpgid",
    "getpgrp",
    "chdir",
    "dup2",
];

/// What each role may make, as the Markdown list in docs/operations.md.
pub fn markdown() -> String {
    let mut s = String::new();
    for role in Role::ALL {
        let list = role.allowed();
        s.push_str(&format!(
            "- **{}** ({}): {}\n",
            role.name(),
            list.len(),
            list.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s
}

/// A syscall's name ("?" for a number unknown here).
pub fn syscall_name(nr: i64) -> &'static str {
    SYSCALLS
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("?", |(_, name)| name)
}

fn syscall_nr(name: &str) -> Option<i64> {
    SYSCALLS.iter().find(|(_, n)| *n == name).map(|(nr, _)| *nr)
}

/// Why filters could not be made or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list names a syscall this architecture does not have.
    #[error("seccomp: unknown syscall {0:?} in the {1} list")]
    Unknown(&'static str, &'static str),
    /// seccompiler refused the filter.
    #[error("seccomp: cannot build the {0} filter: {1}")]
    Build(&'static str, String),
    /// The kernel refused to install it.
    #[error("seccomp: cannot install the {0} filter: {1}")]
    Install(&'static str, String),
    /// The SIGSYS handler could not be installed.
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Builds one role's BPF program with the action for forbidden syscalls.
pub fn compile(role: Role, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mut rules = BTreeMap::new();
    for name in role.allowed() {
        let nr = syscall_nr(name).ok_or(SeccompError::Unknown(name, role.name()))?;
        rules.insert(nr, Vec::new());
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(role.name(), e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(role.name(), e.to_string()))
}

/// The mode and each role's program (by its place in [`Role::ALL`]), compiled on first use.
struct Filters {
    mode: Mode,
    progs: [OnceLock<BpfProgram>; Role::ALL.len()],
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Forbidden syscalls trapped in this process (all threads).
static TRAPPED: AtomicU64 = AtomicU64::new(0);
/// The last one's number.
static LAST_TRAPPED: AtomicU64 = AtomicU64::new(u64::MAX);

thread_local! {
    // Const-initialised plain cells: reading or writing them is a TLS access with no lazy
    // initialisation or destructor, safe from a signal handler.
    static THREAD_TRAPS: Cell<u64> = const { Cell::new(0) };
    static THREAD_LAST: Cell<i64> = const { Cell::new(-1) };
    static THREAD_ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

/// Installs the SIGSYS handler, then compiles and installs the main filter on the calling
/// thread (call it from the main thread before it creates any other). The other roles' filters
/// are compiled when a thread first enters them, off the start-up path (a unit test compiles
/// every one). Once per process; `Mode::Off` installs nothing.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    let _ = FILTERS.set(Filters {
        mode,
        progs: [const { OnceLock::new() }; Role::ALL.len()],
    });
    if mode == Mode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    enter(Role::Main)
}

/// The mode [`init`] was given (`Off` before it).
pub fn mode() -> Mode {
    FILTERS.get().map_or(Mode::Off, |f| f.mode)
}

/// `role`'s program, compiled on first use (a failure is not kept: the next call compiles again).
fn program(filters: &Filters, role: Role) -> Result<&BpfProgram, SeccompError> {
    let i = Role::ALL.iter().position(|r| *r == role).unwrap_or(0);
    if let Some(p) = filters.progs[i].get() {
        return Ok(p);
    }
    let p = compile(role, filters.mode)?;
    // Two threads may compile it at once: one's copy is kept, both are the same.
    Ok(filters.progs[i].get_or_init(|| p))
}

/// Installs `role`'s filter on the calling thread (nothing when seccomp is off or [`init`] was
/// not called, e.g. in a library test).
pub fn enter(role: Role) -> Result<(), SeccompError> {
    THREAD_ROLE.with(|r| r.set(Some(role)));
    let Some(filters) = FILTERS.get().filter(|f| f.mode != Mode::Off) else {
        return Ok(());
    };
    let prog = program(filters, role)?;
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(role.name(), e.to_string()))
}

/// [`enter`] for a thread's first line: a failure is logged, the thread runs on unfiltered
/// rather than leaving its work undone (start-up proved the main filter installs; a unit test
/// compiles every role's).
pub fn enter_or_log(role: Role) {
    if let Err(e) = enter(role) {
        tracing::error!("{e}");
    }
}

/// Forbidden syscalls the calling thread has made so far.
pub fn thread_traps() -> u64 {
    THREAD_TRAPS.with(Cell::get)
}

/// The last forbidden syscall the calling thread made (its number).
pub fn thread_last_trap() -> Option<i64> {
    Some(THREAD_LAST.with(Cell::get)).filter(|n| *n >= 0)
}

/// The calling thread's role, if it entered one.
pub fn thread_role() -> Option<Role> {
    THREAD_ROLE.with(Cell::get)
}

/// Forbidden syscalls trapped in the whole process, and the last one's number.
pub fn process_traps() -> (u64, Option<i64>) {
    let last = LAST_TRAPPED.load(Ordering::Relaxed);
    (
        TRAPPED.load(Ordering::Relaxed),
        (last != u64::MAX).then_some(last as i64),
    )
}

/// When the calling thread made forbidden syscalls since [`thread_traps`] returned `before`:
/// the message saying which, naming `what` ran (e.g. "service 'x'") and the thread's role. The
/// caller logs it (once, with what it does about it).
pub fn forbidden_since(before: u64, what: &str) -> Option<String> {
    let now = thread_traps();
    if now == before {
        return None;
    }
    let nr = thread_last_trap().unwrap_or(-1);
    let role = thread_role().map_or("unfiltered", Role::name);
    Some(format!(
        "seccomp: {what} ({role} thread) made forbidden syscall {} ({nr})",
        syscall_name(nr)
    ))
}

// Offsets in the kernel's siginfo for SIGSYS: si_syscall is the int after si_call_addr.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); si_syscall is an int at
    // a fixed offset of it on x86_64.
    let nr = unsafe { *((info as *const u8).add(SI_SYSCALL_OFFSET) as *const libc::c_int) };
    // Async-signal-safe: atomics and const-initialised thread-locals only.
    TRAPPED.fetch_add(1, Ordering::Relaxed);
    LAST_TRAPPED.store(nr as u64, Ordering::Relaxed);
    THREAD_TRAPS.with(|c| c.set(c.get() + 1));
    THREAD_LAST.with(|c| c.set(i64::from(nr)));
    // The syscall was not made; what the caller sees it return is RAX when the handler returns.
    // SAFETY: `ctx` is the ucontext the kernel built for this handler (SA_SIGINFO).
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler and flags before use.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a handler for SIGSYS with a valid sigaction; the old one is not needed.
    let r = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_names_real_syscalls_and_compiles() {
        for role in Role::ALL {
            compile(role, Mode::On).unwrap();
        }
        assert_eq!(syscall_name(101), "ptrace");
    }

    #[test]
    fn the_operators_guide_lists_the_filters_in_force() {
        let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
        let doc = std::fs::read_to_string(doc).unwrap();
        assert!(
            doc.contains(&markdown()),
            "docs/operations.md's seccomp list is stale: replace it with `spanvmm seccomp-list`"
        );
    }

    #[test]
    fn main_allows_what_every_role_allows() {
        let main = Role::Main.allowed();
        for role in Role::ALL {
            for s in role.allowed() {
                assert!(main.contains(&s), "{s} of {role:?}");
            }
        }
    }

    #[test]
    fn a_forbidden_syscall_fails_with_eperm_and_is_recorded() {
        install_sigsys_handler().unwrap();
        let prog = compile(Role::Metrics, Mode::On).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            let before = thread_traps();
            // SAFETY: ptrace PEEKDATA of pid 1 reads nothing of ours; it is refused anyway.
            let r = unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 1, 0, 0) };
            let err = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((r, err), (-1, Some(libc::EPERM)));
            assert_eq!(thread_traps(), before + 1);
            assert_eq!(thread_last_trap(), Some(libc::SYS_ptrace));
        })
        .join()
        .unwrap();
    }
}
