//! The thin writer under the eBPF backend: put/delete/dump of the service maps behind a small
//! trait, with the real (kernel maps through aya), a fake (in-memory, with an operation log)
//! and a fault-injecting implementation.

use std::collections::BTreeSet;

use foldhash::HashMap;

use switchyard_ebpf_common::maps as m_name;

use switchyard_ebpf_common::{
    BackendValue, Cidr4, Cidr6, Config, Config6, Frontend4Key, Frontend6Key, FrontendValue,
    SetValue, SlotKey, SourceRange4, SourceRange6,
};

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {op}: {cause}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    #[source]
    pub cause: MapFault,
}

/// What went wrong with a map: the kernel's answer through aya, kept typed.
#[derive(Debug, thiserror::Error)]
pub enum MapFault {
    #[error(transparent)]
    Aya(#[from] aya::maps::MapError),
    #[error("not in the kernel object")]
    Missing,
    #[error("injected failure of write {write}")]
    Injected { write: usize },
}

/// One write to the maps; the fake records these in order, the goldens compare them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutFrontend4(Frontend4Key, FrontendValue),
    DelFrontend4(Frontend4Key),
    PutFrontend6(Frontend6Key, FrontendValue),
    DelFrontend6(Frontend6Key),
    PutSet(u32, SetValue),
    DelSet(u32),
    PutSlot(SlotKey, u32),
    DelSlot(SlotKey),
    PutBackend(u32, BackendValue),
    DelBackend(u32),
    PutRange4(u32, u32, u8),
    DelRange4(u32, u32, u8),
    PutConfig(Config),
    PutLocalCidr4(u32, u8),
    DelLocalCidr4(u32, u8),
    PutConfig6(Config6),
    PutRange6(u32, [u32; 4], u8),
    DelRange6(u32, [u32; 4], u8),
    PutLocalCidr6([u32; 4], u8),
    DelLocalCidr6([u32; 4], u8),
}

/// The content of the service maps. The big maps are hash maps: a full sync at 100k
/// services looks up two million entries in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    pub frontends4: HashMap<Frontend4Key, FrontendValue>,
    pub frontends6: HashMap<Frontend6Key, FrontendValue>,
    pub sets: HashMap<u32, SetValue>,
    pub slots: HashMap<SlotKey, u32>,
    pub backends: HashMap<u32, BackendValue>,
    pub ranges4: BTreeSet<(u32, u32, u8)>,
    pub config: Config,
    pub local_cidrs4: BTreeSet<(u32, u8)>,
    pub config6: Config6,
    pub local_cidrs6: BTreeSet<([u32; 4], u8)>,
    pub ranges6: BTreeSet<(u32, [u32; 4], u8)>,
}

impl Dump {
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutFrontend4(k, v) => {
                self.frontends4.insert(*k, *v);
            }
            Op::DelFrontend4(k) => {
                self.frontends4.remove(k);
            }
            Op::PutFrontend6(k, v) => {
                self.frontends6.insert(*k, *v);
            }
            Op::DelFrontend6(k) => {
                self.frontends6.remove(k);
            }
            Op::PutSet(k, v) => {
                self.sets.insert(*k, *v);
            }
            Op::DelSet(k) => {
                self.sets.remove(k);
            }
            Op::PutSlot(k, v) => {
                self.slots.insert(*k, *v);
            }
            Op::DelSlot(k) => {
                self.slots.remove(k);
            }
            Op::PutBackend(k, v) => {
                self.backends.insert(*k, *v);
            }
            Op::DelBackend(k) => {
                self.backends.remove(k);
            }
            Op::PutRange4(s, a, p) => {
                self.ranges4.insert((*s, *a, *p));
            }
            Op::DelRange4(s, a, p) => {
                self.ranges4.remove(&(*s, *a, *p));
            }
            Op::PutConfig(c) => self.config = *c,
            Op::PutLocalCidr4(a, p) => {
                self.local_cidrs4.insert((*a, *p));
            }
            Op::DelLocalCidr4(a, p) => {
                self.local_cidrs4.remove(&(*a, *p));
            }
            Op::PutConfig6(c) => self.config6 = *c,
            Op::PutRange6(s, a, p) => {
                self.ranges6.insert((*s, *a, *p));
            }
            Op::DelRange6(s, a, p) => {
                self.ranges6.remove(&(*s, *a, *p));
            }
            Op::PutLocalCidr6(a, p) => {
                self.local_cidrs6.insert((*a, *p));
            }
            Op::DelLocalCidr6(a, p) => {
                self.local_cidrs6.remove(&(*a, *p));
            }
        }
    }
}

