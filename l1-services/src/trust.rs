//! Checks on files the VMM loads code from (native services, Wasm components, a live update's
//! new binary) that run *before* a byte of them is used.
//!
//! A file is opened once, without following a final symlink and without blocking (a FIFO or a
//! device named like a plugin must not hang the VMM), and every check runs on the opened
//! descriptor (`fstat`), so what is checked is what is then read. For code that runs with the
//! VMM's privileges ([`check_trusted_file`]) the file must also be a regular file owned by root
//! or by the VMM's effective user, writable by nobody else, in a directory nobody else can write
//! to (not even a sticky one such as `/tmp`), below directories nobody else can rename things
//! in (sticky ones such as `/tmp` are fine there): nobody but root and the VMM's user can then
//! swap the file between the check and its use.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What is wrong with a file, for callers and tests that need to tell cases apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustProblem {
    /// The path does not exist.
    Missing,
    /// Not a regular file (a FIFO, a device, a directory, a socket).
    NotRegular,
    /// Larger than the limit.
    TooLarge,
    /// Owned by someone other than root or the VMM's effective user.
    Owner,
    /// Writable by its group or by others.
    Writable,
    /// A directory on its path is owned by someone else or writable by others.
    Directory,
    /// Outside the directories the operator allowed (`--plugin-dir`).
    OutsideAllowedDirs,
    /// Native services are disabled (`--no-native-plugins`).
    NativeDisabled,
    /// Its SHA-256 is not on the operator's allow-list (`--plugin-sha256`).
    NotAllowListed,
    /// It could not be opened or read.
    Io,
}

/// A file refused by a check: names the file, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {msg}", path.display())]
pub struct TrustError {
    /// What the file was to be (e.g. "native plugin", "live-update binary").
    pub what: String,
    /// The file as given.
    pub path: PathBuf,
    /// What is wrong, for matching.
    pub problem: TrustProblem,
    /// What is wrong and what to do, in words.
    pub msg: String,
}

/// A file that passed the checks, open read-only. The checks ran on this descriptor: use it
/// (read it, or `/proc/self/fd/N`) or the canonical [`TrustedFile::path`].
#[derive(Debug)]
pub struct TrustedFile {
    file: File,
    path: PathBuf,
    meta: Metadata,
}

impl TrustedFile {
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The canonical path (symlinks resolved) that was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes when checked.
    pub fn len(&self) -> u64 {
        self.meta.len()
    }

    /// Whether the file was empty when checked.
    pub fn is_empty(&self) -> bool {
        self.meta.len() == 0
    }

    /// (device, inode) of the opened file.
    pub fn id(&self) -> (u64, u64) {
        (self.meta.dev(), self.meta.ino())
    }

    /// Reads the whole file through the checked descriptor, at most `max` bytes: a file that
    /// grew past `max` since it was checked is refused rather than read on.
    pub fn read_all(&self, what: &str, max: u64) -> Result<Vec<u8>, TrustError> {
        let mut bytes = Vec::with_capacity(self.len().min(max) as usize);
        (&self.file)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                err(
                    what,
                    &self.path,
                    TrustProblem::Io,
                    format!("cannot read it: {e}"),
                )
            })?;
        if bytes.len() as u64 > max {
            return Err(too_large(what, &self.path, max, bytes.len() as u64));
        }
        Ok(bytes)
    }
}

/// What [`open_checked`] requires of a file.
#[derive(Debug, Clone, Default)]
pub struct FileRules<'a> {
    /// What the file is to be, for messages ("native plugin").
    pub what: &'a str,
    /// The file will run with the VMM's privileges: owner, mode and directory checks.
    pub trusted: bool,
    /// Refuse files larger than this many bytes (before reading any of them).
    pub max_len: Option<u64>,
    /// When not empty: the file must lie under one of these directories (canonical paths;
    /// symlinks and `..` are resolved before the comparison, so neither leads out).
    pub under: &'a [PathBuf],
}

fn err(what: &str, path: &Path, problem: TrustProblem, msg: String) -> TrustError {
    TrustError {
        what: what.to_string(),
        path: path.to_path_buf(),
        problem,
        msg,
    }
}

