//! The migration wire format (documented in `docs/migration-wire.md`): length-prefixed frames,
//! every one checked against its type's exact layout before anything is used.
//!
//! Frame: payload length (u32 LE, at most [`MAX_PAYLOAD`]), type (u8), payload. Integers are
//! little-endian; bitmaps are a word count (u32) then that many u64 words, bit `p % 64` of word
//! `p / 64` standing for page `p`.

/// First bytes of a `hello` payload.
pub const MAGIC: &[u8; 8] = b"SPANMIG\0";
/// Wire format version; a peer with another version is refused at `hello`.
/// 2: `ready`/`commit` before the destination runs the guest; `complete` carries the p99
/// fault latency. 3: `commit` says whether the guest runs or stays paused. 4: `sync` during
/// post-copy too (the destination answers each once it has read what came before: the
/// source's window of pushed pages). 5: `stale` (a post-copy's stale pages dropped before the
/// pause). 6: `disk-offer` names the source image's base generation and the hand-over's; a
/// destination holding that base answers without hashes.
pub const VERSION: u32 = 6;
/// Pages a `pages` frame spans at most (2 MiB).
pub const BATCH_PAGES: u64 = 512;
/// Largest payload accepted: a full batch of raw pages plus its header and bitmaps, or a bitmap
/// of 64 GiB of guest memory.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;
/// Page size.
pub const PAGE: usize = 4096;

/// Longest `error` text, bytes: a longer one is cut when sent and refused when received (a
/// peer's message ends up in logs and reports).
pub const MAX_ERROR_TEXT: usize = 4096;

/// Tag of the raw page encoding ([`PageCodec::Raw`]).
pub const CODEC_RAW: u8 = 0;
/// Tag of CloudNet's page encodings ([`PageCodec::Cnet`]).
pub const CODEC_CNET: u8 = 1;
/// Tag of the arithmetic-progression page encoding ([`PageCodec::Stride`]).
pub const CODEC_STRIDE: u8 = 2;

/// A page encoding of the `pages` frame: how its non-zero pages are encoded, named on the
/// wire by a tag (the frame's codec byte), chosen per batch. Zero pages are always markers
/// (a bit), never data. A new encoding (compression, deltas against another base) is a new
/// variant here with its tag and data rule, and its decoder at the receiver (the match on
/// [`PagesRef::encoding`] there is exhaustive): no new frame type. A tag not registered here
/// is refused by [`decode_pages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCodec {
    /// Tag 0: each data page as its 4096 bytes.
    Raw,
    /// Tag 1: CloudNet's encodings (see `cnet.rs`): per page raw, cached blocks (redundancy
    /// elimination) or an XOR delta; the data's length is the frame's rest, checked page by
    /// page by the receiver's decoder.
    Cnet,
    /// Tag 2: pages whose 64-bit words form an arithmetic progression (a constant fill is
    /// step 0) go as their first word and step, 16 bytes; the others raw. Data: a bitmap
    /// (one word per 64 pages of the span) of the progression pages, their (first, step)
    /// pairs in page order, then the other data pages' 4096 bytes in page order
    /// ([`split_stride`] checks the layout). Pre-copy only, like `cnet`.
    Stride,
}

/// Every registered page encoding.
pub const PAGE_CODECS: [PageCodec; 3] = [PageCodec::Raw, PageCodec::Cnet, PageCodec::Stride];

impl PageCodec {
    /// The tag that names it on the wire.
    pub const fn tag(self) -> u8 {
        match self {
            PageCodec::Raw => CODEC_RAW,
            PageCodec::Cnet => CODEC_CNET,
            PageCodec::Stride => CODEC_STRIDE,
        }
    }

    /// Its name, for messages and reports.
    pub const fn name(self) -> &'static str {
        match self {
            PageCodec::Raw => "raw",
            PageCodec::Cnet => "cnet",
            PageCodec::Stride => "stride",
        }
    }

    /// Bytes a data page takes when fixed (raw: one page); `None` when variable: the data is
    /// the frame's rest, which the encoding's decoder must consume exactly.
    pub const fn page_bytes(self) -> Option<usize> {
        match self {
            PageCodec::Raw => Some(PAGE),
            PageCodec::Cnet | PageCodec::Stride => None,
        }
    }

    /// The encoding a tag names; an unregistered tag is a malformed frame.
    pub fn from_tag(tag: u8) -> Result<Self, WireError> {
        PAGE_CODECS
            .into_iter()
            .find(|c| c.tag() == tag)
            .ok_or_else(|| {
                let known: Vec<String> = PAGE_CODECS
                    .iter()
                    .map(|c| format!("{} ({})", c.tag(), c.name()))
                    .collect();
                bad(format!(
                    "unknown page codec {tag} (this peer knows {})",
                    known.join(", ")
                ))
            })
    }
}

