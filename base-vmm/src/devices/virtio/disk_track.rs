//! What a disk migration needs from a virtio-blk disk: which blocks the guest wrote since the
//! last look (a bitmap of [`TRACK_BLOCK`]-byte blocks, harvested like the dirty log), and a
//! write mirror for the synchronous phase (each guest write goes to the destination too, and
//! the request completes only once the destination acknowledged it: DRBD's protocol C).
//!
//! Off unless a migration asks: an untracked disk pays one uncontended lock per write.
//!
//! **Base generations** (incremental disk migration without reading the disks): an image
//! that two hosts hold alike carries a *stamp* beside it (`<image>.spanvmm-base`) naming its
//! generation, a random 128-bit id given at a migration's hand-over (both ends then hold the
//! same bytes) or by `spanvmm disk-stamp`. The stamp is valid while the image keeps the size
//! and modification time recorded in it. A VMM opening the image takes the stamp into its
//! tracking (and removes it: the guest will write) and records every block written since;
//! a migration to a host whose image still carries that stamp sends only those blocks. A
//! live update hands the base and that record to the new process ([`BaseSince`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::lock;

/// Bytes of a tracked block.
pub const TRACK_BLOCK: u64 = 64 << 10;

/// Where the synchronous phase sends each guest write.
pub trait WriteMirror: Send + Sync {
    /// Sends the guest's write of `data` at byte `offset` to the peer and waits for it; true
    /// once the peer acknowledged it. False (not acknowledged: the link failed or the
    /// synchronous phase ended meanwhile): the block counts as dirty instead.
    fn mirror(&self, offset: u64, data: &[u8]) -> bool;
}

enum Mode {
    /// Nothing is recorded.
    Off,
    /// Writes set their blocks' bits.
    Dirty,
    /// Writes go through the mirror (a write it could not deliver sets its bits).
    Mirror(Arc<dyn WriteMirror>),
}

struct Inner {
    mode: Mode,
    dirty: Vec<u64>,
    /// The generation the image held when this VMM took it, if known...
    base: Option<u128>,
    /// ...and the blocks written since (whatever the mode).
    written: Vec<u64>,
}

/// A disk's base and the blocks written since, as a live update hands them to the new
/// process (which opens the same image while the guest is paused: nothing writes between).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BaseSince {
    /// The image.
    pub path: PathBuf,
    /// Its size, bytes.
    pub bytes: u64,
    /// The base's generation, 32 hex digits (as in a stamp).
    pub generation: String,
    /// The blocks written since, one bit each (bit `b % 64` of word `b / 64`).
    pub written: Vec<u64>,
}

/// One disk's tracking, shared by the device (which reports writes) and a migration.
pub struct DiskTrack {
    path: PathBuf,
    bytes: u64,
    serial: String,
    inner: Mutex<Inner>,
    mirrored: AtomicU64,
    mirrored_bytes: AtomicU64,
}

impl DiskTrack {
    /// Tracking for the image at `path` of `bytes` bytes (off until [`Self::start`]).
    pub fn new(path: PathBuf, bytes: u64, serial: String) -> Self {
        let words = bytes.div_ceil(TRACK_BLOCK).div_ceil(64) as usize;
        DiskTrack {
            path,
            bytes,
            serial,
            inner: Mutex::new(Inner {
                mode: Mode::Off,
                dirty: vec![0; words],
                base: None,
                written: vec![0; words],
            }),
            mirrored: AtomicU64::new(0),
            mirrored_bytes: AtomicU64::new(0),
        }
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk's size in bytes (what the guest sees).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tracked blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.bytes.div_ceil(TRACK_BLOCK)
    }

    /// The serial the guest sees (device and inode of the image on this host).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Starts recording written blocks, from an empty bitmap.
    pub fn start(&self) {
        let mut i = lock(&self.inner);
        i.dirty.iter_mut().for_each(|w| *w = 0);
        i.mode = Mode::Dirty;
    }

    /// The image holds generation `base` now (`None`: not known); no block written since.
    pub fn set_base(&self, base: Option<u128>) {
        let mut i = lock(&self.inner);
        i.base = base;
        i.written.iter_mut().for_each(|w| *w = 0);
    }

