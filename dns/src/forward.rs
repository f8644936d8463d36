//! Forwarding for names outside the cluster zone: UDP to the upstreams in order, TCP when the
//! answer is truncated, and a bounded cache with its own TTL caps for positive and negative
//! answers.

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
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            cache_size: 10_000,
            max_ttl: 300,
            negative_ttl: 30,
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
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<(String, u16), Entry>,
    order: VecDeque<(String, u16)>,
}

#[derive(Debug)]
pub struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<Cache>,
}

/// Whether the answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
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
        Forwarder {
            cfg,
            cache: Mutex::new(Cache::default()),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.cfg.upstreams
    }

    /// The cached answer for `req`, if any (no upstream traffic).
    pub fn cached_response(&self, req: &Message) -> Option<Message> {
        let q = req.queries.first()?;
        self.cached(&(key_of(q.name()), u16::from(q.query_type())), req)
    }

    fn cached(&self, key: &(String, u16), req: &Message) -> Option<Message> {
        let mut c = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = c.map.get(key)?;
        let age = u32::try_from(e.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        if age >= e.ttl {
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
            r.ttl = r.ttl.saturating_sub(age).min(e.ttl - age);
        }
        m.queries.clone_from(&req.queries);
        Some(m)
    }

    fn store(&self, key: (String, u16), msg: &Message) {
        let Some(ttl) = cache_ttl(msg, &self.cfg).filter(|t| *t > 0) else {
            return;
        };
        let mut c = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
                    msg: msg.clone(),
                    stored: Instant::now(),
                    ttl,
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

    /// Answer `req` from the cache or the upstreams.
    pub async fn forward(&self, req: &Message) -> (Message, Source) {
        let Some(q) = req.queries.first() else {
            return (response_to(req, ResponseCode::FormErr), Source::Failed);
        };
        let key = (key_of(q.name()), u16::from(q.query_type()));
        if let Some(m) = self.cached(&key, req) {
            return (m, Source::Cache);
        }
        if q.query_type() == RecordType::AXFR || q.query_type() == RecordType::IXFR {
            return (response_to(req, ResponseCode::Refused), Source::Failed);
        }
        let mut up_req = req.clone();
        let id: u16 = rand::random();
        up_req.metadata.id = id;
        up_req.metadata.recursion_desired = true;
        let Ok(wire) = up_req.to_vec() else {
            return (response_to(req, ResponseCode::FormErr), Source::Failed);
        };
        for up in &self.cfg.upstreams {
            let mut got = tokio::time::timeout(self.cfg.timeout, self.udp(*up, &wire, id)).await;
            if let Ok(Ok(m)) = &got
                && m.metadata.truncation
            {
                got = tokio::time::timeout(self.cfg.timeout, self.tcp(*up, &wire)).await;
            }
            match got {
                Ok(Ok(m)) if m.metadata.response_code != ResponseCode::ServFail => {
                    self.store(key, &m);
                    let mut out = response_to(req, m.metadata.response_code);
                    out.answers = m.answers;
                    out.authorities = m.authorities;
                    out.additionals = m.additionals;
                    return (out, Source::Upstream);
                }
                Ok(Ok(_)) => tracing::debug!(upstream = %up, "upstream SERVFAIL"),
                Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(upstream = %up, "upstream timed out"),
            }
        }
        (response_to(req, ResponseCode::ServFail), Source::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
