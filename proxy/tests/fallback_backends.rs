//! iptables rendering (golden restore input, partial sync, packet tracer over the rules) and
//! IPVS message encoding and planning. No root needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use std::sync::Arc;

use switchyard::conntrack::{FakeConntrack, StaleUdp};
use switchyard::dataplane::Dataplane;
use switchyard::dataplane::iptables::runner::{FakeRunner, Runner, Tool};
use switchyard::dataplane::iptables::tracer::{Outcome, Packet, trace};
use switchyard::dataplane::iptables::{Flavor, IptablesBackend, IptablesConfig};
use switchyard::dataplane::ipvs;
use switchyard::metrics::Metrics;
use switchyard_model::{Engine, Protocol, ProxyConfig, manifest};

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
  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: ['192.0.2.0/24']
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: t, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.244.2.7], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: t}
spec: {clusterIP: 10.96.0.13, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: itp-1, namespace: t, labels: {kubernetes.io/service-name: itp}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.244.2.8], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec: {clusterIP: 10.96.0.12, sessionAffinity: ClientIP, ports: [{port: 53, protocol: UDP}]}
";

fn engine(yaml: &str) -> Engine {
    let cfg = ProxyConfig {
        node_name: "node-a".into(),
        ..ProxyConfig::default()
    };
    Engine::with_objects(cfg, manifest::parse("t", yaml).unwrap())
}

/// Compare with a golden file; on a difference write `<name>.new` beside it and fail.
fn golden(name: &str, expected: &str, got: &str) {
    if got != expected {
        let path = format!("{}/tests/golden/{name}.new", env!("CARGO_MANIFEST_DIR"));
        std::fs::write(&path, got).unwrap();
        panic!("output differs from tests/golden/{name} (new output in {path}):\n{got}");
    }
}

const V4: Tool = Tool {
    flavor: Flavor::Nft,
    family: switchyard_model::IpFamily::IPv4,
};
const V6: Tool = Tool {
    flavor: Flavor::Nft,
    family: switchyard_model::IpFamily::IPv6,
};

fn iptables_config(cidrs: &[&str]) -> IptablesConfig {
    IptablesConfig {
        flavor: Flavor::Nft,
        cluster_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        masquerade_all: false,
        masquerade_bit: 14,
    }
}

/// The iptables backend over a fake runner (returned to inspect what was written).
fn dp_with(cidrs: &[&str], ipv6: bool) -> (IptablesBackend, FakeRunner) {
    let fake = FakeRunner::default();
    let metrics = Arc::new(Metrics::new());
    let d = IptablesBackend::with(
        &iptables_config(cidrs),
        ipv6,
        Box::new(fake.clone()),
        StaleUdp::with_table(Box::new(FakeConntrack::default()), metrics),
    );
    (d, fake)
}

fn dp() -> (IptablesBackend, FakeRunner) {
    dp_with(&["10.244.0.0/16"], false)
}

/// The input of the last restore for `tool`.
fn last_restore(fake: &FakeRunner, tool: Tool) -> String {
    fake.kernel()
        .restores
        .iter()
        .rev()
        .find(|(t, _)| *t == tool)
        .map(|(_, i)| i.clone())
        .unwrap_or_default()
}

#[test]
fn full_restore_input_is_golden() {
    let e = engine(CLUSTER);
    let (mut d, mut fake) = dp();
    // A chain of ours the new state no longer has, and one hook already in place.
    fake.restore(
        V4,
        "*nat\n:SY-SVC-STALE - [0:0]\n:SY-SERVICES - [0:0]\n-A PREROUTING -j SY-SERVICES\nCOMMIT\n",
    )
    .unwrap();
    d.full_sync(e.state()).unwrap();
    let got = last_restore(&fake, V4);
    golden(
        "iptables_full.txt",
        include_str!("golden/iptables_full.txt"),
        &got,
    );
}

