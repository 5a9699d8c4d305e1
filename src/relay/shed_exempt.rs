//! A held client's established light flows keep flowing.
//!
//! The shedder holds a client in the kernel by its source address (an IPv4
//! address, an IPv6 /64). A LAN device that forges source addresses can
//! flood in an innocent client's name and keep that client held, sending
//! on above 320 datagrams a second in its name: the
//! innocent's own flows (a game, a call) were then dropped in the kernel
//! for as long as the holds lasted, up to 6.4 s at a time.
//!
//! So when a client is held, a few of its flows that were opened well
//! before its first hold ([`ESTABLISHED`]) and carried a datagram lately
//! ([`ACTIVE`]) are let through the filter: datagrams from the client's
//! port of such a flow to its exact destination (address and port), at
//! most [`EXEMPT`] flows a client, each source address's longest-lived
//! first (an IPv6 client is a /64 of many devices: see
//! `SessionTable::established`). A forger that
//! floods in the client's name does not hit them unless it knows a flow's
//! destination and the client's port, which a device on a switched LAN
//! does not see. What passes is not shed by hand either, but each such
//! flow is counted by the listener that reads it (a flow's datagrams all
//! queue in one member socket): past `shed::STILL_FLOODING` datagrams in a
//! `shed::LOOK`, a flood's rate as the hold judges one, or past
//! `shed_filter::LIGHT_BYTES` (a flood of big datagrams below that rate),
//! the rest of that look's datagrams are shed and the flow loses its place for the rest of
//! the hold (see [`super::shed::SharedShedder::withdraw`]). That is the
//! treatment of a forger who guesses a flow exactly, and of a heavy flow
//! of the client's own that was chosen.
//!
//! Only symmetric flows are let through: a full-cone flow's key has no
//! destination to match.

use std::net::SocketAddr;
use std::time::Duration;

use super::key::{FlowKey, Target};

/// Flows of one held client the filter lets through at most: each is six
/// (IPv4) or twelve (IPv6) instructions of the filter, run only for the
/// held client's datagrams, and the filter's longest program (every
/// client an IPv6 /64 with all its flows) stays far below the kernel's
/// 4,096 instructions and every jump within reach.
pub const EXEMPT: usize = 8;

/// How long before its client's first hold (of a run of growing holds) a
/// flow must have been opened to be let through: the flood's own flows
/// are opened as it starts, and the relay falls behind and sheds a run of
/// it within a fraction of this before the first hold.
pub const ESTABLISHED: Duration = Duration::from_secs(2);

/// How lately a flow must have carried a datagram (either way) to be let
/// through: a game or a call sends many times a second.
pub const ACTIVE: Duration = Duration::from_secs(1);

/// One flow of a held client the filter lets through: the client's port
/// and the flow's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExemptFlow {
    pub port: u16,
    pub dst: SocketAddr,
}

impl ExemptFlow {
    /// The flow `key`, if it has one destination.
    pub fn of(key: &FlowKey) -> Option<ExemptFlow> {
        match key.target {
            Target::Destination(dst) => Some(ExemptFlow {
                port: key.client.port(),
                dst: SocketAddr::new(dst.ip().to_canonical(), dst.port()),
            }),
            Target::Cone(_) => None,
        }
    }

    /// Whether a datagram from port `port` to `dst` is this flow's.
    fn matches(&self, port: u16, dst: SocketAddr) -> bool {
        self.port == port && self.dst.port() == dst.port() && self.dst.ip() == dst.ip().to_canonical()
    }
}

/// The flows of one held client the filter lets through, at most
/// [`EXEMPT`], in a fixed array: a hold is copied to every listener task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exempt {
    flows: [Option<ExemptFlow>; EXEMPT],
}

impl Exempt {
    /// The first [`EXEMPT`] different ones of `flows`. A flow is its
    /// port and destination: in an IPv6 /64 two devices' flows from the
    /// same port to the same destination are one to the filter, and
    /// took two places (a tester saw 8 places hold 3 flows).
    pub fn new(flows: impl IntoIterator<Item = ExemptFlow>) -> Exempt {
        let mut e = Exempt::default();
        let mut n = 0;
        for flow in flows {
            if n == EXEMPT {
                break;
            }
            if !e.flows().any(|f| *f == flow) {
                e.flows[n] = Some(flow);
                n += 1;
            }
        }
        e
    }

    /// The flows, in their order.
    pub fn flows(&self) -> impl Iterator<Item = &ExemptFlow> {
        self.flows.iter().flatten()
    }

    /// Where a datagram from `port` to `dst` is among the flows.
    pub fn position(&self, port: u16, dst: SocketAddr) -> Option<usize> {
        self.flows.iter().position(|f| f.is_some_and(|f| f.matches(port, dst)))
    }

    /// The flow in slot `slot` (see [`position`](Self::position)).
    pub fn flows_at(&self, slot: usize) -> Option<ExemptFlow> {
        self.flows.get(slot).copied().flatten()
    }

    /// Takes `flow` out; true when it was in.
    pub fn remove(&mut self, flow: &ExemptFlow) -> bool {
        match self.flows.iter_mut().find(|f| f.as_ref() == Some(flow)) {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::key::ClientId;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flow_is_its_clients_port_and_its_exact_destination() {
        let key = FlowKey {
            client: sa("192.0.2.11:40000"),
            target: Target::Destination(sa("198.51.100.7:6000")),
        };
        let flow = ExemptFlow::of(&key).unwrap();
        let set = Exempt::new([flow]);
        assert_eq!(set.position(40000, sa("198.51.100.7:6000")), Some(0));
        assert_eq!(set.position(40000, sa("[::ffff:198.51.100.7]:6000")), Some(0));
        assert_eq!(set.position(40001, sa("198.51.100.7:6000")), None);
        assert_eq!(set.position(40000, sa("198.51.100.7:6001")), None);
        assert_eq!(set.position(40000, sa("198.51.100.8:6000")), None);
        let cone = FlowKey {
            client: sa("192.0.2.11:40000"),
            target: Target::Cone(1),
        };
        assert_eq!(ExemptFlow::of(&cone), None);
        assert_eq!(key.owner(), ClientId::of(sa("192.0.2.11:1").ip()));
    }

    #[test]
    fn at_most_exempt_flows_are_kept_and_one_can_be_taken_out() {
        let flows: Vec<ExemptFlow> = (0..EXEMPT as u16 + 3)
            .map(|p| ExemptFlow {
                port: 40000 + p,
                dst: sa("198.51.100.7:6000"),
            })
            .collect();
        let mut set = Exempt::new(flows.iter().copied());
        assert_eq!(set.flows().count(), EXEMPT);
        assert!(set.remove(&flows[1]));
        assert!(!set.remove(&flows[1]));
        assert!(!set.remove(&flows[EXEMPT]));
        assert_eq!(set.position(40001, sa("198.51.100.7:6000")), None);
        assert_eq!(set.position(40002, sa("198.51.100.7:6000")), Some(2));
    }

    #[test]
    fn a_flow_takes_one_place_however_often_it_is_offered() {
        let flow = |port| ExemptFlow {
            port,
            dst: sa("[2001:db8:2::7]:6000"),
        };
        let offered = [flow(1), flow(1), flow(2), flow(1)]
            .into_iter()
            .chain((3..20).map(flow));
        let set = Exempt::new(offered);
        let ports: Vec<u16> = set.flows().map(|f| f.port).collect();
        assert_eq!(ports, (1..=EXEMPT as u16).collect::<Vec<_>>());
    }
}
