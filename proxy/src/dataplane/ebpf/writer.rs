//! The reconciler between the desired state and the service maps.
//!
//! `apply` touches only the service ports in the ChangeSet. `full_sync` dumps the maps, adopts
//! the ids a previous run left there (so a restart keeps affinity and does not churn), and
//! writes exactly the difference, which also repairs drift.
//!
//! Order of writes for one port, so a lookup never sees a dangling or half-written entry:
//! backends and source ranges first; then each changed set gets its new slots at the other
//! base, the set entry is flipped, and the old slots are deleted; then frontends are written;
//! then removed frontends, sets, ranges and backends are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use switchyard_ebpf_common::{
    Config, Config6, Frontend4Key, Frontend6Key, FrontendValue, SLOT_BASE_A, SLOT_BASE_B, SetValue,
    SlotKey,
};
use switchyard_model::{ChangeSet, DesiredState, ServicePortKey, ServicePortState};

use super::io::{Dump, MapError, MapIo, Op};
use super::render::{Allocator, Exhausted, PortRender, RenderConfig, SetSpec, render_port};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    /// Slots live at once (both halves of a set being replaced count).
    pub slots: u32,
}

/// Node-wide settings written to the config and cluster-CIDR maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Globals {
    pub masquerade_all: bool,
    pub cluster_cidrs4: Vec<(u32, u8)>,
    pub cluster_cidrs6: Vec<([u32; 4], u8)>,
}

/// A service port that could not be programmed for lack of capacity; its previous state
/// (if any) stays programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityError {
    pub service_port: String,
    pub reason: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub capacity_errors: Vec<CapacityError>,
    pub writes: usize,
}

pub struct Writer<M> {
    pub io: M,
    alloc: Allocator,
    cfg: RenderConfig,
    cap: Capacity,
    globals: Globals,
    /// What is programmed for each port (shared with a periodic check's snapshot).
    ports: HashMap<ServicePortKey, Arc<PortRender>>,
    /// Current slot base of each programmed set.
    bases: HashMap<u32, u32>,
    live_slots: u64,
    adopted: bool,
    config: Option<Config>,
    config6: Option<Config6>,
    /// Service ports left unprogrammed (or at their previous state) for lack of capacity,
    /// with the reason; retried by their next change and by every full sync.
    unprogrammed: BTreeMap<String, String>,
    /// Ports newly left unprogrammed in the current pass: logged one by one up to
    /// `LOG_EACH`, the rest counted (by reason) for one summary line at the pass's end.
    newly_unprogrammed: usize,
    unlogged: BTreeMap<String, usize>,
    /// The writes made while a dump is read without the writer (`start_journal`), to bring
    /// that dump up to date before a full sync uses it; with the journal's id.
    journal: Option<(u64, Vec<Op>)>,
    journals: u64,
}

impl<M> std::fmt::Debug for Writer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("ports", &self.ports.len())
            .field("live_slots", &self.live_slots)
            .finish_non_exhaustive()
    }
}

/// How many newly unprogrammed ports one pass logs one by one; past it, one summary line
/// (at 100k services with maps for 64k that is tens of thousands of ports).
const LOG_EACH: usize = 10;

/// The most writes a journal holds (about 50 MB); see `Writer::start_journal`.
const JOURNAL_MAX: usize = 1 << 20;

fn other_base(b: u32) -> u32 {
    if b == SLOT_BASE_A {
        SLOT_BASE_B
    } else {
        SLOT_BASE_A
    }
}

fn set_value(s: &SetSpec, base: u32) -> SetValue {
    SetValue {
        count: u32::try_from(s.slots.len()).unwrap_or(u32::MAX),
        slot_base: base,
        flags: s.flags,
        affinity_timeout: s.affinity_timeout,
        service_id: s.service_id,
        pad: 0,
    }
}

fn slot(set: u32, base: u32, i: usize) -> SlotKey {
    SlotKey {
        set_id: set,
        slot: base + u32::try_from(i).unwrap_or(0),
    }
}

