//! virtio-blk over a raw image file (sparse is fine): read, write, flush (fdatasync before the
//! status is written) and GET_ID, optionally read-only or with O_DIRECT.
//!
//! A request the guest builds badly never reaches the file: an out-of-range sector, a length
//! that is not whole sectors, a data buffer of the wrong direction or outside guest memory
//! gets VIRTIO_BLK_S_IOERR; an unknown type gets VIRTIO_BLK_S_UNSUPP; a chain with no place
//! for a status is returned unanswered (used length 0).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::disk_track::DiskTrack;
use super::{DeviceConfig, DeviceCounters, Mem, VirtioDevice};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest piece moved between the file and guest memory at once.
const CHUNK: usize = 256 << 10;
/// O_DIRECT wants the buffer aligned to the logical block size; a page covers every case.
const ALIGN: usize = 4096;

/// How a disk is given (`--disk path=F[,readonly=on][,direct=on]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image (reopened by path after a restore or a migration: shared storage).
    pub path: PathBuf,
    /// Writes fail with VIRTIO_BLK_S_IOERR; VIRTIO_BLK_F_RO is offered.
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (no host page cache).
    #[serde(default)]
    pub direct: bool,
}

impl BlockConfig {
    /// Parses `path=F[,readonly=on|off][,direct=on|off]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut path = None;
        let (mut readonly, mut direct) = (false, false);
        let flag = |k: &str, v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(format!("--disk {spec}: {k}={v}: use on or off")),
        };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("readonly", v)) => readonly = flag("readonly", v)?,
                Some(("direct", v)) => direct = flag("direct", v)?,
                _ => {
                    return Err(format!(
                        "--disk {spec}: `{part}` is not one of path=FILE, readonly=on|off, direct=on|off"
                    ))
                }
            }
        }
        let path = path.ok_or_else(|| format!("--disk {spec}: path=FILE is missing"))?;
        Ok(BlockConfig {
            path,
            readonly,
            direct,
        })
    }
}

/// The disks this process was given for a VM arriving by migration (`run --incoming ...
/// --disk path=F`): the arriving VM's disks go on these files, in order, and the migration
/// copies the source's disks into them. Empty: the disks are on shared storage, reopened by
/// the path the source used.
static LOCAL: Mutex<Vec<BlockConfig>> = Mutex::new(Vec::new());

/// Sets this host's disks for an arriving VM (see [`LOCAL`]).
pub fn set_local_disks(disks: Vec<BlockConfig>) {
    *crate::devices::lock(&LOCAL) = disks;
}

/// This host's disks for an arriving VM, in order.
pub fn local_disks() -> Vec<BlockConfig> {
    crate::devices::lock(&LOCAL).clone()
}

/// The disk to open for the `index`-th disk of an arriving VM saved as `saved`: this host's
/// own when it was given one, the same path otherwise (shared storage).
pub fn local_disk(index: usize, saved: &BlockConfig) -> BlockConfig {
    crate::devices::lock(&LOCAL)
        .get(index)
        .cloned()
        .unwrap_or_else(|| saved.clone())
}

/// Why a disk cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened or sized.
    #[error("disk {path}: {err}")]
    Open {
        /// The image.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The image holds less than one sector.
    #[error("disk {0}: the image is smaller than one 512-byte sector")]
    Empty(String),
}

/// A virtio-blk device.
pub struct Block {
    cfg: BlockConfig,
    file: File,
    /// Capacity in sectors (the file's size, rounded down).
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    counters: DeviceCounters,
    /// Bounce buffer, ALIGN-aligned at `buf_off`.
    buf: Vec<u8>,
    buf_off: usize,
    /// Written blocks and the write mirror, for a migration of the disk.
    track: Arc<DiskTrack>,
}

/// A request refused with this status.
type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as u8;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as u8;

