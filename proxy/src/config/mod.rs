//! The configuration file: kube-proxy's settings that apply to us (same names as
//! `KubeProxyConfiguration`) plus Switchyard's own. Unknown fields and invalid values are
//! errors that carry the field path.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use switchyard_model::{NodePortAddresses, ProxyConfig, ServiceKey};

use crate::dataplane::ebpf::maglev::is_prime;
use crate::error::ConfigError;

pub mod kubeproxy;

/// Switchyard's own kind, for a file that also holds a `KubeProxyConfiguration`.
pub const API_VERSION: &str = "switchyard.io/v1alpha1";
pub const KIND: &str = "SwitchyardConfiguration";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Pod CIDRs of the cluster, comma separated (kube-proxy's `clusterCIDR`).
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    pub node_port_addresses: Vec<String>,
    pub sync_period: String,
    /// Empty: the backend's default (eBPF none, iptables and IPVS kube-proxy's 1 s).
    pub min_sync_period: String,
    pub masquerade_all: bool,
    pub masquerade_bit: i32,
    pub healthz_bind_address: String,
    pub metrics_bind_address: String,
    pub dns: DnsConfig,
    /// The cgroup v2 directory the socket load balancer attaches to.
    pub cgroup_path: Option<PathBuf>,
    /// Interface name patterns (`*` wildcard) the per-packet programs attach to; empty = all
    /// non-loopback interfaces.
    pub interfaces: Vec<String>,
    /// `iptables` backend flavour.
    pub iptables_mode: IptablesMode,
    /// How the eBPF backend attaches its tc program: `auto` (TCX where the kernel has it,
    /// 6.6+, else netlink clsact/cls_bpf), `tcx` or `netlink`.
    pub tc_attach_mode: TcAttachMode,
    /// Capacity of the service / backend maps.
    pub max_services: u32,
    pub max_backends: u32,
    /// Where the eBPF backend pins its maps and links.
    pub bpf_pin_dir: PathBuf,
    /// A service's `switchyard.io/lb-algorithm` annotation overrides it.
    pub lb_algorithm: LbAlgorithm,
    /// Maglev lookup table size per service (prime).
    pub maglev_table_size: u32,
    /// The IPVS backend's scheduler for services without the `switchyard.io/ipvs-scheduler`
    /// annotation: rr (default), lc, sh or mh (kube-proxy's `ipvs.scheduler`).
    pub ipvs_scheduler: String,
    /// IPVS connection timeouts (kube-proxy's `ipvs.tcpTimeout`, `tcpFinTimeout`,
    /// `udpTimeout`); empty or 0s leaves the kernel's.
    pub ipvs_tcp_timeout: String,
    pub ipvs_tcp_fin_timeout: String,
    pub ipvs_udp_timeout: String,
    /// The cluster's NodePort range (`LOW-HIGH`, the API server's
    /// `--service-node-port-range`). The eBPF backend reserves it from the node's ephemeral
    /// ports (`net.ipv4.ip_local_reserved_ports`) so the node's own connections never use a
    /// port that NodePort traffic owns; empty leaves the sysctl alone.
    pub node_port_range: String,
    /// Export the eBPF backend's per-service-port packet/byte/connection counters on
    /// `/metrics` (one series per programmed service port and counter).
    pub service_counters: bool,
    /// How to reach the API server (kube-proxy's `clientConnection`).
    pub client_connection: ClientConnection,
    /// This node's name, when `--node-name`/`NODE_NAME` is not given.
    pub hostname_override: String,
    /// What a `KubeProxyConfiguration` document set that Switchyard does not apply.
    #[serde(skip)]
    pub kube_proxy: Option<KubeProxyNotes>,
}

/// `clientConnection`: the kubeconfig and the client's request rate (kube-proxy's defaults).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClientConnection {
    /// Path of a kubeconfig file; empty = `--kubeconfig`, or the in-cluster config.
    pub kubeconfig: String,
    /// Requests per second to the API server (token bucket).
    pub qps: f32,
    /// Requests allowed above the rate in a burst.
    pub burst: u32,
}

