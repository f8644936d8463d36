//! Stale UDP conntrack cleanup over ctnetlink, as kube-proxy's conntrack reconciler does it.
//!
//! UDP has no connection to close: once the kernel's conntrack has an entry for a client's
//! 5-tuple, every later datagram follows that entry's NAT, even after the backend it points
//! at was removed, and an entry made while a service had no endpoints (or did not exist yet)
//! keeps a client black-holed after endpoints appear. After a sync we dump the UDP entries
//! and delete those whose original destination is a UDP service frontend (ClusterIP,
//! external IP, load-balancer IP, or a NodePort on any node address) but whose reply comes
//! from something that is not a current endpoint of that service port.
//!
//! Messages are laid out as in `include/uapi/linux/netfilter/nfnetlink_conntrack.h`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::sync::Arc;

use switchyard_model::{ChangeSet, DesiredState, FrontendKind, Protocol, ServicePortState};

use crate::metrics::Metrics;
use crate::nl::{self, nested, nla};

pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub const IPCTNL_MSG_CT_NEW: u16 = 0;
pub const IPCTNL_MSG_CT_GET: u16 = 1;
pub const IPCTNL_MSG_CT_DELETE: u16 = 2;

pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;

pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;

pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;

pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_UDP: u8 = 17;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry as the kernel lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
    pub zone: u16,
    /// The kernel's id of the entry: a delete carrying it removes only this very entry, not
    /// a newer one that reuses the tuple.
    pub id: Option<u32>,
}

fn ct_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

/// `struct nfgenmsg`: family, version 0, resource id 0 (big endian).
fn nfgenmsg(family: u8) -> [u8; 4] {
    [family, 0, 0, 0]
}

/// The request that dumps every entry of one address family.
pub fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    nl::message(
        ct_type(IPCTNL_MSG_CT_GET),
        nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
        seq,
        &nfgenmsg(family),
    )
}

