//! A ctnetlink socket: the real conntrack table.

use super::ConntrackTable;
use super::codec::{Entry, IPCTNL_MSG_CT_NEW, ct_type, delete_request, dump_request, parse_entry};
use crate::nl;

/// A ctnetlink socket in the caller's network namespace.
pub struct Conntrack {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn errno(e: i32, what: &str) -> std::io::Error {
    let os = std::io::Error::from_raw_os_error(e);
    std::io::Error::new(os.kind(), format!("{what}: {os}"))
}

impl Conntrack {
    pub fn open() -> std::io::Result<Conntrack> {
        use netlink_sys::{SocketAddr, protocols::NETLINK_NETFILTER};
        let mut sock = netlink_sys::Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(std::io::Error::from)?;
        Ok(Conntrack {
            sock,
            seq: 1,
            buf: vec![0; 1 << 16],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Every entry of one address family (`AF_INET` or `AF_INET6`).
    pub fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        let seq = self.next_seq();
        self.sock.send(&dump_request(family, seq), 0)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    nl::NLMSG_DONE => return Ok(out),
                    nl::NLMSG_ERROR => {
                        let e = m.error().unwrap_or(0);
                        if e != 0 {
                            return Err(errno(e, "dumping conntrack entries"));
                        }
                    }
                    t if t == ct_type(IPCTNL_MSG_CT_NEW) => {
                        out.extend(parse_entry(m.payload));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Delete one entry; `false` when it was already gone.
    pub fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        let seq = self.next_seq();
        self.sock.send(&delete_request(e, seq), 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in nl::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.error() {
                    Some(0) => return Ok(true),
                    Some(nix::libc::ENOENT) => return Ok(false),
                    Some(err) => return Err(errno(err, "deleting a conntrack entry")),
                    None => {}
                }
            }
        }
    }
}

impl ConntrackTable for Conntrack {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        Conntrack::list(self, family)
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        Conntrack::delete(self, e)
    }
}
