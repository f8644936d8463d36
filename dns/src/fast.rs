//! The UDP fast path: one SO_REUSEPORT socket and one thread per worker, answering the cluster
//! zone synchronously with a per-worker cache of encoded responses keyed by the query bytes
//! (everything after the ID), dropped whenever a new snapshot is swapped in. Names outside the
//! zone go to the async forwarder. TCP stays on hickory-server.
//!
//! A worker takes up to `BATCH` queued datagrams per `recvmmsg` and sends the answers it has
//! for them with one `sendmmsg`, as Knot does: under load most of a query's cost is the two
//! system calls, not the answer.

use std::collections::HashMap as StdMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use tokio_util::sync::CancellationToken;

use crate::handler::Handler;
use crate::metrics::{Counted, Plugin};
use crate::resolve::{Outcome, resolve};
use crate::snapshot::Snapshot;

const CACHE_LIMIT: usize = 200_000;

/// The worker's maps are looked up once or twice per query: a fast hash (randomly seeded per
/// map) rather than SipHash.
type HashMap<K, V> = StdMap<K, V, foldhash::fast::RandomState>;

/// Datagrams taken per `recvmmsg` (and answers sent per `sendmmsg`).
const BATCH: usize = 32;

/// Bytes kept of one query datagram.
const SLOT: usize = 4096;

/// Answers made while handling one batch, sent together.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    msgs: Vec<(Range<usize>, SockaddrStorage)>,
}

impl Outbox {
    /// Queue `wire` for `peer`; returns where it lies, for patching.
    fn push(&mut self, wire: &[u8], peer: SocketAddr) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(wire);
        let at = start..self.bytes.len();
        self.msgs.push((at.clone(), SockaddrStorage::from(peer)));
        at
    }

    /// Send everything queued, in as few `sendmmsg` calls as the kernel takes. A datagram
    /// the kernel refuses (its error is that call's) is dropped, as `send_to`'s was.
    fn send(&mut self, sock: &UdpSocket, hdrs: &mut MultiHeaders<SockaddrStorage>) {
        let mut done = 0;
        while done < self.msgs.len() {
            let slices: Vec<[IoSlice<'_>; 1]> = self.msgs[done..]
                .iter()
                .map(|(at, _)| [IoSlice::new(&self.bytes[at.clone()])])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> =
                self.msgs[done..].iter().map(|(_, a)| Some(*a)).collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            let sent = sendmmsg(
                sock.as_raw_fd(),
                hdrs,
                &slices,
                &addrs,
                no_cmsgs,
                MsgFlags::empty(),
            )
            .map_or(0, Iterator::count);
            done += sent.max(1);
        }
        self.bytes.clear();
        self.msgs.clear();
    }
}

/// The sender of a datagram as a std address.
fn peer_of(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// A header-only error response for a packet we could not parse (FORMERR), or `None` when
/// the packet is too short to carry an ID or is itself a response (dropped).
pub fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return None;
    }
    let mut out = vec![0u8; 12];
    out[0] = raw[0];
    out[1] = raw[1];
    // QR=1, opcode copied, RD copied; RA=1; RCODE=FORMERR.
    out[2] = 0x80 | (raw[2] & 0x79);
    out[3] = 0x80 | 1;
    Some(out)
}

/// Encode a response within the client's size limit; too large -> truncated (TC, no records).
pub fn encode(req: &Message, mut resp: Message) -> Option<Vec<u8>> {
    let limit = req
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().clamp(512, 1232)));
    let wire = resp.to_vec().ok()?;
    if wire.len() <= limit {
        return Some(wire);
    }
    resp.answers.clear();
    resp.authorities.clear();
    resp.additionals.clear();
    resp.metadata.truncation = true;
    resp.to_vec().ok()
}

/// A cluster-zone answer kept encoded by one worker.
struct ZoneHit {
    out: Vec<u8>,
    qtype: u16,
    /// An NXDOMAIN that is the first search step of this namespace's pods: for them (with
    /// autopath on) the path is walked instead.
    autopath_ns: Option<Box<str>>,
}

/// A forwarded answer kept encoded by one worker.
struct FwdHit {
    out: Vec<u8>,
    qtype: u16,
    rcode: u8,
    denial: bool,
    /// Byte offsets of the records' TTLs (OPT excluded) and their values when stored.
    ttl_at: Vec<(usize, u32)>,
    stored: Instant,
    /// After this the shared cache answers again (it refreshes popular names before expiry).
    until: Instant,
}

fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let l = *b.get(i)?;
        if l & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        if l == 0 {
            return Some(i + 1);
        }
        i += 1 + usize::from(l);
    }
}

