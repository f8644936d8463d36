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
//!
//! `codec` lays out the messages, `socket` is the real table over ctnetlink, `fake` holds
//! the in-memory and fault-injecting tables; the policy (what is stale) is here.

pub mod codec;
pub mod fake;
pub mod socket;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use switchyard_model::{ChangeSet, DesiredState, FrontendKind, Protocol, ServicePortState};

pub use self::codec::{AF_INET, AF_INET6, Entry, IPPROTO_UDP, Tuple};
pub use self::fake::{FakeConntrack, FaultyConntrack};
pub use self::socket::Conntrack;
use crate::metrics::Metrics;

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

    /// The registry this cleaner reports to (its backend reports there too).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// After a partial sync: clear what `changes` may have left stale (nothing when it
    /// touches no UDP service; removed services' frontends count too).
    pub fn clear_after(
        &mut self,
        changes: &ChangeSet,
        state: &DesiredState,
    ) -> Result<usize, ConntrackError> {
        if !touches_udp(changes) {
            return Ok(0);
        }
        let mut udp = UdpServices::from_state(state);
        for r in &changes.removed {
            udp.add_removed(r);
        }
        self.clear(&udp)
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
        let started = std::time::Instant::now();
        let result = clear_stale(table.as_mut(), services);
        self.metrics
            .conntrack_duration
            .observe(started.elapsed().as_secs_f64());
        // A socket that failed may be out of step: reopen it next time (fakes are kept).
        if result.is_ok() || self.open.is_none() {
            self.table = Some(table);
        }
        let [v4, v6] = result?;
        let n = v4 + v6;
        if n > 0 {
            tracing::info!(entries = n, "deleted stale UDP conntrack entries");
            self.metrics.conntrack_deleted(false, v4 as u64);
            self.metrics.conntrack_deleted(true, v6 as u64);
        }
        Ok(n)
    }
}

/// Delete the stale UDP entries of both families; returns how many were deleted in each
/// (IPv4, IPv6).
pub fn clear_stale(
    ct: &mut dyn ConntrackTable,
    services: &UdpServices,
) -> Result<[usize; 2], ConntrackError> {
    let mut deleted = [0, 0];
    if services.is_empty() {
        return Ok(deleted);
    }
    for (i, family) in [AF_INET, AF_INET6].into_iter().enumerate() {
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
                deleted[i] += 1;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conntrack::codec::tests::entry;

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
