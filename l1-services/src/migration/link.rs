//! One migration connection: a non-blocking TCP socket under rustls, moving whole frames.
//! Reading and writing share one thread: while a large send waits for the socket, incoming
//! frames (fault requests) are read and queued, so neither side can dead-lock the other.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::wire::{self, Frame, HEADER_LEN};

/// Plaintext rustls may buffer before `send` waits for the socket. Small, because a fault's
/// page queues behind whatever is buffered (a few batches keep the link busy).
const TLS_BUFFER: usize = 256 << 10;
/// Socket buffer size in post-copy (see [`Link::for_postcopy`]).
const POSTCOPY_SOCKET_BUFFER: libc::c_int = 512 << 10;

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed or was closed.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
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
    tls: Connection,
    /// Plaintext received; `rx[rx_off..rx_end]` is not parsed yet. Bytes past `rx_end` are
    /// initialized but stale (kept, so that reading never zero-fills memory first).
    rx: Vec<u8>,
    rx_off: usize,
    rx_end: usize,
    /// Payload range (in `rx`) of the frame parsed last.
    last: std::ops::Range<usize>,
    /// The peer closed the connection (frames before that are still delivered).
    closed: bool,
    /// Bytes written to the socket (TLS records included).
    pub wire_bytes: u64,
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
            tls,
            rx: Vec::new(),
            rx_off: 0,
            rx_end: 0,
            last: 0..0,
            closed: false,
            wire_bytes: 0,
        };
        link.tls.set_buffer_limit(Some(TLS_BUFFER));
        let deadline = Instant::now() + timeout;
        while link.tls.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            link.pump(left)?;
        }
        // A client learns of a refused certificate only on its first read; flush now.
        link.flush(timeout)?;
        Ok(link)
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

    /// The cipher suite the handshake settled on.
    pub fn cipher(&self) -> Option<super::tls::Cipher> {
        self.tls
            .negotiated_cipher_suite()
            .and_then(super::tls::Cipher::of)
    }

    /// Few bytes in flight ahead of a faulted page: in post-copy the send and receive buffers
    /// are kept small (the kernel doubles the value; it still fills a fast link). Pre-copy
    /// keeps the kernel's self-tuning buffers: small fixed ones there made loopback TCP drop
    /// and retransmit, stalling a 1 GiB transfer for 100 ms at a time.
    pub fn for_postcopy(&mut self) {
        for which in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            set_buffer(&self.sock, which, POSTCOPY_SOCKET_BUFFER);
        }
    }

    /// The socket, to poll together with other descriptors.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Bytes TLS holds that the socket has not taken yet: at most its buffer limit (rustls
    /// says only whether there are any, so this counts the limit when there are).
    pub fn pending_tls(&self) -> u64 {
        if self.tls.wants_write() {
            TLS_BUFFER as u64
        } else {
            0
        }
    }

    /// Moves bytes both ways once: waits up to `timeout` for the socket, reads what arrived
    /// (into `rx`) and writes what TLS holds.
    fn pump(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let mut ev = libc::POLLIN;
        if self.tls.wants_write() {
            ev |= libc::POLLOUT;
        }
        let rev = poll_fd(self.sock.as_raw_fd(), ev, timeout)?;
        if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_some()?;
        }
        self.write_some()?;
        Ok(())
    }

    fn read_some(&mut self) -> Result<(), LinkError> {
        if self.closed {
            return Err(Self::eof());
        }
        loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    self.closed = true;
                    return Ok(());
                }
                Ok(_) => {
                    let state = self.tls.process_new_packets();
                    // Send any alert before reporting the error.
                    let _ = self.write_some();
                    let state = state?;
                    if state.plaintext_bytes_to_read() > 0 {
                        let at = self.rx_end;
                        let end = at + state.plaintext_bytes_to_read();
                        if self.rx.len() < end {
                            self.rx.resize(end, 0);
                        }
                        let n = self.tls.reader().read(&mut self.rx[at..end])?;
                        self.rx_end = at + n;
                    }
                    if state.peer_has_closed() && !self.tls.is_handshaking() {
                        self.closed = true;
                        return Ok(());
                    }
                    // Stop at a whole frame: a reader goes back to its other duties (fault
                    // service) instead of draining a fast sender for hundreds of
                    // milliseconds, and little follows the frame in `rx` (cheap to move).
                    if self.frame_buffered() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
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
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
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
            let n = self.tls.writer().write_vectored(slices)?;
            IoSlice::advance_slices(&mut slices, n);
            if n == 0 || self.tls.wants_write() {
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

    /// Encodes and queues a frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), LinkError> {
        let mut b = Vec::new();
        wire::encode(f, &mut b);
        self.send_bytes(&b)
    }

    /// Waits until everything queued is on the socket.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        while self.tls.wants_write() {
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
