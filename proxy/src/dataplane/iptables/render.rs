//! The pure half of the iptables backend: the desired state as kube-proxy-shaped chains under
//! the `SY-` prefix, as typed rules (the packet tracer walks these) rendered to one
//! `iptables-restore` input. One family per renderer: the IPv6 rules are the same shape and
//! go to `ip6tables-restore`.
//!
//! ```text
//! nat  PREROUTING/OUTPUT -> SY-SERVICES: ClusterIP -> SY-SVC-x (or SY-SVL-x under iTP=Local)
//!                                        externalIP/LB -> SY-EXT-x (via SY-FW-x with source ranges)
//!                                        dst-type LOCAL -> SY-NODEPORTS -> SY-EXT-x
//!      SY-SVC-x: affinity rchecks, statistic random -> SY-SEP-y: DNAT to the endpoint
//!      POSTROUTING -> SY-POSTROUTING: MASQUERADE what SY-MARK-MASQ marked
//! filter INPUT/FORWARD/OUTPUT (new) -> SY-FILTER: REJECT without endpoints, DROP for Local
//!      policy without local endpoints and for marked (source-range) drops
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use switchyard_model::{
    Backend, FrontendKind, IpFamily, Protocol, Route, ServicePortKey, ServicePortState,
};

pub const SERVICES: &str = "SY-SERVICES";
pub const NODEPORTS: &str = "SY-NODEPORTS";
pub const POSTROUTING: &str = "SY-POSTROUTING";
pub const MARK_MASQ: &str = "SY-MARK-MASQ";
pub const MARK_DROP: &str = "SY-MARK-DROP";
pub const FILTER: &str = "SY-FILTER";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// The family these rules are for (iptables or ip6tables).
    pub family: IpFamily,
    /// The cluster CIDRs of that family.
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub masquerade_mark: u32,
    pub drop_mark: u32,
    /// Name the endpoint on each endpoint jump. Off for large clusters (over
    /// `LARGE_CLUSTER_ENDPOINTS` endpoints), as kube-proxy does: comments make up much of
    /// the restore input and slow the kernel update.
    pub endpoint_comments: bool,
}

/// kube-proxy's `largeClusterEndpointsThreshold`.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn family_of(a: &IpAddr) -> IpFamily {
    if a.is_ipv4() {
        IpFamily::IPv4
    } else {
        IpFamily::IPv6
    }
}

impl RenderConfig {
    /// IPv4 rules.
    pub fn new(cluster_cidrs: &[IpNet], masquerade_all: bool, masquerade_bit: u8) -> RenderConfig {
        Self::for_family(
            IpFamily::IPv4,
            cluster_cidrs,
            masquerade_all,
            masquerade_bit,
        )
    }

    pub fn for_family(
        family: IpFamily,
        cluster_cidrs: &[IpNet],
        masquerade_all: bool,
        masquerade_bit: u8,
    ) -> RenderConfig {
        RenderConfig {
            family,
            cluster_cidrs: cluster_cidrs
                .iter()
                .filter(|c| family_of(&c.addr()) == family)
                .copied()
                .collect(),
            masquerade_all,
            masquerade_mark: 1 << masquerade_bit,
            drop_mark: 1 << (masquerade_bit + 1).min(31),
            endpoint_comments: true,
        }
    }

    fn ours(&self, a: &IpAddr) -> Option<IpAddr> {
        (family_of(a) == self.family).then_some(*a)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    Src(IpNet),
    NotSrc(IpNet),
    Dst(IpAddr),
    Proto(Protocol),
    DPort(u16),
    DstLocal,
    SrcLocal,
    Mark(u32),
    NotMark(u32),
    RecentCheck { name: String, seconds: u32 },
    RecentSet { name: String },
    Random(f64),
    New,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Jump(String),
    Dnat(IpAddr, u16),
    Masquerade,
    MarkOr(u32),
    MarkXor(u32),
    Reject,
    Drop,
    Return,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub comment: Option<String>,
    pub m: Vec<Match>,
    pub t: Target,
}

impl Rule {
    fn new(m: Vec<Match>, t: Target) -> Rule {
        Rule {
            comment: None,
            m,
            t,
        }
    }

    fn with_comment(mut self, c: &str) -> Rule {
        self.comment = Some(c.to_string());
        self
    }

