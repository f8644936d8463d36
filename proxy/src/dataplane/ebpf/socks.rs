//! Sockets the socket load balancer translated at `connect()` to an endpoint that is gone.
//! Such a socket never passes the load balancer again (a connected socket's sends carry no
//! address), so without help a connected UDP client keeps sending to a removed endpoint and
//! a TCP client retransmits into a vanished pod. Every translated socket has an entry in
//! `SY_SOCK_REVNAT4`/`6` (its cookie, the endpoint, the frontend it asked for); after a sync
//! that may strand flows, the entries whose endpoint is no longer live for the frontend's
//! service ports (`ct::LiveEndpoints`) name sockets to destroy, which is done through
//! sock_diag in the node's network namespace (host processes and hostNetwork pods) and then
//! in the pods' (Cilium's behaviour).

use std::collections::{HashMap, HashSet};

use switchyard_ebpf_common::{SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value};
use switchyard_model::ServicePortKey;

use super::ct::{Endpoint, LiveEndpoints};
use super::io::MapSource;
use super::render::PortRender;
use crate::sockdiag::{IPPROTO_TCP, IPPROTO_UDP, Sock, SockDiag};

/// A translated socket: its cookie, the endpoint it was sent to, the frontend it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    pub cookie: u64,
    pub endpoint: Endpoint,
    pub frontend: Endpoint,
}

/// Frontend (address, port) -> the service ports (ids) behind it, any protocol.
#[derive(Debug, Clone, Default)]
pub struct Frontends(pub HashMap<Endpoint, Vec<u32>>);

pub fn frontends<'a>(
    ports: impl Iterator<Item = (&'a ServicePortKey, &'a PortRender)>,
) -> Frontends {
    let mut out: HashMap<Endpoint, Vec<u32>> = HashMap::new();
    for (_, p) in ports {
        for f in port_frontends(p) {
            out.entry(f).or_default().push(p.service_id);
        }
    }
    Frontends(out)
}

/// The (address, port) pairs of one service port's frontends.
pub fn port_frontends(p: &PortRender) -> Vec<Endpoint> {
    p.frontends4
        .iter()
        .map(|(k, _)| ([k.addr, 0, 0, 0], k.port))
        .chain(p.frontends6.iter().map(|(k, _)| (k.addr, k.port)))
        .collect()
}

/// The translated sockets whose endpoint is live for none of the frontend's service ports
/// (or whose frontend is gone).
/// `local` are endpoints that never go stale: the node-local DNS listener, which the cluster
/// DNS Service's sockets are redirected to instead of an endpoint.
pub fn stale(
    translated: impl IntoIterator<Item = Translated>,
    frontends: &Frontends,
    live: &LiveEndpoints,
    local: &[Endpoint],
) -> HashMap<u64, Translated> {
    translated
        .into_iter()
        .filter(|t| !local.contains(&t.endpoint))
        .filter(|t| {
            !frontends
                .0
                .get(&t.frontend)
                .is_some_and(|ids| ids.iter().any(|id| live.contains(*id, &t.endpoint)))
        })
        .map(|t| (t.cookie, t))
        .collect()
}

/// An IPv4-mapped IPv6 address (an IPv6 socket talking to an IPv4 service) in the IPv4
/// form the frontends and endpoints are keyed by; other addresses as they are.
pub fn unmap(a: [u32; 4]) -> [u32; 4] {
    if a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        [a[3], 0, 0, 0]
    } else {
        a
    }
}

/// Every entry of both reverse-translation maps (v4-mapped ones in IPv4 form).
pub fn translated(ebpf: &mut impl MapSource) -> Result<Vec<Translated>, aya::maps::MapError> {
    use switchyard_ebpf_common::maps as m;
    let mut out = Vec::new();
    if let Some(map) = ebpf.map_mut(m::SOCK_REVNAT4) {
        let map = aya::maps::HashMap::<_, SockRev4Key, SockRev4Value>::try_from(map)?;
        out.extend(map.iter().filter_map(Result::ok).map(|(k, v)| Translated {
            cookie: k.cookie,
            endpoint: ([k.addr, 0, 0, 0], k.port),
            frontend: ([v.addr, 0, 0, 0], v.port),
        }));
    }
    if let Some(map) = ebpf.map_mut(m::SOCK_REVNAT6) {
        let map = aya::maps::HashMap::<_, SockRev6Key, SockRev6Value>::try_from(map)?;
        out.extend(map.iter().filter_map(Result::ok).map(|(k, v)| Translated {
            cookie: k.cookie,
            endpoint: (unmap(k.addr), k.port),
            frontend: (unmap(v.addr), v.port),
        }));
    }
    Ok(out)
}

/// Forget the reverse translation of destroyed sockets.
pub fn forget(ebpf: &mut impl MapSource, gone: &[Translated]) {
    use switchyard_ebpf_common::maps as m;
    let cookies: HashSet<u64> = gone.iter().map(|t| t.cookie).collect();
    forget_in::<SockRev4Key, SockRev4Value>(ebpf, m::SOCK_REVNAT4, &cookies, |k| k.cookie);
    forget_in::<SockRev6Key, SockRev6Value>(ebpf, m::SOCK_REVNAT6, &cookies, |k| k.cookie);
}

