//! The eBPF dataplane with real packets: a node namespace running `switchyard run --backend
//! ebpf`, an outside client, and backend namespaces with real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{
    BackendSpec, Sandbox, daemonset_capabilities, in_netns, require_root,
};

fn backends() -> Vec<BackendSpec> {
    vec![
        BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
        BackendSpec::new("a2", Ipv4Addr::new(10, 244, 1, 12)),
        BackendSpec::new("b1", Ipv4Addr::new(10, 244, 2, 11)),
    ]
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

/// Every scenario service: HTTP on 80 -> 8080 and UDP on 53 -> 9125, plus `extra` spec.
fn service(name: &str, ip: &str, extra: &str) -> String {
    let ports = [
        Port::tcp("http", 80).to(8080),
        Port::udp("udp", 53).to(9125),
    ];
    fixtures::service("t", name, ip, &ports) + extra
}

fn slice(svc: &str, eps: &[(&str, &str)]) -> String {
    let eps: Vec<(&str, Option<&str>)> = eps.iter().map(|(ip, n)| (*ip, Some(*n))).collect();
    let ports = [Port::tcp("http", 8080), Port::udp("udp", 9125)];
    fixtures::slice("t", svc, &format!("{svc}-1"), &ports, &eps)
}

const ALL3: [(&str, &str); 3] = [
    ("10.244.1.11", "node-a"),
    ("10.244.1.12", "node-a"),
    ("10.244.2.11", "node-b"),
];

/// A backend the scenario suite runs against.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    name: &'static str,
    /// Short tag for namespace names.
    tag: &'static str,
    extra: &'static str,
}

pub const EBPF: Backend = Backend {
    name: "ebpf",
    tag: "e",
    extra: "",
};
/// The eBPF backend with its tc program attached as a netlink `cls_bpf` filter, as on
/// kernels before 6.6 (no TCX).
pub const EBPF_NETLINK: Backend = Backend {
    name: "ebpf",
    tag: "c",
    extra: "tcAttachMode: netlink\n",
};
/// kube-proxy's IPVS mode (its companion rules through the flavor `auto` picks).
pub const IPVS: Backend = Backend {
    name: "ipvs",
    tag: "v",
    extra: "",
};
pub const IPTABLES_LEGACY: Backend = Backend {
    name: "iptables",
    tag: "l",
    extra: "iptablesMode: legacy\n",
};
pub const IPTABLES_NFT: Backend = Backend {
    name: "iptables",
    tag: "n",
    extra: "iptablesMode: nft\n",
};

struct Cluster {
    sb: Sandbox,
    dir: std::path::PathBuf,
    backend: Backend,
}

impl Cluster {
    fn start(b: &Backend, scenario: u8, manifests: &str) -> Cluster {
        Cluster::start_with(b, scenario, manifests, &|c| c)
    }

    /// With the DaemonSet's capabilities changed by `caps` (eBPF and iptables).
    fn start_with(
        b: &Backend,
        scenario: u8,
        manifests: &str,
        caps: &dyn Fn(String) -> String,
    ) -> Cluster {
        require_root();
        let mut sb = Sandbox::create(&format!("sy{}{scenario}", b.tag), &backends()).unwrap();
        // Exactly the DaemonSet's capabilities for eBPF and iptables.
        if b.name != "ipvs" {
            sb.capabilities = Some(caps(daemonset_capabilities()));
        }
        let dir = sb.dir.path().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            sb,
            dir,
            backend: *b,
        };
        c.write(manifests);
        c.sb.start_daemon(&c.dir.clone(), b.name, b.extra).unwrap();
        c
    }

    fn write(&mut self, manifests: &str) {
        self.write_with_node(NODE, manifests);
    }

    /// IPVS mode's kernel state, for failure messages.
    fn ipvs_state(&self) -> String {
        [
            &["ipvsadm", "-Ln"][..],
            &["ip", "addr", "show", "dev", "sy-ipvs0"],
            &["iptables-nft", "-t", "nat", "-L", "-v", "-n", "-x"],
            &["ipset", "list", "SY-EXTERNAL-LOCAL"],
            &["conntrack", "-L", "-p", "tcp", "--dport", "30080"],
            &["sysctl", "net.ipv4.vs.conntrack"],
        ]
        .iter()
        .map(|c| self.sb.in_node(c).unwrap_or_else(|e| e.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
    }

    fn write_with_node(&mut self, node: &str, manifests: &str) {
        let tmp = self.dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, format!("{node}{manifests}")).unwrap();
        std::fs::rename(&tmp, self.dir.join("cluster.yaml")).unwrap();
    }

    /// Repeat a probe until `ok` says the answers are as expected (the daemon programs
    /// asynchronously), failing with the daemon's log after `within`.
    fn until(
        &mut self,
        what: &str,
        within: Duration,
        mut probe: impl FnMut(&Sandbox) -> Vec<String>,
        ok: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let start = Instant::now();
        loop {
            let got = probe(&self.sb);
            if ok(&got) {
                return got;
            }
            assert!(
                self.sb.daemon_running(),
                "{what}: daemon exited:\n{}",
                self.sb.daemon_log()
            );
            if start.elapsed() >= within {
                let rules = if self.backend.name == "ipvs" {
                    self.ipvs_state()
                } else if self.backend.name == "iptables" {
                    let save = if self.backend.extra.contains("legacy") {
                        "iptables-legacy-save"
                    } else {
                        "iptables-nft-save"
                    };
                    let _ = save;
                    self.sb
                        .in_node(&[
                            if self.backend.extra.contains("legacy") {
                                "iptables-legacy"
                            } else {
                                "iptables-nft"
                            },
                            "-t",
                            "nat",
                            "-L",
                            "-v",
                            "-n",
                        ])
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                panic!(
                    "{what}: last answers {got:?}\ndaemon log:\n{}\n{rules}",
                    self.sb.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn names(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        let key = l.strip_prefix("ok ").map_or_else(
            || l.clone(),
            |r| r.split_whitespace().next().unwrap_or("").to_string(),
        );
        *m.entry(key).or_default() += 1;
    }
    m
}

/// Whether a backend saw a node address (masquerade): eBPF SNATs to the node's address;
/// iptables' (and IPVS mode's) MASQUERADE takes the egress interface's (the pod veth's
/// 169.254.1.1 here).
fn node_addr(b: &Backend, line: &str) -> bool {
    line.ends_with(" 172.30.0.10") || (b.name != "ebpf" && line.ends_with(" 169.254.1.1"))
}

fn all_ok(lines: &[String]) -> bool {
    !lines.is_empty() && lines.iter().all(|l| l.starts_with("ok "))
}

fn cluster_ip_tcp_and_udp(b: &Backend) {
    let mut c = Cluster::start(
        b,
        1,
        &format!(
            "{}{}",
            service("web", "10.96.0.10", ""),
            slice("web", &ALL3)
        ),
    );
    let got = c.until(
        "ClusterIP TCP",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.10:80", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    let spread = names(&got);
    assert!(
        spread.len() >= 2,
        "30 connections should reach more than one backend: {spread:?}"
    );
    let got = c.until(
        "ClusterIP UDP",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_cgroup(&["--udp", "10.96.0.10:53", "--count", "10"])
                .unwrap()
        },
        all_ok,
    );
    assert!(
        names(&got)
            .keys()
            .all(|k| ["a1", "a2", "b1"].contains(&k.as_str())),
        "{got:?}"
    );
}

const NODEPORT_EXTRA: &str = "  type: NodePort\n";

fn nodeport_service(name: &str, ip: &str, np: u16, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {np}}}\n  - {{name: udp, port: 53, targetPort: 9125, protocol: UDP, nodePort: {}}}\n{extra}",
        np + 1
    )
}

fn node_port_from_outside_is_masqueraded_and_etp_local_keeps_the_client(b: &Backend) {
    let _ = NODEPORT_EXTRA;
    let manifests = format!(
        "{}{}{}{}",
        nodeport_service("np", "10.96.0.20", 30080, ""),
        slice("np", &ALL3),
        nodeport_service(
            "local",
            "10.96.0.21",
            30090,
            "  externalTrafficPolicy: Local\n"
        ),
        slice("local", &ALL3),
    );
    let mut c = Cluster::start(b, 2, &manifests);
    // eTP=Cluster: every backend, and the backend sees the node's address (masquerade).
    let got = c.until(
        "NodePort TCP",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30080", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    assert!(
        got.iter().all(|l| node_addr(b, l)),
        "masqueraded to the node: {got:?}\n{}",
        if b.name == "ipvs" {
            c.ipvs_state()
        } else {
            String::new()
        }
    );
    assert!(names(&got).len() >= 2, "{got:?}");
    let got = c.until(
        "NodePort UDP",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--udp", "172.30.0.10:30081", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    assert!(got.iter().all(|l| node_addr(b, l)), "{got:?}");

    // eTP=Local: only this node's backends (a1, a2), and they see the real client address.
    let got = c.until(
        "eTP=Local",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30090", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    let spread = names(&got);
    assert!(
        spread.keys().all(|k| k == "a1" || k == "a2"),
        "only local backends: {spread:?}"
    );
    assert!(
        got.iter().all(|l| l.ends_with(" 172.30.0.2")),
        "client address kept: {got:?}"
    );
    // Pods and sockets on the node still reach every endpoint through the NodePort.
    let got = c.until(
        "eTP=Local from the node",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "172.30.0.10:30090", "--count", "40"])
                .unwrap()
        },
        all_ok,
    );
    if b.name == "ipvs" {
        // One virtual service per NodePort cannot tell the node's own clients from outside
        // ones: eTP=Local keeps them on local endpoints too, as kube-proxy's IPVS mode does
        // (README).
        assert!(
            names(&got).keys().all(|k| k == "a1" || k == "a2"),
            "ipvs: eTP=Local NodePort from the node uses local endpoints: {got:?}"
        );
        eprintln!(
            "ipvs: eTP=Local NodePort from the node reaches local endpoints only (IPVS limitation, as kube-proxy)"
        );
    } else {
        assert!(
            names(&got).contains_key("b1"),
            "node-local clients use all endpoints: {got:?}"
        );
    }

    // The node's own connection whose source port is a NodePort number: its replies carry
    // that port as destination on a node address, and must not be taken for NodePort
    // traffic.
    let got =
        c.sb.probe_from_cgroup(&["--tcp", "10.244.2.11:8080", "--bind", "172.30.0.10:30080"])
            .unwrap();
    if b.name == "ipvs" {
        // IPVS schedules on SYN-ACKs too (for active FTP), so the reply is taken for a new
        // NodePort connection: this cannot hold in IPVS mode, kube-proxy's included (README).
        assert!(
            !all_ok(&got),
            "ipvs: a reply to a NodePort-numbered source port is taken by IPVS: {got:?}"
        );
        eprintln!(
            "ipvs: node connection from a NodePort-numbered source port NOT SERVED (IPVS schedules SYN-ACKs)"
        );
    } else {
        assert!(
            all_ok(&got) && names(&got).contains_key("b1"),
            "node connection from source port 30080: {got:?}"
        );
    }
    if b.name == "ebpf" {
        // And ephemeral ports stay out of the NodePort range altogether.
        let reserved =
            c.sb.in_node(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
                .unwrap();
        assert!(reserved.contains("30000-32767"), "{reserved:?}");
    }
}

fn no_endpoints_refuses_fast_and_removed_backend_stops_receiving(b: &Backend) {
    let manifests = format!(
        "{}{}{}",
        nodeport_service("empty", "10.96.0.30", 30100, ""),
        service("web", "10.96.0.31", ""),
        slice("web", &ALL3),
    );
    let mut c = Cluster::start(b, 3, &manifests);
    c.until(
        "web up",
        Duration::from_secs(20),
        |sb| sb.probe_from_cgroup(&["--tcp", "10.96.0.31:80"]).unwrap(),
        all_ok,
    );
    // No endpoints: refused at once, from the node (socket LB) and from outside (ICMP).
    let t = Instant::now();
    let got =
        c.sb.probe_from_cgroup(&["--tcp", "10.96.0.30:80", "--timeout-ms", "3000"])
            .unwrap();
    assert_eq!(got, ["err refused"], "socket LB");
    let got =
        c.sb.probe_from_client(&["--tcp", "172.30.0.10:30100", "--timeout-ms", "3000"])
            .unwrap();
    assert_eq!(got, ["err refused"], "tc path");
    let got =
        c.sb.probe_from_client(&["--udp", "172.30.0.10:30101", "--timeout-ms", "3000"])
            .unwrap();
    assert_eq!(got, ["err refused"], "tc path UDP");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusals must be fast, took {:?}",
        t.elapsed()
    );

    // Remove b1 from the EndpointSlice: new connections stop reaching it.
    let manifests = format!(
        "{}{}{}",
        nodeport_service("empty", "10.96.0.30", 30100, ""),
        service("web", "10.96.0.31", ""),
        slice("web", &ALL3[..2]),
    );
    c.write(&manifests);
    c.until(
        "b1 removed",
        Duration::from_secs(5),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.31:80", "--count", "30"])
                .unwrap()
        },
        |l| all_ok(l) && !names(l).contains_key("b1"),
    );
}

