//! An immutable view of the cluster zone, kept up to date service by service from the store
//! and swapped in atomically. Every name that exists is a key (empty non-terminals with no records too),
//! so NXDOMAIN versus NODATA is a lookup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use switchyard_model::{EndpointSlice, IpFamily, Protocol, Service, ServiceKey, ServiceType};

/// Record data in the zone, targets as lowercase names without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rec {
    Addr(IpAddr),
    Cname(String),
    Srv {
        weight: u16,
        port: u16,
        target: String,
    },
    Txt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodsMode {
    Disabled,
    Insecure,
}

#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// Lowercase, no trailing dot (e.g. `cluster.local`).
    pub zone: String,
    pub ttl: u32,
    pub pods: PodsMode,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            zone: "cluster.local".into(),
            ttl: 5,
            pods: PodsMode::Disabled,
        }
    }
}

/// What the server answers from: persistent maps, so publishing a new snapshot after one
/// service changed costs that service's records, not a copy of the zone.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// False until the first sync: queries in the zone get SERVFAIL.
    pub synced: bool,
    pub cfg: ZoneConfig,
    /// Names and record sets are shared with the builder's per-service index (one copy each).
    pub names: imbl::HashMap<Arc<str>, Arc<[Rec]>>,
    pub ptr: imbl::HashMap<IpAddr, Vec<Arc<str>>>,
    /// Serial for the SOA: changes with every rebuild.
    pub serial: u32,
}

/// The records one Service contributes: every name at or below `<svc>.<ns>.svc.<zone>`
/// (owned by this service alone) and its PTR targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRecords {
    /// Lowercase namespace: its `<ns>.svc.<zone>` node exists while some service is in it.
    pub namespace: String,
    pub names: BTreeMap<String, Vec<Rec>>,
    pub ptrs: Vec<(IpAddr, String)>,
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

impl ServiceRecords {
    fn add(&mut self, svc_name: &str, name: String, rec: Option<Rec>) {
        // Every ancestor up to the service name exists (as an empty non-terminal at least).
        let mut n = name.as_str();
        while n.len() > svc_name.len() {
            self.names.entry(n.to_string()).or_default();
            match n.split_once('.') {
                Some((_, rest)) => n = rest,
                None => break,
            }
        }
        self.names.entry(svc_name.to_string()).or_default();
        if let Some(r) = rec {
            let v = self.names.entry(name).or_default();
            if !v.contains(&r) {
                v.push(r);
            }
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &str) {
        if !self.ptrs.iter().any(|(a, t)| *a == ip && t == target) {
            self.ptrs.push((ip, target.to_string()));
        }
    }

    /// The records of `svc` in `zone`, from its EndpointSlices (headless services).
    pub fn of<'a>(
        zone: &str,
        svc: &Service,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> ServiceRecords {
        let ns = svc.key.namespace.to_ascii_lowercase();
        let name = format!("{}.{ns}.svc.{zone}", svc.key.name.to_ascii_lowercase());
        let mut r = ServiceRecords {
            namespace: ns,
            ..ServiceRecords::default()
        };
        if svc.service_type == ServiceType::ExternalName {
            let target = svc
                .external_name
                .as_ref()
                .map(|t| Rec::Cname(t.to_ascii_lowercase()));
            r.add(&name, name.clone(), target);
            return r;
        }
        r.add(&name, name.clone(), None);
        if !svc.headless {
            for ip in &svc.cluster_ips {
                r.add(&name, name.clone(), Some(Rec::Addr(*ip)));
                r.add_ptr(*ip, &name);
            }
            for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                r.add(
                    &name,
                    format!(
                        "_{}.{}.{name}",
                        p.name.to_ascii_lowercase(),
                        proto_label(p.protocol)
                    ),
                    Some(Rec::Srv {
                        weight: 100,
                        port: p.port,
                        target: name.clone(),
                    }),
                );
            }
            r.sort();
            return r;
        }
        // Headless: every ready endpoint (the model's readiness rule), once, by name.
        let mut endpoints: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        let mut srv: BTreeMap<String, BTreeSet<(u16, String)>> = BTreeMap::new();
        for slice in slices {
            for ep in slice.endpoints.iter().filter(|ep| svc.counts_as_ready(ep)) {
                let host = ep
                    .hostname()
                    .map_or_else(|| Snapshot::dashed(&ep.address), str::to_ascii_lowercase);
                let ep_name = format!("{host}.{name}");
                endpoints.insert((ep_name.clone(), ep.address));
                for p in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                    srv.entry(format!(
                        "_{}.{}.{name}",
                        p.name.to_ascii_lowercase(),
                        proto_label(p.protocol)
                    ))
                    .or_default()
                    .insert((p.port, ep_name.clone()));
                }
            }
        }
        for (ep_name, ip) in &endpoints {
            r.add(&name, name.clone(), Some(Rec::Addr(*ip)));
            r.add(&name, ep_name.clone(), Some(Rec::Addr(*ip)));
            r.add_ptr(*ip, ep_name);
        }
        for (srv_name, targets) in srv {
            let weight = u16::try_from(100 / targets.len().max(1))
                .unwrap_or(1)
                .max(1);
            for (port, target) in targets {
                r.add(
                    &name,
                    srv_name.clone(),
                    Some(Rec::Srv {
                        weight,
                        port,
                        target,
                    }),
                );
            }
        }
        r.sort();
        r
    }

    fn sort(&mut self) {
        for v in self.names.values_mut() {
            v.sort();
        }
    }
}

/// What the builder keeps of one service to replace it later: its names and PTRs, the very
/// `Arc`s the snapshot holds.
#[derive(Debug, Clone)]
struct Stored {
    namespace: String,
    names: Vec<(Arc<str>, Arc<[Rec]>)>,
    ptrs: Vec<(IpAddr, Arc<str>)>,
}