/// Remove the entries of one reverse-translation map whose key has one of `cookies`.
fn forget_in<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut impl MapSource,
    name: &str,
    cookies: &HashSet<u64>,
    cookie: fn(&K) -> u64,
) {
    if let Some(map) = ebpf.map_mut(name)
        && let Ok(mut map) = aya::maps::HashMap::<_, K, V>::try_from(map)
    {
        let keys: Vec<K> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cookies.contains(&cookie(k)))
            .collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
}

/// The endpoint a listed socket is connected to, in the maps' form.
fn peer(s: &Sock) -> Endpoint {
    if s.family == 2 {
        ([s.dst[0], 0, 0, 0], s.dport)
    } else {
        (s.dst, s.dport)
    }
}

/// What destroying the stale sockets did.
#[derive(Debug, Default)]
pub struct Destroyed {
    /// Destroyed.
    pub done: Vec<Translated>,
    /// Found in no namespace: closed meanwhile (known only when every namespace was read).
    pub gone: Vec<Translated>,
    /// Namespaces that could not be read, each with why.
    pub errors: Vec<String>,
    /// Namespaces searched besides the node's.
    pub searched: usize,
}

/// Destroy, in one namespace's sock_diag socket, the listed sockets `stale` names (cookie
/// and peer must both match); `found` collects the cookies seen.
fn destroy_in<S: std::hash::BuildHasher>(
    diag: &mut SockDiag,
    stale: &HashMap<u64, Translated, S>,
    found: &mut HashSet<u64>,
    done: &mut Vec<Translated>,
) -> std::io::Result<()> {
    for family in [2u8, 10] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            for s in diag.connected(family, proto)? {
                let Some(t) = stale.get(&s.cookie) else {
                    continue;
                };
                // An IPv6 socket talking to an IPv4 service shows its peer v4-mapped.
                let (addr, port) = peer(&s);
                if (unmap(addr), port) != t.endpoint {
                    continue;
                }
                if found.insert(s.cookie) && diag.destroy(&s)? {
                    done.push(*t);
                }
            }
        }
    }
    Ok(())
}

/// Destroy the sockets named by `stale` in this network namespace (the node's: host
/// processes and hostNetwork pods): those destroyed, and every cookie found here.
pub fn destroy_here<S: std::hash::BuildHasher>(
    stale: &HashMap<u64, Translated, S>,
) -> std::io::Result<(Vec<Translated>, HashSet<u64>)> {
    let mut found = HashSet::new();
    let mut done = Vec::new();
    destroy_in(&mut SockDiag::open()?, stale, &mut found, &mut done)?;
    Ok((done, found))
}

/// Destroy the sockets named by `stale` in every other network namespace on the node
/// (pods'; entering them takes `CAP_SYS_ADMIN`). Socket cookies are unique node-wide, so a
/// cookie names one socket whichever namespace holds it.
pub fn destroy_elsewhere<S: std::hash::BuildHasher>(
    stale: &HashMap<u64, Translated, S>,
) -> Destroyed {
    let mut out = Destroyed::default();
    let mut found = HashSet::new();
    for ns in crate::sockdiag::other_namespaces() {
        if found.len() == stale.len() {
            break;
        }
        out.searched += 1;
        let r = SockDiag::open_in(&ns)
            .and_then(|mut d| destroy_in(&mut d, stale, &mut found, &mut out.done));
        match r {
            Ok(()) => {}
            // A process that exited, or a namespace deleted, while we looked.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out.errors.push(format!("{}: {e}", ns.display())),
        }
    }
    if out.errors.is_empty() {
        out.gone = stale
            .values()
            .filter(|t| !found.contains(&t.cookie))
            .copied()
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_to_endpoints_no_frontend_service_keeps_are_stale() {
        let a = ([0x0b01_f40a, 0, 0, 0], 8080u16.to_be());
        let b = ([0x0c01_f40a, 0, 0, 0], 8080u16.to_be());
        let vip = ([0x3200_600a, 0, 0, 0], 80u16.to_be());
        let other_vip = ([0x3300_600a, 0, 0, 0], 80u16.to_be());
        let fronts = Frontends([(vip, vec![1, 2])].into());
        // Service port 1 (UDP) balances to a only; port 2 (TCP) still lists b (draining).
        let live = LiveEndpoints([(1, [a].into()), (2, [b].into())].into());
        let t = |cookie, endpoint, frontend| Translated {
            cookie,
            endpoint,
            frontend,
        };
        let c = ([0x0d01_f40a, 0, 0, 0], 8080u16.to_be());
        // A socket of the cluster DNS Service redirected to the node-local resolver.
        let dns = ([0x0a14_fea9, 0, 0, 0], 53u16.to_be());
        let got = stale(
            [
                t(1, a, vip),
                t(2, b, vip),
                t(3, c, vip),
                t(4, a, other_vip),
                t(5, dns, vip),
            ],
            &fronts,
            &live,
            &[dns],
        );
        let mut cookies: Vec<u64> = got.keys().copied().collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [3, 4]);
    }
}
