//! The hub: latest objects (inside the model's engine), the node's links and addresses,
//! which kinds have completed their initial list, and a generation that changes with every
//! store change. Two consumers follow it independently: the sync loop (the one writer of
//! the dataplane) and the DNS zone, so a slow or failing backend never holds DNS back.
//!
//! Bad objects are reported and skipped; whatever good version of that object was held before
//! stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switchyard_model::{
    ChangeSet, DesiredState, EndpointSlice, Engine, ModelError, Node, Pod, ProxyConfig, Service,
    ServiceKey,
};
use tokio::sync::watch;

use switchyard_dns::PodDirectory;

use crate::metrics::{KindLabel, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// This node's pods, for DNS only (not part of `ALL`: the proxy never waits for them).
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        }
    }
}

/// `namespace/name` of an object as the API server names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    pub namespace: String,
    pub name: String,
}

/// An object after conversion into the model's types.
#[derive(Debug, Clone)]
pub enum Converted {
    Service(Service),
    Slice(EndpointSlice),
    Node(Node),
    Pod(Pod),
    /// Valid, but nothing for the proxy (e.g. an FQDN EndpointSlice, another node).
    Ignored,
}

/// The node's network interfaces and their addresses: inputs like Services, so that only the
/// sync loop acts on them (attaching per-interface programs, NodePorts on new addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// Interface names, sorted.
    pub links: Vec<String>,
    /// Addresses on those interfaces, sorted.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    listed: BTreeSet<Kind>,
    /// The host's links and addresses are an input too (NodePorts are served on the host's
    /// addresses): with `Some(false)` nothing is initialized until the first host view.
    host_seen: Option<bool>,
    /// When the oldest change not yet synced arrived (network programming latency).
    pending_since: Option<Instant>,
    /// Same for DNS, which takes changes on its own.
    dns_pending_since: Option<Instant>,
    links: Arc<Vec<String>>,
    links_changed: bool,
    /// Services with a Service / EndpointSlice change not yet synced (kube-proxy's
    /// `*_changes_pending`).
    pending_services: BTreeSet<ServiceKey>,
    pending_endpoints: BTreeSet<ServiceKey>,
}

impl Inner {
    fn initialized(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k)) && self.host_seen != Some(false)
    }
}

#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    generation: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// This node's pods (DNS only; apart from the proxy's state and its generation).
    pods: Mutex<BTreeMap<ObjectId, Pod>>,
    pod_directory: Arc<PodDirectory>,
    /// Each kind's run of failed list/watch requests since its last event.
    watch_failures: Mutex<BTreeMap<&'static str, WatchFailure>>,
}

/// A kind's list/watch failing: since when, how often, the last error.
#[derive(Debug, Clone)]
pub struct WatchFailure {
    pub since: Instant,
    pub last: Instant,
    pub errors: u64,
    pub error: String,
}

/// A run of failures is over once no request has failed for this long: kube's watcher backs
/// off at most 30 s between attempts, and a watch that opened again sends no event until
/// something changes.
const WATCH_RECOVERED_AFTER: Duration = Duration::from_secs(40);

