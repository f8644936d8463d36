//! `#[repr(C)]` map keys and values shared by the kernel programs and userspace.
//! Every type has explicit padding fields and a compile-time size check, so both sides agree
//! byte for byte. Addresses and ports are kept in network byte order exactly as the kernel
//! hands them to the programs (`u32::from_ne_bytes(octets)`, `port.to_be()`).
//!
//! Lookup path: frontend (addr, port, proto, scope) -> backend set (the "master" entry: count,
//! slot base, flags, affinity timeout) -> slot (set, base + i) -> backend. Replacing a set's
//! backends writes the new slots at the other base, flips the set entry, then deletes the old
//! slots, so no lookup ever sees a half-written set.
#![no_std]

use core::mem::size_of;

/// Map names, as declared in the kernel object and pinned under the pin directory.
pub mod maps {
    pub const FRONTENDS4: &str = "SY_FRONTENDS4";
    pub const FRONTENDS6: &str = "SY_FRONTENDS6";
    pub const SETS: &str = "SY_SETS";
    pub const SLOTS: &str = "SY_SLOTS";
    pub const BACKENDS: &str = "SY_BACKENDS";
    pub const AFFINITY: &str = "SY_AFFINITY";
    pub const SOURCE_RANGES4: &str = "SY_SRC_RANGES4";
    pub const CT4: &str = "SY_CT4";
    pub const SOCK_REVNAT4: &str = "SY_SOCK_REVNAT4";
    pub const SOCK_REVNAT6: &str = "SY_SOCK_REVNAT6";
    pub const COUNTERS: &str = "SY_COUNTERS";
    pub const CONFIG: &str = "SY_CONFIG";
    pub const LOCAL_CIDRS4: &str = "SY_LOCAL_CIDRS4";
    pub const CT6: &str = "SY_CT6";
    pub const CONFIG6: &str = "SY_CONFIG6";
    pub const LOCAL_CIDRS6: &str = "SY_LOCAL_CIDRS6";
    pub const SOURCE_RANGES6: &str = "SY_SRC_RANGES6";
    pub const DNS_REDIRECT: &str = "SY_DNS_REDIRECT";

    /// Every map, for cleanup and inspection.
    pub const ALL: [&str; 18] = [
        FRONTENDS4,
        FRONTENDS6,
        SETS,
        SLOTS,
        BACKENDS,
        AFFINITY,
        SOURCE_RANGES4,
        CT4,
        SOCK_REVNAT4,
        SOCK_REVNAT6,
        COUNTERS,
        CONFIG,
        LOCAL_CIDRS4,
        CT6,
        CONFIG6,
        LOCAL_CIDRS6,
        SOURCE_RANGES6,
        DNS_REDIRECT,
    ];
}

/// Traffic from outside the cluster (not from a local pod or the node's own sockets).
pub const SCOPE_EXTERNAL: u8 = 0;
/// Traffic from pods and from sockets on the node (socket LB always uses this scope).
pub const SCOPE_INTERNAL: u8 = 1;

/// No endpoint anywhere: refuse (ICMP port unreachable / ECONNREFUSED).
pub const SET_REJECT: u32 = 1 << 0;
/// Endpoints exist but none usable under a Local policy: drop.
pub const SET_DROP: u32 = 1 << 1;
/// ClientIP session affinity; `affinity_timeout` holds the idle timeout in seconds.
pub const SET_AFFINITY: u32 = 1 << 2;
/// Slots hold a Maglev lookup table: pick by flow hash instead of at random.
pub const SET_MAGLEV: u32 = 1 << 3;
/// The cluster DNS Service's port 53: the socket LB sends it to the node-local resolver
/// (`DnsRedirect`) while that resolver's heartbeat is fresh, else to the endpoints.
pub const SET_DNS_LOCAL: u32 = 1 << 4;

/// Only sources in the set's loadBalancerSourceRanges may use this frontend.
pub const FE_SOURCE_RANGES: u32 = 1 << 0;
/// Masquerade traffic that arrives through this key to the node address (external traffic
/// under eTP=Cluster, traffic to ClusterIPs from outside the cluster, masqueradeAll).
pub const FE_SNAT: u32 = 1 << 1;
/// A NodePort: its address is the node's own, so replies to the node's own TCP connections
/// from an ephemeral port in the NodePort range also match the key. Only a SYN starts a
/// new flow through it.
pub const FE_NODEPORT: u32 = 1 << 2;

/// The backend runs on this node.
pub const BE_LOCAL: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Frontend4Key {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}
const _: () = assert!(size_of::<Frontend4Key>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Frontend6Key {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}
const _: () = assert!(size_of::<Frontend6Key>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendValue {
    pub set_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<FrontendValue>() == 8);

/// The master entry of a backend set (one per service port, family and traffic view).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SetValue {
    /// Number of live slots (the Maglev table size for Maglev sets).
    pub count: u32,
    /// Slots `slot_base .. slot_base + count` are live.
    pub slot_base: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
    /// Index into the per-service counters.
    pub service_id: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<SetValue>() == 24);

/// The two slot bases a set alternates between.
pub const SLOT_BASE_A: u32 = 0;
pub const SLOT_BASE_B: u32 = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SlotKey {
    pub set_id: u32,
    pub slot: u32,
}
const _: () = assert!(size_of::<SlotKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    /// IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// The set this backend belongs to (a stale affinity entry is detected with it).
    pub set_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<BackendValue>() == 28);

pub const AFFINITY_CLIENT_ADDR4: u32 = 4;
/// Tc path, IPv6 client: `client` holds the address folded to 64 bits.
pub const AFFINITY_CLIENT_ADDR6: u32 = 6;
pub const AFFINITY_CLIENT_NETNS: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// The client's IPv4 address (tc path) or network-namespace cookie (socket LB).
    pub client: u64,
    pub set_id: u32,
    pub kind: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// LPM key of the source-range map: 32 bits of set id, then the IPv4 source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceRange4 {
    pub set_id: u32,
    pub addr: u32,
}
const _: () = assert!(size_of::<SourceRange4>() == 8);

