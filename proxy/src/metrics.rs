//! Prometheus metrics, named like kube-proxy's where the meaning is the same.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub sync_errors: Counter,
    pub service_ports: Gauge,
    pub source_errors: Family<KindLabel, Counter>,
    pub backend_selected: Family<BackendLabel, Gauge>,
    pub dataplane_capacity_errors: Counter,
    pub stale_conntrack_deleted: Counter,
    pub tc_reattached: Counter,
    pub healthz_total: Family<CodeLabel, Counter>,
    pub health_check_bind_errors: Counter,
    pub health_check_servers: Gauge,
    pub livez_total: Family<CodeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        let sync_errors = Counter::default();
        let service_ports = Gauge::default();
        let source_errors = Family::<KindLabel, Counter>::default();
        let backend_selected = Family::<BackendLabel, Gauge>::default();
        let dataplane_capacity_errors = Counter::default();
        let stale_conntrack_deleted = Counter::default();
        let tc_reattached = Counter::default();
        let healthz_total = Family::<CodeLabel, Counter>::default();
        let health_check_bind_errors = Counter::default();
        let health_check_servers = Gauge::default();
        registry.register(
            "switchyard_health_check_node_port_bind_errors",
            "healthCheckNodePort servers that could not bind (retried; the log names the service)",
            health_check_bind_errors.clone(),
        );
        registry.register(
            "switchyard_health_check_node_port_servers",
            "healthCheckNodePort servers (one per LoadBalancer service with externalTrafficPolicy: Local)",
            health_check_servers.clone(),
        );
        let livez_total = Family::<CodeLabel, Counter>::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz_total.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            livez_total.clone(),
        );
        registry.register(
            "switchyard_tc_programs_reattached",
            "Per-packet programs found detached from an interface by a full sync and attached again",
            tc_reattached.clone(),
        );
        registry.register(
            "switchyard_stale_conntrack_entries_deleted",
            "UDP flows whose NAT pointed at an endpoint that is gone (or at no endpoint), deleted so the next datagram is balanced again",
            stale_conntrack_deleted.clone(),
        );
        registry.register(
            "switchyard_dataplane_capacity_errors",
            "Service ports not programmed because a map was full (the log names them)",
            dataplane_capacity_errors.clone(),
        );
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to apply one sync to the dataplane",
            sync_duration.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "Time from an object change arriving to it being programmed",
            network_programming.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync",
            last_sync_timestamp.clone(),
        );
        registry.register(
            "switchyard_sync_errors",
            "Syncs the dataplane refused",
            sync_errors.clone(),
        );
        registry.register(
            "switchyard_service_ports",
            "Service ports (per family) in the desired state",
            service_ports.clone(),
        );
        registry.register(
            "switchyard_source_errors",
            "Invalid objects ignored (their last good version is kept)",
            source_errors.clone(),
        );
        registry.register(
            "switchyard_backend",
            "The dataplane backend in use (1) and why it was chosen",
            backend_selected.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            sync_duration,
            network_programming,
            last_sync_timestamp,
            sync_errors,
            service_ports,
            source_errors,
            backend_selected,
            dataplane_capacity_errors,
            stale_conntrack_deleted,
            tc_reattached,
            healthz_total,
            health_check_bind_errors,
            health_check_servers,
            livez_total,
        }
    }

    /// Register metrics defined elsewhere (DNS) into the same registry.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        let mut reg = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut reg);
    }

    pub fn source_error(&self, kind: &str) {
        self.source_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}
