//! The shipped manifests: `deploy/switchyard.yaml` is the Helm chart's default render (Helm's
//! own engine, `scripts/helm-render.py`), every object it renders, with the defaults and with
//! every optional part switched on, validates strictly against the Kubernetes OpenAPI schemas
//! and deserializes with k8s-openapi, and the ConfigMap holds a configuration the daemon
//! accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::{Value, json};
use switchyard::config::Config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Lint, render with `values` (JSON merged over the chart's), validate every object.
fn render(values: &Value, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .current_dir(repo())
        .args([
            "scripts/helm-render.py",
            "deploy/helm/switchyard",
            "--validate",
        ])
        .args(["--set-json", &values.to_string()])
        .args(extra)
        .output()
        .expect("python3 (scripts/bootstrap.sh installs it, helm-sdkpy and kubernetes-validate)");
    assert!(
        out.status.success(),
        "helm-render.py failed (bootstrap installs helm-sdkpy and kubernetes-validate):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} missing"))
}

/// Every object deserializes into its k8s-openapi type; returns the kinds seen.
fn typed(docs: &[Value]) -> Vec<String> {
    fn de<T: serde::de::DeserializeOwned>(d: &Value) {
        if let Err(e) = serde_json::from_value::<T>(d.clone()) {
            panic!("{} {}: {e}", d["kind"], d["metadata"]["name"]);
        }
    }
    let mut kinds = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap();
        match kind {
            "DaemonSet" => de::<DaemonSet>(d),
            "ConfigMap" => de::<ConfigMap>(d),
            "Service" => de::<Service>(d),
            "ServiceAccount" => de::<ServiceAccount>(d),
            "ClusterRole" => de::<ClusterRole>(d),
            "ClusterRoleBinding" => de::<ClusterRoleBinding>(d),
            // A CRD's kind, not in k8s-openapi: its shape is checked where it is rendered.
            "ServiceMonitor" => assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1"),
            other => panic!("the chart rendered an unexpected kind {other}"),
        }
        kinds.push(kind.to_string());
    }
    kinds
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    let spec = &ds["spec"]["template"]["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn the_checked_in_manifest_is_the_charts_default_render_and_validates() {
    let file = repo().join("deploy/switchyard.yaml");
    let out = Command::new("python3")
        .current_dir(repo())
        .args([
            "scripts/helm-render.py",
            "deploy/helm/switchyard",
            "--validate",
        ])
        .arg("--check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let d = docs(&text);
    let mut kinds = typed(&d);
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_default_config_parses_and_the_api_server_address_is_a_value() {
    let text = std::fs::read_to_string(repo().join("deploy/switchyard.yaml")).unwrap();
    let d = docs(&text);
    let cm = find(&d, "ConfigMap", "switchyard");
    let cfg = cm["data"]["config.yaml"].as_str().unwrap();
    let settings = Config::parse(cfg).unwrap().validate().unwrap();
    assert_eq!(
        settings.healthz_bind_address.unwrap().to_string(),
        "0.0.0.0:10256"
    );
    assert_eq!(
        settings.dns.intercept_service().map(ToString::to_string),
        Some("kube-system/kube-dns".to_string())
    );
    assert_eq!(
        settings
            .dns
            .upstream_services
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["kube-system/kube-dns"]
    );

    let ds = find(&d, "DaemonSet", "switchyard");
    let c = container(ds, "switchyard");
    let env = c["env"].as_array().unwrap();
    for (var, key) in [
        ("KUBERNETES_SERVICE_HOST", "apiserver-host"),
        ("KUBERNETES_SERVICE_PORT", "apiserver-port"),
    ] {
        let e = env.iter().find(|e| e["name"] == var).unwrap();
        let r = &e["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["name"], "switchyard-apiserver");
        assert_eq!(r["key"], key);
        assert!(find(&d, "ConfigMap", "switchyard-apiserver")["data"][key].is_string());
    }
    // List/watch only, and pods only because autopath needs this node's.
    let role = find(&d, "ClusterRole", "switchyard");
    let rules = role["rules"].as_array().unwrap();
    for rule in rules {
        assert_eq!(rule["verbs"], json!(["list", "watch"]), "{rule}");
    }
    assert!(rules.iter().any(|r| r["resources"] == json!(["pods"])));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    // The image the chart names is the one `cargo xtask image` tags.
    assert_eq!(
        c["image"],
        format!("switchyard:{}", env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion must be the crate version"
    );
}

#[test]
fn every_optional_part_renders_valid_objects_and_a_config_the_daemon_accepts() {
    let values = json!({
        "backend": "ipvs",
        "interfaces": ["eth0"],
        "extraCapabilities": ["SYS_RESOURCE"],
        "kubeProxyCleanup": true,
        "kubeProxyConfiguration": {
            "mode": "ipvs",
            "clusterCIDR": "10.100.0.0/16",
            "ipvs": {"scheduler": "lc"},
            "conntrack": {"maxPerCore": 0}
        },
        "config": {"lbAlgorithm": "maglev"},
        "dns": {"autopath": false, "upstream": ["10.0.0.53:53"]},
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
        "dashboards": {"enabled": false},
        "extraArgs": ["--cluster-domain=example.internal"],
    });
    let d = docs(&render(&values, &[]));
    let kinds = typed(&d);
    assert!(kinds.iter().any(|k| k == "ServiceMonitor"), "{kinds:?}");
    assert!(
        !d.iter()
            .any(|o| o["metadata"]["name"] == "switchyard-dashboard")
    );

    let cfg = find(&d, "ConfigMap", "switchyard")["data"]["config.yaml"]
        .as_str()
        .unwrap();
    let parsed = Config::parse(cfg).unwrap();
    assert!(
        parsed.kube_proxy.is_some(),
        "the KubeProxyConfiguration document is read"
    );
    let settings = parsed.validate().unwrap();
    assert_eq!(settings.cluster_cidrs[0].to_string(), "10.100.0.0/16");
    assert_eq!(settings.ipvs_scheduler, "lc");
    assert_eq!(settings.interfaces, ["eth0"]);
    assert!(!settings.dns.autopath);

    // Without autopath the RBAC has no pods rule.
    let role = find(&d, "ClusterRole", "switchyard");
    assert!(
        !role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == json!(["pods"]))
    );
    let ds = find(&d, "DaemonSet", "switchyard");
    let c = container(ds, "switchyard");
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--backend=ipvs"))
    );
    assert!(
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .contains(&json!("SYS_RESOURCE"))
    );
    let init = container(ds, "cleanup");
    assert_eq!(init["args"], json!(["cleanup", "--kube-proxy"]));

    let svc = find(&d, "Service", "switchyard-metrics");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let sm = find(&d, "ServiceMonitor", "switchyard");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["metadata"]["labels"]
            .as_object()
            .map(|l| json!({"k8s-app": l["k8s-app"]}))
            .unwrap()
    );
}

#[test]
fn cleanup_mode_runs_switchyard_cleanup_on_every_node_and_then_idles() {
    let d = docs(&render(&json!({"cleanup": {"enabled": true}}), &[]));
    typed(&d);
    let ds = find(&d, "DaemonSet", "switchyard");
    let init = container(ds, "cleanup");
    assert_eq!(
        init["args"],
        json!(["cleanup", "--config", "/etc/switchyard/config.yaml"])
    );
    assert_eq!(
        container(ds, "cleaned")["command"],
        json!(["sleep", "infinity"])
    );
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert!(!containers.iter().any(|c| c["name"] == "switchyard"));
}

#[test]
fn the_dashboard_configmap_carries_the_charts_dashboard() {
    let text = std::fs::read_to_string(repo().join("deploy/switchyard.yaml")).unwrap();
    let d = docs(&text);
    let cm = find(&d, "ConfigMap", "switchyard-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/helm/switchyard/dashboards/switchyard.json"))
            .unwrap(),
    )
    .unwrap();
    let rendered: Value =
        serde_json::from_str(cm["data"]["switchyard.json"].as_str().unwrap()).unwrap();
    assert_eq!(rendered, shipped);
}
