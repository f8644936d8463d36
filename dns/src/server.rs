//! Serving: hickory-server's `Server` on UDP and TCP for each listen address, with a request
//! handler that answers the cluster zone from the current snapshot and forwards the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio_util::sync::CancellationToken;

use crate::forward::{Forwarder, Source};
use crate::metrics::{DnsMetrics, QueryLabels};
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
    /// Answer one query message (also used directly by tests).
    pub async fn answer(&self, req: &Message) -> Message {
        let snap = self.snapshot.load();
        match resolve(&snap, req) {
            Outcome::Answer(m) => *m,
            Outcome::Forward => {
                drop(snap);
                let (m, src) = self.forwarder.forward(req).await;
                match src {
                    Source::Cache => self.metrics.cache_hits.inc(),
                    Source::Upstream | Source::Failed => self.metrics.cache_misses.inc(),
                };
                m
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let start = Instant::now();
        let resp = match Message::from_vec(request.as_slice()) {
            Ok(req) => self.answer(&req).await,
            Err(_) => {
                self.metrics.malformed.inc();
                let mut m = Message::error_msg(
                    request.metadata.id,
                    request.metadata.op_code,
                    ResponseCode::FormErr,
                );
                m.metadata.message_type = hickory_proto::op::MessageType::Response;
                m
            }
        };
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or_else(|| "none".to_string(), |q| q.query_type().to_string());
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                qtype,
                rcode: resp.metadata.response_code.to_string(),
            })
            .inc();
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &resp.edns {
            builder.edns(e);
        }
        let response = builder.build(
            resp.metadata,
            resp.answers.iter(),
            resp.authorities.iter(),
            std::iter::empty(),
            resp.additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending DNS response");
                let mut metadata = resp.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata,
                    counts: hickory_proto::op::HeaderCounts::default(),
                })
            }
        };
        self.metrics.latency.observe(start.elapsed().as_secs_f64());
        info
    }
}

/// Serve every address until cancelled: UDP on the fast path (a worker thread per CPU),
/// TCP through hickory-server.
pub async fn serve(
    handler: Handler,
    listen: &[SocketAddr],
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let mut threads = Vec::new();
    let mut server = Server::new(handler.clone());
    for addr in listen {
        threads.extend(crate::fast::serve_udp(
            &handler,
            *addr,
            workers,
            &tokio::runtime::Handle::current(),
            &cancel,
        )?);
        server.register_listener(
            tokio::net::TcpListener::bind(addr).await?,
            Duration::from_secs(5),
            64,
        );
        tracing::info!(%addr, "DNS listening (UDP and TCP)");
    }
    cancel.cancelled().await;
    let _ = server.shutdown_gracefully().await;
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}
