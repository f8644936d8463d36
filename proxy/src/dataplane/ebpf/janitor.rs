//! Stale flows and sockets are cleared beside the sync loop, not in it. Finding them walks
//! the flow maps and the socket LB's reverse-translation maps (a hash map's walk costs its
//! whole bucket array, whatever it holds) and needs every service port's live endpoints:
//! work that grows with the cluster and used to delay the next change's programming by
//! milliseconds at 1k services. The writer hands the janitor, after each sync, a summary of
//! the service ports it touched (O(change)); the janitor keeps its own index of them, and
//! its own handles of the pinned maps, and sweeps on its thread. Requests that queue up
//! while a sweep runs are merged into one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard_ebpf_common::{Ct4Value, Ct6Value, maps as m};
use switchyard_model::ServicePortKey;
use switchyard_model::engine::{ChangeSet, DesiredState};

use super::ct::{self, Endpoint, LiveEndpoints};
use super::io::{self, PinnedMaps};
use super::render::PortRender;
use super::socks;
use crate::metrics::Metrics;

/// What the janitor needs of one service port.
/// The least time between two sweeps.
const MIN_GAP: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct PortSummary {
    service_id: u32,
    frontends: Vec<Endpoint>,
    live: Vec<Endpoint>,
}

impl PortSummary {
    pub fn of(k: &ServicePortKey, p: &PortRender, state: &DesiredState) -> PortSummary {
        PortSummary {
            service_id: p.service_id,
            frontends: socks::port_frontends(p),
            live: ct::port_live(k, p, state),
        }
    }
}

enum Job {
    /// Every service port (after a full sync).
    Replace(HashMap<ServicePortKey, PortSummary>),
    /// Ports added or changed (`Some`) and removed (`None`).
    Update(Vec<(ServicePortKey, Option<PortSummary>)>),
}

struct Request {
    job: Job,
    /// The change may have stranded flows: sweep.
    sweep: bool,
}

#[derive(Debug)]
pub struct Janitor {
    tx: mpsc::Sender<Request>,
}

impl Janitor {
    pub fn start(pin_dir: &Path, metrics: Arc<Metrics>) -> std::io::Result<Janitor> {
        let (tx, rx) = mpsc::channel();
        let dir = pin_dir.to_path_buf();
        std::thread::Builder::new()
            .name("sy-janitor".into())
            .spawn(move || run(&dir, &rx, &metrics))?;
        Ok(Janitor { tx })
    }

    /// After a full sync: every port, and a sweep.
    pub fn full<'a>(
        &self,
        ports: impl Iterator<Item = (&'a ServicePortKey, &'a PortRender)>,
        state: &DesiredState,
    ) {
        let all = ports
            .map(|(k, p)| (k.clone(), PortSummary::of(k, p, state)))
            .collect();
        self.send(Job::Replace(all), true);
    }

    /// After a partial sync: the ports it touched (`port` gives a port's render after it),
    /// and a sweep when the change may strand flows.
    pub fn changed<'a>(
        &self,
        changes: &ChangeSet,
        port: impl Fn(&ServicePortKey) -> Option<&'a PortRender>,
        state: &DesiredState,
    ) {
        let update = changes
            .keys()
            .map(|k| (k.clone(), port(k).map(|p| PortSummary::of(k, p, state))))
            .collect();
        self.send(Job::Update(update), ct::may_strand_flows(changes));
    }

    /// A sweep with no change to the index (a periodic full sync that found the maps as
    /// programmed).
    pub fn sweep(&self) {
        self.send(Job::Update(Vec::new()), true);
    }

    fn send(&self, job: Job, sweep: bool) {
        if self.tx.send(Request { job, sweep }).is_err() {
            tracing::error!(
                "the stale-flow janitor has stopped: flows to removed endpoints are no longer cleared"
            );
        }
    }
}

fn run(dir: &Path, rx: &mpsc::Receiver<Request>, metrics: &Metrics) {
    let mut index = Index::default();
    let names = [m::CT4, m::CT6, m::SOCK_REVNAT4, m::SOCK_REVNAT6];
    let mut maps = match PinnedMaps::open(dir, &names) {
        Ok(maps) if maps.missing(&names).is_empty() => maps,
        Ok(maps) => {
            metrics.sync_errors.inc();
            tracing::error!(pin_dir = %dir.display(), missing = ?maps.missing(&names), "flow maps not pinned: flows to removed endpoints will not be cleared");
            return;
        }
        Err(e) => {
            metrics.sync_errors.inc();
            tracing::error!(error = %e, "opening the flow maps: flows to removed endpoints will not be cleared");
            return;
        }
    };
    // A sweep costs the walk of every flow map whatever it holds: under steady churn the
    // janitor would take a core. Sweeps are at least MIN_GAP apart and take at most a
    // quarter of the time; requests meanwhile are merged.
    let mut pending = false;
    let mut not_before = Instant::now();
    loop {
        let first = if pending {
            match rx.recv_timeout(not_before.saturating_duration_since(Instant::now())) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            }
        };
        for r in first.into_iter().chain(rx.try_iter()) {
            pending |= r.sweep;
            match r.job {
                Job::Replace(all) => {
                    index = Index::default();
                    for (k, s) in all {
                        index.set(k, Some(s));
                    }
                }
                Job::Update(update) => {
                    for (k, s) in update {
                        index.set(k, s);
                    }
                }
            }
        }
        if pending && Instant::now() >= not_before {
            let started = Instant::now();
            clear(&mut maps, &index, dir, metrics);
            not_before = Instant::now() + MIN_GAP.max(started.elapsed() * 3);
            pending = false;
        }
    }
}