/// How the source hands the VM over in a `state` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Every page is at the destination: run.
    Complete = 0,
    /// Pages in the frame's bitmap are still to come: run, and fault them in.
    Postcopy = 1,
}

/// A decoded frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// Source → destination, first frame: who is coming.
    Hello {
        /// Wire version of the sender.
        version: u32,
        /// Guest RAM size.
        mem_bytes: u64,
        /// Identifies one migration across reconnections.
        session: u64,
        /// A reconnection to resume a post-copy.
        resume: bool,
    },
    /// Destination → source: ready (or not, with a reason).
    Welcome {
        /// Wire version of the destination.
        version: u32,
    },
    /// Either way: the peer gives up, saying why.
    Error(String),
    /// Source → destination: pages `first..first + span` selected by `present`; among them
    /// those in `zero` are zero pages, the others follow as data in `codec`.
    Pages {
        /// First page number of the span.
        first: u64,
        /// Pages the frame spans (1..=BATCH_PAGES).
        span: u16,
        /// Encoding of the data.
        codec: u8,
        /// Which pages of the span the frame carries.
        present: Vec<u64>,
        /// Which of them are zero.
        zero: Vec<u64>,
        /// Data of present, non-zero pages, in order.
        data: Vec<u8>,
    },
    /// Source → destination: vCPU and device state, and how to hand over.
    State {
        /// Complete or post-copy.
        handover: Handover,
        /// `base_vmm::state::VmState` bytes (the state-file format).
        state: Vec<u8>,
        /// Post-copy: the pages still to come (empty for a complete hand-over).
        needed: Vec<u64>,
    },
    /// Destination → source: the guest runs at the destination.
    Resumed {
        /// Destination time from `state` received to vCPUs running, µs.
        load_us: u64,
    },
    /// Destination → source: the guest faulted on these pages; send them first.
    Fault(Vec<u64>),
    /// Source → destination: every page has been sent.
    Done,
    /// Destination → source: every page is in; the migration is over.
    Complete {
        /// Faults the destination requested from the source.
        faults: u64,
        /// Their mean latency (fault to page installed), µs.
        fault_mean_us: u64,
        /// Their worst latency, µs.
        fault_max_us: u64,
        /// Their 99th percentile, µs.
        fault_p99_us: u64,
    },
    /// Destination → source after a post-copy reconnection: the pages it still lacks.
    Needed(Vec<u64>),
    /// Source → destination, after `welcome`: the machine's shape (JSON of
    /// `base_vmm::state::MachineConfig`), so the destination builds its KVM VM and vCPUs while
    /// pages stream in, not during the downtime.
    Machine(Vec<u8>),
    /// Either way: "everything before this has arrived" when it comes back. The source sends
    /// one before it pauses the guest, so the pages already in flight drain while the guest
    /// still runs, not during the downtime.
    Sync,
    /// Destination → source: the VM is built from the state, its vCPUs paused; it runs only
    /// on `commit`.
    Ready {
        /// Destination time from `state` received to the VM built, µs.
        load_us: u64,
    },
    /// Source → destination: the guest is the destination's. Sent once: from here on the
    /// source never runs the guest again (a link lost before `resumed` leaves it paused, "in
    /// doubt").
    Commit {
        /// Run the vCPUs; false: the guest was paused at the source (by its operator) and
        /// stays paused at the destination until resumed there.
        run: bool,
    },
    /// Either way: the disk migration's frames (`disk.rs`).
    Disk(super::disk::DiskFrame),
    /// Source → destination, after `machine`, at most once: Scatter-Gather's intermediaries
    /// and the key to read them (only ever on this TLS link).
    Store(Store),
    /// Source → destination, after the hand-over: these pages are at the intermediaries, at
    /// these content addresses. Decoded without knowing guest memory: the receiver checks
    /// the span against it ([`Located::check`]).
    Located(Located),
    /// Source → destination, before a post-copy state: the pages whose copy at the
    /// destination is out of date and which come again after the state (the state's
    /// *needed* names each of them). The destination drops them now, in stream order, while
    /// the guest still runs at the source, instead of inside the pause.
    Stale(Vec<u64>),
}

