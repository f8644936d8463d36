//! The eBPF dataplane with real packets: a node namespace running `switchyard run --backend
//! ebpf`, an outside client, and backend namespaces with real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_tests::sandbox::{BackendSpec, Sandbox, require_root};

fn backends() -> Vec<BackendSpec> {
    vec![
        BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
        BackendSpec::new("a2", Ipv4Addr::new(10, 244, 1, 12)),
        BackendSpec::new("b1", Ipv4Addr::new(10, 244, 2, 11)),
    ]
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

fn service(name: &str, ip: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 53, targetPort: 9125, protocol: UDP}}\n{extra}"
    )
}

fn slice(svc: &str, eps: &[(&str, &str)]) -> String {
    let eps: String = eps
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}\n"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: udp, port: 9125, protocol: UDP}}]\nendpoints:\n{eps}"
    )
}

const ALL3: [(&str, &str); 3] = [
    ("10.244.1.11", "node-a"),
    ("10.244.1.12", "node-a"),
    ("10.244.2.11", "node-b"),
];

struct Cluster {
    sb: Sandbox,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn start(prefix: &str, manifests: &str) -> Cluster {
        require_root();
        let sb = Sandbox::create(prefix, &backends()).unwrap();
        let dir = sb.dir.path().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster { sb, dir };
        c.write(manifests);
        c.sb.start_daemon(&c.dir.clone(), "ebpf", "").unwrap();
        c
    }

    fn write(&mut self, manifests: &str) {
        let tmp = self.dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, format!("{NODE}{manifests}")).unwrap();
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
            assert!(
                start.elapsed() < within,
                "{what}: last answers {got:?}\ndaemon log:\n{}",
                self.sb.daemon_log()
            );
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

fn all_ok(lines: &[String]) -> bool {
    !lines.is_empty() && lines.iter().all(|l| l.starts_with("ok "))
}

#[test]
fn cluster_ip_tcp_and_udp_through_socket_lb() {
    let mut c = Cluster::start(
        "syc1",
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
