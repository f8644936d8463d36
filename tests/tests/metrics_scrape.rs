//! A real `/metrics` scrape of the daemon in the sandbox, on the eBPF backend (with
//! `serviceCounters: true`) and on iptables: every series has kube-proxy's name, type and
//! label set where it means what kube-proxy's does, Switchyard's own are `switchyard_*`,
//! and every metric the Grafana dashboard in `deploy/helm/switchyard/dashboards/` queries is exported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, http_get_in, require_root, sh};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

/// (family name, type, label names) — kube-proxy's where the name says `kubeproxy_`.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &[],
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &[],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &[],
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    ("kubeproxy_sync_proxy_rules_service_changes", "counter", &[]),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["traffic_policy"],
    ),
    ("kubeproxy_proxy_healthz", "counter", &["code"]),
    ("kubeproxy_proxy_livez", "counter", &["code"]),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        &[],
    ),
    ("switchyard_sync_errors", "counter", &[]),
    ("switchyard_service_ports", "gauge", &[]),
    ("switchyard_change_to_programmed_seconds", "histogram", &[]),
    ("switchyard_backend", "gauge", &["backend", "reason"]),
    ("switchyard_dataplane_capacity_errors", "counter", &[]),
    (
        "switchyard_dataplane_unprogrammed_service_ports",
        "gauge",
        &[],
    ),
    ("switchyard_tc_programs_reattached", "counter", &[]),
    ("switchyard_health_check_node_port_servers", "gauge", &[]),
    (
        "switchyard_health_check_node_port_bind_errors",
        "counter",
        &[],
    ),
    // CoreDNS's series, with CoreDNS's labels.
    (
        "coredns_dns_requests",
        "counter",
        &["server", "zone", "view", "proto", "family", "type"],
    ),
    (
        "coredns_dns_responses",
        "counter",
        &["server", "zone", "view", "rcode", "plugin"],
    ),
    (
        "coredns_dns_request_duration_seconds",
        "histogram",
        &["server", "zone", "view", "type"],
    ),
    ("coredns_cache_served_stale", "counter", &[]),
    ("coredns_cache_prefetch", "counter", &[]),
    (
        "coredns_cache_hits",
        "counter",
        &["server", "type", "zones", "view"],
    ),
    (
        "coredns_cache_misses",
        "counter",
        &["server", "zones", "view"],
    ),
    ("switchyard_dns_listening", "gauge", &["address"]),
    ("switchyard_dns_interception", "gauge", &[]),
];

const EBPF_ONLY: &[(&str, &str, &[&str])] = &[
    ("switchyard_tc_attach_mode", "gauge", &["mode", "reason"]),
    ("switchyard_bpf_map_entries", "gauge", &["map"]),
    ("switchyard_bpf_map_max_entries", "gauge", &["map"]),
    (
        "switchyard_service_packets",
        "counter",
        &["namespace", "service", "port", "protocol", "ip_family"],
    ),
    (
        "switchyard_service_bytes",
        "counter",
        &["namespace", "service", "port", "protocol", "ip_family"],
    ),
    (
        "switchyard_service_connections",
        "counter",
        &["namespace", "service", "port", "protocol", "ip_family"],
    ),
];

const IPTABLES_ONLY: &[(&str, &str, &[&str])] = &[(
    "kubeproxy_sync_proxy_rules_iptables_total",
    "gauge",
    &["table"],
)];

/// One scrape, parsed: family -> (type, label-name sets of its samples, sample names).
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<Vec<String>>>,
    samples: BTreeMap<String, f64>,
}

fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap();
            s.types.insert(name.to_string(), t.to_string());
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let names: Vec<String> = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| kv.split_once('=').unwrap().0.to_string())
                    .filter(|k| k != "le")
                    .collect();
                (n, names)
            }
            None => (series, Vec::new()),
        };
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf).filter(|f| s.types.contains_key(*f)))
            .unwrap_or(name)
            .to_string();
        let mut sorted = labels;
        sorted.sort();
        s.labels.entry(family).or_default().insert(sorted);
        s.samples
            .insert(series.to_string(), value.parse().unwrap_or(f64::NAN));
    }
    s
}

impl Scrape {
    /// Every sample name the scrape exports, or would export once the family has a child.
    fn exported(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .samples
            .keys()
            .map(|k| k.split('{').next().unwrap().to_string())
            .collect();
        for (name, t) in &self.types {
            match t.as_str() {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suf in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{suf}"));
                    }
                }
                _ => {
                    out.insert(name.clone());
                }
            }
        }
        out
    }
}

fn http_get(sb: &Sandbox, addr: &str, path: &str) -> String {
    http_get_in(&sb.node_ns(), addr.parse().unwrap(), path)
}