/// LPM key of the IPv6 source-range map: 32 bits of set id, then the IPv6 source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceRange6 {
    pub set_id: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<SourceRange6>() == 20);

/// Connection-tracking key (IPv4 5-tuple as seen on the wire in that direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<Ct4Key>() == 16);

/// Forward entries say what to rewrite the destination (and maybe source) to; reverse entries
/// say what to rewrite a reply's source (and maybe destination) back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Value {
    pub new_saddr: u32,
    pub new_daddr: u32,
    pub new_sport: u16,
    pub new_dport: u16,
    pub flags: u32,
    pub service_id: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<Ct4Value>() == 24);

impl Ct4Value {
    /// The key of the other direction's entry: a forward entry's reverse entry, or a reverse
    /// entry's forward entry (both swap the translated tuple).
    pub const fn peer_key(&self, proto: u8) -> Ct4Key {
        Ct4Key {
            saddr: self.new_daddr,
            daddr: self.new_saddr,
            sport: self.new_dport,
            dport: self.new_sport,
            proto,
            pad: [0; 3],
        }
    }
}

pub const CT_REVERSE: u32 = 1 << 0;
pub const CT_SNAT: u32 = 1 << 1;
/// On forward entries: a FIN or RST of this TCP flow was seen. A SYN that reuses the
/// tuple afterwards starts a new flow (a new backend choice), as conntrack reopens a
/// connection in TIME_WAIT; retransmitted SYNs of a live handshake keep their backend.
pub const CT_CLOSING: u32 = 1 << 2;

/// Socket-LB reverse translation for UDP replies and getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev4Key {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRev4Key>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev4Value {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRev4Value>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev6Key {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u16; 3],
}
const _: () = assert!(size_of::<SockRev6Key>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev6Value {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRev6Value>() == 20);

/// Per-service counters (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}
const _: () = assert!(size_of::<Counters>() == 24);

/// Where intercepted cluster DNS goes, index 0 of `SY_DNS_REDIRECT`, written by the
/// resolver's heartbeat. Interception is off when `enabled` is 0 or the heartbeat is older
/// than `DNS_HEARTBEAT_NS`: a resolver that stops (or is killed) hands DNS back to the
/// Service's endpoints within that time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DnsRedirect {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last heartbeat.
    pub heartbeat_ns: u64,
    /// The resolver's IPv4 address and port (network order).
    pub addr4: u32,
    pub port: u16,
    pub enabled: u8,
    pub pad: u8,
}
const _: () = assert!(size_of::<DnsRedirect>() == 16);

pub const DNS_HEARTBEAT_NS: u64 = 1_000_000_000;

/// Global settings, index 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// The node address external traffic is masqueraded to (IPv4, network order).
    pub snat_addr4: u32,
    /// 1 when masqueradeAll is set.
    pub masquerade_all: u32,
}
const _: () = assert!(size_of::<Config>() == 8);

/// IPv6 flow-tracking key, as `Ct4Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<Ct6Key>() == 40);

/// IPv6 flow entry, as `Ct4Value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Value {
    pub new_saddr: [u32; 4],
    pub new_daddr: [u32; 4],
    pub new_sport: u16,
    pub new_dport: u16,
    pub flags: u32,
    pub service_id: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<Ct6Value>() == 48);

impl Ct6Value {
    /// As `Ct4Value::peer_key`.
    pub const fn peer_key(&self, proto: u8) -> Ct6Key {
        Ct6Key {
            saddr: self.new_daddr,
            daddr: self.new_saddr,
            sport: self.new_dport,
            dport: self.new_sport,
            proto,
            pad: [0; 3],
        }
    }
}

/// IPv6 global settings, index 0 of `SY_CONFIG6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config6 {
    /// The node address external IPv6 traffic is masqueraded to (network order).
    pub snat_addr6: [u32; 4],
}
const _: () = assert!(size_of::<Config6>() == 16);

/// LPM key for the IPv6 cluster (pod) CIDRs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cidr6 {
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<Cidr6>() == 16);

/// LPM key for the cluster (pod) CIDRs: traffic from them is internal.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cidr4 {
    pub addr: u32,
}
const _: () = assert!(size_of::<Cidr4>() == 4);

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod user {
    // SAFETY: every type below is #[repr(C)], plain old data, with explicit padding fields
    // and no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::Frontend4Key {}
    unsafe impl aya::Pod for super::Frontend6Key {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::SetValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SourceRange4 {}
    unsafe impl aya::Pod for super::SourceRange6 {}
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct4Value {}
    unsafe impl aya::Pod for super::Ct6Key {}
    unsafe impl aya::Pod for super::Ct6Value {}
    unsafe impl aya::Pod for super::Config6 {}
    unsafe impl aya::Pod for super::Cidr6 {}
    unsafe impl aya::Pod for super::SockRev4Key {}
    unsafe impl aya::Pod for super::SockRev4Value {}
    unsafe impl aya::Pod for super::SockRev6Key {}
    unsafe impl aya::Pod for super::SockRev6Value {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Cidr4 {}
    unsafe impl aya::Pod for super::DnsRedirect {}
}
