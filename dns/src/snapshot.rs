//! An immutable view of the cluster zone, built from the model after every sync and swapped
//! in atomically. Every name that exists is a key (empty non-terminals with no records too),
//! so NXDOMAIN versus NODATA is a lookup.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use switchyard_model::{EndpointSlice, IpFamily, Protocol, Service, ServiceType};

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

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// False until the first sync: queries in the zone get SERVFAIL.
    pub synced: bool,
    pub cfg: ZoneConfig,
    pub names: HashMap<String, Vec<Rec>>,
    pub ptr: HashMap<IpAddr, Vec<String>>,
    /// Serial for the SOA: changes with every rebuild.
    pub serial: u32,
}

impl Snapshot {
    pub fn empty(cfg: ZoneConfig) -> Snapshot {
        Snapshot {
            synced: false,
            cfg,
            names: HashMap::new(),
            ptr: HashMap::new(),
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

    fn add(&mut self, name: String, rec: Option<Rec>) {
        // Every ancestor inside the zone exists (as an empty non-terminal at least).
        let zone_len = self.cfg.zone.len();
        let mut n = name.as_str();
        loop {
            self.names.entry(n.to_string()).or_default();
            if n.len() <= zone_len {
                break;
            }
            match n.split_once('.') {
                Some((_, rest)) if rest.len() >= zone_len => n = rest,
                _ => break,
            }
        }
        if let Some(r) = rec {
            let v = self.names.entry(name).or_default();
            if !v.contains(&r) {
                v.push(r);
            }
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &str) {
        let v = self.ptr.entry(ip).or_default();
        if !v.iter().any(|t| t == target) {
            v.push(target.to_string());
        }
    }

    /// Build the zone from the model's Services and EndpointSlices.
    pub fn build<'a>(
        cfg: ZoneConfig,
        services: impl Iterator<Item = &'a Service>,
        slices_of: impl Fn(&Service) -> Vec<&'a EndpointSlice>,
        serial: u32,
    ) -> Snapshot {
        let mut s = Snapshot::empty(cfg);
        s.synced = true;
        s.serial = serial;
        let zone = s.cfg.zone.clone();
        s.add(zone.clone(), None);
        s.add(format!("svc.{zone}"), None);
        s.add(
            format!("dns-version.{zone}"),
            Some(Rec::Txt("1.1.0".into())),
        );
        if s.cfg.pods == PodsMode::Insecure {
            s.add(format!("pod.{zone}"), None);
        }
        for svc in services {
            let ns = svc.key.namespace.to_ascii_lowercase();
            let name = format!("{}.{ns}.svc.{zone}", svc.key.name.to_ascii_lowercase());
            if svc.service_type == ServiceType::ExternalName {
                if let Some(t) = &svc.external_name {
                    s.add(name, Some(Rec::Cname(t.to_ascii_lowercase())));
                }
                continue;
            }
            s.add(name.clone(), None);
            let proto = |p: Protocol| match p {
                Protocol::Tcp => "_tcp",
                Protocol::Udp => "_udp",
                Protocol::Sctp => "_sctp",
            };
            if !svc.headless {
                for ip in &svc.cluster_ips {
                    s.add(name.clone(), Some(Rec::Addr(*ip)));
                    s.add_ptr(*ip, &name);
                }
                let named: Vec<_> = svc.ports.iter().filter(|p| !p.name.is_empty()).collect();
                for p in named {
                    s.add(
                        format!(
                            "_{}.{}.{name}",
                            p.name.to_ascii_lowercase(),
                            proto(p.protocol)
                        ),
                        Some(Rec::Srv {
                            weight: 100,
                            port: p.port,
                            target: name.clone(),
                        }),
                    );
                }
                continue;
            }
            // Headless: every ready endpoint (publishNotReadyAddresses counts), once, by name.
            let mut endpoints: BTreeSet<(String, IpAddr)> = BTreeSet::new();
            let mut srv: HashMap<String, BTreeSet<(u16, String)>> = HashMap::new();
            for slice in slices_of(svc) {
                for ep in &slice.endpoints {
                    if !(ep.ready || svc.publish_not_ready_addresses) {
                        continue;
                    }
                    let host = ep
                        .hostname
                        .as_deref()
                        .map_or_else(|| Snapshot::dashed(&ep.address), str::to_ascii_lowercase);
                    let ep_name = format!("{host}.{name}");
                    endpoints.insert((ep_name.clone(), ep.address));
                    for p in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                        srv.entry(format!(
                            "_{}.{}.{name}",
                            p.name.to_ascii_lowercase(),
                            proto(p.protocol)
                        ))
                        .or_default()
                        .insert((p.port, ep_name.clone()));
                    }
                }
            }
            for (ep_name, ip) in &endpoints {
                s.add(name.clone(), Some(Rec::Addr(*ip)));
                s.add(ep_name.clone(), Some(Rec::Addr(*ip)));
                s.add_ptr(*ip, ep_name);
            }
            for (srv_name, targets) in srv {
                let weight = u16::try_from(100 / targets.len().max(1))
                    .unwrap_or(1)
                    .max(1);
                for (port, target) in targets {
                    s.add(
                        srv_name.clone(),
                        Some(Rec::Srv {
                            weight,
                            port,
                            target,
                        }),
                    );
                }
            }
        }
        for v in s.names.values_mut() {
            v.sort();
        }
        s
    }

    pub fn family_matches(rec: &Rec, family: IpFamily) -> bool {
        matches!(rec, Rec::Addr(a) if IpFamily::of(a) == family)
    }
}
