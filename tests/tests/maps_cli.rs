//! `switchyard maps` reads what a running eBPF daemon programmed, from its pinned maps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, bin, require_root, sh};

#[test]
fn maps_shows_the_running_daemons_frontends_and_backends() {
    require_root();
    let mut sb = Sandbox::create(
        "sym2",
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let svc = fixtures::service("t", "web", "10.96.0.80", &[Port::tcp("http", 80).to(8080)])
        + &fixtures::slice(
            "t",
            "web",
            "web-1",
            &[Port::tcp("http", 8080)],
            &[("10.244.1.11", Some("node-a"))],
        );
    std::fs::write(dir.join("all.yaml"), svc).unwrap();
    sb.start_daemon(&dir, "ebpf", "").unwrap();
    let b = bin("switchyard");
    let pins = sb.pin_dir.display().to_string();
    let start = Instant::now();
    loop {
        let out = sh(&[b.to_str().unwrap(), "maps", "--pin-dir", &pins])
            .unwrap_or_else(|e| e.to_string());
        if out.contains("10.96.0.80:80") && out.contains("10.244.1.11:8080") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{out}\n{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let json = sh(&[
        b.to_str().unwrap(),
        "maps",
        "--pin-dir",
        &pins,
        "-o",
        "json",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v.as_array().is_some_and(|a| !a.is_empty()), "{json}");
}
