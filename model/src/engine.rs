//! The incremental engine: holds the latest objects, tracks which services an event touched,
//! and on `sync` recomputes only those services and returns the exact ChangeSet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::state::{
    Backend, Frontend, ProxyConfig, ServicePortKey, ServicePortState, compute_service,
};
use crate::types::{EndpointSlice, Node, Service, ServiceKey};

/// The desired state of every service port, keyed and sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub ports: BTreeMap<ServicePortKey, Arc<ServicePortState>>,
    /// This node's addresses (the Node object's first, then the host's): the dataplane
    /// masquerades to the first of a family.
    pub node_addresses: Vec<IpAddr>,
}

impl DesiredState {
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<ServicePortState>> {
        self.ports.values()
    }
}

/// What changed in one service port that exists before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortChange {
    pub old: Arc<ServicePortState>,
    pub new: Arc<ServicePortState>,
    pub frontends_added: Vec<Frontend>,
    pub frontends_removed: Vec<Frontend>,
    pub backends_added: Vec<Backend>,
    pub backends_removed: Vec<Backend>,
}

/// Where the slice named `name` is (or would go) in a name-sorted list.
fn by_name(list: &[Arc<EndpointSlice>], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|s| s.name.as_str().cmp(name))
}

/// The difference between two desired states. Empty when nothing net changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSet {
    pub added: Vec<Arc<ServicePortState>>,
    pub changed: Vec<ServicePortChange>,
    pub removed: Vec<Arc<ServicePortState>>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    pub fn len(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }

    /// Every port key this change set touches: added, changed, then removed.
    pub fn keys(&self) -> impl Iterator<Item = &ServicePortKey> {
        self.added
            .iter()
            .map(|s| &s.key)
            .chain(self.changed.iter().map(|c| &c.new.key))
            .chain(self.removed.iter().map(|s| &s.key))
    }

    /// The diff of one service port, `None` for no change.
    fn diff_port(
        old: &Arc<ServicePortState>,
        new: &Arc<ServicePortState>,
    ) -> Option<ServicePortChange> {
        if old == new {
            return None;
        }
        let (frontends_added, frontends_removed) = sorted_diff(&old.frontends, &new.frontends);
        let (backends_added, backends_removed) =
            sorted_diff(&old.all_backends(), &new.all_backends());
        Some(ServicePortChange {
            old: Arc::clone(old),
            new: Arc::clone(new),
            frontends_added,
            frontends_removed,
            backends_added,
            backends_removed,
        })
    }
}

/// Elements of `new` not in `old`, and of `old` not in `new`; both inputs sorted.
fn sorted_diff<T: Ord + Clone>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
    let o: BTreeSet<&T> = old.iter().collect();
    let n: BTreeSet<&T> = new.iter().collect();
    (
        n.difference(&o).map(|t| (*t).clone()).collect(),
        o.difference(&n).map(|t| (*t).clone()).collect(),
    )
}

/// Latest objects plus the desired state derived from them.
#[derive(Debug, Default)]
pub struct Engine {
    cfg: ProxyConfig,
    services: HashMap<ServiceKey, Arc<Service>>,
    /// EndpointSlices by owning service, sorted by name (a service has one or a few: a
    /// one-element B-tree per service cost ~400 bytes, a quarter of the engine at 100k).
    slices: HashMap<ServiceKey, Vec<Arc<EndpointSlice>>>,
    /// (namespace, slice name) -> owning service, to find a slice on delete or relabel.
    slice_owner: HashMap<(String, String), ServiceKey>,
    node: Option<Node>,
    host_addresses: Vec<IpAddr>,
    /// Shared with consumers (dataplane, DNS); changed copy-on-write, so a consumer that
    /// drops its handle before the next sync costs nothing.
    state: Arc<DesiredState>,
    /// Service ports of each service currently in `state`.
    ports_of: HashMap<ServiceKey, Vec<ServicePortKey>>,
    dirty: BTreeSet<ServiceKey>,
    all_dirty: bool,
    /// Services whose Service or EndpointSlices changed since DNS last took them: a journal
    /// of its own, because DNS serves what the dataplane skips (headless, ExternalName) and
    /// must not wait for a dataplane sync.
    dns_dirty: BTreeSet<ServiceKey>,
}

