//! Desired state per service port, computed with kube-proxy's semantics (pkg/proxy:
//! serviceport, endpointslicecache, topology).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::convert::LABEL_SERVICE_PROXY_NAME;
use crate::types::{
    EndpointSlice, IpFamily, Node, Protocol, Service, ServiceKey, ServiceType, TrafficDistribution,
};

/// Which `nodePortAddresses` a NodePort listens on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NodePortAddresses {
    /// CIDRs; a node address inside any of them is a NodePort frontend.
    pub cidrs: Vec<IpNet>,
    /// The special value `primary`: the node's first address of each family.
    pub primary: bool,
}

impl NodePortAddresses {
    /// Empty means every node address (kube-proxy's default).
    pub fn is_all(&self) -> bool {
        self.cidrs.is_empty() && !self.primary
    }

    /// Parse kube-proxy's `nodePortAddresses` list (CIDRs and `primary`).
    pub fn parse(values: &[String]) -> Result<Self, crate::ModelError> {
        let mut out = NodePortAddresses::default();
        for v in values {
            let t = v.trim();
            if t == "primary" {
                out.primary = true;
            } else {
                out.cidrs.push(
                    t.parse::<IpNet>()
                        .map_err(|source| crate::ModelError::NodePortAddress {
                            value: v.clone(),
                            source,
                        })?
                        .trunc(),
                );
            }
        }
        Ok(out)
    }
}

/// The settings of this proxy that change what is computed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ProxyConfig {
    pub node_name: String,
    pub node_port_addresses: NodePortAddresses,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortKey {
    pub service: ServiceKey,
    /// The service port's name; empty for the single unnamed port.
    pub port_name: Arc<str>,
    pub protocol: Protocol,
    pub family: IpFamily,
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{} {}", self.protocol, self.family)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    /// Traffic to this frontend is "external" in kube-proxy's sense (eTP applies).
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIP)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node.
    pub local: bool,
    /// Chosen through the serving-and-terminating fallback (no ready endpoint was left).
    pub terminating: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// Where traffic of one class (internal or external) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Route<'a> {
    Backends(&'a [Backend]),
    /// No endpoint anywhere: refuse (TCP RST / ICMP unreachable).
    Reject,
    /// Endpoints exist but none is usable under a Local policy: drop.
    Drop,
}

/// Everything a dataplane needs to program one service port of one IP family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortState {
    pub key: ServicePortKey,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Sorted.
    pub frontends: Vec<Frontend>,
    /// Endpoints for cluster-policy traffic (sorted); empty when no policy uses them.
    pub cluster_backends: Vec<Backend>,
    /// Endpoints on this node for Local-policy traffic (sorted); empty when unused.
    pub local_backends: Vec<Backend>,
    pub internal_traffic_local: bool,
    /// eTP=Local, effective only when the service is reachable from outside.
    pub external_traffic_local: bool,
    /// Some usable endpoint exists somewhere in the cluster.
    pub has_any_endpoints: bool,
    /// Every endpoint the slices list for this port, whatever its conditions (sorted):
    /// established connections to one that is no longer balanced to (terminating, not
    /// ready) keep draining; a flow to an endpoint not listed here is gone for good.
    pub listed_endpoints: Vec<(IpAddr, u16)>,
    pub affinity_timeout_seconds: Option<u32>,
    pub source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
    /// The service's annotations that select a dataplane option (e.g. the LB algorithm).
    pub annotations: BTreeMap<String, String>,
}

