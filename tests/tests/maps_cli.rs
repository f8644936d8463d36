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

fn web(n: u8) -> String {
    fixtures::service(
        "t",
        &format!("web{n}"),
        &format!("10.96.0.{}", 80 + n),
        &[Port::tcp("http", 80).to(8080)],
    ) + &fixtures::slice(
        "t",
        &format!("web{n}"),
        &format!("web{n}-1"),
        &[Port::tcp("http", 8080)],
        &[("10.244.1.11", Some("node-a"))],
    )
}

/// `max_entries` of a pinned map, from bpftool.
fn max_entries(pin: &std::path::Path) -> u64 {
    let out = sh(&[
        "bpftool",
        "-j",
        "map",
        "show",
        "pinned",
        pin.to_str().unwrap(),
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["max_entries"].as_u64().unwrap()
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} within {secs} s\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pinned maps are reused across restarts (that keeps connections), so a changed
/// `maxServices` must resize them, carrying their entries over; a size too small for what
/// they hold must stop the start naming the value needed, with the maps left as they were.
/// A cluster larger than the maps is reported by `/healthz` and a metric, naming the setting.
#[test]
fn max_services_resizes_the_pinned_maps_and_a_full_map_is_reported() {
    require_root();
    let mut sb = Sandbox::create(
        "sym3",
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |n: u8| {
        let all: String = (0..n).map(web).collect();
        std::fs::write(dir.join("all.yaml"), all).unwrap();
    };
    write(5);
    let b = bin("switchyard");
    let pins = sb.pin_dir.display().to_string();
    let maps =
        || sh(&[b.to_str().unwrap(), "maps", "--pin-dir", &pins]).unwrap_or_else(|e| e.to_string());
    let all = |n: u8| {
        let m = maps();
        (0..n).all(|i| m.contains(&format!("10.96.0.{}:80", 80 + i)))
    };
    let cfg = |max: u32| {
        format!(
            "healthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10249\nmaxServices: {max}\n"
        )
    };
    let ns = sb.node_ns();
    let get = |path: &str, port: u16| {
        switchyard_tests::sandbox::http_get_in(
            &ns,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            path,
        )
    };

    sb.start_daemon(&dir, "ebpf", &cfg(8)).unwrap();
    wait_for(
        "five services programmed",
        20,
        || all(5),
        || sb.daemon_log(),
    );
    assert_eq!(max_entries(&sb.pin_dir.join("SY_SETS")), 24);
    sb.stop_daemon();

    // Raised: the maps grow and keep what they held.
    sb.start_daemon(&dir, "ebpf", &cfg(64)).unwrap();
    wait_for(
        "the resize logged",
        20,
        || sb.daemon_log().contains("entries carried over"),
        || sb.daemon_log(),
    );
    assert_eq!(max_entries(&sb.pin_dir.join("SY_SETS")), 192);
    assert_eq!(max_entries(&sb.pin_dir.join("SY_FRONTENDS4")), 512);
    let log = sb.daemon_log();
    assert!(
        log.lines().any(|l| l.contains("SY_SETS")
            && l.contains("carried over")
            && !l.contains("entries=0")),
        "{log}"
    );
    assert!(all(5), "{}", maps());
    sb.stop_daemon();

    // Lowered below what the maps hold: the start fails naming the setting and the value
    // that fits, and the pinned maps are untouched.
    sb.start_daemon(&dir, "ebpf", &cfg(1)).unwrap();
    wait_for(
        "the daemon to exit",
        20,
        || !sb.daemon_running(),
        String::new,
    );
    let log = sb.daemon_log();
    assert!(
        log.contains("already holds") && log.contains("set maxServices to at least 2"),
        "{log}"
    );
    assert_eq!(max_entries(&sb.pin_dir.join("SY_SETS")), 192);
    assert!(all(5), "{}", maps());

    // Room for three service ports (ids 1..maxServices-1): /healthz names the others and
    // the setting to raise, and a metric counts them.
    sb.start_daemon(&dir, "ebpf", &cfg(4)).unwrap();
    wait_for(
        "/healthz naming the full map",
        30,
        || {
            let h = get("/healthz", 10256);
            h.contains("capacity") && h.contains("raise maxServices")
        },
        || get("/healthz", 10256) + &sb.daemon_log(),
    );
    let h = get("/healthz", 10256);
    assert!(h.starts_with("HTTP/1.1 503"), "{h}");
    let metrics = get("/metrics", 10249);
    let unprogrammed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_dataplane_unprogrammed_service_ports "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(unprogrammed, 2, "{metrics}");
    // Room again: /healthz recovers with the next change.
    write(3);
    wait_for(
        "healthy again",
        40,
        || get("/healthz", 10256).starts_with("HTTP/1.1 200"),
        || get("/healthz", 10256) + &sb.daemon_log(),
    );
    assert!(all(3), "{}", maps());
}

/// The periodic full sync (read in the background while changes land) puts back an entry
/// someone deleted from the maps, and keeps the changes made meanwhile.
#[test]
fn a_periodic_full_sync_repairs_a_deleted_frontend() {
    use switchyard::dataplane::ebpf::io::{AyaMaps, MapIo, Op};
    require_root();
    let mut sb = Sandbox::create(
        "sym4",
        &[BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11))],
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), (0..3).map(web).collect::<String>()).unwrap();
    sb.start_daemon(
        &dir,
        "ebpf",
        "syncPeriod: 2s\nmetricsBindAddress: 127.0.0.1:10249\n",
    )
    .unwrap();
    let pins = sb.pin_dir.clone();
    let dump = || AyaMaps::from_pins(&pins).and_then(|m| m.dump());
    wait_for(
        "three services programmed",
        20,
        || dump().is_ok_and(|d| d.frontends4.len() >= 3),
        || sb.daemon_log(),
    );
    let before = dump().unwrap();
    let (k, _) = before.frontends4.iter().next().unwrap();
    let mut maps = AyaMaps::from_pins(&pins).unwrap();
    maps.write(&Op::DelFrontend4(*k)).unwrap();
    assert!(!dump().unwrap().frontends4.contains_key(k));
    // A change lands while the repair is due.
    std::fs::write(dir.join("more.yaml"), web(3)).unwrap();
    wait_for(
        "the deleted frontend back, the new service programmed",
        15,
        || {
            dump().is_ok_and(|d| {
                d.frontends4.contains_key(k) && d.frontends4.len() > before.frontends4.len()
            })
        },
        || sb.daemon_log(),
    );
    let after = dump().unwrap();
    for (key, v) in &before.frontends4 {
        assert_eq!(after.frontends4.get(key), Some(v), "{after:?}");
    }
    assert!(
        sb.daemon_log()
            .contains("the service maps differ from what was programmed"),
        "the repair was not reported: {}",
        sb.daemon_log()
    );

    // The periodic full syncs after it find the maps as programmed (checked beside the
    // writer): they keep running, write nothing, and changes keep landing.
    let ns = sb.node_ns();
    let full_syncs = || {
        switchyard_tests::sandbox::http_get_in(
            &ns,
            std::net::SocketAddr::from(([127, 0, 0, 1], 10249)),
            "/metrics",
        )
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_full_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_default()
    };
    let fulls = full_syncs();
    std::fs::write(dir.join("more2.yaml"), web(4)).unwrap();
    wait_for(
        "two more periodic full syncs, the fifth service programmed",
        20,
        || {
            full_syncs() >= fulls + 2
                && dump().is_ok_and(|d| d.frontends4.len() > after.frontends4.len())
        },
        || sb.daemon_log(),
    );
    let last = dump().unwrap();
    for (key, v) in &after.frontends4 {
        assert_eq!(last.frontends4.get(key), Some(v), "{last:?}");
    }
    assert_eq!(
        sb.daemon_log()
            .matches("the service maps differ from what was programmed")
            .count(),
        1,
        "{}",
        sb.daemon_log()
    );
}
