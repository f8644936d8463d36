//! Attaching the programs: the socket load balancer to the cgroup, the tc program to each
//! wanted interface, and checking on full syncs that every interface still has our program.
//!
//! The tc program attaches through TCX (a bpf_link, Linux 6.6+) where the kernel has it, and
//! otherwise as a direct-action `cls_bpf` filter under a `clsact` qdisc (netlink), with a
//! priority and handle of our own. Both survive the daemon: a TCX link is pinned, a netlink
//! filter stays in the kernel; a restart re-adopts either and replaces the program atomically
//! (`bpf_link_update`, or a filter change on the same priority/handle). Switching mode (a
//! kernel upgrade from 6.1 to 6.12, or the setting) removes the other mode's attachment.

use std::collections::BTreeSet;
use std::path::PathBuf;

use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType};

use super::EbpfDataplane;
use super::host;
use crate::error::DataplaneError;

pub const CGROUP_PROGRAMS: [&str; 8] = [
    "sy_connect4",
    "sy_sendmsg4",
    "sy_recvmsg4",
    "sy_getpeername4",
    "sy_connect6",
    "sy_sendmsg6",
    "sy_recvmsg6",
    "sy_getpeername6",
];
pub const TC_PROGRAM: &str = "sy_tc_ingress";

/// The netlink filter's priority and handle on every interface's ingress (ours alone: other
/// filters at other priorities keep running after ours returns `TC_ACT_OK`).
pub const NL_PRIORITY: u16 = 0x5359;
pub const NL_HANDLE: u32 = 0x5359;

/// How the tc program is attached on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcMode {
    Tcx,
    Netlink,
}

impl TcMode {
    pub fn name(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "netlink",
        }
    }

    /// The mode for `setting` on this kernel, and why.
    pub fn resolve(
        setting: crate::config::TcAttachMode,
    ) -> Result<(TcMode, String), DataplaneError> {
        use crate::config::TcAttachMode as S;
        let kernel = aya::util::KernelVersion::current().ok();
        let has_tcx = kernel.is_none_or(|k| k >= aya::util::KernelVersion::new(6, 6, 0));
        let shown = kernel.map_or_else(|| "unknown".to_string(), |k| k.to_string());
        match setting {
            S::Netlink => Ok((TcMode::Netlink, "configured".into())),
            S::Tcx if has_tcx => Ok((TcMode::Tcx, "configured".into())),
            S::Tcx => Err(DataplaneError::NoTcx { kernel: shown }),
            S::Auto if has_tcx => Ok((TcMode::Tcx, format!("kernel {shown} has TCX"))),
            S::Auto => Ok((
                TcMode::Netlink,
                format!("kernel {shown} has no TCX (6.6+): clsact/cls_bpf"),
            )),
        }
    }
}

fn nl_handle() -> TcHandle {
    TcHandle::from(NL_HANDLE)
}

fn program_error(
    program: &'static str,
    step: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(ProgramError) -> DataplaneError {
    let target = target.into();
    move |source| DataplaneError::Program {
        program,
        step,
        target,
        source: Box::new(source),
    }
}

fn link_error(program: &str) -> impl FnOnce(aya::programs::links::LinkError) -> DataplaneError {
    let program = program.to_string();
    move |source| DataplaneError::Link {
        program,
        source: Box::new(source),
    }
}

fn pin_error(path: &std::path::Path) -> impl FnOnce(aya::pin::PinError) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::Pin {
        path,
        source: Box::new(source),
    }
}

impl EbpfDataplane {
    pub(super) fn link_pin(&self, name: &str) -> PathBuf {
        self.cfg.pin_dir.join("links").join(name)
    }

