//! sock_diag (`NETLINK_SOCK_DIAG`): the connected TCP and UDP sockets of this network
//! namespace, and `SOCK_DESTROY` for one of them (the kernel's `CONFIG_INET_DIAG_DESTROY`,
//! what `ss -K` uses). The socket load balancer translates a socket's destination once, at
//! `connect()`; when that endpoint goes away, destroying the socket makes the application
//! see `ECONNABORTED` and reconnect, through the load balancer, to a live endpoint.

use crate::nl;

pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub const SOCK_DESTROY: u16 = 21;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// TCP states of a socket with a peer (not LISTEN, TIME_WAIT or CLOSE); a connected UDP
/// socket is in ESTABLISHED.
const CONNECTED_TCP_STATES: u32 = (1 << 1) // ESTABLISHED
    | (1 << 2) // SYN_SENT
    | (1 << 3) // SYN_RECV
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING
const CONNECTED_UDP_STATES: u32 = 1 << 1;

/// One socket as sock_diag names it (`inet_diag_sockid`, addresses and ports as the kernel
/// sends them: network order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sock {
    pub family: u8,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ifindex: u32,
    /// The socket cookie (`bpf_get_socket_cookie` gives the same number).
    pub cookie: u64,
}

fn words(b: &[u8]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// `inet_diag_req_v2` for `family`/`protocol`, matching `states`, naming `sock` (a
/// destroy) or nothing (a dump).
pub fn request(family: u8, protocol: u8, states: u32, sock: Option<&Sock>) -> Vec<u8> {
    let mut p = Vec::with_capacity(56);
    p.extend_from_slice(&[family, protocol, 0, 0]);
    p.extend_from_slice(&states.to_ne_bytes());
    let s = sock.copied().unwrap_or(Sock {
        family,
        protocol,
        sport: 0,
        dport: 0,
        src: [0; 4],
        dst: [0; 4],
        ifindex: 0,
        cookie: u64::MAX, // INET_DIAG_NOCOOKIE
    });
    p.extend_from_slice(&s.sport.to_ne_bytes());
    p.extend_from_slice(&s.dport.to_ne_bytes());
    for w in s.src.iter().chain(&s.dst) {
        p.extend_from_slice(&w.to_ne_bytes());
    }
    p.extend_from_slice(&s.ifindex.to_ne_bytes());
    // The kernel's cookie[0] is the low half, cookie[1] the high half.
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (s.cookie as u32, (s.cookie >> 32) as u32);
    p.extend_from_slice(&lo.to_ne_bytes());
    p.extend_from_slice(&hi.to_ne_bytes());
    p
}

/// One `inet_diag_msg` of a dump.
pub fn parse(protocol: u8, payload: &[u8]) -> Option<Sock> {
    if payload.len() < 72 {
        return None;
    }
    let id = &payload[4..52];
    let u32at = |i: usize| u32::from_ne_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
    Some(Sock {
        family: payload[0],
        protocol,
        sport: u16::from_ne_bytes([id[0], id[1]]),
        dport: u16::from_ne_bytes([id[2], id[3]]),
        src: words(&id[4..20]),
        dst: words(&id[20..36]),
        ifindex: u32at(36),
        cookie: u64::from(u32at(40)) | (u64::from(u32at(44)) << 32),
    })
}

/// A sock_diag socket in the caller's network namespace.
#[derive(Debug)]
pub struct SockDiag {
    sock: nl::Socket,
}

impl SockDiag {
    pub fn open() -> std::io::Result<SockDiag> {
        Ok(SockDiag {
            sock: nl::Socket::open(netlink_sys::protocols::NETLINK_SOCK_DIAG)?,
        })
    }

    /// The connected sockets of one family (`AF_INET`/`AF_INET6`) and protocol.
    pub fn connected(&mut self, family: u8, protocol: u8) -> std::io::Result<Vec<Sock>> {
        let states = if protocol == IPPROTO_UDP {
            CONNECTED_UDP_STATES
        } else {
            CONNECTED_TCP_STATES
        };
        let seq = self.sock.next_seq();
        let req = request(family, protocol, states, None);
        let msg = nl::message(
            SOCK_DIAG_BY_FAMILY,
            nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
            seq,
            &req,
        );
        let mut out = Vec::new();
        self.sock
            .dump(&msg, seq, "listing sockets (sock_diag)", |m| {
                if m.ty == SOCK_DIAG_BY_FAMILY {
                    out.extend(parse(protocol, m.payload));
                }
            })?;
        Ok(out)
    }

    /// A sock_diag socket in another network namespace (`netns`: a file such as
    /// `/run/netns/NAME` or `/proc/PID/ns/net`). Entering it takes `CAP_SYS_ADMIN`; a
    /// short-lived thread enters it, so this process's own threads stay where they are, and
    /// the socket keeps answering for that namespace afterwards.
    pub fn open_in(netns: &std::path::Path) -> std::io::Result<SockDiag> {
        let f = std::fs::File::open(netns)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                SockDiag::open()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sock_diag thread panicked")))
        })
    }

    /// Destroy one socket; `false` when it was already gone.
    pub fn destroy(&mut self, s: &Sock) -> std::io::Result<bool> {
        let seq = self.sock.next_seq();
        let req = request(s.family, s.protocol, u32::MAX, Some(s));
        let msg = nl::message(SOCK_DESTROY, nl::NLM_F_REQUEST | nl::NLM_F_ACK, seq, &req);
        self.sock
            .acked(&msg, seq, "destroying a socket (sock_diag)")
    }
}

