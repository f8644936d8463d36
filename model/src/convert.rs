//! Edge conversion: k8s-openapi objects -> the model's owned types, validating as we go.
//! Errors name the object (`namespace/name`) and the field path.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;

use crate::error::ModelError;
use crate::intern::intern;
use crate::types::{
    Endpoint, EndpointExtra, EndpointPort, EndpointSlice, IpFamily, Node, Protocol, Service,
    ServiceKey, ServicePort, ServiceType, TrafficDistribution,
};

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The API server's upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// The prefix of the annotations that select a dataplane option (`Service::annotations`).
pub const ANNOTATION_PREFIX: &str = "switchyard.io/";

pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn parse_ip(
    kind: &'static str,
    object: &str,
    field: String,
    value: &str,
) -> Result<IpAddr, ModelError> {
    value
        .trim()
        .parse::<IpAddr>()
        .map_err(|e| ModelError::invalid(kind, object, field, format!("{value:?}: {e}")))
}

fn parse_protocol(
    kind: &'static str,
    object: &str,
    field: String,
    value: Option<&str>,
) -> Result<Protocol, ModelError> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(ModelError::invalid(
            kind,
            object,
            field,
            format!("unsupported protocol {other:?} (want TCP, UDP or SCTP)"),
        )),
    }
}

fn parse_port(
    kind: &'static str,
    object: &str,
    field: String,
    value: i32,
) -> Result<u16, ModelError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ModelError::invalid(
            kind,
            object,
            field,
            format!("{value} is not a port number (1-65535)"),
        )),
    }
}

/// Parse one `loadBalancerSourceRanges` entry. Whitespace around it is tolerated, as
/// kube-proxy does; a bare address is taken as a host route.
pub fn parse_source_range(value: &str) -> Result<IpNet, ModelError> {
    let v = value.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    v.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ModelError::SourceRange {
            value: value.to_string(),
        })
}

