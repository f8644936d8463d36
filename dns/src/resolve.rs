//! The pure answer function: one query message and a snapshot in, a response (or "forward
//! this upstream") out. Follows the Kubernetes DNS-Based Service Discovery specification 1.1.0
//! and CoreDNS's kubernetes plugin where the specification is silent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::snapshot::{PodsMode, Rec, Snapshot};

#[derive(Debug)]
pub enum Outcome {
    Answer(Box<Message>),
    /// Not ours: send it upstream.
    Forward,
}

fn fqdn(s: &str) -> Name {
    Name::from_str(&format!("{s}.")).unwrap_or_else(|_| Name::root())
}

/// The lowercase form of a name without the trailing dot.
pub fn key_of(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

pub fn response_to(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = req.metadata.checking_disabled;
    m.metadata.response_code = code;
    m.queries.clone_from(&req.queries);
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.edns = Some(e);
    }
    m
}

fn soa(snap: &Snapshot) -> Record {
    let zone = &snap.cfg.zone;
    Record::from_rdata(
        fqdn(zone),
        snap.cfg.ttl,
        RData::SOA(SOA::new(
            fqdn(&format!("ns.dns.{zone}")),
            fqdn(&format!("hostmaster.{zone}")),
            snap.serial,
            7200,
            1800,
            86400,
            snap.cfg.ttl,
        )),
    )
}

fn rdata(rec: &Rec) -> RData {
    match rec {
        Rec::Addr(IpAddr::V4(a)) => RData::A(A(*a)),
        Rec::Addr(IpAddr::V6(a)) => RData::AAAA(AAAA(*a)),
        Rec::Cname(t) => RData::CNAME(CNAME(fqdn(t))),
        Rec::Srv {
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(0, *weight, *port, fqdn(target))),
        Rec::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
    }
}

fn matches(rec: &Rec, t: RecordType) -> bool {
    matches!(
        (rec, t),
        (_, RecordType::ANY)
            | (Rec::Addr(IpAddr::V4(_)), RecordType::A)
            | (Rec::Addr(IpAddr::V6(_)), RecordType::AAAA)
            | (Rec::Cname(_), RecordType::CNAME)
            | (Rec::Srv { .. }, RecordType::SRV)
            | (Rec::Txt(_), RecordType::TXT)
    )
}

fn in_zone(key: &str, zone: &str) -> bool {
    key == zone
        || (key.len() > zone.len()
            && key.ends_with(zone)
            && key.as_bytes()[key.len() - zone.len() - 1] == b'.')
}

/// `d.c.b.a.in-addr.arpa` / 32 nibbles `.ip6.arpa` -> the address.
pub fn reverse_ip(key: &str) -> Option<IpAddr> {
    if let Some(v4) = key.strip_suffix(".in-addr.arpa") {
        let parts: Vec<&str> = v4.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let mut o = [0u8; 4];
        for (i, p) in parts.iter().rev().enumerate() {
            o[i] = p.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(o)));
    }
    if let Some(v6) = key.strip_suffix(".ip6.arpa") {
        let nibbles: Vec<&str> = v6.split('.').collect();
        if nibbles.len() != 32 {
            return None;
        }
        let mut o = [0u8; 16];
        for (i, n) in nibbles.iter().rev().enumerate() {
            let v = u8::from_str_radix(n, 16).ok()?;
            if n.len() != 1 {
                return None;
            }
            o[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
        }
        return Some(IpAddr::V6(Ipv6Addr::from(o)));
    }
    None
}

fn pod_ip(label: &str) -> Option<IpAddr> {
    if label.contains("--") || label.matches('-').count() > 3 {
        return label
            .replace('-', ":")
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
    }
    label
        .replace('-', ".")
        .parse::<Ipv4Addr>()
        .ok()
        .map(IpAddr::V4)
}