impl Store {
    pub fn new(cfg: ProxyConfig, metrics: Arc<Metrics>) -> Arc<Store> {
        Arc::new(Store {
            inner: Mutex::new(Inner {
                engine: Engine::new(cfg),
                listed: BTreeSet::new(),
                host_seen: None,
                pending_since: None,
                dns_pending_since: None,
                links: Arc::new(Vec::new()),
                links_changed: false,
                pending_services: BTreeSet::new(),
                pending_endpoints: BTreeSet::new(),
            }),
            generation: watch::channel(0).0,
            metrics,
            pods: Mutex::new(BTreeMap::new()),
            pod_directory: PodDirectory::new(),
            watch_failures: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Count object changes as kube-proxy does: every Service and EndpointSlice event, and
    /// the distinct services they leave pending until the next sync.
    fn count_changes(
        &self,
        inner: &mut Inner,
        services: impl IntoIterator<Item = ServiceKey>,
        endpoints: impl IntoIterator<Item = ServiceKey>,
    ) {
        for k in services {
            self.metrics.service_changes.inc();
            inner.pending_services.insert(k);
        }
        for k in endpoints {
            self.metrics.endpoint_changes.inc();
            inner.pending_endpoints.insert(k);
        }
        self.pending_gauges(inner);
    }

    fn pending_gauges(&self, inner: &Inner) {
        let n = |s: &BTreeSet<ServiceKey>| i64::try_from(s.len()).unwrap_or(i64::MAX);
        self.metrics
            .service_changes_pending
            .set(n(&inner.pending_services));
        self.metrics
            .endpoint_changes_pending
            .set(n(&inner.pending_endpoints));
    }

    fn bump(&self, inner: &mut Inner) {
        if (inner.engine.has_pending() || inner.links_changed) && inner.pending_since.is_none() {
            inner.pending_since = Some(Instant::now());
        }
        if inner.engine.has_dns_changes() && inner.dns_pending_since.is_none() {
            inner.dns_pending_since = Some(Instant::now());
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// The current generation (grows with every change).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver that changes whenever the store does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// True once every kind has completed its initial list; nothing is programmed before.
    pub fn initialized(&self) -> bool {
        let inner = self.lock();
        inner.initialized()
    }

    /// A list or watch request for `kind` failed (the watcher retries with backoff; what is
    /// programmed stays).
    pub fn watch_error(&self, kind: Kind, error: &str) {
        let now = Instant::now();
        let label = KindLabel {
            kind: kind.as_str().into(),
        };
        self.metrics.watch_errors.get_or_create(&label).inc();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.metrics
            .watch_last_error
            .get_or_create(&label)
            .set(unix);
        let mut f = self
            .watch_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = f.entry(kind.as_str()).or_insert_with(|| WatchFailure {
            since: now,
            last: now,
            errors: 0,
            error: String::new(),
        });
        if e.last.elapsed() > WATCH_RECOVERED_AFTER {
            e.since = now;
            e.errors = 0;
        }
        e.last = now;
        e.errors += 1;
        error.clone_into(&mut e.error);
    }

    /// An event arrived for `kind`: its watch works.
    pub fn watch_ok(&self, kind: Kind) {
        let mut f = self
            .watch_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !f.is_empty() {
            f.remove(kind.as_str());
        }
    }

    /// The kinds whose list/watch is failing now.
    pub fn watch_failures(&self) -> BTreeMap<&'static str, WatchFailure> {
        let mut f = self
            .watch_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.retain(|_, w| w.last.elapsed() <= WATCH_RECOVERED_AFTER);
        f.clone()
    }

    pub fn report(&self, kind: Kind, id: &ObjectId, err: &ModelError) {
        self.metrics.source_error(kind.as_str());
        tracing::warn!(kind = kind.as_str(), object = %format!("{}/{}", id.namespace, id.name), error = %err, "ignoring invalid object; keeping its last good version");
    }

    /// One object added or changed.
    pub fn apply(&self, kind: Kind, id: &ObjectId, obj: Result<Converted, ModelError>) {
        if kind == Kind::Pod {
            match obj {
                Ok(Converted::Pod(p)) => self.pods_changed(|pods| {
                    pods.insert(id.clone(), p);
                }),
                Ok(_) => self.pods_changed(|pods| {
                    pods.remove(id);
                }),
                Err(e) => self.report(kind, id, &e),
            }
            return;
        }
        let mut inner = self.lock();
        match obj {
            Err(e) => {
                drop(inner);
                self.report(kind, id, &e);
                return;
            }
            Ok(Converted::Service(s)) => {
                self.count_changes(&mut inner, [s.key.clone()], []);
                inner.engine.upsert_service(s);
            }
            Ok(Converted::Slice(s)) => {
                self.count_changes(&mut inner, [], [s.service_key()]);
                inner.engine.upsert_slice(s);
            }
            Ok(Converted::Node(n)) => inner.engine.set_node(Some(n)),
            Ok(Converted::Pod(_)) => {}
            Ok(Converted::Ignored) => match kind {
                // A slice that became irrelevant (e.g. lost its service label) is gone for us.
                Kind::EndpointSlice => inner.engine.delete_slice(&id.namespace, &id.name),
                Kind::Service | Kind::Node | Kind::Pod => {}
            },
        }
        self.bump(&mut inner);
    }

    pub fn delete(&self, kind: Kind, id: &ObjectId) {
        if kind == Kind::Pod {
            self.pods_changed(|pods| {
                pods.remove(id);
            });
            return;
        }
        let mut inner = self.lock();
        match kind {
            Kind::Service => {
                self.count_changes(&mut inner, [ServiceKey::new(&id.namespace, &id.name)], []);
            }
            Kind::EndpointSlice => {
                let key = inner
                    .engine
                    .slice(&id.namespace, &id.name)
                    .map(|s| s.service_key());
                self.count_changes(&mut inner, [], key);
            }
            Kind::Node | Kind::Pod => {}
        }
        match kind {
            Kind::Service => inner
                .engine
                .delete_service(&ServiceKey::new(&id.namespace, &id.name)),
            Kind::EndpointSlice => inner.engine.delete_slice(&id.namespace, &id.name),
            Kind::Node => inner.engine.set_node(None),
            Kind::Pod => {}
        }
        self.bump(&mut inner);
    }

    /// The complete list of one kind (initial list or relist). Objects that fail conversion
    /// keep the version held before, if any.
    pub fn replace(&self, kind: Kind, objs: Vec<(ObjectId, Result<Converted, ModelError>)>) {
        if kind == Kind::Pod {
            let mut fresh = BTreeMap::new();
            for (id, o) in objs {
                match o {
                    Ok(Converted::Pod(p)) => {
                        fresh.insert(id, p);
                    }
                    Ok(_) => {}
                    Err(e) => self.report(kind, &id, &e),
                }
            }
            self.pods_changed(|pods| *pods = fresh);
            return;
        }
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut node = None;
        let mut failed = Vec::new();
        for (id, o) in objs {
            match o {
                Ok(Converted::Service(s)) => services.push(s),
                Ok(Converted::Slice(s)) => slices.push(s),
                Ok(Converted::Node(n)) => node = Some(n),
                Ok(Converted::Pod(_) | Converted::Ignored) => {}
                Err(e) => {
                    self.report(kind, &id, &e);
                    failed.push(id);
                }
            }
        }
        let mut inner = self.lock();
        let svc_keys: Vec<ServiceKey> = services.iter().map(|s| s.key.clone()).collect();
        let ep_keys: Vec<ServiceKey> = slices.iter().map(EndpointSlice::service_key).collect();
        self.count_changes(&mut inner, svc_keys, ep_keys);
        match kind {
            Kind::Service => {
                for id in &failed {
                    let key = ServiceKey::new(&id.namespace, &id.name);
                    if let Some(old) = inner.engine.service(&key) {
                        services.push((**old).clone());
                    }
                }
                inner.engine.replace_services(services);
            }
            Kind::EndpointSlice => {
                for id in &failed {
                    if let Some(old) = inner.engine.slice(&id.namespace, &id.name) {
                        slices.push((**old).clone());
                    }
                }
                inner.engine.replace_slices(slices);
            }
            Kind::Node => {
                if failed.is_empty() {
                    inner.engine.set_node(node);
                }
            }
            Kind::Pod => {}
        }
        inner.listed.insert(kind);
        self.bump(&mut inner);
    }

    /// Replace everything a manifest directory holds in one step.
    pub fn replace_all(
        &self,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        node: Option<Node>,
    ) {
        let mut inner = self.lock();
        let svc_keys: Vec<ServiceKey> = services.iter().map(|s| s.key.clone()).collect();
        let ep_keys: Vec<ServiceKey> = slices.iter().map(EndpointSlice::service_key).collect();
        self.count_changes(&mut inner, svc_keys, ep_keys);
        inner.engine.replace_all(services, slices);
        inner.engine.set_node(node);
        inner.listed.extend(Kind::ALL);
        self.bump(&mut inner);
    }

    /// This node's pods by address, for DNS (server-side search paths).
    pub fn pod_directory(&self) -> Arc<PodDirectory> {
        Arc::clone(&self.pod_directory)
    }

    /// Replace the pods a manifest directory holds: the ones on this node (or on no node),
    /// not host-network ones (their address is the node's).
    pub fn replace_pods(&self, pods: Vec<Pod>) {
        let node = self.lock().engine.config().node_name.clone();
        let fresh = pods
            .into_iter()
            .filter(|p| node.is_empty() || p.node_name.as_deref().is_none_or(|n| n == node))
            .map(|p| {
                (
                    ObjectId {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                    },
                    p,
                )
            })
            .collect();
        self.pods_changed(|pods| *pods = fresh);
    }

    fn pods_changed(&self, f: impl FnOnce(&mut BTreeMap<ObjectId, Pod>)) {
        let mut pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut pods);
        let dir = pods
            .values()
            .filter(|p| !p.host_network)
            .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.namespace.clone())))
            .collect();
        self.pod_directory.set(dir);
    }

