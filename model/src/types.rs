//! Small owned types the model works on. Kubernetes objects are converted into these at the
//! edge (see `convert`), so everything downstream is cheap to clone, compare and hash.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

/// Namespace and name of a Service (or any namespaced object). Every index of every layer
/// (engine, desired state, DNS, dataplane writers) keys on a clone of it, so the strings are
/// shared: a clone costs two reference counts, not two allocations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self {
            namespace: Arc::from(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// IANA protocol number, as the kernel uses it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TrafficDistribution {
    /// `PreferClose` (the original name) and `PreferSameZone` mean the same thing.
    PreferSameZone,
    PreferSameNode,
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePort {
    /// Empty for the single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Only kept for display: resolution happens through EndpointSlice ports by name.
    pub target_port: Option<String>,
}

/// The parts of a core/v1 Service the proxy and DNS need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ServiceKey,
    pub labels: BTreeMap<String, String>,
    /// Only the `switchyard.io/` ones (`convert::ANNOTATION_PREFIX`).
    pub annotations: BTreeMap<String, String>,
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (falling back to `spec.clusterIP`); empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub external_name: Option<String>,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds, `None` when affinity is off.
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    pub health_check_node_port: Option<u16>,
    pub publish_not_ready_addresses: bool,
    pub traffic_distribution: Option<TrafficDistribution>,
}

impl Service {
    /// Whether an endpoint counts as ready for this service: `publishNotReadyAddresses`
    /// makes every listed endpoint ready (for the proxy and for DNS alike).
    pub fn counts_as_ready(&self, ep: &Endpoint) -> bool {
        ep.ready || self.publish_not_ready_addresses
    }

    /// Same for `serving`.
    pub fn counts_as_serving(&self, ep: &Endpoint) -> bool {
        ep.serving || self.publish_not_ready_addresses
    }
}

/// One endpoint of an EndpointSlice (only `addresses[0]` is used, as kube-proxy does). A
/// million of these are held at 100k services, so the common fields are inline (node name and
/// zone shared, see `intern`) and the rare ones (hostname, hints) boxed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    #[serde(flatten)]
    pub extra: Option<Box<EndpointExtra>>,
}

/// The fields few endpoints carry: a hostname (StatefulSet pods behind a headless service)
/// and topology hints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointExtra {
    pub hostname: Option<String>,
    /// `hints.forZones`; `None` when the endpoint carries no zone hints.
    pub zone_hints: Option<Vec<String>>,
    /// `hints.forNodes`; `None` when the endpoint carries no node hints.
    pub node_hints: Option<Vec<String>>,
}

impl Endpoint {
    /// A ready, serving endpoint at `address` with nothing else set.
    #[must_use]
    pub fn ready_at(address: IpAddr) -> Endpoint {
        Endpoint {
            address,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            extra: None,
        }
    }

    pub fn hostname(&self) -> Option<&str> {
        self.extra.as_ref()?.hostname.as_deref()
    }

    pub fn zone_hints(&self) -> Option<&[String]> {
        self.extra.as_ref()?.zone_hints.as_deref()
    }

    pub fn node_hints(&self) -> Option<&[String]> {
        self.extra.as_ref()?.node_hints.as_deref()
    }

    /// Keep `extra` only when it holds something.
    #[must_use]
    pub fn with_extra(mut self, extra: EndpointExtra) -> Endpoint {
        self.extra = (extra != EndpointExtra::default()).then(|| Box::new(extra));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointPort {
    /// Empty for the unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// The parts of a discovery.k8s.io/v1 EndpointSlice the proxy and DNS need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// Value of the `kubernetes.io/service-name` label.
    pub service: String,
    pub family: IpFamily,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.service)
    }
}

/// The node this proxy runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `status.addresses` of type InternalIP and ExternalIP, in the node's order.
    pub addresses: Vec<IpAddr>,
    /// Why the node is on its way out (KEP-3836): `metadata.deletionTimestamp` is set, or
    /// the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint. `None`: it is not.
    pub leaving: Option<String>,
}

/// A pod on this node, as DNS needs it: which namespace a client address belongs to
/// (server-side search paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node_name: Option<String>,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: its address is the node's, shared by every host-network pod.
    pub host_network: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

impl Node {
    /// Whether load balancers should keep sending new traffic here (kube-proxy's
    /// `nodeEligible` in `/healthz`).
    pub fn eligible(&self) -> bool {
        self.leaving.is_none()
    }

    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str)
    }
}