/// Answer one query from the snapshot.
pub fn resolve(snap: &Snapshot, req: &Message) -> Outcome {
    if req.metadata.message_type != MessageType::Query {
        return Outcome::Answer(Box::new(response_to(req, ResponseCode::FormErr)));
    }
    if req.metadata.op_code != OpCode::Query {
        return Outcome::Answer(Box::new(response_to(req, ResponseCode::NotImp)));
    }
    let [q] = req.queries.as_slice() else {
        return Outcome::Answer(Box::new(response_to(req, ResponseCode::FormErr)));
    };
    let key = key_of(q.name());
    let qtype = q.query_type();
    let zone = snap.cfg.zone.as_str();

    if in_zone(&key, zone) {
        if !snap.synced {
            return Outcome::Answer(Box::new(response_to(req, ResponseCode::ServFail)));
        }
        return Outcome::Answer(Box::new(answer_zone(snap, req, &key, qtype)));
    }
    if let Some(ip) = reverse_ip(&key)
        && snap.synced
        && let Some(targets) = snap.ptr.get(&ip)
    {
        let mut m = response_to(req, ResponseCode::NoError);
        m.metadata.authoritative = true;
        if matches!(qtype, RecordType::PTR | RecordType::ANY) {
            for t in targets {
                m.answers.push(Record::from_rdata(
                    q.name().clone(),
                    snap.cfg.ttl,
                    RData::PTR(PTR(fqdn(t))),
                ));
            }
        }
        return Outcome::Answer(Box::new(m));
    }
    Outcome::Forward
}

fn answer_zone(snap: &Snapshot, req: &Message, key: &str, qtype: RecordType) -> Message {
    let q = &req.queries[0];
    let ttl = snap.cfg.ttl;
    let zone = snap.cfg.zone.as_str();
    let mut m = response_to(req, ResponseCode::NoError);
    m.metadata.authoritative = true;

    let Some(recs) = snap.names.get(key) else {
        // Pod records, in insecure mode: a-b-c-d.<ns>.pod.<zone> for any address.
        if snap.cfg.pods == PodsMode::Insecure
            && let Some(rest) = key.strip_suffix(&format!(".pod.{zone}"))
        {
            let labels: Vec<&str> = rest.split('.').collect();
            match labels.as_slice() {
                [_ns] => {
                    m.authorities.push(soa(snap));
                    return m;
                }
                [ip, _ns] => {
                    if let Some(ip) = pod_ip(ip) {
                        let rec = Rec::Addr(ip);
                        if matches(&rec, qtype) {
                            m.answers
                                .push(Record::from_rdata(q.name().clone(), ttl, rdata(&rec)));
                        } else {
                            m.authorities.push(soa(snap));
                        }
                        return m;
                    }
                }
                _ => {}
            }
        }
        m.metadata.response_code = ResponseCode::NXDomain;
        m.authorities.push(soa(snap));
        return m;
    };

    if key == zone {
        match qtype {
            RecordType::SOA => {
                m.answers.push(soa(snap));
                return m;
            }
            RecordType::NS => {
                m.answers.push(Record::from_rdata(
                    q.name().clone(),
                    ttl,
                    RData::NS(NS(fqdn(&format!("ns.dns.{zone}")))),
                ));
                return m;
            }
            _ => {}
        }
    }

    let cname = recs.iter().find_map(|r| match r {
        Rec::Cname(t) => Some(t.clone()),
        _ => None,
    });
    if let Some(target) = cname.filter(|_| !matches!(qtype, RecordType::CNAME | RecordType::ANY)) {
        m.answers.push(Record::from_rdata(
            q.name().clone(),
            ttl,
            rdata(&Rec::Cname(target.clone())),
        ));
        // A target inside the zone is answered here too; outside, the client's resolver goes on.
        if in_zone(&target, zone)
            && let Some(trecs) = snap.names.get(target.as_str())
        {
            for r in trecs.iter().filter(|r| matches(r, qtype)) {
                m.answers
                    .push(Record::from_rdata(fqdn(&target), ttl, rdata(r)));
            }
        }
        return m;
    }

    for r in recs.iter().filter(|r| matches(r, qtype)) {
        m.answers
            .push(Record::from_rdata(q.name().clone(), ttl, rdata(r)));
        if let Rec::Srv { target, .. } = r
            && let Some(trecs) = snap.names.get(target.as_str())
        {
            for t in trecs.iter().filter(|t| matches!(t, Rec::Addr(_))) {
                let rec = Record::from_rdata(fqdn(target), ttl, rdata(t));
                if !m.additionals.contains(&rec) {
                    m.additionals.push(rec);
                }
            }
        }
    }
    if m.answers.is_empty() {
        // The name exists without this type: NODATA with the SOA.
        m.authorities.push(soa(snap));
    }
    m
}