impl Default for ClientConnection {
    fn default() -> Self {
        ClientConnection {
            kubeconfig: String::new(),
            qps: 5.0,
            burst: 10,
        }
    }
}

/// What the `KubeProxyConfiguration` document of the file did not carry over.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KubeProxyNotes {
    /// Paths of fields set to something Switchyard does not do (sorted).
    pub ignored: Vec<String>,
    /// kube-proxy's `mode`, if set (the backend is chosen by `--backend`).
    pub mode: Option<String>,
}

impl KubeProxyNotes {
    /// The one warning line for the operator, given the backend actually in use; `None` when
    /// everything set was applied.
    pub fn warning(&self, backend: &str) -> Option<String> {
        let names: Vec<String> = self
            .ignored
            .iter()
            .filter_map(|f| {
                if f != "mode" {
                    return Some(f.clone());
                }
                let mode = self.mode.as_deref().unwrap_or_default();
                (mode != backend).then(|| format!("mode ({mode}; the {backend} backend is in use)"))
            })
            .collect();
        (!names.is_empty()).then(|| names.join(", "))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_cidr: String::new(),
            node_port_addresses: Vec::new(),
            sync_period: "30s".into(),
            min_sync_period: String::new(),
            masquerade_all: false,
            masquerade_bit: 14,
            healthz_bind_address: "0.0.0.0:10256".into(),
            metrics_bind_address: "127.0.0.1:10249".into(),
            dns: DnsConfig::default(),
            cgroup_path: None,
            interfaces: Vec::new(),
            iptables_mode: IptablesMode::Auto,
            tc_attach_mode: TcAttachMode::Auto,
            max_services: 65_536,
            max_backends: 1_048_576,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/switchyard"),
            lb_algorithm: LbAlgorithm::Random,
            maglev_table_size: 16_381,
            ipvs_scheduler: "rr".into(),
            ipvs_tcp_timeout: String::new(),
            ipvs_tcp_fin_timeout: String::new(),
            ipvs_udp_timeout: String::new(),
            node_port_range: "30000-32767".into(),
            service_counters: false,
            client_connection: ClientConnection::default(),
            hostname_override: String::new(),
            kube_proxy: None,
        }
    }
}

/// `iptablesMode`: which iptables flavour the iptables backend uses.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IptablesMode {
    /// The flavour already holding more rules on this node (as kube-proxy picks).
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// `tcAttachMode`: how the eBPF backend attaches its tc program to interfaces.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachMode {
    /// TCX where the kernel has it (6.6 and later), else netlink.
    #[default]
    Auto,
    /// bpf_link-based TCX (Linux 6.6+).
    Tcx,
    /// A `clsact` qdisc with a direct-action `cls_bpf` filter of our own priority and handle.
    Netlink,
}

/// `lbAlgorithm`: how the eBPF backend picks a backend for a new flow.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    #[default]
    Random,
    Maglev,
}

