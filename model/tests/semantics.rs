#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Table tests of kube-proxy's service semantics. Each case is a set of manifests (YAML, as a
//! user would write them) and the plan the model must compute for node `node-a`.

use pretty_assertions::assert_eq;
use switchyard_model::plan::Plan;
use switchyard_model::{Engine, NodePortAddresses, ProxyConfig, Selector, manifest};

const NODE: &str = r"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/zone: zone-a
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.10}
  - {type: InternalIP, address: 'fd00::10'}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: Hostname, address: node-a}
";

fn engine_with(yaml: &str, npa: &[&str]) -> Engine {
    let mut objs = manifest::parse("node.yaml", NODE).unwrap();
    objs.extend(manifest::parse("case.yaml", yaml).unwrap());
    let cfg = ProxyConfig {
        node_name: "node-a".into(),
        node_port_addresses: NodePortAddresses::parse(
            &npa.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .unwrap(),
    };
    Engine::with_objects(cfg, objs)
}

fn plan(yaml: &str) -> String {
    plan_npa(yaml, &[])
}

fn plan_npa(yaml: &str, npa: &[&str]) -> String {
    Plan::build(&engine_with(yaml, npa), &Selector::default()).to_table()
}

/// Trim the common indentation of an expected block so cases read naturally.
fn expect(s: &str) -> String {
    let lines: Vec<&str> = s.lines().skip_while(|l| l.trim().is_empty()).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out: String = lines
        .iter()
        .map(|l| if l.len() >= indent { &l[indent..] } else { "" })
        .collect::<Vec<_>>()
        .join("\n");
    out = out.trim_end().to_string();
    out.push('\n');
    out
}

fn slice(name: &str, svc: &str, port_name: &str, port: u16, endpoints: &str) -> String {
    format!(
        r"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {svc}}}
addressType: IPv4
ports: [{{name: '{port_name}', port: {port}, protocol: TCP}}]
endpoints:
{endpoints}"
    )
}

const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {tier: frontend, env: prod}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
";

#[test]
fn cluster_ip_resolves_target_port_by_name_per_slice() {
    // The named targetPort maps to 8080 on one set of pods and 9090 on the other.
    let yaml = format!(
        "{WEB}{}{}",
        slice(
            "web-1",
            "web",
            "http",
            8080,
            "- addresses: [10.244.1.5]\n  nodeName: node-a\n"
        ),
        slice(
            "web-2",
            "web",
            "http",
            9090,
            "- addresses: [10.244.2.7]\n  nodeName: node-b\n"
        ),
    );
    assert_eq!(
        plan(&yaml),
        expect(
            "
            default/web:http/TCP IPv4
              ClusterIP     10.96.0.10:80
              internal   -> 10.244.1.5:8080, 10.244.2.7:9090
            "
        )
    );
}

#[test]
fn endpoint_listed_in_two_slices_counts_once() {
    let ep = "- addresses: [10.244.1.5]\n  nodeName: node-a\n";
    let yaml = format!(
        "{WEB}{}{}",
        slice("web-1", "web", "http", 8080, ep),
        slice("web-2", "web", "http", 8080, ep)
    );
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));
}

const NODEPORT: &str = r"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, nodePort: 30080}]
";

#[test]
fn node_port_on_every_node_address_by_default() {
    let yaml = format!(
        "{NODEPORT}{}",
        slice("np-1", "np", "http", 8080, "- addresses: [10.244.1.5]\n")
    );
    assert_eq!(
        plan(&yaml),
        expect(
            "
            default/np:http/TCP IPv4
              ClusterIP     10.96.0.20:80
              NodePort      192.168.1.10:30080
              NodePort      203.0.113.10:30080
              internal   -> 10.244.1.5:8080
              external   -> 10.244.1.5:8080
            "
        )
    );
}

#[test]
fn node_port_addresses_filter_by_cidr_and_primary() {
    let yaml = format!(
        "{NODEPORT}{}",
        slice("np-1", "np", "http", 8080, "- addresses: [10.244.1.5]\n")
    );
    let by_cidr = plan_npa(&yaml, &["203.0.113.0/24"]);
    assert!(by_cidr.contains("NodePort      203.0.113.10:30080"));
    assert!(!by_cidr.contains("192.168.1.10:30080"));
    let primary = plan_npa(&yaml, &["primary"]);
    assert!(primary.contains("NodePort      192.168.1.10:30080"));
    assert!(!primary.contains("203.0.113.10:30080"));
}

