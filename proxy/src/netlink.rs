//! Follows the node's network interfaces and addresses with rtnetlink and hands them to the
//! store, like any other input: the sync loop then attaches per-interface programs to new
//! interfaces and serves NodePorts on new addresses. Nothing here touches the dataplane.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::MulticastGroup;
use tokio_util::sync::CancellationToken;

use crate::store::{HostView, Store};

/// The links Switchyard creates to hold addresses of its own.
const OWN_LINKS: [&str; 2] = [
    crate::dns_listen::LINK,
    crate::dataplane::ipvs::writer::LINK,
];

async fn read(handle: &rtnetlink::Handle) -> Result<HostView, rtnetlink::Error> {
    let mut view = HostView::default();
    let mut own = std::collections::BTreeSet::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await? {
        let index = l.header.index;
        for a in l.attributes {
            if let LinkAttribute::IfName(n) = a {
                if OWN_LINKS.contains(&n.as_str()) {
                    own.insert(index);
                }
                view.links.push(n);
            }
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(a) = addrs.try_next().await? {
        // Addresses we put on the node ourselves (service VIPs, the DNS listen address) are
        // not node addresses: no NodePorts on them. Nor are host-scope ones.
        if own.contains(&a.header.index)
            || a.header.scope == netlink_packet_route::address::AddressScope::Host
        {
            continue;
        }
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

/// Push the host's links and addresses to the store now and on every change.
pub async fn follow(store: Arc<Store>, cancel: CancellationToken) -> std::io::Result<()> {
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
                store.set_host(view.clone());
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