fn node_ipv6(state: &DesiredState) -> [u32; 4] {
    state
        .node_addresses
        .iter()
        .find_map(|a| match a {
            IpAddr::V6(v) if !v.is_unicast_link_local() && !v.is_loopback() => {
                Some(super::render::addr6(*v))
            }
            _ => None,
        })
        .unwrap_or([0; 4])
}

fn node_ipv4(state: &DesiredState) -> u32 {
    state
        .node_addresses
        .iter()
        .find_map(|a| match a {
            IpAddr::V4(v) => Some(super::render::addr4(*v)),
            IpAddr::V6(_) => None,
        })
        .unwrap_or(0)
}

impl<M: MapIo> Writer<M> {
    pub fn new(io: M, cfg: RenderConfig, cap: Capacity, globals: Globals) -> Self {
        Writer {
            io,
            alloc: Allocator::new(cap.services, cap.backends),
            cfg,
            cap,
            globals,
            ports: HashMap::new(),
            bases: HashMap::new(),
            live_slots: 0,
            adopted: false,
            config: None,
            config6: None,
            unprogrammed: BTreeMap::new(),
            newly_unprogrammed: 0,
            unlogged: BTreeMap::new(),
            journal: None,
            journals: 0,
        }
    }

    /// Record every write from now on, for a dump read elsewhere meanwhile (a periodic full
    /// sync reads the maps without holding the writer, so changes keep landing): returns
    /// the id `full_sync_prepared` takes with that dump.
    pub fn start_journal(&mut self) -> u64 {
        self.journals += 1;
        self.journal = Some((self.journals, Vec::new()));
        self.journals
    }

    /// Under the writer, when the maps read since `start_journal` returned `journal` are
    /// in: freeze what that read is to be compared with (what is programmed now, and the
    /// writes made since the read began), and begin a new journal from this moment. The
    /// comparison (`Snapshot::check`) then runs without the writer. `None` (nothing taken)
    /// when the read is stale (a full sync ran meanwhile) or a check cannot stand in for a
    /// full sync: ports left unprogrammed are retried only by one.
    pub fn snapshot(&mut self, journal: u64) -> Option<Snapshot> {
        let current = self.journal.as_ref().is_some_and(|(id, _)| *id == journal);
        if !current || !self.adopted || !self.unprogrammed.is_empty() {
            return None;
        }
        let (config, config6) = (self.config?, self.config6?);
        let (_, ops) = self.journal.take()?;
        let journal = self.start_journal();
        Some(Snapshot {
            renders: self.ports.values().map(Arc::clone).collect(),
            bases: self.bases.clone(),
            config,
            config6,
            globals: self.globals.clone(),
            ops,
            journal,
        })
    }

    /// The end of a periodic full sync checked without the writer (`snapshot`): when the
    /// maps held exactly what was programmed, only `changes` (what the state gained since
    /// the last sync) are programmed, and the result says so (`true`); otherwise a full
    /// sync from the read repairs the maps.
    pub fn full_sync_checked(
        &mut self,
        state: &DesiredState,
        changes: &ChangeSet,
        checked: Checked,
    ) -> Result<(Report, bool), MapError> {
        match checked {
            Checked::Clean { journal }
                if self.journal.as_ref().is_some_and(|(id, _)| *id == journal) =>
            {
                self.journal = None;
                Ok((self.apply(changes, state)?, true))
            }
            Checked::Clean { .. } => Ok((self.full_sync(state)?, false)),
            Checked::Drift {
                journal,
                dump,
                writes,
            } => {
                tracing::warn!(
                    writes,
                    "the service maps differ from what was programmed; a full sync repairs them"
                );
                Ok((self.full_sync_prepared(state, journal, *dump)?, false))
            }
        }
    }

