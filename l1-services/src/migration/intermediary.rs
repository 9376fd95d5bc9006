//! Scatter-Gather's intermediaries: pages parked in real Redis servers, addressed by content.
//!
//! A page's address is its SHA-256, so identical pages (within a VM, across the VMs and
//! migrations that share a [`StoreKey`]) are stored once: a write first probes for the key
//! (`EXPIRE`, which also renews its lifetime) and sends the value only when it is absent —
//! the paper's PROBE / WRITE_CONTENT. Several intermediaries: a page's home is chosen by its
//! hash, and with `replicas = 2` it is also written to the next one.
//!
//! An intermediary is not trusted. Every value carries an HMAC-SHA256 under a key derived
//! from the migration's [`StoreKey`] (which travels only on the TLS link), bound to the Redis
//! key it was stored under; optionally the page is encrypted (XChaCha20-Poly1305, then the
//! Redis key is an HMAC of the content hash too, so the server learns only which pages are
//! equal). A value read back must pass the MAC and hash to the address the reader was told
//! over TLS; anything else is refused as corrupt (and the next replica, if any, is tried).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use ring::hmac;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::resp::{Reply, Resp, RespError};

/// How long a writer's reservation of a page (`StoreConfig::reserve`) holds: others wait
/// this long at most for its value before writing the page themselves.
const RESERVE_LEASE: Duration = Duration::from_secs(5);

/// The key reserving `rkey` for one writer: `{rkey}r`, the hash tag keeping it on the same
/// Redis Cluster slot (and so the same intermediary) as the page's own key.
fn reservation_key(rkey: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(rkey.len() + 3);
    k.push(b'{');
    k.extend_from_slice(rkey);
    k.extend_from_slice(b"}r");
    k
}

/// A page's content address: SHA-256 of its bytes.
pub type ContentHash = [u8; 32];

/// The content address of `page`.
pub fn content_hash(page: &[u8]) -> ContentHash {
    Sha256::digest(page).into()
}

/// The largest value stored (a page is 4 KiB; room for larger units).
pub const MAX_VALUE: usize = 1 << 20;
/// Pages per pipelined round trip (bounds what one intermediary buffers for us): a scatter
/// batch (a record's span) in one probe and one write.
const PIPELINE: usize = super::wire::BATCH_PAGES as usize;
/// A page.
const PAGE: usize = base_vmm::memory::PAGE_SIZE as usize;
const MAGIC: &[u8; 4] = b"SGv1";
const HEADER: usize = 9;
const FLAG_ENCRYPTED: u8 = 1;
const MAC_LEN: usize = 32;
const AEAD_TAG_LEN: usize = 16;

/// Intermediary errors.
#[derive(Debug, thiserror::Error)]
pub enum IntermediaryError {
    /// The configuration cannot work.
    #[error("intermediaries: {0}")]
    Config(String),
    /// An intermediary could not be reached at the start.
    #[error("intermediary {index}: {source}")]
    Connect {
        /// Its index in the list.
        index: usize,
        /// Why.
        source: RespError,
    },
    /// No replica of a page could be stored (every intermediary it belongs to failed).
    #[error("page {key} could not be stored: {why}")]
    Unplaced {
        /// The page's content hash (hex).
        key: String,
        /// The last failure.
        why: String,
    },
    /// A value failed its MAC, decryption or content hash: garbage under a key.
    #[error("intermediary {addr} holds a corrupt value for page {key}: {why}")]
    Corrupt {
        /// The intermediary.
        addr: SocketAddr,
        /// The page's content hash (hex).
        key: String,
        /// What check failed.
        why: &'static str,
    },
    /// No replica of a page could be read, none of them corrupt.
    #[error("page {key} not found at any intermediary: {why}")]
    Missing {
        /// The page's content hash (hex).
        key: String,
        /// The last failure.
        why: String,
    },
    /// The system's random source failed.
    #[error("intermediary key: no randomness")]
    Random,
}

/// The secret of one migration (or of a group of migrations that share pages): the MAC,
/// encryption and address keys and the Redis key namespace are derived from it. It is sent
/// to the destination only on the migration's TLS link.
#[derive(Clone)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, IntermediaryError> {
        use ring::rand::SecureRandom;
        let mut k = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| IntermediaryError::Random)?;
        Ok(StoreKey(k))
    }

    /// The key from its bytes (as received over TLS).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        StoreKey(b)
    }

    /// Its bytes, to send over TLS.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

/// Credentials for intermediaries that require them (Redis `AUTH`, ACL user optional), so
/// other tenants of a shared Redis cannot delete a migration's pages. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisAuth {
    /// ACL user (`None`: the default user).
    pub user: Option<String>,
    /// Password.
    pub password: String,
}

impl fmt::Debug for RedisAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisAuth(..)")
    }
}

/// A connection to `addr`, authenticated when `auth` says so.
fn connect_auth(
    addr: SocketAddr,
    timeout: Duration,
    max_bulk: usize,
    auth: Option<&RedisAuth>,
) -> Result<Resp, RespError> {
    let mut c = Resp::connect(addr, timeout, max_bulk)?;
    if let Some(a) = auth {
        c.auth(a.user.as_deref(), &a.password)?;
    }
    Ok(c)
}

