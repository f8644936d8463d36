//! Reaching the API server on a node without kube-proxy: the `kubernetes` Service IP routes
//! nowhere (the namespace has only loopback) and `KUBERNETES_SERVICE_HOST` points at it, as
//! kubelet sets it. The fake API server listens only on a direct address inside the
//! namespace. The daemon, started with `--master`, or with a kube-proxy
//! `KubeProxyConfiguration` whose `clientConnection.kubeconfig` names the server, lists,
//! watches and programs (iptables rules in the namespace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_model::fixtures::{self, Port};
use switchyard_tests::fake_api::{FakeApi, Resource};
use switchyard_tests::sandbox::{Netns, bin, http_get_in, in_netns, require_root, sh};

struct Daemon(Child, std::path::PathBuf);

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn populate(api: &FakeApi) {
    let svc = |ns: &str, name: &str, ip: &str, port: Port<'_>| {
        fixtures::to_json(&fixtures::service(ns, name, ip, &[port])).unwrap()
    };
    api.apply(
        Resource::Service,
        svc(
            "default",
            "kubernetes",
            "10.96.0.1",
            Port::tcp("https", 443),
        ),
    );
    api.apply(
        Resource::Service,
        svc("shop", "web", "10.96.0.50", Port::tcp("http", 80)),
    );
    let slice = fixtures::slice(
        "shop",
        "web",
        "web-1",
        &[Port::tcp("http", 8080)],
        &[("10.244.1.5", Some("node-a"))],
    );
    api.apply(Resource::EndpointSlice, fixtures::to_json(&slice).unwrap());
    api.apply(
        Resource::Node,
        json!({"metadata": {"name": "node-a"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.10"}]}}),
    );
}

fn start(ns: &str, dir: &std::path::Path, args: &[&str]) -> Daemon {
    let log_path = dir.join(format!("daemon-{}.log", args.len()));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("switchyard"))
        .args([
            "run",
            "--source",
            "kube",
            "--backend",
            "iptables",
            "--node-name",
            "node-a",
        ])
        .args(args)
        // What kubelet puts into every pod: the Service IP nothing routes yet.
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("SWITCHYARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Daemon(child, log_path)
}

/// `switchyard cleanup` of the iptables backend in namespace `ns`.
fn cleanup(ns: &str) {
    let bin_path = bin("switchyard");
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        bin_path.to_str().unwrap(),
        "cleanup",
        "--backend",
        "iptables",
    ])
    .unwrap();
}

