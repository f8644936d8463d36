//! Transparent interception of the cluster DNS Service. eBPF (socket LB): a pod whose
//! resolv.conf points at the kube-dns ClusterIP, unchanged, is answered by the node-local
//! resolver (its query counter moves; the Service's endpoints see nothing), with no
//! conntrack DNAT entry. When the resolver dies (SIGKILL) the kernel hands DNS back to the
//! endpoints within a second; a restart takes it back; a clean stop hands it back at once.
//! iptables (NodeLocal DNSCache's shape): the same pod is answered by the resolver listening
//! on the ClusterIP itself, NOTRACK'd, so conntrack holds nothing for it; a clean stop hands
//! DNS back to the endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{BackendSpec, EtcNetns, Sandbox, http_get_in, require_root, sh};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

const CONFIG: &str = "healthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10256\ndns:\n  listen: ['169.254.20.10:53']\n  upstream: ['127.0.0.1:9']\n";

fn manifests() -> String {
    // kube-dns's endpoints are the sandbox's servers: they answer any UDP datagram with
    // their name, so a reply tells who got the query.
    let dns = fixtures::service(
        "kube-system",
        "kube-dns",
        "10.96.0.10",
        &[
            Port::udp("dns", 53).to(9125),
            Port::tcp("dns-tcp", 53).to(8080),
        ],
    ) + &fixtures::slice(
        "kube-system",
        "kube-dns",
        "kube-dns-1",
        &[Port::udp("dns", 9125), Port::tcp("dns-tcp", 8080)],
        &[("10.244.1.11", Some("node-a"))],
    );
    let web = fixtures::service("t", "web", "10.96.0.60", &[Port::tcp("http", 80)]);
    format!("{NODE}{dns}{web}")
}

/// Run `cmd` in the pod namespace `ns`, as a process of the socket-LB cgroup (as a pod's
/// processes are in a real cluster).
fn in_pod(sb: &Sandbox, ns: &str, cmd: &str) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {ns} {cmd}",
        sb.cgroup.display()
    );
    sh(&["sh", "-c", &script]).unwrap_or_else(|e| e.to_string())
}

/// One UDP datagram to the kube-dns ClusterIP from the pod: `ok NAME ...` when an endpoint
/// answered, an error otherwise (the resolver does not answer a non-DNS datagram).
fn to_endpoints(sb: &Sandbox, pod: &str) -> String {
    let cg = sb.cgroup.to_string_lossy().to_string();
    sb.probe(&[
        "--cgroup",
        &cg,
        "--netns",
        pod,
        "--udp",
        "10.96.0.10:53",
        "--count",
        "1",
        "--timeout-ms",
        "300",
    ])
    .map_or_else(|e| e.to_string(), |l| l.join(","))
}

