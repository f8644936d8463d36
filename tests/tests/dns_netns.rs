//! A client namespace whose resolv.conf points at switchyard's DNS (search path and ndots:5
//! as in a pod) resolves short service names with the system resolver (`getent hosts`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use switchyard_tests::sandbox::{EtcNetns, Sandbox, require_root, sh};

#[test]
fn pod_resolv_conf_resolves_short_service_names() {
    require_root();
    let mut sb = Sandbox::create("syd1", &[]).unwrap();
    let etc = EtcNetns::resolv_conf(
        &sb.client_ns(),
        "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 172.30.0.10\noptions ndots:5 timeout:1 attempts:2\n",
    )
    .unwrap();
    let examples = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    sb.start_daemon(
        &examples,
        "none",
        "dns:\n  listen: ['172.30.0.10:53']\n  upstream: ['127.0.0.1:9']\n",
    )
    .unwrap();
    let getent = |name: &str| {
        sh(&[
            "ip",
            "netns",
            "exec",
            &sb.client_ns(),
            "getent",
            "hosts",
            name,
        ])
        .map_err(|e| e.to_string())
    };
    let t = Instant::now();
    loop {
        let got = getent("frontend").unwrap_or_else(|e| e);
        if got.contains("10.96.10.10") {
            assert!(got.contains("frontend.shop.svc.cluster.local"), "{got}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never resolved: {got:?}\n{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another namespace through the second search domain, and a headless endpoint.
    assert!(
        getent("kube-dns.kube-system")
            .unwrap()
            .contains("10.96.0.10")
    );
    assert!(getent("db-1.db").unwrap().contains("10.244.2.51"));
    // A name that does not exist fails, and because the cluster zone said NXDOMAIN under
    // every search domain, not because the lookup broke (a timeout fails getent too). The
    // bare name itself leaves the zone for an upstream this namespace cannot reach.
    let missing = getent("nosuchservice");
    assert!(
        missing.is_err(),
        "resolved a name that does not exist: {missing:?}"
    );
    for domain in [
        "shop.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ] {
        let name = format!("nosuchservice.{domain}");
        let dig = sh(&[
            "ip",
            "netns",
            "exec",
            &sb.client_ns(),
            "dig",
            "+time=2",
            "+tries=1",
            &name,
        ])
        .unwrap();
        assert!(dig.contains("status: NXDOMAIN"), "{name}: {dig}");
    }
    drop(etc);
}