/// Run the daemon on `backend`, drive a little traffic, and scrape.
fn scrape(backend: &str, tag: &str, extra: &str) -> Scrape {
    require_root();
    let mut sb = Sandbox::create(
        &format!("sym{tag}"),
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let ports = [
        Port::tcp("http", 80).to(8080),
        Port::udp("udp", 53).to(9125),
    ];
    let slice_ports = [Port::tcp("http", 8080), Port::udp("udp", 9125)];
    let web = fixtures::service("t", "web", "10.96.0.60", &ports)
        + &fixtures::slice(
            "t",
            "web",
            "web-1",
            &slice_ports,
            &[("10.244.1.11", Some("node-a"))],
        );
    // eTP=Local with no endpoint on this node: counted in no_local_endpoints{external}.
    let far = fixtures::service("t", "far", "10.96.0.61", &ports)
        + "  externalIPs: [172.30.0.200]\n  externalTrafficPolicy: Local\n"
        + &fixtures::slice(
            "t",
            "far",
            "far-1",
            &slice_ports,
            &[("10.244.9.9", Some("node-b"))],
        );
    std::fs::write(dir.join("all.yaml"), format!("{NODE}{web}{far}")).unwrap();
    let cfg = format!(
        "healthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10249\ndns:\n  listen: ['127.0.0.1:5353']\n  upstream: ['127.0.0.1:9']\n{extra}"
    );
    sb.start_daemon(&dir, backend, &cfg).unwrap();
    let start = Instant::now();
    while !http_get(&sb, "127.0.0.1:10256", "/healthz").starts_with("HTTP/1.1 200") {
        assert!(
            start.elapsed() < Duration::from_secs(20) && sb.daemon_running(),
            "never healthy:\n{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    http_get(&sb, "127.0.0.1:10256", "/livez");
    // Traffic through the service (per-service counters) and a DNS query.
    let got = sb
        .probe_from_backend("a1", &["--tcp", "10.96.0.60:80", "--count", "3"])
        .unwrap();
    assert!(got.iter().all(|l| l.starts_with("ok ")), "{got:?}");
    let ns = sb.node_ns();
    // DNS follows the store on its own (50 ms debounce): ask until the zone has the name.
    let start = Instant::now();
    loop {
        let dig = sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "dig",
            "+short",
            "+time=2",
            "@127.0.0.1",
            "-p",
            "5353",
            "web.t.svc.cluster.local",
        ])
        .unwrap_or_default();
        if dig.trim() == "10.96.0.60" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "dig: {dig:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The UDP server flushes its query counts when idle (every 200 ms at most).
    let start = Instant::now();
    let body = loop {
        let resp = http_get(&sb, "127.0.0.1:10249", "/metrics");
        let body = resp
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert!(body.contains("# EOF"), "{resp}");
        if body.contains("coredns_dns_requests_total{") {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no DNS query counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    parse(&body)
}

fn check(s: &Scrape, expected: &[(&str, &str, &[&str])]) {
    for (name, t, labels) in expected {
        assert_eq!(
            s.types.get(*name).map(String::as_str),
            Some(*t),
            "{name}: type (families: {:?})",
            s.types.keys().collect::<Vec<_>>()
        );
        let mut want: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        want.sort();
        let got = s
            .labels
            .get(*name)
            .unwrap_or_else(|| panic!("{name}: no samples"));
        assert_eq!(
            got,
            &BTreeSet::from([want]),
            "{name}: label sets of its samples"
        );
    }
    // Nothing unprefixed, nothing of kube-proxy's names with another meaning.
    for name in s.types.keys() {
        assert!(
            name.starts_with("kubeproxy_")
                || name.starts_with("coredns_")
                || name.starts_with("switchyard_"),
            "{name} has none of the prefixes"
        );
    }
}

fn value(s: &Scrape, series: &str) -> f64 {
    *s.samples.get(series).unwrap_or_else(|| {
        let family = series.split('{').next().unwrap_or_default();
        let near: Vec<&String> = s.samples.keys().filter(|k| k.starts_with(family)).collect();
        panic!("{series} missing; {family} has: {near:?}")
    })
}

/// The metric names a dashboard's queries use.
fn dashboard_metrics() -> BTreeSet<String> {
    let text = include_str!("../../deploy/helm/switchyard/dashboards/switchyard.json");
    let dash: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut names = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for tok in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if tok.starts_with("kubeproxy_")
                    || tok.starts_with("coredns_")
                    || tok.starts_with("switchyard_")
                {
                    names.insert(tok.to_string());
                }
            }
        }
    }
    assert!(names.len() > 20, "{names:?}");
    names
}

#[test]
fn ebpf_and_iptables_scrapes_have_kube_proxys_names_and_the_dashboard_is_covered() {
    let e = scrape("ebpf", "e", "serviceCounters: true\n");
    check(&e, EXPECTED);
    check(&e, EBPF_ONLY);
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"
        ),
        2.0,
        "far's two ports"
    );
    assert!(value(&e, "kubeproxy_proxy_healthz_total{code=\"200\"}") >= 1.0);
    assert!(value(&e, "kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0);
    let conns = value(
        &e,
        "switchyard_service_connections_total{namespace=\"t\",service=\"web\",port=\"http\",protocol=\"TCP\",ip_family=\"IPv4\"}",
    );
    assert!(conns >= 3.0, "three connections through web: {conns}");
    assert_eq!(
        value(&e, "switchyard_bpf_map_entries{map=\"services\"}"),
        4.0,
        "two services, two ports each"
    );

    let i = scrape("iptables", "i", "iptablesMode: nft\n");
    check(&i, EXPECTED);
    check(&i, IPTABLES_ONLY);
    assert!(
        value(
            &i,
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}"
        ) > 10.0
    );

    let mut exported = e.exported();
    exported.extend(i.exported());
    let missing: Vec<String> = dashboard_metrics()
        .into_iter()
        .filter(|m| !exported.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries unexported series: {missing:?}"
    );
}
