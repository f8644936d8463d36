//! `/healthz` and `/livez` as kube-proxy answers them, over real HTTP from the admin router,
//! with the real sync loop and manifest source: 200 while syncs land; 503 from both once a
//! dataplane that fails every sync leaves an update queued past the timeout; `/healthz`
//! (not `/livez`) 503 while the Node is tainted `ToBeDeletedByClusterAutoscaler` or being
//! deleted, and 200 again when it is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::admin::{self, Health};
use switchyard::dataplane::{BrokenDataplane, Dataplane, RecordingDataplane};
use switchyard::metrics::Metrics;
use switchyard::store::Store;
use switchyard::sync::{SyncLoop, SyncTiming};
use switchyard_model::ProxyConfig;
use switchyard_model::fixtures::{self, Port};
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_millis(600);

struct Running {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn node_yaml(extra_meta: &str, taints: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n{extra_meta}spec:\n  taints: [{taints}]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: 172.30.0.10}}\n"
    )
}

fn write_dir(dir: &Path, node: &str) {
    let svc = fixtures::service("shop", "web", "10.96.0.50", &[Port::tcp("http", 80)]);
    std::fs::write(dir.join("svc.yaml"), svc).unwrap();
    let tmp = dir.join(".node.tmp");
    std::fs::write(&tmp, node).unwrap();
    std::fs::rename(tmp, dir.join("node.yaml")).unwrap();
}

fn start(dir: &Path, dp: Box<dyn Dataplane>) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::new(
        ProxyConfig {
            node_name: "node-a".into(),
            ..ProxyConfig::default()
        },
        Arc::clone(&metrics),
    );
    let cancel = CancellationToken::new();
    let health = Health::new(TIMEOUT);
    let addr = rt.block_on(async {
        let sync = SyncLoop::new(
            Arc::clone(&store),
            dp,
            SyncTiming {
                min_sync_period: Duration::from_millis(50),
                // Full syncs keep falling due: each must land for the daemon to stay healthy.
                sync_period: Duration::from_millis(300),
                retry: Duration::from_millis(50),
            },
        )
        .with_health(Arc::clone(&health));
        tokio::spawn(sync.run(cancel.clone()));
        tokio::spawn(switchyard::source::manifests::run(
            dir.to_path_buf(),
            Some("node-a".into()),
            Arc::clone(&store),
            cancel.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = admin::router(health, Arc::clone(&metrics), Some(store), None);
        let c = cancel.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await
        });
        addr
    });
    Running {
        addr,
        metrics,
        cancel,
        _rt: rt,
    }
}

/// (status, headers and body)
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, "connection refused".into());
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (code, out)
}

fn wait_for(addr: SocketAddr, path: &str, code: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (c, r) = get(addr, path);
        if c == code {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {code}; last:\n{r}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn body_json(r: &str) -> serde_json::Value {
    let body = r.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn healthz_is_200_while_syncs_land_with_kube_proxys_body_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &node_yaml("", ""));
    let r = start(dir.path(), Box::new(RecordingDataplane::default()));
    let resp = wait_for(r.addr, "/healthz", 200, Duration::from_secs(5));
    let lower = resp.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/json"), "{resp}");
    assert!(lower.contains("x-content-type-options: nosniff"), "{resp}");
    let j = body_json(&resp);
    assert_eq!(j["nodeEligible"], true, "{resp}");
    assert!(j["lastUpdated"].as_str().unwrap().ends_with("+0000 UTC"));
    assert!(j["currentTime"].as_str().unwrap().ends_with("+0000 UTC"));
    // Several periodic full syncs later (each one queued, each one landing) still 200.
    std::thread::sleep(TIMEOUT * 2);
    assert_eq!(get(r.addr, "/healthz").0, 200);
    assert_eq!(get(r.addr, "/livez").0, 200);
    let m = r.metrics.encode();
    assert!(
        m.contains("kubeproxy_proxy_healthz_total{code=\"200\"}"),
        "{m}"
    );
    assert!(
        m.contains("kubeproxy_proxy_livez_total{code=\"200\"}"),
        "{m}"
    );
    drop(r);
}

#[test]
fn a_dataplane_failing_every_sync_makes_healthz_and_livez_503_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &node_yaml("", ""));
    let r = start(dir.path(), Box::new(BrokenDataplane));
    let started = Instant::now();
    let resp = wait_for(r.addr, "/healthz", 503, Duration::from_secs(5));
    assert!(
        started.elapsed() >= TIMEOUT / 2,
        "503 before the update was overdue"
    );
    let j = body_json(&resp);
    // Unhealthy for the dataplane, not for the node.
    assert_eq!(j["nodeEligible"], true, "{resp}");
    assert_eq!(j["lastUpdated"], "", "no sync ever landed: {resp}");
    assert_eq!(get(r.addr, "/livez").0, 503);
    let m = r.metrics.encode();
    assert!(
        m.contains("kubeproxy_proxy_healthz_total{code=\"503\"}"),
        "{m}"
    );
    assert!(
        m.contains("kubeproxy_proxy_livez_total{code=\"503\"}"),
        "{m}"
    );
    drop(r);
}

