//! Follows the node's network interfaces and addresses with rtnetlink: new interfaces get the
//! per-packet program, and new addresses become NodePort frontends, without a restart.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::MulticastGroup;
use tokio_util::sync::CancellationToken;

use crate::dataplane::Dataplane;
use crate::store::Store;

/// Interface names and addresses of the host right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    pub links: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

async fn read(handle: &rtnetlink::Handle) -> Result<HostView, rtnetlink::Error> {
    let mut view = HostView::default();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await? {
        for a in l.attributes {
            if let LinkAttribute::IfName(n) = a {
                view.links.push(n);
            }
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(a) = addrs.try_next().await? {
        for attr in a.attributes {
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
            // otherwise.
            if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr
                && !view.addresses.contains(&ip)
            {
                view.addresses.push(ip);
            }
        }
    }
    view.links.sort();
    view.addresses.sort();
    Ok(view)
}

/// Push the host's links and addresses to the store and the dataplane now and on every change.
pub async fn follow(
    store: Arc<Store>,
    dataplane: Arc<Mutex<Box<dyn Dataplane>>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(conn);
    let mut last = HostView::default();
    loop {
        match read(&handle).await {
            Ok(view) if view != last => {
                tracing::debug!(links = ?view.links, addresses = ?view.addresses, "host interfaces");
                store.set_host_addresses(view.addresses.clone());
                let dp = Arc::clone(&dataplane);
                let links = view.links.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut dp = dp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Err(e) = dp.links_changed(&links) {
                        tracing::warn!(error = %e, "following interfaces");
                    }
                })
                .await;
                last = view;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading interfaces"),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            ev = futures::StreamExt::next(&mut events) => {
                if ev.is_none() { return Ok(()) }
                // Interface creation comes as a burst of messages; read once it settles.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), futures::StreamExt::next(&mut events)).await {}
            }
        }
    }
}
