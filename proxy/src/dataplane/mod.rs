//! The `Dataplane` trait every backend implements, plus the `none` backend, a recording fake
//! and a fault-injecting wrapper used in tests.

pub mod ebpf;
pub mod iptables;
pub mod ipvs;

use std::sync::{Arc, Mutex};

use switchyard_model::{ChangeSet, DesiredState};

use crate::error::DataplaneError;

/// A backend that programs the desired state into the kernel.
///
/// `apply` gets only what changed (plus the whole new state, for backends that render in
/// full); `full_sync` makes the kernel match `state` exactly, repairing drift; `cleanup`
/// removes everything the backend ever created.
pub trait Dataplane: Send {
    fn name(&self) -> &'static str;
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError>;
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError>;
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
    /// The node's network interfaces now are `links` (names); backends with per-interface
    /// programs attach to new ones.
    fn links_changed(&mut self, _links: &[String]) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// Programs nothing: for DNS-only nodes and for dry runs.
#[derive(Debug, Default)]
pub struct NoneDataplane;

impl Dataplane for NoneDataplane {
    fn name(&self) -> &'static str {
        "none"
    }
    fn apply(&mut self, _: &ChangeSet, _: &DesiredState) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn full_sync(&mut self, _: &DesiredState) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// One call a dataplane received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Apply {
        changes: ChangeSet,
        state_len: usize,
    },
    FullSync {
        state: DesiredState,
    },
    Cleanup,
}

/// Records every call, for tests of the sync loop.
#[derive(Debug, Clone, Default)]
pub struct RecordingDataplane {
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingDataplane {
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn push(&self, c: Call) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
    }
}

impl Dataplane for RecordingDataplane {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        self.push(Call::Apply {
            changes: changes.clone(),
            state_len: state.len(),
        });
        Ok(())
    }
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        self.push(Call::FullSync {
            state: state.clone(),
        });
        Ok(())
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.push(Call::Cleanup);
        Ok(())
    }
}

/// Wraps a dataplane and fails the calls whose 1-based numbers are listed.
#[derive(Debug)]
pub struct FaultyDataplane<D> {
    pub inner: D,
    pub fail_calls: Vec<usize>,
    calls: usize,
}

impl<D> FaultyDataplane<D> {
    pub fn new(inner: D, fail_calls: Vec<usize>) -> Self {
        FaultyDataplane {
            inner,
            fail_calls,
            calls: 0,
        }
    }

    fn tick(&mut self) -> Result<(), DataplaneError> {
        self.calls += 1;
        if self.fail_calls.contains(&self.calls) {
            return Err(DataplaneError::Injected {
                backend: "faulty",
                call: self.calls,
            });
        }
        Ok(())
    }
}

impl<D: Dataplane> Dataplane for FaultyDataplane<D> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.apply(changes, state)
    }
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.full_sync(state)
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.cleanup()
    }
}

/// Which backend `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Ebpf,
    Iptables,
    Ipvs,
    None,
}

