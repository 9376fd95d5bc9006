//! The `kv` workload (vCPU 0): a key-value server speaking the Redis protocol (RESP) on TCP
//! port 6379 over smoltcp, for the subset `redis-benchmark` uses: PING (inline and RESP),
//! SET, GET, INCR, DEL, EXISTS, CONFIG GET (`save` is empty, `appendonly` is `no`, nothing
//! else is known), QUIT; pipelined
//! commands are answered in order. The store is an open-addressed table in guest memory.
//!
//! No allocator: sockets, their buffers and the table are statics. `CONNS` sockets listen at
//! once; one that closes listens again.

use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet, SocketStorage,
};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::net::NetDev;

/// Port served.
pub const PORT: u16 = 6379;
/// Connections served at once.
const CONNS: usize = 64;
const SOCK_RX: usize = 4096;
const SOCK_TX: usize = 8192;
/// Bytes of one connection's unparsed input: one whole command must fit.
const IN: usize = 2048;
/// Longest key and value.
const KEY_MAX: usize = 64;
const VAL_MAX: usize = 512;
/// Slots of the table (a power of two).
const SLOTS: usize = 4096;
/// Most arguments of a command.
const ARGS: usize = 8;
/// Room a reply may need at most.
const REPLY_MAX: usize = VAL_MAX + 32;

#[derive(Clone, Copy)]
struct Slot {
    /// 0 empty, 1 full, 2 deleted.
    state: u8,
    klen: u8,
    vlen: u16,
    key: [u8; KEY_MAX],
    val: [u8; VAL_MAX],
}

const EMPTY_SLOT: Slot = Slot {
    state: 0,
    klen: 0,
    vlen: 0,
    key: [0; KEY_MAX],
    val: [0; VAL_MAX],
};

static mut TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
static mut STORAGE: [SocketStorage<'static>; CONNS] = [SocketStorage::EMPTY; CONNS];
static mut RX: [[u8; SOCK_RX]; CONNS] = [[0; SOCK_RX]; CONNS];
static mut TX: [[u8; SOCK_TX]; CONNS] = [[0; SOCK_TX]; CONNS];
static mut INBUF: [[u8; IN]; CONNS] = [[0; IN]; CONNS];

/// The IP configuration (`ip=A.B.C.D/N gw=A.B.C.D`).
#[derive(Clone, Copy)]
pub struct IpConfig {
    /// Address.
    pub ip: [u8; 4],
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway, if any.
    pub gw: Option<[u8; 4]>,
}

/// What the server did, for the `kv` line.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Commands answered.
    pub commands: u64,
    /// Protocol errors (the connection was closed).
    pub errors: u64,
}

struct Conn {
    handle: SocketHandle,
    inlen: usize,
    /// Counted as accepted already.
    seen: bool,
}

/// The server: the interface, its sockets and the store.
pub struct Server {
    dev: NetDev,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: [Conn; CONNS],
    /// Totals so far.
    pub counts: Counts,
}

fn hash(k: &[u8]) -> usize {
    k.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) as usize
}

/// The static at `p`, borrowed exclusively.
///
/// # Safety
/// Only vCPU 0 uses the kv statics, and the caller holds no other reference to the same one.
pub(crate) unsafe fn excl<T>(p: *mut T) -> &'static mut T {
    // SAFETY: the caller's contract; `p` points at a static.
    unsafe { &mut *p }
}

fn table() -> &'static mut [Slot; SLOTS] {
    // SAFETY: vCPU 0 alone serves the network and touches the table, one command at a time.
    unsafe { excl(&raw mut TABLE) }
}

/// The slot holding `key`, or where it would go (the first deleted or empty slot on its
/// probe path); None when the table is full and the key absent.
fn find(key: &[u8]) -> (Option<usize>, Option<usize>) {
    let t = table();
    let mut free = None;
    for i in 0..SLOTS {
        let at = (hash(key) + i) & (SLOTS - 1);
        let s = &t[at];
        match s.state {
            0 => return (None, free.or(Some(at))),
            1 if &s.key[..s.klen as usize] == key => return (Some(at), None),
            2 => {
                free.get_or_insert(at);
            }
            _ => {}
        }
    }
    (None, free)
}

