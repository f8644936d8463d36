//! The IPVS backend's writer, with kube-proxy's IPVS-mode semantics (pkg/proxy/ipvs):
//!
//! - a virtual service per frontend (ClusterIP, NodePort on each node address, external and
//!   load-balancer IPs) with the service's endpoints as masqueraded real servers, through
//!   generic netlink (the encoder in the parent module); scheduler `rr` by default, `lc`,
//!   `sh`, `mh` by setting or per-service annotation; ClientIP affinity as persistence;
//! - every non-NodePort VIP bound to our dummy link `sy-ipvs0` (kube-proxy's `kube-ipvs0`),
//!   created and removed by the backend, so the node accepts the VIPs as local;
//! - the companion ipsets (swapped in whole, so a set is never seen half-filled) and the nat
//!   rules that masquerade through them;
//! - graceful endpoint removal as kube-proxy's graceful termination manager: a TCP/SCTP real
//!   server leaving is set to weight 0 and deleted once its connections are gone (UDP ones
//!   go at once, `expire_nodest_conn` ends their flows);
//! - a ChangeSet touches only its services; a full sync compares the kernel's table with the
//!   desired state and repairs any drift (missing, extra or changed services and real
//!   servers, addresses, sets, rules).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
use switchyard_model::{ChangeSet, DesiredState, FrontendKind, IpFamily, Protocol};

use super::{
    IP_VS_SVC_F_PERSISTENT, IPVS_CMD_ATTR_DEST, IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_TIMEOUT_TCP,
    IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, IPVS_CMD_ATTR_TIMEOUT_UDP, IPVS_CMD_DEL_DEST,
    IPVS_CMD_DEL_SERVICE, IPVS_CMD_GET_DEST, IPVS_CMD_GET_SERVICE, IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_CONFIG, IPVS_CMD_SET_DEST, IPVS_CMD_SET_SERVICE,
    IPVS_DEST_ATTR_ACTIVE_CONNS, IPVS_DEST_ATTR_ADDR, IPVS_DEST_ATTR_INACT_CONNS,
    IPVS_DEST_ATTR_PORT, IPVS_DEST_ATTR_WEIGHT, IPVS_GENL_VERSION, IPVS_SVC_ATTR_ADDR,
    IPVS_SVC_ATTR_AF, IPVS_SVC_ATTR_FLAGS, IPVS_SVC_ATTR_PORT, IPVS_SVC_ATTR_PROTOCOL,
    IPVS_SVC_ATTR_SCHED_NAME, IPVS_SVC_ATTR_TIMEOUT, Op, RealServer, VirtualService, dest_attrs,
    ensure_family, ipset_restore, masquerade_rules, plan_with, service_attrs, virtual_services,
};
use crate::conntrack::{StaleUdp, UdpServices};
use crate::dataplane::Dataplane;
use crate::dataplane::iptables::runner::{CommandRunner, Runner, Tool, output};
use crate::dataplane::iptables::{self, Flavor};
use crate::error::DataplaneError;
use crate::metrics::Metrics;
use crate::nl;

/// The dummy link holding the VIPs (kube-proxy's `kube-ipvs0`).
pub const LINK: &str = "sy-ipvs0";

/// How long a gracefully removed TCP real server may keep connections before it is deleted
/// anyway (kube-proxy waits for them without bound; a stuck client must not pin it forever).
const GRACE_LIMIT: Duration = Duration::from_mins(15);

/// The sysctls IPVS mode needs (kube-proxy sets the same): conntrack entries for IPVS flows,
/// so the nat rules can masquerade them; flows to a removed real server end on their next
/// packet; persistence templates to a weight-0 server expire.
const SYSCTLS: [(&str, &str); 3] = [
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
];

#[derive(Debug, Clone)]
pub struct IpvsConfig {
    /// Scheduler for services without the annotation: rr, lc, sh or mh.
    pub scheduler: String,
    pub flavor: Flavor,
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    /// IPVS's connection timeouts (kube-proxy's ipvs.tcpTimeout, tcpFinTimeout, udpTimeout);
    /// zero leaves the kernel's value.
    pub timeouts: IpvsTimeouts,
}

/// IPVS connection timeouts in seconds; 0 = the kernel's (900, 120, 300).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpvsTimeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

fn ipvs_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Ipvs { what, source }
}

