//! The DNS listen addresses, kept serving whatever else happens: each address is provisioned
//! on the node when it is not there (NodeLocal DNSCache's link-local `169.254.20.10` on a
//! dummy link of ours, `switchyard-dns`, or on `lo` with host scope where the kernel has no
//! dummy links), then bound (UDP and TCP). A failure is logged with the address and cause,
//! counted, shown in `/healthz` and retried with backoff; it never stops the proxy, and the
//! proxy never stops DNS.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use switchyard_dns::{Handler, Listener};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often a serving listen address is checked to still be on the node.
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// The dummy link DNS addresses are provisioned on.
pub const LINK: &str = "switchyard-dns";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabel {
    pub address: String,
}

/// Every listen address: serving, or the last error.
#[derive(Debug, Default)]
pub struct DnsStatus {
    addrs: Mutex<BTreeMap<SocketAddr, Result<String, String>>>,
    listening: Family<AddressLabel, Gauge>,
    errors: Family<AddressLabel, Counter>,
    /// Cluster DNS interception on (1) or off (0).
    pub interception: Gauge,
}

impl DnsStatus {
    pub fn new(metrics: &Metrics) -> Arc<DnsStatus> {
        let s = Arc::new(DnsStatus::default());
        metrics.register_with(|r| {
            r.register(
                "switchyard_dns_listening",
                "DNS listen addresses serving (1) or not (0, the log and /healthz say why)",
                s.listening.clone(),
            );
            r.register(
                "switchyard_dns_listen_errors",
                "Failed attempts to provision or bind a DNS listen address (retried)",
                s.errors.clone(),
            );
            r.register(
                "switchyard_dns_interception",
                "Cluster DNS Service queries go to the node-local resolver (1) or to the Service's endpoints (0)",
                s.interception.clone(),
            );
        });
        s
    }

    fn set(&self, addr: SocketAddr, r: Result<String, String>) {
        let label = AddressLabel {
            address: addr.to_string(),
        };
        self.listening
            .get_or_create(&label)
            .set(i64::from(r.is_ok()));
        if r.is_err() {
            self.errors.get_or_create(&label).inc();
        }
        self.addrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(addr, r);
    }

    pub fn any_serving(&self) -> bool {
        self.addrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(Result::is_ok)
    }

    pub fn serving(&self, addr: SocketAddr) -> bool {
        self.addrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&addr)
            .is_some_and(Result::is_ok)
    }

    /// `address -> "serving (...)" | "error: ..."`, for `/healthz`.
    pub fn detail(&self) -> BTreeMap<String, String> {
        self.addrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(a, r)| {
                (
                    a.to_string(),
                    match r {
                        Ok(how) => format!("serving{how}"),
                        Err(e) => format!("error: {e}"),
                    },
                )
            })
            .collect()
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip").args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("running ip: {e}")),
    }
}

