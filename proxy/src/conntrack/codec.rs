//! The nfnetlink_conntrack messages we send and read, laid out as in
//! `include/uapi/linux/netfilter/nfnetlink_conntrack.h`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

pub(crate) fn ct_type(msg: u16) -> u16 {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> Entry {
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
}