fn tuple_attrs(t: &Tuple) -> Vec<u8> {
    let mut ip = Vec::new();
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            nla(&mut ip, CTA_IP_V4_SRC, &s.octets());
            nla(&mut ip, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            nla(&mut ip, CTA_IP_V6_SRC, &v6(s).octets());
            nla(&mut ip, CTA_IP_V6_DST, &v6(d).octets());
        }
    }
    let mut proto = Vec::new();
    nla(&mut proto, CTA_PROTO_NUM, &[t.proto]);
    nla(&mut proto, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
    nla(&mut proto, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
    let mut out = Vec::new();
    nested(&mut out, CTA_TUPLE_IP, &ip);
    nested(&mut out, CTA_TUPLE_PROTO, &proto);
    out
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// The request that deletes one entry, named by its original tuple (and zone and id).
pub fn delete_request(e: &Entry, seq: u32) -> Vec<u8> {
    let family = if e.orig.src.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let mut payload = nfgenmsg(family).to_vec();
    nested(&mut payload, CTA_TUPLE_ORIG, &tuple_attrs(&e.orig));
    if e.zone != 0 {
        nla(&mut payload, CTA_ZONE, &e.zone.to_be_bytes());
    }
    if let Some(id) = e.id {
        nla(&mut payload, CTA_ID, &id.to_be_bytes());
    }
    nl::message(
        ct_type(IPCTNL_MSG_CT_DELETE),
        nl::NLM_F_REQUEST | nl::NLM_F_ACK,
        seq,
        &payload,
    )
}

fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
    let ip = nl::attr(buf, CTA_TUPLE_IP)?;
    let proto = nl::attr(buf, CTA_TUPLE_PROTO)?;
    let v4 = |ty| -> Option<IpAddr> {
        let b: [u8; 4] = nl::attr(ip, ty)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    };
    let v6 = |ty| -> Option<IpAddr> {
        let b: [u8; 16] = nl::attr(ip, ty)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    };
    let (src, dst) = match (v4(CTA_IP_V4_SRC), v4(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (v6(CTA_IP_V6_SRC)?, v6(CTA_IP_V6_DST)?),
    };
    let port = |ty| -> u16 {
        nl::attr(proto, ty)
            .and_then(|v| v.try_into().ok())
            .map_or(0, u16::from_be_bytes)
    };
    Some(Tuple {
        src,
        dst,
        proto: *nl::attr(proto, CTA_PROTO_NUM)?.first()?,
        sport: port(CTA_PROTO_SRC_PORT),
        dport: port(CTA_PROTO_DST_PORT),
    })
}

/// An entry from the payload of an `IPCTNL_MSG_CT_NEW` message (nfgenmsg + attributes).
pub fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let attrs = payload.get(4..)?;
    Some(Entry {
        orig: parse_tuple(nl::attr(attrs, CTA_TUPLE_ORIG)?)?,
        reply: parse_tuple(nl::attr(attrs, CTA_TUPLE_REPLY)?)?,
        zone: nl::attr(attrs, CTA_ZONE)
            .and_then(|v| v.try_into().ok())
            .map_or(0, u16::from_be_bytes),
        id: nl::attr(attrs, CTA_ID)
            .and_then(|v| v.try_into().ok())
            .map(u32::from_be_bytes),
    })
}

/// A ctnetlink socket in the caller's network namespace.
pub struct Conntrack {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn errno(e: i32, what: &str) -> std::io::Error {
    let os = std::io::Error::from_raw_os_error(e);
    std::io::Error::new(os.kind(), format!("{what}: {os}"))
}

impl Conntrack {
    pub fn open() -> std::io::Result<Conntrack> {
        use netlink_sys::{SocketAddr, protocols::NETLINK_NETFILTER};
        let mut sock = netlink_sys::Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(std::io::Error::from)?;
        Ok(Conntrack {
            sock,
            seq: 1,
            buf: vec![0; 1 << 16],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Every entry of one address family (`AF_INET` or `AF_INET6`).
    pub fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        let seq = self.next_seq();
        self.sock.send(&dump_request(family, seq), 0)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    nl::NLMSG_DONE => return Ok(out),
                    nl::NLMSG_ERROR => {
                        let e = m.error().unwrap_or(0);
                        if e != 0 {
                            return Err(errno(e, "dumping conntrack entries"));
                        }
                    }
                    t if t == ct_type(IPCTNL_MSG_CT_NEW) => {
                        out.extend(parse_entry(m.payload));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Delete one entry; `false` when it was already gone.
    pub fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        let seq = self.next_seq();
        self.sock.send(&delete_request(e, seq), 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.error() {
                    Some(0) => return Ok(true),
                    Some(nix::libc::ENOENT) => return Ok(false),
                    Some(err) => return Err(errno(err, "deleting a conntrack entry")),
                    None => {}
                }
            }
        }
    }
}

/// Where UDP service traffic may legitimately be going: for each frontend, the endpoints
/// (address, port) that may answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpServices {
    vips: HashMap<(IpAddr, u16), HashSet<(IpAddr, u16)>>,
    node_ports: HashMap<u16, HashSet<(IpAddr, u16)>>,
}

impl UdpServices {
    /// The UDP service ports of the desired state.
    pub fn from_state(state: &DesiredState) -> UdpServices {
        let mut u = UdpServices::default();
        for p in state.ports.values() {
            u.add(p);
        }
        u
    }

    /// Add one service port (no-op for other protocols).
    pub fn add(&mut self, p: &ServicePortState) {
        if p.key.protocol != Protocol::Udp {
            return;
        }
        let eps: HashSet<(IpAddr, u16)> =
            p.all_backends().iter().map(|b| (b.addr, b.port)).collect();
        for f in &p.frontends {
            let set = if f.kind == FrontendKind::NodePort {
                self.node_ports.entry(f.port).or_default()
            } else {
                self.vips.entry((f.addr, f.port)).or_default()
            };
            set.extend(eps.iter().copied());
        }
    }

    /// A UDP service port that was removed: whatever its frontends still carry is stale,
    /// unless another current service port owns the same frontend.
    pub fn add_removed(&mut self, p: &ServicePortState) {
        if p.key.protocol != Protocol::Udp {
            return;
        }
        for f in &p.frontends {
            if f.kind == FrontendKind::NodePort {
                self.node_ports.entry(f.port).or_default();
            } else {
                self.vips.entry((f.addr, f.port)).or_default();
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.node_ports.is_empty()
    }

    /// An entry bound for a UDP service whose reply does not come from a current endpoint.
    pub fn is_stale(&self, e: &Entry) -> bool {
        if e.orig.proto != IPPROTO_UDP {
            return false;
        }
        let valid = self
            .vips
            .get(&(e.orig.dst, e.orig.dport))
            .or_else(|| self.node_ports.get(&e.orig.dport));
        valid.is_some_and(|eps| !eps.contains(&(e.reply.src, e.reply.sport)))
    }
}

/// Whether a ChangeSet touches a UDP service port (only then can UDP entries turn stale).
pub fn touches_udp(changes: &ChangeSet) -> bool {
    let udp = |p: &ServicePortState| p.key.protocol == Protocol::Udp;
    changes.added.iter().any(|p| udp(p))
        || changes.removed.iter().any(|p| udp(p))
        || changes.changed.iter().any(|c| udp(&c.new))
}

/// The conntrack table as the cleanup sees it: list and delete. The real one is ctnetlink
/// (`Conntrack`); tests use `FakeConntrack` and `FaultyConntrack`.
pub trait ConntrackTable: Send + std::fmt::Debug {
    /// Every entry of one address family (`AF_INET` or `AF_INET6`).
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>>;
    /// Delete one entry; `false` when it was already gone.
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool>;
}

impl ConntrackTable for Conntrack {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        Conntrack::list(self, family)
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        Conntrack::delete(self, e)
    }
}

/// An in-memory conntrack table; clones share it.
#[derive(Debug, Default, Clone)]
pub struct FakeConntrack {
    pub entries: Arc<std::sync::Mutex<Vec<Entry>>>,
}

impl FakeConntrack {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ConntrackTable for FakeConntrack {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        Ok(self
            .entries()
            .into_iter()
            .filter(|e| (family == AF_INET) == e.orig.src.is_ipv4())
            .collect())
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        let mut v = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = v.len();
        v.retain(|x| x != e);
        Ok(v.len() < before)
    }
}

/// Wraps a table and fails the deletes whose 1-based numbers are listed.
#[derive(Debug)]
pub struct FaultyConntrack<T> {
    pub inner: T,
    pub fail_deletes: Vec<usize>,
    deletes: usize,
}

impl<T> FaultyConntrack<T> {
    pub fn new(inner: T, fail_deletes: Vec<usize>) -> Self {
        FaultyConntrack {
            inner,
            fail_deletes,
            deletes: 0,
        }
    }
}

impl<T: ConntrackTable> ConntrackTable for FaultyConntrack<T> {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        self.inner.list(family)
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        self.deletes += 1;
        if self.fail_deletes.contains(&self.deletes) {
            return Err(std::io::Error::other(format!(
                "injected fault on delete {}",
                self.deletes
            )));
        }
        self.inner.delete(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening a ctnetlink socket: {source}")]
    Open {
        #[source]
        source: std::io::Error,
    },
    #[error("listing conntrack entries: {source}")]
    List {
        #[source]
        source: std::io::Error,
    },
    #[error("deleting the conntrack entry {orig:?}: {source}")]
    Delete {
        orig: Tuple,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the real conntrack table.
type OpenTable = fn() -> std::io::Result<Box<dyn ConntrackTable>>;

/// A backend's handle on the cleanup: the table (the real one is opened on first use and
/// reopened after an error) and the metric. A failure is returned, so the sync loop retries
/// it as a full sync; the rules are in place meanwhile.
#[derive(Debug)]
pub struct StaleUdp {
    table: Option<Box<dyn ConntrackTable>>,
    /// Opens the real table (none for fakes: their table is never dropped).
    open: Option<OpenTable>,
    metrics: Arc<Metrics>,
}

fn open_ctnetlink() -> std::io::Result<Box<dyn ConntrackTable>> {
    Ok(Box::new(Conntrack::open()?))
}

impl StaleUdp {
    /// Over ctnetlink in the caller's network namespace.
    pub fn new(metrics: Arc<Metrics>) -> StaleUdp {
        StaleUdp {
            table: None,
            open: Some(open_ctnetlink),
            metrics,
        }
    }

    /// Over any table (fakes in tests).
    pub fn with_table(table: Box<dyn ConntrackTable>, metrics: Arc<Metrics>) -> StaleUdp {
        StaleUdp {
            table: Some(table),
            open: None,
            metrics,
        }
    }

    pub fn clear(&mut self, services: &UdpServices) -> Result<usize, ConntrackError> {
        if services.is_empty() {
            return Ok(0);
        }
        let mut table = match (self.table.take(), self.open) {
            (Some(t), _) => t,
            (None, Some(open)) => open().map_err(|source| ConntrackError::Open { source })?,
            (None, None) => return Ok(0),
        };
        let result = clear_stale(table.as_mut(), services);
        // A socket that failed may be out of step: reopen it next time (fakes are kept).
        if result.is_ok() || self.open.is_none() {
            self.table = Some(table);
        }
        let n = result?;
        if n > 0 {
            tracing::info!(entries = n, "deleted stale UDP conntrack entries");
            self.metrics.stale_conntrack_deleted.inc_by(n as u64);
        }
        Ok(n)
    }
}

/// Delete the stale UDP entries of both families; returns how many were deleted.
pub fn clear_stale(
    ct: &mut dyn ConntrackTable,
    services: &UdpServices,
) -> Result<usize, ConntrackError> {
    if services.is_empty() {
        return Ok(0);
    }
    let mut deleted = 0;
    for family in [AF_INET, AF_INET6] {
        let entries = ct
            .list(family)
            .map_err(|source| ConntrackError::List { source })?;
        for e in entries.iter().filter(|e| services.is_stale(e)) {
            let gone = ct.delete(e).map_err(|source| ConntrackError::Delete {
                orig: e.orig,
                source,
            })?;
            if gone {
                tracing::debug!(orig = ?e.orig, reply = ?e.reply, "deleted stale UDP conntrack entry");
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> Entry {
        let client: IpAddr = "10.0.0.5".parse().unwrap();
        Entry {
            orig: Tuple {
                src: client,
                dst: dst.parse().unwrap(),
                proto: IPPROTO_UDP,
                sport: 40000,
                dport,
            },
            reply: Tuple {
                src: reply_src.parse().unwrap(),
                dst: client,
                proto: IPPROTO_UDP,
                sport: reply_sport,
                dport: 40000,
            },
            zone: 0,
            id: Some(0x0102_0304),
        }
    }

    /// The delete request, byte for byte as nfnetlink_conntrack.h lays it out.
    #[test]
    fn delete_request_layout() {
        let e = entry("10.96.0.10", 53, "10.244.1.11", 9125);
        let m = delete_request(&e, 7);
        let mut want: Vec<u8> = Vec::new();
        let body: &[u8] = &[
            2, 0, 0, 0, // nfgenmsg: AF_INET, v0, res_id 0
            52, 0, 0x01, 0x80, // CTA_TUPLE_ORIG | NESTED
            20, 0, 0x01, 0x80, // CTA_TUPLE_IP | NESTED
            8, 0, 1, 0, 10, 0, 0, 5, // CTA_IP_V4_SRC
            8, 0, 2, 0, 10, 96, 0, 10, // CTA_IP_V4_DST
            28, 0, 0x02, 0x80, // CTA_TUPLE_PROTO | NESTED
            5, 0, 1, 0, 17, 0, 0, 0, // CTA_PROTO_NUM udp (padded)
            6, 0, 2, 0, 0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT 40000 BE
            6, 0, 3, 0, 0, 53, 0, 0, // CTA_PROTO_DST_PORT 53 BE
            8, 0, 12, 0, 1, 2, 3, 4, // CTA_ID BE
        ];
        want.extend_from_slice(&u32::try_from(16 + body.len()).unwrap().to_ne_bytes());
        want.extend_from_slice(&0x0102u16.to_ne_bytes()); // CTNETLINK << 8 | DELETE
        want.extend_from_slice(&0x0005u16.to_ne_bytes()); // REQUEST | ACK
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(body);
        assert_eq!(m, want);
    }

    #[test]
    fn dump_request_layout() {
        let m = dump_request(AF_INET6, 3);
        assert_eq!(m.len(), 20);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0101);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x0301);
        assert_eq!(&m[16..], &[10, 0, 0, 0]);
    }

    /// What the kernel sends for an entry parses back, for both families and with a zone.
    #[test]
    fn entries_round_trip() {
        for (a, b) in [("10.96.0.10", "10.244.1.11"), ("fd00::10", "fd00:244::11")] {
            let mut e = entry(a, 53, b, 9125);
            if a.contains(':') {
                e.orig.src = "fd00::5".parse().unwrap();
            }
            e.reply.dst = e.orig.src;
            e.zone = 3;
            let mut payload = vec![0u8; 4];
            nested(&mut payload, CTA_TUPLE_ORIG, &tuple_attrs(&e.orig));
            nested(&mut payload, CTA_TUPLE_REPLY, &tuple_attrs(&e.reply));
            nla(&mut payload, 3, &0x1a0u32.to_be_bytes()); // CTA_STATUS, ignored
            nla(&mut payload, CTA_ZONE, &3u16.to_be_bytes());
            nla(&mut payload, CTA_ID, &0x0102_0304u32.to_be_bytes());
            assert_eq!(parse_entry(&payload), Some(e), "{a}");
        }
    }

    #[test]
    fn stale_means_a_service_frontend_answered_by_a_non_endpoint() {
        let mut u = UdpServices::default();
        u.vips.insert(
            ("10.96.0.10".parse().unwrap(), 53),
            [("10.244.1.11".parse().unwrap(), 9125)]
                .into_iter()
                .collect(),
        );
        u.node_ports.insert(30053, HashSet::new());
        // The current endpoint: kept.
        assert!(!u.is_stale(&entry("10.96.0.10", 53, "10.244.1.11", 9125)));
        // A removed endpoint, or no NAT at all (the reply from the ClusterIP itself): stale.
        assert!(u.is_stale(&entry("10.96.0.10", 53, "10.244.1.12", 9125)));
        assert!(u.is_stale(&entry("10.96.0.10", 53, "10.96.0.10", 53)));
        // Same endpoint address on another port (targetPort changed): stale.
        assert!(u.is_stale(&entry("10.96.0.10", 53, "10.244.1.11", 53)));
        // A NodePort without endpoints, on any address.
        assert!(u.is_stale(&entry("172.30.0.10", 30053, "172.30.0.10", 30053)));
        // Not a service frontend, or not UDP: untouched.
        assert!(!u.is_stale(&entry("10.96.0.11", 53, "10.96.0.11", 53)));
        let mut tcp = entry("10.96.0.10", 53, "10.244.1.12", 9125);
        tcp.orig.proto = 6;
        assert!(!u.is_stale(&tcp));
    }
}
