//! A ctnetlink socket: the real conntrack table.

use super::ConntrackTable;
use super::codec::{Entry, IPCTNL_MSG_CT_NEW, ct_type, delete_request, dump_request, parse_entry};
use crate::nl;

/// A ctnetlink socket in the caller's network namespace.
#[derive(Debug)]
pub struct Conntrack {
    sock: nl::Socket,
}

impl Conntrack {
    pub fn open() -> std::io::Result<Conntrack> {
        Ok(Conntrack {
            sock: nl::Socket::open(netlink_sys::protocols::NETLINK_NETFILTER)?,
        })
    }

    /// Every entry of one address family (`AF_INET` or `AF_INET6`).
    pub fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        let seq = self.sock.next_seq();
        let mut out = Vec::new();
        self.sock.dump(
            &dump_request(family, seq),
            seq,
            "dumping conntrack entries",
            |m| {
                if m.ty == ct_type(IPCTNL_MSG_CT_NEW) {
                    out.extend(parse_entry(m.payload));
                }
            },
        )?;
        Ok(out)
    }

    /// Delete one entry; `false` when it was already gone.
    pub fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        let seq = self.sock.next_seq();
        self.sock
            .acked(&delete_request(e, seq), seq, "deleting a conntrack entry")
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
