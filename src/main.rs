//! spanvmm: the command line. `spanvmm run` starts a VM (one process per VM) and serves its
//! control API; `spanvmm ctl` talks to that API. Everything else lives in the `vmm` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base_vmm::boot::EntryPreference;
use base_vmm::cpu::CpuTemplate;
use base_vmm::devices::virtio::{BlockConfig, NetConfig};
use base_vmm::dirty_ring::DirtyLogMode;
use base_vmm::vmm::VmConfig;
use clap::{Parser, Subcommand, ValueEnum};
use vmm::ctl::{self, snapshot, CtlOp};
use vmm::run::{run, Source};
use vmm::{logging, plugin_tool, services};

const DEFAULT_MEMORY_MIB: u64 = 256;

#[derive(Parser)]
#[command(
    name = "spanvmm",
    version,
    about = "A minimal KVM VMM with plug-in hypervisor services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Entry {
    /// spanguest's direct 64-bit CPL3 entry when the kernel has it, else PVH.
    Direct,
    /// Always the PVH 32-bit entry (what QEMU does).
    Pvh,
}

// Parsed once per process: the size of `Run`'s options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start a VM, from a kernel or from a saved state.
    Run {
        /// Kernel: spanguest ELF, another PVH ELF, or a Linux bzImage.
        #[arg(long, required_unless_present_any = ["restore", "takeover_fd", "incoming", "standby"])]
        kernel: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Initrd for a bzImage kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Guest memory in MiB (default 256). With --incoming: the size of the guest expected,
        /// allocated before the source connects; a guest of another size is refused.
        #[arg(long)]
        memory: Option<u64>,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Serial console output: stdout, none, or a file path.
        #[arg(long, default_value = "stdout")]
        serial: String,
        /// Control API socket.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Restore the VM saved in this directory instead of booting.
        #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
        restore: Option<PathBuf>,
        /// With --restore: stay paused until `spanvmm ctl resume`.
        #[arg(long, requires = "restore")]
        paused: bool,
        /// With --restore: run at once and load guest memory on demand (userfaultfd) while
        /// the rest streams in.
        #[arg(long, requires = "restore")]
        lazy: bool,
        /// With --restore: the key file of an encrypted snapshot.
        #[arg(long, requires = "restore")]
        key: Option<PathBuf>,
        /// Prepare a VM of --memory MiB and --vcpus vCPUs, then wait for a snapshot to restore
        /// into it (`ctl snapshot load`, `PUT /snapshot/load`); needs --api-socket.
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "restore", "incoming"], requires = "api_socket")]
        standby: bool,
        /// Boot entry for kernels that offer several.
        #[arg(long, value_enum, default_value = "direct")]
        entry: Entry,
        /// Attach a service once the VM runs: `PATH` or `PATH:CONFIG` (a `.wasm` component or a
        /// native `.so`). Repeatable; services attach in the order given.
        #[arg(long = "plugin", value_name = "PATH[:CONFIG]")]
        plugins: Vec<String>,
        /// Load services (`--plugin`, `plugin attach`, `plugin replace`) only from under this
        /// directory (repeatable; symlinks and `..` leading out are refused). Wasm components
        /// there must then pass the owner and mode checks of native ones.
        #[arg(long = "plugin-dir", value_name = "DIR")]
        plugin_dirs: Vec<PathBuf>,
        /// Refuse every native (`.so`) service: only sandboxed Wasm components attach.
        #[arg(long)]
        no_native_plugins: bool,
        /// Load only service files with this SHA-256 (64 hex digits; repeatable).
        #[arg(long = "plugin-sha256", value_name = "HEX")]
        plugin_sha256: Vec<String>,
        #[command(flatten)]
        log: logging::LogOptions,
        /// Seccomp filters per thread: `on` (a forbidden syscall fails with EPERM and is
        /// reported; a service that makes one is detached), `log` (allowed, logged by the
        /// kernel: for finding what a new code path needs) or `off`.
        #[arg(long, value_name = "on|log|off", default_value = "on", env = "SPANVMM_SECCOMP",
              value_parser = parse_seccomp)]
        seccomp: base_vmm::seccomp::Mode,
        /// How the guest's writes are logged for migrations and live snapshots: `bitmap`
        /// (KVM_GET_DIRTY_LOG), `ring` (KVM's dirty ring: a harvest reads only the pages
        /// written) or `auto` (the ring for guests of 16 GiB and more where KVM offers it).
        #[arg(long, value_name = "auto|bitmap|ring", default_value = "auto",
              env = "SPANVMM_DIRTY_LOG", value_parser = parse_dirty_log)]
        dirty_log: DirtyLog,
        /// Confine the VMM before the guest boots: a new mount namespace whose root is DIR
        /// (with /dev/kvm and /dev/userfaultfd made there), running as --uid/--gid. Every
        /// other path given is then inside DIR. Needs root.
        #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
        jail: Option<PathBuf>,
        /// With --jail: the user to run as.
        #[arg(long, requires = "jail")]
        uid: Option<u32>,
        /// With --jail: the group to run as.
        #[arg(long, requires = "jail")]
        gid: Option<u32>,
        /// With --jail: a cgroup of its own beneath the caller's, with these limits
        /// (`mem=BYTES,cpu=QUOTA_US/PERIOD_US`, each optional).
        #[arg(long, value_name = "mem=BYTES,cpu=QUOTA/PERIOD", requires = "jail",
              value_parser = parse_limits)]
        cgroup: Option<vmm::jail::Limits>,
        /// Also serve `GET /metrics` (Prometheus/OpenMetrics text) over plain HTTP on this
        /// address, e.g. 127.0.0.1:9100 (the API socket serves it too).
        #[arg(long, value_name = "HOST:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Internal: take a running VM over from another spanvmm process (live update).
        #[arg(long, hide = true, conflicts_with_all = ["kernel", "restore"])]
        takeover_fd: Option<i32>,
        /// Receive the VM by live migration: listen on `tls://HOST:PORT` (needs --tls-dir).
        #[arg(long, value_name = "tls://HOST:PORT", conflicts_with_all = ["kernel", "restore"], requires = "tls_dir")]
        incoming: Option<String>,
        /// With --incoming: directory with ca.pem, node.pem, node.key (`spanvmm migrate-certs`).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// With --incoming: how long to wait for a source that lost its post-copy connection.
        #[arg(long, default_value_t = 30_000)]
        recovery_timeout_ms: u64,
        /// The CPU the guest is given: `host` (everything this host offers) or `x86-64-v2`
        /// (a portable baseline, so the VM can move to older hosts). Boot only: a restored,
        /// migrated or live-updated VM keeps the CPU it was booted with.
        #[arg(long, value_name = "NAME", value_parser = parse_cpu_template,
              conflicts_with_all = ["restore", "standby", "incoming", "takeover_fd"])]
        cpu_template: Option<CpuTemplate>,
        /// A virtio-blk disk: `path=FILE[,readonly=on][,direct=on]` (a raw image; repeat for
        /// several). Announced to the guest on its command line as microvm does
        /// (`virtio_mmio.device=512@ADDR:IRQ`). A restored or live-updated VM reopens its
        /// disks by path. With `--incoming`: this host's own files for the arriving VM's
        /// disks, in order; the migration copies the source's disks into them (only the
        /// blocks that differ: a base copy makes it incremental). Without, the arriving VM
        /// reopens the source's paths (shared storage).
        #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk,
              conflicts_with_all = ["restore", "standby", "takeover_fd"])]
        disks: Vec<BlockConfig>,
        /// A virtio-net interface on an existing tap: `tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`
        /// (repeat for several; slots after the disks). With `--restore` or `--incoming`, the
        /// taps of this host the saved or arriving net devices go on, in order (the MAC comes
        /// with the VM); without, they reopen the tap of the same name.
        #[arg(long = "net", value_name = "SPEC", value_parser = parse_net,
              conflicts_with_all = ["standby", "takeover_fd"])]
        nets: Vec<NetConfig>,
    },
    /// Make the TLS material for migration: a CA and a node certificate signed by it.
    MigrateCerts {
        /// Output directory (copy it, without ca.key, to every node).
        #[arg(long)]
        out: PathBuf,
    },
    /// Stamp a disk image with a new base generation (prints it): copies made of it with their
    /// timestamps (`cp --preserve=timestamps`, stamp `IMAGE.spanvmm-base` included) are the
    /// same base, and a migration between two hosts holding it sends only the blocks the
    /// guest wrote since, without reading either image whole.
    DiskStamp {
        /// The image (not in use by a VMM).
        image: PathBuf,
    },
    /// Offline snapshot tools: inspect, merge a chain, shred.
    Snapshot {
        #[command(subcommand)]
        op: snapshot::OfflineOp,
    },
    /// Tools for service authors: a new service project, or what a service file holds.
    Plugin {
        #[command(subcommand)]
        op: plugin_tool::PluginCmd,
    },
    /// Print the syscalls each thread role may make (Markdown, for docs/operations.md).
    #[command(hide = true)]
    SeccompList,
    /// Control a running VM through its API socket.
    Ctl {
        /// The VM's API socket (every command but migrate-group, whose members name theirs).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Seconds to wait for the VMM's answer (default 60; 600 for save, live-update,
        /// plugin attach and replace). A VMM that does not answer in time is an error.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[command(subcommand)]
        op: CtlOp,
    },
}