/// A generic-netlink socket bound to the IPVS family.
struct Genl {
    sock: Socket,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Genl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Genl")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Genl {
    fn open(family: u16) -> io::Result<Genl> {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Genl {
            sock,
            family,
            seq: 0,
            buf: vec![0u8; 1 << 16],
        })
    }

    fn payload(cmd: u8, attrs: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(4 + attrs.len());
        p.extend_from_slice(&[cmd, IPVS_GENL_VERSION, 0, 0]);
        p.extend_from_slice(attrs);
        p
    }

    /// One command, waiting for its acknowledgement (an errno is the error).
    fn request(&mut self, cmd: u8, attrs: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = nl::message(
            self.family,
            nl::NLM_F_REQUEST | nl::NLM_F_ACK,
            self.seq,
            &Self::payload(cmd, attrs),
        );
        self.sock.send(&msg, 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != self.seq {
                    continue;
                }
                if let Some(e) = m.error() {
                    return if e == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(e))
                    };
                }
            }
        }
    }

    /// A dump: the attributes (after the genl header) of every answer.
    fn dump(&mut self, cmd: u8, attrs: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = nl::message(
            self.family,
            nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
            self.seq,
            &Self::payload(cmd, attrs),
        );
        self.sock.send(&msg, 0)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != self.seq {
                    continue;
                }
                if m.ty == nl::NLMSG_DONE {
                    return Ok(out);
                }
                if let Some(e) = m.error() {
                    if e == 0 {
                        continue;
                    }
                    return Err(io::Error::from_raw_os_error(e));
                }
                if let Some(a) = m.payload.get(4..) {
                    out.push(a.to_vec());
                }
            }
        }
    }
}

/// A virtual service's identity in the kernel table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: u8,
}

impl VsKey {
    fn of(vs: &VirtualService) -> VsKey {
        VsKey {
            addr: vs.addr,
            port: vs.port,
            protocol: vs.protocol.number(),
        }
    }
}

/// A virtual service as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    pub key: VsKey,
    pub scheduler: String,
    pub persistence: Option<u32>,
}

/// A real server as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDest {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