    pub(super) fn attach_cgroup(&mut self) -> Result<(), DataplaneError> {
        let cg = host::open_cgroup(&self.cfg.cgroup_path)?;
        let target = self.cfg.cgroup_path.display().to_string();
        for name in CGROUP_PROGRAMS {
            let pin = self.link_pin(name);
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram { program: name })?
                .try_into()
                .map_err(program_error(name, "loading", ""))?;
            // Loaded once; a re-attach (after someone detached it) reuses the program.
            if prog.fd().is_err() {
                prog.load().map_err(program_error(name, "loading", ""))?;
            }
            // A bpf_link on a cgroup always coexists with other links (the kernel takes no
            // flags for it), so the new program runs beside the old one until the old link
            // goes and no connect() misses the socket load balancer during an upgrade.
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(program_error(name, "attaching to", target.clone()))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(program_error(name, "taking the link on", target.clone()))?
                .try_into()
                .map_err(link_error(name))?;
            if pin.exists() {
                if let Ok(old) = PinnedLink::from_pin(&pin) {
                    drop(old.unpin());
                } else {
                    let _ = std::fs::remove_file(&pin);
                }
            }
            link.pin(&pin).map_err(pin_error(&pin))?;
        }
        Ok(())
    }

    /// Whether every socket load balancer link is still pinned and attached to the cgroup;
    /// if not (someone ran `bpftool link detach`, or removed a pin), attach them all again.
    pub(super) fn verify_cgroup_links(&mut self) -> Result<(), DataplaneError> {
        let broken: Vec<&str> = CGROUP_PROGRAMS
            .into_iter()
            .filter(|name| cgroup_link_attached(&self.link_pin(name)) == Some(false))
            .collect();
        if broken.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            cgroup = %self.cfg.cgroup_path.display(),
            programs = ?broken,
            "socket load balancer no longer attached to the cgroup; re-attaching"
        );
        self.metrics.cgroup_reattached.inc();
        self.attach_cgroup()
    }

    pub(super) fn load_tc(&mut self) -> Result<(), DataplaneError> {
        self.tc_program()?
            .load()
            .map_err(program_error(TC_PROGRAM, "loading", ""))
    }

    fn tc_program(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        self.ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(DataplaneError::MissingProgram {
                program: TC_PROGRAM,
            })?
            .try_into()
            .map_err(program_error(TC_PROGRAM, "loading", ""))
    }

    fn wanted(&self, name: &str) -> bool {
        // Loopback, and the dummy link that only holds the DNS listen address.
        if name == "lo" || name == crate::dns_listen::LINK {
            return false;
        }
        self.cfg.interfaces.is_empty() || self.cfg.interfaces.iter().any(|p| glob(p, name))
    }

    /// Attach the tc program to `ifname` (atomically replacing an older program of ours).
    fn attach_tc(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        match self.tc_mode {
            TcMode::Tcx => {
                // A netlink filter left by this node's previous kernel or setting would run
                // the program a second time.
                detach_netlink(ifname);
                self.attach_tcx(ifname)?;
            }
            TcMode::Netlink => {
                // A pinned TCX link from a previous setting: unpinning detaches it.
                let pin = self.link_pin(&format!("tc-{ifname}"));
                if let Ok(old) = PinnedLink::from_pin(&pin) {
                    drop(old.unpin());
                }
                self.attach_netlink(ifname)?;
            }
        }
        tracing::info!(
            interface = ifname,
            mode = self.tc_mode.name(),
            "tc program attached"
        );
        self.attached.insert(ifname.to_string());
        Ok(())
    }

    fn attach_tcx(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let pin = self.link_pin(&format!("tc-{ifname}"));
        let prog = self.tc_program()?;
        let fresh = |prog: &mut SchedClassifier| {
            prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(program_error(TC_PROGRAM, "attaching (TCX) to", ifname))
        };
        let id = match PinnedLink::from_pin(&pin).ok() {
            Some(old) => {
                let link: SchedClassifierLink = FdLink::from(old)
                    .try_into()
                    .map_err(link_error(TC_PROGRAM))?;
                match prog.attach_to_link(link) {
                    Ok(id) => id,
                    // The interface was recreated since: the old link is defunct.
                    Err(_) => fresh(prog)?,
                }
            }
            None => fresh(prog)?,
        };
        let link: FdLink = prog
            .take_link(id)
            .map_err(program_error(TC_PROGRAM, "taking the link on", ifname))?
            .try_into()
            .map_err(link_error(TC_PROGRAM))?;
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin).map_err(pin_error(&pin))?;
        Ok(())
    }

    /// clsact qdisc (created if missing) + our `cls_bpf` filter: replaced in place when it is
    /// there (no packet misses the program), created otherwise. The filter outlives the
    /// daemon like a pinned link does.
    fn attach_netlink(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
            // EEXIST: the qdisc is there already (ours from before, or another agent's).
            let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
                if n.raw_os_error() == Some(nix::libc::EEXIST));
            if !exists {
                return Err(program_error(
                    TC_PROGRAM,
                    "adding the clsact qdisc to",
                    ifname,
                )(ProgramError::from(e)));
            }
        }
        let prog = self.tc_program()?;
        let replace = SchedClassifierLink::attached(
            ifname,
            TcAttachType::Ingress,
            NL_PRIORITY,
            nl_handle(),
            None,
        )
        .ok()
        .and_then(|old| prog.attach_to_link(old).ok());
        let id = match replace {
            Some(id) => id,
            None => prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: NL_PRIORITY,
                        handle: nl_handle(),
                        classid: None,
                    }),
                )
                .map_err(program_error(
                    TC_PROGRAM,
                    "attaching (netlink cls_bpf) to",
                    ifname,
                ))?,
        };
        let link =
            prog.take_link(id)
                .map_err(program_error(TC_PROGRAM, "taking the link on", ifname))?;
        // Dropping the link would delete the filter: it stays, as a pinned TCX link does.
        std::mem::forget(link);
        Ok(())
    }

    /// The kernel's id of our loaded tc program.
    fn tc_program_id(&self) -> Option<u32> {
        let prog: &SchedClassifier = self.ebpf.program(TC_PROGRAM)?.try_into().ok()?;
        prog.info().ok().map(|i| i.id())
    }

    /// Attach the tc program to new wanted interfaces, forget gone ones, and with `verify`
    /// re-attach where someone detached it. Every interface is tried; the failures are
    /// returned together.
    pub(super) fn sync_tc_links(
        &mut self,
        links: &[String],
        verify: bool,
    ) -> Result<(), DataplaneError> {
        let present: BTreeSet<String> = links.iter().filter(|l| self.wanted(l)).cloned().collect();
        let ours = if verify { self.tc_program_id() } else { None };
        let mut failed = Vec::new();
        for l in &present {
            let mut attach = !self.attached.contains(l);
            if !attach && let Some(id) = ours {
                // Someone detached it (or replaced it): the full sync puts it back.
                if !tc_attached(self.tc_mode, l, id) {
                    tracing::warn!(interface = %l, "tc program no longer attached; re-attaching");
                    self.metrics.tc_reattached.inc();
                    let _ = std::fs::remove_file(self.link_pin(&format!("tc-{l}")));
                    self.attached.remove(l);
                    attach = true;
                }
            }
            if attach && let Err(e) = self.attach_tc(l) {
                let e = crate::error::chain(&e);
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
                failed,
            })
        }
    }
}

