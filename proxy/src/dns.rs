//! Wiring of the cluster DNS into the daemon: build the resolver from the settings, and keep
//! its zone in step with the store. DNS is a consumer of the store of its own, beside the
//! sync loop: it rebuilds the records of each service whose objects changed (headless and
//! ExternalName services included, which the dataplane never sees), whatever the dataplane
//! is doing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use switchyard_dns::{
    DnsMetrics, ForwardConfig, Forwarder, Handler, PodsMode, ServiceRecords, SharedSnapshot,
    Snapshot, ZoneBuilder, ZoneConfig,
};
use tokio_util::sync::CancellationToken;

use switchyard_model::{Engine, Protocol, ServiceKey};

use crate::config::{DnsPods, DnsSettings};
use crate::metrics::Metrics;
use crate::store::{DnsDelta, Store};

/// Changes closer together than this are answered from one rebuild.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

pub fn zone_config(dns: &DnsSettings, cluster_domain: Option<&str>) -> ZoneConfig {
    ZoneConfig {
        zone: cluster_domain.map_or_else(
            || dns.cluster_domain.clone(),
            |d| d.trim_matches('.').to_ascii_lowercase(),
        ),
        ttl: dns.ttl,
        pods: match dns.pods {
            DnsPods::Insecure => PodsMode::Insecure,
            DnsPods::Disabled => PodsMode::Disabled,
        },
    }
}

/// The upstreams: from the config, else the node's resolv.conf minus our own addresses.
pub fn upstreams(dns: &DnsSettings, listen: &[SocketAddr]) -> Vec<SocketAddr> {
    if !dns.upstream.is_empty() || !dns.upstream_services.is_empty() {
        return dns.upstream.clone();
    }
    let rc = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    switchyard_dns::forward::upstreams_from_resolv_conf(&rc, listen)
}

/// The resolver (answering SERVFAIL in the zone until the store's first complete list) and
/// the follower that keeps its zone current; run the follower as a task.
pub fn build(
    dns: &DnsSettings,
    cluster_domain: Option<&str>,
    listen: &[SocketAddr],
    store: &Arc<Store>,
    metrics: &Metrics,
) -> (Handler, ZoneFollower) {
    let zone = zone_config(dns, cluster_domain);
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::empty(zone.clone())));
    let forwarder = Forwarder::new(ForwardConfig {
        upstreams: upstreams(dns, listen),
        timeout: Duration::from_secs(2),
        cache_size: dns.cache_size,
        max_ttl: dns.cache_max_ttl,
        negative_ttl: dns.cache_negative_ttl,
        stale_ttl: dns.serve_stale,
        servfail_ttl: 5,
        prefetch: dns.prefetch,
    });
    tracing::info!(zone = %zone.zone, upstreams = ?forwarder.upstreams(), "cluster DNS configured");
    let dns_metrics = DnsMetrics::default();
    metrics.register_with(|r| dns_metrics.register(r));
    let handler = Handler {
        snapshot: Arc::clone(&snapshot),
        forwarder: Arc::new(forwarder),
        metrics: dns_metrics.clone(),
        pods: dns.autopath.then(|| {
            let pods = store.pod_directory();
            let rc = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            pods.set_search(switchyard_dns::autopath::search_domains(&rc));
            pods
        }),
    };
    let follower = ZoneFollower {
        upstream_services: dns.upstream_services.clone(),
        forwarder: Arc::clone(&handler.forwarder),
        store: Arc::clone(store),
        builder: ZoneBuilder::new(zone),
        snapshot,
        metrics: dns_metrics,
        serial: 0,
    };
    (handler, follower)
}

/// Follows the store and publishes the zone.
#[derive(Debug)]
pub struct ZoneFollower {
    store: Arc<Store>,
    builder: ZoneBuilder,
    snapshot: SharedSnapshot,
    metrics: DnsMetrics,
    serial: u32,
    upstream_services: Vec<ServiceKey>,
    forwarder: Arc<Forwarder>,
}

/// The ready endpoints of each Service's DNS port (53; TCP preferred), as upstreams.
pub fn service_upstreams(e: &Engine, keys: &[ServiceKey]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for key in keys {
        let Some(svc) = e.service(key) else { continue };
        let Some(sp) = svc
            .ports
            .iter()
            .find(|p| p.port == 53 && p.protocol == Protocol::Tcp)
            .or_else(|| svc.ports.iter().find(|p| p.port == 53))
        else {
            continue;
        };
        for slice in e.slices_of(key) {
            let Some(ep_port) = slice
                .ports
                .iter()
                .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|ep| svc.counts_as_ready(ep)) {
                let a = SocketAddr::new(ep.address, ep_port.port);
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    out
}

impl ZoneFollower {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut changed = self.store.subscribe();
        let mut first = true;
        loop {
            if let Some(delta) = self.store.dns_delta(first) {
                if first || !delta.services.is_empty() {
                    self.apply(&delta);
                }
                first = false;
                if !self.upstream_services.is_empty() {
                    let ups = self
                        .store
                        .read(|e| service_upstreams(e, &self.upstream_services));
                    self.forwarder.set_service_upstreams(&ups);
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            // Let a burst of events (a relist, a rollout) land in one rebuild.
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(DEBOUNCE) => {}
            }
        }
    }

    fn apply(&mut self, delta: &DnsDelta) {
        let span =
            tracing::debug_span!("dns_zone", services = delta.services.len(), all = delta.all);
        let _enter = span.enter();
        for (key, objs) in &delta.services {
            let recs = objs.as_ref().map(|(svc, slices)| {
                ServiceRecords::of(self.builder.zone(), svc, slices.iter().map(AsRef::as_ref))
            });
            self.builder.set(key, recs);
        }
        // The SOA serial must grow with every change, also within one second.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or_default();
        self.serial = now.max(self.serial.wrapping_add(1));
        self.snapshot
            .store(Arc::new(self.builder.publish(self.serial)));
        if let Some(since) = delta.pending_since {
            self.metrics
                .programming
                .observe(since.elapsed().as_secs_f64());
        }
        tracing::debug!(services = self.builder.len(), "DNS zone published");
    }
}

/// CoreDNS's `loop` check, once the resolver serves and then every 10 minutes (upstreams
/// come and go): an upstream that sends our queries back to us is dropped, logged and
/// counted (`switchyard_dns_upstream_loops_total`).
pub async fn check_loops(
    forwarder: Arc<Forwarder>,
    status: Arc<crate::dns_listen::DnsStatus>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let loops = prometheus_client::metrics::counter::Counter::<u64>::default();
    metrics.register_with(|r| {
        r.register(
            "switchyard_dns_upstream_loops",
            "Upstreams dropped because they sent our own queries back to us",
            loops.clone(),
        );
    });
    loop {
        // Wait for a listener: the probe can only come back to a server that listens.
        while !status.any_serving() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        let dropped = forwarder.detect_loops().await;
        loops.inc_by(dropped.len() as u64);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_mins(10)) => {}
        }
    }
}
