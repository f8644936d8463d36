//! The one query handler both transports use: the cluster zone from the current snapshot,
//! every other name through the forwarder. Transports (`fast` for UDP, `server` for TCP)
//! add only framing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;

use crate::forward::{Forwarder, Source};
use crate::metrics::DnsMetrics;
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
        let snap = self.snapshot.load();
        match resolve(&snap, req) {
            Outcome::Answer(m) => *m,
            Outcome::Forward => {
                drop(snap);
                let (m, src) = self.forwarder.forward(req).await;
                match src {
                    Source::Cache => {
                        self.metrics.cache_hits.inc();
                        self.prefetch(req);
                    }
                    Source::Stale => {
                        self.metrics.cache_misses.inc();
                        self.metrics.stale_answers.inc();
                    }
                    Source::Upstream | Source::Failed => {
                        self.metrics.cache_misses.inc();
                    }
                }
                m
            }
        }
    }
}
