//! Cluster DNS interception with iptables, in NodeLocal DNSCache's shape: the resolver also
//! listens on the cluster DNS Service's ClusterIP (put on the node by `dns_listen`), and
//! `raw` NOTRACK rules keep port-53 traffic to and from that address out of conntrack, so
//! the Service DNAT never applies and nothing is tracked; `filter` ACCEPT rules let it
//! through hosts whose policy drops. Turning interception off flushes the rules: the
//! Service DNAT sends queries to its endpoints again. (A killed daemon leaves the rules:
//! DNS waits for its restart, as with NodeLocal DNSCache; the eBPF backend falls back by
//! itself.)

use std::net::Ipv4Addr;

use switchyard_model::IpFamily;

use super::Flavor;
use super::runner::{CommandRunner, Runner, Tool};
use crate::dataplane::{DnsRedirector, Redirect};
use crate::error::DataplaneError;

pub const NOTRACK: &str = "SYDNS-NOTRACK";
pub const ACCEPT: &str = "SYDNS-ACCEPT";

/// (table, built-in chain, our chain).
const HOOKS: [(&str, &str, &str); 4] = [
    ("raw", "PREROUTING", NOTRACK),
    ("raw", "OUTPUT", NOTRACK),
    ("filter", "INPUT", ACCEPT),
    ("filter", "OUTPUT", ACCEPT),
];

/// The restore input for `ips` (none: empty chains).
pub fn restore_input(ips: &[Ipv4Addr]) -> String {
    let mut raw = format!("*raw\n:{NOTRACK} - [0:0]\n");
    let mut filter = format!("*filter\n:{ACCEPT} - [0:0]\n");
    for ip in ips {
        for proto in ["udp", "tcp"] {
            for (dir, port) in [("-d", "--dport"), ("-s", "--sport")] {
                raw.push_str(&format!(
                    "-A {NOTRACK} {dir} {ip}/32 -p {proto} -m {proto} {port} 53 -j CT --notrack\n"
                ));
                filter.push_str(&format!(
                    "-A {ACCEPT} {dir} {ip}/32 -p {proto} -m {proto} {port} 53 -j ACCEPT\n"
                ));
            }
        }
    }
    format!("{raw}COMMIT\n{filter}COMMIT\n")
}

pub struct IptablesDnsRedirect {
    tool: Tool,
    runner: Box<dyn Runner>,
    /// What the kernel has now (`None`: unknown, at start).
    applied: Option<Vec<Ipv4Addr>>,
}

impl std::fmt::Debug for IptablesDnsRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IptablesDnsRedirect")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl IptablesDnsRedirect {
    pub fn new(flavor: Flavor) -> IptablesDnsRedirect {
        Self::with(flavor, Box::new(CommandRunner))
    }

    pub fn with(flavor: Flavor, runner: Box<dyn Runner>) -> IptablesDnsRedirect {
        IptablesDnsRedirect {
            tool: Tool::new(flavor, IpFamily::IPv4),
            runner,
            applied: None,
        }
    }
}

fn failed(source: super::runner::RunError) -> DataplaneError {
    DataplaneError::Iptables { source }
}

impl DnsRedirector for IptablesDnsRedirect {
    fn set(&mut self, on: Option<&Redirect>) -> Result<(), DataplaneError> {
        let want: Vec<Ipv4Addr> = on.map(|r| r.service_ips.clone()).unwrap_or_default();
        if self.applied.as_ref() == Some(&want) {
            return Ok(());
        }
        self.runner
            .restore(self.tool, &restore_input(&want))
            .map_err(failed)?;
        for (table, hook, chain) in HOOKS {
            let present = self
                .runner
                .command(self.tool, &["-t", table, "-C", hook, "-j", chain])
                .is_ok();
            if !present {
                self.runner
                    .command(self.tool, &["-t", table, "-I", hook, "1", "-j", chain])
                    .map_err(failed)?;
            }
        }
        self.applied = Some(want);
        Ok(())
    }

    fn listens_on_service_ip(&self) -> bool {
        true
    }
}

/// Remove the hooks and chains (`switchyard cleanup`), going by `saved` (the flavor's IPv4
/// `-save` output): only a table that holds one of our chains is touched. A command naming a
/// table that does not exist would create it (iptables-legacy instantiates `raw` and `filter`
/// in the namespace), and every packet would then walk its empty chains.
pub fn cleanup(runner: &mut dyn Runner, flavor: Flavor, saved: &str) {
    let tool = Tool::new(flavor, IpFamily::IPv4);
    let ours = |chain: &str| saved.lines().any(|l| l.starts_with(&format!(":{chain} ")));
    for (table, hook, chain) in HOOKS {
        if !ours(chain) {
            continue;
        }
        while runner
            .command(tool, &["-t", table, "-D", hook, "-j", chain])
            .is_ok()
        {}
    }
    for (table, chain) in [("raw", NOTRACK), ("filter", ACCEPT)] {
        if !ours(chain) {
            continue;
        }
        let _ = runner.command(tool, &["-t", table, "-F", chain]);
        let _ = runner.command(tool, &["-t", table, "-X", chain]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_keep_dns_to_and_from_the_service_ip_out_of_conntrack() {
        let input = restore_input(&["10.96.0.10".parse().unwrap()]);
        assert!(input.contains(
            "-A SYDNS-NOTRACK -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --notrack\n"
        ));
        assert!(input.contains(
            "-A SYDNS-NOTRACK -s 10.96.0.10/32 -p tcp -m tcp --sport 53 -j CT --notrack\n"
        ));
        assert!(
            input.contains("-A SYDNS-ACCEPT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j ACCEPT\n")
        );
        assert_eq!(
            restore_input(&[]),
            "*raw\n:SYDNS-NOTRACK - [0:0]\nCOMMIT\n*filter\n:SYDNS-ACCEPT - [0:0]\nCOMMIT\n"
        );
    }
}
