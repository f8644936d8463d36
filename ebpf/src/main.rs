//! Switchyard's kernel programs.
//!
//! Socket LB (cgroup sock_addr hooks): connect/sendmsg rewrite a service frontend to a backend
//! when the socket connects or sends, so pod and host traffic to services costs nothing per
//! packet; recvmsg/getpeername rewrite the backend back to the frontend the app asked for.
//!
//! Per-packet path (tc ingress on the node's interfaces, IPv4): traffic the socket hooks cannot
//! see (NodePorts and external IPs from outside, pod traffic from pod veths) is DNATed to a
//! backend, SNATed to the node address where kube-proxy would masquerade, tracked in an LRU
//! conntrack map, and reverse-translated on replies.
#![no_std]
#![no_main]
#![allow(static_mut_refs)]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
};
use aya_ebpf::helpers::generated::{
    bpf_fib_lookup as fib_lookup, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
    bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_set_retval, bpf_skb_change_tail,
};
use aya_ebpf::macros::{cgroup_sock_addr, classifier, map};
use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{SockAddrContext, TcContext};
use switchyard_ebpf_common::{
    AFFINITY_CLIENT_ADDR4, AFFINITY_CLIENT_ADDR6, AFFINITY_CLIENT_NETNS, AffinityKey,
    AffinityValue, BackendValue, CT_CLOSING, CT_REVERSE, CT_SNAT, Cidr4, Cidr6, Config, Config6,
    Counters, Ct4Key, Ct4Value, Ct6Key, Ct6Value, FE_NODEPORT, FE_SNAT, FE_SOURCE_RANGES,
    Frontend4Key, Frontend6Key, FrontendValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SET_AFFINITY,
    SET_DROP, SET_MAGLEV, SET_REJECT, SetValue, SlotKey, SockRev4Key, SockRev4Value, SockRev6Key,
    SockRev6Value, SourceRange4, SourceRange6,
};

const NO_PREALLOC: u32 = 1;
/// Per-CPU LRU lists: inserts on busy CPUs do not contend on one global list.
const NO_COMMON_LRU: u32 = 2;

#[map(name = "SY_FRONTENDS4")]
static FRONTENDS4: HashMap<Frontend4Key, FrontendValue> = HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_FRONTENDS6")]
static FRONTENDS6: HashMap<Frontend6Key, FrontendValue> = HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_SETS")]
static SETS: HashMap<u32, SetValue> = HashMap::pinned(131_072, NO_PREALLOC);
#[map(name = "SY_SLOTS")]
static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(1_048_576, NO_PREALLOC);
#[map(name = "SY_BACKENDS")]
static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(1_048_576, NO_PREALLOC);
#[map(name = "SY_AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(65_536, 0);
#[map(name = "SY_SRC_RANGES4")]
static SRC_RANGES4: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(65_536, NO_PREALLOC);
#[map(name = "SY_CT4")]
static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(262_144, NO_COMMON_LRU);
#[map(name = "SY_SOCK_REVNAT4")]
static SOCK_REVNAT4: LruHashMap<SockRev4Key, SockRev4Value> =
    LruHashMap::pinned(131_072, NO_COMMON_LRU);
#[map(name = "SY_SOCK_REVNAT6")]
static SOCK_REVNAT6: LruHashMap<SockRev6Key, SockRev6Value> = LruHashMap::pinned(131_072, 0);
#[map(name = "SY_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(65_536, 0);
#[map(name = "SY_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "SY_LOCAL_CIDRS4")]
static LOCAL_CIDRS4: LpmTrie<Cidr4, u8> = LpmTrie::pinned(256, NO_PREALLOC);
#[map(name = "SY_CT6")]
static CT6: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(131_072, NO_COMMON_LRU);
#[map(name = "SY_CONFIG6")]
static CONFIG6: Array<Config6> = Array::pinned(1, 0);
#[map(name = "SY_SRC_RANGES6")]
static SRC_RANGES6: LpmTrie<SourceRange6, u8> = LpmTrie::pinned(65_536, NO_PREALLOC);
#[map(name = "SY_LOCAL_CIDRS6")]
static LOCAL_CIDRS6: LpmTrie<Cidr6, u8> = LpmTrie::pinned(256, NO_PREALLOC);

