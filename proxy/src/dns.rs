//! Wiring of the cluster DNS into the daemon: build the resolver from the settings and keep
//! its snapshot in step with the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use switchyard_dns::{
    DnsMetrics, ForwardConfig, Forwarder, Handler, PodsMode, Snapshot, ZoneConfig,
};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::sync::SyncHook;

pub fn zone_config(settings: &Settings, cluster_domain: Option<&str>) -> ZoneConfig {
    let d = &settings.raw.dns;
    ZoneConfig {
        zone: cluster_domain
            .unwrap_or(&d.cluster_domain)
            .trim_matches('.')
            .to_ascii_lowercase(),
        ttl: d.ttl,
        pods: if d.pods == "insecure" {
            PodsMode::Insecure
        } else {
            PodsMode::Disabled
        },
    }
}

/// The upstreams: from the config, else the node's resolv.conf minus our own addresses.
pub fn upstreams(settings: &Settings, listen: &[SocketAddr]) -> Vec<SocketAddr> {
    let configured: Vec<SocketAddr> = settings
        .raw
        .dns
        .upstream
        .iter()
        .filter_map(|u| {
            u.parse::<SocketAddr>().ok().or_else(|| {
                u.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
        })
        .collect();
    if !configured.is_empty() {
        return configured;
    }
    let rc = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    switchyard_dns::forward::upstreams_from_resolv_conf(&rc, listen)
}

/// A resolver (answering SERVFAIL in the zone until the first sync) and the hook that
/// refreshes it after every sync.
pub fn build(
    settings: &Settings,
    cluster_domain: Option<&str>,
    listen: &[SocketAddr],
    store: &Arc<Store>,
    metrics: &Metrics,
) -> (Handler, SyncHook) {
    let zone = zone_config(settings, cluster_domain);
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::empty(zone.clone())));
    let d = &settings.raw.dns;
    let forwarder = Forwarder::new(ForwardConfig {
        upstreams: upstreams(settings, listen),
        timeout: Duration::from_secs(2),
        cache_size: d.cache_size as usize,
        max_ttl: d.cache_max_ttl,
        negative_ttl: d.cache_negative_ttl,
    });
    tracing::info!(zone = %zone.zone, upstreams = ?forwarder.upstreams(), "cluster DNS configured");
    let dns_metrics = DnsMetrics::default();
    metrics.register_with(|r| dns_metrics.register(r));
    let handler = Handler {
        snapshot: Arc::clone(&snapshot),
        forwarder: Arc::new(forwarder),
        metrics: dns_metrics.clone(),
    };
    let store = Arc::clone(store);
    let hook: SyncHook = Box::new(move |out| {
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or_default();
        let snap = store.read(|e| {
            Snapshot::build(
                zone.clone(),
                e.services().map(AsRef::as_ref),
                |svc| e.slices_of(&svc.key).map(AsRef::as_ref).collect(),
                serial,
            )
        });
        snapshot.store(Arc::new(snap));
        if let Some(since) = out.pending_since {
            dns_metrics
                .programming
                .observe(since.elapsed().as_secs_f64());
        }
    });
    (handler, hook)
}