/// Where pages go and how.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The intermediaries (Redis servers), in an order every party agrees on: a page's home
    /// is chosen by its hash over this list.
    pub intermediaries: Vec<SocketAddr>,
    /// Encrypt pages (the MAC is always there).
    pub encrypt: bool,
    /// Copies of each page, on consecutive intermediaries from its home (1 or 2 usually).
    pub replicas: usize,
    /// Lifetime of a stored page in seconds, renewed whenever it is written again or probed
    /// (pages are shared by content, so they are never deleted, they expire).
    pub ttl_secs: u64,
    /// Connect, read and write timeout per intermediary.
    pub timeout: Duration,
    /// `intermediaries` are seed nodes of one Redis Cluster: its masters are the
    /// intermediaries and a page lives where the cluster puts its key (its hash slot). The
    /// cluster keeps its own replicas, so `replicas` must be 1.
    pub cluster: bool,
    /// Credentials, if the intermediaries require them.
    pub auth: Option<RedisAuth>,
    /// Reserve a page before writing it (gang migration: several sources sharing a
    /// [`StoreKey`] write at once). A page found absent is reserved (`SET {key}r NX PX`,
    /// a few bytes) and written only by the source that got the reservation; the others
    /// wait until it is there (or the reservation lapses, then write it themselves), so two
    /// sources racing on one page send it once.
    pub reserve: bool,
}

impl StoreConfig {
    /// One copy, MAC only, one hour, 5 s timeouts.
    pub fn new(intermediaries: Vec<SocketAddr>) -> Self {
        StoreConfig {
            intermediaries,
            encrypt: false,
            replicas: 1,
            ttl_secs: 3600,
            timeout: Duration::from_secs(5),
            cluster: false,
            auth: None,
            reserve: false,
        }
    }
}

/// Counters of one intermediary.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct IntermediaryStats {
    /// Its address.
    pub addr: String,
    /// Values written (`SET`).
    pub pages_stored: u64,
    /// Value bytes written.
    pub bytes_stored: u64,
    /// Writes saved because the page was there already (probe hit).
    pub dedup_hits: u64,
    /// Values read and accepted.
    pub pages_read: u64,
    /// Value bytes read.
    pub bytes_read: u64,
    /// Values refused as corrupt.
    pub corrupt: u64,
    /// Reads that found no value.
    pub misses: u64,
    /// Bytes on the wire to and from it (RESP framing included).
    pub wire_out: u64,
    /// Bytes on the wire from it.
    pub wire_in: u64,
    /// It failed (connection lost or timed out) and is no longer used.
    pub down: bool,
    /// Pages found reserved by another writer (`reserve`), then found written by it: not
    /// sent (counted in `dedup_hits` too).
    #[serde(default)]
    pub waited: u64,
    /// Pages whose reservation by another writer lapsed before the page was there: written
    /// here after all (counted in `pages_stored`).
    #[serde(default)]
    pub takeovers: u64,
}

/// Counters of a [`PageStore`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    /// Per intermediary, in list order.
    pub intermediaries: Vec<IntermediaryStats>,
    /// Pages given to `put` that repeated a page of the same batch (stored once).
    pub batch_dups: u64,
    /// Pages stored on fewer intermediaries than `replicas` (one failed).
    pub under_replicated: u64,
}

impl StoreStats {
    /// Adds the counters of another client of the same intermediaries (a worker's): sums,
    /// and an intermediary is down if either found it so.
    pub fn add(&mut self, o: &StoreStats) {
        if self.intermediaries.is_empty() {
            self.intermediaries = o.intermediaries.clone();
        } else {
            for (a, b) in self.intermediaries.iter_mut().zip(&o.intermediaries) {
                a.pages_stored += b.pages_stored;
                a.bytes_stored += b.bytes_stored;
                a.dedup_hits += b.dedup_hits;
                a.pages_read += b.pages_read;
                a.bytes_read += b.bytes_read;
                a.corrupt += b.corrupt;
                a.misses += b.misses;
                a.wire_out += b.wire_out;
                a.wire_in += b.wire_in;
                a.down |= b.down;
            }
        }
        self.batch_dups += o.batch_dups;
        self.under_replicated += o.under_replicated;
    }

    /// All dedup hits: repeats within a batch and pages already at their intermediary.
    pub fn dedup_hits(&self) -> u64 {
        self.batch_dups
            + self
                .intermediaries
                .iter()
                .map(|i| i.dedup_hits)
                .sum::<u64>()
    }
}

struct Slot {
    addr: SocketAddr,
    conn: Option<Resp>,
    stats: IntermediaryStats,
}

impl Slot {
    fn fail(&mut self) {
        if let Some(c) = self.conn.take() {
            self.stats.wire_out += c.bytes_out;
            self.stats.wire_in += c.bytes_in;
        }
        self.stats.down = true;
    }
}

/// Keys derived from the [`StoreKey`].
#[derive(Clone)]
struct Keys {
    mac: hmac::Key,
    addr: hmac::Key,
    nonce: hmac::Key,
    aead: XChaCha20Poly1305,
    /// Namespace of this key's pages in Redis (hex).
    domain: String,
}

