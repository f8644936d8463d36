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
pub mod janitor;
pub mod maglev;
pub mod ports;
pub mod render;
pub mod resize;
pub mod socks;
pub mod stats;
pub mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use switchyard_model::{ChangeSet, DesiredState};

pub use self::attach::glob;
pub use self::host::{cgroup2_root, cleanup_pins};
use self::io::AyaMaps;
pub use self::ports::{reserve_ports, unreserve_ports, with_reserved, without_reserved};
use self::render::RenderConfig;
use self::writer::{Capacity, Checked, Globals, Report, Writer};
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
    /// Clears flows and sockets stranded on removed endpoints, beside the sync loop.
    janitor: janitor::Janitor,
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
    let mut ebpf = load_sized(pin_dir, capacity, false)?;
    let maps = AyaMaps::take(&mut ebpf)?;
    Ok((ebpf, maps))
}

fn loader<'a>(pin_dir: &'a Path, sized: &[resize::SizedMap]) -> aya::EbpfLoader<'a> {
    let mut l = aya::EbpfLoader::new();
    l.default_map_pin_directory(pin_dir);
    for s in sized {
        l.map_max_entries(s.name, s.max_entries);
    }
    l
}

/// Load the kernel object with the maps sized for `capacity`: pins of another size are
/// replaced by maps of the configured size holding the same entries (`resize`).
fn load_sized(
    pin_dir: &Path,
    capacity: &Capacity,
    counters: bool,
) -> Result<aya::Ebpf, DataplaneError> {
    let sized = resize::sized_maps(capacity, counters);
    resize::check_limits(&sized)?;
    let moved = resize::set_aside(pin_dir, &sized)?;
    let ebpf = match loader(pin_dir, &sized).load(OBJECT) {
        Ok(e) => e,
        Err(source) => {
            resize::undo(&moved);
            return Err(DataplaneError::LoadObject {
                source: Box::new(source),
            });
        }
    };
    resize::carry_over(&moved)?;
    Ok(ebpf)
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
        let mut ebpf = load_sized(&cfg.pin_dir, &cfg.capacity, cfg.service_counters)?;
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
        let janitor = janitor::Janitor::start(&cfg.pin_dir, Arc::clone(&metrics)).map_err(|e| {
            DataplaneError::Thread {
                backend: "ebpf",
                what: "stale-flow janitor",
                source: e,
            }
        })?;
        let mut dp = EbpfDataplane {
            ebpf,
            writer,
            cfg,
            attached: BTreeSet::new(),
            tc_mode,
            metrics,
            counters,
            map_pins,
            janitor,
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

    /// Metrics after a sync; `changes`: the ports a partial sync touched (the per-port
    /// counters' labels follow only those), `None` after a full sync.
    fn report(&self, r: &Report, changes: Option<&ChangeSet>) {
        self.metrics
            .dataplane_capacity_errors
            .inc_by(r.capacity_errors.len() as u64);
        self.metrics
            .dataplane_unprogrammed
            .set(i64::try_from(self.writer.unprogrammed().len()).unwrap_or(i64::MAX));
        for (map, used, max) in self.writer.fill() {
            let label = crate::metrics::MapLabel { map: map.into() };
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.metrics.map_entries.get_or_create(&label).set(n(used));
            self.metrics.map_capacity.get_or_create(&label).set(n(max));
        }
        let Some(c) = &self.counters else { return };
        match changes {
            None => c.set_ports(self.writer.ports().map(|(k, p)| (k, p.service_id))),
            Some(changes) => {
                c.update(
                    changes
                        .keys()
                        .map(|k| (k, self.writer.port(k).map(|p| p.service_id))),
                );
            }
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.apply(changes, state)?;
        self.report(&r, Some(changes));
        self.janitor
            .changed(changes, |k| self.writer.port(k), state);
        Ok(())
    }

    fn applies_inline(&self) -> bool {
        true
    }

    fn capacity_problem(&self) -> Option<String> {
        let u = self.writer.unprogrammed();
        let (port, reason) = u.iter().next()?;
        Some(match u.len() {
            1 => format!("service port {port} not programmed: {reason}"),
            n => format!("{n} service ports not programmed, {port} the first: {reason}"),
        })
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.full_sync(state)?;
        self.report(&r, None);
        self.janitor.full(self.writer.ports(), state);
        Ok(())
    }

    fn full_sync_reader(&mut self) -> Option<super::FullSyncReader> {
        let journal = self.writer.start_journal();
        let dir = self.cfg.pin_dir.clone();
        Some(Box::new(move || {
            let _span = tracing::debug_span!("full_sync_read").entered();
            let dump = io::MapIo::dump(&AyaMaps::from_pins(&dir)?)?;
            Ok(super::Prepared(Box::new((journal, dump))))
        }))
    }

    fn full_sync_check(
        &mut self,
        prepared: super::Prepared,
    ) -> Result<super::FullSyncReader, super::Prepared> {
        let (journal, dump) = match prepared.0.downcast::<(u64, io::Dump)>() {
            Ok(p) => *p,
            Err(other) => return Err(super::Prepared(other)),
        };
        let started = std::time::Instant::now();
        let Some(snapshot) = self.writer.snapshot(journal) else {
            return Err(super::Prepared(Box::new((journal, dump))));
        };
        tracing::debug!(
            took_us = started.elapsed().as_micros(),
            ?snapshot,
            "periodic full sync: snapshot taken"
        );
        Ok(Box::new(move || {
            let _span = tracing::debug_span!("full_sync_check").entered();
            Ok(super::Prepared(Box::new(snapshot.check(dump))))
        }))
    }

    fn full_sync_prepared(
        &mut self,
        state: &DesiredState,
        changes: &ChangeSet,
        prepared: super::Prepared,
    ) -> Result<(), DataplaneError> {
        let prepared = match prepared.0.downcast::<Checked>() {
            Ok(checked) => {
                let (r, clean) = self.writer.full_sync_checked(state, changes, *checked)?;
                self.report(&r, clean.then_some(changes));
                if clean {
                    self.janitor
                        .changed(changes, |k| self.writer.port(k), state);
                    self.janitor.sweep();
                } else {
                    self.janitor.full(self.writer.ports(), state);
                }
                return Ok(());
            }
            Err(other) => other,
        };
        let r = match prepared.downcast::<(u64, io::Dump)>() {
            Ok(p) => {
                let (journal, dump) = *p;
                self.writer.full_sync_prepared(state, journal, dump)?
            }
            Err(_) => self.writer.full_sync(state)?,
        };
        self.report(&r, None);
        self.janitor.full(self.writer.ports(), state);
        Ok(())
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
