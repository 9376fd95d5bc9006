//! CloudNet's WAN between two namespace hosts: both links shaped to 100 Mbit/s (tc tbf), and a
//! delay relay adding 10 ms each way (20 ms RTT) in front of a host's migration port.
#![allow(dead_code)]

use std::time::Duration;

use netlab::{DelayRelay, Host, NetLab};

/// The two hosts, `src` and `dst`.
pub struct Wan {
    _lab: NetLab,
    pub src: Host,
    pub dst: Host,
}

impl Wan {
    /// None only where the test may skip (never with CI=true: `netlab::can_run` fails it).
    pub fn new(tag: &str) -> Option<Wan> {
        if !netlab::can_run(tag, NetLab::available()) {
            return None;
        }
        let lab = NetLab::new(tag, &["src", "dst"]).expect("network namespaces");
        for h in ["src", "dst"] {
            lab.shape(h, 100_000_000).expect("tc tbf");
        }
        let (src, dst) = (lab.host("src").clone(), lab.host("dst").clone());
        Some(Wan {
            _lab: lab,
            src,
            dst,
        })
    }
}

/// A relay adding 10 ms each way in front of `to`'s port `port`.
pub fn relay(to: &Host, port: u16) -> DelayRelay {
    DelayRelay::start(
        std::net::SocketAddr::new(to.gateway.into(), 0),
        std::net::SocketAddr::new(to.ip.into(), port),
        Duration::from_millis(10),
        4 << 20,
    )
    .expect("start the relay")
}