    /// The host view will come (rtnetlink follows it): hold the first sync for it, so a
    /// restart never programs NodePorts without the host's addresses for a moment.
    pub fn await_host(&self) {
        let mut inner = self.lock();
        if inner.host_seen.is_none() {
            inner.host_seen = Some(false);
        }
    }

    /// The node's links and addresses now (from rtnetlink, or a test).
    pub fn set_host(&self, view: HostView) {
        let mut inner = self.lock();
        inner.host_seen = Some(true);
        inner.engine.set_host_addresses(view.addresses);
        if *inner.links != view.links {
            inner.links = Arc::new(view.links);
            inner.links_changed = true;
        }
        self.bump(&mut inner);
    }

    /// Recompute what changed since the last call. `None` until initialized.
    pub fn sync(&self) -> Option<SyncOutput> {
        let mut inner = self.lock();
        if !inner.initialized() {
            return None;
        }
        let changes = inner.engine.sync();
        let pending_since = inner.pending_since.take();
        inner.pending_services.clear();
        inner.pending_endpoints.clear();
        self.pending_gauges(&inner);
        let links_changed = std::mem::take(&mut inner.links_changed);
        Some(SyncOutput {
            changes,
            state: inner.engine.state_arc(),
            pending_since,
            links: Arc::clone(&inner.links),
            links_changed,
        })
    }

