//! The IPVS backend's message layer: generic-netlink IPVS messages laid out as in the
//! kernel's `include/uapi/linux/ip_vs.h`, the plan of operations for a ChangeSet (virtual
//! services, real servers, VIPs bound to a local interface, ipset entries for masquerade),
//! and detection of kernel support (the `IPVS` generic-netlink family). On a kernel without
//! IPVS the backend refuses to start with the reason.

use std::net::IpAddr;

use switchyard_model::{ChangeSet, FrontendKind, IpFamily, Protocol, Route, ServicePortState};

use crate::error::DataplaneError;
use crate::nl::{self, nested, nla};

pub mod writer;
pub use writer::{IpvsConfig, IpvsDataplane};

// Generic netlink (linux/genetlink.h) and IPVS (linux/ip_vs.h) constants.
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 0x1;

pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_SET_CONFIG: u8 = 12;
pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;

pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;

pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_SCHED1`: sh-fallback / mh-fallback.
pub const IP_VS_SVC_F_SCHED_FALLBACK: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2`: sh-port / mh-port.
pub const IP_VS_SVC_F_SCHED_PORT: u32 = 0x0010;
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
pub use crate::nl::NLA_F_NESTED;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// An IPVS virtual service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VirtualService {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: String,
    /// Persistence (ClientIP affinity) timeout in seconds.
    pub persistence: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
}

/// One step of programming IPVS for a ChangeSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    BindAddress(IpAddr),
    UnbindAddress(IpAddr),
    AddService(VirtualService),
    UpdateService(VirtualService),
    DelService(VirtualService),
    AddDest(VirtualService, RealServer),
    DelDest(VirtualService, RealServer),
    /// ipset entry (set name, `addr,proto:port`) the masquerade rules match on.
    IpsetAdd(String, String),
    IpsetDel(String, String),
}

