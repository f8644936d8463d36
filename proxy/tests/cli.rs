//! The `switchyard` binary as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn switchyard(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plan_prints_every_service_port_of_the_examples() {
    let (ok, out, err) = switchyard(&["plan", "--manifests", "examples/"]);
    assert!(ok, "{err}");
    for want in [
        "shop/frontend:http/TCP IPv4\n  ClusterIP     10.96.10.10:80\n  NodePort      172.30.0.10:30080\n  LoadBalancer  172.30.0.100:80\n",
        "shop/cart:http/TCP IPv4  affinity=ClientIP(30s)",
        "shop/catalog:http/TCP IPv4  eTP=Local",
        "  external   -> 10.244.1.31:8080\n",
        "shop/search:http/TCP IPv6\n  ClusterIP     [fd00:96::40]:80\n",
        "monitoring/grafana:http/TCP IPv4\n  ClusterIP     10.96.20.20:3000\n  internal   -> REJECT\n",
        "monitoring/node-agent:metrics/TCP IPv4  iTP=Local",
        "shop/db (skipped: Headless)",
        "shop/payments (skipped: ExternalName)",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn plan_json_is_stable_and_filtered_by_label_selector() {
    let (ok, a, err) = switchyard(&[
        "plan",
        "--manifests",
        "examples/",
        "-o",
        "json",
        "-l",
        "tier notin (frontend),env=prod",
    ]);
    assert!(ok, "{err}");
    let (_, b, _) = switchyard(&[
        "plan",
        "--manifests",
        "examples/",
        "-o",
        "json",
        "-l",
        "tier notin (frontend),env=prod",
    ]);
    assert_eq!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    let mut services: Vec<&str> = v["servicePorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["service"].as_str().unwrap())
        .collect();
    services.dedup();
    assert_eq!(
        services,
        [
            "kube-system/kube-dns",
            "monitoring/node-agent",
            "shop/cart",
            "shop/catalog"
        ]
    );
}

#[test]
fn bad_selector_and_bad_config_fail_with_clear_errors() {
    let (ok, _, err) = switchyard(&["plan", "--manifests", "examples/", "-l", "tier in frontend"]);
    assert!(!ok);
    assert!(
        err.contains("label selector \"tier in frontend\": found 'frontend', expected: '('"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "syncPeriod: 30s\nnodePortAdresses: []\n").unwrap();
    let (ok, _, err) = switchyard(&[
        "plan",
        "--manifests",
        "examples/",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("config: field nodePortAdresses: unknown field `nodePortAdresses`"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_backend_that_is_not_available() {
    let (ok, _, err) = switchyard(&[
        "run",
        "--source",
        "manifests:examples/",
        "--backend",
        "ipvs",
    ]);
    assert!(!ok);
    assert!(err.contains("backend ipvs is not available"), "{err}");
    let (ok, _, err) = switchyard(&["run", "--source", "kube-api"]);
    assert!(!ok);
    assert!(err.contains("want `kube` or `manifests:DIR`"), "{err}");
}

#[test]
fn version_prints_the_version() {
    let (ok, out, _) = switchyard(&["version"]);
    assert!(ok);
    assert!(out.starts_with("switchyard "));
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Kills the daemon even when an assertion fails.
struct Daemon(std::process::Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn run_with_manifests_and_no_backend_syncs_and_reports_health_and_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "run",
                "--source",
                "manifests:examples/",
                "--backend",
                "none",
                "--node-name",
                "node-a",
            ])
            .args([
                "--healthz-bind-address",
                &addr,
                "--metrics-bind-address",
                &addr,
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = std::time::Instant::now();
    loop {
        if let Some(r) = http_get(&addr, "/healthz")
            && r.starts_with("HTTP/1.1 200")
        {
            assert!(r.contains("\"nodeEligible\": true"), "{r}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "daemon never became healthy"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Healthy comes first (as kube-proxy: not unhealthy before the health timeout); the
    // first sync follows.
    let m = loop {
        let m = http_get(&addr, "/metrics").unwrap_or_default();
        if m.contains("switchyard_service_ports 11")
            || start.elapsed() > std::time::Duration::from_secs(20)
        {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(m.contains("switchyard_service_ports 11"), "{m}");
    assert!(
        m.contains("switchyard_backend{backend=\"none\",reason=\"requested\"} 1"),
        "{m}"
    );
    // Present is not enough: the first sync was measured.
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert!(
        value("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        value("kubeproxy_sync_proxy_rules_duration_seconds_sum") > 0.0,
        "{m}"
    );
    assert!(
        value("kubeproxy_network_programming_duration_seconds_count") >= 1.0,
        "{m}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value("kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    assert!((now - last).abs() < 120.0, "last sync at {last}, now {now}");
}
