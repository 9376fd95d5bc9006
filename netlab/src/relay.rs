//! A TCP relay that adds a one-way delay in each direction (this kernel has no netem).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read from one side at a time.
const CHUNK: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    target: SocketAddr,
    one_way: Duration,
    window: usize,
    stop: AtomicBool,
    down: AtomicBool,
    accepted: AtomicU64,
    /// Both ends of every open connection by connection number, to cut them.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
}

impl Shared {
    fn cut_all(&self) {
        for (_, ends) in lock(&self.open).drain() {
            for s in ends {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A running relay: every connection accepted on [`DelayRelay::addr`] is forwarded to the
/// target, each chunk held for the one-way delay in both directions, with at most `window`
/// bytes held per direction (the link's bandwidth-delay product: a sender cannot outrun it).
pub struct DelayRelay {
    addr: SocketAddr,
    /// The listening socket, to wake the accept loop by shutting it down.
    listener: TcpListener,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on `listen` (port 0 picks one) and forwards to `target`.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        one_way: Duration,
        window: usize,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            one_way,
            window: window.max(CHUNK),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let wake = listener.try_clone()?;
        let accept = std::thread::Builder::new()
            .name("delay-relay".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(DelayRelay {
            addr,
            listener: wake,
            shared,
            accept: Some(accept),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Breaks every open connection (both sides see a reset or end of stream).
    pub fn cut(&self) {
        self.shared.cut_all();
    }

    /// Takes the link down (open connections are cut, new ones closed at once) or up again.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.cut_all();
        }
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Shutting the listening socket down wakes the accept loop with an error, even when
        // its address is gone (a network namespace deleted first).
        // SAFETY: shutdown(2) on a socket this value owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.shared.cut_all();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            // Transient (e.g. a connection reset before accept); back off a little.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let id = shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let s = shared.clone();
        std::thread::spawn(move || {
            let Ok(server) = TcpStream::connect(s.target) else {
                return; // dropping `client` closes it: the target is unreachable
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                client.try_clone(),
                server.try_clone(),
                client.try_clone(),
                server.try_clone(),
            ) else {
                return;
            };
            lock(&s.open).insert(id, [c3, s3]);
            let (d, w) = (s.one_way, s.window);
            let upstream = std::thread::spawn(move || pump(client, server, d, w));
            pump(s2, c2, d, w);
            let _ = upstream.join();
            lock(&s.open).remove(&id);
        });
    }
}

/// What travels from the reading half to the writing half of one direction.
struct Pipe {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    eof: bool,
    broken: bool,
}

/// Moves bytes `from` → `to`, each chunk released `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, window: usize) {
    let pipe = Arc::new((
        Mutex::new(Pipe {
            chunks: VecDeque::new(),
            bytes: 0,
            eof: false,
            broken: false,
        }),
        Condvar::new(),
    ));
    let p = pipe.clone();
    let writer = std::thread::spawn(move || {
        let (m, cv) = &*p;
        loop {
            let mut g = lock(m);
            while g.chunks.is_empty() && !g.eof && !g.broken {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if g.broken {
                break;
            }
            let Some((due, data)) = g.chunks.pop_front() else {
                // End of stream and everything written.
                let _ = to.shutdown(Shutdown::Write);
                return;
            };
            g.bytes -= data.len();
            cv.notify_all();
            drop(g);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                lock(m).broken = true;
                cv.notify_all();
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
    let (m, cv) = &*pipe;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut g = lock(m);
        if n == 0 || g.broken {
            g.eof = true;
            cv.notify_all();
            break;
        }
        while g.bytes + n > window && !g.broken {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.chunks
            .push_back((Instant::now() + delay, buf[..n].to_vec()));
        g.bytes += n;
        cv.notify_all();
    }
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    #[test]
    fn round_trips_take_twice_the_delay_and_bytes_arrive_intact() {
        let target = echo_server();
        let relay = DelayRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            Duration::from_millis(20),
            1 << 20,
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&b, b"ping");
        assert!(rtt >= Duration::from_millis(40), "rtt {rtt:?}");
        assert!(rtt < Duration::from_millis(200), "rtt {rtt:?}");
        // Bulk data comes back byte for byte.
        let data: Vec<u8> = (0..(3u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut r = c.try_clone().unwrap();
        let expect = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; expect.len()];
            r.read_exact(&mut got).unwrap();
            got == expect
        });
        c.write_all(&data).unwrap();
        assert!(reader.join().unwrap(), "bytes changed on the way");
    }

    #[test]
    fn cut_and_down_break_and_refuse_connections() {
        let target = echo_server();
        let relay = DelayRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            Duration::ZERO,
            1 << 20,
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        relay.cut();
        let mut rest = Vec::new();
        assert!(
            matches!(c.read_to_end(&mut rest), Ok(0) | Err(_)),
            "a cut connection ends"
        );
        relay.set_down(true);
        let mut d = TcpStream::connect(relay.addr()).unwrap();
        d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = d.write_all(b"y");
        assert!(
            matches!(d.read(&mut b), Ok(0) | Err(_)),
            "a down link refuses"
        );
        relay.set_down(false);
        let mut e = TcpStream::connect(relay.addr()).unwrap();
        e.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        e.write_all(b"z").unwrap();
        e.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"z");
        assert_eq!(relay.accepted(), 3);
    }
}