impl Keys {
    fn derive(k: &StoreKey) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, &k.0);
        let sub = |label: &[u8]| hmac::sign(&master, label);
        let key = |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, sub(label).as_ref());
        let enc = sub(b"spanvmm-sg encrypt");
        Keys {
            mac: key(b"spanvmm-sg mac"),
            addr: key(b"spanvmm-sg address"),
            nonce: key(b"spanvmm-sg nonce"),
            aead: XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(enc.as_ref())),
            domain: hex(&sub(b"spanvmm-sg domain").as_ref()[..8]),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A client of a set of intermediaries for one migration (one per thread: it holds one
/// connection per intermediary).
pub struct PageStore {
    cfg: StoreConfig,
    /// Cluster mode: the intermediary (master) owning each of the 16384 hash slots.
    owner: Option<Vec<u16>>,
    keys: Keys,
    slots: Vec<Slot>,
    stats_dups: u64,
    under_replicated: u64,
}

impl PageStore {
    /// Connects to every intermediary. The list stays fixed for the migration (as the
    /// paper's), so one that does not answer is kept, marked down: its pages are read from
    /// their replicas. Fails only if none answers.
    pub fn connect(mut cfg: StoreConfig, key: &StoreKey) -> Result<Self, IntermediaryError> {
        let owner = if cfg.cluster {
            if cfg.replicas != 1 {
                return Err(IntermediaryError::Config(
                    "a Redis Cluster keeps its own replicas: replicas must be 1".into(),
                ));
            }
            let (masters, owner) =
                cluster_map(&cfg.intermediaries, cfg.timeout, cfg.auth.as_ref())?;
            cfg.intermediaries = masters;
            Some(owner)
        } else {
            None
        };
        let n = cfg.intermediaries.len();
        if n == 0 {
            return Err(IntermediaryError::Config("no intermediary".into()));
        }
        if cfg.replicas == 0 || cfg.replicas > n {
            return Err(IntermediaryError::Config(format!(
                "{} replicas on {n} intermediaries",
                cfg.replicas
            )));
        }
        let mut slots = Vec::with_capacity(n);
        let mut first_err = None;
        for (index, &addr) in cfg.intermediaries.iter().enumerate() {
            let conn = match connect_auth(addr, cfg.timeout, MAX_VALUE + 64, cfg.auth.as_ref()) {
                Ok(c) => Some(c),
                Err(source) => {
                    tracing::warn!("intermediary {index} ({addr}) unreachable: {source}");
                    first_err.get_or_insert(IntermediaryError::Connect { index, source });
                    None
                }
            };
            slots.push(Slot {
                addr,
                stats: IntermediaryStats {
                    addr: addr.to_string(),
                    down: conn.is_none(),
                    ..Default::default()
                },
                conn,
            });
        }
        if slots.iter().all(|s| s.conn.is_none()) {
            return Err(first_err.expect("n > 0 intermediaries, none connected"));
        }
        Ok(PageStore {
            cfg,
            owner,
            keys: Keys::derive(key),
            slots,
            stats_dups: 0,
            under_replicated: 0,
        })
    }

    /// Another client of the same intermediaries with the same keys and placement, on
    /// connections of its own (a worker thread's: one connection per intermediary per
    /// worker, so that workers never wait for each other's replies). An intermediary this one
    /// found down is down there too; one that does not answer now is marked down.
    pub fn another(&self) -> Self {
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let conn = if s.stats.down {
                    None
                } else {
                    connect_auth(
                        s.addr,
                        self.cfg.timeout,
                        MAX_VALUE + 64,
                        self.cfg.auth.as_ref(),
                    )
                    .map_err(|e| tracing::warn!("intermediary {}: {e}", s.addr))
                    .ok()
                };
                Slot {
                    addr: s.addr,
                    stats: IntermediaryStats {
                        addr: s.addr.to_string(),
                        down: conn.is_none(),
                        ..Default::default()
                    },
                    conn,
                }
            })
            .collect();
        PageStore {
            cfg: self.cfg.clone(),
            owner: self.owner.clone(),
            keys: self.keys.clone(),
            slots,
            stats_dups: 0,
            under_replicated: 0,
        }
    }

    /// The intermediaries holding `h`, its home first.
    pub fn placement(&self, h: &ContentHash) -> std::vec::IntoIter<usize> {
        if let Some(owner) = &self.owner {
            return vec![owner[key_slot(&self.redis_key(h)) as usize] as usize].into_iter();
        }
        let n = self.slots.len();
        let home = (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % n as u64) as usize;
        (0..self.cfg.replicas)
            .map(|r| (home + r) % n)
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The Redis key of `h`.
    pub fn redis_key(&self, h: &ContentHash) -> Vec<u8> {
        let addr = if self.cfg.encrypt {
            hex(hmac::sign(&self.keys.addr, h).as_ref())
        } else {
            hex(h)
        };
        format!("sg1:{}:{addr}", self.keys.domain).into_bytes()
    }

    /// The value stored for `page` (address `h`) under `rkey`.
    pub fn seal(&self, h: &ContentHash, rkey: &[u8], page: &[u8]) -> Vec<u8> {
        let flags = if self.cfg.encrypt { FLAG_ENCRYPTED } else { 0 };
        let mut v = Vec::with_capacity(HEADER + page.len() + MAC_LEN);
        v.extend_from_slice(MAGIC);
        v.push(flags);
        v.extend_from_slice(&(page.len() as u32).to_le_bytes());
        v.extend_from_slice(page);
        if self.cfg.encrypt {
            let mut aad = rkey.to_vec();
            aad.extend_from_slice(&v[..HEADER]);
            let tag = self
                .keys
                .aead
                .encrypt_in_place_detached(&self.nonce(h), &aad, &mut v[HEADER..])
                .expect("a page is far below the AEAD's limit");
            v.extend_from_slice(&tag);
        } else {
            let tag = self.mac(rkey, &v);
            v.extend_from_slice(tag.as_ref());
        }
        v
    }

    /// The page in value `v` read under `rkey` for address `h`, if every check passes.
    fn open(&self, h: &ContentHash, rkey: &[u8], mut v: Vec<u8>) -> Result<Vec<u8>, &'static str> {
        if v.len() < HEADER || &v[..4] != MAGIC {
            return Err("not a page value");
        }
        let want = if self.cfg.encrypt { FLAG_ENCRYPTED } else { 0 };
        if v[4] != want {
            return Err("wrong encryption flag");
        }
        let len = u32::from_le_bytes(v[5..9].try_into().expect("4 bytes")) as usize;
        let tag_len = if self.cfg.encrypt {
            AEAD_TAG_LEN
        } else {
            MAC_LEN
        };
        if len > MAX_VALUE || v.len() != HEADER + len + tag_len {
            return Err("wrong length");
        }
        let tag = v.split_off(HEADER + len);
        if self.cfg.encrypt {
            let mut aad = rkey.to_vec();
            aad.extend_from_slice(&v[..HEADER]);
            self.keys
                .aead
                .decrypt_in_place_detached(
                    &self.nonce(h),
                    &aad,
                    &mut v[HEADER..],
                    Tag::from_slice(&tag),
                )
                .map_err(|_| "decryption failed (wrong key or altered)")?;
        } else {
            let mut signed = rkey.to_vec();
            signed.extend_from_slice(&v);
            hmac::verify(&self.keys.mac, &signed, &tag).map_err(|_| "MAC mismatch")?;
        }
        let page = v.split_off(HEADER);
        if &content_hash(&page) != h {
            return Err("content hash mismatch");
        }
        Ok(page)
    }

    fn mac(&self, rkey: &[u8], v: &[u8]) -> hmac::Tag {
        let mut c = hmac::Context::with_key(&self.keys.mac);
        c.update(rkey);
        c.update(v);
        c.sign()
    }

    /// Deterministic per content address: a page is sealed the same way every time, so
    /// values of equal pages are equal, and distinct pages never share a nonce.
    fn nonce(&self, h: &ContentHash) -> XNonce {
        let t = hmac::sign(&self.keys.nonce, h);
        *XNonce::from_slice(&t.as_ref()[..24])
    }

    /// Stores `pages`, each once by content (a page already at its intermediary is not sent
    /// again), and returns their content addresses in order. Fails if some page could not be
    /// stored on any of its intermediaries: the caller still holds it.
    pub fn put(&mut self, pages: &[&[u8]]) -> Result<Vec<ContentHash>, IntermediaryError> {
        let hashes: Vec<ContentHash> = pages.iter().map(|p| content_hash(p)).collect();
        for (chunk_pages, chunk_hashes) in pages.chunks(PIPELINE).zip(hashes.chunks(PIPELINE)) {
            self.put_chunk(chunk_pages, chunk_hashes)?;
        }
        Ok(hashes)
    }

    fn put_chunk(
        &mut self,
        pages: &[&[u8]],
        hashes: &[ContentHash],
    ) -> Result<(), IntermediaryError> {
        if let Some(p) = pages.iter().find(|p| p.len() > MAX_VALUE) {
            return Err(IntermediaryError::Config(format!(
                "a value of {} bytes (at most {MAX_VALUE})",
                p.len()
            )));
        }
        // Unique pages of the batch, first occurrence.
        let mut first: HashMap<&ContentHash, usize> = HashMap::new();
        for (i, h) in hashes.iter().enumerate() {
            match first.entry(h) {
                std::collections::hash_map::Entry::Occupied(_) => self.stats_dups += 1,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(i);
                }
            }
        }
        let mut unique: Vec<usize> = first.into_values().collect();
        unique.sort_unstable();
        let ttl = self.cfg.ttl_secs.max(1).to_string();
        let n = self.slots.len();
        // Per intermediary: (page index, its Redis key).
        let mut per: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); n];
        for &i in &unique {
            let rkey = self.redis_key(&hashes[i]);
            for s in self.placement(&hashes[i]).collect::<Vec<_>>() {
                per[s].push((i, rkey.clone()));
            }
        }
        let ttl = ttl.as_bytes();
        let mut copies: HashMap<usize, usize> = HashMap::new();
        let mut last_err = String::from("intermediary down");
        // Probe every intermediary at once (PROBE: present renews, absent is written).
        let probes = per
            .iter()
            .map(|items| {
                items
                    .iter()
                    .map(|(_, k)| vec![&b"EXPIRE"[..], k.as_slice(), ttl])
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let probed = self.pipeline_all(&probes);
        // Values sealed once per page, whichever replica needs them.
        let mut sealed: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut absent: Vec<Vec<(usize, &[u8])>> = vec![Vec::new(); n];
        for (s, r) in probed.into_iter().enumerate() {
            let replies = match r {
                Ok(r) => r,
                Err(e) => {
                    last_err = e;
                    continue;
                }
            };
            for ((i, rkey), r) in per[s].iter().zip(replies) {
                match r {
                    Reply::Int(1) => {
                        self.slots[s].stats.dedup_hits += 1;
                        *copies.entry(*i).or_default() += 1;
                    }
                    Reply::Int(0) => {
                        if !sealed.contains_key(i) {
                            let v = self.seal(&hashes[*i], rkey, pages[*i]);
                            sealed.insert(*i, v);
                        }
                        absent[s].push((*i, rkey.as_slice()));
                    }
                    // This copy is not there; the connection is fine.
                    other => {
                        last_err = format!("{}: EXPIRE answered {other:?}", self.slots[s].addr)
                    }
                }
            }
        }
        // Gang: only the holder of a page's reservation sends it; the others wait for it.
        let waiting = if self.cfg.reserve {
            self.reserve(&mut absent, &mut last_err)
        } else {
            vec![Vec::new(); n]
        };
        let writes = absent
            .iter()
            .map(|items| {
                items
                    .iter()
                    .map(|&(i, k)| vec![&b"SET"[..], k, sealed[&i].as_slice(), &b"EX"[..], ttl])
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let written = self.pipeline_all(&writes);
        for (s, r) in written.into_iter().enumerate() {
            let replies = match r {
                Ok(r) => r,
                Err(e) => {
                    last_err = e;
                    continue;
                }
            };
            for ((i, _), r) in absent[s].iter().zip(replies) {
                match r {
                    Reply::Simple(ok) if ok == "OK" => {
                        let st = &mut self.slots[s].stats;
                        st.pages_stored += 1;
                        st.bytes_stored += sealed[i].len() as u64;
                        *copies.entry(*i).or_default() += 1;
                    }
                    // Out of memory, say: this copy is missing, the connection is fine.
                    other => last_err = format!("{}: SET answered {other:?}", self.slots[s].addr),
                }
            }
        }
        if waiting.iter().any(|w| !w.is_empty()) {
            for i in self.await_reserved(waiting, hashes, pages, &mut last_err) {
                *copies.entry(i).or_default() += 1;
            }
        }
        for &i in &unique {
            match copies.get(&i).copied().unwrap_or(0) {
                0 => {
                    return Err(IntermediaryError::Unplaced {
                        key: hex(&hashes[i]),
                        why: last_err,
                    })
                }
                c if c < self.cfg.replicas => self.under_replicated += 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Reserves the pages of `absent` (per intermediary: page index, Redis key): the ones
    /// whose reservation another writer holds leave `absent` and are returned (with their
    /// keys), to wait for; a reservation that cannot be taken for another reason (an error
    /// reply) leaves the page to be written anyway.
    fn reserve(
        &mut self,
        absent: &mut [Vec<(usize, &[u8])>],
        last_err: &mut String,
    ) -> Vec<Vec<(usize, Vec<u8>)>> {
        let lease = RESERVE_LEASE.as_millis().to_string();
        let rkeys: Vec<Vec<Vec<u8>>> = absent
            .iter()
            .map(|items| items.iter().map(|(_, k)| reservation_key(k)).collect())
            .collect();
        let cmds: Vec<Vec<Vec<&[u8]>>> = rkeys
            .iter()
            .map(|keys| {
                keys.iter()
                    .map(|k| {
                        let args: Vec<&[u8]> = vec![
                            &b"SET"[..],
                            k.as_slice(),
                            &b"1"[..],
                            &b"NX"[..],
                            &b"PX"[..],
                            lease.as_bytes(),
                        ];
                        args
                    })
                    .collect()
            })
            .collect();
        let replies = self.pipeline_all(&cmds);
        let mut waiting = vec![Vec::new(); absent.len()];
        for (s, r) in replies.into_iter().enumerate() {
            let replies = match r {
                Ok(r) => r,
                // The writes to this intermediary fail too, with the reason.
                Err(e) => {
                    *last_err = e;
                    continue;
                }
            };
            let mut keep = Vec::with_capacity(absent[s].len());
            for (item, r) in absent[s].iter().zip(replies) {
                match r {
                    // Another writer holds it: wait for its value.
                    Reply::Bulk(None) => waiting[s].push((item.0, item.1.to_vec())),
                    // Ours ("OK"), or no reservation to be had: write it.
                    _ => keep.push(*item),
                }
            }
            absent[s] = keep;
        }
        waiting
    }

    /// Waits until the pages of `waiting` (per intermediary: page index, Redis key), which
    /// other writers reserved, are there: polls one of them (cheap) with a growing pause, then
    /// probes them all (`EXPIRE`, renewing them as a probe hit does). Pages still absent when
    /// the lease has lapsed are written here. Returns the index of each copy now stored.
    fn await_reserved(
        &mut self,
        mut waiting: Vec<Vec<(usize, Vec<u8>)>>,
        hashes: &[ContentHash],
        pages: &[&[u8]],
        last_err: &mut String,
    ) -> Vec<usize> {
        let ttl = self.cfg.ttl_secs.max(1).to_string();
        let ttl = ttl.as_bytes();
        let deadline = std::time::Instant::now() + RESERVE_LEASE;
        let mut pause = Duration::from_millis(1);
        let mut stored = Vec::new();
        while waiting.iter().any(|w| !w.is_empty()) {
            let lapsed = std::time::Instant::now() >= deadline;
            if !lapsed {
                // The last page waited for, per intermediary: its writer sends in order.
                let sentinels: Vec<Vec<Vec<&[u8]>>> = waiting
                    .iter()
                    .map(|w| {
                        w.last()
                            .map(|(_, k)| vec![vec![&b"EXISTS"[..], k.as_slice()]])
                            .unwrap_or_default()
                    })
                    .collect();
                let seen = self.pipeline_all(&sentinels);
                let all_there = seen.iter().zip(&waiting).all(|(r, w)| {
                    w.is_empty() || matches!(r, Ok(r) if r.first() == Some(&Reply::Int(1)))
                });
                if !all_there {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(32));
                    continue;
                }
            }
            let probes: Vec<Vec<Vec<&[u8]>>> = waiting
                .iter()
                .map(|w| {
                    w.iter()
                        .map(|(_, k)| vec![&b"EXPIRE"[..], k.as_slice(), ttl])
                        .collect()
                })
                .collect();
            let probed = self.pipeline_all(&probes);
            let mut still: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); waiting.len()];
            for (s, r) in probed.into_iter().enumerate() {
                match r {
                    Ok(replies) => {
                        for (item, r) in waiting[s].drain(..).zip(replies) {
                            if r == Reply::Int(1) {
                                self.slots[s].stats.waited += 1;
                                self.slots[s].stats.dedup_hits += 1;
                                stored.push(item.0);
                            } else {
                                still[s].push(item);
                            }
                        }
                    }
                    Err(e) => {
                        *last_err = e;
                        waiting[s].clear();
                    }
                }
            }
            waiting = still;
            if lapsed {
                stored.extend(self.take_over(&mut waiting, hashes, pages, last_err));
            }
        }
        stored
    }

    /// Writes the pages of `waiting` whose reservation lapsed (their writer failed or is
    /// stuck): the same sealed value as any writer's, so a late write of theirs is harmless.
    fn take_over(
        &mut self,
        waiting: &mut [Vec<(usize, Vec<u8>)>],
        hashes: &[ContentHash],
        pages: &[&[u8]],
        last_err: &mut String,
    ) -> Vec<usize> {
        let ttl = self.cfg.ttl_secs.max(1).to_string();
        let sealed: Vec<Vec<Vec<u8>>> = waiting
            .iter()
            .map(|w| {
                w.iter()
                    .map(|(i, k)| self.seal(&hashes[*i], k, pages[*i]))
                    .collect()
            })
            .collect();
        let writes: Vec<Vec<Vec<&[u8]>>> = waiting
            .iter()
            .zip(&sealed)
            .map(|(w, v)| {
                w.iter()
                    .zip(v)
                    .map(|((_, k), v)| {
                        let args: Vec<&[u8]> = vec![
                            &b"SET"[..],
                            k.as_slice(),
                            v.as_slice(),
                            &b"EX"[..],
                            ttl.as_bytes(),
                        ];
                        args
                    })
                    .collect()
            })
            .collect();
        let written = self.pipeline_all(&writes);
        let mut stored = Vec::new();
        for (s, r) in written.into_iter().enumerate() {
            match r {
                Ok(replies) => {
                    for (((i, _), v), r) in waiting[s].iter().zip(&sealed[s]).zip(replies) {
                        if matches!(&r, Reply::Simple(ok) if ok == "OK") {
                            let st = &mut self.slots[s].stats;
                            st.takeovers += 1;
                            st.pages_stored += 1;
                            st.bytes_stored += v.len() as u64;
                            stored.push(*i);
                        } else {
                            *last_err = format!("{}: SET answered {r:?}", self.slots[s].addr);
                        }
                    }
                }
                Err(e) => *last_err = e,
            }
            waiting[s].clear();
        }
        stored
    }

    /// Sends `work[s]` (commands, each a list of arguments) to every intermediary `s` at
    /// once — each one's commands queued and flushed before any reply is read, so the
    /// intermediaries work in parallel — then reads the replies, in order. An intermediary
    /// whose connection fails is marked down; its result is the error.
    fn pipeline_all(&mut self, work: &[Vec<Vec<&[u8]>>]) -> Vec<Result<Vec<Reply>, String>> {
        let mut res: Vec<Result<Vec<Reply>, String>> =
            work.iter().map(|_| Ok(Vec::new())).collect();
        for (s, cmds) in work.iter().enumerate() {
            if cmds.is_empty() {
                continue;
            }
            let slot = &mut self.slots[s];
            let Some(conn) = slot.conn.as_mut() else {
                res[s] = Err(format!("{} is down", slot.addr));
                continue;
            };
            let sent = cmds
                .iter()
                .try_for_each(|c| conn.queue(c))
                .and_then(|()| conn.flush());
            if let Err(e) = sent {
                res[s] = Err(e.to_string());
                slot.fail();
            }
        }
        for (s, cmds) in work.iter().enumerate() {
            if cmds.is_empty() || res[s].is_err() {
                continue;
            }
            let slot = &mut self.slots[s];
            let conn = slot.conn.as_mut().expect("queued above");
            match cmds
                .iter()
                .map(|_| conn.read())
                .collect::<Result<Vec<Reply>, RespError>>()
            {
                Ok(r) => res[s] = Ok(r),
                Err(e) => {
                    res[s] = Err(e.to_string());
                    slot.fail();
                }
            }
        }
        res
    }

    /// Reads the pages at `hashes`, in order, each from its home or else its replica. Garbage
    /// (failed MAC, decryption or hash) is never returned: if no replica holds the real page,
    /// the error says which intermediary held what.
    pub fn get(&mut self, hashes: &[ContentHash]) -> Result<Vec<Vec<u8>>, IntermediaryError> {
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(PIPELINE) {
            out.extend(self.get_chunk(chunk)?);
        }
        Ok(out)
    }

    fn get_chunk(&mut self, hashes: &[ContentHash]) -> Result<Vec<Vec<u8>>, IntermediaryError> {
        let mut got: Vec<Option<Vec<u8>>> = vec![None; hashes.len()];
        let mut why: Vec<Option<IntermediaryError>> = (0..hashes.len()).map(|_| None).collect();
        let places: Vec<Vec<usize>> = hashes.iter().map(|h| self.placement(h).collect()).collect();
        for round in 0..self.cfg.replicas {
            let mut per: Vec<Vec<usize>> = vec![Vec::new(); self.slots.len()];
            for (i, p) in places.iter().enumerate() {
                if got[i].is_none() {
                    per[p[round]].push(i);
                }
            }
            let keys: Vec<Vec<Vec<u8>>> = per
                .iter()
                .map(|items| items.iter().map(|&i| self.redis_key(&hashes[i])).collect())
                .collect();
            let work: Vec<Vec<Vec<&[u8]>>> = keys
                .iter()
                .map(|ks| ks.iter().map(|k| vec![&b"GET"[..], k.as_slice()]).collect())
                .collect();
            let read = self.pipeline_all(&work);
            for (s, r) in read.into_iter().enumerate() {
                let addr = self.slots[s].addr;
                let replies = match r {
                    Ok(r) => r,
                    Err(e) => {
                        for &i in &per[s] {
                            why[i] = Some(missing(&hashes[i], e.clone()));
                        }
                        continue;
                    }
                };
                for ((&i, k), r) in per[s].iter().zip(&keys[s]).zip(replies) {
                    match r {
                        Reply::Bulk(Some(v)) => {
                            let n = v.len() as u64;
                            match self.open(&hashes[i], k, v) {
                                Ok(page) => {
                                    let st = &mut self.slots[s].stats;
                                    st.pages_read += 1;
                                    st.bytes_read += n;
                                    got[i] = Some(page);
                                }
                                Err(w) => {
                                    self.slots[s].stats.corrupt += 1;
                                    why[i] = Some(IntermediaryError::Corrupt {
                                        addr,
                                        key: hex(&hashes[i]),
                                        why: w,
                                    });
                                }
                            }
                        }
                        Reply::Bulk(None) => {
                            self.slots[s].stats.misses += 1;
                            // A corrupt copy elsewhere is the more telling error: keep it.
                            if !matches!(why[i], Some(IntermediaryError::Corrupt { .. })) {
                                why[i] = Some(missing(&hashes[i], format!("not at {addr}")));
                            }
                        }
                        other => {
                            why[i] = Some(missing(
                                &hashes[i],
                                format!("{addr}: GET answered {other:?}"),
                            ));
                        }
                    }
                }
            }
        }
        got.into_iter()
            .zip(why)
            .map(|(g, w)| g.ok_or_else(|| w.expect("a page not read has a reason")))
            .collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            intermediaries: self
                .slots
                .iter()
                .map(|s| {
                    let mut st = s.stats.clone();
                    if let Some(c) = &s.conn {
                        st.wire_out += c.bytes_out;
                        st.wire_in += c.bytes_in;
                    }
                    st
                })
                .collect(),
            batch_dups: self.stats_dups,
            under_replicated: self.under_replicated,
        }
    }
}

/// Work for a [`StorePool`] worker.
pub enum Job {
    /// Store whole pages (`pages`: their bytes, concatenated): [`Output::Put`].
    Put {
        /// The caller's label, given back with the result.
        tag: u64,
        /// Whole pages.
        pages: Vec<u8>,
    },
    /// Read the pages at these addresses: [`Output::Get`].
    Get {
        /// The caller's label.
        tag: u64,
        /// Their content addresses.
        hashes: Vec<ContentHash>,
    },
}

/// What a job gave.
#[derive(Debug)]
pub enum Output {
    /// The stored pages' addresses, in order.
    Put(Vec<ContentHash>),
    /// The pages read (checked: MAC or AEAD, and content hash), concatenated in order.
    Get(Vec<u8>),
}

/// A finished job.
#[derive(Debug)]
pub struct Done {
    /// The job's label.
    pub tag: u64,
    /// Its result: the source still holds what a failed put was given.
    pub result: Result<Output, IntermediaryError>,
}

/// Worker threads, each with its own [`PageStore`] (one connection per intermediary per
/// worker), taking jobs from one queue: hashing, sealing and the round trips of several
/// batches overlap, so that the caller's thread never waits for an intermediary and the
/// intermediaries are kept busy (a probe and a write per batch, one batch at a time, held the
/// scatter to a fraction of its link).
pub struct StorePool {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<(usize, Done, StoreStats)>,
    /// Each worker's counters as of its last job.
    stats: Vec<StoreStats>,
    /// Tags of the jobs queued and not finished.
    in_flight: std::collections::HashSet<u64>,
    started: usize,
}

impl StorePool {
    /// `workers` threads named `name`, each with a client like `like` (its own connections).
    /// Threads inherit the caller's seccomp filter.
    pub fn start(like: &PageStore, workers: usize, name: &str) -> Result<Self, IntermediaryError> {
        let (jtx, jrx) = mpsc::channel::<Job>();
        let jrx = Arc::new(Mutex::new(jrx));
        let (dtx, drx) = mpsc::channel();
        let workers = workers.max(1);
        for w in 0..workers {
            let mut store = like.another();
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            std::thread::Builder::new()
                .name(format!("{name}-{w}"))
                .spawn(move || loop {
                    let job = {
                        let q = jrx.lock().unwrap_or_else(|p| p.into_inner());
                        q.recv()
                    };
                    let Ok(job) = job else { return };
                    let (tag, result) = match job {
                        Job::Put { tag, pages } => {
                            let pages: Vec<&[u8]> = pages.chunks(PAGE).collect();
                            (tag, store.put(&pages).map(Output::Put))
                        }
                        Job::Get { tag, hashes } => {
                            (tag, store.get(&hashes).map(|v| Output::Get(v.concat())))
                        }
                    };
                    if dtx.send((w, Done { tag, result }, store.stats())).is_err() {
                        return;
                    }
                })
                .map_err(|e| IntermediaryError::Config(format!("cannot start {name}: {e}")))?;
        }
        Ok(StorePool {
            jobs: Some(jtx),
            done: drx,
            stats: vec![StoreStats::default(); workers],
            in_flight: Default::default(),
            started: workers,
        })
    }

    /// Workers.
    pub fn workers(&self) -> usize {
        self.started
    }

    /// Queues a job (its tag must not be in flight).
    pub fn submit(&mut self, job: Job) -> Result<(), IntermediaryError> {
        let tag = match &job {
            Job::Put { tag, .. } | Job::Get { tag, .. } => *tag,
        };
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| IntermediaryError::Config("the store workers are gone".into()))?;
        self.in_flight.insert(tag);
        Ok(())
    }

    /// Jobs queued and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A finished job, waiting up to `wait` for one; `None` if none finished by then. If the
    /// workers all died (they never do but by a panic), each job they held fails.
    pub fn next(&mut self, wait: Duration) -> Option<Done> {
        let &any = self.in_flight.iter().next()?;
        let got = if wait.is_zero() {
            self.done
                .try_recv()
                .map_err(|e| e == mpsc::TryRecvError::Disconnected)
        } else {
            self.done
                .recv_timeout(wait)
                .map_err(|e| e == mpsc::RecvTimeoutError::Disconnected)
        };
        match got {
            Ok((w, done, stats)) => {
                self.in_flight.remove(&done.tag);
                self.stats[w] = stats;
                Some(done)
            }
            Err(true) => {
                self.in_flight.remove(&any);
                Some(Done {
                    tag: any,
                    result: Err(IntermediaryError::Config("the store workers died".into())),
                })
            }
            Err(false) => None,
        }
    }

    /// The workers' counters, summed.
    pub fn stats(&self) -> StoreStats {
        let mut t = StoreStats::default();
        for s in &self.stats {
            t.add(s);
        }
        t
    }
}

