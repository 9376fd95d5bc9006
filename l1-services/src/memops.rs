//! Bulk guest-memory operations, done on the host side over [`VmHost::read_memory`] so that a
//! service gets a compact answer (hashes, a bitmap, a list of addresses) instead of pages.

use memchr::memmem;

use crate::error::HostError;
use crate::host::VmHost;
use spanvmm_sdk::Translation;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Largest `count` of one `hash_pages` / `zero_scan` call (1 GiB of guest memory).
pub const MAX_PAGES_PER_CALL: u32 = 1 << 18;
/// Largest number of results one `search` returns.
pub const MAX_SEARCH_RESULTS: u32 = 4096;
/// Longest search pattern.
pub const MAX_PATTERN_LEN: usize = 4096;
/// Largest single read or write a service may ask for.
pub const MAX_TRANSFER: usize = 1 << 20;

/// Pages read per chunk (2 MiB).
const CHUNK_PAGES: u64 = 512;

fn page_span(host: &dyn VmHost, first: u64, count: u32) -> Result<(), HostError> {
    if count > MAX_PAGES_PER_CALL {
        return Err(HostError::Limit(format!(
            "{count} pages in one call exceed the limit of {MAX_PAGES_PER_CALL}"
        )));
    }
    let size = host.info().mem_bytes;
    let end = first
        .checked_add(count as u64)
        .and_then(|e| e.checked_mul(PAGE_SIZE));
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(HostError::OutOfRange {
            gpa: first.saturating_mul(PAGE_SIZE),
            len: count as u64 * PAGE_SIZE,
            size,
        }),
    }
}

/// Calls `f(page_index, page_bytes)` for `count` pages from `first`, reading 2 MiB at a time.
fn for_each_page(
    host: &dyn VmHost,
    first: u64,
    count: u32,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<(), HostError> {
    page_span(host, first, count)?;
    let mut buf = vec![0u8; (CHUNK_PAGES.min(count as u64) * PAGE_SIZE) as usize];
    let mut done = 0u64;
    while done < count as u64 {
        let n = CHUNK_PAGES.min(count as u64 - done);
        let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
        host.read_memory((first + done) * PAGE_SIZE, bytes)?;
        for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            f(done + i as u64, page);
        }
        done += n;
    }
    Ok(())
}

/// XXH3-64 of a page (the hash `hash_pages` reports).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// XXH3-64 of each of `count` pages starting at page `first`.
pub fn hash_pages(host: &dyn VmHost, first: u64, count: u32) -> Result<Vec<u64>, HostError> {
    let mut out = Vec::with_capacity(count as usize);
    for_each_page(host, first, count, |_, page| out.push(page_hash(page)))?;
    Ok(out)
}