impl ServicePortState {
    /// Traffic to ClusterIPs, and traffic from this node's pods to any frontend.
    pub fn internal_route(&self) -> Route<'_> {
        self.route(self.internal_traffic_local)
    }

    /// Traffic from outside the node to NodePorts, externalIPs and LB IPs.
    pub fn external_route(&self) -> Route<'_> {
        self.route(self.external_traffic_local)
    }

    /// Every cluster endpoint regardless of policy: what this node's pods reach through an
    /// external frontend (kube-proxy short-circuits them to the cluster chain).
    pub fn cluster_route(&self) -> Route<'_> {
        self.route(false)
    }

    fn route(&self, local: bool) -> Route<'_> {
        let set = if local {
            &self.local_backends
        } else {
            &self.cluster_backends
        };
        if !set.is_empty() {
            Route::Backends(set)
        } else if self.has_any_endpoints {
            Route::Drop
        } else {
            Route::Reject
        }
    }

    /// Every distinct backend either route can reach (sorted).
    pub fn all_backends(&self) -> Vec<Backend> {
        let mut all: Vec<Backend> = self
            .cluster_backends
            .iter()
            .chain(self.local_backends.iter())
            .cloned()
            .collect();
        all.sort();
        all.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
        all
    }
}

/// Why a Service yields no service ports for the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Skipped {
    Headless,
    ExternalName,
    ServiceProxyName,
}

pub fn skip_reason(svc: &Service) -> Option<Skipped> {
    if svc.labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
        Some(Skipped::ServiceProxyName)
    } else if svc.service_type == ServiceType::ExternalName {
        Some(Skipped::ExternalName)
    } else if svc.headless {
        Some(Skipped::Headless)
    } else {
        None
    }
}

/// One candidate endpoint for one service port, after targetPort resolution.
#[derive(Debug, Clone)]
struct Candidate<'a> {
    addr: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    zone_hints: Option<&'a [String]>,
    node_hints: Option<&'a [String]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    Zone,
    Node,
}

