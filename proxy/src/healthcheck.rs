//! kube-proxy's service health servers (pkg/proxy/healthcheck/service_health.go): for every
//! LoadBalancer service with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` tells the cloud load balancer whether this node has local endpoints:
//! 200 with their count when it has some and the proxy is healthy, 503 otherwise, so the
//! load balancer sends the service's traffic only to nodes that can serve it locally.
//!
//! The servers follow what the sync loop programmed (a hook after every landed sync). A
//! port that cannot be bound is logged with its service, counted, and retried; it never
//! stops the daemon.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use switchyard_model::engine::DesiredState;
use switchyard_model::types::ServiceKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::metrics::Metrics;

/// What should be served: port -> (service, local ready endpoints), and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub services: BTreeMap<u16, (ServiceKey, usize)>,
    /// `None`: every address (nodePortAddresses allows all).
    pub addresses: Option<Vec<IpAddr>>,
}

/// The health-check ports of `state`, with each service's local ready endpoints (distinct
/// addresses, across its ports and families; terminating ones do not count, as in
/// kube-proxy, so a load balancer drains a node whose last local pod is terminating).
pub fn wanted(state: &DesiredState, addresses: Option<Vec<IpAddr>>) -> Wanted {
    let mut per_service: BTreeMap<ServiceKey, (u16, Vec<IpAddr>)> = BTreeMap::new();
    for p in state.values() {
        let Some(port) = p.health_check_node_port else {
            continue;
        };
        let entry = per_service
            .entry(p.key.service.clone())
            .or_insert_with(|| (port, Vec::new()));
        for b in p.local_backends.iter().filter(|b| !b.terminating) {
            if !entry.1.contains(&b.addr) {
                entry.1.push(b.addr);
            }
        }
    }
    Wanted {
        services: per_service
            .into_iter()
            .map(|(svc, (port, addrs))| (port, (svc, addrs.len())))
            .collect(),
        addresses,
    }
}

struct Served {
    service: ServiceKey,
    local_endpoints: AtomicUsize,
}

#[derive(Clone)]
struct HandlerState {
    served: Arc<Served>,
    health: Arc<Health>,
}

async fn answer(State(s): State<HandlerState>) -> Response {
    let count = s.served.local_endpoints.load(Ordering::Relaxed);
    let (healthy, _) = s.health.status();
    let code = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {
            "namespace": s.served.service.namespace,
            "name": s.served.service.name,
        },
        "localEndpoints": count,
        "serviceProxyHealthy": healthy,
    });
    let mut r = (code, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(count as u64),
    );
    r
}

/// One service's server: its listeners and the addresses still to bind.
struct Server {
    served: Arc<Served>,
    bound: BTreeMap<SocketAddr, CancellationToken>,
    missing: Vec<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in self.bound.values() {
            c.cancel();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // One dual-stack socket for "every address".
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Serves the wanted health-check ports until cancelled.
pub struct HealthCheckServers {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    servers: BTreeMap<u16, Server>,
    /// An IPv6 socket cannot be opened here: "every address" is 0.0.0.0.
    no_ipv6: bool,
}

impl std::fmt::Debug for HealthCheckServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheckServers")
            .field("ports", &self.servers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>) -> HealthCheckServers {
        HealthCheckServers {
            health,
            metrics,
            servers: BTreeMap::new(),
            no_ipv6: false,
        }
    }

    fn addresses(&self, wanted: &Wanted, port: u16) -> Vec<SocketAddr> {
        match &wanted.addresses {
            None if self.no_ipv6 => vec![SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)],
            None => vec![SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)],
            Some(a) => a.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        }
    }

    /// Open, update and close servers to match `wanted`; retry addresses not yet bound.
    /// Returns whether some address is still not bound.
    pub fn reconcile(&mut self, wanted: &Wanted) -> bool {
        // Closed: ports no longer wanted, or now belonging to another service.
        self.servers.retain(|port, s| {
            wanted
                .services
                .get(port)
                .is_some_and(|(svc, _)| *svc == s.served.service)
        });
        let mut incomplete = false;
        for (port, (svc, count)) in &wanted.services {
            let addrs = self.addresses(wanted, *port);
            let server = self.servers.entry(*port).or_insert_with(|| Server {
                served: Arc::new(Served {
                    service: svc.clone(),
                    local_endpoints: AtomicUsize::new(*count),
                }),
                bound: BTreeMap::new(),
                missing: Vec::new(),
            });
            server
                .served
                .local_endpoints
                .store(*count, Ordering::Relaxed);
            server.bound.retain(|a, c| {
                let keep = addrs.contains(a);
                if !keep {
                    c.cancel();
                }
                keep
            });
            server.missing = addrs
                .iter()
                .filter(|a| !server.bound.contains_key(a))
                .copied()
                .collect();
            let mut still_missing = Vec::new();
            for addr in std::mem::take(&mut server.missing) {
                let listener = match bind(addr) {
                    Ok(l) => l,
                    Err(e)
                        if addr.is_ipv6()
                            && addr.ip().is_unspecified()
                            && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) =>
                    {
                        self.no_ipv6 = true;
                        incomplete = true;
                        continue;
                    }
                    Err(e) => {
                        self.metrics.health_check_bind_errors.inc();
                        tracing::error!(
                            service = %format!("{}/{}", svc.namespace, svc.name),
                            %addr,
                            error = %e,
                            "cannot serve the healthCheckNodePort; retrying"
                        );
                        still_missing.push(addr);
                        continue;
                    }
                };
                let cancel = CancellationToken::new();
                let router = Router::new().fallback(answer).with_state(HandlerState {
                    served: Arc::clone(&server.served),
                    health: Arc::clone(&self.health),
                });
                let c = cancel.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async move { c.cancelled().await })
                        .await;
                });
                tracing::info!(
                    service = %format!("{}/{}", svc.namespace, svc.name),
                    %addr,
                    "serving healthCheckNodePort"
                );
                server.bound.insert(addr, cancel);
            }
            incomplete |= !still_missing.is_empty();
            server.missing = still_missing;
        }
        self.metrics
            .health_check_servers
            .set(i64::try_from(self.servers.len()).unwrap_or(i64::MAX));
        incomplete
    }

    /// Follow `wanted` until cancelled, retrying unbound ports every `retry`.
    pub async fn run(
        mut self,
        mut wanted: watch::Receiver<Wanted>,
        retry: Duration,
        cancel: CancellationToken,
    ) {
        let mut incomplete = false;
        loop {
            let w = wanted.borrow_and_update().clone();
            let was = incomplete;
            incomplete = self.reconcile(&w);
            // After the IPv6 fallback is known, bind again at once.
            if incomplete && !was && self.no_ipv6 {
                incomplete = self.reconcile(&w);
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                r = wanted.changed() => if r.is_err() { return },
                () = tokio::time::sleep(retry), if incomplete => {}
            }
        }
    }
}