/// The ports' summaries, with the live endpoints per service port id and the ids behind
/// each frontend kept up to date as they change (not rebuilt for every sweep: a million
/// endpoints at 100k services).
#[derive(Default)]
struct Index {
    /// Each port's id and frontends (to take it out of `fronts` again); its live endpoints
    /// are kept once, in `live`.
    ports: HashMap<ServicePortKey, (u32, Box<[Endpoint]>)>,
    live: LiveEndpoints,
    fronts: socks::Frontends,
}

impl Index {
    fn set(&mut self, k: ServicePortKey, s: Option<PortSummary>) {
        if let Some((id, frontends)) = self.ports.remove(&k) {
            self.live.0.remove(&id);
            for f in &frontends {
                if let Some(ids) = self.fronts.0.get_mut(f) {
                    ids.retain(|x| *x != id);
                    if ids.is_empty() {
                        self.fronts.0.remove(f);
                    }
                }
            }
        }
        if let Some(s) = s {
            self.live.set(s.service_id, s.live);
            for f in &s.frontends {
                self.fronts.0.entry(*f).or_default().push(s.service_id);
            }
            self.ports
                .insert(k, (s.service_id, s.frontends.into_boxed_slice()));
        }
    }
}

fn clear(maps: &mut PinnedMaps, index: &Index, dir: &Path, metrics: &Metrics) {
    let live = &index.live;
    let started = Instant::now();
    let swept = ct::sweep_map::<Ct4Value>(maps, m::CT4, live)
        .and_then(|v4| Ok((v4, ct::sweep_map::<Ct6Value>(maps, m::CT6, live)?)));
    metrics
        .conntrack_duration
        .observe(started.elapsed().as_secs_f64());
    match swept {
        Ok((v4, v6)) => {
            if v4 + v6 > 0 {
                tracing::info!(
                    flows = v4 + v6,
                    "deleted flows to removed endpoints from the tc flow maps"
                );
                metrics.conntrack_deleted(false, v4);
                metrics.conntrack_deleted(true, v6);
            }
        }
        Err(e) => {
            metrics.sync_errors.inc();
            tracing::error!(error = %e, "clearing flows to removed endpoints (retried after the next change)");
        }
    }
    destroy_stale_sockets(maps, live, &index.fronts, dir, metrics);
}

/// Destroy the sockets the socket LB translated to an endpoint that is gone (see `socks`):
/// the node's, then those in pods' network namespaces. A failure is logged and counted.
fn destroy_stale_sockets(
    maps: &mut PinnedMaps,
    live: &LiveEndpoints,
    fronts: &socks::Frontends,
    dir: &Path,
    metrics: &Metrics,
) {
    let translated = match socks::translated(maps) {
        Ok(t) => t,
        Err(e) => {
            metrics.socket_destroy_errors.inc();
            tracing::warn!(error = %e, "reading the socket LB's translations");
            return;
        }
    };
    // Sockets of the cluster DNS Service redirected to the node-local resolver.
    let local: Vec<Endpoint> = io::open_dns_redirect(dir)
        .ok()
        .and_then(|m| m.get(&0, 0).ok())
        .filter(|r| r.addr4 != 0)
        .map(|r| ([r.addr4, 0, 0, 0], r.port))
        .into_iter()
        .collect();
    let stale = socks::stale(translated, fronts, live, &local);
    if stale.is_empty() {
        return;
    }
    let (done, found) = match socks::destroy_here(&stale) {
        Ok(r) => r,
        Err(e) => {
            metrics.socket_destroy_errors.inc();
            tracing::warn!(error = %e, "destroying sockets connected to removed endpoints (kernel without CONFIG_INET_DIAG_DESTROY?); they keep their endpoint until the application reconnects");
            return;
        }
    };
    if !done.is_empty() {
        tracing::info!(
            sockets = done.len(),
            "destroyed node sockets connected to removed endpoints; their applications reconnect"
        );
        metrics.sockets_destroyed.inc_by(done.len() as u64);
        socks::forget(maps, &done);
    }
    let rest: HashMap<u64, socks::Translated> = stale
        .into_iter()
        .filter(|(c, _)| !found.contains(c))
        .collect();
    if rest.is_empty() {
        return;
    }
    // Pods' namespaces: a few milliseconds each, here on the janitor's thread.
    let began = Instant::now();
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
    socks::forget(maps, &[d.done, d.gone].concat());
}
