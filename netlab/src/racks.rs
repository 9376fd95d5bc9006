//! Two racks joined by one shaped core link (gang migration's topology, GMGD): each rack is a
//! namespace holding a bridge (its top-of-rack switch, also the rack's router) with its hosts,
//! namespaces of their own, on unshaped veths; the two rack namespaces are joined by one veth
//! pair, the core, tbf-shaped in both directions. Everything between the racks crosses the core,
//! and the core's tbf counters say how many bytes did, per direction.
//!
//! Nothing of it touches the root namespace (every link is made inside the namespaces), so
//! addresses and interface names are fixed: rack A is `10.78.1.0/24`, rack B `10.78.2.0/24`,
//! hosts from `.10` on, each rack's router `.1`; the core is `10.78.0.0/30`. A test reaches a
//! host's servers from a thread that enters the host's namespace ([`Racks::within`]) or runs
//! its commands there ([`Racks::command`]).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use crate::ns::{in_ns, ip, tbf};
use crate::NetLab;

/// One host of a rack.
#[derive(Debug, Clone)]
pub struct RackHost {
    /// The caller's name for it.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// 0: rack A, 1: rack B.
    pub rack: usize,
}

impl RackHost {
    /// The wrapper that runs a program inside this host.
    pub fn wrapper(&self) -> [&str; 4] {
        crate::ns::wrapper(&self.netns)
    }
}

/// Two racks of hosts and the core link between them. Dropping it deletes every namespace.
pub struct Racks {
    /// The rack namespaces (A, B), then the hosts'.
    routers: [String; 2],
    hosts: Vec<RackHost>,
}

impl Racks {
    /// Rack A with hosts `a`, rack B with hosts `b`, the core shaped to `core_bps` bits/s in
    /// each direction. `tag` keeps concurrent set-ups apart (namespace names carry it and the
    /// process id).
    pub fn new(tag: &str, a: &[&str], b: &[&str], core_bps: u64) -> io::Result<Self> {
        NetLab::available().map_err(io::Error::other)?;
        if a.len() + b.len() > 200 {
            return Err(io::Error::other("at most 200 hosts"));
        }
        let pid = std::process::id();
        let mut racks = Racks {
            routers: [
                format!("nl-{tag}-rackA-{pid}"),
                format!("nl-{tag}-rackB-{pid}"),
            ],
            hosts: Vec::new(),
        };
        // Registered before they exist: a failure half-way is cleaned up by drop.
        let mut created = Vec::new();
        let result = (|| {
            for (r, ns) in racks.routers.iter().enumerate() {
                ip(&["netns", "add", ns])?;
                created.push(ns.clone());
                let gw = format!("10.78.{}.1/24", r + 1);
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
                ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
                ip(&["-n", ns, "addr", "add", &gw, "dev", "br0"])?;
                ip(&["-n", ns, "link", "set", "br0", "up"])?;
                in_ns(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            }
            let [ra, rb] = &racks.routers;
            // The core: one veth pair between the two rack routers, shaped both ways.
            ip(&[
                "-n", ra, "link", "add", "core", "type", "veth", "peer", "name", "core", "netns",
                rb,
            ])?;
            for (r, ns) in [ra, rb].into_iter().enumerate() {
                let (me, peer_net) = (format!("10.78.0.{}/30", r + 1), 2 - r);
                ip(&["-n", ns, "addr", "add", &me, "dev", "core"])?;
                ip(&["-n", ns, "link", "set", "core", "up"])?;
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("10.78.{peer_net}.0/24"),
                    "via",
                    &format!("10.78.0.{}", 2 - r),
                ])?;
                tbf(Some(ns), "core", core_bps)?;
            }
            for (r, names) in [a, b].into_iter().enumerate() {
                for (i, name) in names.iter().enumerate() {
                    let h = RackHost {
                        name: name.to_string(),
                        netns: format!("nl-{tag}-{name}-{pid}"),
                        ip: Ipv4Addr::new(10, 78, r as u8 + 1, 10 + i as u8),
                        rack: r,
                    };
                    ip(&["netns", "add", &h.netns])?;
                    created.push(h.netns.clone());
                    let port = format!("p{i}");
                    let router = &racks.routers[r];
                    ip(&[
                        "-n", router, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                        "netns", &h.netns,
                    ])?;
                    ip(&["-n", router, "link", "set", &port, "master", "br0"])?;
                    ip(&["-n", router, "link", "set", &port, "up"])?;
                    let ns = h.netns.as_str();
                    ip(&["-n", ns, "link", "set", "lo", "up"])?;
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{}/24", h.ip),
                        "dev",
                        "eth0",
                    ])?;
                    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
                    ip(&[
                        "-n",
                        ns,
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("10.78.{}.1", r + 1),
                    ])?;
                    racks.hosts.push(h);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(racks),
            Err(e) => {
                for ns in created {
                    let _ = ip(&["netns", "del", &ns]);
                }
                racks.routers = [String::new(), String::new()];
                racks.hosts.clear();
                Err(e)
            }
        }
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &RackHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in these racks"))
    }

