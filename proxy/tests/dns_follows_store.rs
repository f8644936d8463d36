//! DNS is a consumer of the store of its own: changes of a headless service's endpoints, of an
//! endpoint's hostname and of an ExternalName target, made through the manifest source, are
//! answered by `dig` within 2 s. Once with the real daemon on `--backend none`, once with a
//! dataplane that fails every sync (the sync loop must not hold DNS back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::config::Config;
use switchyard::dataplane::BrokenDataplane;
use switchyard::metrics::Metrics;
use switchyard::store::Store;
use switchyard::sync::{SyncLoop, SyncTiming};
use switchyard_model::ProxyConfig;
use tokio_util::sync::CancellationToken;

const Z: &str = ".shop.svc.cluster.local";

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dig +short` answers, sorted; a failed lookup (timeout, refused) is an error, not "".
fn short(port: u16, args: &[&str]) -> Result<Vec<String>, String> {
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
        last = short(port, args);
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
        &[&format!("db{Z}")],
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
        &[&format!("db{Z}")],
        &["10.244.1.51", "10.244.3.77"],
        limit,
    );
    eprintln!("headless endpoint change answered after {took:?}");
    answers_within(port, &[&format!("db-1.db{Z}")], &["10.244.3.77"], limit);
    // An endpoint's hostname changes: the new name answers, the old one is gone.
    write(
        dir,
        &manifest(
            &[("10.244.1.51", "db-0"), ("10.244.3.77", "replica")],
            "payments.example.com",
        ),
    );
    answers_within(port, &[&format!("replica.db{Z}")], &["10.244.3.77"], limit);
    answers_within(port, &[&format!("db-1.db{Z}")], &["NXDOMAIN"], limit);
    answers_within(
        port,
        &["-x", "10.244.3.77"],
        &[&format!("replica.db{Z}.")],
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
        &[&format!("payments{Z}"), "CNAME"],
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

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
