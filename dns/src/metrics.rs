//! DNS metrics, registered into the daemon's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub qtype: String,
    pub rcode: String,
}

#[derive(Debug, Clone)]
pub struct DnsMetrics {
    pub queries: Family<QueryLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub latency: Histogram,
    /// From an object change arriving to DNS answering it.
    pub programming: Histogram,
    pub malformed: Counter,
    /// Expired answers served because every upstream failed (RFC 8767).
    pub stale_answers: Counter,
    /// Cache entries refreshed before they expired.
    pub prefetches: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            queries: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            programming: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            malformed: Counter::default(),
            stale_answers: Counter::default(),
            prefetches: Counter::default(),
        }
    }
}

impl DnsMetrics {
    /// Count `n` answered queries of type `qtype` (0: the message had no question) with
    /// response code `rcode`: the one place both transports record queries.
    pub fn count_queries(&self, qtype: u16, rcode: u8, n: u64) {
        let qtype = if qtype == 0 {
            "none".to_string()
        } else {
            hickory_proto::rr::RecordType::from(qtype).to_string()
        };
        let labels = QueryLabels {
            qtype,
            rcode: rcode_name(rcode),
        };
        self.queries.get_or_create(&labels).inc_by(n);
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "switchyard_dns_stale_answers",
            "Expired answers served because every upstream failed (RFC 8767 serve-stale)",
            self.stale_answers.clone(),
        );
        r.register(
            "switchyard_dns_prefetches",
            "Popular cache entries refreshed before they expired",
            self.prefetches.clone(),
        );
        r.register(
            "switchyard_dns_queries",
            "DNS queries by type and response code",
            self.queries.clone(),
        );
        r.register(
            "switchyard_dns_cache_hits",
            "Forwarded queries answered from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "switchyard_dns_cache_misses",
            "Forwarded queries sent upstream",
            self.cache_misses.clone(),
        );
        r.register(
            "switchyard_dns_request_duration_seconds",
            "Time to answer a query",
            self.latency.clone(),
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
