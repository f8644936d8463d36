//! Flows that outlive their endpoint in the tc path's own flow maps (`SY_CT4`, `SY_CT6`),
//! the eBPF twin of `crate::conntrack`. A UDP client that keeps its source port would
//! otherwise follow its entry to a removed endpoint for as long as the LRU keeps it, and a
//! TCP client whose endpoint vanished without a FIN would retransmit into the void until it
//! times out. After a sync that touches a UDP service port or drops an endpoint from a
//! service port's slices, forward entries are deleted together with their reverse entries
//! when their endpoint is gone: for UDP, no longer balanced to (kube-proxy's conntrack
//! cleanup); for TCP and SCTP, no longer listed in the slices at all, so connections to a
//! terminating or unready endpoint keep draining as with kube-proxy. The next packet of a
//! deleted flow is balanced again: a UDP client moves to a live endpoint, a TCP client
//! gets a reset from one at once.

use std::collections::HashMap;
use std::net::IpAddr;

use switchyard_ebpf_common::{CT_REVERSE, Ct4Key, Ct4Value, Ct6Key, Ct6Value};
use switchyard_model::engine::{ChangeSet, DesiredState};
use switchyard_model::{Protocol, ServicePortState};

use super::render::PortRender;
use switchyard_model::ServicePortKey;

pub const IPPROTO_UDP: u8 = 17;

/// An endpoint as the flow maps hold it: the address (IPv4 in the first word) and the port,
/// both in network order.
pub type Endpoint = ([u32; 4], u16);

fn endpoint(addr: IpAddr, port: u16) -> Endpoint {
    match addr {
        IpAddr::V4(a) => ([super::render::addr4(a), 0, 0, 0], port.to_be()),
        IpAddr::V6(a) => (super::render::addr6(a), port.to_be()),
    }
}

/// For each service port's id, the endpoints its flows may still use: for UDP the ones
/// balanced to, for other protocols every endpoint its slices list.
///
/// Each list is sorted (a million endpoints at 100k services: a sorted slice costs a third
/// of a hash set's memory, and a lookup is a handful of comparisons).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveEndpoints(pub HashMap<u32, Box<[Endpoint]>>);

impl LiveEndpoints {
    /// Set the endpoints of service port `id` (any order, duplicates allowed).
    pub fn set(&mut self, id: u32, mut eps: Vec<Endpoint>) {
        eps.sort_unstable();
        eps.dedup();
        self.0.insert(id, eps.into_boxed_slice());
    }

    pub fn contains(&self, id: u32, ep: &Endpoint) -> bool {
        self.0
            .get(&id)
            .is_some_and(|eps| eps.binary_search(ep).is_ok())
    }
}

pub fn live_endpoints<'a>(
    ports: impl Iterator<Item = (&'a ServicePortKey, &'a PortRender)>,
    state: &DesiredState,
) -> LiveEndpoints {
    let mut out = LiveEndpoints::default();
    for (k, p) in ports {
        out.set(p.service_id, port_live(k, p, state));
    }
    out
}

/// The endpoints one service port's flows may still use (see `LiveEndpoints`).
pub fn port_live(k: &ServicePortKey, p: &PortRender, state: &DesiredState) -> Vec<Endpoint> {
    if k.protocol == Protocol::Udp {
        p.sets
            .iter()
            .flat_map(|s| &s.backends)
            .map(|(_, b)| {
                let addr = if b.family == 4 {
                    [b.addr[0], 0, 0, 0]
                } else {
                    b.addr
                };
                (addr, b.port)
            })
            .collect()
    } else {
        state.ports.get(k).map_or_else(Vec::new, |sp| {
            sp.listed_endpoints
                .iter()
                .map(|&(a, p)| endpoint(a, p))
                .collect()
        })
    }
}

/// Whether a ChangeSet can leave flows without their endpoint: a UDP service port touched,
/// a service port removed, or an endpoint no longer listed.
pub fn may_strand_flows(changes: &ChangeSet) -> bool {
    let lost = |old: &ServicePortState, new: &ServicePortState| {
        old.listed_endpoints
            .iter()
            .any(|e| new.listed_endpoints.binary_search(e).is_err())
    };
    crate::conntrack::touches_udp(changes)
        || !changes.removed.is_empty()
        || changes.changed.iter().any(|c| lost(&c.old, &c.new))
}