fn metric(sb: &Sandbox, name: &str) -> f64 {
    let body = http_get_in(
        &sb.node_ns(),
        "127.0.0.1:10256".parse().unwrap(),
        "/metrics",
    );
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The node-local resolver's query counter moves. The UDP workers publish their counts in
/// batches (on a short idle or once a second), so it is polled rather than read once.
fn resolver_answered(sb: &Sandbox) {
    until(
        "the resolver's query counter",
        Duration::from_secs(3),
        || {
            let answered = metric(sb, "coredns_dns_requests_total");
            (answered < 1.0).then(|| format!("the resolver's counter did not move ({answered})"))
        },
    );
}

fn until(what: &str, within: Duration, mut ok: impl FnMut() -> Option<String>) -> Duration {
    let start = Instant::now();
    loop {
        let Some(last) = ok() else {
            return start.elapsed();
        };
        assert!(start.elapsed() < within, "{what}: {last}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pods_dns_goes_to_the_node_local_resolver_and_back_to_the_endpoints_when_it_dies() {
    require_root();
    let mut sb = Sandbox::create(
        "syi",
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21)),
        ],
    )
    .unwrap();
    let pod = format!("{}-p1", sb.prefix);
    let _etc = EtcNetns::resolv_conf(
        &pod,
        "search t.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5 timeout:1 attempts:1\n",
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    sb.start_daemon(&dir, "ebpf", CONFIG).unwrap();

    // The pod's unchanged resolv.conf (nameserver = the kube-dns ClusterIP) resolves a
    // Service's short name, answered by the node-local resolver.
    until("getent from the pod", Duration::from_secs(20), || {
        let got = in_pod(&sb, &pod, "getent hosts web");
        (!got.contains("10.96.0.60")).then(|| format!("{got}\n{}", sb.daemon_log()))
    });
    resolver_answered(&sb);
    let got = to_endpoints(&sb, &pod);
    assert!(
        !got.contains("ok a1"),
        "an endpoint got an intercepted query: {got}"
    );
    assert!(
        (metric(&sb, "switchyard_dns_interception") - 1.0).abs() < f64::EPSILON,
        "interception is not reported on"
    );
    // The socket LB rewrote the address: no DNAT in either conntrack table.
    for ns in [sb.node_ns(), pod.clone()] {
        let nat =
            sh(&["ip", "netns", "exec", &ns, "conntrack", "-L", "--dst-nat"]).unwrap_or_default();
        assert!(
            !nat.contains("10.96.0.10"),
            "{ns}: conntrack DNAT entries for the DNS Service:\n{nat}"
        );
    }

    // The resolver dies without a word: the kernel sends DNS to the endpoints within 1 s.
    sb.kill_daemon();
    let took = until("fallback after SIGKILL", Duration::from_secs(3), || {
        let got = to_endpoints(&sb, &pod);
        (!got.contains("ok a1")).then_some(got)
    });
    assert!(took < Duration::from_millis(1500), "fallback took {took:?}");

    // Back: the restarted resolver takes DNS over again.
    sb.start_daemon(&dir, "ebpf", CONFIG).unwrap();
    until(
        "interception after restart",
        Duration::from_secs(20),
        || {
            let got = to_endpoints(&sb, &pod);
            got.contains("ok a1").then_some(got)
        },
    );
    let got = in_pod(&sb, &pod, "getent hosts web");
    assert!(got.contains("10.96.0.60"), "{got}");

    // A clean stop hands DNS back at once.
    sb.stop_daemon();
    let took = until("fallback after SIGTERM", Duration::from_secs(3), || {
        let got = to_endpoints(&sb, &pod);
        (!got.contains("ok a1")).then_some(got)
    });
    assert!(took < Duration::from_millis(700), "fallback took {took:?}");
}

#[test]
fn with_iptables_pods_dns_is_answered_locally_untracked_and_handed_back_on_stop() {
    require_root();
    let mut sb = Sandbox::create(
        "syj",
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21)),
        ],
    )
    .unwrap();
    let pod = format!("{}-p1", sb.prefix);
    let _etc = EtcNetns::resolv_conf(
        &pod,
        "search t.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5 timeout:1 attempts:1\n",
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    sb.start_daemon(&dir, "iptables", &format!("{CONFIG}iptablesMode: nft\n"))
        .unwrap();
    let plain = |sb: &Sandbox| {
        sb.probe(&[
            "--netns",
            &pod,
            "--udp",
            "10.96.0.10:53",
            "--count",
            "1",
            "--timeout-ms",
            "300",
        ])
        .map_or_else(|e| e.to_string(), |l| l.join(","))
    };
    until("getent from the pod", Duration::from_secs(20), || {
        let got = sh(&["ip", "netns", "exec", &pod, "getent", "hosts", "web"]).unwrap_or_default();
        (!got.contains("10.96.0.60")).then(|| format!("{got}\n{}", sb.daemon_log()))
    });
    resolver_answered(&sb);
    let got = plain(&sb);
    assert!(
        !got.contains("ok a1"),
        "an endpoint got an intercepted query: {got}"
    );
    let ct = sh(&["ip", "netns", "exec", &sb.node_ns(), "conntrack", "-L"]).unwrap_or_default();
    assert!(
        !ct.contains("10.96.0.10"),
        "conntrack tracks intercepted DNS:\n{ct}"
    );
    // A clean stop flushes the rules: the Service's DNAT sends queries to its endpoints.
    sb.stop_daemon();
    let took = until("fallback after SIGTERM", Duration::from_secs(3), || {
        let got = plain(&sb);
        (!got.contains("ok a1")).then_some(got)
    });
    assert!(took < Duration::from_secs(1), "fallback took {took:?}");
}