#[test]
fn external_ips_and_load_balancer_ingress_with_source_ranges() {
    // Source ranges carry stray whitespace, as users write them; kube-proxy trims it.
    let yaml = format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [198.51.100.7]
  loadBalancerSourceRanges: [' 192.0.2.0/24 ', '198.51.100.0/25  ']
  ports: [{{name: https, port: 443, nodePort: 30443}}]
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.200}}, {{hostname: lb.example.com}}]
{}",
        slice("lb-1", "lb", "https", 8443, "- addresses: [10.244.1.5]\n")
    );
    assert_eq!(
        plan_npa(&yaml, &["192.168.1.0/24"]),
        expect(
            "
            default/lb:https/TCP IPv4
              ClusterIP     10.96.0.30:443
              NodePort      192.168.1.10:30443
              ExternalIP    198.51.100.7:443
              LoadBalancer  198.51.100.200:443
              sourceRanges  192.0.2.0/24, 198.51.100.0/25
              internal   -> 10.244.1.5:8443
              external   -> 10.244.1.5:8443
            "
        )
    );
}

#[test]
fn skips_headless_external_name_and_other_proxies() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata:
  name: other
  namespace: default
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}
";
    assert_eq!(
        plan(yaml),
        expect(
            "
            default/db (skipped: Headless)
            default/ext (skipped: ExternalName)
            default/other (skipped: ServiceProxyName)
            "
        )
    );
}

#[test]
fn no_endpoints_rejects() {
    assert_eq!(
        plan(NODEPORT),
        expect(
            "
            default/np:http/TCP IPv4
              ClusterIP     10.96.0.20:80
              NodePort      192.168.1.10:30080
              NodePort      203.0.113.10:30080
              internal   -> REJECT
              external   -> REJECT
            "
        )
    );
}

const TERMINATING_EPS: &str = "\
- addresses: [10.244.1.5]
  nodeName: node-a
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.2.7]
  nodeName: node-b
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.3.9]
  nodeName: node-c
  conditions: {ready: false, serving: false, terminating: true}
";

#[test]
fn terminating_fallback_cluster_policy() {
    // No ready endpoint anywhere: serving+terminating ones are used; not-serving ones never.
    let yaml = format!(
        "{WEB}{}",
        slice("web-1", "web", "http", 8080, TERMINATING_EPS)
    );
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080, 10.244.2.7:8080\n"));
}

#[test]
fn terminating_fallback_is_not_used_while_a_ready_endpoint_exists() {
    let eps = format!("{TERMINATING_EPS}- addresses: [10.244.4.4]\n  nodeName: node-d\n");
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, &eps));
    assert!(plan(&yaml).contains("internal   -> 10.244.4.4:8080\n"));
}

#[test]
fn every_listed_endpoint_counts_for_draining_whatever_its_conditions() {
    // Only the ready one is balanced to, but connections to the terminating and not-serving
    // ones keep draining: each is still listed.
    let eps = format!("{TERMINATING_EPS}- addresses: [10.244.4.4]\n  nodeName: node-d\n");
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, &eps));
    let e = engine_with(&yaml, &[]);
    let state = e.state();
    let port = state.values().next().unwrap();
    assert_eq!(port.cluster_backends.len(), 1);
    let listed: Vec<String> = port
        .listed_endpoints
        .iter()
        .map(|(a, p)| format!("{a}:{p}"))
        .collect();
    assert_eq!(
        listed,
        [
            "10.244.1.5:8080",
            "10.244.2.7:8080",
            "10.244.3.9:8080",
            "10.244.4.4:8080"
        ]
    );
}

#[test]
fn terminating_fallback_local_policy() {
    // iTP=Local: the only local endpoint is terminating but serving, so it is used, even
    // though a ready endpoint exists on another node.
    let eps = "\
- addresses: [10.244.1.5]
  nodeName: node-a
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.2.7]
  nodeName: node-b
";
    let yaml = format!(
        "{}{}",
        WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  internalTrafficPolicy: Local"
        ),
        slice("web-1", "web", "http", 8080, eps)
    );
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops() {
    let yaml = format!(
        "{}{}",
        WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  internalTrafficPolicy: Local"
        ),
        slice(
            "web-1",
            "web",
            "http",
            8080,
            "- addresses: [10.244.2.7]\n  nodeName: node-b\n"
        )
    );
    assert_eq!(
        plan(&yaml),
        expect(
            "
            default/web:http/TCP IPv4  iTP=Local
              ClusterIP     10.96.0.10:80
              internal   -> DROP
            "
        )
    );
}

const ETP_LOCAL: &str = r"
apiVersion: v1
kind: Service
metadata: {name: edge, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30050}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}
";

