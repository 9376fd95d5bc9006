//! CloudNet's memory-side encodings: the `cnet` page codec (codec 1 of a `pages` frame).
//!
//! - **Content-based redundancy elimination**: each page is split into `blocks` fixed-size
//!   blocks; the source keeps an LRU cache of blocks the destination holds, keyed by a hash of
//!   their content (checked byte for byte on a hit, so a hash collision never sends the wrong
//!   bytes). A hit goes as the 32-bit slot number, a miss as the block and the slot to keep it
//!   in. The *source* picks every slot (its LRU victim) and names it on the wire, so the
//!   destination's cache is a plain table that follows the stream: both ends agree by
//!   construction, whatever either end's cache policy, and a reference to a slot the
//!   destination never filled (or filled with a block of another size) is a protocol error.
//! - **Page deltas**: the source also keeps (LRU) the last bytes it sent of each page; a page
//!   sent again goes as the XOR against that copy, run-length encoded, when that is smaller.
//!   The destination's copy of that page is the page itself in guest memory (pre-copy frames
//!   are applied in order), so it keeps nothing extra; a delta for a page it does not hold is
//!   a protocol error.
//!
//! Encoding of each present, non-zero page of the frame, in page order:
//!
//! | tag u8 | then |
//! |---|---|
//! | 0 raw | 4096 bytes |
//! | 1 blocks | n u8 (1, 2, 4, 8 or 16); n × (kind u8: 0 new = slot u32 + 4096/n bytes, 1 ref = slot u32) |
//! | 2 delta | length u16; runs (zeros u16, literals u16, literal bytes) covering exactly 4096 bytes |

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::wire::PAGE;

const PAGE_RAW: u8 = 0;
const PAGE_BLOCKS: u8 = 1;
const PAGE_DELTA: u8 = 2;
const BLOCK_NEW: u8 = 0;
const BLOCK_REF: u8 = 1;

/// Largest redundancy cache either end keeps, bytes (the destination refuses more).
pub const MAX_CACHE_BYTES: u64 = 1 << 30;
/// Cache slots the destination accepts.
pub const MAX_SLOTS: u32 = 1 << 20;

/// What is wrong with the encoding options or with a page's encoding.
#[derive(Debug, thiserror::Error)]
pub enum CnetError {
    /// Blocks per page outside 1, 2, 4, 8, 16.
    #[error("blocks per page must be 1, 2, 4, 8 or 16, not {0}")]
    Blocks(u32),
    /// A cache size outside 4 KiB to `MAX_CACHE_BYTES`.
    #[error("cache of {bytes} bytes: must be 4 KiB to {} MiB", MAX_CACHE_BYTES >> 20)]
    CacheSize {
        /// The size asked for.
        bytes: u64,
    },
    /// A page's encoding ends early.
    #[error("cnet page data is truncated")]
    Truncated,
    /// A page split into a refused number of blocks.
    #[error("page {page}: {n} blocks per page (1, 2, 4, 8 or 16)")]
    BlockCount {
        /// Page number.
        page: u64,
        /// Blocks.
        n: usize,
    },
    /// A slot number past `MAX_SLOTS`.
    #[error("page {page}: cache slot {slot} is beyond the {MAX_SLOTS} slots accepted")]
    SlotRange {
        /// Page number.
        page: u64,
        /// Slot.
        slot: u32,
    },
    /// The source's cache outgrows `MAX_CACHE_BYTES`.
    #[error("the source's cache grows beyond {} MiB", MAX_CACHE_BYTES >> 20)]
    CacheOverflow,
    /// A reference to a slot holding a block of another size.
    #[error("page {page}: a reference to cache slot {slot}, which holds a {held}-byte block, for a {size}-byte block")]
    SlotSize {
        /// Page number.
        page: u64,
        /// Slot.
        slot: u32,
        /// Size of the block held.
        held: usize,
        /// Size asked for.
        size: usize,
    },
    /// A reference to a slot never filled.
    #[error("page {page}: a reference to cache slot {slot}, which this destination does not hold")]
    SlotMissing {
        /// Page number.
        page: u64,
        /// Slot.
        slot: u32,
    },
    /// An unknown block kind.
    #[error("page {page}: unknown block kind {kind}")]
    BlockKind {
        /// Page number.
        page: u64,
        /// Kind byte.
        kind: u8,
    },
    /// A delta with no page to apply it to.
    #[error("page {page}: a delta against {why}")]
    NoBase {
        /// Page number.
        page: u64,
        /// Why there is none.
        why: NoBase,
    },
    /// A delta run past the page's end (or an empty run).
    #[error("page {0}: a delta run overruns the page")]
    DeltaOverrun(u64),
    /// A delta that does not cover the page.
    #[error("page {page}: a delta covers {covered} of {PAGE} bytes")]
    DeltaShort {
        /// Page number.
        page: u64,
        /// Bytes covered.
        covered: usize,
    },
    /// An unknown page encoding.
    #[error("page {page}: unknown page encoding {kind}")]
    PageKind {
        /// Page number.
        page: u64,
        /// Encoding byte.
        kind: u8,
    },
}

