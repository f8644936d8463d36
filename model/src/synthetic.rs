//! Synthetic clusters for benchmarks: `n` ClusterIP services with `eps` ready endpoints each,
//! addressed so that nothing overlaps up to 65k services.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use crate::types::{Endpoint, EndpointPort};
use crate::{EndpointSlice, IpFamily, Protocol, Service, ServiceKey, ServicePort, ServiceType};

/// ClusterIP of service `i`: 10.96.0.0/12 from 10.96.0.1 on.
pub fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0001 + i)
}

/// Endpoint `e` of service `i`: 10.128.0.0/9, 16 addresses per service.
pub fn endpoint_ip(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + i * 16 + e)
}

pub fn service(i: u32) -> Service {
    Service {
        key: ServiceKey::new(format!("ns{}", i % 50), format!("svc{i}")),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        service_type: ServiceType::ClusterIP,
        cluster_ips: vec![IpAddr::V4(cluster_ip(i))],
        headless: false,
        external_name: None,
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            target_port: Some("8080".into()),
        }],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        session_affinity_timeout: None,
        external_traffic_local: false,
        internal_traffic_local: false,
        health_check_node_port: None,
        publish_not_ready_addresses: false,
        traffic_distribution: None,
    }
}

pub fn slice(i: u32, eps: u32) -> EndpointSlice {
    EndpointSlice {
        namespace: format!("ns{}", i % 50),
        name: format!("svc{i}-abcde"),
        service: format!("svc{i}"),
        family: IpFamily::IPv4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: (0..eps)
            .map(|e| Endpoint {
                address: IpAddr::V4(endpoint_ip(i, e)),
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(crate::intern::intern(&format!("node-{}", e % 3))),
                zone: None,
                extra: None,
            })
            .collect(),
    }
}

pub fn cluster(n: u32, eps: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
    (
        (0..n).map(service).collect(),
        (0..n).map(|i| slice(i, eps)).collect(),
    )
}

/// The same cluster as manifests (for `switchyard run --source manifests:`).
pub fn manifests(n: u32, eps: u32) -> String {
    let mut s = String::with_capacity(n as usize * (300 + eps as usize * 40));
    for i in 0..n {
        let ns = i % 50;
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: ns{ns}}}\nspec: {{clusterIP: {}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc{i}-abcde, namespace: ns{ns}, labels: {{kubernetes.io/service-name: svc{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for e in 0..eps {
            let _ = writeln!(s, "- addresses: [{}]", endpoint_ip(i, e));
        }
    }
    s
}