#[test]
fn external_traffic_policy_local_sends_external_to_local_only_and_pods_to_all() {
    let eps = "\
- addresses: [10.244.1.5]
  nodeName: node-a
- addresses: [10.244.2.7]
  nodeName: node-b
";
    let yaml = format!("{ETP_LOCAL}{}", slice("edge-1", "edge", "http", 8080, eps));
    assert_eq!(
        plan_npa(&yaml, &["192.168.1.0/24"]),
        expect(
            "
            default/edge:http/TCP IPv4  eTP=Local  healthCheckNodePort=32000
              ClusterIP     10.96.0.50:80
              NodePort      192.168.1.10:30050
              LoadBalancer  198.51.100.50:80
              internal   -> 10.244.1.5:8080, 10.244.2.7:8080
              external   -> 10.244.1.5:8080
            "
        )
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops_external_only() {
    let yaml = format!(
        "{ETP_LOCAL}{}",
        slice(
            "edge-1",
            "edge",
            "http",
            8080,
            "- addresses: [10.244.2.7]\n  nodeName: node-b\n"
        )
    );
    let p = plan(&yaml);
    assert!(p.contains("internal   -> 10.244.2.7:8080\n"), "{p}");
    assert!(p.contains("external   -> DROP\n"), "{p}");
}

#[test]
fn topology_zone_hints_used_when_every_ready_endpoint_has_them() {
    let eps = "\
- addresses: [10.244.1.5]
  zone: zone-a
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.244.2.7]
  zone: zone-b
  hints: {forZones: [{name: zone-b}]}
";
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, eps));
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));

    // One ready endpoint without hints: kube-proxy ignores hints altogether.
    let eps_partial = format!("{eps}- addresses: [10.244.3.9]\n");
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, &eps_partial));
    assert!(
        plan(&yaml).contains("internal   -> 10.244.1.5:8080, 10.244.2.7:8080, 10.244.3.9:8080\n")
    );

    // Hints for other zones only: fall back to all endpoints rather than black-holing.
    let eps_other = eps.replace("name: zone-a", "name: zone-c");
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, &eps_other));
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080, 10.244.2.7:8080\n"));
}

#[test]
fn topology_node_hints_prefer_this_node() {
    let eps = "\
- addresses: [10.244.1.5]
  nodeName: node-a
  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}
- addresses: [10.244.1.6]
  nodeName: node-x
  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-x}]}
";
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, eps));
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));
}

#[test]
fn traffic_distribution_without_hints_uses_endpoint_topology() {
    let eps = "\
- addresses: [10.244.1.5]
  nodeName: node-a
  zone: zone-a
- addresses: [10.244.1.6]
  nodeName: node-x
  zone: zone-a
- addresses: [10.244.2.7]
  nodeName: node-b
  zone: zone-b
";
    let same_zone = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  trafficDistribution: PreferClose",
    );
    let yaml = format!("{same_zone}{}", slice("web-1", "web", "http", 8080, eps));
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080, 10.244.1.6:8080\n"));

    let same_node = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  trafficDistribution: PreferSameNode",
    );
    let yaml = format!("{same_node}{}", slice("web-1", "web", "http", 8080, eps));
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));
}

/// KEP-1860: a `Proxy`-mode ingress IP belongs to a proxying load balancer; traffic to it
/// must reach the load balancer, so it is not a frontend here. VIP (the default, or said
/// explicitly) is.
#[test]
fn load_balancer_ip_mode_proxy_is_not_programmed() {
    let lb = |ingress: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  ports: [{{name: https, port: 443, nodePort: 30443}}]\nstatus:\n  loadBalancer:\n    ingress: {ingress}\n{}",
            slice("lb-1", "lb", "https", 8443, "- addresses: [10.244.1.5]\n")
        )
    };
    let cases = [
        ("[{ip: 198.51.100.1}]", vec!["198.51.100.1"]),
        ("[{ip: 198.51.100.1, ipMode: VIP}]", vec!["198.51.100.1"]),
        ("[{ip: 198.51.100.1, ipMode: Proxy}]", vec![]),
        (
            "[{ip: 198.51.100.1, ipMode: Proxy}, {ip: 198.51.100.2, ipMode: VIP}]",
            vec!["198.51.100.2"],
        ),
    ];
    for (ingress, want) in cases {
        let p = plan(&lb(ingress));
        let got: Vec<&str> = p
            .lines()
            .filter_map(|l| l.trim().strip_prefix("LoadBalancer"))
            .map(|l| l.trim().trim_end_matches(":443"))
            .collect();
        assert_eq!(got, want, "{ingress}:\n{p}");
    }
}

