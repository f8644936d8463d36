//! New connections through a NodePort (outside client, tc path) and a ClusterIP (node,
//! socket LB), one every 20 ms, while the daemon is stopped and started again 1.5 s later,
//! and killed and started again: none may fail (the programs and maps stay pinned while it
//! is down).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, bin, require_root};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

fn manifests(node: bool) -> String {
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.70\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30170}\n";
    let slice = fixtures::slice(
        "t",
        "web",
        "web-1",
        &[Port::tcp("http", 8080)],
        &[
            ("10.244.1.11", Some("node-a")),
            ("10.244.2.11", Some("node-b")),
        ],
    );
    // Without a Node object the host's own addresses serve NodePorts, and the first usable
    // one is the masquerade address (it once was 127.0.0.1).
    let node = if node { NODE } else { "" };
    format!("{node}{svc}{slice}")
}

fn failures(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| !l.starts_with("ok "))
        .cloned()
        .collect()
}

fn run(backend: &str, tag: &str, extra: &str, node: bool) {
    require_root();
    let mut sb = Sandbox::create(
        &format!("syr{tag}"),
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("b1", Ipv4Addr::new(10, 244, 2, 11)),
        ],
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), manifests(node)).unwrap();
    sb.start_daemon(&dir, backend, extra).unwrap();
    let start = std::time::Instant::now();
    while !failures(
        &sb.probe_from_client(&["--tcp", "172.30.0.10:30170"])
            .unwrap(),
    )
    .is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "NodePort never answered:\n{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for kill in [false, true] {
        let cg = sb.cgroup.display().to_string();
        let spawn = |args: &[&str]| {
            Command::new(bin("sy-probe"))
                .args(args)
                .args([
                    "--count",
                    "150",
                    "--interval-ms",
                    "20",
                    "--timeout-ms",
                    "500",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let client = sb.client_ns();
        let node = sb.node_ns();
        let np = spawn(&["--netns", &client, "--tcp", "172.30.0.10:30170"]);
        let cip = spawn(&["--cgroup", &cg, "--netns", &node, "--tcp", "10.96.0.70:80"]);
        std::thread::sleep(Duration::from_millis(500));
        if kill {
            sb.kill_daemon();
        } else {
            sb.stop_daemon();
        }
        std::thread::sleep(Duration::from_millis(1500));
        sb.start_daemon(&dir, backend, extra).unwrap();
        let collect = |c: std::process::Child| -> Vec<String> {
            let out = c.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        };
        let (np, cip) = (collect(np), collect(cip));
        let (fnp, fcip) = (failures(&np), failures(&cip));
        eprintln!(
            "{backend} {}: NodePort {}/{} failed {:?}; ClusterIP {}/{} failed {:?}",
            if kill { "SIGKILL" } else { "SIGTERM" },
            fnp.len(),
            np.len(),
            fnp.iter().take(3).collect::<Vec<_>>(),
            fcip.len(),
            cip.len(),
            fcip.iter().take(3).collect::<Vec<_>>()
        );
        assert!(np.len() == 150 && cip.len() == 150);
        assert!(
            fnp.is_empty() && fcip.is_empty(),
            "connections failed across a restart:\n{}",
            sb.daemon_log()
        );
    }
}

/// eBPF, with the default sync period and no Node object (the host's addresses serve).
#[test]
fn ebpf_new_connections_survive_restarts() {
    run("ebpf", "e", "syncPeriod: 30s\n", false);
}

#[test]
fn iptables_new_connections_survive_restarts() {
    run("iptables", "i", "iptablesMode: nft\n", true);
}