    /// Note a port that did not fit, logging it only the first time.
    fn not_programmed(&mut self, key: &ServicePortKey, reason: &Exhausted, report: &mut Report) {
        let (port, reason) = (key.to_string(), reason.to_string());
        if self.unprogrammed.get(&port) != Some(&reason) {
            self.newly_unprogrammed += 1;
            if self.newly_unprogrammed <= LOG_EACH {
                tracing::error!(service_port = %port, %reason, "cannot program service: map capacity exhausted; its previous state (if any) stays");
            } else {
                *self.unlogged.entry(reason.clone()).or_default() += 1;
            }
        }
        report.capacity_errors.push(CapacityError {
            service_port: port.clone(),
            reason: reason.clone(),
        });
        self.unprogrammed.insert(port, reason);
    }

    /// The end of a pass: one line for the newly unprogrammed ports not logged one by one.
    fn summarise_unprogrammed(&mut self) {
        let (shown, unlogged) = (
            std::mem::take(&mut self.newly_unprogrammed).min(LOG_EACH),
            std::mem::take(&mut self.unlogged),
        );
        for (reason, count) in unlogged {
            tracing::error!(
                count,
                %reason,
                total_unprogrammed = self.unprogrammed.len(),
                "cannot program {count} more service ports (beyond the {shown} above): map capacity exhausted; their previous state (if any) stays"
            );
        }
    }

    /// The service ports not programmed for lack of capacity right now, with the reason.
    pub fn unprogrammed(&self) -> &BTreeMap<String, String> {
        &self.unprogrammed
    }

    fn write(&mut self, op: &Op, report: &mut Report) -> Result<(), MapError> {
        report.writes += 1;
        if let Some((_, j)) = &mut self.journal {
            // Bounded: a dump nobody takes must not grow it forever (the full sync that
            // would have used it then reads the maps again).
            if j.len() < JOURNAL_MAX {
                j.push(op.clone());
            } else {
                self.journal = None;
            }
        }
        self.io.write(op)
    }

    fn config_for(&self, state: &DesiredState) -> Config {
        Config {
            snat_addr4: node_ipv4(state),
            masquerade_all: u32::from(self.globals.masquerade_all),
        }
    }

    fn ensure_config(&mut self, state: &DesiredState, report: &mut Report) -> Result<(), MapError> {
        let c = self.config_for(state);
        if self.config != Some(c) {
            self.write(&Op::PutConfig(c), report)?;
            self.config = Some(c);
        }
        let c6 = Config6 {
            snat_addr6: node_ipv6(state),
        };
        if self.config6 != Some(c6) {
            self.write(&Op::PutConfig6(c6), report)?;
            self.config6 = Some(c6);
        }
        Ok(())
    }

    /// Render one port, checking slot capacity; on failure nothing is kept allocated beyond
    /// what the port's previous render holds.
    fn render(
        &mut self,
        s: &ServicePortState,
        old: Option<&PortRender>,
    ) -> Result<PortRender, Exhausted> {
        let _span = tracing::trace_span!("service_port", port = %s.key).entered();
        let (attempt, reason) = match render_port(s, &mut self.alloc, &self.cfg) {
            Ok(r) => {
                let old_slots: u64 =
                    old.map_or(0, |o| o.sets.iter().map(|s| s.slots.len() as u64).sum());
                let new_slots: u64 = r.sets.iter().map(|s| s.slots.len() as u64).sum();
                // While a set is replaced both halves are live.
                if self.live_slots.saturating_sub(old_slots) + 2 * new_slots
                    <= u64::from(self.cap.slots)
                {
                    return Ok(r);
                }
                let slots = Exhausted {
                    what: "slot",
                    limit: self.cap.slots,
                };
                (r, slots)
            }
            Err(e) => (self.alloc.port_ids(&s.key), e),
        };
        self.alloc.release_unused(&s.key, &attempt, old);
        Err(reason)
    }

