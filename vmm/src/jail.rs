//! `spanvmm run --jail DIR --uid U --gid G [--cgroup mem=BYTES,cpu=QUOTA/PERIOD]`: confine the
//! VMM process itself before the guest boots (in the spirit of Firecracker's jailer, but in the
//! VMM's own start-up, so there is one process and no second binary to trust):
//!
//! 1. the cgroup (v2 when /sys/fs/cgroup has the memory and cpu controllers, else the v1
//!    `memory` and `cpu` hierarchies): a group `spanvmm-PID` beneath the caller's own, with
//!    the limits, and this process moved into it;
//! 2. a new mount namespace, nothing shared back with the host's;
//! 3. DIR becomes the root (`pivot_root`; the old root is detached) with `/dev/kvm` and
//!    `/dev/userfaultfd` made there (`mknod`, owned by U: the host's nodes are root's);
//! 4. supplementary groups dropped, gid G, uid U (no capability is left).
//!
//! Every path on the command line is then read inside the jail (`--kernel /spanguest.elf` is
//! DIR/spanguest.elf, `--disk path=/disk.img` DIR/disk.img); the API socket made there is
//! reachable from the host under DIR. `--net` taps are opened by the caller before `enter`
//! (`base_vmm::devices::virtio::net::preopen_tap`): the jail has no /dev/net/tun. Any step
//! that fails ends start-up with the step named.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The cgroup limits of `--cgroup mem=BYTES,cpu=QUOTA/PERIOD` (each part optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.max (v2) / memory.limit_in_bytes (v1).
    pub mem_bytes: Option<u64>,
    /// CPU time per period, both in microseconds: cpu.max (v2) / cfs_quota_us, cfs_period_us.
    pub cpu: Option<(u64, u64)>,
}

impl std::str::FromStr for Limits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut l = Limits::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("mem", v)) => {
                    let b: u64 = v
                        .parse()
                        .map_err(|_| format!("--cgroup mem={v}: a number of bytes"))?;
                    if b < 16 << 20 {
                        return Err(format!("--cgroup mem={b}: at least 16 MiB (16777216)"));
                    }
                    l.mem_bytes = Some(b);
                }
                Some(("cpu", v)) => {
                    let (q, p) = v
                        .split_once('/')
                        .and_then(|(q, p)| Some((q.parse().ok()?, p.parse().ok()?)))
                        .ok_or(format!(
                            "--cgroup cpu={v}: QUOTA/PERIOD in microseconds, e.g. 50000/100000"
                        ))?;
                    if !(1000..=1_000_000).contains(&p) || q < 1000 {
                        return Err(format!(
                            "--cgroup cpu={v}: the period must be 1000..1000000 µs and the quota \
                             at least 1000 µs"
                        ));
                    }
                    l.cpu = Some((q, p));
                }
                _ => {
                    return Err(format!(
                        "--cgroup: unknown part {part:?} (mem=BYTES, cpu=QUOTA/PERIOD)"
                    ))
                }
            }
        }
        Ok(l)
    }
}

/// What `--jail` was given.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The new root.
    pub dir: PathBuf,
    /// The uid and gid to run as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// The cgroup limits (none: no cgroup is made).
    pub limits: Option<Limits>,
}

fn cstr(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte")
}

fn check(r: libc::c_int, what: &str) -> anyhow::Result<()> {
    if r != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enters the jail; on return this process is confined. Call before any thread exists.
pub fn enter(j: &Jail) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("--jail needs root to set up the jail (it then drops to --uid/--gid)");
    }
    if j.uid == 0 || j.gid == 0 {
        bail!("--jail: --uid and --gid must not be 0 (the jail drops root)");
    }
    let dir = j
        .dir
        .canonicalize()
        .with_context(|| format!("--jail {}", j.dir.display()))?;
    if !dir.is_dir() || dir == Path::new("/") {
        bail!("--jail {}: not a directory other than /", dir.display());
    }
    // Asked while /sys is still visible (see base_vmm::host_is_pvm).
    let _ = base_vmm::host_is_pvm();
    if let Some(l) = &j.limits {
        let group = cgroup(l).context("--cgroup")?;
        tracing::info!("jail: in cgroup {group}");
    }
    devices(&dir, j.uid, j.gid).context("--jail: making the devices")?;
    pivot(&dir).context("--jail: entering the new root")?;
    drop_ids(j.uid, j.gid).context("--jail: dropping privileges")?;
    // The one device the VMM cannot run without, opened as the new user.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("--jail: /dev/kvm cannot be opened in the jail (is DIR on a nodev mount?)")?;
    tracing::info!("jail: root {}, uid {}, gid {}", dir.display(), j.uid, j.gid);
    Ok(())
}

/// Makes DIR/dev/kvm (and /dev/userfaultfd when the host has it) as char devices owned by the
/// jail's user.
fn devices(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dev = dir.join("dev");
    std::fs::create_dir_all(&dev).with_context(|| format!("mkdir {}", dev.display()))?;
    for (name, required) in [("kvm", true), ("userfaultfd", false)] {
        let host = Path::new("/dev").join(name);
        let meta = match std::fs::metadata(&host) {
            Ok(m) if m.file_type().is_char_device() => m,
            _ if !required => continue,
            _ => bail!("{} is not a character device on this host", host.display()),
        };
        let node = dev.join(name);
        let _ = std::fs::remove_file(&node);
        let c = cstr(&node)?;
        check(
            // SAFETY: mknod of a path we own with the host node's device number.
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) },
            &format!("mknod {}", node.display()),
        )?;
        check(
            // SAFETY: chown of the node just made.
            unsafe { libc::chown(c.as_ptr(), uid, gid) },
            &format!("chown {}", node.display()),
        )?;
    }
    Ok(())
}