    /// The generation the image held when this VMM took it (the blocks written since are
    /// recorded), if known.
    pub fn base(&self) -> Option<u128> {
        lock(&self.inner).base
    }

    /// The base and the blocks written since, if a base is known.
    pub fn base_since(&self) -> Option<BaseSince> {
        let i = lock(&self.inner);
        Some(BaseSince {
            path: self.path.clone(),
            bytes: self.bytes,
            generation: format!("{:032x}", i.base?),
            written: i.written.clone(),
        })
    }

    /// Takes `b` over from the process this one replaces: the image's base and the blocks
    /// written since. False (nothing taken) when `b` is another image's, or malformed.
    pub fn take_base_since(&self, b: &BaseSince) -> bool {
        let mut i = lock(&self.inner);
        let g = u128::from_str_radix(&b.generation, 16).unwrap_or(0);
        if b.path != self.path || b.bytes != self.bytes || g == 0 {
            return false;
        }
        if b.written.len() != i.written.len() {
            return false;
        }
        i.base = Some(g);
        i.written.copy_from_slice(&b.written);
        true
    }

    /// [`Self::start`], returning in the same step the blocks written since generation
    /// `base`; `None` (and nothing started) if the image's base is not `base`.
    pub fn start_since(&self, base: u128) -> Option<Vec<u64>> {
        let mut i = lock(&self.inner);
        if i.base != Some(base) {
            return None;
        }
        i.dirty.iter_mut().for_each(|w| *w = 0);
        i.mode = Mode::Dirty;
        Some(i.written.clone())
    }

    /// The blocks written since the last harvest (bit `b % 64` of word `b / 64`); clears them.
    pub fn harvest(&self) -> Vec<u64> {
        let mut i = lock(&self.inner);
        let n = i.dirty.len();
        std::mem::replace(&mut i.dirty, vec![0; n])
    }

    /// Enters the synchronous phase: from now on every write goes through `mirror`. Returns
    /// the blocks written before (harvested in the same step, so no write falls between).
    pub fn mirror_on(&self, mirror: Arc<dyn WriteMirror>) -> Vec<u64> {
        let mut i = lock(&self.inner);
        i.mode = Mode::Mirror(mirror);
        let n = i.dirty.len();
        std::mem::replace(&mut i.dirty, vec![0; n])
    }

    /// Leaves the synchronous phase: writes are recorded as dirty again.
    pub fn mirror_off(&self) {
        let mut i = lock(&self.inner);
        if !matches!(i.mode, Mode::Off) {
            i.mode = Mode::Dirty;
        }
    }

    /// Stops tracking; returns the blocks written since the last harvest.
    pub fn stop(&self) -> Vec<u64> {
        let mut i = lock(&self.inner);
        i.mode = Mode::Off;
        let n = i.dirty.len();
        std::mem::replace(&mut i.dirty, vec![0; n])
    }

    /// Whether writes are recorded or mirrored now.
    pub fn tracking(&self) -> bool {
        !matches!(lock(&self.inner).mode, Mode::Off)
    }

    /// Writes the mirror delivered (acknowledged by the peer), and their bytes.
    pub fn mirrored(&self) -> (u64, u64) {
        (
            self.mirrored.load(Ordering::Relaxed),
            self.mirrored_bytes.load(Ordering::Relaxed),
        )
    }

    /// The device wrote `data` at `offset` to the image (called after the write succeeded,
    /// before the request completes).
    pub fn wrote(&self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mirror = {
            let mut i = lock(&self.inner);
            if i.base.is_some() {
                mark(&mut i.written, offset, data.len() as u64);
            }
            match &i.mode {
                Mode::Off => return,
                Mode::Dirty => {
                    mark(&mut i.dirty, offset, data.len() as u64);
                    return;
                }
                Mode::Mirror(m) => m.clone(),
            }
        };
        // Waits for the peer outside the lock: the migration harvests meanwhile.
        if mirror.mirror(offset, data) {
            self.mirrored.fetch_add(1, Ordering::Relaxed);
            self.mirrored_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return;
        }
        let mut i = lock(&self.inner);
        if !matches!(i.mode, Mode::Off) {
            mark(&mut i.dirty, offset, data.len() as u64);
        }
    }
}

