//! Admin HTTP, as kube-proxy serves it (pkg/proxy/healthcheck): `/healthz` and `/livez`
//! answer 503 once an update (a change, or a periodic full sync falling due) has waited
//! longer than the health timeout (2 × syncPeriod) without a sync landing; `/healthz` also
//! answers 503 while the Node is being deleted or carries the cluster autoscaler's
//! `ToBeDeletedByClusterAutoscaler` taint (KEP-3836), so load balancers drain the node
//! while `/livez` keeps the daemon from being restarted. `/metrics` is the Prometheus
//! exposition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::dns_listen::DnsStatus;
use crate::metrics::{CodeLabel, Metrics};
use crate::store::Store;

#[derive(Debug, Default)]
struct HealthState {
    /// The last sync that landed.
    last_updated: Option<SystemTime>,
    /// The oldest update queued since then.
    oldest_queued: Option<Instant>,
    /// What the dataplane could not do on this node right now (an interface that refuses
    /// the tc program, ...), by key: unhealthy at once, each named in the `/healthz` body.
    problems: std::collections::BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    /// Unhealthy when a queued update waits longer than this (kube-proxy: 2 × syncPeriod).
    pub timeout: Duration,
}

impl Health {
    pub fn new(timeout: Duration) -> Arc<Health> {
        Arc::new(Health {
            state: Mutex::new(HealthState::default()),
            timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Something needs programming (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        let mut s = self.lock();
        if s.oldest_queued.is_none() {
            s.oldest_queued = Some(Instant::now());
        }
    }

    /// A sync landed: everything queued before it is programmed (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut s = self.lock();
        s.last_updated = Some(SystemTime::now());
        s.oldest_queued = None;
    }

    /// Whether no queued update is overdue and nothing is broken, and when the last sync
    /// landed.
    pub fn status(&self) -> (bool, Option<SystemTime>) {
        let s = self.lock();
        let healthy =
            s.problems.is_empty() && s.oldest_queued.is_none_or(|t| t.elapsed() < self.timeout);
        (healthy, s.last_updated)
    }

    /// Record (`Some`) or clear (`None`) a problem under `key`.
    pub fn set_problem(&self, key: &str, problem: Option<String>) {
        let mut s = self.lock();
        match problem {
            Some(p) => {
                s.problems.insert(key.to_string(), p);
            }
            None => {
                s.problems.remove(key);
            }
        }
    }

    /// The current problems, as `key: what` lines.
    pub fn problems(&self) -> Vec<String> {
        self.lock()
            .problems
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect()
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    store: Option<Arc<Store>>,
    dns: Option<Arc<DnsStatus>>,
}

/// Go's `time.Time` text (`2006-01-02 15:04:05.999999999 -0700 MST`), as kube-proxy prints
/// its times in `/healthz`.
pub fn go_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut frac = format!("{:09}", d.subsec_nanos());
    while frac.ends_with('0') {
        frac.pop();
    }
    let frac = if frac.is_empty() {
        String::new()
    } else {
        format!(".{frac}")
    };
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn json(code: StatusCode, body: String) -> Response {
    let mut r = (code, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn node_eligible(s: &AppState) -> bool {
    s.store
        .as_ref()
        .is_none_or(|st| st.read(|e| e.node().is_none_or(switchyard_model::types::Node::eligible)))
}

/// One answer of `/healthz` or `/livez`.
fn answer(s: &AppState, with_node: bool) -> Response {
    let eligible = node_eligible(s);
    let (healthy, last) = s.health.status();
    let now = SystemTime::now();
    let ok = healthy && (eligible || !with_node);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let counter = if with_node {
        &s.metrics.healthz_total
    } else {
        &s.metrics.livez_total
    };
    counter
        .get_or_create(&CodeLabel {
            code: code.as_u16().to_string(),
        })
        .inc();
    // As kube-proxy: a healthy answer reports "now" as lastUpdated (older releases ran a
    // sync every period, and clients compare the two).
    let last = if ok { Some(now) } else { last };
    let last = last.map(go_time).unwrap_or_default();
    // kube-proxy's three fields, then (ours) each DNS listen address's state: DNS never
    // decides the code, but an operator sees why it is not answering.
    let dns = s
        .dns
        .as_ref()
        .map(|d| format!(", \"dns\": {}", serde_json::json!(d.detail())))
        .unwrap_or_default();
    // (ours) The API watches failing right now: they never decide the code (as kube-proxy:
    // the last good state stays programmed and periodic syncs keep landing; an API server
    // outage must not drain every node from the load balancers), but they are named.
    let watch = s
        .store
        .as_ref()
        .map(|st| st.watch_failures())
        .filter(|f| !f.is_empty())
        .map(|f| {
            let f: std::collections::BTreeMap<_, _> = f
                .into_iter()
                .map(|(k, w)| {
                    (
                        k,
                        serde_json::json!({
                            "failingForSeconds": w.since.elapsed().as_secs(),
                            "errors": w.errors,
                            "lastError": w.error,
                        }),
                    )
                })
                .collect();
            format!(", \"apiWatch\": {}", serde_json::json!(f))
        })
        .unwrap_or_default();
    let problems = s.health.problems();
    let problems = if problems.is_empty() {
        String::new()
    } else {
        format!(", \"problems\": {}", serde_json::json!(problems))
    };
    let body = format!(
        "{{\"lastUpdated\": {},\"currentTime\": {}, \"nodeEligible\": {eligible}{dns}{watch}{problems}}}",
        serde_json::Value::String(last),
        serde_json::Value::String(go_time(now)),
    );
    json(code, body)
}

async fn healthz(State(s): State<AppState>) -> Response {
    answer(&s, true)
}

async fn livez(State(s): State<AppState>) -> Response {
    answer(&s, false)
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The admin routes. `store` gives the Node for `nodeEligible` (none: always eligible);
/// `dns` the listen addresses' state for the `/healthz` detail.
pub fn router(
    health: Arc<Health>,
    metrics_reg: Arc<Metrics>,
    store: Option<Arc<Store>>,
    dns: Option<Arc<DnsStatus>>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health,
            metrics: metrics_reg,
            store,
            dns,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_prints_like_go() {
        let t = UNIX_EPOCH + Duration::new(1_795_166_535, 96_409_547);
        assert_eq!(go_time(t), "2026-11-20 09:22:15.096409547 +0000 UTC");
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::from_hours(264_384)),
            "2000-02-29 00:00:00 +0000 UTC"
        );
    }

    #[test]
    fn an_overdue_queued_update_is_unhealthy_until_a_sync_lands() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.status().0, "nothing queued yet");
        h.queued();
        assert!(h.status().0, "within the timeout");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.status().0, "overdue");
        h.updated();
        let (ok, last) = h.status();
        assert!(ok && last.is_some());
    }
}
