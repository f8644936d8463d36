//! kube-proxy's own configuration file (`kubeproxy.config.k8s.io/v1alpha1`,
//! `KubeProxyConfiguration`, as kubeadm writes it into the `kube-proxy` ConfigMap) taken
//! unchanged: every field is known (a typo is an error with its path), the fields with the
//! same meaning are translated into Switchyard's settings with kube-proxy's defaulting (a
//! zero value means "the default"), and the fields that set something Switchyard does not do
//! are named once so the operator sees what is not applied.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::parse_duration;
use crate::error::ConfigError;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

// The typed shape exists to reject unknown fields with their path; values are read from it
// where they are applied.

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct KubeProxyConfiguration {
    feature_gates: Option<BTreeMap<String, bool>>,
    client_connection: Option<ClientConnection>,
    logging: Option<Value>,
    hostname_override: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    enable_profiling: Option<bool>,
    show_hidden_metrics_for_version: Option<String>,
    mode: Option<String>,
    iptables: Option<IptablesSection>,
    ipvs: Option<IpvsSection>,
    nftables: Option<NftablesSection>,
    winkernel: Option<WinkernelSection>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i32>,
    conntrack: Option<ConntrackSection>,
    config_sync_period: Option<String>,
    port_range: Option<String>,
    windows_run_as_service: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct ClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f32>,
    burst: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct IptablesSection {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i32>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct IpvsSection {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    strict_arp: Option<bool>,
    tcp_timeout: Option<String>,
    tcp_fin_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct NftablesSection {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i32>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct WinkernelSection {
    network_name: Option<String>,
    source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    enable_dsr: Option<bool>,
    root_hns_endpoint_name: Option<String>,
    forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct DetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct ConntrackSection {
    max_per_core: Option<i32>,
    min: Option<i32>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

/// A kube-proxy value that means "not set" (kube-proxy applies its default).
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => matches!(s.as_str(), "" | "0" | "0s"),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

/// The leaf paths under `prefix` that hold a non-zero value.
fn set_leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                set_leaves(&format!("{prefix}.{k}"), v, out);
            }
        }
        v if !is_zero(v) => out.push(prefix.to_string()),
        _ => {}
    }
}

/// What a `KubeProxyConfiguration` document means for Switchyard.
#[derive(Debug, Default)]
pub struct Translated {
    /// Switchyard settings (its own field names), only the ones the document sets.
    pub values: Map<String, Value>,
    /// Fields the document sets that Switchyard does not apply (paths, sorted).
    pub ignored: Vec<String>,
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// `ADDR` or `ADDR:PORT` (kube-proxy adds its default port to a bare address).
fn with_default_port(field: &str, v: &str, port: u16) -> Result<String, ConfigError> {
    let v = v.trim();
    if v.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(v.to_string());
    }
    match v.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(std::net::SocketAddr::new(ip, port).to_string()),
        Err(_) => Err(invalid(field, format!("{v:?} is not ADDR or ADDR:PORT"))),
    }
}

fn nonempty(s: Option<&String>) -> Option<&str> {
    s.map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Translate one `KubeProxyConfiguration` document (apiVersion and kind already removed).
pub fn translate(doc: Map<String, Value>) -> Result<Translated, ConfigError> {
    let raw = Value::Object(doc);
    let kp: KubeProxyConfiguration =
        serde_path_to_error::deserialize(raw.clone()).map_err(|e| ConfigError::Invalid {
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
    let Value::Object(raw) = raw else {
        unreachable!("built from a map")
    };
    let mut values = Map::new();

    // The mode decides which section's sync periods and masquerade settings kube-proxy reads.
    let mode = nonempty(kp.mode.as_ref()).unwrap_or("iptables");
    let mode_section = match mode {
        "ipvs" => "ipvs",
        "nftables" => "nftables",
        _ => "iptables",
    };
    let mut applied: Vec<String> = vec![
        "clientConnection.kubeconfig".into(),
        "clientConnection.qps".into(),
        "clientConnection.burst".into(),
        "hostnameOverride".into(),
        "healthzBindAddress".into(),
        "metricsBindAddress".into(),
        "clusterCIDR".into(),
        "nodePortAddresses".into(),
        "syncPeriod".into(),
        "minSyncPeriod".into(),
        format!("{mode_section}.syncPeriod"),
        format!("{mode_section}.minSyncPeriod"),
    ];

    if let Some(cc) = &kp.client_connection {
        let mut c = Map::new();
        if let Some(k) = nonempty(cc.kubeconfig.as_ref()) {
            c.insert("kubeconfig".into(), json!(k));
        }
        if let Some(q) = cc.qps.filter(|q| *q > 0.0) {
            c.insert("qps".into(), json!(q));
        }
        if let Some(b) = cc.burst.filter(|b| *b > 0) {
            c.insert("burst".into(), json!(b));
        }
        if !c.is_empty() {
            values.insert("clientConnection".into(), Value::Object(c));
        }
    }
    if let Some(h) = nonempty(kp.hostname_override.as_ref()) {
        values.insert("hostnameOverride".into(), json!(h));
    }
    if let Some(h) = nonempty(kp.healthz_bind_address.as_ref()) {
        let v = with_default_port("healthzBindAddress", h, 10256)?;
        values.insert("healthzBindAddress".into(), json!(v));
    }
    if let Some(m) = nonempty(kp.metrics_bind_address.as_ref()) {
        let v = with_default_port("metricsBindAddress", m, 10249)?;
        values.insert("metricsBindAddress".into(), json!(v));
    }
    if let Some(c) = nonempty(kp.cluster_cidr.as_ref()) {
        values.insert("clusterCIDR".into(), json!(c));
    }
    if let Some(n) = kp.node_port_addresses.as_ref().filter(|n| !n.is_empty()) {
        values.insert("nodePortAddresses".into(), json!(n));
    }

    // Sync periods: the top-level fields win over the mode's section (kube-proxy >= 1.31).
    let (sec_sync, sec_min) = match mode_section {
        "ipvs" => kp
            .ipvs
            .as_ref()
            .map(|s| (s.sync_period.clone(), s.min_sync_period.clone())),
        "nftables" => kp
            .nftables
            .as_ref()
            .map(|s| (s.sync_period.clone(), s.min_sync_period.clone())),
        _ => kp
            .iptables
            .as_ref()
            .map(|s| (s.sync_period.clone(), s.min_sync_period.clone())),
    }
    .unwrap_or_default();
    for (name, top, sec) in [
        ("syncPeriod", &kp.sync_period, &sec_sync),
        ("minSyncPeriod", &kp.min_sync_period, &sec_min),
    ] {
        let chosen = [
            (name.to_string(), top),
            (format!("{mode_section}.{name}"), sec),
        ]
        .into_iter()
        .find_map(|(path, v)| {
            let v = nonempty(v.as_ref())?;
            Some(
                parse_duration(v)
                    .map_err(|e| invalid(&path, e))
                    .map(|d| (d, v.to_string())),
            )
        })
        .transpose()?;
        if let Some((d, text)) = chosen
            && !d.is_zero()
        {
            values.insert(name.into(), json!(text));
        }
    }

    // Masquerading: the iptables section (ipvs mode reads it too) or the nftables one.
    let (masq_all, masq_bit, masq_section) = if mode_section == "nftables" {
        let s = kp.nftables.as_ref();
        (
            s.and_then(|s| s.masquerade_all),
            s.and_then(|s| s.masquerade_bit),
            "nftables",
        )
    } else {
        let s = kp.iptables.as_ref();
        (
            s.and_then(|s| s.masquerade_all),
            s.and_then(|s| s.masquerade_bit),
            "iptables",
        )
    };
    applied.push(format!("{masq_section}.masqueradeAll"));
    applied.push(format!("{masq_section}.masqueradeBit"));
    if let Some(true) = masq_all {
        values.insert("masqueradeAll".into(), json!(true));
    }
    if let Some(b) = masq_bit {
        values.insert("masqueradeBit".into(), json!(b));
    }

    if let Some(sched) = kp
        .ipvs
        .as_ref()
        .and_then(|i| i.scheduler.as_ref())
        .filter(|s| !s.is_empty())
    {
        values.insert("ipvsScheduler".into(), json!(sched));
        applied.push("ipvs.scheduler".into());
    }
    if let Some(ipvs) = kp.ipvs.as_ref() {
        for (ours, theirs, v) in [
            ("ipvsTcpTimeout", "tcpTimeout", &ipvs.tcp_timeout),
            ("ipvsTcpFinTimeout", "tcpFinTimeout", &ipvs.tcp_fin_timeout),
            ("ipvsUdpTimeout", "udpTimeout", &ipvs.udp_timeout),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                values.insert(ours.into(), json!(v));
                applied.push(format!("ipvs.{theirs}"));
            }
        }
    }

    // Everything else that is set is named: kube-proxy would have done something with it.
    let mut ignored = Vec::new();
    for (k, v) in &raw {
        let mut leaves = Vec::new();
        set_leaves(k, v, &mut leaves);
        for l in leaves {
            let default_value =
                l == "bindAddress" && v.as_str().is_some_and(|s| s == "0.0.0.0" || s == "::");
            if !applied.contains(&l) && !default_value {
                ignored.push(l);
            }
        }
    }
    ignored.sort();
    Ok(Translated { values, ignored })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm init` writes into the kube-proxy ConfigMap (1.31).
    pub const KUBEADM: &str = include_str!("../../tests/kube-proxy-kubeadm.yaml");

    fn doc(text: &str) -> Map<String, Value> {
        let mut v: Value = serde_saphyr::from_str(text).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("apiVersion");
        m.remove("kind");
        m.clone()
    }

    #[test]
    fn kubeadm_file_translates_with_kube_proxy_defaulting() {
        let t = translate(doc(KUBEADM)).unwrap();
        assert_eq!(t.values["clusterCIDR"], json!("10.244.0.0/16"));
        assert_eq!(
            t.values["clientConnection"]["kubeconfig"],
            json!("/var/lib/kube-proxy/kubeconfig.conf")
        );
        // Zero values are kube-proxy's defaults, not "disabled" or "0s".
        assert!(!t.values.contains_key("healthzBindAddress"));
        assert!(!t.values.contains_key("syncPeriod"));
        assert!(!t.values.contains_key("masqueradeBit"));
        assert_eq!(t.ignored, vec!["conntrack.maxPerCore", "mode"]);
    }

    #[test]
    fn mode_selects_the_section_and_the_rest_is_named() {
        let t = translate(doc(
            "mode: ipvs\nipvs:\n  syncPeriod: 45s\n  scheduler: lc\niptables:\n  syncPeriod: 10s\n  masqueradeBit: 13\nhealthzBindAddress: 0.0.0.0\n",
        ))
        .unwrap();
        assert_eq!(t.values["syncPeriod"], json!("45s"));
        assert_eq!(t.values["masqueradeBit"], json!(13));
        assert_eq!(t.values["healthzBindAddress"], json!("0.0.0.0:10256"));
        assert_eq!(t.ignored, vec!["iptables.syncPeriod", "mode"]);
    }

    #[test]
    fn typos_are_errors_with_their_path() {
        for (text, path) in [
            ("iptables:\n  masqueradBit: 14\n", "iptables.masqueradBit"),
            (
                "clientConnection:\n  kubeConfig: /x\n",
                "clientConnection.kubeConfig",
            ),
            ("conntrak: {}\n", "conntrak"),
            ("iptables:\n  syncPeriod: 5x\n", "iptables.syncPeriod"),
        ] {
            match translate(doc(text)) {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, path, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