impl Engine {
    pub fn new(cfg: ProxyConfig) -> Self {
        Engine {
            cfg,
            ..Engine::default()
        }
    }

    /// An engine holding `objs`, with the desired state computed: the node is the one named
    /// in `cfg` (or the only one when `cfg` names none). For offline planning and tests.
    pub fn with_objects(cfg: ProxyConfig, objs: crate::manifest::Objects) -> Self {
        let name = (!cfg.node_name.is_empty()).then(|| cfg.node_name.clone());
        let node = objs.node(name.as_deref());
        let mut e = Engine::new(cfg);
        e.set_node(node);
        e.replace_all(objs.services, objs.slices);
        e.sync();
        e
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// A cheap handle to the current state.
    pub fn state_arc(&self) -> Arc<DesiredState> {
        Arc::clone(&self.state)
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// The addresses NodePorts (and health-check node ports) are served on; `None` when
    /// `nodePortAddresses` allows every address.
    pub fn node_port_listen(&self) -> Option<Vec<IpAddr>> {
        if self.cfg.node_port_addresses.is_all() {
            return None;
        }
        Some(crate::state::node_port_addresses(
            self.node.as_ref(),
            &self.host_addresses,
            &self.cfg.node_port_addresses,
        ))
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn slices_of(&self, key: &ServiceKey) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices.get(key).into_iter().flatten()
    }

    /// Every EndpointSlice held, whether or not its Service is known.
    pub fn all_slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices.values().flatten()
    }

    /// The EndpointSlice held under this namespace and name, whatever service owns it.
    pub fn slice(&self, namespace: &str, name: &str) -> Option<&Arc<EndpointSlice>> {
        let owner = self
            .slice_owner
            .get(&(namespace.to_string(), name.to_string()))?;
        let list = self.slices.get(owner)?;
        list.get(by_name(list, name).ok()?)
    }

    fn mark(&mut self, key: ServiceKey) {
        self.dns_dirty.insert(key.clone());
        self.dirty.insert(key);
    }

    /// The services whose objects changed since the last call (what DNS must rebuild).
    pub fn take_dns_changes(&mut self) -> BTreeSet<ServiceKey> {
        std::mem::take(&mut self.dns_dirty)
    }

    /// True when some object changed since the last `take_dns_changes`.
    pub fn has_dns_changes(&self) -> bool {
        !self.dns_dirty.is_empty()
    }

    /// True when some event since the last `sync` may change the desired state.
    pub fn has_pending(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty()
    }

    pub fn upsert_service(&mut self, svc: Service) {
        let key = svc.key.clone();
        if self.services.get(&key).is_some_and(|old| **old == svc) {
            return;
        }
        self.services.insert(key.clone(), Arc::new(svc));
        self.mark(key);
    }

    pub fn delete_service(&mut self, key: &ServiceKey) {
        if self.services.remove(key).is_some() {
            self.mark(key.clone());
        }
    }

    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let id = (slice.namespace.clone(), slice.name.clone());
        let owner = slice.service_key();
        if let Some(prev) = self.slice_owner.get(&id).cloned() {
            if prev == owner
                && self
                    .slices
                    .get(&owner)
                    .and_then(|m| m.get(by_name(m, &slice.name).ok()?))
                    .is_some_and(|old| **old == slice)
            {
                return;
            }
            if prev != owner {
                self.remove_slice_from(&prev, &slice.name);
            }
        }
        self.slice_owner.insert(id, owner.clone());
        let list = self.slices.entry(owner.clone()).or_default();
        match by_name(list, &slice.name) {
            Ok(i) => list[i] = Arc::new(slice),
            Err(i) => list.insert(i, Arc::new(slice)),
        }
        self.mark(owner);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        if let Some(owner) = self
            .slice_owner
            .remove(&(namespace.to_string(), name.to_string()))
        {
            self.remove_slice_from(&owner, name);
        }
    }

    fn remove_slice_from(&mut self, owner: &ServiceKey, name: &str) {
        if let Some(m) = self.slices.get_mut(owner) {
            if let Ok(i) = by_name(m, name) {
                m.remove(i);
            }
            if m.is_empty() {
                self.slices.remove(owner);
            }
        }
        self.mark(owner.clone());
    }

