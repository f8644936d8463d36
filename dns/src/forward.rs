//! Forwarding for names outside the cluster zone: UDP to the upstreams in order, TCP when the
//! answer is truncated, and a bounded cache with its own TTL caps for positive and negative
//! answers, plus what CoreDNS's `cache` does beyond that: RFC 8767 serve-stale (an expired
//! answer is kept for `stale_ttl` and served, with a 30 s TTL, when every upstream fails, so
//! the last good answer wins over a later failure), prefetch of popular names shortly before
//! they expire, and SERVFAIL cached for a few seconds so a dead upstream is not hammered.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::resolve::{key_of, response_to};

#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub cache_size: usize,
    /// Cap on the TTL a positive answer is cached for.
    pub max_ttl: u32,
    /// Cap on the TTL an NXDOMAIN/NODATA answer is cached for.
    pub negative_ttl: u32,
    /// How long after expiry an answer may still be served when the upstreams fail (s).
    pub stale_ttl: u32,
    /// How long a SERVFAIL (every upstream failed, nothing stale) is answered from the cache.
    pub servfail_ttl: u32,
    /// Refresh an entry asked for at least twice when less than 10 % of its TTL is left.
    pub prefetch: bool,
}

/// The TTL of a stale answer (RFC 8767 recommends 30 s).
pub const STALE_ANSWER_TTL: u32 = 30;

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            cache_size: 10_000,
            max_ttl: 300,
            negative_ttl: 30,
            stale_ttl: 3600,
            servfail_ttl: 5,
            prefetch: true,
        }
    }
}

/// The nameservers of a resolv.conf, minus our own listen addresses (never forward to
/// ourselves).
pub fn upstreams_from_resolv_conf(text: &str, own: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| {
            !own.iter()
                .any(|o| o == a || (o.ip().is_unspecified() && o.port() == a.port()))
        })
        .collect()
}

#[derive(Debug)]
struct Entry {
    msg: Message,
    stored: Instant,
    ttl: u32,
    /// Answers served from this entry since it was stored.
    hits: u32,
    /// A refresh is under way.
    prefetching: bool,
}

impl Entry {
    fn age(&self) -> u32 {
        u32::try_from(self.stored.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn servfail(&self) -> bool {
        self.msg.metadata.response_code == ResponseCode::ServFail
    }
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<(String, u16), Entry>,
    order: VecDeque<(String, u16)>,
}

/// One upstream resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Always TCP (the cluster DNS Service's endpoints, as NodeLocal DNSCache reaches them).
    pub tcp: bool,
}

#[derive(Debug)]
pub struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<Cache>,
    /// The configured addresses (UDP, TCP on truncation) and the Service endpoints (TCP).
    upstreams: arc_swap::ArcSwap<Vec<Upstream>>,
    /// Upstreams found to send our queries back to us: never used.
    looping: Mutex<std::collections::HashSet<SocketAddr>>,
    /// Names of loop probes in flight (a query for one of them reaching us means a loop).
    probes: Mutex<std::collections::HashSet<String>>,
    probe_seen: Mutex<std::collections::HashSet<String>>,
}

/// Whether the answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
    /// Every upstream failed; an expired answer was served (RFC 8767).
    Stale,
    Failed,
}

fn cache_ttl(msg: &Message, cfg: &ForwardConfig) -> Option<u32> {
    match msg.metadata.response_code {
        ResponseCode::NoError if !msg.answers.is_empty() => {
            let min = msg.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
            Some(min.min(cfg.max_ttl))
        }
        ResponseCode::NoError | ResponseCode::NXDomain => {
            // Negative caching: the SOA's minimum (RFC 2308), capped.
            let soa_min = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(s) => Some(s.minimum.min(r.ttl)),
                _ => None,
            });
            Some(soa_min.unwrap_or(cfg.negative_ttl).min(cfg.negative_ttl))
        }
        _ => None,
    }
}

impl Forwarder {
    pub fn new(cfg: ForwardConfig) -> Forwarder {
        let ups = cfg
            .upstreams
            .iter()
            .map(|a| Upstream {
                addr: *a,
                tcp: false,
            })
            .collect();
        Forwarder {
            cfg,
            cache: Mutex::new(Cache::default()),
            upstreams: arc_swap::ArcSwap::from_pointee(ups),
            looping: Mutex::default(),
            probes: Mutex::default(),
            probe_seen: Mutex::default(),
        }
    }