/// `union nf_inet_addr`: 16 bytes, IPv4 in the first four.
fn inet_addr(a: IpAddr) -> [u8; 16] {
    let mut o = [0u8; 16];
    match a {
        IpAddr::V4(v) => o[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => o.copy_from_slice(&v.octets()),
    }
    o
}

fn af(a: IpAddr) -> u16 {
    if a.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// The `IPVS_CMD_ATTR_SERVICE` nest identifying (and, with `full`, describing) a service.
pub fn service_attrs(s: &VirtualService, full: bool) -> Vec<u8> {
    let mut inner = Vec::new();
    nla(&mut inner, IPVS_SVC_ATTR_AF, &af(s.addr).to_ne_bytes());
    nla(
        &mut inner,
        IPVS_SVC_ATTR_PROTOCOL,
        &u16::from(s.protocol.number()).to_ne_bytes(),
    );
    nla(&mut inner, IPVS_SVC_ATTR_ADDR, &inet_addr(s.addr));
    nla(&mut inner, IPVS_SVC_ATTR_PORT, &s.port.to_be_bytes());
    if full {
        let mut sched = s.scheduler.as_bytes().to_vec();
        sched.push(0);
        nla(&mut inner, IPVS_SVC_ATTR_SCHED_NAME, &sched);
        // struct ip_vs_flags { __u32 flags; __u32 mask; }
        let mut flags = if s.persistence.is_some() {
            IP_VS_SVC_F_PERSISTENT
        } else {
            0
        };
        // sh and mh: hash the client's port too (flows of one client spread as the eBPF
        // backend's Maglev does), and fall back to another real server when the chosen one
        // is draining (weight 0).
        if s.scheduler == "sh" || s.scheduler == "mh" {
            flags |= IP_VS_SVC_F_SCHED_FALLBACK | IP_VS_SVC_F_SCHED_PORT;
        }
        let mut f = Vec::new();
        f.extend_from_slice(&flags.to_ne_bytes());
        f.extend_from_slice(&u32::MAX.to_ne_bytes());
        nla(&mut inner, IPVS_SVC_ATTR_FLAGS, &f);
        nla(
            &mut inner,
            IPVS_SVC_ATTR_TIMEOUT,
            &s.persistence.unwrap_or(0).to_ne_bytes(),
        );
        // The kernel reads the netmask raw: all ones for IPv4, the prefix length (compared
        // as a host-order number) for IPv6.
        let mask: [u8; 4] = if s.addr.is_ipv4() {
            u32::MAX.to_ne_bytes()
        } else {
            128u32.to_ne_bytes()
        };
        nla(&mut inner, IPVS_SVC_ATTR_NETMASK, &mask);
    }
    let mut out = Vec::new();
    nested(&mut out, IPVS_CMD_ATTR_SERVICE, &inner);
    out
}

pub fn dest_attrs(d: &RealServer, full: bool) -> Vec<u8> {
    let mut inner = Vec::new();
    nla(&mut inner, IPVS_DEST_ATTR_ADDR, &inet_addr(d.addr));
    nla(&mut inner, IPVS_DEST_ATTR_PORT, &d.port.to_be_bytes());
    if full {
        nla(
            &mut inner,
            IPVS_DEST_ATTR_FWD_METHOD,
            &IP_VS_CONN_F_MASQ.to_ne_bytes(),
        );
        nla(&mut inner, IPVS_DEST_ATTR_WEIGHT, &d.weight.to_ne_bytes());
        nla(&mut inner, IPVS_DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
        nla(&mut inner, IPVS_DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
    }
    nla(
        &mut inner,
        IPVS_DEST_ATTR_ADDR_FAMILY,
        &af(d.addr).to_ne_bytes(),
    );
    let mut out = Vec::new();
    nested(&mut out, IPVS_CMD_ATTR_DEST, &inner);
    out
}

/// A complete netlink message: nlmsghdr + genlmsghdr + attributes.
pub fn message(family: u16, cmd: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + attrs.len());
    payload.extend_from_slice(&[cmd, IPVS_GENL_VERSION, 0, 0]);
    payload.extend_from_slice(attrs);
    nl::message(family, nl::NLM_F_REQUEST | nl::NLM_F_ACK, seq, &payload)
}

/// The netlink message for one operation (`None` for operations that are not IPVS
/// messages: address binding and ipset entries go through rtnetlink and ipset).
pub fn encode(family: u16, seq: u32, op: &Op) -> Option<Vec<u8>> {
    let (cmd, attrs) = match op {
        Op::AddService(s) => (IPVS_CMD_NEW_SERVICE, service_attrs(s, true)),
        Op::UpdateService(s) => (IPVS_CMD_SET_SERVICE, service_attrs(s, true)),
        Op::DelService(s) => (IPVS_CMD_DEL_SERVICE, service_attrs(s, false)),
        Op::AddDest(s, d) => {
            let mut a = service_attrs(s, false);
            a.extend(dest_attrs(d, true));
            (IPVS_CMD_NEW_DEST, a)
        }
        Op::DelDest(s, d) => {
            let mut a = service_attrs(s, false);
            a.extend(dest_attrs(d, false));
            (IPVS_CMD_DEL_DEST, a)
        }
        _ => return None,
    };
    Some(message(family, cmd, seq, &attrs))
}

pub const ANNOTATION_SCHEDULER: &str = "switchyard.io/ipvs-scheduler";

/// The schedulers a service may ask for (kube-proxy's `ipvs.scheduler` values we support).
pub const SCHEDULERS: [&str; 4] = ["rr", "lc", "sh", "mh"];

fn virtual_services(
    s: &ServicePortState,
    default_scheduler: &str,
) -> Vec<(VirtualService, Vec<RealServer>, FrontendKind)> {
    let scheduler = match s.annotations.get(ANNOTATION_SCHEDULER).map(String::as_str) {
        Some(x) if SCHEDULERS.contains(&x) => x.to_string(),
        _ => default_scheduler.to_string(),
    };
    let reals = |r: Route<'_>| match r {
        Route::Backends(b) => b
            .iter()
            .map(|b| RealServer {
                addr: b.addr,
                port: b.port,
                weight: 1,
            })
            .collect(),
        Route::Reject | Route::Drop => Vec::new(),
    };
    s.frontends
        .iter()
        .map(|f| {
            let vs = VirtualService {
                addr: f.addr,
                port: f.port,
                protocol: s.key.protocol,
                scheduler: scheduler.clone(),
                persistence: s.affinity_timeout_seconds,
            };
            let r = if f.kind.is_external() {
                reals(s.external_route())
            } else {
                reals(s.internal_route())
            };
            (vs, r, f.kind)
        })
        .collect()
}

fn ipset_entry(vs: &VirtualService) -> String {
    format!(
        "{},{}:{}",
        vs.addr,
        vs.protocol.as_str().to_ascii_lowercase(),
        vs.port
    )
}

/// The ipset a frontend's `addr,proto:port` entry goes to (IPv6 sets are `SY6-…`).
fn set_for(kind: FrontendKind, addr: IpAddr) -> String {
    set_name(
        match kind {
            FrontendKind::ClusterIP => SET_CLUSTER_IP,
            FrontendKind::NodePort => SET_NODE_PORT,
            FrontendKind::ExternalIP => SET_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SET_LOAD_BALANCER,
        },
        addr.is_ipv6(),
    )
}

pub const SET_CLUSTER_IP: &str = "SY-CLUSTER-IP";
pub const SET_NODE_PORT: &str = "SY-NODE-PORT";
pub const SET_EXTERNAL_IP: &str = "SY-EXTERNAL-IP";
pub const SET_LOAD_BALANCER: &str = "SY-LOAD-BALANCER";
/// External frontends under eTP=Local: not masqueraded.
pub const SET_EXTERNAL_LOCAL: &str = "SY-EXTERNAL-LOCAL";
/// `endpoint,proto:port,endpoint`: an endpoint reaching itself (hairpin) is masqueraded.
pub const SET_LOOP_BACK: &str = "SY-LOOP-BACK";
/// Load-balancer frontends that have `loadBalancerSourceRanges`.
pub const SET_LOAD_BALANCER_FW: &str = "SY-LOAD-BALANCER-FW";
/// `lb-ip,proto:port,source-cidr`: the sources such a frontend admits.
pub const SET_LOAD_BALANCER_SOURCE_CIDR: &str = "SY-LOAD-BALANCER-SOURCE-CIDR";

fn set_name(base: &str, v6: bool) -> String {
    if v6 {
        base.replacen("SY-", "SY6-", 1)
    } else {
        base.to_string()
    }
}

/// The `ipset restore` input that fills IPVS mode's sets for one family from the desired
/// state: each set is created if missing, and its new content is filled into a scratch set
/// that is swapped in whole and destroyed, so a packet never sees a set half-filled.
pub fn ipset_restore(state: &switchyard_model::DesiredState, family: IpFamily) -> String {
    use std::collections::BTreeMap;
    let v6 = family == IpFamily::IPv6;
    let mut sets: BTreeMap<&str, (&str, Vec<String>)> = [
        (SET_CLUSTER_IP, "hash:ip,port"),
        (SET_NODE_PORT, "hash:ip,port"),
        (SET_EXTERNAL_IP, "hash:ip,port"),
        (SET_LOAD_BALANCER, "hash:ip,port"),
        (SET_EXTERNAL_LOCAL, "hash:ip,port"),
        (SET_LOOP_BACK, "hash:ip,port,ip"),
        (SET_LOAD_BALANCER_FW, "hash:ip,port"),
        (SET_LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net"),
    ]
    .into_iter()
    .map(|(n, t)| (n, (t, Vec::new())))
    .collect();
    let mut add = |set: &'static str, entry: String| {
        if let Some((_, v)) = sets.get_mut(set) {
            v.push(entry);
        }
    };
    for s in state.values().filter(|s| s.key.family == family) {
        let proto = s.key.protocol.as_str().to_ascii_lowercase();
        for f in &s.frontends {
            let entry = format!("{},{proto}:{}", f.addr, f.port);
            let base = match f.kind {
                FrontendKind::ClusterIP => SET_CLUSTER_IP,
                FrontendKind::NodePort => SET_NODE_PORT,
                FrontendKind::ExternalIP => SET_EXTERNAL_IP,
                FrontendKind::LoadBalancer => SET_LOAD_BALANCER,
            };
            if f.kind.is_external() && s.external_traffic_local {
                add(SET_EXTERNAL_LOCAL, entry.clone());
            }
            if f.kind == FrontendKind::LoadBalancer && !s.source_ranges.is_empty() {
                for r in s.source_ranges.iter().filter(|r| r.addr().is_ipv6() == v6) {
                    add(SET_LOAD_BALANCER_SOURCE_CIDR, format!("{entry},{r}"));
                }
                add(SET_LOAD_BALANCER_FW, entry.clone());
            }
            add(base, entry);
        }
        for b in s.all_backends() {
            add(
                SET_LOOP_BACK,
                format!("{0},{proto}:{1},{0}", b.addr, b.port),
            );
        }
    }
    let inet = if v6 { "inet6" } else { "inet" };
    let mut out = String::new();
    for (name, (ty, mut entries)) in sets {
        let name = set_name(name, v6);
        entries.sort();
        entries.dedup();
        let scratch = format!("{name}-N");
        out.push_str(&format!(
            "create {name} {ty} family {inet} hashsize 1024 maxelem 65536 -exist\ncreate {scratch} {ty} family {inet} hashsize 1024 maxelem 65536 -exist\nflush {scratch}\n"
        ));
        for e in entries {
            out.push_str(&format!("add {scratch} {e}\n"));
        }
        out.push_str(&format!("swap {scratch} {name}\ndestroy {scratch}\n"));
    }
    out
}

/// The rules IPVS mode needs beside the virtual servers (IPVS itself does the DNAT): mark
/// for masquerade what kube-proxy would masquerade, matched through the ipsets above, and
/// MASQUERADE marked and hairpin traffic; drop load-balancer traffic from sources outside
/// `loadBalancerSourceRanges`. One `iptables-restore --noflush` input.
pub fn masquerade_rules(
    cluster_cidrs: &[ipnet::IpNet],
    masquerade_all: bool,
    masquerade_bit: u8,
    family: IpFamily,
) -> String {
    let v6 = family == IpFamily::IPv6;
    let set = |n: &str| set_name(n, v6);
    let mark = 1u32 << masquerade_bit;
    let drop = 1u32 << (masquerade_bit + 1).min(31);
    let mut r = vec![
        "*nat".to_string(),
        ":SY-SERVICES - [0:0]".into(),
        ":SY-NODE-PORT - [0:0]".into(),
        ":SY-FIREWALL - [0:0]".into(),
        ":SY-MARK-MASQ - [0:0]".into(),
        ":SY-MARK-DROP - [0:0]".into(),
        ":SY-POSTROUTING - [0:0]".into(),
        format!(
            "-A SY-SERVICES -m set --match-set {} dst,dst -j SY-FIREWALL",
            set(SET_LOAD_BALANCER_FW)
        ),
        format!(
            "-A SY-SERVICES -m set --match-set {} dst,dst -j RETURN",
            set(SET_EXTERNAL_LOCAL)
        ),
    ];
    let cidrs: Vec<&ipnet::IpNet> = cluster_cidrs
        .iter()
        .filter(|c| c.addr().is_ipv6() == v6)
        .collect();
    if masquerade_all || cidrs.is_empty() {
        r.push(format!(
            "-A SY-SERVICES -m set --match-set {} dst,dst -j SY-MARK-MASQ",
            set(SET_CLUSTER_IP)
        ));
    } else {
        for c in cidrs {
            r.push(format!(
                "-A SY-SERVICES -m set --match-set {} dst,dst ! -s {c} -j SY-MARK-MASQ",
                set(SET_CLUSTER_IP)
            ));
        }
    }
    for s in [SET_EXTERNAL_IP, SET_LOAD_BALANCER] {
        r.push(format!(
            "-A SY-SERVICES -m set --match-set {} dst,dst -j SY-MARK-MASQ",
            set(s)
        ));
    }
    r.push("-A SY-SERVICES -m addrtype --dst-type LOCAL -j SY-NODE-PORT".into());
    r.push(format!(
        "-A SY-NODE-PORT -m set --match-set {} dst,dst -j SY-MARK-MASQ",
        set(SET_NODE_PORT)
    ));
    r.push(format!(
        "-A SY-FIREWALL -m set --match-set {} dst,dst,src -j RETURN",
        set(SET_LOAD_BALANCER_SOURCE_CIDR)
    ));
    r.push("-A SY-FIREWALL -j SY-MARK-DROP".into());
    r.push(format!("-A SY-MARK-MASQ -j MARK --or-mark {mark:#x}"));
    r.push(format!("-A SY-MARK-DROP -j MARK --or-mark {drop:#x}"));
    r.push(format!(
        "-A SY-POSTROUTING -m set --match-set {} dst,dst,src -j MASQUERADE",
        set(SET_LOOP_BACK)
    ));
    r.push(format!(
        "-A SY-POSTROUTING -m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"
    ));
    r.push(format!("-A SY-POSTROUTING -j MARK --xor-mark {mark:#x}"));
    r.push("-A SY-POSTROUTING -j MASQUERADE --random-fully".into());
    r.push("COMMIT".into());
    r.push("*filter".into());
    r.push(":SY-FILTER - [0:0]".into());
    r.push(format!(
        "-A SY-FILTER -m mark --mark {drop:#x}/{drop:#x} -j DROP"
    ));
    r.push("COMMIT".into());
    let mut out = r.join("\n");
    out.push('\n');
    out
}

/// The operations that program a ChangeSet, in order: new VIPs bound and services created
/// before their real servers; real servers removed before services; VIPs unbound last.
pub fn plan(changes: &ChangeSet) -> Vec<Op> {
    plan_with(changes, "rr")
}

/// `plan` with the node's default scheduler (a service's annotation overrides it).
pub fn plan_with(changes: &ChangeSet, default_scheduler: &str) -> Vec<Op> {
    let mut ops = Vec::new();
    let add_port = |s: &ServicePortState, ops: &mut Vec<Op>| {
        for (vs, reals, kind) in virtual_services(s, default_scheduler) {
            if kind != FrontendKind::NodePort {
                ops.push(Op::BindAddress(vs.addr));
            }
            ops.push(Op::IpsetAdd(set_for(kind, vs.addr), ipset_entry(&vs)));
            ops.push(Op::AddService(vs.clone()));
            for r in reals {
                ops.push(Op::AddDest(vs.clone(), r));
            }
        }
    };
    for s in &changes.added {
        add_port(s, &mut ops);
    }
    for c in &changes.changed {
        let old: Vec<_> = virtual_services(&c.old, default_scheduler);
        let new: Vec<_> = virtual_services(&c.new, default_scheduler);
        for (vs, reals, kind) in &new {
            match old
                .iter()
                .find(|(o, _, _)| o.addr == vs.addr && o.port == vs.port)
            {
                None => {
                    if *kind != FrontendKind::NodePort {
                        ops.push(Op::BindAddress(vs.addr));
                    }
                    ops.push(Op::IpsetAdd(set_for(*kind, vs.addr), ipset_entry(vs)));
                    ops.push(Op::AddService(vs.clone()));
                    ops.extend(reals.iter().map(|r| Op::AddDest(vs.clone(), r.clone())));
                }
                Some((o, oreals, _)) => {
                    if o != vs {
                        ops.push(Op::UpdateService(vs.clone()));
                    }
                    ops.extend(
                        reals
                            .iter()
                            .filter(|r| !oreals.contains(r))
                            .map(|r| Op::AddDest(vs.clone(), r.clone())),
                    );
                    ops.extend(
                        oreals
                            .iter()
                            .filter(|r| !reals.contains(r))
                            .map(|r| Op::DelDest(vs.clone(), r.clone())),
                    );
                }
            }
        }
        for (o, oreals, kind) in &old {
            if !new
                .iter()
                .any(|(n, _, _)| n.addr == o.addr && n.port == o.port)
            {
                ops.extend(oreals.iter().map(|r| Op::DelDest(o.clone(), r.clone())));
                ops.push(Op::DelService(o.clone()));
                ops.push(Op::IpsetDel(set_for(*kind, o.addr), ipset_entry(o)));
                if *kind != FrontendKind::NodePort {
                    ops.push(Op::UnbindAddress(o.addr));
                }
            }
        }
    }
    for s in &changes.removed {
        for (vs, reals, kind) in virtual_services(s, default_scheduler) {
            ops.extend(reals.into_iter().map(|r| Op::DelDest(vs.clone(), r)));
            ops.push(Op::DelService(vs.clone()));
            ops.push(Op::IpsetDel(set_for(kind, vs.addr), ipset_entry(&vs)));
            if kind != FrontendKind::NodePort {
                ops.push(Op::UnbindAddress(vs.addr));
            }
        }
    }
    ops
}

/// Look up the `IPVS` generic-netlink family; its absence means the kernel has no IPVS.
pub fn family_id() -> std::io::Result<u16> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
    let mut sock = Socket::new(NETLINK_GENERIC)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut attrs = Vec::new();
    let mut name = IPVS_GENL_NAME.as_bytes().to_vec();
    name.push(0);
    nla(&mut attrs, CTRL_ATTR_FAMILY_NAME, &name);
    let mut msg = message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs);
    msg[20 - 3] = 1; // genl version for the controller
    sock.send(&msg, 0)?;
    let mut buf = vec![0u8; 8192];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    let reply = nl::messages(&buf[..n])
        .next()
        .ok_or_else(|| std::io::Error::other("empty answer from the generic-netlink controller"))?;
    // NLMSG_ERROR with an errno: no such family.
    if let Some(err) = reply.error() {
        return Err(std::io::Error::from_raw_os_error(err));
    }
    reply
        .payload
        .get(4..)
        .and_then(|attrs| nl::attr(attrs, CTRL_ATTR_FAMILY_ID))
        .and_then(|v| Some(u16::from_ne_bytes([*v.first()?, *v.get(1)?])))
        .ok_or_else(|| std::io::Error::other("no family id in the controller's answer"))
}

/// The `IPVS` family, loading the `ip_vs` module first where it is not loaded yet (as
/// kube-proxy does); the error says why `--backend ipvs` cannot run here.
pub fn ensure_family() -> Result<u16, DataplaneError> {
    if let Ok(f) = family_id() {
        return Ok(f);
    }
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "ip_vs"])
        .status();
    family_id().map_err(|source| DataplaneError::NoIpvs { source })
}
