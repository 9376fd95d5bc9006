//! Opening layers and chains, checked as a whole, and reading pages out of them.

use super::*;

/// A state file's bytes, read into memory populated in one call (a restore waits for them,
/// and a multi-MiB read into fresh heap memory takes a page fault per page, which is slow on
/// these hosts), or owned (decrypted, or small). Not a mapping of the file itself: a file
/// truncated under a mapping would kill the process.
pub(super) enum StateBytes {
    /// `len` bytes used of a `cap`-byte mapping.
    Mapped {
        addr: *mut libc::c_void,
        len: usize,
        cap: usize,
    },
    Owned(Vec<u8>),
}

// SAFETY: the memory is private to this value and only read after `read` filled it.
unsafe impl Send for StateBytes {}
// SAFETY: as above, shared reads only.
unsafe impl Sync for StateBytes {}

impl StateBytes {
    /// Populated anonymous memory for `cap` bytes (none when the mapping fails).
    pub(super) fn map(cap: usize) -> Option<Self> {
        // SAFETY: fresh anonymous memory, owned by the value returned; unmapped on drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        (addr != libc::MAP_FAILED).then_some(StateBytes::Mapped { addr, len: 0, cap })
    }

    /// Reads the file at `path`, into `buf` when it is large enough, with the checksum of its
    /// bytes after the header when it was computed on the way (the common case).
    pub(super) fn read(
        path: &Path,
        buf: Option<StateBytes>,
    ) -> std::io::Result<(Self, Option<u32>)> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        let owned = || std::fs::read(path).map(|b| (StateBytes::Owned(b), None));
        if len <= HEADER_LEN || len as u64 > MAX_PAYLOAD + HEADER_LEN as u64 + 16 {
            // Short or oversized: let the parser say what is wrong with it.
            return owned();
        }
        let fits = |b: &StateBytes| matches!(b, StateBytes::Mapped { cap, .. } if *cap >= len);
        let Some(mut bytes) = buf.filter(fits).or_else(|| StateBytes::map(len)) else {
            return owned();
        };
        let StateBytes::Mapped {
            addr, len: used, ..
        } = &mut bytes
        else {
            return owned();
        };
        *used = len;
        let addr = *addr as usize;
        // Read and checksum piece by piece (each piece is hashed while still in the cache);
        // a large file's two halves on two threads (a 4 GiB guest's is 12 MiB: 2.5-3.7 ms on
        // one thread, 2.0-2.8 on two; below 8 MiB the second thread costs what it saves).
        let half = HEADER_LEN + (len - HEADER_LEN) / 2;
        let part = |from: usize, to: usize| -> std::io::Result<crc32fast::Hasher> {
            const PIECE: usize = 512 << 10;
            let mut hasher = crc32fast::Hasher::new();
            let mut at = from;
            while at < to {
                let n = PIECE.min(to - at);
                // SAFETY: [at, at + n) lies inside the `len` bytes just mapped writable; the
                // two halves do not overlap and nothing else sees the memory yet.
                let piece = unsafe { std::slice::from_raw_parts_mut((addr + at) as *mut u8, n) };
                file.read_exact_at(piece, at as u64)?;
                hasher.update(piece);
                at += n;
            }
            Ok(hasher)
        };
        // SAFETY: as above, the header's bytes.
        let head = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, HEADER_LEN) };
        file.read_exact_at(head, 0)?;
        let crc = if len - HEADER_LEN < 8 << 20 {
            part(HEADER_LEN, len)?
        } else {
            let (first, second) = std::thread::scope(|s| {
                let second = s.spawn(|| part(half, len));
                (part(HEADER_LEN, half), second.join())
            });
            let mut crc = first?;
            crc.combine(&second.map_err(|_| std::io::Error::other("reader panicked"))??);
            crc
        };
        Ok((bytes, Some(crc.finalize())))
    }
}

impl std::ops::Deref for StateBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: the memory lives as long as self and was filled by `read`.
            StateBytes::Mapped { addr, len, .. } => unsafe {
                std::slice::from_raw_parts(*addr as *const u8, *len)
            },
            StateBytes::Owned(v) => v,
        }
    }
}

impl Drop for StateBytes {
    fn drop(&mut self) {
        if let StateBytes::Mapped { addr, cap, .. } = *self {
            // SAFETY: unmapping our own mapping, once.
            unsafe { libc::munmap(addr, cap) };
        }
    }
}