/// A flow entry of either family's map.
pub trait Flow: Copy {
    type Key: Copy;
    fn proto(key: &Self::Key) -> u8;
    fn is_reverse(&self) -> bool;
    fn service_id(&self) -> u32;
    /// The endpoint a forward entry sends to.
    fn endpoint(&self) -> Endpoint;
    /// The reverse entry a forward entry was created with (see the tc program).
    fn reverse_key(&self, proto: u8) -> Self::Key;
}

impl Flow for Ct4Value {
    type Key = Ct4Key;
    fn proto(key: &Ct4Key) -> u8 {
        key.proto
    }
    fn is_reverse(&self) -> bool {
        self.flags & CT_REVERSE != 0
    }
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn endpoint(&self) -> Endpoint {
        ([self.new_daddr, 0, 0, 0], self.new_dport)
    }
    fn reverse_key(&self, proto: u8) -> Ct4Key {
        self.peer_key(proto)
    }
}

impl Flow for Ct6Value {
    type Key = Ct6Key;
    fn proto(key: &Ct6Key) -> u8 {
        key.proto
    }
    fn is_reverse(&self) -> bool {
        self.flags & CT_REVERSE != 0
    }
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn endpoint(&self) -> Endpoint {
        (self.new_daddr, self.new_dport)
    }
    fn reverse_key(&self, proto: u8) -> Ct6Key {
        self.peer_key(proto)
    }
}

/// The flows to delete: (forward key, reverse key) of each flow whose endpoint is gone.
pub fn stale<V: Flow>(
    entries: impl IntoIterator<Item = (V::Key, V)>,
    endpoints: &LiveEndpoints,
) -> Vec<(V::Key, V::Key)> {
    let mut out = Vec::new();
    for (k, v) in entries {
        let proto = V::proto(&k);
        if v.is_reverse() {
            continue;
        }
        let alive = endpoints.contains(v.service_id(), &v.endpoint());
        if !alive {
            out.push((k, v.reverse_key(proto)));
        }
    }
    out
}

/// A flow map as the sweep sees it: the real map (`AyaFlows`), `FakeFlows` and
/// `FaultyFlows` for tests.
pub trait FlowTable<V: Flow> {
    fn entries(&mut self) -> Result<Vec<(V::Key, V)>, FlowError>;
    /// Remove one entry; `false` when it was not there.
    fn remove(&mut self, key: &V::Key) -> Result<bool, FlowError>;
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("flow map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("flow map {map}: injected fault on remove {call}")]
    Injected { map: &'static str, call: usize },
}

/// A kernel flow map through aya.
#[derive(Debug)]
pub struct AyaFlows<'a, V: Flow + aya::Pod>
where
    V::Key: aya::Pod,
{
    pub name: &'static str,
    pub map: aya::maps::HashMap<&'a mut aya::maps::MapData, V::Key, V>,
}

impl<V: Flow + aya::Pod> FlowTable<V> for AyaFlows<'_, V>
where
    V::Key: aya::Pod,
{
    fn entries(&mut self) -> Result<Vec<(V::Key, V)>, FlowError> {
        // Entries may vanish (LRU, the kernel) while we walk: skip those, as a dump does.
        Ok(self.map.iter().filter_map(Result::ok).collect())
    }
    fn remove(&mut self, key: &V::Key) -> Result<bool, FlowError> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(FlowError::Map {
                map: self.name,
                source,
            }),
        }
    }
}

/// An in-memory flow map.
#[derive(Debug, Clone, Default)]
pub struct FakeFlows<V: Flow> {
    pub entries: Vec<(V::Key, V)>,
}

impl<V: Flow> FlowTable<V> for FakeFlows<V>
where
    V::Key: PartialEq,
{
    fn entries(&mut self) -> Result<Vec<(V::Key, V)>, FlowError> {
        Ok(self.entries.clone())
    }
    fn remove(&mut self, key: &V::Key) -> Result<bool, FlowError> {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| k != key);
        Ok(self.entries.len() < before)
    }
}

/// Fails the removes whose 1-based numbers are listed.
#[derive(Debug)]
pub struct FaultyFlows<T> {
    pub inner: T,
    pub fail_removes: Vec<usize>,
    removes: usize,
}

impl<T> FaultyFlows<T> {
    pub fn new(inner: T, fail_removes: Vec<usize>) -> Self {
        FaultyFlows {
            inner,
            fail_removes,
            removes: 0,
        }
    }
}