fn too_large(what: &str, path: &Path, max: u64, len: u64) -> TrustError {
    err(
        what,
        path,
        TrustProblem::TooLarge,
        format!(
            "it is {len} bytes, more than the {} MiB a service file may have; \
             give the right file (a built service is far smaller)",
            max >> 20
        ),
    )
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn not_regular(what: &str, path: &Path, meta: &Metadata) -> TrustError {
    err(
        what,
        path,
        TrustProblem::NotRegular,
        format!(
            "it is {}, not a regular file; give the path of the file itself",
            kind_of(meta)
        ),
    )
}

/// Owner and mode of a file or directory that code is loaded through.
fn check_owner_mode(
    what: &str,
    given: &Path,
    subject: &Path,
    meta: &Metadata,
    is_dir_of_file: bool,
    sticky_ok: bool,
) -> Result<(), TrustError> {
    let me = euid();
    let (uid, mode) = (meta.uid(), meta.mode());
    let dir = meta.is_dir();
    let noun = if !dir {
        "the file".to_string()
    } else if is_dir_of_file {
        format!("its directory {}", subject.display())
    } else {
        format!("the directory {} above it", subject.display())
    };
    if uid != 0 && uid != me {
        let fix = if dir {
            format!("keep it under directories owned by root or uid {me}")
        } else {
            format!("chown it to root or uid {me} (or copy it to a directory of yours)")
        };
        return Err(err(
            what,
            given,
            if dir {
                TrustProblem::Directory
            } else {
                TrustProblem::Owner
            },
            format!(
                "{noun} is owned by uid {uid}, not by root or the VMM's user (uid {me}), \
                 so that user could change the code; {fix}"
            ),
        ));
    }
    let writable = mode & 0o022;
    let sticky = mode & libc::S_ISVTX != 0;
    if writable != 0 && !(sticky && sticky_ok) {
        let by = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and by others",
            (true, false) => "its group",
            _ => "others",
        };
        let (problem, fix) = if dir && is_dir_of_file {
            (
                TrustProblem::Directory,
                format!(
                    "anyone who can write there can swap the file{}; move the file to a \
                     directory only root or uid {me} can write to, or chmod go-w {}",
                    if sticky {
                        " (a sticky directory such as /tmp does not prevent planting it)"
                    } else {
                        ""
                    },
                    subject.display()
                ),
            )
        } else if dir {
            (
                TrustProblem::Directory,
                format!(
                    "anyone who can write there can swap the directories below; \
                     chmod go-w {} (or +t) or move the file elsewhere",
                    subject.display()
                ),
            )
        } else {
            (
                TrustProblem::Writable,
                format!(
                    "anyone who can write it can change the code; chmod go-w {}",
                    subject.display()
                ),
            )
        };
        return Err(err(
            what,
            given,
            problem,
            format!(
                "{noun} is writable by {by} (mode {:04o}); {fix}",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// The directories from the file's up to `/`: the immediate one may not be writable by anyone
/// but root and us, the ones above may be if they are sticky (`/tmp`).
fn check_dirs(what: &str, given: &Path, canonical: &Path) -> Result<(), TrustError> {
    for (i, dir) in canonical.ancestors().skip(1).enumerate() {
        let meta = std::fs::symlink_metadata(dir).map_err(|e| {
            err(
                what,
                given,
                TrustProblem::Io,
                format!("cannot inspect {}: {e}", dir.display()),
            )
        })?;
        check_owner_mode(what, given, dir, &meta, i == 0, i > 0)?;
    }
    Ok(())
}

/// Opens `path` for reading under `rules`. Every check runs before any byte of the file is
/// read and before anything is loaded from it; the type, size, owner and mode checks run on
/// the opened descriptor.
pub fn open_checked(path: &Path, rules: &FileRules<'_>) -> Result<TrustedFile, TrustError> {
    let what = rules.what;
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err(
                what,
                path,
                TrustProblem::Missing,
                "no such file; check the path (it is resolved by the VMM, not by the client \
                 when given over the API)"
                    .into(),
            )
        } else {
            err(
                what,
                path,
                TrustProblem::Io,
                format!("cannot resolve the path: {e}"),
            )
        }
    })?;
    if !rules.under.is_empty() && !rules.under.iter().any(|d| canonical.starts_with(d)) {
        let dirs: Vec<String> = rules
            .under
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return Err(err(
            what,
            path,
            TrustProblem::OutsideAllowedDirs,
            format!(
                "it resolves to {}, outside the plugin directories this VMM allows ({}; \
                 --plugin-dir); put the file into one of them (a symlink or `..` leading out \
                 is not followed)",
                canonical.display(),
                dirs.join(", ")
            ),
        ));
    }
    // Refuse what is visibly not a regular file without opening it (opening a device can have
    // effects of its own); the descriptor's fstat below is the check that counts.
    let meta = std::fs::symlink_metadata(&canonical).map_err(|e| {
        err(
            what,
            path,
            TrustProblem::Io,
            format!("cannot inspect {}: {e}", canonical.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(not_regular(what, path, &meta));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&canonical)
        .map_err(|e| {
            err(
                what,
                path,
                TrustProblem::Io,
                format!("cannot open {}: {e}", canonical.display()),
            )
        })?;
    let meta = file.metadata().map_err(|e| {
        err(
            what,
            path,
            TrustProblem::Io,
            format!("cannot inspect the opened file: {e}"),
        )
    })?;
    if !meta.is_file() {
        return Err(not_regular(what, path, &meta));
    }
    if let Some(max) = rules.max_len {
        if meta.len() > max {
            return Err(too_large(what, path, max, meta.len()));
        }
    }
    if rules.trusted {
        check_owner_mode(what, path, &canonical, &meta, false, false)?;
        check_dirs(what, path, &canonical)?;
    }
    Ok(TrustedFile {
        file,
        path: canonical,
        meta,
    })
}

/// Checks that `path` may be run with the VMM's privileges and opens it: a regular file after
/// symlinks are resolved, owned by root or the VMM's effective user, not writable by group or
/// others, in a directory only root or that user can write to (a sticky world-writable one such
/// as `/tmp` is refused too), below directories others cannot rename things in. `what` names
/// the file in messages ("native plugin", "live-update binary"). No size limit.
///
/// The returned descriptor is the one checked. Loading code by path afterwards is safe because
/// of the directory rules: nobody but root and the VMM's user can replace the file meanwhile.
pub fn check_trusted_file(path: &Path, what: &str) -> Result<TrustedFile, TrustError> {
    open_checked(
        path,
        &FileRules {
            what,
            trusted: true,
            max_len: None,
            under: &[],
        },
    )
}

/// Most bytes a service file (Wasm component or native shared object) may have. Built
/// services are well under 10 MiB (exit-stats: ~100 KiB as Wasm); the limit keeps a wrong
/// file (a disk image, a 2 GiB log) from being read whole into the VMM's memory.
pub const MAX_SERVICE_FILE_BYTES: u64 = 64 << 20;

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A string that is not a SHA-256 in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a SHA-256 (64 hex digits)")]
pub struct BadSha256(pub String);

/// Parses a SHA-256 given as 64 hex digits.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], BadSha256> {
    let s = s.trim();
    let bad = || BadSha256(s.to_string());
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub(crate) fn not_allow_listed(what: &str, path: &Path, digest: &[u8]) -> TrustError {
    err(
        what,
        path,
        TrustProblem::NotAllowListed,
        format!(
            "its SHA-256 {} is not among the --plugin-sha256 values this VMM was started with; \
             attach a listed build, or restart the VMM with this hash added",
            hex(digest)
        ),
    )
}

pub(crate) fn native_disabled(path: &Path) -> TrustError {
    err(
        "native plugin",
        path,
        TrustProblem::NativeDisabled,
        "this VMM runs with --no-native-plugins, which refuses every native (.so) service; \
         attach the Wasm build (.wasm) of the service instead"
            .into(),
    )
}
