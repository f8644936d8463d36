//! Prometheus metrics. Where a series means what kube-proxy's means, it has kube-proxy's
//! exact name (`kubeproxy_` prefix), type, buckets and labels (pkg/proxy/metrics), so
//! existing dashboards and alerts keep working; what is Switchyard's own is `switchyard_*`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IpFamilyLabel {
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
    /// Why this mode (configured, or what the kernel has).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// kube-proxy's `network_programming_duration_seconds` buckets.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..12).map(|i| 300.0 + 10.0 * f64::from(i)));
    b
}

/// kube-proxy's sync-duration buckets: 1 ms doubling, 15 buckets.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    // kube-proxy's series.
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub endpoint_changes: Counter,
    pub endpoint_changes_pending: Gauge,
    pub service_changes: Counter,
    pub service_changes_pending: Gauge,
    pub iptables_restore_failures: Counter,
    pub iptables_partial_restore_failures: Counter,
    pub iptables_rules: Family<TableLabel, Gauge>,
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    pub healthz_total: Family<CodeLabel, Counter>,
    pub livez_total: Family<CodeLabel, Counter>,
    pub conntrack_deleted: Family<IpFamilyLabel, Counter>,
    pub conntrack_duration: Histogram,
    // Switchyard's own.
    pub sync_errors: Counter,
    /// From a change's receipt to the sync that programmed it, with buckets fine enough
    /// for an eBPF sync (kube-proxy's network programming buckets start at 250 ms).
    pub change_to_programmed: Histogram,
    pub service_ports: Gauge,
    pub source_errors: Family<KindLabel, Counter>,
    pub watch_errors: Family<KindLabel, Counter>,
    pub watch_last_error: Family<KindLabel, Gauge<f64, AtomicU64>>,
    pub backend_selected: Family<BackendLabel, Gauge>,
    pub tc_attach_mode: Family<ModeLabel, Gauge>,
    pub dataplane_capacity_errors: Counter,
    pub dataplane_unprogrammed: Gauge,
    pub tc_reattached: Counter,
    pub cgroup_reattached: Counter,
    pub pins_restored: Counter,
    pub sockets_destroyed: Counter,
    pub socket_destroy_errors: Counter,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub health_check_bind_errors: Counter,
    pub health_check_servers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            network_programming: Histogram::new(programming_buckets()),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            iptables_restore_failures: Counter::default(),
            iptables_partial_restore_failures: Counter::default(),
            iptables_rules: Family::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            conntrack_deleted: Family::default(),
            conntrack_duration: Histogram::new(sync_buckets()),
            sync_errors: Counter::default(),
            change_to_programmed: Histogram::new(exponential_buckets(50e-6, 2.0, 20)),
            service_ports: Gauge::default(),
            source_errors: Family::default(),
            watch_errors: Family::default(),
            watch_last_error: Family::default(),
            backend_selected: Family::default(),
            tc_attach_mode: Family::default(),
            dataplane_capacity_errors: Counter::default(),
            dataplane_unprogrammed: Gauge::default(),
            tc_reattached: Counter::default(),
            cgroup_reattached: Counter::default(),
            pins_restored: Counter::default(),
            sockets_destroyed: Counter::default(),
            socket_destroy_errors: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            health_check_bind_errors: Counter::default(),
            health_check_servers: Gauge::default(),
        };
        let kp = "kubeproxy_";
        macro_rules! add {
            ($name:expr, $help:expr, $field:expr) => {
                r.register($name, $help, $field.clone())
            };
        }
        add!(
            format!("{kp}sync_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds",
            m.sync_duration
        );
        add!(
            format!("{kp}sync_full_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration
        );
        add!(
            format!("{kp}sync_partial_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration
        );
        add!(
            format!("{kp}network_programming_duration_seconds"),
            "In Cluster Network Programming Latency in seconds",
            m.network_programming
        );
        add!(
            format!("{kp}sync_proxy_rules_last_timestamp_seconds"),
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp
        );
        add!(
            format!("{kp}sync_proxy_rules_last_queued_timestamp_seconds"),
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp
        );
        add!(
            format!("{kp}sync_proxy_rules_endpoint_changes"),
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes
        );
        add!(
            format!("{kp}sync_proxy_rules_endpoint_changes_pending"),
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending
        );
        add!(
            format!("{kp}sync_proxy_rules_service_changes"),
            "Cumulative proxy rules Service changes",
            m.service_changes
        );
        add!(
            format!("{kp}sync_proxy_rules_service_changes_pending"),
            "Pending proxy rules Service changes",
            m.service_changes_pending
        );
        add!(
            format!("{kp}sync_proxy_rules_iptables_restore_failures"),
            "Cumulative proxy iptables restore failures",
            m.iptables_restore_failures
        );
        add!(
            format!("{kp}sync_proxy_rules_iptables_partial_restore_failures"),
            "Cumulative proxy iptables partial restore failures",
            m.iptables_partial_restore_failures
        );
        add!(
            format!("{kp}sync_proxy_rules_iptables_total"),
            "Total number of iptables rules owned by kube-proxy",
            m.iptables_rules
        );
        add!(
            format!("{kp}sync_proxy_rules_no_local_endpoints_total"),
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints
        );
        add!(
            format!("{kp}proxy_healthz"),
            "Cumulative proxy healthz HTTP status",
            m.healthz_total
        );
        add!(
            format!("{kp}proxy_livez"),
            "Cumulative proxy livez HTTP status",
            m.livez_total
        );
        add!(
            format!("{kp}conntrack_reconciler_deleted_entries"),
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_deleted
        );
        add!(
            format!("{kp}conntrack_reconciler_sync_duration_seconds"),
            "ReconcileConntrackFlowsLatency latency in seconds",
            m.conntrack_duration
        );
        add!(
            "switchyard_sync_errors",
            "Syncs the dataplane refused (retried as full syncs)",
            m.sync_errors
        );
        add!(
            "switchyard_change_to_programmed_seconds",
            "From the receipt of a Service, EndpointSlice or Node change to the sync that programmed it (the daemon's part of network programming, in buckets from 50 us)",
            m.change_to_programmed
        );
        add!(
            "switchyard_service_ports",
            "Service ports (per family) in the desired state",
            m.service_ports
        );
        add!(
            "switchyard_source_errors",
            "Invalid objects ignored (their last good version is kept)",
            m.source_errors
        );
        add!(
            "switchyard_api_watch_errors",
            "Failed list or watch requests to the API server (retried with backoff; the last good state stays programmed)",
            m.watch_errors
        );
        add!(
            "switchyard_api_watch_last_error_timestamp_seconds",
            "When a list or watch request to the API server last failed",
            m.watch_last_error
        );
        add!(
            "switchyard_backend",
            "The dataplane backend in use (1) and why it was chosen",
            m.backend_selected
        );
        add!(
            "switchyard_tc_attach_mode",
            "How the eBPF backend attaches its per-packet programs (1 for the mode in use)",
            m.tc_attach_mode
        );
        add!(
            "switchyard_dataplane_capacity_errors",
            "Service ports not programmed because a map was full (the log names them)",
            m.dataplane_capacity_errors
        );
        add!(
            "switchyard_dataplane_unprogrammed_service_ports",
            "Service ports not programmed right now because a map is full (/healthz names the setting to raise)",
            m.dataplane_unprogrammed
        );
        add!(
            "switchyard_tc_programs_reattached",
            "Per-packet programs found detached from an interface by a full sync and attached again",
            m.tc_reattached
        );
        add!(
            "switchyard_cgroup_programs_reattached",
            "Socket load balancer attachments found detached from the cgroup by a full sync and attached again",
            m.cgroup_reattached
        );
        add!(
            "switchyard_bpf_map_pins_restored",
            "eBPF map pins found removed from bpffs by a full sync and pinned again",
            m.pins_restored
        );
        add!(
            "switchyard_sockets_destroyed",
            "Node sockets the socket load balancer had connected to an endpoint since removed, destroyed so their applications reconnect",
            m.sockets_destroyed
        );
        add!(
            "switchyard_socket_destroy_errors",
            "Failures to list or destroy sockets connected to removed endpoints (retried at the next sync)",
            m.socket_destroy_errors
        );
        add!(
            "switchyard_bpf_map_entries",
            "Entries in use in the eBPF backend's maps",
            m.map_entries
        );
        add!(
            "switchyard_bpf_map_max_entries",
            "Capacity of the eBPF backend's maps",
            m.map_capacity
        );
        add!(
            "switchyard_health_check_node_port_bind_errors",
            "healthCheckNodePort servers that could not bind (retried; the log names the service)",
            m.health_check_bind_errors
        );
        add!(
            "switchyard_health_check_node_port_servers",
            "healthCheckNodePort servers (one per LoadBalancer service with externalTrafficPolicy: Local)",
            m.health_check_servers
        );
        // Zero series from the start, so rates and alerts over them work before the first
        // deletion.
        for ip_family in ["IPv4", "IPv6"] {
            let _ = m.conntrack_deleted.get_or_create(&IpFamilyLabel {
                ip_family: ip_family.into(),
            });
        }
        *m.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = r;
        m
    }

    /// Register metrics defined elsewhere (DNS) into the same registry.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        let mut reg = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut reg);
    }

    /// Add a collector read at every scrape (the eBPF per-service counters).
    pub fn register_collector(&self, c: Box<dyn Collector>) {
        self.register_with(|r| r.register_collector(c));
    }

    pub fn source_error(&self, kind: &str) {
        self.source_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Stale flows deleted by the conntrack cleanup (kube-proxy's reconciler).
    pub fn conntrack_deleted(&self, ipv6: bool, n: u64) {
        if n > 0 {
            self.conntrack_deleted
                .get_or_create(&IpFamilyLabel {
                    ip_family: if ipv6 { "IPv6" } else { "IPv4" }.into(),
                })
                .inc_by(n);
        }
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
