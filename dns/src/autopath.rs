//! Server-side search paths (CoreDNS's `autopath`) for the node's own pods. A pod with
//! `ndots:5` looking up an outside name sends `name.<ns>.svc.<zone>` first, then each other
//! search domain, then the bare name: four or five round trips, each an NXDOMAIN but the
//! last. When that first query comes from a pod of namespace `<ns>` and is NXDOMAIN, the
//! server walks the rest of the path itself and answers the first name that exists with a
//! CNAME from the asked name to it, so the pod's resolver stops after one round trip.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{Name, RData, Record};

use crate::resolve::key_of;

/// Pod address -> namespace, for this node's pods only; and the node's own search domains
/// (its resolv.conf), which come after the cluster ones in every pod's path.
#[derive(Debug, Default)]
pub struct PodDirectory {
    map: ArcSwap<HashMap<IpAddr, String>>,
    search: ArcSwap<Vec<String>>,
}

impl PodDirectory {
    pub fn new() -> Arc<PodDirectory> {
        Arc::new(PodDirectory::default())
    }

    /// Replace the whole directory (a list, or a rebuild after one pod changed).
    pub fn set(&self, pods: HashMap<IpAddr, String>) {
        self.map.store(Arc::new(pods));
    }

    /// The node's search domains (lowercase, no trailing dot).
    pub fn set_search(&self, search: Vec<String>) {
        self.search.store(Arc::new(search));
    }

    pub fn search(&self) -> Arc<Vec<String>> {
        self.search.load_full()
    }

    pub fn namespace_of(&self, ip: IpAddr) -> Option<String> {
        self.map.load().get(&ip.to_canonical()).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The namespace whose pods would ask `qname` as the first step of their search path
/// (`<base>.<ns>.svc.<zone>`), if any: only a pod of that namespace gets autopath for it.
pub fn first_step_namespace<'a>(qname: &'a str, zone: &str) -> Option<&'a str> {
    let rest = qname.strip_suffix(zone)?.strip_suffix(".svc.")?;
    let (base, ns) = rest.rsplit_once('.')?;
    (!base.is_empty() && !ns.is_empty()).then_some(ns)
}

/// The rest of the search path for `qname` asked by a pod of `ns`: `None` when `qname` is not
/// the first step of that pod's path (`<base>.<ns>.svc.<zone>`).
pub fn rest_of_path(
    qname: &str,
    ns: &str,
    zone: &str,
    node_search: &[String],
) -> Option<Vec<String>> {
    let base = qname.strip_suffix(&format!(".{ns}.svc.{zone}"))?;
    if base.is_empty() {
        return None;
    }
    let mut path = vec![format!("{base}.svc.{zone}"), format!("{base}.{zone}")];
    path.extend(node_search.iter().map(|d| format!("{base}.{d}")));
    path.push(base.to_string());
    Some(path)
}

/// The search domains of a resolv.conf (the last `search` line, as glibc reads it).
pub fn search_domains(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("search"))
        .next_back()
        .map(|d| {
            d.split_whitespace()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// The query for one step of the path: `req` with the name replaced.
pub fn step(req: &Message, name: &str) -> Option<Message> {
    let mut m = req.clone();
    let q = m.queries.first_mut()?;
    q.set_name(Name::from_str(&format!("{name}.")).ok()?);
    Some(m)
}

/// The answer to the original query from a step's answer: a CNAME from the asked name to the
/// step's name, then the step's records (CoreDNS's shape).
pub fn splice(req: &Message, name: &str, found: Message, ttl: u32) -> Option<Message> {
    let asked = req.queries.first()?.name().clone();
    let target = Name::from_str(&format!("{name}.")).ok()?;
    let mut out = found;
    out.metadata.id = req.metadata.id;
    out.queries.clone_from(&req.queries);
    let mut answers = vec![Record::from_rdata(asked, ttl, RData::CNAME(CNAME(target)))];
    answers.append(&mut out.answers);
    out.answers = answers;
    Some(out)
}

/// Whether a step's answer ends the walk (the name exists).
pub fn found(m: &Message) -> bool {
    m.metadata.response_code == ResponseCode::NoError
}

/// The lowercase query name of `req`.
pub fn qname(req: &Message) -> Option<String> {
    req.queries.first().map(|q| key_of(q.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_step_of_the_pods_own_path_is_walked() {
        let z = "cluster.local";
        let node = search_domains("nameserver 10.0.0.2\nsearch Corp.Example. lab\n");
        assert_eq!(node, ["corp.example", "lab"]);
        assert_eq!(
            rest_of_path("example.org.shop.svc.cluster.local", "shop", z, &node).unwrap(),
            [
                "example.org.svc.cluster.local",
                "example.org.cluster.local",
                "example.org.corp.example",
                "example.org.lab",
                "example.org"
            ]
        );
        assert_eq!(
            first_step_namespace("example.org.shop.svc.cluster.local", z),
            Some("shop")
        );
        assert_eq!(first_step_namespace("shop.svc.cluster.local", z), None);
        assert_eq!(first_step_namespace("web.shop.svc.cluster.locals", z), None);
        // Another namespace's first step, a later step, or the bare suffix: not ours.
        assert!(rest_of_path("example.org.cart.svc.cluster.local", "shop", z, &[]).is_none());
        assert!(rest_of_path("example.org.svc.cluster.local", "shop", z, &[]).is_none());
        assert!(rest_of_path("shop.svc.cluster.local", "shop", z, &[]).is_none());
    }
}
