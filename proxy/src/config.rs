//! The configuration file: kube-proxy's settings that apply to us (same names as
//! `KubeProxyConfiguration`) plus Switchyard's own. Unknown fields and invalid values are
//! errors that carry the field path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use switchyard_model::{NodePortAddresses, ProxyConfig};

use crate::error::ConfigError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Pod CIDRs of the cluster, comma separated (kube-proxy's `clusterCIDR`).
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    pub node_port_addresses: Vec<String>,
    pub sync_period: String,
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
    /// `iptables` backend flavour: `auto`, `legacy` or `nft`.
    pub iptables_mode: String,
    /// Capacity of the service / backend maps.
    pub max_services: u32,
    pub max_backends: u32,
    /// Where the eBPF backend pins its maps and links.
    pub bpf_pin_dir: PathBuf,
    /// `random` or `maglev` (a service's `switchyard.io/lb-algorithm` annotation overrides).
    pub lb_algorithm: String,
    /// Maglev lookup table size per service (prime).
    pub maglev_table_size: u32,
    /// The cluster's NodePort range (`LOW-HIGH`, the API server's
    /// `--service-node-port-range`). The eBPF backend reserves it from the node's ephemeral
    /// ports (`net.ipv4.ip_local_reserved_ports`) so the node's own connections never use a
    /// port that NodePort traffic owns; empty leaves the sysctl alone.
    pub node_port_range: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_cidr: String::new(),
            node_port_addresses: Vec::new(),
            sync_period: "30s".into(),
            min_sync_period: "1s".into(),
            masquerade_all: false,
            masquerade_bit: 14,
            healthz_bind_address: "0.0.0.0:10256".into(),
            metrics_bind_address: "127.0.0.1:10249".into(),
            dns: DnsConfig::default(),
            cgroup_path: None,
            interfaces: Vec::new(),
            iptables_mode: "auto".into(),
            max_services: 65_536,
            max_backends: 1_048_576,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/switchyard"),
            lb_algorithm: "random".into(),
            maglev_table_size: 16_381,
            node_port_range: "30000-32767".into(),
        }
    }
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
    /// `disabled` or `insecure`.
    pub pods: String,
    pub cache_size: u32,
    /// Longest time a forwarded positive answer is cached (seconds).
    pub cache_max_ttl: u32,
    /// Longest time a forwarded NXDOMAIN/NODATA is cached (seconds).
    pub cache_negative_ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            cluster_domain: "cluster.local".into(),
            listen: Vec::new(),
            ttl: 5,
            upstream: Vec::new(),
            pods: "disabled".into(),
            cache_size: 10_000,
            cache_max_ttl: 300,
            cache_negative_ttl: 30,
        }
    }
}

/// The validated form the daemon uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster_cidrs: Vec<IpNet>,
    pub node_port_addresses: NodePortAddresses,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub dns_listen: Vec<SocketAddr>,
    pub node_port_range: Option<(u16, u16)>,
    pub raw: Config,
}

/// `LOW-HIGH` (or one port) as an inclusive range; empty is none.
pub fn parse_port_range(s: &str) -> Result<Option<(u16, u16)>, String> {
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
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port (want LOW-HIGH, e.g. 30000-32767)"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("{s:?}: {lo} is above {hi}"));
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

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Parse a Go-style duration (`300ms`, `1s`, `1m30s`, `2h`), as kube-proxy's config takes.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: missing unit (ns, us, ms, s, m, h)"))?;
        if num_len == 0 {
            return Err(format!("{s:?}: expected a number"));
        }
        let num: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?}: bad number"))?;
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
            other => return Err(format!("{s:?}: unknown unit {other:?}")),
        };
        total += Duration::from_secs_f64(secs);
    }
    Ok(total)
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..n)
            .take_while(|d: &u32| d.saturating_mul(*d) <= n)
            .all(|d| !n.is_multiple_of(d))
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

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // YAML -> JSON value first, then decode with the path of the failing field.
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
                source: Box::new(e),
            })?;
        if value.is_null() {
            return Ok(Config::default());
        }
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })
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
        let min_sync_period =
            parse_duration(&self.min_sync_period).map_err(|r| invalid("minSyncPeriod", r))?;
        if sync_period.is_zero() {
            return Err(invalid("syncPeriod", "must be greater than 0"));
        }
        if min_sync_period > sync_period {
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
        let mut dns_listen = Vec::new();
        for (i, l) in self.dns.listen.iter().enumerate() {
            let field = format!("dns.listen[{i}]");
            dns_listen.push(bind_address(&field, l)?.ok_or_else(|| invalid(&field, "empty"))?);
        }
        for (i, u) in self.dns.upstream.iter().enumerate() {
            let ok = u.parse::<SocketAddr>().is_ok() || u.parse::<std::net::IpAddr>().is_ok();
            if !ok {
                return Err(invalid(
                    &format!("dns.upstream[{i}]"),
                    format!("{u:?} is not ADDR or ADDR:PORT"),
                ));
            }
        }
        if !matches!(self.dns.pods.as_str(), "disabled" | "insecure") {
            return Err(invalid(
                "dns.pods",
                format!("{:?} (want disabled or insecure)", self.dns.pods),
            ));
        }
        if self.dns.cluster_domain.trim_matches('.').is_empty() {
            return Err(invalid("dns.clusterDomain", "must not be empty"));
        }
        if !matches!(self.iptables_mode.as_str(), "auto" | "legacy" | "nft") {
            return Err(invalid(
                "iptablesMode",
                format!("{:?} (want auto, legacy or nft)", self.iptables_mode),
            ));
        }
        if self.max_services == 0 {
            return Err(invalid("maxServices", "must be greater than 0"));
        }
        if !matches!(self.lb_algorithm.as_str(), "random" | "maglev") {
            return Err(invalid(
                "lbAlgorithm",
                format!("{:?} (want random or maglev)", self.lb_algorithm),
            ));
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
        let node_port_range =
            parse_port_range(&self.node_port_range).map_err(|e| invalid("nodePortRange", e))?;
        Ok(Settings {
            cluster_cidrs,
            node_port_addresses,
            sync_period,
            min_sync_period,
            masquerade_all: self.masquerade_all,
            masquerade_bit,
            healthz_bind_address,
            metrics_bind_address,
            dns_listen,
            node_port_range,
            raw: self,
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
        assert_eq!(s.min_sync_period, Duration::from_millis(500));
        assert_eq!(s.dns_listen[0].port(), 53);
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
            (
                "dns:\n  pods: verified\n",
                "dns.pods",
                "want disabled or insecure",
            ),
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
}