/// Convert a core/v1 Service.
pub fn service(svc: &core::Service) -> Result<Service, ModelError> {
    const KIND: &str = "Service";
    let meta = &svc.metadata;
    let obj = object_name(meta);
    let name = meta.name.clone().ok_or_else(|| ModelError::MissingField {
        kind: KIND,
        object: obj.clone(),
        field: "metadata.name".into(),
    })?;
    let key = ServiceKey::new(meta.namespace.as_deref().unwrap_or("default"), name);
    let spec = svc.spec.clone().unwrap_or_default();

    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(ModelError::invalid(
                KIND,
                &obj,
                "spec.type",
                format!("unknown service type {other:?}"),
            ));
        }
    };

    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let (raw_ips, field): (Vec<String>, &str) = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => (ips.clone(), "spec.clusterIPs"),
        _ => (spec.cluster_ip.iter().cloned().collect(), "spec.clusterIP"),
    };
    for (i, ip) in raw_ips.iter().enumerate() {
        let ip = ip.trim();
        if ip.is_empty() {
            continue;
        }
        if ip == "None" {
            headless = true;
            continue;
        }
        let f = if field == "spec.clusterIPs" {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        let addr = parse_ip(KIND, &obj, f, ip)?;
        if !cluster_ips.contains(&addr) {
            cluster_ips.push(addr);
        }
    }
    if headless {
        cluster_ips.clear();
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = parse_protocol(
            KIND,
            &obj,
            format!("spec.ports[{i}].protocol"),
            p.protocol.as_deref(),
        )?;
        let port = parse_port(KIND, &obj, format!("spec.ports[{i}].port"), p.port)?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => Some(parse_port(
                KIND,
                &obj,
                format!("spec.ports[{i}].nodePort"),
                np,
            )?),
        };
        let target_port = p.target_port.as_ref().map(|tp| match tp {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        });
        let name = p.name.clone().unwrap_or_default();
        if ports
            .iter()
            .any(|q: &ServicePort| q.name == name && q.protocol == protocol)
        {
            return Err(ModelError::invalid(
                KIND,
                &obj,
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        ports.push(ServicePort {
            name,
            protocol,
            port,
            node_port,
            target_port,
        });
    }

    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let addr = parse_ip(KIND, &obj, format!("spec.externalIPs[{i}]"), ip)?;
        if !external_ips.contains(&addr) {
            external_ips.push(addr);
        }
    }

    let mut load_balancer_ips = Vec::new();
    if let Some(ingress) = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
    {
        for (i, ing) in ingress.iter().enumerate() {
            // `ipMode: Proxy` (KEP-1860): the load balancer proxies, so traffic to its IP must
            // go to it, not be short-circuited to the endpoints here. Only VIP mode (the
            // default) is programmed, as kube-proxy does.
            if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
                continue;
            }
            // Hostname-only ingress entries are for DNS-based load balancers; nothing to program.
            if let Some(ip) = &ing.ip {
                let addr = parse_ip(
                    KIND,
                    &obj,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    ip,
                )?;
                if !load_balancer_ips.contains(&addr) {
                    load_balancer_ips.push(addr);
                }
            }
        }
    }

    let no_annotations = BTreeMap::new();
    let all_annotations = meta.annotations.as_ref().unwrap_or(&no_annotations);
    // Only the annotations a dataplane reads are kept (the source ranges are read here):
    // `kubectl.kubernetes.io/last-applied-configuration` alone is the whole object again,
    // a kilobyte or more for every Service.
    let annotations: BTreeMap<String, String> = all_annotations
        .iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut load_balancer_source_ranges = Vec::new();
    match spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty())
    {
        Some(ranges) => {
            for (i, r) in ranges.iter().enumerate() {
                let net = parse_source_range(r).map_err(|reason| {
                    ModelError::invalid(
                        KIND,
                        &obj,
                        format!("spec.loadBalancerSourceRanges[{i}]"),
                        reason.to_string(),
                    )
                })?;
                load_balancer_source_ranges.push(net);
            }
        }
        None => {
            if let Some(v) = all_annotations.get(ANNOTATION_SOURCE_RANGES) {
                for r in v.split(',').filter(|r| !r.trim().is_empty()) {
                    let net = parse_source_range(r).map_err(|reason| {
                        ModelError::invalid(
                            KIND,
                            &obj,
                            format!("metadata.annotations[{ANNOTATION_SOURCE_RANGES}]"),
                            reason.to_string(),
                        )
                    })?;
                    load_balancer_source_ranges.push(net);
                }
            }
        }
    }
    load_balancer_source_ranges.sort();
    load_balancer_source_ranges.dedup();

    let session_affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None" | "") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t) => Some(t),
                    _ => {
                        return Err(ModelError::invalid(
                            KIND,
                            &obj,
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                        ));
                    }
                },
            }
        }
        Some(other) => {
            return Err(ModelError::invalid(
                KIND,
                &obj,
                "spec.sessionAffinity",
                format!("unknown value {other:?} (want None or ClientIP)"),
            ));
        }
    };

    let policy = |field: &str, v: Option<&str>| -> Result<bool, ModelError> {
        match v {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(ModelError::invalid(
                KIND,
                &obj,
                field,
                format!("unknown policy {other:?} (want Cluster or Local)"),
            )),
        }
    };
    let external_traffic_local = policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let internal_traffic_local = policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => Some(parse_port(
            KIND,
            &obj,
            "spec.healthCheckNodePort".into(),
            p,
        )?),
    };

    let traffic_distribution = match spec.traffic_distribution.as_deref() {
        None | Some("") => None,
        Some("PreferClose" | "PreferSameZone") => Some(TrafficDistribution::PreferSameZone),
        Some("PreferSameNode") => Some(TrafficDistribution::PreferSameNode),
        // The API server accepts only the values above; an unknown future value is ignored,
        // like kube-proxy ignores it, rather than dropping the whole service.
        Some(_) => None,
    };

    let external_name = if service_type == ServiceType::ExternalName {
        let n = spec
            .external_name
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ModelError::MissingField {
                kind: KIND,
                object: obj.clone(),
                field: "spec.externalName".into(),
            })?;
        Some(n.trim_end_matches('.').to_string())
    } else {
        None
    };

    Ok(Service {
        key,
        labels: meta
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        annotations,
        service_type,
        cluster_ips,
        headless,
        external_name,
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        session_affinity_timeout,
        external_traffic_local,
        internal_traffic_local,
        health_check_node_port,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        traffic_distribution,
    })
}

/// Convert a discovery/v1 EndpointSlice. Returns `Ok(None)` for slices the proxy does not
/// use: FQDN slices and slices not owned by a Service (no `kubernetes.io/service-name`).
/// `discovery/v1` validation: at most 1000 endpoints and 100 ports per EndpointSlice.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = 100;

pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
) -> Result<Option<EndpointSlice>, ModelError> {
    const KIND: &str = "EndpointSlice";
    let meta = &slice.metadata;
    let obj = object_name(meta);
    let name = meta.name.clone().ok_or_else(|| ModelError::MissingField {
        kind: KIND,
        object: obj.clone(),
        field: "metadata.name".into(),
    })?;
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .cloned()
    else {
        return Ok(None);
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::IPv4,
        "IPv6" => IpFamily::IPv6,
        "FQDN" => return Ok(None),
        other => {
            return Err(ModelError::invalid(
                KIND,
                &obj,
                "addressType",
                format!("unknown address type {other:?}"),
            ));
        }
    };

    // The API server's own validation limits: a slice beyond them did not come from a
    // conforming server, and its size must not cost the other services their sync.
    let n_ports = slice.ports.as_ref().map_or(0, Vec::len);
    if n_ports > MAX_SLICE_PORTS {
        return Err(ModelError::invalid(
            KIND,
            &obj,
            "ports",
            format!("{n_ports} ports; an EndpointSlice has at most {MAX_SLICE_PORTS}"),
        ));
    }
    if slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
        return Err(ModelError::invalid(
            KIND,
            &obj,
            "endpoints",
            format!(
                "{} endpoints; an EndpointSlice has at most {MAX_SLICE_ENDPOINTS}",
                slice.endpoints.len()
            ),
        ));
    }

    // Sized exactly: a million endpoints are held for as long as their slices live.
    let mut ports = Vec::with_capacity(n_ports);
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A nil port means "all ports"; kube-proxy cannot program that and skips it.
        let Some(port) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: parse_protocol(
                KIND,
                &obj,
                format!("ports[{i}].protocol"),
                p.protocol.as_deref(),
            )?,
            port: parse_port(KIND, &obj, format!("ports[{i}].port"), port)?,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(first) = ep.addresses.first() else {
            return Err(ModelError::MissingField {
                kind: KIND,
                object: obj,
                field: format!("endpoints[{i}].addresses"),
            });
        };
        let address = parse_ip(KIND, &obj, format!("endpoints[{i}].addresses[0]"), first)?;
        if IpFamily::of(&address) != family {
            return Err(ModelError::invalid(
                KIND,
                &obj,
                format!("endpoints[{i}].addresses[0]"),
                format!("{address} is not of addressType {family}"),
            ));
        }
        let cond = ep.conditions.clone().unwrap_or_default();
        // EndpointSlice semantics: a nil `ready` means ready; a nil `serving` means the same
        // as `ready`; a nil `terminating` means not terminating.
        let ready = cond.ready.unwrap_or(true);
        let serving = cond.serving.unwrap_or(ready);
        let terminating = cond.terminating.unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(
            Endpoint {
                address,
                ready,
                serving,
                terminating,
                node_name: ep.node_name.as_deref().map(intern),
                zone: ep.zone.as_deref().map(intern),
                extra: None,
            }
            .with_extra(EndpointExtra {
                hostname: ep.hostname.clone(),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect()),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect()),
            }),
        );
    }

    Ok(Some(EndpointSlice {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        service,
        family,
        ports,
        endpoints,
    }))
}

/// Convert a core/v1 Node.
/// Convert a Pod: its namespace and addresses (for DNS's server-side search paths).
pub fn pod(pod: &core::Pod) -> Result<crate::types::Pod, ModelError> {
    const KIND: &str = "Pod";
    let meta = &pod.metadata;
    let obj = object_name(meta);
    let name = meta.name.clone().ok_or_else(|| ModelError::MissingField {
        kind: KIND,
        object: obj.clone(),
        field: "metadata.name".into(),
    })?;
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    let listed = status.and_then(|s| s.pod_ips.as_ref());
    for (i, p) in listed.into_iter().flatten().enumerate() {
        let a = parse_ip(KIND, &obj, format!("status.podIPs[{i}].ip"), &p.ip)?;
        if !ips.contains(&a) {
            ips.push(a);
        }
    }
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|s| !s.is_empty())
    {
        ips.push(parse_ip(KIND, &obj, "status.podIP".into(), ip)?);
    }
    let spec = pod.spec.as_ref();
    Ok(crate::types::Pod {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        node_name: spec.and_then(|s| s.node_name.clone()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    })
}

pub fn node(node: &core::Node) -> Result<Node, ModelError> {
    const KIND: &str = "Node";
    let meta = &node.metadata;
    let name = meta.name.clone().ok_or_else(|| ModelError::MissingField {
        kind: KIND,
        object: "<unnamed>".into(),
        field: "metadata.name".into(),
    })?;
    let mut addresses = Vec::new();
    for (i, a) in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            let addr = parse_ip(
                KIND,
                &name,
                format!("status.addresses[{i}].address"),
                &a.address,
            )?;
            if !addresses.contains(&addr) {
                addresses.push(addr);
            }
        }
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == crate::types::TAINT_TO_BE_DELETED));
    let leaving = if meta.deletion_timestamp.is_some() {
        Some("metadata.deletionTimestamp is set".to_string())
    } else if tainted {
        Some(format!("tainted {}", crate::types::TAINT_TO_BE_DELETED))
    } else {
        None
    };
    Ok(Node {
        leaving,
        labels: meta
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        name,
        addresses,
    })
}
