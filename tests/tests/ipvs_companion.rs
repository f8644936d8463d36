//! IPVS mode's companion rules (ipsets + nat masquerade rules) loaded into a real kernel in a
//! namespace sandbox, with real packets: the kernel here has no IPVS to do the DNAT, but it
//! has ipset and xt_set, so what the rules mark for masquerade can be observed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use switchyard::dataplane::ipvs;
use switchyard_model::{Engine, IpFamily, ProxyConfig, manifest};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, feed_in, require_root};

const CLUSTER: &str = r"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 172.30.0.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  loadBalancerSourceRanges: ['172.30.0.0/30']
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30100}]
status: {loadBalancer: {ingress: [{ip: 172.30.0.100}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: t, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: t, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
";

fn feed(sb: &Sandbox, cmd: &[&str], input: &str) {
    if let Err(e) = feed_in(&sb.node_ns(), cmd, input) {
        panic!("{e}\n{input}");
    }
}

/// The packet counter of the first rule of `chain` whose line contains `needle`.
fn counter(sb: &Sandbox, chain: &str, needle: &str) -> u64 {
    let out = sb
        .in_node(&[
            "iptables-legacy",
            "-t",
            "nat",
            "-L",
            chain,
            "-v",
            "-n",
            "-x",
        ])
        .unwrap();
    out.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {needle} rule in {chain}:\n{out}"))
}

/// Packets marked for drop (source outside loadBalancerSourceRanges) since the last zeroing.
fn drop_marked(sb: &Sandbox) -> u64 {
    counter(sb, "SY-MARK-DROP", "MARK or")
}

/// Packets marked for masquerade since the last zeroing.
fn marked(sb: &Sandbox) -> u64 {
    counter(sb, "SY-MARK-MASQ", "MARK or")
}

/// Packets that entered SY-SERVICES from PREROUTING (so a zero `marked` means "looked at
/// and not marked", not "never seen").
fn seen(sb: &Sandbox) -> u64 {
    counter(sb, "PREROUTING", "SY-SERVICES")
}

fn zero(sb: &Sandbox) {
    sb.in_node(&["iptables-legacy", "-t", "nat", "-Z"]).unwrap();
}

#[test]
fn ipvs_companion_rules_mark_what_kube_proxy_masquerades_or_drops() {
    require_root();
    let cfg = ProxyConfig {
        node_name: "node-a".into(),
        ..ProxyConfig::default()
    };
    let e = Engine::with_objects(cfg, manifest::parse("t", CLUSTER).unwrap());

    let sb = Sandbox::create(
        "syv",
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    feed(
        &sb,
        &["ipset", "restore"],
        &ipvs::ipset_restore(e.state(), IpFamily::IPv4),
    );
    feed(
        &sb,
        &["iptables-legacy-restore", "--noflush"],
        &ipvs::masquerade_rules(
            &["10.244.0.0/16".parse().unwrap()],
            false,
            14,
            IpFamily::IPv4,
        ),
    );
    for (chain, target) in [
        ("PREROUTING", "SY-SERVICES"),
        ("POSTROUTING", "SY-POSTROUTING"),
    ] {
        sb.in_node(&["iptables-legacy", "-t", "nat", "-A", chain, "-j", target])
            .unwrap();
    }

    // A client outside the cluster CIDR to a ClusterIP: marked.
    zero(&sb);
    let _ = sb.probe_from_client(&["--tcp", "10.96.0.10:80", "--timeout-ms", "300"]);
    assert!(
        marked(&sb) > 0,
        "off-cluster client to a ClusterIP must be masqueraded"
    );
    // A pod to the same ClusterIP: not marked.
    zero(&sb);
    let _ = sb.probe_from_backend("a1", &["--tcp", "10.96.0.10:80", "--timeout-ms", "300"]);
    assert!(seen(&sb) > 0);
    assert_eq!(
        marked(&sb),
        0,
        "pod traffic to a ClusterIP keeps its source"
    );
    // NodePort under eTP=Cluster: marked; under eTP=Local: the client address is kept.
    zero(&sb);
    let _ = sb.probe_from_client(&["--tcp", "172.30.0.10:30080", "--timeout-ms", "300"]);
    assert!(marked(&sb) > 0, "eTP=Cluster NodePort must be masqueraded");
    zero(&sb);
    let _ = sb.probe_from_client(&["--tcp", "172.30.0.10:30090", "--timeout-ms", "300"]);
    assert!(seen(&sb) > 0);
    assert_eq!(
        marked(&sb),
        0,
        "eTP=Local NodePort keeps the client address"
    );
    // loadBalancerSourceRanges: the client (172.30.0.2) is inside 172.30.0.0/30, the pod
    // is not and is marked for drop.
    zero(&sb);
    let _ = sb.probe_from_client(&["--tcp", "172.30.0.100:80", "--timeout-ms", "300"]);
    assert!(seen(&sb) > 0);
    assert_eq!(
        drop_marked(&sb),
        0,
        "a source inside the ranges is admitted"
    );
    zero(&sb);
    let _ = sb.probe_from_backend("a1", &["--tcp", "172.30.0.100:80", "--timeout-ms", "300"]);
    assert!(
        drop_marked(&sb) > 0,
        "a source outside the ranges is dropped"
    );
    // Not a service: untouched.
    zero(&sb);
    let _ = sb.probe_from_client(&["--tcp", "10.96.0.99:80", "--timeout-ms", "300"]);
    assert!(seen(&sb) > 0);
    assert_eq!(marked(&sb), 0);
}
