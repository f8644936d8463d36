//! The eBPF backend: loads the kernel programs with their maps pinned under the pin directory,
//! attaches the socket-LB programs to a cgroup v2 and the tc program to the node's interfaces
//! (links pinned too, so a restart keeps everything working and replaces programs atomically),
//! and programs the maps through the reconciler in `writer`.

pub mod ct;
pub mod inspect;
pub mod io;
pub mod maglev;
pub mod render;
pub mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType};
use switchyard_ebpf_common::maps as m;
use switchyard_ebpf_common::{Ct4Value, Ct6Value};
use switchyard_model::{ChangeSet, DesiredState};

use self::io::AyaMaps;
use self::render::RenderConfig;
use self::writer::{Capacity, Globals, Report, Writer};
use super::Dataplane;
use crate::error::DataplaneError;
use crate::metrics::Metrics;

/// The kernel object built by proxy/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/switchyard";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CGROUP_PROGRAMS: [&str; 8] = [
    "sy_connect4",
    "sy_sendmsg4",
    "sy_recvmsg4",
    "sy_getpeername4",
    "sy_connect6",
    "sy_sendmsg6",
    "sy_recvmsg6",
    "sy_getpeername6",
];
const TC_PROGRAM: &str = "sy_tc_ingress";

#[derive(Debug, Clone)]
pub struct EbpfConfig {
    pub pin_dir: PathBuf,
    /// The NodePort range to keep out of the node's ephemeral ports.
    pub reserve_ports: Option<(u16, u16)>,
    pub cgroup_path: PathBuf,
    /// Interface name patterns (`*` wildcard) for the tc program; empty = all but loopback.
    pub interfaces: Vec<String>,
    pub capacity: Capacity,
    pub render: RenderConfig,
    pub globals: Globals,
}

/// An error with its sources, for messages that must say what the kernel answered.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn unavailable(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Unavailable {
        backend: "ebpf",
        reason: reason.into(),
    }
}

fn program(reason: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Program {
        backend: "ebpf",
        service: "-".into(),
        reason: reason.to_string(),
    }
}

/// Make sure a BPF filesystem is mounted where pins go (the host may not mount one).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let root = Path::new("/sys/fs/bpf");
    let target = if pin_dir.starts_with(root) {
        root
    } else {
        pin_dir.parent().unwrap_or(root)
    };
    #[allow(clippy::cast_lossless, clippy::useless_conversion)]
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| i64::from(s.filesystem_type().0) == BPF_FS_MAGIC)
    };
    if is_bpffs(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target)
        .map_err(|e| unavailable(format!("creating {}: {e}", target.display())))?;
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| unavailable(format!("mounting bpffs on {}: {e}", target.display())))
}

/// The default cgroup v2 root: where cgroup2 is mounted (the unified hierarchy).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

pub struct EbpfDataplane {
    ebpf: aya::Ebpf,
    writer: Writer<AyaMaps>,
    cfg: EbpfConfig,
    attached: BTreeSet<String>,
    metrics: Arc<Metrics>,
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
    ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir)
        .map_err(|e| unavailable(format!("creating {}: {e}", pin_dir.display())))?;
    let mut ebpf = loader(pin_dir, capacity)
        .load(OBJECT)
        .map_err(|e| unavailable(format!("loading the kernel object: {}", chain(&e))))?;
    let maps = AyaMaps::take(&mut ebpf).map_err(|e| unavailable(e.to_string()))?;
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

