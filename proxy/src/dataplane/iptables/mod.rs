//! The iptables backend: kube-proxy-shaped rules under our own `SY-` chains, one
//! `iptables-restore --noflush` per sync. A ChangeSet rewrites only the dispatch chains and the
//! chains of the service ports that changed; a full sync rewrites everything and removes
//! stale chains. Works with iptables-legacy and iptables-nft. UDP conntrack entries that
//! would black-hole clients are deleted over ctnetlink after a sync (see `crate::conntrack`).

pub mod dns;
pub mod render;
pub mod runner;
pub mod tracer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use switchyard_model::{ChangeSet, DesiredState, IpFamily, ServicePortKey, ServicePortState};

use self::render::{FILTER, NODEPORTS, PortRules, RenderConfig, Rule, SERVICES};
use self::runner::{CommandRunner, RunError, Runner, Tool};
use super::Dataplane;
use crate::config::IptablesMode;
use crate::conntrack::{StaleUdp, UdpServices};
use crate::error::DataplaneError;
use crate::metrics::Metrics;
use crate::metrics::TableLabel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flavor {
    Legacy,
    Nft,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Legacy => "iptables-legacy",
            Flavor::Nft => "iptables-nft",
        }
    }
    /// The command for one family: `iptables-legacy`, `ip6tables-nft`, ...
    pub fn cmd(self, family: IpFamily) -> String {
        match family {
            IpFamily::IPv4 => self.name().to_string(),
            IpFamily::IPv6 => self.name().replacen("iptables", "ip6tables", 1),
        }
    }
    fn save(self, family: IpFamily) -> String {
        format!("{}-save", self.cmd(family))
    }
}

fn missing(tool: String) -> DataplaneError {
    DataplaneError::ToolMissing {
        backend: "iptables",
        tool,
    }
}

fn failed(source: RunError) -> DataplaneError {
    DataplaneError::Iptables { source }
}

fn save(runner: &mut dyn Runner, flavor: Flavor, family: IpFamily) -> Option<String> {
    runner.save(Tool::new(flavor, family)).ok()
}

fn rule_count(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Pick the flavor: as configured, or (auto) the one already holding more rules on this node,
/// like kube-proxy; nft when neither has any.
pub fn detect(mode: IptablesMode) -> Result<(Flavor, String), DataplaneError> {
    let r = &mut CommandRunner;
    let mut usable = |f: Flavor| save(r, f, IpFamily::IPv4).is_some();
    match mode {
        IptablesMode::Legacy | IptablesMode::Nft => {
            let f = if mode == IptablesMode::Legacy {
                Flavor::Legacy
            } else {
                Flavor::Nft
            };
            if usable(f) {
                Ok((f, "configured".into()))
            } else {
                Err(missing(f.save(IpFamily::IPv4)))
            }
        }
        IptablesMode::Auto => {
            let legacy = save(r, Flavor::Legacy, IpFamily::IPv4).map(|t| rule_count(&t));
            let nft = save(r, Flavor::Nft, IpFamily::IPv4).map(|t| rule_count(&t));
            match (legacy, nft) {
                (None, None) => Err(missing(
                    "both iptables-legacy-save and iptables-nft-save (needs root and the iptables package)".into(),
                )),
                (Some(l), Some(n)) if l > n => Ok((
                    Flavor::Legacy,
                    format!("auto: legacy holds {l} rules, nft {n}"),
                )),
                (Some(_), Some(n)) => Ok((Flavor::Nft, format!("auto: nft holds {n} rules"))),
                (Some(_), None) => Ok((Flavor::Legacy, "auto: only legacy works".into())),
                (None, Some(_)) => Ok((Flavor::Nft, "auto: only nft works".into())),
            }
        }
    }
}

/// What of ours is in the kernel now, from one `*-save`.
#[derive(Debug, Default)]
struct Existing {
    nat: BTreeSet<String>,
    filter: BTreeSet<String>,
    /// The jumps from built-in chains, as (table, "-A CHAIN spec") lines.
    jumps: BTreeSet<(String, String)>,
}

fn existing(runner: &mut dyn Runner, flavor: Flavor, family: IpFamily) -> Existing {
    save(runner, flavor, family).map_or_else(Existing::default, |t| parse_existing(&t))
}

fn parse_existing(text: &str) -> Existing {
    let mut e = Existing::default();
    let mut table = String::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(c) = l.strip_prefix(":SY-") {
            let name = format!("SY-{}", c.split_whitespace().next().unwrap_or(""));
            match table.as_str() {
                "nat" => {
                    e.nat.insert(name);
                }
                "filter" => {
                    e.filter.insert(name);
                }
                _ => {}
            }
        } else if l.starts_with("-A ") && l.contains(" -j SY-") && !l.starts_with("-A SY-") {
            e.jumps.insert((table.clone(), l.to_string()));
        }
    }
    e
}