/// Whether `addr` is an address of this node (binding to it works).
fn is_local(addr: IpAddr) -> bool {
    match std::net::UdpSocket::bind(SocketAddr::new(addr, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(nix::libc::EADDRNOTAVAIL),
    }
}

/// Put `addr` on the node if it is not there; returns where it was put (empty when it was
/// already local).
pub fn provision(addr: IpAddr) -> Result<String, String> {
    if addr.is_unspecified() || addr.is_loopback() || is_local(addr) {
        return Ok(String::new());
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let cidr = format!("{addr}/{prefix}");
    let dummy =
        ip(&["link", "show", LINK]).is_ok() || ip(&["link", "add", LINK, "type", "dummy"]).is_ok();
    if dummy {
        ip(&["link", "set", LINK, "up"])?;
        ip(&["addr", "replace", &cidr, "dev", LINK])
            .map_err(|e| format!("adding {cidr} to {LINK}: {e}"))?;
        return Ok(format!(" (added to {LINK})"));
    }
    // No dummy links in this kernel: loopback, host scope (never a source address for
    // traffic leaving the node).
    ip(&["addr", "replace", &cidr, "dev", "lo", "scope", "host"])
        .map_err(|e| format!("adding {cidr} to lo: {e}"))?;
    Ok(" (added to lo, scope host: no dummy links in this kernel)".into())
}

/// Remove what `provision` added for `addrs` (`switchyard cleanup`).
pub fn unprovision(addrs: &[IpAddr]) -> Vec<String> {
    let mut done = Vec::new();
    if ip(&["link", "show", LINK]).is_ok() && ip(&["link", "del", LINK]).is_ok() {
        done.push(format!("dns: deleted link {LINK}"));
    }
    done.extend(unprovision_addresses(addrs));
    done
}

/// Remove `addrs` from our dummy link or `lo` (host scope), wherever `provision` put them.
pub fn unprovision_addresses(addrs: &[IpAddr]) -> Vec<String> {
    let mut done = Vec::new();
    for a in addrs
        .iter()
        .filter(|a| !a.is_unspecified() && !a.is_loopback())
    {
        let prefix = if a.is_ipv4() { 32 } else { 128 };
        let cidr = format!("{a}/{prefix}");
        if ip(&["addr", "del", &cidr, "dev", LINK]).is_ok() {
            done.push(format!("dns: removed {cidr} from {LINK}"));
        } else if ip(&["addr", "del", &cidr, "dev", "lo", "scope", "host"]).is_ok() {
            done.push(format!("dns: removed {cidr} from lo"));
        }
    }
    done
}

/// Keep `addr` served until cancelled: provision, bind, and on failure retry with backoff
/// (1 s doubling to 30 s).
pub async fn serve(
    handler: Handler,
    addr: SocketAddr,
    status: Arc<DnsStatus>,
    cancel: CancellationToken,
) {
    // Join the listeners only with a zone to answer from: during an upgrade the old
    // process (same SO_REUSEPORT group) answers until then; on a fresh node, intercepted
    // queries go to the Service's endpoints meanwhile.
    while !handler.snapshot.load().synced {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let missing = if addr.port() < 1024 {
            crate::caps::missing(&[crate::caps::NET_BIND_SERVICE])
        } else {
            Vec::new()
        };
        let attempt = match provision(addr.ip()) {
            Ok(_) if !missing.is_empty() => Err(format!(
                "binding {addr}: missing {}",
                crate::caps::describe(&missing)
            )),
            Ok(how) => Listener::bind(&handler, addr, &cancel)
                .map(|l| (l, how))
                .map_err(|e| format!("binding {addr}: {e}")),
            Err(e) => Err(format!("provisioning {}: {e}", addr.ip())),
        };
        match attempt {
            Ok((listener, how)) => {
                status.set(addr, Ok(how));
                // The address must stay on the node: someone may delete it (`ip addr del`,
                // a network manager). The sockets stay bound; putting it back is enough.
                let mut check = tokio::time::interval(ADDRESS_CHECK);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = check.tick() => {}
                    }
                    if addr.ip().is_unspecified() || is_local(addr.ip()) {
                        continue;
                    }
                    status
                        .errors
                        .get_or_create(&AddressLabel {
                            address: addr.to_string(),
                        })
                        .inc();
                    match provision(addr.ip()) {
                        Ok(how) => {
                            tracing::warn!(%addr, "DNS listen address vanished from the node; put it back{how}");
                            status.set(addr, Ok(how));
                        }
                        Err(e) => {
                            tracing::error!(%addr, error = %e, "DNS listen address vanished from the node and cannot be put back; retrying");
                            status.set(addr, Err(format!("provisioning {}: {e}", addr.ip())));
                        }
                    }
                }
                listener.stop().await;
                return;
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, retry_in = ?backoff, "DNS cannot serve this address; retrying");
                status.set(addr, Err(e));
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Keep cluster DNS interception in step with the resolver: on while it serves (at `target`,
/// and with iptables also at the Service's ClusterIP:53, a listener this task runs) and the
/// store has its first complete lists; off otherwise. The eBPF heartbeat every `HEARTBEAT`
/// lets the kernel turn it off by itself within a second if this process dies; a clean stop
/// turns it off at once.
pub async fn intercept(
    mut redirector: Box<dyn crate::dataplane::DnsRedirector>,
    service: switchyard_model::ServiceKey,
    target: std::net::SocketAddrV4,
    handler: Handler,
    status: Arc<DnsStatus>,
    store: Arc<crate::store::Store>,
    cancel: CancellationToken,
) {
    let gauge = status.interception.clone();
    let mut tick = tokio::time::interval(crate::dataplane::HEARTBEAT);
    let mut last: Option<bool> = None;
    // The listener on the Service's address (iptables) and what it listens on.
    let mut service_listener: Option<(Vec<std::net::Ipv4Addr>, CancellationToken)> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let service_ips: Vec<std::net::Ipv4Addr> = store.read(|e| {
            e.service(&service)
                .map(|s| {
                    s.cluster_ips
                        .iter()
                        .filter_map(|ip| match ip {
                            std::net::IpAddr::V4(v4) => Some(*v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        let mut serving = status.serving(SocketAddr::V4(target));
        if redirector.listens_on_service_ip() {
            if service_listener.as_ref().map(|(ips, _)| ips) != Some(&service_ips) {
                if let Some((_, c)) = service_listener.take() {
                    c.cancel();
                }
                let c = cancel.child_token();
                for ip in &service_ips {
                    tokio::spawn(serve(
                        handler.clone(),
                        SocketAddr::new((*ip).into(), 53),
                        Arc::clone(&status),
                        c.clone(),
                    ));
                }
                service_listener = Some((service_ips.clone(), c));
            }
            serving = serving
                && !service_ips.is_empty()
                && service_ips
                    .iter()
                    .all(|ip| status.serving(SocketAddr::new((*ip).into(), 53)));
        }
        let on = serving && store.initialized();
        let redirect = crate::dataplane::Redirect {
            target,
            service_ips,
        };
        if let Err(e) = redirector.set(on.then_some(&redirect)) {
            tracing::error!(error = %crate::error::chain(&e), "turning DNS interception {}", if on { "on" } else { "off" });
            continue;
        }
        gauge.set(i64::from(on));
        if last != Some(on) {
            tracing::info!(
                resolver = %target,
                "cluster DNS interception {}",
                if on { "on" } else { "off: queries go to the Service's endpoints" }
            );
            last = Some(on);
        }
    }
    // Hand DNS back to the endpoints before the listeners go.
    let _ = redirector.set(None);
    gauge.set(0);
    if let Some((ips, c)) = service_listener {
        c.cancel();
        let addrs: Vec<std::net::IpAddr> = ips.into_iter().map(Into::into).collect();
        for line in unprovision_addresses(&addrs) {
            tracing::info!("{line}");
        }
    }
}
