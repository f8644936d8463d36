//! Server-side search paths (CoreDNS's `autopath`) for the node's pods: a pod with
//! `ndots:5` and four search domains looks up an outside name with one query on the wire
//! instead of five, and gets the same address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use switchyard_tests::sandbox::{
    BackendSpec, EtcNetns, Sandbox, http_get_in, in_netns, require_root, sh,
};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";
const POD: &str = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: t}\nspec: {nodeName: node-a, containers: []}\nstatus: {podIP: 10.244.1.21, podIPs: [{ip: 10.244.1.21}]}\n";

/// The outside world: `example.org` has A 192.0.2.1, every other name is NXDOMAIN.
fn upstream(node_ns: &str) {
    let sock = in_netns(node_ns, || UdpSocket::bind("127.0.0.1:5300").unwrap()).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
            m.metadata.recursion_available = true;
            m.queries.clone_from(&req.queries);
            let q = &req.queries[0];
            if q.name().to_ascii().eq_ignore_ascii_case("example.org.") {
                if q.query_type() == RecordType::A {
                    m.answers.push(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A([192, 0, 2, 1].into())),
                    ));
                }
            } else {
                m.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = sock.send_to(&m.to_vec().unwrap(), peer);
        }
    });
}

fn a_requests(sb: &Sandbox) -> f64 {
    let body = http_get_in(
        &sb.node_ns(),
        "127.0.0.1:10256".parse().unwrap(),
        "/metrics",
    );
    body.lines()
        .filter(|l| l.starts_with("coredns_dns_requests_total{") && l.contains("type=\"A\""))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Queries on the wire for one lookup of `example.org` from the pod, and its answer.
fn lookup(sb: &mut Sandbox, dir: &std::path::Path, extra: &str) -> (f64, String) {
    let cfg = format!(
        "healthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10256\ndns:\n  listen: ['172.30.0.10:53']\n  upstream: ['127.0.0.1:5300']\n{extra}"
    );
    sb.start_daemon(dir, "none", &cfg).unwrap();
    let pod = format!("{}-p1", sb.prefix);
    // Ready: the pod's own short name lookup of a cluster name works (and is not counted
    // as an A query of the outside name).
    let start = Instant::now();
    while a_requests(sb) == 0.0 {
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &pod,
            "getent",
            "ahostsv4",
            "kubernetes.default",
        ]);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Another client (the node) asks the pod's first step: its NXDOMAIN is now cached by the
    // UDP workers, and must still not answer the pod (for whom the path is walked).
    for _ in 0..10 {
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &sb.node_ns(),
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            "@172.30.0.10",
            "example.org.t.svc.cluster.local",
        ]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let before = a_requests(sb);
    let got = sh(&[
        "ip",
        "netns",
        "exec",
        &pod,
        "getent",
        "ahostsv4",
        "example.org",
    ])
    .unwrap_or_else(|e| e.to_string());
    // The UDP server flushes its counts when idle.
    std::thread::sleep(Duration::from_millis(1500));
    let queries = a_requests(sb) - before;
    sb.stop_daemon();
    (queries, got)
}

#[test]
fn a_pods_outside_lookup_takes_one_query_instead_of_five() {
    require_root();
    let mut sb = Sandbox::create(
        "sya",
        &[BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21))],
    )
    .unwrap();
    let pod = format!("{}-p1", sb.prefix);
    let _etc = EtcNetns::resolv_conf(
        &pod,
        "search t.svc.cluster.local svc.cluster.local cluster.local corp.internal\nnameserver 172.30.0.10\noptions ndots:5 timeout:2 attempts:1\n",
    )
    .unwrap();
    upstream(&sb.node_ns());
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), format!("{NODE}{POD}")).unwrap();

    let (with, got) = lookup(&mut sb, &dir, "");
    assert!(got.contains("192.0.2.1"), "autopath answer: {got}");
    let (without, got_without) = lookup(&mut sb, &dir, "  autopath: false\n");
    assert!(got_without.contains("192.0.2.1"), "{got_without}");
    assert_eq!(
        (with, without),
        (1.0, 5.0),
        "A queries for one lookup, with and without autopath"
    );
}
