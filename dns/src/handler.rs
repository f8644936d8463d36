//! The one query handler both transports use: the cluster zone from the current snapshot,
//! every other name through the forwarder. Transports (`fast` for UDP, `server` for TCP)
//! add only framing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;

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
}

impl Handler {
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