#[test]
fn partial_sync_writes_only_the_changed_service_and_deletes_its_old_chains() {
    let mut e = engine(CLUSTER);
    let (mut d, fake) = dp();
    d.full_sync(e.state()).unwrap();
    let objs = manifest::parse(
        "t",
        &CLUSTER.replace("- {addresses: [10.244.2.5], nodeName: node-b}\n", ""),
    )
    .unwrap();
    e.replace_all(objs.services, objs.slices);
    let cs = e.sync();
    assert_eq!(cs.len(), 1);
    d.apply(&cs, e.state()).unwrap();
    let input = last_restore(&fake, V4);
    // Only web's chains (plus the shared dispatch and fixed chains) are declared.
    let declared: Vec<&str> = input
        .lines()
        .filter(|l| l.starts_with(":SY-SVC") || l.starts_with(":SY-SVL"))
        .collect();
    let web_svc = switchyard::dataplane::iptables::render::chain("SVC", &cs.changed[0].new.key);
    assert_eq!(declared, [format!(":{web_svc} - [0:0]")]);
    assert!(
        !input.contains("t/local:"),
        "the unchanged service's chains must not be rewritten except dispatch rules:\n{input}"
    );
    // The endpoint chain of the removed endpoint is deleted.
    assert_eq!(
        input
            .lines()
            .filter(|l| l.starts_with("-X SY-SEP-"))
            .count(),
        1,
        "{input}"
    );
}

fn pkt(src: [u8; 4], dst: [u8; 4], proto: Protocol, dport: u16) -> Packet {
    Packet {
        src: IpAddr::from(src),
        dst: IpAddr::from(dst),
        proto,
        dport,
        src_local: false,
        local: vec![IpAddr::V4(Ipv4Addr::new(172, 30, 0, 10))],
    }
}

#[test]
fn packet_tracer_follows_kube_proxy_semantics() {
    let e = engine(CLUSTER);
    let (mut d, _) = dp();
    d.full_sync(e.state()).unwrap();
    let v4 = d.families().next().unwrap();
    let (nat, filter) = v4.rules();
    let cfg = v4.config().clone();
    let t = |p: &Packet| trace(&nat, &filter, cfg.masquerade_mark, cfg.drop_mark, p);
    let eps = |v: &[([u8; 4], u16)]| {
        v.iter()
            .map(|(a, p)| (IpAddr::from(*a), *p))
            .collect::<BTreeSet<_>>()
    };

    // Pod -> ClusterIP: every endpoint, not masqueraded.
    assert_eq!(
        t(&pkt([10, 244, 3, 3], [10, 96, 0, 10], Protocol::Tcp, 80)),
        Outcome::Dnat {
            endpoints: eps(&[([10, 244, 1, 5], 8080), ([10, 244, 2, 5], 8080)]),
            masquerade: false
        }
    );
    // Outside -> NodePort (eTP=Cluster): every endpoint, masqueraded.
    assert_eq!(
        t(&pkt(
            [198, 18, 0, 1],
            [172, 30, 0, 10],
            Protocol::Tcp,
            30080
        )),
        Outcome::Dnat {
            endpoints: eps(&[([10, 244, 1, 5], 8080), ([10, 244, 2, 5], 8080)]),
            masquerade: true
        }
    );
    // LB IP from inside the source ranges: allowed; from outside: dropped.
    assert!(matches!(
        t(&pkt([192, 0, 2, 9], [198, 51, 100, 1], Protocol::Tcp, 80)),
        Outcome::Dnat { .. }
    ));
    assert_eq!(
        t(&pkt([203, 0, 113, 9], [198, 51, 100, 1], Protocol::Tcp, 80)),
        Outcome::Drop
    );
    // iTP=Local without local endpoints: ClusterIP traffic is dropped.
    assert_eq!(
        t(&pkt([10, 244, 3, 3], [10, 96, 0, 13], Protocol::Tcp, 80)),
        Outcome::Drop
    );
    // eTP=Local without local endpoints: outside traffic dropped; pods still reach the endpoint.
    assert_eq!(
        t(&pkt(
            [198, 18, 0, 1],
            [172, 30, 0, 10],
            Protocol::Tcp,
            30090
        )),
        Outcome::Drop
    );
    assert_eq!(
        t(&pkt(
            [10, 244, 3, 3],
            [172, 30, 0, 10],
            Protocol::Tcp,
            30090
        )),
        Outcome::Dnat {
            endpoints: eps(&[([10, 244, 2, 7], 80)]),
            masquerade: false
        }
    );
    // No endpoints: REJECT.
    assert_eq!(
        t(&pkt([10, 244, 3, 3], [10, 96, 0, 12], Protocol::Udp, 53)),
        Outcome::Reject
    );
    // Hairpin: an endpoint reaching itself is masqueraded.
    let Outcome::Dnat { masquerade, .. } =
        t(&pkt([10, 244, 1, 5], [10, 96, 0, 10], Protocol::Tcp, 80))
    else {
        panic!()
    };
    assert!(masquerade);
    // Not a service: untouched.
    assert_eq!(
        t(&pkt([10, 244, 3, 3], [10, 96, 0, 99], Protocol::Tcp, 80)),
        Outcome::Accept
    );
}

