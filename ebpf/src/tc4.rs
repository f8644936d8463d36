//! The per-packet path for IPv4: flow tracking in `SY_CT4`, frontend lookup, backend choice,
//! DNAT/SNAT with incremental checksums, reject, and forwarding with a FIB lookup.

use super::*;

pub(crate) const ETH_LEN: usize = 14;
pub(crate) const IP_CSUM: usize = ETH_LEN + 10;
pub(crate) const IP_SRC: usize = ETH_LEN + 12;
pub(crate) const IP_DST: usize = ETH_LEN + 16;

pub(crate) struct Packet {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
    len: u32,
}

#[inline(always)]
fn set_addr(ctx: &TcContext, p: &Packet, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        csum_offset(p.proto, p.l4),
        old as u64,
        new as u64,
        mangled(p.proto) | BPF_F_PSEUDO_HDR as u64 | 4,
    )?;
    ctx.l3_csum_replace(IP_CSUM, old as u64, new as u64, 4)?;
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
    set_port(ctx, p.proto, p.l4, p.l4, p.sport, sport)?;
    set_port(ctx, p.proto, p.l4, p.l4 + 2, p.dport, dport)?;
    Ok(())
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
pub(crate) fn try_tc(ctx: &TcContext) -> Result<i32, i64> {
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

    // Every frontend the tc path serves has an external-scope entry (the internal-only ones
    // are the socket LB's loopback NodePorts): a packet to anything else leaves after one
    // hash lookup, before the source-address trie is walked.
    let mut fkey = Frontend4Key {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
    };
    let Some(ext) = (unsafe { FRONTENDS4.get(&fkey) }) else {
        return Ok(TCX_NEXT);
    };
    let mut fe = *ext;
    if LOCAL_CIDRS4
        .get(&LpmKey::new(32, Cidr4 { addr: p.saddr }))
        .is_some()
    {
        fkey.scope = SCOPE_INTERNAL;
        let Some(int) = (unsafe { FRONTENDS4.get(&fkey) }) else {
            return Ok(TCX_NEXT);
        };
        fe = *int;
    }
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
    let mut rkey = Ct4Key {
        saddr: be.addr[0],
        daddr: new_saddr,
        sport: be.port,
        dport: new_sport,
        proto: p.proto,
        pad: [0; 3],
    };
    // Another flow may already own this (address, port) towards the backend: another client
    // behind the same masquerade address, or this client's flow to another Service with the
    // same backend from the same source port (the kernel shares a source port between
    // different destinations). Taking its reverse entry would send its replies to us, so
    // choose another source port, as netfilter's NAT does; the entry of this very flow
    // (reopened with the same tuple) may be reused. When every port tried is taken, a
    // finished flow's leftover is reused; a live flow's never is: the packet is dropped and
    // the client's retransmission tries again, as when netfilter finds no free tuple.
    let mut tries = 0;
    loop {
        let Some(r) = (unsafe { CT4.get(&rkey) }) else {
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
            let owner = Ct4Key {
                saddr: r.new_daddr,
                daddr: r.new_saddr,
                sport: r.new_dport,
                dport: r.new_sport,
                proto: p.proto,
                pad: [0; 3],
            };
            match unsafe { CT4.get(&owner) } {
                Some(f) if f.flags & CT_CLOSING == 0 => return Ok(TC_ACT_SHOT as i32),
                _ => break,
            }
        }
        new_sport = ((32768 + random() % 28232) as u16).to_be();
        rkey.dport = new_sport;
        tries += 1;
    }
    let snat = new_saddr != p.saddr || new_sport != p.sport;
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
