//! The `disk` workload (vCPU 0 only): writes 4 KiB blocks with a pattern derived from (block
//! number, generation, seed), flushes every `disk_flush` writes, keeps each block's generation
//! in guest memory, and re-reads and checks every written block in each `verify` pass.
//!
//! A block is self-describing, so the host can check one in the image file without the
//! guest's generations: words 0-2 are the block number, generation and seed, word `i` from 3
//! on is `mix(block, generation, seed ^ DISK_SALT) + i × STEP`.

use crate::config::{Config, MAX_DISK_MIB};
use crate::memory::{STEP, mix};
use crate::virtio::{BLOCK, Blk, Error, S_OK};

/// Keeps the disk pattern apart from the memory pattern of the same numbers.
pub const DISK_SALT: u64 = 0x4449_534b_4449_534b;
const MAX_BLOCKS: usize = (MAX_DISK_MIB as usize) << 8;

/// Generation of each block, 0 = never written (vCPU 0 only).
static mut GENS: [u32; MAX_BLOCKS] = [0; MAX_BLOCKS];

/// What the disk workload did.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    /// Blocks written (status OK).
    pub writes: u64,
    /// Blocks read back (status OK).
    pub reads: u64,
    /// Requests that got an error status.
    pub errors: u64,
    /// Flushes done.
    pub flushes: u64,
}

/// The disk and its workload state.
pub struct Disk {
    blk: Blk,
    /// Blocks the workload uses.
    pub blocks: u64,
    seed: u64,
    flush_every: u64,
    since_flush: u64,
    cursor: u64,
    stride: u64,
    /// Totals so far.
    pub counts: Counts,
}

fn pattern(block: u64, generation: u64, seed: u64, buf: &mut [u8; BLOCK]) {
    let v = mix(block, generation, seed ^ DISK_SALT);
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let word = match i {
            0 => block,
            1 => generation,
            2 => seed,
            _ => v.wrapping_add(i as u64 * STEP),
        };
        w.copy_from_slice(&word.to_le_bytes());
    }
}

fn holds(block: u64, generation: u64, seed: u64, buf: &[u8; BLOCK]) -> bool {
    let v = mix(block, generation, seed ^ DISK_SALT);
    buf.chunks_exact(8).enumerate().all(|(i, w)| {
        let want = match i {
            0 => block,
            1 => generation,
            2 => seed,
            _ => v.wrapping_add(i as u64 * STEP),
        };
        u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) == want
    })
}

fn generation(k: u64) -> u32 {
    // SAFETY: k < blocks <= MAX_BLOCKS, and only vCPU 0 touches GENS.
    unsafe { (&raw const GENS[k as usize]).read_volatile() }
}

fn set_generation(k: u64, g: u32) {
    // SAFETY: as in `generation`.
    unsafe { (&raw mut GENS[k as usize]).write_volatile(g) }
}

impl Disk {
    /// Finds the disk among the command line's devices; `hz` is the TSC rate.
    pub fn open(cfg: &Config, hz: u64) -> Result<Disk, Error> {
        let blk = Blk::probe(&cfg.devices[..cfg.devices_n], hz)?;
        let blocks = (cfg.disk_mib << 8)
            .min(blk.sectors / (BLOCK as u64 / 512))
            .min(MAX_BLOCKS as u64);
        Ok(Disk {
            blk,
            blocks,
            seed: cfg.seed,
            flush_every: cfg.disk_flush,
            since_flush: 0,
            cursor: 0,
            stride: cfg.disk_stride,
            counts: Counts::default(),
        })
    }

    /// The device.
    pub fn blk(&self) -> &Blk {
        &self.blk
    }

    /// Writes the next block at its next generation (and flushes when due).
    pub fn write_next(&mut self) -> Result<(), Error> {
        if self.blocks == 0 {
            return Ok(());
        }
        let k = self.cursor;
        // A stride prime to the blocks visits every one (any odd stride on a power-of-two
        // disk); another visits a subset, each block still checked by its generation.
        self.cursor = (self.cursor + self.stride % self.blocks) % self.blocks;
        let g = generation(k).checked_add(1).unwrap_or(1);
        pattern(k, u64::from(g), self.seed, self.blk.buffer());
        if self.blk.write(k)? == S_OK {
            set_generation(k, g);
            self.counts.writes += 1;
        } else {
            self.counts.errors += 1;
        }
        self.since_flush += 1;
        if self.flush_every > 0 && self.since_flush >= self.flush_every && self.blk.flush {
            self.since_flush = 0;
            if self.blk.flush()? == S_OK {
                self.counts.flushes += 1;
            } else {
                self.counts.errors += 1;
            }
        }
        Ok(())
    }

    /// Reads block `k` back and checks it; `None` when it was never written.
    pub fn check(&mut self, k: u64) -> Result<Option<bool>, Error> {
        let g = generation(k);
        if g == 0 {
            return Ok(None);
        }
        if self.blk.read(k)? != S_OK {
            self.counts.errors += 1;
            return Ok(Some(false));
        }
        self.counts.reads += 1;
        Ok(Some(holds(k, u64::from(g), self.seed, self.blk.buffer())))
    }
}
