//! One migration connection: a non-blocking TCP socket under rustls, moving whole frames.
//! Reading and writing share one thread: while a large send waits for the socket, incoming
//! frames (fault requests) are read and queued, so neither side can dead-lock the other.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::records::{self, Opened, Records};
use super::wire::{self, Frame, HEADER_LEN};

/// Plaintext rustls may buffer before `send` waits for the socket. Small, because a fault's
/// page queues behind whatever is buffered (a few batches keep the link busy).
const TLS_BUFFER: usize = 256 << 10;
/// Socket buffer size in post-copy (see [`Link::for_postcopy`]).
const POSTCOPY_SOCKET_BUFFER: libc::c_int = 512 << 10;
/// Ciphertext one `recv` takes at most. rustls's own `read_tls` reads at most one record
/// (its buffer grown 4 KiB at a time) per system call: ~58 000 calls for a GiB, which kept
/// the receiving thread busy.
const SOCKET_READ: usize = 1 << 20;

/// Where a link's threads spend their time, measured with `SPANVMM_MIGRATION_DEBUG` set (which
/// prints it at the end of a migration; the calls are counted always): the receive and send
/// paths, split at the TLS layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStats {
    /// `recv` system calls and their time, ns.
    pub recv_calls: u64,
    /// Time in `recv`, ns.
    pub recv_ns: u64,
    /// Time rustls took to deframe and decrypt what was received, ns.
    pub decrypt_ns: u64,
    /// Time copying decrypted bytes out of rustls into the frame buffer, ns.
    pub copy_ns: u64,
    /// Time rustls took to seal (copy and encrypt) what was sent, ns.
    pub seal_ns: u64,
    /// `send`/`writev` system calls.
    pub send_calls: u64,
    /// Time in them, ns.
    pub send_ns: u64,
}

impl std::fmt::Display for LinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: u64| ns as f64 / 1e6;
        write!(
            f,
            "recv {} calls {:.1} ms, decrypt {:.1} ms, copy out {:.1} ms; seal {:.1} ms, send {} calls {:.1} ms",
            self.recv_calls,
            ms(self.recv_ns),
            ms(self.decrypt_ns),
            ms(self.copy_ns),
            ms(self.seal_ns),
            self.send_calls,
            ms(self.send_ns)
        )
    }
}

/// Which of this module's throughput levers are off (`SPANVMM_MIGRATION_LEVERS_OFF`, a comma
/// list; for A/B measurements only): `big-reads` (rustls reads the socket itself; implies
/// `own-records`), `own-records` (rustls protects the records after the hello too); and the
/// source's `queue-pacing` (post-copy paced on a long round trip only, see `source.rs`).
pub(crate) fn lever_off(name: &str) -> bool {
    static OFF: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OFF.get_or_init(|| std::env::var("SPANVMM_MIGRATION_LEVERS_OFF").unwrap_or_default())
        .split(',')
        .any(|l| l == name)
}