fn pivot(dir: &Path) -> anyhow::Result<()> {
    check(
        // SAFETY: unshare of the calling process's mount namespace (single-threaded here).
        unsafe { libc::unshare(libc::CLONE_NEWNS) },
        "unshare(CLONE_NEWNS)",
    )?;
    let root = cstr(Path::new("/"))?;
    // Nothing we mount or unmount from here on propagates back to the host.
    check(
        // SAFETY: mount with valid C strings and null data.
        unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "making / private",
    )?;
    // pivot_root wants the new root to be a mount point.
    let d = cstr(dir)?;
    check(
        // SAFETY: a bind mount of a directory onto itself.
        unsafe {
            libc::mount(
                d.as_ptr(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        },
        &format!("bind-mounting {}", dir.display()),
    )?;
    std::env::set_current_dir(dir).with_context(|| format!("chdir {}", dir.display()))?;
    let old = format!(".old-root-{}", std::process::id());
    std::fs::create_dir(&old).with_context(|| format!("mkdir {old} in the jail"))?;
    let (dot, oldc) = (cstr(Path::new("."))?, cstr(Path::new(&old))?);
    check(
        // SAFETY: pivot_root with two valid paths (the raw syscall: libc has no wrapper).
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), oldc.as_ptr()) as libc::c_int },
        "pivot_root",
    )?;
    std::env::set_current_dir("/").context("chdir / in the jail")?;
    let oldabs = cstr(&Path::new("/").join(&old))?;
    check(
        // SAFETY: detaching the old root (lazy: nothing of ours is open there).
        unsafe { libc::umount2(oldabs.as_ptr(), libc::MNT_DETACH) },
        "detaching the old root",
    )?;
    std::fs::remove_dir(Path::new("/").join(&old))
        .context("removing the old root's mount point")?;
    Ok(())
}

fn drop_ids(uid: u32, gid: u32) -> anyhow::Result<()> {
    // SAFETY: plain syscalls; the order (groups, gid, then uid) keeps the right to change each.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(gid, gid, gid), "setresgid")?;
        check(libc::setresuid(uid, uid, uid), "setresuid")?;
    }
    // SAFETY: a plain syscall; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        bail!("root could be regained after dropping it");
    }
    Ok(())
}

/// The cgroup v2 mount, when memory and cpu are controllers there.
fn cgroup_v2() -> Option<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    let c = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
    let has = |n: &str| c.split_whitespace().any(|w| w == n);
    (has("memory") && has("cpu")).then_some(root)
}

/// This process's group in a hierarchy (`0::/x` for v2, `N:memory:/x` for v1).
fn own_group(controller: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    s.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            let hit = if controller.is_empty() {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == controller)
            };
            hit.then(|| path.to_string())
        })
        .with_context(|| format!("this process is in no {controller:?} cgroup"))
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Creates the group beneath the caller's own (so the caller's limits still hold), sets the
/// limits and moves this process in; returns where it is.
fn cgroup(l: &Limits) -> anyhow::Result<String> {
    let name = format!("spanvmm-{}", std::process::id());
    let pid = std::process::id().to_string();
    if let Some(root) = cgroup_v2() {
        let parent = root.join(own_group("")?.trim_start_matches('/'));
        // The limits need the controllers handed down to the parent's children.
        write(&parent.join("cgroup.subtree_control"), "+memory +cpu")?;
        let g = parent.join(&name);
        std::fs::create_dir(&g).with_context(|| format!("mkdir {}", g.display()))?;
        if let Some(m) = l.mem_bytes {
            write(&g.join("memory.max"), &m.to_string())?;
        }
        if let Some((q, p)) = l.cpu {
            write(&g.join("cpu.max"), &format!("{q} {p}"))?;
        }
        write(&g.join("cgroup.procs"), &pid)?;
        return Ok(g.display().to_string());
    }
    // v1: the memory and cpu hierarchies, each its own group of the same name.
    let mut at = Vec::new();
    if let Some(m) = l.mem_bytes {
        let h = Path::new("/sys/fs/cgroup/memory");
        let g = h
            .join(own_group("memory")?.trim_start_matches('/'))
            .join(&name);
        std::fs::create_dir(&g).with_context(|| {
            format!(
                "mkdir {} (no cgroup v2 with memory and cpu controllers; v1 memory hierarchy)",
                g.display()
            )
        })?;
        write(&g.join("memory.limit_in_bytes"), &m.to_string())?;
        write(&g.join("cgroup.procs"), &pid)?;
        at.push(g.display().to_string());
    }
    if let Some((q, p)) = l.cpu {
        let h = Path::new("/sys/fs/cgroup/cpu");
        let g = h
            .join(own_group("cpu")?.trim_start_matches('/'))
            .join(&name);
        std::fs::create_dir(&g)
            .with_context(|| format!("mkdir {} (v1 cpu hierarchy)", g.display()))?;
        write(&g.join("cpu.cfs_period_us"), &p.to_string())?;
        write(&g.join("cpu.cfs_quota_us"), &q.to_string())?;
        write(&g.join("cgroup.procs"), &pid)?;
        at.push(g.display().to_string());
    }
    Ok(at.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_refuse_nonsense() {
        let l: Limits = "mem=536870912,cpu=50000/100000".parse().unwrap();
        assert_eq!(l.mem_bytes, Some(512 << 20));
        assert_eq!(l.cpu, Some((50000, 100000)));
        for bad in ["mem=1", "cpu=5", "cpu=1/1", "disk=3", "mem=x"] {
            assert!(bad.parse::<Limits>().is_err(), "{bad}");
        }
    }
}
