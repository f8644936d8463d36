//! `switchyard cleanup --kube-proxy`: remove what kube-proxy leaves on a node, so migrating
//! needs no hand-written commands (kube-proxy's own `--cleanup`, for every mode at once):
//!
//! - iptables (legacy and nft, IPv4 and IPv6): kube-proxy's chains (`KUBE-SERVICES`,
//!   `KUBE-SVC-*`, `KUBE-SEP-*`, ...) flushed and deleted, and the jumps to them from other
//!   chains deleted. The chains kubelet owns (`KUBE-KUBELET-CANARY`, `KUBE-FIREWALL`,
//!   `KUBE-MARK-DROP`, `KUBE-IPTABLES-HINT`) stay.
//! - nftables: the `ip kube-proxy` and `ip6 kube-proxy` tables.
//! - IPVS mode: every IPVS virtual service (kube-proxy flushes them too), the `kube-ipvs0`
//!   dummy link and the `KUBE-*` ipsets.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use switchyard_model::IpFamily;

use super::iptables::Flavor;
use super::iptables::runner::{CommandRunner, Runner, Tool};
use crate::error::DataplaneError;
use crate::nl;

/// kube-proxy's fixed chains (iptables and IPVS modes).
const CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-MARK-MASQ",
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-LOOP-BACK",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// Prefixes of kube-proxy's per-service and per-endpoint chains.
const PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
    "KUBE-SVL-",
];

pub fn is_kube_proxy_chain(name: &str) -> bool {
    CHAINS.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one
/// `iptables-save` text, and the chains it removes; `None` when there are none.
pub fn iptables_restore(saved: &str) -> Option<(String, Vec<String>)> {
    // table -> (kube-proxy chains, jumps to them from other chains)
    let mut tables: BTreeMap<String, (BTreeSet<String>, Vec<String>)> = BTreeMap::new();
    let mut table = String::new();
    for line in saved.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(name) {
                tables
                    .entry(table.clone())
                    .or_default()
                    .0
                    .insert(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let mut words = rule.split_whitespace();
            let target = words
                .by_ref()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or_default();
            if !is_kube_proxy_chain(chain) && is_kube_proxy_chain(target) {
                tables
                    .entry(table.clone())
                    .or_default()
                    .1
                    .push(rule.to_string());
            }
        }
    }
    tables.retain(|_, (chains, _)| !chains.is_empty());
    if tables.is_empty() {
        return None;
    }
    let mut input = String::new();
    let mut removed = Vec::new();
    for (t, (chains, jumps)) in &tables {
        input.push_str(&format!("*{t}\n"));
        for c in chains {
            input.push_str(&format!(":{c} - [0:0]\n"));
        }
        for j in jumps {
            input.push_str(&format!("-D {j}\n"));
        }
        for c in chains {
            input.push_str(&format!("-X {c}\n"));
            removed.push(format!("{t}/{c}"));
        }
        input.push_str("COMMIT\n");
    }
    Some((input, removed))
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// IPVS's `IPVS_CMD_FLUSH`: delete every virtual service. `Ok(false)` when the kernel has
/// no IPVS (nothing can be left).
fn ipvs_flush() -> std::io::Result<bool> {
    use super::ipvs::{family_id, message};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
    const IPVS_CMD_FLUSH: u8 = 17;
    let family = match family_id() {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut sock = Socket::new(NETLINK_GENERIC)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&message(family, IPVS_CMD_FLUSH, 1, &[]), 0)?;
    let mut buf = vec![0u8; 8192];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    match nl::messages(&buf[..n]).next().and_then(|m| m.error()) {
        Some(e) if e != 0 => Err(std::io::Error::from_raw_os_error(e)),
        _ => Ok(true),
    }
}

/// Remove kube-proxy's state from this node (network namespace); returns one line per
/// thing done or found absent.
pub fn cleanup() -> Result<Vec<String>, DataplaneError> {
    let mut report = Vec::new();
    let mut runner = CommandRunner;
    for flavor in [Flavor::Legacy, Flavor::Nft] {
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            let tool = Tool::new(flavor, family);
            let Ok(saved) = runner.save(tool) else {
                continue;
            };
            if let Some((input, removed)) = iptables_restore(&saved) {
                runner
                    .restore(tool, &input)
                    .map_err(|source| DataplaneError::Iptables { source })?;
                report.push(format!(
                    "{}: removed {} kube-proxy chains ({})",
                    tool.cmd(),
                    removed.len(),
                    removed
                        .iter()
                        .take(6)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                        + if removed.len() > 6 { ", ..." } else { "" }
                ));
            }
        }
    }
    match run("nft", &["list", "tables"]) {
        Ok(tables) => {
            for family in ["ip", "ip6"] {
                if tables
                    .lines()
                    .any(|l| l.trim() == format!("table {family} kube-proxy"))
                {
                    run("nft", &["delete", "table", family, "kube-proxy"]).map_err(|e| {
                        DataplaneError::KubeProxyCleanup {
                            what: format!("nft delete table {family} kube-proxy: {e}"),
                        }
                    })?;
                    report.push(format!("nftables: deleted table {family} kube-proxy"));
                }
            }
        }
        Err(e) => report.push(format!("nftables: not checked ({e})")),
    }
    match ipvs_flush() {
        Ok(true) => report.push("ipvs: flushed every virtual service".into()),
        Ok(false) => report.push("ipvs: not in this kernel; nothing to remove".into()),
        Err(e) => {
            return Err(DataplaneError::KubeProxyCleanup {
                what: format!("IPVS flush: {e}"),
            });
        }
    }
    if run("ip", &["link", "show", "kube-ipvs0"]).is_ok() {
        run("ip", &["link", "del", "kube-ipvs0"]).map_err(|e| {
            DataplaneError::KubeProxyCleanup {
                what: format!("ip link del kube-ipvs0: {e}"),
            }
        })?;
        report.push("ipvs: deleted link kube-ipvs0".into());
    }
    match run("ipset", &["list", "-n"]) {
        Ok(sets) => {
            for set in sets.lines().filter(|s| s.starts_with("KUBE-")) {
                run("ipset", &["destroy", set]).map_err(|e| DataplaneError::KubeProxyCleanup {
                    what: format!("ipset destroy {set}: {e}"),
                })?;
                report.push(format!("ipset: destroyed {set}"));
            }
        }
        Err(e) => report.push(format!("ipset: not checked ({e})")),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kube_proxys_chains_and_the_jumps_to_them_go() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AB - [0:0]\n:KUBE-MARK-DROP - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-AB\n-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000\nCOMMIT\n*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let (input, removed) = iptables_restore(saved).unwrap();
        assert_eq!(removed, ["nat/KUBE-SERVICES", "nat/KUBE-SVC-AB"]);
        assert_eq!(
            input,
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AB - [0:0]\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-X KUBE-SERVICES\n-X KUBE-SVC-AB\nCOMMIT\n"
        );
        assert!(iptables_restore("*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n").is_none());
    }
}