impl Drop for StorePool {
    fn drop(&mut self) {
        // Closing the queue ends the workers after their current job (not waited for: a
        // worker may be stuck in a timeout; it owns nothing the caller needs).
        self.jobs.take();
    }
}

/// Hash slots of a Redis Cluster.
const CLUSTER_SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM), Redis Cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster hash slot of `key` (a non-empty `{tag}` hashes alone, as Redis does).
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|a| {
        let b = key[a + 1..].iter().position(|&b| b == b'}')?;
        (b > 0).then(|| &key[a + 1..a + 1 + b])
    });
    crc16(tagged.unwrap_or(key)) % CLUSTER_SLOTS as u16
}

/// The cluster's masters and which of them owns each slot (`CLUSTER SLOTS` of the first seed
/// that answers). Every slot must be served: a cluster that is not whole is refused.
fn cluster_map(
    seeds: &[SocketAddr],
    timeout: Duration,
    auth: Option<&RedisAuth>,
) -> Result<(Vec<SocketAddr>, Vec<u16>), IntermediaryError> {
    let mut why = String::from("no seed node");
    for (index, &seed) in seeds.iter().enumerate() {
        let reply = connect_auth(seed, timeout, 1 << 20, auth)
            .and_then(|mut c| c.call(&[b"CLUSTER", b"SLOTS"]))
            .map_err(|source| IntermediaryError::Connect { index, source });
        match reply.map(|r| parse_slots(&r)) {
            Ok(Ok(map)) => return Ok(map),
            Ok(Err(e)) => why = format!("{seed}: {e}"),
            Err(e) => why = e.to_string(),
        }
    }
    Err(IntermediaryError::Config(format!("Redis Cluster: {why}")))
}