pub trait MapIo: Send {
    fn write(&mut self, op: &Op) -> Result<(), MapError>;
    fn dump(&self) -> Result<Dump, MapError>;
}

/// In-memory maps that record every operation.
#[derive(Debug, Clone, Default)]
pub struct FakeMaps {
    pub content: Dump,
    pub log: Vec<Op>,
}

impl MapIo for FakeMaps {
    fn write(&mut self, op: &Op) -> Result<(), MapError> {
        self.content.apply(op);
        self.log.push(op.clone());
        Ok(())
    }
    fn dump(&self) -> Result<Dump, MapError> {
        Ok(self.content.clone())
    }
}

/// Fails the listed (1-based) write operations.
#[derive(Debug, Clone, Default)]
pub struct FaultyMaps<M> {
    pub inner: M,
    pub fail_writes: Vec<usize>,
    writes: usize,
}

impl<M> FaultyMaps<M> {
    pub fn new(inner: M, fail_writes: Vec<usize>) -> Self {
        FaultyMaps {
            inner,
            fail_writes,
            writes: 0,
        }
    }
}

impl<M: MapIo> MapIo for FaultyMaps<M> {
    fn write(&mut self, op: &Op) -> Result<(), MapError> {
        self.writes += 1;
        if self.fail_writes.contains(&self.writes) {
            return Err(MapError {
                map: "faulty",
                op: "write",
                cause: MapFault::Injected { write: self.writes },
            });
        }
        self.inner.write(op)
    }
    fn dump(&self) -> Result<Dump, MapError> {
        self.inner.dump()
    }
}

/// The real kernel maps.
pub struct AyaMaps {
    fe4: aya::maps::HashMap<aya::maps::MapData, Frontend4Key, FrontendValue>,
    fe6: aya::maps::HashMap<aya::maps::MapData, Frontend6Key, FrontendValue>,
    sets: aya::maps::HashMap<aya::maps::MapData, u32, SetValue>,
    slots: aya::maps::HashMap<aya::maps::MapData, SlotKey, u32>,
    backends: aya::maps::HashMap<aya::maps::MapData, u32, BackendValue>,
    ranges4: aya::maps::LpmTrie<aya::maps::MapData, SourceRange4, u8>,
    config: aya::maps::Array<aya::maps::MapData, Config>,
    local4: aya::maps::LpmTrie<aya::maps::MapData, Cidr4, u8>,
    config6: aya::maps::Array<aya::maps::MapData, Config6>,
    local6: aya::maps::LpmTrie<aya::maps::MapData, Cidr6, u8>,
    ranges6: aya::maps::LpmTrie<aya::maps::MapData, SourceRange6, u8>,
}

impl std::fmt::Debug for AyaMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AyaMaps")
    }
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapError {
        map: name,
        op: "open",
        cause: MapFault::Missing,
    })?;
    T::try_from(map).map_err(|e| MapError {
        map: name,
        op: "open",
        cause: MapFault::Aya(e),
    })
}

fn err(map: &'static str, op: &'static str) -> impl Fn(aya::maps::MapError) -> MapError {
    move |e| MapError {
        map,
        op,
        cause: MapFault::Aya(e),
    }
}

/// Deleting something already gone is not an error (drift, or a retried sync).
fn tolerate_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc_enoent()) =>
        {
            Ok(())
        }
        other => other,
    }
}

const fn libc_enoent() -> i32 {
    2
}

impl AyaMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<AyaMaps, MapError> {
        use switchyard_ebpf_common::maps as m;
        Ok(AyaMaps {
            fe4: take(ebpf, m::FRONTENDS4)?,
            fe6: take(ebpf, m::FRONTENDS6)?,
            sets: take(ebpf, m::SETS)?,
            slots: take(ebpf, m::SLOTS)?,
            backends: take(ebpf, m::BACKENDS)?,
            ranges4: take(ebpf, m::SOURCE_RANGES4)?,
            config: take(ebpf, m::CONFIG)?,
            local4: take(ebpf, m::LOCAL_CIDRS4)?,
            config6: take(ebpf, m::CONFIG6)?,
            local6: take(ebpf, m::LOCAL_CIDRS6)?,
            ranges6: take(ebpf, m::SOURCE_RANGES6)?,
        })
    }
}

fn pinned<T>(
    dir: &std::path::Path,
    name: &'static str,
    wrap: fn(aya::maps::MapData) -> aya::maps::Map,
) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    pinned_at(&dir.join(name), name, wrap)
}

