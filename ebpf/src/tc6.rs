//! The per-packet path for IPv6: the same flow tracking, frontend lookup, backend choice,
//! NAT and forwarding as the IPv4 path, over 128-bit addresses. Packets with extension
//! headers before TCP/UDP are left to the stack.

use super::*;

const IP6_SRC: usize = ETH_LEN + 8;
const IP6_DST: usize = ETH_LEN + 24;
const IP6_LEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;

pub(crate) struct Packet6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
    len: u32,
}

#[inline(always)]
fn parse6(ctx: &TcContext) -> Option<Packet6> {
    let next: u8 = ctx.load(ETH_LEN + 6).ok()?;
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_LEN + IP6_LEN;
    Some(Packet6 {
        saddr: ctx.load(IP6_SRC).ok()?,
        daddr: ctx.load(IP6_DST).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto: next,
        l4,
        len: ctx.len(),
    })
}

/// Replace an address (no IP header checksum in IPv6; the L4 checksum covers it through the
/// pseudo-header).
#[inline(always)]
fn set_addr6(
    ctx: &TcContext,
    p: &Packet6,
    off: usize,
    old: &[u32; 4],
    new: &[u32; 4],
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let mut i = 0;
    while i < 4 {
        if old[i] != new[i] {
            ctx.l4_csum_replace(
                csum_offset(p.proto, p.l4),
                old[i] as u64,
                new[i] as u64,
                mangled(p.proto) | BPF_F_PSEUDO_HDR as u64 | 4,
            )?;
        }
        i += 1;
    }
    ctx.store(off, new, 0)?;
    Ok(())
}

/// Ports packed as `sport | dport << 16` (a BPF call takes at most five arguments).
#[inline(always)]
fn ports(sport: u16, dport: u16) -> u32 {
    sport as u32 | (dport as u32) << 16
}

/// Rewrite the packet and send it on (separate BPF function: its own stack frame).
#[inline(never)]
fn nat6(ctx: &TcContext, p: &Packet6, saddr: &[u32; 4], daddr: &[u32; 4], ports: u32) -> i32 {
    let (sport, dport) = (ports as u16, (ports >> 16) as u16);
    if set_addr6(ctx, p, IP6_SRC, &p.saddr, saddr).is_err()
        || set_addr6(ctx, p, IP6_DST, &p.daddr, daddr).is_err()
        || set_port(ctx, p.proto, p.l4, p.l4, p.sport, sport).is_err()
        || set_port(ctx, p.proto, p.l4, p.l4 + 2, p.dport, dport).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    forward6(ctx, saddr, daddr, p.proto, sport, dport)
}