fn session_affinity_sticks_then_spreads_and_expires(b: &Backend) {
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n";
    let mut c = Cluster::start(
        b,
        4,
        &format!(
            "{}{}",
            nodeport_service("sticky", "10.96.0.40", 30110, affinity),
            slice("sticky", &ALL3)
        ),
    );
    // 16 requests from one client all reach one backend, on both paths.
    let got = c.until(
        "affinity socket LB",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.40:80", "--count", "16"])
                .unwrap()
        },
        all_ok,
    );
    assert_eq!(names(&got).len(), 1, "one backend for one client: {got:?}");
    let got = c.until(
        "affinity tc",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30110", "--count", "16"])
                .unwrap()
        },
        all_ok,
    );
    assert_eq!(names(&got).len(), 1, "one backend for one client: {got:?}");
    let first = names(&got).keys().next().unwrap().clone();

    // After the idle timeout a fresh choice is made: within a few rounds another backend
    // answers (each round picks one of three at random). IPVS keeps a persistence template
    // while any connection it placed still exists, TIME_WAIT ones included (120 s, which
    // IPVS's settable timeouts do not cover): there affinity ends timeoutSeconds after the
    // client's last connection is gone, as in kube-proxy's IPVS mode (README). That expiry
    // is beyond this test's time; the rest of the scenario holds.
    let ipvs = b.name == "ipvs";
    let mut seen_other = ipvs;
    if ipvs {
        eprintln!(
            "ipvs: affinity expiry NOT CHECKED: IPVS templates outlive TIME_WAIT connections (120 s)"
        );
    }
    for _ in 0..if ipvs { 0 } else { 12 } {
        std::thread::sleep(Duration::from_millis(2300));
        let got =
            c.sb.probe_from_client(&["--tcp", "172.30.0.10:30110"])
                .unwrap();
        if names(&got).keys().any(|k| *k != first) {
            seen_other = true;
            break;
        }
    }
    assert!(seen_other, "affinity never expired after timeoutSeconds");

    // Affinity off: the same client spreads again.
    c.write(&format!(
        "{}{}",
        nodeport_service("sticky", "10.96.0.40", 30110, ""),
        slice("sticky", &ALL3)
    ));
    c.until(
        "affinity off",
        Duration::from_secs(5),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.40:80", "--count", "24"])
                .unwrap()
        },
        |l| all_ok(l) && names(l).len() >= 2,
    );
}

/// A `sy-probe --hold` client: one TCP connection or connected UDP socket kept open, one
/// request per `ask`; killed when dropped.
struct Held {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Held {
    fn start(args: &[&str]) -> Held {
        use std::io::BufRead;
        let mut child = std::process::Command::new(switchyard_tests::sandbox::bin("sy-probe"))
            .args(args)
            .arg("--hold")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("connected"), "{line}");
        Held { child, stdin, out }
    }

    fn ask(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "go").unwrap();
        self.stdin.flush().unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backend name of a probe answer (`ok NAME CLIENT`).
fn name_of(answer: &str) -> Option<String> {
    answer
        .starts_with("ok ")
        .then(|| names(&[answer.to_string()]).into_keys().next())
        .flatten()
}

/// `ALL3` without the endpoint of backend `name`.
fn all3_but(name: &str) -> Vec<(&'static str, &'static str)> {
    let ip = match name {
        "a1" => "10.244.1.11",
        "a2" => "10.244.1.12",
        _ => "10.244.2.11",
    };
    ALL3.iter().copied().filter(|(a, _)| *a != ip).collect()
}

fn restart_keeps_open_connections_and_cleanup_leaves_nothing(b: &Backend) {
    let mut c = Cluster::start(
        b,
        5,
        &format!(
            "{}{}",
            nodeport_service("web", "10.96.0.50", 30120, ""),
            slice("web", &ALL3)
        ),
    );
    c.until(
        "up",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30120"])
                .unwrap()
        },
        all_ok,
    );

    // One TCP connection through the tc path, held open across a daemon restart.
    let mut held = Held::start(&["--netns", &c.sb.client_ns(), "--tcp", "172.30.0.10:30120"]);
    let before = held.ask();
    assert!(before.starts_with("ok "), "{before}");