/// `dns.pods`: whether `a-b-c-d.<ns>.pod.<zone>` is answered (CoreDNS's `pods` option).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DnsPods {
    #[default]
    Disabled,
    Insecure,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsConfig {
    pub enabled: bool,
    pub cluster_domain: String,
    /// `ADDR:PORT` to serve on (UDP and TCP).
    pub listen: Vec<String>,
    pub ttl: u32,
    /// Upstream servers for other zones; empty = the node's resolv.conf.
    pub upstream: Vec<String>,
    pub pods: DnsPods,
    pub cache_size: u32,
    /// Longest time a forwarded positive answer is cached (seconds).
    pub cache_max_ttl: u32,
    /// Longest time a forwarded NXDOMAIN/NODATA is cached (seconds).
    pub cache_negative_ttl: u32,
    /// Serve an expired forwarded answer for up to this long (s) when every upstream fails
    /// (RFC 8767); 0 turns it off.
    pub serve_stale: u32,
    /// Refresh popular forwarded answers shortly before they expire.
    pub prefetch: bool,
    /// Walk the search path of this node's pods server-side (CoreDNS's `autopath`): the
    /// daemon then watches this node's pods (RBAC `pods: list, watch`).
    pub autopath: bool,
    /// Send pods' and the node's queries to the cluster DNS Service to this resolver
    /// (socket LB; NOTRACK rules with iptables), with no resolv.conf change.
    #[serde(rename = "interceptClusterDNS")]
    pub intercept_cluster_dns: bool,
    /// The cluster DNS Service (`NAMESPACE/NAME`).
    #[serde(rename = "clusterDNSService")]
    pub cluster_dns_service: String,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            cluster_domain: "cluster.local".into(),
            listen: Vec::new(),
            ttl: 5,
            upstream: Vec::new(),
            pods: DnsPods::Disabled,
            cache_size: 10_000,
            cache_max_ttl: 300,
            cache_negative_ttl: 30,
            serve_stale: 3600,
            prefetch: true,
            autopath: true,
            intercept_cluster_dns: true,
            cluster_dns_service: "kube-system/kube-dns".into(),
        }
    }
}

impl Settings {
    /// The debounce between syncs for `backend`: the configured `minSyncPeriod`, else
    /// kube-proxy's 1 s for the rule-writing backends (a full iptables-restore costs
    /// seconds at scale) and none for eBPF, whose syncs write only the changed map entries:
    /// a change goes in at once, and changes arriving while a sync runs go in the next.
    pub fn min_sync_period_for(&self, backend: &str) -> Duration {
        self.min_sync_period.unwrap_or(if backend == "ebpf" {
            Duration::ZERO
        } else {
            Duration::from_secs(1).min(self.sync_period)
        })
    }
}

/// The validated form the daemon uses: every value parsed once into its type.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster_cidrs: Vec<IpNet>,
    pub node_port_addresses: NodePortAddresses,
    pub sync_period: Duration,
    /// `None`: the backend's default (`Settings::min_sync_period_for`).
    pub min_sync_period: Option<Duration>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub node_port_range: Option<(u16, u16)>,
    pub cgroup_path: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub iptables_mode: IptablesMode,
    pub tc_attach_mode: TcAttachMode,
    pub max_services: u32,
    pub max_backends: u32,
    pub bpf_pin_dir: PathBuf,
    pub lb_algorithm: LbAlgorithm,
    pub maglev_table_size: u32,
    pub ipvs_scheduler: String,
    pub ipvs_timeouts: crate::dataplane::ipvs::writer::IpvsTimeouts,
    pub dns: DnsSettings,
    pub service_counters: bool,
    /// `clientConnection.kubeconfig` (`--kubeconfig` overrides it).
    pub kubeconfig: Option<PathBuf>,
    pub client_qps: f32,
    pub client_burst: u32,
    pub hostname_override: Option<String>,
    pub kube_proxy: Option<KubeProxyNotes>,
}

/// The validated `dns` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsSettings {
    pub enabled: bool,
    /// Lowercase, without the trailing dot.
    pub cluster_domain: String,
    pub listen: Vec<SocketAddr>,
    pub ttl: u32,
    /// Empty (and no Service): the node's resolv.conf.
    pub upstream: Vec<SocketAddr>,
    /// Services whose endpoints are upstreams too, over TCP (`service:NS/NAME`): the
    /// cluster's CoreDNS, so its stub domains and plugins stay in force.
    pub upstream_services: Vec<ServiceKey>,
    pub pods: DnsPods,
    pub cache_size: usize,
    pub cache_max_ttl: u32,
    pub cache_negative_ttl: u32,
    pub serve_stale: u32,
    pub prefetch: bool,
    pub autopath: bool,
    /// The Service to intercept and the listen address to send it to; `None` when
    /// interception is off or no listen address can take it.
    pub intercept: Option<(ServiceKey, std::net::SocketAddrV4)>,
}