    pub fn render(&self, chain: &str, out: &mut String) {
        let _ = write!(out, "-A {chain}");
        if let Some(c) = &self.comment {
            let _ = write!(out, " -m comment --comment \"{c}\"");
        }
        let proto = self.m.iter().find_map(|m| match m {
            Match::Proto(p) => Some(*p),
            _ => None,
        });
        for m in &self.m {
            let _ = match m {
                Match::Src(n) => write!(out, " -s {n}"),
                Match::NotSrc(n) => write!(out, " ! -s {n}"),
                Match::Dst(a) => write!(out, " -d {}", IpNet::from(*a)),
                Match::Proto(p) => write!(out, " -p {}", p.as_str().to_ascii_lowercase()),
                Match::DPort(p) => write!(
                    out,
                    " -m {} --dport {p}",
                    proto.map_or("tcp".into(), |p| p.as_str().to_ascii_lowercase())
                ),
                Match::DstLocal => write!(out, " -m addrtype --dst-type LOCAL"),
                Match::SrcLocal => write!(out, " -m addrtype --src-type LOCAL"),
                Match::Mark(m) => write!(out, " -m mark --mark {m:#x}/{m:#x}"),
                Match::NotMark(m) => write!(out, " -m mark ! --mark {m:#x}/{m:#x}"),
                Match::RecentCheck { name, seconds } => {
                    write!(
                        out,
                        " -m recent --name {name} --rcheck --seconds {seconds} --reap"
                    )
                }
                Match::RecentSet { name } => write!(out, " -m recent --name {name} --set"),
                Match::Random(p) => {
                    write!(out, " -m statistic --mode random --probability {p:.10}")
                }
                Match::New => write!(out, " -m conntrack --ctstate NEW"),
            };
        }
        let _ = match &self.t {
            Target::Jump(c) => writeln!(out, " -j {c}"),
            Target::Dnat(a, p) => writeln!(
                out,
                " -j DNAT --to-destination {}",
                std::net::SocketAddr::new(*a, *p)
            ),
            Target::Masquerade => writeln!(out, " -j MASQUERADE --random-fully"),
            Target::MarkOr(m) => writeln!(out, " -j MARK --or-mark {m:#x}"),
            Target::MarkXor(m) => writeln!(out, " -j MARK --xor-mark {m:#x}"),
            Target::Reject => writeln!(out, " -j REJECT"),
            Target::Drop => writeln!(out, " -j DROP"),
            Target::Return => writeln!(out, " -j RETURN"),
        };
    }
}

fn hash(s: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

pub fn chain(prefix: &str, key: &ServicePortKey) -> String {
    format!("SY-{prefix}-{}", hash(&key.to_string()))
}

fn sep_chain(key: &ServicePortKey, b: &Backend) -> String {
    format!("SY-SEP-{}", hash(&format!("{key} {b}")))
}

/// Everything one service port contributes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortRules {
    /// Its own nat chains.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Its rules in the shared dispatch chains.
    pub services: Vec<Rule>,
    pub nodeports: Vec<Rule>,
    pub filter: Vec<Rule>,
}

fn endpoints_chain(
    cfg: &RenderConfig,
    s: &ServicePortState,
    backends: &[Backend],
    masq_outside: bool,
    out: &mut PortRules,
) -> Vec<Rule> {
    let proto = s.key.protocol;
    let mut rules = Vec::new();
    if masq_outside {
        if cfg.masquerade_all {
            rules.push(Rule::new(vec![], Target::Jump(MARK_MASQ.into())));
        } else {
            for c in &cfg.cluster_cidrs {
                rules.push(Rule::new(
                    vec![Match::NotSrc(*c)],
                    Target::Jump(MARK_MASQ.into()),
                ));
            }
        }
    }
    let eps: Vec<(&Backend, String, IpAddr)> = backends
        .iter()
        .filter_map(|b| cfg.ours(&b.addr).map(|a| (b, sep_chain(&s.key, b), a)))
        .collect();
    if let Some(t) = s.affinity_timeout_seconds {
        for (_, sep, _) in &eps {
            rules.push(Rule::new(
                vec![Match::RecentCheck {
                    name: sep.clone(),
                    seconds: t,
                }],
                Target::Jump(sep.clone()),
            ));
        }
    }
    let n = eps.len();
    for (i, (b, sep, addr)) in eps.iter().enumerate() {
        let m = if i + 1 < n {
            #[allow(clippy::cast_precision_loss)]
            let p = 1.0 / (n - i) as f64;
            vec![Match::Random(p)]
        } else {
            vec![]
        };
        let jump = Rule::new(m, Target::Jump(sep.clone()));
        rules.push(if cfg.endpoint_comments {
            jump.with_comment(&format!("{} -> {b}", s.key))
        } else {
            jump
        });
        // Hairpin: an endpoint reaching itself through the service is masqueraded.
        let mut sep_rules = vec![Rule::new(
            vec![Match::Src(IpNet::from(*addr))],
            Target::Jump(MARK_MASQ.into()),
        )];
        let mut dnat_m = vec![Match::Proto(proto)];
        if s.affinity_timeout_seconds.is_some() {
            dnat_m.push(Match::RecentSet { name: sep.clone() });
        }
        sep_rules.push(Rule::new(dnat_m, Target::Dnat(*addr, b.port)));
        out.chains.insert(sep.clone(), sep_rules);
    }
    rules
}

fn dispatch(dst: IpAddr, proto: Protocol, port: u16, target: &str) -> Rule {
    Rule::new(
        vec![Match::Dst(dst), Match::Proto(proto), Match::DPort(port)],
        Target::Jump(target.to_string()),
    )
}

fn verdict(dst: Option<IpAddr>, local: bool, proto: Protocol, port: u16, t: Target) -> Rule {
    let mut m = Vec::new();
    if let Some(d) = dst {
        m.push(Match::Dst(d));
    }
    if local {
        m.push(Match::DstLocal);
    }
    m.push(Match::Proto(proto));
    m.push(Match::DPort(port));
    Rule::new(m, t)
}

fn route_verdict(r: Route<'_>) -> Option<Target> {
    match r {
        Route::Backends(_) => None,
        Route::Reject => Some(Target::Reject),
        Route::Drop => Some(Target::Drop),
    }
}

/// The rules of one service port (of the renderer's family; others yield nothing).
pub fn render_port(cfg: &RenderConfig, s: &ServicePortState) -> PortRules {
    let _span = tracing::trace_span!("service_port", port = %s.key).entered();
    let mut out = PortRules::default();
    if s.key.family != cfg.family {
        return out;
    }
    let proto = s.key.protocol;
    let comment = s.key.to_string();
    let svc = chain("SVC", &s.key);
    let svl = chain("SVL", &s.key);
    let ext = chain("EXT", &s.key);
    let fw = chain("FW", &s.key);

    if !s.cluster_backends.is_empty() {
        let rules = endpoints_chain(cfg, s, &s.cluster_backends, true, &mut out);
        out.chains.insert(svc.clone(), rules);
    }
    if !s.local_backends.is_empty() {
        let rules = endpoints_chain(cfg, s, &s.local_backends, false, &mut out);
        out.chains.insert(svl.clone(), rules);
    }
    let internal_chain = if s.internal_traffic_local { &svl } else { &svc };
    let has_external = s.frontends.iter().any(|f| f.kind.is_external());
    if has_external {
        let mut rules = Vec::new();
        if s.external_traffic_local {
            // Pods and the node itself keep reaching every endpoint.
            if !s.cluster_backends.is_empty() {
                for c in &cfg.cluster_cidrs {
                    rules.push(Rule::new(vec![Match::Src(*c)], Target::Jump(svc.clone())));
                }
                rules.push(Rule::new(
                    vec![Match::SrcLocal],
                    Target::Jump(MARK_MASQ.into()),
                ));
                rules.push(Rule::new(vec![Match::SrcLocal], Target::Jump(svc.clone())));
            }
            if !s.local_backends.is_empty() {
                rules.push(Rule::new(vec![], Target::Jump(svl.clone())));
            }
        } else if !s.cluster_backends.is_empty() {
            rules.push(Rule::new(vec![], Target::Jump(MARK_MASQ.into())));
            rules.push(Rule::new(vec![], Target::Jump(svc.clone())));
        }
        out.chains.insert(ext.clone(), rules);
        if !s.source_ranges.is_empty() {
            let mut rules: Vec<Rule> = s
                .source_ranges
                .iter()
                .filter(|r| family_of(&r.addr()) == cfg.family)
                .map(|r| Rule::new(vec![Match::Src(*r)], Target::Jump(ext.clone())))
                .collect();
            rules.push(
                Rule::new(vec![], Target::Jump(MARK_DROP.into()))
                    .with_comment("source not in loadBalancerSourceRanges"),
            );
            out.chains.insert(fw.clone(), rules);
        }
    }

    for f in &s.frontends {
        let Some(addr) = cfg.ours(&f.addr) else {
            continue;
        };
        match f.kind {
            FrontendKind::ClusterIP => match route_verdict(s.internal_route()) {
                None => out
                    .services
                    .push(dispatch(addr, proto, f.port, internal_chain).with_comment(&comment)),
                Some(t) => out
                    .filter
                    .push(verdict(Some(addr), false, proto, f.port, t)),
            },
            FrontendKind::NodePort => {
                out.nodeports
                    .push(dispatch(addr, proto, f.port, &ext).with_comment(&comment));
                if let Some(t) = route_verdict(s.external_route()) {
                    out.filter.push(verdict(Some(addr), true, proto, f.port, t));
                }
            }
            FrontendKind::ExternalIP | FrontendKind::LoadBalancer => {
                let target = if f.kind == FrontendKind::LoadBalancer && !s.source_ranges.is_empty()
                {
                    &fw
                } else {
                    &ext
                };
                out.services
                    .push(dispatch(addr, proto, f.port, target).with_comment(&comment));
                if let Some(t) = route_verdict(s.external_route()) {
                    out.filter
                        .push(verdict(Some(addr), false, proto, f.port, t));
                }
            }
        }
    }
    out
}

/// The chains every sync owns regardless of services.
pub fn fixed_nat(cfg: &RenderConfig) -> BTreeMap<String, Vec<Rule>> {
    let mut m = BTreeMap::new();
    m.insert(
        MARK_MASQ.into(),
        vec![Rule::new(vec![], Target::MarkOr(cfg.masquerade_mark))],
    );
    m.insert(
        MARK_DROP.into(),
        vec![Rule::new(vec![], Target::MarkOr(cfg.drop_mark))],
    );
    m.insert(
        POSTROUTING.into(),
        vec![
            Rule::new(vec![Match::NotMark(cfg.masquerade_mark)], Target::Return),
            Rule::new(vec![], Target::MarkXor(cfg.masquerade_mark)),
            Rule::new(vec![], Target::Masquerade)
                .with_comment("switchyard service traffic requiring SNAT"),
        ],
    );
    m
}

/// The jumps from the built-in chains into ours: (table, built-in chain, rule spec).
pub fn hooks() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        ("nat", "PREROUTING", vec!["-j", SERVICES]),
        ("nat", "OUTPUT", vec!["-j", SERVICES]),
        ("nat", "POSTROUTING", vec!["-j", POSTROUTING]),
        ("filter", "INPUT", vec!["-j", FILTER]),
        ("filter", "FORWARD", vec!["-j", FILTER]),
        ("filter", "OUTPUT", vec!["-j", FILTER]),
    ]
}