impl<V: Flow, T: FlowTable<V>> FlowTable<V> for FaultyFlows<T> {
    fn entries(&mut self) -> Result<Vec<(V::Key, V)>, FlowError> {
        self.inner.entries()
    }
    fn remove(&mut self, key: &V::Key) -> Result<bool, FlowError> {
        self.removes += 1;
        if self.fail_removes.contains(&self.removes) {
            return Err(FlowError::Injected {
                map: "faulty",
                call: self.removes,
            });
        }
        self.inner.remove(key)
    }
}

/// Delete one flow map's stale flows (each with its reverse entry); how many.
pub fn sweep<V: Flow>(
    table: &mut dyn FlowTable<V>,
    endpoints: &LiveEndpoints,
) -> Result<u64, FlowError> {
    let mut flows = 0;
    for (fwd, rev) in stale(table.entries()?, endpoints) {
        // The forward entry goes last: while it is there, a failed sweep is found again.
        table.remove(&rev)?;
        if table.remove(&fwd)? {
            flows += 1;
        }
    }
    Ok(flows)
}

/// Delete the stale flows of the kernel flow map `name`; how many.
pub fn sweep_map<V>(
    ebpf: &mut impl super::io::MapSource,
    name: &'static str,
    endpoints: &LiveEndpoints,
) -> Result<u64, FlowError>
where
    V: Flow + aya::Pod,
    V::Key: aya::Pod,
{
    let Some(map) = ebpf.map_mut(name) else {
        return Ok(0);
    };
    let map = aya::maps::HashMap::<_, V::Key, V>::try_from(map)
        .map_err(|source| FlowError::Map { map: name, source })?;
    sweep(&mut AyaFlows { name, map }, endpoints)
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
        let eps =
            LiveEndpoints([(7, [([0x0af4_010b, 0, 0, 0], 9125)].into_iter().collect())].into());
        let live = fwd(1, 1000, 0x0af4_010b, 9125, 7);
        let gone_backend = fwd(1, 1001, 0x0af4_010c, 9125, 7);
        let gone_service = fwd(1, 1002, 0x0af4_010b, 9125, 8);
        let mut tcp_gone = fwd(1, 1003, 0x0af4_010c, 9125, 7);
        tcp_gone.0.proto = 6;
        let mut tcp_live = fwd(1, 1004, 0x0af4_010b, 9125, 7);
        tcp_live.0.proto = 6;
        let mut rev = gone_backend;
        rev.1.flags = CT_REVERSE;
        let got = stale(
            [live, gone_backend, gone_service, tcp_gone, tcp_live, rev],
            &eps,
        );
        assert_eq!(
            got,
            vec![
                (gone_backend.0, gone_backend.1.reverse_key(IPPROTO_UDP)),
                (gone_service.0, gone_service.1.reverse_key(IPPROTO_UDP)),
                (tcp_gone.0, tcp_gone.1.reverse_key(6)),
            ]
        );
        assert_eq!(got[0].1.saddr, 0x0af4_010c);
        assert_eq!((got[0].1.sport, got[0].1.dport), (9125, 1001));
    }

    #[test]
    fn a_failed_remove_keeps_the_flow_for_the_next_sweep() {
        let eps =
            LiveEndpoints([(7, [([0x0af4_010b, 0, 0, 0], 9125)].into_iter().collect())].into());
        let live = fwd(1, 1000, 0x0af4_010b, 9125, 7);
        let stale = fwd(1, 1001, 0x0af4_010c, 9125, 7);
        let mut rev = stale;
        rev.0 = stale.1.reverse_key(IPPROTO_UDP);
        rev.1.flags = CT_REVERSE;
        let table = FakeFlows::<Ct4Value> {
            entries: vec![live, stale, rev],
        };
        // Remove 1 (the reverse entry) works, remove 2 (the forward entry) fails.
        let mut faulty = FaultyFlows::new(table, vec![2]);
        let err = sweep(&mut faulty, &eps).unwrap_err();
        assert!(matches!(err, FlowError::Injected { call: 2, .. }), "{err}");
        assert_eq!(faulty.inner.entries, vec![live, stale]);
        // The next sweep finds the forward entry again and finishes the job.
        assert_eq!(sweep(&mut faulty, &eps).unwrap(), 1);
        assert_eq!(faulty.inner.entries, vec![live]);
    }
}