/// One opened, checked layer.
pub struct Layer {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: LayerManifest,
    /// The VM state it records.
    pub vm: VmState,
    /// SHA-256 of its state file (what a child records): computed for layers opened as a
    /// parent ([`Layer::open`]), not for the top of a chain being restored (its CRC or AEAD
    /// tag already vouches for it, and a restore should not wait for a hash it never uses).
    pub state_sha256: Option<String>,
    pub(super) runs: Vec<Run>,
    /// The payload (index with the checks) starts at `payload_at`.
    pub(super) payload: StateBytes,
    pub(super) payload_at: usize,
    pub(super) salt: [u8; 12],
    pub(super) key: Option<SnapshotKey>,
    pub(super) memory: File,
}

impl Layer {
    /// Opens the layer in `dir`: state file checked and parsed, memory file sized right.
    pub fn open(dir: &Path, key: Option<&SnapshotKey>) -> Result<Self, SnapshotError> {
        Self::open_inner(dir, key, true, None)
    }

    /// `buf`: memory prepared ahead for the state file (see [`RestoreBuffers`]).
    pub(super) fn open_inner(
        dir: &Path,
        key: Option<&SnapshotKey>,
        identity: bool,
        buf: Option<StateBytes>,
    ) -> Result<Self, SnapshotError> {
        let state = dir.join(STATE_FILE);
        let (bytes, body_crc) = StateBytes::read(&state, buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => invalid(dir, "no snapshot here (no state file)"),
            _ => io_at(&state)(e),
        })?;
        let parsed = parse_state_with(&bytes, body_crc, &state, key)?;
        let mem = dir.join(MEMORY_FILE);
        let memory = File::open(&mem).map_err(io_at(&mem))?;
        let len = memory.metadata().map_err(io_at(&mem))?.len();
        let want = parsed.vm.machine.mem_bytes;
        if len != want {
            return Err(invalid(
                &mem,
                format!("memory image truncated or padded: {len} bytes, the guest has {want}"),
            ));
        }
        if let Some(at) = parsed.manifest.expires_unix {
            let now = unix_now();
            if now >= at {
                return Err(SnapshotError::Expired {
                    dir: dir.display().to_string(),
                    at,
                    ago: now - at,
                });
            }
        }
        Ok(Layer {
            dir: dir.to_path_buf(),
            manifest: parsed.manifest,
            vm: parsed.vm,
            state_sha256: identity.then(|| hex(&Sha256::digest(&*bytes))),
            runs: parsed.runs,
            payload_at: if parsed.decrypted.is_some() {
                0
            } else {
                HEADER_LEN
            },
            payload: parsed.decrypted.map_or(bytes, StateBytes::Owned),
            salt: parsed.salt,
            key: if parsed.encrypted { key.cloned() } else { None },
            memory,
        })
    }

    /// The `i`th check of `run`.
    pub(super) fn check(&self, run: &Run, i: u64) -> &[u8] {
        let at = self.payload_at + run.checks_at + 16 * i as usize;
        &self.payload[at..at + 16]
    }

    /// Reads pages `[first, end)` of `run`, one of this layer's data runs, into `out`, checked
    /// (and decrypted). A plain layer checks the run's pages of an aligned group together, so
    /// the groups at either end are read whole even when only part of them is asked for.
    pub(super) fn read_run(
        &self,
        run: &Run,
        first: u64,
        end: u64,
        out: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let ps = PAGE_SIZE as usize;
        let file = || self.dir.join(MEMORY_FILE).display().to_string();
        let read = |buf: &mut [u8], page: u64| {
            self.memory
                .read_exact_at(buf, page * PAGE_SIZE)
                .map_err(|err| SnapshotError::Io { path: file(), err })
        };
        if let Some(k) = &self.key {
            read(out, first)?;
            let id = unhex16(&self.manifest.id);
            for (i, page) in out.chunks_exact_mut(ps).enumerate() {
                let p = first + i as u64;
                let tag = Tag::from_slice(self.check(run, p - run.start));
                k.cipher
                    .decrypt_in_place_detached(&nonce(&self.salt, run.round, p), &id, page, tag)
                    .map_err(|_| SnapshotError::Key {
                        path: file(),
                        why: format!(
                            "page {p:#x} fails authentication: the memory file was tampered with"
                        ),
                    })?;
            }
            return Ok(());
        }
        // The groups' pages that lie in the run, from `first`'s group to `end - 1`'s.
        let a = (first - first % GROUP_PAGES).max(run.start);
        let b = end
            .div_ceil(GROUP_PAGES)
            .saturating_mul(GROUP_PAGES)
            .min(run.start + run.count);
        let verify = |buf: &[u8]| -> Result<(), SnapshotError> {
            let mut g = a;
            while g < b {
                let g_end = ((g / GROUP_PAGES + 1) * GROUP_PAGES).min(b);
                let mut checks = [0u8; 16 * GROUP_PAGES as usize];
                let pages = buf[(g - a) as usize * ps..(g_end - a) as usize * ps].chunks_exact(ps);
                for (c, page) in checks.chunks_exact_mut(16).zip(pages) {
                    c.copy_from_slice(&page_check(page));
                }
                let want = self.check(run, g / GROUP_PAGES - run.start / GROUP_PAGES);
                if group_check(&checks[..16 * (g_end - g) as usize]) != want {
                    return Err(SnapshotError::Corrupt {
                        path: file(),
                        why: format!(
                            "pages {g:#x}-{:#x} fail their checksum: the memory file is corrupted",
                            g_end - 1
                        ),
                    });
                }
                g = g_end;
            }
            Ok(())
        };
        if (a, b) == (first, end) {
            read(out, a)?;
            return verify(out);
        }
        let mut whole = vec![0u8; ((b - a) * PAGE_SIZE) as usize];
        read(&mut whole, a)?;
        verify(&whole)?;
        let from = ((first - a) * PAGE_SIZE) as usize;
        out.copy_from_slice(&whole[from..from + out.len()]);
        Ok(())
    }
}

