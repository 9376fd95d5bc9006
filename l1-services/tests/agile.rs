//! Agile migration's host side against real `redis-server` processes: cold pages of guest RAM
//! pushed to two intermediaries (encrypted, two replicas), evicted from the memfd, and brought
//! back by touch through the evictor's userfaultfd service, from a replica once an
//! intermediary is killed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base_vmm::evict::Evictor;
use base_vmm::memory::{GuestRam, PAGE_SIZE};
use l1_services::migration::agile::Parked;
use l1_services::migration::intermediary::{StoreConfig, StoreKey};
use netlab::RedisServer;

const PAGES: u64 = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// Page `p`'s bytes at generation `g`; pages repeat every 1000 (dedup at the store).
fn content(p: u64, g: u8) -> Vec<u8> {
    let k = p % 1000;
    (0..PAGE / 8)
        .flat_map(|w| {
            (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w as u64 ^ u64::from(g) << 56).to_le_bytes()
        })
        .collect()
}

/// Stops the fault server when the scope's body ends, a failed assertion included: the scope
/// would otherwise wait for the server for ever (a hang instead of a failure).
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn cold_pages_parked_at_redis_come_back_on_touch_through_a_death() {
    let test = "agile-parked";
    if !netlab::can_run(test, RedisServer::available()) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("agile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(&dir).expect("start redis-server"))
        .collect();
    let mut cfg = StoreConfig::new(redis.iter().map(|r| r.addr()).collect());
    cfg.encrypt = true;
    cfg.replicas = 2;
    let parked = Parked::connect(&cfg, &StoreKey::generate().unwrap()).unwrap();

    let ram = Arc::new(GuestRam::new(PAGES * PAGE_SIZE * 2).unwrap());
    for p in 0..PAGES {
        ram.write(p * PAGE_SIZE, &content(p, 0)).unwrap();
    }
    let ev = Evictor::register(&ram).unwrap();
    // Cold: pages 512..PAGES. 64 of them are written after the push: they must stay.
    let cold: Vec<u64> = (512..PAGES).collect();
    assert_eq!(parked.push(&ram, &cold).unwrap(), cold.len() as u64);
    for p in 1000..1064 {
        ram.write(p * PAGE_SIZE, &content(p, 9)).unwrap();
    }
    let before = ram.allocated_bytes();
    let r = parked.evict(&ev, 0..PAGES * 2).unwrap();
    let freed = before - ram.allocated_bytes();
    let rep = parked.report();
    eprintln!("{r:?}; freed {freed} bytes; {rep:?}");
    assert_eq!(r.evicted, PAGES - 512 - 64);
    assert_eq!(
        r.changed,
        512 + 64,
        "the hot pages and the rewritten ones stay"
    );
    assert!(freed >= r.evicted * PAGE_SIZE, "freed {freed}");
    // 3584 pages with 1000 distinct contents: each stored once per replica.
    assert!(rep.dedup_hits >= 3584 - 1000, "{rep:?}");
    assert_eq!(parked.located(&ram).len() as u64, r.evicted);

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| ev.serve_until(&mut &parked, &stop));
        let _stop_on_exit = StopOnExit(&stop);
        let check = |p: u64| {
            let mut b = vec![0u8; PAGE];
            ram.read(p * PAGE_SIZE, &mut b).unwrap();
            let g = if (1000..1064).contains(&p) { 9 } else { 0 };
            assert!(b == content(p, g), "page {p} differs");
        };
        for p in (0..PAGES).step_by(7) {
            check(p);
        }
        // One intermediary dies: its pages come from their replica.
        redis[0].kill();
        for p in 0..PAGES {
            check(p);
        }
        stop.store(true, Ordering::Release);
        server.join().unwrap().unwrap();
    });
    let e = ev.report();
    eprintln!("{e:?}; {:?}", parked.report());
    assert_eq!(e.evicted_now, 0, "every page was touched: {e:?}");
    assert_eq!(e.faulted_in, r.evicted, "{e:?}");
    assert_eq!(e.clobbered, 0);
    assert_eq!(e.zero_filled, 0, "no page of the first half is fresh");
    assert_eq!(parked.report().fetched, r.evicted);
    ev.finish(&mut &parked).unwrap();
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