    /// Program one port's change. `new` is `None` when the port went away.
    fn apply_port(
        &mut self,
        key: &ServicePortKey,
        new: Option<&ServicePortState>,
        report: &mut Report,
    ) -> Result<(), MapError> {
        let old = self.ports.get(key).map(Arc::clone);
        let new_r = match new {
            Some(s) => match self.render(s, old.as_deref()) {
                Ok(r) => Some(r),
                Err(reason) => {
                    self.not_programmed(key, &reason, report);
                    return Ok(());
                }
            },
            None => None,
        };
        if !self.unprogrammed.is_empty() {
            self.unprogrammed.remove(&key.to_string());
        }
        let empty = PortRender::default();
        let o = old.as_deref().unwrap_or(&empty);
        let n = new_r.as_ref().unwrap_or(&empty);

        // 1. Backends and source ranges the new state references.
        let old_backends: HashMap<u32, _> = o
            .sets
            .iter()
            .flat_map(|s| s.backends.iter().copied())
            .collect();
        for s in &n.sets {
            for (id, v) in &s.backends {
                if old_backends.get(id) != Some(v) {
                    self.write(&Op::PutBackend(*id, *v), report)?;
                }
            }
        }
        for r in &n.ranges4 {
            if !o.ranges4.contains(r) {
                self.write(&Op::PutRange4(r.0, r.1, r.2), report)?;
            }
        }
        for r in &n.ranges6 {
            if !o.ranges6.contains(r) {
                self.write(&Op::PutRange6(r.0, r.1, r.2), report)?;
            }
        }
        // 2. Sets: new slots, flip, delete old slots.
        for s in &n.sets {
            let prev = o.sets.iter().find(|x| x.id == s.id);
            let base = self.bases.get(&s.id).copied();
            match (prev, base) {
                (Some(p), Some(b)) if p.slots == s.slots => {
                    if p.flags != s.flags
                        || p.affinity_timeout != s.affinity_timeout
                        || p.service_id != s.service_id
                    {
                        self.write(&Op::PutSet(s.id, set_value(s, b)), report)?;
                    }
                }
                (prev, base) => {
                    let nb = base.map_or(SLOT_BASE_A, other_base);
                    for (i, be) in s.slots.iter().enumerate() {
                        self.write(&Op::PutSlot(slot(s.id, nb, i), *be), report)?;
                    }
                    self.write(&Op::PutSet(s.id, set_value(s, nb)), report)?;
                    if let (Some(p), Some(b)) = (prev, base) {
                        for i in 0..p.slots.len() {
                            self.write(&Op::DelSlot(slot(s.id, b, i)), report)?;
                        }
                        self.live_slots -= p.slots.len() as u64;
                    }
                    self.live_slots += s.slots.len() as u64;
                    self.bases.insert(s.id, nb);
                }
            }
        }
        // 3. Frontends.
        let old_fe4: HashMap<Frontend4Key, FrontendValue> = o.frontends4.iter().copied().collect();
        let old_fe6: HashMap<Frontend6Key, FrontendValue> = o.frontends6.iter().copied().collect();
        for (k, v) in &n.frontends4 {
            if old_fe4.get(k) != Some(v) {
                self.write(&Op::PutFrontend4(*k, *v), report)?;
            }
        }
        for (k, v) in &n.frontends6 {
            if old_fe6.get(k) != Some(v) {
                self.write(&Op::PutFrontend6(*k, *v), report)?;
            }
        }
        // 4. Removals, in reverse dependency order.
        let new_fe4: BTreeSet<Frontend4Key> = n.frontends4.iter().map(|(k, _)| *k).collect();
        let new_fe6: BTreeSet<Frontend6Key> = n.frontends6.iter().map(|(k, _)| *k).collect();
        for (k, _) in &o.frontends4 {
            if !new_fe4.contains(k) {
                self.write(&Op::DelFrontend4(*k), report)?;
            }
        }
        for (k, _) in &o.frontends6 {
            if !new_fe6.contains(k) {
                self.write(&Op::DelFrontend6(*k), report)?;
            }
        }
        for p in &o.sets {
            if !n.sets.iter().any(|s| s.id == p.id) {
                self.write(&Op::DelSet(p.id), report)?;
                if let Some(b) = self.bases.remove(&p.id) {
                    for i in 0..p.slots.len() {
                        self.write(&Op::DelSlot(slot(p.id, b, i)), report)?;
                    }
                    self.live_slots -= p.slots.len() as u64;
                }
            }
        }
        for r in &o.ranges4 {
            if !n.ranges4.contains(r) {
                self.write(&Op::DelRange4(r.0, r.1, r.2), report)?;
            }
        }
        for r in &o.ranges6 {
            if !n.ranges6.contains(r) {
                self.write(&Op::DelRange6(r.0, r.1, r.2), report)?;
            }
        }
        let new_backends: BTreeSet<u32> = n.backend_ids().collect();
        for id in o.backend_ids() {
            if !new_backends.contains(&id) {
                self.write(&Op::DelBackend(id), report)?;
            }
        }
        if let Some(old) = &old {
            self.alloc.release_unused(key, old, new_r.as_ref());
        }
        match new_r {
            Some(r) => {
                self.ports.insert(key.clone(), Arc::new(r));
            }
            None => {
                self.ports.remove(key);
            }
        }
        Ok(())
    }