pub(super) fn unhex16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// Where each page of the guest comes from: `NONE` (zero) or a layer and one of its runs.
pub(super) const NONE: u8 = u8::MAX;

/// Memory a restore of a guest of a given size needs, allocated and faulted in ahead: the
/// chain's per-page tables and room for the top layer's state file (an encrypted full layer's
/// index holds a 16-byte check per page). A standby VMM prepares them with its VM, so a restore
/// does not wait for fresh memory: on PVM a 1 GiB guest's 6 MiB of it take 3-4 ms to fault in.
pub struct RestoreBuffers {
    pub(super) tables: (Vec<u8>, Vec<u32>),
    pub(super) state: Option<StateBytes>,
}

impl RestoreBuffers {
    /// Buffers for a guest of `mem_bytes`.
    pub fn new(mem_bytes: u64) -> Self {
        let pages = (mem_bytes / PAGE_SIZE) as usize;
        // The state file: header, manifest (VM state; well under 1 MiB), run headers, checks.
        let state = HEADER_LEN + (1 << 20) + pages * 16;
        // Written now, so that their pages exist: zeroed allocations are mapped lazily, and
        // faulting in 2 MiB of them during a 1 GiB restore took ~1 ms.
        let touched = || {
            let mut v = vec![0u32; pages];
            v.fill(std::hint::black_box(0));
            v
        };
        RestoreBuffers {
            tables: (vec![NONE; pages], touched()),
            state: StateBytes::map(state),
        }
    }
}

/// A whole chain, opened and checked: the layers from the base (index 0) to the one asked for.
pub struct Chain {
    /// Layers, base first.
    pub layers: Vec<Layer>,
    /// Where each page comes from; `None` for a single layer (its runs say it: see
    /// [`Chain::source`]).
    pub(super) tables: Option<Tables>,
    /// Prepared tables a single layer did not need. Kept, not dropped: unmapping MiBs of
    /// populated memory takes the address space's lock for a millisecond or more, which the
    /// restore path (and the guest's first faults) would wait for; they go with the chain.
    pub(super) _spare: Option<(Vec<u8>, Vec<u32>)>,
}

/// Per page: the layer holding it (`NONE`: zero) and the run of that layer's index it is in.
pub(super) struct Tables {
    pub(super) owner: Vec<u8>,
    pub(super) run: Vec<u32>,
}

/// Pages `[first, end)` of a chain that come from one place: zero (`layer` `NONE`) or one run
/// of a layer.
pub(super) struct Source {
    pub(super) layer: u8,
    pub(super) run: usize,
    pub(super) end: usize,
}

/// A key given for a chain none of whose layers is encrypted is a mistake worth saying (the
/// operator believes the snapshot is protected, or has the wrong snapshot).
pub(super) fn refuse_unneeded_key(
    key: Option<&SnapshotKey>,
    layers: &[Layer],
) -> Result<(), SnapshotError> {
    if key.is_some() && layers.iter().all(|l| l.key.is_none()) {
        return Err(SnapshotError::Usage(format!(
            "{} is not encrypted: a key is only for encrypted snapshots (leave --key out)",
            layers
                .last()
                .map(|l| l.dir.display().to_string())
                .unwrap_or_default()
        )));
    }
    Ok(())
}