/// Why the destination has no copy of a page to apply a delta to.
#[derive(Debug, thiserror::Error)]
pub enum NoBase {
    /// It never received the page.
    #[error("a page this destination does not hold")]
    NotHeld,
    /// Its copy could not be read.
    #[error("reading guest memory: {0}")]
    Read(#[from] std::io::Error),
}

/// Which encodings a migration uses (set by the migration service before the first page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoding {
    /// Content-based redundancy elimination.
    pub redundancy: bool,
    /// XOR + run-length deltas of pages sent before.
    pub deltas: bool,
    /// Size of each cache (the block cache, and the page cache of deltas), bytes.
    pub cache_bytes: u64,
    /// Blocks per page for redundancy elimination: 1, 2, 4, 8 or 16.
    pub blocks: u32,
}

impl Encoding {
    /// Checks the options.
    pub fn check(&self) -> Result<(), CnetError> {
        if ![1, 2, 4, 8, 16].contains(&self.blocks) {
            return Err(CnetError::Blocks(self.blocks));
        }
        if self.cache_bytes < PAGE as u64 || self.cache_bytes > MAX_CACHE_BYTES {
            return Err(CnetError::CacheSize {
                bytes: self.cache_bytes,
            });
        }
        Ok(())
    }
}

/// What the encodings did in one pre-copy round (the stop-and-copy is the round after the
/// last pre-copy one).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundStats {
    /// Data pages encoded (zero pages are markers, not counted).
    pub pages: u64,
    /// Of which sent as deltas.
    pub delta_pages: u64,
    /// Of which every block was a cache hit.
    pub hit_pages: u64,
    /// Bytes those pages took on the wire (before TLS).
    pub bytes: u64,
}

/// Counters for the migration report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EncodingStats {
    /// The options in force.
    pub redundancy: bool,
    /// Deltas on.
    pub deltas: bool,
    /// Cache size, bytes.
    pub cache_bytes: u64,
    /// Blocks per page.
    pub blocks: u32,
    /// Blocks found in the cache (sent as a reference).
    pub cache_hits: u64,
    /// Blocks not found (sent, and cached at both ends).
    pub cache_misses: u64,
    /// Page bytes the references replaced, less their size.
    pub cache_bytes_saved: u64,
    /// Pages sent as deltas.
    pub delta_pages: u64,
    /// Page bytes the deltas replaced, less their size.
    pub delta_bytes_saved: u64,
    /// Data pages encoded.
    pub pages: u64,
    /// Bytes they took (raw would be `pages` × 4096).
    pub bytes: u64,
    /// Pages sent again with the page cache holding their last-sent copy (deltas on).
    #[serde(default)]
    pub resent_pages: u64,
    /// Bytes those pages took.
    #[serde(default)]
    pub resent_bytes: u64,
    /// Bytes the deltas alone (no redundancy cache) would have sent for them: the encodings
    /// together must never cost more (`resent_bytes <= resent_deltas_alone_bytes`).
    #[serde(default)]
    pub resent_deltas_alone_bytes: u64,
    /// Per round, from round 1.
    pub per_round: Vec<RoundStats>,
}