mod tc6;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// TCX: let the next program (or the stack) decide; used for traffic we do not touch.
const TCX_NEXT: i32 = -1;

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn random() -> u32 {
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
fn count(service_id: u32, packets: u64, bytes: u64, connections: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(service_id) {
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
            (*c).connections += connections;
        }
    }
}

/// What a frontend lookup decided.
enum Verdict {
    Backend(u32, BackendValue),
    Reject,
    Drop,
}

/// Pick a backend of `set` for a client: a live affinity entry first, else a Maglev slot by
/// `hash`, else a random slot.
#[inline(always)]
fn select_backend(set_id: u32, set: &SetValue, client: u64, kind: u32, hash: u32) -> Verdict {
    if set.flags & SET_REJECT != 0 || set.count == 0 {
        return if set.flags & SET_DROP != 0 {
            Verdict::Drop
        } else {
            Verdict::Reject
        };
    }
    if set.flags & SET_DROP != 0 {
        return Verdict::Drop;
    }
    let now = now_ns();
    let akey = AffinityKey {
        client,
        set_id,
        kind,
    };
    if set.flags & SET_AFFINITY != 0 {
        if let Some(a) = unsafe { AFFINITY.get(&akey) } {
            let timeout = set.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_used_ns) <= timeout {
                let id = a.backend_id;
                if let Some(be) = unsafe { BACKENDS.get(&id) } {
                    // A backend id freed and reused by another set is not ours.
                    if be.set_id == set_id {
                        let fresh = AffinityValue {
                            last_used_ns: now,
                            backend_id: id,
                            pad: 0,
                        };
                        let _ = AFFINITY.insert(&akey, &fresh, 0);
                        return Verdict::Backend(id, *be);
                    }
                }
            }
        }
    }
    let pick = if set.flags & SET_MAGLEV != 0 {
        hash
    } else {
        random()
    };
    let slot = SlotKey {
        set_id,
        slot: set.slot_base + pick % set.count,
    };
    let Some(id) = (unsafe { SLOTS.get(&slot) }) else {
        return Verdict::Reject;
    };
    let id = *id;
    let Some(be) = (unsafe { BACKENDS.get(&id) }) else {
        return Verdict::Reject;
    };
    if set.flags & SET_AFFINITY != 0 {
        let v = AffinityValue {
            last_used_ns: now,
            backend_id: id,
            pad: 0,
        };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Verdict::Backend(id, *be)
}

// ---------------------------------------------------------------------------------------
// Socket LB
// ---------------------------------------------------------------------------------------

#[inline(always)]
fn refuse(set_flags: u32) -> i32 {
    let err = if set_flags & SET_DROP != 0 {
        EHOSTUNREACH
    } else {
        ECONNREFUSED
    };
    unsafe {
        bpf_set_retval(-err);
    }
    0
}

#[inline(always)]
fn sock4_lookup(
    ctx: &SockAddrContext,
    addr: u32,
    port: u16,
    proto: u8,
) -> Option<(SetValue, Verdict)> {
    let key = Frontend4Key {
        addr,
        port,
        proto,
        scope: SCOPE_INTERNAL,
    };
    let fe = unsafe { FRONTENDS4.get(&key) }?;
    let set_id = fe.set_id;
    let set = *unsafe { SETS.get(&set_id) }?;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let v = select_backend(set_id, &set, netns, AFFINITY_CLIENT_NETNS, cookie as u32);
    Some((set, v))
}