impl Stored {
    /// Holds exactly the records of `r`.
    fn same_as(&self, r: &ServiceRecords) -> bool {
        self.namespace == r.namespace
            && self.names.len() == r.names.len()
            && self
                .names
                .iter()
                .zip(&r.names)
                .all(|((n, v), (rn, rv))| **n == **rn && **v == **rv)
            && self.ptrs.len() == r.ptrs.len()
            && self
                .ptrs
                .iter()
                .zip(&r.ptrs)
                .all(|((a, t), (ra, rt))| a == ra && **t == **rt)
    }
}

/// Keeps the zone up to date one service at a time and publishes immutable snapshots.
#[derive(Debug, Clone)]
pub struct ZoneBuilder {
    snap: Snapshot,
    services: HashMap<ServiceKey, Stored>,
    /// Services per lowercase namespace (the `<ns>.svc.<zone>` node lives while > 0).
    namespaces: HashMap<String, usize>,
}

impl ZoneBuilder {
    pub fn new(cfg: ZoneConfig) -> ZoneBuilder {
        let mut snap = Snapshot::empty(cfg);
        let zone = snap.cfg.zone.clone();
        for n in [zone.clone(), format!("svc.{zone}")] {
            snap.names.insert(n.into(), Arc::from([]));
        }
        snap.names.insert(
            format!("dns-version.{zone}").into(),
            Arc::from([Rec::Txt("1.1.0".into())]),
        );
        if snap.cfg.pods == PodsMode::Insecure {
            snap.names
                .insert(format!("pod.{zone}").into(), Arc::from([]));
        }
        ZoneBuilder {
            snap,
            services: HashMap::new(),
            namespaces: HashMap::new(),
        }
    }

    pub fn zone(&self) -> &str {
        &self.snap.cfg.zone
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Replace the records of one service (`None`: the service is gone).
    pub fn set(&mut self, key: &ServiceKey, records: Option<ServiceRecords>) {
        if let Some(old) = self.services.remove(key) {
            if records.as_ref().is_some_and(|r| old.same_as(r)) {
                self.services.insert(key.clone(), old);
                return;
            }
            for (n, _) in &old.names {
                self.snap.names.remove(&**n);
            }
            for (ip, t) in &old.ptrs {
                if let Some(v) = self.snap.ptr.get_mut(ip) {
                    v.retain(|x| x != t);
                    if v.is_empty() {
                        self.snap.ptr.remove(ip);
                    }
                }
            }
            let ns_key = format!("{}.svc.{}", old.namespace, self.snap.cfg.zone);
            if let Some(c) = self.namespaces.get_mut(&old.namespace) {
                *c -= 1;
                if *c == 0 {
                    self.namespaces.remove(&old.namespace);
                    self.snap.names.remove(ns_key.as_str());
                }
            }
        }
        let Some(new) = records else { return };
        let names: Vec<(Arc<str>, Arc<[Rec]>)> = new
            .names
            .into_iter()
            .map(|(n, recs)| (Arc::from(n), Arc::from(recs)))
            .collect();
        for (n, recs) in &names {
            self.snap.names.insert(Arc::clone(n), Arc::clone(recs));
        }
        let mut ptrs = Vec::with_capacity(new.ptrs.len());
        for (ip, t) in new.ptrs {
            // A PTR target is one of the service's own names: share that copy.
            let t = names
                .iter()
                .find(|(n, _)| **n == *t)
                .map_or_else(|| Arc::from(t), |(n, _)| Arc::clone(n));
            let v = self.snap.ptr.entry(ip).or_default();
            v.push(Arc::clone(&t));
            v.sort();
            ptrs.push((ip, t));
        }
        let c = self.namespaces.entry(new.namespace.clone()).or_default();
        if *c == 0 {
            let ns_key = format!("{}.svc.{}", new.namespace, self.snap.cfg.zone);
            self.snap.names.insert(ns_key.into(), Arc::from([]));
        }
        *c += 1;
        self.services.insert(
            key.clone(),
            Stored {
                namespace: new.namespace,
                names,
                ptrs,
            },
        );
    }

    /// The zone as it is now, marked synced, with `serial` for its SOA.
    pub fn publish(&mut self, serial: u32) -> Snapshot {
        self.snap.synced = true;
        self.snap.serial = serial;
        self.snap.clone()
    }
}

impl Snapshot {
    pub fn empty(cfg: ZoneConfig) -> Snapshot {
        Snapshot {
            synced: false,
            cfg,
            names: imbl::HashMap::new(),
            ptr: imbl::HashMap::new(),
            serial: 0,
        }
    }

    /// The dashed form of an address used for endpoint and pod names: `10-1-2-3`, `fd00--1`.
    pub fn dashed(ip: &IpAddr) -> String {
        match ip {
            IpAddr::V4(a) => a.to_string().replace('.', "-"),
            IpAddr::V6(a) => a.to_string().replace(':', "-"),
        }
    }

    /// Build the whole zone from Services and their EndpointSlices at once.
    pub fn build<'a>(
        cfg: ZoneConfig,
        services: impl Iterator<Item = &'a Service>,
        slices_of: impl Fn(&Service) -> Vec<&'a EndpointSlice>,
        serial: u32,
    ) -> Snapshot {
        let mut b = ZoneBuilder::new(cfg);
        for svc in services {
            let recs = ServiceRecords::of(b.zone(), svc, slices_of(svc));
            b.set(&svc.key, Some(recs));
        }
        b.publish(serial)
    }

    pub fn family_matches(rec: &Rec, family: IpFamily) -> bool {
        matches!(rec, Rec::Addr(a) if IpFamily::of(a) == family)
    }
}