pub use super::scatter::records::{Located, Store};

/// Two `store` records are equal when they encode alike (the key is compared too: this is
/// for tests and checks, not for secrets).
impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        self.encode(&mut a);
        other.encode(&mut b);
        a == b
    }
}

impl Frame {
    /// The frame's type name as the wire documentation gives it, for messages: a frame's
    /// debug form would print its pages or state byte by byte.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Error(_) => "error",
            Frame::Pages { .. } => "pages",
            Frame::State { .. } => "state",
            Frame::Resumed { .. } => "resumed",
            Frame::Fault(_) => "fault",
            Frame::Done => "done",
            Frame::Complete { .. } => "complete",
            Frame::Needed(_) => "needed",
            Frame::Machine(_) => "machine",
            Frame::Sync => "sync",
            Frame::Ready { .. } => "ready",
            Frame::Commit { .. } => "commit",
            Frame::Disk(d) => d.name(),
            Frame::Store(_) => "store",
            Frame::Located(_) => "located",
            Frame::Stale(_) => "stale",
        }
    }
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_ERROR: u8 = 3;
/// Type of a `pages` frame (decoded in place by [`decode_pages`]).
pub const T_PAGES: u8 = 4;
const T_STATE: u8 = 5;
const T_RESUMED: u8 = 6;
const T_FAULT: u8 = 7;
const T_DONE: u8 = 8;
const T_COMPLETE: u8 = 9;
const T_NEEDED: u8 = 10;
const T_MACHINE: u8 = 11;
const T_SYNC: u8 = 12;
const T_READY: u8 = 13;
const T_COMMIT: u8 = 14;
/// Type of a `store` frame (Scatter-Gather).
pub const T_STORE: u8 = 15;
/// Type of a `located` frame (Scatter-Gather).
pub const T_LOCATED: u8 = 16;
/// Type of a `stale` frame (written in stream order by the destination's page writer).
pub const T_STALE: u8 = 17;

/// Wire errors: what is wrong with a frame.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed migration frame: {0}")]
pub struct WireError(pub String);

pub(crate) fn bad(why: impl Into<String>) -> WireError {
    WireError(why.into())
}

/// The fixed part of a `pages` payload: span, codec and bitmaps (the data of the non-zero
/// pages follows it).
pub(crate) fn put_pages_fixed(
    out: &mut Vec<u8>,
    first: u64,
    span: u16,
    codec: u8,
    present: &[u64],
    zero: &[u64],
) {
    let nw = (span as usize).div_ceil(64);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&span.to_le_bytes());
    out.push(codec);
    put_words(out, &present[..nw]);
    put_words(out, &zero[..nw]);
}

/// Appends a whole `pages` frame but the data of its non-zero pages (`data_len` bytes), which
/// the sender writes straight from guest memory after it: the zero-copy sender and [`encode`]
/// lay the frame out in one place.
pub fn pages_header(
    out: &mut Vec<u8>,
    first: u64,
    span: u16,
    codec: PageCodec,
    present: &[u64],
    zero: &[u64],
    data_len: usize,
) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    put_pages_fixed(out, first, span, codec.tag(), present, zero);
    let len = (out.len() - start - HEADER_LEN + data_len) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4] = T_PAGES;
}

