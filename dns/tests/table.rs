//! Table tests: {qname, qtype} -> {rcode, answer, authority} over a fixture cluster written as
//! manifests, following the Kubernetes DNS specification 1.1.0 and CoreDNS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use switchyard_dns::resolve::{Outcome, resolve};
use switchyard_dns::{PodsMode, Snapshot, ZoneConfig};
use switchyard_model::{Engine, ProxyConfig, manifest};

const FIXTURE: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}, {port: 9999}]
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  clusterIPs: [10.96.0.11, 'fd00:96::11']
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: [10.244.1.5], hostname: db-0}
- {addresses: [10.244.1.6]}
- {addresses: [10.244.1.7], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-2, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: [10.244.1.5], hostname: db-0}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-v6, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv6
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: ['fd00::1']}
---
apiVersion: v1
kind: Service
metadata: {name: early, namespace: shop}
spec: {clusterIP: None, publishNotReadyAddresses: true, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: early-1, namespace: shop, labels: {kubernetes.io/service-name: early}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.244.2.9], conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: api.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: shop}
spec: {type: ExternalName, externalName: web.shop.svc.cluster.local}
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: other}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
";

fn snapshot(pods: PodsMode) -> Snapshot {
    let objs = manifest::parse("fixture", FIXTURE).unwrap();
    let e = Engine::with_objects(ProxyConfig::default(), objs);
    Snapshot::build(
        ZoneConfig {
            zone: "cluster.local".into(),
            ttl: 5,
            pods,
        },
        e.services().map(AsRef::as_ref),
        |s| e.slices_of(&s.key).map(AsRef::as_ref).collect(),
        42,
    )
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

/// rcode, answers and authority as `name TYPE rdata` lines (sorted), additionals separately.
fn ask(
    snap: &Snapshot,
    name: &str,
    t: RecordType,
) -> (ResponseCode, Vec<String>, Vec<String>, Vec<String>) {
    let Outcome::Answer(m) = resolve(snap, &query(name, t)) else {
        panic!("{name} {t} was forwarded");
    };
    let fmt = |rs: &[hickory_proto::rr::Record]| {
        let mut v: Vec<String> = rs
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
            .collect();
        v.sort();
        v
    };
    (
        m.metadata.response_code,
        fmt(&m.answers),
        fmt(&m.authorities),
        fmt(&m.additionals),
    )
}

const SOA: &str =
    "cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local. 42 7200 1800 86400 5";

#[test]
fn records_of_every_kind() {
    use RecordType::{A, AAAA, CNAME, PTR, SRV, TXT};
    let s = snapshot(PodsMode::Disabled);
    // (name, type, rcode, answers, authority has SOA)
    let cases: &[(&str, RecordType, ResponseCode, &[&str], bool)] = &[
        (
            "web.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["web.shop.svc.cluster.local. A 10.96.0.10"],
            false,
        ),
        // Case-insensitive, answered in the query's case.
        (
            "WEB.Shop.svc.Cluster.Local.",
            A,
            ResponseCode::NoError,
            &["WEB.Shop.svc.Cluster.Local. A 10.96.0.10"],
            false,
        ),
        (
            "dual.shop.svc.cluster.local.",
            AAAA,
            ResponseCode::NoError,
            &["dual.shop.svc.cluster.local. AAAA fd00:96::11"],
            false,
        ),
        (
            "dual.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["dual.shop.svc.cluster.local. A 10.96.0.11"],
            false,
        ),
        // NODATA: the name exists without the type.
        (
            "web.shop.svc.cluster.local.",
            AAAA,
            ResponseCode::NoError,
            &[],
            true,
        ),
        // Headless: every ready endpoint once (10.244.1.5 is in two slices; .7 is not ready).
        (
            "db.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &[
                "db.shop.svc.cluster.local. A 10.244.1.5",
                "db.shop.svc.cluster.local. A 10.244.1.6",
            ],
            false,
        ),
        (
            "db.shop.svc.cluster.local.",
            AAAA,
            ResponseCode::NoError,
            &["db.shop.svc.cluster.local. AAAA fd00::1"],
            false,
        ),
        (
            "db-0.db.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["db-0.db.shop.svc.cluster.local. A 10.244.1.5"],
            false,
        ),
        // No hostname: the dashed address, IPv4 and IPv6.
        (
            "10-244-1-6.db.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["10-244-1-6.db.shop.svc.cluster.local. A 10.244.1.6"],
            false,
        ),
        (
            "fd00--1.db.shop.svc.cluster.local.",
            AAAA,
            ResponseCode::NoError,
            &["fd00--1.db.shop.svc.cluster.local. AAAA fd00::1"],
            false,
        ),
        (
            "10-244-1-7.db.shop.svc.cluster.local.",
            A,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        // publishNotReadyAddresses counts not-ready endpoints.
        (
            "early.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["early.shop.svc.cluster.local. A 10.244.2.9"],
            false,
        ),
        // SRV for named ports only, per protocol.
        (
            "_http._tcp.web.shop.svc.cluster.local.",
            SRV,
            ResponseCode::NoError,
            &["_http._tcp.web.shop.svc.cluster.local. SRV 0 100 80 web.shop.svc.cluster.local."],
            false,
        ),
        (
            "_dns._udp.web.shop.svc.cluster.local.",
            SRV,
            ResponseCode::NoError,
            &["_dns._udp.web.shop.svc.cluster.local. SRV 0 100 53 web.shop.svc.cluster.local."],
            false,
        ),
        (
            "_dns._tcp.web.shop.svc.cluster.local.",
            SRV,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        (
            "_pg._tcp.db.shop.svc.cluster.local.",
            SRV,
            ResponseCode::NoError,
            &[
                "_pg._tcp.db.shop.svc.cluster.local. SRV 0 33 5432 10-244-1-6.db.shop.svc.cluster.local.",
                "_pg._tcp.db.shop.svc.cluster.local. SRV 0 33 5432 db-0.db.shop.svc.cluster.local.",
                "_pg._tcp.db.shop.svc.cluster.local. SRV 0 33 5432 fd00--1.db.shop.svc.cluster.local.",
            ],
            false,
        ),
        // Intermediate names exist: NODATA.
        (
            "_tcp.web.shop.svc.cluster.local.",
            SRV,
            ResponseCode::NoError,
            &[],
            true,
        ),
        (
            "shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &[],
            true,
        ),
        ("svc.cluster.local.", A, ResponseCode::NoError, &[], true),
        // ExternalName: CNAME; an in-zone target is answered after it.
        (
            "ext.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &["ext.shop.svc.cluster.local. CNAME api.example.com."],
            false,
        ),
        (
            "ext.shop.svc.cluster.local.",
            CNAME,
            ResponseCode::NoError,
            &["ext.shop.svc.cluster.local. CNAME api.example.com."],
            false,
        ),
        (
            "alias.shop.svc.cluster.local.",
            A,
            ResponseCode::NoError,
            &[
                "alias.shop.svc.cluster.local. CNAME web.shop.svc.cluster.local.",
                "web.shop.svc.cluster.local. A 10.96.0.10",
            ],
            false,
        ),
        (
            "dns-version.cluster.local.",
            TXT,
            ResponseCode::NoError,
            &["dns-version.cluster.local. TXT 1.1.0"],
            false,
        ),
        // NXDOMAIN: names that do not exist, including ndots search expansions.
        (
            "nope.shop.svc.cluster.local.",
            A,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        (
            "web.shop.svc.cluster.local.shop.svc.cluster.local.",
            A,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        (
            "nons.svc.cluster.local.",
            A,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        // Pods are disabled by default.
        (
            "10-244-1-5.shop.pod.cluster.local.",
            A,
            ResponseCode::NXDomain,
            &[],
            true,
        ),
        // PTR for ClusterIPs (two services share 10.96.0.10) and headless endpoints.
        (
            "10.0.96.10.in-addr.arpa.",
            PTR,
            ResponseCode::NoError,
            &[
                "10.0.96.10.in-addr.arpa. PTR web.shop.svc.cluster.local.",
                "10.0.96.10.in-addr.arpa. PTR web2.other.svc.cluster.local.",
            ],
            false,
        ),
        (
            "5.1.244.10.in-addr.arpa.",
            PTR,
            ResponseCode::NoError,
            &["5.1.244.10.in-addr.arpa. PTR db-0.db.shop.svc.cluster.local."],
            false,
        ),
        (
            "1.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.",
            PTR,
            ResponseCode::NoError,
            &[
                "1.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa. PTR dual.shop.svc.cluster.local.",
            ],
            false,
        ),
    ];
    for (name, t, rcode, answers, soa) in cases {
        let (rc, ans, auth, _) = ask(&s, name, *t);
        let want: Vec<String> = answers.iter().map(ToString::to_string).collect();
        assert_eq!((rc, ans), (*rcode, want), "{name} {t}");
        let want_auth: Vec<String> = if *soa { vec![SOA.to_string()] } else { vec![] };
        assert_eq!(auth, want_auth, "authority of {name} {t}");
    }
}

#[test]
fn srv_answers_carry_target_addresses() {
    let s = snapshot(PodsMode::Disabled);
    let (_, _, _, add) = ask(&s, "_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        add,
        [
            "10-244-1-6.db.shop.svc.cluster.local. A 10.244.1.6",
            "db-0.db.shop.svc.cluster.local. A 10.244.1.5",
            "fd00--1.db.shop.svc.cluster.local. AAAA fd00::1",
        ]
    );
}

#[test]
fn pods_insecure_answers_any_dashed_address() {
    let s = snapshot(PodsMode::Insecure);
    let (rc, ans, _, _) = ask(&s, "10-244-1-5.shop.pod.cluster.local.", RecordType::A);
    assert_eq!(
        (rc, ans.as_slice()),
        (
            ResponseCode::NoError,
            &["10-244-1-5.shop.pod.cluster.local. A 10.244.1.5".to_string()][..]
        )
    );
    let (rc, ans, _, _) = ask(&s, "fd00--7.shop.pod.cluster.local.", RecordType::AAAA);
    assert_eq!((rc, ans.len()), (ResponseCode::NoError, 1));
    let (rc, _, auth, _) = ask(&s, "shop.pod.cluster.local.", RecordType::A);
    assert_eq!((rc, auth.len()), (ResponseCode::NoError, 1));
    let (rc, _, _, _) = ask(&s, "not-an-ip.shop.pod.cluster.local.", RecordType::A);
    assert_eq!(rc, ResponseCode::NXDomain);
}

#[test]
fn servfail_before_the_first_sync_and_other_zones_are_forwarded() {
    let empty = Snapshot::empty(ZoneConfig::default());
    let Outcome::Answer(m) = resolve(&empty, &query("web.shop.svc.cluster.local.", RecordType::A))
    else {
        panic!("must answer");
    };
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let s = snapshot(PodsMode::Disabled);
    assert!(matches!(
        resolve(&s, &query("example.com.", RecordType::A)),
        Outcome::Forward
    ));
    // A PTR of an address the cluster does not know goes upstream too.
    assert!(matches!(
        resolve(&s, &query("1.2.0.192.in-addr.arpa.", RecordType::PTR)),
        Outcome::Forward
    ));
}

#[test]
fn apex_soa_and_ns() {
    let s = snapshot(PodsMode::Disabled);
    let (_, ans, _, _) = ask(&s, "cluster.local.", RecordType::SOA);
    assert_eq!(ans, [SOA]);
    let (_, ans, _, _) = ask(&s, "cluster.local.", RecordType::NS);
    assert_eq!(ans, ["cluster.local. NS ns.dns.cluster.local."]);
}

#[test]
fn malformed_and_non_query_messages() {
    let s = snapshot(PodsMode::Disabled);
    let mut two = query("web.shop.svc.cluster.local.", RecordType::A);
    two.queries.push(two.queries[0].clone());
    let Outcome::Answer(m) = resolve(&s, &two) else {
        panic!()
    };
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut upd = query("web.shop.svc.cluster.local.", RecordType::A);
    upd.metadata.op_code = OpCode::Update;
    let Outcome::Answer(m) = resolve(&s, &upd) else {
        panic!()
    };
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(
        switchyard_dns::fast::formerr(&[1, 2, 3]),
        None,
        "too short to answer"
    );
    let f = switchyard_dns::fast::formerr(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff])
        .unwrap();
    assert_eq!(&f[..4], &[0xab, 0xcd, 0x81, 0x81]);
}
