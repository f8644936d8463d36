//! The one query handler both transports use: the cluster zone from the current snapshot,
//! every other name through the forwarder. Transports (`fast` for UDP, `server` for TCP)
//! add only framing.

use std::sync::Arc;

use std::net::IpAddr;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};

use crate::autopath::{self, PodDirectory};
use crate::forward::{Forwarder, Source};
use crate::metrics::{DnsMetrics, Plugin};
use crate::resolve::{Outcome, resolve};
use crate::snapshot::Snapshot;

/// The handle the daemon swaps snapshots through.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[derive(Debug, Clone)]
pub struct Handler {
    pub snapshot: SharedSnapshot,
    pub forwarder: Arc<Forwarder>,
    pub metrics: DnsMetrics,
    /// This node's pods by address: server-side search paths for them (`None`: off).
    pub pods: Option<Arc<PodDirectory>>,
}

impl Handler {
    /// The namespace of the pod at `client` when `req` is the first step of its search path
    /// and autopath is on.
    fn autopath_namespace(&self, req: &Message, client: IpAddr) -> Option<(String, Vec<String>)> {
        let pods = self.pods.as_ref()?;
        let ns = pods.namespace_of(client)?;
        let q = autopath::qname(req)?;
        let snap = self.snapshot.load();
        let rest = autopath::rest_of_path(&q, &ns, &snap.cfg.zone, &pods.search())?;
        Some((ns, rest))
    }

    /// Whether an NXDOMAIN for `req` from `client` must go through `answer_from` (the UDP
    /// fast path answers everything else itself).
    pub fn wants_autopath(&self, req: &Message, client: IpAddr) -> bool {
        self.autopath_namespace(req, client).is_some()
    }

    /// Answer a query from `client`: as `answer_with`, and when it is an NXDOMAIN for the
    /// first step of a local pod's search path, the rest of the path walked server-side.
    pub async fn answer_from(&self, req: &Message, client: IpAddr) -> (Message, Plugin) {
        let (m, plugin) = self.answer_with(req).await;
        if m.metadata.response_code != ResponseCode::NXDomain {
            return (m, plugin);
        }
        let Some((_, rest)) = self.autopath_namespace(req, client) else {
            return (m, plugin);
        };
        let ttl = self.snapshot.load().cfg.ttl;
        for name in rest {
            let Some(sub) = autopath::step(req, &name) else {
                break;
            };
            let (a, p) = self.answer_with(&sub).await;
            if autopath::found(&a)
                && let Some(out) = autopath::splice(req, &name, a, ttl)
            {
                self.metrics.autopath.inc();
                return (out, p);
            }
        }
        (m, plugin)
    }

    /// After a cache hit: refresh the entry in the background if it is popular and about to
    /// expire, so the next asker still gets a cached answer.
    pub fn prefetch(&self, req: &Message) {
        if !self.forwarder.claim_prefetch(req) {
            return;
        }
        let (fwd, metrics, req) = (
            Arc::clone(&self.forwarder),
            self.metrics.clone(),
            req.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if fwd.refresh(&req).await {
                    metrics.prefetches.inc();
                }
            });
        }
    }

    /// Answer one query message (also used directly by tests).
    pub async fn answer(&self, req: &Message) -> Message {
        self.answer_with(req).await.0
    }

    /// Answer one query message, and say who wrote the answer.
    pub async fn answer_with(&self, req: &Message) -> (Message, Plugin) {
        let snap = self.snapshot.load();
        match resolve(&snap, req) {
            Outcome::Answer(m) => (*m, Plugin::Kubernetes),
            Outcome::Forward => {
                drop(snap);
                self.forwarder.note_incoming(req);
                let (m, src) = self.forwarder.forward(req).await;
                let plugin = match src {
                    Source::Cache => {
                        self.metrics.cache_hit(denial(&m));
                        self.prefetch(req);
                        Plugin::Cache
                    }
                    Source::Stale => {
                        self.metrics.cache_miss();
                        self.metrics.stale_answers.inc();
                        Plugin::Cache
                    }
                    Source::Upstream | Source::Failed => {
                        self.metrics.cache_miss();
                        Plugin::Forward
                    }
                };
                (m, plugin)
            }
        }
    }
}

/// NXDOMAIN or NODATA: CoreDNS's `denial` cache entries.
pub fn denial(m: &Message) -> bool {
    use hickory_proto::op::ResponseCode;
    m.metadata.response_code == ResponseCode::NXDomain
        || (m.metadata.response_code == ResponseCode::NoError && m.answers.is_empty())
}
