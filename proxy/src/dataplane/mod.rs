//! The `Dataplane` trait every backend implements, plus the `none` backend, a recording fake
//! and a fault-injecting wrapper used in tests.

pub mod ebpf;
pub mod iptables;
pub mod ipvs;
pub mod kube_proxy;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_model::{ChangeSet, DesiredState};

use crate::config::LbAlgorithm;
use crate::error::{DataplaneError, chain};

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
    /// The slow, read-only half of a periodic full sync, to run without holding the
    /// backend so changes keep landing meanwhile (eBPF: reading every map entry back takes
    /// seconds at 100k services); its result goes to `full_sync_prepared`. `None`: this
    /// backend has no such half (`full_sync` does it all).
    fn full_sync_reader(&mut self) -> Option<FullSyncReader> {
        None
    }
    /// When the reader is done: a second step that compares what it read with what is
    /// programmed, also without holding the backend (eBPF: a periodic full sync that finds
    /// the maps as programmed then holds the backend only to program `changes`, instead of
    /// re-rendering every port under it). It gets what the reader returned (handed back
    /// when there is no such step) and returns what goes to `full_sync_prepared`.
    fn full_sync_check(&mut self, prepared: Prepared) -> Result<FullSyncReader, Prepared> {
        Err(prepared)
    }
    /// A full sync from what `full_sync_reader`'s reader (or `full_sync_check`'s check)
    /// returned. `changes` are the state's changes since the last sync, for a backend that
    /// found nothing else to do.
    fn full_sync_prepared(
        &mut self,
        state: &DesiredState,
        _changes: &ChangeSet,
        _prepared: Prepared,
    ) -> Result<(), DataplaneError> {
        self.full_sync(state)
    }
    /// A small `apply` takes microseconds (map writes, no process to run), so the sync
    /// loop runs it on its own task instead of handing it to a blocking thread and back:
    /// each hand-off is a thread wake-up, which on a busy node is what a change's tail
    /// latency is made of.
    fn applies_inline(&self) -> bool {
        false
    }
    /// What this backend could not program for lack of capacity right now (for `/healthz`);
    /// `None` when everything fits.
    fn capacity_problem(&self) -> Option<String> {
        None
    }
    /// The node's network interfaces are now `links` (names). Backends with per-interface
    /// programs attach to new ones; with `verify` (full syncs) they also check that every
    /// interface that should carry a program still does and re-attach where it does not.
    fn sync_links(&mut self, _links: &[String], _verify: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// A handle that sends the cluster DNS Service to the node-local resolver while it is
    /// alive (`dns.interceptClusterDNS`); `None` when this backend cannot intercept.
    fn dns_redirector(&self) -> Option<Box<dyn DnsRedirector>> {
        None
    }
}

/// Reads the kernel state for a full sync, off the sync loop's lock.
pub type FullSyncReader = Box<dyn FnOnce() -> Result<Prepared, DataplaneError> + Send>;

/// What a `FullSyncReader` read, for the backend that made it.
pub struct Prepared(pub Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared")
    }
}

/// Where intercepted cluster DNS goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The node-local resolver's address (eBPF: the socket LB rewrites to it).
    pub target: std::net::SocketAddrV4,
    /// The Service's IPv4 ClusterIPs (iptables: the resolver listens on them, NOTRACK'd).
    pub service_ips: Vec<std::net::Ipv4Addr>,
}

/// Turns cluster DNS interception on or off. The eBPF backend writes a heartbeat the kernel
/// checks, so interception also ends within a second of the daemon dying; call it every
/// `HEARTBEAT`.
pub trait DnsRedirector: Send {
    fn set(&mut self, on: Option<&Redirect>) -> Result<(), DataplaneError>;
    /// The resolver must also listen on the Service's ClusterIP:53 (NodeLocal DNSCache's
    /// shape, for backends that cannot rewrite addresses).
    fn listens_on_service_ip(&self) -> bool {
        false
    }
}

/// How often the resolver's liveness is written (the kernel's limit is 1 s).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);

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
    Links {
        links: Vec<String>,
        verify: bool,
    },
    Cleanup,
}

/// Records every call, for tests of the sync loop.
#[derive(Debug, Clone, Default)]
pub struct RecordingDataplane {
    pub calls: Arc<Mutex<Vec<(Instant, Call)>>>,
    pushed: Arc<tokio::sync::Notify>,
    /// What `applies_inline` answers (the sync loop's two ways of running an apply).
    pub inline: bool,
}