    /// Program a ChangeSet: work proportional to the change.
    pub fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<Report, MapError> {
        let mut report = Report::default();
        self.ensure_config(state, &mut report)?;
        for r in &changes.removed {
            self.apply_port(&r.key, None, &mut report)?;
        }
        for c in &changes.changed {
            self.apply_port(&c.new.key, Some(&c.new), &mut report)?;
        }
        for a in &changes.added {
            self.apply_port(&a.key, Some(a), &mut report)?;
        }
        self.summarise_unprogrammed();
        Ok(report)
    }

    /// Re-adopt ids found in the maps for the ports of `state`.
    fn adopt(&mut self, state: &DesiredState, dump: &Dump) {
        let mut trial = Allocator::new(self.cap.services, self.cap.backends);
        let backend_ids: HashMap<(u32, [u32; 4], u16), u32> = dump
            .backends
            .iter()
            .map(|(id, v)| ((v.set_id, v.addr, v.port), *id))
            .collect();
        let mut adopted = 0usize;
        for s in state.values() {
            let Ok(r) = render_port(s, &mut trial, &self.cfg) else {
                continue;
            };
            let mut map_set: HashMap<u32, u32> = HashMap::new();
            for (k, v) in &r.frontends4 {
                if let Some(kv) = dump.frontends4.get(k) {
                    map_set.insert(v.set_id, kv.set_id);
                }
            }
            for (k, v) in &r.frontends6 {
                if let Some(kv) = dump.frontends6.get(k) {
                    map_set.insert(v.set_id, kv.set_id);
                }
            }
            for set in &r.sets {
                let Some(kid) = map_set.get(&set.id).copied() else {
                    continue;
                };
                if !self.alloc.adopt_set(&s.key, set.view, kid) {
                    continue;
                }
                adopted += 1;
                if let Some(kv) = dump.sets.get(&kid) {
                    self.alloc.adopt_service(&s.key, kv.service_id);
                }
                for (_, b) in &set.backends {
                    if let Some(bid) = backend_ids.get(&(kid, b.addr, b.port)) {
                        self.alloc.adopt_backend(
                            kid,
                            super::render::backend_addr(b),
                            u16::from_be(b.port),
                            *bid,
                        );
                    }
                }
            }
        }
        if adopted > 0 {
            tracing::info!(
                sets = adopted,
                "re-adopted backend sets left in the pinned maps"
            );
        }
    }

    /// Make the maps hold exactly `state`.
    pub fn full_sync(&mut self, state: &DesiredState) -> Result<Report, MapError> {
        self.journal = None;
        let dump = self.io.dump()?;
        self.full_sync_from(state, &dump)
    }

