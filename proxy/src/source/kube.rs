//! The Kubernetes API source: kube's watcher for Services, EndpointSlices and this node's Node
//! object, one watch per kind, with the default backoff. The initial list is a streaming list
//! (KEP-3157) where the server offers it, else paginated lists; bookmarks are asked for, so a
//! resumed watch starts from a recent resourceVersion. A (re)list is handed to the store whole
//! at `InitDone`, so objects deleted while the watch was down disappear; a 410 Gone (an
//! expired resourceVersion or continue token) makes the watcher relist.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{StreamExt, pin_mut};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use switchyard_model::{ModelError, convert};
use tokio_util::sync::CancellationToken;

use crate::store::{Converted, Kind, ObjectId, Store};

fn id_of<K: Resource>(o: &K) -> ObjectId {
    ObjectId {
        namespace: o.meta().namespace.clone().unwrap_or_default(),
        name: o.meta().name.clone().unwrap_or_default(),
    }
}

fn conv_service(s: &core::Service) -> Result<Converted, ModelError> {
    convert::service(s).map(Converted::Service)
}

fn conv_slice(s: &discovery::EndpointSlice) -> Result<Converted, ModelError> {
    Ok(convert::endpoint_slice(s)?.map_or(Converted::Ignored, Converted::Slice))
}

fn conv_node(n: &core::Node) -> Result<Converted, ModelError> {
    convert::node(n).map(Converted::Node)
}

fn conv_pod(p: &core::Pod) -> Result<Converted, ModelError> {
    convert::pod(p).map(Converted::Pod)
}

async fn watch_kind<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: Kind,
    conv: fn(&K) -> Result<Converted, ModelError>,
    store: Arc<Store>,
    cancel: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // A zero series from the start, so rates and alerts over it work before the first error.
    let _ = store
        .metrics()
        .watch_errors
        .get_or_create(&crate::metrics::KindLabel {
            kind: kind.as_str().into(),
        });
    // Streaming lists (KEP-3157: the initial objects come on the watch, from the API
    // server's watch cache, without a list response held whole in its memory) when the
    // server offers them; else kube's paginated lists (500 per page).
    let mut streaming = true;
    loop {
        let c = if streaming {
            cfg.clone().streaming_lists()
        } else {
            cfg.clone()
        };
        let stream = watcher::watcher(api.clone(), c).default_backoff();
        pin_mut!(stream);
        let mut listing: Vec<(ObjectId, Result<Converted, ModelError>)> = Vec::new();
        loop {
            let ev = tokio::select! {
                () = cancel.cancelled() => return,
                ev = stream.next() => ev,
            };
            let Some(ev) = ev else { return };
            if ev.is_ok() {
                store.watch_ok(kind);
            }
            match ev {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(o)) => listing.push((id_of(&o), conv(&o))),
                Ok(Event::InitDone) => {
                    let n = listing.len();
                    store.replace(kind, std::mem::take(&mut listing));
                    tracing::info!(
                        kind = kind.as_str(),
                        objects = n,
                        streaming,
                        "list complete"
                    );
                }
                Ok(Event::Apply(o)) => store.apply(kind, &id_of(&o), conv(&o)),
                Ok(Event::Delete(o)) => store.delete(kind, &id_of(&o)),
                Err(e) if streaming && streaming_refused(&e) => {
                    tracing::info!(kind = kind.as_str(), error = %e, "the API server does not serve streaming lists (WatchList): using paginated lists");
                    streaming = false;
                    break;
                }
                Err(e) => {
                    // The backoff retries; a 410 Gone restarts with a fresh list.
                    store.watch_error(kind, &e.to_string());
                    tracing::warn!(kind = kind.as_str(), error = %e, "watch error; retrying with backoff, the last good state stays programmed");
                }
            }
        }
    }
}

/// Whether a watch error says the server refuses streaming lists: a Bad Request or an
/// Invalid (422) for `sendInitialEvents`/`resourceVersionMatch` on a watch, which is how
/// servers without the WatchList feature (or older than 1.27) answer.
fn streaming_refused(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    matches!(code, 400 | 422)
}

/// Watch all three kinds until cancelled; with `pods`, also this node's pods (for DNS's
/// server-side search paths: a field selector on `spec.nodeName`, never the whole cluster).
pub async fn run(
    client: Client,
    node_name: String,
    pods: bool,
    store: Arc<Store>,
    cancel: CancellationToken,
) {
    let pod_watch = pods.then(|| {
        tokio::spawn(watch_kind(
            Api::<core::Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            Kind::Pod,
            conv_pod,
            Arc::clone(&store),
            cancel.clone(),
        ))
    });
    let svc = tokio::spawn(watch_kind(
        Api::<core::Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Service,
        conv_service,
        Arc::clone(&store),
        cancel.clone(),
    ));
    let eps = tokio::spawn(watch_kind(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::EndpointSlice,
        conv_slice,
        Arc::clone(&store),
        cancel.clone(),
    ));
    let node = tokio::spawn(watch_kind(
        Api::<core::Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Kind::Node,
        conv_node,
        store,
        cancel,
    ));
    let _ = tokio::join!(svc, eps, node);
    if let Some(p) = pod_watch {
        let _ = p.await;
    }
}
