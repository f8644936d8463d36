//! The UDP fast path: one SO_REUSEPORT socket and one thread per worker, answering the cluster
//! zone synchronously with a per-worker cache of encoded responses keyed by the query bytes
//! (everything after the ID), dropped whenever a new snapshot is swapped in. Names outside the
//! zone go to the async forwarder. TCP stays on hickory-server.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use tokio_util::sync::CancellationToken;

use crate::handler::Handler;
use crate::metrics::{Counted, Plugin};
use crate::resolve::{Outcome, resolve};
use crate::snapshot::Snapshot;

const CACHE_LIMIT: usize = 200_000;

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

struct Worker {
    handler: Handler,
    sock: UdpSocket,
    rt: tokio::runtime::Handle,
    /// Query bytes after the ID -> (encoded response, query type) for this snapshot.
    cache: HashMap<Vec<u8>, (Vec<u8>, u16)>,
    /// The snapshot the cache was filled from (compared by pointer).
    cache_for: Option<Arc<Snapshot>>,
    counts: HashMap<Counted, u64>,
    hist: HashMap<u16, prometheus_client::metrics::histogram::Histogram>,
    last_flush: Instant,
    n: u64,
}

impl Worker {
    fn flush(&mut self) {
        for (c, n) in self.counts.drain() {
            self.handler.metrics.count(c, n);
        }
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
        let snap = self.handler.snapshot.load_full();
        if !self
            .cache_for
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &snap))
        {
            self.cache.clear();
            self.cache_for = Some(Arc::clone(&snap));
        }
        if raw.len() >= 12
            && raw[2] & 0x80 == 0
            && let Some((hit, qtype)) = self.cache.get(&raw[2..])
        {
            {
                let mut out = hit.clone();
                let qtype = *qtype;
                out[0] = raw[0];
                out[1] = raw[1];
                let _ = self.sock.send_to(&out, peer);
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
                    let _ = self.sock.send_to(&out, peer);
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
                // NXDOMAINs depend on the client when autopath is on: not kept.
                let keep = rcode != 3 || self.handler.pods.is_none();
                if let Some(out) = encode(&req, *m) {
                    let _ = self.sock.send_to(&out, peer);
                    if keep && self.cache.len() < CACHE_LIMIT {
                        self.cache.insert(raw[2..].to_vec(), (out, qtype));
                    }
                }
                self.count(qtype, rcode, peer, Plugin::Kubernetes);
                self.sample(qtype, start);
            }
            Outcome::Answer(_) => self.spawn_answer(req, qtype, peer, start),
            Outcome::Forward => {
                // A forwarded name in the cache is answered here, without a task hop.
                if let Some(m) = self.handler.forwarder.cached_response(&req) {
                    self.handler.metrics.cache_hit(crate::handler::denial(&m));
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
                    if let Some(out) = encode(&req, m) {
                        let _ = self.sock.send_to(&out, peer);
                    }
                    self.count(qtype, rcode, peer, Plugin::Cache);
                    self.sample(qtype, start);
                    return;
                }
                self.spawn_answer(req, qtype, peer, start);
            }
        }
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
            rt: rt.clone(),
            cache: HashMap::new(),
            cache_for: None,
            counts: HashMap::new(),
            hist: HashMap::new(),
            last_flush: Instant::now(),
            n: 0,
        };
        let cancel = cancel.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    while !cancel.is_cancelled() {
                        match w.sock.recv_from(&mut buf) {
                            Ok((n, peer)) => w.handle(&buf[..n], peer),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                w.flush();
                            }
                            Err(_) => {}
                        }
                    }
                    // Stopping: answer what is already queued on this socket (with
                    // SO_REUSEPORT, a new process's socket takes what arrives from now on).
                    if w.sock.set_nonblocking(true).is_ok() {
                        while let Ok((n, peer)) = w.sock.recv_from(&mut buf) {
                            w.handle(&buf[..n], peer);
                        }
                    }
                    w.flush();
                })?,
        );
    }
    Ok(threads)
}