/// Appends a frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let ty = match frame {
        Frame::Hello {
            version,
            mem_bytes,
            session,
            resume,
        } => {
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&mem_bytes.to_le_bytes());
            out.extend_from_slice(&session.to_le_bytes());
            out.push(*resume as u8);
            T_HELLO
        }
        Frame::Welcome { version } => {
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&version.to_le_bytes());
            T_WELCOME
        }
        Frame::Error(msg) => {
            out.extend_from_slice(&msg.as_bytes()[..msg.len().min(MAX_ERROR_TEXT)]);
            T_ERROR
        }
        Frame::Pages {
            first,
            span,
            codec,
            present,
            zero,
            data,
        } => {
            put_pages_fixed(out, *first, *span, *codec, present, zero);
            out.extend_from_slice(data);
            T_PAGES
        }
        Frame::State {
            handover,
            state,
            needed,
        } => {
            out.push(*handover as u8);
            out.extend_from_slice(&(state.len() as u32).to_le_bytes());
            out.extend_from_slice(state);
            put_bitmap(out, needed);
            T_STATE
        }
        Frame::Resumed { load_us } => {
            out.extend_from_slice(&load_us.to_le_bytes());
            T_RESUMED
        }
        Frame::Fault(pages) => {
            put_bitmap(out, pages);
            T_FAULT
        }
        Frame::Done => T_DONE,
        Frame::Complete {
            faults,
            fault_mean_us,
            fault_max_us,
            fault_p99_us,
        } => {
            for v in [faults, fault_mean_us, fault_max_us, fault_p99_us] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            T_COMPLETE
        }
        Frame::Needed(bits) => {
            put_bitmap(out, bits);
            T_NEEDED
        }
        Frame::Machine(json) => {
            out.extend_from_slice(json);
            T_MACHINE
        }
        Frame::Sync => T_SYNC,
        Frame::Ready { load_us } => {
            out.extend_from_slice(&load_us.to_le_bytes());
            T_READY
        }
        Frame::Commit { run } => {
            out.push(*run as u8);
            T_COMMIT
        }
        Frame::Disk(d) => d.encode_payload(out),
        Frame::Store(st) => {
            st.encode(out);
            T_STORE
        }
        Frame::Located(l) => {
            l.encode(out);
            T_LOCATED
        }
        Frame::Stale(bits) => {
            put_bitmap(out, bits);
            T_STALE
        }
    };
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4] = ty;
}

/// Words of a span's bitmap, without a count (the span gives it).
fn put_words(out: &mut Vec<u8>, words: &[u64]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// A counted list of u64 (bitmap words or page numbers).
fn put_bitmap(out: &mut Vec<u8>, words: &[u64]) {
    out.extend_from_slice(&(words.len() as u32).to_le_bytes());
    put_words(out, words);
}

/// Reads a frame header: `(payload length, type)`, the length checked against the limit.
pub fn header(h: &[u8; HEADER_LEN]) -> Result<(usize, u8), WireError> {
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    Ok((len, h[4]))
}

/// A cursor that refuses to read past the payload.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(bad(format!("{} frame is truncated", self.what)));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn words(&mut self, n: usize) -> Result<Vec<u64>, WireError> {
        let raw = self.take(
            n.checked_mul(8)
                .ok_or_else(|| bad("word count overflows"))?,
        )?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect())
    }
    fn bitmap(&mut self) -> Result<Vec<u64>, WireError> {
        let n = self.u32()? as usize;
        self.words(n)
    }
    fn magic(&mut self) -> Result<(), WireError> {
        if self.take(8)? != MAGIC {
            return Err(bad("not a spanvmm migration stream (bad magic)"));
        }
        Ok(())
    }
    fn end(self) -> Result<(), WireError> {
        if !self.b.is_empty() {
            return Err(bad(format!(
                "{} frame has {} stray bytes at its end",
                self.what,
                self.b.len()
            )));
        }
        Ok(())
    }
}

fn ones(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

/// A `pages` frame read where it lies: the data is not copied.
pub struct PagesRef<'a> {
    /// First page number of the span.
    pub first: u64,
    /// Pages the frame spans.
    pub span: u16,
    /// Encoding of the data (its tag; see [`PagesRef::encoding`]).
    pub codec: u8,
    /// Which pages of the span the frame carries.
    pub present: Vec<u64>,
    /// Which of them are zero.
    pub zero: Vec<u64>,
    /// Data of present, non-zero pages, in order.
    pub data: &'a [u8],
}

impl PagesRef<'_> {
    /// The frame's page encoding (its tag was checked when the frame was decoded).
    pub fn encoding(&self) -> PageCodec {
        PageCodec::from_tag(self.codec).unwrap_or(PageCodec::Raw)
    }
}