impl Chain {
    /// Opens the layer in `dir` and its ancestors, checking every link (parent id and state
    /// file checksum), version, key and expiry, before anything is restored.
    pub fn open(dir: &Path, key: Option<&SnapshotKey>) -> Result<Self, SnapshotError> {
        Self::open_with(dir, key, None)
    }

    /// [`Chain::open`] into memory prepared ahead (a standby VMM's), when it fits.
    pub fn open_with(
        dir: &Path,
        key: Option<&SnapshotKey>,
        bufs: Option<RestoreBuffers>,
    ) -> Result<Self, SnapshotError> {
        Self::open_chain(dir, key, bufs, true)
    }

    /// `runs_for_one`: a single layer (a full snapshot without secret regions) goes without
    /// per-page tables, its runs say where each page is (filling the tables took 0.3 ms a GiB
    /// on a restore's path).
    pub(super) fn open_chain(
        dir: &Path,
        key: Option<&SnapshotKey>,
        bufs: Option<RestoreBuffers>,
        runs_for_one: bool,
    ) -> Result<Self, SnapshotError> {
        let (tables, state_buf) = match bufs {
            Some(b) => (Some(b.tables), b.state),
            None => (None, None),
        };
        let top = Layer::open_inner(dir, key, false, state_buf)?;
        if runs_for_one && top.manifest.parent.is_none() && top.manifest.secrets.is_empty() {
            refuse_unneeded_key(key, std::slice::from_ref(&top))?;
            return Ok(Chain {
                layers: vec![top],
                tables: None,
                _spare: tables,
            });
        }
        let mut layers = vec![top];
        while let Some(parent) = layers.last().and_then(|l| l.manifest.parent.clone()) {
            if layers.len() >= MAX_CHAIN {
                return Err(SnapshotError::Chain(format!(
                    "more than {MAX_CHAIN} layers above {}: merge the chain",
                    parent.dir.display()
                )));
            }
            let child = layers
                .last()
                .map(|l| l.dir.display().to_string())
                .unwrap_or_default();
            let p = Layer::open(&parent.dir, key).map_err(|e| {
                SnapshotError::Chain(format!("parent {} of {child}: {e}", parent.dir.display()))
            })?;
            if p.manifest.id != parent.id || p.state_sha256.as_ref() != Some(&parent.state_sha256) {
                return Err(SnapshotError::Chain(format!(
                    "{} is not the parent {child} was taken on (layer id or state checksum differ: \
                     it was replaced or modified)",
                    parent.dir.display()
                )));
            }
            if p.vm.machine.mem_bytes != layers[0].vm.machine.mem_bytes {
                return Err(SnapshotError::Chain(format!(
                    "{} is of another guest size than {child}",
                    parent.dir.display()
                )));
            }
            layers.push(p);
        }
        layers.reverse();
        refuse_unneeded_key(key, &layers)?;
        let pages = (layers[0].vm.machine.mem_bytes / PAGE_SIZE) as usize;
        let (mut owner, mut run) = match tables {
            Some(t) if t.0.len() == pages => t,
            _ => (vec![NONE; pages], vec![0u32; pages]),
        };
        for (li, l) in layers.iter().enumerate() {
            for (ri, r) in l.runs.iter().enumerate() {
                let span = r.start as usize..(r.start + r.count) as usize;
                if r.data {
                    owner[span.clone()].fill(li as u8);
                    run[span].fill(ri as u32);
                } else {
                    owner[span].fill(NONE);
                }
            }
        }
        // Secret regions of any layer are zero, whatever an older layer holds.
        for l in &layers {
            for &(gpa, len) in &l.manifest.secrets {
                let first = (gpa / PAGE_SIZE) as usize;
                let end = (gpa.saturating_add(len).div_ceil(PAGE_SIZE) as usize).min(pages);
                for o in owner.iter_mut().take(end).skip(first) {
                    *o = NONE;
                }
            }
        }
        Ok(Chain {
            layers,
            tables: Some(Tables { owner, run }),
            _spare: None,
        })
    }

    /// Guest pages.
    pub(super) fn pages(&self) -> usize {
        (self.mem_bytes() / PAGE_SIZE) as usize
    }

