//! DNS metrics, registered into the daemon's registry. Where a series means what CoreDNS's
//! does it has CoreDNS's name and labels (`coredns_dns_requests_total`,
//! `coredns_dns_responses_total`, `coredns_dns_request_duration_seconds`, `coredns_cache_*`),
//! so CoreDNS dashboards work; the rest is `switchyard_dns_*`.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Who wrote a response (CoreDNS's `plugin` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plugin {
    /// The cluster zone, from the store.
    Kubernetes,
    /// A forwarded name answered from the cache (fresh or stale).
    Cache,
    /// A forwarded name answered by (or failed at) the upstreams.
    Forward,
    /// Not a query we could answer (FORMERR).
    None,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Kubernetes => "kubernetes",
            Plugin::Cache => "cache",
            Plugin::Forward => "forward",
            Plugin::None => "",
        }
    }
}

/// One answered query, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counted {
    pub qtype: u16,
    pub rcode: u8,
    pub ipv6: bool,
    pub tcp: bool,
    pub plugin: Plugin,
}

#[derive(Debug, Clone)]
pub struct DnsMetrics {
    /// CoreDNS's `server` label: `dns://ADDR` of the listener.
    pub server: Arc<str>,
    pub requests: Family<Labels, Counter>,
    pub responses: Family<Labels, Counter>,
    pub latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub cache_hits: Family<Labels, Counter>,
    pub cache_misses: Family<Labels, Counter>,
    /// Expired answers served because every upstream failed (RFC 8767).
    pub stale_answers: Counter,
    /// Cache entries refreshed before they expired.
    pub prefetches: Counter,
    /// Queries answered by walking a pod's search path server-side.
    pub autopath: Counter,
    /// From an object change arriving to DNS answering it.
    pub programming: Histogram,
    pub malformed: Counter,
}

fn latency_histogram() -> Histogram {
    // CoreDNS's buckets: 0.25 ms doubling.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            server: Arc::from("dns://:53"),
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            stale_answers: Counter::default(),
            prefetches: Counter::default(),
            autopath: Counter::default(),
            programming: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            malformed: Counter::default(),
        }
    }
}

fn qtype_name(qtype: u16) -> String {
    if qtype == 0 {
        "other".to_string()
    } else {
        hickory_proto::rr::RecordType::from(qtype).to_string()
    }
}

impl DnsMetrics {
    /// The same series, labelled for the listener at `addr`.
    #[must_use]
    pub fn for_server(&self, addr: std::net::SocketAddr) -> DnsMetrics {
        let m = DnsMetrics {
            server: Arc::from(format!("dns://{addr}")),
            ..self.clone()
        };
        // Zero series from the start, so cache ratios are defined before the first miss.
        let server = m.server.to_string();
        for t in ["success", "denial"] {
            let _ = m.cache_hits.get_or_create(&vec![
                ("server", server.clone()),
                ("type", t.into()),
                ("zones", ".".into()),
                ("view", String::new()),
            ]);
        }
        let _ = m.cache_misses.get_or_create(&vec![
            ("server", server),
            ("zones", ".".into()),
            ("view", String::new()),
        ]);
        m
    }

    /// Count `n` answered queries alike: the one place both transports record queries.
    pub fn count(&self, c: Counted, n: u64) {
        let server = self.server.to_string();
        let qtype = qtype_name(c.qtype);
        self.requests
            .get_or_create(&vec![
                ("server", server.clone()),
                ("zone", ".".into()),
                ("view", String::new()),
                ("proto", if c.tcp { "tcp" } else { "udp" }.into()),
                ("family", if c.ipv6 { "2" } else { "1" }.into()),
                ("type", qtype),
            ])
            .inc_by(n);
        self.responses
            .get_or_create(&vec![
                ("server", server),
                ("zone", ".".into()),
                ("view", String::new()),
                ("rcode", rcode_name(c.rcode)),
                ("plugin", c.plugin.name().into()),
            ])
            .inc_by(n);
    }

    /// One query's time to answer.
    pub fn observe(&self, qtype: u16, secs: f64) {
        self.latency_for(qtype).observe(secs);
    }

    /// The latency histogram of one query type (a handle to keep).
    pub fn latency_for(&self, qtype: u16) -> Histogram {
        self.latency
            .get_or_create(&vec![
                ("server", self.server.to_string()),
                ("zone", ".".into()),
                ("view", String::new()),
                ("type", qtype_name(qtype)),
            ])
            .clone()
    }

    /// A forwarded name answered from the cache: `denial` for NXDOMAIN/NODATA, as CoreDNS.
    pub fn cache_hit(&self, denial: bool) {
        self.cache_hits_add(denial, 1);
    }

    /// `n` cache hits at once (the UDP workers batch them).
    pub fn cache_hits_add(&self, denial: bool, n: u64) {
        self.cache_hits
            .get_or_create(&vec![
                ("server", self.server.to_string()),
                ("type", if denial { "denial" } else { "success" }.into()),
                ("zones", ".".into()),
                ("view", String::new()),
            ])
            .inc_by(n);
    }

    pub fn cache_miss(&self) {
        self.cache_misses
            .get_or_create(&vec![
                ("server", self.server.to_string()),
                ("zones", ".".into()),
                ("view", String::new()),
            ])
            .inc();
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            self.requests.clone(),
        );
        r.register(
            "coredns_dns_responses",
            "Counter of response status codes.",
            self.responses.clone(),
        );
        r.register(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone.",
            self.latency.clone(),
        );
        r.register(
            "coredns_cache_hits",
            "The count of cache hits.",
            self.cache_hits.clone(),
        );
        r.register(
            "coredns_cache_misses",
            "The count of cache misses.",
            self.cache_misses.clone(),
        );
        r.register(
            "coredns_cache_served_stale",
            "The number of requests served from stale cache entries.",
            self.stale_answers.clone(),
        );
        r.register(
            "coredns_cache_prefetch",
            "The number of times the cache has prefetched a cached item.",
            self.prefetches.clone(),
        );
        r.register(
            "coredns_autopath_success",
            "Counter of requests that did autopath.",
            self.autopath.clone(),
        );
        r.register(
            "switchyard_dns_programming_duration_seconds",
            "Time from an object change to DNS answering from it",
            self.programming.clone(),
        );
        r.register(
            "switchyard_dns_malformed",
            "Packets that were not DNS queries",
            self.malformed.clone(),
        );
    }
}

/// The RFC mnemonic, as CoreDNS labels its series (`NOERROR`, `NXDOMAIN`, ...).
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}
