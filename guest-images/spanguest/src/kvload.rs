//! The `kvload` workload (vCPU 0): a front end loading a `kv` back end over the network. One
//! TCP connection to `peer=A.B.C.D:PORT` over smoltcp; at `load_rate` requests/s it issues SET
//! then GET of the same key, one request outstanding at a time, and checks each reply against
//! what it wrote (a GET must return the value of the SET before it). Per report period it
//! prints the requests completed and their latency (mean, p99, max, µs, by the TSC: a pause of
//! either tier counts in), and the errors: wrong replies, lost connections, requests without
//! an answer within `TIMEOUT_US`. A lost connection is reopened after `RETRY_US`.
//!
//! No allocator: the socket, its buffers and the latency samples are statics.

use smoltcp::iface::{Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};

use crate::kv::{IpConfig, excl};
use crate::net::NetDev;

const SOCK_RX: usize = 4096;
const SOCK_TX: usize = 4096;
/// Latency samples kept per report period (more requests are counted, not sampled).
const SAMPLES: usize = 8192;
/// A request unanswered this long is an error (its connection is dropped): long enough that
/// a migration's downtime shows as latency, not as an error.
const TIMEOUT_US: u64 = 30_000_000;
/// Wait before reopening a lost connection.
const RETRY_US: u64 = 100_000;
/// Keys cycled through.
const KEYS: u64 = 1024;
/// Longest reply expected (a GET's bulk string of a 16-digit value).
const REPLY: usize = 32;