/// connect4 / sendmsg4: frontend -> backend.
#[inline(always)]
fn sock4_forward(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    let addr = sa.user_ip4;
    let port = sa.user_port as u16;
    let Some((set, verdict)) = sock4_lookup(ctx, addr, port, proto) else {
        return 1;
    };
    match verdict {
        Verdict::Backend(_, be) => {
            sa.user_ip4 = be.addr[0];
            sa.user_port = be.port as u32;
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let key = SockRev4Key {
                cookie,
                addr: be.addr[0],
                port: be.port,
                pad: 0,
            };
            let val = SockRev4Value { addr, port, pad: 0 };
            let _ = SOCK_REVNAT4.insert(&key, &val, 0);
            count(set.service_id, 0, 0, 1);
            1
        }
        Verdict::Reject => refuse(0),
        Verdict::Drop => refuse(SET_DROP),
    }
}

/// recvmsg4 / getpeername4: backend -> the frontend the socket asked for.
#[inline(always)]
fn sock4_reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRev4Key {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    if let Some(v) = unsafe { SOCK_REVNAT4.get(&key) } {
        sa.user_ip4 = v.addr;
        sa.user_port = v.port as u32;
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn sy_connect4(ctx: SockAddrContext) -> i32 {
    sock4_forward(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock4_forward(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx)
}

/// `::ffff:a.b.c.d` on an IPv6 socket is IPv4 traffic.
#[inline(always)]
fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0xffff_u32.to_be()
}

#[inline(always)]
fn sock6_forward(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    let addr = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = sa.user_port as u16;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if v4_mapped(&addr) {
        let Some((set, verdict)) = sock4_lookup(ctx, addr[3], port, proto) else {
            return 1;
        };
        return match verdict {
            Verdict::Backend(_, be) => {
                sa.user_ip6[3] = be.addr[0];
                sa.user_port = be.port as u32;
                let key = SockRev6Key {
                    cookie,
                    addr: [addr[0], addr[1], addr[2], be.addr[0]],
                    port: be.port,
                    pad: [0; 3],
                };
                let val = SockRev6Value { addr, port, pad: 0 };
                let _ = SOCK_REVNAT6.insert(&key, &val, 0);
                count(set.service_id, 0, 0, 1);
                1
            }
            Verdict::Reject => refuse(0),
            Verdict::Drop => refuse(SET_DROP),
        };
    }
    let key = Frontend6Key {
        addr,
        port,
        proto,
        scope: SCOPE_INTERNAL,
    };
    let Some(fe) = (unsafe { FRONTENDS6.get(&key) }) else {
        return 1;
    };
    let set_id = fe.set_id;
    let Some(set) = (unsafe { SETS.get(&set_id) }) else {
        return 1;
    };
    let set = *set;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match select_backend(set_id, &set, netns, AFFINITY_CLIENT_NETNS, cookie as u32) {
        Verdict::Backend(_, be) => {
            sa.user_ip6[0] = be.addr[0];
            sa.user_ip6[1] = be.addr[1];
            sa.user_ip6[2] = be.addr[2];
            sa.user_ip6[3] = be.addr[3];
            sa.user_port = be.port as u32;
            let key = SockRev6Key {
                cookie,
                addr: be.addr,
                port: be.port,
                pad: [0; 3],
            };
            let val = SockRev6Value { addr, port, pad: 0 };
            let _ = SOCK_REVNAT6.insert(&key, &val, 0);
            count(set.service_id, 0, 0, 1);
            1
        }
        Verdict::Reject => refuse(0),
        Verdict::Drop => refuse(SET_DROP),
    }
}

#[inline(always)]
fn sock6_reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRev6Key {
        cookie,
        addr: [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ],
        port: sa.user_port as u16,
        pad: [0; 3],
    };
    if let Some(v) = unsafe { SOCK_REVNAT6.get(&key) } {
        sa.user_ip6[0] = v.addr[0];
        sa.user_ip6[1] = v.addr[1];
        sa.user_ip6[2] = v.addr[2];
        sa.user_ip6[3] = v.addr[3];
        sa.user_port = v.port as u32;
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn sy_connect6(ctx: SockAddrContext) -> i32 {
    sock6_forward(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sy_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock6_forward(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sy_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock6_reverse(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sy_getpeername6(ctx: SockAddrContext) -> i32 {
    sock6_reverse(&ctx)
}

// ---------------------------------------------------------------------------------------
// Per-packet path (tc ingress, IPv4)
// ---------------------------------------------------------------------------------------

const ETH_LEN: usize = 14;
const IP_CSUM: usize = ETH_LEN + 10;
const IP_SRC: usize = ETH_LEN + 12;
const IP_DST: usize = ETH_LEN + 16;

struct Packet {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
    len: u32,
}

#[inline(always)]
fn l4_csum_offset(p: &Packet) -> usize {
    if p.proto == IPPROTO_TCP {
        p.l4 + 16
    } else {
        p.l4 + 6
    }
}

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    if p.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn set_addr(ctx: &TcContext, p: &Packet, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        l4_csum_offset(p),
        old as u64,
        new as u64,
        l4_flags(p) | BPF_F_PSEUDO_HDR as u64 | 4,
    )?;
    ctx.l3_csum_replace(IP_CSUM, old as u64, new as u64, 4)?;
    ctx.store(off, &new, 0)?;
    Ok(())
}

#[inline(always)]
fn set_port(ctx: &TcContext, p: &Packet, off: usize, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(l4_csum_offset(p), old as u64, new as u64, l4_flags(p) | 2)?;
    ctx.store(off, &new, 0)?;
    Ok(())
}

/// Rewrite source and/or destination of the packet.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), i64> {
    set_addr(ctx, p, IP_SRC, p.saddr, saddr)?;
    set_addr(ctx, p, IP_DST, p.daddr, daddr)?;
    set_port(ctx, p, p.l4, p.sport, sport)?;
    set_port(ctx, p, p.l4 + 2, p.dport, dport)?;
    Ok(())
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Answer the packet with ICMP port unreachable out of the interface it came in on, as
/// kube-proxy's REJECT does: TCP clients see ECONNREFUSED, UDP clients an error, at once.
#[inline(always)]
fn reject(ctx: &TcContext, p: &Packet) -> i32 {
    // Fixed-size loads: the verifier rejects reads whose length may be zero.
    let (Ok(orig), Ok(macs)) = (ctx.load::<[u8; 28]>(ETH_LEN), ctx.load::<[u8; 12]>(0)) else {
        return TC_ACT_SHOT as i32;
    };
    if orig[0] != 0x45 {
        return TC_ACT_SHOT as i32;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + 20 + 8 + 28) as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12] = 0x08;
    eth[13] = 0x00;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2] = 0;
    ip[3] = 56;
    ip[8] = 64;
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&p.daddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&p.saddr.to_ne_bytes());
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u64;
        i += 2;
    }
    let c = fold(sum).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    let mut icmp = [0u8; 36];
    icmp[0] = 3;
    icmp[1] = 3;
    icmp[8..36].copy_from_slice(&orig);
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < 36 {
        sum += u16::from_be_bytes([icmp[i], icmp[i + 1]]) as u64;
        i += 2;
    }
    let c = fold(sum).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    if ctx.store(0, &eth, 0).is_err()
        || ctx.store(ETH_LEN, &ip, 0).is_err()
        || ctx.store(ETH_LEN + 20, &icmp, 0).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Send a translated packet on its way ourselves: after NAT the source may be a node address
/// (masquerade, or the frontend on replies), which the stack's input path would drop as a
/// martian; a FIB lookup and a redirect to the egress device skip that (and netfilter).
#[inline(always)]
fn forward(ctx: &TcContext, saddr: u32, daddr: u32, proto: u8, sport: u16, dport: u16) -> i32 {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2;
    params.l4_protocol = proto;
    params.sport = sport;
    params.dport = dport;
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    redirect(ctx, rc, &params)
}

/// Act on a FIB lookup's answer (both families): out of the egress device with its MACs,
/// through the neighbour subsystem when the next hop is unresolved, else to the stack.
#[inline(always)]
fn redirect(ctx: &TcContext, rc: i64, params: &bpf_fib_lookup) -> i32 {
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
        unsafe { bpf_redirect(params.ifindex, 0) as i32 }
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    } else {
        // Local delivery or no route: the stack decides.
        TC_ACT_OK as i32
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let proto: u16 = ctx.load(12).ok()?;
    if proto != 0x0800u16.to_be() {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_LEN).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = ctx.load(ETH_LEN + 6).ok()?;
    // Fragments after the first carry no ports: leave them alone.
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let l4proto: u8 = ctx.load(ETH_LEN + 9).ok()?;
    if l4proto != IPPROTO_TCP && l4proto != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_LEN + ihl;
    Some(Packet {
        saddr: ctx.load(IP_SRC).ok()?,
        daddr: ctx.load(IP_DST).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto: l4proto,
        l4,
        len: ctx.len(),
    })
}

#[inline(always)]
fn flow_hash(p: &Packet) -> u32 {
    mix(p.saddr ^ p.daddr.rotate_left(7), p.sport, p.dport, p.proto)
}

/// The flow hash of both families: folded addresses, ports and protocol, mixed.
#[inline(always)]
fn mix(addrs: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = addrs ^ ((sport as u32) << 16 | dport as u32) ^ proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Flag the forward entry of a TCP flow as closing (see `CT_CLOSING`), from either
/// direction's entry.
#[inline(always)]
fn mark_closing(key: &Ct4Key, ct: &Ct4Value) {
    let fwd = if ct.flags & CT_REVERSE != 0 {
        ct.peer_key(key.proto)
    } else {
        *key
    };
    if let Some(v) = CT4.get_ptr_mut(&fwd) {
        unsafe { (*v).flags |= CT_CLOSING };
    }
}

#[inline(never)]
fn try_tc(ctx: &TcContext) -> Result<i32, i64> {
    let Some(p) = parse(ctx) else {
        return Ok(TCX_NEXT);
    };
    let key = Ct4Key {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    // Established flows (both directions) follow their conntrack entry.
    let tcp_flags: u8 = if p.proto == IPPROTO_TCP {
        ctx.load(p.l4 + 13).map_err(|_| 0i64)?
    } else {
        0
    };
    let reopen = |ct: &Ct4Value| {
        ct.flags & (CT_REVERSE | CT_CLOSING) == CT_CLOSING
            && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };
    if let Some(ct) = unsafe { CT4.get(&key) }
        && !reopen(ct)
    {
        let ct = *ct;
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            mark_closing(&key, &ct);
        }
        if ct.flags & CT_REVERSE != 0 {
            let (daddr, dport) = if ct.flags & CT_SNAT != 0 {
                (ct.new_daddr, ct.new_dport)
            } else {
                (p.daddr, p.dport)
            };
            rewrite(ctx, &p, ct.new_saddr, ct.new_sport, daddr, dport)?;
            count(ct.service_id, 1, p.len as u64, 0);
            return Ok(forward(
                ctx,
                ct.new_saddr,
                daddr,
                p.proto,
                ct.new_sport,
                dport,
            ));
        } else {
            let (saddr, sport) = if ct.flags & CT_SNAT != 0 {
                (ct.new_saddr, ct.new_sport)
            } else {
                (p.saddr, p.sport)
            };
            rewrite(ctx, &p, saddr, sport, ct.new_daddr, ct.new_dport)?;
            count(ct.service_id, 1, p.len as u64, 0);
            return Ok(forward(
                ctx,
                saddr,
                ct.new_daddr,
                p.proto,
                sport,
                ct.new_dport,
            ));
        }
    }

    let internal = LOCAL_CIDRS4
        .get(&LpmKey::new(32, Cidr4 { addr: p.saddr }))
        .is_some();
    let fkey = Frontend4Key {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        scope: if internal {
            SCOPE_INTERNAL
        } else {
            SCOPE_EXTERNAL
        },
    };
    let Some(fe) = (unsafe { FRONTENDS4.get(&fkey) }) else {
        return Ok(TCX_NEXT);
    };
    let fe = *fe;
    // A TCP segment other than a SYN with no flow entry, to a NodePort, is most likely a
    // reply to one of the node's own connections whose ephemeral port is in the NodePort
    // range: leave it to the stack.
    if fe.flags & FE_NODEPORT != 0
        && p.proto == IPPROTO_TCP
        && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return Ok(TCX_NEXT);
    }
    let Some(set) = (unsafe { SETS.get(&fe.set_id) }) else {
        return Ok(TCX_NEXT);
    };
    let set = *set;
    if fe.flags & FE_SOURCE_RANGES != 0 {
        let k = LpmKey::new(
            64,
            SourceRange4 {
                set_id: fe.set_id,
                addr: p.saddr,
            },
        );
        if SRC_RANGES4.get(&k).is_none() {
            return Ok(TC_ACT_SHOT as i32);
        }
    }
    let (_, be) = match select_backend(
        fe.set_id,
        &set,
        p.saddr as u64,
        AFFINITY_CLIENT_ADDR4,
        flow_hash(&p),
    ) {
        Verdict::Backend(id, be) => (id, be),
        Verdict::Reject => return Ok(reject(ctx, &p)),
        Verdict::Drop => return Ok(TC_ACT_SHOT as i32),
    };
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let hairpin = be.addr[0] == p.saddr;
    let snat = fe.flags & FE_SNAT != 0 || hairpin || cfg.masquerade_all != 0;
    let (new_saddr, mut new_sport) = if snat && cfg.snat_addr4 != 0 {
        (cfg.snat_addr4, p.sport)
    } else {
        (p.saddr, p.sport)
    };
    let snat = new_saddr != p.saddr;
    let mut rkey = Ct4Key {
        saddr: be.addr[0],
        daddr: new_saddr,
        sport: be.port,
        dport: new_sport,
        proto: p.proto,
        pad: [0; 3],
    };
    if snat {
        // Another client may already own this (node address, port) towards the backend.
        let mut tries = 0;
        while tries < 8 && unsafe { CT4.get(&rkey) }.is_some() {
            new_sport = ((32768 + random() % 28232) as u16).to_be();
            rkey.dport = new_sport;
            tries += 1;
        }
    }
    let fwd = Ct4Value {
        new_saddr,
        new_daddr: be.addr[0],
        new_sport,
        new_dport: be.port,
        flags: if snat { CT_SNAT } else { 0 },
        service_id: set.service_id,
        pad: 0,
    };
    let rev = Ct4Value {
        new_saddr: p.daddr,
        new_daddr: p.saddr,
        new_sport: p.dport,
        new_dport: p.sport,
        flags: CT_REVERSE | if snat { CT_SNAT } else { 0 },
        service_id: set.service_id,
        pad: 0,
    };
    CT4.insert(&key, &fwd, 0)?;
    CT4.insert(&rkey, &rev, 0)?;
    rewrite(ctx, &p, new_saddr, new_sport, be.addr[0], be.port)?;
    count(set.service_id, 1, p.len as u64, 1);
    Ok(forward(
        ctx, new_saddr, be.addr[0], p.proto, new_sport, be.port,
    ))
}

#[classifier]
pub fn sy_tc_ingress(ctx: TcContext) -> i32 {
    let ethertype: u16 = ctx.load(12).unwrap_or(0);
    let r = if ethertype == 0x86ddu16.to_be() {
        tc6::try_tc6(&ctx)
    } else {
        try_tc(&ctx)
    };
    match r {
        Ok(v) => v,
        Err(_) => TC_ACT_SHOT as i32,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