/// A base stamp's file: what the image held when it was stamped.
#[derive(Serialize, Deserialize)]
struct Stamp {
    /// The generation, 32 hex digits.
    generation: String,
    /// The image's size and modification time then (anything that writes it changes them).
    bytes: u64,
    mtime_ns: i128,
}

/// The stamp file beside `image`.
pub fn stamp_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".spanvmm-base");
    PathBuf::from(p)
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// A new generation id (random, never 0: 0 means none on the wire).
pub fn new_generation() -> u128 {
    loop {
        let mut b = [0u8; 16];
        let mut got = 0;
        while got < b.len() {
            // SAFETY: the pointer and length describe the unfilled tail of `b`.
            let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
            if r > 0 {
                got += r as usize;
            }
        }
        let g = u128::from_le_bytes(b);
        if g != 0 {
            return g;
        }
    }
}

/// The generation `image` holds, if its stamp is there, readable and still valid (the image's
/// size and modification time unchanged since). A stamp that is not valid is left alone.
/// Only regular files carry one: a block device's node keeps its time when it is written.
pub fn read_stamp(image: &Path) -> Option<u128> {
    let m = std::fs::metadata(image).ok().filter(|m| m.is_file())?;
    let text = std::fs::read_to_string(stamp_path(image)).ok()?;
    let s: Stamp = serde_json::from_str(&text).ok()?;
    let g = u128::from_str_radix(&s.generation, 16).ok()?;
    (g != 0 && s.bytes == m.len() && s.mtime_ns == mtime_ns(&m)).then_some(g)
}

/// Stamps `image` as holding `generation`, once its writes are on stable storage (nothing may
/// write it any more). Written to a temporary file and renamed, so a reader sees a whole
/// stamp or none.
pub fn write_stamp(image: &Path, generation: u128) -> std::io::Result<()> {
    let f = std::fs::File::open(image)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "only a regular file carries a base stamp",
        ));
    }
    f.sync_data()?;
    let m = f.metadata()?;
    let s = Stamp {
        generation: format!("{generation:032x}"),
        bytes: m.len(),
        mtime_ns: mtime_ns(&m),
    };
    let path = stamp_path(image);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, serde_json::to_vec(&s).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

