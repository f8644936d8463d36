//! The IPVS backend's message layer: generic-netlink IPVS messages laid out as in the
//! kernel's `include/uapi/linux/ip_vs.h`, the plan of operations for a ChangeSet (virtual
//! services, real servers, VIPs bound to a local interface, ipset entries for masquerade),
//! and detection of kernel support (the `IPVS` generic-netlink family). On a kernel without
//! IPVS the backend refuses to start with the reason.

use std::net::IpAddr;

use switchyard_model::{ChangeSet, FrontendKind, Protocol, Route, ServicePortState};

use crate::error::DataplaneError;
use crate::nl::{self, nested, nla};

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
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_DEL_DEST: u8 = 7;

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
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
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
    IpsetAdd(&'static str, String),
    IpsetDel(&'static str, String),
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
        let flags = if s.persistence.is_some() {
            IP_VS_SVC_F_PERSISTENT
        } else {
            0
        };
        let mut f = Vec::new();
        f.extend_from_slice(&flags.to_ne_bytes());
        f.extend_from_slice(&u32::MAX.to_ne_bytes());
        nla(&mut inner, IPVS_SVC_ATTR_FLAGS, &f);
        nla(
            &mut inner,
            IPVS_SVC_ATTR_TIMEOUT,
            &s.persistence.unwrap_or(0).to_ne_bytes(),
        );
        let mask: u32 = if s.addr.is_ipv4() { u32::MAX } else { 128 };
        nla(&mut inner, IPVS_SVC_ATTR_NETMASK, &mask.to_be_bytes());
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

fn virtual_services(s: &ServicePortState) -> Vec<(VirtualService, Vec<RealServer>, FrontendKind)> {
    let scheduler = match s.annotations.get(ANNOTATION_SCHEDULER).map(String::as_str) {
        Some(x @ ("rr" | "lc" | "sh" | "mh")) => x.to_string(),
        _ => "rr".to_string(),
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

fn set_for(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIP => "SY-CLUSTER-IP",
        FrontendKind::NodePort => "SY-NODE-PORT",
        FrontendKind::ExternalIP => "SY-EXTERNAL-IP",
        FrontendKind::LoadBalancer => "SY-LOAD-BALANCER",
    }
}

/// The operations that program a ChangeSet, in order: new VIPs bound and services created
/// before their real servers; real servers removed before services; VIPs unbound last.
pub fn plan(changes: &ChangeSet) -> Vec<Op> {
    let mut ops = Vec::new();
    let add_port = |s: &ServicePortState, ops: &mut Vec<Op>| {
        for (vs, reals, kind) in virtual_services(s) {
            if kind != FrontendKind::NodePort {
                ops.push(Op::BindAddress(vs.addr));
            }
            ops.push(Op::IpsetAdd(set_for(kind), ipset_entry(&vs)));
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
        let old: Vec<_> = virtual_services(&c.old);
        let new: Vec<_> = virtual_services(&c.new);
        for (vs, reals, kind) in &new {
            match old
                .iter()
                .find(|(o, _, _)| o.addr == vs.addr && o.port == vs.port)
            {
                None => {
                    if *kind != FrontendKind::NodePort {
                        ops.push(Op::BindAddress(vs.addr));
                    }
                    ops.push(Op::IpsetAdd(set_for(*kind), ipset_entry(vs)));
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
                ops.push(Op::IpsetDel(set_for(*kind), ipset_entry(o)));
                if *kind != FrontendKind::NodePort {
                    ops.push(Op::UnbindAddress(o.addr));
                }
            }
        }
    }
    for s in &changes.removed {
        for (vs, reals, kind) in virtual_services(s) {
            ops.extend(reals.into_iter().map(|r| Op::DelDest(vs.clone(), r)));
            ops.push(Op::DelService(vs.clone()));
            ops.push(Op::IpsetDel(set_for(kind), ipset_entry(&vs)));
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

/// Why `--backend ipvs` cannot run here (the kernel lacks IPVS), or that it is present.
pub fn unavailable_reason() -> DataplaneError {
    match family_id() {
        Err(e) => DataplaneError::Unavailable {
            backend: "ipvs",
            reason: format!(
                "the kernel has no IPVS support: the IPVS generic-netlink family is missing ({e}); the kernel needs CONFIG_IP_VS (module ip_vs)"
            ),
        },
        Ok(_) => DataplaneError::Unavailable {
            backend: "ipvs",
            reason: "the kernel has IPVS, but this build only plans and encodes IPVS operations; use --backend ebpf or iptables".into(),
        },
    }
}