impl Block {
    /// Opens the image of `cfg`.
    pub fn open(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let path = cfg.path.display().to_string();
        let open_err = |err| BlockError::Open {
            path: path.clone(),
            err,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(!cfg.readonly);
        if cfg.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(&cfg.path).map_err(open_err)?;
        // A block device reports no length in its metadata: ask where its end is.
        let bytes = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let sectors = bytes / SECTOR;
        if sectors == 0 {
            return Err(BlockError::Empty(path));
        }
        let meta = file.metadata().map_err(open_err)?;
        // The serial a guest sees: stable for this file on this host (device and inode).
        let serial = format!("{:x}{:x}", meta.dev(), meta.ino());
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let buf = vec![0u8; CHUNK + ALIGN];
        let buf_off = buf.as_ptr().align_offset(ALIGN);
        let track = Arc::new(DiskTrack::new(cfg.path.clone(), sectors * SECTOR, serial));
        // A stamped image: its generation goes into the tracking, and the stamp goes (from
        // now on the guest writes; a read-only image keeps it).
        if let Some(g) = super::disk_track::read_stamp(&cfg.path) {
            let taken = cfg.readonly || {
                let r = super::disk_track::remove_stamp(&cfg.path);
                if let Err(e) = &r {
                    tracing::warn!("disk {path}: its base stamp stays unused: {e}");
                }
                r.is_ok()
            };
            if taken {
                track.set_base(Some(g));
            }
        }
        Ok(Block {
            cfg: cfg.clone(),
            file,
            sectors,
            id,
            counters: DeviceCounters::default(),
            buf,
            buf_off,
            track,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one chain; returns the used length (0 for a chain left unanswered).
    fn serve(&mut self, descs: &[Descriptor], mem: &Mem) -> u32 {
        let Some((status, rest)) = descs.split_last() else {
            self.counters.skipped += 1;
            return 0;
        };
        if rest.is_empty() || !status.is_write_only() || status.len() == 0 {
            self.counters.skipped += 1;
            return 0;
        }
        let (code, len) = match self.request(&rest[0], &rest[1..], mem) {
            Ok(len) => (S_OK, len),
            Err(code) => (code, 0),
        };
        if mem.write_obj(code, status.addr()).is_err() {
            self.counters.skipped += 1;
            return 0;
        }
        if code == S_OK {
            self.counters.ok += 1;
        } else {
            self.counters.errors += 1;
        }
        len.saturating_add(1)
    }

    /// Carries out the request whose header is in `header`; returns the bytes written into
    /// guest buffers, or the error status.
    fn request(
        &mut self,
        header: &Descriptor,
        data: &[Descriptor],
        mem: &Mem,
    ) -> Result<u32, Status> {
        if header.is_write_only() || header.len() < 16 {
            return Err(S_IOERR);
        }
        let kind: u32 = mem.read_obj(header.addr()).map_err(|_| S_IOERR)?;
        let at = header.addr().checked_add(8).ok_or(S_IOERR)?;
        let sector: u64 = mem.read_obj(at).map_err(|_| S_IOERR)?;
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let out = kind == VIRTIO_BLK_T_OUT;
                if out && self.cfg.readonly {
                    return Err(S_IOERR);
                }
                // Data buffers: device-writable for a read, device-readable for a write.
                if data.iter().any(|d| d.is_write_only() == out) {
                    return Err(S_IOERR);
                }
                let total: u64 = data.iter().map(|d| d.len() as u64).sum();
                let end = sector
                    .checked_mul(SECTOR)
                    .and_then(|start| start.checked_add(total));
                if !total.is_multiple_of(SECTOR) || end.is_none_or(|e| e > self.sectors * SECTOR) {
                    return Err(S_IOERR);
                }
                self.transfer(out, sector * SECTOR, total, data, mem)?;
                Ok(if out {
                    0
                } else {
                    total.min(u32::MAX as u64 - 1) as u32
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.cfg.readonly {
                    self.file.sync_data().map_err(|_| S_IOERR)?;
                }
                self.counters.flushes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(S_IOERR)?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr())
                    .map_err(|_| S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(S_UNSUPP),
        }
    }

    /// Moves `total` bytes between the file at `offset` and the guest buffers `data`, through
    /// the aligned bounce buffer (so O_DIRECT works whatever the guest's buffer sizes).
    fn transfer(
        &mut self,
        out: bool,
        offset: u64,
        total: u64,
        data: &[Descriptor],
        mem: &Mem,
    ) -> Result<(), Status> {
        let mut cursor = Cursor {
            descs: data,
            i: 0,
            off: 0,
        };
        let mut done = 0u64;
        while done < total {
            let n = ((total - done) as usize).min(CHUNK);
            let buf = &mut self.buf[self.buf_off..self.buf_off + n];
            if !out {
                self.file
                    .read_exact_at(buf, offset + done)
                    .map_err(|_| S_IOERR)?;
            }
            let mut pos = 0;
            while pos < n {
                let (addr, len) = cursor.take(n - pos).ok_or(S_IOERR)?;
                let piece = &mut buf[pos..pos + len];
                let moved = if out {
                    mem.read_slice(piece, addr)
                } else {
                    mem.write_slice(piece, addr)
                };
                moved.map_err(|_| S_IOERR)?;
                pos += len;
            }
            if out {
                self.file
                    .write_all_at(buf, offset + done)
                    .map_err(|_| S_IOERR)?;
                // A migration records the block, or (synchronous phase) waits here until the
                // destination holds the write too.
                self.track.wrote(offset + done, buf);
                self.counters.written_bytes += n as u64;
            } else {
                self.counters.read_bytes += n as u64;
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// A position in a chain's data buffers.
struct Cursor<'a> {
    descs: &'a [Descriptor],
    i: usize,
    off: u32,
}

impl Cursor<'_> {
    /// The guest address and length (at most `max`, never 0) of the next piece of buffer, and
    /// advances past it; `None` when the buffers are used up.
    fn take(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let d = self.descs.get(self.i)?;
            let left = (d.len() - self.off) as usize;
            if left == 0 {
                self.i += 1;
                self.off = 0;
                continue;
            }
            let len = left.min(max);
            let addr = d.addr().checked_add(self.off as u64)?;
            self.off += len as u32;
            return Some((addr, len));
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.cfg.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64) first; the rest (features not offered)
        // reads as zero.
        let mut space = [0u8; 64];
        space[..8].copy_from_slice(&self.sectors.to_le_bytes());
        let start = offset.min(space.len() as u64) as usize;
        let end = (start + data.len()).min(space.len());
        data[..end - start].copy_from_slice(&space[start..end]);
    }

    fn config_len(&self) -> usize {
        8
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &Mem) -> bool {
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The chain walk stops by itself at a loop, an index out of the table or
            // unreadable memory (what is left is judged by serve()).
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.serve(&descs, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            any = true;
        }
        any
    }

    fn config(&self) -> DeviceConfig {
        DeviceConfig::Block(self.cfg.clone())
    }

    fn counters(&self) -> DeviceCounters {
        self.counters
    }

    fn disk_track(&self) -> Option<Arc<DiskTrack>> {
        Some(self.track.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::virtio::MmioTransport;
    use crate::devices::MmioDevice;
    use crate::memory::GuestRam;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// A disk image of `sectors` sectors in the temp dir, removed on drop.
    pub(crate) struct Image(pub PathBuf);
    impl Image {
        pub(crate) fn new(tag: &str, sectors: u64) -> Self {
            let p = std::env::temp_dir().join(format!(
                "spanvmm-blk-{tag}-{}-{:?}.img",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = File::create(&p).unwrap();
            f.set_len(sectors * SECTOR).unwrap();
            Image(p)
        }
        fn read(&self, sector: u64) -> Vec<u8> {
            let mut b = vec![0u8; SECTOR as usize];
            File::open(&self.0)
                .unwrap()
                .read_exact_at(&mut b, sector * SECTOR)
                .unwrap();
            b
        }
    }
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A driver's side of one queue, written straight into real guest memory.
    pub(crate) struct Driver {
        pub(crate) ram: Arc<GuestRam>,
        pub(crate) queue: Queue,
        next_desc: u16,
        avail: u16,
    }

    impl Driver {
        pub(crate) fn new() -> Self {
            let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_desc_table_address(Some(DESC as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            queue.set_used_ring_address(Some(USED as u32), Some(0));
            queue.set_ready(true);
            Driver {
                ram,
                queue,
                next_desc: 0,
                avail: 0,
            }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = DESC + 16 * i as u64;
            self.ram.write(at, &addr.to_le_bytes()).unwrap();
            self.ram.write(at + 8, &len.to_le_bytes()).unwrap();
            self.ram.write(at + 12, &flags.to_le_bytes()).unwrap();
            self.ram.write(at + 14, &next.to_le_bytes()).unwrap();
        }

        /// Makes a chain of `(addr, len, writable)` available; returns its head.
        pub(crate) fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = head + k as u16;
                let last = k + 1 == bufs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                self.desc(i, addr, len, flags, i + 1);
            }
            self.next_desc += bufs.len() as u16;
            self.publish(head);
            head
        }

        fn publish(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * (self.avail % QUEUE_SIZE) as u64;
            self.ram.write(slot, &head.to_le_bytes()).unwrap();
            self.avail = self.avail.wrapping_add(1);
            self.ram
                .write(AVAIL + 2, &self.avail.to_le_bytes())
                .unwrap();
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            self.ram.write(at, &kind.to_le_bytes()).unwrap();
            self.ram.write(at + 4, &0u32.to_le_bytes()).unwrap();
            self.ram.write(at + 8, &sector.to_le_bytes()).unwrap();
        }

        fn byte(&self, at: u64) -> u8 {
            let mut b = [0u8];
            self.ram.read(at, &mut b).unwrap();
            b[0]
        }

        /// (head, len) of used entry `n`.
        pub(crate) fn used(&self, n: u16) -> (u32, u32) {
            let mut b = [0u8; 8];
            self.ram.read(USED + 4 + 8 * n as u64, &mut b).unwrap();
            (
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u32::from_le_bytes(b[4..].try_into().unwrap()),
            )
        }

        pub(crate) fn used_idx(&self) -> u16 {
            let mut b = [0u8; 2];
            self.ram.read(USED + 2, &mut b).unwrap();
            u16::from_le_bytes(b)
        }

        fn run(&mut self, blk: &mut Block) -> bool {
            blk.process_queue(0, &mut self.queue, self.ram.guest_memory())
        }
    }

    fn cfg(img: &Image, readonly: bool) -> BlockConfig {
        BlockConfig {
            path: img.0.clone(),
            readonly,
            direct: false,
        }
    }

    #[test]
    fn write_flush_read_round_trip_and_get_id() {
        let img = Image::new("rt", 64);
        let mut blk = Block::open(&cfg(&img, false)).unwrap();
        assert_eq!(blk.sectors(), 64);
        assert_eq!(blk.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(blk.features() & 1 << VIRTIO_BLK_F_FLUSH, 0);
        let mut d = Driver::new();
        // Write sectors 3-4 from two buffers of 300 and 724 bytes (not sector-sized pieces).
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
        d.ram.write(0x10000, &data[..300]).unwrap();
        d.ram.write(0x20000, &data[300..]).unwrap();
        d.header(0x8000, VIRTIO_BLK_T_OUT, 3);
        d.push(&[
            (0x8000, 16, false),
            (0x10000, 300, false),
            (0x20000, 724, false),
            (0x9000, 1, true),
        ]);
        d.header(0x8100, VIRTIO_BLK_T_FLUSH, 0);
        d.push(&[(0x8100, 16, false), (0x9001, 1, true)]);
        assert!(d.run(&mut blk));
        assert_eq!((d.byte(0x9000), d.byte(0x9001)), (S_OK, S_OK));
        assert_eq!(img.read(3), &data[..512]);
        assert_eq!(img.read(4), &data[512..]);
        // Read them back into one buffer.
        d.header(0x8200, VIRTIO_BLK_T_IN, 3);
        let head = d.push(&[
            (0x8200, 16, false),
            (0x30000, 1024, true),
            (0x9002, 1, true),
        ]);
        d.header(0x8300, VIRTIO_BLK_T_GET_ID, 0);
        d.push(&[(0x8300, 16, false), (0x40000, 20, true), (0x9003, 1, true)]);
        assert!(d.run(&mut blk));
        let mut back = vec![0u8; 1024];
        d.ram.read(0x30000, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(d.used(2), (head as u32, 1025), "data bytes + status byte");
        assert_eq!((d.byte(0x9002), d.byte(0x9003)), (S_OK, S_OK));
        let mut id = [0u8; 20];
        d.ram.read(0x40000, &mut id).unwrap();
        assert_eq!(&id[..], &blk.id[..]);
        assert_ne!(id[0], 0);
        let c = blk.counters();
        assert_eq!((c.ok, c.errors, c.skipped, c.flushes), (4, 0, 0, 1));
        assert_eq!((c.read_bytes, c.written_bytes), (1024, 1024));
        assert_eq!(d.used_idx(), 4);
    }

    #[test]
    fn a_tracked_disk_records_the_blocks_the_guest_writes() {
        let img = Image::new("track", 512);
        let mut blk = Block::open(&cfg(&img, false)).unwrap();
        let t = blk.disk_track().unwrap();
        assert_eq!((t.bytes(), t.blocks()), (512 * SECTOR, 4));
        t.start();
        let mut d = Driver::new();
        d.ram.write(0x10000, &[0x42; 1024]).unwrap();
        // Sectors 127-128: the last of 64 KiB block 0 and the first of block 1.
        d.header(0x8000, VIRTIO_BLK_T_OUT, 127);
        d.push(&[
            (0x8000, 16, false),
            (0x10000, 1024, false),
            (0x9000, 1, true),
        ]);
        // A read records nothing.
        d.header(0x8100, VIRTIO_BLK_T_IN, 300);
        d.push(&[(0x8100, 16, false), (0x11000, 512, true), (0x9001, 1, true)]);
        assert!(d.run(&mut blk));
        assert_eq!((d.byte(0x9000), d.byte(0x9001)), (S_OK, S_OK));
        assert_eq!(t.harvest(), vec![0b11]);
        assert_eq!(t.stop(), vec![0]);
    }

    #[test]
    fn bad_requests_get_an_error_status_and_leave_the_file_alone() {
        let img = Image::new("bad", 8);
        let mut blk = Block::open(&cfg(&img, false)).unwrap();
        let mut d = Driver::new();
        d.ram.write(0x10000, &[0xaa; 4096]).unwrap();
        // 1: past the end (sector 7 + 2 sectors); 2: a sector number that overflows.
        d.header(0x8000, VIRTIO_BLK_T_OUT, 7);
        d.push(&[
            (0x8000, 16, false),
            (0x10000, 1024, false),
            (0x9000, 1, true),
        ]);
        d.header(0x8100, VIRTIO_BLK_T_OUT, u64::MAX / 256);
        d.push(&[
            (0x8100, 16, false),
            (0x10000, 512, false),
            (0x9001, 1, true),
        ]);
        // 3: not whole sectors; 4: a read into a device-readable buffer.
        d.header(0x8200, VIRTIO_BLK_T_OUT, 0);
        d.push(&[
            (0x8200, 16, false),
            (0x10000, 100, false),
            (0x9002, 1, true),
        ]);
        d.header(0x8300, VIRTIO_BLK_T_IN, 0);
        d.push(&[
            (0x8300, 16, false),
            (0x10000, 512, false),
            (0x9003, 1, true),
        ]);
        // 5: data outside guest memory; 6: unknown type; 7: a short header.
        d.header(0x8400, VIRTIO_BLK_T_OUT, 0);
        d.push(&[
            (0x8400, 16, false),
            ((2 << 20) - 256, 512, false),
            (0x9004, 1, true),
        ]);
        d.header(0x8500, 0x77, 0);
        d.push(&[(0x8500, 16, false), (0x9005, 1, true)]);
        d.push(&[(0x8600, 8, false), (0x9006, 1, true)]);
        // 8: no writable status (left unanswered); 9: a single descriptor.
        d.header(0x8700, VIRTIO_BLK_T_FLUSH, 0);
        d.push(&[(0x8700, 16, false), (0x9007, 1, false)]);
        d.push(&[(0x8800, 16, true)]);
        // 10: a chain that loops on itself ends at the queue size, without hanging.
        d.header(0x8900, VIRTIO_BLK_T_OUT, 0);
        let i = d.next_desc;
        d.desc(i, 0x8900, 16, F_NEXT, i);
        d.next_desc += 1;
        d.publish(i);
        for b in 0..16 {
            d.ram.write(0x9000 + b, &[0xee]).unwrap();
        }
        assert!(d.run(&mut blk));
        let status: Vec<u8> = (0..8).map(|k| d.byte(0x9000 + k)).collect();
        assert_eq!(
            status,
            [S_IOERR, S_IOERR, S_IOERR, S_IOERR, S_IOERR, S_UNSUPP, S_IOERR, 0xee]
        );
        assert_eq!(d.used_idx(), 10, "every chain went back to the guest");
        assert_eq!(d.used(7).1, 0, "no status: used length 0");
        let c = blk.counters();
        assert_eq!((c.ok, c.errors, c.skipped, c.written_bytes), (0, 7, 3, 0));
        for s in 0..8 {
            assert_eq!(img.read(s), vec![0u8; 512], "sector {s} untouched");
        }
    }

    #[test]
    fn a_readonly_disk_refuses_writes() {
        let img = Image::new("ro", 8);
        std::fs::write(&img.0, [0x5a; 4096]).unwrap();
        let mut blk = Block::open(&cfg(&img, true)).unwrap();
        assert_ne!(blk.features() & 1 << VIRTIO_BLK_F_RO, 0);
        let mut d = Driver::new();
        d.header(0x8000, VIRTIO_BLK_T_OUT, 0);
        d.push(&[
            (0x8000, 16, false),
            (0x10000, 512, false),
            (0x9000, 1, true),
        ]);
        d.header(0x8100, VIRTIO_BLK_T_IN, 1);
        d.push(&[(0x8100, 16, false), (0x11000, 512, true), (0x9001, 1, true)]);
        d.header(0x8200, VIRTIO_BLK_T_FLUSH, 0);
        d.push(&[(0x8200, 16, false), (0x9002, 1, true)]);
        d.run(&mut blk);
        assert_eq!(
            (d.byte(0x9000), d.byte(0x9001), d.byte(0x9002)),
            (S_IOERR, S_OK, S_OK)
        );
        assert_eq!(img.read(0), vec![0x5a; 512]);
        assert_eq!(d.byte(0x11000), 0x5a);
    }

    #[test]
    fn a_hostile_avail_index_and_bad_ring_addresses_are_survived() {
        let img = Image::new("ring", 8);
        let mut blk = Block::open(&cfg(&img, false)).unwrap();
        let mut d = Driver::new();
        // An avail index far ahead of the device (more than the queue size): nothing served.
        d.ram.write(AVAIL + 2, &1000u16.to_le_bytes()).unwrap();
        assert!(!d.run(&mut blk));
        // Rings outside guest memory: the transport refuses to serve such a queue.
        d.queue.set_ready(false);
        d.queue.set_desc_table_address(Some(0xffff_f000), Some(0x7));
        assert!(!d.queue.is_valid(d.ram.guest_memory()));
    }

    #[test]
    fn the_transport_negotiates_modern_only_and_serves_notifications() {
        use virtio_bindings::virtio_mmio::*;
        let img = Image::new("mmio", 8);
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        let blk = Block::open(&cfg(&img, false)).unwrap();
        let mut t = MmioTransport::new(Box::new(blk), ram.clone(), 0xfeb0_0000, 5);
        let rd = |t: &mut MmioTransport, off: u32| {
            let mut b = [0u8; 4];
            t.mmio_read(off as u64, &mut b);
            u32::from_le_bytes(b)
        };
        let wr =
            |t: &mut MmioTransport, off: u32, v: u32| t.mmio_write(off as u64, &v.to_le_bytes());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1");
        let mut cap = [0u8; 8];
        t.mmio_read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        // A legacy driver (no VERSION_1) does not get FEATURES_OK.
        wr(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        wr(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & 8, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 11);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), QUEUE_SIZE as u32);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        wr(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        wr(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 15);
        // A GET_ID request, notified without an ioeventfd: served inline.
        let w = |a: u64, b: &[u8]| ram.write(a, b).unwrap();
        w(0x8000, &VIRTIO_BLK_T_GET_ID.to_le_bytes());
        w(DESC, &0x8000u64.to_le_bytes());
        w(DESC + 8, &16u32.to_le_bytes());
        w(DESC + 12, &[F_NEXT as u8, 0, 1, 0]);
        w(DESC + 16, &0x9000u64.to_le_bytes());
        w(DESC + 24, &20u32.to_le_bytes());
        w(DESC + 28, &[(F_NEXT | F_WRITE) as u8, 0, 2, 0]);
        w(DESC + 32, &0x9100u64.to_le_bytes());
        w(DESC + 40, &1u32.to_le_bytes());
        w(DESC + 44, &[F_WRITE as u8, 0, 0, 0]);
        w(AVAIL + 4, &0u16.to_le_bytes());
        w(AVAIL + 2, &1u16.to_le_bytes());
        w(0x9100, &[0xee]);
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        t.set_irq(irq.try_clone().unwrap());
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let mut st = [0u8];
        ram.read(0x9100, &mut st).unwrap();
        assert_eq!(st[0], S_OK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(irq.read().unwrap(), 1);
        // Not acknowledged: the next completion raises no new edge (a polling guest).
        w(AVAIL + 6, &0u16.to_le_bytes());
        w(AVAIL + 2, &2u16.to_le_bytes());
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(irq.read().is_err(), "no second interrupt before the ack");
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        w(AVAIL + 8, &0u16.to_le_bytes());
        w(AVAIL + 2, &3u16.to_le_bytes());
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(irq.read().unwrap(), 1, "acknowledged: a new interrupt");
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        // The state round-trips, and refuses a disk of another size.
        let s = t.state();
        assert_eq!(s.transport.queues[0].next_used, 3);
        let again = Block::open(&cfg(&img, false)).unwrap();
        let t2 = MmioTransport::restore(Box::new(again), ram.clone(), &s).unwrap();
        assert_eq!(t2.state().transport, s.transport);
        File::options()
            .write(true)
            .open(&img.0)
            .unwrap()
            .set_len(16 * SECTOR)
            .unwrap();
        let bigger = Block::open(&cfg(&img, false)).unwrap();
        let e = MmioTransport::restore(Box::new(bigger), ram, &s)
            .err()
            .unwrap();
        assert!(e.to_string().contains("another size"), "{e}");
    }

    #[test]
    fn disk_specs_parse_or_say_why_not() {
        let c = BlockConfig::parse("path=/x.img,readonly=on,direct=on").unwrap();
        assert_eq!(c.path, PathBuf::from("/x.img"));
        assert!(c.readonly && c.direct);
        assert!(!BlockConfig::parse("path=/x").unwrap().readonly);
        for bad in ["readonly=on", "path=/x,ro", "path=/x,readonly=yes", "path="] {
            assert!(BlockConfig::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Block::open(&BlockConfig::parse("path=/nonexistent/x").unwrap())
                .err()
                .unwrap()
                .to_string()
                .contains("/nonexistent/x")
        );
    }
}
