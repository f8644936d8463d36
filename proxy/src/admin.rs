//! Admin HTTP: `/healthz` (kube-proxy's shape: healthy while syncs keep landing), `/livez`
//! and `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Health {
    last_sync: Mutex<Option<SystemTime>>,
    /// Unhealthy when no sync landed for this long (kube-proxy: 2 × syncPeriod).
    pub stale_after: Duration,
}

impl Health {
    pub fn new(stale_after: Duration) -> Arc<Health> {
        Arc::new(Health {
            last_sync: Mutex::new(None),
            stale_after,
        })
    }

    pub fn synced(&self) {
        *self
            .last_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(SystemTime::now());
    }

    pub fn status(&self) -> (bool, Option<SystemTime>) {
        let last = *self
            .last_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let healthy = last.is_some_and(|t| t.elapsed().unwrap_or_default() <= self.stale_after);
        (healthy, last)
    }
}

#[derive(Debug, Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let (healthy, last) = s.health.status();
    let body = serde_json::json!({
        "lastUpdated": last.map(secs),
        "currentTime": secs(SystemTime::now()),
        "healthy": healthy,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

pub fn router(health: Arc<Health>, metrics_reg: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health,
            metrics: metrics_reg,
        })
}