impl EbpfDataplane {
    /// Load the programs (reusing pinned maps), attach them, and take over the maps.
    pub fn start(cfg: EbpfConfig, metrics: Arc<Metrics>) -> Result<EbpfDataplane, DataplaneError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(unavailable(
                "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
            ));
        }
        ensure_bpffs(&cfg.pin_dir)?;
        std::fs::create_dir_all(cfg.pin_dir.join("links"))
            .map_err(|e| unavailable(format!("creating {}: {e}", cfg.pin_dir.display())))?;
        let mut ebpf = loader(&cfg.pin_dir, &cfg.capacity)
            .load(OBJECT)
            .map_err(|e| {
                unavailable(format!(
                    "loading the kernel programs: {} (pinned maps of an incompatible version? run `switchyard cleanup`)",
                    chain(&e)
                ))
            })?;
        let maps = AyaMaps::take(&mut ebpf).map_err(|e| unavailable(e.to_string()))?;
        let writer = Writer::new(
            maps,
            cfg.render.clone(),
            cfg.capacity.clone(),
            cfg.globals.clone(),
        );
        let mut dp = EbpfDataplane {
            ebpf,
            writer,
            cfg,
            attached: BTreeSet::new(),
            metrics,
        };
        dp.attach_cgroup()?;
        dp.load_tc()?;
        if let Some(range) = dp.cfg.reserve_ports {
            match reserve_ports(range, &dp.cfg.pin_dir) {
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

    fn link_pin(&self, name: &str) -> PathBuf {
        self.cfg.pin_dir.join("links").join(name)
    }

    fn attach_cgroup(&mut self) -> Result<(), DataplaneError> {
        let cg = std::fs::File::open(&self.cfg.cgroup_path).map_err(|e| {
            unavailable(format!(
                "opening cgroup {}: {e}",
                self.cfg.cgroup_path.display()
            ))
        })?;
        for name in CGROUP_PROGRAMS {
            let pin = self.link_pin(name);
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| unavailable(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| unavailable(format!("{name}: {e}")))?;
            prog.load()
                .map_err(|e| unavailable(format!("loading {name}: {}", chain(&e))))?;
            // A bpf_link on a cgroup always coexists with other links (the kernel takes no
            // flags for it), so the new program runs beside the old one until the old link
            // goes and no connect() misses the socket load balancer during an upgrade.
            let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(|e| {
                unavailable(format!(
                    "attaching {name} to {}: {}",
                    self.cfg.cgroup_path.display(),
                    chain(&e)
                ))
            })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(program)?
                .try_into()
                .map_err(program)?;
            if pin.exists() {
                if let Ok(old) = PinnedLink::from_pin(&pin) {
                    drop(old.unpin());
                } else {
                    let _ = std::fs::remove_file(&pin);
                }
            }
            link.pin(&pin).map_err(program)?;
        }
        Ok(())
    }

    fn load_tc(&mut self) -> Result<(), DataplaneError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| unavailable("tc program missing from the object"))?
            .try_into()
            .map_err(|e| unavailable(format!("{TC_PROGRAM}: {e}")))?;
        prog.load()
            .map_err(|e| unavailable(format!("loading {TC_PROGRAM}: {}", chain(&e))))?;
        Ok(())
    }

    fn wanted(&self, name: &str) -> bool {
        if name == "lo" {
            return false;
        }
        self.cfg.interfaces.is_empty() || self.cfg.interfaces.iter().any(|p| glob(p, name))
    }

    /// Attach the tc program to `ifname` (atomically replacing a pinned older program).
    fn attach_tc(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let pin = self.link_pin(&format!("tc-{ifname}"));
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| unavailable("tc program missing"))?
            .try_into()
            .map_err(program)?;
        let existing = PinnedLink::from_pin(&pin).ok();
        let id = match existing {
            Some(old) => {
                let link: SchedClassifierLink = FdLink::from(old).try_into().map_err(program)?;
                match prog.attach_to_link(link) {
                    Ok(id) => id,
                    // The interface was recreated since: the old link is defunct.
                    Err(_) => prog
                        .attach_with_options(
                            ifname,
                            TcAttachType::Ingress,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(|e| program(format!("attaching tc to {ifname}: {}", chain(&e))))?,
                }
            }
            None => prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| program(format!("attaching tc to {ifname}: {}", chain(&e))))?,
        };
        let link: FdLink = prog
            .take_link(id)
            .map_err(program)?
            .try_into()
            .map_err(program)?;
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin).map_err(program)?;
        tracing::info!(interface = ifname, "tc program attached");
        self.attached.insert(ifname.to_string());
        Ok(())
    }

    /// The kernel's id of our loaded tc program.
    fn tc_program_id(&self) -> Option<u32> {
        let prog: &SchedClassifier = self.ebpf.program(TC_PROGRAM)?.try_into().ok()?;
        prog.info().ok().map(|i| i.id())
    }

    /// Delete the tc path's UDP flows whose endpoint is gone (see `ct`), in both families'
    /// flow maps. A failure fails the sync, so it is retried (the service maps are right
    /// meanwhile).
    fn clear_stale_udp(&mut self) -> Result<(), DataplaneError> {
        let endpoints = ct::udp_endpoints(self.writer.ports());
        let flows = sweep::<Ct4Value>(&mut self.ebpf, m::CT4, &endpoints)?
            + sweep::<Ct6Value>(&mut self.ebpf, m::CT6, &endpoints)?;
        if flows > 0 {
            tracing::info!(flows, "deleted stale UDP flows from the tc flow maps");
            self.metrics.stale_conntrack_deleted.inc_by(flows);
        }
        Ok(())
    }

    fn report(&self, r: &Report) {
        for e in &r.capacity_errors {
            self.metrics.dataplane_capacity_errors.inc();
            tracing::error!(service_port = %e.service_port, reason = %e.reason, "service not programmed");
        }
    }
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ranges of a `ip_local_reserved_ports` value (`a,b-c,...`).
fn port_ranges(v: &str) -> Vec<(u16, u16)> {
    v.trim()
        .split(',')
        .filter_map(|t| {
            let (a, b) = t.trim().split_once('-').unwrap_or((t.trim(), t.trim()));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// `value` with `range` added, or `None` when it is already covered.
pub fn with_reserved(value: &str, range: (u16, u16)) -> Option<String> {
    let have = port_ranges(value);
    let covered = (range.0..=range.1).all(|p| have.iter().any(|(a, b)| (*a..=*b).contains(&p)));
    if covered {
        return None;
    }
    let v = value.trim();
    let token = format!("{}-{}", range.0, range.1);
    Some(if v.is_empty() {
        token
    } else {
        format!("{v},{token}")
    })
}

/// `value` without the exact `range` token (what `with_reserved` added).
pub fn without_reserved(value: &str, range: (u16, u16)) -> String {
    value
        .trim()
        .split(',')
        .filter(|t| port_ranges(t).first() != Some(&range))
        .collect::<Vec<_>>()
        .join(",")
}

/// Keep the NodePort range out of this namespace's ephemeral ports. Cilium does the same:
/// otherwise a node's own connection may get a NodePort as its source port, and the replies
/// would be taken for NodePort traffic. `Ok(true)` when the sysctl changed; then a note in
/// the pin directory (a directory named after the range: bpffs holds no regular files) lets
/// `cleanup` take back exactly what we added.
pub fn reserve_ports(range: (u16, u16), pin_dir: &Path) -> std::io::Result<bool> {
    let cur = std::fs::read_to_string(RESERVED_PORTS)?;
    match with_reserved(&cur, range) {
        Some(v) => {
            std::fs::write(RESERVED_PORTS, v)?;
            std::fs::create_dir_all(
                pin_dir.join(format!("{RESERVED_NOTE}{}-{}", range.0, range.1)),
            )?;
            Ok(true)
        }
        None => Ok(false),
    }
}

const RESERVED_NOTE: &str = "reserved-ports-";

/// Undo `reserve_ports`, if we reserved the range (cleanup; before the pins go).
pub fn unreserve_ports(pin_dir: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(&range) = name
            .strip_prefix(RESERVED_NOTE)
            .and_then(|r| port_ranges(r).first().copied())
            .as_ref()
        {
            release(range)?;
            let _ = std::fs::remove_dir(e.path());
        }
    }
    Ok(())
}

fn release(range: (u16, u16)) -> std::io::Result<()> {
    let cur = std::fs::read_to_string(RESERVED_PORTS)?;
    let new = without_reserved(&cur, range);
    if new.trim() != cur.trim() {
        // An empty write is refused; a lone newline clears the list.
        std::fs::write(
            RESERVED_PORTS,
            if new.is_empty() { "\n".into() } else { new },
        )?;
    }
    Ok(())
}

/// `*` wildcard match.
pub fn glob(pattern: &str, name: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(tail) = name.strip_prefix(head) else {
        return false;
    };
    (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.apply(changes, state).map_err(program)?;
        self.report(&r);
        if crate::conntrack::touches_udp(changes) {
            self.clear_stale_udp()?;
        }
        Ok(())
    }

    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        let r = self.writer.full_sync(state).map_err(program)?;
        self.report(&r);
        self.clear_stale_udp()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        if let Err(e) = unreserve_ports(&self.cfg.pin_dir) {
            tracing::warn!(error = %e, "releasing the reserved NodePort range");
        }
        cleanup_pins(&self.cfg.pin_dir)
    }

    fn sync_links(&mut self, links: &[String], verify: bool) -> Result<(), DataplaneError> {
        let present: BTreeSet<String> = links.iter().filter(|l| self.wanted(l)).cloned().collect();
        let ours = if verify { self.tc_program_id() } else { None };
        let mut failed = Vec::new();
        for l in &present {
            let mut attach = !self.attached.contains(l);
            if !attach && let Some(id) = ours {
                // Someone detached it (or replaced it): the full sync puts it back.
                if !tc_attached(l, id) {
                    tracing::warn!(interface = %l, "tc program no longer attached; re-attaching");
                    self.metrics.tc_reattached.inc();
                    let _ = std::fs::remove_file(self.link_pin(&format!("tc-{l}")));
                    self.attached.remove(l);
                    attach = true;
                }
            }
            if attach && let Err(e) = self.attach_tc(l) {
                tracing::error!(interface = %l, error = %e, "cannot attach tc program");
                failed.push(format!("{l}: {e}"));
            }
        }
        // Links of deleted interfaces die with them; forget them and their pins.
        let gone: Vec<String> = self.attached.difference(&present).cloned().collect();
        for l in gone {
            self.attached.remove(&l);
            let _ = std::fs::remove_file(self.link_pin(&format!("tc-{l}")));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(DataplaneError::Attach {
                backend: "ebpf",
                interfaces: failed.join("; "),
            })
        }
    }
}

/// Whether the tc program with kernel id `id` is attached at `ifname`'s ingress.
fn tc_attached(ifname: &str, id: u32) -> bool {
    match SchedClassifier::query_tcx(ifname, TcAttachType::Ingress) {
        Ok((_, progs)) => progs.iter().any(|p| p.id() == id),
        // Cannot tell (e.g. the interface went away meanwhile): leave it to the next sync.
        Err(_) => true,
    }
}

/// Delete one flow map's stale UDP flows; how many.
fn sweep<V>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    endpoints: &ct::UdpEndpoints,
) -> Result<u64, ct::FlowError>
where
    V: ct::Flow + aya::Pod,
    V::Key: aya::Pod,
{
    let Some(map) = ebpf.map_mut(name) else {
        return Ok(0);
    };
    let map = aya::maps::HashMap::<_, V::Key, V>::try_from(map)
        .map_err(|source| ct::FlowError::Map { map: name, source })?;
    ct::sweep(&mut ct::AyaFlows { name, map }, endpoints)
}

/// Remove every link and map Switchyard pinned: programs detach, maps go away.
pub fn cleanup_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            match PinnedLink::from_pin(e.path()) {
                Ok(l) => drop(l.unpin()),
                Err(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    std::fs::remove_dir_all(pin_dir).map_err(|e| DataplaneError::Program {
        backend: "ebpf",
        service: "-".into(),
        reason: format!("removing {}: {e}", pin_dir.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_added_once_and_removed_exactly() {
        let r = (30000, 32767);
        assert_eq!(with_reserved("\n", r).as_deref(), Some("30000-32767"));
        assert_eq!(
            with_reserved("8080,9000-9100\n", r).as_deref(),
            Some("8080,9000-9100,30000-32767")
        );
        // Already covered (by one range or a wider one): left alone.
        assert_eq!(with_reserved("30000-32767\n", r), None);
        assert_eq!(with_reserved("20000-40000", r), None);
        // Partly covered: added.
        assert!(with_reserved("30000-31000", r).is_some());
        assert_eq!(without_reserved("8080,30000-32767,9000", r), "8080,9000");
        assert_eq!(without_reserved("30000-32767\n", r), "");
        assert_eq!(without_reserved("20000-40000", r), "20000-40000");
    }
}
