//! A hostile migration peer *with a valid certificate*: malformed, truncated, oversized and
//! out-of-order frames cannot crash or hang either side. The peer is this test, speaking
//! through the VMM's own link and TLS code (`l1_services::migration::{Link, tls}`) with the
//! certificate `spanvmm migrate-certs` made for the real nodes, against real `spanvmm`
//! processes: as a fake source against a real destination (`run --incoming`), and as a fake
//! destination against a real source (`ctl migrate`). Every assertion is about mechanisms —
//! exit statuses, frames and messages, the guest's own memory check — not timings.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use l1_services::migration::wire::{self, Frame, Handover, HEADER_LEN, PAGE, VERSION};
use l1_services::migration::{tls, Link};

const GUEST: &str = "workload=dirty,verify mib=64 rate=20000 report_ms=200";
const MEM: u64 = 256;

/// A real destination waiting on `addr`.
fn sock_addr(addr: &str) -> SocketAddr {
    addr.trim_start_matches("tls://").parse().unwrap()
}

/// A fake source: TLS with the real node certificate, nothing said yet.
fn connect(addr: &str, tls_dir: &Path) -> Link {
    let cfg =
        tls::client_config(tls_dir, tls::Cipher::default()).expect("client TLS configuration");
    Link::connect(sock_addr(addr), cfg, Duration::from_secs(10))
        .expect("the real certificate is accepted")
}

fn hello() -> Frame {
    Frame::Hello {
        version: VERSION,
        mem_bytes: MEM << 20,
        session: 0x5eed,
        resume: false,
    }
}

fn encoded(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    wire::encode(f, &mut b);
    b
}

/// A frame cut short: its header promises the whole payload, `keep` bytes of it follow.
fn truncated(f: &Frame, keep: usize) -> Vec<u8> {
    let mut b = encoded(f);
    b.truncate(HEADER_LEN + keep);
    b
}

/// A header announcing a payload of 4 GiB (less one byte: the most a u32 says) of type `ty`.
fn four_gib_header(ty: u8) -> Vec<u8> {
    let mut b = u32::MAX.to_le_bytes().to_vec();
    b.push(ty);
    b
}

