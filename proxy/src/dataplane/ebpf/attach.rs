//! Attaching the programs: the socket load balancer to the cgroup, the tc program to each
//! wanted interface (through TCX), each link pinned so a restart re-adopts it and an upgrade
//! replaces programs atomically; and checking on full syncs that every interface still has
//! our program.

use std::collections::BTreeSet;
use std::path::PathBuf;

use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
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
            prog.load().map_err(program_error(name, "loading", ""))?;
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

    /// Attach the tc program to `ifname` (atomically replacing a pinned older program).
    fn attach_tc(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let pin = self.link_pin(&format!("tc-{ifname}"));
        let prog = self.tc_program()?;
        let fresh = |prog: &mut SchedClassifier| {
            prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(program_error(TC_PROGRAM, "attaching to", ifname))
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
        tracing::info!(interface = ifname, "tc program attached");
        self.attached.insert(ifname.to_string());
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
                if !tc_attached(l, id) {
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

/// Whether the tc program with kernel id `id` is attached at `ifname`'s ingress.
fn tc_attached(ifname: &str, id: u32) -> bool {
    match SchedClassifier::query_tcx(ifname, TcAttachType::Ingress) {
        Ok((_, progs)) => progs.iter().any(|p| p.id() == id),
        // Cannot tell (e.g. the interface went away meanwhile): leave it to the next sync.
        Err(_) => true,
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