/// The offsets and values of every record's TTL in an encoded message (not OPT's, whose
/// TTL field holds flags).
fn ttl_offsets(b: &[u8]) -> Option<Vec<(usize, u32)>> {
    let n = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *b.get(i)?,
            *b.get(i + 1)?,
        ])))
    };
    let (qd, an, ns, ar) = (n(4)?, n(6)?, n(8)?, n(10)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an + ns + ar {
        i = skip_name(b, i)?;
        let ty = n(i)?;
        let ttl = u32::from_be_bytes(b.get(i + 4..i + 8)?.try_into().ok()?);
        if ty != 41 {
            out.push((i + 4, ttl));
        }
        i += 10 + n(i + 8)?;
    }
    (i == b.len()).then_some(out)
}

struct Worker {
    handler: Handler,
    sock: UdpSocket,
    /// Answers of the batch being handled.
    outbox: Outbox,
    rt: tokio::runtime::Handle,
    /// Query bytes after the ID -> (encoded response, query type) for this snapshot.
    cache: HashMap<Vec<u8>, ZoneHit>,
    /// The snapshot the cache was filled from (compared by pointer).
    cache_for: Option<Arc<Snapshot>>,
    /// Forwarded names answered from the shared cache, kept encoded: query bytes after the ID
    /// -> the response, with where its TTLs are so they count down.
    fwd: HashMap<Vec<u8>, FwdHit>,
    counts: HashMap<Counted, u64>,
    /// Cache hits not yet counted: success, denial (batched like `counts`).
    hits: [u64; 2],
    hist: HashMap<u16, prometheus_client::metrics::histogram::Histogram>,
    last_flush: Instant,
    n: u64,
}

impl Worker {
    fn flush(&mut self) {
        for (c, n) in self.counts.drain() {
            self.handler.metrics.count(c, n);
        }
        for (denial, n) in [(false, self.hits[0]), (true, self.hits[1])] {
            if n > 0 {
                self.handler.metrics.cache_hits_add(denial, n);
            }
        }
        self.hits = [0; 2];
        self.last_flush = Instant::now();
    }

    fn count(&mut self, qtype: u16, rcode: u8, peer: SocketAddr, plugin: Plugin) {
        let c = Counted {
            qtype,
            rcode,
            ipv6: peer.ip().to_canonical().is_ipv6(),
            tcp: false,
            plugin,
        };
        *self.counts.entry(c).or_default() += 1;
    }