    c.sb.stop_daemon();
    if c.backend.name == "ebpf" {
        assert!(
            c.sb.pin_dir.join("SY_CT4").exists(),
            "maps stay pinned while the daemon is down"
        );
    }
    let during = held.ask();
    assert_eq!(
        during, before,
        "the connection keeps working while the daemon is down"
    );
    let dir = c.dir.clone();
    c.sb.start_daemon(&dir, c.backend.name, c.backend.extra)
        .unwrap();
    c.until(
        "restarted",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30120"])
                .unwrap()
        },
        all_ok,
    );
    let t = Instant::now();
    while c.backend.name == "ebpf" && !c.sb.daemon_log().contains("re-adopted") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "restart must adopt the pinned state:\n{}",
            c.sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = held.ask();
    assert_eq!(
        after, before,
        "same connection, same backend after the restart"
    );
    drop(held);

    // The eBPF backend's start-up cleanup of other backends' rules creates no tables: in a
    // namespace that had none, every packet would otherwise walk empty raw/filter chains.
    if c.backend.name == "ebpf" {
        for names in ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"] {
            // No file: the kernel has not loaded ip_tables (6.1 here), so no table exists.
            let tables =
                c.sb.in_node(&["sh", "-c", &format!("test ! -e {names} || cat {names}")])
                    .unwrap();
            assert!(
                tables.trim().is_empty(),
                "{names} after two starts of the eBPF backend: {tables:?}"
            );
        }
        let nft = c.sb.in_node(&["nft", "list", "tables"]).unwrap();
        assert!(
            nft.trim().is_empty(),
            "nftables tables after two starts of the eBPF backend:\n{nft}"
        );
    }

    // cleanup: no pins, no tc links, no cgroup programs.
    let tc_progs = tc_prog_ids(&c.sb);
    assert_eq!(
        tc_progs.is_empty(),
        c.backend.name != "ebpf",
        "tc links pinned: {tc_progs:?}"
    );
    let cgroup_progs = cgroup_prog_ids(&c.sb);
    assert_eq!(
        cgroup_progs.len(),
        if c.backend.name == "ebpf" { 8 } else { 0 },
        "socket-LB programs on the sandbox cgroup: {cgroup_progs:?}"
    );
    c.sb.stop_daemon();
    let cfg = c.sb.dir.path().join("config.yaml");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", c.sb.node_ns()))
        .arg(switchyard_tests::sandbox::bin("switchyard"))
        .args(["cleanup", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.sb.pin_dir.exists(), "pin directory left behind");
    let reserved =
        c.sb.in_node(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .unwrap();
    assert!(
        !reserved.contains("30000-32767"),
        "cleanup must release the NodePort range it reserved: {reserved:?}"
    );
    for flavor in [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ] {
        let rules = c.sb.in_node(&[flavor]).unwrap_or_default();
        assert!(
            !rules.contains("SY-"),
            "{flavor} still shows our chains:\n{rules}"
        );
    }
    for id in &tc_progs {
        assert!(!prog_alive(id), "tc program {id} left attached");
    }
    if c.backend.name == "ipvs" {
        let services = c.sb.in_node(&["ipvsadm", "-Ln"]).unwrap();
        assert!(
            !services
                .lines()
                .any(|l| l.starts_with("TCP") || l.starts_with("UDP")),
            "virtual services left behind:\n{services}"
        );
        assert!(
            c.sb.in_node(&["ip", "link", "show", "sy-ipvs0"]).is_err(),
            "the dummy link is left behind"
        );
        let sets = c.sb.in_node(&["ipset", "list", "-n"]).unwrap();
        assert!(
            !sets.lines().any(|l| l.starts_with("SY")),
            "ipsets left behind:\n{sets}"
        );
    }
    let cg = switchyard_tests::sandbox::sh(&[
        "bpftool",
        "cgroup",
        "show",
        &c.sb.cgroup.to_string_lossy(),
    ])
    .unwrap();
    assert!(!cg.contains("sy_"), "cgroup programs left attached:\n{cg}");
    for id in &cgroup_progs {
        assert!(!prog_alive(id), "socket-LB program {id} still loaded");
    }
}

/// The ids of the programs attached to the sandbox's cgroup (`bpftool cgroup show`).
fn cgroup_prog_ids(sb: &Sandbox) -> Vec<String> {
    let out =
        switchyard_tests::sandbox::sh(&["bpftool", "cgroup", "show", &sb.cgroup.to_string_lossy()])
            .unwrap();
    out.lines()
        .filter(|l| l.contains("sy_"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// A full sync puts back a tc program that someone detached from an interface: NodePort
/// traffic from outside stops while it is detached and flows again after the next full sync.
/// `/healthz` says nothing wrong throughout (the program is back before the health timeout).
fn a_full_sync_reattaches_a_detached_tc_program(b: &Backend) {
    let manifests = format!(
        "{}{}",
        nodeport_service("web", "10.96.0.96", 30181, ""),
        slice("web", &ALL3)
    );
    let mut c = Cluster::start(b, 13, &manifests);
    // A syncPeriod short enough to keep this test quick, long enough that the detach is seen
    // before the repair (also under software emulation in the VM).
    c.sb.stop_daemon();
    let dir = c.dir.clone();
    c.sb.start_daemon(&dir, b.name, &format!("{}syncPeriod: 8s\n", b.extra))
        .unwrap();
    let ask = |sb: &Sandbox| {
        sb.probe_from_client(&[
            "--tcp",
            "172.30.0.10:30181",
            "--count",
            "3",
            "--timeout-ms",
            "300",
        ])
        .unwrap()
    };
    // A restarted daemon under software emulation on a busy machine took 11 s to start
    // (removing the other backends' rules runs the iptables tools several times).
    c.until("NodePort up", Duration::from_mins(1), ask, all_ok);
    let before = tc_prog_ids(&c.sb);
    assert!(!before.is_empty(), "no tc program attached");
    if tc_mode(b) == "netlink" {
        assert!(
            c.sb.pin_dir
                .join("links")
                .read_dir()
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("tc-")),
            "netlink mode pins no TCX links"
        );
        // Delete the filter by hand, as `tc filter del` (or another agent) would.
        for dev in node_links(&c.sb) {
            let _ =
                c.sb.in_node(&["tc", "filter", "del", "dev", &dev, "ingress"]);
        }
    } else {
        // Detach by hand, as an operator's `bpftool link detach` (or another agent) would.
        for e in std::fs::read_dir(c.sb.pin_dir.join("links"))
            .unwrap()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("tc-") {
                switchyard_tests::sandbox::sh(&[
                    "bpftool",
                    "link",
                    "detach",
                    "pinned",
                    &e.path().to_string_lossy(),
                ])
                .unwrap();
            }
        }
    }
    // While detached, NodePort traffic from outside is not translated.
    let detached = ask(&c.sb);
    assert!(
        detached.iter().all(|l| !l.starts_with("ok ")),
        "traffic still translated after the detach: {detached:?}"
    );
    c.until(
        "NodePort after re-attach",
        Duration::from_secs(25),
        ask,
        all_ok,
    );
    assert!(
        c.sb.daemon_log().contains("re-attaching"),
        "the daemon must say it re-attached:\n{}",
        c.sb.daemon_log()
    );
}

#[test]
fn a_full_sync_reattaches_a_detached_tc_program_tcx() {
    if !kernel_has_tcx() {
        tcx_is_refused_with_the_reason();
        return;
    }
    a_full_sync_reattaches_a_detached_tc_program(&EBPF);
}

/// Whether this kernel has TCX (6.6+): `auto` attaches through it.
fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6)
}

/// The attach mode `b` gets on this kernel.
fn tc_mode(b: &Backend) -> &'static str {
    if b.extra.contains("netlink") || !kernel_has_tcx() {
        "netlink"
    } else {
        "tcx"
    }
}

/// On a kernel without TCX, `tcAttachMode: tcx` cannot hold: start-up fails naming the
/// kernel and the way out, instead of leaving interfaces without the program.
fn tcx_is_refused_with_the_reason() {
    let manifests = format!(
        "{}{}",
        nodeport_service("web", "10.96.0.99", 30184, ""),
        slice("web", &ALL3)
    );
    require_root();
    let mut sb = Sandbox::create("sytx", &backends()).unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cluster.yaml"), format!("{NODE}{manifests}")).unwrap();
    let _ = sb.start_daemon(&dir, "ebpf", "tcAttachMode: tcx\n");
    let t = Instant::now();
    while sb.daemon_running() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = sb.daemon_log();
    assert!(
        !sb.daemon_running() && log.contains("tcx needs Linux 6.6") && log.contains("netlink"),
        "tcAttachMode: tcx on a kernel without TCX must fail start-up with the reason:\n{log}"
    );
    eprintln!("tcx attach NOT RUN on this kernel: start-up refuses it as it should");
}

#[test]
fn a_full_sync_reattaches_a_detached_tc_program_netlink() {
    a_full_sync_reattaches_a_detached_tc_program(&EBPF_NETLINK);
}

