//! L4 helpers both families' per-packet paths share: checksum offsets and flags, port
//! rewrites, the flow-hash mix, checksum folding, and acting on a FIB lookup.

use super::*;

/// Where the L4 checksum is: TCP at +16, UDP at +6.
#[inline(always)]
pub(crate) fn csum_offset(proto: u8, l4: usize) -> usize {
    if proto == IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    }
}

/// UDP checksums of 0 mean "none": keep them so when rewriting.
#[inline(always)]
pub(crate) fn mangled(proto: u8) -> u64 {
    if proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrite one port at `off`, fixing the L4 checksum.
#[inline(always)]
pub(crate) fn set_port(
    ctx: &TcContext,
    proto: u8,
    l4: usize,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        csum_offset(proto, l4),
        old as u64,
        new as u64,
        mangled(proto) | 2,
    )?;
    ctx.store(off, &new, 0)?;
    Ok(())
}

#[inline(always)]
pub(crate) fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The flow hash of both families: folded addresses, ports and protocol, mixed.
#[inline(always)]
pub(crate) fn mix(addrs: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = addrs ^ ((sport as u32) << 16 | dport as u32) ^ proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Act on a FIB lookup's answer (both families): out of the egress device with its MACs,
/// through the neighbour subsystem when the next hop is unresolved, else to the stack.
#[inline(always)]
pub(crate) fn redirect(ctx: &TcContext, rc: i64, params: &bpf_fib_lookup) -> i32 {
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
