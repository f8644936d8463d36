//! A readable view of the service maps: each frontend key with where its set sends traffic.
//! `switchyard maps` prints it from the pinned maps; tests compare it with `plan`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use switchyard_ebpf_common::{
    BackendValue, FE_SNAT, FE_SOURCE_RANGES, FrontendValue, SCOPE_INTERNAL, SET_AFFINITY, SET_DROP,
    SET_MAGLEV, SlotKey,
};

use super::io::Dump;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct FrontendView {
    /// `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
    pub frontend: String,
    pub protocol: String,
    /// `internal` (pods and node sockets) or `external`.
    pub scope: &'static str,
    /// `backends`, `reject` or `drop`.
    pub action: &'static str,
    /// Distinct backends, sorted.
    pub backends: Vec<String>,
    pub options: Vec<String>,
}

fn v4(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn v6(a: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn endpoint(ip: IpAddr, port_be: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{}", u16::from_be(port_be)),
        IpAddr::V6(a) => format!("[{a}]:{}", u16::from_be(port_be)),
    }
}

fn backend_str(b: &BackendValue) -> String {
    let ip = if b.family == 6 {
        IpAddr::V6(v6(b.addr))
    } else {
        IpAddr::V4(v4(b.addr[0]))
    };
    endpoint(ip, b.port)
}

fn proto(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

fn frontend_view(d: &Dump, fe: String, p: u8, scope: u8, v: FrontendValue) -> FrontendView {
    let mut options = Vec::new();
    let (action, backends) = match d.sets.get(&v.set_id) {
        None => ("missing-set", Vec::new()),
        Some(set) => {
            if set.flags & SET_AFFINITY != 0 {
                options.push(format!("affinity={}s", set.affinity_timeout));
            }
            if set.flags & SET_MAGLEV != 0 {
                options.push("maglev".into());
            }
            if set.count == 0 {
                (
                    if set.flags & SET_DROP != 0 {
                        "drop"
                    } else {
                        "reject"
                    },
                    Vec::new(),
                )
            } else {
                let mut bs: Vec<String> = (0..set.count)
                    .filter_map(|i| {
                        d.slots.get(&SlotKey {
                            set_id: v.set_id,
                            slot: set.slot_base + i,
                        })
                    })
                    .filter_map(|id| d.backends.get(id))
                    .map(backend_str)
                    .collect();
                bs.sort();
                bs.dedup();
                ("backends", bs)
            }
        }
    };
    if v.flags & FE_SNAT != 0 {
        options.push("masquerade".into());
    }
    if v.flags & FE_SOURCE_RANGES != 0 {
        let ranges: Vec<String> = d
            .ranges4
            .iter()
            .filter(|(s, _, _)| *s == v.set_id)
            .map(|(_, a, l)| format!("{}/{l}", v4(*a)))
            .chain(
                d.ranges6
                    .iter()
                    .filter(|(s, _, _)| *s == v.set_id)
                    .map(|(_, a, l)| format!("{}/{l}", v6(*a))),
            )
            .collect();
        options.push(format!("sourceRanges={}", ranges.join(",")));
    }
    FrontendView {
        frontend: fe,
        protocol: proto(p),
        scope: if scope == SCOPE_INTERNAL {
            "internal"
        } else {
            "external"
        },
        action,
        backends,
        options,
    }
}

/// Every frontend key, sorted by frontend, protocol and scope.
pub fn view(d: &Dump) -> Vec<FrontendView> {
    let mut out = Vec::new();
    for (k, v) in &d.frontends4 {
        out.push(frontend_view(
            d,
            endpoint(IpAddr::V4(v4(k.addr)), k.port),
            k.proto,
            k.scope,
            *v,
        ));
    }
    for (k, v) in &d.frontends6 {
        out.push(frontend_view(
            d,
            endpoint(IpAddr::V6(v6(k.addr)), k.port),
            k.proto,
            k.scope,
            *v,
        ));
    }
    out.sort();
    out
}

pub fn to_table(views: &[FrontendView], counters: &BTreeMap<String, (u64, u64, u64)>) -> String {
    let mut s = String::new();
    for v in views {
        let target = match v.action {
            "backends" => v.backends.join(", "),
            other => other.to_uppercase(),
        };
        let _ = write!(
            s,
            "{:<24} {:<4} {:<8} -> {target}",
            v.frontend, v.protocol, v.scope
        );
        if !v.options.is_empty() {
            let _ = write!(s, "  [{}]", v.options.join(" "));
        }
        if let Some((p, b, c)) = counters.get(&format!("{} {}", v.frontend, v.protocol))
            && v.scope == "internal"
        {
            let _ = write!(s, "  packets={p} bytes={b} connections={c}");
        }
        s.push('\n');
    }
    s
}