/// Assemble the dispatch chains from every port's contributions, in a stable order.
pub fn dispatch_chains(
    cfg: &RenderConfig,
    ports: &BTreeMap<ServicePortKey, PortRules>,
) -> (Vec<Rule>, Vec<Rule>, Vec<Rule>) {
    let mut services: Vec<Rule> = ports
        .values()
        .flat_map(|p| p.services.iter().cloned())
        .collect();
    services.push(
        Rule::new(vec![Match::DstLocal], Target::Jump(NODEPORTS.into()))
            .with_comment("NodePorts (keep last)"),
    );
    let nodeports = ports
        .values()
        .flat_map(|p| p.nodeports.iter().cloned())
        .collect();
    let mut filter = vec![
        Rule::new(vec![Match::Mark(cfg.drop_mark)], Target::Drop).with_comment("marked for drop"),
    ];
    filter.extend(ports.values().flat_map(|p| {
        p.filter.iter().cloned().map(|mut r| {
            r.m.insert(0, Match::New);
            r
        })
    }));
    (services, nodeports, filter)
}

/// One `iptables-restore --noflush` input. `chains` are written in full (declared, so
/// flushed first); `delete` are declared and removed.
pub fn restore_input(
    nat: &BTreeMap<String, Vec<Rule>>,
    filter: &BTreeMap<String, Vec<Rule>>,
    delete_nat: &BTreeSet<String>,
) -> String {
    let mut out = String::with_capacity(nat.values().map(Vec::len).sum::<usize>() * 120 + 1024);
    out.push_str("*nat\n");
    for c in nat.keys().chain(delete_nat.iter()) {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for (c, rules) in nat {
        for r in rules {
            r.render(c, &mut out);
        }
    }
    for c in delete_nat {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n*filter\n");
    for c in filter.keys() {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for (c, rules) in filter {
        for r in rules {
            r.render(c, &mut out);
        }
    }
    out.push_str("COMMIT\n");
    out
}
