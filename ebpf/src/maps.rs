//! The maps both sides share (pinned by name; layouts in `switchyard_ebpf_common`).

use super::*;

pub(crate) const NO_PREALLOC: u32 = 1;
/// Per-CPU LRU lists: inserts on busy CPUs do not contend on one global list.
pub(crate) const NO_COMMON_LRU: u32 = 2;

#[map(name = "SY_FRONTENDS4")]
pub(crate) static FRONTENDS4: HashMap<Frontend4Key, FrontendValue> =
    HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_FRONTENDS6")]
pub(crate) static FRONTENDS6: HashMap<Frontend6Key, FrontendValue> =
    HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_SETS")]
pub(crate) static SETS: HashMap<u32, SetValue> = HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_SLOTS")]
pub(crate) static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(1_048_576, NO_PREALLOC);
#[map(name = "SY_BACKENDS")]
pub(crate) static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(1_048_576, NO_PREALLOC);
#[map(name = "SY_AFFINITY")]
pub(crate) static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(65_536, 0);
#[map(name = "SY_SRC_RANGES4")]
pub(crate) static SRC_RANGES4: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(65_536, NO_PREALLOC);
#[map(name = "SY_CT4")]
pub(crate) static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(262_144, NO_COMMON_LRU);
#[map(name = "SY_SOCK_REVNAT4")]
pub(crate) static SOCK_REVNAT4: LruHashMap<SockRev4Key, SockRev4Value> =
    LruHashMap::pinned(131_072, NO_COMMON_LRU);
#[map(name = "SY_SOCK_REVNAT6")]
pub(crate) static SOCK_REVNAT6: LruHashMap<SockRev6Key, SockRev6Value> =
    LruHashMap::pinned(131_072, 0);
#[map(name = "SY_COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(65_536, 0);
#[map(name = "SY_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "SY_LOCAL_CIDRS4")]
pub(crate) static LOCAL_CIDRS4: LpmTrie<Cidr4, u8> = LpmTrie::pinned(256, NO_PREALLOC);
#[map(name = "SY_CT6")]
pub(crate) static CT6: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(131_072, NO_COMMON_LRU);
#[map(name = "SY_CONFIG6")]
pub(crate) static CONFIG6: Array<Config6> = Array::pinned(1, 0);
#[map(name = "SY_SRC_RANGES6")]
pub(crate) static SRC_RANGES6: LpmTrie<SourceRange6, u8> = LpmTrie::pinned(65_536, NO_PREALLOC);
#[map(name = "SY_LOCAL_CIDRS6")]
pub(crate) static LOCAL_CIDRS6: LpmTrie<Cidr6, u8> = LpmTrie::pinned(256, NO_PREALLOC);
#[map(name = "SY_DNS_REDIRECT")]
pub(crate) static DNS_REDIRECT: Array<DnsRedirect> = Array::pinned(1, 0);