/// ns since `t` (0 when the link's time is not measured).
fn since(t: Option<Instant>) -> u64 {
    t.map_or(0, |t| t.elapsed().as_nanos() as u64)
}

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed or was closed.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    /// A record after the take-over from rustls is refused (see `records.rs`).
    #[error("migration TLS: {0}")]
    Record(#[from] records::RecordError),
    /// TLS refused the peer or failed.
    #[error("migration TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The peer sent a malformed frame.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Nothing came in time.
    #[error("migration peer silent for {0:?}")]
    Timeout(Duration),
    /// The VM here failed a step of the hand-over (pause, state capture, final harvest,
    /// resume).
    #[error("the source VM: {0}")]
    Vm(#[from] crate::error::HostError),
}

/// A TLS connection carrying frames.
pub struct Link {
    sock: TcpStream,
    /// rustls: the handshake and the records until [`Link::take_over_records`]; None after.
    tls: Option<Connection>,
    /// The records' own protection after the take-over.
    records: Option<Records>,
    /// The suite the handshake settled on.
    cipher: Option<super::tls::Cipher>,
    /// Sealed records not on the socket yet, `out[out_off..]` (after the take-over).
    out: Vec<u8>,
    out_off: usize,
    /// Bytes of the record being given to rustls still to give (it is given whole records,
    /// so that it holds no half-read one at the take-over).
    record_left: usize,
    /// Plaintext received; `rx[rx_off..rx_end]` is not parsed yet. Bytes past `rx_end` are
    /// initialized but stale (kept, so that reading never zero-fills memory first).
    rx: Vec<u8>,
    rx_off: usize,
    rx_end: usize,
    /// Payload range (in `rx`) of the frame parsed last.
    last: std::ops::Range<usize>,
    /// The peer closed the connection (frames before that are still delivered).
    closed: bool,
    /// Ciphertext read from the socket, `inbuf[in_off..in_end]` not given to rustls yet.
    inbuf: Vec<u8>,
    in_off: usize,
    in_end: usize,
    /// Post-copy: everything read is decrypted at once (no ciphertext waits in `inbuf` while
    /// its owner polls the socket, see [`Link::for_postcopy`]).
    drain_reads: bool,
    /// Bytes written to the socket (TLS records included).
    pub wire_bytes: u64,
    /// Where the time went.
    pub stats: LinkStats,
}

fn poll_fd(fd: RawFd, events: i16, timeout: Duration) -> std::io::Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(60_000) as i32) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(if n == 0 { 0 } else { p.revents })
}