fn parse_slots(r: &Reply) -> Result<(Vec<SocketAddr>, Vec<u16>), String> {
    let Reply::Array(Some(ranges)) = r else {
        return Err(format!("CLUSTER SLOTS answered {r:?}"));
    };
    let mut masters: Vec<SocketAddr> = Vec::new();
    let mut owner = vec![u16::MAX; CLUSTER_SLOTS];
    for range in ranges {
        let Reply::Array(Some(v)) = range else {
            return Err("a slot range is not an array".into());
        };
        let (Some(Reply::Int(a)), Some(Reply::Int(b)), Some(Reply::Array(Some(node)))) =
            (v.first(), v.get(1), v.get(2))
        else {
            return Err("a slot range without start, end and master".into());
        };
        let (Some(Reply::Bulk(Some(ip))), Some(Reply::Int(port))) = (node.first(), node.get(1))
        else {
            return Err("a master without address".into());
        };
        if !(0..CLUSTER_SLOTS as i64).contains(a) || !(*a..CLUSTER_SLOTS as i64).contains(b) {
            return Err(format!("slot range {a}-{b}"));
        }
        let addr: SocketAddr = format!("{}:{port}", String::from_utf8_lossy(ip))
            .parse()
            .or_else(|_| format!("[{}]:{port}", String::from_utf8_lossy(ip)).parse())
            .map_err(|_| "a master's address does not parse".to_string())?;
        let i = match masters.iter().position(|m| *m == addr) {
            Some(i) => i,
            None => {
                masters.push(addr);
                masters.len() - 1
            }
        };
        owner[*a as usize..=*b as usize].fill(i as u16);
    }
    if let Some(slot) = owner.iter().position(|&o| o == u16::MAX) {
        return Err(format!(
            "slot {slot} is not served (the cluster is not whole)"
        ));
    }
    Ok((masters, owner))
}