    /// A full sync from `dump`, read without the writer since `start_journal` returned
    /// `journal`: the writes made meanwhile are replayed onto it first (each write sets or
    /// removes one whole entry, so for every entry they touched the last one is what the
    /// kernel holds; a hash-map walk misses no entry that was not touched). When that
    /// journal is no longer the current one (a full sync ran meanwhile), the dump is
    /// dropped and the maps read again.
    pub fn full_sync_prepared(
        &mut self,
        state: &DesiredState,
        journal: u64,
        mut dump: Dump,
    ) -> Result<Report, MapError> {
        match self.journal.take() {
            Some((id, ops)) if id == journal => {
                for op in &ops {
                    dump.apply(op);
                }
                self.full_sync_from(state, &dump)
            }
            _ => self.full_sync(state),
        }
    }

    fn full_sync_from(&mut self, state: &DesiredState, dump: &Dump) -> Result<Report, MapError> {
        let mut report = Report::default();
        if !self.adopted {
            // Empty maps (a node's first start) have nothing to adopt: no trial render.
            if !dump.frontends4.is_empty() || !dump.frontends6.is_empty() {
                self.adopt(state, dump);
            }
            self.adopted = true;
        }

        // Render everything (keeping what was programmed for ports that no longer fit). The
        // previous renders are moved out, not cloned: what is left of them afterwards is the
        // ports that went away.
        let mut previous = std::mem::take(&mut self.ports);
        let mut desired: HashMap<ServicePortKey, Arc<PortRender>> =
            HashMap::with_capacity(state.len());
        let mut failed = BTreeSet::new();
        self.live_slots = 0;
        for s in state.values() {
            let old = previous.remove(&s.key);
            match self.render(s, old.as_deref()) {
                Ok(r) => {
                    self.live_slots += r.sets.iter().map(|x| x.slots.len() as u64).sum::<u64>();
                    desired.insert(s.key.clone(), Arc::new(r));
                }
                Err(reason) => {
                    self.not_programmed(&s.key, &reason, &mut report);
                    failed.insert(s.key.to_string());
                    if let Some(o) = old {
                        desired.insert(s.key.clone(), o);
                    }
                }
            }
        }
        for (k, old) in &previous {
            self.alloc.release_unused(k, old, None);
        }
        drop(previous);
        self.unprogrammed.retain(|k, _| failed.contains(k));

        // Global settings, then every map entry: write exactly the difference.
        let c = self.config_for(state);
        let c6 = Config6 {
            snat_addr6: node_ipv6(state),
        };
        let globals = self.globals.clone();
        let mut bases = HashMap::with_capacity(desired.len());
        plan(
            dump,
            &Wanted {
                renders: desired.values().map(|r| &**r),
                config: c,
                config6: c6,
                globals: &globals,
            },
            &mut bases,
            &mut |op| self.write(op, &mut report),
        )?;
        self.config = Some(c);
        self.config6 = Some(c6);
        self.bases = bases;
        self.ports = desired;
        self.summarise_unprogrammed();
        Ok(report)
    }

    /// What is programmed for a port (for `switchyard` inspection and tests).
    pub fn port(&self, key: &ServicePortKey) -> Option<&PortRender> {
        self.ports.get(key).map(|p| &**p)
    }