fn set_buffer(sock: &TcpStream, which: libc::c_int, size: libc::c_int) {
    // SAFETY: setsockopt with a valid int option on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            which,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl Link {
    fn handshake(sock: TcpStream, tls: Connection, timeout: Duration) -> Result<Self, LinkError> {
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let mut link = Link {
            sock,
            tls: Some(tls),
            records: None,
            cipher: None,
            out: Vec::new(),
            out_off: 0,
            record_left: 0,
            rx: Vec::new(),
            rx_off: 0,
            rx_end: 0,
            last: 0..0,
            closed: false,
            inbuf: Vec::new(),
            in_off: 0,
            in_end: 0,
            drain_reads: false,
            wire_bytes: 0,
            stats: LinkStats::default(),
        };
        link.rustls().set_buffer_limit(Some(TLS_BUFFER));
        let deadline = Instant::now() + timeout;
        while link.rustls().is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            link.pump(left)?;
        }
        // A client learns of a refused certificate only on its first read; flush now.
        link.flush(timeout)?;
        link.cipher = link
            .rustls()
            .negotiated_cipher_suite()
            .and_then(super::tls::Cipher::of);
        Ok(link)
    }

    fn rustls(&mut self) -> &mut Connection {
        self.tls
            .as_mut()
            .expect("rustls holds the connection until the take-over")
    }

    /// Takes the records over from rustls ([`super::records`]): the keys it agreed protect
    /// them from here on, without its buffering. Called right after `hello`/`welcome`, when
    /// rustls holds nothing half-way: every record given to it read out whole, nothing unsent.
    /// The records stay TLS 1.3's own, so a peer that keeps rustls reads them as before.
    pub fn take_over_records(&mut self) -> Result<(), LinkError> {
        if self.tls.is_none() || lever_off("own-records") || lever_off("big-reads") {
            return Ok(());
        }
        self.flush(Duration::from_secs(10))?;
        if self.record_left != 0 {
            return Ok(()); // never after a whole frame; rustls then simply goes on
        }
        let tls = self.tls.take().expect("checked");
        self.records = Some(Records::new(tls.dangerous_extract_secrets()?)?);
        Ok(())
    }

    /// Records sealed or given to rustls that the socket has not taken yet.
    fn wants_write(&self) -> bool {
        match &self.tls {
            Some(t) => t.wants_write(),
            None => self.out_off < self.out.len(),
        }
    }

    /// `inbuf` holds a whole record not read yet (or the rest of the one rustls is given).
    fn record_held(&self) -> bool {
        let b = &self.inbuf[self.in_off..self.in_end];
        if self.record_left > 0 {
            return b.len() >= self.record_left;
        }
        records::record_len(b).is_some_and(|l| b.len() >= l)
    }

    /// Connects to a destination and authenticates both ends.
    pub fn connect(
        addr: SocketAddr,
        cfg: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        let conn = ClientConnection::new(cfg, super::tls::server_name())?;
        Self::handshake(sock, Connection::Client(conn), timeout)
    }

    /// Authenticates an accepted connection (the peer must present a CA-signed certificate).
    pub fn accept(
        sock: TcpStream,
        cfg: Arc<ServerConfig>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let conn = ServerConnection::new(cfg)?;
        Self::handshake(sock, Connection::Server(conn), timeout)
    }

    /// Now, when the link's time is measured (with the migration trace on).
    fn clock(&self) -> Option<Instant> {
        super::tracing_on().then(Instant::now)
    }

    /// The cipher suite the handshake settled on.
    pub fn cipher(&self) -> Option<super::tls::Cipher> {
        self.cipher
    }

    /// Few bytes in flight ahead of a faulted page: in post-copy the send and receive buffers
    /// are kept small (the kernel doubles the value; it still fills a fast link). Pre-copy
    /// keeps the kernel's self-tuning buffers: small fixed ones there made loopback TCP drop
    /// and retransmit, stalling a 1 GiB transfer for 100 ms at a time.
    pub fn for_postcopy(&mut self) {
        for which in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            set_buffer(&self.sock, which, POSTCOPY_SOCKET_BUFFER);
        }
        // The post-copy destination polls the socket itself: nothing may wait unseen here.
        self.drain_reads = true;
        let _ = self.read_some();
    }

    /// The socket, to poll together with other descriptors.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Bytes TLS holds that the socket has not taken yet: at most its buffer limit (rustls
    /// says only whether there are any, so this counts the limit when there are).
    pub fn pending_tls(&self) -> u64 {
        if self.wants_write() {
            TLS_BUFFER as u64
        } else {
            0
        }
    }

    /// Where the next frame starts in the stream, in wire bytes: those written to the socket
    /// and those sealed but held back (TLS's held bytes counted as [`Link::pending_tls`]
    /// does, rustls telling no more).
    pub fn position(&self) -> u64 {
        self.wire_bytes
            + match &self.tls {
                Some(_) => self.pending_tls(),
                None => (self.out.len() - self.out_off) as u64,
            }
    }

    /// Moves bytes both ways once: waits up to `timeout` for the socket, reads what arrived
    /// (into `rx`) and writes what TLS holds.
    fn pump(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let mut ev = libc::POLLIN;
        if self.wants_write() {
            ev |= libc::POLLOUT;
        }
        // A record already read waits for no socket event.
        let held = self.record_held();
        let rev = poll_fd(
            self.sock.as_raw_fd(),
            ev,
            if held { Duration::ZERO } else { timeout },
        )?;
        if held || rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_some()?;
        }
        self.write_some()?;
        Ok(())
    }

    fn read_some(&mut self) -> Result<(), LinkError> {
        if self.closed {
            return Err(Self::eof());
        }
        if self.records.is_some() {
            return self.read_records();
        }
        let big = !lever_off("big-reads");
        loop {
            let got = if big {
                self.read_buffered()
            } else {
                let t = self.clock();
                let tls = self.tls.as_mut().expect("rustls until the take-over");
                let r = tls.read_tls(&mut self.sock);
                self.stats.recv_calls += 1;
                self.stats.recv_ns += since(t);
                r
            };
            match got {
                Ok(0) => {
                    self.closed = true;
                    return Ok(());
                }
                Ok(_) => {
                    let t = self.clock();
                    let state = self.rustls().process_new_packets();
                    self.stats.decrypt_ns += since(t);
                    // Send any alert before reporting the error.
                    let _ = self.write_some();
                    let state = state?;
                    if state.plaintext_bytes_to_read() > 0 {
                        let at = self.rx_end;
                        let end = at + state.plaintext_bytes_to_read();
                        if self.rx.len() < end {
                            self.rx.resize(end, 0);
                        }
                        let t = self.clock();
                        let tls = self.tls.as_mut().expect("rustls until the take-over");
                        let n = tls.reader().read(&mut self.rx[at..end])?;
                        self.stats.copy_ns += since(t);
                        self.rx_end = at + n;
                    }
                    if state.peer_has_closed() && !self.rustls().is_handshaking() {
                        self.closed = true;
                        return Ok(());
                    }
                    // Stop at a whole frame: a reader goes back to its other duties (fault
                    // service) instead of draining a fast sender for hundreds of
                    // milliseconds, and little follows the frame in `rx` (cheap to move).
                    // (In post-copy the rest of what was read is decrypted first: see
                    // `drain_reads`.)
                    if self.frame_buffered() && !(self.drain_reads && self.record_held()) {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Moves what `inbuf` holds to its start and reads the socket behind it: Ok(0) when the
    /// peer closed the connection, WouldBlock when nothing came.
    fn refill(&mut self) -> std::io::Result<usize> {
        if self.inbuf.is_empty() {
            self.inbuf = vec![0; SOCKET_READ];
        }
        if self.in_off > 0 {
            self.inbuf.copy_within(self.in_off..self.in_end, 0);
            self.in_end -= self.in_off;
            self.in_off = 0;
        }
        let t = self.clock();
        let r = self.sock.read(&mut self.inbuf[self.in_end..]);
        self.stats.recv_calls += 1;
        self.stats.recv_ns += since(t);
        let n = r?;
        self.in_end += n;
        Ok(n)
    }

    /// Gives rustls the next ciphertext from `inbuf` (refilled by one large `recv` when it
    /// runs dry), never past the end of the record it is in. Ok(0): the peer closed the
    /// connection; WouldBlock: nothing to read.
    fn read_buffered(&mut self) -> std::io::Result<usize> {
        if self.record_left == 0 {
            while self.in_end - self.in_off < records::HEADER {
                if self.refill()? == 0 {
                    return Ok(0);
                }
            }
            let len = records::record_len(&self.inbuf[self.in_off..self.in_end]);
            self.record_left = len.expect("a whole header");
        }
        if self.in_off == self.in_end && self.refill()? == 0 {
            return Ok(0);
        }
        let end = self.in_end.min(self.in_off + self.record_left);
        let mut held = &self.inbuf[self.in_off..end];
        let tls = self.tls.as_mut().expect("rustls until the take-over");
        let n = tls.read_tls(&mut held)?;
        self.in_off += n;
        self.record_left -= n;
        Ok(n)
    }

    /// [`Self::read_some`] after the take-over: whole records opened where they landed in
    /// `inbuf`, their plaintext copied once, into `rx`.
    fn read_records(&mut self) -> Result<(), LinkError> {
        loop {
            let recs = self.records.as_mut().expect("taken over");
            let t = super::tracing_on().then(Instant::now);
            let opened = recs.open(&mut self.inbuf[self.in_off..self.in_end]);
            self.stats.decrypt_ns += since(t);
            match opened? {
                Opened::Record { plain, len } => {
                    let (a, b) = (self.in_off + plain.start, self.in_off + plain.end);
                    let at = self.rx_end;
                    let end = at + (b - a);
                    if self.rx.len() < end {
                        self.rx.resize(end, 0);
                    }
                    let t = self.clock();
                    self.rx[at..end].copy_from_slice(&self.inbuf[a..b]);
                    self.stats.copy_ns += since(t);
                    self.rx_end = end;
                    self.in_off += len;
                    // As with rustls: stop at a whole frame (post-copy: once nothing whole
                    // is left to open).
                    if self.frame_buffered() && !(self.drain_reads && self.record_held()) {
                        return Ok(());
                    }
                }
                Opened::Partial => match self.refill() {
                    Ok(0) => {
                        self.closed = true;
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                },
            }
        }
    }

    /// `rx` holds at least one whole frame.
    fn frame_buffered(&self) -> bool {
        let buf = &self.rx[self.rx_off..self.rx_end];
        buf.len() >= HEADER_LEN
            && buf.len()
                >= HEADER_LEN + u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize
    }

    /// Takes the buffer holding the frame [`Link::recv_raw`] returned last, leaving `spare`
    /// (emptied) in its place; returns it with the range of that frame's payload. A caller
    /// that keeps a payload (to write it on another thread) need not copy it.
    pub fn take_last_frame(&mut self, spare: Vec<u8>) -> (Vec<u8>, std::ops::Range<usize>) {
        let buf = std::mem::replace(&mut self.rx, spare);
        // What followed the frame (part of the next one) stays.
        let tail = &buf[self.rx_off..self.rx_end];
        if self.rx.len() < tail.len() {
            self.rx.resize(tail.len(), 0);
        }
        self.rx[..tail.len()].copy_from_slice(tail);
        self.rx_end = tail.len();
        self.rx_off = 0;
        (buf, self.last.clone())
    }

    fn eof() -> LinkError {
        LinkError::Io(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ))
    }

    fn write_some(&mut self) -> Result<(), LinkError> {
        while self.wants_write() {
            let t = self.clock();
            let r = match self.tls.as_mut() {
                Some(tls) => tls.write_tls(&mut self.sock),
                None => {
                    let r = self.sock.write(&self.out[self.out_off..]);
                    if let Ok(n) = r {
                        self.out_off += n;
                        if self.out_off == self.out.len() {
                            self.out.clear();
                            self.out_off = 0;
                        }
                    }
                    r
                }
            };
            self.stats.send_calls += 1;
            self.stats.send_ns += since(t);
            match r {
                Ok(n) => self.wire_bytes += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Queues one encoded frame (or several); waits for the socket only while TLS's buffer is
    /// full. Incoming frames keep being read meanwhile.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send_slices(&mut [IoSlice::new(bytes)])
    }

    /// Like [`Link::send_bytes`] for a frame in pieces (a header, then pages straight from
    /// guest memory): TLS gathers the pieces into full-size records as it seals them, so
    /// they are copied once, not first into one buffer.
    pub fn send_slices(&mut self, mut slices: &mut [IoSlice<'_>]) -> Result<(), LinkError> {
        let started = Instant::now();
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let t = self.clock();
            let n = match self.tls.as_mut() {
                Some(tls) => tls.writer().write_vectored(slices)?,
                None => self.seal(slices)?,
            };
            self.stats.seal_ns += since(t);
            IoSlice::advance_slices(&mut slices, n);
            if n == 0 || self.wants_write() {
                self.write_some()?;
            }
            if n == 0 {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(LinkError::Timeout(Duration::from_secs(30)));
                }
                self.pump(Duration::from_millis(100))?;
            }
        }
        self.write_some()
    }

    /// Seals what of `slices` fits into `out` (up to [`TLS_BUFFER`] held back, as rustls
    /// holds): full-size records, each gathered straight from the slices. Returns the bytes
    /// taken.
    fn seal(&mut self, slices: &[IoSlice<'_>]) -> Result<usize, LinkError> {
        // What the socket took goes; what it has not stays in front.
        if self.out_off >= 1 << 20 {
            self.out.drain(..self.out_off);
            self.out_off = 0;
        }
        let recs = self.records.as_mut().expect("taken over");
        let mut taken = 0;
        let (mut i, mut off) = (0, 0);
        while i < slices.len() && self.out.len() - self.out_off < TLS_BUFFER {
            let at = Records::begin(&mut self.out);
            let mut n = 0;
            while n < records::MAX_PLAIN && i < slices.len() {
                let s = &slices[i][off..];
                let k = s.len().min(records::MAX_PLAIN - n);
                self.out.extend_from_slice(&s[..k]);
                n += k;
                off += k;
                if off == slices[i].len() {
                    i += 1;
                    off = 0;
                }
            }
            recs.seal(&mut self.out, at)?;
            taken += n;
        }
        Ok(taken)
    }

    /// Encodes and queues a frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), LinkError> {
        let mut b = Vec::new();
        wire::encode(f, &mut b);
        self.send_bytes(&b)
    }

    /// Waits until everything queued is on the socket.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        while self.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            self.pump(left.min(Duration::from_millis(100)))?;
        }
        Ok(())
    }

    /// The next complete frame in `rx`: (type, payload range); the header is checked.
    fn parse_raw(&mut self) -> Result<Option<(u8, usize, usize)>, LinkError> {
        // Drop what earlier frames used (no slice of it is alive any more).
        if self.rx_off == self.rx_end {
            self.rx_off = 0;
            self.rx_end = 0;
            self.rx_off = 0;
        } else if self.rx_off > (1 << 20) {
            self.rx.copy_within(self.rx_off..self.rx_end, 0);
            self.rx_end -= self.rx_off;
            self.rx_off = 0;
        }
        let buf = &self.rx[self.rx_off..self.rx_end];
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let (len, ty) = wire::header(buf[..HEADER_LEN].try_into().expect("header"))?;
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let start = self.rx_off + HEADER_LEN;
        self.rx_off = start + len;
        self.last = start..start + len;
        Ok(Some((ty, start, start + len)))
    }

    fn parse(&mut self) -> Result<Option<Frame>, LinkError> {
        match self.parse_raw()? {
            Some((ty, a, b)) => Ok(Some(wire::decode(ty, &self.rx[a..b])?)),
            None => Ok(None),
        }
    }

    /// The next frame undecoded, waiting up to `timeout`: (type, payload). For `pages`
    /// frames, decoded in place with [`wire::decode_pages`].
    pub fn recv_raw(&mut self, timeout: Duration) -> Result<Option<(u8, &[u8])>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((ty, a, b)) = self.parse_raw()? {
                return Ok(Some((ty, &self.rx[a..b])));
            }
            if self.closed {
                return Err(Self::eof());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.pump(left)?;
            if left.is_zero() {
                return Ok(match self.parse_raw()? {
                    Some((ty, a, b)) => Some((ty, &self.rx[a..b])),
                    None => None,
                });
            }
        }
    }

    /// The next frame, waiting up to `timeout`; `None` when none came.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.parse()? {
                return Ok(Some(f));
            }
            if self.closed {
                return Err(Self::eof());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.pump(left)?;
            if left.is_zero() {
                return self.parse();
            }
        }
    }

    /// Ends a connection this side gives up on, after its last frame (flushed): the write side
    /// is shut (the peer reads the frame, then end-of-stream) and what the peer still sends is
    /// read and dropped until it closes or `linger` passes. Closing with unread bytes would
    /// make the kernel send a reset, which can discard the last frame before the peer reads it.
    pub fn close_after_last_words(&mut self, linger: Duration) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + linger;
        while let Ok(Some(_)) = self.recv_raw(deadline.saturating_duration_since(Instant::now())) {}
    }

    /// A write that failed on a closed connection may hide why the peer closed it: a peer
    /// that refuses sends an `error` frame and closes, and a write racing that close fails
    /// first (broken pipe). The peer's reason, if its frame is still readable (within a few
    /// frames and `LAST_WORDS`), replaces the bare I/O error.
    pub fn with_peer_reason(&mut self, e: LinkError) -> LinkError {
        const LAST_WORDS: Duration = Duration::from_millis(200);
        if !matches!(e, LinkError::Io(_)) {
            return e;
        }
        let deadline = Instant::now() + LAST_WORDS;
        for _ in 0..64 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some(Frame::Error(msg))) => {
                    return LinkError::Io(std::io::Error::other(format!("the peer gave up: {msg}")))
                }
                Ok(Some(_)) if !left.is_zero() => {}
                _ => break,
            }
        }
        e
    }

    /// The next frame within `timeout`, or an error naming what was expected.
    pub fn expect(&mut self, timeout: Duration, what: &str) -> Result<Frame, LinkError> {
        match self.recv(timeout)? {
            Some(Frame::Error(msg)) => Err(LinkError::Io(std::io::Error::other(format!(
                "the peer gave up: {msg}"
            )))),
            Some(f) => Ok(f),
            None => Err(LinkError::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no {what} from the peer within {timeout:?}"),
            ))),
        }
    }
}
