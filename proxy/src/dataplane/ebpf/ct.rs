//! Stale UDP flows in the tc path's own conntrack map (`SY_CT4`), the eBPF twin of
//! `crate::conntrack`: a UDP client that keeps its source port would otherwise follow its
//! entry to a removed endpoint for as long as the LRU keeps it. After a sync that touches
//! a UDP service port, forward entries whose endpoint is no longer in their service port
//! (or whose service port is gone) are deleted together with their reverse entries, so the
//! next datagram is balanced again. TCP entries are left alone: established connections
//! drain on their endpoint, as with kube-proxy.

use std::collections::{HashMap, HashSet};

use switchyard_ebpf_common::{CT_REVERSE, Ct4Key, Ct4Value};
use switchyard_model::Protocol;

use super::render::PortRender;
use switchyard_model::ServicePortKey;

pub const IPPROTO_UDP: u8 = 17;

/// For each UDP service port's id, the IPv4 endpoints (address, port as stored in the maps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpEndpoints(pub HashMap<u32, HashSet<(u32, u16)>>);

pub fn udp_endpoints<'a>(
    ports: impl Iterator<Item = (&'a ServicePortKey, &'a PortRender)>,
) -> UdpEndpoints {
    let mut out: HashMap<u32, HashSet<(u32, u16)>> = HashMap::new();
    for (k, p) in ports {
        if k.protocol != Protocol::Udp {
            continue;
        }
        let eps = out.entry(p.service_id).or_default();
        for s in &p.sets {
            for (_, b) in &s.backends {
                if b.family == 4 {
                    eps.insert((b.addr[0], b.port));
                }
            }
        }
    }
    UdpEndpoints(out)
}

/// The reverse entry a forward entry was created with (see the tc program).
pub fn reverse_key(fwd: &Ct4Value, proto: u8) -> Ct4Key {
    Ct4Key {
        saddr: fwd.new_daddr,
        daddr: fwd.new_saddr,
        sport: fwd.new_dport,
        dport: fwd.new_sport,
        proto,
        pad: [0; 3],
    }
}

/// The flows to delete: (forward key, reverse key) of each stale UDP flow.
pub fn stale_udp(
    entries: impl IntoIterator<Item = (Ct4Key, Ct4Value)>,
    endpoints: &UdpEndpoints,
) -> Vec<(Ct4Key, Ct4Key)> {
    let mut out = Vec::new();
    for (k, v) in entries {
        if k.proto != IPPROTO_UDP || v.flags & CT_REVERSE != 0 {
            continue;
        }
        let alive = endpoints
            .0
            .get(&v.service_id)
            .is_some_and(|eps| eps.contains(&(v.new_daddr, v.new_dport)));
        if !alive {
            out.push((k, reverse_key(&v, k.proto)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(client: u32, sport: u16, be: u32, be_port: u16, service_id: u32) -> (Ct4Key, Ct4Value) {
        (
            Ct4Key {
                saddr: client,
                daddr: 0x0a60_000a,
                sport,
                dport: 53,
                proto: IPPROTO_UDP,
                pad: [0; 3],
            },
            Ct4Value {
                new_saddr: client,
                new_daddr: be,
                new_sport: sport,
                new_dport: be_port,
                flags: 0,
                service_id,
                pad: 0,
            },
        )
    }

    #[test]
    fn entries_to_removed_endpoints_or_services_go_with_their_reverse() {
        let eps = UdpEndpoints([(7, [(0x0af4_010b, 9125)].into_iter().collect())].into());
        let live = fwd(1, 1000, 0x0af4_010b, 9125, 7);
        let gone_backend = fwd(1, 1001, 0x0af4_010c, 9125, 7);
        let gone_service = fwd(1, 1002, 0x0af4_010b, 9125, 8);
        let mut tcp = fwd(1, 1003, 0x0af4_010c, 9125, 7);
        tcp.0.proto = 6;
        let mut rev = gone_backend;
        rev.1.flags = CT_REVERSE;
        let got = stale_udp([live, gone_backend, gone_service, tcp, rev], &eps);
        assert_eq!(
            got,
            vec![
                (gone_backend.0, reverse_key(&gone_backend.1, IPPROTO_UDP)),
                (gone_service.0, reverse_key(&gone_service.1, IPPROTO_UDP)),
            ]
        );
        assert_eq!(got[0].1.saddr, 0x0af4_010c);
        assert_eq!((got[0].1.sport, got[0].1.dport), (9125, 1001));
    }
}
