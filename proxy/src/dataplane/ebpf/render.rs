//! The pure half of the eBPF backend: one service port of the desired state -> the map entries
//! that program it. Ids (backend sets, services for counters, backends) are allocated here and
//! stay stable while the thing they name exists.

use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt, HashSet};

use switchyard_ebpf_common::{
    BE_LOCAL, BackendValue, FE_NODEPORT, FE_SNAT, FE_SOURCE_RANGES, Frontend4Key, Frontend6Key,
    FrontendValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SET_AFFINITY, SET_DNS_LOCAL, SET_DROP,
    SET_MAGLEV, SET_REJECT,
};
use switchyard_model::{Backend, FrontendKind, Protocol, Route, ServicePortKey, ServicePortState};

use super::maglev;

/// Annotation selecting the backend choice for one service: `random` or `maglev`.
pub const ANNOTATION_LB_ALGORITHM: &str = "switchyard.io/lb-algorithm";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// Maglev for every service unless its annotation says `random`.
    pub maglev_default: bool,
    /// Prime.
    pub maglev_table_size: u32,
    /// The cluster DNS Service whose port 53 (IPv4) the socket LB sends to the node-local
    /// resolver while it is alive.
    pub dns_intercept: Option<switchyard_model::ServiceKey>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            maglev_default: false,
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
            dns_intercept: None,
        }
    }
}

/// Which traffic a backend set serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum View {
    /// ClusterIP traffic: internalTrafficPolicy applies.
    Internal,
    /// This node's pods and sockets reaching an external frontend: every cluster endpoint.
    Cluster,
    /// Traffic from outside to an external frontend: externalTrafficPolicy applies.
    External,
}

/// A backend set as the kernel must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub id: u32,
    pub view: View,
    pub flags: u32,
    pub affinity_timeout: u32,
    pub service_id: u32,
    /// Backend id and value, sorted by address.
    pub backends: Vec<(u32, BackendValue)>,
    /// Backend ids in slot order (the Maglev table for Maglev sets).
    pub slots: Vec<u32>,
}

/// Everything one service port puts into the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRender {
    pub service_id: u32,
    pub sets: Vec<SetSpec>,
    pub frontends4: Vec<(Frontend4Key, FrontendValue)>,
    pub frontends6: Vec<(Frontend6Key, FrontendValue)>,
    /// (set id, IPv4 network address, prefix length).
    pub ranges4: Vec<(u32, u32, u8)>,
    /// (set id, IPv6 network address, prefix length).
    pub ranges6: Vec<(u32, [u32; 4], u8)>,
}

impl PortRender {
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sets
            .iter()
            .flat_map(|s| s.backends.iter().map(|(id, _)| *id))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} capacity {limit} exhausted (raise {})", setting(what))]
pub struct Exhausted {
    pub what: &'static str,
    pub limit: u32,
}

/// The configuration setting that sizes the map behind `what`.
fn setting(what: &str) -> &'static str {
    match what {
        "backend" | "slot" => "maxBackends",
        _ => "maxServices",
    }
}

/// Ids `1..=limit`, reused after release. Which are in use is a bitmap: a million
/// backend ids take 128 KiB instead of a 10 MB hash set.
#[derive(Debug, Clone)]
pub struct Ids {
    what: &'static str,
    limit: u32,
    next: u32,
    free: Vec<u32>,
    used: Vec<u64>,
    in_use: usize,
}

impl Ids {
    pub fn new(what: &'static str, limit: u32) -> Ids {
        Ids {
            what,
            limit,
            next: 1,
            free: Vec::new(),
            used: Vec::new(),
            in_use: 0,
        }
    }

    /// The word of the bitmap that holds `id`, and its bit there.
    fn bit(id: u32) -> (usize, u64) {
        ((id / 64) as usize, 1 << (id % 64))
    }