    fn handle(&mut self, raw: &[u8], peer: SocketAddr) {
        self.n += 1;
        let start = Instant::now();
        // A guard, not a clone: no shared reference count bounced between workers per query.
        let snap = self.handler.snapshot.load();
        if !self
            .cache_for
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &*snap))
        {
            self.cache.clear();
            self.cache_for = Some(Arc::clone(&*snap));
        }
        if raw.len() >= 12
            && raw[2] & 0x80 == 0
            && let Some(h) = self.fwd.get(&raw[2..])
        {
            if start < h.until {
                let at = self.outbox.push(&h.out, peer);
                let out = &mut self.outbox.bytes[at];
                out[0] = raw[0];
                out[1] = raw[1];
                let age =
                    u32::try_from(start.duration_since(h.stored).as_secs()).unwrap_or(u32::MAX);
                for (off, ttl) in &h.ttl_at {
                    out[*off..*off + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
                }
                let (qtype, rcode, denial) = (h.qtype, h.rcode, h.denial);
                self.hits[usize::from(denial)] += 1;
                self.count(qtype, rcode, peer, Plugin::Cache);
                self.sample(qtype, start);
                return;
            }
            self.fwd.remove(&raw[2..]);
        }
        if raw.len() >= 12
            && raw[2] & 0x80 == 0
            && let Some(hit) = self.cache.get(&raw[2..])
            && !hit.autopath_ns.as_deref().is_some_and(|ns| {
                self.handler
                    .pods
                    .as_ref()
                    .and_then(|p| p.namespace_of(peer.ip()))
                    .as_deref()
                    == Some(ns)
            })
        {
            {
                let at = self.outbox.push(&hit.out, peer);
                let qtype = hit.qtype;
                let out = &mut self.outbox.bytes[at];
                out[0] = raw[0];
                out[1] = raw[1];
                let rcode = out[3] & 0x0f;
                self.count(qtype, rcode, peer, Plugin::Kubernetes);
                self.sample(qtype, start);
                return;
            }
        }
        let req = match Message::from_vec(raw) {
            Ok(m) if m.metadata.message_type == MessageType::Query => m,
            _ => {
                self.handler.metrics.malformed.inc();
                if let Some(out) = formerr(raw) {
                    self.outbox.push(&out, peer);
                }
                return;
            }
        };
        let qtype = req.queries.first().map_or(0, |q| u16::from(q.query_type()));
        match resolve(&snap, &req) {
            Outcome::Answer(m)
                if m.metadata.response_code != ResponseCode::NXDomain
                    || !self.handler.wants_autopath(&req, peer.ip()) =>
            {
                let rcode = m.metadata.response_code.low();
                // An NXDOMAIN that some namespace's pods ask first is kept with that
                // namespace: answered from here for everyone else.
                let autopath_ns = (rcode == 3 && self.handler.pods.is_some())
                    .then(|| {
                        let q = crate::autopath::qname(&req)?;
                        crate::autopath::first_step_namespace(&q, &snap.cfg.zone).map(Box::from)
                    })
                    .flatten();
                if let Some(out) = encode(&req, *m) {
                    self.outbox.push(&out, peer);
                    if self.cache.len() < CACHE_LIMIT {
                        self.cache.insert(
                            raw[2..].to_vec(),
                            ZoneHit {
                                out,
                                qtype,
                                autopath_ns,
                            },
                        );
                    }
                }
                self.count(qtype, rcode, peer, Plugin::Kubernetes);
                self.sample(qtype, start);
            }
            Outcome::Answer(_) => self.spawn_answer(req, qtype, peer, start),
            Outcome::Forward => {
                // A forwarded name in the cache is answered here, without a task hop.
                if let Some(m) = self.handler.forwarder.cached_response(&req) {
                    self.hits[usize::from(crate::handler::denial(&m))] += 1;
                    if self.handler.forwarder.claim_prefetch(&req) {
                        let h = self.handler.clone();
                        let r = req.clone();
                        self.rt.spawn(async move {
                            if h.forwarder.refresh(&r).await {
                                h.metrics.prefetches.inc();
                            }
                        });
                    }
                    let rcode = m.metadata.response_code.low();
                    let denial = crate::handler::denial(&m);
                    if let Some(out) = encode(&req, m) {
                        self.outbox.push(&out, peer);
                        self.keep_forwarded(raw, out, qtype, rcode, denial, start);
                    }
                    self.count(qtype, rcode, peer, Plugin::Cache);
                    self.sample(qtype, start);
                    return;
                }
                self.spawn_answer(req, qtype, peer, start);
            }
        }
    }

    /// Keep a forwarded answer encoded for this worker, for 90 % of its remaining TTL (the
    /// shared cache takes over near expiry, where it refreshes popular names). NOERROR and
    /// NXDOMAIN only.
    fn keep_forwarded(
        &mut self,
        raw: &[u8],
        out: Vec<u8>,
        qtype: u16,
        rcode: u8,
        denial: bool,
        now: Instant,
    ) {
        if !(rcode == 0 || rcode == 3) || self.fwd.len() >= CACHE_LIMIT {
            return;
        }
        let Some(ttl_at) = ttl_offsets(&out) else {
            return;
        };
        let Some(min) = ttl_at.iter().map(|(_, t)| *t).min() else {
            return;
        };
        if min < 2 {
            return;
        }
        self.fwd.insert(
            raw[2..].to_vec(),
            FwdHit {
                out,
                qtype,
                rcode,
                denial,
                ttl_at,
                stored: now,
                until: now + Duration::from_secs(u64::from(min)).mul_f64(0.9),
            },
        );
    }

    /// Answer on the runtime (upstream traffic, or a search path walked server-side).
    fn spawn_answer(&self, req: Message, qtype: u16, peer: SocketAddr, start: Instant) {
        let handler = self.handler.clone();
        let Ok(sock) = self.sock.try_clone() else {
            return;
        };
        self.rt.spawn(async move {
            let (resp, plugin) = handler.answer_from(&req, peer.ip()).await;
            handler.metrics.count(
                Counted {
                    qtype,
                    rcode: resp.metadata.response_code.low(),
                    ipv6: peer.ip().to_canonical().is_ipv6(),
                    tcp: false,
                    plugin,
                },
                1,
            );
            handler
                .metrics
                .observe(qtype, start.elapsed().as_secs_f64());
            if let Some(out) = encode(&req, resp) {
                let _ = sock.send_to(&out, peer);
            }
        });
    }

    /// Every query's latency, through a histogram handle kept per query type (no label
    /// lookup on the hot path).
    fn sample(&mut self, qtype: u16, start: Instant) {
        let secs = start.elapsed().as_secs_f64();
        let metrics = &self.handler.metrics;
        self.hist
            .entry(qtype)
            .or_insert_with(|| metrics.latency_for(qtype))
            .observe(secs);
        if self.last_flush.elapsed() > Duration::from_secs(1) {
            self.flush();
        }
    }
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_recv_buffer_size(4 << 20)?;
    s.bind(&addr.into())?;
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(sock)
}