/// The map `name` pinned at `path` (which need not be its usual place), typed.
pub(crate) fn pinned_at<T>(
    path: &std::path::Path,
    name: &'static str,
    wrap: fn(aya::maps::MapData) -> aya::maps::Map,
) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let data = aya::maps::MapData::from_pin(path).map_err(err(name, "open pin"))?;
    T::try_from(wrap(data)).map_err(err(name, "open pin"))
}

impl AyaMaps {
    /// Open the maps another process pinned under `dir` (for inspection).
    pub fn from_pins(dir: &std::path::Path) -> Result<AyaMaps, MapError> {
        use aya::maps::Map;
        use switchyard_ebpf_common::maps as m;
        Ok(AyaMaps {
            fe4: pinned(dir, m::FRONTENDS4, Map::HashMap)?,
            fe6: pinned(dir, m::FRONTENDS6, Map::HashMap)?,
            sets: pinned(dir, m::SETS, Map::HashMap)?,
            slots: pinned(dir, m::SLOTS, Map::HashMap)?,
            backends: pinned(dir, m::BACKENDS, Map::HashMap)?,
            ranges4: pinned(dir, m::SOURCE_RANGES4, Map::LpmTrie)?,
            config: pinned(dir, m::CONFIG, Map::Array)?,
            local4: pinned(dir, m::LOCAL_CIDRS4, Map::LpmTrie)?,
            config6: pinned(dir, m::CONFIG6, Map::Array)?,
            local6: pinned(dir, m::LOCAL_CIDRS6, Map::LpmTrie)?,
            ranges6: pinned(dir, m::SOURCE_RANGES6, Map::LpmTrie)?,
        })
    }
}

impl AyaMaps {
    /// The backends a frontend's set points at now, by point lookups (no map walk: cheap at
    /// any map size). `None` when the frontend or its set is absent.
    pub fn backends_of4(&self, key: &Frontend4Key) -> Result<Option<Vec<BackendValue>>, MapError> {
        fn absent<T>(r: Result<T, aya::maps::MapError>) -> Result<Option<T>, aya::maps::MapError> {
            match r {
                Ok(v) => Ok(Some(v)),
                Err(aya::maps::MapError::KeyNotFound) => Ok(None),
                Err(e) => Err(e),
            }
        }
        let Some(fe) = absent(self.fe4.get(key, 0)).map_err(err(m_name::FRONTENDS4, "get"))? else {
            return Ok(None);
        };
        let Some(set) = absent(self.sets.get(&fe.set_id, 0)).map_err(err(m_name::SETS, "get"))?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for slot in set.slot_base..set.slot_base.saturating_add(set.count) {
            let k = SlotKey {
                set_id: fe.set_id,
                slot,
            };
            let Some(id) = absent(self.slots.get(&k, 0)).map_err(err(m_name::SLOTS, "get"))? else {
                continue;
            };
            if let Some(b) =
                absent(self.backends.get(&id, 0)).map_err(err(m_name::BACKENDS, "get"))?
            {
                out.push(b);
            }
        }
        Ok(Some(out))
    }
}

/// Where the flow and socket maps are taken from: the loaded object, or pins opened by
/// another thread (the janitor's own handles).
pub trait MapSource {
    fn map_mut(&mut self, name: &str) -> Option<&mut aya::maps::Map>;
}

impl MapSource for aya::Ebpf {
    fn map_mut(&mut self, name: &str) -> Option<&mut aya::maps::Map> {
        aya::Ebpf::map_mut(self, name)
    }
}

/// Maps opened from their pins under one directory; a map without a pin is absent.
#[derive(Debug)]
pub struct PinnedMaps(std::collections::HashMap<&'static str, aya::maps::Map>);

impl PinnedMaps {
    pub fn open(dir: &std::path::Path, names: &[&'static str]) -> Result<PinnedMaps, MapError> {
        let mut maps = std::collections::HashMap::new();
        for &name in names {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let data = aya::maps::MapData::from_pin(&path).map_err(err(name, "open pin"))?;
            let map = aya::maps::Map::from_map_data(data).map_err(err(name, "open pin"))?;
            maps.insert(name, map);
        }
        Ok(PinnedMaps(maps))
    }
}

impl PinnedMaps {
    /// The names asked for that had no pin.
    pub fn missing<'a>(&self, names: &[&'a str]) -> Vec<&'a str> {
        names
            .iter()
            .filter(|n| !self.0.contains_key(*n))
            .copied()
            .collect()
    }
}

impl MapSource for PinnedMaps {
    fn map_mut(&mut self, name: &str) -> Option<&mut aya::maps::Map> {
        self.0.get_mut(name)
    }
}