/// A frame of an unknown type, then noise.
fn garbage() -> Vec<u8> {
    let mut b = vec![3, 0, 0, 0, 0xee, b'a', b'b', b'c'];
    b.extend((0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    b
}

/// The `error` frame the peer answers with (it must answer within 20 s).
fn refusal(link: &mut Link) -> String {
    match link.recv(Duration::from_secs(20)) {
        Ok(Some(Frame::Error(msg))) => msg,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Says `hello` and gets `welcome`.
fn greet(link: &mut Link) {
    link.send(&hello()).unwrap();
    match link.recv(Duration::from_secs(20)) {
        Ok(Some(Frame::Welcome { version })) => assert_eq!(version, VERSION),
        other => panic!("expected welcome, got {other:?}"),
    }
}

fn no_panic(vm: &VmProcess) {
    let err = vm.stderr();
    assert!(
        !err.contains("panicked"),
        "a spanvmm thread panicked:\n{err}"
    );
}

#[test]
fn a_hostile_source_is_refused_before_hello_and_the_destination_still_takes_a_real_guest() {
    let tmp = TempDir::new("hostile-pre");
    let tls = certs(&tmp, "tls");
    let addr = format!("tls://127.0.0.1:{}", free_port());
    let mut dst = destination("hostile-pre-dst", &[], &addr, &tls, &[]);
    let pages = Frame::Pages {
        first: 0,
        span: 1,
        codec: wire::CODEC_RAW,
        present: vec![1],
        zero: vec![0],
        data: vec![0x5a; PAGE],
    };
    let state = Frame::State {
        handover: Handover::Complete,
        state: b"no state".to_vec(),
        needed: vec![],
    };
    // (what the peer sends first, what the destination answers)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "pages before hello",
            encoded(&pages),
            "expected hello, got pages",
        ),
        (
            "state before hello",
            encoded(&state),
            "expected hello, got state",
        ),
        (
            "machine before hello",
            encoded(&Frame::Machine(b"{}".to_vec())),
            "expected hello, got machine",
        ),
        (
            "a truncated hello",
            {
                // The header says 10 bytes: a hello that short is refused as such.
                let mut b = truncated(&hello(), 10);
                b[..4].copy_from_slice(&10u32.to_le_bytes());
                b
            },
            "hello frame is truncated",
        ),
        (
            "a hello with stray bytes",
            {
                let mut b = encoded(&hello());
                let n = b.len() - HEADER_LEN + 3;
                b[..4].copy_from_slice(&(n as u32).to_le_bytes());
                b.extend_from_slice(b"xyz");
                b
            },
            "stray bytes",
        ),
        (
            "a length field of 4 GiB",
            four_gib_header(1),
            "exceeds the 4194304-byte limit",
        ),
        ("garbage", garbage(), "unknown frame type 238"),
    ];
    let mut refused = 0;
    for (what, bytes, answer) in &cases {
        let mut peer = connect(&addr, &tls);
        peer.send_bytes(bytes).unwrap();
        let msg = refusal(&mut peer);
        assert!(msg.contains(answer), "{what}: answered {msg:?}");
        refused += 1;
        wait_stderr_n(&dst, "migration: refused", refused, Duration::from_secs(20));
        assert!(
            dst.alive(),
            "{what} ended the destination:\n{}",
            dst.stderr()
        );
    }
    // A frame cut short by a peer that then goes away: refused once its connection ends.
    {
        let mut peer = connect(&addr, &tls);
        peer.send_bytes(&truncated(&hello(), 12)).unwrap();
        peer.flush(Duration::from_secs(5)).unwrap();
    }
    refused += 1;
    wait_stderr_n(&dst, "migration: refused", refused, Duration::from_secs(20));
    assert!(dst.stderr().contains("the peer closed the connection"));
    // Still waiting, nobody's guest half-built, and it says so on its API.
    assert!(dst.alive());
    let st = status(&dst);
    assert_eq!(st["state"], "incoming", "{st}");
    assert_eq!(st["progress"]["phase"], "waiting", "{st}");
    assert_eq!(st["progress"]["pages_received"], 0, "{st}");
    no_panic(&dst);

    // A real source then migrates a guest that verifies clean at the destination.
    let mut src = VmProcess::boot("hostile-pre-src", GUEST, MEM, 1);
    let (ok, out) = src.ctl(&[
        "migrate",
        "--to",
        &addr,
        "--plugin",
        &plugin("precopy.wasm"),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--report",
        src.dir.path().join("report.json").to_str().unwrap(),
    ]);
    assert!(ok, "the real migration failed: {out}\n{}", src.stderr());
    assert_eq!(src.wait_exit(Duration::from_secs(40)), Some(0));
    dst.wait_line("SPANGUEST stat", Duration::from_secs(20));
    dst.assert_verify_clean(1);
    // A stop-and-copy: the guest waited for its downtime, and for nothing the refused peers
    // left behind.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.dir.path().join("report.json")).unwrap())
            .unwrap();
    let downtime_ms = r["downtime_ms"].as_f64().unwrap() as u64;
    dst.assert_stall_below(0, downtime_ms + DESCHEDULED_MS, "after the hostile peers");
    assert_eq!(status(&dst)["state"], "running");
    no_panic(&dst);
}

#[test]
fn a_hostile_source_after_welcome_ends_the_incoming_migration_with_a_reason() {
    let tmp = TempDir::new("hostile-post");
    let tls = certs(&tmp, "tls");
    let pages_total = (MEM << 20) / PAGE as u64;
    let data_pages = |first: u64, n: u16| Frame::Pages {
        first,
        span: n,
        codec: wire::CODEC_RAW,
        present: vec![(1u64 << n) - 1],
        zero: vec![0],
        data: vec![0x11; n as usize * PAGE],
    };
    // (case, what follows the hello, what the destination says, whether it can tell the
    // peer: a peer that went away hears nothing)
    let cases: Vec<(&str, Vec<u8>, &str, bool)> = vec![
        (
            "state before machine (not a VM state)",
            encoded(&Frame::State {
                handover: Handover::Complete,
                state: b"not a VM state".to_vec(),
                needed: vec![],
            }),
            "migration stream: invalid VM state: truncated",
            true,
        ),
        (
            "a ready from the source",
            encoded(&Frame::Ready { load_us: 1 }),
            "unexpected ready frame before the state",
            true,
        ),
        (
            "a length field of 4 GiB",
            four_gib_header(4),
            "exceeds the 4194304-byte limit",
            true,
        ),
        (
            "garbage after the hello",
            garbage(),
            "unknown frame type 238",
            true,
        ),
        (
            "a truncated frame, then the peer is gone",
            truncated(&Frame::Machine(vec![b' '; 100]), 20),
            "the peer closed the connection",
            false,
        ),
        (
            "pages past the end of guest memory",
            encoded(&data_pages(pages_total, 1)),
            "run past guest memory",
            true,
        ),
        (
            // Found reviewing the decoder's users: `first + span` wrapped around 2^64,
            // passed the bounds check and panicked the page writer.
            "pages wrapping around 2^64",
            encoded(&data_pages(u64::MAX - 1, 4)),
            "run past guest memory",
            true,
        ),
        (
            // cnet codec: page 0 as one block, a reference to cache slot 5, never filled.
            "a cnet page referring to a cache slot never filled",
            encoded(&Frame::Pages {
                first: 0,
                span: 1,
                codec: wire::CODEC_CNET,
                present: vec![1],
                zero: vec![0],
                data: vec![1, 1, 1, 5, 0, 0, 0],
            }),
            "does not hold",
            true,
        ),
        (
            // stride codec: page 0 is a zero marker, and the bitmap calls it a progression.
            "a stride page that carries no data",
            encoded(&Frame::Pages {
                first: 0,
                span: 2,
                codec: wire::CODEC_STRIDE,
                present: vec![0b11],
                zero: vec![0b01],
                data: [&1u64.to_le_bytes()[..], &[5; wire::STRIDE_PAIR]].concat(),
            }),
            "marks a page a progression that carries no data",
            true,
        ),
        (
            "stride data shorter than its bitmaps say",
            encoded(&Frame::Pages {
                first: 0,
                span: 2,
                codec: wire::CODEC_STRIDE,
                present: vec![0b11],
                zero: vec![0],
                data: [&1u64.to_le_bytes()[..], &[5; wire::STRIDE_PAIR], &[9; 100]].concat(),
            }),
            "has 100 bytes of raw pages, its bitmaps say 4096",
            true,
        ),
        (
            "a store frame before the machine",
            encoded(&Frame::Store(store_record())),
            "scatter-gather: a store frame before the machine",
            true,
        ),
        (
            "a store record with more replicas than intermediaries",
            {
                let mut b = encoded(&Frame::Store(store_record()));
                b[HEADER_LEN + 33] = 3; // replicas, after the key and the flags
                b
            },
            "store record: 3 replicas on 2",
            true,
        ),
        (
            "a store record with unknown flags",
            {
                let mut b = encoded(&Frame::Store(store_record()));
                b[HEADER_LEN + 32] = 0x80;
                b
            },
            "store record flags 0x80",
            true,
        ),
        (
            // Located records may come before the state (an agile VM's parked pages), but only
            // after a `store` frame naming where the pages are.
            "a located frame before any store frame",
            encoded(&Frame::Located(wire::Located {
                first: 0,
                span: 1,
                present: vec![1],
                hashes: vec![[7; 32]],
            })),
            "a located frame, but no store frame named the intermediaries",
            true,
        ),
        (
            "a located record past the end of guest memory",
            encoded(&Frame::Located(wire::Located {
                first: pages_total - 1,
                span: 2,
                present: vec![0b11],
                hashes: vec![[7; 32], [8; 32]],
            })),
            "runs past guest memory",
            true,
        ),
        (
            "a located record missing an address",
            {
                // Two pages located, one 32-byte address: the header says what follows.
                let mut p = 0u64.to_le_bytes().to_vec();
                p.extend_from_slice(&2u16.to_le_bytes());
                p.extend_from_slice(&0b11u64.to_le_bytes());
                p.extend_from_slice(&[7; 32]);
                let mut b = (p.len() as u32).to_le_bytes().to_vec();
                b.push(wire::T_LOCATED);
                b.extend_from_slice(&p);
                b
            },
            "located record is truncated",
            true,
        ),
        (
            "a stale bitmap of the wrong size",
            encoded(&Frame::Stale(vec![u64::MAX; 3])),
            "bitmap has 3 words",
            true,
        ),
        (
            // Page 0 arrives, is dropped as stale, and the post-copy state does not say it
            // comes again: the guest would read zeros there.
            "a post-copy state leaving out a page dropped as stale",
            {
                let words = pages_total.div_ceil(64) as usize;
                let mut stale = vec![0u64; words];
                stale[0] = 1;
                [
                    encoded(&data_pages(0, 1)),
                    encoded(&Frame::Stale(stale)),
                    encoded(&Frame::State {
                        handover: Handover::Postcopy,
                        state: b"x".to_vec(),
                        needed: vec![0; words],
                    }),
                ]
                .concat()
            },
            "1 stale page(s) dropped here are missing from the state",
            true,
        ),
        (
            "a post-copy state with a bitmap of the wrong size",
            encoded(&Frame::State {
                handover: Handover::Postcopy,
                state: b"x".to_vec(),
                needed: vec![u64::MAX; 3],
            }),
            "post-copy bitmap has 3 words",
            true,
        ),
    ];
    for (i, (what, bytes, reason, told)) in cases.iter().enumerate() {
        let addr = format!("tls://127.0.0.1:{}", free_port());
        let mut dst = destination(&format!("hostile-post-{i}"), &[], &addr, &tls, &[]);
        {
            let mut peer = connect(&addr, &tls);
            greet(&mut peer);
            peer.send_bytes(bytes).unwrap();
            peer.flush(Duration::from_secs(5)).unwrap();
            if *told {
                let msg = refusal(&mut peer);
                assert!(msg.contains(reason), "{what}: answered {msg:?}");
            }
        }
        // (The state case is refused by the VM build: the peer hears "cannot build the VM:
        // ..." with the same reason.)
        // It ends, with an error status and the reason, holding no guest; nothing panicked.
        let code = dst.wait_exit(Duration::from_secs(30));
        assert!(
            matches!(code, Some(c) if c != 0 && c != 101),
            "{what}: the destination ended with {code:?}:\n{}",
            dst.stderr()
        );
        // (Its last lines may still be on their way through the pipe.)
        wait_stderr_n(&dst, reason, 1, Duration::from_secs(10));
        no_panic(&dst);
        assert!(!dst.api.exists(), "{what}: the API socket was left behind");
    }
}

/// A well-formed `store` record naming two intermediaries nobody needs to reach.
fn store_record() -> wire::Store {
    wire::Store {
        key: l1_services::migration::intermediary::StoreKey::from_bytes([5; 32]),
        encrypt: false,
        cluster: false,
        replicas: 2,
        ttl_secs: 60,
        intermediaries: vec![
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:10".parse().unwrap(),
        ],
        auth: None,
        gather_rate: 0,
    }
}

/// A fake destination on a port of its own: accepts one connection with the real
/// certificate, reads the source's `hello`, then does what `act` says. It keeps reading
/// what the source sends until the source gives up (so the kernel never resets the
/// connection under unread data).
fn fake_destination(
    tls_dir: &Path,
    act: impl FnOnce(&mut Link) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tls://{}", listener.local_addr().unwrap());
    let cfg = tls::server_config(tls_dir).expect("server TLS configuration");
    let t = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut link = Link::accept(sock, cfg, Duration::from_secs(10)).unwrap();
        match link.recv(Duration::from_secs(20)) {
            Ok(Some(Frame::Hello { version, .. })) => assert_eq!(version, VERSION),
            other => panic!("the source did not say hello: {other:?}"),
        }
        act(&mut link);
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until && link.recv(Duration::from_millis(200)).is_ok() {}
    });
    (addr, t)
}