    fn is_used(&self, id: u32) -> bool {
        let (word, bit) = Ids::bit(id);
        self.used.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Mark `id` used; false when it already was.
    fn mark(&mut self, id: u32) -> bool {
        let (word, bit) = Ids::bit(id);
        if self.used.len() <= word {
            self.used.resize(word + 1, 0);
        }
        if self.used[word] & bit != 0 {
            return false;
        }
        self.used[word] |= bit;
        self.in_use += 1;
        true
    }

    pub fn alloc(&mut self) -> Result<u32, Exhausted> {
        while let Some(id) = self.free.pop() {
            if self.mark(id) {
                return Ok(id);
            }
        }
        while self.next <= self.limit {
            let id = self.next;
            self.next += 1;
            if self.mark(id) {
                return Ok(id);
            }
        }
        Err(Exhausted {
            what: self.what,
            limit: self.limit,
        })
    }

    /// Claim a specific id (re-adopting what a previous run left in the kernel).
    pub fn reserve(&mut self, id: u32) -> bool {
        id != 0 && id <= self.limit && self.mark(id)
    }

    pub fn release(&mut self, id: u32) {
        if self.is_used(id) {
            let (word, bit) = Ids::bit(id);
            self.used[word] &= !bit;
            self.in_use -= 1;
            self.free.push(id);
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

/// Stable ids for sets, services and backends.
///
/// The maps are keyed so that a lookup borrows the port's key (a full sync looks up every
/// port's ids: cloning its three strings per lookup was a third of a 100k-service sync).
#[derive(Debug, Clone)]
pub struct Allocator {
    /// Per port, its set id for each view, then its service id (0: none); one map, not
    /// two: each entry holds a clone of the port's key.
    ports: HashMap<ServicePortKey, [u32; 4]>,
    set_ids: Ids,
    service_ids: Ids,
    backends: HashMap<(u32, IpAddr, u16), u32>,
    backend_ids: Ids,
}

fn view_index(view: View) -> usize {
    match view {
        View::Internal => 0,
        View::Cluster => 1,
        View::External => 2,
    }
}

const VIEWS: [View; 3] = [View::Internal, View::Cluster, View::External];

/// Where a port's service id sits among its ids (after the three views' sets).
const SERVICE: usize = 3;

impl Allocator {
    pub fn new(max_services: u32, max_backends: u32) -> Allocator {
        Allocator {
            ports: HashMap::new(),
            set_ids: Ids::new("backend set", max_services.saturating_mul(3)),
            // Service ids index the per-CPU counters array, sized by max_services.
            service_ids: Ids::new("service", max_services.saturating_sub(1)),
            backends: HashMap::new(),
            backend_ids: Ids::new("backend", max_backends),
        }
    }

    fn set_id(&self, key: &ServicePortKey, view: View) -> Option<u32> {
        self.ports
            .get(key)
            .map(|ids| ids[view_index(view)])
            .filter(|id| *id != 0)
    }

    fn set(&mut self, key: &ServicePortKey, view: View) -> Result<u32, Exhausted> {
        if let Some(id) = self.set_id(key, view) {
            return Ok(id);
        }
        let id = self.set_ids.alloc()?;
        self.ports.entry(key.clone()).or_default()[view_index(view)] = id;
        Ok(id)
    }

    fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.ports
            .get(key)
            .map(|ids| ids[SERVICE])
            .filter(|id| *id != 0)
    }

    fn service(&mut self, key: &ServicePortKey) -> Result<u32, Exhausted> {
        if let Some(id) = self.service_id(key) {
            return Ok(id);
        }
        let id = self.service_ids.alloc()?;
        self.ports.entry(key.clone()).or_default()[SERVICE] = id;
        Ok(id)
    }

    fn backend(&mut self, set: u32, b: &Backend) -> Result<u32, Exhausted> {
        if let Some(id) = self.backends.get(&(set, b.addr, b.port)) {
            return Ok(*id);
        }
        let id = self.backend_ids.alloc()?;
        self.backends.insert((set, b.addr, b.port), id);
        Ok(id)
    }

    /// Re-adopt ids found in the kernel for a set of this port and view.
    pub fn adopt_set(&mut self, key: &ServicePortKey, view: View, id: u32) -> bool {
        if self.set_id(key, view).is_some() || !self.set_ids.reserve(id) {
            return false;
        }
        self.ports.entry(key.clone()).or_default()[view_index(view)] = id;
        true
    }

    pub fn adopt_service(&mut self, key: &ServicePortKey, id: u32) -> bool {
        if self.service_id(key).is_some() || !self.service_ids.reserve(id) {
            return false;
        }
        self.ports.entry(key.clone()).or_default()[SERVICE] = id;
        true
    }

    pub fn adopt_backend(&mut self, set: u32, addr: IpAddr, port: u16, id: u32) -> bool {
        if self.backends.contains_key(&(set, addr, port)) || !self.backend_ids.reserve(id) {
            return false;
        }
        self.backends.insert((set, addr, port), id);
        true
    }

    /// Forget the ids `old` used that `new` does not (a port changed or went away).
    pub fn release_unused(
        &mut self,
        key: &ServicePortKey,
        old: &PortRender,
        new: Option<&PortRender>,
    ) {
        let new_sets: HashSet<u32> = new
            .map(|n| n.sets.iter().map(|s| s.id).collect())
            .unwrap_or_default();
        let new_backends: HashSet<u32> = new.map(|n| n.backend_ids().collect()).unwrap_or_default();
        // Each id is forgotten by its key, not by a scan of every id (at 100k services a
        // scan of the 1M backends was the bulk of an endpoint change).
        for s in &old.sets {
            if !new_sets.contains(&s.id) {
                let slot = self
                    .ports
                    .get_mut(key)
                    .map(|ids| &mut ids[view_index(s.view)])
                    .filter(|id| **id == s.id);
                match slot {
                    Some(id) => *id = 0,
                    None => {
                        for ids in self.ports.values_mut() {
                            for id in ids[..SERVICE].iter_mut().filter(|id| **id == s.id) {
                                *id = 0;
                            }
                        }
                    }
                }
                self.set_ids.release(s.id);
            }
            for (id, b) in &s.backends {
                if !new_backends.contains(id) {
                    let k = (s.id, backend_addr(b), u16::from_be(b.port));
                    if self.backends.get(&k) == Some(id) {
                        self.backends.remove(&k);
                    } else {
                        self.backends.retain(|_, v| v != id);
                    }
                    self.backend_ids.release(*id);
                }
            }
        }
        if new.is_none()
            && let Some(ids) = self.ports.get_mut(key)
            && ids[SERVICE] != 0
        {
            self.service_ids.release(ids[SERVICE]);
            ids[SERVICE] = 0;
        }
        if self.ports.get(key).is_some_and(|ids| ids == &[0; 4]) {
            self.ports.remove(key);
        }
    }

    /// The ids held for a port, as a render with no content (to release after a failure).
    pub fn port_ids(&self, key: &ServicePortKey) -> PortRender {
        let ids = self.ports.get(key).copied().unwrap_or_default();
        let sets = VIEWS
            .iter()
            .zip(ids)
            .filter(|(_, id)| *id != 0)
            .map(|(view, id)| SetSpec {
                id,
                view: *view,
                flags: 0,
                affinity_timeout: 0,
                service_id: 0,
                backends: self
                    .backends
                    .iter()
                    .filter(|((s, _, _), _)| *s == id)
                    .map(|(_, b)| (*b, BackendValue::default()))
                    .collect(),
                slots: Vec::new(),
            })
            .collect();
        PortRender {
            sets,
            ..PortRender::default()
        }
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.set_ids.in_use(),
            self.service_ids.in_use(),
            self.backend_ids.in_use(),
        )
    }
}

/// The address a backend value was made from (`addr4`/`addr6` undone).
pub fn backend_addr(b: &BackendValue) -> IpAddr {
    if b.family == 4 {
        IpAddr::V4(std::net::Ipv4Addr::from(b.addr[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in b.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

pub fn addr4(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

pub fn addr6(a: std::net::Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

pub fn backend_value(set_id: u32, proto: u8, b: &Backend) -> BackendValue {
    let (addr, family) = match b.addr {
        IpAddr::V4(a) => ([addr4(a), 0, 0, 0], 4),
        IpAddr::V6(a) => (addr6(a), 6),
    };
    BackendValue {
        addr,
        port: b.port.to_be(),
        proto,
        family,
        set_id,
        flags: if b.local { BE_LOCAL } else { 0 },
    }
}

fn uses_maglev(s: &ServicePortState, cfg: &RenderConfig) -> bool {
    match s
        .annotations
        .get(ANNOTATION_LB_ALGORITHM)
        .map(String::as_str)
    {
        Some("maglev") => true,
        Some("random") => false,
        _ => cfg.maglev_default,
    }
}

fn route_of(s: &ServicePortState, view: View) -> Route<'_> {
    match view {
        View::Internal => s.internal_route(),
        View::Cluster => s.cluster_route(),
        View::External => s.external_route(),
    }
}

/// Render one service port.
pub fn render_port(
    s: &ServicePortState,
    alloc: &mut Allocator,
    cfg: &RenderConfig,
) -> Result<PortRender, Exhausted> {
    let key = &s.key;
    let proto = s.key.protocol.number();
    let service_id = alloc.service(key)?;
    // Views that coincide share one set: with iTP=Cluster the internal view is the cluster
    // view, and with eTP=Cluster the external view is too.
    let canon = |v: View| match v {
        View::Cluster if !s.internal_traffic_local => View::Internal,
        View::External if !s.external_traffic_local => View::Cluster,
        other => other,
    };
    let canon = |v: View| canon(canon(v));
    let maglev = uses_maglev(s, cfg);

    let mut out = PortRender {
        service_id,
        ..PortRender::default()
    };
    let mut set_for = |view: View, out: &mut PortRender| -> Result<u32, Exhausted> {
        let view = canon(view);
        let id = alloc.set(key, view)?;
        if out.sets.iter().any(|x| x.id == id) {
            return Ok(id);
        }
        let mut flags = 0;
        let mut backends = Vec::new();
        match route_of(s, view) {
            Route::Reject => flags |= SET_REJECT,
            Route::Drop => flags |= SET_DROP,
            Route::Backends(bs) => {
                backends.reserve_exact(bs.len());
                for b in bs {
                    backends.push((alloc.backend(id, b)?, backend_value(id, proto, b)));
                }
            }
        }
        if s.affinity_timeout_seconds.is_some() {
            flags |= SET_AFFINITY;
        }
        if view == View::Internal
            && s.port == 53
            && s.key.family == switchyard_model::IpFamily::IPv4
            && matches!(s.key.protocol, Protocol::Udp | Protocol::Tcp)
            && cfg.dns_intercept.as_ref() == Some(&s.key.service)
        {
            flags |= SET_DNS_LOCAL;
        }
        let slots = if maglev && !backends.is_empty() {
            flags |= SET_MAGLEV;
            let names: Vec<Vec<u8>> = backends
                .iter()
                .map(|(_, v)| {
                    let mut n = Vec::with_capacity(24);
                    for w in v.addr {
                        n.extend_from_slice(&w.to_ne_bytes());
                    }
                    n.extend_from_slice(&v.port.to_ne_bytes());
                    n
                })
                .collect();
            maglev::table(&names, cfg.maglev_table_size)
                .into_iter()
                .map(|i| backends[i as usize].0)
                .collect()
        } else {
            backends.iter().map(|(id, _)| *id).collect()
        };
        out.sets.push(SetSpec {
            id,
            view,
            flags,
            affinity_timeout: s.affinity_timeout_seconds.unwrap_or(0),
            service_id,
            backends,
            slots,
        });
        Ok(id)
    };

    let mut loopback_done = false;
    for f in &s.frontends {
        let external = f.kind.is_external();
        let (int_view, ext_view) = if external {
            (View::Cluster, View::External)
        } else {
            (View::Internal, View::Internal)
        };
        let int_set = set_for(int_view, &mut out)?;
        let ext_set = set_for(ext_view, &mut out)?;
        let ranges = f.kind == FrontendKind::LoadBalancer && !s.source_ranges.is_empty();
        let range_flag = if ranges { FE_SOURCE_RANGES } else { 0 };
        let ext_snat = if external && s.external_traffic_local {
            0
        } else {
            FE_SNAT
        };
        let nodeport = if f.kind == FrontendKind::NodePort {
            FE_NODEPORT
        } else {
            0
        };
        let int_val = FrontendValue {
            set_id: int_set,
            flags: range_flag | nodeport,
        };
        let ext_val = FrontendValue {
            set_id: ext_set,
            flags: range_flag | ext_snat | nodeport,
        };
        let port = f.port.to_be();
        match f.addr {
            IpAddr::V4(a) => {
                let k = |scope| Frontend4Key {
                    addr: addr4(a),
                    port,
                    proto,
                    scope,
                };
                out.frontends4.push((k(SCOPE_INTERNAL), int_val));
                out.frontends4.push((k(SCOPE_EXTERNAL), ext_val));
                if ranges {
                    for r in &s.source_ranges {
                        if let ipnet::IpNet::V4(n) = r {
                            for set in [int_set, ext_set] {
                                let e = (set, addr4(n.network()), n.prefix_len());
                                if !out.ranges4.contains(&e) {
                                    out.ranges4.push(e);
                                }
                            }
                        }
                    }
                }
            }
            IpAddr::V6(a) => {
                let k = |scope| Frontend6Key {
                    addr: addr6(a),
                    port,
                    proto,
                    scope,
                };
                out.frontends6.push((k(SCOPE_INTERNAL), int_val));
                out.frontends6.push((k(SCOPE_EXTERNAL), ext_val));
                if ranges {
                    for r in &s.source_ranges {
                        if let ipnet::IpNet::V6(n) = r {
                            for set in [int_set, ext_set] {
                                let e = (set, addr6(n.network()), n.prefix_len());
                                if !out.ranges6.contains(&e) {
                                    out.ranges6.push(e);
                                }
                            }
                        }
                    }
                }
            }
        }
        // NodePorts answer on loopback too, for sockets on the node (socket LB only).
        if f.kind == FrontendKind::NodePort && !loopback_done {
            loopback_done = true;
            let v = FrontendValue {
                set_id: int_set,
                flags: 0,
            };
            match f.addr {
                IpAddr::V4(_) => out.frontends4.push((
                    Frontend4Key {
                        addr: addr4(std::net::Ipv4Addr::LOCALHOST),
                        port,
                        proto,
                        scope: SCOPE_INTERNAL,
                    },
                    v,
                )),
                IpAddr::V6(_) => out.frontends6.push((
                    Frontend6Key {
                        addr: addr6(std::net::Ipv6Addr::LOCALHOST),
                        port,
                        proto,
                        scope: SCOPE_INTERNAL,
                    },
                    v,
                )),
            }
        }
    }
    out.sets.sort_by_key(|s| s.id);
    out.frontends4.sort_by_key(|(k, _)| *k);
    out.frontends6.sort_by_key(|(k, _)| *k);
    // Held for as long as the port is programmed: no spare capacity from pushing.
    out.sets.shrink_to_fit();
    out.frontends4.shrink_to_fit();
    out.frontends6.shrink_to_fit();
    out.ranges4.sort_unstable();
    out.ranges6.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Ids;

    #[test]
    fn ids_run_to_the_limit_and_are_reused_after_release() {
        let mut ids = Ids::new("backend", 200);
        let got: Vec<u32> = (0..200).map(|_| ids.alloc().unwrap()).collect();
        assert_eq!(got, (1..=200).collect::<Vec<_>>());
        assert_eq!(ids.in_use(), 200);
        let e = ids.alloc().unwrap_err();
        assert_eq!(
            e.to_string(),
            "backend capacity 200 exhausted (raise maxBackends)"
        );
        // Released ids (across bitmap words) come back; a double release counts once.
        ids.release(64);
        ids.release(130);
        ids.release(130);
        assert_eq!(ids.in_use(), 198);
        let mut again = [ids.alloc().unwrap(), ids.alloc().unwrap()];
        again.sort_unstable();
        assert_eq!(again, [64, 130]);
        assert!(ids.alloc().is_err());
    }

    #[test]
    fn reserved_ids_are_skipped_by_alloc() {
        let mut ids = Ids::new("service", 1000);
        assert!(ids.reserve(1) && ids.reserve(2) && ids.reserve(700));
        assert!(!ids.reserve(2), "already held");
        assert!(!ids.reserve(0) && !ids.reserve(1001), "outside 1..=limit");
        assert_eq!(ids.alloc().unwrap(), 3);
        ids.release(700);
        assert_eq!(ids.alloc().unwrap(), 700);
        assert_eq!(ids.in_use(), 4);
    }
}