const NIL: u32 = u32::MAX;

/// A least-recently-used order over slot numbers (an intrusive doubly linked list).
#[derive(Default)]
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Lru {
    fn new() -> Self {
        Lru {
            head: NIL,
            tail: NIL,
            ..Default::default()
        }
    }
    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.prev[i as usize], self.next[i as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
    }
    fn push_front(&mut self, i: u32) {
        if self.prev.len() <= i as usize {
            self.prev.resize(i as usize + 1, NIL);
            self.next.resize(i as usize + 1, NIL);
        }
        self.prev[i as usize] = NIL;
        self.next[i as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }
    fn pop_back(&mut self) -> Option<u32> {
        let t = self.tail;
        (t != NIL).then(|| {
            self.unlink(t);
            t
        })
    }
}

fn hash(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// The source's block cache: what the destination's slot table holds, and an index by content.
struct BlockCache {
    size: usize,
    cap: u32,
    data: Vec<u8>,
    hashes: Vec<u64>,
    index: HashMap<u64, u32>,
    lru: Lru,
}

impl BlockCache {
    fn new(size: usize, cache_bytes: u64) -> Self {
        BlockCache {
            size,
            cap: ((cache_bytes / size as u64) as u32).clamp(1, MAX_SLOTS),
            data: Vec::new(),
            hashes: Vec::new(),
            index: HashMap::new(),
            lru: Lru::new(),
        }
    }

    fn slot(&self, s: u32) -> &[u8] {
        &self.data[s as usize * self.size..(s as usize + 1) * self.size]
    }

    /// `Ok(slot)` on a hit; on a miss the block is cached and `Err(slot)` says where.
    fn lookup(&mut self, block: &[u8]) -> Result<u32, u32> {
        let h = hash(block);
        if let Some(&s) = self.index.get(&h) {
            if self.slot(s) == block {
                self.lru.touch(s);
                return Ok(s);
            }
        }
        let used = self.hashes.len() as u32;
        let s = if used < self.cap {
            self.data.extend_from_slice(block);
            self.hashes.push(h);
            used
        } else {
            let s = self.lru.pop_back().expect("a full cache has a victim");
            let old = self.hashes[s as usize];
            if self.index.get(&old) == Some(&s) {
                self.index.remove(&old);
            }
            let at = s as usize * self.size;
            self.data[at..at + self.size].copy_from_slice(block);
            self.hashes[s as usize] = h;
            s
        };
        self.index.insert(h, s);
        self.lru.push_front(s);
        Err(s)
    }
}

/// The source's copies of the pages it sent last (for deltas).
struct PageCache {
    cap: u32,
    data: Vec<u8>,
    page_of: Vec<u64>,
    index: HashMap<u64, u32>,
    free: Vec<u32>,
    lru: Lru,
}

impl PageCache {
    fn new(cache_bytes: u64) -> Self {
        PageCache {
            cap: ((cache_bytes / PAGE as u64) as u32).max(1),
            data: Vec::new(),
            page_of: Vec::new(),
            index: HashMap::new(),
            free: Vec::new(),
            lru: Lru::new(),
        }
    }

    fn get(&self, p: u64) -> Option<&[u8]> {
        let &s = self.index.get(&p)?;
        Some(&self.data[s as usize * PAGE..(s as usize + 1) * PAGE])
    }

    fn put(&mut self, p: u64, bytes: &[u8]) {
        let s = if let Some(&s) = self.index.get(&p) {
            self.lru.touch(s);
            s
        } else {
            let s = if let Some(s) = self.free.pop() {
                s
            } else if (self.page_of.len() as u32) < self.cap {
                self.data.resize(self.data.len() + PAGE, 0);
                self.page_of.push(p);
                self.page_of.len() as u32 - 1
            } else {
                let s = self.lru.pop_back().expect("a full cache has a victim");
                self.index.remove(&self.page_of[s as usize]);
                s
            };
            self.page_of[s as usize] = p;
            self.index.insert(p, s);
            self.lru.push_front(s);
            s
        };
        self.data[s as usize * PAGE..(s as usize + 1) * PAGE].copy_from_slice(bytes);
    }

    fn remove(&mut self, p: u64) {
        if let Some(s) = self.index.remove(&p) {
            self.lru.unlink(s);
            self.free.push(s);
        }
    }
}

/// XOR of `a` and `b`, run-length encoded into `out` (cleared first); `None` once it would
/// exceed `limit` bytes.
fn delta(a: &[u8], b: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let x = |i: usize| a[i] ^ b[i];
    let n = a.len();
    let mut i = 0;
    while i < n {
        let z0 = i;
        while i < n && x(i) == 0 {
            i += 1;
        }
        let zeros = i - z0;
        let l0 = i;
        // A literal run ends where 4 zero bytes in a row start (a run header costs 4).
        while i < n {
            if x(i) == 0 && (i + 4 > n || (i..i + 4).all(|k| x(k) == 0)) {
                break;
            }
            i += 1;
        }
        let lits = i - l0;
        if out.len() + 4 + lits > limit {
            return None;
        }
        out.extend_from_slice(&(zeros as u16).to_le_bytes());
        out.extend_from_slice(&(lits as u16).to_le_bytes());
        out.extend((l0..i).map(x));
    }
    Some(())
}

/// The source's encoder.
pub struct Encoder {
    enc: Encoding,
    blocks: Option<BlockCache>,
    pages: Option<PageCache>,
    stats: EncodingStats,
    scratch: Vec<u8>,
}

impl Encoder {
    /// An encoder with empty caches (checked options).
    pub fn new(enc: Encoding) -> Result<Self, CnetError> {
        enc.check()?;
        Ok(Encoder {
            blocks: enc
                .redundancy
                .then(|| BlockCache::new(PAGE / enc.blocks as usize, enc.cache_bytes)),
            pages: enc.deltas.then(|| PageCache::new(enc.cache_bytes)),
            stats: EncodingStats {
                redundancy: enc.redundancy,
                deltas: enc.deltas,
                cache_bytes: enc.cache_bytes,
                blocks: enc.blocks,
                ..Default::default()
            },
            enc,
            scratch: Vec::with_capacity(PAGE),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> &EncodingStats {
        &self.stats
    }

    /// Page `p` went as a zero marker: the destination dropped its copy.
    pub fn zero(&mut self, p: u64) {
        if let Some(c) = &mut self.pages {
            c.remove(p);
        }
    }

    /// Appends the encoding of page `p` (non-zero, `page` a stable copy of it) to `out`,
    /// counted into `round` (1-based).
    ///
    /// A page sent for the first time goes as cached blocks (redundancy on: the cache learns
    /// it) or raw. A page sent again goes as the smallest of: its delta against the copy sent
    /// last, its blocks when some are in the cache (its current content, or part of it, is
    /// held), raw. Not as blocks that all miss: those cost more than raw, and the rewritten
    /// content would push out of the LRU blocks that may still hit. So with both encodings
    /// on, a re-sent page never costs more than with the deltas alone.
    pub fn encode(&mut self, p: u64, page: &[u8], round: u32, out: &mut Vec<u8>) {
        const RAW: usize = 1 + PAGE;
        let start = out.len();
        // The size of the blocks encoding and whether any block hits, probed without
        // touching the cache.
        let probe = self.blocks.as_ref().map(|c| {
            let bs = c.size;
            let mut hits = 0;
            let size = 2 + page
                .chunks(bs)
                .map(|b| match c.index.get(&hash(b)) {
                    Some(&s) if c.slot(s) == b => {
                        hits += 1;
                        5
                    }
                    _ => 5 + bs,
                })
                .sum::<usize>();
            (size, hits > 0)
        });
        let prev = self.pages.as_ref().and_then(|c| c.get(p));
        let resent = prev.is_some();
        // What a re-sent page costs without the deltas: blocks only when some hit.
        let plain = match probe {
            Some((size, any_hit)) if any_hit || !resent => size,
            _ => RAW,
        };
        let mut is_delta = false;
        let mut alone = RAW;
        if let Some(prev) = prev {
            // Worth it only when smaller than what would go otherwise (a delta's header is
            // 3 bytes; deltas alone compare with raw).
            let limit = plain.min(RAW).saturating_sub(4);
            if delta(prev, page, limit, &mut self.scratch).is_some() {
                alone = 3 + self.scratch.len();
                if alone < plain {
                    out.push(PAGE_DELTA);
                    out.extend_from_slice(&(self.scratch.len() as u16).to_le_bytes());
                    out.extend_from_slice(&self.scratch);
                    is_delta = true;
                }
            } else if plain < RAW {
                // Smaller than the blocks (which beat raw): what deltas alone would send.
                if delta(prev, page, RAW - 4, &mut self.scratch).is_some() {
                    alone = 3 + self.scratch.len();
                }
            }
        }
        let mut all_hit = false;
        if !is_delta {
            match &mut self.blocks {
                Some(c) if plain < RAW || !resent => {
                    out.extend_from_slice(&[PAGE_BLOCKS, self.enc.blocks as u8]);
                    all_hit = true;
                    for b in page.chunks(c.size) {
                        match c.lookup(b) {
                            Ok(s) => {
                                out.push(BLOCK_REF);
                                out.extend_from_slice(&s.to_le_bytes());
                                self.stats.cache_hits += 1;
                                self.stats.cache_bytes_saved += (c.size - 5) as u64;
                            }
                            Err(s) => {
                                out.push(BLOCK_NEW);
                                out.extend_from_slice(&s.to_le_bytes());
                                out.extend_from_slice(b);
                                self.stats.cache_misses += 1;
                                all_hit = false;
                            }
                        }
                    }
                }
                _ => {
                    out.push(PAGE_RAW);
                    out.extend_from_slice(page);
                }
            }
        }
        if let Some(c) = &mut self.pages {
            c.put(p, page);
        }
        let len = (out.len() - start) as u64;
        let s = &mut self.stats;
        if is_delta {
            s.delta_pages += 1;
            s.delta_bytes_saved += (PAGE as u64).saturating_sub(len);
        }
        if resent {
            s.resent_pages += 1;
            s.resent_bytes += len;
            s.resent_deltas_alone_bytes += alone as u64;
        }
        s.pages += 1;
        s.bytes += len;
        let i = round.max(1) as usize - 1;
        if s.per_round.len() <= i {
            s.per_round.resize(i + 1, RoundStats::default());
        }
        let r = &mut s.per_round[i];
        r.pages += 1;
        r.delta_pages += is_delta as u64;
        r.hit_pages += all_hit as u64;
        r.bytes += len;
    }
}

/// The destination's decoder: the slot table the source fills and refers to.
#[derive(Default)]
pub struct Decoder {
    slots: Vec<Option<Box<[u8]>>>,
    bytes: u64,
}

/// Reads `n` bytes off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], CnetError> {
    if data.len() < n {
        return Err(CnetError::Truncated);
    }
    let (h, t) = data.split_at(n);
    *data = t;
    Ok(h)
}

fn u16_at(data: &mut &[u8]) -> Result<u16, CnetError> {
    Ok(u16::from_le_bytes(take(data, 2)?.try_into().expect("2")))
}

fn u32_at(data: &mut &[u8]) -> Result<u32, CnetError> {
    Ok(u32::from_le_bytes(take(data, 4)?.try_into().expect("4")))
}

impl Decoder {
    /// Decodes one page of page number `p` off the front of `data` into `out`. `current`
    /// fills `out` with the destination's copy of the page (for a delta), or says why it has
    /// none.
    pub fn decode_page(
        &mut self,
        p: u64,
        data: &mut &[u8],
        current: &mut dyn FnMut(&mut [u8]) -> Result<(), NoBase>,
        out: &mut [u8],
    ) -> Result<(), CnetError> {
        match take(data, 1)?[0] {
            PAGE_RAW => out.copy_from_slice(take(data, PAGE)?),
            PAGE_BLOCKS => {
                let n = take(data, 1)?[0] as usize;
                if ![1, 2, 4, 8, 16].contains(&n) {
                    return Err(CnetError::BlockCount { page: p, n });
                }
                let size = PAGE / n;
                for b in out.chunks_mut(size) {
                    let kind = take(data, 1)?[0];
                    let s = u32_at(data)?;
                    if s >= MAX_SLOTS {
                        return Err(CnetError::SlotRange { page: p, slot: s });
                    }
                    match kind {
                        BLOCK_NEW => {
                            let bytes = take(data, size)?;
                            b.copy_from_slice(bytes);
                            if self.slots.len() <= s as usize {
                                self.slots.resize(s as usize + 1, None);
                            }
                            let old = self.slots[s as usize].as_ref().map_or(0, |o| o.len());
                            self.bytes = self.bytes - old as u64 + size as u64;
                            if self.bytes > MAX_CACHE_BYTES {
                                return Err(CnetError::CacheOverflow);
                            }
                            self.slots[s as usize] = Some(bytes.into());
                        }
                        BLOCK_REF => match self.slots.get(s as usize).and_then(|o| o.as_ref()) {
                            Some(held) if held.len() == size => b.copy_from_slice(held),
                            Some(held) => {
                                return Err(CnetError::SlotSize {
                                    page: p,
                                    slot: s,
                                    held: held.len(),
                                    size,
                                })
                            }
                            None => return Err(CnetError::SlotMissing { page: p, slot: s }),
                        },
                        k => return Err(CnetError::BlockKind { page: p, kind: k }),
                    }
                }
            }
            PAGE_DELTA => {
                let len = u16_at(data)? as usize;
                let mut rle = take(data, len)?;
                current(out).map_err(|why| CnetError::NoBase { page: p, why })?;
                let mut i = 0;
                while !rle.is_empty() {
                    let zeros = u16_at(&mut rle)? as usize;
                    let lits = u16_at(&mut rle)? as usize;
                    let lit = take(&mut rle, lits)?;
                    if zeros + lits == 0 || i + zeros + lits > PAGE {
                        return Err(CnetError::DeltaOverrun(p));
                    }
                    i += zeros;
                    for (o, l) in out[i..i + lits].iter_mut().zip(lit) {
                        *o ^= l;
                    }
                    i += lits;
                }
                if i != PAGE {
                    return Err(CnetError::DeltaShort {
                        page: p,
                        covered: i,
                    });
                }
            }
            t => return Err(CnetError::PageKind { page: p, kind: t }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        (0..PAGE)
            .map(|i| {
                (xxhash_rust::xxh3::xxh3_64(
                    &[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat(),
                ) & 0xff) as u8
            })
            .collect()
    }

    /// Round-trips pages through an encoder and a decoder; the destination's guest memory is
    /// a map of page number to bytes.
    fn run(enc: Encoding, seq: &[(u64, Vec<u8>)]) -> (EncodingStats, usize) {
        let mut e = Encoder::new(enc).unwrap();
        let mut d = Decoder::default();
        let mut mem: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut wire = 0;
        for (round, (p, bytes)) in seq.iter().enumerate() {
            let mut out = Vec::new();
            e.encode(*p, bytes, round as u32 + 1, &mut out);
            wire += out.len();
            let mut data = &out[..];
            let mut got = vec![0u8; PAGE];
            let held = mem.get(p).cloned();
            d.decode_page(
                *p,
                &mut data,
                &mut |o| {
                    o.copy_from_slice(held.as_ref().ok_or(NoBase::NotHeld)?);
                    Ok(())
                },
                &mut got,
            )
            .unwrap();
            assert!(data.is_empty());
            assert_eq!(&got, bytes, "page {p}");
            mem.insert(*p, got);
        }
        (e.stats().clone(), wire)
    }

    fn opts(redundancy: bool, deltas: bool, cache_bytes: u64) -> Encoding {
        Encoding {
            redundancy,
            deltas,
            cache_bytes,
            blocks: 4,
        }
    }

    #[test]
    fn repeated_content_goes_as_references_and_evictions_stay_in_step() {
        // Eight distinct pages cycling through a cache of 3 pages' blocks: every eviction
        // must leave the destination's table exactly where the source thinks it is.
        let seq: Vec<_> = (0..64).map(|i| (i, page(i % 8))).collect();
        let (s, _) = run(opts(true, false, 3 * PAGE as u64), &seq);
        assert_eq!(s.cache_hits + s.cache_misses, 64 * 4);
        // A large cache: only the first of each content misses.
        let (s, wire) = run(opts(true, false, 1 << 20), &seq);
        assert_eq!(s.cache_misses, 8 * 4);
        assert_eq!(s.cache_hits, 56 * 4);
        assert!(wire < 9 * PAGE + 56 * 30, "{wire}");
        // Sub-page blocks: a page made of two known halves hits.
        let (a, b) = (page(100), page(200));
        let mixed: Vec<u8> = a[..PAGE / 2]
            .iter()
            .chain(&b[PAGE / 2..])
            .copied()
            .collect();
        let (s, _) = run(opts(true, false, 1 << 20), &[(0, a), (1, b), (2, mixed)]);
        assert_eq!((s.cache_hits, s.cache_misses), (4, 8));
    }

    #[test]
    fn partial_writes_go_as_small_deltas() {
        let a = page(1);
        let mut b = a.clone();
        b[..64].copy_from_slice(&page(2)[..64]);
        let mut c = b.clone();
        c[4000..4010].fill(0x55);
        let (s, wire) = run(
            opts(false, true, 1 << 20),
            &[(7, a.clone()), (7, b.clone()), (7, c), (8, a.clone())],
        );
        assert_eq!(s.delta_pages, 2);
        assert!(wire < 3 * (PAGE + 1) + 200, "{wire}");
        assert_eq!(s.per_round[1].delta_pages, 1);
        // A whole-page change is not a delta (it would be larger).
        let (s, _) = run(opts(false, true, 1 << 20), &[(7, a), (7, page(3))]);
        assert_eq!(s.delta_pages, 0);
        // Both together, and a cache of one page: the delta needs the page still cached.
        let (s, _) = run(
            opts(true, true, PAGE as u64),
            &[(1, page(4)), (2, page(5)), (1, b)],
        );
        assert_eq!(s.delta_pages, 0);
    }

    #[test]
    fn together_a_resent_page_never_costs_more_than_with_deltas_alone() {
        // Round 1 sends 64 pages (every 8th a copy of page 0); the rounds after rewrite
        // some in full, some by a few bytes, copy others' content, leave some unchanged.
        let mut seq: Vec<(u64, Vec<u8>)> = (0..64)
            .map(|i| (i, page(if i % 8 == 0 { 0 } else { i })))
            .collect();
        let mut rounds = vec![1u32; 64];
        let mut mem: Vec<Vec<u8>> = seq.iter().map(|(_, b)| b.clone()).collect();
        for round in 2..6u64 {
            for i in 0..64u64 {
                let b = &mut mem[i as usize];
                match (i + round) % 5 {
                    0 => *b = page(1000 * round + i),
                    1 => b[(i as usize * 8) % 4000..][..40].fill(round as u8),
                    2 => *b = page(i % 7 + 1),
                    3 => {}
                    _ => continue,
                }
                seq.push((i, b.clone()));
                rounds.push(round as u32);
            }
        }
        let encode = |enc: Encoding| {
            let mut e = Encoder::new(enc).unwrap();
            let mut d = Decoder::default();
            let mut held: HashMap<u64, Vec<u8>> = HashMap::new();
            for ((p, bytes), &round) in seq.iter().zip(&rounds) {
                let mut out = Vec::new();
                e.encode(*p, bytes, round, &mut out);
                let mut got = vec![0u8; PAGE];
                let base = held.get(p).cloned();
                d.decode_page(
                    *p,
                    &mut &out[..],
                    &mut |o| {
                        o.copy_from_slice(base.as_ref().ok_or(NoBase::NotHeld)?);
                        Ok(())
                    },
                    &mut got,
                )
                .unwrap();
                assert_eq!(&got, bytes);
                held.insert(*p, got);
            }
            e.stats().clone()
        };
        let all = encode(opts(true, true, 1 << 20));
        let deltas = encode(opts(false, true, 1 << 20));
        assert_eq!(all.resent_pages, deltas.resent_pages);
        assert!(all.resent_pages > 100, "{all:?}");
        // The deltas-alone figure is exact: the page cache does not depend on the blocks.
        assert_eq!(all.resent_deltas_alone_bytes, deltas.resent_bytes);
        assert_eq!(deltas.resent_deltas_alone_bytes, deltas.resent_bytes);
        assert!(
            all.resent_bytes < deltas.resent_bytes,
            "{all:?}\n{deltas:?}"
        );
        for (a, d) in all.per_round[1..].iter().zip(&deltas.per_round[1..]) {
            assert!(a.bytes <= d.bytes, "{a:?} against {d:?}");
        }
        // Copies of cached content still go as references, rewrites as deltas or raw.
        assert!(all.cache_hits > 0 && all.delta_pages > 0, "{all:?}");
    }

    #[test]
    fn unresolvable_references_are_refused() {
        let mut d = Decoder::default();
        let mut out = vec![0u8; PAGE];
        let mut none = |_: &mut [u8]| -> Result<(), NoBase> { Err(NoBase::NotHeld) };
        let bad_ref = [PAGE_BLOCKS, 1, BLOCK_REF, 5, 0, 0, 0];
        let e = d
            .decode_page(3, &mut &bad_ref[..], &mut none, &mut out)
            .unwrap_err();
        assert!(matches!(e, CnetError::SlotMissing { .. }), "{e}");
        let mut wide = vec![PAGE_BLOCKS, 2, BLOCK_NEW, 0, 0, 0, 0];
        wide.extend_from_slice(&[1; PAGE / 2]);
        wide.extend_from_slice(&[BLOCK_REF, 0, 0, 0, 0]);
        d.decode_page(3, &mut &wide[..], &mut none, &mut out)
            .unwrap();
        let narrow = [PAGE_BLOCKS, 4, BLOCK_REF, 0, 0, 0, 0];
        let e = d
            .decode_page(3, &mut &narrow[..], &mut none, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("-byte block"), "{e}");
        let delta = [PAGE_DELTA, 4, 0, 0, 16, 0, 0];
        let e = d
            .decode_page(3, &mut &delta[..], &mut none, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("does not hold"), "{e}");
        let mut held = |o: &mut [u8]| -> Result<(), NoBase> {
            o.fill(0);
            Ok(())
        };
        // Against a held page the same delta (4096 unchanged bytes) is fine.
        d.decode_page(3, &mut &delta[..], &mut held, &mut out)
            .unwrap();
        for bad in [
            &[PAGE_DELTA, 4, 0, 0xff, 0xff, 0, 0][..],
            &[PAGE_DELTA, 4, 0, 0, 0, 0, 0],
            &[9],
            &[PAGE_BLOCKS, 3],
            &[PAGE_RAW, 1],
        ] {
            assert!(d
                .decode_page(3, &mut &bad[..], &mut held, &mut out)
                .is_err());
        }
        let far = [PAGE_BLOCKS, 1, BLOCK_REF, 0xff, 0xff, 0xff, 0xff];
        assert!(d
            .decode_page(3, &mut &far[..], &mut held, &mut out)
            .unwrap_err()
            .to_string()
            .contains("beyond"));
        assert!(Encoding {
            blocks: 3,
            ..opts(true, true, 1 << 20)
        }
        .check()
        .is_err());
        assert!(opts(true, true, 2 << 30).check().is_err());
    }
}
