//! Scatter-Gather's intermediary store against real `redis-server` processes on loopback:
//! content addressing and dedup, spreading over two servers, garbage refused, a killed
//! intermediary with and without a replica, a hostile server, and the destination's page
//! server gathering from them (userfaultfd on real guest memory).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use base_vmm::memory::GuestRam;
use base_vmm::page_server::{Fetched, PageError, PageServer, PageSource, PageStats};
use l1_services::migration::intermediary::{
    content_hash, IntermediaryError, PageStore, RedisAuth, StoreConfig, StoreKey,
};
use l1_services::migration::resp::{Reply, Resp, RespError};
use l1_services::migration::scatter::{AheadRead, GatherPolicy, GatherSource, Locations, Scatter};
use netlab::RedisServer;

const PAGE: usize = 4096;

fn servers(test: &str, n: usize) -> Option<(tempdir::Dir, Vec<RedisServer>)> {
    if !netlab::can_run(test, RedisServer::available()) {
        return None;
    }
    let dir = tempdir::Dir::new(test);
    let s = (0..n)
        .map(|_| RedisServer::start(dir.path()).expect("start redis-server"))
        .collect();
    Some((dir, s))
}

mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("sg-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Page `i` of a VM whose pages repeat every `distinct` pages (its content is a function of
/// `i % distinct` and `seed`).
fn page(seed: u32, i: usize, distinct: usize) -> Vec<u8> {
    let k = (i % distinct) as u32;
    (0..PAGE / 4)
        .flat_map(|w| {
            (seed ^ k.wrapping_mul(2654435761) ^ (w as u32).wrapping_mul(40503)).to_le_bytes()
        })
        .collect()
}

fn addrs(s: &[RedisServer]) -> Vec<SocketAddr> {
    s.iter().map(|s| s.addr()).collect()
}

fn raw(addr: SocketAddr) -> Resp {
    Resp::connect(addr, Duration::from_secs(5), 16 << 20).unwrap()
}

fn dbsize(addr: SocketAddr) -> i64 {
    match raw(addr).call(&[b"DBSIZE"]).unwrap() {
        Reply::Int(n) => n,
        other => panic!("DBSIZE: {other:?}"),
    }
}

fn keys(addr: SocketAddr) -> Vec<Vec<u8>> {
    match raw(addr).call(&[b"KEYS", b"sg1:*"]).unwrap() {
        Reply::Array(Some(k)) => k
            .into_iter()
            .map(|r| match r {
                Reply::Bulk(Some(k)) => k,
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("KEYS: {other:?}"),
    }
}

#[test]
fn identical_pages_are_stored_once_spread_over_two_servers() {
    let Some((_dir, srv)) = servers("sg_dedup", 2) else {
        return;
    };
    let key = StoreKey::generate().unwrap();
    // VM A: 1000 pages, 300 distinct (70 % repeats within the VM).
    let a: Vec<Vec<u8>> = (0..1000).map(|i| page(1, i, 300)).collect();
    let mut store = PageStore::connect(StoreConfig::new(addrs(&srv)), &key).unwrap();
    let refs: Vec<&[u8]> = a.iter().map(|p| p.as_slice()).collect();
    let t = Instant::now();
    let ha = store.put(&refs).unwrap();
    let put_time = t.elapsed();
    assert_eq!(ha[7], content_hash(&a[7]));
    let st = store.stats();
    let stored: u64 = st.intermediaries.iter().map(|i| i.pages_stored).sum();
    assert_eq!(stored, 300, "each distinct page stored once: {st:?}");
    assert_eq!(st.dedup_hits(), 700, "{st:?}");
    for i in &st.intermediaries {
        assert!(i.pages_stored > 50, "spread by hash: {st:?}");
    }
    assert_eq!(dbsize(srv[0].addr()) + dbsize(srv[1].addr()), 300);

    // VM B of the same migration group (same key): half its pages are A's.
    let b: Vec<Vec<u8>> = (0..400)
        .map(|i| {
            if i % 2 == 0 {
                page(1, i / 2, 300)
            } else {
                page(2, i, 400)
            }
        })
        .collect();
    let mut store_b = PageStore::connect(StoreConfig::new(addrs(&srv)), &key).unwrap();
    let refs: Vec<&[u8]> = b.iter().map(|p| p.as_slice()).collect();
    let hb = store_b.put(&refs).unwrap();
    let st = store_b.stats();
    let hits: u64 = st.intermediaries.iter().map(|i| i.dedup_hits).sum();
    assert_eq!(
        hits, 200,
        "B's copies of A's pages are not sent again: {st:?}"
    );
    assert_eq!(dbsize(srv[0].addr()) + dbsize(srv[1].addr()), 500);

    // The destination (its own connections, the key received over TLS) reads both back.
    let mut dst = PageStore::connect(
        StoreConfig::new(addrs(&srv)),
        &StoreKey::from_bytes(*key.as_bytes()),
    )
    .unwrap();
    let t = Instant::now();
    let got = dst.get(&ha).unwrap();
    let get_time = t.elapsed();
    assert!(got == a, "VM A's pages read back intact");
    // For docs/scatter-gather.md (not asserted: a loaded machine is slower).
    eprintln!(
        "put 1000 pages (300 distinct) in {put_time:?}, get 1000 in {get_time:?}: {:.0} / {:.0} pages/s",
        1000.0 / put_time.as_secs_f64(),
        1000.0 / get_time.as_secs_f64()
    );
    let got = dst.get(&hb).unwrap();
    assert!(got == b, "VM B's pages read back intact");
    let st = dst.stats();
    assert_eq!(
        st.intermediaries.iter().map(|i| i.pages_read).sum::<u64>(),
        1400
    );
    assert_eq!(st.intermediaries.iter().map(|i| i.corrupt).sum::<u64>(), 0);

    // Another migration (another key) shares nothing and cannot read these pages.
    let mut other = PageStore::connect(
        StoreConfig::new(addrs(&srv)),
        &StoreKey::generate().unwrap(),
    )
    .unwrap();
    assert!(matches!(
        other.get(&ha[..1]),
        Err(IntermediaryError::Missing { .. })
    ));
}

#[test]
fn garbage_under_a_key_is_detected_and_refused() {
    let Some((_dir, srv)) = servers("sg_garbage", 2) else {
        return;
    };
    for encrypt in [false, true] {
        let key = StoreKey::generate().unwrap();
        let cfg = StoreConfig {
            encrypt,
            ..StoreConfig::new(addrs(&srv))
        };
        let pages: Vec<Vec<u8>> = (0..64).map(|i| page(9, i, 64)).collect();
        let mut store = PageStore::connect(cfg.clone(), &key).unwrap();
        let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
        let h = store.put(&refs).unwrap();
        if encrypt {
            // The intermediary never sees a page's bytes, nor its hash.
            for s in &srv {
                for k in keys(s.addr()) {
                    let Reply::Bulk(Some(v)) = raw(s.addr()).call(&[b"GET", &k]).unwrap() else {
                        panic!("value")
                    };
                    for p in &pages {
                        assert!(
                            !v.windows(32).any(|w| w == &p[100..132]),
                            "plaintext stored"
                        );
                    }
                    let ks = String::from_utf8_lossy(&k).into_owned();
                    assert!(h.iter().all(|h| !ks.contains(&hex(h))), "hash in key");
                }
            }
        }
        // Tamper at the intermediary: a flipped byte (0), a truncated value (1), another
        // page's genuine value (2), a value of another migration's key (3), plain junk (4).
        let home = |i: usize| store.placement(&h[i]).next().unwrap();
        let rk = |i: usize| store.redis_key(&h[i]);
        let value = |i: usize| match raw(srv[home(i)].addr()).call(&[b"GET", &rk(i)]).unwrap() {
            Reply::Bulk(Some(v)) => v,
            other => panic!("{other:?}"),
        };
        let mut flipped = value(0);
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        let truncated = value(1)[..100].to_vec();
        let swapped = value(5);
        let foreign = {
            let other = PageStore::connect(cfg.clone(), &StoreKey::generate().unwrap()).unwrap();
            other.seal(&h[3], &rk(3), &pages[3])
        };
        let junk = b"not a page at all".to_vec();
        for (i, v) in [flipped, truncated, swapped, foreign, junk]
            .iter()
            .enumerate()
        {
            let r = raw(srv[home(i)].addr()).call(&[b"SET", &rk(i), v]).unwrap();
            assert_eq!(r, Reply::Simple("OK".into()));
        }
        let mut dst = PageStore::connect(cfg.clone(), &key).unwrap();
        for i in 0..5 {
            match dst.get(&h[i..=i]) {
                Err(IntermediaryError::Corrupt { addr, key, .. }) => {
                    assert_eq!(addr, srv[home(i)].addr());
                    assert_eq!(key, hex(&h[i]));
                }
                other => panic!("tampered value {i} (encrypt={encrypt}): {other:?}"),
            }
        }
        // The untouched pages are still served, and the batch with a bad one is refused whole.
        assert_eq!(dst.get(&h[5..]).unwrap(), pages[5..].to_vec());
        assert!(dst.get(&h).is_err());
        let st = dst.stats();
        assert_eq!(st.intermediaries.iter().map(|i| i.corrupt).sum::<u64>(), 10);
        for s in &srv {
            raw(s.addr()).call(&[b"FLUSHALL"]).unwrap();
        }
    }
}

#[test]
fn a_killed_intermediary_loses_no_page_with_two_replicas() {
    let Some((_dir, mut srv)) = servers("sg_kill", 2) else {
        return;
    };
    let key = StoreKey::generate().unwrap();
    let pages: Vec<Vec<u8>> = (0..500).map(|i| page(3, i, 500)).collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
    let two = StoreConfig {
        replicas: 2,
        ..StoreConfig::new(addrs(&srv))
    };
    let mut src = PageStore::connect(two.clone(), &key).unwrap();
    let h = src.put(&refs).unwrap();
    assert_eq!(dbsize(srv[0].addr()), 500);
    assert_eq!(dbsize(srv[1].addr()), 500);
    // The gatherer is connected to both when one dies mid-gather.
    let mut dst = PageStore::connect(two.clone(), &key).unwrap();
    assert_eq!(dst.get(&h[..100]).unwrap(), pages[..100].to_vec());
    srv[0].kill();
    assert_eq!(dst.get(&h).unwrap(), pages, "every page from the survivor");
    let st = dst.stats();
    assert!(st.intermediaries[0].down, "{st:?}");
    assert!(st.intermediaries[1].pages_read >= 500, "{st:?}");
    // A gatherer that starts after the death, and more pages scattered meanwhile.
    let mut late = PageStore::connect(two.clone(), &key).unwrap();
    assert_eq!(late.get(&h).unwrap(), pages);
    let more: Vec<Vec<u8>> = (0..50).map(|i| page(4, i, 50)).collect();
    let refs: Vec<&[u8]> = more.iter().map(|p| p.as_slice()).collect();
    let hm = src.put(&refs).unwrap();
    assert_eq!(src.stats().under_replicated, 50);
    assert_eq!(late.get(&hm).unwrap(), more);

    // One copy only: the dead intermediary's pages are missing — an error, never garbage
    // and never a hang — and storing a page whose only home is dead fails (the source
    // still holds it).
    let one = StoreConfig::new(addrs(&srv));
    let mut single = PageStore::connect(one, &key).unwrap();
    let lost: Vec<usize> = (0..h.len())
        .filter(|&i| single.placement(&h[i]).next() == Some(0))
        .collect();
    assert!(!lost.is_empty());
    assert!(matches!(
        single.get(&h[lost[0]..=lost[0]]),
        Err(IntermediaryError::Missing { .. })
    ));
    let fresh: Vec<Vec<u8>> = (0..64).map(|i| page(5, i, 64)).collect();
    let refs: Vec<&[u8]> = fresh.iter().map(|p| p.as_slice()).collect();
    assert!(matches!(
        single.put(&refs),
        Err(IntermediaryError::Unplaced { .. })
    ));
}

#[test]
fn a_hostile_server_gets_an_error_not_our_memory() {
    // A "Redis" that announces a 1 TB bulk reply, then one that never answers.
    for (case, reply) in [&b"$1000000000000\r\n"[..], b""].into_iter().enumerate() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reply = reply.to_vec();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 256];
            let _ = s.read(&mut b);
            s.write_all(&reply).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
        });
        let mut c = Resp::connect(addr, Duration::from_millis(500), 1 << 20).unwrap();
        match (case, c.call(&[b"GET", b"k"])) {
            (0, Err(RespError::Protocol { .. })) | (1, Err(RespError::Io { .. })) => {}
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What page `p` of the gather test's VM holds: 1200 distinct pages over 2048, so the
/// scatter deduplicates too.
fn vm_page(p: u64) -> Vec<u8> {
    page(7, p as usize, 1200)
}

/// The link in the gather test: pages asked for are answered (placed) by a thread, as the
/// source answers a `fault` frame; it also pushes the pages that went direct.
struct Link(mpsc::Sender<Range<u64>>);

impl PageSource for Link {
    fn fetch(&mut self, run: Range<u64>, _: &mut [u8]) -> Result<Fetched, PageError> {
        self.0
            .send(run)
            .map_err(|e| PageError::Source(e.to_string()))?;
        Ok(Fetched::Later)
    }
}

#[test]
fn the_page_server_gathers_from_intermediaries_rate_capped_through_a_death() {
    let Some((_dir, mut srv)) = servers("sg_gather", 2) else {
        return;
    };
    const PAGES: u64 = 2048;
    const SCATTERED: u64 = 1536;
    const RATE: u64 = 16 << 20;
    const RUN: u64 = 32;
    let key = StoreKey::generate().unwrap();
    let cfg = StoreConfig {
        replicas: 2,
        encrypt: true,
        ..StoreConfig::new(addrs(&srv))
    };
    // The scatter: pages 0..SCATTERED to the intermediaries, their locations to the
    // destination; the rest go direct.
    let locs = Locations::new();
    let mut src = PageStore::connect(cfg.clone(), &key).unwrap();
    for first in (0..SCATTERED).step_by(256) {
        let pages: Vec<Vec<u8>> = (first..first + 256).map(vm_page).collect();
        let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
        locs.add(first, &src.put(&refs).unwrap());
    }
    let scattered_stats = src.stats();
    assert_eq!(
        scattered_stats
            .intermediaries
            .iter()
            .map(|i| i.pages_stored)
            .sum::<u64>(),
        2 * 1200,
        "each distinct page stored once per replica: {scattered_stats:?}"
    );

    let ram = Arc::new(GuestRam::new(PAGES * PAGE as u64).unwrap());
    let stats = Arc::new(PageStats::default());
    let wanted = PageServer::bitmap_of(PAGES, &[(0, PAGES)]);
    let server = PageServer::register(&ram, wanted, stats.clone()).unwrap();
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Range<u64>>();
    let dst = PageStore::connect(cfg.clone(), &key).unwrap();
    let mut source = GatherSource::new(dst, locs.clone(), Link(tx));
    let mut policy = GatherPolicy::new(locs.clone(), RUN, Some(RATE));
    let t0 = Instant::now();
    let gather = std::thread::scope(|s| {
        let server = &server;
        let stop = &stop;
        let serving = s.spawn(move || {
            server
                .serve_until(&mut source, &mut policy, stop)
                .map(|()| source.stats())
        });
        s.spawn(move || {
            for first in (SCATTERED..PAGES).step_by(64) {
                let data: Vec<u8> = (first..first + 64).flat_map(vm_page).collect();
                server.place(first, &data).unwrap();
            }
            for run in rx {
                let data: Vec<u8> = run.clone().flat_map(vm_page).collect();
                server.place(run.start, &data).unwrap();
            }
        });
        // The guest touches a scattered page, another, and a direct one.
        let r = ram.clone();
        let got = s
            .spawn(move || {
                [5u64, 900, 2000].map(|p| {
                    let mut b = vec![0u8; PAGE];
                    r.read(p * PAGE as u64, &mut b).unwrap();
                    b == vm_page(p)
                })
            })
            .join()
            .unwrap();
        assert_eq!(got, [true; 3]);
        // An intermediary dies mid-gather: its pages come from their replicas.
        while stats.prefetched.load(Ordering::Relaxed) < 200 {
            std::thread::sleep(Duration::from_millis(5));
        }
        srv[0].kill();
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.remaining() > 0 {
            assert!(
                Instant::now() < deadline,
                "gather stuck: {} left",
                server.remaining()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Release);
        serving.join().unwrap().unwrap()
    });
    let elapsed = t0.elapsed();
    eprintln!(
        "gathered {} pages ({} runs, {} to the link) in {elapsed:?} at a 16 MiB/s cap; src→intermediaries {:?} B, intermediaries→dst {:?} B",
        gather.pages,
        gather.runs,
        gather.direct_runs,
        scattered_stats.intermediaries.iter().map(|i| i.wire_out).collect::<Vec<_>>(),
        gather.store.intermediaries.iter().map(|i| i.wire_in).collect::<Vec<_>>(),
    );
    // Every page placed once, and right.
    assert_eq!(stats.placed.load(Ordering::Relaxed), PAGES);
    server.finish().unwrap();
    for p in 0..PAGES {
        let mut b = vec![0u8; PAGE];
        ram.read(p * PAGE as u64, &mut b).unwrap();
        assert!(b == vm_page(p), "page {p}");
    }
    // Scattered pages came from the intermediaries (faults too), none from the link.
    let prefetched = stats.prefetched.load(Ordering::Relaxed);
    // Read once each — but a page the guest faulted on inside a gather run already chosen
    // is read again with that run (and placed once: `placed` above). Two faults, so at most
    // two runs' worth.
    assert!(
        (SCATTERED..=SCATTERED + 2 * RUN).contains(&gather.pages),
        "{gather:?}"
    );
    assert!(prefetched >= SCATTERED - 2, "{prefetched}");
    assert!(gather.store.intermediaries[0].down, "{gather:?}");
    assert_eq!(
        gather
            .store
            .intermediaries
            .iter()
            .map(|i| i.corrupt)
            .sum::<u64>(),
        0
    );
    // The cap: the gather's intake never exceeds RATE beyond one run's burst (a lower bound
    // on the time taken, which a loaded machine only lengthens).
    let min = Duration::from_secs_f64((prefetched - RUN) as f64 * PAGE as f64 / RATE as f64);
    assert!(
        elapsed >= min,
        "gathered {prefetched} pages in {elapsed:?} (cap: {min:?})"
    );
}

#[test]
fn a_redis_cluster_is_one_pool_of_intermediaries() {
    if !netlab::can_run("sg_cluster", RedisServer::available()) {
        return;
    }
    let dir = tempdir::Dir::new("sg_cluster");
    let srv = RedisServer::start_cluster(dir.path(), 3).expect("a 3-master cluster");
    let key = StoreKey::generate().unwrap();
    // One seed node is enough: the store learns the masters and their slots.
    let cfg = StoreConfig {
        cluster: true,
        encrypt: true,
        ..StoreConfig::new(vec![srv[1].addr()])
    };
    let pages: Vec<Vec<u8>> = (0..600).map(|i| page(11, i, 600)).collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
    let mut src = PageStore::connect(cfg.clone(), &key).unwrap();
    let h = src.put(&refs).unwrap();
    let st = src.stats();
    assert_eq!(st.intermediaries.len(), 3, "{st:?}");
    let sizes: Vec<i64> = srv.iter().map(|s| dbsize(s.addr())).collect();
    assert_eq!(sizes.iter().sum::<i64>(), 600, "{sizes:?}");
    assert!(
        sizes.iter().all(|&n| n > 100),
        "spread over the masters: {sizes:?}"
    );
    // Each page is on the master that owns its key's slot (the server agrees).
    for i in (0..600).step_by(37) {
        let rk = src.redis_key(&h[i]);
        let home = st.intermediaries[src.placement(&h[i]).next().unwrap()]
            .addr
            .parse()
            .unwrap();
        assert_eq!(
            raw(home).call(&[b"CLUSTER", b"KEYSLOT", &rk]).unwrap(),
            Reply::Int(l1_services::migration::intermediary::key_slot(&rk) as i64)
        );
        assert!(matches!(
            raw(home).call(&[b"EXISTS", &rk]).unwrap(),
            Reply::Int(1)
        ));
    }
    let mut dst = PageStore::connect(cfg.clone(), &key).unwrap();
    assert_eq!(dst.get(&h).unwrap(), pages);
    // The cluster replicates by itself; two copies of ours are refused.
    let two = StoreConfig {
        replicas: 2,
        ..cfg.clone()
    };
    assert!(matches!(
        PageStore::connect(two, &key),
        Err(IntermediaryError::Config(_))
    ));
    // A plain server is not a cluster seed.
    let plain = RedisServer::start(dir.path()).unwrap();
    let e = PageStore::connect(
        StoreConfig {
            cluster: true,
            ..StoreConfig::new(vec![plain.addr()])
        },
        &key,
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("Redis Cluster"), "{e}");
}

/// Sets a socket buffer size (fixed: no autotuning, so what piles up does not depend on the
/// machine).
fn sock_buf(s: &std::net::TcpStream, opt: libc::c_int, size: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt with a valid int option on our own socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

#[test]
fn the_source_scatters_what_a_slow_link_cannot_take_each_page_once() {
    use std::os::fd::AsRawFd;
    let Some((_dir, srv)) = servers("sg_scatter", 2) else {
        return;
    };
    const PAGES: u64 = 2048;
    const BATCH: u64 = 16;
    // The destination reads its link at 1 MiB/s: far below what the source sends.
    const LINK_RATE: f64 = (1 << 20) as f64;
    let mem: Vec<u8> = (0..PAGES).flat_map(vm_page).collect();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (rx, _) = l.accept().unwrap();
    sock_buf(&tx, libc::SO_SNDBUF, 128 << 10);
    sock_buf(&rx, libc::SO_RCVBUF, 128 << 10);
    let receiver = std::thread::spawn(move || {
        // Frames of this test's link: page number (u64), then the page.
        let mut rx = rx;
        let t = Instant::now();
        let mut got = std::collections::HashMap::new();
        let mut frame = vec![0u8; 8 + PAGE];
        let mut bytes = 0u64;
        loop {
            match rx.read_exact(&mut frame) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("{e}"),
            }
            bytes += frame.len() as u64;
            let p = u64::from_le_bytes(frame[..8].try_into().unwrap());
            assert!(
                got.insert(p, frame[8..].to_vec()).is_none(),
                "page {p} twice"
            );
            let due = Duration::from_secs_f64(bytes as f64 / LINK_RATE);
            if let Some(wait) = due.checked_sub(t.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        got
    });
    let key = StoreKey::generate().unwrap();
    let cfg = StoreConfig::new(addrs(&srv));
    let mut scatter = Scatter::new(PageStore::connect(cfg.clone(), &key).unwrap(), 32 << 10);
    let locs = Locations::new();
    let fd = tx.as_raw_fd();
    let t = Instant::now();
    for first in (0..PAGES).step_by(BATCH as usize) {
        let data = &mem[first as usize * PAGE..(first + BATCH) as usize * PAGE];
        let sent = scatter
            .send(first, data, fd, 0, |first, data| {
                for (i, page) in data.chunks_exact(PAGE).enumerate() {
                    tx.write_all(&(first + i as u64).to_le_bytes())?;
                    tx.write_all(page)?;
                }
                Ok(())
            })
            .unwrap();
        if let Some(rec) = sent {
            let pages: Vec<u64> = rec.pages().map(|(p, _)| p).collect();
            assert_eq!(pages, (first..first + BATCH).collect::<Vec<_>>());
            locs.add(first, &rec.hashes);
        }
    }
    // Eviction: every page is on the link (handed to the kernel) or at an intermediary.
    let eviction = t.elapsed();
    drop(tx);
    let direct = receiver.join().unwrap();
    let total = t.elapsed();
    let st = scatter.stats.clone();
    eprintln!(
        "scatter of {PAGES} pages over a 1 MiB/s link: {} direct, {} to 2 intermediaries; eviction {eviction:?}, link drained {total:?}",
        st.direct_pages, st.scattered_pages
    );
    // Each page exactly once: on the link or located, never both, none missing.
    assert_eq!(st.direct_pages + st.scattered_pages, PAGES);
    assert_eq!(direct.len() as u64, st.direct_pages);
    assert_eq!(locs.len() as u64, st.scattered_pages);
    assert!(
        st.direct_pages >= BATCH,
        "the idle link is used first: {st:?}"
    );
    assert!(
        st.scattered_pages > PAGES / 2,
        "the slow link's excess scattered: {st:?}"
    );
    for p in 0..PAGES {
        assert!(direct.contains_key(&p) != locs.get(p).is_some(), "page {p}");
    }
    // The destination reassembles the VM from both.
    let mut dst = PageStore::connect(cfg, &key).unwrap();
    for p in 0..PAGES {
        let page = match locs.get(p) {
            Some(h) => dst.get(&[h]).unwrap().remove(0),
            None => direct[&p].clone(),
        };
        assert!(page == vm_page(p), "page {p}");
    }
}

#[test]
fn intermediaries_that_require_a_password() {
    if !netlab::can_run("sg_auth", RedisServer::available()) {
        return;
    }
    let dir = tempdir::Dir::new("sg_auth");
    let srv = RedisServer::start_args(dir.path(), &["--requirepass", "s3cret"]).unwrap();
    let key = StoreKey::generate().unwrap();
    let pages: Vec<Vec<u8>> = (0..8).map(|i| page(12, i, 8)).collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
    // Without credentials nothing is stored, and the error says why.
    let mut anon = PageStore::connect(StoreConfig::new(vec![srv.addr()]), &key).unwrap();
    let e = anon.put(&refs).unwrap_err().to_string();
    assert!(e.contains("NOAUTH"), "{e}");
    // Wrong ones are refused at once.
    let with = |password: &str| StoreConfig {
        auth: Some(RedisAuth {
            user: None,
            password: password.into(),
        }),
        ..StoreConfig::new(vec![srv.addr()])
    };
    let e = PageStore::connect(with("wrong"), &key)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("AUTH refused"), "{e}");
    let mut src = PageStore::connect(with("s3cret"), &key).unwrap();
    let h = src.put(&refs).unwrap();
    let mut dst = PageStore::connect(with("s3cret"), &key).unwrap();
    assert_eq!(dst.get(&h).unwrap(), pages);
}

/// The scatter's workers and the gather's readers: every batch stored once and located, a
/// batch the intermediaries cannot take given back whole, every run read back intact; the
/// stages timed (printed, not asserted: the machine is shared).
#[test]
fn scatter_workers_store_every_batch_once_and_readers_give_them_back() {
    let Some((_dir, mut srv)) = servers("sg_workers", 2) else {
        return;
    };
    const PAGES: usize = 8192; // 32 MiB
    const BATCH: usize = 64;
    // Every 8th page is one and the same page: dedup within batches and across batches and
    // workers; the others all differ.
    let mem: Vec<u8> = (0..PAGES)
        .flat_map(|i| page(3, i, if i % 8 == 0 { 8 } else { PAGES }))
        .collect();
    let key = StoreKey::generate().unwrap();
    let cfg = StoreConfig::new(addrs(&srv));

    // Stages, one thread: hashing alone, sealing (hash + MAC), a store's put (probe + write).
    let t = Instant::now();
    let hashes: Vec<_> = mem.chunks(PAGE).map(content_hash).collect();
    let hash_s = t.elapsed().as_secs_f64();
    let one = PageStore::connect(cfg.clone(), &key).unwrap();
    let t = Instant::now();
    for (p, h) in mem.chunks(PAGE).zip(&hashes) {
        std::hint::black_box(one.seal(h, &one.redis_key(h), p));
    }
    let seal_s = t.elapsed().as_secs_f64();
    let mb = (PAGES * PAGE) as f64 / 1e6;

    let mut put_rate = Vec::new();
    for workers in [1usize, 4] {
        // A key of its own per pass: nothing is there yet.
        let key = StoreKey::generate().unwrap();
        let mut sc = Scatter::new(PageStore::connect(cfg.clone(), &key).unwrap(), 0);
        sc.start_workers(workers).unwrap();
        let locs = Locations::new();
        let t = Instant::now();
        let mut next = 0usize;
        let mut done = 0usize;
        while done < PAGES / BATCH {
            while next < PAGES && sc.has_room() {
                let present = vec![u64::MAX];
                let bytes = mem[next * PAGE..(next + BATCH) * PAGE].to_vec();
                sc.queue(next as u64, BATCH as u16, present, bytes).unwrap();
                next += BATCH;
            }
            let rec = sc
                .finished(Duration::from_secs(10))
                .expect("a batch finishes")
                .expect("stored");
            assert_eq!(rec.span as usize, BATCH);
            for (p, h) in rec.pages() {
                assert_eq!(h, &hashes[p as usize], "page {p}'s address");
                assert!(locs.get(p).is_none(), "page {p} located twice");
                locs.add(p, std::slice::from_ref(h));
            }
            done += 1;
        }
        let put_s = t.elapsed().as_secs_f64();
        put_rate.push(mb / put_s);
        assert_eq!(locs.len(), PAGES);
        assert_eq!(sc.in_flight(), 0);
        let st = sc.store_stats();
        let stored: u64 = st.intermediaries.iter().map(|i| i.pages_stored).sum();
        // Stored once each, but for the repeated page's first copies: the batches in flight
        // together (two per worker) may each find it absent and write it.
        let distinct = (PAGES - PAGES / 8 + 1) as u64;
        let race = 2 * workers as u64;
        assert!(
            stored >= distinct && stored <= distinct + race,
            "{stored} values stored for {distinct} distinct pages ({workers} workers)"
        );
        assert!(st.dedup_hits() + race >= (PAGES / 8 - 1) as u64, "{st:?}");

        // Read back by the gather's readers, out of order, intact.
        let dst = PageStore::connect(cfg.clone(), &key).unwrap();
        let mut g = GatherSource::new(dst, locs.clone(), Link(mpsc::channel().0));
        g.start_ahead(4).unwrap();
        let mut buf = vec![0u8; BATCH * PAGE];
        let t = Instant::now();
        let mut runs: Vec<u64> = (0..(PAGES / BATCH) as u64).rev().collect();
        let mut got = 0;
        while got < PAGES / BATCH {
            while g.ahead_room() {
                let Some(r) = runs.pop() else { break };
                let a = r * BATCH as u64;
                g.ahead_submit(a..a + BATCH as u64, &mut buf).unwrap();
            }
            match g.ahead_finished(Duration::from_secs(10)).unwrap() {
                Some(AheadRead::Pages(run, bytes)) => {
                    let at = run.start as usize * PAGE;
                    assert!(bytes == mem[at..at + bytes.len()], "run {run:?}");
                    got += 1;
                }
                Some(AheadRead::AskedDirect(run)) => panic!("run {run:?} not read"),
                None => panic!("no read finished in 10 s"),
            }
        }
        let get_s = t.elapsed().as_secs_f64();
        eprintln!(
            "{workers} scatter workers: put {:.0} MB/s; 4 gather readers: get {:.0} MB/s",
            mb / put_s,
            mb / get_s
        );
    }
    eprintln!(
        "stages over {mb:.0} MB, one thread: SHA-256 {:.0} MB/s, seal (hash + HMAC) {:.0} MB/s",
        mb / hash_s,
        mb / seal_s
    );

    // An intermediary gone with one copy: the batches whose pages lived there come back
    // whole, the others are stored.
    srv[1].kill();
    let mut sc = Scatter::new(PageStore::connect(cfg.clone(), &key).unwrap(), 0);
    sc.start_workers(2).unwrap();
    let fresh: Vec<u8> = (0..BATCH * 4)
        .flat_map(|i| page(99, i, usize::MAX))
        .collect();
    for b in 0..4 {
        let bytes = fresh[b * BATCH * PAGE..(b + 1) * BATCH * PAGE].to_vec();
        sc.queue((b * BATCH) as u64, BATCH as u16, vec![u64::MAX], bytes)
            .unwrap();
    }
    let mut back = 0;
    while let Some(r) = sc.finished(Duration::from_secs(10)) {
        let u = r.expect_err("64 fresh pages: some live on the dead intermediary");
        assert_eq!(
            (u.span as usize, u.present.clone()),
            (BATCH, vec![u64::MAX])
        );
        back += 1;
    }
    assert_eq!(back, 4, "every batch given back");
    assert_eq!(sc.in_flight(), 0);
}
