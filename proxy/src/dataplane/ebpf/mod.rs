//! The eBPF backend: loads the kernel programs with their maps pinned under the pin directory,
//! attaches them (`attach`: the socket-LB programs to a cgroup v2, the tc program to the
//! node's interfaces, links pinned too, so a restart keeps everything working and replaces
//! programs atomically), and programs the maps through the reconciler in `writer`. `host`
//! prepares bpffs and finds cgroup2; `ports` reserves the NodePort range; `ct` sweeps the
//! tc path's stale UDP flows.

pub mod attach;
pub mod ct;
pub mod host;
pub mod inspect;
pub mod io;
pub mod maglev;
pub mod ports;
pub mod render;
pub mod socks;
pub mod stats;
pub mod writer;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use switchyard_ebpf_common::maps as m;
use switchyard_ebpf_common::{Ct4Value, Ct6Value};
use switchyard_model::{ChangeSet, DesiredState};

pub use self::attach::glob;
pub use self::host::{cgroup2_root, cleanup_pins};
use self::io::AyaMaps;
pub use self::ports::{reserve_ports, unreserve_ports, with_reserved, without_reserved};
use self::render::RenderConfig;
use self::writer::{Capacity, Globals, Report, Writer};
use super::Dataplane;
use crate::error::DataplaneError;
use crate::metrics::Metrics;

/// The kernel object built by proxy/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/switchyard";

#[derive(Debug, Clone)]
pub struct EbpfConfig {
    pub pin_dir: PathBuf,
    /// The NodePort range to keep out of the node's ephemeral ports.
    pub reserve_ports: Option<(u16, u16)>,
    pub cgroup_path: PathBuf,
    /// Interface name patterns (`*` wildcard) for the tc program; empty = all but loopback.
    pub interfaces: Vec<String>,
    /// How the tc program is attached (`auto`: TCX where the kernel has it).
    pub tc_attach: crate::config::TcAttachMode,
    /// Export per-service-port counters on `/metrics`.
    pub service_counters: bool,
    pub capacity: Capacity,
    pub render: RenderConfig,
    pub globals: Globals,
}

pub struct EbpfDataplane {
    ebpf: aya::Ebpf,
    writer: Writer<AyaMaps>,
    cfg: EbpfConfig,
    attached: BTreeSet<String>,
    tc_mode: attach::TcMode,
    metrics: Arc<Metrics>,
    counters: Option<stats::ServiceCounters>,
    /// The pinned maps (file name under `pin_dir`, kernel id), to put back a pin someone
    /// removed: without it a restart would start from empty maps and break every flow.
    map_pins: Vec<(String, u32)>,
    /// The search of pods' network namespaces for stale sockets, when one runs: it takes a
    /// few milliseconds per namespace, so it runs beside the sync loop, not in it.
    pod_sockets: Option<std::thread::JoinHandle<socks::Destroyed>>,
}

impl std::fmt::Debug for EbpfDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDataplane")
            .field("pin_dir", &self.cfg.pin_dir)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// Load the kernel object with its maps pinned under `pin_dir` and take the service maps,
/// without attaching any program (benchmarks and tools).
pub fn load_maps(
    pin_dir: &Path,
    capacity: &Capacity,
) -> Result<(aya::Ebpf, AyaMaps), DataplaneError> {
    host::ensure_bpffs(pin_dir)?;
    host::create_dir(pin_dir)?;
    let mut ebpf =
        loader(pin_dir, capacity)
            .load(OBJECT)
            .map_err(|source| DataplaneError::LoadObject {
                source: Box::new(source),
            })?;
    let maps = AyaMaps::take(&mut ebpf)?;
    Ok((ebpf, maps))
}

fn loader<'a>(pin_dir: &'a Path, capacity: &Capacity) -> aya::EbpfLoader<'a> {
    let services = capacity.services;
    let mut l = aya::EbpfLoader::new();
    l.default_map_pin_directory(pin_dir)
        .map_max_entries(m::FRONTENDS4, services.saturating_mul(8))
        .map_max_entries(m::FRONTENDS6, services.saturating_mul(8))
        .map_max_entries(m::SETS, services.saturating_mul(3))
        .map_max_entries(m::SLOTS, capacity.slots)
        .map_max_entries(m::BACKENDS, capacity.backends)
        .map_max_entries(m::COUNTERS, services);
    l
}