/// Decodes a `pages` payload in place, with every check of [`decode`].
pub fn decode_pages(payload: &[u8]) -> Result<PagesRef<'_>, WireError> {
    let mut r = Reader {
        b: payload,
        what: "pages",
    };
    let first = r.u64()?;
    let span = r.u16()?;
    if span == 0 || span as u64 > BATCH_PAGES {
        return Err(bad(format!(
            "pages frame spans {span} pages (1..={BATCH_PAGES})"
        )));
    }
    let codec = r.u8()?;
    let encoding = PageCodec::from_tag(codec)?;
    let nw = (span as usize).div_ceil(64);
    let present = r.words(nw)?;
    let zero = r.words(nw)?;
    let tail = span as u64 % 64;
    if tail != 0 && (present[nw - 1] >> tail != 0 || zero[nw - 1] >> tail != 0) {
        return Err(bad("pages frame marks pages beyond its span"));
    }
    if zero.iter().zip(&present).any(|(z, p)| z & !p != 0) {
        return Err(bad("pages frame marks a page zero that it does not carry"));
    }
    let data_pages = ones(&present) - ones(&zero);
    let data = match encoding.page_bytes() {
        Some(n) => r.take(
            data_pages
                .checked_mul(n)
                .ok_or_else(|| bad("pages frame data size overflows"))?,
        )?,
        None => {
            // Variable-size encodings: the receiver's decoder checks that they fill it exactly.
            if data_pages == 0 && !r.b.is_empty() {
                return Err(bad("pages frame carries data but no data page"));
            }
            r.take(r.b.len())?
        }
    };
    r.end()?;
    Ok(PagesRef {
        first,
        span,
        codec,
        present,
        zero,
        data,
    })
}

/// Bytes of a progression page's data in a `stride` batch: its first word and step.
pub const STRIDE_PAIR: usize = 16;

/// A page's 64-bit little-endian words as an arithmetic progression: (first word, step), or
/// `None`. A zero page is (0, 0). Both ends use this rule: the source to choose, the
/// destination (through [`fill_stride`]) to rebuild.
pub fn stride_of(page: &[u8]) -> Option<(u64, u64)> {
    if page.len() != PAGE {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().expect("8"));
    let (first, step) = (word(0), word(1).wrapping_sub(word(0)));
    // Chunks compared without a branch per word; a page that is no progression usually
    // fails in the first chunk.
    let mut v = first;
    for chunk in page.chunks_exact(256) {
        let mut diff = 0;
        for w in chunk.chunks_exact(8) {
            diff |= u64::from_le_bytes(w.try_into().expect("8")) ^ v;
            v = v.wrapping_add(step);
        }
        if diff != 0 {
            return None;
        }
    }
    Some((first, step))
}

/// Writes the progression (first, step) over `page` (4096 bytes): the page [`stride_of`]
/// described.
pub fn fill_stride(page: &mut [u8], first: u64, step: u64) {
    let mut v = first;
    for w in page.chunks_exact_mut(8) {
        w.copy_from_slice(&v.to_le_bytes());
        v = v.wrapping_add(step);
    }
}

/// The data of a `stride` batch, split and checked against its frame.
pub struct StrideData<'a> {
    /// Which pages of the span are progressions (a subset of the data pages).
    pub stride: Vec<u64>,
    /// Their (first, step) pairs, [`STRIDE_PAIR`] bytes each, in page order.
    pub pairs: &'a [u8],
    /// The other data pages, 4096 bytes each, in page order.
    pub raw: &'a [u8],
}

/// Splits a `stride` batch's data: its bitmap must mark only data pages (present, not zero)
/// of the span, and the data must hold exactly its pairs and the other pages.
pub fn split_stride<'a>(f: &PagesRef<'a>) -> Result<StrideData<'a>, WireError> {
    let nw = (f.span as usize).div_ceil(64);
    let mut r = Reader {
        b: f.data,
        what: "pages (stride)",
    };
    let stride = r.words(nw)?;
    let data: Vec<u64> = f.present.iter().zip(&f.zero).map(|(p, z)| p & !z).collect();
    if stride.iter().zip(&data).any(|(s, d)| s & !d != 0) {
        return Err(bad(
            "stride pages frame marks a page a progression that carries no data",
        ));
    }
    let n = ones(&stride);
    let pairs = r.take(n * STRIDE_PAIR)?;
    let raw_len = (ones(&data) - n) * PAGE;
    if r.b.len() != raw_len {
        return Err(bad(format!(
            "stride pages frame has {} bytes of raw pages, its bitmaps say {raw_len}",
            r.b.len()
        )));
    }
    Ok(StrideData {
        stride,
        pairs,
        raw: r.b,
    })
}