#[inline(always)]
fn forward6(
    ctx: &TcContext,
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    proto: u8,
    sport: u16,
    dport: u16,
) -> i32 {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 10;
    params.l4_protocol = proto;
    params.sport = sport;
    params.dport = dport;
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv6_src = *saddr;
    params.__bindgen_anon_4.ipv6_dst = *daddr;
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

/// ICMPv6 port unreachable back out of the interface the packet came in on (the IPv6 form of
/// the IPv4 path's reject). The invoking packet's first 48 bytes (IPv6 header and 8 bytes of
/// TCP/UDP) move behind the new headers in 8-byte steps, to keep the stack small.
#[inline(never)]
fn reject6(ctx: &TcContext, p: &Packet6) -> i32 {
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return TC_ACT_SHOT as i32;
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + IP6_LEN + 8 + 48) as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    // Checksum: pseudo-header (both addresses, length 56, next header 58), the ICMPv6 header
    // (type 1, code 4) and the invoking bytes.
    let mut sum: u64 = 56 + IPPROTO_ICMPV6 as u64 + 0x0104;
    let mut i = 0;
    while i < 4 {
        let (a, b) = (u32::from_be(p.saddr[i]), u32::from_be(p.daddr[i]));
        sum += (a >> 16) as u64 + (a & 0xffff) as u64 + (b >> 16) as u64 + (b & 0xffff) as u64;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        let Ok(w) = ctx.load::<[u8; 8]>(ETH_LEN + i * 8) else {
            return TC_ACT_SHOT as i32;
        };
        if ctx.store(ETH_LEN + IP6_LEN + 8 + i * 8, &w, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
        sum += u16::from_be_bytes([w[0], w[1]]) as u64
            + u16::from_be_bytes([w[2], w[3]]) as u64
            + u16::from_be_bytes([w[4], w[5]]) as u64
            + u16::from_be_bytes([w[6], w[7]]) as u64;
        i += 1;
    }
    let c = fold(sum).to_be_bytes();
    let icmp = [1u8, 4, c[0], c[1], 0, 0, 0, 0];
    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12] = 0x86;
    eth[13] = 0xdd;
    // Version 6, payload length 56, next header ICMPv6, hop limit 64.
    let hdr = [0x60u8, 0, 0, 0, 0, 56, IPPROTO_ICMPV6, 64];
    if ctx.store(0, &eth, 0).is_err()
        || ctx.store(ETH_LEN, &hdr, 0).is_err()
        || ctx.store(IP6_SRC, &p.daddr, 0).is_err()
        || ctx.store(IP6_DST, &p.saddr, 0).is_err()
        || ctx.store(ETH_LEN + IP6_LEN, &icmp, 0).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn flow_hash6(p: &Packet6) -> u32 {
    let s = p.saddr[0] ^ p.saddr[1] ^ p.saddr[2] ^ p.saddr[3];
    let d = p.daddr[0] ^ p.daddr[1] ^ p.daddr[2] ^ p.daddr[3];
    mix(s ^ d.rotate_left(7), p.sport, p.dport, p.proto)
}

#[inline(never)]
fn mark_closing6(key: &Ct6Key, ct: &Ct6Value) {
    let fwd = if ct.flags & CT_REVERSE != 0 {
        ct.peer_key(key.proto)
    } else {
        *key
    };
    if let Some(v) = CT6.get_ptr_mut(&fwd) {
        unsafe { (*v).flags |= CT_CLOSING };
    }
}

#[inline(never)]
pub(crate) fn try_tc6(ctx: &TcContext) -> Result<i32, i64> {
    let Some(p) = parse6(ctx) else {
        return Ok(TCX_NEXT);
    };
    let tcp_flags: u8 = if p.proto == IPPROTO_TCP {
        ctx.load(p.l4 + 13).map_err(|_| 0i64)?
    } else {
        0
    };
    // Each step is its own BPF function called from here with one shared plan, so no call
    // chain stacks more than two frames on this one (the verifier caps the combined stack
    // at 512 bytes).
    let mut plan = Plan6 {
        saddr: [0; 4],
        daddr: [0; 4],
        ports: 0,
        service_id: 0,
        snat: 0,
        new_flow: 0,
    };
    let r = established6(&p, tcp_flags as u32, &mut plan);
    if r == NOT_TRACKED {
        match choose6(&p, tcp_flags as u32, &mut plan) {
            NOT_TRACKED => {}
            REJECT => return Ok(reject6(ctx, &p)),
            r => return Ok(r),
        }
        if !track6(&p, &mut plan) {
            return Ok(TC_ACT_SHOT as i32);
        }
    } else if r != FOLLOW {
        return Ok(r);
    }
    count(plan.service_id, 1, p.len as u64, u64::from(plan.new_flow));
    Ok(nat6(ctx, &p, &plan.saddr, &plan.daddr, plan.ports))
}

/// Where the packet goes: the new source and destination, ports packed as for `nat6`.
struct Plan6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    ports: u32,
    service_id: u32,
    snat: u32,
    new_flow: u32,
}

/// `established6`: the plan holds the flow's translation.
const FOLLOW: i32 = i32::MIN + 2;

/// `choose6`: answer with ICMPv6 port unreachable.
const REJECT: i32 = i32::MIN + 1;

fn key6(p: &Packet6) -> Ct6Key {
    Ct6Key {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    }
}

/// `established6` found no flow entry to follow.
const NOT_TRACKED: i32 = i32::MIN;

/// Follow the packet's flow entry, if it has one (and is not a new connection reusing a
/// closed flow's tuple): `FOLLOW` with the plan filled, or `NOT_TRACKED`.
#[inline(never)]
fn established6(p: &Packet6, tcp_flags: u32, plan: &mut Plan6) -> i32 {
    let tcp_flags = tcp_flags as u8;
    let key = &key6(p);
    let Some(ct) = (unsafe { CT6.get(key) }) else {
        return NOT_TRACKED;
    };
    let ct = *ct;
    if ct.flags & (CT_REVERSE | CT_CLOSING) == CT_CLOSING
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        return NOT_TRACKED;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        mark_closing6(key, &ct);
    }
    let snat = ct.flags & CT_SNAT != 0;
    if ct.flags & CT_REVERSE != 0 {
        plan.saddr = ct.new_saddr;
        plan.daddr = if snat { ct.new_daddr } else { p.daddr };
        plan.ports = ports(ct.new_sport, if snat { ct.new_dport } else { p.dport });
    } else {
        plan.saddr = if snat { ct.new_saddr } else { p.saddr };
        plan.daddr = ct.new_daddr;
        plan.ports = ports(if snat { ct.new_sport } else { p.sport }, ct.new_dport);
    }
    plan.service_id = ct.service_id;
    FOLLOW
}

