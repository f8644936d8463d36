use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt as _;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Health};
use crate::config::{Config, Settings};
use crate::dataplane::{BackendChoice, BackendContext, select};
use crate::error::SourceError;
use crate::metrics::{BackendLabel, Metrics};
use crate::source::{self, SourceSpec};
use crate::store::Store;
use crate::sync::{SyncLoop, SyncTiming};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where Services, EndpointSlices and the Node come from: `kube` or `manifests:DIR`.
    #[arg(long, default_value = "kube")]
    pub source: SourceSpec,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Configuration file (YAML, kube-proxy field names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's name (kube-proxy's --hostname-override; else the config's
    /// `hostnameOverride`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig file for the API server (overrides `clientConnection.kubeconfig`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address (overrides the kubeconfig's), e.g. `https://10.0.0.1:6443`.
    /// Without it or a kubeconfig, `KUBERNETES_SERVICE_HOST`/`PORT` is used, which must
    /// then be the API server's own address: nothing routes the `kubernetes` Service IP
    /// before Switchyard has programmed it.
    #[arg(long)]
    pub master: Option<String>,
    /// cgroup v2 directory the socket load balancer attaches to.
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// Overrides healthzBindAddress (empty disables).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// Overrides metricsBindAddress (empty disables).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Serve cluster DNS on ADDR:PORT, UDP and TCP (repeatable; adds to dns.listen).
    #[arg(long = "dns-listen")]
    pub dns_listen: Vec<SocketAddr>,
    /// The cluster domain (default from the config, `cluster.local`).
    #[arg(long)]
    pub cluster_domain: Option<String>,
}

fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(h) = &args.healthz_bind_address {
        cfg.healthz_bind_address.clone_from(h);
    }
    if let Some(m) = &args.metrics_bind_address {
        cfg.metrics_bind_address.clone_from(m);
    }
    if let Some(c) = &args.cgroup_path {
        cfg.cgroup_path = Some(c.clone());
    }
    Ok(cfg.validate()?)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    let metrics = Arc::new(Metrics::new());
    let ctx = BackendContext {
        settings: settings.clone(),
        metrics: Arc::clone(&metrics),
    };
    let (dataplane, reason) = select(args.backend, &ctx)?;
    tracing::info!(backend = dataplane.name(), %reason, "dataplane backend selected");
    let backend_name = dataplane.name();
    tracing::info!(
        backend = backend_name,
        min_sync_period = ?settings.min_sync_period_for(backend_name),
        sync_period = ?settings.sync_period,
        "sync timing"
    );
    if let Some(w) = settings
        .kube_proxy
        .as_ref()
        .and_then(|k| k.warning(dataplane.name()))
    {
        tracing::warn!(
            fields = %w,
            "KubeProxyConfiguration: these fields are set but not applied by Switchyard"
        );
    }
    metrics
        .backend_selected
        .get_or_create(&BackendLabel {
            backend: dataplane.name().into(),
            reason,
        })
        .set(1);

    let node_name = match (
        &args.source,
        args.node_name
            .as_ref()
            .or(settings.hostname_override.as_ref()),
    ) {
        (_, Some(n)) => Some(n.clone()),
        (SourceSpec::Kube, None) => return Err(SourceError::NoNodeName.into()),
        (SourceSpec::Manifests(_), None) => None,
    };
    let store = Store::new(
        settings.proxy_config(node_name.as_deref().unwrap_or_default()),
        Arc::clone(&metrics),
    );
    let cancel = CancellationToken::new();
    let health = Health::new(settings.sync_period * 2);

    let mut tasks = tokio::task::JoinSet::new();
    match args.source.clone() {
        SourceSpec::Kube => {
            let client = source::client::client(&source::client::ClientOptions {
                kubeconfig: args.kubeconfig.clone().or(settings.kubeconfig.clone()),
                master: args.master.clone(),
                qps: settings.client_qps,
                burst: settings.client_burst,
            })
            .await?;
            let (store, cancel, node) = (
                Arc::clone(&store),
                cancel.clone(),
                node_name.clone().unwrap_or_default(),
            );
            let pods = settings.dns.enabled && settings.dns.autopath;
            tasks.spawn(async move {
                source::kube::run(client, node, pods, store, cancel).await;
                Ok(())
            });
        }
        SourceSpec::Manifests(dir) => {
            let (store, cancel, node) = (Arc::clone(&store), cancel.clone(), node_name.clone());
            // Fail at start on an unreadable directory rather than run with nothing.
            std::fs::read_dir(&dir).map_err(|source| SourceError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            tasks.spawn(async move {
                source::manifests::run(dir, node, store, cancel)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
    }

    {
        store.await_host();
        let (store, cancel) = (Arc::clone(&store), cancel.clone());
        tasks.spawn(async move {
            crate::netlink::follow(store, cancel)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let mut dns_listen = settings.dns.listen.clone();
    for a in &args.dns_listen {
        if !dns_listen.contains(a) {
            dns_listen.push(*a);
        }
    }
    let dns_status = (!dns_listen.is_empty() && settings.dns.enabled)
        .then(|| crate::dns_listen::DnsStatus::new(&metrics));
    let redirector = settings
        .dns
        .intercept
        .as_ref()
        .filter(|_| dns_status.is_some())
        .and_then(|(svc, target)| {
            let r = dataplane.dns_redirector();
            if r.is_none() {
                tracing::warn!(
                    service = %format!("{}/{}", svc.namespace, svc.name),
                    backend = dataplane.name(),
                    "cluster DNS interception is not available with this backend; pods reach the node-local resolver only at {target}"
                );
            }
            r.map(|r| (r, *target))
        });
    if let Some(status) = &dns_status {
        let (handler, follower) = crate::dns::build(
            &settings.dns,
            args.cluster_domain.as_deref(),
            &dns_listen,
            &store,
            &metrics,
        );
        tasks.spawn(follower.run(cancel.clone()).map(Ok));
        tasks.spawn(
            crate::dns::check_loops(
                Arc::clone(&handler.forwarder),
                Arc::clone(status),
                Arc::clone(&metrics),
                cancel.clone(),
            )
            .map(Ok),
        );
        if let Some((r, target)) = redirector {
            let service = settings
                .dns
                .intercept_service()
                .cloned()
                .unwrap_or_else(|| switchyard_model::ServiceKey::new("kube-system", "kube-dns"));
            tasks.spawn(
                crate::dns_listen::intercept(
                    r,
                    service,
                    target,
                    handler.clone(),
                    Arc::clone(status),
                    Arc::clone(&store),
                    cancel.clone(),
                )
                .map(Ok),
            );
        }
        // Each address on its own: provisioned, bound, retried; never fatal.
        for addr in &dns_listen {
            tasks.spawn(
                crate::dns_listen::serve(
                    handler.clone(),
                    *addr,
                    Arc::clone(status),
                    cancel.clone(),
                )
                .map(Ok),
            );
        }
    }
    let sync = SyncLoop::new(
        Arc::clone(&store),
        dataplane,
        SyncTiming {
            min_sync_period: settings.min_sync_period_for(backend_name),
            sync_period: settings.sync_period,
            retry: std::time::Duration::from_secs(1),
        },
    )
    .with_health(Arc::clone(&health))
    .with_hook({
        // healthCheckNodePort servers follow what was programmed.
        let (tx, rx) = tokio::sync::watch::channel(crate::healthcheck::Wanted::default());
        let servers =
            crate::healthcheck::HealthCheckServers::new(Arc::clone(&health), Arc::clone(&metrics));
        tasks.spawn(
            servers
                .run(rx, std::time::Duration::from_secs(5), cancel.clone())
                .map(Ok),
        );
        let store = Arc::clone(&store);
        // Recomputed (a walk of every port) only when a health-checked port or the node's
        // addresses changed, not for every endpoint change.
        let last_addresses = std::sync::Mutex::new(None);
        Box::new(move |out| {
            let addresses = store.read(switchyard_model::Engine::node_port_listen);
            let checked =
                |p: &switchyard_model::ServicePortState| p.health_check_node_port.is_some();
            let c = &out.changes;
            let touched = c.added.iter().chain(&c.removed).any(|p| checked(p))
                || c.changed
                    .iter()
                    .any(|ch| checked(&ch.old) || checked(&ch.new));
            let mut last = last_addresses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !touched && last.as_ref() == Some(&addresses) {
                return;
            }
            *last = Some(addresses.clone());
            tx.send_replace(crate::healthcheck::wanted(&out.state, addresses));
        })
    });
    tasks.spawn(sync.run(cancel.clone()).map(Ok));

    let router = admin::router(
        Arc::clone(&health),
        Arc::clone(&metrics),
        Some(Arc::clone(&store)),
        dns_status,
    );
    let mut binds: Vec<SocketAddr> = Vec::new();
    binds.extend(settings.healthz_bind_address);
    binds.extend(settings.metrics_bind_address.filter(|m| !binds.contains(m)));
    for addr in binds {
        let (router, cancel) = (router.clone(), cancel.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("admin HTTP on {addr}: {e}"))?;
        tracing::info!(%addr, "admin HTTP listening");
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });
    }

    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutting down"),
        Some(r) = tasks.join_next() => {
            cancel.cancel();
            if let Ok(Err(e)) = r { return Err(e) }
        }
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}