/// Every map pinned under `pin_dir`: its file name and kernel id.
fn pinned_maps(pin_dir: &Path) -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("SY_"))
        .filter_map(|e| {
            let info = aya::maps::MapInfo::from_pin(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), info.id()))
        })
        .collect()
}

impl EbpfDataplane {
    /// Pin again every map whose pin someone removed (the programs still use the map; only
    /// the next start would lose it).
    fn repin_maps(&mut self) {
        for (name, id) in &self.map_pins {
            let path = self.cfg.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            let restored = aya::maps::MapData::from_id(*id)
                .map_err(|e| e.to_string())
                .and_then(|m| m.pin(&path).map_err(|e| e.to_string()));
            match restored {
                Ok(()) => {
                    tracing::warn!(map = %name, path = %path.display(), "map pin was removed; pinned it again");
                    self.metrics.pins_restored.inc();
                }
                Err(e) => {
                    tracing::error!(map = %name, path = %path.display(), error = %e, "map pin was removed and cannot be restored: a restart would start from an empty map");
                }
            }
        }
    }

    /// Load the programs (reusing pinned maps), attach them, and take over the maps.
    pub fn start(cfg: EbpfConfig, metrics: Arc<Metrics>) -> Result<EbpfDataplane, DataplaneError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(DataplaneError::NeedsPrivilege {
                backend: "ebpf",
                what: "root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)",
            });
        }
        let missing = crate::caps::missing(&[
            crate::caps::NET_ADMIN,
            crate::caps::BPF,
            crate::caps::PERFMON,
        ]);
        if !missing.is_empty() {
            return Err(DataplaneError::MissingCapabilities {
                backend: "ebpf",
                missing: crate::caps::describe(&missing),
            });
        }
        host::ensure_bpffs(&cfg.pin_dir)?;
        host::create_dir(&cfg.pin_dir.join("links"))?;
        let mut ebpf = loader(&cfg.pin_dir, &cfg.capacity)
            .load(OBJECT)
            .map_err(|source| DataplaneError::LoadObject {
                source: Box::new(source),
            })?;
        let maps = AyaMaps::take(&mut ebpf)?;
        let writer = Writer::new(
            maps,
            cfg.render.clone(),
            cfg.capacity.clone(),
            cfg.globals.clone(),
        );
        let counters = cfg.service_counters.then(|| {
            let c = stats::ServiceCounters::new(cfg.pin_dir.clone());
            metrics.register_collector(Box::new(c.clone()));
            c
        });
        let (tc_mode, reason) = attach::TcMode::resolve(cfg.tc_attach)?;
        tracing::info!(mode = tc_mode.name(), reason = %reason, "tc attach mode");
        metrics
            .tc_attach_mode
            .get_or_create(&crate::metrics::ModeLabel {
                mode: tc_mode.name().into(),
                reason,
            })
            .set(1);
        let map_pins = pinned_maps(&cfg.pin_dir);
        let mut dp = EbpfDataplane {
            ebpf,
            writer,
            cfg,
            attached: BTreeSet::new(),
            tc_mode,
            metrics,
            counters,
            map_pins,
            pod_sockets: None,
        };
        dp.attach_cgroup()?;
        dp.load_tc()?;
        if let Some(range) = dp.cfg.reserve_ports {
            match ports::reserve_ports(range, &dp.cfg.pin_dir) {
                Ok(true) => tracing::info!(
                    range = %format!("{}-{}", range.0, range.1),
                    "NodePort range reserved from ephemeral ports (net.ipv4.ip_local_reserved_ports)"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot reserve the NodePort range from ephemeral ports"
                    );
                }
            }
        }
        Ok(dp)
    }

    /// Delete the tc path's flows whose endpoint is gone (see `ct`), in both families'
    /// flow maps. A failure fails the sync, so it is retried (the service maps are right
    /// meanwhile).
    fn clear_stale_flows(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let endpoints = ct::live_endpoints(self.writer.ports(), state);
        let started = std::time::Instant::now();
        let v4 = ct::sweep_map::<Ct4Value>(&mut self.ebpf, m::CT4, &endpoints)?;
        let v6 = ct::sweep_map::<Ct6Value>(&mut self.ebpf, m::CT6, &endpoints)?;
        self.metrics
            .conntrack_duration
            .observe(started.elapsed().as_secs_f64());
        if v4 + v6 > 0 {
            tracing::info!(
                flows = v4 + v6,
                "deleted flows to removed endpoints from the tc flow maps"
            );
            self.metrics.conntrack_deleted(false, v4);
            self.metrics.conntrack_deleted(true, v6);
        }
        self.destroy_stale_sockets(&endpoints);
        Ok(())
    }

    /// Destroy the node's sockets the socket LB translated to an endpoint that is gone (see
    /// `socks`). A failure is logged and counted, never fails the sync: the maps are right,
    /// and the next sync tries again.
    fn destroy_stale_sockets(&mut self, endpoints: &ct::LiveEndpoints) {
        self.collect_pod_search();
        let translated = match socks::translated(&mut self.ebpf) {
            Ok(t) => t,
            Err(e) => {
                self.metrics.socket_destroy_errors.inc();
                tracing::warn!(error = %e, "reading the socket LB's translations");
                return;
            }
        };
        let fronts = socks::frontends(self.writer.ports());
        // Sockets of the cluster DNS Service redirected to the node-local resolver.
        let local: Vec<ct::Endpoint> = io::open_dns_redirect(&self.cfg.pin_dir)
            .ok()
            .and_then(|m| m.get(&0, 0).ok())
            .filter(|r| r.addr4 != 0)
            .map(|r| ([r.addr4, 0, 0, 0], r.port))
            .into_iter()
            .collect();
        let stale = socks::stale(translated, &fronts, endpoints, &local);
        if stale.is_empty() {
            return;
        }
        match socks::destroy_here(&stale) {
            Ok((done, found)) => {
                if !done.is_empty() {
                    tracing::info!(
                        sockets = done.len(),
                        "destroyed node sockets connected to removed endpoints; their applications reconnect"
                    );
                    self.metrics.sockets_destroyed.inc_by(done.len() as u64);
                    socks::forget(&mut self.ebpf, &done);
                }
                let rest: HashMap<u64, socks::Translated> = stale
                    .into_iter()
                    .filter(|(c, _)| !found.contains(c))
                    .collect();
                if !rest.is_empty() && self.pod_sockets.is_none() {
                    self.search_pods(rest);
                }
            }
            Err(e) => {
                self.metrics.socket_destroy_errors.inc();
                tracing::warn!(error = %e, "destroying sockets connected to removed endpoints (kernel without CONFIG_INET_DIAG_DESTROY?); they keep their endpoint until the application reconnects");
            }
        }
    }

    /// Look for the remaining stale sockets in the pods' network namespaces, on a thread of
    /// its own; a later sync forgets what it destroyed or found closed.
    fn search_pods(&mut self, rest: HashMap<u64, socks::Translated>) {
        let metrics = Arc::clone(&self.metrics);
        let spawned = std::thread::Builder::new()
            .name("sy-pod-sockets".into())
            .spawn(move || {
                let began = std::time::Instant::now();
                let d = socks::destroy_elsewhere(&rest);
                if !d.done.is_empty() {
                    tracing::info!(
                        sockets = d.done.len(),
                        namespaces = d.searched,
                        took_ms = began.elapsed().as_millis(),
                        "destroyed pods' sockets connected to removed endpoints; their applications reconnect"
                    );
                    metrics.sockets_destroyed.inc_by(d.done.len() as u64);
                }
                for e in &d.errors {
                    metrics.socket_destroy_errors.inc();
                    tracing::warn!(netns = %e, "cannot destroy sockets connected to removed endpoints in this network namespace (entering one takes CAP_SYS_ADMIN and the host's /run/netns); its sockets keep their endpoint until the application reconnects");
                }
                d
            });
        match spawned {
            Ok(h) => self.pod_sockets = Some(h),
            Err(e) => {
                self.metrics.socket_destroy_errors.inc();
                tracing::warn!(error = %e, "cannot start the search of pods' namespaces for stale sockets");
            }
        }
    }

    /// Forget the reverse translations of what a finished pod search destroyed or found
    /// closed.
    fn collect_pod_search(&mut self) {
        if !self
            .pod_sockets
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            return;
        }
        if let Some(Ok(d)) = self.pod_sockets.take().map(std::thread::JoinHandle::join) {
            socks::forget(&mut self.ebpf, &[d.done, d.gone].concat());
        }
    }

    fn report(&self, r: &Report) {
        for e in &r.capacity_errors {
            self.metrics.dataplane_capacity_errors.inc();
            tracing::error!(service_port = %e.service_port, reason = %e.reason, "service not programmed");
        }
        for (map, used, max) in self.writer.fill() {
            let label = crate::metrics::MapLabel { map: map.into() };
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.metrics.map_entries.get_or_create(&label).set(n(used));
            self.metrics.map_capacity.get_or_create(&label).set(n(max));
        }
        if let Some(c) = &self.counters {
            c.set_ports(
                self.writer
                    .ports()
                    .map(|(k, p)| (p.service_id, stats::ServicePortLabels::of(k)))
                    .collect(),
            );
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.apply(changes, state)?;
        self.report(&r);
        if ct::may_strand_flows(changes) {
            self.clear_stale_flows(state)?;
        }
        Ok(())
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.full_sync(state)?;
        self.report(&r);
        self.clear_stale_flows(state)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        if let Err(e) = unreserve_ports(&self.cfg.pin_dir) {
            tracing::warn!(error = %e, "releasing the reserved NodePort range");
        }
        attach::detach_netlink_everywhere();
        cleanup_pins(&self.cfg.pin_dir)
    }

    fn sync_links(&mut self, links: &[String], verify: bool) -> Result<(), DataplaneError> {
        let cgroup = if verify {
            self.repin_maps();
            self.verify_cgroup_links()
        } else {
            Ok(())
        };
        self.sync_tc_links(links, verify)?;
        cgroup
    }

    fn dns_redirector(&self) -> Option<Box<dyn super::DnsRedirector>> {
        match DnsRedirectMap::open(&self.cfg.pin_dir) {
            Ok(m) => Some(Box::new(m)),
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "cluster DNS interception unavailable");
                None
            }
        }
    }
}

/// The resolver's heartbeat in `SY_DNS_REDIRECT` (its own pinned map: the sync loop's
/// writer never touches it).
pub struct DnsRedirectMap {
    map: io::DnsRedirectArray,
}

impl std::fmt::Debug for DnsRedirectMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsRedirectMap").finish_non_exhaustive()
    }
}

impl DnsRedirectMap {
    pub fn open(pin_dir: &Path) -> Result<DnsRedirectMap, DataplaneError> {
        Ok(DnsRedirectMap {
            map: io::open_dns_redirect(pin_dir)?,
        })
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or_default() * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or_default()
        })
        .unwrap_or_default()
}

impl super::DnsRedirector for DnsRedirectMap {
    fn set(&mut self, on: Option<&super::Redirect>) -> Result<(), DataplaneError> {
        let target = on.map(|r| r.target);
        let v = switchyard_ebpf_common::DnsRedirect {
            heartbeat_ns: monotonic_ns(),
            addr4: target.map_or(0, |t| u32::from_ne_bytes(t.ip().octets())),
            port: target.map_or(0, |t| t.port().to_be()),
            enabled: u8::from(target.is_some()),
            pad: 0,
        };
        Ok(io::write_dns_redirect(&mut self.map, v)?)
    }
}
