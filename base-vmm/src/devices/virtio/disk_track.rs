//! What a disk migration needs from a virtio-blk disk: which blocks the guest wrote since the
//! last look (a bitmap of [`TRACK_BLOCK`]-byte blocks, harvested like the dirty log), and a
//! write mirror for the synchronous phase (each guest write goes to the destination too, and
//! the request completes only once the destination acknowledged it: DRBD's protocol C).
//!
//! Off unless a migration asks: an untracked disk pays one uncontended lock per write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
        DiskTrack {
            path,
            bytes,
            serial,
            inner: Mutex::new(Inner {
                mode: Mode::Off,
                dirty: vec![0; bytes.div_ceil(TRACK_BLOCK).div_ceil(64) as usize],
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
}
