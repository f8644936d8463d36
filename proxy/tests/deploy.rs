//! The shipped manifests are what the README says: the DaemonSet's configuration parses,
//! and the API server address comes from a value (not kubelet's Service-IP injection).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use switchyard::config::Config;

fn docs() -> Vec<Value> {
    let text = include_str!("../../deploy/daemonset.yaml");
    serde_saphyr::from_multiple(text).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} missing"))
}

#[test]
fn the_daemonset_config_parses_and_the_api_server_address_is_a_value() {
    let d = docs();
    let cm = find(&d, "ConfigMap", "switchyard");
    let cfg = cm["data"]["config.yaml"].as_str().unwrap();
    Config::parse(cfg).unwrap().validate().unwrap();

    let ds = find(&d, "DaemonSet", "switchyard");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
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
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(
            rule["verbs"],
            serde_json::json!(["list", "watch"]),
            "{rule}"
        );
    }
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == serde_json::json!(["pods"]))
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
}