/// The network namespaces of this node other than the caller's, each once: those
/// bind-mounted under `/run/netns` (`ip netns`, and the CNI runtimes' pod namespaces:
/// containerd's and CRI-O's `cni-*`), then those of the processes in `/proc` (all of the
/// host's when its PIDs are visible).
pub fn other_namespaces() -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut seen: std::collections::HashSet<(u64, u64)> =
        id(std::path::Path::new("/proc/self/ns/net"))
            .into_iter()
            .collect();
    let mut out = Vec::new();
    let mounted = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path());
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for p in mounted.chain(procs) {
        if let Some(i) = id(&p)
            && seen.insert(i)
        {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_through_the_message_layout() {
        let s = Sock {
            family: 2,
            protocol: IPPROTO_UDP,
            sport: 0x3412,
            dport: 0x3500,
            src: [0x0100_007f, 0, 0, 0],
            dst: [0x0b01_f40a, 0, 0, 0],
            ifindex: 0,
            cookie: 0x1234_5678_9abc_def0,
        };
        let req = request(2, IPPROTO_UDP, u32::MAX, Some(&s));
        assert_eq!(req.len(), 56);
        // A dump answer carries the same sockid after family/state/timer/retrans.
        let mut msg = vec![2, 1, 0, 0];
        msg.extend_from_slice(&req[8..56]);
        msg.resize(72, 0);
        assert_eq!(parse(IPPROTO_UDP, &msg), Some(s));
        assert_eq!(parse(IPPROTO_UDP, &msg[..71]), None);
    }

    #[test]
    fn a_connected_udp_socket_is_listed_and_destroyed() {
        // Needs CAP_NET_ADMIN for the destroy; the suite runs as root.
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let port = client.local_addr().unwrap().port().to_be();
        let mut d = SockDiag::open().unwrap();
        let socks = d.connected(2, IPPROTO_UDP).unwrap();
        let mine = socks
            .iter()
            .find(|s| s.sport == port)
            .copied()
            .unwrap_or_else(|| panic!("the connected socket is not listed: {socks:?}"));
        assert_eq!(mine.dport, server.local_addr().unwrap().port().to_be());
        assert!(d.destroy(&mine).unwrap(), "destroy");
        // The kernel aborts and disconnects it: the pending error on the next receive, and
        // a send has no destination any more.
        client.set_nonblocking(true).unwrap();
        let err = client.recv(&mut [0; 8]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ECONNABORTED), "{err}");
        let err = client.send(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EDESTADDRREQ), "{err}");
        assert!(!d.destroy(&mine).unwrap(), "gone already");
    }
}