/// The hook rules missing from `e`, as `-I` lines for the restore input, per table.
fn missing_hooks(e: &Existing) -> Vec<(&'static str, String)> {
    render::hooks()
        .into_iter()
        .filter(|(table, chain, spec)| {
            !e.jumps.contains(&(
                (*table).to_string(),
                format!("-A {chain} {}", spec.join(" ")),
            ))
        })
        .map(|(table, chain, spec)| (table, format!("-I {chain} 1 {}", spec.join(" "))))
        .collect()
}

/// `input` (a restore input of ours) with the hook rules `tool`'s tables lack inserted (the
/// IPVS backend's companion rules use the same hooks).
pub fn with_missing_hooks(runner: &mut dyn Runner, tool: Tool, input: &str) -> String {
    let e = existing(runner, tool.flavor, tool.family);
    insert_in_tables(input, &missing_hooks(&e))
}

/// Put `lines` at the end of their table's section of a restore input.
fn insert_in_tables(input: &str, lines: &[(&'static str, String)]) -> String {
    if lines.is_empty() {
        return input.to_string();
    }
    let mut out = String::with_capacity(input.len() + lines.len() * 40);
    let mut table = "";
    for l in input.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter" };
        }
        if l == "COMMIT" {
            for (t, add) in lines {
                if *t == table {
                    out.push_str(add);
                    out.push('\n');
                }
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Remove every hook and chain of ours from one flavor, both families (a no-op when there
/// are none).
pub fn cleanup_flavor(flavor: Flavor) -> Result<(), DataplaneError> {
    cleanup_with(&mut CommandRunner, flavor)
}

/// `cleanup_flavor` through any runner.
pub fn cleanup_with(runner: &mut dyn Runner, flavor: Flavor) -> Result<(), DataplaneError> {
    if let Some(saved) = save(runner, flavor, IpFamily::IPv4) {
        dns::cleanup(runner, flavor, &saved);
    }
    cleanup_family(runner, flavor, IpFamily::IPv4)?;
    cleanup_family(runner, flavor, IpFamily::IPv6)
}

fn cleanup_family(
    runner: &mut dyn Runner,
    flavor: Flavor,
    family: IpFamily,
) -> Result<(), DataplaneError> {
    let Some(saved) = save(runner, flavor, family) else {
        return Ok(());
    };
    let e = parse_existing(&saved);
    let tool = Tool::new(flavor, family);
    for (table, chain, spec) in render::hooks() {
        let line = format!("-A {chain} {}", spec.join(" "));
        if !e.jumps.contains(&(table.to_string(), line)) {
            continue;
        }
        let mut del = vec!["-t", table, "-D", chain];
        del.extend(&spec);
        // A hook may have been inserted twice (by hand, or an older version): all go.
        while runner.command(tool, &del).is_ok() {}
    }
    if e.nat.is_empty() && e.filter.is_empty() {
        return Ok(());
    }
    // Only the tables that hold our chains: a restore naming another would create it.
    let mut input = String::new();
    for (table, chains) in [("nat", &e.nat), ("filter", &e.filter)] {
        if chains.is_empty() {
            continue;
        }
        input.push_str(&format!("*{table}\n"));
        for c in chains {
            input.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in chains {
            input.push_str(&format!("-X {c}\n"));
        }
        input.push_str("COMMIT\n");
    }
    runner.restore(tool, &input).map_err(failed)
}

/// Remove our state from both flavors.
pub fn cleanup_all() -> Result<(), DataplaneError> {
    cleanup_flavor(Flavor::Legacy)?;
    cleanup_flavor(Flavor::Nft)
}

/// The rules of one family (iptables or ip6tables): a renderer that remembers what it last
/// rendered per service port, so a ChangeSet rewrites only what changed.
#[derive(Debug)]
pub struct IptablesFamily {
    pub flavor: Flavor,
    cfg: RenderConfig,
    ports: BTreeMap<ServicePortKey, PortRules>,
}

impl IptablesFamily {
    pub fn new(flavor: Flavor, cfg: RenderConfig) -> IptablesFamily {
        IptablesFamily {
            flavor,
            cfg,
            ports: BTreeMap::new(),
        }
    }

    fn tool(&self) -> Tool {
        Tool::new(self.flavor, self.cfg.family)
    }

    fn mine(&self, key: &ServicePortKey) -> bool {
        key.family == self.cfg.family
    }

    fn nat_chains(&self, which: impl Fn(&ServicePortKey) -> bool) -> BTreeMap<String, Vec<Rule>> {
        let mut nat = render::fixed_nat(&self.cfg);
        let (services, nodeports, _) = render::dispatch_chains(&self.cfg, &self.ports);
        nat.insert(SERVICES.into(), services);
        nat.insert(NODEPORTS.into(), nodeports);
        for (k, p) in &self.ports {
            if which(k) {
                nat.extend(p.chains.iter().map(|(c, r)| (c.clone(), r.clone())));
            }
        }
        nat
    }

    /// How many rules this family owns per table (kube-proxy's `iptables_total`).
    fn rule_counts(&self) -> (usize, usize) {
        let (services, nodeports, filter) = render::dispatch_chains(&self.cfg, &self.ports);
        let nat = render::fixed_nat(&self.cfg)
            .values()
            .map(Vec::len)
            .sum::<usize>()
            + services.len()
            + nodeports.len()
            + self
                .ports
                .values()
                .flat_map(|p| p.chains.values())
                .map(Vec::len)
                .sum::<usize>();
        (nat, filter.len())
    }

    fn filter_chains(&self) -> BTreeMap<String, Vec<Rule>> {
        let (_, _, filter) = render::dispatch_chains(&self.cfg, &self.ports);
        BTreeMap::from([(FILTER.to_string(), filter)])
    }

    /// The restore input of a full sync: every chain, stale chains deleted.
    fn full_input(&mut self, state: &DesiredState, stale: &BTreeSet<String>) -> String {
        let endpoints: usize = state
            .values()
            .filter(|s| self.mine(&s.key))
            .map(|s| s.cluster_backends.len().max(s.local_backends.len()))
            .sum();
        self.cfg.endpoint_comments = endpoints <= render::LARGE_CLUSTER_ENDPOINTS;
        self.ports = state
            .values()
            .filter(|s| self.mine(&s.key))
            .map(|s| (s.key.clone(), render::render_port(&self.cfg, s)))
            .collect();
        let nat = self.nat_chains(|_| true);
        let delete: BTreeSet<String> = stale
            .iter()
            .filter(|c| !nat.contains_key(*c))
            .cloned()
            .collect();
        render::restore_input(&nat, &self.filter_chains(), &delete)
    }

    /// The restore input for a ChangeSet: dispatch chains plus the chains of changed ports,
    /// and deletions of chains that went away.
    fn partial_input(&mut self, changes: &ChangeSet) -> String {
        let family = self.cfg.family;
        let mut touched = BTreeSet::new();
        let mut gone = BTreeSet::new();
        for r in &changes.removed {
            if let Some(old) = self.ports.remove(&r.key) {
                gone.extend(old.chains.into_keys());
            }
        }
        for s in changes
            .added
            .iter()
            .chain(changes.changed.iter().map(|c| &c.new))
            .filter(|s| s.key.family == family)
        {
            let new = render::render_port(&self.cfg, s);
            if let Some(old) = self.ports.get(&s.key) {
                gone.extend(
                    old.chains
                        .keys()
                        .filter(|c| !new.chains.contains_key(*c))
                        .cloned(),
                );
            }
            self.ports.insert(s.key.clone(), new);
            touched.insert(s.key.clone());
        }
        let nat = self.nat_chains(|k| touched.contains(k));
        render::restore_input(&nat, &self.filter_chains(), &gone)
    }

    /// The rules as typed chains (for the tracer).
    pub fn rules(&self) -> (BTreeMap<String, Vec<Rule>>, BTreeMap<String, Vec<Rule>>) {
        (self.nat_chains(|_| true), self.filter_chains())
    }

    pub fn config(&self) -> &RenderConfig {
        &self.cfg
    }

    fn apply(
        &mut self,
        runner: &mut dyn Runner,
        changes: &ChangeSet,
    ) -> Result<(), DataplaneError> {
        let mine = |s: &&Arc<ServicePortState>| s.key.family == self.cfg.family;
        if !(changes.added.iter().any(|s| mine(&s))
            || changes.removed.iter().any(|s| mine(&s))
            || changes.changed.iter().any(|c| mine(&&c.new)))
        {
            return Ok(());
        }
        let input = self.partial_input(changes);
        runner.restore(self.tool(), &input).map_err(failed)
    }

    /// One save (our chains and hooks as the kernel has them), one restore: stale chains
    /// deleted and missing hooks inserted in the same transaction, so no extra `iptables`
    /// call has to load a large ruleset again.
    fn full_sync(
        &mut self,
        runner: &mut dyn Runner,
        state: &DesiredState,
    ) -> Result<(), DataplaneError> {
        let e = existing(runner, self.flavor, self.cfg.family);
        let input = self.full_input(state, &e.nat);
        let input = insert_in_tables(&input, &missing_hooks(&e));
        runner.restore(self.tool(), &input).map_err(failed)
    }
}

/// The iptables backend: IPv4 rules, IPv6 rules when ip6tables works here (as kube-proxy
/// runs one proxier per family), and the stale-UDP conntrack cleanup for both.
#[derive(Debug)]
pub struct IptablesBackend {
    families: Vec<IptablesFamily>,
    runner: Box<dyn Runner>,
    conntrack: StaleUdp,
}

/// What the iptables backend renders for.
#[derive(Debug, Clone)]
pub struct IptablesConfig {
    pub flavor: Flavor,
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
}

impl IptablesBackend {
    /// On this node: IPv4 must work; IPv6 is added when `ip6tables` of the same flavor works
    /// (else its service ports are left unprogrammed, with a warning).
    pub fn start(
        cfg: &IptablesConfig,
        metrics: Arc<Metrics>,
    ) -> Result<IptablesBackend, DataplaneError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(DataplaneError::NeedsPrivilege {
                backend: "iptables",
                what: "root (CAP_NET_ADMIN)",
            });
        }
        let mut needs = vec![crate::caps::NET_ADMIN];
        if cfg.flavor == Flavor::Legacy {
            needs.push(crate::caps::NET_RAW);
        }
        let lacking = crate::caps::missing(&needs);
        if !lacking.is_empty() {
            return Err(DataplaneError::MissingCapabilities {
                backend: "iptables",
                missing: crate::caps::describe(&lacking),
            });
        }
        let mut runner = CommandRunner;
        if save(&mut runner, cfg.flavor, IpFamily::IPv4).is_none() {
            return Err(missing(cfg.flavor.save(IpFamily::IPv4)));
        }
        let v6 = save(&mut runner, cfg.flavor, IpFamily::IPv6).is_some();
        if !v6 {
            tracing::warn!(
                tool = %cfg.flavor.save(IpFamily::IPv6),
                "ip6tables does not work here: IPv6 service ports will not be programmed"
            );
        }
        Ok(Self::with(
            cfg,
            v6,
            Box::new(runner),
            StaleUdp::new(metrics),
        ))
    }

    /// With any runner and conntrack cleaner (fakes in tests).
    pub fn with(
        cfg: &IptablesConfig,
        ipv6: bool,
        runner: Box<dyn Runner>,
        conntrack: StaleUdp,
    ) -> IptablesBackend {
        let render = |f| {
            RenderConfig::for_family(
                f,
                &cfg.cluster_cidrs,
                cfg.masquerade_all,
                cfg.masquerade_bit,
            )
        };
        let mut families = vec![IptablesFamily::new(cfg.flavor, render(IpFamily::IPv4))];
        if ipv6 {
            families.push(IptablesFamily::new(cfg.flavor, render(IpFamily::IPv6)));
        }
        IptablesBackend {
            families,
            runner,
            conntrack,
        }
    }

    pub fn families(&self) -> impl Iterator<Item = &IptablesFamily> + '_ {
        self.families.iter()
    }

    /// A refused restore is counted as kube-proxy counts it; a landed one updates the
    /// rule counts.
    fn account(&self, partial: bool, result: &Result<(), DataplaneError>) {
        let m = self.conntrack.metrics();
        if result.is_err() {
            m.iptables_restore_failures.inc();
            if partial {
                m.iptables_partial_restore_failures.inc();
            }
            return;
        }
        let (mut nat, mut filter) = (0, 0);
        for f in &self.families {
            let (n, fl) = f.rule_counts();
            nat += n;
            filter += fl;
        }
        for (table, n) in [("nat", nat), ("filter", filter)] {
            m.iptables_rules
                .get_or_create(&TableLabel {
                    table: table.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

impl Dataplane for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let result = self
            .families
            .iter_mut()
            .try_for_each(|f| f.apply(self.runner.as_mut(), changes));
        self.account(true, &result);
        result?;
        self.conntrack.clear_after(changes, state)?;
        Ok(())
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let result = self
            .families
            .iter_mut()
            .try_for_each(|f| f.full_sync(self.runner.as_mut(), state));
        self.account(false, &result);
        result?;
        self.conntrack.clear(&UdpServices::from_state(state))?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let flavor = self.families[0].flavor;
        cleanup_with(self.runner.as_mut(), flavor)
    }

    fn dns_redirector(&self) -> Option<Box<dyn crate::dataplane::DnsRedirector>> {
        Some(Box::new(dns::IptablesDnsRedirect::new(
            self.families[0].flavor,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:SY-SERVICES - [0:0]\n:SY-SVC-1 - [0:0]\n-A PREROUTING -j SY-SERVICES\n-A SY-SERVICES -d 10.96.0.1/32 -j SY-SVC-1\nCOMMIT\n*filter\n:SY-FILTER - [0:0]\n-A INPUT -j SY-FILTER\nCOMMIT\n";

    #[test]
    fn a_full_sync_inserts_only_the_missing_hooks_in_its_one_restore() {
        let e = parse_existing(SAVED);
        assert_eq!(
            e.nat,
            BTreeSet::from(["SY-SERVICES".into(), "SY-SVC-1".into()])
        );
        assert_eq!(e.filter, BTreeSet::from(["SY-FILTER".into()]));
        let missing = missing_hooks(&e);
        let lines: Vec<String> = missing.iter().map(|(t, l)| format!("{t} {l}")).collect();
        assert_eq!(
            lines,
            [
                "nat -I OUTPUT 1 -j SY-SERVICES",
                "nat -I POSTROUTING 1 -j SY-POSTROUTING",
                "filter -I FORWARD 1 -j SY-FILTER",
                "filter -I OUTPUT 1 -j SY-FILTER",
            ]
        );
        let input = "*nat\n:SY-SERVICES - [0:0]\nCOMMIT\n*filter\n:SY-FILTER - [0:0]\nCOMMIT\n";
        assert_eq!(
            insert_in_tables(input, &missing),
            "*nat\n:SY-SERVICES - [0:0]\n-I OUTPUT 1 -j SY-SERVICES\n-I POSTROUTING 1 -j SY-POSTROUTING\nCOMMIT\n*filter\n:SY-FILTER - [0:0]\n-I FORWARD 1 -j SY-FILTER\n-I OUTPUT 1 -j SY-FILTER\nCOMMIT\n"
        );
        // All hooks present: nothing to add.
        let all = "*nat\n-A PREROUTING -j SY-SERVICES\n-A OUTPUT -j SY-SERVICES\n-A POSTROUTING -j SY-POSTROUTING\nCOMMIT\n*filter\n-A INPUT -j SY-FILTER\n-A FORWARD -j SY-FILTER\n-A OUTPUT -j SY-FILTER\nCOMMIT\n";
        assert!(missing_hooks(&parse_existing(all)).is_empty());
    }
}