#[test]
fn a_node_on_its_way_out_fails_healthz_but_not_livez() {
    let dir = tempfile::tempdir().unwrap();
    let taint = "{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}";
    write_dir(dir.path(), &node_yaml("", taint));
    let r = start(dir.path(), Box::new(RecordingDataplane::default()));
    let resp = wait_for(r.addr, "/healthz", 503, Duration::from_secs(5));
    assert_eq!(body_json(&resp)["nodeEligible"], false, "{resp}");
    let live = wait_for(r.addr, "/livez", 200, Duration::from_secs(5));
    assert_eq!(body_json(&live)["nodeEligible"], false, "{live}");

    // The autoscaler changed its mind: the taint is gone.
    write_dir(dir.path(), &node_yaml("", ""));
    let resp = wait_for(r.addr, "/healthz", 200, Duration::from_secs(5));
    assert_eq!(body_json(&resp)["nodeEligible"], true, "{resp}");

    // The Node object is being deleted.
    write_dir(
        dir.path(),
        &node_yaml("  deletionTimestamp: '2026-12-02T09:00:00Z'\n", ""),
    );
    let resp = wait_for(r.addr, "/healthz", 503, Duration::from_secs(5));
    assert_eq!(body_json(&resp)["nodeEligible"], false, "{resp}");
    assert_eq!(get(r.addr, "/livez").0, 200);
    drop(r);
}

/// A healthCheckNodePort that something else holds: logged, counted, retried, and served
/// once the port is free; the daemon never stops for it.
#[test]
fn a_health_check_port_that_will_not_bind_is_retried_until_it_does() {
    use switchyard::healthcheck::{HealthCheckServers, Wanted};
    use switchyard_model::types::ServiceKey;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let health = Health::new(TIMEOUT);
    let mut wanted = Wanted {
        addresses: Some(vec![addr.ip()]),
        ..Wanted::default()
    };
    wanted
        .services
        .insert(addr.port(), (ServiceKey::new("t", "lb"), 2));
    let (tx, rx) = tokio::sync::watch::channel(wanted.clone());
    let cancel = CancellationToken::new();
    let servers = HealthCheckServers::new(health, Arc::clone(&metrics));
    rt.spawn(servers.run(rx, Duration::from_millis(100), cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics
        .encode()
        .contains("switchyard_health_check_node_port_bind_errors_total 1")
    {
        assert!(Instant::now() < deadline, "{}", metrics.encode());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(holder);
    let resp = wait_for(addr, "/", 200, Duration::from_secs(5));
    assert!(resp.contains("\"localEndpoints\":2"), "{resp}");
    // The service goes: the server closes.
    tx.send_replace(Wanted::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "still open");
        std::thread::sleep(Duration::from_millis(20));
    }
    cancel.cancel();
    rt.shutdown_timeout(Duration::from_secs(2));
}