    /// `program` to be run inside host `name`.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).netns])
            .arg(program);
        c
    }

    /// Bytes that crossed the core so far, (A → B, B → A): the tbf qdiscs' counts at each
    /// end (every packet, IP and Ethernet headers included, whoever sent it).
    pub fn core_bytes(&self) -> io::Result<(u64, u64)> {
        let count = |ns: &str| -> io::Result<u64> {
            let out = Command::new("tc")
                .args(["-n", ns, "-s", "qdisc", "show", "dev", "core"])
                .output()?;
            // "qdisc tbf 8001: root ... \n Sent 1234 bytes 56 pkt ...": the tbf's line.
            let text = String::from_utf8_lossy(&out.stdout);
            text.split("qdisc ")
                .find(|q| q.starts_with("tbf "))
                .and_then(|q| q.split("Sent ").nth(1))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    io::Error::other(format!("no tbf counter on the core in {ns}: {text}"))
                })
        };
        Ok((count(&self.routers[0])?, count(&self.routers[1])?))
    }

    /// Runs `f` on a thread inside host `name`'s network namespace: the sockets it opens are
    /// that host's (to reach a server inside a rack from the test itself).
    pub fn within<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = format!("/var/run/netns/{}", self.host(name).netns);
        let ns = File::open(&path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we own; it moves only this (new) thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("the thread inside the namespace panicked"))?
        })
    }
}

impl Drop for Racks {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in self
            .hosts
            .iter()
            .map(|h| &h.netns)
            .chain(self.routers.iter())
        {
            if !ns.is_empty() {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// 4 MiB from rack A to rack B crosses the shaped core (counted there, at its rate), while
    /// 4 MiB between two hosts of rack B does not touch it.
    #[test]
    fn the_core_carries_and_counts_what_crosses_racks_only() {
        if !crate::can_run(
            "the_core_carries_and_counts_what_crosses_racks_only",
            NetLab::available(),
        ) {
            return;
        }
        let racks = Racks::new("rk", &["a0"], &["b0", "b1"], 100_000_000).unwrap();
        let b0 = racks.host("b0").ip;
        // A server in b0 that reads everything sent to it.
        let listener = racks
            .within("b0", || TcpListener::bind((b0, 7100)))
            .unwrap()
            .unwrap();
        // Each connection's byte count, once all of it has arrived.
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut c, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                c.read_to_end(&mut buf).unwrap();
                tx.send(buf.len()).unwrap();
            }
        });
        let send = |from: &str| {
            racks
                .within(from, || {
                    let mut c = TcpStream::connect((b0, 7100)).unwrap();
                    c.write_all(&vec![7u8; 4 << 20]).unwrap();
                })
                .unwrap();
            assert_eq!(rx.recv().unwrap(), 4 << 20);
        };
        let before = racks.core_bytes().unwrap();
        send("b1");
        let local = racks.core_bytes().unwrap();
        assert!(
            local.0 - before.0 < 64 << 10,
            "inside a rack: {before:?} → {local:?}"
        );
        send("a0");
        let after = racks.core_bytes().unwrap();
        server.join().unwrap();
        let crossed = after.0 - local.0;
        assert!(
            (4 << 20..(4 << 20) * 11 / 10).contains(&crossed),
            "A → B: {crossed} bytes"
        );
        assert!(after.1 > local.1, "acknowledgements B → A");
    }
}