    pub fn set_node(&mut self, node: Option<Node>) {
        if self.node != node {
            self.node = node;
            // Node addresses and zone touch every NodePort and every topology decision.
            self.all_dirty = true;
        }
    }

    /// Addresses found on the host's interfaces (they serve NodePorts too).
    pub fn set_host_addresses(&mut self, mut addrs: Vec<IpAddr>) {
        addrs.sort();
        addrs.dedup();
        if self.host_addresses != addrs {
            self.host_addresses = addrs;
            self.all_dirty = true;
        }
    }

    /// Replace every service and slice at once (a relist). Only objects that differ from what
    /// is held mark their service dirty, so a relist that changed nothing syncs nothing.
    pub fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let new_keys: BTreeSet<ServiceKey> = services.iter().map(|s| s.key.clone()).collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !new_keys.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.delete_service(&k);
        }
        for s in services {
            self.upsert_service(s);
        }
        self.replace_slices(slices);
    }

    /// Replace every EndpointSlice at once (a relist of that kind alone).
    pub fn replace_slices(&mut self, slices: Vec<EndpointSlice>) {
        let new_ids: BTreeSet<(String, String)> = slices
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        let gone: Vec<(String, String)> = self
            .slice_owner
            .keys()
            .filter(|k| !new_ids.contains(*k))
            .cloned()
            .collect();
        for (ns, n) in gone {
            self.delete_slice(&ns, &n);
        }
        for s in slices {
            self.upsert_slice(s);
        }
    }

    /// Replace every Service at once.
    pub fn replace_services(&mut self, services: Vec<Service>) {
        let new_keys: BTreeSet<ServiceKey> = services.iter().map(|s| s.key.clone()).collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !new_keys.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.delete_service(&k);
        }
        for s in services {
            self.upsert_service(s);
        }
    }

    /// Recompute the services touched since the last sync and return what changed.
    pub fn sync(&mut self) -> ChangeSet {
        let keys: Vec<ServiceKey> = if self.all_dirty {
            let mut all: BTreeSet<ServiceKey> = self.services.keys().cloned().collect();
            all.extend(self.ports_of.keys().cloned());
            all.into_iter().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        self.all_dirty = false;
        self.dirty.clear();

        let mut cs = ChangeSet::default();
        if keys.is_empty() {
            return cs;
        }
        let state = Arc::make_mut(&mut self.state);
        let mut node_addresses: Vec<IpAddr> = self
            .node
            .as_ref()
            .map(|n| n.addresses.clone())
            .unwrap_or_default();
        // The host's own addresses after the Node's, never loopback or link-local ones: the
        // first of each family is what traffic is masqueraded to.
        for a in &self.host_addresses {
            if !node_addresses.contains(a) && !a.is_loopback() && !crate::state::is_link_local(a) {
                node_addresses.push(*a);
            }
        }
        state.node_addresses = node_addresses;
        for key in keys {
            let new_ports = match self.services.get(&key) {
                Some(svc) => compute_service(
                    svc,
                    self.slices.get(&key).map_or(&[], Vec::as_slice),
                    self.node.as_ref(),
                    &self.host_addresses,
                    &self.cfg,
                ),
                None => Vec::new(),
            };
            let old_keys = self.ports_of.remove(&key).unwrap_or_default();
            let mut new_keys = Vec::with_capacity(new_ports.len());
            for p in new_ports {
                let pk = p.key.clone();
                let new = Arc::new(p);
                match state.ports.get(&pk) {
                    Some(old) => {
                        if let Some(ch) = ChangeSet::diff_port(old, &new) {
                            cs.changed.push(ch);
                            state.ports.insert(pk.clone(), new);
                        }
                    }
                    None => {
                        cs.added.push(Arc::clone(&new));
                        state.ports.insert(pk.clone(), new);
                    }
                }
                new_keys.push(pk);
            }
            for ok in old_keys {
                if !new_keys.contains(&ok)
                    && let Some(old) = state.ports.remove(&ok)
                {
                    cs.removed.push(old);
                }
            }
            if !new_keys.is_empty() {
                self.ports_of.insert(key, new_keys);
            }
        }
        cs
    }
}