/// Waits for the source's first `sync` (a round's pages all sent), reading its pages meanwhile.
fn until_sync(link: &mut Link) {
    loop {
        match link.recv(Duration::from_secs(120)) {
            Ok(Some(Frame::Sync)) => return,
            Ok(Some(_)) => {}
            other => panic!("the source sent no sync: {other:?}"),
        }
    }
}

#[test]
fn a_hostile_destination_fails_the_migration_and_the_source_guest_runs_on() {
    let tmp = TempDir::new("hostile-dst");
    let tls = certs(&tmp, "tls");
    let src = VmProcess::boot("hostile-dst-src", GUEST, MEM, 1);
    type Act = Box<dyn FnOnce(&mut Link) + Send>;
    let welcome = |link: &mut Link| link.send(&Frame::Welcome { version: VERSION }).unwrap();
    // (case, what the fake destination does after the hello, what `ctl migrate` reports)
    let cases: Vec<(&str, Act, &str)> = vec![
        (
            "welcome, then garbage",
            Box::new(move |l: &mut Link| {
                welcome(l);
                l.send_bytes(&garbage()).unwrap();
            }),
            "unknown frame type 238",
        ),
        (
            "a ready before the state",
            Box::new(move |l: &mut Link| {
                welcome(l);
                l.send(&Frame::Ready { load_us: 1 }).unwrap();
            }),
            "unexpected ready frame from the destination",
        ),
        (
            // Pre-copy asks with a `sync` whether a round's pages arrived; no state came yet.
            "a ready in answer to a sync, before the state",
            Box::new(move |l: &mut Link| {
                welcome(l);
                until_sync(l);
                l.send(&Frame::Ready { load_us: 1 }).unwrap();
            }),
            "unexpected ready frame from the destination",
        ),
        (
            "a length field of 4 GiB",
            Box::new(move |l: &mut Link| {
                welcome(l);
                l.send_bytes(&four_gib_header(7)).unwrap();
            }),
            "exceeds the 4194304-byte limit",
        ),
        (
            "silence instead of welcome",
            Box::new(|_: &mut Link| {}),
            "no welcome from the peer",
        ),
        (
            "silence at the sync",
            Box::new(move |l: &mut Link| {
                welcome(l);
                until_sync(l);
            }),
            "no sync from the peer",
        ),
    ];
    for (what, act, reason) in cases {
        let (addr, fake) = fake_destination(&tls, act);
        let (from, pauses, t0) = (src.mark(), src.pauses(), Instant::now());
        let (ok, out) = src.ctl(&[
            "migrate",
            "--to",
            &addr,
            "--plugin",
            &plugin("precopy.wasm"),
            "--tls-dir",
            tls.to_str().unwrap(),
            "--report",
            src.dir.path().join("report.json").to_str().unwrap(),
        ]);
        assert!(!ok, "{what}: the migration succeeded: {out}");
        let took = t0.elapsed();
        assert!(out.contains(reason), "{what}: `ctl migrate` said:\n{out}");
        fake.join().expect("the fake destination");
        // The guest runs on at the source, its memory intact.
        assert_eq!(status(&src)["state"], "running", "{what}");
        src.wait_line_from(src.mark(), "SPANGUEST stat", Duration::from_secs(20));
        src.assert_verify_clean(1);
        // Never beyond the failed attempt: the source paused at most for a switch-over it
        // rolled back.
        src.assert_ran_on(from, pauses, took, what);
        no_panic(&src);
    }
}
