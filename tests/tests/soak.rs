//! Restarts and an upgrade under load (`sy-soak`, the short form of `cargo xtask soak`):
//! SIGTERM and restart, SIGKILL and restart, and the debug build replaced by the release
//! build, each while short connections, long streams, an affinity service and DNS lookups
//! run through every path. The eBPF backend loses no connection and no stream; the iptables
//! backend keeps its rules across restarts as kube-proxy does. Then kernel state damaged by
//! hand is repaired by the next full sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;
use switchyard_tests::sandbox::{bin, require_root};

/// One at a time: each measures failures under load and must not share the CPUs with
/// another's load.
static SERIAL: Mutex<()> = Mutex::new(());

/// The other build for the upgrade: the release binary `cargo xtask test` builds for the
/// image before the tests run.
fn release_build() -> PathBuf {
    let debug = bin("switchyard");
    let release = debug
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("release/switchyard");
    assert!(
        release.is_file(),
        "{} is missing: the upgrade step needs a second build (`cargo build --release -p \
         switchyard`; `cargo xtask test` builds it for the image first)",
        release.display()
    );
    release
}

fn soak(backend: &str) -> Vec<Value> {
    require_root();
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(bin("sy-soak"))
        .args(["--backend", backend, "--load-ms", "3000", "--json"])
        .arg(json.path())
        .arg("--from")
        .arg(bin("switchyard"))
        .arg("--to")
        .arg(release_build())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "sy-soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    assert_eq!(rows.len(), 4 * 8, "{stdout}");
    rows
}

/// Every stream survives, the affinity service keeps its backend, both endpoints serve the
/// other paths; new connections: none fails with `strict` (eBPF), otherwise (iptables, whose
/// masquerade shares the node's source ports with the node's own connections, as
/// kube-proxy's does) isolated failures of at most 0.5% that also happen with no event,
/// and no path out for more than a second.
fn check_traffic(rows: &[Value], strict: bool) {
    for r in rows {
        let t = &r["tally"];
        let what = format!(
            "{} {} {} {}",
            r["backend"], r["event"], r["path"], r["kind"]
        );
        let attempted = t["attempted"].as_u64().unwrap();
        assert!(attempted > 0, "{what}: no load ran");
        match r["kind"].as_str().unwrap() {
            "dns" => {}
            "stream" => {
                assert_eq!(t["streams"], 4, "{what}");
                assert_eq!(t["broken"], 0, "{what}: {t}");
            }
            kind => {
                let failed = t["failed"].as_u64().unwrap();
                if strict {
                    assert_eq!(failed, 0, "{what}: {t}");
                } else {
                    assert!(failed * 200 <= attempted, "{what}: {t}");
                    assert!(t["outage_ms"].as_u64().unwrap() <= 1000, "{what}: {t}");
                }
                let answered = t["backends"].as_object().unwrap().len();
                if kind == "affinity" {
                    assert_eq!(answered, 1, "{what}: {t}");
                } else {
                    // Both endpoints served: the load was balanced, not pinned by accident.
                    assert_eq!(answered, 2, "{what}: {t}");
                }
            }
        }
    }
}

fn dns<'a>(rows: &'a [Value], event: &str) -> &'a Value {
    &rows
        .iter()
        .find(|r| r["kind"] == "dns" && r["event"] == event)
        .unwrap()["tally"]
}

/// A clean stop or an upgrade hands DNS back to the kube-dns endpoints before the listener
/// goes (one query caught in flight at that moment may time out).
fn check_dns_handover(rows: &[Value]) {
    for event in ["SIGTERM, restart", "upgrade"] {
        let t = dns(rows, event);
        assert!(t["failed"].as_u64().unwrap() <= 1, "{event}: {t}");
    }
}

#[test]
fn ebpf_restarts_and_an_upgrade_lose_no_connection_and_no_stream() {
    let rows = soak("ebpf");
    check_traffic(&rows, true);
    check_dns_handover(&rows);
    // A killed resolver's interception lapses with its heartbeat (1 s): lookups fail for
    // about that long.
    let killed = dns(&rows, "SIGKILL, restart");
    assert!(killed["outage_ms"].as_u64().unwrap() <= 1600, "{killed}");
}

#[test]
fn iptables_restarts_and_an_upgrade_keep_the_rules_as_kube_proxy_does() {
    let rows = soak("iptables");
    check_traffic(&rows, false);
    check_dns_handover(&rows);
}

/// Kernel state damaged by hand while the daemon runs (map entries deleted, programs
/// detached, pins removed, chains flushed and deleted, the DNS listen address deleted): the
/// next full sync (syncPeriod 2 s here) puts everything back.
fn tamper(backend: &str) {
    require_root();
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(bin("sy-soak"))
        .args([
            "tamper",
            "--backend",
            backend,
            "--sync-period",
            "2s",
            "--json",
        ])
        .arg(json.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "sy-soak tamper failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    assert!(rows.len() >= 3, "{stdout}");
    for r in &rows {
        let what = &r["what"];
        let ms = r["repaired_ms"].as_u64();
        assert!(
            ms.is_some_and(|ms| ms <= 5000),
            "{what}: not repaired within 5 s at syncPeriod 2 s\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if r["restored_check"] != true {
            assert_eq!(
                r["broke"], true,
                "{what}: the damage never reached traffic\n{stdout}"
            );
        }
    }
}

#[test]
fn ebpf_damage_to_maps_programs_pins_and_the_dns_address_is_repaired() {
    tamper("ebpf");
}

#[test]
fn iptables_damage_to_chains_and_the_dns_address_is_repaired() {
    tamper("iptables");
}

/// IPVS (Debian's kernels in the VM: `cargo xtask vm-test --test soak -- ipvs`, which
/// `cargo xtask test` runs): virtual services deleted with ipvsadm, the VIPs taken off
/// `sy-ipvs0`, the companion `SY-` chains deleted.
#[test]
fn ipvs_damage_to_virtual_services_vips_and_chains_is_repaired() {
    if !switchyard_tests::sandbox::kernel_has_ipvs() {
        assert!(
            std::env::var_os("SY_VM_KERNEL").is_none(),
            "IPVS is missing from the VM's kernel"
        );
        eprintln!(
            "ipvs tamper NOT RUN on this kernel (no IPVS, CONFIG_IP_VS unset): `cargo xtask vm-test --test soak -- ipvs` runs it on Debian's 6.1 and 6.12"
        );
        return;
    }
    tamper("ipvs");
}

/// The IPVS rows of the README's tamper table (`cargo xtask vm-test --test
/// soak:ipvs_tamper_table -- --ignored`): both sync periods, printed.
#[test]
#[ignore = "a figure for the README, run by hand in the VM"]
fn ipvs_tamper_table() {
    require_root();
    let out = Command::new(bin("sy-soak"))
        .args([
            "tamper",
            "--backend",
            "ipvs",
            "--sync-period",
            "30s",
            "--sync-period",
            "2s",
        ])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
