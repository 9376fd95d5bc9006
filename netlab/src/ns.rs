//! Hosts as network namespaces joined to the root namespace by (optionally shaped) veth pairs.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Serializes subnet allocation between processes (tests of several checkouts may run at once).
const LOCK_FILE: &str = "/tmp/netlab.lock";

/// One simulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name given by the caller (`src`, `dst`, `mid1`, ...).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// The host's address.
    pub ip: Ipv4Addr,
    /// The root namespace's address on the host's link (its gateway).
    pub gateway: Ipv4Addr,
    /// Subnet number `n` of `10.77.<n>.0/24`.
    subnet: u8,
}

impl Host {
    /// The wrapper that runs a program inside this host.
    pub fn wrapper(&self) -> [&str; 4] {
        wrapper(&self.netns)
    }

    fn veth_root(&self) -> String {
        format!("nl{}r", self.subnet)
    }

    fn veth_host(&self) -> String {
        format!("nl{}h", self.subnet)
    }
}

/// Network namespaces as hosts, routed through the root namespace. Dropping it deletes them.
pub struct NetLab {
    hosts: Vec<Host>,
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The wrapper that runs a program inside network namespace `ns`.
pub(crate) fn wrapper(ns: &str) -> [&str; 4] {
    ["ip", "netns", "exec", ns]
}

pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    run(Command::new("ip").args(args))
}

pub(crate) fn in_ns(ns: &str, program: &str, args: &[&str]) -> io::Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args))
}

/// A tbf shaping `rate` bits/s on `dev` (in `ns`, or the root namespace), with a 10 ms burst
/// and a queue of at most 50 ms.
pub(crate) fn tbf(ns: Option<&str>, dev: &str, rate_bps: u64) -> io::Result<()> {
    let burst = (rate_bps / 8 / 100).max(64 << 10).to_string();
    let rate = format!("{rate_bps}bit");
    let args = [
        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "50ms",
    ];
    match ns {
        Some(ns) => in_ns(ns, "tc", &args),
        None => run(Command::new("tc").args(args)),
    }
}

/// Held while allocating subnets; the lock goes with the file.
struct FileLock {
    _file: File,
}

impl FileLock {
    fn take() -> io::Result<Self> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)?;
        // SAFETY: flock on a file descriptor we own; released when the file closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock { _file: f })
    }
}

/// Subnet numbers whose veth names exist already (another lab's, maybe in another process).
fn used_subnets() -> io::Result<Vec<u8>> {
    let out = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("nl"))
        .filter_map(|w| w.split(['r', 'h']).next()?.parse().ok())
        .collect())
}