fn missing(h: &ContentHash, why: String) -> IntermediaryError {
    IntermediaryError::Missing { key: hex(h), why }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_keys(encrypt: bool, key: &StoreKey) -> PageStore {
        // No connection needed for sealing and opening.
        PageStore {
            cfg: StoreConfig {
                encrypt,
                ..StoreConfig::new(vec!["127.0.0.1:1".parse().unwrap()])
            },
            owner: None,
            keys: Keys::derive(key),
            slots: Vec::new(),
            stats_dups: 0,
            under_replicated: 0,
        }
    }

    #[test]
    fn seal_open_round_trip_and_every_alteration_is_refused() {
        let key = StoreKey::from_bytes([7; 32]);
        for encrypt in [false, true] {
            let s = store_keys(encrypt, &key);
            let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
            let h = content_hash(&page);
            let rk = s.redis_key(&h);
            let v = s.seal(&h, &rk, &page);
            assert_eq!(s.open(&h, &rk, v.clone()).unwrap(), page);
            if encrypt {
                assert_ne!(&v[HEADER..HEADER + page.len()], &page[..], "ciphertext");
                assert!(!rk.ends_with(hex(&h).as_bytes()), "the key hides the hash");
            } else {
                assert!(rk.ends_with(hex(&h).as_bytes()), "content-addressed");
            }
            // Same page, same value: equal pages deduplicate even when encrypted.
            assert_eq!(s.seal(&h, &rk, &page), v);
            for at in [0, 4, 6, HEADER, HEADER + 100, v.len() - 1] {
                let mut bad = v.clone();
                bad[at] ^= 0x40;
                assert!(
                    s.open(&h, &rk, bad).is_err(),
                    "flip at {at} encrypt={encrypt}"
                );
            }
            assert!(s.open(&h, &rk, v[..v.len() - 1].to_vec()).is_err());
            // A genuine value moved under another key.
            let other: Vec<u8> = vec![1; 4096];
            let ho = content_hash(&other);
            let rko = s.redis_key(&ho);
            assert!(s.open(&ho, &rko, v.clone()).is_err());
            // A value sealed under another migration's key.
            let s2 = store_keys(encrypt, &StoreKey::from_bytes([8; 32]));
            assert!(s.open(&h, &rk, s2.seal(&h, &rk, &page)).is_err());
            assert_ne!(s2.redis_key(&h), rk, "other keys, other namespace");
        }
    }

    #[test]
    fn cluster_key_slots_are_redis_s() {
        // Redis Cluster specification's test vector, and its hash-tag rule.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"123456789"), 0x31c3 & 0x3fff);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), crc16(b"{bar") % 16384);
    }

    #[test]
    fn store_key_is_not_printed() {
        let k = StoreKey::generate().unwrap();
        assert_eq!(format!("{k:?}"), "StoreKey(..)");
        assert_ne!(k.as_bytes(), StoreKey::generate().unwrap().as_bytes());
    }
}