    /// The upstreams in use (loops removed).
    pub fn upstreams(&self) -> Vec<Upstream> {
        let looping = self
            .looping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.upstreams
            .load()
            .iter()
            .filter(|u| !looping.contains(&u.addr))
            .copied()
            .collect()
    }

    /// The configured upstreams followed by `service` (endpoints of a Service, over TCP).
    pub fn set_service_upstreams(&self, service: &[SocketAddr]) {
        let mut ups: Vec<Upstream> = self
            .cfg
            .upstreams
            .iter()
            .map(|a| Upstream {
                addr: *a,
                tcp: false,
            })
            .collect();
        ups.extend(service.iter().map(|a| Upstream {
            addr: *a,
            tcp: true,
        }));
        if **self.upstreams.load() != ups {
            tracing::info!(upstreams = ?ups, "DNS upstreams");
            self.upstreams.store(std::sync::Arc::new(ups));
            // Failures were the old upstreams': ask the new ones at once.
            let mut c = self.lock();
            c.map.retain(|_, e| !e.servfail());
        }
    }

    /// Called for every query that reaches the forwarding path: one of our own loop probes
    /// coming back means an upstream forwards to us.
    pub fn note_incoming(&self, req: &Message) {
        let mut probes = self
            .probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if probes.is_empty() {
            return;
        }
        if let Some(q) = req.queries.first() {
            let name = key_of(q.name());
            if probes.remove(&name) {
                self.probe_seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name);
            }
        }
    }

    /// CoreDNS's `loop`: send each upstream a query for a random name no one else asks; if
    /// it comes back to us, that upstream forwards to us and is dropped (a loop would turn
    /// every outside lookup into a storm). `handled` waits until our listener has had the
    /// chance to see it. Returns the upstreams dropped.
    pub async fn detect_loops(&self) -> Vec<SocketAddr> {
        let mut dropped = Vec::new();
        for up in self.upstreams() {
            let name = format!(
                "{}.{}.loop-probe.switchyard.invalid",
                rand::random::<u64>(),
                rand::random::<u64>()
            );
            self.probes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.clone());
            let mut q = Message::new(
                rand::random(),
                hickory_proto::op::MessageType::Query,
                hickory_proto::op::OpCode::Query,
            );
            q.metadata.recursion_desired = true;
            let Ok(qname) = std::str::FromStr::from_str(&format!("{name}.")) else {
                continue;
            };
            q.queries
                .push(hickory_proto::op::Query::query(qname, RecordType::HINFO));
            let id = q.metadata.id;
            if let Ok(wire) = q.to_vec() {
                let _ = if up.tcp {
                    tokio::time::timeout(self.cfg.timeout, self.tcp(up.addr, &wire)).await
                } else {
                    tokio::time::timeout(self.cfg.timeout, self.udp(up.addr, &wire, id)).await
                };
            }
            self.probes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&name);
            let looped = self
                .probe_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&name);
            if looped {
                tracing::error!(upstream = %up.addr, "DNS loop: this upstream sends our queries back to us; not using it");
                self.looping
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(up.addr);
                dropped.push(up.addr);
            }
        }
        dropped
    }

    /// The fresh cached answer for `req`, if any (no upstream traffic).
    pub fn cached_response(&self, req: &Message) -> Option<Message> {
        let q = req.queries.first()?;
        self.cached(&(key_of(q.name()), u16::from(q.query_type())), req, false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The answer of `key` for `req`: fresh only, or (with `stale`) an expired one within the
    /// stale window, with the stale TTL.
    fn cached(&self, key: &(String, u16), req: &Message, stale: bool) -> Option<Message> {
        let mut c = self.lock();
        let e = c.map.get_mut(key)?;
        let age = e.age();
        let fresh = age < e.ttl;
        if !fresh && (!stale || e.servfail()) {
            if age >= e.ttl.saturating_add(self.cfg.stale_ttl) || e.servfail() {
                c.map.remove(key);
            }
            return None;
        }
        if fresh {
            e.hits = e.hits.saturating_add(1);
        } else if age >= e.ttl.saturating_add(self.cfg.stale_ttl) {
            c.map.remove(key);
            return None;
        }
        let mut m = response_to(req, e.msg.metadata.response_code);
        m.answers.clone_from(&e.msg.answers);
        m.authorities.clone_from(&e.msg.authorities);
        m.additionals.clone_from(&e.msg.additionals);
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = if fresh {
                r.ttl.saturating_sub(age).min(e.ttl - age)
            } else {
                STALE_ANSWER_TTL
            };
        }
        m.queries.clone_from(&req.queries);
        Some(m)
    }

    /// Whether `req`'s cache entry should be refreshed now (asked for at least twice, under
    /// 10 % of its TTL left, no refresh running); claims the refresh when it says yes.
    pub fn claim_prefetch(&self, req: &Message) -> bool {
        if !self.cfg.prefetch {
            return false;
        }
        let Some(q) = req.queries.first() else {
            return false;
        };
        let key = (key_of(q.name()), u16::from(q.query_type()));
        let mut c = self.lock();
        let Some(e) = c.map.get_mut(&key) else {
            return false;
        };
        let age_ms = u64::try_from(e.stored.elapsed().as_millis()).unwrap_or(u64::MAX);
        let ttl_ms = u64::from(e.ttl) * 1000;
        let due = e.hits >= 2
            && !e.prefetching
            && !e.servfail()
            && e.ttl >= 2
            && age_ms < ttl_ms
            && (ttl_ms - age_ms) * 10 <= ttl_ms;
        if due {
            e.prefetching = true;
        }
        due
    }

    /// Ask the upstreams again for `req` and keep the answer (a prefetch); returns whether
    /// a new answer was stored.
    pub async fn refresh(&self, req: &Message) -> bool {
        let Some(q) = req.queries.first() else {
            return false;
        };
        let key = (key_of(q.name()), u16::from(q.query_type()));
        let got = self.upstream(req).await;
        if let Some(m) = &got {
            self.store(key.clone(), m);
        } else if let Some(e) = self.lock().map.get_mut(&key) {
            e.prefetching = false;
        }
        got.is_some()
    }

    fn store(&self, key: (String, u16), msg: &Message) {
        let Some(ttl) = cache_ttl(msg, &self.cfg).filter(|t| *t > 0) else {
            return;
        };
        self.insert(key, msg.clone(), ttl);
    }

    fn insert(&self, key: (String, u16), msg: Message, ttl: u32) {
        let mut c = self.lock();
        while c.map.len() >= self.cfg.cache_size {
            match c.order.pop_front() {
                Some(old) => {
                    c.map.remove(&old);
                }
                None => break,
            }
        }
        if c.map
            .insert(
                key.clone(),
                Entry {
                    msg,
                    stored: Instant::now(),
                    ttl,
                    hits: 0,
                    prefetching: false,
                },
            )
            .is_none()
        {
            c.order.push_back(key);
        }
    }

    async fn udp(&self, up: SocketAddr, wire: &[u8], id: u16) -> std::io::Result<Message> {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse()
        } else {
            "[::]:0".parse()
        }
        .map_err(std::io::Error::other)?;
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(up).await?;
        sock.send(wire).await?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await?;
            if let Ok(m) = Message::from_vec(&buf[..n])
                && m.metadata.id == id
            {
                return Ok(m);
            }
        }
    }

    async fn tcp(&self, up: SocketAddr, wire: &[u8]) -> std::io::Result<Message> {
        let mut s = tokio::net::TcpStream::connect(up).await?;
        let len = u16::try_from(wire.len()).map_err(std::io::Error::other)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(wire).await?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
        s.read_exact(&mut buf).await?;
        Message::from_vec(&buf).map_err(std::io::Error::other)
    }

    /// The first good answer of the upstreams, in order (SERVFAIL and timeouts are failures).
    async fn upstream(&self, req: &Message) -> Option<Message> {
        let mut up_req = req.clone();
        let id: u16 = rand::random();
        up_req.metadata.id = id;
        up_req.metadata.recursion_desired = true;
        let wire = up_req.to_vec().ok()?;
        for u in self.upstreams() {
            let up = &u.addr;
            let mut got = if u.tcp {
                tokio::time::timeout(self.cfg.timeout, self.tcp(*up, &wire)).await
            } else {
                tokio::time::timeout(self.cfg.timeout, self.udp(*up, &wire, id)).await
            };
            if !u.tcp
                && let Ok(Ok(m)) = &got
                && m.metadata.truncation
            {
                got = tokio::time::timeout(self.cfg.timeout, self.tcp(*up, &wire)).await;
            }
            match got {
                Ok(Ok(m)) if m.metadata.response_code != ResponseCode::ServFail => return Some(m),
                Ok(Ok(_)) => tracing::debug!(upstream = %up, "upstream SERVFAIL"),
                Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(upstream = %up, "upstream timed out"),
            }
        }
        None
    }

    /// Answer `req` from the cache or the upstreams; when they all fail, from an expired
    /// answer if there is one, else SERVFAIL (cached for `servfail_ttl`).
    pub async fn forward(&self, req: &Message) -> (Message, Source) {
        let Some(q) = req.queries.first() else {
            return (response_to(req, ResponseCode::FormErr), Source::Failed);
        };
        let key = (key_of(q.name()), u16::from(q.query_type()));
        if let Some(m) = self.cached(&key, req, false) {
            return (m, Source::Cache);
        }
        if q.query_type() == RecordType::AXFR || q.query_type() == RecordType::IXFR {
            return (response_to(req, ResponseCode::Refused), Source::Failed);
        }
        if let Some(m) = self.upstream(req).await {
            self.store(key, &m);
            let mut out = response_to(req, m.metadata.response_code);
            out.answers = m.answers;
            out.authorities = m.authorities;
            out.additionals = m.additionals;
            return (out, Source::Upstream);
        }
        if let Some(m) = self.cached(&key, req, true) {
            return (m, Source::Stale);
        }
        let fail = response_to(req, ResponseCode::ServFail);
        if self.cfg.servfail_ttl > 0
            && !self.upstreams.load().is_empty()
            && !self.lock().map.contains_key(&key)
        {
            self.insert(key, fail.clone(), self.cfg.servfail_ttl);
        }
        (fail, Source::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, Record};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An upstream answering `A 192.0.2.7` with `ttl`, counting queries; silent while `down`.
    async fn upstream(ttl: u32) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (c, d) = (Arc::clone(&count), Arc::clone(&down));
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                c.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    continue;
                }
                let req = Message::from_vec(&buf[..n]).unwrap();
                let mut m =
                    Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
                m.queries.clone_from(&req.queries);
                m.answers.push(Record::from_rdata(
                    req.queries[0].name().clone(),
                    ttl,
                    RData::A(A([192, 0, 2, 7].into())),
                ));
                let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
            }
        });
        (addr, count, down)
    }

    fn query(name: &str) -> Message {
        let mut m = Message::new(1, MessageType::Query, hickory_proto::op::OpCode::Query);
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m
    }

    fn forwarder(up: SocketAddr, stale_ttl: u32) -> Forwarder {
        Forwarder::new(ForwardConfig {
            upstreams: vec![up],
            timeout: Duration::from_millis(200),
            stale_ttl,
            ..ForwardConfig::default()
        })
    }

    #[tokio::test]
    async fn an_expired_answer_is_served_stale_when_the_upstream_fails() {
        let (up, _, down) = upstream(1).await;
        let f = forwarder(up, 3600);
        let (m, src) = f.forward(&query("example.com.")).await;
        assert_eq!((src, m.answers.len()), (Source::Upstream, 1));
        down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (m, src) = f.forward(&query("example.com.")).await;
        assert_eq!(src, Source::Stale);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers[0].ttl, STALE_ANSWER_TTL);
        assert_eq!(m.answers[0].data, RData::A(A([192, 0, 2, 7].into())));
        // Without serve-stale the same is a failure.
        let (up, _, down) = upstream(1).await;
        let f = forwarder(up, 0);
        f.forward(&query("example.com.")).await;
        down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (m, src) = f.forward(&query("example.com.")).await;
        assert_eq!(
            (src, m.metadata.response_code),
            (Source::Failed, ResponseCode::ServFail)
        );
    }

    #[tokio::test]
    async fn a_servfail_is_answered_from_the_cache_for_a_few_seconds() {
        let (up, count, down) = upstream(60).await;
        down.store(true, Ordering::SeqCst);
        let f = forwarder(up, 3600);
        let (m, src) = f.forward(&query("dead.example.")).await;
        assert_eq!(
            (src, m.metadata.response_code),
            (Source::Failed, ResponseCode::ServFail)
        );
        let asked = count.load(Ordering::SeqCst);
        let (m, src) = f.forward(&query("dead.example.")).await;
        assert_eq!(
            (src, m.metadata.response_code),
            (Source::Cache, ResponseCode::ServFail)
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            asked,
            "the dead upstream was asked again"
        );
    }

    #[tokio::test]
    async fn a_popular_entry_is_refreshed_before_it_expires() {
        let (up, count, _) = upstream(3).await;
        let f = Arc::new(forwarder(up, 3600));
        let q = query("popular.example.");
        f.forward(&q).await;
        f.forward(&q).await;
        f.forward(&q).await;
        assert!(!f.claim_prefetch(&q), "not due yet");
        tokio::time::sleep(Duration::from_millis(2750)).await;
        let (_, src) = f.forward(&q).await;
        assert_eq!(src, Source::Cache);
        assert!(f.claim_prefetch(&q), "due with under 10 % of the TTL left");
        assert!(!f.claim_prefetch(&q), "claimed once");
        let before = count.load(Ordering::SeqCst);
        assert!(f.refresh(&q).await);
        assert_eq!(count.load(Ordering::SeqCst), before + 1);
        // Fresh again: still answered from the cache after the old expiry.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (m, src) = f.forward(&q).await;
        assert_eq!(src, Source::Cache);
        assert!(m.answers[0].ttl >= 2, "{m:?}");
    }

    /// Through the handler both transports use: the stale answer is counted.
    #[tokio::test]
    async fn the_handler_counts_stale_answers() {
        use crate::handler::Handler;
        use crate::metrics::DnsMetrics;
        use crate::snapshot::{PodsMode, Snapshot, ZoneConfig};
        let (up, _, down) = upstream(1).await;
        let h = Handler {
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::empty(
                ZoneConfig {
                    zone: "cluster.local".into(),
                    ttl: 5,
                    pods: PodsMode::Disabled,
                },
            ))),
            forwarder: Arc::new(forwarder(up, 3600)),
            metrics: DnsMetrics::default(),
            pods: None,
        };
        h.answer(&query("example.org.")).await;
        down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let m = h.answer(&query("example.org.")).await;
        assert_eq!(m.answers.len(), 1);
        assert_eq!(h.metrics.stale_answers.get(), 1);
    }

    /// An upstream that relays every query back to our own listener is found and dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstream_that_forwards_to_us_is_detected_and_dropped() {
        use crate::handler::Handler;
        use crate::metrics::DnsMetrics;
        use crate::snapshot::{PodsMode, Snapshot, ZoneConfig};
        // The relay: whatever it gets, it asks our listener and hands the answer back.
        let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let listen: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = relay.recv_from(&mut buf).await {
                let out = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let _ = out.send_to(&buf[..n], listen).await;
                let mut back = [0u8; 2048];
                if let Ok(Ok(m)) =
                    tokio::time::timeout(Duration::from_millis(500), out.recv(&mut back)).await
                {
                    let _ = relay.send_to(&back[..m], peer).await;
                }
            }
        });
        let (good, _, _) = upstream(60).await;
        let f = Arc::new(Forwarder::new(ForwardConfig {
            upstreams: vec![relay_addr, good],
            timeout: Duration::from_millis(300),
            ..ForwardConfig::default()
        }));
        let h = Handler {
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::empty(
                ZoneConfig {
                    zone: "cluster.local".into(),
                    ttl: 5,
                    pods: PodsMode::Disabled,
                },
            ))),
            forwarder: Arc::clone(&f),
            metrics: DnsMetrics::default(),
            pods: None,
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let l = crate::Listener::bind(&h, listen, &cancel).unwrap();
        let dropped = f.detect_loops().await;
        assert_eq!(dropped, vec![relay_addr]);
        assert_eq!(
            f.upstreams(),
            vec![Upstream {
                addr: good,
                tcp: false
            }]
        );
        l.stop().await;
    }

    #[test]
    fn resolv_conf_minus_our_own_addresses() {
        let rc = "search svc.cluster.local\nnameserver 169.254.20.10\nnameserver 10.0.0.2\nnameserver ::1\noptions ndots:5\n";
        let own = vec!["169.254.20.10:53".parse().unwrap()];
        let ups = upstreams_from_resolv_conf(rc, &own);
        assert_eq!(
            ups,
            vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }
}