fn get(key: &[u8]) -> Option<&'static [u8]> {
    let (at, _) = find(key);
    at.map(|i| {
        let s = &table()[i];
        &s.val[..s.vlen as usize]
    })
}

fn set(key: &[u8], val: &[u8]) -> Result<(), &'static [u8]> {
    if key.len() > KEY_MAX || val.len() > VAL_MAX {
        return Err(b"-ERR key or value too long for spanguest\r\n");
    }
    let (at, free) = find(key);
    let i = at.or(free).ok_or(&b"-OOM the table is full\r\n"[..])?;
    let s = &mut table()[i];
    s.state = 1;
    s.klen = key.len() as u8;
    s.key[..key.len()].copy_from_slice(key);
    s.vlen = val.len() as u16;
    s.val[..val.len()].copy_from_slice(val);
    Ok(())
}

fn del(key: &[u8]) -> bool {
    match find(key).0 {
        Some(i) => {
            table()[i].state = 2;
            true
        }
        None => false,
    }
}

/// A reply being built.
struct Out {
    buf: [u8; REPLY_MAX],
    len: usize,
}

impl Out {
    fn put(&mut self, b: &[u8]) {
        let n = b.len().min(REPLY_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn int(&mut self, prefix: u8, v: i64) {
        self.put(&[prefix]);
        let mut digits = [0u8; 20];
        let mut n = v.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.put(b"-");
        }
        self.put(&digits[i..]);
        self.put(b"\r\n");
    }

    fn bulk(&mut self, v: &[u8]) {
        self.int(b'$', v.len() as i64);
        self.put(v);
        self.put(b"\r\n");
    }
}

fn parse_int(v: &[u8]) -> Option<i64> {
    let (neg, digits) = match v {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, v),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(if neg { -n } else { n })
}

/// One parsed command: its arguments as ranges of the input, and the bytes it took.
struct Cmd {
    args: [(usize, usize); ARGS],
    n: usize,
    len: usize,
}

/// Parses the first command of `inp`: Ok(None) when it is not complete yet, Err on a
/// protocol error.
fn parse(inp: &[u8]) -> Result<Option<Cmd>, ()> {
    let line_end = |from: usize| {
        inp[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| from + p)
    };
    let mut cmd = Cmd {
        args: [(0, 0); ARGS],
        n: 0,
        len: 0,
    };
    if inp.is_empty() {
        return Ok(None);
    }
    if inp[0] != b'*' {
        // Inline: words up to the end of the line.
        let Some(end) = line_end(0) else {
            return Ok(None);
        };
        let line = &inp[..end];
        let mut i = 0;
        while i < line.len() {
            while i < line.len() && matches!(line[i], b' ' | b'\r' | b'\t') {
                i += 1;
            }
            let start = i;
            while i < line.len() && !matches!(line[i], b' ' | b'\r' | b'\t') {
                i += 1;
            }
            if i > start {
                if cmd.n == ARGS {
                    return Err(());
                }
                cmd.args[cmd.n] = (start, i);
                cmd.n += 1;
            }
        }
        cmd.len = end + 1;
        return Ok(Some(cmd));
    }
    let Some(end) = line_end(0) else {
        return Ok(None);
    };
    let count = parse_int(inp[1..end].strip_suffix(b"\r").ok_or(())?).ok_or(())?;
    if !(1..=ARGS as i64).contains(&count) {
        return Err(());
    }
    let mut at = end + 1;
    for _ in 0..count {
        if at >= inp.len() {
            return Ok(None);
        }
        if inp[at] != b'$' {
            return Err(());
        }
        let Some(end) = line_end(at) else {
            return Ok(None);
        };
        let len = parse_int(inp[at + 1..end].strip_suffix(b"\r").ok_or(())?).ok_or(())?;
        if !(0..=(IN as i64)).contains(&len) {
            return Err(());
        }
        let start = end + 1;
        let stop = start + len as usize;
        if stop + 2 > inp.len() {
            return Ok(None);
        }
        if &inp[stop..stop + 2] != b"\r\n" {
            return Err(());
        }
        cmd.args[cmd.n] = (start, stop);
        cmd.n += 1;
        at = stop + 2;
    }
    cmd.len = at;
    Ok(Some(cmd))
}

/// Carries out `cmd` on `inp`; returns false when the connection is to be closed after the
/// reply.
fn execute(inp: &[u8], cmd: &Cmd, out: &mut Out) -> bool {
    let arg = |i: usize| &inp[cmd.args[i].0..cmd.args[i].1];
    let name = arg(0);
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    let wrong = |out: &mut Out| out.put(b"-ERR wrong number of arguments\r\n");
    match cmd.n {
        1 if is(b"PING") => out.put(b"+PONG\r\n"),
        2 if is(b"PING") => out.bulk(arg(1)),
        _ if is(b"PING") => wrong(out),
        n if is(b"SET") => {
            // Options (EX, PX, ...) are not kept: a benchmark's keys never expire.
            if n < 3 {
                wrong(out);
            } else {
                match set(arg(1), arg(2)) {
                    Ok(()) => out.put(b"+OK\r\n"),
                    Err(e) => out.put(e),
                }
            }
        }
        2 if is(b"GET") => match get(arg(1)) {
            Some(v) => out.bulk(v),
            None => out.put(b"$-1\r\n"),
        },
        2 if is(b"INCR") => {
            let now = match get(arg(1)) {
                Some(v) => parse_int(v),
                None => Some(0),
            };
            match now.and_then(|v| v.checked_add(1)) {
                Some(v) => {
                    let mut num = Out {
                        buf: [0; REPLY_MAX],
                        len: 0,
                    };
                    num.int(b':', v);
                    // The stored value is the digits, without ':' and CRLF.
                    match set(arg(1), &num.buf[1..num.len - 2]) {
                        Ok(()) => out.put(&num.buf[..num.len]),
                        Err(e) => out.put(e),
                    }
                }
                None => out.put(b"-ERR value is not an integer or out of range\r\n"),
            }
        }
        n if n >= 2 && (is(b"DEL") || is(b"EXISTS")) => {
            let del_it = is(b"DEL");
            let mut count = 0;
            for i in 1..n {
                let hit = if del_it {
                    del(arg(i))
                } else {
                    get(arg(i)).is_some()
                };
                count += i64::from(hit);
            }
            out.int(b':', count);
        }
        // redis-benchmark asks for `save` and `appendonly` at start (and warns without a
        // name/value pair): nothing is saved nor appended here. Other names: none known.
        3 if is(b"CONFIG") && arg(1).eq_ignore_ascii_case(b"GET") => {
            let name = arg(2);
            if name.eq_ignore_ascii_case(b"save") {
                out.put(b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
            } else if name.eq_ignore_ascii_case(b"appendonly") {
                out.put(b"*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
            } else {
                out.put(b"*0\r\n");
            }
        }
        n if n >= 2 && is(b"CONFIG") => out.put(b"*0\r\n"),
        _ if is(b"QUIT") => {
            out.put(b"+OK\r\n");
            return false;
        }
        _ if matches!(cmd.n, 2..) && (is(b"GET") || is(b"INCR")) => wrong(out),
        _ => out.put(b"-ERR unknown command\r\n"),
    }
    true
}

/// The smoltcp interface on `dev` with `ip` (the server's and `kvload`'s); `seed`
/// randomizes TCP sequence numbers.
pub fn interface(dev: &mut NetDev, ip: IpConfig, seed: u64, now_us: u64) -> Interface {
    let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
    config.random_seed = seed;
    let mut iface = Interface::new(config, dev, Instant::from_micros(now_us as i64));
    let [a, b, c, d] = ip.ip;
    iface.update_ip_addrs(|addrs| {
        // A fresh interface has room for an address.
        let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), ip.prefix));
    });
    if let Some([a, b, c, d]) = ip.gw {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    iface
}

impl Server {
    /// Brings the interface up on `dev` with `ip`; `seed` randomizes TCP sequence numbers.
    pub fn new(mut dev: NetDev, ip: IpConfig, seed: u64, now_us: u64) -> Server {
        let iface = interface(&mut dev, ip, seed, now_us);
        // SAFETY: the server is made once, by vCPU 0, which alone uses these statics after.
        let mut sockets = SocketSet::new(unsafe { excl(&raw mut STORAGE).as_mut_slice() });
        let conns = core::array::from_fn(|i| {
            // SAFETY: as above; socket i alone uses buffers i.
            let (rx, tx) = unsafe {
                (
                    excl(&raw mut RX)[i].as_mut_slice(),
                    excl(&raw mut TX)[i].as_mut_slice(),
                )
            };
            let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
            // Replies go out at once (redis sets TCP_NODELAY too).
            s.set_nagle_enabled(false);
            let _ = s.listen(PORT);
            Conn {
                handle: sockets.add(s),
                inlen: 0,
                seen: false,
            }
        });
        Server {
            dev,
            iface,
            sockets,
            conns,
            counts: Counts::default(),
        }
    }