#[test]
fn traffic_distribution_table() {
    // (trafficDistribution, this node's zone, expected internal backends)
    let eps = "\
- addresses: [10.244.1.5]
  nodeName: node-a
  zone: zone-a
- addresses: [10.244.1.6]
  nodeName: node-x
  zone: zone-a
- addresses: [10.244.2.7]
  nodeName: node-b
  zone: zone-b
";
    let all = "10.244.1.5:8080, 10.244.1.6:8080, 10.244.2.7:8080";
    let cases = [
        ("", all),
        ("PreferClose", "10.244.1.5:8080, 10.244.1.6:8080"),
        ("PreferSameZone", "10.244.1.5:8080, 10.244.1.6:8080"),
        ("PreferSameNode", "10.244.1.5:8080"),
        // A value this version does not know is ignored, as kube-proxy ignores it.
        ("PreferSomewhereNice", all),
    ];
    for (td, want) in cases {
        let svc = if td.is_empty() {
            WEB.to_string()
        } else {
            WEB.replace(
                "type: ClusterIP",
                &format!("type: ClusterIP\n  trafficDistribution: {td}"),
            )
        };
        let yaml = format!("{svc}{}", slice("web-1", "web", "http", 8080, eps));
        let p = plan(&yaml);
        assert!(p.contains(&format!("internal   -> {want}\n")), "{td}:\n{p}");
    }
    // PreferSameNode with no endpoint on this node: the same zone's, then everyone's.
    let far = "\
- addresses: [10.244.1.6]
  nodeName: node-x
  zone: zone-a
- addresses: [10.244.2.7]
  nodeName: node-b
  zone: zone-b
";
    let svc = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  trafficDistribution: PreferSameNode",
    );
    let p = plan(&format!(
        "{svc}{}",
        slice("web-1", "web", "http", 8080, far)
    ));
    assert!(p.contains("internal   -> 10.244.1.6:8080\n"), "{p}");
}

#[test]
fn session_affinity_default_custom_and_off() {
    let yaml = format!(
        "{}{}",
        WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  sessionAffinity: ClientIP"
        ),
        slice("web-1", "web", "http", 8080, "- addresses: [10.244.1.5]\n")
    );
    assert!(plan(&yaml).starts_with("default/web:http/TCP IPv4  affinity=ClientIP(10800s)\n"));
    let yaml = yaml.replace(
        "sessionAffinity: ClientIP",
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}",
    );
    assert!(plan(&yaml).starts_with("default/web:http/TCP IPv4  affinity=ClientIP(30s)\n"));
    assert!(plan(WEB).starts_with("default/web:http/TCP IPv4\n"));
}

#[test]
fn publish_not_ready_addresses_counts_not_ready_as_ready() {
    let eps = "- addresses: [10.244.1.5]\n  conditions: {ready: false}\n";
    let yaml = format!("{WEB}{}", slice("web-1", "web", "http", 8080, eps));
    assert!(plan(&yaml).contains("internal   -> REJECT\n"));
    let yaml = yaml.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  publishNotReadyAddresses: true",
    );
    assert!(plan(&yaml).contains("internal   -> 10.244.1.5:8080\n"));
}

#[test]
fn dual_stack_gives_one_service_port_per_family_with_its_own_endpoints() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.60, 'fd00:96::60']
  ports: [{name: http, port: 80, nodePort: 30060}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:244::5']}]
";
    assert_eq!(
        plan(yaml),
        expect(
            "
            default/ds:http/TCP IPv4
              ClusterIP     10.96.0.60:80
              NodePort      192.168.1.10:30060
              NodePort      203.0.113.10:30060
              internal   -> 10.244.1.5:8080
              external   -> 10.244.1.5:8080
            default/ds:http/TCP IPv6
              ClusterIP     [fd00:96::60]:80
              NodePort      [fd00::10]:30060
              internal   -> [fd00:244::5]:8080
              external   -> [fd00:244::5]:8080
            "
        )
    );
}

#[test]
fn sctp_and_udp_ports_are_separate_service_ports() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: default}
spec:
  clusterIP: 10.96.0.70
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sig-1, namespace: default, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{name: sctp, port: 3868, protocol: SCTP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.5]}]
";
    assert_eq!(
        plan(yaml),
        expect(
            "
            default/sig:dns/UDP IPv4
              ClusterIP     10.96.0.70:53
              internal   -> 10.244.1.5:5353
            default/sig:sctp/SCTP IPv4
              ClusterIP     10.96.0.70:3868
              internal   -> 10.244.1.5:3868
            "
        )
    );
}