static mut STORAGE: [SocketStorage<'static>; 1] = [SocketStorage::EMPTY; 1];
static mut RX: [u8; SOCK_RX] = [0; SOCK_RX];
static mut TX: [u8; SOCK_TX] = [0; SOCK_TX];
static mut LAT: [u32; SAMPLES] = [0; SAMPLES];

/// `peer=A.B.C.D:PORT`.
#[derive(Clone, Copy)]
pub struct Peer {
    /// Address.
    pub ip: [u8; 4],
    /// Port.
    pub port: u16,
}

/// One period's numbers, for the `kvload` line.
#[derive(Clone, Copy, Default)]
pub struct Period {
    /// Requests answered correctly.
    pub reqs: u64,
    /// Their mean latency, µs.
    pub mean_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Worst, µs.
    pub max_us: u64,
}

/// Totals since boot.
#[derive(Clone, Copy, Default)]
pub struct Totals {
    /// Requests answered correctly.
    pub reqs: u64,
    /// Wrong replies, lost connections and timeouts.
    pub errors: u64,
    /// Connections opened.
    pub connects: u64,
}

/// The client.
pub struct Client {
    dev: NetDev,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    peer: Peer,
    /// µs between requests.
    every_us: u64,
    /// When the next request is due, µs.
    next_us: u64,
    /// Requests issued (the sequence number of the next one).
    seq: u64,
    /// The request in flight: its expected reply and when it went out.
    waiting: Option<([u8; REPLY], usize, u64)>,
    /// The reply so far.
    reply: [u8; REPLY],
    got: usize,
    /// The connection counts as open (connected once, not yet lost).
    up: bool,
    retry_at: u64,
    port: u16,
    /// Samples of this period.
    n: usize,
    sum_us: u64,
    max_us: u64,
    done: u64,
    /// Totals so far.
    pub totals: Totals,
}

/// 16 decimal digits of `v` (zero-padded).
fn digits(v: u64, out: &mut [u8]) {
    let mut v = v;
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

impl Client {
    /// Brings the interface up on `dev` with `ip`, loading `peer` at `rate` requests/s.
    pub fn new(
        mut dev: NetDev,
        ip: IpConfig,
        peer: Peer,
        rate: u64,
        seed: u64,
        now_us: u64,
    ) -> Self {
        let iface = crate::kv::interface(&mut dev, ip, seed, now_us);
        // SAFETY: the client is made once, by vCPU 0, which alone uses these statics after.
        let mut sockets = SocketSet::new(unsafe { excl(&raw mut STORAGE).as_mut_slice() });
        // SAFETY: as above.
        let (rx, tx) = unsafe {
            (
                excl(&raw mut RX).as_mut_slice(),
                excl(&raw mut TX).as_mut_slice(),
            )
        };
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_nagle_enabled(false);
        let handle = sockets.add(s);
        Client {
            dev,
            iface,
            sockets,
            handle,
            peer,
            every_us: 1_000_000 / rate.max(1),
            next_us: now_us,
            seq: 0,
            waiting: None,
            reply: [0; REPLY],
            got: 0,
            up: false,
            retry_at: now_us,
            port: 49152 + (seed % 8192) as u16,
            n: 0,
            sum_us: 0,
            max_us: 0,
            done: 0,
            totals: Totals::default(),
        }
    }

    /// The connection is lost or unusable: count it, drop what was in flight, retry later.
    fn fail(&mut self, now_us: u64) {
        self.totals.errors += 1;
        self.waiting = None;
        self.got = 0;
        self.up = false;
        self.retry_at = now_us + RETRY_US;
        self.sockets.get_mut::<tcp::Socket>(self.handle).abort();
    }

    /// Moves frames, sends what is due, reads what came; true when anything happened.
    pub fn poll(&mut self, now_us: u64) -> bool {
        let now = Instant::from_micros(now_us as i64);
        let (rx0, tx0) = (self.dev.counts.rx, self.dev.counts.tx);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let (open, may_send, state) = {
            let s = self.sockets.get::<tcp::Socket>(self.handle);
            (s.is_open(), s.may_send(), s.state())
        };
        if !open {
            if self.up || self.waiting.is_some() {
                self.fail(now_us);
            } else if now_us >= self.retry_at {
                let [a, b, c, d] = self.peer.ip;
                let remote = IpEndpoint::new(
                    IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)),
                    self.peer.port,
                );
                // A fresh local port each time: the old connection's segments never match.
                self.port = if self.port >= 65000 {
                    49152
                } else {
                    self.port + 1
                };
                let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
                if s.connect(self.iface.context(), remote, self.port).is_ok() {
                    self.up = true;
                    self.totals.connects += 1;
                } else {
                    self.retry_at = now_us + RETRY_US;
                }
            }
        } else if may_send {
            self.exchange(now_us);
        } else if matches!(state, tcp::State::CloseWait | tcp::State::Closed) {
            self.fail(now_us);
        }
        if let Some((_, _, sent)) = self.waiting
            && now_us.saturating_sub(sent) > TIMEOUT_US
        {
            self.fail(now_us);
        }
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.dev.kick();
        self.dev.counts.rx != rx0 || self.dev.counts.tx != tx0
    }

    /// On an established connection: reads the reply in flight, sends the next request due.
    fn exchange(&mut self, now_us: u64) {
        let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
        if let Some((want, len, sent)) = self.waiting {
            if s.can_recv()
                && let Ok(n) = s.recv_slice(&mut self.reply[self.got..len])
            {
                self.got += n;
            }
            if self.reply[..self.got] != want[..self.got] {
                self.fail(now_us);
                return;
            }
            if self.got < len {
                return;
            }
            let us = now_us.saturating_sub(sent);
            if self.n < SAMPLES {
                // SAFETY: vCPU 0 alone uses the samples.
                unsafe { excl(&raw mut LAT)[self.n] = us.min(u64::from(u32::MAX)) as u32 };
                self.n += 1;
            }
            self.sum_us += us;
            self.max_us = self.max_us.max(us);
            self.done += 1;
            self.totals.reqs += 1;
            self.waiting = None;
            self.got = 0;
        }
        if now_us < self.next_us {
            return;
        }
        // Far behind (a long pause): pick up the rate from now instead of bursting.
        self.next_us = if now_us - self.next_us > 1_000_000 {
            now_us + self.every_us
        } else {
            self.next_us + self.every_us
        };
        let (k, set) = (self.seq / 2 % KEYS, self.seq.is_multiple_of(2));
        let mut key = *b"kvl:0000";
        digits(k, &mut key[4..]);
        let mut val = [0u8; 16];
        digits(self.seq / 2, &mut val);
        let mut req = [0u8; 64];
        let mut len = 0;
        let mut put = |b: &[u8]| {
            req[len..len + b.len()].copy_from_slice(b);
            len += b.len();
        };
        let mut want = [0u8; REPLY];
        let wlen = if set {
            put(b"*3\r\n$3\r\nSET\r\n$8\r\n");
            put(&key);
            put(b"\r\n$16\r\n");
            put(&val);
            put(b"\r\n");
            want[..5].copy_from_slice(b"+OK\r\n");
            5
        } else {
            put(b"*2\r\n$3\r\nGET\r\n$8\r\n");
            put(&key);
            put(b"\r\n");
            want[..5].copy_from_slice(b"$16\r\n");
            want[5..21].copy_from_slice(&val);
            want[21..23].copy_from_slice(b"\r\n");
            23
        };
        if s.send_capacity() - s.send_queue() < len {
            return;
        }
        let _ = s.send_slice(&req[..len]);
        self.seq += 1;
        self.waiting = Some((want, wlen, now_us));
    }

    /// This period's numbers; starts the next period.
    pub fn period(&mut self) -> Period {
        // SAFETY: vCPU 0 alone uses the samples.
        let lat = unsafe { &mut excl(&raw mut LAT)[..self.n] };
        lat.sort_unstable();
        let p = Period {
            reqs: self.done,
            mean_us: self.sum_us / self.done.max(1),
            p99_us: lat
                .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
                .map_or(0, |&v| u64::from(v)),
            max_us: self.max_us,
        };
        self.n = 0;
        self.sum_us = 0;
        self.max_us = 0;
        self.done = 0;
        p
    }

    /// How long the request in flight has waited, µs (0: none).
    pub fn waiting_us(&self, now_us: u64) -> u64 {
        self.waiting.map_or(0, |(_, _, t)| now_us.saturating_sub(t))
    }
}