/// The node-local resolver's heartbeat map.
pub type DnsRedirectArray =
    aya::maps::Array<aya::maps::MapData, switchyard_ebpf_common::DnsRedirect>;

pub fn open_dns_redirect(dir: &std::path::Path) -> Result<DnsRedirectArray, MapError> {
    use switchyard_ebpf_common::maps as m;
    pinned(dir, m::DNS_REDIRECT, aya::maps::Map::Array)
}

pub fn write_dns_redirect(
    map: &mut DnsRedirectArray,
    v: switchyard_ebpf_common::DnsRedirect,
) -> Result<(), MapError> {
    use switchyard_ebpf_common::maps as m;
    map.set(0, v, 0).map_err(err(m::DNS_REDIRECT, "write"))
}

/// The counters of the given service ids only, summed over CPUs (what a scrape needs).
pub fn read_counters_of(
    dir: &std::path::Path,
    ids: impl Iterator<Item = u32>,
) -> Result<std::collections::BTreeMap<u32, switchyard_ebpf_common::Counters>, MapError> {
    use switchyard_ebpf_common::maps as m;
    let arr: aya::maps::PerCpuArray<aya::maps::MapData, switchyard_ebpf_common::Counters> =
        pinned(dir, m::COUNTERS, aya::maps::Map::PerCpuArray)?;
    let mut out = std::collections::BTreeMap::new();
    for i in ids {
        let vals = arr.get(&i, 0).map_err(err(m::COUNTERS, "read"))?;
        let mut sum = switchyard_ebpf_common::Counters::default();
        for v in vals.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
            sum.connections += v.connections;
        }
        out.insert(i, sum);
    }
    Ok(out)
}

/// Per-service counters summed over CPUs, by service id.
pub fn read_counters(
    dir: &std::path::Path,
) -> Result<std::collections::BTreeMap<u32, switchyard_ebpf_common::Counters>, MapError> {
    use switchyard_ebpf_common::maps as m;
    let arr: aya::maps::PerCpuArray<aya::maps::MapData, switchyard_ebpf_common::Counters> =
        pinned(dir, m::COUNTERS, aya::maps::Map::PerCpuArray)?;
    let mut out = std::collections::BTreeMap::new();
    for i in 0..arr.len() {
        let vals = arr.get(&i, 0).map_err(err(m::COUNTERS, "read"))?;
        let mut sum = switchyard_ebpf_common::Counters::default();
        for v in vals.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
            sum.connections += v.connections;
        }
        if sum != switchyard_ebpf_common::Counters::default() {
            out.insert(i, sum);
        }
    }
    Ok(out)
}

fn range_key(set: u32, addr: u32, prefix: u8) -> aya::maps::lpm_trie::Key<SourceRange4> {
    aya::maps::lpm_trie::Key::new(32 + u32::from(prefix), SourceRange4 { set_id: set, addr })
}

fn range6_key(set: u32, addr: [u32; 4], prefix: u8) -> aya::maps::lpm_trie::Key<SourceRange6> {
    aya::maps::lpm_trie::Key::new(32 + u32::from(prefix), SourceRange6 { set_id: set, addr })
}

