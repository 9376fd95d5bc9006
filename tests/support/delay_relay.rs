//! spanvmm-delay-relay: a TCP relay that delays every byte by a fixed time each way, for
//! latency between network namespaces on kernels without netem (bandwidth comes from `tc tbf`).
//!
//! `spanvmm-delay-relay LISTEN TARGET DELAY_MS` — accepts on LISTEN, connects each client to
//! TARGET, and forwards both ways, each chunk released DELAY_MS after it was read (so the
//! round trip grows by twice DELAY_MS and throughput is not limited by the delay). Killing the
//! relay cuts every connection through it, which the migration tests use as a link failure.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn pipe(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut out = to.try_clone().expect("clone socket");
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if out.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = out.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(Shutdown::Write);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: spanvmm-delay-relay LISTEN TARGET DELAY_MS");
        std::process::exit(2);
    }
    let delay = Duration::from_millis(args[3].parse().expect("DELAY_MS is a number"));
    let listener = TcpListener::bind(&args[1]).expect("bind LISTEN");
    println!("relay listening on {}", listener.local_addr().unwrap());
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let target = args[2].clone();
        std::thread::spawn(move || {
            let Ok(server) = TcpStream::connect(&target) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = std::thread::spawn(move || pipe(client, server, delay));
            pipe(s2, c2, delay);
            let _ = up.join();
        });
    }
}
