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
    #[error("{}", bad_object(object.as_deref(), *kept, source))]
    BadObject {
        object: Option<Box<switchyard_model::manifest::ObjectId>>,
        /// Whether an earlier good version of the object stays in force.
        kept: bool,
        #[source]
        source: Box<switchyard_model::ModelError>,
    },
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
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--master {value:?} is not a URL (want e.g. https://10.0.0.1:6443)")]
    Master {
        value: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(
        "in-cluster configuration (KUBERNETES_SERVICE_HOST/PORT and the service account token); \
         without kube-proxy the `kubernetes` Service IP is not routed: set --master, --kubeconfig \
         or KUBERNETES_SERVICE_HOST to the API server's own address"
    )]
    InCluster {
        #[source]
        source: kube::config::InClusterError,
    },
    #[error("--source {value:?}: want `kube` or `manifests:DIR`")]
    BadSource { value: String },
    #[error("the node name is required for --source kube: pass --node-name or set NODE_NAME")]
    NoNodeName,
}

/// An error with its sources, for log lines that must say what the kernel answered (the
/// variants' own messages leave their sources to the chain, as `{:#}` prints it).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("backend {backend} needs {what}")]
    NeedsPrivilege {
        backend: &'static str,
        what: &'static str,
    },
    #[error("backend {backend} is not available: {tool} is missing or not permitted")]
    ToolMissing { backend: &'static str, tool: String },
    #[error("backend ebpf: no cgroup2 mount found: mount one or pass --cgroup-path")]
    NoCgroup2,
    #[error(
        "backend ebpf: tcAttachMode: tcx needs Linux 6.6 or newer, this kernel is {kernel}; use tcAttachMode: auto or netlink"
    )]
    NoTcx { kernel: String },
    #[error(
        "backend ipvs is not available: the kernel has no IPVS support (the IPVS generic-netlink family is missing); it needs CONFIG_IP_VS (module ip_vs)"
    )]
    NoIpvs {
        #[source]
        source: std::io::Error,
    },
    #[error("backend ipvs: {what}")]
    Ipvs {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("backend {backend}: missing capabilities: {missing}")]
    MissingCapabilities {
        backend: &'static str,
        missing: String,
    },
    #[error("removing kube-proxy's state: {what}")]
    KubeProxyCleanup { what: String },
    #[error(
        "backend auto: neither eBPF ({}) nor iptables ({}) can run here",
        chain(.ebpf.as_ref()),
        chain(.iptables.as_ref())
    )]
    NoBackend {
        ebpf: Box<DataplaneError>,
        iptables: Box<DataplaneError>,
    },
    #[error("backend {backend}: starting the {what} thread")]
    Thread {
        backend: &'static str,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("backend {backend}: {action} {}", path.display())]
    Filesystem {
        backend: &'static str,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "backend ebpf: loading the kernel object (pinned maps of an incompatible version? run `switchyard cleanup`)"
    )]
    LoadObject {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "backend ebpf: map {map} already holds {entries} entries but {setting} now sizes it for {to}: set {setting} to at least {needed} (the pinned maps were left as they were)"
    )]
    MapTooSmall {
        map: &'static str,
        setting: &'static str,
        entries: usize,
        to: u32,
        needed: u64,
    },
    #[error(
        "backend ebpf: map {map} would need {entries} entries, past the kernel's limit of {limit} for a hash map: {setting} can be at most {max_setting}"
    )]
    MapTooLarge {
        map: &'static str,
        setting: &'static str,
        entries: u32,
        limit: u64,
        max_setting: u64,
    },
    #[error(
        "backend ebpf: map {map} preallocates {need_mib} MiB of kernel memory ({entries} entries x {cpus} CPUs), but this memory cgroup ({cgroup}) has {free_mib} MiB left under memory.max: lower {setting} or raise the memory limit"
    )]
    MapMemory {
        map: &'static str,
        setting: &'static str,
        entries: u32,
        cpus: usize,
        need_mib: u64,
        free_mib: u64,
        cgroup: String,
    },
    #[error("backend ebpf: program {program} is missing from the kernel object")]
    MissingProgram { program: &'static str },
    #[error("backend ebpf: program {program}: {step} {target}")]
    Program {
        program: &'static str,
        step: &'static str,
        target: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("backend ebpf: link of {program}")]
    Link {
        program: String,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("backend ebpf: pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("backend ebpf: service maps")]
    Map {
        #[from]
        source: crate::dataplane::ebpf::io::MapError,
    },
    #[error("backend {backend}: attaching to interfaces failed: {}", failed.join("; "))]
    Attach {
        backend: &'static str,
        failed: Vec<String>,
    },
    #[error("backend iptables")]
    Iptables {
        #[source]
        source: crate::dataplane::iptables::runner::RunError,
    },
    #[error("stale UDP conntrack cleanup (retried by the next sync)")]
    Conntrack {
        #[from]
        source: crate::conntrack::ConntrackError,
    },
    #[error("stale UDP flows of the tc path (retried by the next sync)")]
    Flows {
        #[from]
        source: crate::dataplane::ebpf::ct::FlowError,
    },
    #[error("backend {backend}: injected fault on call {call}")]
    Injected { backend: &'static str, call: usize },
}

/// A bad manifest document's message: the error, the object it names (when the error does
/// not already) and what happens to it.
fn bad_object(
    object: Option<&switchyard_model::manifest::ObjectId>,
    kept: bool,
    source: &switchyard_model::ModelError,
) -> String {
    let msg = source.to_string();
    let outcome = match (kept, object.is_some()) {
        (true, true) => "its last good version stays in force",
        (true, false) => "the file's earlier objects missing from it stay in force",
        (false, _) => "not loaded",
    };
    match object.map(ToString::to_string) {
        Some(o) if !msg.contains(&o) => format!("{msg} ({o}: {outcome})"),
        _ => format!("{msg} ({outcome})"),
    }
}