    /// What DNS must rebuild: every service on the first call (`all`), then the services
    /// whose objects changed since the last call, each with its current Service and
    /// EndpointSlices (`None`: deleted). `None` until initialized.
    pub fn dns_delta(&self, all: bool) -> Option<DnsDelta> {
        let mut inner = self.lock();
        if !inner.initialized() {
            return None;
        }
        let changed = inner.engine.take_dns_changes();
        let pending_since = inner.dns_pending_since.take();
        let e = &inner.engine;
        let lookup = |k: &ServiceKey| {
            e.service(k)
                .map(|s| (Arc::clone(s), e.slices_of(k).cloned().collect::<Vec<_>>()))
        };
        let services = if all {
            e.services()
                .map(|s| (s.key.clone(), lookup(&s.key)))
                .collect()
        } else {
            changed.iter().map(|k| (k.clone(), lookup(k))).collect()
        };
        Some(DnsDelta {
            all,
            services,
            pending_since,
        })
    }

    /// Read access to the engine (latest objects and last computed state).
    pub fn read<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(&self.lock().engine)
    }
}

#[derive(Debug)]
pub struct SyncOutput {
    pub changes: ChangeSet,
    pub state: Arc<DesiredState>,
    pub pending_since: Option<Instant>,
    /// The node's interfaces, and whether they changed since the last sync.
    pub links: Arc<Vec<String>>,
    pub links_changed: bool,
}

/// A Service with its EndpointSlices, as DNS reads them.
pub type ServiceObjects = (Arc<Service>, Vec<Arc<EndpointSlice>>);

#[derive(Debug)]
pub struct DnsDelta {
    /// Every service is listed (the first delta).
    pub all: bool,
    pub services: Vec<(ServiceKey, Option<ServiceObjects>)>,
    pub pending_since: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restart must not sync before it knows the host's addresses: NodePorts served on them
    /// would vanish from the maps for a moment.
    #[test]
    fn nothing_is_initialized_before_the_awaited_host_view() {
        let store = Store::new(ProxyConfig::default(), Arc::new(Metrics::new()));
        store.await_host();
        store.replace_all(Vec::new(), Vec::new(), None);
        assert!(!store.initialized());
        assert!(store.sync().is_none());
        store.set_host(HostView {
            links: vec!["eth0".into()],
            addresses: vec!["172.30.0.10".parse().unwrap()],
        });
        assert!(store.initialized());
        // Without await_host (in-process uses), the lists alone are enough.
        let store = Store::new(ProxyConfig::default(), Arc::new(Metrics::new()));
        store.replace_all(Vec::new(), Vec::new(), None);
        assert!(store.initialized());
    }
}