/// A packet without a flow entry: for a frontend's first packet, choose the backend and
/// whether to masquerade into the plan (`NOT_TRACKED`), or return the verdict.
#[inline(never)]
fn choose6(p: &Packet6, tcp_flags: u32, plan: &mut Plan6) -> i32 {
    let tcp_flags = tcp_flags as u8;
    // As in `tc4`: the external entry first, the source-address trie only for frontends.
    let mut fkey = Frontend6Key {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
    };
    let Some(ext) = (unsafe { FRONTENDS6.get(&fkey) }) else {
        return TCX_NEXT;
    };
    let mut fe = *ext;
    if LOCAL_CIDRS6
        .get(&LpmKey::new(128, Cidr6 { addr: p.saddr }))
        .is_some()
    {
        fkey.scope = SCOPE_INTERNAL;
        let Some(int) = (unsafe { FRONTENDS6.get(&fkey) }) else {
            return TCX_NEXT;
        };
        fe = *int;
    }
    if fe.flags & FE_NODEPORT != 0
        && p.proto == IPPROTO_TCP
        && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return TCX_NEXT;
    }
    if fe.flags & FE_SOURCE_RANGES != 0 {
        let k = LpmKey::new(
            32 + 128,
            SourceRange6 {
                set_id: fe.set_id,
                addr: p.saddr,
            },
        );
        if SRC_RANGES6.get(&k).is_none() {
            return TC_ACT_SHOT as i32;
        }
    }
    let Some(set) = (unsafe { SETS.get(&fe.set_id) }) else {
        return TCX_NEXT;
    };
    let set = *set;
    let client = ((p.saddr[0] ^ p.saddr[2]) as u64) << 32 | (p.saddr[1] ^ p.saddr[3]) as u64;
    let be = match select_backend(
        fe.set_id,
        &set,
        client,
        AFFINITY_CLIENT_ADDR6,
        flow_hash6(p),
    ) {
        Verdict::Backend(_, be) => be,
        Verdict::Reject => return REJECT,
        Verdict::Drop => return TC_ACT_SHOT as i32,
    };
    if be.family != 6 {
        return TC_ACT_SHOT as i32;
    }
    let masquerade_all = CONFIG.get(0).is_some_and(|c| c.masquerade_all != 0);
    let snat6 = CONFIG6.get(0).map_or([0; 4], |c| c.snat_addr6);
    let snat = (fe.flags & FE_SNAT != 0 || be.addr == p.saddr || masquerade_all)
        && snat6 != [0; 4]
        && snat6 != p.saddr;
    plan.saddr = if snat { snat6 } else { p.saddr };
    plan.daddr = be.addr;
    plan.ports = ports(p.sport, be.port);
    plan.snat = u32::from(snat);
    plan.service_id = set.service_id;
    plan.new_flow = 1;
    NOT_TRACKED
}

/// Record both flow entries (choosing a free source port when masquerading); false on
/// failure.
#[inline(never)]
fn track6(p: &Packet6, plan: &mut Plan6) -> bool {
    let be_port = (plan.ports >> 16) as u16;
    let mut new_sport = p.sport;
    let mut rkey = Ct6Key {
        saddr: plan.daddr,
        daddr: plan.saddr,
        sport: be_port,
        dport: new_sport,
        proto: p.proto,
        pad: [0; 3],
    };
    // Another flow may own this (address, port) towards the backend (see tc4): choose
    // another source port unless the entry is this very flow's; when every port tried is
    // taken, reuse a finished flow's leftover but never a live flow's (drop instead).
    let mut tries = 0;
    loop {
        let Some(r) = (unsafe { CT6.get(&rkey) }) else {
            break;
        };
        if r.new_daddr == p.saddr
            && r.new_dport == p.sport
            && r.new_saddr == p.daddr
            && r.new_sport == p.dport
        {
            break;
        }
        if tries == 8 {
            let owner = Ct6Key {
                saddr: r.new_daddr,
                daddr: r.new_saddr,
                sport: r.new_dport,
                dport: r.new_sport,
                proto: p.proto,
                pad: [0; 3],
            };
            match unsafe { CT6.get(&owner) } {
                Some(f) if f.flags & CT_CLOSING == 0 => return false,
                _ => break,
            }
        }
        new_sport = ((32768 + random() % 28232) as u16).to_be();
        rkey.dport = new_sport;
        tries += 1;
    }
    let flags = if plan.snat != 0 || new_sport != p.sport {
        CT_SNAT
    } else {
        0
    };
    let fwd = Ct6Value {
        new_saddr: plan.saddr,
        new_daddr: plan.daddr,
        new_sport,
        new_dport: be_port,
        flags,
        service_id: plan.service_id,
        pad: 0,
    };
    if CT6.insert(&key6(p), &fwd, 0).is_err() {
        return false;
    }
    let rev = Ct6Value {
        new_saddr: p.daddr,
        new_daddr: p.saddr,
        new_sport: p.dport,
        new_dport: p.sport,
        flags: CT_REVERSE | flags,
        service_id: plan.service_id,
        pad: 0,
    };
    if CT6.insert(&rkey, &rev, 0).is_err() {
        return false;
    }
    plan.ports = ports(new_sport, be_port);
    true
}
