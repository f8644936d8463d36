//! Switchyard's kernel programs.
//!
//! Socket LB (cgroup sock_addr hooks): connect/sendmsg rewrite a service frontend to a backend
//! when the socket connects or sends, so pod and host traffic to services costs nothing per
//! packet; recvmsg/getpeername rewrite the backend back to the frontend the app asked for.
//!
//! Per-packet path (tc ingress on the node's interfaces; `tc4`, `tc6`, with `l4` shared): traffic the socket hooks cannot
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
    Counters, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DNS_HEARTBEAT_NS, DnsRedirect, FE_NODEPORT,
    FE_SNAT, FE_SOURCE_RANGES, Frontend4Key, Frontend6Key, FrontendValue, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SET_AFFINITY, SET_DNS_LOCAL, SET_DROP, SET_MAGLEV, SET_REJECT, SetValue,
    SlotKey, SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value, SourceRange4, SourceRange6,
};

mod l4;
mod maps;
mod sock;
mod tc4;
mod tc6;

use l4::*;
use maps::*;
use tc4::*;

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

#[classifier]
pub fn sy_tc_ingress(ctx: TcContext) -> i32 {
    let ethertype: u16 = ctx.load(12).unwrap_or(0);
    let r = if ethertype == 0x86ddu16.to_be() {
        tc6::try_tc6(&ctx)
    } else {
        tc4::try_tc(&ctx)
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