impl RecordingDataplane {
    /// A recorder whose `applies_inline` answers `inline`.
    pub fn applying_inline(inline: bool) -> Self {
        RecordingDataplane {
            inline,
            ..RecordingDataplane::default()
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.timed_calls().into_iter().map(|(_, c)| c).collect()
    }

    /// The calls with the time each was made.
    pub fn timed_calls(&self) -> Vec<(Instant, Call)> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Wait until the calls so far satisfy `done` (true), or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Call]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pushed = self.pushed.notified();
            tokio::pin!(pushed);
            pushed.as_mut().enable();
            if done(&self.calls()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, pushed).await.is_err() {
                return done(&self.calls());
            }
        }
    }

    fn push(&self, c: Call) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((Instant::now(), c));
        self.pushed.notify_waiters();
    }
}

impl Dataplane for RecordingDataplane {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn applies_inline(&self) -> bool {
        self.inline
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
    fn sync_links(&mut self, links: &[String], verify: bool) -> Result<(), DataplaneError> {
        self.push(Call::Links {
            links: links.to_vec(),
            verify,
        });
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
    fn applies_inline(&self) -> bool {
        self.inner.applies_inline()
    }
    fn sync_links(&mut self, links: &[String], verify: bool) -> Result<(), DataplaneError> {
        self.inner.sync_links(links, verify)
    }
}

/// Fails every `apply` and `full_sync`: a backend that can never program (the kernel refuses,
/// a capability is missing). Consumers of the store other than the dataplane must not care.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrokenDataplane;

impl Dataplane for BrokenDataplane {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn apply(&mut self, _: &ChangeSet, _: &DesiredState) -> Result<(), DataplaneError> {
        Err(DataplaneError::Injected {
            backend: "broken",
            call: 0,
        })
    }
    fn full_sync(&mut self, _: &DesiredState) -> Result<(), DataplaneError> {
        Err(DataplaneError::Injected {
            backend: "broken",
            call: 0,
        })
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
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
        let s = &self.settings;
        let cgroup_path = match &s.cgroup_path {
            Some(p) => p.clone(),
            None => ebpf::cgroup2_root().ok_or(DataplaneError::NoCgroup2)?,
        };
        let table = s.maglev_table_size;
        let v4 = s.cluster_cidrs.iter().filter_map(|c| match c {
            ipnet::IpNet::V4(n) => Some((ebpf::render::addr4(n.network()), n.prefix_len())),
            ipnet::IpNet::V6(_) => None,
        });
        let v6 = s.cluster_cidrs.iter().filter_map(|c| match c {
            ipnet::IpNet::V6(n) => Some((ebpf::render::addr6(n.network()), n.prefix_len())),
            ipnet::IpNet::V4(_) => None,
        });
        Ok(ebpf::EbpfConfig {
            pin_dir: s.bpf_pin_dir.clone(),
            reserve_ports: s.node_port_range,
            cgroup_path,
            interfaces: s.interfaces.clone(),
            tc_attach: s.tc_attach_mode,
            service_counters: s.service_counters,
            capacity: ebpf::writer::Capacity {
                services: s.max_services,
                backends: s.max_backends,
                slots: s.max_backends.max(table.saturating_mul(4)),
            },
            render: ebpf::render::RenderConfig {
                maglev_default: s.lb_algorithm == LbAlgorithm::Maglev,
                maglev_table_size: table,
                dns_intercept: s.dns.intercept_service().cloned(),
            },
            globals: ebpf::writer::Globals {
                masquerade_all: s.masquerade_all,
                cluster_cidrs4: v4.collect(),
                cluster_cidrs6: v6.collect(),
            },
        })
    }
}

fn start_ebpf(ctx: &BackendContext) -> Result<Box<dyn Dataplane>, DataplaneError> {
    let cfg = ctx.ebpf_config()?;
    let dp = ebpf::EbpfDataplane::start(cfg, Arc::clone(&ctx.metrics))?;
    leave_ipvs();
    // Switching from iptables: its rules would otherwise still catch service traffic.
    if let Err(e) = iptables::cleanup_all() {
        tracing::warn!(error = %chain(&e), "removing the iptables backend's rules");
    }
    Ok(Box::new(dp))
}

fn start_iptables(ctx: &BackendContext) -> Result<(Box<dyn Dataplane>, String), DataplaneError> {
    let (flavor, why) = iptables::detect(ctx.settings.iptables_mode)?;
    let s = &ctx.settings;
    // IPVS's cleanup removes our chains too: before the iptables backend writes its own.
    leave_ipvs();
    let dp = iptables::IptablesBackend::start(
        &iptables::IptablesConfig {
            flavor,
            cluster_cidrs: s.cluster_cidrs.clone(),
            masquerade_all: s.masquerade_all,
            masquerade_bit: s.masquerade_bit,
        },
        Arc::clone(&ctx.metrics),
    )?;
    let families: Vec<String> = dp
        .families()
        .map(|f| format!("{:?}", f.config().family))
        .collect();
    // Switching from eBPF: detach its programs and drop its pinned maps.
    if let Err(e) = ebpf::unreserve_ports(&s.bpf_pin_dir) {
        tracing::warn!(error = %chain(&e), "releasing the eBPF backend's reserved NodePort range");
    }
    if let Err(e) = ebpf::cleanup_pins(&s.bpf_pin_dir) {
        tracing::warn!(error = %chain(&e), "removing the eBPF backend's pins");
    }
    // Netlink tc filters are not pinned: they go one by one.
    ebpf::attach::detach_netlink_everywhere();
    // And the other iptables flavor's rules, if the node moved between them.
    let other = if flavor == iptables::Flavor::Legacy {
        iptables::Flavor::Nft
    } else {
        iptables::Flavor::Legacy
    };
    if let Err(e) = iptables::cleanup_flavor(other) {
        tracing::warn!(error = %chain(&e), "removing the other iptables flavor's rules");
    }
    Ok((
        Box::new(dp),
        format!("{} ({why}; {})", flavor.name(), families.join("+")),
    ))
}

fn start_ipvs(ctx: &BackendContext) -> Result<(Box<dyn Dataplane>, String), DataplaneError> {
    let s = &ctx.settings;
    // Nothing of another backend is touched on a node that cannot run this one.
    ipvs::ensure_family()?;
    let (flavor, why) = iptables::detect(s.iptables_mode)?;
    // Switching from another backend: the iptables backend's chains share our names and are
    // rewritten by the first sync; eBPF's programs would translate first.
    if let Err(e) = ebpf::unreserve_ports(&s.bpf_pin_dir) {
        tracing::warn!(error = %chain(&e), "releasing the eBPF backend's reserved NodePort range");
    }
    if let Err(e) = ebpf::cleanup_pins(&s.bpf_pin_dir) {
        tracing::warn!(error = %chain(&e), "removing the eBPF backend's pins");
    }
    ebpf::attach::detach_netlink_everywhere();
    if let Err(e) = iptables::cleanup_all() {
        tracing::warn!(error = %chain(&e), "removing the iptables backend's rules");
    }
    let dp = ipvs::IpvsDataplane::start(
        ipvs::IpvsConfig {
            scheduler: s.ipvs_scheduler.clone(),
            flavor,
            cluster_cidrs: s.cluster_cidrs.clone(),
            masquerade_all: s.masquerade_all,
            masquerade_bit: s.masquerade_bit,
            timeouts: s.ipvs_timeouts,
        },
        Arc::clone(&ctx.metrics),
    )?;
    Ok((
        Box::new(dp),
        format!(
            "requested (scheduler {}; {} {why})",
            s.ipvs_scheduler,
            flavor.name()
        ),
    ))
}

/// Remove the IPVS backend's state when another backend takes over (its VIPs would stay
/// local addresses and its virtual services would catch the traffic).
fn leave_ipvs() {
    if std::path::Path::new("/sys/class/net")
        .join(ipvs::writer::LINK)
        .exists()
    {
        match ipvs::writer::cleanup() {
            Ok(lines) => {
                for l in lines {
                    tracing::info!("switching from ipvs: {l}");
                }
            }
            Err(e) => tracing::warn!(error = %chain(&e), "removing the IPVS backend's state"),
        }
    }
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
        BackendChoice::Ipvs => start_ipvs(ctx),
        BackendChoice::Auto => match start_ebpf(ctx) {
            Ok(dp) => Ok((dp, "auto: kernel and privileges allow eBPF".into())),
            Err(ebpf_err) => {
                let ebpf_why = chain(&ebpf_err);
                tracing::warn!(error = %ebpf_why, "eBPF backend unavailable; trying iptables");
                let (dp, why) = start_iptables(ctx).map_err(|e| DataplaneError::NoBackend {
                    ebpf: Box::new(ebpf_err),
                    iptables: Box::new(e),
                })?;
                Ok((dp, format!("auto: eBPF unavailable ({ebpf_why}); {why}")))
            }
        },
    }
}