/// Decodes a payload of type `ty`.
pub fn decode(ty: u8, payload: &[u8]) -> Result<Frame, WireError> {
    let what = match ty {
        T_HELLO => "hello",
        T_WELCOME => "welcome",
        T_ERROR => "error",
        T_PAGES => "pages",
        T_STATE => "state",
        T_RESUMED => "resumed",
        T_FAULT => "fault",
        T_DONE => "done",
        T_COMPLETE => "complete",
        T_NEEDED => "needed",
        T_MACHINE => "machine",
        T_SYNC => "sync",
        T_READY => "ready",
        T_COMMIT => "commit",
        T_STALE => "stale",
        // The records check their own layout, strictly (`scatter::records`).
        T_STORE => return Store::decode(payload).map(Frame::Store),
        T_LOCATED => return Located::decode(payload, u64::MAX).map(Frame::Located),
        t if super::disk::is_disk_frame(t) => {
            return super::disk::decode(t, payload).map(Frame::Disk)
        }
        other => return Err(bad(format!("unknown frame type {other}"))),
    };
    let mut r = Reader { b: payload, what };
    let f = match ty {
        T_HELLO => {
            r.magic()?;
            Frame::Hello {
                version: r.u32()?,
                mem_bytes: r.u64()?,
                session: r.u64()?,
                resume: match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(bad(format!("hello resume flag {v} is not 0 or 1"))),
                },
            }
        }
        T_WELCOME => {
            r.magic()?;
            Frame::Welcome { version: r.u32()? }
        }
        T_ERROR => {
            if payload.len() > MAX_ERROR_TEXT {
                return Err(bad(format!(
                    "error frame of {} bytes exceeds the {MAX_ERROR_TEXT}-byte limit",
                    payload.len()
                )));
            }
            Frame::Error(String::from_utf8_lossy(r.take(payload.len())?).into_owned())
        }
        T_PAGES => {
            let p = decode_pages(payload)?;
            r.take(payload.len())?;
            Frame::Pages {
                first: p.first,
                span: p.span,
                codec: p.codec,
                present: p.present,
                zero: p.zero,
                data: p.data.to_vec(),
            }
        }
        T_STATE => {
            let handover = match r.u8()? {
                0 => Handover::Complete,
                1 => Handover::Postcopy,
                v => return Err(bad(format!("unknown hand-over mode {v}"))),
            };
            let n = r.u32()? as usize;
            let state = r.take(n)?.to_vec();
            Frame::State {
                handover,
                state,
                needed: r.bitmap()?,
            }
        }
        T_RESUMED => Frame::Resumed { load_us: r.u64()? },
        T_FAULT => Frame::Fault(r.bitmap()?),
        T_DONE => Frame::Done,
        T_COMPLETE => Frame::Complete {
            faults: r.u64()?,
            fault_mean_us: r.u64()?,
            fault_max_us: r.u64()?,
            fault_p99_us: r.u64()?,
        },
        T_NEEDED => Frame::Needed(r.bitmap()?),
        T_STALE => Frame::Stale(r.bitmap()?),
        T_MACHINE => Frame::Machine(r.take(payload.len())?.to_vec()),
        T_SYNC => Frame::Sync,
        T_READY => Frame::Ready { load_us: r.u64()? },
        T_COMMIT => Frame::Commit {
            run: match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(bad(format!("commit run flag {v} is not 0 or 1"))),
            },
        },
        _ => unreachable!("checked above"),
    };
    r.end()?;
    Ok(f)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_zero_copy_pages_header_is_the_encoded_frame() {
        let (present, zero) = (vec![0b1011u64], vec![0b0010u64]);
        let data = vec![7u8; 2 * PAGE];
        let mut whole = Vec::new();
        encode(
            &Frame::Pages {
                first: 640,
                span: 4,
                codec: CODEC_RAW,
                present: present.clone(),
                zero: zero.clone(),
                data: data.clone(),
            },
            &mut whole,
        );
        let mut sent = Vec::new();
        pages_header(
            &mut sent,
            640,
            4,
            PageCodec::Raw,
            &present,
            &zero,
            data.len(),
        );
        sent.extend_from_slice(&data);
        assert_eq!(sent, whole);
        let (len, ty) = header(sent[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((len, ty), (sent.len() - HEADER_LEN, T_PAGES));
        let p = decode_pages(&sent[HEADER_LEN..]).unwrap();
        assert_eq!((p.first, p.span, p.data.len()), (640, 4, 2 * PAGE));
    }
    use super::*;

    fn round_trip(f: Frame) {
        let mut b = Vec::new();
        encode(&f, &mut b);
        let (len, ty) = header(b[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, b.len() - HEADER_LEN);
        assert_eq!(decode(ty, &b[HEADER_LEN..]).unwrap(), f);
        // Every truncation is refused, never a panic (an error message is any text).
        if !matches!(f, Frame::Error(_) | Frame::Machine(_)) {
            for cut in 0..len {
                assert!(decode(ty, &b[HEADER_LEN..HEADER_LEN + cut]).is_err());
            }
        }
        // So is a stray byte.
        let mut long = b[HEADER_LEN..].to_vec();
        long.push(0);
        if !matches!(f, Frame::Error(_) | Frame::Machine(_)) {
            assert!(decode(ty, &long).is_err());
        }
    }

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        round_trip(Frame::Hello {
            version: VERSION,
            mem_bytes: 256 << 20,
            session: 7,
            resume: false,
        });
        round_trip(Frame::Welcome { version: VERSION });
        round_trip(Frame::Error("no".into()));
        round_trip(Frame::Pages {
            first: 512,
            span: 3,
            codec: CODEC_RAW,
            present: vec![0b101],
            zero: vec![0b001],
            data: vec![9; PAGE],
        });
        round_trip(Frame::State {
            handover: Handover::Postcopy,
            state: b"state".to_vec(),
            needed: vec![1, 2, 3],
        });
        round_trip(Frame::Resumed { load_us: 5 });
        round_trip(Frame::Fault(vec![4, 5]));
        round_trip(Frame::Done);
        round_trip(Frame::Sync);
        round_trip(Frame::Complete {
            faults: 1,
            fault_mean_us: 2,
            fault_max_us: 3,
            fault_p99_us: 4,
        });
        round_trip(Frame::Ready { load_us: 6 });
        round_trip(Frame::Commit { run: true });
        round_trip(Frame::Commit { run: false });
        assert!(decode(T_COMMIT, &[2]).unwrap_err().0.contains("run flag"));
        round_trip(Frame::Needed(vec![u64::MAX]));
        round_trip(Frame::Stale(vec![0, u64::MAX, 5]));
        assert_eq!(Frame::Stale(Vec::new()).name(), "stale");
        assert_eq!(Frame::Commit { run: true }.name(), "commit");
        round_trip(Frame::Machine(b"{}".to_vec()));
        round_trip(Frame::Store(Store {
            key: crate::migration::intermediary::StoreKey::from_bytes([7; 32]),
            encrypt: true,
            cluster: false,
            replicas: 2,
            ttl_secs: 60,
            intermediaries: vec![
                "127.0.0.1:6379".parse().unwrap(),
                "127.0.0.1:6380".parse().unwrap(),
            ],
            auth: None,
            gather_rate: 0,
        }));
        let located = Located {
            first: 4096,
            span: 3,
            present: vec![0b101],
            hashes: vec![[1; 32], [2; 32]],
        };
        round_trip(Frame::Located(located.clone()));
        assert_eq!(Frame::Located(located.clone()).name(), "located");
        // The span is checked against guest memory once the receiver knows its size.
        assert!(located.check(4099).is_ok());
        let e = located.check(4098).unwrap_err().0;
        assert!(e.contains("runs past guest memory (4098 pages)"), "{e}");
        // A span wrapping around 2^64 is refused by the decoder itself.
        let mut b = Vec::new();
        encode(
            &Frame::Located(Located {
                first: u64::MAX - 1,
                ..located
            }),
            &mut b,
        );
        assert!(decode(T_LOCATED, &b[HEADER_LEN..])
            .unwrap_err()
            .0
            .contains("past guest memory"));
    }

    #[test]
    fn inconsistent_frames_are_refused() {
        let mut b = Vec::new();
        encode(
            &Frame::Pages {
                first: 0,
                span: 2,
                codec: CODEC_RAW,
                present: vec![0b1],
                zero: vec![0b10],
                data: vec![],
            },
            &mut b,
        );
        assert!(decode(T_PAGES, &b[HEADER_LEN..])
            .unwrap_err()
            .0
            .contains("does not carry"));
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(header(&h).unwrap_err().0.contains("exceeds"));
        assert!(decode(T_ERROR, &[b'x'; MAX_ERROR_TEXT]).is_ok());
        assert!(decode(T_ERROR, &[b'x'; MAX_ERROR_TEXT + 1])
            .unwrap_err()
            .0
            .contains("exceeds"));
        let mut long = Vec::new();
        encode(&Frame::Error("y".repeat(MAX_ERROR_TEXT * 2)), &mut long);
        assert_eq!(long.len(), HEADER_LEN + MAX_ERROR_TEXT);
        assert!(decode(99, &[])
            .unwrap_err()
            .0
            .contains("unknown frame type"));
        // Every tag not registered is refused, saying which ones are known.
        for tag in 0..=u8::MAX {
            let mut b = Vec::new();
            encode(
                &Frame::Pages {
                    first: 0,
                    span: 1,
                    codec: tag,
                    present: vec![1],
                    zero: vec![0],
                    data: vec![3; PAGE],
                },
                &mut b,
            );
            match PageCodec::from_tag(tag) {
                Ok(c) => {
                    assert_eq!(c.tag(), tag);
                    let p = decode_pages(&b[HEADER_LEN..]).unwrap();
                    assert_eq!(p.encoding(), c);
                }
                Err(_) => {
                    let e = decode(T_PAGES, &b[HEADER_LEN..]).unwrap_err().0;
                    assert!(e.contains(&format!("unknown page codec {tag}")), "{e}");
                    assert!(e.contains("0 (raw), 1 (cnet), 2 (stride)"), "{e}");
                }
            }
        }
        let mut hello = Vec::new();
        encode(&Frame::Welcome { version: 1 }, &mut hello);
        hello[HEADER_LEN] = b'X';
        assert!(decode(T_WELCOME, &hello[HEADER_LEN..])
            .unwrap_err()
            .0
            .contains("bad magic"));
    }

    #[test]
    fn stride_pages_are_found_rebuilt_and_their_frames_checked() {
        // Progressions (wrapping included) are found and rebuilt exactly; a constant fill
        // is step 0; a page off by one bit anywhere is no progression.
        for (a, d) in [
            (0u64, 0u64),
            (7, 0),
            (u64::MAX - 3, 0x9e37_79b9_7f4a_7c15),
            (1, 2),
        ] {
            let mut page = vec![0u8; PAGE];
            fill_stride(&mut page, a, d);
            assert_eq!(stride_of(&page), Some((a, d)));
            for at in [0, 9, 2048, PAGE - 1] {
                let mut bent = page.clone();
                bent[at] ^= 1;
                assert_eq!(stride_of(&bent), None, "{a} {d} bit at {at}");
            }
        }
        assert_eq!(stride_of(&[0; 64]), None);
        // A frame: pages 0 (zero), 1 (progression), 2 (raw), 3 (progression).
        let pairs: Vec<u8> = [5u64, 1, 9, 3]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let frame = |stride: u64, raw: usize| {
            let mut data = stride.to_le_bytes().to_vec();
            data.extend_from_slice(&pairs);
            data.extend(std::iter::repeat_n(4u8, raw));
            let mut b = Vec::new();
            encode(
                &Frame::Pages {
                    first: 8,
                    span: 4,
                    codec: CODEC_STRIDE,
                    present: vec![0b1111],
                    zero: vec![0b0001],
                    data,
                },
                &mut b,
            );
            b
        };
        let b = frame(0b1010, PAGE);
        let f = decode_pages(&b[HEADER_LEN..]).unwrap();
        assert_eq!(f.encoding(), PageCodec::Stride);
        let d = split_stride(&f).unwrap();
        assert_eq!(
            (d.stride[0], d.pairs.len(), d.raw.len()),
            (0b1010, 32, PAGE)
        );
        // The bitmap marks the zero page, or the raw bytes are short or long.
        for (stride, raw, why) in [
            (0b1011, 0, "carries no data"),
            (0b1010, PAGE - 1, "bitmaps say 4096"),
            (0b1010, PAGE + 8, "bitmaps say 4096"),
            (0b1_0010, PAGE, "carries no data"),
        ] {
            let b = frame(stride, raw);
            let e = decode_pages(&b[HEADER_LEN..])
                .and_then(|f| split_stride(&f).map(|_| ()))
                .unwrap_err()
                .0;
            assert!(e.contains(why), "{stride:b}: {e}");
        }
    }
}
