//! A real `switchyard run --backend none --dns-listen 127.0.0.1:PORT` queried with `dig`:
//! every record kind, TCP, a Service change answered within one sync, malformed and oversized
//! packets, and forwarding through a fake upstream (cache hits, TCP fallback on truncation).
//!
//! DNS is a consumer of the store of its own: changes of a headless service's endpoints, of
//! an endpoint's hostname and of an ExternalName target, made through the manifest source,
//! are answered within 2 s, on `--backend none` and with a dataplane that fails every sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{RData, Record};
use switchyard::config::Config;
use switchyard::dataplane::BrokenDataplane;
use switchyard::metrics::Metrics;
use switchyard::store::Store;
use switchyard::sync::{SyncLoop, SyncTiming};
use switchyard_model::ProxyConfig;
use tokio_util::sync::CancellationToken;

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (dnsutils) must be installed: cargo xtask bootstrap");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(port: u16, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut v: Vec<String> = dig(port, &a).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn status(port: u16, args: &[&str]) -> String {
    let out = dig(port, args);
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map_or_else(
            || format!("no answer: {out}"),
            |s| s.split(',').next().unwrap_or("").to_string(),
        )
}

/// A fake upstream: A 192.0.2.1 (TTL 60) for anything; for `big.example.org` a truncated UDP
/// answer and the full answer over TCP. Counts the UDP queries it gets.
fn fake_upstream() -> (u16, Arc<AtomicUsize>) {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let answer = |req: &Message, truncated: bool| -> Vec<u8> {
        let mut m = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
        m.metadata.recursion_available = true;
        m.queries.clone_from(&req.queries);
        let q = &req.queries[0];
        if truncated {
            m.metadata.truncation = true;
        } else if q.name().to_ascii().starts_with("big.") {
            for i in 0..40 {
                m.answers.push(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::TXT(TXT::new(vec![format!("{i:04}-{}", "x".repeat(60))])),
                ));
            }
        } else {
            m.answers.push(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A([192, 0, 2, 1].into())),
            ));
        }
        m.to_vec().unwrap()
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            c.fetch_add(1, Ordering::SeqCst);
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let big = req.queries[0].name().to_ascii().starts_with("big.");
            let _ = udp.send_to(&answer(&req, big), peer);
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in tcp.incoming() {
            let Ok(mut s) = s else { continue };
            let mut l = [0u8; 2];
            if s.read_exact(&mut l).is_err() {
                continue;
            }
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
            if s.read_exact(&mut buf).is_err() {
                continue;
            }
            let req = Message::from_vec(&buf).unwrap();
            let out = answer(&req, false);
            let _ = s.write_all(&u16::try_from(out.len()).unwrap().to_be_bytes());
            let _ = s.write_all(&out);
        }
    });
    (port, count)
}

fn start(manifests: &std::path::Path, upstream: u16) -> (Daemon, u16, tempfile::TempDir) {
    start_on(manifests, upstream, None)
}