    /// Where pages from `p` (up to `end`) come from, as far as one place holds them.
    pub(super) fn source(&self, p: usize, end: usize) -> Source {
        let zero = |end| Source {
            layer: NONE,
            run: 0,
            end,
        };
        let Some(t) = &self.tables else {
            // One layer: its runs, in order.
            let runs = &self.layers[0].runs;
            let i = runs.partition_point(|r| (r.start + r.count) as usize <= p);
            return match runs.get(i) {
                Some(r) if r.start as usize <= p => {
                    let run_end = ((r.start + r.count) as usize).min(end);
                    if !r.data {
                        return zero(run_end);
                    }
                    Source {
                        layer: 0,
                        run: i,
                        end: run_end,
                    }
                }
                // Between runs (or after the last): zero.
                Some(r) => zero((r.start as usize).min(end)),
                None => zero(end),
            };
        };
        let layer = t.owner[p];
        let mut q = p + 1;
        if layer == NONE {
            while q < end && t.owner[q] == NONE {
                q += 1;
            }
            return zero(q);
        }
        let run = t.run[p];
        while q < end && t.owner[q] == layer && t.run[q] == run {
            q += 1;
        }
        Source {
            layer,
            run: run as usize,
            end: q,
        }
    }

    /// The top layer (the one asked for).
    pub fn top(&self) -> &Layer {
        self.layers.last().expect("a chain has a layer")
    }

    /// The VM state to restore.
    pub fn vm_state(&self) -> &VmState {
        &self.top().vm
    }

    /// Guest memory size.
    pub fn mem_bytes(&self) -> u64 {
        self.vm_state().machine.mem_bytes
    }

    /// Pages holding data, as runs `(first, end)`.
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut p, pages) = (0, self.pages());
        while p < pages {
            let src = self.source(p, pages);
            if src.layer != NONE {
                match out.last_mut() {
                    Some(last) if last.1 == p as u64 => last.1 = src.end as u64,
                    _ => out.push((p as u64, src.end as u64)),
                }
            }
            p = src.end;
        }
        out
    }

    /// Pages holding data.
    pub fn data_pages(&self) -> u64 {
        self.data_extents().iter().map(|(a, b)| b - a).sum()
    }

    /// Reads pages `[first, first + count)` into `buf`, checked (and decrypted). Pages without
    /// data are zero-filled when `zero_fill`, else left as they are.
    pub fn read_pages(
        &self,
        first: u64,
        count: u64,
        buf: &mut [u8],
        zero_fill: bool,
    ) -> Result<(), SnapshotError> {
        let ps = PAGE_SIZE as usize;
        let end = (first + count) as usize;
        let mut p = first as usize;
        while p < end {
            let src = self.source(p, end);
            let out = &mut buf[(p - first as usize) * ps..(src.end - first as usize) * ps];
            if src.layer == NONE {
                if zero_fill {
                    out.fill(0);
                }
                p = src.end;
                continue;
            }
            let l = &self.layers[src.layer as usize];
            l.read_run(&l.runs[src.run], p as u64, src.end as u64, out)?;
            p = src.end;
        }
        Ok(())
    }

    /// Loads the whole chain into fresh (zero) guest memory, checking every page. The work is
    /// spread over the host's cores in 16 MiB pieces, and each piece's guest pages are
    /// populated in one call first (per-page faults during the copy cost more than the copy).
    pub fn load_into(&self, ram: &GuestRam) -> Result<(), SnapshotError> {
        if ram.size() != self.mem_bytes() {
            return Err(SnapshotError::Usage(format!(
                "guest has {} bytes, the snapshot {}",
                ram.size(),
                self.mem_bytes()
            )));
        }
        const PIECE: u64 = 4096;
        let pieces: Vec<(u64, u64)> = self
            .data_extents()
            .into_iter()
            .flat_map(|(a, b)| {
                (a..b)
                    .step_by(PIECE as usize)
                    .map(move |p| (p, (p + PIECE).min(b)))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let base = ram.host_base() as usize;
        let load = || -> Result<(), SnapshotError> {
            while let Some(&(p, q)) =
                pieces.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                let (addr, len) = (
                    base + (p * PAGE_SIZE) as usize,
                    ((q - p) * PAGE_SIZE) as usize,
                );
                // SAFETY: [p, q) lies inside guest memory (the sizes match, checked above);
                // pieces do not overlap and nothing else touches this RAM while it is loaded.
                let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
                let _ = ram.populate(p * PAGE_SIZE, (q - p) * PAGE_SIZE);
                if let Err(e) = self.read_pages(p, q - p, dst, false) {
                    // A bad page ends the load: the other threads find no more pieces.
                    next.store(pieces.len(), std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(())
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(load)).collect();
            let mut r = load();
            for h in helpers {
                let h = h
                    .join()
                    .unwrap_or(Err(SnapshotError::Panicked("a loader thread")));
                r = r.and(h);
            }
            r
        })?;
        // Loading is not the guest's doing: start the VMM's dirty log clean.
        ram.take_vmm_dirty();
        Ok(())
    }
}