/// kube-proxy's choice of topology mode: hints are used only when every ready endpoint has
/// zone hints and one of them is for this zone (node hints: for this node). When the
/// EndpointSlices carry no hints at all, `trafficDistribution` is applied from the
/// endpoints' own `nodeName`/`zone`, as the EndpointSlice controller would have hinted.
fn topology_mode(
    cands: &[Candidate<'_>],
    svc: &Service,
    node: Option<&Node>,
    node_name: &str,
) -> Topology {
    let zone = node.and_then(Node::zone);
    let ready = || cands.iter().filter(|c| c.ready);
    if ready().next().is_none() {
        return Topology::None;
    }
    let any_hints = ready().any(|c| c.zone_hints.is_some() || c.node_hints.is_some());
    if any_hints {
        if ready().any(|c| c.zone_hints.is_none_or(<[String]>::is_empty)) {
            return Topology::None;
        }
        let all_node_hints = ready().all(|c| c.node_hints.is_some_and(|n| !n.is_empty()));
        if all_node_hints
            && ready().any(|c| {
                c.node_hints
                    .is_some_and(|n| n.iter().any(|h| h == node_name))
            })
        {
            return Topology::Node;
        }
        if let Some(z) = zone
            && ready().any(|c| c.zone_hints.is_some_and(|h| h.iter().any(|h| h == z)))
        {
            return Topology::Zone;
        }
        return Topology::None;
    }
    Topology::None.max_by_distribution(svc.traffic_distribution, ready().any(|c| c.local))
}

impl Topology {
    fn max_by_distribution(self, td: Option<TrafficDistribution>, local_ready: bool) -> Topology {
        match td {
            Some(TrafficDistribution::PreferSameNode) if local_ready => Topology::Node,
            Some(TrafficDistribution::PreferSameNode | TrafficDistribution::PreferSameZone) => {
                Topology::Zone
            }
            None => self,
        }
    }
}

fn available_for_topology(
    c: &Candidate<'_>,
    mode: Topology,
    node_name: &str,
    zone: Option<&str>,
    endpoint_zone: Option<&str>,
) -> bool {
    match mode {
        Topology::None => true,
        Topology::Node => match c.node_hints {
            Some(h) => h.iter().any(|h| h == node_name),
            None => c.local,
        },
        Topology::Zone => match c.zone_hints {
            Some(h) => zone.is_some_and(|z| h.iter().any(|h| h == z)),
            None => zone.is_some() && endpoint_zone == zone,
        },
    }
}

/// Compute the state of every service port of `svc` (one per port and IP family).
pub fn compute_service(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    node: Option<&Node>,
    host_addresses: &[IpAddr],
    cfg: &ProxyConfig,
) -> Vec<ServicePortState> {
    if skip_reason(svc).is_some() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut families: Vec<IpFamily> = svc
        .cluster_ips
        .iter()
        .chain(&svc.external_ips)
        .chain(&svc.load_balancer_ips)
        .map(IpFamily::of)
        .collect();
    families.sort();
    families.dedup();
    let node_addrs = node_port_addresses(node, host_addresses, &cfg.node_port_addresses);
    let externally_accessible = svc.ports.iter().any(|p| p.node_port.is_some())
        || !svc.external_ips.is_empty()
        || !svc.load_balancer_ips.is_empty();
    let etp_local = svc.external_traffic_local && externally_accessible;
    let itp_local = svc.internal_traffic_local;

    for family in families {
        for sp in &svc.ports {
            let key = ServicePortKey {
                service: svc.key.clone(),
                port_name: Arc::from(sp.name.as_str()),
                protocol: sp.protocol,
                family,
            };
            let mut frontends: Vec<Frontend> = Vec::new();
            let fam = |a: &&IpAddr| IpFamily::of(a) == family;
            for ip in svc.cluster_ips.iter().filter(fam) {
                frontends.push(Frontend {
                    kind: FrontendKind::ClusterIP,
                    addr: *ip,
                    port: sp.port,
                });
            }
            if let Some(np) = sp.node_port
                && svc.service_type != ServiceType::ClusterIP
            {
                for ip in node_addrs.iter().filter(fam) {
                    frontends.push(Frontend {
                        kind: FrontendKind::NodePort,
                        addr: *ip,
                        port: np,
                    });
                }
            }
            for ip in svc.external_ips.iter().filter(fam) {
                frontends.push(Frontend {
                    kind: FrontendKind::ExternalIP,
                    addr: *ip,
                    port: sp.port,
                });
            }
            for ip in svc.load_balancer_ips.iter().filter(fam) {
                frontends.push(Frontend {
                    kind: FrontendKind::LoadBalancer,
                    addr: *ip,
                    port: sp.port,
                });
            }
            frontends.sort();
            frontends.dedup();

            // targetPort resolution: each slice says which port number the endpoint port of
            // this name has on its endpoints.
            let mut cands: Vec<Candidate<'_>> = Vec::new();
            let mut zones: Vec<Option<&str>> = Vec::new();
            for slice in slices.iter().filter(|s| s.family == family) {
                let Some(ep_port) = slice
                    .ports
                    .iter()
                    .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let ready = svc.counts_as_ready(ep);
                    let cand = Candidate {
                        addr: ep.address,
                        port: ep_port.port,
                        ready,
                        serving: svc.counts_as_serving(ep),
                        terminating: ep.terminating,
                        local: ep.node_name.as_deref() == Some(cfg.node_name.as_str()),
                        zone_hints: ep.zone_hints(),
                        node_hints: ep.node_hints(),
                    };
                    // An endpoint listed in two slices (during controller handover) counts
                    // once; the ready copy wins.
                    if let Some(i) = cands
                        .iter()
                        .position(|c| c.addr == cand.addr && c.port == cand.port)
                    {
                        if !cands[i].ready && cand.ready {
                            cands[i] = cand;
                            zones[i] = ep.zone.as_deref();
                        }
                    } else {
                        cands.push(cand);
                        zones.push(ep.zone.as_deref());
                    }
                }
            }

            let node_name = cfg.node_name.as_str();
            let zone = node.and_then(Node::zone);
            let uses_cluster = !itp_local || (externally_accessible && !etp_local);
            let uses_local = itp_local || etp_local;
            let mut has_any_endpoints = false;
            let mut cluster_backends = Vec::new();
            let mut local_backends = Vec::new();
            let to_backend = |c: &Candidate<'_>, terminating: bool| Backend {
                addr: c.addr,
                port: c.port,
                local: c.local,
                terminating,
            };

            if uses_cluster {
                let mode = topology_mode(&cands, svc, node, node_name);
                let pick = |mode: Topology| -> Vec<Backend> {
                    cands
                        .iter()
                        .zip(&zones)
                        .filter(|(c, z)| {
                            c.ready && available_for_topology(c, mode, node_name, zone, **z)
                        })
                        .map(|(c, _)| to_backend(c, false))
                        .collect()
                };
                cluster_backends = pick(mode);
                // A topology preference that leaves nothing falls back to the whole cluster.
                if cluster_backends.is_empty() && mode != Topology::None {
                    cluster_backends = pick(Topology::None);
                }
                if cluster_backends.is_empty() {
                    cluster_backends = cands
                        .iter()
                        .filter(|c| c.serving && c.terminating)
                        .map(|c| to_backend(c, true))
                        .collect();
                }
                has_any_endpoints = !cluster_backends.is_empty();
            }
            if uses_local {
                has_any_endpoints |= cands
                    .iter()
                    .any(|c| c.ready || (c.serving && c.terminating));
                local_backends = cands
                    .iter()
                    .filter(|c| c.local && c.ready)
                    .map(|c| to_backend(c, false))
                    .collect();
                if local_backends.is_empty() {
                    local_backends = cands
                        .iter()
                        .filter(|c| c.local && c.serving && c.terminating)
                        .map(|c| to_backend(c, true))
                        .collect();
                }
            }
            cluster_backends.sort();
            local_backends.sort();
            // Held until the next change of the service: no spare capacity from collecting
            // through a filter (at 100k services that was a tenth of the daemon's heap).
            cluster_backends.shrink_to_fit();
            local_backends.shrink_to_fit();
            frontends.shrink_to_fit();
            let mut listed_endpoints: Vec<(IpAddr, u16)> =
                cands.iter().map(|c| (c.addr, c.port)).collect();
            listed_endpoints.sort_unstable();

            out.push(ServicePortState {
                key,
                port: sp.port,
                node_port: sp
                    .node_port
                    .filter(|_| svc.service_type != ServiceType::ClusterIP),
                frontends,
                cluster_backends,
                local_backends,
                internal_traffic_local: itp_local,
                external_traffic_local: etp_local,
                has_any_endpoints,
                listed_endpoints,
                affinity_timeout_seconds: svc.session_affinity_timeout,
                source_ranges: if svc.load_balancer_ips.is_empty() {
                    Vec::new()
                } else {
                    svc.load_balancer_source_ranges.clone()
                },
                health_check_node_port: svc.health_check_node_port.filter(|_| etp_local),
                // Only `switchyard.io/` ones: conversion keeps no others.
                annotations: svc.annotations.clone(),
            });
        }
    }
    out
}

/// The node addresses NodePorts listen on: the Node's addresses plus the host's own, filtered
/// by `nodePortAddresses`.
pub fn node_port_addresses(
    node: Option<&Node>,
    host_addresses: &[IpAddr],
    filter: &NodePortAddresses,
) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = Vec::new();
    for a in node
        .map(|n| n.addresses.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(host_addresses)
    {
        if !all.contains(a) && !a.is_loopback() && !is_link_local(a) {
            all.push(*a);
        }
    }
    if filter.is_all() {
        all.sort();
        return all;
    }
    let mut out: Vec<IpAddr> = all
        .iter()
        .filter(|a| filter.cidrs.iter().any(|c| c.contains(*a)))
        .copied()
        .collect();
    if filter.primary {
        // The node's primary address of each family is the first Node address of that family.
        for fam in [IpFamily::IPv4, IpFamily::IPv6] {
            if let Some(a) = node
                .map(|n| n.addresses.as_slice())
                .unwrap_or_default()
                .iter()
                .find(|a| IpFamily::of(a) == fam)
                && !out.contains(a)
            {
                out.push(*a);
            }
        }
    }
    out.sort();
    out
}

pub(crate) fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}