fn is_zero(page: &[u8]) -> bool {
    // OR-fold 64-byte blocks: vectorizes well and touches each byte once.
    page.chunks_exact(64).all(|c| {
        c.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

/// Bitmap (bit i of word i/64) of the pages among `count` from `first` that are all zero.
pub fn zero_scan(host: &dyn VmHost, first: u64, count: u32) -> Result<Vec<u64>, HostError> {
    let mut out = vec![0u64; (count as usize).div_ceil(64)];
    for_each_page(host, first, count, |i, page| {
        if is_zero(page) {
            out[(i / 64) as usize] |= 1 << (i % 64);
        }
    })?;
    Ok(out)
}

/// Guest-physical addresses where `pattern` starts within `[start, start + len)` (the match may
/// not run past the end), in increasing order, at most `max_results` (capped at
/// [`MAX_SEARCH_RESULTS`]).
pub fn search(
    host: &dyn VmHost,
    start: u64,
    len: u64,
    pattern: &[u8],
    max_results: u32,
) -> Result<Vec<u64>, HostError> {
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
        return Err(HostError::Limit(format!(
            "search pattern must be 1..={MAX_PATTERN_LEN} bytes, not {}",
            pattern.len()
        )));
    }
    let size = host.info().mem_bytes;
    let end = start
        .checked_add(len)
        .filter(|e| *e <= size)
        .ok_or(HostError::OutOfRange {
            gpa: start,
            len,
            size,
        })?;
    let max = max_results.min(MAX_SEARCH_RESULTS) as usize;
    let finder = memmem::Finder::new(pattern);
    let chunk = 2u64 << 20;
    let overlap = pattern.len() as u64 - 1;
    let mut buf = vec![0u8; (chunk + overlap) as usize];
    let mut out = Vec::new();
    let mut at = start;
    while at < end && out.len() < max {
        let own = chunk.min(end - at);
        let n = (own + overlap).min(end - at);
        let bytes = &mut buf[..n as usize];
        host.read_memory(at, bytes)?;
        for pos in finder.find_iter(bytes) {
            if pos as u64 >= own || out.len() >= max {
                break;
            }
            out.push(at + pos as u64);
        }
        at += own;
    }
    Ok(out)
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// Walks x86-64 4-level page tables rooted at `cr3` for `gva`: 4 KiB, 2 MiB and 1 GiB pages;
/// writable/user/executable are the AND over all levels. A non-present entry at any level gives
/// `present: false`; a table outside guest RAM is an error.
pub fn translate(host: &dyn VmHost, cr3: u64, gva: u64) -> Result<Translation, HostError> {
    let mut table = cr3 & ADDR_MASK;
    let (mut writable, mut user, mut executable) = (true, true, true);
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 0x1ff;
        let mut e = [0u8; 8];
        host.read_memory(table + index * 8, &mut e)?;
        let entry = u64::from_le_bytes(e);
        if entry & P == 0 {
            return Ok(Translation::default());
        }
        writable &= entry & RW != 0;
        user &= entry & US != 0;
        executable &= entry & NX == 0;
        let leaf = level == 0 || ((level == 1 || level == 2) && entry & PS != 0);
        if leaf {
            let page_size = 1u64 << shift;
            let base = entry & ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                present: true,
                gpa: base | (gva & (page_size - 1)),
                page_size,
                writable,
                user,
                executable,
            });
        }
        table = entry & ADDR_MASK;
    }
    Ok(Translation::default())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base_vmm::memory::GuestRam;

    use super::*;
    use crate::host::RamHost;

    fn host(mib: u64) -> RamHost {
        RamHost::new(Arc::new(GuestRam::new(mib << 20).unwrap()), 1, 1_000_000)
    }

    fn put_u64(h: &RamHost, gpa: u64, v: u64) {
        h.write_memory(gpa, &v.to_le_bytes()).unwrap();
    }

    #[test]
    fn hashes_match_page_contents_and_zero_scan_finds_zero_pages() {
        let h = host(4);
        let nonzero = [1u64, 5, 63, 64, 200, 511, 512, 700];
        for &p in &nonzero {
            h.write_memory(p * PAGE_SIZE + (p % 4000), &[p as u8 | 1; 7])
                .unwrap();
        }
        let hashes = hash_pages(&h, 0, 1024).unwrap();
        assert_eq!(hashes.len(), 1024);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in [0u64, 1, 5, 511, 512, 700, 1023] {
            h.read_memory(p * PAGE_SIZE, &mut page).unwrap();
            assert_eq!(
                hashes[p as usize],
                xxhash_rust::xxh3::xxh3_64(&page),
                "page {p}"
            );
        }
        assert_eq!(hashes[0], hashes[2], "zero pages hash alike");
        assert_ne!(hashes[1], hashes[5]);
        // A range not starting at 0 and not a multiple of 64 pages.
        let bits = zero_scan(&h, 3, 700).unwrap();
        assert_eq!(bits.len(), 700usize.div_ceil(64));
        for i in 0..700u64 {
            let zero = bits[(i / 64) as usize] >> (i % 64) & 1 == 1;
            assert_eq!(zero, !nonzero.contains(&(i + 3)), "page {}", i + 3);
        }
        assert!(matches!(
            zero_scan(&h, 1000, 25),
            Err(HostError::OutOfRange { .. })
        ));
        assert!(matches!(
            hash_pages(&h, u64::MAX / 2, 2),
            Err(HostError::OutOfRange { .. })
        ));
        assert!(matches!(
            hash_pages(&h, 0, MAX_PAGES_PER_CALL + 1),
            Err(HostError::Limit(_))
        ));
    }

    #[test]
    fn search_finds_every_match_including_across_chunks_and_at_the_end() {
        let h = host(6);
        let pat = b"SPAN-needle";
        let spots = [
            0x10u64,
            (2 << 20) - 3, // crosses the first 2 MiB chunk boundary
            (4 << 20) - 5,
            (6 << 20) - pat.len() as u64, // ends exactly at the end of RAM
        ];
        for &s in &spots {
            h.write_memory(s, pat).unwrap();
        }
        assert_eq!(search(&h, 0, 6 << 20, pat, 100).unwrap(), spots);
        assert_eq!(search(&h, 0, 6 << 20, pat, 2).unwrap(), &spots[..2]);
        // A match that would run past the searched range is not reported.
        assert_eq!(search(&h, 0, (2 << 20) + 4, pat, 100).unwrap(), &spots[..1]);
        assert_eq!(
            search(&h, 0x11, 0x100, pat, 100).unwrap(),
            Vec::<u64>::new()
        );
        assert!(search(&h, 0, (6 << 20) + 1, pat, 1).is_err());
        assert!(search(&h, 0, 10, b"", 1).is_err());
    }

    #[test]
    fn page_table_walk_handles_4k_2m_1g_flags_and_holes() {
        let h = host(16);
        let (pml4, pdpt, pd, pt, pt_ro) = (0x1000u64, 0x2000, 0x3000, 0x4000, 0x5000);
        const P: u64 = 1;
        const RW: u64 = 2;
        const US: u64 = 4;
        const PSZ: u64 = 0x80;
        const XD: u64 = 1 << 63;
        put_u64(&h, pml4, pdpt | P | RW | US);
        put_u64(&h, pml4 + 8, 0x1_0000_0000 | P | RW); // next level outside RAM
        put_u64(&h, pdpt, pd | P | RW | US);
        put_u64(&h, pdpt + 8, 0x4000_0000 | P | RW | PSZ | XD); // 1 GiB page, kernel, NX
        put_u64(&h, pd + 2 * 8, pt | P | RW | US);
        put_u64(&h, pd + 3 * 8, 0x20_0000 | P | RW | PSZ); // 2 MiB page, kernel
        put_u64(&h, pd + 5 * 8, pt_ro | P | US); // read-only table
        put_u64(&h, pt + 8, 0x9000 | P | RW | US);
        put_u64(&h, pt_ro + 8, 0xa000 | P | RW | US);
        let cr3 = pml4 | 0x18; // PCD/PWT bits are ignored

        let t = translate(&h, cr3, 0x40_1abc).unwrap();
        assert_eq!(
            t,
            Translation {
                present: true,
                gpa: 0x9abc,
                page_size: 4096,
                writable: true,
                user: true,
                executable: true
            }
        );
        let t = translate(&h, cr3, 0x60_1234).unwrap();
        assert_eq!((t.present, t.gpa, t.page_size), (true, 0x20_1234, 2 << 20));
        assert!(t.writable && !t.user && t.executable);
        let t = translate(&h, cr3, 0x4000_5678).unwrap();
        assert_eq!(
            (t.present, t.gpa, t.page_size),
            (true, 0x4000_5678, 1 << 30)
        );
        assert!(!t.user && !t.executable);
        let t = translate(&h, cr3, 0xa0_1000).unwrap();
        assert_eq!((t.present, t.gpa), (true, 0xa000));
        assert!(!t.writable && t.user, "read-only at the PD level");
        assert!(
            !translate(&h, cr3, 0x80_0000).unwrap().present,
            "hole in the PD"
        );
        assert!(
            !translate(&h, cr3, 0x40_0000).unwrap().present,
            "hole in the PT"
        );
        assert!(matches!(
            translate(&h, cr3, 0x80_0000_0000),
            Err(HostError::OutOfRange { .. })
        ));
        assert!(
            translate(&h, 0x7fff_f000_0000, 0).is_err(),
            "CR3 outside RAM"
        );
    }
}