/// Removes `image`'s stamp (it is about to be written), if any.
pub fn remove_stamp(image: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(stamp_path(image)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn mark(words: &mut [u64], offset: u64, len: u64) {
    let (first, last) = (offset / TRACK_BLOCK, (offset + len - 1) / TRACK_BLOCK);
    for b in first..=last {
        if let Some(w) = words.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Peer(bool, Mutex<Vec<(u64, usize)>>);
    impl WriteMirror for Peer {
        fn mirror(&self, offset: u64, data: &[u8]) -> bool {
            lock(&self.1).push((offset, data.len()));
            self.0
        }
    }

    #[test]
    fn writes_are_recorded_mirrored_or_ignored_by_mode() {
        let t = DiskTrack::new("/x".into(), 10 * TRACK_BLOCK + 512, "s".into());
        assert_eq!(t.blocks(), 11);
        t.wrote(0, &[1; 512]);
        assert_eq!(t.harvest(), vec![0], "off: nothing recorded");
        t.start();
        // A write straddling blocks 1 and 2, and the short last block.
        t.wrote(2 * TRACK_BLOCK - 512, &[1; 1024]);
        t.wrote(10 * TRACK_BLOCK, &[1; 512]);
        assert_eq!(t.harvest(), vec![(1 << 10) | 0b110]);
        assert_eq!(t.harvest(), vec![0], "harvest clears");
        t.wrote(0, &[1; 512]);
        let ok = Arc::new(Peer(true, Mutex::new(Vec::new())));
        assert_eq!(
            t.mirror_on(ok.clone()),
            vec![1],
            "written before the mirror"
        );
        t.wrote(3 * TRACK_BLOCK, &[1; 4096]);
        assert_eq!(*lock(&ok.1), vec![(3 * TRACK_BLOCK, 4096)]);
        assert_eq!(t.mirrored(), (1, 4096));
        assert_eq!(t.harvest(), vec![0], "a delivered write is not dirty");
        let lost = Arc::new(Peer(false, Mutex::new(Vec::new())));
        t.mirror_on(lost);
        t.wrote(4 * TRACK_BLOCK, &[1; 512]);
        assert_eq!(t.harvest(), vec![1 << 4], "an undelivered write is dirty");
        t.mirror_off();
        t.wrote(5 * TRACK_BLOCK, &[1; 512]);
        assert_eq!(t.stop(), vec![1 << 5]);
        assert!(!t.tracking());
    }

    #[test]
    fn blocks_written_since_the_base_are_recorded_in_every_mode() {
        let t = DiskTrack::new("/x".into(), 10 * TRACK_BLOCK, "s".into());
        t.wrote(0, &[1; 512]);
        assert_eq!(t.start_since(7), None, "no base: nothing to start from");
        assert!(!t.tracking());
        t.set_base(Some(7));
        t.wrote(TRACK_BLOCK, &[1; 512]);
        assert_eq!(t.start_since(8), None, "another base");
        assert_eq!(t.start_since(7), Some(vec![1 << 1]));
        assert!(t.tracking());
        t.wrote(2 * TRACK_BLOCK, &[1; 512]);
        t.mirror_on(Arc::new(Peer(true, Mutex::new(Vec::new()))));
        t.wrote(3 * TRACK_BLOCK, &[1; 512]);
        t.stop();
        t.wrote(4 * TRACK_BLOCK, &[1; 512]);
        assert_eq!(
            t.start_since(7),
            Some(vec![0b11110]),
            "dirty, mirrored and off alike"
        );
        assert_eq!(
            t.harvest(),
            vec![0],
            "the migration's own bitmap starts empty"
        );
        t.set_base(Some(9));
        assert_eq!(
            t.start_since(9),
            Some(vec![0]),
            "a new base: nothing written since"
        );
    }

    #[test]
    fn a_base_and_the_blocks_written_since_pass_to_a_new_process() {
        let old = DiskTrack::new("/x".into(), 10 * TRACK_BLOCK, "s".into());
        assert_eq!(old.base_since(), None, "no base, nothing to hand over");
        old.set_base(Some(0xab));
        old.wrote(3 * TRACK_BLOCK, &[1; 512]);
        let b = old.base_since().unwrap();
        let other = DiskTrack::new("/y".into(), 10 * TRACK_BLOCK, "s".into());
        assert!(!other.take_base_since(&b), "another image");
        let resized = DiskTrack::new("/x".into(), 11 * TRACK_BLOCK, "s".into());
        assert!(!resized.take_base_since(&b), "another size");
        let bad = BaseSince {
            generation: "zz".into(),
            ..b.clone()
        };
        let new = DiskTrack::new("/x".into(), 10 * TRACK_BLOCK, "s".into());
        assert!(!new.take_base_since(&bad), "a malformed generation");
        assert_eq!(new.base(), None);
        assert!(new.take_base_since(&b));
        new.wrote(5 * TRACK_BLOCK, &[1; 512]);
        assert_eq!(
            new.start_since(0xab),
            Some(vec![(1 << 3) | (1 << 5)]),
            "the old process's writes and the new one's"
        );
    }

    #[test]
    fn a_stamp_holds_while_the_image_is_unchanged() {
        let dir = std::env::temp_dir().join(format!("spanvmm-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        assert_eq!(read_stamp(&img), None, "no stamp");
        write_stamp(&img, 0xabc).unwrap();
        assert_eq!(read_stamp(&img), Some(0xabc));
        std::fs::write(stamp_path(&img), b"{not json").unwrap();
        assert_eq!(read_stamp(&img), None, "a damaged stamp is none");
        write_stamp(&img, 0xabc).unwrap();
        // A write that keeps the size still moves the modification time.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&img, vec![1u8; 8192]).unwrap();
        assert_eq!(read_stamp(&img), None, "the image changed since");
        remove_stamp(&img).unwrap();
        remove_stamp(&img).unwrap();
        assert!(!stamp_path(&img).exists());
        assert!(new_generation() != new_generation());
        // A device node keeps its time when written: no stamp is written or read for it.
        let dev = Path::new("/dev/null");
        assert!(write_stamp(dev, 0xabc).is_err());
        assert_eq!(read_stamp(dev), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