impl DnsSettings {
    pub fn intercept_service(&self) -> Option<&ServiceKey> {
        self.intercept.as_ref().map(|(k, _)| k)
    }
}

/// Why a value of the config file does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{value:?}: {part:?} is not a port (want LOW-HIGH, e.g. 30000-32767)")]
    NotAPort { value: String, part: String },
    #[error("{value:?}: {low} is above {high}")]
    ReversedRange { value: String, low: u16, high: u16 },
    #[error("empty duration")]
    EmptyDuration,
    #[error("{value:?}: missing unit (ns, us, ms, s, m, h)")]
    MissingUnit { value: String },
    #[error("{value:?}: expected a number")]
    NotANumber { value: String },
    #[error("{value:?}: unknown unit {unit:?}")]
    UnknownUnit { value: String, unit: String },
    #[error("{value:?}: too long (at most {} h, as Go's durations)", MAX_DURATION.as_secs() / 3600)]
    TooLong { value: String },
}

/// Go's `time.Duration` limit (an int64 of nanoseconds, about 292 years), which kube-proxy's
/// durations share.
const MAX_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// Merge `top` into `base`: nested mappings merge, anything else replaces.
fn overlay(
    base: &mut serde_json::Map<String, serde_json::Value>,
    top: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(serde_json::Value::Object(b)), serde_json::Value::Object(t)) => overlay(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `LOW-HIGH` (or one port) as an inclusive range; empty is none.
pub fn parse_port_range(s: &str) -> Result<Option<(u16, u16)>, ValueError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ValueError::NotAPort {
                value: s.to_string(),
                part: p.to_string(),
            })
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(ValueError::ReversedRange {
            value: s.to_string(),
            low: lo,
            high: hi,
        });
    }
    Ok(Some((lo, hi)))
}

impl Settings {
    pub fn proxy_config(&self, node_name: &str) -> ProxyConfig {
        ProxyConfig {
            node_name: node_name.to_string(),
            node_port_addresses: self.node_port_addresses.clone(),
        }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// Parse a Go-style duration (`300ms`, `1s`, `1m30s`, `2h`), as kube-proxy's config takes.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(ValueError::EmptyDuration);
    }
    let value = || s.to_string();
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| ValueError::MissingUnit { value: value() })?;
        if num_len == 0 {
            return Err(ValueError::NotANumber { value: value() });
        }
        let num: f64 = rest[..num_len]
            .parse()
            .map_err(|_| ValueError::NotANumber { value: value() })?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ns" => num / 1e9,
            "us" | "µs" => num / 1e6,
            "ms" => num / 1e3,
            "s" => num,
            "m" => num * 60.0,
            "h" => num * 3600.0,
            other => {
                return Err(ValueError::UnknownUnit {
                    value: value(),
                    unit: other.to_string(),
                });
            }
        };
        total = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| total.checked_add(d))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| ValueError::TooLong { value: value() })?;
    }
    Ok(total)
}

