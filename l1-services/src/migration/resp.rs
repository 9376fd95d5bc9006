//! A small RESP2 client (the Redis protocol) over a blocking `TcpStream`: commands are arrays
//! of binary-safe bulk strings, queued and flushed together (pipelining), replies read in
//! order. The server is not trusted: every length is bounded before anything is allocated,
//! and nesting is limited, so a hostile or broken server gets an error, not our memory.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The longest reply line (`+OK`, `-ERR ...`, `:1`, `$4096`) we accept.
const MAX_LINE: usize = 4096;
/// Nesting of arrays we accept (our commands get flat replies).
const MAX_DEPTH: usize = 4;

/// RESP client errors.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The connection failed, was closed or timed out.
    #[error("redis {addr}: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// What failed.
        source: io::Error,
    },
    /// The server refused us (authentication).
    #[error("redis {addr}: {what}")]
    Refused {
        /// The server.
        addr: SocketAddr,
        /// Its answer.
        what: String,
    },
    /// The server sent something that is not RESP, or more than we accept.
    #[error("redis {addr}: protocol: {what}")]
    Protocol {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`: the command failed (the connection is fine).
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bulk string; `None` for the null bulk (a missing key).
    Bulk(Option<Vec<u8>>),
    /// `*n`; `None` for the null array.
    Array(Option<Vec<Reply>>),
}

/// A connection to one server.
pub struct Resp {
    addr: SocketAddr,
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    /// Commands queued and not answered yet.
    pending: usize,
    /// The largest bulk reply accepted.
    max_bulk: usize,
    /// Bytes written (commands) and read (replies).
    pub bytes_out: u64,
    /// Bytes read (replies).
    pub bytes_in: u64,
}

impl Resp {
    /// Connects within `timeout`; reads and writes then time out after `timeout` too (a
    /// server that hangs is an error, not a hang). Bulk replies longer than `max_bulk` are
    /// refused.
    pub fn connect(
        addr: SocketAddr,
        timeout: Duration,
        max_bulk: usize,
    ) -> Result<Self, RespError> {
        let io = |source| RespError::Io { addr, source };
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        let r = BufReader::with_capacity(64 << 10, s.try_clone().map_err(io)?);
        Ok(Resp {
            addr,
            r,
            w: BufWriter::with_capacity(64 << 10, s),
            pending: 0,
            max_bulk,
            bytes_out: 0,
            bytes_in: 0,
        })
    }

    /// Authenticates (`AUTH [user] password`): anything but `+OK` is refused.
    pub fn auth(&mut self, user: Option<&str>, password: &str) -> Result<(), RespError> {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        args.extend(user.map(str::as_bytes));
        args.push(password.as_bytes());
        match self.call(&args)? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(RespError::Refused {
                addr: self.addr,
                what: format!("AUTH refused: {other:?}"),
            }),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn io(&self, source: io::Error) -> RespError {
        RespError::Io {
            addr: self.addr,
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> RespError {
        RespError::Protocol {
            addr: self.addr,
            what: what.into(),
        }
    }

    /// Queues one command (not sent until [`Resp::flush`] or a read).
    pub fn queue(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        let mut head = format!("*{}\r\n", args.len());
        let mut n = 0u64;
        for a in args {
            head.push_str(&format!("${}\r\n", a.len()));
            self.w.write_all(head.as_bytes()).map_err(|e| self.io(e))?;
            self.w.write_all(a).map_err(|e| self.io(e))?;
            n += (head.len() + a.len()) as u64;
            head.clear();
            head.push_str("\r\n");
        }
        self.w.write_all(head.as_bytes()).map_err(|e| self.io(e))?;
        self.bytes_out += n + head.len() as u64;
        self.pending += 1;
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), RespError> {
        self.w.flush().map_err(|e| self.io(e))
    }

    /// The reply to the oldest unanswered command (flushing first).
    pub fn read(&mut self) -> Result<Reply, RespError> {
        if self.pending == 0 {
            return Err(self.protocol("read with no command pending"));
        }
        self.flush()?;
        let reply = self.reply(0)?;
        self.pending -= 1;
        Ok(reply)
    }

    /// Sends one command and returns its reply (nothing else may be pending).
    pub fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RespError> {
        if self.pending > 0 {
            return Err(self.protocol("call with pipelined commands unanswered"));
        }
        self.queue(args)?;
        self.read()
    }

    fn line(&mut self) -> Result<Vec<u8>, RespError> {
        let mut line = Vec::new();
        let n = (&mut self.r)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io(e))?;
        self.bytes_in += n as u64;
        if n == 0 {
            return Err(self.io(io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(self.protocol("reply line too long or not CRLF-terminated"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn int(&self, s: &[u8]) -> Result<i64, RespError> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.protocol("bad integer in reply"))
    }

    fn reply(&mut self, depth: usize) -> Result<Reply, RespError> {
        let line = self.line()?;
        let Some((&kind, rest)) = line.split_first() else {
            return Err(self.protocol("empty reply line"));
        };
        let text = || String::from_utf8_lossy(rest).into_owned();
        Ok(match kind {
            b'+' => Reply::Simple(text()),
            b'-' => Reply::Error(text()),
            b':' => Reply::Int(self.int(rest)?),
            b'$' => {
                let n = self.int(rest)?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let n = n as usize;
                if n > self.max_bulk {
                    return Err(self.protocol(format!(
                        "bulk reply of {n} bytes (at most {} accepted)",
                        self.max_bulk
                    )));
                }
                let mut v = vec![0u8; n + 2];
                self.r.read_exact(&mut v).map_err(|e| self.io(e))?;
                self.bytes_in += v.len() as u64;
                if !v.ends_with(b"\r\n") {
                    return Err(self.protocol("bulk reply not CRLF-terminated"));
                }
                v.truncate(n);
                Reply::Bulk(Some(v))
            }
            b'*' => {
                let n = self.int(rest)?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                if depth >= MAX_DEPTH || n as usize > self.max_bulk / 4 {
                    return Err(self.protocol("array reply too deep or too long"));
                }
                let mut items = Vec::with_capacity((n as usize).min(1024));
                for _ in 0..n {
                    items.push(self.reply(depth + 1)?);
                }
                Reply::Array(Some(items))
            }
            other => return Err(self.protocol(format!("unknown reply type {:?}", other as char))),
        })
    }
}