    /// The device (for its counters and address).
    pub fn dev(&self) -> &NetDev {
        &self.dev
    }

    /// Moves frames and serves every connection once; true when anything happened.
    pub fn poll(&mut self, now_us: u64) -> bool {
        let now = Instant::from_micros(now_us as i64);
        let (rx0, tx0) = (self.dev.counts.rx, self.dev.counts.tx);
        let mut busy = self.iface.poll(now, &mut self.dev, &mut self.sockets) != PollResult::None;
        let mut open = 0;
        for i in 0..CONNS {
            busy |= self.serve(i);
            open += u64::from(self.conns[i].seen);
        }
        self.counts.open = open;
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.dev.kick();
        busy || self.dev.counts.rx != rx0 || self.dev.counts.tx != tx0
    }

    /// Serves connection `i`: reads, answers complete commands while replies fit, and listens
    /// again once closed.
    fn serve(&mut self, i: usize) -> bool {
        let conn = &mut self.conns[i];
        let s = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        if !s.is_open() {
            conn.inlen = 0;
            conn.seen = false;
            let _ = s.listen(PORT);
            return false;
        }
        if s.is_active() && !conn.seen && s.state() != tcp::State::SynReceived {
            conn.seen = true;
            self.counts.accepted += 1;
        }
        if !s.may_recv() && s.state() == tcp::State::CloseWait {
            s.close();
            return true;
        }
        // SAFETY: vCPU 0 alone; connection i alone uses input buffer i.
        let inbuf = unsafe { &mut excl(&raw mut INBUF)[i] };
        let mut did = false;
        loop {
            if s.can_recv()
                && conn.inlen < IN
                && let Ok(n) = s.recv_slice(&mut inbuf[conn.inlen..])
            {
                conn.inlen += n;
                did |= n > 0;
            }
            let mut progressed = false;
            while conn.inlen > 0 && s.send_capacity() - s.send_queue() >= REPLY_MAX {
                let cmd = match parse(&inbuf[..conn.inlen]) {
                    Ok(Some(c)) => c,
                    Ok(None) if conn.inlen == IN => {
                        // A command larger than the buffer: refuse it and hang up.
                        self.counts.errors += 1;
                        let _ = s.send_slice(b"-ERR command too long\r\n");
                        s.close();
                        conn.inlen = 0;
                        return true;
                    }
                    Ok(None) => break,
                    Err(()) => {
                        self.counts.errors += 1;
                        let _ = s.send_slice(b"-ERR Protocol error\r\n");
                        s.close();
                        conn.inlen = 0;
                        return true;
                    }
                };
                let mut out = Out {
                    buf: [0; REPLY_MAX],
                    len: 0,
                };
                let keep = cmd.n == 0 || execute(&inbuf[..conn.inlen], &cmd, &mut out);
                // The check above left room for any reply.
                let _ = s.send_slice(&out.buf[..out.len]);
                inbuf.copy_within(cmd.len..conn.inlen, 0);
                conn.inlen -= cmd.len;
                progressed = true;
                if cmd.n > 0 {
                    self.counts.commands += 1;
                }
                if !keep {
                    s.close();
                    conn.inlen = 0;
                    return true;
                }
            }
            did |= progressed;
            // More input waiting, and the last round made room for it: go on.
            if !(progressed && s.can_recv()) {
                break;
            }
        }
        did
    }
}
