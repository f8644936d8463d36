//! `switchyard cleanup --kube-proxy` on a namespace holding what kube-proxy leaves behind:
//! its iptables rule set (legacy and nft, IPv4 and IPv6), its nftables tables and its ipsets.
//! Everything of kube-proxy's goes; kubelet's chains and unrelated rules stay; a second run
//! finds nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard_tests::sandbox::{Netns, bin, feed_in, require_root, sh};

const IPTABLES: &str = include_str!("../fixtures/kube-proxy-iptables.rules");
const NFT: &str = include_str!("../fixtures/kube-proxy.nft");

fn feed(ns: &str, cmd: &[&str], input: &str) {
    feed_in(ns, cmd, input).unwrap();
}

fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(cmd);
    sh(&a).unwrap()
}

fn cleanup(ns: &str) -> String {
    let b = bin("switchyard");
    in_ns(ns, &[b.to_str().unwrap(), "cleanup", "--kube-proxy"])
}

#[test]
fn cleanup_kube_proxy_removes_its_rules_tables_and_sets_and_nothing_else() {
    require_root();
    let ns = Netns::new("sykp").unwrap();
    let n = ns.0.as_str();
    for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
        feed(n, &[restore, "--noflush"], IPTABLES);
    }
    // IPv6 (the dual-stack proxier), kubelet's canary, and someone else's rule.
    in_ns(n, &["ip6tables-nft", "-t", "nat", "-N", "KUBE-SERVICES"]);
    in_ns(
        n,
        &[
            "ip6tables-nft",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-j",
            "KUBE-SERVICES",
        ],
    );
    in_ns(
        n,
        &["iptables-nft", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"],
    );
    in_ns(n, &["iptables-nft", "-t", "filter", "-N", "MY-CHAIN"]);
    in_ns(
        n,
        &[
            "iptables-nft",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "22",
            "-j",
            "MY-CHAIN",
        ],
    );
    feed(n, &["nft", "-f", "-"], NFT);
    in_ns(n, &["nft", "add", "table", "ip6", "kube-proxy"]);
    in_ns(n, &["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"]);
    in_ns(n, &["ipset", "create", "MY-SET", "hash:ip"]);
    // IPVS mode's state where the kernel has IPVS (Debian's kernels in `cargo xtask
    // vm-test`): a virtual service and kube-ipvs0 with a VIP.
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "ip_vs"])
        .status();
    let ipvs = std::path::Path::new("/proc/net/ip_vs").exists();
    if ipvs {
        in_ns(n, &["ip", "link", "add", "kube-ipvs0", "type", "dummy"]);
        in_ns(
            n,
            &["ip", "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0"],
        );
        in_ns(n, &["ipvsadm", "-A", "-t", "10.96.0.1:443", "-s", "rr"]);
        in_ns(
            n,
            &[
                "ipvsadm",
                "-a",
                "-t",
                "10.96.0.1:443",
                "-r",
                "10.0.0.1:6443",
                "-m",
            ],
        );
    }
    assert!(in_ns(n, &["iptables-nft-save"]).contains("KUBE-SVC-"));
    assert!(in_ns(n, &["nft", "list", "tables"]).contains("table ip kube-proxy"));

    let out = cleanup(n);
    assert!(out.contains("iptables-legacy: removed"), "{out}");
    assert!(out.contains("iptables-nft: removed"), "{out}");
    assert!(out.contains("ip6tables-nft: removed 1"), "{out}");
    assert!(
        out.contains("nftables: deleted table ip kube-proxy"),
        "{out}"
    );
    assert!(
        out.contains("nftables: deleted table ip6 kube-proxy"),
        "{out}"
    );
    assert!(out.contains("ipset: destroyed KUBE-CLUSTER-IP"), "{out}");
    if ipvs {
        assert!(out.contains("ipvs: flushed every virtual service"), "{out}");
        assert!(out.contains("ipvs: deleted link kube-ipvs0"), "{out}");
        let table = in_ns(n, &["ipvsadm", "-Ln"]);
        assert!(!table.contains("10.96.0.1:443"), "{table}");
    } else {
        assert!(out.contains("ipvs: not in this kernel"), "{out}");
    }

    for save in [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        let rules = in_ns(n, &[save]);
        for line in rules.lines() {
            let gone = [
                "KUBE-SERVICES",
                "KUBE-SVC-",
                "KUBE-SEP-",
                "KUBE-NODEPORTS",
                "KUBE-POSTROUTING",
                "KUBE-MARK-MASQ",
                "KUBE-FORWARD",
                "KUBE-PROXY-FIREWALL",
                "KUBE-EXTERNAL-SERVICES",
            ];
            assert!(
                !gone.iter().any(|g| line.contains(g)),
                "{save} still has {line:?}"
            );
        }
        if save.starts_with("iptables") {
            // kubelet's chain and its jump stay.
            assert!(rules.contains(":KUBE-FIREWALL"), "{save}: {rules}");
            assert!(
                rules.contains("-A INPUT -j KUBE-FIREWALL"),
                "{save}: {rules}"
            );
        }
    }
    let nft_rules = in_ns(n, &["iptables-nft-save"]);
    assert!(nft_rules.contains(":KUBE-KUBELET-CANARY"), "{nft_rules}");
    assert!(nft_rules.contains("-j MY-CHAIN"), "{nft_rules}");
    assert!(!in_ns(n, &["nft", "list", "tables"]).contains("kube-proxy"));
    let sets = in_ns(n, &["ipset", "list", "-n"]);
    assert_eq!(sets.trim(), "MY-SET");

    // Nothing left to do the second time.
    let again = cleanup(n);
    assert!(
        !again.contains("removed") && !again.contains("deleted"),
        "{again}"
    );
}