const DUAL_STACK: &str = r"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 172.30.0.10}, {type: InternalIP, address: 'fd00:30::10'}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ['fd00:244::5'], nodeName: node-a}
";

/// The IPv6 renderer writes ip6tables syntax for the IPv6 service ports only, and the
/// IPv4 renderer ignores them.
#[test]
fn ipv6_rules_are_rendered_for_ip6tables() {
    let e = engine(DUAL_STACK);
    let (mut d, fake) = dp_with(&["10.244.0.0/16", "fd00:244::/64"], true);
    d.full_sync(e.state()).unwrap();
    let input = last_restore(&fake, V6);
    assert!(
        input.contains("-d fd00:96::10/128 -p tcp -m tcp --dport 80"),
        "{input}"
    );
    assert!(
        input.contains("-j DNAT --to-destination [fd00:244::5]:8080"),
        "{input}"
    );
    assert!(
        input.contains("! -s fd00:244::/64 -j SY-MARK-MASQ"),
        "{input}"
    );
    assert!(
        input.contains("-s fd00:244::5/128 -j SY-MARK-MASQ"),
        "hairpin: {input}"
    );
    for v4 in ["10.96.0.10", "10.244.1.5", "10.244.0.0"] {
        assert!(!input.contains(v4), "IPv4 in the IPv6 rules: {input}");
    }
    let input4 = last_restore(&fake, V4);
    assert!(
        input4.contains("10.244.1.5:8080") && !input4.contains("fd00"),
        "{input4}"
    );

    // The tracer agrees: an outside IPv6 client on the NodePort reaches the IPv6 endpoint,
    // masqueraded; a pod is not.
    let v6 = d.families().nth(1).unwrap();
    let (nat, filter) = v6.rules();
    let cfg = v6.config().clone();
    let p = |src: &str| Packet {
        src: src.parse().unwrap(),
        dst: "fd00:30::10".parse().unwrap(),
        proto: Protocol::Tcp,
        dport: 30080,
        src_local: false,
        local: vec!["fd00:30::10".parse().unwrap()],
    };
    let ep = BTreeSet::from([("fd00:244::5".parse().unwrap(), 8080)]);
    assert_eq!(
        trace(
            &nat,
            &filter,
            cfg.masquerade_mark,
            cfg.drop_mark,
            &p("2001:db8::1")
        ),
        Outcome::Dnat {
            endpoints: ep.clone(),
            masquerade: true
        }
    );
    assert_eq!(
        trace(
            &nat,
            &filter,
            cfg.masquerade_mark,
            cfg.drop_mark,
            &p("fd00:244::9")
        ),
        Outcome::Dnat {
            endpoints: ep,
            masquerade: true
        },
        "NodePort traffic under eTP=Cluster is masqueraded whatever the source"
    );
}