/// Serve UDP on `addr` with `workers` threads until cancelled. Binds before returning, so a
/// port clash is an error at start.
pub fn serve_udp(
    handler: &Handler,
    addr: SocketAddr,
    workers: usize,
    rt: &tokio::runtime::Handle,
    cancel: &CancellationToken,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let sock = reuseport_socket(addr)?;
        let mut w = Worker {
            handler: handler.clone(),
            sock,
            outbox: Outbox::default(),
            rt: rt.clone(),
            cache: HashMap::default(),
            cache_for: None,
            fwd: HashMap::default(),
            counts: HashMap::default(),
            hits: [0; 2],
            hist: HashMap::default(),
            last_flush: Instant::now(),
            n: 0,
        };
        let cancel = cancel.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    let mut rbuf = vec![0u8; BATCH * SLOT];
                    let mut rhdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
                    let mut shdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
                    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
                    // Blocks (up to the socket's read timeout) for the first datagram, then
                    // takes what else is queued.
                    let mut flags = MsgFlags::MSG_WAITFORONE;
                    // Batches taken since stopping began: bounded, as the socket keeps its
                    // share of new datagrams until it is closed.
                    let mut drained = 0;
                    loop {
                        let stopping = cancel.is_cancelled();
                        if stopping {
                            // Answer what is already queued on this socket (with
                            // SO_REUSEPORT, a new process's socket takes what arrives from
                            // now on).
                            flags = MsgFlags::MSG_DONTWAIT;
                            drained += 1;
                            if drained > 64 {
                                w.flush();
                                break;
                            }
                        }
                        got.clear();
                        {
                            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = rbuf
                                .chunks_mut(SLOT)
                                .map(|c| [IoSliceMut::new(c)])
                                .collect();
                            match recvmmsg(
                                w.sock.as_raw_fd(),
                                &mut rhdrs,
                                iovs.iter_mut(),
                                flags,
                                None,
                            ) {
                                Ok(msgs) => got.extend(
                                    msgs.map(|m| (m.bytes, m.address.as_ref().and_then(peer_of))),
                                ),
                                Err(_) => {
                                    // Idle (the read timeout), interrupted, or drained.
                                    w.flush();
                                    if stopping {
                                        break;
                                    }
                                    continue;
                                }
                            }
                        }
                        for (i, (n, peer)) in got.iter().enumerate() {
                            if let Some(peer) = peer {
                                w.handle(&rbuf[i * SLOT..i * SLOT + n], *peer);
                            }
                        }
                        w.outbox.send(&w.sock, &mut shdrs);
                    }
                })?,
        );
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, OpCode, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;

    #[test]
    fn ttl_offsets_find_every_record_but_opt_and_patch_cleanly() {
        let name = Name::from_str("www.example.org.").unwrap();
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.queries.push(Query::query(name.clone(), RecordType::A));
        m.answers.push(Record::from_rdata(
            name.clone(),
            300,
            RData::A(A([192, 0, 2, 1].into())),
        ));
        m.answers.push(Record::from_rdata(
            name.clone(),
            120,
            RData::A(A([192, 0, 2, 2].into())),
        ));
        m.authorities.push(Record::from_rdata(
            Name::from_str("example.org.").unwrap(),
            60,
            RData::SOA(SOA::new(name.clone(), name.clone(), 1, 2, 3, 4, 5)),
        ));
        m.edns = Some(Edns::new());
        let mut wire = m.to_vec().unwrap();
        let offs = ttl_offsets(&wire).unwrap();
        assert_eq!(
            offs.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            [300, 120, 60]
        );
        for (off, ttl) in &offs {
            wire[*off..*off + 4].copy_from_slice(&(ttl - 10).to_be_bytes());
        }
        let back = Message::from_vec(&wire).unwrap();
        assert_eq!(back.answers[0].ttl, 290);
        assert_eq!(back.answers[1].ttl, 110);
        assert_eq!(back.authorities[0].ttl, 50);
        assert!(back.edns.is_some(), "OPT untouched");
        // A truncated message is not trusted.
        assert!(ttl_offsets(&wire[..wire.len() - 3]).is_none());
    }
}