    /// (map, entries in use, capacity): service ports programmed, and backend slots live.
    pub fn fill(&self) -> [(&'static str, u64, u64); 2] {
        [
            (
                "services",
                self.ports.len() as u64,
                u64::from(self.cap.services),
            ),
            ("slots", self.live_slots, u64::from(self.cap.slots)),
        ]
    }

    pub fn ports(&self) -> impl Iterator<Item = (&ServicePortKey, &PortRender)> {
        self.ports.iter().map(|(k, p)| (k, &**p))
    }
}

/// What a periodic check compares a read of the maps with (see `Writer::snapshot`).
pub struct Snapshot {
    renders: Vec<Arc<PortRender>>,
    bases: HashMap<u32, u32>,
    config: Config,
    config6: Config6,
    globals: Globals,
    /// The writes made between the read's start and the snapshot.
    ops: Vec<Op>,
    /// The journal begun at the snapshot.
    journal: u64,
}

/// A periodic check's outcome.
#[derive(Debug)]
pub enum Checked {
    /// The maps held exactly what was programmed at the snapshot.
    Clean { journal: u64 },
    /// They did not: a full sync from `dump` (the read brought up to the snapshot) would
    /// make `writes` writes (or none, when only the writer's idea of a set's live slot half
    /// was wrong).
    Drift {
        journal: u64,
        dump: Box<Dump>,
        writes: usize,
    },
}

impl Snapshot {
    /// Compare `dump` (read since the journal the snapshot ended began) with the snapshot:
    /// the same plan a full sync makes, with its writes counted instead of made.
    pub fn check(self, mut dump: Dump) -> Checked {
        for op in &self.ops {
            dump.apply(op);
        }
        let mut bases = HashMap::with_capacity(self.bases.len());
        let mut writes = 0usize;
        let Ok(()) = plan::<std::convert::Infallible>(
            &dump,
            &Wanted {
                renders: self.renders.iter().map(|r| &**r),
                config: self.config,
                config6: self.config6,
                globals: &self.globals,
            },
            &mut bases,
            &mut |_| {
                writes += 1;
                Ok(())
            },
        );
        if writes == 0 && bases == self.bases {
            Checked::Clean {
                journal: self.journal,
            }
        } else {
            Checked::Drift {
                journal: self.journal,
                dump: Box::new(dump),
                writes,
            }
        }
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("ports", &self.renders.len())
            .field("ops", &self.ops.len())
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

/// What the maps should hold: every port's render and the node-wide settings.
struct Wanted<'a, I> {
    renders: I,
    config: Config,
    config6: Config6,
    globals: &'a Globals,
}

/// Every write that makes the maps read as `dump` hold exactly `wanted`, in an order that
/// never exposes a dangling entry: backends, ranges, sets (slots then flip), frontends, then
/// the deletes. A set keeps its slot half when the kernel's is whole and right; otherwise it
/// is written to the other half. `bases` gets every wanted set's live half.
fn plan<'r, E>(
    dump: &Dump,
    wanted: &Wanted<'_, impl Iterator<Item = &'r PortRender> + Clone>,
    bases: &mut HashMap<u32, u32>,
    write: &mut dyn FnMut(&Op) -> Result<(), E>,
) -> Result<(), E> {
    let (c, c6) = (wanted.config, wanted.config6);
    if dump.config != c {
        write(&Op::PutConfig(c))?;
    }
    let cidrs: BTreeSet<(u32, u8)> = wanted.globals.cluster_cidrs4.iter().copied().collect();
    for c in cidrs.difference(&dump.local_cidrs4) {
        write(&Op::PutLocalCidr4(c.0, c.1))?;
    }
    for c in dump.local_cidrs4.difference(&cidrs) {
        write(&Op::DelLocalCidr4(c.0, c.1))?;
    }
    if dump.config6 != c6 {
        write(&Op::PutConfig6(c6))?;
    }
    let cidrs6: BTreeSet<([u32; 4], u8)> = wanted.globals.cluster_cidrs6.iter().copied().collect();
    for c in cidrs6.difference(&dump.local_cidrs6) {
        write(&Op::PutLocalCidr6(c.0, c.1))?;
    }
    for c in dump.local_cidrs6.difference(&cidrs6) {
        write(&Op::DelLocalCidr6(c.0, c.1))?;
    }

    // Hash maps with the room they need: a million B-tree inserts and lookups were most of
    // a 100k sync.
    let renders = wanted.renders.clone();
    let (ports, backends) = renders
        .clone()
        .fold((0, 0), |(p, b), r| (p + 1, b + r.backend_ids().count()));
    let mut want_backends = HashMap::with_capacity(backends);
    let mut want_ranges = HashSet::new();
    let mut want_ranges6 = HashSet::new();
    let mut want_fe4 = HashMap::with_capacity(ports * 2);
    let mut want_fe6 = HashMap::new();
    let mut want_sets: HashMap<u32, &SetSpec> = HashMap::with_capacity(ports);
    for r in renders {
        for s in &r.sets {
            want_sets.insert(s.id, s);
            for (id, v) in &s.backends {
                want_backends.insert(*id, *v);
            }
        }
        want_ranges.extend(r.ranges4.iter().copied());
        want_ranges6.extend(r.ranges6.iter().copied());
        want_fe4.extend(r.frontends4.iter().copied());
        want_fe6.extend(r.frontends6.iter().copied());
    }
    for (id, v) in &want_backends {
        if dump.backends.get(id) != Some(v) {
            write(&Op::PutBackend(*id, *v))?;
        }
    }
    for r in &want_ranges {
        if !dump.ranges4.contains(r) {
            write(&Op::PutRange4(r.0, r.1, r.2))?;
        }
    }
    for r in &want_ranges6 {
        if !dump.ranges6.contains(r) {
            write(&Op::PutRange6(r.0, r.1, r.2))?;
        }
    }
    bases.clear();
    for (id, s) in &want_sets {
        let kernel = dump.sets.get(id);
        let live_ok = kernel.is_some_and(|k| {
            k.count as usize == s.slots.len()
                && s.slots
                    .iter()
                    .enumerate()
                    .all(|(i, be)| dump.slots.get(&slot(*id, k.slot_base, i)) == Some(be))
        });
        let base = match kernel {
            Some(k) if live_ok => {
                if *k != set_value(s, k.slot_base) {
                    write(&Op::PutSet(*id, set_value(s, k.slot_base)))?;
                }
                k.slot_base
            }
            _ => {
                let nb = kernel.map_or(SLOT_BASE_A, |k| other_base(k.slot_base));
                for (i, be) in s.slots.iter().enumerate() {
                    write(&Op::PutSlot(slot(*id, nb, i), *be))?;
                }
                write(&Op::PutSet(*id, set_value(s, nb)))?;
                nb
            }
        };
        bases.insert(*id, base);
    }
    // A slot is wanted when it lies in its set's live half (no map of every slot).
    let wanted_slot = |k: &SlotKey| {
        want_sets.get(&k.set_id).is_some_and(|s| {
            bases
                .get(&k.set_id)
                .is_some_and(|b| k.slot >= *b && ((k.slot - b) as usize) < s.slots.len())
        })
    };
    for (k, v) in &want_fe4 {
        if dump.frontends4.get(k) != Some(v) {
            write(&Op::PutFrontend4(*k, *v))?;
        }
    }
    for (k, v) in &want_fe6 {
        if dump.frontends6.get(k) != Some(v) {
            write(&Op::PutFrontend6(*k, *v))?;
        }
    }
    // Deletes: whatever the maps hold beyond the wanted state.
    for k in dump.frontends4.keys() {
        if !want_fe4.contains_key(k) {
            write(&Op::DelFrontend4(*k))?;
        }
    }
    for k in dump.frontends6.keys() {
        if !want_fe6.contains_key(k) {
            write(&Op::DelFrontend6(*k))?;
        }
    }
    for k in dump.sets.keys() {
        if !want_sets.contains_key(k) {
            write(&Op::DelSet(*k))?;
        }
    }
    for k in dump.slots.keys() {
        if !wanted_slot(k) {
            write(&Op::DelSlot(*k))?;
        }
    }
    for r in &dump.ranges4 {
        if !want_ranges.contains(r) {
            write(&Op::DelRange4(r.0, r.1, r.2))?;
        }
    }
    for r in &dump.ranges6 {
        if !want_ranges6.contains(r) {
            write(&Op::DelRange6(r.0, r.1, r.2))?;
        }
    }
    for k in dump.backends.keys() {
        if !want_backends.contains_key(k) {
            write(&Op::DelBackend(*k))?;
        }
    }
    Ok(())
}
