use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: YAML: {source}")]
    Yaml {
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("config: field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("manifest directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] switchyard_model::ModelError),
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("Kubernetes client: {source}")]
    Kube {
        #[source]
        source: kube::Error,
    },
    #[error("Kubernetes client configuration: {source}")]
    KubeConfig {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("--source {value:?}: want `kube` or `manifests:DIR`")]
    BadSource { value: String },
    #[error("the node name is required for --source kube: pass --node-name or set NODE_NAME")]
    NoNodeName,
}

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("backend {backend} is not available: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("backend {backend}: programming service {service}: {reason}")]
    Program {
        backend: &'static str,
        service: String,
        reason: String,
    },
    #[error("backend {backend}: attaching to interfaces failed: {interfaces}")]
    Attach {
        backend: &'static str,
        interfaces: String,
    },
    #[error("backend iptables: {source}")]
    Iptables {
        #[source]
        source: crate::dataplane::iptables::runner::RunError,
    },
    #[error("stale UDP conntrack cleanup (retried by the next sync): {source}")]
    Conntrack {
        #[from]
        source: crate::conntrack::ConntrackError,
    },
    #[error("stale UDP flows of the tc path (retried by the next sync): {source}")]
    Flows {
        #[from]
        source: crate::dataplane::ebpf::ct::FlowError,
    },
    #[error("backend {backend}: injected fault on call {call}")]
    Injected { backend: &'static str, call: usize },
}
