//! Socket LB (cgroup sock_addr hooks) for IPv4, IPv6 and v4-mapped addresses: connect and
//! sendmsg rewrite a service frontend to a backend, recvmsg and getpeername rewrite it back.

use super::*;

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

/// The cluster DNS Service, while the node-local resolver's heartbeat is fresh: its
/// address instead of an endpoint (Cilium's Local Redirect Policy for node-local DNS).
#[inline(always)]
fn dns_local(set: &SetValue, set_id: u32, proto: u8, verdict: Verdict) -> Verdict {
    if set.flags & SET_DNS_LOCAL == 0 {
        return verdict;
    }
    let Some(r) = DNS_REDIRECT.get(0) else {
        return verdict;
    };
    if r.enabled == 0 || now_ns().wrapping_sub(r.heartbeat_ns) > DNS_HEARTBEAT_NS {
        return verdict;
    }
    Verdict::Backend(
        0,
        BackendValue {
            addr: [r.addr4, 0, 0, 0],
            port: r.port,
            proto,
            family: 4,
            set_id,
            flags: 0,
        },
    )
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
    Some((set, dns_local(&set, set_id, proto, v)))
}

/// Record what a socket asked for, for recvmsg/getpeername. An unconnected UDP socket sends
/// every datagram through sendmsg4: when the entry is already there (a lookup also keeps it
/// from being the LRU's next victim), the update, with its LRU list locks, is skipped.
#[inline(always)]
fn remember4(key: &SockRev4Key, val: &SockRev4Value) {
    if let Some(old) = unsafe { SOCK_REVNAT4.get(key) }
        && old.addr == val.addr
        && old.port == val.port
    {
        return;
    }
    let _ = SOCK_REVNAT4.insert(key, val, 0);
}

#[inline(always)]
fn remember6(key: &SockRev6Key, val: &SockRev6Value) {
    if let Some(old) = unsafe { SOCK_REVNAT6.get(key) }
        && old.addr == val.addr
        && old.port == val.port
    {
        return;
    }
    let _ = SOCK_REVNAT6.insert(key, val, 0);
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
            remember4(&key, &val);
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
                remember6(&key, &val);
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
            remember6(&key, &val);
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
