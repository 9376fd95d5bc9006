//! Writing a layer: pages in rounds (checked or encrypted, O_DIRECT), then the state file.

use super::*;

/// A page-aligned bounce buffer (O_DIRECT needs one).
pub(super) struct AlignedBuf {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping, no file; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "cannot map a {len}-byte buffer");
        AlignedBuf {
            ptr: ptr.cast(),
            len,
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(super) fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by `self`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(super) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|c| {
        c.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

pub(super) fn page_check(page: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(page).to_le_bytes()
}

/// The check of a group of pages from their checks, concatenated.
pub(super) fn group_check(page_checks: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(page_checks).to_le_bytes()
}

/// Aligned groups that pages `[start, start + count)` touch (`count` > 0).
pub(super) fn groups_of(start: u64, count: u64) -> u64 {
    (start + count - 1) / GROUP_PAGES - start / GROUP_PAGES + 1
}

pub(super) fn bit(bits: &[u64], p: u64) -> bool {
    bits.get((p / 64) as usize)
        .is_some_and(|w| w >> (p % 64) & 1 == 1)
}

/// Page bitmap of secret regions, rounded out to whole pages.
pub(super) fn secret_bitmap(secrets: &[(u64, u64)], pages: u64) -> Vec<u64> {
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    for &(gpa, len) in secrets {
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE).min(pages);
        for p in first..end {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    bits
}

/// Page-aligned version of the secret regions, merged and sorted.
pub(super) fn normalize_secrets(secrets: &[(u64, u64)], mem: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = secrets
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(gpa, len)| {
            let a = gpa / PAGE_SIZE * PAGE_SIZE;
            let b = gpa.saturating_add(len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            (a.min(mem), b.min(mem))
        })
        .filter(|(a, b)| a < b)
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

/// One write of a batch: `len` bytes at `at` in the buffer go to `offset` in the file.
pub(super) struct WriteRun {
    pub(super) at: usize,
    pub(super) len: usize,
    pub(super) offset: u64,
}

/// Copies batches of pages out of guest memory and checks (or encrypts) them.
pub(super) struct Filler<'a> {
    pub(super) ram: &'a GuestRam,
    /// Runs of pages holding data in the memfd (the rest are holes: zero); `None`: every
    /// page asked for holds data.
    pub(super) data: Option<&'a [(u64, u64)]>,
    pub(super) entries: &'a mut [PageEntry],
    pub(super) secret_bits: &'a [u64],
    pub(super) key: Option<&'a SnapshotKey>,
    pub(super) salt: &'a [u8; 12],
    pub(super) id: &'a [u8; 16],
    pub(super) round: u32,
}

impl Filler<'_> {
    /// Fills buffers from `free` with the wanted pages and hands them to `full`.
    pub(super) fn all(
        &mut self,
        bitmap: Option<&[u64]>,
        free: &mpsc::Receiver<AlignedBuf>,
        full: &mpsc::SyncSender<(AlignedBuf, Vec<WriteRun>)>,
    ) -> Result<(), SnapshotError> {
        let pages = self.entries.len() as u64;
        let wanted = |p: u64| bitmap.is_none_or(|b| bit(b, p));
        let mut p = 0u64;
        while p < pages {
            if !wanted(p) {
                // Skip whole clear words of the bitmap at once.
                p = match bitmap {
                    Some(b) if p.is_multiple_of(64) && b.get((p / 64) as usize) == Some(&0) => {
                        p + 64
                    }
                    _ => p + 1,
                };
                continue;
            }
            let start = p;
            while p < pages && p - start < BATCH_PAGES && wanted(p) {
                p += 1;
            }
            // A buffer the writer is done with (none: the writer failed; its error wins).
            let Ok(mut buf) = free.recv() else {
                return Ok(());
            };
            let runs = self.batch(start, p, &mut buf)?;
            if full.send((buf, runs)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Copies and checks pages `[start, end)` into `buf`; returns the runs to write.
    pub(super) fn batch(
        &mut self,
        start: u64,
        end: u64,
        buf: &mut AlignedBuf,
    ) -> Result<Vec<WriteRun>, SnapshotError> {
        let ps = PAGE_SIZE as usize;
        let n = (end - start) as usize;
        let buf = &mut buf.slice()[..n * ps];
        // SAFETY: pages [start, end) lie inside guest memory, which `self.ram` keeps mapped;
        // a guest write racing with the copy only changes what this round saves (the page is
        // dirty again and a later round writes it).
        let src = unsafe {
            std::slice::from_raw_parts(
                self.ram.host_base().add((start * PAGE_SIZE) as usize),
                buf.len(),
            )
        };
        // Holes of the memfd (never written) are zero without reading them: a read would
        // allocate them. The rest is mapped here in one call per run: page by page, a first
        // save of a 4 GiB guest spent 3 s in faults (4.9 s against 1.5-1.9 s for the next).
        let data: Option<Vec<(u64, u64)>> = self.data.map(|all| {
            let first = all.partition_point(|&(_, b)| b <= start);
            all[first..]
                .iter()
                .take_while(|&&(a, _)| a < end)
                .map(|&(a, b)| (a.max(start), b.min(end)))
                .collect()
        });
        for &(a, b) in data.iter().flatten() {
            let _ = self.ram.populate_read(a * PAGE_SIZE, (b - a) * PAGE_SIZE);
        }
        let in_data = |gp: u64| {
            data.as_ref()
                .is_none_or(|d| d.iter().any(|&(a, b)| a <= gp && gp < b))
        };
        let mut runs: Vec<WriteRun> = Vec::new();
        for (i, page) in buf.chunks_exact_mut(ps).enumerate() {
            let gp = start + i as u64;
            // Zero pages are found in guest memory and never copied; the copy is checked
            // again (the guest may have written the page meanwhile).
            let from = &src[i * ps..(i + 1) * ps];
            if bit(self.secret_bits, gp) || !in_data(gp) || is_zero(from) {
                self.entries[gp as usize] = PageEntry::Zero;
                continue;
            }
            page.copy_from_slice(from);
            if is_zero(page) {
                self.entries[gp as usize] = PageEntry::Zero;
                continue;
            }
            let check = match self.key {
                None => page_check(page),
                Some(k) => k
                    .cipher
                    .encrypt_in_place_detached(&nonce(self.salt, self.round, gp), self.id, page)
                    .map_err(|_| SnapshotError::Usage("page encryption failed".into()))?
                    .into(),
            };
            self.entries[gp as usize] = PageEntry::Data {
                round: self.round,
                check,
            };
            match runs.last_mut() {
                Some(r) if r.at + r.len == i * ps => r.len += ps,
                _ => runs.push(WriteRun {
                    at: i * ps,
                    len: ps,
                    offset: gp * PAGE_SIZE,
                }),
            }
        }
        Ok(runs)
    }
}

/// Result of writing a layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// The layer's id.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Pages the layer holds data for.
    pub data_pages: u64,
    /// Zero pages it records (incremental layers).
    pub zero_pages: u64,
    /// Bytes written to the memory file in all rounds.
    pub bytes_written: u64,
    /// Write rounds.
    pub rounds: u32,
}

/// Writes one layer: page batches (while the guest runs or not), then the state file.
pub struct LayerWriter {
    pub(super) dir: PathBuf,
    pub(super) ram: Arc<GuestRam>,
    pub(super) file: File,
    pub(super) key: Option<SnapshotKey>,
    pub(super) salt: [u8; 12],
    pub(super) id: [u8; 16],
    pub(super) parent: Option<ParentRef>,
    pub(super) expires_unix: Option<u64>,
    pub(super) secrets: Vec<(u64, u64)>,
    pub(super) secret_bits: Vec<u64>,
    pub(super) entries: Vec<PageEntry>,
    pub(super) round: u32,
    pub(super) bytes_written: u64,
    pub(super) bufs: Vec<AlignedBuf>,
}

impl LayerWriter {
    /// Starts a layer in `dir` for a VM with guest memory `ram`. An older snapshot in `dir` is
    /// invalidated first (its state file removed), so a crash never leaves a mix behind.
    pub fn create(
        dir: &Path,
        ram: Arc<GuestRam>,
        opts: LayerOptions,
    ) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let dir = std::path::absolute(dir).map_err(io_at(dir))?;
        let parent = match &opts.parent {
            None => None,
            Some(p) => {
                let p = std::path::absolute(p).map_err(io_at(p))?;
                if p == dir {
                    return Err(SnapshotError::Usage(
                        "a layer cannot be its own parent: use another directory".into(),
                    ));
                }
                let layer = Layer::open(&p, opts.key.as_ref())?;
                if layer.vm.machine.mem_bytes != ram.size() {
                    return Err(SnapshotError::Chain(format!(
                        "parent {} is of a {}-byte guest, this one has {} bytes",
                        p.display(),
                        layer.vm.machine.mem_bytes,
                        ram.size()
                    )));
                }
                Some(ParentRef {
                    dir: p,
                    id: layer.manifest.id.clone(),
                    state_sha256: layer.state_sha256.clone().unwrap_or_default(),
                })
            }
        };
        let state = dir.join(STATE_FILE);
        match std::fs::remove_file(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(&state)(e)),
            _ => {}
        }
        let path = dir.join(MEMORY_FILE);
        // O_DIRECT: batches go to the disk without a page-cache copy; filesystems without it
        // get buffered writes.
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            // Guest memory is the guest's secrets: readable by the owner only.
            o.mode(0o600);
            o.write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let file = open(true).or_else(|_| open(false)).map_err(io_at(&path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_at(&path))?;
        file.set_len(ram.size()).map_err(io_at(&path))?;
        let pages = ram.size() / PAGE_SIZE;
        let secrets = normalize_secrets(&opts.secrets, ram.size());
        Ok(LayerWriter {
            dir,
            secret_bits: secret_bitmap(&secrets, pages),
            secrets,
            file,
            key: opts.key,
            salt: random_bytes(),
            id: random_bytes(),
            parent,
            expires_unix: opts.expires_in_s.map(|s| unix_now().saturating_add(s)),
            entries: vec![PageEntry::Absent; pages as usize],
            round: 0,
            bytes_written: 0,
            bufs: (0..2)
                .map(|_| AlignedBuf::new((BATCH_PAGES * PAGE_SIZE) as usize))
                .collect(),
            ram,
        })
    }

    /// The layer's id.
    pub fn id(&self) -> String {
        hex(&self.id)
    }

    /// Adds secret regions (they are never written from now on; copies written earlier in
    /// this layer are dropped from its index).
    pub fn add_secrets(&mut self, more: &[(u64, u64)]) {
        let mut all = self.secrets.clone();
        all.extend_from_slice(more);
        self.secrets = normalize_secrets(&all, self.ram.size());
        let pages = self.entries.len() as u64;
        self.secret_bits = secret_bitmap(&self.secrets, pages);
        for p in 0..pages {
            if bit(&self.secret_bits, p) && self.entries[p as usize] != PageEntry::Absent {
                self.entries[p as usize] = PageEntry::Zero;
            }
        }
    }

    /// Writes the pages set in `bitmap` (every page when `None`) as they are now: each batch
    /// is copied out of guest memory first, so the guest may keep running (a page it changes
    /// meanwhile is written again in a later round). Copying and checking one batch overlaps
    /// with writing the previous one (a writer thread, two buffers). Returns the bytes written.
    pub fn write_pages(&mut self, bitmap: Option<&[u64]>) -> Result<u64, SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        let round = self.round;
        self.round += 1;
        let mut bufs = std::mem::take(&mut self.bufs);
        let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, Vec<WriteRun>)>(1);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        for b in bufs.drain(..) {
            let _ = free_tx.send(b);
        }
        let file = &self.file;
        // Where the memfd holds data, for a full round: found once (a hole search walks a
        // whole run per call). Pages of a bitmap were written, so they are data; scanning
        // the memfd there would cost a 1 GiB guest 8-10 ms of a live snapshot's pause.
        let data = bitmap
            .is_none()
            .then(|| self.ram.data_runs(0, self.entries.len() as u64));
        let mut fill = Filler {
            ram: &self.ram,
            data: data.as_deref(),
            entries: &mut self.entries,
            secret_bits: &self.secret_bits,
            key: self.key.as_ref(),
            salt: &self.salt,
            id: &self.id,
            round,
        };
        let (filled, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let mut written = 0u64;
                for (buf, runs) in full_rx {
                    for r in &runs {
                        file.write_all_at(&buf.as_slice()[r.at..r.at + r.len], r.offset)?;
                        written += r.len as u64;
                    }
                    if free_tx.send(buf).is_err() {
                        break;
                    }
                }
                Ok::<u64, std::io::Error>(written)
            });
            let filled = fill.all(bitmap, &free_rx, &full_tx);
            drop(full_tx);
            let written = writer.join().unwrap_or_else(|_| {
                Err(std::io::Error::other("the snapshot writer thread panicked"))
            });
            (filled, written)
        });
        // The buffers come back for the next round.
        self.bufs.extend(free_rx.try_iter());
        while self.bufs.len() < 2 {
            self.bufs
                .push(AlignedBuf::new((BATCH_PAGES * PAGE_SIZE) as usize));
        }
        let written = written.map_err(io_at(&path))?;
        filled?;
        self.bytes_written += written;
        Ok(written)
    }

    /// Finishes the layer: flushes the memory file, then writes the state file (atomically:
    /// the layer becomes valid in one rename).
    pub fn finish(self, vm: VmState) -> Result<LayerSummary, SnapshotError> {
        let mem = self.dir.join(MEMORY_FILE);
        self.file.sync_all().map_err(io_at(&mem))?;
        let full = self.parent.is_none();
        // Rounds only tell encrypted pages' nonces apart: a plain layer's runs ignore them.
        let plain = self.key.is_none();
        let mut index = Vec::new();
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        let mut checks: Vec<u8> = Vec::new();
        let pages = self.entries.len();
        let mut p = 0usize;
        while p < pages {
            let e = self.entries[p];
            let kind = match e {
                PageEntry::Absent => None,
                // A full layer's zero pages need no entry: everything absent is zero.
                PageEntry::Zero if full => None,
                PageEntry::Zero => Some((0u8, 0u32)),
                PageEntry::Data { round, .. } => Some((1u8, if plain { 0 } else { round })),
            };
            let Some((k, round)) = kind else {
                p += 1;
                continue;
            };
            let start = p;
            checks.clear();
            while p < pages {
                let same = match self.entries[p] {
                    PageEntry::Zero => k == 0,
                    PageEntry::Data { round: r, check } => {
                        if k == 1 && (plain || r == round) {
                            checks.extend_from_slice(&check);
                            true
                        } else {
                            false
                        }
                    }
                    PageEntry::Absent => false,
                };
                if !same || p - start >= u32::MAX as usize {
                    break;
                }
                p += 1;
            }
            let count = (p - start) as u64;
            if k == 1 {
                data_pages += count;
            } else {
                zero_pages += count;
            }
            index.extend_from_slice(&(start as u64).to_le_bytes());
            index.extend_from_slice(&(count as u32).to_le_bytes());
            index.push(k);
            index.extend_from_slice(&round.to_le_bytes());
            if k == 1 && plain {
                // One check per aligned group the run touches.
                let group = GROUP_PAGES as usize;
                let mut q = start;
                while q < p {
                    let g_end = ((q / group + 1) * group).min(p);
                    let of_group = &checks[16 * (q - start)..16 * (g_end - start)];
                    index.extend_from_slice(&group_check(of_group));
                    q = g_end;
                }
            } else {
                index.extend_from_slice(&checks);
            }
        }
        let manifest = LayerManifest {
            id: hex(&self.id),
            parent: self.parent,
            created_unix: unix_now(),
            expires_unix: self.expires_unix,
            secrets: self.secrets,
            rounds: self.round,
            data_bytes: data_pages * PAGE_SIZE,
        };
        let payload = payload_of(&manifest, &vm.to_bytes(), &index);
        let bytes = seal(&payload, self.key.as_ref(), &self.salt)?;
        let state = self.dir.join(STATE_FILE);
        let tmp = self.dir.join("state.tmp");
        let w = owner_only_file(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &state));
        w.map_err(io_at(&state))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(LayerSummary {
            id: manifest.id,
            dir: self.dir,
            data_pages,
            zero_pages,
            bytes_written: self.bytes_written,
            rounds: self.round,
        })
    }
}

/// The state payload: manifest (JSON) and VM state (the state tree's codec), each behind its
/// u32 LE length, then the index.
pub(super) fn payload_of(manifest: &LayerManifest, tree: &[u8], index: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).expect("a manifest always serializes");
    let mut payload = Vec::with_capacity(8 + json.len() + tree.len() + index.len() + 16);
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    payload.extend_from_slice(&(tree.len() as u32).to_le_bytes());
    payload.extend_from_slice(tree);
    payload.extend_from_slice(index);
    payload
}

/// Creates (or truncates) a file only its owner can read: snapshot files hold the guest's
/// memory and registers. An existing file's mode is set too (`mode` applies only to new ones).
pub(super) fn owner_only_file(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}
