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
        Self::start_args(dir, &[])
    }

    /// `n` servers on loopback joined into one Redis Cluster (no replicas) by
    /// `redis-cli --cluster create`, returned once every one reports the cluster whole.
    pub fn start_cluster(dir: &Path, n: usize) -> io::Result<Vec<Self>> {
        let servers = (0..n)
            .map(|_| Self::start_args(dir, &["--cluster-enabled", "yes"]))
            .collect::<io::Result<Vec<_>>>()?;
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(servers.iter().map(|s| s.addr.to_string()))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for s in &servers {
            while !inline(s.addr, "CLUSTER INFO")?.contains("cluster_state:ok") {
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!("{}: cluster not ok", s.addr)));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(servers)
    }

    /// A server on a free loopback port with extra arguments (`--requirepass P`, ...).
    pub fn start_args(dir: &Path, extra: &[&str]) -> io::Result<Self> {
        // The port is found free and then handed over: another process may take it in
        // between, so a server that exits at once is retried on another port.
        let mut last = None;
        for _ in 0..5 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            let mut cmd = Command::new("redis-server");
            cmd.args(extra);
            match Self::start_with(cmd, IpAddr::V4(Ipv4Addr::LOCALHOST), port, dir) {
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
            // Servers sharing a directory keep their cluster state apart (if in a cluster).
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
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

/// An inline command's reply, as text (what one read brings: short replies only).
fn inline(addr: SocketAddr, cmd: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut b = vec![0u8; 8192];
    let n = s.read(&mut b)?;
    Ok(String::from_utf8_lossy(&b[..n]).into_owned())
}

fn ping(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut b = [0u8; 64];
    let n = s.read(&mut b)?;
    // A server that requires a password answers too: it is up.
    if b[..n].starts_with(b"+PONG\r\n") || b[..n].starts_with(b"-NOAUTH") {
        Ok(())
    } else {
        Err(io::Error::other("not PONG"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetLab;

    /// An intermediary on a host of its own, behind a shaped link, reached from the root
    /// namespace; killed, it no longer answers.
    #[test]
    fn a_redis_server_in_a_host_behind_a_shaped_link() {
        let needs = NetLab::available().and_then(|()| RedisServer::available());
        if !crate::can_run("a_redis_server_in_a_host_behind_a_shaped_link", needs) {
            return;
        }
        let lab = NetLab::new("r", &["mid"]).unwrap();
        lab.shape("mid", 50_000_000).unwrap();
        let dir = std::env::temp_dir().join(format!("netlab-redis-{}", std::process::id()));
        let ip = lab.host("mid").ip;
        let mut s = RedisServer::start_with(
            lab.command("mid", "redis-server"),
            IpAddr::V4(ip),
            6379,
            &dir,
        )
        .unwrap();
        assert_eq!(s.addr(), SocketAddr::new(IpAddr::V4(ip), 6379));
        assert!(s.alive());
        assert!(inline(s.addr(), "INFO server")
            .unwrap()
            .contains("redis_version:"));
        s.kill();
        assert!(!s.alive());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
