//! The few netlink wire helpers our hand-written families share (IPVS generic netlink and
//! ctnetlink): attribute encoding with 4-byte alignment, the message header, and iteration
//! over the messages of a datagram and the attributes of a payload.

pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_HDRLEN: usize = 16;

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Append one attribute (padded to 4 bytes).
pub fn nla(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align(buf.len()), 0);
}

/// Append a nested attribute holding `inner`.
pub fn nested(buf: &mut Vec<u8>, ty: u16, inner: &[u8]) {
    nla(buf, ty | NLA_F_NESTED, inner);
}

/// A whole message: the header for `ty`/`flags`/`seq` followed by `payload`.
pub fn message(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// One received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl Msg<'_> {
    /// For an `NLMSG_ERROR`: the errno (0 is the ACK).
    pub fn error(&self) -> Option<i32> {
        (self.ty == NLMSG_ERROR && self.payload.len() >= 4).then(|| {
            // The kernel sends -errno; a corrupt i32::MIN must not overflow the negation.
            i32::from_ne_bytes([
                self.payload[0],
                self.payload[1],
                self.payload[2],
                self.payload[3],
            ])
            .saturating_neg()
        })
    }
}

/// The messages in one datagram; a truncated tail ends the iteration.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let m = Msg {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = &rest[align(len).min(rest.len())..];
        Some(m)
    })
}

/// The attributes of a payload as (type without the nested/byte-order flags, value).
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        if len < 4 || len > rest.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        let value = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((ty, value))
    })
}

/// The first attribute of type `ty`.
pub fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// A netlink socket of one protocol in the caller's network namespace, for request/answer
/// exchanges (a dump, or one request acknowledged), as ctnetlink and sock_diag use it.
pub struct Socket {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// An errno from the kernel as an io::Error saying what was being done.
pub fn errno(e: i32, what: &str) -> std::io::Error {
    let os = std::io::Error::from_raw_os_error(e);
    std::io::Error::new(os.kind(), format!("{what}: {os}"))
}

impl Socket {
    /// Open, bind and connect to the kernel, with a 5 s receive timeout.
    pub fn open(protocol: isize) -> std::io::Result<Socket> {
        let mut sock = netlink_sys::Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(std::io::Error::from)?;
        Ok(Socket {
            sock,
            seq: 1,
            buf: vec![0; 1 << 16],
        })
    }

    /// The sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Send a dump request (`msg`, numbered `seq`) and hand each answer message to `each`
    /// until `NLMSG_DONE`; an error message is returned as an error about `what`.
    pub fn dump(
        &mut self,
        msg: &[u8],
        seq: u32,
        what: &str,
        mut each: impl FnMut(&Msg<'_>),
    ) -> std::io::Result<()> {
        self.sock.send(msg, 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let e = m.error().unwrap_or(0);
                        if e != 0 {
                            return Err(errno(e, what));
                        }
                    }
                    _ => each(&m),
                }
            }
        }
    }

    /// Send a request that asks for an ACK; `false` when the kernel answers ENOENT (the
    /// object was already gone), an error about `what` for any other errno.
    pub fn acked(&mut self, msg: &[u8], seq: u32, what: &str) -> std::io::Result<bool> {
        self.sock.send(msg, 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.error() {
                    Some(0) => return Ok(true),
                    Some(nix::libc::ENOENT) => return Ok(false),
                    Some(err) => return Err(errno(err, what)),
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_code_of_i32_min_does_not_overflow() {
        // Found by the conntrack fuzz target (fuzz/regressions/conntrack/).
        let payload = i32::MIN.to_ne_bytes();
        let m = Msg {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 0,
            payload: &payload,
        };
        assert_eq!(m.error(), Some(i32::MAX));
        let ack = 0i32.to_ne_bytes();
        assert_eq!(Msg { payload: &ack, ..m }.error(), Some(0));
        let enoent = (-2i32).to_ne_bytes();
        assert_eq!(
            Msg {
                payload: &enoent,
                ..m
            }
            .error(),
            Some(2)
        );
    }

    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_flags() {
        let mut inner = Vec::new();
        nla(&mut inner, 1, &[7]);
        nla(&mut inner, 2, &[1, 2, 3, 4, 5]);
        let mut outer = Vec::new();
        nested(&mut outer, 3, &inner);
        nla(&mut outer, 4, &[]);
        assert_eq!(outer.len() % 4, 0);
        let got: Vec<(u16, Vec<u8>)> = attrs(&outer).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 3, "nested flag is masked off");
        assert_eq!(got[1], (4, vec![]));
        assert_eq!(attr(&got[0].1, 2), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(attr(&got[0].1, 1), Some(&[7u8][..]));
    }

    #[test]
    fn messages_split_a_datagram_and_stop_at_a_truncated_tail() {
        let mut buf = message(0x101, NLM_F_REQUEST, 9, &[1, 2, 3, 4]);
        buf.extend(message(NLMSG_ERROR, 0, 10, &(-2i32).to_ne_bytes()));
        buf.extend_from_slice(&[0xff; 10]);
        let got: Vec<Msg<'_>> = messages(&buf).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].ty, got[0].seq, got[0].payload),
            (0x101, 9, &[1u8, 2, 3, 4][..])
        );
        assert_eq!(got[1].error(), Some(2));
        assert_eq!(got[0].error(), None);
    }
}