/// As `start`, on `port` when given (another process may be serving it already).
fn start_on(
    manifests: &std::path::Path,
    upstream: u16,
    port: Option<u16>,
) -> (Daemon, u16, tempfile::TempDir) {
    let port = port.unwrap_or_else(free_port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!("minSyncPeriod: 100ms\nhealthzBindAddress: ''\nmetricsBindAddress: ''\ndns:\n  upstream: ['127.0.0.1:{upstream}']\n"),
    )
    .unwrap();
    let d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "run",
                "--backend",
                "none",
                "--node-name",
                "node-a",
                "--source",
            ])
            .arg(format!("manifests:{}", manifests.display()))
            .arg("--config")
            .arg(&cfg)
            .args(["--dns-listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while short(port, &["frontend.shop.svc.cluster.local"]) != ["10.96.10.10"] {
        assert!(t.elapsed() < Duration::from_secs(20), "DNS never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (d, port, dir)
}

fn examples_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn dig_answers_every_record_kind_of_the_examples() {
    let (up, _) = fake_upstream();
    let m = examples_copy();
    let (_d, p, _dir) = start(m.path(), up);
    let z = ".shop.svc.cluster.local";
    assert_eq!(short(p, &[&format!("frontend{z}")]), ["10.96.10.10"]);
    assert_eq!(short(p, &[&format!("search{z}"), "AAAA"]), ["fd00:96::40"]);
    assert_eq!(
        short(p, &[&format!("db{z}")]),
        ["10.244.1.51", "10.244.2.51"]
    );
    assert_eq!(short(p, &[&format!("db-1.db{z}")]), ["10.244.2.51"]);
    assert_eq!(
        short(p, &[&format!("_http._tcp.frontend{z}"), "SRV"]),
        [format!("0 100 80 frontend{z}.")]
    );
    assert_eq!(
        short(p, &[&format!("_postgres._tcp.db{z}"), "SRV"]),
        [
            format!("0 50 5432 db-0.db{z}."),
            format!("0 50 5432 db-1.db{z}.")
        ]
    );
    assert_eq!(short(p, &["-x", "10.96.10.20"]), [format!("cart{z}.")]);
    assert_eq!(short(p, &["-x", "10.244.1.51"]), [format!("db-0.db{z}.")]);
    // ExternalName outside the zone: the CNAME alone; the client's resolver goes on.
    assert_eq!(
        short(p, &[&format!("payments{z}")]),
        ["payments.example.com."]
    );
    assert_eq!(
        short(p, &["dns-version.cluster.local", "TXT"]),
        ["\"1.1.0\""]
    );
    assert_eq!(status(p, &[&format!("nope{z}")]), "NXDOMAIN");
    let nodata = dig(p, &[&format!("frontend{z}"), "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
    assert_eq!(status(p, &["shop.svc.cluster.local"]), "NOERROR");
    // Case-insensitive, answered in the query's case; over TCP too.
    assert!(
        dig(p, &["FrontEnd.SHOP.svc.cluster.local"])
            .contains("FrontEnd.SHOP.svc.cluster.local. 5 IN\tA\t10.96.10.10")
    );
    assert_eq!(short(p, &["+tcp", &format!("cart{z}")]), ["10.96.10.20"]);
}

#[test]
fn a_service_change_is_answered_within_one_sync() {
    let (up, _) = fake_upstream();
    let m = examples_copy();
    let (_d, p, _dir) = start(m.path(), up);
    assert_eq!(short(p, &["cart.shop.svc.cluster.local"]), ["10.96.10.20"]);
    let shop = m.path().join("shop.yaml");
    let text = std::fs::read_to_string(&shop)
        .unwrap()
        .replace("clusterIP: 10.96.10.20", "clusterIP: 10.96.10.29");
    let tmp = m.path().join(".shop.tmp");
    std::fs::write(&tmp, text).unwrap();
    let t = Instant::now();
    std::fs::rename(&tmp, &shop).unwrap();
    while short(p, &["cart.shop.svc.cluster.local"]) != ["10.96.10.29"] {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "change not answered within a sync"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("change answered after {:?}", t.elapsed());
}

#[test]
fn malformed_and_oversized_packets_do_not_hurt_other_clients() {
    let (up, _) = fake_upstream();
    let m = examples_copy();
    let (_d, p, _dir) = start(m.path(), up);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // A header claiming one question, then garbage: FORMERR with our ID.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 40]);
    s.send_to(&garbage, ("127.0.0.1", p)).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    assert!(
        n >= 12 && buf[0] == 0x12 && buf[1] == 0x34 && buf[3] & 0x0f == 1,
        "want FORMERR: {:?}",
        &buf[..n]
    );
    // Too short to be DNS, a response packet, and an oversized datagram: dropped or FORMERR.
    for pkt in [
        vec![1u8, 2, 3],
        vec![0x12, 0x34, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0u8; 4000],
    ] {
        s.send_to(&pkt, ("127.0.0.1", p)).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            assert!(
                n >= 12 && buf[3] & 0x0f == 1,
                "only FORMERR may come back: {:?}",
                &buf[..n.min(16)]
            );
        }
    }
    assert_eq!(
        short(p, &["frontend.shop.svc.cluster.local"]),
        ["10.96.10.10"],
        "others still answered"
    );
}

/// Many clients' queries queued at once (a UDP worker takes them in batches and sends the
/// batch's answers together): every client gets one answer per query, with that query's ID
/// and the answer to its own question, for cluster names, NXDOMAINs and forwarded names.
#[test]
fn a_burst_from_many_clients_gets_each_client_its_own_answers() {
    use hickory_proto::op::{OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr;
    let (up, _) = fake_upstream();
    let m = examples_copy();
    let (_d, p, _dir) = start(m.path(), up);
    let asked = [
        ("frontend.shop.svc.cluster.local.", Some("10.96.10.10")),
        ("nothing-here.shop.svc.cluster.local.", None),
        ("www.example.org.", Some("192.0.2.1")),
    ];
    let per_client = 40u16;
    let clients: Vec<UdpSocket> = (0..16)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .collect();
    // Every query first, then the answers: they queue up at the server.
    for (c, s) in (0u16..).zip(&clients) {
        for i in 0..per_client {
            let mut q = Message::new((c << 8) | i, MessageType::Query, OpCode::Query);
            q.metadata.recursion_desired = true;
            let name = asked[usize::from(i) % asked.len()].0;
            q.queries
                .push(Query::query(Name::from_str(name).unwrap(), RecordType::A));
            s.send_to(&q.to_vec().unwrap(), ("127.0.0.1", p)).unwrap();
        }
    }
    let mut buf = [0u8; 4096];
    for (c, s) in (0u16..).zip(&clients) {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..per_client {
            let (n, _) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("client {c}: {} answers, then {e}", seen.len()));
            let r = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(
                r.metadata.id >> 8,
                c,
                "client {c} got another client's answer"
            );
            let i = r.metadata.id & 0xff;
            let (name, want) = asked[usize::from(i) % asked.len()];
            assert_eq!(
                r.queries[0].name().to_string(),
                name,
                "query {i} of client {c}"
            );
            let got: Vec<String> = r
                .answers
                .iter()
                .filter_map(|a| match &a.data {
                    RData::A(a) => Some(a.to_string()),
                    _ => None,
                })
                .collect();
            match want {
                Some(addr) => assert_eq!(got, [addr], "{name} for client {c}"),
                None => assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}"),
            }
            assert!(seen.insert(i), "client {c} got query {i} answered twice");
        }
    }
}

#[test]
fn forwarding_caches_and_falls_back_to_tcp() {
    let (up, count) = fake_upstream();
    let m = examples_copy();
    let (_d, p, _dir) = start(m.path(), up);
    // The loop check's probe reaches the upstream once the resolver serves (up to 200 ms
    // after it answers): let it pass before counting.
    let t = Instant::now();
    while count.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = count.load(Ordering::SeqCst);
    assert_eq!(short(p, &["www.example.org"]), ["192.0.2.1"]);
    assert_eq!(short(p, &["www.example.org"]), ["192.0.2.1"]);
    assert_eq!(short(p, &["WWW.example.org"]), ["192.0.2.1"]);
    assert_eq!(
        count.load(Ordering::SeqCst) - before,
        1,
        "the second and third queries come from the cache"
    );
    // A truncated UDP answer from upstream is retried over TCP; the client gets it over TCP.
    let big = short(p, &["+tcp", "big.example.org", "TXT"]);
    assert_eq!(big.len(), 40, "{big:?}");
}

const SHOP: &str = ".shop.svc.cluster.local";

/// The answer section's data, sorted ("NXDOMAIN" appended for one); a failed lookup
/// (timeout, refused, SERVFAIL) is an error, not "".
fn answers(port: u16, args: &[&str]) -> Result<Vec<String>, String> {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=1", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (dnsutils) must be installed: cargo xtask bootstrap");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .ok_or_else(|| format!("no DNS answer: {text}"))?;
    if status != "NOERROR" && status != "NXDOMAIN" {
        return Err(format!("status {status}"));
    }
    let mut v: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect();
    v.sort();
    if status == "NXDOMAIN" {
        v.push("NXDOMAIN".into());
    }
    Ok(v)
}

fn manifest(db: &[(&str, &str)], payments: &str) -> String {
    let eps: String = db
        .iter()
        .map(|(ip, host)| format!("- {{addresses: [{ip}], hostname: {host}, nodeName: node-a}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  clusterIP: None\n  ports: [{{name: postgres, port: 5432}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-0\n  namespace: shop\n  labels: {{kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{{name: postgres, port: 5432}}]\nendpoints:\n{eps}---\napiVersion: v1\nkind: Service\nmetadata: {{name: payments, namespace: shop}}\nspec: {{type: ExternalName, externalName: {payments}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: 10.96.10.10, ports: [{{port: 80}}]}}\n"
    )
}

/// Write the file the way an editor does (new file, rename), so the watcher sees one change.
fn write(dir: &Path, text: &str) {
    let tmp = dir.join(".shop.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("shop.yaml")).unwrap();
}

/// Wait (at most `limit`) until `name` answers `want`; the time it took.
fn answers_within(port: u16, args: &[&str], want: &[&str], limit: Duration) -> Duration {
    let t = Instant::now();
    let mut last;
    loop {
        last = answers(port, args);
        if last.as_ref().is_ok_and(|v| v == want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{args:?}: want {want:?} within {limit:?}, still {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The scenario, against a resolver on `port` fed from manifest directory `dir`.
fn changes_are_answered_within_2s(port: u16, dir: &Path) {
    let startup = Duration::from_secs(20);
    answers_within(
        port,
        &[&format!("db{SHOP}")],
        &["10.244.1.51", "10.244.2.51"],
        startup,
    );
    let limit = Duration::from_secs(2);
    // A headless service's endpoint moves.
    write(
        dir,
        &manifest(
            &[("10.244.1.51", "db-0"), ("10.244.3.77", "db-1")],
            "payments.example.com",
        ),
    );
    let took = answers_within(
        port,
        &[&format!("db{SHOP}")],
        &["10.244.1.51", "10.244.3.77"],
        limit,
    );
    eprintln!("headless endpoint change answered after {took:?}");
    answers_within(port, &[&format!("db-1.db{SHOP}")], &["10.244.3.77"], limit);
    // An endpoint's hostname changes: the new name answers, the old one is gone.
    write(
        dir,
        &manifest(
            &[("10.244.1.51", "db-0"), ("10.244.3.77", "replica")],
            "payments.example.com",
        ),
    );
    answers_within(
        port,
        &[&format!("replica.db{SHOP}")],
        &["10.244.3.77"],
        limit,
    );
    answers_within(port, &[&format!("db-1.db{SHOP}")], &["NXDOMAIN"], limit);
    answers_within(
        port,
        &["-x", "10.244.3.77"],
        &[&format!("replica.db{SHOP}.")],
        limit,
    );
    // An ExternalName target changes.
    write(
        dir,
        &manifest(
            &[("10.244.1.51", "db-0"), ("10.244.3.77", "replica")],
            "pay.example.net",
        ),
    );
    answers_within(
        port,
        &[&format!("payments{SHOP}"), "CNAME"],
        &["pay.example.net."],
        limit,
    );
}

fn shop_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &manifest(
            &[("10.244.1.51", "db-0"), ("10.244.2.51", "db-1")],
            "payments.example.com",
        ),
    );
    dir
}

#[test]
fn backend_none_answers_headless_and_external_name_changes_within_2s() {
    let dir = shop_dir();
    let port = free_port();
    // A long syncPeriod: nothing may wait for the periodic full resync.
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        "syncPeriod: 10m\nminSyncPeriod: 1s\nhealthzBindAddress: ''\nmetricsBindAddress: ''\ndns:\n  upstream: ['127.0.0.1:9']\n",
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--backend", "none", "--node-name", "node-a"])
            .arg("--source")
            .arg(format!("manifests:{}", dir.path().display()))
            .arg("--config")
            .arg(cfg.path())
            .args(["--dns-listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    changes_are_answered_within_2s(port, dir.path());
}

#[test]
fn a_dataplane_failing_every_sync_does_not_hold_dns_back() {
    let dir = shop_dir();
    let port = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let settings = Config::parse("syncPeriod: 10m\ndns:\n  upstream: ['127.0.0.1:9']\n")
        .unwrap()
        .validate()
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::new(ProxyConfig::default(), Arc::clone(&metrics));
    let cancel = CancellationToken::new();
    let listen: Vec<SocketAddr> = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    rt.block_on(async {
        let (handler, follower) =
            switchyard::dns::build(&settings.dns, None, &listen, &store, &metrics);
        tokio::spawn(follower.run(cancel.clone()));
        let c = cancel.clone();
        tokio::spawn(async move { switchyard_dns::serve(handler, &listen, c).await });
        let sync = SyncLoop::new(
            Arc::clone(&store),
            Box::new(BrokenDataplane),
            SyncTiming {
                min_sync_period: Duration::from_millis(100),
                sync_period: Duration::from_mins(10),
                retry: Duration::from_millis(100),
            },
        );
        tokio::spawn(sync.run(cancel.clone()));
        tokio::spawn(switchyard::source::manifests::run(
            dir.path().to_path_buf(),
            None,
            Arc::clone(&store),
            cancel.clone(),
        ));
    });
    changes_are_answered_within_2s(port, dir.path());
    // The dataplane really was failing all along.
    let m = metrics.encode();
    let errors: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_sync_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 2.0, "the broken dataplane never failed: {m}");
    cancel.cancel();
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// `service:kube-system/kube-dns` as the upstream: the Service's ready endpoints, over TCP
/// (as NodeLocal DNSCache reaches the cluster's CoreDNS), followed as the endpoints change.
#[test]
fn a_service_upstream_is_reached_over_tcp_at_its_endpoints() {
    let (up, udp_count) = fake_upstream();
    let m = examples_copy();
    std::fs::write(
        m.path().join("kube-dns.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: dns, port: 53, protocol: UDP}}\n  - {{name: dns-tcp, port: 53, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}\naddressType: IPv4\nports:\n- {{name: dns, port: {up}, protocol: UDP}}\n- {{name: dns-tcp, port: {up}, protocol: TCP}}\nendpoints:\n- addresses: [127.0.0.1]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "minSyncPeriod: 100ms\nhealthzBindAddress: ''\nmetricsBindAddress: ''\ndns:\n  upstream: ['service:kube-system/kube-dns']\n",
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "run",
                "--backend",
                "none",
                "--node-name",
                "node-a",
                "--source",
            ])
            .arg(format!("manifests:{}", m.path().display()))
            .arg("--config")
            .arg(&cfg)
            .args(["--dns-listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while short(port, &["www.example.org"]) != ["192.0.2.1"] {
        assert!(t.elapsed() < Duration::from_secs(20), "never forwarded");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Over TCP: the upstream saw no UDP query (its loop probe included).
    assert_eq!(udp_count.load(Ordering::SeqCst), 0);
}

/// An upgrade as an operator runs it: the new process starts beside the old one (both bind
/// with SO_REUSEPORT), the old one stops; a client asking all along gets every answer.
#[test]
fn a_new_process_takes_over_dns_without_a_gap() {
    let (up, _) = fake_upstream();
    let m = examples_copy();
    let (old, port, _dir) = start_on(m.path(), up, None);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (asked, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, asked, failed) = (Arc::clone(&stop), Arc::clone(&asked), Arc::clone(&failed));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                asked.fetch_add(1, Ordering::SeqCst);
                if short(port, &["frontend.shop.svc.cluster.local"]) != ["10.96.10.10"] {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The new one binds beside the old one and answers.
    let (new, _, _dir2) = start_on(m.path(), up, Some(port));
    std::thread::sleep(Duration::from_millis(300));
    // The old one stops as Kubernetes stops a pod.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(old.0.id()).unwrap());
    let before = asked.load(Ordering::SeqCst);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut old = old;
    let _ = old.0.wait();
    // Queries on both sides of the handover, however slow `dig` is on a loaded machine.
    let after = Instant::now();
    while asked.load(Ordering::SeqCst) < before + 5 && after.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    drop(new);
    let (asked, failed) = (asked.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(before >= 5 && asked >= before + 5, "{before} then {asked}");
    assert_eq!(
        failed, 0,
        "{failed} of {asked} queries failed across the handover"
    );
}
