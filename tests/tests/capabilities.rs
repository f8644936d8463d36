//! The daemon runs with exactly the capabilities the DaemonSet grants (read from
//! `deploy/switchyard.yaml`) and no more: both backends program traffic and DNS serves on
//! port 53. Without one of them it refuses to start, naming the capability and its use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, daemonset_capabilities, require_root, sh};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";

struct Outcome {
    ok: bool,
    log: String,
}

fn scenario(backend: &str, tag: &str, caps: &str, extra: &str) -> Outcome {
    require_root();
    let mut sb = Sandbox::create(
        &format!("syc{tag}"),
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    sb.capabilities = Some(caps.to_string());
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.90\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30190}\n";
    let slice = fixtures::slice(
        "t",
        "web",
        "web-1",
        &[Port::tcp("http", 8080)],
        &[("10.244.1.11", Some("node-a"))],
    );
    std::fs::write(dir.join("all.yaml"), format!("{NODE}{svc}{slice}")).unwrap();
    let cfg = format!("dns:\n  listen: ['169.254.20.10:53']\n  upstream: ['127.0.0.1:9']\n{extra}");
    sb.start_daemon(&dir, backend, &cfg).unwrap();
    let start = Instant::now();
    loop {
        let np = sb
            .probe_from_client(&["--tcp", "172.30.0.10:30190"])
            .unwrap_or_default();
        let cip = if backend == "ebpf" {
            sb.probe_from_cgroup(&["--tcp", "10.96.0.90:80"])
        } else {
            sb.probe_from_backend("a1", &["--tcp", "10.96.0.90:80"])
        }
        .unwrap_or_default();
        let dns = sh(&[
            "ip",
            "netns",
            "exec",
            &sb.node_ns(),
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            "@169.254.20.10",
            "web.t.svc.cluster.local",
        ])
        .unwrap_or_default();
        let traffic = !np.is_empty()
            && !cip.is_empty()
            && np.iter().chain(&cip).all(|l| l.starts_with("ok "));
        if traffic && dns.trim() == "10.96.0.90" {
            return Outcome {
                ok: true,
                log: sb.daemon_log(),
            };
        }
        if !sb.daemon_running() || start.elapsed() > Duration::from_secs(15) {
            return Outcome {
                ok: false,
                log: sb.daemon_log(),
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn both_backends_and_dns_work_with_exactly_the_daemonsets_capabilities() {
    let caps = daemonset_capabilities();
    let e = scenario("ebpf", "e", &caps, "");
    assert!(e.ok, "eBPF with {caps}:\n{}", e.log);
    // Everything it does at start worked, the NodePort range reservation included.
    let warnings: Vec<&str> = e
        .log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let i = scenario("iptables", "l", &caps, "iptablesMode: legacy\n");
    assert!(i.ok, "iptables-legacy with {caps}:\n{}", i.log);
}

#[test]
fn a_missing_capability_is_named_at_start() {
    let without_bpf = daemonset_capabilities()
        .replace("+bpf,", "")
        .replace(",+bpf", "");
    let e = scenario("ebpf", "n", &without_bpf, "");
    assert!(!e.ok);
    assert!(
        e.log.contains(
            "backend ebpf: missing capabilities: CAP_BPF (create maps and load programs)"
        ),
        "{}",
        e.log
    );
}
