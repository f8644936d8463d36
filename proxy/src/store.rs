//! The store between sources and the sync loop: latest objects (inside the model's engine),
//! which kinds have completed their initial list, and a change signal.
//!
//! Bad objects are reported and skipped; whatever good version of that object was held before
//! stays in force.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use switchyard_model::{
    ChangeSet, DesiredState, EndpointSlice, Engine, ModelError, Node, ProxyConfig, Service,
    ServiceKey,
};
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
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
    /// Valid, but nothing for the proxy (e.g. an FQDN EndpointSlice, another node).
    Ignored,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    listed: BTreeSet<Kind>,
    /// When the oldest change not yet synced arrived (network programming latency).
    pending_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    generation: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Store {
    pub fn new(cfg: ProxyConfig, metrics: Arc<Metrics>) -> Arc<Store> {
        Arc::new(Store {
            inner: Mutex::new(Inner {
                engine: Engine::new(cfg),
                listed: BTreeSet::new(),
                pending_since: None,
            }),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self, inner: &mut Inner) {
        if inner.engine.has_pending() && inner.pending_since.is_none() {
            inner.pending_since = Some(Instant::now());
        }
        self.generation.send_modify(|g| *g += 1);
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
        Kind::ALL.iter().all(|k| inner.listed.contains(k))
    }

    pub fn report(&self, kind: Kind, id: &ObjectId, err: &ModelError) {
        self.metrics.source_error(kind.as_str());
        tracing::warn!(kind = kind.as_str(), object = %format!("{}/{}", id.namespace, id.name), error = %err, "ignoring invalid object; keeping its last good version");
    }

    /// One object added or changed.
    pub fn apply(&self, kind: Kind, id: &ObjectId, obj: Result<Converted, ModelError>) {
        let mut inner = self.lock();
        match obj {
            Err(e) => {
                drop(inner);
                self.report(kind, id, &e);
                return;
            }
            Ok(Converted::Service(s)) => inner.engine.upsert_service(s),
            Ok(Converted::Slice(s)) => inner.engine.upsert_slice(s),
            Ok(Converted::Node(n)) => inner.engine.set_node(Some(n)),
            Ok(Converted::Ignored) => match kind {
                // A slice that became irrelevant (e.g. lost its service label) is gone for us.
                Kind::EndpointSlice => inner.engine.delete_slice(&id.namespace, &id.name),
                Kind::Service | Kind::Node => {}
            },
        }
        self.bump(&mut inner);
    }

    pub fn delete(&self, kind: Kind, id: &ObjectId) {
        let mut inner = self.lock();
        match kind {
            Kind::Service => inner
                .engine
                .delete_service(&ServiceKey::new(&id.namespace, &id.name)),
            Kind::EndpointSlice => inner.engine.delete_slice(&id.namespace, &id.name),
            Kind::Node => inner.engine.set_node(None),
        }
        self.bump(&mut inner);
    }

    /// The complete list of one kind (initial list or relist). Objects that fail conversion
    /// keep the version held before, if any.
    pub fn replace(&self, kind: Kind, objs: Vec<(ObjectId, Result<Converted, ModelError>)>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut node = None;
        let mut failed = Vec::new();
        for (id, o) in objs {
            match o {
                Ok(Converted::Service(s)) => services.push(s),
                Ok(Converted::Slice(s)) => slices.push(s),
                Ok(Converted::Node(n)) => node = Some(n),
                Ok(Converted::Ignored) => {}
                Err(e) => {
                    self.report(kind, &id, &e);
                    failed.push(id);
                }
            }
        }
        let mut inner = self.lock();
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
        inner.engine.replace_all(services, slices);
        inner.engine.set_node(node);
        inner.listed.extend(Kind::ALL);
        self.bump(&mut inner);
    }

    pub fn set_host_addresses(&self, addrs: Vec<std::net::IpAddr>) {
        let mut inner = self.lock();
        inner.engine.set_host_addresses(addrs);
        self.bump(&mut inner);
    }

    /// Recompute what changed since the last call. `None` until initialized.
    pub fn sync(&self) -> Option<SyncOutput> {
        let mut inner = self.lock();
        if !Kind::ALL.iter().all(|k| inner.listed.contains(k)) {
            return None;
        }
        let changes = inner.engine.sync();
        let pending_since = inner.pending_since.take();
        Some(SyncOutput {
            changes,
            state: inner.engine.state_arc(),
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
}