#[test]
fn ipvs_messages_match_the_kernel_layout() {
    let s = ipvs::VirtualService {
        addr: "10.96.0.10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        scheduler: "rr".into(),
        persistence: Some(10_800),
    };
    let m = ipvs::encode(0x1c, 7, &ipvs::Op::AddService(s.clone())).unwrap();
    #[rustfmt::skip]
    let want: Vec<u8> = [
        // nlmsghdr: len 104, type 0x1c (family), flags REQUEST|ACK, seq 7, pid 0
        &[104, 0, 0, 0, 0x1c, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0][..],
        // genlmsghdr: cmd NEW_SERVICE (1), version 1, reserved
        &[1, 1, 0, 0],
        // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, len 84
        &[84, 0, 0x01, 0x80],
        // AF = AF_INET (2), u16 + pad
        &[6, 0, 1, 0, 2, 0, 0, 0],
        // PROTOCOL = 6
        &[6, 0, 2, 0, 6, 0, 0, 0],
        // ADDR: 16 bytes, IPv4 first
        &[20, 0, 3, 0, 10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        // PORT, network order
        &[6, 0, 4, 0, 0, 80, 0, 0],
        // SCHED_NAME "rr\0"
        &[7, 0, 6, 0, b'r', b'r', 0, 0],
        // FLAGS {flags PERSISTENT, mask ~0}
        &[12, 0, 7, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        // TIMEOUT 10800
        &[8, 0, 8, 0, 0x30, 0x2a, 0, 0],
        // NETMASK 255.255.255.255
        &[8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff],
    ]
    .concat();
    assert_eq!(m, want);

    let d = ipvs::RealServer {
        addr: "10.244.1.5".parse().unwrap(),
        port: 8080,
        weight: 1,
    };
    let m = ipvs::encode(0x1c, 8, &ipvs::Op::AddDest(s, d)).unwrap();
    assert_eq!(m[16], ipvs::IPVS_CMD_NEW_DEST);
    // The dest nest follows the service-identity nest (AF, PROTOCOL, ADDR, PORT: 4+8+8+20+8).
    let dest = &m[20 + 48..];
    assert_eq!(&dest[..4], &[72, 0, 0x02, 0x80]);
    assert_eq!(
        &dest[4..24],
        &[
            20, 0, 1, 0, 10, 244, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]
    );
    assert_eq!(&dest[24..32], &[6, 0, 2, 0, 0x1f, 0x90, 0, 0]);
}

#[test]
fn ipvs_plan_for_a_change_set_is_golden() {
    let mut e = engine(CLUSTER);
    let objs = manifest::parse("t", &CLUSTER.replace("10.244.2.5", "10.244.2.6")).unwrap();
    e.replace_all(objs.services, objs.slices);
    let cs = e.sync();
    let plan: Vec<String> = ipvs::plan(&cs).iter().map(|o| format!("{o:?}")).collect();
    let got = plan.join("\n") + "\n";
    golden("ipvs_plan.txt", include_str!("golden/ipvs_plan.txt"), &got);
}

/// What IPVS mode needs beside the virtual servers: the ipsets (frontends by kind, eTP=Local
/// externals, hairpin triples) and the nat rules that masquerade through them.
#[test]
fn ipvs_companion_ipsets_and_masquerade_rules_are_golden() {
    let e = engine(CLUSTER);
    let got = format!(
        "# ipset restore\n{}# iptables-restore --noflush\n{}",
        ipvs::ipset_restore(e.state(), switchyard_model::IpFamily::IPv4),
        ipvs::masquerade_rules(
            &["10.244.0.0/16".parse().unwrap()],
            false,
            14,
            switchyard_model::IpFamily::IPv4
        )
    );
    golden(
        "ipvs_companion.txt",
        include_str!("golden/ipvs_companion.txt"),
        &got,
    );
}

fn cluster_without_web_endpoint_b() -> String {
    CLUSTER.replace("- {addresses: [10.244.2.5], nodeName: node-b}\n", "")
}

/// What a backend that never failed writes for `yaml`.
fn clean_dump(yaml: &str) -> String {
    let e = engine(yaml);
    let (mut d, fake) = dp();
    d.full_sync(e.state()).unwrap();
    fake.dump(V4)
}

#[test]
fn a_failed_restore_keeps_the_last_good_rules_and_a_full_sync_repairs() {
    use switchyard::dataplane::iptables::runner::FaultyRunner;
    let mut e = engine(CLUSTER);
    let fake = FakeRunner::default();
    let metrics = Arc::new(Metrics::new());
    // Restore 1 is the full sync; restore 2 (the partial sync of the change) is refused.
    let mut d = IptablesBackend::with(
        &iptables_config(&["10.244.0.0/16"]),
        false,
        Box::new(FaultyRunner::new(fake.clone(), vec![2])),
        StaleUdp::with_table(Box::new(FakeConntrack::default()), metrics),
    );
    d.full_sync(e.state()).unwrap();
    let good = fake.dump(V4);
    assert_eq!(good, clean_dump(CLUSTER));
    let objs = manifest::parse("t", &cluster_without_web_endpoint_b()).unwrap();
    e.replace_all(objs.services, objs.slices);
    let cs = e.sync();
    let err = d.apply(&cs, e.state()).unwrap_err();
    let err = switchyard::error::chain(&err);
    assert!(err.contains("injected fault"), "{err}");
    assert_eq!(fake.dump(V4), good, "a refused restore must change nothing");
    // The sync loop retries a failure as a full sync: that one lands the change.
    d.full_sync(e.state()).unwrap();
    assert_eq!(fake.dump(V4), clean_dump(&cluster_without_web_endpoint_b()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_loop_retries_a_refused_restore_until_the_rules_are_right() {
    use std::time::Duration;
    use switchyard::dataplane::iptables::runner::FaultyRunner;
    use switchyard::store::Store;
    use switchyard::sync::{SyncLoop, SyncTiming};
    let fake = FakeRunner::default();
    let metrics = Arc::new(Metrics::new());
    let d = IptablesBackend::with(
        &iptables_config(&["10.244.0.0/16"]),
        false,
        Box::new(FaultyRunner::new(fake.clone(), vec![2, 3])),
        StaleUdp::with_table(Box::new(FakeConntrack::default()), Arc::clone(&metrics)),
    );
    let store = Store::new(
        ProxyConfig {
            node_name: "node-a".into(),
            ..ProxyConfig::default()
        },
        Arc::clone(&metrics),
    );
    let load = |yaml: &str| {
        let o = manifest::parse("t", yaml).unwrap();
        store.replace_all(o.services, o.slices, o.nodes.into_iter().next());
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let sync = SyncLoop::new(
        Arc::clone(&store),
        Box::new(d),
        SyncTiming {
            min_sync_period: Duration::from_millis(10),
            sync_period: Duration::from_mins(10),
            retry: Duration::from_millis(20),
        },
    );
    let mut progress = sync.progress();
    tokio::spawn(sync.run(cancel.clone()));
    load(CLUSTER);
    let want = store.generation();
    progress.wait_for(|g| *g >= want).await.unwrap();
    assert_eq!(fake.dump(V4), clean_dump(CLUSTER));
    // The change's restore and the first retry are refused; the second retry lands.
    load(&cluster_without_web_endpoint_b());
    let expected = clean_dump(&cluster_without_web_endpoint_b());
    let t = std::time::Instant::now();
    while fake.dump(V4) != expected {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the refused change never landed:\n{}",
            fake.dump(V4)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics.encode().contains("switchyard_sync_errors_total 2"),
        "{}",
        metrics.encode()
    );
    cancel.cancel();
}

#[test]
fn a_failed_conntrack_delete_is_reported_and_retried() {
    use switchyard::conntrack::{Entry, FaultyConntrack, Tuple};
    let e = engine(CLUSTER);
    let tuple = |src: &str, sport, dst: &str, dport| Tuple {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto: 17,
        sport,
        dport,
    };
    // A client black-holed while t/empty had no endpoint (its reply comes from the VIP
    // itself), and an unrelated flow.
    let stale = Entry {
        orig: tuple("10.244.1.99", 4000, "10.96.0.12", 53),
        reply: tuple("10.96.0.12", 53, "10.244.1.99", 4000),
        zone: 0,
        id: None,
    };
    let other = Entry {
        orig: tuple("10.244.1.99", 4001, "192.0.2.53", 53),
        reply: tuple("192.0.2.53", 53, "10.244.1.99", 4001),
        zone: 0,
        id: None,
    };
    let table = FakeConntrack::default();
    table.entries.lock().unwrap().extend([stale, other]);
    let metrics = Arc::new(Metrics::new());
    let fake = FakeRunner::default();
    let mut d = IptablesBackend::with(
        &iptables_config(&["10.244.0.0/16"]),
        false,
        Box::new(fake.clone()),
        StaleUdp::with_table(
            Box::new(FaultyConntrack::new(table.clone(), vec![1])),
            Arc::clone(&metrics),
        ),
    );
    let err = d.full_sync(e.state()).unwrap_err();
    let err = switchyard::error::chain(&err);
    assert!(err.contains("conntrack"), "{err}");
    // The rules are in place; the stale flow is still there, for the retry.
    assert_eq!(fake.dump(V4), clean_dump(CLUSTER));
    assert_eq!(table.entries(), vec![stale, other]);
    d.full_sync(e.state()).unwrap();
    assert_eq!(table.entries(), vec![other]);
    assert!(
        metrics
            .encode()
            .contains("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 1")
    );
}