/// Whether the cgroup link pinned at `pin` is attached: `Some(false)` when the pin is gone or
/// the link was detached (the kernel's fdinfo of a detached cgroup link says `cgroup_id: 0`),
/// `None` when it cannot tell.
fn cgroup_link_attached(pin: &std::path::Path) -> Option<bool> {
    if !pin.exists() {
        return Some(false);
    }
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    let id = link.info().ok()?.id();
    // Our own descriptor to the link, found by its id.
    let want = format!("link_id:\t{id}\n");
    for entry in std::fs::read_dir("/proc/self/fdinfo").ok()?.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if info.contains(&want) {
            let cgroup_id = info
                .lines()
                .find_map(|l| l.strip_prefix("cgroup_id:"))?
                .trim()
                .parse::<u64>()
                .ok()?;
            drop(link);
            return Some(cgroup_id != 0);
        }
    }
    None
}

/// Whether the tc program with kernel id `id` is attached at `ifname`'s ingress.
fn tc_attached(mode: TcMode, ifname: &str, id: u32) -> bool {
    match mode {
        TcMode::Tcx => match SchedClassifier::query_tcx(ifname, TcAttachType::Ingress) {
            Ok((_, progs)) => progs.iter().any(|p| p.id() == id),
            // Cannot tell (e.g. the interface went away meanwhile): leave it to the next sync.
            Err(_) => true,
        },
        TcMode::Netlink => match ingress_filters(ifname) {
            Ok(filters) => filters.iter().any(|f| {
                f.priority == NL_PRIORITY && f.handle == NL_HANDLE && f.prog_id == Some(id)
            }),
            Err(_) => true,
        },
    }
}

