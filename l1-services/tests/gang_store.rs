//! Gang migration's store against a real `redis-server`: writers sharing a `StoreKey` and
//! racing on the same pages (the probe race: both find a page absent, both send it), and the
//! reservation that closes it (`StoreConfig::reserve`): a page reserved by another writer is
//! waited for, not sent; a reservation whose writer never writes lapses and the page is
//! written after all.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use l1_services::migration::intermediary::{content_hash, PageStore, StoreConfig, StoreKey};
use l1_services::migration::resp::{Reply, Resp};
use netlab::RedisServer;

const PAGE: usize = 4096;

fn server(test: &str) -> Option<(std::path::PathBuf, RedisServer)> {
    if !netlab::can_run(test, RedisServer::available()) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("gang-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = RedisServer::start(&dir).expect("start redis-server");
    Some((dir, s))
}

fn page(i: u32) -> Vec<u8> {
    (0..PAGE as u32 / 4)
        .flat_map(|w| (i.wrapping_mul(0x9e37_79b9) ^ w).to_le_bytes())
        .collect()
}

fn store(s: &RedisServer, key: &StoreKey, reserve: bool) -> PageStore {
    let cfg = StoreConfig {
        reserve,
        ..StoreConfig::new(vec![s.addr()])
    };
    PageStore::connect(cfg, key).expect("connect")
}

fn raw(s: &RedisServer) -> Resp {
    Resp::connect(s.addr(), Duration::from_secs(5), 64 << 20).unwrap()
}

/// Pages stored (the `sg1:` keys; reservations are `{sg1:...}r`).
fn pages_at(s: &RedisServer) -> u64 {
    match raw(s).call(&[b"KEYS", b"sg1:*"]).unwrap() {
        Reply::Array(Some(k)) => k.len() as u64,
        other => panic!("KEYS: {other:?}"),
    }
}

/// `INFO section`, as text.
fn info(s: &RedisServer, section: &str) -> String {
    match raw(s).call(&[b"INFO", section.as_bytes()]).unwrap() {
        Reply::Bulk(Some(t)) => String::from_utf8_lossy(&t).into_owned(),
        other => panic!("INFO: {other:?}"),
    }
}

/// Plants another writer's reservation of `p` for `ms`.
fn reserve_by_hand(s: &RedisServer, st: &PageStore, p: &[u8], ms: u64) {
    let mut r = b"{".to_vec();
    r.extend_from_slice(&st.redis_key(&content_hash(p)));
    r.extend_from_slice(b"}r");
    let ms = ms.to_string();
    let reply = raw(s)
        .call(&[b"SET", &r, b"1", b"NX", b"PX", ms.as_bytes()])
        .unwrap();
    assert_eq!(reply, Reply::Simple("OK".into()));
}

#[test]
fn a_page_reserved_by_another_writer_is_waited_for_not_sent() {
    let Some((dir, s)) = server("reserved") else {
        return;
    };
    let key = StoreKey::generate().unwrap();
    let mut waiter = store(&s, &key, true);
    let p = page(1);
    reserve_by_hand(&s, &waiter, &p, 5000);
    let t = std::thread::spawn(move || {
        let h = waiter.put(&[&p]).unwrap();
        (waiter.stats(), h)
    });
    // The holder of the reservation writes the page once the waiter is waiting (polling it
    // with EXISTS, which nothing else here sends).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !info(&s, "commandstats").contains("cmdstat_exists:") {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never polled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut writer = store(&s, &key, false);
    writer.put(&[&page(1)]).unwrap();
    let (st, h) = t.join().unwrap();
    let i = &st.intermediaries[0];
    assert_eq!(
        (i.waited, i.pages_stored, i.takeovers, i.dedup_hits),
        (1, 0, 0, 1),
        "{i:?}"
    );
    assert_eq!(writer.stats().intermediaries[0].pages_stored, 1);
    assert_eq!(writer.get(&h).unwrap(), vec![page(1)]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_lapsed_reservation_is_taken_over() {
    let Some((dir, s)) = server("lapsed") else {
        return;
    };
    let key = StoreKey::generate().unwrap();
    let mut st = store(&s, &key, true);
    // A writer reserved it and died: nobody writes it.
    reserve_by_hand(&s, &st, &page(2), 60_000);
    let h = st.put(&[&page(2), &page(3)]).unwrap();
    let i = &st.stats().intermediaries[0];
    assert_eq!(
        (i.waited, i.takeovers, i.pages_stored),
        (0, 1, 2),
        "page 2 written after its lease, page 3 at once: {i:?}"
    );
    assert_eq!(st.get(&h).unwrap(), vec![page(2), page(3)]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Two writers put the same 4096 pages in the same order at the same time, in batches of 64
/// (a gang's sources going through a shared region): (pages written by both, pages stored).
fn race(s: &RedisServer, reserve: bool) -> (u64, u64, u64) {
    let key = StoreKey::generate().unwrap();
    let go = Arc::new(Barrier::new(2));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let mut st = store(s, &key, reserve);
            let go = go.clone();
            std::thread::spawn(move || {
                let pages: Vec<Vec<u8>> = (0..4096).map(page).collect();
                go.wait();
                for batch in pages.chunks(64) {
                    let b: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                    st.put(&b).unwrap();
                }
                st.stats().intermediaries[0].clone()
            })
        })
        .collect();
    let stats: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let written: u64 = stats.iter().map(|i| i.pages_stored).sum();
    let waited: u64 = stats.iter().map(|i| i.waited).sum();
    (written, waited, stats.iter().map(|i| i.takeovers).sum())
}

#[test]
fn racing_writers_send_each_page_once_with_reservations() {
    let Some((dir, s)) = server("race") else {
        return;
    };
    let (written_plain, _, _) = race(&s, false);
    let at_plain = pages_at(&s);
    raw(&s).call(&[b"FLUSHALL"]).unwrap();
    let (written, waited, takeovers) = race(&s, true);
    let at = pages_at(&s);
    eprintln!(
        "two writers, 4096 pages each, the same: without reservations {written_plain} \
         written ({} twice); with them {written} written, {waited} waited for, {takeovers} \
         taken over",
        written_plain - at_plain
    );
    assert_eq!(at_plain, 4096);
    assert_eq!(at, 4096);
    assert_eq!(takeovers, 0, "every writer alive: no lease lapses");
    assert_eq!(written, 4096, "each page sent once");
    let _ = std::fs::remove_dir_all(dir);
}
