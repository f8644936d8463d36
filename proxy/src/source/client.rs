//! The API server connection, as kube-proxy makes it: `--kubeconfig` (or
//! `clientConnection.kubeconfig`), `--master` overriding the address, else the in-cluster
//! configuration from `KUBERNETES_SERVICE_HOST`/`PORT`. On a node without kube-proxy the
//! `kubernetes` Service IP is not routed until this daemon has programmed it, so the address
//! must be a direct one; the log line says which address is used and where it came from.
//! Requests go through a token bucket (`clientConnection.qps` and `burst`).

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kube::Client;
use kube::client::ClientBuilder;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use tower::{Layer, Service};

use crate::error::SourceError;

#[derive(Debug, Clone, PartialEq)]
pub struct ClientOptions {
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub qps: f32,
    pub burst: u32,
}

/// The client configuration and a description of where its address came from.
pub async fn config(o: &ClientOptions) -> Result<(Config, String), SourceError> {
    let master = o
        .master
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.parse::<http::Uri>()
                .map_err(|source| SourceError::Master {
                    value: m.to_string(),
                    source,
                })
        })
        .transpose()?;
    let (mut config, origin) = if let Some(path) = &o.kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|source| SourceError::Kubeconfig {
            path: path.clone(),
            source,
        })?;
        let c = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|source| SourceError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
        (c, format!("kubeconfig {}", path.display()))
    } else if let Some(m) = &master {
        // The pod's service-account credentials when there are any, at the given address.
        let c = Config::incluster_dns().unwrap_or_else(|_| Config::new(m.clone()));
        (c, "--master".to_string())
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        let c = Config::incluster_env().map_err(|source| SourceError::InCluster { source })?;
        (c, "KUBERNETES_SERVICE_HOST/PORT".to_string())
    } else {
        let c = Config::infer()
            .await
            .map_err(|source| SourceError::KubeConfig { source })?;
        (c, "KUBECONFIG or ~/.kube/config".to_string())
    };
    if let Some(m) = master {
        config.cluster_url = m;
        if o.kubeconfig.is_some() {
            return Ok((config, format!("--master (credentials from {origin})")));
        }
    }
    Ok((config, origin))
}

/// A client for the configured API server, rate limited.
pub async fn client(o: &ClientOptions) -> Result<Client, SourceError> {
    let (mut config, origin) = config(o).await?;
    // The watcher retries with its own backoff (0.8 s doubling to 30 s) and counts each
    // failure; kube's request-level retry of 429/503/504 (15 attempts, up to minutes) would
    // hide an API outage from both.
    config.default_retry = false;
    tracing::info!(
        server = %config.cluster_url,
        from = %origin,
        qps = o.qps,
        burst = o.burst,
        "API server"
    );
    let builder = ClientBuilder::try_from(config).map_err(|source| SourceError::Kube { source })?;
    Ok(builder
        .with_layer(&RateLimitLayer::new(o.qps, o.burst))
        .build())
}

/// client-go's token bucket: `burst` requests at once, refilled at `qps` per second.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitLayer {
    qps: f64,
    burst: f64,
}

impl RateLimitLayer {
    pub fn new(qps: f32, burst: u32) -> RateLimitLayer {
        RateLimitLayer {
            qps: f64::from(qps).max(0.001),
            burst: f64::from(burst.max(1)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            qps: self.qps,
            burst: self.burst,
            tokens: self.burst,
            refilled: Instant::now(),
            permitted: false,
            sleep: None,
        }
    }
}

pub struct RateLimit<S> {
    inner: S,
    qps: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    /// A token is taken for the next call.
    permitted: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("qps", &self.qps)
            .field("burst", &self.burst)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl<S> RateLimit<S> {
    /// Take a token, or say how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.qps;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.qps))
        }
    }
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.permitted {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.take() {
                Ok(()) => self.permitted = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.permitted = false;
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_bucket_allows_burst_then_qps() {
        let inner = tower::service_fn(|(): ()| async { Ok::<_, std::convert::Infallible>(()) });
        let mut svc = RateLimitLayer::new(10.0, 3).layer(inner);
        let start = Instant::now();
        for _ in 0..3 {
            svc.ready().await.unwrap().call(()).await.unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "the burst waits"
        );
        for _ in 0..5 {
            svc.ready().await.unwrap().call(()).await.unwrap();
        }
        // Five more at 10 per second: about half a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
}