/// Switching the attach mode across a restart (a node rebooted from a 6.1 kernel into 6.12,
/// or the setting changed): the other mode's attachment goes, so the program never runs twice,
/// and traffic flows through the new one.
#[test]
fn switching_tc_attach_mode_across_a_restart_leaves_one_attachment() {
    let manifests = format!(
        "{}{}",
        nodeport_service("web", "10.96.0.97", 30182, ""),
        slice("web", &ALL3)
    );
    if !kernel_has_tcx() {
        tcx_is_refused_with_the_reason();
        return;
    }
    let mut c = Cluster::start(&EBPF, 14, &manifests);
    let dir = c.dir.clone();
    let pinned = |sb: &Sandbox| {
        std::fs::read_dir(sb.pin_dir.join("links")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
                .count()
        })
    };
    let filters = |sb: &Sandbox| {
        node_links(sb)
            .iter()
            .map(|dev| {
                sb.in_node(&["tc", "filter", "show", "dev", dev, "ingress"])
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("sy_tc_ingress"))
                    .count()
            })
            .sum::<usize>()
    };
    let ask = |sb: &Sandbox| {
        sb.probe_from_client(&["--tcp", "172.30.0.10:30182", "--count", "3"])
            .unwrap()
    };
    for (b, what) in [
        (EBPF, "tcx"),
        (EBPF_NETLINK, "netlink after tcx"),
        (EBPF, "tcx after netlink"),
    ] {
        if what != "tcx" {
            c.sb.stop_daemon();
            c.backend = b;
            c.sb.start_daemon(&dir, b.name, b.extra).unwrap();
        }
        let mode = if b.extra.contains("netlink") {
            "netlink"
        } else {
            "tcx"
        };
        let t = Instant::now();
        while !c.sb.daemon_log().contains("tc program attached") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: not attached:\n{}",
                c.sb.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.until(what, Duration::from_secs(20), ask, all_ok);
        // Every interface is switched within the first sync.
        let t = Instant::now();
        loop {
            let (p, f) = (pinned(&c.sb), filters(&c.sb));
            let done = if mode == "netlink" {
                p == 0 && f > 0
            } else {
                p > 0 && f == 0
            };
            if done {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: {p} pinned TCX links, {f} netlink filters\n{}",
                c.sb.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An interface that refuses the tc program (here: an `ingress` qdisc where clsact belongs)
/// makes `/healthz` unhealthy at once, naming the interface, and the attach is retried until
/// it works.
#[test]
fn an_interface_refusing_the_tc_program_is_unhealthy_until_it_attaches() {
    let manifests = format!(
        "{}{}",
        nodeport_service("web", "10.96.0.98", 30183, ""),
        slice("web", &ALL3)
    );
    let mut c = Cluster::start(&EBPF_NETLINK, 15, &manifests);
    c.sb.stop_daemon();
    let dir = c.dir.clone();
    c.sb.start_daemon(
        &dir,
        EBPF_NETLINK.name,
        &format!(
            "{}syncPeriod: 3s\nhealthzBindAddress: 127.0.0.1:10256\n",
            EBPF_NETLINK.extra
        ),
    )
    .unwrap();
    let ask = |sb: &Sandbox| {
        sb.probe_from_client(&["--tcp", "172.30.0.10:30183", "--count", "3"])
            .unwrap()
    };
    c.until("NodePort up", Duration::from_secs(20), ask, all_ok);
    let ns = c.sb.node_ns();
    let healthz = || {
        switchyard_tests::sandbox::http_get_in(&ns, "127.0.0.1:10256".parse().unwrap(), "/healthz")
    };
    let t = Instant::now();
    while !healthz().contains(" 200") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "healthy at first: {}",
            healthz()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new interface where another filter kind holds our priority (another agent): the
    // daemon is paused meanwhile so that it meets the interface only with that filter.
    c.sb.signal_daemon(nix::sys::signal::Signal::SIGSTOP);
    let made = c.sb.in_node(&[
        "sh",
        "-c",
        "ip link add syrefuse0 type veth peer name syrefuse1 && tc qdisc add dev syrefuse0 clsact && tc filter add dev syrefuse0 ingress pref 21337 protocol all u32 match u32 0 0 classid 1:1",
    ]);
    c.sb.signal_daemon(nix::sys::signal::Signal::SIGCONT);
    made.unwrap();
    let t = Instant::now();
    let mut h = healthz();
    while !(h.contains(" 503") && h.contains("syrefuse0")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "healthz must turn 503 naming the interface: {h}\n{}",
            c.sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
        h = healthz();
    }
    // Traffic through the other interfaces goes on meanwhile.
    c.until(
        "NodePort while one link refuses",
        Duration::from_secs(5),
        ask,
        all_ok,
    );
    // Once the interface accepts, the retry attaches and health returns.
    c.sb.in_node(&[
        "tc",
        "filter",
        "del",
        "dev",
        "syrefuse0",
        "ingress",
        "pref",
        "21337",
    ])
    .unwrap();
    let t = Instant::now();
    loop {
        let h = healthz();
        if h.contains(" 200") && !h.contains("problems") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "healthz must recover once the interface attaches: {h}\n{}",
            c.sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let f =
        c.sb.in_node(&["tc", "filter", "show", "dev", "syrefuse0", "ingress"])
            .unwrap();
    assert!(f.contains("sy_tc_ingress"), "{f}");
    let _ = c.sb.in_node(&["ip", "link", "del", "syrefuse0"]);
}

/// The node namespace's interfaces but loopback.
fn node_links(sb: &Sandbox) -> Vec<String> {
    sb.in_node(&["ip", "-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect()
}

fn pods_source_ranges_and_new_interfaces_and_addresses(b: &Backend) {
    let lb = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: t}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  loadBalancerSourceRanges: [' 172.30.0.0/30 ']\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30130}]\nstatus: {loadBalancer: {ingress: [{ip: 172.30.0.100}]}}\n";
    let closed = "---\napiVersion: v1\nkind: Service\nmetadata: {name: closed, namespace: t}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.61\n  loadBalancerSourceRanges: ['192.0.2.0/24']\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30131}]\nstatus: {loadBalancer: {ingress: [{ip: 172.30.0.100}]}}\n";
    let closed = closed.replace("port: 80,", "port: 81,");
    let manifests = format!(
        "{}{}{lb}{}{closed}{}",
        service("web", "10.96.0.62", ""),
        slice("web", &ALL3),
        slice("lb", &ALL3),
        slice("closed", &ALL3)
    );
    let mut c = Cluster::start(b, 6, &manifests);
    // A pod (not in the socket-LB cgroup) reaches a ClusterIP through its veth's tc program;
    // when it lands on itself (hairpin) the reply still comes back from the ClusterIP.
    let got = c.until(
        "pod -> ClusterIP",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_backend("a2", &["--tcp", "10.96.0.62:80", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    let spread = names(&got);
    assert!(spread.len() >= 2, "{spread:?}");
    for l in &got {
        let mut w = l.split_whitespace().skip(1);
        let (name, seen) = (w.next().unwrap(), w.next().unwrap());
        if name == "a2" {
            assert!(node_addr(b, l), "hairpin is masqueraded: {l}");
        } else {
            assert_eq!(seen, "10.244.1.12", "pod traffic is not masqueraded: {l}");
        }
    }
    // loadBalancerSourceRanges: the client (172.30.0.2) is inside 172.30.0.0/30 for `lb`
    // and outside the ranges of `closed`.
    c.until(
        "LB in range",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.100:80", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    let got =
        c.sb.probe_from_client(&["--tcp", "172.30.0.100:81", "--timeout-ms", "700"])
            .unwrap();
    assert_eq!(
        got,
        ["err timeout"],
        "source outside loadBalancerSourceRanges must be dropped"
    );

    // A new pod veth gets the tc program without a restart.
    c.sb.add_backend(&BackendSpec::new("n1", Ipv4Addr::new(10, 244, 1, 99)))
        .unwrap();
    c.until(
        "new veth",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_backend("n1", &["--tcp", "10.96.0.62:80", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    // A new node address becomes a NodePort frontend without a restart.
    c.sb.in_node(&["ip", "addr", "add", "172.30.0.11/24", "dev", "ext0"])
        .unwrap();
    c.until(
        "new node address",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.11:30130", "--count", "3"])
                .unwrap()
        },
        all_ok,
    );
}

/// A TCP connection through the tc path whose endpoint is removed from the slices while
/// its server still runs (as when a pod vanishes without a FIN, or its label changes).
/// eBPF deletes the flow at the sync, so the next segment is balanced again and the client
/// gets a reset from a live endpoint at once instead of retransmitting into a dead pod;
/// iptables keeps the connection in the kernel's conntrack, as kube-proxy's rules do.
fn tcp_flow_to_a_removed_endpoint(b: &Backend) {
    let web = |eps: &[(&str, &str)]| {
        format!(
            "{}{}",
            nodeport_service("web", "10.96.0.52", 30160, ""),
            slice("web", eps)
        )
    };
    let mut c = Cluster::start(b, 21, &web(&ALL3));
    c.until(
        "up",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30160"])
                .unwrap()
        },
        all_ok,
    );
    let mut held = Held::start(&[
        "--netns",
        &c.sb.client_ns(),
        "--tcp",
        "172.30.0.10:30160",
        "--timeout-ms",
        "3000",
    ]);
    let before = held.ask();
    let first = name_of(&before).unwrap_or_else(|| panic!("{before}"));
    let rest = all3_but(&first);
    assert_eq!(rest.len(), 2, "{before}");
    c.write(&web(&rest));
    // New connections stop reaching the removed endpoint: the sync has landed.
    c.until(
        "removed endpoint",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.10:30160", "--count", "12"])
                .unwrap()
        },
        |l| all_ok(l) && !names(l).contains_key(&first),
    );
    let t = Instant::now();
    let mut after = held.ask();
    if b.name == "ebpf" {
        // The flow is cleared beside the sync (the janitor), shortly after it lands.
        while after == before && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            after = held.ask();
        }
    }
    let took = t.elapsed();
    drop(held);
    if b.name == "ebpf" {
        assert_eq!(
            after, "err reset",
            "the held connection should be reset by a live endpoint (was {before})"
        );
        assert!(took < Duration::from_secs(3), "reset took {took:?}");
    } else {
        assert_eq!(
            after, before,
            "conntrack keeps the connection on its endpoint, as with kube-proxy"
        );
    }
}

/// A long-lived connected UDP client on the node (the socket LB translates it once, at
/// connect) whose endpoint is removed while its server still runs: it moves to a remaining
/// endpoint within one sync. eBPF destroys the socket (sock_diag), so the client sees the
/// error and reconnects through the load balancer; iptables deletes the conntrack entry,
/// so the next datagram is balanced again.
fn connected_udp_client_moves_off_a_removed_endpoint(b: &Backend) {
    connected_udp_client_moves(b, 20, None, true);
}

/// The same client in a pod's network namespace (and the socket LB's cgroup, as every
/// pod is on a node): the daemon enters the pod's namespace to destroy the socket, with the
/// DaemonSet's capabilities.
#[test]
fn connected_udp_client_in_a_pod_moves_off_a_removed_endpoint() {
    connected_udp_client_moves(&EBPF, 22, Some("a2"), true);
}

/// Without `CAP_SYS_ADMIN` (the chart's `podSocketTermination: false`) the pod's namespace
/// cannot be entered: the client stays on the removed endpoint, and the daemon says so
/// (a warning naming the namespace, counted in `switchyard_socket_destroy_errors_total`).
#[test]
fn without_sys_admin_a_pods_stale_socket_is_reported_not_destroyed() {
    connected_udp_client_moves(&EBPF, 23, Some("a2"), false);
}

fn connected_udp_client_moves(b: &Backend, scenario: u8, pod: Option<&str>, sys_admin: bool) {
    let dns = |eps: &[(&str, &str)]| {
        format!(
            "{}{}",
            nodeport_service("dns", "10.96.0.72", 30170, ""),
            slice("dns", eps)
        )
    };
    let mut c = Cluster::start_with(b, scenario, &dns(&ALL3), &|caps: String| {
        if sys_admin {
            caps
        } else {
            caps.split(',')
                .filter(|c| *c != "+sys_admin")
                .collect::<Vec<_>>()
                .join(",")
        }
    });
    c.until(
        "up",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_cgroup(&["--udp", "10.96.0.72:53", "--count", "3"])
                .unwrap()
        },
        all_ok,
    );
    let cg = c.sb.cgroup.to_string_lossy().to_string();
    let netns = pod.map_or_else(|| c.sb.node_ns(), |p| format!("{}-{p}", c.sb.prefix));
    let mut held = Held::start(&[
        "--cgroup",
        &cg,
        "--netns",
        &netns,
        "--udp",
        "10.96.0.72:53",
        "--timeout-ms",
        "1000",
    ]);
    let before = held.ask();
    let first = name_of(&before).unwrap_or_else(|| panic!("{before}"));
    for _ in 0..3 {
        let again = held.ask();
        assert_eq!(
            name_of(&again),
            Some(first.clone()),
            "one connected socket, one endpoint: {again}"
        );
    }
    let rest = all3_but(&first);
    assert_eq!(rest.len(), 2, "{before}");
    c.write(&dns(&rest));
    // The server of the removed endpoint keeps running: only the dataplane can move the
    // client. It must do so at the sync (minSyncPeriod is 50 ms here): eBPF destroys
    // the socket (the client sees the error and reconnects), iptables deletes the flow.
    let t = Instant::now();
    let mut answers = Vec::new();
    let moved = loop {
        let a = held.ask();
        let name = name_of(&a);
        answers.push(a);
        if name.is_some_and(|n| n != first) {
            break Some(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(held);
    if !sys_admin {
        let log = c.sb.daemon_log();
        assert!(
            moved.is_none(),
            "without CAP_SYS_ADMIN the pod's socket cannot be destroyed: {answers:?}\n{log}"
        );
        assert!(
            log.contains(
                "cannot destroy sockets connected to removed endpoints in this network namespace"
            ) && log.contains(&netns),
            "the namespace left alone is not reported:\n{log}"
        );
        return;
    }
    let Some(took) = moved else {
        panic!(
            "the connected client stayed on {first}: {answers:?}\nconntrack:\n{}\n{}",
            c.sb.in_node(&["conntrack", "-L", "-p", "udp"])
                .unwrap_or_default(),
            c.sb.daemon_log()
        );
    };
    eprintln!("{}: moved off {first} after {took:?}: {answers:?}", b.name);
    // 0.2 s here, up to 1.8 s in the emulated 6.1 VM.
    assert!(took < Duration::from_secs(8), "{took:?}");
    if b.name == "ebpf" {
        assert!(
            answers.iter().any(|a| a == "err aborted"),
            "the socket should have been destroyed: {answers:?}\n{}",
            c.sb.daemon_log()
        );
        // The client may reconnect before the daemon, still looking through the other
        // namespaces for the rest of the stale sockets, logs what it did.
        let logged = Instant::now();
        while !c
            .sb
            .daemon_log()
            .contains("sockets connected to removed endpoints; their applications reconnect")
        {
            assert!(
                logged.elapsed() < Duration::from_secs(5),
                "{}",
                c.sb.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = c.sb.daemon_log();
        let line = log
            .lines()
            .find(|l| {
                l.contains("sockets connected to removed endpoints; their applications reconnect")
            })
            .unwrap_or_default();
        eprintln!("{line}");
    }
}

/// A DNS-style UDP client that keeps its source port: the kernel's conntrack (iptables) or
/// the tc path's flow map (eBPF) pins its flow, so a removed endpoint, or a service that did
/// not exist when the client started sending, would black-hole it until the entry expires.
fn udp_client_keeping_its_port_follows_endpoint_changes(b: &Backend) {
    const SPORT: &str = "40053";
    let dns = |eps: &[(&str, &str)]| {
        format!(
            "{}{}",
            nodeport_service("dns", "10.96.0.70", 30140, ""),
            slice("dns", eps)
        )
    };
    let mut c = Cluster::start(b, 7, &dns(&ALL3));
    let ask = |sb: &Sandbox, target: &str| {
        sb.probe_from_client(&["--udp", target, "--sport", SPORT, "--timeout-ms", "500"])
            .unwrap()
    };
    let got = c.until(
        "UDP NodePort",
        Duration::from_secs(20),
        |sb| ask(sb, "172.30.0.10:30141"),
        all_ok,
    );
    let first = names(&got).into_keys().next().unwrap();
    // The flow is pinned: the same source port keeps reaching the same endpoint.
    for _ in 0..4 {
        let again = ask(&c.sb, "172.30.0.10:30141");
        assert_eq!(
            names(&again).into_keys().collect::<Vec<_>>(),
            std::slice::from_ref(&first),
            "one flow, one endpoint: {again:?}"
        );
    }
    // Remove that endpoint (its server keeps running): the next datagram of the same flow
    // must reach another one instead of following the stale entry.
    let rest = all3_but(&first);
    assert_eq!(rest.len(), 2);
    c.write(&dns(&rest));
    c.until(
        "flow to the removed endpoint",
        Duration::from_secs(5),
        |sb| ask(sb, "172.30.0.10:30141"),
        |l| all_ok(l) && !names(l).contains_key(&first),
    );

    // A client that sends to a NodePort before the service exists gets refused by the node.
    // With iptables the kernel keeps that flow (un-NATed) in its conntrack table; the tc
    // path sees every packet before netfilter, so only the iptables backends can trip here.
    let refused = ask(&c.sb, "172.30.0.10:30151");
    assert_eq!(refused, ["err refused"], "no service yet");
    if b.name == "iptables" {
        let ct =
            c.sb.in_node(&["conntrack", "-L", "-p", "udp", "--dport", "30151"])
                .unwrap();
        assert!(
            ct.contains(&format!("sport={SPORT}")),
            "the un-NATed flow should be in conntrack:\n{ct}"
        );
    }
    // The service appears: the same flow reaches its endpoints at once.
    c.write(&format!(
        "{}{}{}",
        dns(&rest),
        nodeport_service("late", "10.96.0.71", 30150, ""),
        slice("late", &ALL3)
    ));
    c.until(
        "flow that predates the service",
        Duration::from_secs(5),
        |sb| ask(sb, "172.30.0.10:30151"),
        all_ok,
    );
}

/// A TCP client that reuses its source port for a new connection after the old one closed
/// gets a new backend choice, so a removed endpoint is not reached through the old flow.
fn tcp_client_reusing_its_port_after_close_gets_a_live_endpoint(b: &Backend) {
    let reuse = |eps: &[(&str, &str)]| {
        format!(
            "{}{}",
            nodeport_service("reuse", "10.96.0.90", 30170, ""),
            slice("reuse", eps)
        )
    };
    let mut c = Cluster::start(b, 9, &reuse(&ALL3));
    let ask = |sb: &Sandbox| {
        sb.probe_from_client(&["--tcp", "172.30.0.10:30170", "--bind", "172.30.0.2:40080"])
            .unwrap()
    };
    c.until("up", Duration::from_secs(20), ask, all_ok);
    // The same 4-tuple again right after the close works.
    let again = ask(&c.sb);
    assert!(all_ok(&again), "reusing the source port: {again:?}");
    let last = names(&again).into_keys().next().unwrap();
    let rest = all3_but(&last);
    c.write(&reuse(&rest));
    c.until(
        "a new connection on the old tuple",
        Duration::from_secs(5),
        ask,
        |l| all_ok(l) && !names(l).contains_key(&last),
    );
}

/// A dual-stack Service: both ClusterIPs from the node, and the IPv6 NodePort from outside
/// (masqueraded to the node's IPv6 address), TCP and UDP.
fn dual_stack_service_serves_both_families(b: &Backend) {
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: ds, namespace: t}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.80\n  clusterIPs: [10.96.0.80, 'fd00:96::80']\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30160}\n  - {name: udp, port: 53, targetPort: 9125, protocol: UDP, nodePort: 30161}\n";
    // An IPv6-only NodePort without endpoints.
    let empty = "---\napiVersion: v1\nkind: Service\nmetadata: {name: empty6, namespace: t}\nspec:\n  type: NodePort\n  ipFamilies: [IPv6]\n  clusterIP: 'fd00:96::81'\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30190}\n";
    // IPv6 load balancers with source ranges: the client (fd00:30::2) is inside
    // fd00:30::/126 for lb6 and outside the ranges of closed6.
    let lbs = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb6, namespace: t}\nspec:\n  type: LoadBalancer\n  ipFamilies: [IPv6]\n  clusterIP: 'fd00:96::82'\n  loadBalancerSourceRanges: ['fd00:30::/126']\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30191}]\nstatus: {loadBalancer: {ingress: [{ip: 'fd00:31::100'}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: closed6, namespace: t}\nspec:\n  type: LoadBalancer\n  ipFamilies: [IPv6]\n  clusterIP: 'fd00:96::83'\n  loadBalancerSourceRanges: ['2001:db8::/32']\n  ports: [{name: http, port: 81, targetPort: 8080, nodePort: 30192}]\nstatus: {loadBalancer: {ingress: [{ip: 'fd00:31::100'}]}}\n";
    let slice6 = |name: &str, without: Option<&str>| {
        let eps: Vec<String> = backends()
            .iter()
            .filter(|s| Some(s.name.as_str()) != without)
            .map(|s| {
                let node = if s.name.starts_with('a') {
                    "node-a"
                } else {
                    "node-b"
                };
                format!("- {{addresses: ['{}'], nodeName: {node}}}\n", s.ip6())
            })
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-6, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: udp, port: 9125, protocol: UDP}}]\nendpoints:\n{}",
            eps.concat()
        )
    };
    let cluster = |without: Option<&str>| {
        format!(
            "{svc}{empty}{lbs}{}{}{}{}",
            slice("ds", &ALL3),
            slice6("ds", without),
            slice6("lb6", None),
            slice6("closed6", None)
        )
    };
    let mut c = Cluster::start(b, 8, &cluster(None));
    for target in ["10.96.0.80:80", "[fd00:96::80]:80"] {
        let got = c.until(
            &format!("node -> {target}"),
            Duration::from_secs(20),
            |sb| {
                sb.probe_from_cgroup(&["--tcp", target, "--count", "20"])
                    .unwrap()
            },
            all_ok,
        );
        assert!(names(&got).len() >= 2, "{target}: {got:?}");
    }
    c.until(
        "node -> IPv6 ClusterIP, UDP",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_cgroup(&["--udp", "[fd00:96::80]:53", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    let got = c.until(
        "client -> IPv6 NodePort",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "[fd00:30::10]:30160", "--count", "20"])
                .unwrap()
        },
        all_ok,
    );
    assert!(names(&got).len() >= 2, "{got:?}");
    c.until(
        "client -> IPv6 NodePort, UDP",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--udp", "[fd00:30::10]:30161", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    c.until(
        "IPv6 LB in range",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "[fd00:31::100]:80", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    let got =
        c.sb.probe_from_client(&["--tcp", "[fd00:31::100]:81", "--timeout-ms", "700"])
            .unwrap();
    assert_eq!(
        got,
        ["err timeout"],
        "an IPv6 source outside loadBalancerSourceRanges must be dropped"
    );
    // No endpoints: refused at once over IPv6 too (ICMPv6 port unreachable).
    let t = Instant::now();
    let got =
        c.sb.probe_from_client(&["--tcp", "[fd00:30::10]:30190", "--timeout-ms", "3000"])
            .unwrap();
    assert_eq!(got, ["err refused"], "IPv6 NodePort without endpoints");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // An IPv6 UDP client that keeps its source port moves off an endpoint that is removed.
    let ask = |sb: &Sandbox| {
        sb.probe_from_client(&[
            "--udp",
            "[fd00:30::10]:30161",
            "--sport",
            "40054",
            "--timeout-ms",
            "500",
        ])
        .unwrap()
    };
    let got = c.until("IPv6 UDP flow", Duration::from_secs(10), ask, all_ok);
    let first = names(&got).into_keys().next().unwrap();
    assert_eq!(names(&ask(&c.sb)).into_keys().next(), Some(first.clone()));
    c.write(&cluster(Some(&first)));
    c.until(
        "IPv6 UDP flow to the removed endpoint",
        Duration::from_secs(5),
        ask,
        |l| all_ok(l) && !names(l).contains_key(&first),
    );
}

/// `GET /` on ADDR from the client namespace: (status, whole response), or the error kind.
fn http_from_client(sb: &Sandbox, addr: &str) -> Result<(u16, String), std::io::ErrorKind> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    in_netns(&sb.client_ns(), move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.kind())?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, out))
    })
    .unwrap()
}

