//! The iptables backend: kube-proxy-shaped rules under our own `SY-` chains, one
//! `iptables-restore --noflush` per sync. A ChangeSet rewrites only the dispatch chains and the
//! chains of the service ports that changed; a full sync rewrites everything and removes
//! stale chains. Works with iptables-legacy and iptables-nft. UDP conntrack entries that
//! would black-hole clients are deleted over ctnetlink after a sync (see `crate::conntrack`).

pub mod render;
pub mod tracer;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use switchyard_model::{ChangeSet, DesiredState, ServicePortKey, ServicePortState};

use self::render::{FILTER, NODEPORTS, PortRules, RenderConfig, Rule, SERVICES};
use super::Dataplane;
use crate::conntrack::{StaleUdp, UdpServices, touches_udp};
use crate::error::DataplaneError;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    fn restore(self) -> String {
        format!("{}-restore", self.name())
    }
    fn save(self) -> String {
        format!("{}-save", self.name())
    }
}

fn unavailable(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Unavailable {
        backend: "iptables",
        reason: reason.into(),
    }
}

fn failed(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Program {
        backend: "iptables",
        service: "-".into(),
        reason: reason.into(),
    }
}

fn save(flavor: Flavor) -> Option<String> {
    let out = Command::new(flavor.save()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rule_count(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Pick the flavor: as configured, or (auto) the one already holding more rules on this node,
/// like kube-proxy; nft when neither has any.
pub fn detect(mode: &str) -> Result<(Flavor, String), DataplaneError> {
    let usable = |f: Flavor| save(f).is_some();
    match mode {
        "legacy" | "nft" => {
            let f = if mode == "legacy" {
                Flavor::Legacy
            } else {
                Flavor::Nft
            };
            if usable(f) {
                Ok((f, "configured".into()))
            } else {
                Err(unavailable(format!(
                    "{} is missing or not permitted (needs root and the iptables package)",
                    f.save()
                )))
            }
        }
        _ => {
            let legacy = save(Flavor::Legacy).map(|t| rule_count(&t));
            let nft = save(Flavor::Nft).map(|t| rule_count(&t));
            match (legacy, nft) {
                (None, None) => Err(unavailable(
                    "neither iptables-legacy nor iptables-nft works here (needs root and the iptables package)",
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

fn restore(flavor: Flavor, input: &str) -> Result<(), DataplaneError> {
    let mut child = Command::new(flavor.restore())
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("running {}: {e}", flavor.restore())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| failed(format!("writing to {}: {e}", flavor.restore())))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("{}: {e}", flavor.restore())))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{} failed: {}",
            flavor.restore(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Our chains currently in the kernel, per table.
fn our_chains(flavor: Flavor) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut nat = BTreeSet::new();
    let mut filter = BTreeSet::new();
    let Some(text) = save(flavor) else {
        return (nat, filter);
    };
    let mut table = "";
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = if t == "nat" {
                "nat"
            } else if t == "filter" {
                "filter"
            } else {
                ""
            };
        } else if let Some(c) = l.strip_prefix(":SY-") {
            let name = format!("SY-{}", c.split_whitespace().next().unwrap_or(""));
            match table {
                "nat" => {
                    nat.insert(name);
                }
                "filter" => {
                    filter.insert(name);
                }
                _ => {}
            }
        }
    }
    (nat, filter)
}

fn iptables(flavor: Flavor, args: &[&str]) -> bool {
    Command::new(flavor.name())
        .args(["-w"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_hooks(flavor: Flavor) -> Result<(), DataplaneError> {
    for (table, chain, spec) in render::hooks() {
        let mut check = vec!["-t", table, "-C", chain];
        check.extend(&spec);
        if !iptables(flavor, &check) {
            let mut add = vec!["-t", table, "-I", chain, "1"];
            add.extend(&spec);
            if !iptables(flavor, &add) {
                return Err(failed(format!(
                    "cannot hook {table}/{chain} -> {}",
                    spec.join(" ")
                )));
            }
        }
    }
    Ok(())
}

/// Remove every hook and chain of ours from one flavor (a no-op when there are none).
pub fn cleanup_flavor(flavor: Flavor) -> Result<(), DataplaneError> {
    if save(flavor).is_none() {
        return Ok(());
    }
    for (table, chain, spec) in render::hooks() {
        let mut del = vec!["-t", table, "-D", chain];
        del.extend(&spec);
        while iptables(flavor, &del) {}
    }
    let (nat, filter) = our_chains(flavor);
    if nat.is_empty() && filter.is_empty() {
        return Ok(());
    }
    let mut input = String::from("*nat\n");
    for c in &nat {
        input.push_str(&format!(":{c} - [0:0]\n"));
    }
    for c in &nat {
        input.push_str(&format!("-X {c}\n"));
    }
    input.push_str("COMMIT\n*filter\n");
    for c in &filter {
        input.push_str(&format!(":{c} - [0:0]\n"));
    }
    for c in &filter {
        input.push_str(&format!("-X {c}\n"));
    }
    input.push_str("COMMIT\n");
    restore(flavor, &input)
}

/// Remove our state from both flavors.
pub fn cleanup_all() -> Result<(), DataplaneError> {
    cleanup_flavor(Flavor::Legacy)?;
    cleanup_flavor(Flavor::Nft)
}

#[derive(Debug)]
pub struct IptablesDataplane {
    pub flavor: Flavor,
    cfg: RenderConfig,
    ports: BTreeMap<ServicePortKey, PortRules>,
    states: BTreeMap<ServicePortKey, std::sync::Arc<ServicePortState>>,
    conntrack: StaleUdp,
}

impl IptablesDataplane {
    /// A renderer without kernel access (golden tests, tracing).
    pub fn start_unprivileged(flavor: Flavor, cfg: RenderConfig) -> IptablesDataplane {
        IptablesDataplane {
            flavor,
            cfg,
            ports: BTreeMap::new(),
            states: BTreeMap::new(),
            conntrack: StaleUdp::default(),
        }
    }

    pub fn start(
        flavor: Flavor,
        cfg: RenderConfig,
        metrics: Arc<Metrics>,
    ) -> Result<IptablesDataplane, DataplaneError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(unavailable("needs root (CAP_NET_ADMIN)"));
        }
        Ok(IptablesDataplane {
            flavor,
            cfg,
            ports: BTreeMap::new(),
            states: BTreeMap::new(),
            conntrack: StaleUdp::new(metrics),
        })
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

    fn filter_chains(&self) -> BTreeMap<String, Vec<Rule>> {
        let (_, _, filter) = render::dispatch_chains(&self.cfg, &self.ports);
        BTreeMap::from([(FILTER.to_string(), filter)])
    }

    /// The restore input a full sync writes (for golden tests).
    pub fn full_input(&mut self, state: &DesiredState, stale: &BTreeSet<String>) -> String {
        self.ports = state
            .values()
            .map(|s| (s.key.clone(), render::render_port(&self.cfg, s)))
            .collect();
        self.states = state.ports.clone();
        let nat = self.nat_chains(|_| true);
        let delete: BTreeSet<String> = stale
            .iter()
            .filter(|c| !nat.contains_key(*c))
            .cloned()
            .collect();
        render::restore_input(&nat, &self.filter_chains(), &delete)
    }

    /// The restore input for a ChangeSet (for golden tests): dispatch chains plus the chains
    /// of changed ports, and deletions of chains that went away.
    pub fn partial_input(&mut self, changes: &ChangeSet) -> String {
        let mut touched = BTreeSet::new();
        let mut gone = BTreeSet::new();
        for r in &changes.removed {
            if let Some(old) = self.ports.remove(&r.key) {
                gone.extend(old.chains.into_keys());
            }
            self.states.remove(&r.key);
        }
        for s in changes
            .added
            .iter()
            .chain(changes.changed.iter().map(|c| &c.new))
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
            self.states.insert(s.key.clone(), std::sync::Arc::clone(s));
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
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let input = self.partial_input(changes);
        restore(self.flavor, &input)?;
        if touches_udp(changes) {
            let mut udp = UdpServices::from_state(state);
            for r in &changes.removed {
                udp.add_removed(r);
            }
            self.conntrack.clear(&udp);
        }
        Ok(())
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let (stale_nat, _) = our_chains(self.flavor);
        let input = self.full_input(state, &stale_nat);
        restore(self.flavor, &input)?;
        ensure_hooks(self.flavor)?;
        self.conntrack.clear(&UdpServices::from_state(state));
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        cleanup_flavor(self.flavor)
    }
}