#[test]
fn invalid_input_names_the_object_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: ns1}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
            "case.yaml: document 1: Service ns1/bad: spec.clusterIP: \"10.96.0.300\"",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 70000}]}\n",
            "Service default/bad: spec.ports[0].port: 70000 is not a port number",
        ),
        (
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {loadBalancerSourceRanges: ['10.0.0.0/8', 'nonsense']}\n",
            "case.yaml: document 2: Service default/bad: spec.loadBalancerSourceRanges[1]",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: eighty}]}\n",
            "case.yaml: document 1: field spec.ports[0].port",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is outside 1-86400",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]\n",
            "EndpointSlice default/s: endpoints[0].addresses[0]: fd00::1 is not of addressType IPv4",
        ),
    ];
    for (yaml, want) in cases {
        let err = manifest::parse("case.yaml", yaml).unwrap_err().to_string();
        assert!(err.contains(want), "error {err:?} should contain {want:?}");
    }
}

#[test]
fn plan_json_is_sorted_and_stable() {
    let yaml = format!(
        "{NODEPORT}\n---\n{WEB}{}",
        slice("web-1", "web", "http", 8080, "- addresses: [10.244.1.5]\n")
    );
    let a = Plan::build(&engine_with(&yaml, &[]), &Selector::default()).to_json();
    let b = Plan::build(&engine_with(&yaml, &[]), &Selector::default()).to_json();
    assert_eq!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    let names: Vec<&str> = v["servicePorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default/np", "default/web"]);
    assert_eq!(
        v["servicePorts"][1]["internal"]["backends"][0],
        "10.244.1.5:8080"
    );
}

/// Without a Node object (not registered yet, or a manifest directory without one), the
/// host's own addresses stand in, but never loopback or link-local ones: the first IPv4 is
/// what NodePort traffic is masqueraded to, and 127.0.0.1 would black-hole it.
#[test]
fn host_addresses_for_masquerade_skip_loopback_and_link_local() {
    let mut e = Engine::new(ProxyConfig::default());
    e.set_host_addresses(vec![
        "127.0.0.1".parse().unwrap(),
        "169.254.1.1".parse().unwrap(),
        "172.30.0.10".parse().unwrap(),
        "fe80::1".parse().unwrap(),
        "fd00:30::10".parse().unwrap(),
    ]);
    e.replace_all(Vec::new(), Vec::new());
    e.upsert_service(
        switchyard_model::manifest::parse("t", WEB)
            .unwrap()
            .services
            .remove(0),
    );
    e.sync();
    assert_eq!(
        e.state().node_addresses,
        vec![
            "172.30.0.10".parse::<std::net::IpAddr>().unwrap(),
            "fd00:30::10".parse().unwrap()
        ]
    );
}

#[test]
fn a_slice_beyond_the_api_servers_limits_is_refused_naming_it() {
    let eps: String = (0..1001)
        .map(|i| format!("- addresses: [10.244.{}.{}]\n", i / 250, i % 250 + 1))
        .collect();
    let yaml = slice("web-big", "web", "http", 8080, &eps);
    let err = manifest::parse("big.yaml", &yaml).unwrap_err().to_string();
    assert!(
        err.contains(
            "EndpointSlice default/web-big: endpoints: 1001 endpoints; an EndpointSlice has at most 1000"
        ),
        "{err}"
    );
    let eps: String = (0..1000)
        .map(|i| format!("- addresses: [10.244.{}.{}]\n", i / 250, i % 250 + 1))
        .collect();
    assert!(manifest::parse("ok.yaml", &slice("web-1", "web", "http", 8080, &eps)).is_ok());
}

/// A Service keeps only the annotations a dataplane reads; the source-ranges annotation
/// still applies, and `last-applied-configuration` (the whole object again) is not held.
#[test]
fn only_switchyard_annotations_are_kept() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata:
  name: lb
  namespace: t
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"v1","kind":"Service"}'
    service.beta.kubernetes.io/load-balancer-source-ranges: 10.1.0.0/16
    switchyard.io/lb-algorithm: maglev
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 80, protocol: TCP, nodePort: 30050}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.5}]
"#;
    let svc = manifest::parse("lb.yaml", yaml).unwrap().services.remove(0);
    assert_eq!(
        svc.annotations
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["switchyard.io/lb-algorithm"]
    );
    assert_eq!(
        svc.load_balancer_source_ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.1.0.0/16"]
    );
}