/// kube-proxy's service health server: a LoadBalancer service with eTP=Local answers on its
/// healthCheckNodePort, from outside the node, with the count of local ready endpoints; 503
/// once the last local one is gone; nothing once the service is. Neither dataplane takes
/// the port for itself, and the service's own traffic keeps flowing.
fn health_check_node_port_follows_local_endpoints(b: &Backend) {
    let lb = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: t}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32140\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30140}\n  - {name: udp, port: 53, targetPort: 9125, protocol: UDP, nodePort: 30141}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 172.30.0.100}]\n";
    let mut c = Cluster::start(b, 10, &format!("{lb}{}", slice("lb", &ALL3)));
    let start = Instant::now();
    let (code, resp) = loop {
        match http_from_client(&c.sb, "172.30.0.10:32140") {
            Ok(r) if r.0 == 200 => break r,
            other => assert!(
                start.elapsed() < Duration::from_secs(20),
                "no 200 on the healthCheckNodePort: {other:?}\n{}",
                c.sb.daemon_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 200);
    let lower = resp.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/json"), "{resp}");
    assert!(lower.contains("x-content-type-options: nosniff"), "{resp}");
    assert!(
        lower.contains("x-load-balancing-endpoint-weight: 2"),
        "{resp}"
    );
    let body: serde_json::Value =
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "t", "name": "lb"},
                           "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    // The load balancer's traffic still reaches the local endpoints.
    let got = c.until(
        "LB IP with eTP=Local",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--tcp", "172.30.0.100:80", "--count", "10"])
                .unwrap()
        },
        all_ok,
    );
    assert!(
        names(&got).keys().all(|k| k == "a1" || k == "a2"),
        "{got:?}"
    );

    // The last local endpoint goes: 503 with a count of 0, so the load balancer drains us.
    c.write(&format!(
        "{lb}{}",
        slice("lb", &[("10.244.2.11", "node-b")])
    ));
    let start = Instant::now();
    loop {
        match http_from_client(&c.sb, "172.30.0.10:32140") {
            Ok((503, r)) => {
                assert!(r.contains("\"localEndpoints\":0"), "{r}");
                assert!(
                    r.to_ascii_lowercase()
                        .contains("x-load-balancing-endpoint-weight: 0"),
                    "{r}"
                );
                break;
            }
            other => assert!(
                start.elapsed() < Duration::from_secs(10),
                "still not 503: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The service is deleted: the server closes.
    c.write("");
    let start = Instant::now();
    while http_from_client(&c.sb, "172.30.0.10:32140") != Err(std::io::ErrorKind::ConnectionRefused)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the healthCheckNodePort stayed open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a helper process even when the test fails.
struct Kill<'a>(&'a mut std::process::Child);

impl Drop for Kill<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// KEP-1860: traffic from this node to a load balancer IP in `Proxy` mode goes to the load
/// balancer (here a server in the client namespace that owns the address), while the same
/// service's `VIP`-mode IP is short-circuited to its endpoints, from pods (tc path / PREROUTING)
/// and from node sockets (socket LB / OUTPUT) alike.
fn load_balancer_ip_mode_proxy_reaches_the_load_balancer(b: &Backend) {
    let lb = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: t}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.42\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30142}\n  - {name: udp, port: 53, targetPort: 9125, protocol: UDP, nodePort: 30143}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 172.30.0.100, ipMode: VIP}, {ip: 172.30.0.101, ipMode: Proxy}]\n";
    let mut c = Cluster::start(b, 11, &format!("{lb}{}", slice("lb", &ALL3)));
    // The "cloud load balancer": owns 172.30.0.101 outside the node.
    let client = c.sb.client_ns();
    switchyard_tests::sandbox::sh(&[
        "ip",
        "-n",
        &client,
        "addr",
        "add",
        "172.30.0.101/32",
        "dev",
        "lo",
    ])
    .unwrap();
    let mut lb_server = std::process::Command::new("ip")
        .args(["netns", "exec", &client])
        .arg(switchyard_tests::sandbox::bin("sy-backend"))
        .args([
            "--name",
            "cloud-lb",
            "--bind",
            "172.30.0.101",
            "--tcp",
            "80",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Kill(&mut lb_server);
    let backends_only = |l: &[String]| {
        all_ok(l)
            && names(l)
                .keys()
                .all(|k| ["a1", "a2", "b1"].contains(&k.as_str()))
    };
    let from_pod = c.until(
        "VIP-mode IP from a pod",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_backend("b1", &["--tcp", "172.30.0.100:80", "--count", "10"])
                .unwrap()
        },
        backends_only,
    );
    assert!(backends_only(&from_pod));
    let got = c.until(
        "Proxy-mode IP from a pod",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_backend("b1", &["--tcp", "172.30.0.101:80", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    assert!(
        got.iter().all(|l| l.starts_with("ok cloud-lb ")),
        "a Proxy-mode IP must reach the load balancer: {got:?}"
    );
    let got = c.until(
        "Proxy-mode IP from the node",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "172.30.0.101:80", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    assert!(got.iter().all(|l| l.starts_with("ok cloud-lb ")), "{got:?}");
    let got = c.until(
        "VIP-mode IP from the node",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "172.30.0.100:80", "--count", "10"])
                .unwrap()
        },
        backends_only,
    );
    assert!(backends_only(&got));
}

/// trafficDistribution (KEP-3015): PreferSameNode keeps this node's clients on this node's
/// endpoints; PreferSameZone (and its old name PreferClose) on this zone's; without a local
/// or same-zone endpoint, everyone's.
fn traffic_distribution_keeps_traffic_close(b: &Backend) {
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";
    let svc = |td: &str| {
        service(
            "td",
            "10.96.0.43",
            &format!("  trafficDistribution: {td}\n"),
        )
    };
    // a1 on this node; a2 elsewhere in this zone; b1 in another zone.
    let eps = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: td-1, namespace: t, labels: {kubernetes.io/service-name: td}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: udp, port: 9125, protocol: UDP}]\nendpoints:\n- {addresses: [10.244.1.11], nodeName: node-a, zone: zone-a}\n- {addresses: [10.244.1.12], nodeName: node-x, zone: zone-a}\n- {addresses: [10.244.2.11], nodeName: node-b, zone: zone-b}\n";
    let mut c = Cluster::start(b, 12, "");
    for (td, want) in [
        ("PreferSameNode", vec!["a1"]),
        ("PreferSameZone", vec!["a1", "a2"]),
        ("PreferClose", vec!["a1", "a2"]),
    ] {
        c.write_with_node(node, &format!("{}{eps}", svc(td)));
        let want_set: std::collections::BTreeSet<String> =
            want.iter().map(|s| (*s).to_string()).collect();
        c.until(
            td,
            Duration::from_secs(15),
            |sb| {
                sb.probe_from_cgroup(&["--tcp", "10.96.0.43:80", "--count", "30"])
                    .unwrap()
            },
            |l| {
                all_ok(l)
                    && names(l)
                        .keys()
                        .cloned()
                        .collect::<std::collections::BTreeSet<_>>()
                        == want_set
            },
        );
    }
    // No endpoint on this node any more: PreferSameNode falls back to the zone.
    let eps_far = eps.replace(
        "- {addresses: [10.244.1.11], nodeName: node-a, zone: zone-a}\n",
        "",
    );
    c.write_with_node(node, &format!("{}{eps_far}", svc("PreferSameNode")));
    c.until(
        "PreferSameNode without a local endpoint",
        Duration::from_secs(15),
        |sb| {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.43:80", "--count", "20"])
                .unwrap()
        },
        |l| all_ok(l) && names(l).keys().all(|k| k == "a2"),
    );
}