fn rules(ns: &str) -> String {
    let save = ["iptables-save", "iptables-legacy-save", "iptables-nft-save"];
    save.iter()
        .filter_map(|s| sh(&["ip", "netns", "exec", ns, s]).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_for_rules(ns: &str, d: &Daemon, needle: &str) {
    wait_for_rules_within(ns, d, needle, Duration::from_secs(20));
}

fn wait_for_rules_within(ns: &str, d: &Daemon, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if rules(ns).contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{needle} never programmed\nrules:\n{}\ndaemon log:\n{}",
        rules(ns),
        d.log()
    );
}

fn scenario(ns: &Netns, api: &FakeApi, d: &Daemon) {
    wait_for_rules(&ns.0, d, "10.96.0.50/32");
    assert!(rules(&ns.0).contains("10.244.1.5:8080"), "{}", rules(&ns.0));
    // The watch is live: a service created now is programmed too.
    api.apply(
        Resource::Service,
        fixtures::to_json(&fixtures::service(
            "shop",
            "cart",
            "10.96.0.51",
            &[Port::tcp("http", 80)],
        ))
        .unwrap(),
    );
    wait_for_rules(&ns.0, d, "10.96.0.51/32");
    let log = d.log();
    assert!(
        !log.contains("10.96.0.1:443"),
        "the Service IP was used:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reaches_the_api_server_at_a_direct_address_only() {
    require_root();
    let ns = Netns::new("syb-api").unwrap();
    // The premise: from this namespace the `kubernetes` Service IP is unreachable.
    let unreachable = in_netns(&ns.0, || {
        std::net::TcpStream::connect_timeout(
            &"10.96.0.1:443".parse().unwrap(),
            Duration::from_secs(1),
        )
    })
    .unwrap();
    assert!(unreachable.is_err(), "10.96.0.1 answered");

    let listener = in_netns(&ns.0, || std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApi::start_on(listener).unwrap();
    populate(&api);
    let dir = tempfile::tempdir().unwrap();
    let url = api.url();

    // 1. `--master` (kube-proxy's flag), with kubelet's KUBERNETES_SERVICE_HOST in the way.
    {
        let d = start(
            &ns.0,
            dir.path(),
            &[
                "--master",
                &url,
                "--healthz-bind-address",
                "",
                "--metrics-bind-address",
                "",
            ],
        );
        scenario(&ns, &api, &d);
        assert!(d.log().contains("from=--master"), "{}", d.log());
    }
    api.delete(Resource::Service, "shop", "cart");
    cleanup(&ns.0);
    assert!(!rules(&ns.0).contains("10.96.0.50"), "{}", rules(&ns.0));

    // 2. The kube-proxy ConfigMap as is, its kubeconfig naming the server.
    let kubeconfig = dir.path().join("kubeconfig.conf");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let kubeadm = include_str!("../../proxy/tests/kube-proxy-kubeadm.yaml").replace(
        "/var/lib/kube-proxy/kubeconfig.conf",
        &kubeconfig.display().to_string(),
    );
    let cfg = dir.path().join("config.conf");
    std::fs::write(&cfg, kubeadm).unwrap();
    let d = start(&ns.0, dir.path(), &["--config", cfg.to_str().unwrap()]);
    scenario(&ns, &api, &d);
    let log = d.log();
    assert!(log.contains("from=kubeconfig"), "{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    // `mode: iptables` matches the backend in use; the conntrack sizing is not ours to do.
    assert!(
        warnings[0].contains("fields=conntrack.maxPerCore") && !warnings[0].contains("mode"),
        "{log}"
    );
    api.stop();
}

/// With no flag and no kubeconfig, KUBERNETES_SERVICE_HOST is the address; when the pod's
/// service-account files are missing, the error says what to set.
#[test]
fn in_cluster_failure_names_the_explicit_address_options() {
    let out = Command::new(bin("switchyard"))
        .args([
            "run",
            "--source",
            "kube",
            "--backend",
            "none",
            "--node-name",
            "n",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ])
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--master") && err.contains("KUBERNETES_SERVICE_HOST"),
        "{err}"
    );
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The API server refuses every watch for longer than the health timeout (2 × syncPeriod):
/// what was programmed stays, periodic syncs keep landing, `/healthz` stays 200 (as
/// kube-proxy's: an API outage must not drain every node from the load balancers) and
/// names the failing watches, the errors are counted; once the server is back, what
/// changed meanwhile is programmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_longer_than_the_health_timeout_keeps_rules_and_health() {
    require_root();
    let ns = Netns::new("syb-out").unwrap();
    let listener = in_netns(&ns.0, || std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApi::start_on(listener).unwrap();
    populate(&api);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "syncPeriod: 2s\nminSyncPeriod: 0s\nhealthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10249\n",
    )
    .unwrap();
    let d = start(
        &ns.0,
        dir.path(),
        &["--master", &api.url(), "--config", cfg.to_str().unwrap()],
    );
    wait_for_rules(&ns.0, &d, "10.96.0.50/32");
    let healthz = "127.0.0.1:10256".parse().unwrap();
    let metrics_addr = "127.0.0.1:10249".parse().unwrap();
    let scrape = || http_get_in(&ns.0, metrics_addr, "/metrics");
    let last_sync = |m: &str| metric(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");

    // The outage: every open watch ends and every new one is refused (503).
    api.refuse_watches(true);
    api.drop_watches();
    let synced_before = last_sync(&scrape());
    // A change made during the outage, for the recovery to bring.
    api.apply(
        Resource::Service,
        fixtures::to_json(&fixtures::service(
            "shop",
            "cart",
            "10.96.0.51",
            &[Port::tcp("http", 80)],
        ))
        .unwrap(),
    );
    let outage = Duration::from_secs(10);
    let t0 = Instant::now();
    let mut answers = 0;
    while t0.elapsed() < outage {
        let r = http_get_in(&ns.0, healthz, "/healthz");
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "healthz after {:?} of API outage:\n{r}\n{}",
            t0.elapsed(),
            d.log()
        );
        answers += 1;
        let rules = rules(&ns.0);
        assert!(
            rules.contains("10.96.0.50/32") && rules.contains("10.244.1.5:8080"),
            "the last good state was lost after {:?}:\n{rules}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(answers >= 15, "{answers} healthz answers in {outage:?}");
    let r = http_get_in(&ns.0, healthz, "/healthz");
    assert!(
        r.contains("\"apiWatch\"") && r.contains("\"Service\"") && r.contains("\"lastError\""),
        "healthz does not name the failing watch:\n{r}\n{}\n{}",
        scrape(),
        d.log()
    );
    let m = scrape();
    let errors = metric(&m, "switchyard_api_watch_errors_total{kind=\"Service\"}");
    assert!(errors >= 2.0, "watch errors not counted ({errors}):\n{m}");
    assert!(
        metric(
            &m,
            "switchyard_api_watch_last_error_timestamp_seconds{kind=\"Service\"}"
        ) > 0.0,
        "{m}"
    );
    assert!(
        last_sync(&m) > synced_before + 4.0,
        "periodic syncs stopped during the outage: {synced_before} -> {}",
        last_sync(&m)
    );
    assert!(
        !rules(&ns.0).contains("10.96.0.51"),
        "cart before the API came back"
    );

    // The server is back: the watcher's backoff (at most 30 s) finds it, and the Service
    // created meanwhile is programmed; its watch no longer counts as failing.
    api.refuse_watches(false);
    let t1 = Instant::now();
    wait_for_rules_within(&ns.0, &d, "10.96.0.51/32", Duration::from_secs(45));
    eprintln!("programmed {:?} after the API came back", t1.elapsed());
    let r = http_get_in(&ns.0, healthz, "/healthz");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.contains("\"Service\""), "{r}");
    drop(d);
    cleanup(&ns.0);
    api.stop();
}
