//! Node-local cluster DNS: answers `*.svc.<zone>` (and PTRs of cluster addresses) from an
//! immutable snapshot of the model, swapped atomically after every sync, and forwards every
//! other name upstream with a bounded cache.

pub mod autopath;
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

pub use autopath::PodDirectory;
pub use forward::{ForwardConfig, Forwarder};
pub use handler::{Handler, SharedSnapshot};
pub use metrics::DnsMetrics;
pub use snapshot::{PodsMode, ServiceRecords, Snapshot, ZoneBuilder, ZoneConfig};

/// Serve every address until cancelled: UDP on the fast path (a worker thread per CPU),
/// TCP through hickory-server. A bind failure is returned at once.
pub async fn serve(
    handler: Handler,
    listen: &[SocketAddr],
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut bound = Vec::new();
    for addr in listen {
        bound.push(Listener::bind(&handler, *addr, &cancel)?);
    }
    cancel.cancelled().await;
    for b in bound {
        b.stop().await;
    }
    Ok(())
}

/// A TCP listener with SO_REUSEPORT, as the UDP sockets: a new process (an upgrade) binds
/// beside the old one and takes over when it stops, with no moment nobody listens.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// One address served, UDP and TCP, until `stop` (or the token given to `bind`).
pub struct Listener {
    server: Server<handler::Handler>,
    threads: Vec<std::thread::JoinHandle<()>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Listener {
    /// Bind `addr` (UDP and TCP) and start answering; fails with the bind error.
    pub fn bind(
        handler: &Handler,
        addr: SocketAddr,
        parent: &CancellationToken,
    ) -> std::io::Result<Listener> {
        let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let cancel = parent.child_token();
        // Series of this listener carry its address (CoreDNS's `server` label).
        let handler = &Handler {
            metrics: handler.metrics.for_server(addr),
            ..handler.clone()
        };
        let tcp = reuseport_listener(addr)?;
        let threads = match crate::fast::serve_udp(
            handler,
            addr,
            workers,
            &tokio::runtime::Handle::current(),
            &cancel,
        ) {
            Ok(t) => t,
            Err(e) => {
                cancel.cancel();
                return Err(e);
            }
        };
        let mut server = Server::new(handler.clone());
        server.register_listener(tcp, Duration::from_secs(5), 64);
        tracing::info!(%addr, "DNS listening (UDP and TCP)");
        Ok(Listener {
            server,
            threads,
            cancel,
        })
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = self.server.shutdown_gracefully().await;
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