/// `externalIPs` from a client outside the node: every endpoint answers, TCP and UDP, and
/// (eTP=Cluster) the endpoint sees a node address.
fn external_ips_from_an_outside_client(b: &Backend) {
    let ext = "  externalIPs: [198.51.100.10]\n";
    let mut c = Cluster::start(
        b,
        16,
        &format!(
            "{}{}",
            service("ext", "10.96.0.71", ext),
            slice("ext", &ALL3)
        ),
    );
    let got = c.until(
        "externalIP TCP",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_client(&["--tcp", "198.51.100.10:80", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    assert!(names(&got).len() >= 2, "{got:?}");
    assert!(
        got.iter().all(|l| node_addr(b, l)),
        "masqueraded to the node: {got:?}"
    );
    c.until(
        "externalIP UDP",
        Duration::from_secs(10),
        |sb| {
            sb.probe_from_client(&["--udp", "198.51.100.10:53", "--count", "5"])
                .unwrap()
        },
        all_ok,
    );
    // Not an external IP of the service: not served.
    let other =
        c.sb.probe_from_client(&["--tcp", "198.51.100.11:80", "--timeout-ms", "300"])
            .unwrap();
    assert!(other.iter().all(|l| !l.starts_with("ok ")), "{other:?}");
}

/// `internalTrafficPolicy: Local` from a pod: only this node's endpoints; with none local,
/// the pod's connections fail (kube-proxy drops them; IPVS mode answers with ICMP unreachable
/// from the empty virtual service, which fails the same way, only faster).
fn internal_traffic_policy_local_from_a_pod(b: &Backend) {
    let itp = "  internalTrafficPolicy: Local\n";
    let remote_only = [("10.244.2.11", "node-b")];
    let mut c = Cluster::start(
        b,
        17,
        &format!(
            "{}{}{}{}",
            service("itp", "10.96.0.72", itp),
            slice("itp", &ALL3),
            service("far", "10.96.0.73", itp),
            slice("far", &remote_only)
        ),
    );
    let got = c.until(
        "iTP=Local from a pod",
        Duration::from_secs(20),
        |sb| {
            sb.probe_from_backend("a2", &["--tcp", "10.96.0.72:80", "--count", "30"])
                .unwrap()
        },
        all_ok,
    );
    let spread = names(&got);
    assert!(
        spread.keys().all(|k| k == "a1" || k == "a2"),
        "only this node's endpoints: {spread:?}"
    );
    // Sockets on the node follow the same policy.
    let got =
        c.sb.probe_from_cgroup(&["--tcp", "10.96.0.72:80", "--count", "20"])
            .unwrap();
    assert!(
        all_ok(&got) && names(&got).keys().all(|k| k == "a1" || k == "a2"),
        "{got:?}"
    );
    // No local endpoint: the pod's connections fail, none reaches node-b's endpoint.
    let got =
        c.sb.probe_from_backend(
            "a2",
            &[
                "--tcp",
                "10.96.0.73:80",
                "--count",
                "3",
                "--timeout-ms",
                "500",
            ],
        )
        .unwrap();
    assert!(
        got.iter().all(|l| l.starts_with("err ")),
        "iTP=Local without local endpoints must not be served: {got:?}"
    );
}

/// Consistent hashing through the kernel's own lookup (eBPF `lbAlgorithm: maglev`, IPVS `mh`):
/// after one of three endpoints is removed, connections from the same client ports land where
/// they did, except those that were on the removed endpoint. iptables mode picks at random per
/// connection (kube-proxy's `statistic` rules): it has no such property and says so.
fn consistent_hashing_moves_only_the_removed_endpoints_flows(b: &Backend) {
    let algo = match b.name {
        "ebpf" => "lbAlgorithm: maglev\n",
        "ipvs" => "ipvsScheduler: mh\n",
        _ => {
            eprintln!(
                "{}: NOT APPLICABLE: random selection per connection (kube-proxy's statistic rules), no consistent hashing",
                b.name
            );
            return;
        }
    };
    let manifests = format!(
        "{}{}",
        nodeport_service("mg", "10.96.0.74", 30190, ""),
        slice("mg", &ALL3)
    );
    let mut c = Cluster::start(b, 18, &manifests);
    c.sb.stop_daemon();
    let dir = c.dir.clone();
    c.sb.start_daemon(&dir, b.name, &format!("{}{algo}", b.extra))
        .unwrap();
    let ports: Vec<u16> = (41_000..41_048).collect();
    let round = |sb: &Sandbox| -> Vec<String> {
        ports
            .iter()
            .map(|p| {
                let bind = format!("172.30.0.2:{p}");
                sb.probe_from_client(&[
                    "--tcp",
                    "172.30.0.10:30190",
                    "--bind",
                    &bind,
                    "--timeout-ms",
                    "1000",
                ])
                .unwrap()
                .pop()
                .unwrap_or_default()
            })
            .collect()
    };
    let first = c.until("NodePort up", Duration::from_secs(20), round, all_ok);
    let who = |l: &String| l.split_whitespace().nth(1).unwrap_or("").to_string();
    let before: Vec<String> = first.iter().map(who).collect();
    let on_b1 = before.iter().filter(|n| *n == "b1").count();
    assert!(
        on_b1 > 0 && on_b1 < before.len(),
        "48 client ports spread over the endpoints: {before:?}"
    );
    c.write(&format!(
        "{}{}",
        nodeport_service("mg", "10.96.0.74", 30190, ""),
        slice("mg", &ALL3[..2])
    ));
    let second = c.until("after removing b1", Duration::from_secs(20), round, |l| {
        all_ok(l) && l.iter().all(|x| !x.contains(" b1 "))
    });
    let after: Vec<String> = second.iter().map(who).collect();
    let moved: Vec<(u16, &String, &String)> = ports
        .iter()
        .zip(before.iter().zip(after.iter()))
        .filter(|(_, (x, y))| x != y)
        .map(|(p, (x, y))| (*p, x, y))
        .collect();
    assert!(
        moved.iter().all(|(_, from, _)| *from == "b1"),
        "only flows that were on b1 may move: {moved:?}"
    );
    assert_eq!(moved.len(), on_b1, "every flow on b1 moved: {moved:?}");
    eprintln!(
        "{}: {on_b1}/{} client ports were on the removed endpoint and moved; the other {} stayed",
        b.name,
        ports.len(),
        ports.len() - on_b1
    );
}

/// IPVS specifics: a full sync repairs what someone changed in the kernel (a virtual service
/// deleted, a real server deleted, a VIP unbound, a set flushed), and a leaving TCP endpoint
/// drains (weight 0, its open connection keeps working) and is deleted once that connection
/// ends.
#[test]
fn ipvs_full_sync_repairs_drift_and_endpoints_drain() {
    use std::io::{BufRead, BufReader, Write};
    if !runnable(&IPVS) {
        return;
    }
    let manifests = format!(
        "{}{}",
        nodeport_service("dr", "10.96.0.77", 30197, ""),
        slice("dr", &ALL3)
    );
    let mut c = Cluster::start(&IPVS, 20, &manifests);
    c.sb.stop_daemon();
    let dir = c.dir.clone();
    c.sb.start_daemon(&dir, IPVS.name, "syncPeriod: 3s\nipvsTcpFinTimeout: 5s\n")
        .unwrap();
    let ask = |sb: &Sandbox| {
        sb.probe_from_cgroup(&[
            "--tcp",
            "10.96.0.77:80",
            "--count",
            "6",
            "--timeout-ms",
            "500",
        ])
        .unwrap()
    };
    c.until("up", Duration::from_secs(20), ask, all_ok);
    let ipvsadm = |sb: &Sandbox| sb.in_node(&["ipvsadm", "-Ln"]).unwrap_or_default();
    // Tamper: delete the ClusterIP's virtual service, a NodePort real server, unbind the VIP
    // and flush a set.
    c.sb.in_node(&["ipvsadm", "-D", "-t", "10.96.0.77:80"])
        .unwrap();
    c.sb.in_node(&[
        "ipvsadm",
        "-d",
        "-t",
        "172.30.0.10:30197",
        "-r",
        "10.244.2.11:8080",
    ])
    .unwrap();
    c.sb.in_node(&["ip", "addr", "del", "10.96.0.77/32", "dev", "sy-ipvs0"])
        .unwrap();
    c.sb.in_node(&["ipset", "flush", "SY-CLUSTER-IP"]).unwrap();
    let t = Instant::now();
    c.until(
        "repaired by a full sync",
        Duration::from_secs(15),
        ask,
        all_ok,
    );
    let table = ipvsadm(&c.sb);
    assert!(
        table.contains("10.96.0.77:80") && table.matches("10.244.2.11:8080").count() >= 2,
        "services and real servers back:\n{table}"
    );
    let sets = c.sb.in_node(&["ipset", "list", "SY-CLUSTER-IP"]).unwrap();
    assert!(sets.contains("10.96.0.77,tcp:80"), "{sets}");
    eprintln!(
        "ipvs drift repaired in {:.1} s (syncPeriod 3s)",
        t.elapsed().as_secs_f64()
    );

    // Graceful removal: hold a connection to b1, remove b1, the connection keeps working and
    // b1 stays at weight 0 until the connection closes.
    // "Timeout (tcp tcpfin udp): 900 5 300"
    let timeouts = c.sb.in_node(&["ipvsadm", "-L", "--timeout"]).unwrap();
    assert_eq!(
        timeouts
            .split("):")
            .nth(1)
            .and_then(|t| t.split_whitespace().nth(1)),
        Some("5"),
        "ipvsTcpFinTimeout applied: {timeouts}"
    );
    let mut held = None;
    for _ in 0..30 {
        let mut p = std::process::Command::new(switchyard_tests::sandbox::bin("sy-probe"))
            .args([
                "--cgroup",
                &c.sb.cgroup.to_string_lossy(),
                "--netns",
                &c.sb.node_ns(),
                "--tcp",
                "10.96.0.77:80",
                "--hold",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = p.stdin.take().unwrap();
        let mut out = BufReader::new(p.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        if line.contains(" b1 ") {
            held = Some((p, stdin, out));
            break;
        }
        drop(stdin);
        let _ = p.kill();
        let _ = p.wait();
    }
    let (mut p, mut stdin, mut out) = held.expect("no held connection landed on b1 in 30 tries");
    c.write(&format!(
        "{}{}",
        nodeport_service("dr", "10.96.0.77", 30197, ""),
        slice("dr", &ALL3[..2])
    ));
    let weight0 = |sb: &Sandbox| {
        let t = sb
            .in_node(&["ipvsadm", "-Ln", "-t", "10.96.0.77:80"])
            .unwrap_or_default();
        t.lines()
            .find(|l| l.contains("10.244.2.11:8080"))
            .map(|l| l.split_whitespace().nth(3).unwrap_or("").to_string())
    };
    let t = Instant::now();
    while weight0(&c.sb).as_deref() != Some("0") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b1 not drained:\n{}",
            ipvsadm(&c.sb)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = c.until(
        "new connections avoid b1",
        Duration::from_secs(5),
        ask,
        |l| all_ok(l) && l.iter().all(|x| !x.contains(" b1 ")),
    );
    assert!(!got.is_empty());
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains(" b1 "),
        "the held connection still reaches b1: {line}"
    );
    assert_eq!(
        weight0(&c.sb).as_deref(),
        Some("0"),
        "still draining while connected"
    );
    drop(stdin);
    let _ = p.kill();
    let _ = p.wait();
    // Once its connection is gone (FIN_WAIT and TIME_WAIT entries count as inactive until
    // they expire: FIN_WAIT after ipvsTcpFinTimeout, 5 s here; TIME_WAIT after IPVS's fixed
    // 120 s, as kube-proxy's graceful termination waits too), a full sync deletes it.
    let t = Instant::now();
    while weight0(&c.sb).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(150),
            "b1 never deleted after its connection ended:\n{}",
            c.sb.in_node(&["ipvsadm", "-Ln", "-t", "10.96.0.77:80"])
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "ipvs: drained real server deleted {:.0} s after its connection closed",
        t.elapsed().as_secs_f64()
    );
}

/// Whether this kernel has SCTP (loading the module where it can). This machine's own kernel
/// has none; Debian's kernels in `cargo xtask vm-test` have it as a module.
fn kernel_has_sctp() -> bool {
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "sctp"])
        .status();
    std::path::Path::new("/proc/net/sctp").exists()
}

/// Real SCTP associations through a ClusterIP (from a node socket) and a NodePort (from the
/// outside client). The eBPF backend serves SCTP through the socket LB only: its tc path does
/// not translate SCTP (that would need the CRC32c recomputed), so SCTP to a NodePort from
/// outside the node is not served there, as the README states; this checks that too.
fn sctp_associations_through_cluster_ip_and_node_port(b: &Backend) {
    if !kernel_has_sctp() {
        assert!(
            std::env::var_os("SY_VM_KERNEL").is_none(),
            "SCTP is missing from the VM's kernel"
        );
        eprintln!(
            "sctp scenario NOT RUN on this kernel (no SCTP): `cargo xtask vm-test` runs it on Debian's 6.1 and 6.12"
        );
        return;
    }
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: sc, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.76\n  ports:\n  - {name: sctp, port: 80, targetPort: 8080, protocol: SCTP, nodePort: 30196}\n";
    let eps: Vec<(&str, Option<&str>)> = ALL3.iter().map(|(ip, n)| (*ip, Some(*n))).collect();
    let port = Port {
        protocol: "SCTP",
        ..Port::tcp("sctp", 8080)
    };
    let sl = fixtures::slice("t", "sc", "sc-1", &[port], &eps);
    let mut c = Cluster::start(b, 19, &format!("{svc}{sl}"));
    let from_node = |sb: &Sandbox| {
        sb.probe_from_cgroup(&[
            "--sctp",
            "10.96.0.76:80",
            "--count",
            "20",
            "--timeout-ms",
            "1000",
        ])
        .unwrap()
    };
    if b.name == "ebpf" {
        // The socket LB's connect hook does not translate SCTP associations (seen on 6.1):
        // the eBPF backend does not serve SCTP, as the README states. Whatever a kernel does,
        // it must not half-work.
        std::thread::sleep(Duration::from_secs(3));
        let got = from_node(&c.sb);
        let ok = got.iter().filter(|l| l.starts_with("ok ")).count();
        assert!(
            ok == 0 || (ok == got.len() && names(&got).len() >= 2),
            "SCTP through the socket LB either works or is not served: {got:?}"
        );
        eprintln!(
            "ebpf: SCTP ClusterIP from a node socket {} on this kernel",
            if ok == 0 { "NOT SERVED" } else { "served" }
        );
    } else {
        let got = c.until(
            "SCTP ClusterIP from the node",
            Duration::from_secs(20),
            from_node,
            all_ok,
        );
        assert!(names(&got).len() >= 2, "{got:?}");
    }
    let from_outside = |sb: &Sandbox| {
        sb.probe_from_client(&[
            "--sctp",
            "172.30.0.10:30196",
            "--count",
            "10",
            "--timeout-ms",
            "1000",
        ])
        .unwrap()
    };
    if b.name == "ebpf" {
        let got = from_outside(&c.sb);
        assert!(
            got.iter().all(|l| !l.starts_with("ok ")),
            "the eBPF tc path does not translate SCTP (README): {got:?}"
        );
        eprintln!("ebpf: SCTP NodePort from outside NOT SERVED, as the README states");
    } else {
        let got = c.until(
            "SCTP NodePort from outside",
            Duration::from_secs(20),
            from_outside,
            all_ok,
        );
        assert!(names(&got).len() >= 2, "{got:?}");
        assert!(
            got.iter().all(|l| node_addr(b, l)),
            "masqueraded to the node: {got:?}"
        );
    }
}

/// The same scenarios against every backend this kernel has.
macro_rules! suite {
    ($($m:ident => $b:expr),* $(,)?) => {$(
        mod $m {
            use super::*;
            #[test]
            fn cluster_ip_tcp_and_udp() { if runnable(&$b) { super::cluster_ip_tcp_and_udp(&$b) } }
            #[test]
            fn node_port_masquerade_and_etp_local() { if runnable(&$b) { super::node_port_from_outside_is_masqueraded_and_etp_local_keeps_the_client(&$b) } }
            #[test]
            fn no_endpoints_and_backend_removal() { if runnable(&$b) { super::no_endpoints_refuses_fast_and_removed_backend_stops_receiving(&$b) } }
            #[test]
            fn session_affinity() { if runnable(&$b) { super::session_affinity_sticks_then_spreads_and_expires(&$b) } }
            #[test]
            fn restart_and_cleanup() { if runnable(&$b) { super::restart_keeps_open_connections_and_cleanup_leaves_nothing(&$b) } }
            #[test]
            fn pods_source_ranges_new_links() { if runnable(&$b) { super::pods_source_ranges_and_new_interfaces_and_addresses(&$b) } }
            #[test]
            fn udp_stale_flows() { if runnable(&$b) { super::udp_client_keeping_its_port_follows_endpoint_changes(&$b) } }
            #[test]
            fn tcp_removed_endpoint() { if runnable(&$b) { super::tcp_flow_to_a_removed_endpoint(&$b) } }
            #[test]
            fn udp_connected_client_moves() { if runnable(&$b) { super::connected_udp_client_moves_off_a_removed_endpoint(&$b) } }
            #[test]
            fn tcp_port_reuse() { if runnable(&$b) { super::tcp_client_reusing_its_port_after_close_gets_a_live_endpoint(&$b) } }
            #[test]
            fn dual_stack() { if runnable(&$b) { super::dual_stack_service_serves_both_families(&$b) } }
            #[test]
            fn health_check_node_port() { if runnable(&$b) { super::health_check_node_port_follows_local_endpoints(&$b) } }
            #[test]
            fn lb_ip_mode_proxy() { if runnable(&$b) { super::load_balancer_ip_mode_proxy_reaches_the_load_balancer(&$b) } }
            #[test]
            fn external_ips() { if runnable(&$b) { super::external_ips_from_an_outside_client(&$b) } }
            #[test]
            fn internal_traffic_policy_local() { if runnable(&$b) { super::internal_traffic_policy_local_from_a_pod(&$b) } }
            #[test]
            fn sctp() { if runnable(&$b) { super::sctp_associations_through_cluster_ip_and_node_port(&$b) } }
            #[test]
            fn consistent_hashing() { if runnable(&$b) { super::consistent_hashing_moves_only_the_removed_endpoints_flows(&$b) } }
            #[test]
            fn traffic_distribution() { if runnable(&$b) { super::traffic_distribution_keeps_traffic_close(&$b) } }
        }
    )*};
}

suite! {
    ebpf => EBPF,
    ebpf_netlink => EBPF_NETLINK,
    iptables_legacy => IPTABLES_LEGACY,
    iptables_nft => IPTABLES_NFT,
    ipvs => IPVS,
}

/// Whether `b` can run on this kernel. IPVS is missing from this machine's own kernel: its
/// scenarios run in `cargo xtask vm-test` (Debian's kernels, which CI runs too) and say so
/// here; inside that VM a missing IPVS fails.
fn runnable(b: &Backend) -> bool {
    if b.name != "ipvs" || switchyard_tests::sandbox::kernel_has_ipvs() {
        return true;
    }
    assert!(
        std::env::var_os("SY_VM_KERNEL").is_none(),
        "IPVS is missing from the VM's kernel"
    );
    eprintln!(
        "ipvs scenario NOT RUN on this kernel (no IPVS, CONFIG_IP_VS unset): `cargo xtask vm-test` runs it on Debian's 6.1 and 6.12"
    );
    false
}

/// Switching backend across a restart: each backend's start removes the other's state, and
/// the service keeps working through the new one.
#[test]
fn switching_backend_across_a_restart_removes_the_old_state() {
    let manifests = format!(
        "{}{}",
        nodeport_service("web", "10.96.0.95", 30180, ""),
        slice("web", &ALL3)
    );
    let mut c = Cluster::start(&EBPF, 0, &manifests);
    let up = |c: &mut Cluster, what: &str| {
        c.until(
            what,
            Duration::from_secs(20),
            |sb| {
                sb.probe_from_client(&["--tcp", "172.30.0.10:30180", "--count", "5"])
                    .unwrap()
            },
            all_ok,
        );
    };
    up(&mut c, "eBPF");
    let dir = c.dir.clone();
    let tc_progs = tc_prog_ids(&c.sb);
    assert!(!tc_progs.is_empty() && tc_progs.iter().all(|id| prog_alive(id)));
    assert!(reserved_ports(&c.sb).contains("30000-32767"));

    // eBPF -> iptables: pins, programs and the port reservation go; rules take over.
    c.sb.stop_daemon();
    c.backend = IPTABLES_LEGACY;
    c.sb.start_daemon(&dir, IPTABLES_LEGACY.name, IPTABLES_LEGACY.extra)
        .unwrap();
    // The old programs keep serving until the new backend has started: wait for that.
    let t = Instant::now();
    while !c.sb.daemon_log().contains("backend selected") && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    up(&mut c, "iptables after eBPF");
    assert!(
        !c.sb.pin_dir.exists(),
        "eBPF pins left behind:\n{}",
        c.sb.daemon_log()
    );
    for id in &tc_progs {
        assert!(!prog_alive(id), "tc program {id} left attached");
    }
    assert!(
        !reserved_ports(&c.sb).contains("30000-32767"),
        "reserved NodePort range left behind"
    );
    assert!(
        c.sb.in_node(&["iptables-legacy-save"])
            .unwrap()
            .contains("SY-SERVICES")
    );

    // iptables -> eBPF: our chains go (both families).
    c.sb.stop_daemon();
    c.backend = EBPF;
    c.sb.start_daemon(&dir, EBPF.name, EBPF.extra).unwrap();
    let t = Instant::now();
    while !c.sb.daemon_log().contains("backend selected") && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    up(&mut c, "eBPF after iptables");
    for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        let rules = c.sb.in_node(&[tool]).unwrap();
        assert!(
            !rules.contains("SY-"),
            "{tool} still shows our chains:\n{rules}"
        );
    }
    assert!(!tc_prog_ids(&c.sb).is_empty());
}

/// The programs of ours attached to the node's interfaces: behind the sandbox's pinned tc
/// links (the Debian bpftool cannot list tcx attachments per interface, so the pins say which
/// links are ours), and netlink `cls_bpf` filters named `sy_tc_ingress` (`tc filter show`).
fn tc_prog_ids(sb: &Sandbox) -> Vec<String> {
    let mut ids = Vec::new();
    for dev in node_links(sb) {
        let out = sb
            .in_node(&["tc", "filter", "show", "dev", &dev, "ingress"])
            .unwrap_or_default();
        for l in out.lines().filter(|l| l.contains("sy_tc_ingress")) {
            let mut w = l.split_whitespace();
            if w.any(|t| t == "id") {
                ids.extend(w.next().map(str::to_string));
            }
        }
    }
    let Ok(dir) = std::fs::read_dir(sb.pin_dir.join("links")) else {
        return ids;
    };
    ids.extend(
        dir.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
            .filter_map(|e| {
                let out = switchyard_tests::sandbox::sh(&[
                    "bpftool",
                    "link",
                    "show",
                    "pinned",
                    &e.path().to_string_lossy(),
                ])
                .ok()?;
                let mut w = out.split_whitespace();
                w.find(|t| *t == "prog")?;
                w.next().map(str::to_string)
            }),
    );
    ids
}

/// Whether a program with this id still exists (a detached, unpinned program is freed).
fn prog_alive(id: &str) -> bool {
    switchyard_tests::sandbox::sh(&["bpftool", "prog", "show", "id", id]).is_ok()
}

fn reserved_ports(sb: &Sandbox) -> String {
    sb.in_node(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
        .unwrap()
}

/// Where the kernel has no IPVS, `--backend ipvs` refuses to start and says why (where it
/// has IPVS, the scenario suite runs it).
#[test]
fn ipvs_without_kernel_support_refuses_and_says_why() {
    require_root();
    if switchyard_tests::sandbox::kernel_has_ipvs() {
        eprintln!("this kernel has IPVS: the ipvs scenarios run instead");
        return;
    }
    let out = std::process::Command::new(switchyard_tests::sandbox::bin("switchyard"))
        .args([
            "run",
            "--backend",
            "ipvs",
            "--source",
            "manifests:/nonexistent",
            "--node-name",
            "x",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the kernel has no IPVS support"),
        "expected the missing-IPVS refusal, got: {err}"
    );
    eprintln!("scenario suite: ipvs NOT RUN: {}", err.trim());
}