/// What a backend needs to start.
#[derive(Debug, Clone)]
pub struct BackendContext {
    pub settings: crate::config::Settings,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl BackendContext {
    pub fn ebpf_config(&self) -> Result<ebpf::EbpfConfig, DataplaneError> {
        let raw = &self.settings.raw;
        let cgroup_path = match &raw.cgroup_path {
            Some(p) => p.clone(),
            None => ebpf::cgroup2_root().ok_or_else(|| DataplaneError::Unavailable {
                backend: "ebpf",
                reason: "no cgroup2 mount found: mount one or pass --cgroup-path".into(),
            })?,
        };
        let table = raw.maglev_table_size;
        Ok(ebpf::EbpfConfig {
            pin_dir: raw.bpf_pin_dir.clone(),
            reserve_ports: self.settings.node_port_range,
            cgroup_path,
            interfaces: raw.interfaces.clone(),
            capacity: ebpf::writer::Capacity {
                services: raw.max_services,
                backends: raw.max_backends,
                slots: raw.max_backends.max(table.saturating_mul(4)),
            },
            render: ebpf::render::RenderConfig {
                maglev_default: raw.lb_algorithm == "maglev",
                maglev_table_size: table,
            },
            globals: ebpf::writer::Globals {
                masquerade_all: self.settings.masquerade_all,
                cluster_cidrs4: self
                    .settings
                    .cluster_cidrs
                    .iter()
                    .filter_map(|c| match c {
                        ipnet::IpNet::V4(n) => {
                            Some((ebpf::render::addr4(n.network()), n.prefix_len()))
                        }
                        ipnet::IpNet::V6(_) => None,
                    })
                    .collect(),
                cluster_cidrs6: self
                    .settings
                    .cluster_cidrs
                    .iter()
                    .filter_map(|c| match c {
                        ipnet::IpNet::V6(n) => {
                            Some((ebpf::render::addr6(n.network()), n.prefix_len()))
                        }
                        ipnet::IpNet::V4(_) => None,
                    })
                    .collect(),
            },
        })
    }
}

fn start_ebpf(ctx: &BackendContext) -> Result<Box<dyn Dataplane>, DataplaneError> {
    let cfg = ctx.ebpf_config()?;
    let dp = ebpf::EbpfDataplane::start(cfg, Arc::clone(&ctx.metrics))?;
    // Switching from iptables: its rules would otherwise still catch service traffic.
    if let Err(e) = iptables::cleanup_all() {
        tracing::warn!(error = %e, "removing the iptables backend's rules");
    }
    Ok(Box::new(dp))
}

fn start_iptables(ctx: &BackendContext) -> Result<(Box<dyn Dataplane>, String), DataplaneError> {
    let (flavor, why) = iptables::detect(&ctx.settings.raw.iptables_mode)?;
    let s = &ctx.settings;
    let dp = iptables::IptablesBackend::start(
        flavor,
        &s.cluster_cidrs,
        s.masquerade_all,
        s.masquerade_bit,
        Arc::clone(&ctx.metrics),
    )?;
    let families: Vec<String> = dp.families().map(|f| format!("{f:?}")).collect();
    // Switching from eBPF: detach its programs and drop its pinned maps.
    if let Err(e) = ebpf::unreserve_ports(&s.raw.bpf_pin_dir) {
        tracing::warn!(error = %e, "releasing the eBPF backend's reserved NodePort range");
    }
    if let Err(e) = ebpf::cleanup_pins(&s.raw.bpf_pin_dir) {
        tracing::warn!(error = %e, "removing the eBPF backend's pins");
    }
    // And the other iptables flavor's rules, if the node moved between them.
    let other = if flavor == iptables::Flavor::Legacy {
        iptables::Flavor::Nft
    } else {
        iptables::Flavor::Legacy
    };
    if let Err(e) = iptables::cleanup_flavor(other) {
        tracing::warn!(error = %e, "removing the other iptables flavor's rules");
    }
    Ok((
        Box::new(dp),
        format!("{} ({why}; {})", flavor.name(), families.join("+")),
    ))
}

/// Build the chosen backend, with the reason it was chosen.
pub fn select(
    choice: BackendChoice,
    ctx: &BackendContext,
) -> Result<(Box<dyn Dataplane>, String), DataplaneError> {
    match choice {
        BackendChoice::None => Ok((Box::new(NoneDataplane), "requested".into())),
        BackendChoice::Ebpf => Ok((start_ebpf(ctx)?, "requested".into())),
        BackendChoice::Iptables => start_iptables(ctx),
        BackendChoice::Ipvs => Err(ipvs::unavailable_reason()),
        BackendChoice::Auto => match start_ebpf(ctx) {
            Ok(dp) => Ok((dp, "auto: kernel and privileges allow eBPF".into())),
            Err(ebpf_err) => {
                tracing::warn!(error = %ebpf_err, "eBPF backend unavailable; trying iptables");
                let (dp, why) = start_iptables(ctx).map_err(|e| DataplaneError::Unavailable {
                    backend: "auto",
                    reason: format!("eBPF: {ebpf_err}; iptables: {e}"),
                })?;
                Ok((dp, format!("auto: eBPF unavailable ({ebpf_err}); {why}")))
            }
        },
    }
}