fn bind_address(field: &str, v: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim()
        .parse::<SocketAddr>()
        .map(Some)
        .map_err(|e| invalid(field, format!("{v:?} is not ADDR:PORT: {e}")))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    /// One or more YAML documents: Switchyard's settings (flat, or with `apiVersion:
    /// switchyard.io/v1alpha1` and `kind: SwitchyardConfiguration`) and at most one
    /// kube-proxy `KubeProxyConfiguration`, whose applicable fields are taken first;
    /// Switchyard's own document overrides them.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|e| ConfigError::Yaml {
                source: Box::new(e),
            })?;
        let mut kube_proxy: Option<kubeproxy::Translated> = None;
        let mut mode = None;
        let mut own: Option<serde_json::Map<String, serde_json::Value>> = None;
        for (i, doc) in docs.into_iter().enumerate() {
            let mut map = match doc {
                serde_json::Value::Null => continue,
                serde_json::Value::Object(m) => m,
                other => {
                    return Err(invalid(
                        &format!("document {}", i + 1),
                        format!("expected a mapping, found {other}"),
                    ));
                }
            };
            let api_version = map.remove("apiVersion");
            let kind = map.remove("kind");
            let text = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let (api_version, kind) = (text(&api_version), text(&kind));
            match (api_version.as_str(), kind.as_str()) {
                ("", "") | (API_VERSION, KIND) => {
                    if own.is_some() {
                        return Err(invalid(
                            &format!("document {}", i + 1),
                            "a second Switchyard configuration document",
                        ));
                    }
                    own = Some(map);
                }
                (kubeproxy::API_VERSION, kubeproxy::KIND) => {
                    if kube_proxy.is_some() {
                        return Err(invalid(
                            &format!("document {}", i + 1),
                            "a second KubeProxyConfiguration document",
                        ));
                    }
                    mode = map
                        .get("mode")
                        .and_then(serde_json::Value::as_str)
                        .filter(|m| !m.is_empty())
                        .map(str::to_string);
                    kube_proxy = Some(kubeproxy::translate(map)?);
                }
                (a, k) => {
                    let field = if a == API_VERSION || a == kubeproxy::API_VERSION {
                        "kind"
                    } else {
                        "apiVersion"
                    };
                    return Err(invalid(
                        field,
                        format!(
                            "{a:?} {k:?} is not a known configuration (want {API_VERSION} {KIND}, or {} {})",
                            kubeproxy::API_VERSION,
                            kubeproxy::KIND
                        ),
                    ));
                }
            }
        }
        let mut merged = kube_proxy
            .as_ref()
            .map(|t| t.values.clone())
            .unwrap_or_default();
        if let Some(own) = own {
            overlay(&mut merged, own);
        }
        let mut cfg: Config = serde_path_to_error::deserialize(serde_json::Value::Object(merged))
            .map_err(|e| ConfigError::Invalid {
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
        cfg.kube_proxy = kube_proxy.map(|t| KubeProxyNotes {
            ignored: t.ignored,
            mode,
        });
        Ok(cfg)
    }

    pub fn validate(self) -> Result<Settings, ConfigError> {
        let mut cluster_cidrs = Vec::new();
        for c in self
            .cluster_cidr
            .split(',')
            .filter(|c| !c.trim().is_empty())
        {
            cluster_cidrs.push(
                c.trim()
                    .parse::<IpNet>()
                    .map_err(|e| invalid("clusterCIDR", format!("{c:?}: {e}")))?,
            );
        }
        let node_port_addresses = NodePortAddresses::parse(&self.node_port_addresses)
            .map_err(|r| invalid("nodePortAddresses", r))?;
        let sync_period =
            parse_duration(&self.sync_period).map_err(|r| invalid("syncPeriod", r))?;
        let min_sync_period = (!self.min_sync_period.trim().is_empty())
            .then(|| parse_duration(&self.min_sync_period))
            .transpose()
            .map_err(|r| invalid("minSyncPeriod", r))?;
        if sync_period.is_zero() {
            return Err(invalid("syncPeriod", "must be greater than 0"));
        }
        if min_sync_period.is_some_and(|m| m > sync_period) {
            return Err(invalid(
                "minSyncPeriod",
                format!(
                    "{} is longer than syncPeriod {}",
                    self.min_sync_period, self.sync_period
                ),
            ));
        }
        let masquerade_bit = u8::try_from(self.masquerade_bit)
            .ok()
            .filter(|b| *b <= 31)
            .ok_or_else(|| {
                invalid(
                    "masqueradeBit",
                    format!("{} is outside 0-31", self.masquerade_bit),
                )
            })?;
        let healthz_bind_address = bind_address("healthzBindAddress", &self.healthz_bind_address)?;
        let metrics_bind_address = bind_address("metricsBindAddress", &self.metrics_bind_address)?;
        let mut listen = Vec::new();
        for (i, l) in self.dns.listen.iter().enumerate() {
            let field = format!("dns.listen[{i}]");
            listen.push(bind_address(&field, l)?.ok_or_else(|| invalid(&field, "empty"))?);
        }
        let mut upstream = Vec::new();
        let mut upstream_services = Vec::new();
        for (i, u) in self.dns.upstream.iter().enumerate() {
            let u = u.trim();
            if let Some(svc) = u.strip_prefix("service:") {
                let (ns, name) = svc
                    .split_once('/')
                    .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
                    .ok_or_else(|| {
                        invalid(
                            &format!("dns.upstream[{i}]"),
                            format!("{u:?}: want service:NAMESPACE/NAME"),
                        )
                    })?;
                upstream_services.push(ServiceKey::new(ns, name));
                continue;
            }
            let addr = u
                .parse::<SocketAddr>()
                .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    invalid(
                        &format!("dns.upstream[{i}]"),
                        format!("{u:?} is not ADDR, ADDR:PORT or service:NAMESPACE/NAME"),
                    )
                })?;
            upstream.push(addr);
        }
        let cluster_domain = self
            .dns
            .cluster_domain
            .trim_matches('.')
            .to_ascii_lowercase();
        if cluster_domain.is_empty() {
            return Err(invalid("dns.clusterDomain", "must not be empty"));
        }
        if self.max_services == 0 {
            return Err(invalid("maxServices", "must be greater than 0"));
        }
        if !is_prime(self.maglev_table_size) || self.maglev_table_size > 65_521 {
            return Err(invalid(
                "maglevTableSize",
                format!("{} is not a prime up to 65521", self.maglev_table_size),
            ));
        }
        if self.max_backends == 0 {
            return Err(invalid("maxBackends", "must be greater than 0"));
        }
        let secs = |field: &str, v: &str| -> Result<u32, ConfigError> {
            if v.is_empty() {
                return Ok(0);
            }
            let d = parse_duration(v).map_err(|e| invalid(field, e))?;
            u32::try_from(d.as_secs()).map_err(|_| invalid(field, "too long"))
        };
        let ipvs_timeouts = crate::dataplane::ipvs::writer::IpvsTimeouts {
            tcp: secs("ipvsTcpTimeout", &self.ipvs_tcp_timeout)?,
            tcp_fin: secs("ipvsTcpFinTimeout", &self.ipvs_tcp_fin_timeout)?,
            udp: secs("ipvsUdpTimeout", &self.ipvs_udp_timeout)?,
        };
        let ipvs_scheduler = match self.ipvs_scheduler.as_str() {
            "" => "rr".to_string(),
            s if crate::dataplane::ipvs::SCHEDULERS.contains(&s) => s.to_string(),
            other => {
                return Err(invalid(
                    "ipvsScheduler",
                    format!("{other:?} is not one of rr, lc, sh, mh"),
                ));
            }
        };
        let node_port_range =
            parse_port_range(&self.node_port_range).map_err(|e| invalid("nodePortRange", e))?;
        if self.client_connection.qps.is_nan() || self.client_connection.qps <= 0.0 {
            return Err(invalid(
                "clientConnection.qps",
                format!("{} is not above 0", self.client_connection.qps),
            ));
        }
        if self.client_connection.burst == 0 {
            return Err(invalid("clientConnection.burst", "must be greater than 0"));
        }
        let kubeconfig = Some(self.client_connection.kubeconfig.trim())
            .filter(|k| !k.is_empty())
            .map(PathBuf::from);
        let hostname_override = Some(self.hostname_override.trim())
            .filter(|h| !h.is_empty())
            .map(str::to_ascii_lowercase);
        let d = self.dns;
        let intercept = if d.enabled && d.intercept_cluster_dns {
            let (ns, name) = d
                .cluster_dns_service
                .split_once('/')
                .filter(|(n, s)| !n.is_empty() && !s.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "dns.clusterDNSService",
                        format!("{:?} is not NAMESPACE/NAME", d.cluster_dns_service),
                    )
                })?;
            // Pods reach the resolver at a node address: loopback and "any" cannot take it.
            listen.iter().find_map(|a| match a {
                SocketAddr::V4(v4) if !v4.ip().is_loopback() && !v4.ip().is_unspecified() => {
                    Some((ServiceKey::new(ns, name), *v4))
                }
                _ => None,
            })
        } else {
            None
        };
        Ok(Settings {
            service_counters: self.service_counters,
            kubeconfig,
            client_qps: self.client_connection.qps,
            client_burst: self.client_connection.burst,
            hostname_override,
            kube_proxy: self.kube_proxy,
            cluster_cidrs,
            node_port_addresses,
            sync_period,
            min_sync_period,
            masquerade_all: self.masquerade_all,
            masquerade_bit,
            healthz_bind_address,
            metrics_bind_address,
            node_port_range,
            cgroup_path: self.cgroup_path,
            interfaces: self.interfaces,
            iptables_mode: self.iptables_mode,
            tc_attach_mode: self.tc_attach_mode,
            max_services: self.max_services,
            max_backends: self.max_backends,
            bpf_pin_dir: self.bpf_pin_dir,
            lb_algorithm: self.lb_algorithm,
            maglev_table_size: self.maglev_table_size,
            ipvs_scheduler,
            ipvs_timeouts,
            dns: DnsSettings {
                enabled: d.enabled,
                cluster_domain,
                listen,
                ttl: d.ttl,
                upstream,
                upstream_services,
                pods: d.pods,
                cache_size: d.cache_size as usize,
                cache_max_ttl: d.cache_max_ttl,
                cache_negative_ttl: d.cache_negative_ttl,
                serve_stale: d.serve_stale,
                prefetch: d.prefetch,
                autopath: d.autopath,
                intercept,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn full_config_validates() {
        let c = Config::parse(
            "clusterCIDR: 10.244.0.0/16,fd00:244::/56\nnodePortAddresses: [192.168.0.0/16, primary]\nsyncPeriod: 1m\nminSyncPeriod: 500ms\nmasqueradeAll: true\ndns:\n  listen: ['169.254.20.10:53']\n  pods: insecure\n",
        )
        .unwrap();
        let s = c.validate().unwrap();
        assert_eq!(s.cluster_cidrs.len(), 2);
        assert!(s.node_port_addresses.primary);
        assert_eq!(s.min_sync_period, Some(Duration::from_millis(500)));
        assert_eq!(
            s.min_sync_period_for("iptables"),
            Duration::from_millis(500)
        );
        assert_eq!(s.min_sync_period_for("ebpf"), Duration::from_millis(500));
        let d = Config::default().validate().unwrap();
        assert_eq!(d.min_sync_period_for("ebpf"), Duration::ZERO);
        assert_eq!(d.min_sync_period_for("iptables"), Duration::from_secs(1));
        assert_eq!(d.min_sync_period_for("ipvs"), Duration::from_secs(1));
        assert_eq!(s.dns.listen[0].port(), 53);
    }

    #[test]
    fn errors_carry_the_field_path() {
        let cases = [
            ("syncPeriod: 1m\nbogus: 1\n", "bogus", "unknown field"),
            (
                "dns:\n  ttl: 5\n  colour: red\n",
                "dns.colour",
                "unknown field",
            ),
            ("masqueradeBit: x\n", "masqueradeBit", "invalid type"),
            ("masqueradeBit: 40\n", "masqueradeBit", "outside 0-31"),
            (
                "syncPeriod: 1s\nminSyncPeriod: 5s\n",
                "minSyncPeriod",
                "longer than",
            ),
            (
                "nodePortAddresses: [nope]\n",
                "nodePortAddresses",
                "neither a CIDR",
            ),
            (
                "dns:\n  listen: ['1.2.3.4']\n",
                "dns.listen[0]",
                "not ADDR:PORT",
            ),
            ("dns:\n  pods: verified\n", "dns.pods", "unknown variant"),
            (
                "dns:\n  upstream: ['10.0.0.10', 'resolver.example']\n",
                "dns.upstream[1]",
                "not ADDR, ADDR:PORT or service:NAMESPACE/NAME",
            ),
            (
                "dns:\n  upstream: ['service:kube-dns']\n",
                "dns.upstream[0]",
                "want service:NAMESPACE/NAME",
            ),
            (
                "lbAlgorithm: roundrobin\n",
                "lbAlgorithm",
                "expected `random` or `maglev`",
            ),
            ("iptablesMode: ebpf\n", "iptablesMode", "unknown variant"),
            ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR", ""),
        ];
        for (yaml, field, reason) in cases {
            let err = Config::parse(yaml).and_then(Config::validate).unwrap_err();
            let msg = err.to_string();
            match &err {
                ConfigError::Invalid { field: f, .. } => assert_eq!(f, field, "{msg}"),
                other => panic!("{yaml}: unexpected {other:?}"),
            }
            assert!(msg.contains(reason), "{msg} should contain {reason}");
        }
    }

    #[test]
    fn kube_proxy_file_and_own_document_merge() {
        let kubeadm = include_str!("../../tests/kube-proxy-kubeadm.yaml");
        let both = format!(
            "{kubeadm}---\napiVersion: switchyard.io/v1alpha1\nkind: SwitchyardConfiguration\nsyncPeriod: 1m\ndns:\n  listen: ['127.0.0.1:5353']\n"
        );
        let s = Config::parse(&both).unwrap().validate().unwrap();
        assert_eq!(
            s.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            s.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // kube-proxy's defaulting: an empty healthzBindAddress is the default, not "off".
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(s.sync_period, Duration::from_mins(1));
        assert_eq!((s.client_qps, s.client_burst), (5.0, 10));
        let notes = s.kube_proxy.unwrap();
        assert_eq!(
            notes.warning("ebpf").unwrap(),
            "conntrack.maxPerCore, mode (iptables; the ebpf backend is in use)"
        );
        assert_eq!(notes.warning("iptables").unwrap(), "conntrack.maxPerCore");
    }

    #[test]
    fn unknown_kinds_and_duplicates_are_errors() {
        for (text, field) in [
            ("apiVersion: v1\nkind: ConfigMap\n", "apiVersion"),
            ("apiVersion: switchyard.io/v1alpha1\nkind: Proxy\n", "kind"),
            ("syncPeriod: 1m\n---\nsyncPeriod: 2m\n", "document 2"),
            ("- a\n- b\n", "document 1"),
        ] {
            match Config::parse(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_duration_beyond_gos_range_is_an_error_not_a_panic() {
        // Found by the config fuzz target (fuzz/regressions/config).
        let long = format!("{}s", "1".repeat(100));
        assert_eq!(
            parse_duration(&long).unwrap_err().to_string(),
            format!("{long:?}: too long (at most 2562047 h, as Go's durations)")
        );
        assert!(parse_duration("2562047h").is_ok());
        assert!(parse_duration("2562048h").is_err());
        assert!(parse_duration("2562047h2562047h").is_err());
        let cfg = format!("minSyncPeriod: {long}\n");
        let err = Config::parse(&cfg).and_then(Config::validate).unwrap_err();
        assert!(err.to_string().contains("minSyncPeriod"), "{err}");
    }
}