impl NetLab {
    /// Whether labs can be built here; the reason when not (not root, no `ip`/`tc`).
    pub fn available() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        for tool in ["ip", "tc"] {
            let ok = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!("`{tool}` (iproute2) is not installed"));
            }
        }
        Ok(())
    }

    /// Creates one namespace per name, each on its own veth link to the root namespace, with
    /// forwarding on so hosts reach each other through it. `tag` keeps concurrent labs apart.
    pub fn new(tag: &str, names: &[&str]) -> io::Result<Self> {
        NetLab::available().map_err(io::Error::other)?;
        let _lock = FileLock::take()?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        let mut used = used_subnets()?;
        let mut lab = NetLab { hosts: Vec::new() };
        for name in names {
            let subnet = (1..=250u8)
                .find(|n| !used.contains(n))
                .ok_or_else(|| io::Error::other("no free 10.77.x.0/24 subnet"))?;
            used.push(subnet);
            let host = Host {
                name: name.to_string(),
                netns: format!("nl-{tag}-{name}-{}", std::process::id()),
                ip: Ipv4Addr::new(10, 77, subnet, 2),
                gateway: Ipv4Addr::new(10, 77, subnet, 1),
                subnet,
            };
            // Registered before it exists, so a failure half-way is cleaned up by drop.
            lab.hosts.push(host.clone());
            lab.add(&host)?;
        }
        Ok(lab)
    }

    fn add(&self, h: &Host) -> io::Result<()> {
        let (vr, vh) = (h.veth_root(), h.veth_host());
        ip(&["netns", "add", &h.netns])?;
        ip(&[
            "link", "add", &vr, "type", "veth", "peer", "name", &vh, "netns", &h.netns,
        ])?;
        ip(&["addr", "add", &format!("{}/24", h.gateway), "dev", &vr])?;
        ip(&["link", "set", &vr, "up"])?;
        let ns = h.netns.as_str();
        in_ns(ns, "ip", &["link", "set", "lo", "up"])?;
        in_ns(
            ns,
            "ip",
            &["addr", "add", &format!("{}/24", h.ip), "dev", &vh],
        )?;
        in_ns(ns, "ip", &["link", "set", &vh, "up"])?;
        in_ns(
            ns,
            "ip",
            &["route", "add", "default", "via", &h.gateway.to_string()],
        )
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this lab"))
    }

    /// Shapes `name`'s link to `rate_bps` bits/s in both directions (tbf on both veth ends).
    pub fn shape(&self, name: &str, rate_bps: u64) -> io::Result<()> {
        let h = self.host(name);
        tbf(None, &h.veth_root(), rate_bps)?;
        tbf(Some(&h.netns), &h.veth_host(), rate_bps)
    }

    /// `program` to be run inside host `name`.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).netns])
            .arg(program);
        c
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting the namespace takes its veth end, and with it the root end.
            let _ = ip(&["netns", "del", &h.netns]);
            let _ = ip(&["link", "del", &h.veth_root()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DelayRelay;
    use std::net::SocketAddr;
    use std::time::Duration;

    #[test]
    fn hosts_reach_each_other_through_a_shaped_delayed_link() {
        if !crate::can_run(
            "hosts_reach_each_other_through_a_shaped_delayed_link",
            NetLab::available(),
        ) {
            return;
        }
        let lab = NetLab::new("t", &["a", "b"]).unwrap();
        let (a, b) = (lab.host("a").clone(), lab.host("b").clone());
        // b serves a 4 MiB blob on port 7000 (python3 is installed by .ci/setup).
        let mut server = lab
            .command("b", "python3")
            .args([
                "-c",
                "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('0.0.0.0',7000));s.listen(1)\nc,_=s.accept()\nc.recv(1)\nc.sendall(b'x'*(4<<20))\nc.close()",
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The relay in the root namespace listens on a's gateway and adds 10 ms each way.
        let relay = DelayRelay::start(
            SocketAddr::new(a.gateway.into(), 0),
            SocketAddr::new(b.ip.into(), 7000),
            Duration::from_millis(10),
            256 << 10,
        )
        .unwrap();
        lab.shape("b", 100_000_000).unwrap();
        // a fetches the blob through the relay.
        let out = lab
            .command("a", "python3")
            .args([
                "-c",
                &format!(
                    "import socket,time\nc=socket.create_connection(('{}',{}))\nt=time.time()\n\
                     c.sendall(b'g')\nn=0\nfirst=None\nwhile True:\n d=c.recv(1<<16)\n \
                     first=first or time.time()\n if not d: break\n n+=len(d)\n\
                     print(n, first-t, time.time()-t)",
                    a.gateway,
                    relay.addr().port()
                ),
            ])
            .output()
            .unwrap();
        let _ = server.kill();
        let _ = server.wait();
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(
            f.len(),
            3,
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(f[0] as u64, 4 << 20, "all bytes arrive");
        assert!(f[1] >= 0.019, "first byte after one round trip: {}", f[1]);
        // 4 MiB at 100 Mbit/s takes at least 0.33 s.
        assert!(f[2] >= 0.30, "the link is shaped: {} s", f[2]);
    }
}
