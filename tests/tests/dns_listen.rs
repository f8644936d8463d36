//! DNS listen addresses never take the daemon down and are provisioned on the node:
//! a port held by someone else is an error named in the log, `/healthz` and a metric, retried
//! until it binds, while the proxy keeps syncing; NodeLocal DNSCache's `169.254.20.10`,
//! absent from the node, is added (to `lo`, host scope, as this kernel has no dummy links)
//! and answers; `switchyard cleanup` removes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::sandbox::{Netns, bin, http_get_in, in_netns, require_root, sh};

struct Daemon(Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn examples() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../examples").to_string()
}

fn start(ns: &str, dir: &std::path::Path, args: &[&str]) -> Daemon {
    let log = dir.join("daemon.log");
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("switchyard"))
        .args(["run", "--source"])
        .arg(format!("manifests:{}", examples()))
        .args(["--backend", "none", "--node-name", "node-a"])
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .args(["--metrics-bind-address", "127.0.0.1:10256"])
        .args(args)
        .env("SWITCHYARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon(child, log)
}

fn get(ns: &str, path: &'static str) -> String {
    http_get_in(ns, "127.0.0.1:10256".parse().unwrap(), path)
}

fn dig(ns: &str, server: &str, port: &str, name: &str) -> String {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "dig",
        "+short",
        "+time=1",
        "+tries=1",
        "-p",
        port,
        &format!("@{server}"),
        name,
    ])
    .unwrap_or_default()
}

fn until(what: &str, d: &mut Daemon, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            matches!(d.0.try_wait(), Ok(None)),
            "{what}: the daemon exited:\n{}",
            d.log()
        );
        assert!(start.elapsed() < within, "{what}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dns_port_held_elsewhere_is_retried_and_never_stops_the_proxy() {
    require_root();
    let ns = Netns::new("sydl1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Someone else holds 127.0.0.1:5353/udp.
    let holder = in_netns(&ns.0, || UdpSocket::bind("127.0.0.1:5353").unwrap()).unwrap();
    let mut d = start(&ns.0, dir.path(), &["--dns-listen", "127.0.0.1:5353"]);
    until(
        "the proxy syncs and healthz names the DNS error",
        &mut d,
        Duration::from_secs(20),
        || {
            let h = get(&ns.0, "/healthz");
            h.starts_with("HTTP/1.1 200")
                && h.contains("\"127.0.0.1:5353\":\"error: binding 127.0.0.1:5353")
        },
    );
    let m = get(&ns.0, "/metrics");
    assert!(
        m.contains("switchyard_dns_listening{address=\"127.0.0.1:5353\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_dns_listen_errors_total{address=\"127.0.0.1:5353\"}"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_service_ports 11"),
        "the proxy synced: {m}"
    );
    assert!(
        d.log().contains("DNS cannot serve this address; retrying"),
        "{}",
        d.log()
    );

    // The port is freed: DNS comes up by itself.
    drop(holder);
    until(
        "DNS answers after the port is free",
        &mut d,
        Duration::from_secs(15),
        || {
            dig(
                &ns.0,
                "127.0.0.1",
                "5353",
                "frontend.shop.svc.cluster.local",
            )
            .trim()
                == "10.96.10.10"
        },
    );
    let h = get(&ns.0, "/healthz");
    assert!(h.contains("\"127.0.0.1:5353\":\"serving\""), "{h}");
    // Nothing changed in the manifest directory: it was read once (its own reads are not
    // changes; they once made it reload every 100 ms).
    let loads = d.log().matches("manifests loaded").count();
    assert_eq!(loads, 1, "{}", d.log());
}

#[test]
fn the_node_local_address_is_provisioned_served_and_cleaned_up() {
    require_root();
    let ns = Netns::new("sydl2").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(&ns.0, dir.path(), &["--dns-listen", "169.254.20.10:53"]);
    until(
        "169.254.20.10 answers",
        &mut d,
        Duration::from_secs(20),
        || {
            dig(
                &ns.0,
                "169.254.20.10",
                "53",
                "frontend.shop.svc.cluster.local",
            )
            .trim()
                == "10.96.10.10"
        },
    );
    let addrs = sh(&["ip", "-n", &ns.0, "addr", "show", "dev", "lo"]).unwrap();
    assert!(
        addrs.contains("inet 169.254.20.10/32 scope host lo"),
        "{addrs}"
    );
    let h = get(&ns.0, "/healthz");
    assert!(h.contains("serving (added to lo, scope host"), "{h}");
    drop(d);

    let cfg = dir.path().join("config.yaml");
    // A pin directory of this test's own: cleanup must not touch the host's.
    std::fs::write(
        &cfg,
        "bpfPinDir: /sys/fs/bpf/sydl2-none\ndns:\n  listen: ['169.254.20.10:53']\n",
    )
    .unwrap();
    let b = bin("switchyard");
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        b.to_str().unwrap(),
        "cleanup",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .unwrap_or_else(|e| format!("{e}"));
    assert!(
        out.contains("dns: removed 169.254.20.10/32 from lo"),
        "{out}"
    );
    let addrs = sh(&["ip", "-n", &ns.0, "addr", "show", "dev", "lo"]).unwrap();
    assert!(!addrs.contains("169.254.20.10"), "{addrs}");
}