/// Remove our netlink filter from `ifname` (none there is fine); whether one was removed.
fn detach_netlink(ifname: &str) -> bool {
    aya::programs::tc::qdisc_detach_program(ifname, TcAttachType::Ingress, TC_PROGRAM).is_ok()
}

/// Remove our netlink filter from every interface of this network namespace (cleanup);
/// how many interfaces had one.
pub fn detach_netlink_everywhere() -> usize {
    nix::net::if_::if_nameindex().map_or(0, |ifs| {
        ifs.iter()
            .filter(|i| detach_netlink(&i.name().to_string_lossy()))
            .count()
    })
}

/// One `cls_bpf` filter on an interface's clsact ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    pub kind: String,
    pub prog_id: Option<u32>,
    pub name: Option<String>,
}

/// The filters on `ifname`'s clsact ingress (RTM_GETTFILTER dump).
pub fn ingress_filters(ifname: &str) -> std::io::Result<Vec<TcFilter>> {
    use crate::nl;
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    const RTM_GETTFILTER: u16 = 46;
    const RTM_NEWTFILTER: u16 = 44;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_ID: u16 = 11;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
    const PARENT_INGRESS: u32 = 0xFFFF_FFF2;
    let index = nix::net::if_::if_nametoindex(ifname).map_err(std::io::Error::from)?;
    let mut tcmsg = Vec::with_capacity(20);
    tcmsg.extend_from_slice(&[0u8; 4]); // family, pads
    tcmsg.extend_from_slice(&i32::try_from(index).unwrap_or_default().to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes()); // handle
    tcmsg.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes()); // info
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(
        &nl::message(
            RTM_GETTFILTER,
            nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
            1,
            &tcmsg,
        ),
        0,
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        for m in nl::messages(&buf[..n]) {
            if m.ty == nl::NLMSG_DONE {
                return Ok(out);
            }
            if let Some(e) = m.error() {
                if e == 0 {
                    continue;
                }
                return Err(std::io::Error::from_raw_os_error(e));
            }
            if m.ty != RTM_NEWTFILTER || m.payload.len() < 20 {
                continue;
            }
            let p = m.payload;
            let handle = u32::from_ne_bytes([p[8], p[9], p[10], p[11]]);
            let info = u32::from_ne_bytes([p[16], p[17], p[18], p[19]]);
            let attrs = &p[20..];
            let kind = nl::attr(attrs, TCA_KIND)
                .map(|k| {
                    String::from_utf8_lossy(k)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_default();
            let opts = nl::attr(attrs, TCA_OPTIONS).unwrap_or_default();
            // The dump also lists each priority's chain head (handle 0, no options).
            if handle == 0 {
                continue;
            }
            out.push(TcFilter {
                priority: u16::try_from(info >> 16).unwrap_or_default(),
                handle,
                kind,
                prog_id: nl::attr(opts, TCA_BPF_ID)
                    .and_then(|v| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))),
                name: nl::attr(opts, TCA_BPF_NAME).map(|v| {
                    String::from_utf8_lossy(v)
                        .trim_end_matches('\0')
                        .to_string()
                }),
            });
        }
    }
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