impl MapIo for AyaMaps {
    fn write(&mut self, op: &Op) -> Result<(), MapError> {
        use switchyard_ebpf_common::maps as m;
        match op {
            Op::PutFrontend4(k, v) => self
                .fe4
                .insert(k, v, 0)
                .map_err(err(m::FRONTENDS4, "update")),
            Op::DelFrontend4(k) => {
                tolerate_missing(self.fe4.remove(k)).map_err(err(m::FRONTENDS4, "delete"))
            }
            Op::PutFrontend6(k, v) => self
                .fe6
                .insert(k, v, 0)
                .map_err(err(m::FRONTENDS6, "update")),
            Op::DelFrontend6(k) => {
                tolerate_missing(self.fe6.remove(k)).map_err(err(m::FRONTENDS6, "delete"))
            }
            Op::PutSet(k, v) => self.sets.insert(k, v, 0).map_err(err(m::SETS, "update")),
            Op::DelSet(k) => tolerate_missing(self.sets.remove(k)).map_err(err(m::SETS, "delete")),
            Op::PutSlot(k, v) => self.slots.insert(k, v, 0).map_err(err(m::SLOTS, "update")),
            Op::DelSlot(k) => {
                tolerate_missing(self.slots.remove(k)).map_err(err(m::SLOTS, "delete"))
            }
            Op::PutBackend(k, v) => self
                .backends
                .insert(k, v, 0)
                .map_err(err(m::BACKENDS, "update")),
            Op::DelBackend(k) => {
                tolerate_missing(self.backends.remove(k)).map_err(err(m::BACKENDS, "delete"))
            }
            Op::PutRange4(s, a, p) => self
                .ranges4
                .insert(&range_key(*s, *a, *p), 1, 0)
                .map_err(err(m::SOURCE_RANGES4, "update")),
            Op::DelRange4(s, a, p) => tolerate_missing(self.ranges4.remove(&range_key(*s, *a, *p)))
                .map_err(err(m::SOURCE_RANGES4, "delete")),
            Op::PutConfig(c) => self.config.set(0, c, 0).map_err(err(m::CONFIG, "update")),
            Op::PutLocalCidr4(a, p) => self
                .local4
                .insert(
                    &aya::maps::lpm_trie::Key::new(u32::from(*p), Cidr4 { addr: *a }),
                    1,
                    0,
                )
                .map_err(err(m::LOCAL_CIDRS4, "update")),
            Op::DelLocalCidr4(a, p) => tolerate_missing(self.local4.remove(
                &aya::maps::lpm_trie::Key::new(u32::from(*p), Cidr4 { addr: *a }),
            ))
            .map_err(err(m::LOCAL_CIDRS4, "delete")),
            Op::PutConfig6(c) => self.config6.set(0, c, 0).map_err(err(m::CONFIG6, "update")),
            Op::PutRange6(s, a, p) => self
                .ranges6
                .insert(&range6_key(*s, *a, *p), 1, 0)
                .map_err(err(m::SOURCE_RANGES6, "update")),
            Op::DelRange6(s, a, p) => {
                tolerate_missing(self.ranges6.remove(&range6_key(*s, *a, *p)))
                    .map_err(err(m::SOURCE_RANGES6, "delete"))
            }
            Op::PutLocalCidr6(a, p) => self
                .local6
                .insert(
                    &aya::maps::lpm_trie::Key::new(u32::from(*p), Cidr6 { addr: *a }),
                    1,
                    0,
                )
                .map_err(err(m::LOCAL_CIDRS6, "update")),
            Op::DelLocalCidr6(a, p) => tolerate_missing(self.local6.remove(
                &aya::maps::lpm_trie::Key::new(u32::from(*p), Cidr6 { addr: *a }),
            ))
            .map_err(err(m::LOCAL_CIDRS6, "delete")),
        }
    }

    fn dump(&self) -> Result<Dump, MapError> {
        use switchyard_ebpf_common::maps as m;
        let mut d = Dump::default();
        for r in &self.fe4 {
            let (k, v) = r.map_err(err(m::FRONTENDS4, "dump"))?;
            d.frontends4.insert(k, v);
        }
        for r in &self.fe6 {
            let (k, v) = r.map_err(err(m::FRONTENDS6, "dump"))?;
            d.frontends6.insert(k, v);
        }
        for r in &self.sets {
            let (k, v) = r.map_err(err(m::SETS, "dump"))?;
            d.sets.insert(k, v);
        }
        for r in &self.slots {
            let (k, v) = r.map_err(err(m::SLOTS, "dump"))?;
            d.slots.insert(k, v);
        }
        for r in &self.backends {
            let (k, v) = r.map_err(err(m::BACKENDS, "dump"))?;
            d.backends.insert(k, v);
        }
        for r in self.ranges4.keys() {
            let k = r.map_err(err(m::SOURCE_RANGES4, "dump"))?;
            let data = k.data();
            let prefix = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(32);
            d.ranges4.insert((data.set_id, data.addr, prefix));
        }
        d.config = self.config.get(&0, 0).map_err(err(m::CONFIG, "dump"))?;
        for r in self.local4.keys() {
            let k = r.map_err(err(m::LOCAL_CIDRS4, "dump"))?;
            d.local_cidrs4
                .insert((k.data().addr, u8::try_from(k.prefix_len()).unwrap_or(32)));
        }
        d.config6 = self.config6.get(&0, 0).map_err(err(m::CONFIG6, "dump"))?;
        for r in self.ranges6.keys() {
            let k = r.map_err(err(m::SOURCE_RANGES6, "dump"))?;
            let data = k.data();
            let prefix = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(128);
            d.ranges6.insert((data.set_id, data.addr, prefix));
        }
        for r in self.local6.keys() {
            let k = r.map_err(err(m::LOCAL_CIDRS6, "dump"))?;
            d.local_cidrs6
                .insert((k.data().addr, u8::try_from(k.prefix_len()).unwrap_or(128)));
        }
        Ok(d)
    }
}
