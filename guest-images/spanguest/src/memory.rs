//! Where the workload's memory goes, and the page patterns `verify` checks.
//!
//! Layout, in RAM above the image, each part 2 MiB aligned:
//! `[generation array: one u32 per page][shared][work set][rest of the unique region]`.
//! Data pages are numbered by *index* from the start of the shared region.

use crate::config::{Config, DIRTY, SHARED};

const MIB: u64 = 1 << 20;
const ALIGN: u64 = 2 * MIB;
/// 64-bit words in a 4 KiB page.
pub const WORDS: usize = 512;
/// Step between consecutive words of a page's pattern.
pub const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
/// Seed of the shared region: the same in every VM.
pub const SHARED_SEED: u64 = 0x5350_414e_5348_5244;
/// E820 / hvm_memmap type of usable RAM.
const RAM: u32 = 1;

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Where everything is. Computed by vCPU 0, read by all.
#[derive(Clone, Copy)]
pub struct Layout {
    /// GPA of the generation array (`u32` per data page; 0 = never written).
    pub gen_base: u64,
    /// GPA of data page 0.
    pub data_base: u64,
    /// Data pages in all (`mib` × 256).
    pub pages: u64,
    /// Pages 0..shared are the shared region.
    pub shared: u64,
    /// Pages shared..shared + work are the working set `dirty` rewrites.
    pub work: u64,
    /// Usable RAM in the memory map, MiB.
    pub ram_mib: u64,
}

/// One entry of `hvm_start_info`'s memory map.
#[derive(Clone, Copy)]
pub struct MapEntry {
    /// Start GPA.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = RAM.
    pub kind: u32,
}

/// Places the workload's memory in the first RAM range above `image_end` that holds it.
/// `limit` is the end of the identity map. The error is the line to print.
pub fn plan(
    cfg: &Config,
    map: &[MapEntry],
    image_end: u64,
    limit: u64,
) -> Result<Layout, &'static str> {
    let pages = cfg.mib * 256;
    let shared = if cfg.has(SHARED) {
        cfg.shared_mib.unwrap_or(cfg.mib / 2) * 256
    } else {
        0
    };
    let unique = pages - shared;
    let work = if cfg.has(DIRTY) {
        cfg.wss.map_or(unique, |w| (w * 256).min(unique))
    } else {
        0
    };
    let gen_bytes = align_up(pages * 4);
    let need = gen_bytes + pages * 4096;
    let gen_base = map
        .iter()
        .filter(|e| e.kind == RAM)
        .map(|e| {
            (
                align_up(e.addr.max(image_end)),
                e.addr.saturating_add(e.size).min(limit),
            )
        })
        .find(|&(start, end)| start.checked_add(need).is_some_and(|top| top <= end))
        .map(|(start, _)| start)
        .ok_or("the workload's memory does not fit in RAM above the image")?;
    Ok(Layout {
        gen_base,
        data_base: gen_base + gen_bytes,
        pages,
        shared,
        work,
        ram_mib: ram_mib(map),
    })
}

/// Usable RAM in the memory map, MiB.
pub fn ram_mib(map: &[MapEntry]) -> u64 {
    map.iter()
        .filter(|e| e.kind == RAM)
        .map(|e| e.size)
        .sum::<u64>()
        / MIB
}

/// The seed of page `p` (a guest-physical page number, or an index for shared pages) at
/// generation `g`: splitmix64's finalizer over the three inputs.
pub fn mix(p: u64, g: u64, seed: u64) -> u64 {
    let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ g.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ seed.wrapping_mul(0x1656_67b1_9e37_79f9);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes words `from..to` of `page` with the pattern starting at `s` (word i = s + i × STEP).
///
/// # Safety
/// `page` must point to a mapped 4 KiB page this vCPU owns.
pub unsafe fn fill(page: *mut u64, from: usize, to: usize, s: u64) {
    let mut v = s.wrapping_add((from as u64).wrapping_mul(STEP));
    for i in from..to {
        // SAFETY: i < WORDS and the caller owns the page. Volatile: the VMM reads this memory.
        unsafe { page.add(i).write_volatile(v) };
        v = v.wrapping_add(STEP);
    }
}

/// Whether words `from..to` of `page` hold the pattern starting at `s`.
///
/// # Safety
/// As for [`fill`].
pub unsafe fn holds(page: *const u64, from: usize, to: usize, s: u64) -> bool {
    let mut v = s.wrapping_add((from as u64).wrapping_mul(STEP));
    let mut diff = 0;
    for i in from..to {
        // SAFETY: as in `fill`. Volatile: the VMM may have replaced the page under us.
        diff |= unsafe { page.add(i).read_volatile() } ^ v;
        v = v.wrapping_add(STEP);
    }
    diff == 0
}
