//! Node-local cluster DNS: answers `*.svc.<zone>` (and PTRs of cluster addresses) from an
//! immutable snapshot of the model, swapped atomically after every sync, and forwards every
//! other name upstream with a bounded cache.

pub mod fast;
pub mod forward;
pub mod handler;
pub mod metrics;
pub mod resolve;
pub mod server;
pub mod snapshot;

use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::server::Server;
use tokio_util::sync::CancellationToken;

pub use forward::{ForwardConfig, Forwarder};
pub use handler::{Handler, SharedSnapshot};
pub use metrics::DnsMetrics;
pub use snapshot::{PodsMode, ServiceRecords, Snapshot, ZoneBuilder, ZoneConfig};

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