fn u16_ne(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

fn u32_ne(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn addr_of(v: &[u8], v6: bool) -> Option<IpAddr> {
    if v6 {
        let o: [u8; 16] = v.get(..16)?.try_into().ok()?;
        Some(IpAddr::from(o))
    } else {
        let o: [u8; 4] = v.get(..4)?.try_into().ok()?;
        Some(IpAddr::from(o))
    }
}

/// Parse one `IPVS_CMD_GET_SERVICE` answer (fwmark services, which we never make, are None).
pub fn parse_service(attrs: &[u8]) -> Option<KernelService> {
    let svc = nl::attr(attrs, IPVS_CMD_ATTR_SERVICE)?;
    let af = u16_ne(nl::attr(svc, IPVS_SVC_ATTR_AF)?)?;
    let protocol = u16_ne(nl::attr(svc, IPVS_SVC_ATTR_PROTOCOL)?)?;
    let addr = addr_of(nl::attr(svc, IPVS_SVC_ATTR_ADDR)?, af == 10)?;
    let port = u16::from_be_bytes(
        nl::attr(svc, IPVS_SVC_ATTR_PORT)?
            .get(..2)?
            .try_into()
            .ok()?,
    );
    let scheduler = nl::attr(svc, IPVS_SVC_ATTR_SCHED_NAME)
        .map(|s| {
            String::from_utf8_lossy(s)
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_default();
    let flags = nl::attr(svc, IPVS_SVC_ATTR_FLAGS)
        .and_then(u32_ne)
        .unwrap_or(0);
    let timeout = nl::attr(svc, IPVS_SVC_ATTR_TIMEOUT)
        .and_then(u32_ne)
        .unwrap_or(0);
    Some(KernelService {
        key: VsKey {
            addr,
            port,
            protocol: u8::try_from(protocol).ok()?,
        },
        scheduler,
        persistence: (flags & IP_VS_SVC_F_PERSISTENT != 0).then_some(timeout),
    })
}

/// Parse one `IPVS_CMD_GET_DEST` answer.
pub fn parse_dest(attrs: &[u8], v6: bool) -> Option<KernelDest> {
    let d = nl::attr(attrs, IPVS_CMD_ATTR_DEST)?;
    let addr = addr_of(nl::attr(d, IPVS_DEST_ATTR_ADDR)?, v6)?;
    let port = u16::from_be_bytes(
        nl::attr(d, IPVS_DEST_ATTR_PORT)?
            .get(..2)?
            .try_into()
            .ok()?,
    );
    Some(KernelDest {
        addr,
        port,
        weight: nl::attr(d, IPVS_DEST_ATTR_WEIGHT)
            .and_then(u32_ne)
            .unwrap_or(0),
        active: nl::attr(d, IPVS_DEST_ATTR_ACTIVE_CONNS)
            .and_then(u32_ne)
            .unwrap_or(0),
        inactive: nl::attr(d, IPVS_DEST_ATTR_INACT_CONNS)
            .and_then(u32_ne)
            .unwrap_or(0),
    })
}

fn protocol_of(n: u8) -> Option<Protocol> {
    match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The virtual services (with their real servers) of a desired state.
fn desired(
    state: &DesiredState,
    scheduler: &str,
) -> BTreeMap<VsKey, (VirtualService, Vec<RealServer>)> {
    let mut out = BTreeMap::new();
    for s in state.values() {
        for (vs, reals, _) in virtual_services(s, scheduler) {
            out.insert(VsKey::of(&vs), (vs, reals));
        }
    }
    out
}

/// The VIPs that belong on the dummy link (every frontend address but NodePorts').
fn vips(state: &DesiredState) -> BTreeSet<IpAddr> {
    state
        .values()
        .flat_map(|s| s.frontends.iter())
        .filter(|f| f.kind != FrontendKind::NodePort)
        .map(|f| f.addr)
        .collect()
}

fn ip_cmd(args: &[&str], stdin: Option<&str>) -> io::Result<String> {
    let name = format!("ip {}", args.join(" "));
    output(&name, Command::new("ip").args(args), stdin).map_err(io::Error::other)
}

/// Create the dummy link if missing (down, as kube-proxy leaves `kube-ipvs0`: its addresses
/// are local without the link carrying traffic).
fn ensure_link() -> Result<(), DataplaneError> {
    if ip_cmd(&["link", "show", LINK], None).is_ok() {
        return Ok(());
    }
    ip_cmd(&["link", "add", LINK, "type", "dummy"], None).map_err(ipvs_err(format!(
        "creating the dummy link {LINK} (needs the dummy module)"
    )))?;
    Ok(())
}

/// The addresses on our link.
fn link_addrs() -> Result<BTreeSet<IpAddr>, DataplaneError> {
    let out = ip_cmd(&["-o", "addr", "show", "dev", LINK], None)
        .map_err(ipvs_err(format!("listing {LINK}'s addresses")))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|t| *t == "inet" || *t == "inet6")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// Make the link's addresses exactly `want`, in one `ip -batch`.
fn sync_addrs(want: &BTreeSet<IpAddr>) -> Result<(), DataplaneError> {
    let have = link_addrs()?;
    let mut batch = String::new();
    for a in want.difference(&have) {
        let len = if a.is_ipv4() { 32 } else { 128 };
        batch.push_str(&format!("addr add {a}/{len} dev {LINK}\n"));
    }
    for a in have.difference(want) {
        let len = if a.is_ipv4() { 32 } else { 128 };
        batch.push_str(&format!("addr del {a}/{len} dev {LINK}\n"));
    }
    if batch.is_empty() {
        return Ok(());
    }
    ip_cmd(&["-force", "-batch", "-"], Some(&batch))
        .map_err(ipvs_err(format!("binding service addresses to {LINK}")))?;
    Ok(())
}

fn set_sysctls() -> Result<(), DataplaneError> {
    for (k, v) in SYSCTLS {
        let p = std::path::Path::new("/proc/sys").join(k);
        if std::fs::read_to_string(&p).is_ok_and(|c| c.trim() == v) {
            continue;
        }
        std::fs::write(&p, v).map_err(ipvs_err(format!("setting {k}={v}")))?;
    }
    Ok(())
}

fn ipset_cmd(input: &str) -> Result<(), DataplaneError> {
    output(
        "ipset restore",
        Command::new("ipset").args(["restore", "-exist"]),
        Some(input),
    )
    .map(drop)
    .map_err(|e| DataplaneError::Ipvs {
        what: "ipset restore".into(),
        source: io::Error::other(e),
    })
}

/// A real server being drained (weight 0) until its connections end.
#[derive(Debug, Clone)]
struct Draining {
    vs: VirtualService,
    rs: RealServer,
    since: Instant,
}

pub struct IpvsDataplane {
    genl: Genl,
    cfg: IpvsConfig,
    runner: CommandRunner,
    families: Vec<IpFamily>,
    /// The ipset input last applied per family (a sync that changes nothing skips ipset).
    sets: BTreeMap<IpFamily, String>,
    draining: BTreeMap<(VsKey, IpAddr, u16), Draining>,
    /// UDP conntrack entries that would keep a flow off its service (as the iptables
    /// backend, and kube-proxy's IPVS mode, delete them).
    conntrack: StaleUdp,
}

impl std::fmt::Debug for IpvsDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsDataplane")
            .field("scheduler", &self.cfg.scheduler)
            .field("draining", &self.draining.len())
            .finish_non_exhaustive()
    }
}

impl IpvsDataplane {
    /// Check IPVS, the tools and the privileges, and prepare the node (sysctls, dummy link,
    /// rules); services come with the first sync.
    pub fn start(
        cfg: IpvsConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<IpvsDataplane, DataplaneError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(DataplaneError::NeedsPrivilege {
                backend: "ipvs",
                what: "root (CAP_NET_ADMIN)",
            });
        }
        let family = ensure_family()?;
        let mut genl = Genl::open(family).map_err(ipvs_err("opening a generic-netlink socket"))?;
        set_sysctls()?;
        let t = cfg.timeouts;
        if t != IpvsTimeouts::default() {
            let mut attrs = Vec::new();
            nl::nla(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_TCP, &t.tcp.to_ne_bytes());
            nl::nla(
                &mut attrs,
                IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
                &t.tcp_fin.to_ne_bytes(),
            );
            nl::nla(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_UDP, &t.udp.to_ne_bytes());
            genl.request(IPVS_CMD_SET_CONFIG, &attrs)
                .map_err(ipvs_err("setting the IPVS connection timeouts"))?;
        }
        ensure_link()?;
        let mut families = vec![IpFamily::IPv4];
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            families.push(IpFamily::IPv6);
        }
        let mut dp = IpvsDataplane {
            genl,
            cfg,
            runner: CommandRunner,
            families,
            sets: BTreeMap::new(),
            draining: BTreeMap::new(),
            conntrack: StaleUdp::new(metrics),
        };
        dp.write_sets(&DesiredState::default(), true)?;
        dp.write_rules()?;
        Ok(dp)
    }

    /// The kernel's virtual services.
    pub fn kernel_services(&mut self) -> Result<BTreeMap<VsKey, KernelService>, DataplaneError> {
        let answers = self
            .genl
            .dump(IPVS_CMD_GET_SERVICE, &[])
            .map_err(ipvs_err("listing virtual services"))?;
        Ok(answers
            .iter()
            .filter_map(|a| parse_service(a))
            .map(|s| (s.key, s))
            .collect())
    }

    /// The kernel's real servers of one virtual service.
    fn kernel_dests(&mut self, vs: &VirtualService) -> Result<Vec<KernelDest>, DataplaneError> {
        let answers = self
            .genl
            .dump(IPVS_CMD_GET_DEST, &service_attrs(vs, false))
            .map_err(ipvs_err(format!(
                "listing real servers of {}:{}",
                vs.addr, vs.port
            )))?;
        Ok(answers
            .iter()
            .filter_map(|a| parse_dest(a, vs.addr.is_ipv6()))
            .collect())
    }

    fn add_service(&mut self, vs: &VirtualService) -> Result<(), DataplaneError> {
        let what = || {
            format!(
                "adding virtual service {} {}:{}",
                vs.protocol.as_str(),
                vs.addr,
                vs.port
            )
        };
        match self
            .genl
            .request(IPVS_CMD_NEW_SERVICE, &service_attrs(vs, true))
        {
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => self
                .genl
                .request(IPVS_CMD_SET_SERVICE, &service_attrs(vs, true))
                .map_err(ipvs_err(what())),
            r => r.map_err(ipvs_err(what())),
        }
    }

    fn del_service(&mut self, vs: &VirtualService) -> Result<(), DataplaneError> {
        self.draining.retain(|(k, _, _), _| *k != VsKey::of(vs));
        match self
            .genl
            .request(IPVS_CMD_DEL_SERVICE, &service_attrs(vs, false))
        {
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(()),
            r => r.map_err(ipvs_err(format!(
                "deleting virtual service {}:{}",
                vs.addr, vs.port
            ))),
        }
    }

    fn add_dest(&mut self, vs: &VirtualService, rs: &RealServer) -> Result<(), DataplaneError> {
        self.draining.remove(&(VsKey::of(vs), rs.addr, rs.port));
        let mut attrs = service_attrs(vs, false);
        attrs.extend(dest_attrs(rs, true));
        let what = || {
            format!(
                "adding real server {}:{} to {}:{}",
                rs.addr, rs.port, vs.addr, vs.port
            )
        };
        match self.genl.request(IPVS_CMD_NEW_DEST, &attrs) {
            // There already (draining, or from before a restart): back to full weight.
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => self
                .genl
                .request(IPVS_CMD_SET_DEST, &attrs)
                .map_err(ipvs_err(what())),
            r => r.map_err(ipvs_err(what())),
        }
    }

    fn delete_dest(&mut self, vs: &VirtualService, rs: &RealServer) -> Result<(), DataplaneError> {
        self.draining.remove(&(VsKey::of(vs), rs.addr, rs.port));
        let mut attrs = service_attrs(vs, false);
        attrs.extend(dest_attrs(rs, false));
        match self.genl.request(IPVS_CMD_DEL_DEST, &attrs) {
            Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::ESRCH)) => {
                Ok(())
            }
            r => r.map_err(ipvs_err(format!(
                "deleting real server {}:{} of {}:{}",
                rs.addr, rs.port, vs.addr, vs.port
            ))),
        }
    }

    /// An endpoint leaves: UDP real servers go at once (their flows end on the next packet,
    /// `expire_nodest_conn`); TCP and SCTP ones stop getting new connections (weight 0) and
    /// are deleted once their connections are gone.
    fn remove_dest(&mut self, vs: &VirtualService, rs: &RealServer) -> Result<(), DataplaneError> {
        if vs.protocol == Protocol::Udp {
            return self.delete_dest(vs, rs);
        }
        let mut attrs = service_attrs(vs, false);
        let quiesced = RealServer {
            weight: 0,
            ..rs.clone()
        };
        attrs.extend(dest_attrs(&quiesced, true));
        match self.genl.request(IPVS_CMD_SET_DEST, &attrs) {
            Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::ESRCH)) => {
                return Ok(());
            }
            r => r.map_err(ipvs_err(format!(
                "draining real server {}:{} of {}:{}",
                rs.addr, rs.port, vs.addr, vs.port
            )))?,
        }
        self.draining
            .entry((VsKey::of(vs), rs.addr, rs.port))
            .or_insert_with(|| Draining {
                vs: vs.clone(),
                rs: rs.clone(),
                since: Instant::now(),
            });
        Ok(())
    }

    /// Delete the draining real servers whose connections have ended (or that drained too
    /// long).
    fn reap_draining(&mut self) -> Result<(), DataplaneError> {
        let draining: Vec<Draining> = self.draining.values().cloned().collect();
        let mut by_vs: BTreeMap<VsKey, Vec<KernelDest>> = BTreeMap::new();
        for d in draining {
            let key = VsKey::of(&d.vs);
            let dests = match by_vs.get(&key) {
                Some(v) => v.clone(),
                None => {
                    let v = self.kernel_dests(&d.vs).unwrap_or_default();
                    by_vs.insert(key, v.clone());
                    v
                }
            };
            let conns = dests
                .iter()
                .find(|k| k.addr == d.rs.addr && k.port == d.rs.port)
                .map(|k| k.active + k.inactive);
            match conns {
                None => {
                    self.draining.remove(&(key, d.rs.addr, d.rs.port));
                }
                Some(0) => self.delete_dest(&d.vs, &d.rs)?,
                Some(_) if d.since.elapsed() > GRACE_LIMIT => self.delete_dest(&d.vs, &d.rs)?,
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The companion ipsets, per family; each set is filled aside and swapped in.
    fn write_sets(&mut self, state: &DesiredState, force: bool) -> Result<(), DataplaneError> {
        for family in self.families.clone() {
            let input = ipset_restore(state, family);
            if !force && self.sets.get(&family) == Some(&input) {
                continue;
            }
            ipset_cmd(&input)?;
            self.sets.insert(family, input);
        }
        Ok(())
    }

    /// The masquerade/firewall rules and their hooks, per family.
    fn write_rules(&mut self) -> Result<(), DataplaneError> {
        for family in self.families.clone() {
            let tool = Tool::new(self.cfg.flavor, family);
            let rules = masquerade_rules(
                &self.cfg.cluster_cidrs,
                self.cfg.masquerade_all,
                self.cfg.masquerade_bit,
                family,
            );
            let input = iptables::with_missing_hooks(&mut self.runner, tool, &rules);
            self.runner
                .restore(tool, &input)
                .map_err(|source| DataplaneError::Iptables { source })?;
        }
        Ok(())
    }

    fn run_ops(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        for op in ops {
            match op {
                Op::AddService(vs) | Op::UpdateService(vs) => self.add_service(vs)?,
                Op::DelService(vs) => self.del_service(vs)?,
                Op::AddDest(vs, rs) => self.add_dest(vs, rs)?,
                Op::DelDest(vs, rs) => self.remove_dest(vs, rs)?,
                // Addresses and sets follow the whole state (an address may serve several
                // ports), after the services.
                Op::BindAddress(_) | Op::UnbindAddress(_) | Op::IpsetAdd(..) | Op::IpsetDel(..) => {
                }
            }
        }
        Ok(())
    }
}

impl Dataplane for IpvsDataplane {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let ops = plan_with(changes, &self.cfg.scheduler);
        // New VIPs are bound before their services take traffic; stale ones unbound after.
        let want = vips(state);
        let mut have = link_addrs()?;
        have.extend(want.iter().copied());
        sync_addrs(&have)?;
        // The sets first: a new virtual service must not take a connection the masquerade
        // rules do not yet know about (a stale entry for a removed one is harmless).
        self.write_sets(state, false)?;
        self.run_ops(&ops)?;
        sync_addrs(&want)?;
        self.conntrack.clear_after(changes, state)?;
        Ok(())
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        set_sysctls()?;
        ensure_link()?;
        let want_addrs = vips(state);
        let mut bound = link_addrs()?;
        let ours: BTreeSet<IpAddr> = bound.union(&local_addrs()).copied().collect();
        bound.extend(want_addrs.iter().copied());
        sync_addrs(&bound)?;
        // Sets and rules before services, as in `apply`.
        self.write_sets(state, true)?;
        self.write_rules()?;
        let want = desired(state, &self.cfg.scheduler);
        let have = self.kernel_services()?;
        // Services of ours that should not be there: on our link or a node address.
        for (key, k) in &have {
            if !want.contains_key(key) && ours.contains(&key.addr) {
                let Some(protocol) = protocol_of(k.key.protocol) else {
                    continue;
                };
                self.del_service(&VirtualService {
                    addr: key.addr,
                    port: key.port,
                    protocol,
                    scheduler: k.scheduler.clone(),
                    persistence: k.persistence,
                })?;
            }
        }
        for (key, (vs, reals)) in &want {
            let same = have
                .get(key)
                .is_some_and(|k| k.scheduler == vs.scheduler && k.persistence == vs.persistence);
            if !same {
                self.add_service(vs)?;
            }
            let dests = if have.contains_key(key) {
                self.kernel_dests(vs)?
            } else {
                Vec::new()
            };
            for rs in reals {
                let ok = dests
                    .iter()
                    .any(|d| d.addr == rs.addr && d.port == rs.port && d.weight == rs.weight);
                if !ok {
                    self.add_dest(vs, rs)?;
                }
            }
            for d in &dests {
                if reals.iter().any(|r| r.addr == d.addr && r.port == d.port) {
                    continue;
                }
                let rs = RealServer {
                    addr: d.addr,
                    port: d.port,
                    weight: 1,
                };
                if d.weight == 0 && vs.protocol != Protocol::Udp {
                    // Draining already (from before a restart too): keep draining.
                    self.draining
                        .entry((*key, d.addr, d.port))
                        .or_insert_with(|| Draining {
                            vs: vs.clone(),
                            rs,
                            since: Instant::now(),
                        });
                } else {
                    self.remove_dest(vs, &rs)?;
                }
            }
        }
        self.reap_draining()?;
        sync_addrs(&want_addrs)?;
        self.conntrack.clear(&UdpServices::from_state(state))?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let report = cleanup()?;
        for l in report {
            tracing::info!("{l}");
        }
        Ok(())
    }
}

/// This namespace's local addresses (NodePort virtual services are on them).
fn local_addrs() -> BTreeSet<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|ifs| {
            ifs.filter_map(|i| {
                let a = i.address?;
                if let Some(v4) = a.as_sockaddr_in() {
                    return Some(IpAddr::V4(v4.ip()));
                }
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Remove everything the IPVS backend made: virtual services on our link's addresses and the
/// node's addresses, the link, the rules (both flavors) and the sets. Safe to run when none of
/// it exists, and without IPVS in the kernel.
pub fn cleanup() -> Result<Vec<String>, DataplaneError> {
    let mut report = Vec::new();
    let bound = if ip_cmd(&["link", "show", LINK], None).is_ok() {
        link_addrs()?
    } else {
        BTreeSet::new()
    };
    if let Ok(family) = super::family_id() {
        let mut g = Genl::open(family).map_err(ipvs_err("opening a generic-netlink socket"))?;
        let ours: BTreeSet<IpAddr> = bound.union(&local_addrs()).copied().collect();
        let services = g
            .dump(IPVS_CMD_GET_SERVICE, &[])
            .map_err(ipvs_err("listing virtual services"))?;
        let mut n = 0;
        for k in services.iter().filter_map(|a| parse_service(a)) {
            let Some(protocol) = protocol_of(k.key.protocol) else {
                continue;
            };
            if !ours.contains(&k.key.addr) {
                continue;
            }
            let vs = VirtualService {
                addr: k.key.addr,
                port: k.key.port,
                protocol,
                scheduler: k.scheduler,
                persistence: k.persistence,
            };
            match g.request(IPVS_CMD_DEL_SERVICE, &service_attrs(&vs, false)) {
                Err(e) if e.raw_os_error() != Some(nix::libc::ESRCH) => {
                    return Err(ipvs_err("deleting a virtual service")(e));
                }
                _ => n += 1,
            }
        }
        report.push(format!("ipvs: deleted {n} virtual services"));
    }
    if ip_cmd(&["link", "show", LINK], None).is_ok() {
        ip_cmd(&["link", "del", LINK], None).map_err(ipvs_err(format!("deleting {LINK}")))?;
        report.push(format!(
            "ipvs: deleted link {LINK} ({} addresses)",
            bound.len()
        ));
    }
    // The rules reference the sets: rules first.
    iptables::cleanup_all()?;
    report.push("ipvs: removed SY- chains and hooks (legacy and nft)".into());
    let sets = Command::new("ipset")
        .args(["list", "-n"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ours: Vec<&str> = sets
        .lines()
        .filter(|s| s.starts_with("SY-") || s.starts_with("SY6-"))
        .collect();
    for s in &ours {
        let out = Command::new("ipset")
            .args(["destroy", s])
            .output()
            .map_err(ipvs_err("running ipset"))?;
        if !out.status.success() {
            return Err(DataplaneError::Ipvs {
                what: format!(
                    "ipset destroy {s}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: io::Error::other("ipset destroy failed"),
            });
        }
    }
    if !ours.is_empty() {
        report.push(format!("ipvs: destroyed {} ipsets", ours.len()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(sched: &str, persistence: Option<u32>) -> VirtualService {
        VirtualService {
            addr: "10.96.0.10".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: sched.into(),
            persistence,
        }
    }

    #[test]
    fn a_service_reads_back_as_it_was_written() {
        for (sched, p) in [("rr", None), ("mh", Some(10_800)), ("sh", None)] {
            let v = vs(sched, p);
            let got = parse_service(&service_attrs(&v, true));
            assert_eq!(
                got,
                Some(KernelService {
                    key: VsKey::of(&v),
                    scheduler: sched.into(),
                    persistence: p,
                })
            );
        }
        let v6 = VirtualService {
            addr: "fd00::10".parse().unwrap_or(IpAddr::from([0u8; 16])),
            ..vs("rr", None)
        };
        assert_eq!(
            parse_service(&service_attrs(&v6, true)).map(|k| k.key),
            Some(VsKey::of(&v6))
        );
    }

    #[test]
    fn a_real_server_reads_back_with_its_weight() {
        let rs = RealServer {
            addr: "10.244.1.11".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: 8080,
            weight: 0,
        };
        assert_eq!(
            parse_dest(&dest_attrs(&rs, true), false),
            Some(KernelDest {
                addr: rs.addr,
                port: 8080,
                weight: 0,
                active: 0,
                inactive: 0,
            })
        );
    }
}
