//! Real `redis-server` processes for tests and benchmarks (Scatter-Gather's intermediaries):
//! started on a port of their own with no persistence, waited for until they answer `PING`,
//! killed when dropped.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server gets to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One running `redis-server`.
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl RedisServer {
    /// Whether `redis-server` can be run here (for [`crate::can_run`]).
    pub fn available() -> Result<(), String> {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("redis-server --version: {s}")),
            Err(e) => Err(format!("redis-server not found: {e}")),
        }
    }

    /// A server on a free loopback port, its files (log) in `dir`.
    pub fn start(dir: &Path) -> io::Result<Self> {
        // The port is found free and then handed over: another process may take it in
        // between, so a server that exits at once is retried on another port.
        let mut last = None;
        for _ in 0..5 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            match Self::start_with(
                Command::new("redis-server"),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
                dir,
            ) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// A server started by `cmd` (`redis-server`, or [`crate::NetLab::command`] of it for a
    /// server inside a host), listening on `bind:port`, reachable from the caller there.
    pub fn start_with(mut cmd: Command, bind: IpAddr, port: u16, dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join(format!("redis-{port}.log"));
        let child = cmd
            .args(["--bind", &bind.to_string(), "--port", &port.to_string()])
            // A cache of pages in transit: nothing is persisted.
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut s = RedisServer {
            child,
            addr: SocketAddr::new(bind, port),
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = s.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "redis-server on {} exited ({status}): {}",
                    s.addr,
                    s.log_tail()
                )));
            }
            if ping(s.addr).is_ok() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "redis-server on {} did not answer PING: {}",
                    s.addr,
                    s.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL: an intermediary that dies, not one that shuts down cleanly).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still answers `PING`.
    pub fn alive(&self) -> bool {
        ping(self.addr).is_ok()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut b = [0u8; 7];
    s.read_exact(&mut b)?;
    if &b == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(io::Error::other("not PONG"))
    }
}