fn parse_limits(s: &str) -> Result<vmm::jail::Limits, String> {
    s.parse()
}

fn parse_seccomp(s: &str) -> Result<base_vmm::seccomp::Mode, String> {
    s.parse()
}

/// `--dirty-log`: a mode, or `None` for `auto`.
#[derive(Clone)]
struct DirtyLog(Option<DirtyLogMode>);

fn parse_dirty_log(s: &str) -> Result<DirtyLog, String> {
    match s {
        "auto" => Ok(DirtyLog(None)),
        "bitmap" => Ok(DirtyLog(Some(DirtyLogMode::Bitmap))),
        "ring" => Ok(DirtyLog(Some(DirtyLogMode::Ring))),
        _ => Err(format!("{s}: use auto, bitmap or ring")),
    }
}

fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    BlockConfig::parse(s)
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    NetConfig::parse(s)
}

fn parse_cpu_template(s: &str) -> Result<CpuTemplate, String> {
    s.parse()
        .map_err(|e: base_vmm::cpu::CpuModelError| e.to_string())
}

fn main() -> ExitCode {
    base_vmm::startup::mark("main");
    let cli = Cli::parse();
    base_vmm::startup::mark("arguments parsed");
    match cli.cmd {
        Command::Run {
            kernel,
            cmdline,
            initrd,
            memory,
            vcpus,
            serial,
            api_socket,
            restore,
            paused,
            lazy,
            key,
            standby,
            entry,
            plugins,
            plugin_dirs,
            no_native_plugins,
            plugin_sha256,
            takeover_fd,
            mut log,
            seccomp,
            dirty_log,
            jail,
            uid,
            gid,
            cgroup,
            metrics_addr,
            incoming,
            tls_dir,
            recovery_timeout_ms,
            cpu_template,
            disks,
            nets,
        } => {
            let id = log
                .id
                .get_or_insert_with(|| {
                    api_socket
                        .as_deref()
                        .and_then(Path::file_stem)
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| format!("vm-{}", std::process::id()))
                })
                .clone();
            if let Err(e) = logging::init(&log) {
                eprintln!("spanvmm: {e:#}");
                return ExitCode::FAILURE;
            }
            base_vmm::startup::mark("logging set up");
            // The main loop's events name the VM (made once the subscriber exists).
            let _vm = tracing::info_span!("vm", id = %id).entered();
            if let Some(Err(e)) = memory.map(base_vmm::vmm::check_memory_mib) {
                eprintln!("spanvmm: {e}");
                return ExitCode::FAILURE;
            }
            // Before any thread exists (unshare needs a single thread) and before any path of
            // the command line is opened: they are the jail's.
            if let Some(dir) = jail {
                let j = vmm::jail::Jail {
                    dir,
                    uid: uid.unwrap_or_default(),
                    gid: gid.unwrap_or_default(),
                    limits: cgroup,
                };
                // The taps are opened as the caller, outside: the jail's root has no
                // /dev/net/tun and its user may not attach a tap. The devices take the fds.
                for n in &nets {
                    if let Err(e) = base_vmm::devices::virtio::net::preopen_tap(&n.tap) {
                        eprintln!("spanvmm: --jail: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                if let Err(e) = vmm::jail::enter(&j) {
                    eprintln!("spanvmm: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
            let start_paused = !plugins.is_empty();
            if let Err(e) = services::set_plugin_policy(
                &plugin_dirs,
                no_native_plugins,
                &plugin_sha256,
                takeover_fd.is_some(),
            ) {
                eprintln!("spanvmm: {e:#}");
                return ExitCode::FAILURE;
            }
            // After parsing and logging set-up, before any other thread exists (they inherit
            // the main thread's filter and narrow it).
            if let Err(e) = base_vmm::seccomp::init(seccomp) {
                eprintln!("spanvmm: {e}");
                return ExitCode::FAILURE;
            }
            base_vmm::startup::mark("seccomp filters compiled");
            base_vmm::vm::set_dirty_log(dirty_log.0);
            if incoming.is_some() {
                // An arriving VM's disks go on these files (the migration fills them).
                base_vmm::devices::virtio::block::set_local_disks(disks.clone());
            }
            if kernel.is_none() || restore.is_some() {
                // A restored or arriving VM brings its net devices; these are this host's taps.
                base_vmm::devices::virtio::net::set_local_taps(
                    nets.iter().map(|n| n.tap.clone()).collect(),
                );
            }
            let source = match (takeover_fd, restore, kernel) {
                (Some(fd), _, _) => Source::Takeover(fd),
                _ if standby => Source::Standby {
                    mem_mib: memory.unwrap_or(DEFAULT_MEMORY_MIB),
                    vcpus,
                },
                _ if incoming.is_some() => Source::Incoming {
                    addr: incoming.unwrap_or_default(),
                    tls_dir: tls_dir.unwrap_or_default(),
                    recovery: Duration::from_millis(recovery_timeout_ms),
                    mem_mib: memory,
                },
                (None, Some(dir), _) => Source::Restore {
                    dir,
                    paused,
                    lazy,
                    key,
                },
                (None, None, Some(kernel)) => Source::Boot(VmConfig {
                    kernel,
                    cmdline,
                    initrd,
                    mem_mib: memory.unwrap_or(DEFAULT_MEMORY_MIB),
                    vcpus,
                    serial: serial.clone(),
                    entry: match entry {
                        Entry::Direct => EntryPreference::Direct,
                        Entry::Pvh => EntryPreference::Pvh,
                    },
                    // Services given with --plugin attach before the guest's first instruction.
                    start_paused,
                    cpu_template: cpu_template.unwrap_or_default(),
                    disks,
                    nets,
                }),
                (None, None, None) => unreachable!("clap requires --kernel without --restore"),
            };
            match run(
                source,
                &serial,
                api_socket.as_deref(),
                &plugins,
                metrics_addr,
            ) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("spanvmm: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::SeccompList => {
            print!("{}", base_vmm::seccomp::markdown());
            ExitCode::SUCCESS
        }
        Command::MigrateCerts { out } => match l1_services::migration::tls::generate(&out) {
            Ok(()) => {
                println!(
                    "wrote ca.pem, ca.key, node.pem, node.key to {}",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spanvmm migrate-certs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Plugin { op } => match plugin_tool::run(op) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("spanvmm plugin: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::DiskStamp { image } => {
            use base_vmm::devices::virtio::disk_track;
            let g = disk_track::new_generation();
            match disk_track::write_stamp(&image, g) {
                Ok(()) => {
                    println!("{g:032x}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spanvmm disk-stamp: {}: {e}", image.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Snapshot { op } => match snapshot::offline(op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm snapshot: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            op: op @ CtlOp::MigrateGroup { .. },
            ..
        } => match ctl::group_command(op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm ctl migrate-group: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            api_socket: None, ..
        } => {
            eprintln!("spanvmm ctl: --api-socket is needed");
            ExitCode::FAILURE
        }
        Command::Ctl {
            api_socket: Some(api_socket),
            op: CtlOp::Snapshot { op },
            ..
        } => match snapshot::ctl(&api_socket, op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm ctl snapshot: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            api_socket: Some(api_socket),
            timeout,
            op,
        } => match timeout
            .map(|t| {
                std::time::Duration::try_from_secs_f64(t)
                    .map_err(|e| anyhow::anyhow!("--timeout {t}: {e}"))
            })
            .transpose()
            .and_then(|t| ctl::ctl(&api_socket, op, t))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spanvmm ctl: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
