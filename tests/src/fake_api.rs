//! A protocol-faithful fake Kubernetes API server for Services, EndpointSlices and Nodes:
//! list and watch with resourceVersions, bookmarks, `410 Gone` for compacted history,
//! paginated lists (`limit`/`continue`, `410` for an expired continue token), streaming lists
//! (KEP-3157: a watch with `sendInitialEvents=true` sends the current objects, then a bookmark
//! marked `k8s.io/initial-events-end`; refused with 422, as by a server without the WatchList
//! feature, on request), and the ability to drop every open watch stream. Tests drive kube's
//! real client against it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Service,
    EndpointSlice,
    Node,
    Pod,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Service => "Service",
            Resource::EndpointSlice => "EndpointSlice",
            Resource::Node => "Node",
            Resource::Pod => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlice => "discovery.k8s.io/v1",
            Resource::Service | Resource::Node | Resource::Pod => "v1",
        }
    }

    fn from_path(path: &str) -> Option<Resource> {
        match path {
            "/api/v1/services" => Some(Resource::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Resource::EndpointSlice),
            "/api/v1/nodes" => Some(Resource::Node),
            "/api/v1/pods" => Some(Resource::Pod),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct StoredEvent {
    rv: u64,
    resource: Resource,
    type_: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct ApiState {
    rv: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<StoredEvent>,
    /// Watches starting before this resourceVersion get 410 Gone.
    compacted_below: u64,
    /// While set, new watch requests are refused with 503 (the "API server is away").
    refuse_watches: bool,
    /// While set, streaming lists are refused with 422 (a server without WatchList).
    refuse_streaming_lists: bool,
    /// The next list with a continue token gets 410 Expired (its snapshot is compacted).
    expire_next_continue: bool,
    /// Every request path and query, in order.
    requests: Vec<String>,
    /// When the first request arrived (a client's cold start begins there).
    first_request_at: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    events: broadcast::Sender<StoredEvent>,
    drop_gen: watch::Sender<u64>,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
    send_initial_events: Option<bool>,
}

fn meta_str<'a>(o: &'a Value, field: &str) -> &'a str {
    o.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn field_selector_matches(sel: Option<&str>, o: &Value) -> bool {
    let Some(sel) = sel.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|req| match req.split_once('=') {
        Some(("metadata.name", v)) => meta_str(o, "name") == v.trim_start_matches('='),
        Some(("metadata.namespace", v)) => meta_str(o, "namespace") == v.trim_start_matches('='),
        Some(("spec.nodeName", v)) => {
            o.get("spec")
                .and_then(|s| s.get("nodeName"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                == v.trim_start_matches('=')
        }
        _ => true,
    })
}

fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

impl FakeApi {
    /// Start serving on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> anyhow::Result<FakeApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        FakeApi::start_on(listener.into_std()?)
    }

    /// Start serving on a listener bound elsewhere (e.g. inside a network namespace).
    pub fn start_on(listener: std::net::TcpListener) -> anyhow::Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let api = FakeApi {
            state: Arc::new(Mutex::new(ApiState {
                rv: 100,
                ..ApiState::default()
            })),
            events: broadcast::channel(4096).0,
            drop_gen: watch::channel(0).0,
            addr,
            shutdown: CancellationToken::new(),
        };
        let app = Router::new().fallback(handle).with_state(api.clone());
        let cancel = api.shutdown.clone();
        // As the real API server (Go sets TCP_NODELAY by default): without it a watch event
        // written in two segments waits out the client's delayed ACK (40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
        });
        Ok(api)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let cfg = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(cfg)?)
    }

    fn lock(&self) -> MutexGuard<'_, ApiState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, st: &mut ApiState, resource: Resource, type_: &'static str, object: Value) {
        let ev = StoredEvent {
            rv: st.rv,
            resource,
            type_,
            object,
        };
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Create or replace an object (a manifest as JSON); returns its new resourceVersion.
    pub fn apply(&self, resource: Resource, mut object: Value) -> u64 {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let ns = if resource == Resource::Node {
            String::new()
        } else {
            let ns = meta_str(&object, "namespace");
            if ns.is_empty() {
                "default".into()
            } else {
                ns.to_string()
            }
        };
        let name = meta_str(&object, "name").to_string();
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind());
        if resource != Resource::Node {
            object["metadata"]["namespace"] = json!(ns);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        let key = (resource, ns, name);
        let type_ = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, object.clone());
        self.record(&mut st, resource, type_, object);
        rv
    }

    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut st = self.lock();
        let ns = if resource == Resource::Node {
            ""
        } else {
            namespace
        };
        let Some(mut obj) = st
            .objects
            .remove(&(resource, ns.to_string(), name.to_string()))
        else {
            return false;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, resource, "DELETED", obj);
        true
    }

    /// Forget all history: every watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted_below = st.rv + 1;
        st.history.clear();
    }

    /// End every open watch stream (as a restarting API server or a proxy timeout would).
    pub fn drop_watches(&self) {
        self.drop_gen.send_modify(|g| *g += 1);
    }

    pub fn refuse_watches(&self, refuse: bool) {
        self.lock().refuse_watches = refuse;
    }

    /// Refuse streaming lists (422), as a server without the WatchList feature does.
    pub fn refuse_streaming_lists(&self, refuse: bool) {
        self.lock().refuse_streaming_lists = refuse;
    }

    /// Answer the next paginated list's continue request with 410 Expired.
    pub fn expire_next_continue(&self) {
        self.lock().expire_next_continue = true;
    }

    /// The requests served so far (`path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// When the first request arrived, if one has.
    pub fn first_request_at(&self) -> Option<std::time::SystemTime> {
        self.lock().first_request_at
    }

    /// How many initial lists were served for `path`: list requests starting a list (not
    /// continuing one), and streaming lists (watches with `sendInitialEvents=true`).
    pub fn list_count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(path))
            .filter(|r| {
                let watch = r.contains("watch=true") || r.contains("watch=1");
                if watch {
                    r.contains("sendInitialEvents=true")
                } else {
                    !r.contains("continue=")
                }
            })
            .count()
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

async fn handle(State(api): State<FakeApi>, uri: Uri, Query(p): Query<Params>) -> Response {
    {
        let mut st = api.lock();
        st.requests.push(uri.to_string());
        st.first_request_at
            .get_or_insert_with(std::time::SystemTime::now);
    }
    let Some(resource) = Resource::from_path(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status_error(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        )
            .into_response();
    };
    let watching = matches!(p.watch.as_deref(), Some("true" | "1"));
    if watching {
        watch_response(&api, resource, &p)
    } else {
        list_response(&api, resource, &p)
    }
}

fn list_response(api: &FakeApi, resource: Resource, p: &Params) -> Response {
    let mut st = api.lock();
    // A continue token: "RV/NAMESPACE/NAME", the snapshot and the last key served.
    let (at_rv, after) = match p.continue_.as_deref().filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let (Some(rv), Some(ns), Some(name)) = (
                parts.next().and_then(|r| r.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) else {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(status_error(400, "BadRequest", "invalid continue token")),
                )
                    .into_response();
            };
            if rv < st.compacted_below || std::mem::take(&mut st.expire_next_continue) {
                return (
                    StatusCode::GONE,
                    axum::Json(status_error(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    )),
                )
                    .into_response();
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => (st.rv, None),
    };
    let mut items: Vec<(&(Resource, String, String), &Value)> = st
        .objects
        .iter()
        .filter(|((r, ns, name), o)| {
            *r == resource
                && field_selector_matches(p.field_selector.as_deref(), o)
                && after
                    .as_ref()
                    .is_none_or(|(ans, aname)| (ns, name) > (ans, aname))
        })
        .collect();
    let mut next = None;
    if let Some(limit) = p.limit.filter(|l| *l > 0)
        && items.len() > limit
    {
        items.truncate(limit);
        next = items
            .last()
            .map(|((_, ns, name), _)| format!("{at_rv}/{ns}/{name}"));
    }
    let mut meta = json!({"resourceVersion": at_rv.to_string()});
    if let Some(c) = next {
        meta["continue"] = json!(c);
    }
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": meta,
        "items": items.into_iter().map(|(_, o)| o.clone()).collect::<Vec<_>>(),
    });
    axum::Json(body).into_response()
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch_response(api: &FakeApi, resource: Resource, p: &Params) -> Response {
    let from: u64 = p
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let streaming = p.send_initial_events == Some(true);
    // Subscribed under the state lock (events are broadcast under it): nothing falls between
    // the backlog or the initial objects and the live events.
    let (backlog, compacted, refuse, refuse_streaming, current, initial, live) = {
        let st = api.lock();
        let backlog: Vec<StoredEvent> = if streaming {
            Vec::new()
        } else {
            st.history
                .iter()
                .filter(|e| e.resource == resource && e.rv > from)
                .cloned()
                .collect()
        };
        let initial: Vec<Value> = if streaming {
            st.objects
                .iter()
                .filter(|((r, _, _), o)| {
                    *r == resource && field_selector_matches(p.field_selector.as_deref(), o)
                })
                .map(|(_, o)| o.clone())
                .collect()
        } else {
            Vec::new()
        };
        (
            backlog,
            !streaming && from < st.compacted_below && from != 0,
            st.refuse_watches,
            st.refuse_streaming_lists,
            st.rv,
            initial,
            api.events.subscribe(),
        )
    };
    if streaming && refuse_streaming {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(status_error(
                422,
                "Invalid",
                "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            )),
        )
            .into_response();
    }
    if refuse {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(status_error(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            )),
        )
            .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(256);
    if compacted {
        // The real API server answers 200 and sends the 410 as an ERROR event.
        let msg = format!("too old resource version: {from} ({current})");
        let ev = json!({"type": "ERROR", "object": status_error(410, "Expired", &msg)});
        tokio::spawn(async move {
            let _ = tx.send(Ok(line(&ev))).await;
        });
    } else {
        let mut live = live;
        let mut dropped = api.drop_gen.subscribe();
        let selector = p.field_selector.clone();
        let bookmarks = p.allow_watch_bookmarks.unwrap_or(false);
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(300).min(300));
        let shutdown = api.shutdown.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let mut last = from;
            if streaming {
                for o in initial {
                    let ev = json!({"type": "ADDED", "object": o});
                    if tx.send(Ok(line(&ev))).await.is_err() {
                        return;
                    }
                }
                let bm = json!({"type": "BOOKMARK", "object": {
                    "kind": resource.kind(), "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": current.to_string(),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}});
                if tx.send(Ok(line(&bm))).await.is_err() {
                    return;
                }
                last = current;
            }
            for e in backlog {
                if !deliver(&tx, &e, resource, &mut last, selector.as_deref()).await {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = &mut deadline => return,
                    () = shutdown.cancelled() => return,
                    _ = dropped.changed() => return,
                    ev = live.recv() => {
                        let Ok(e) = ev else { return };
                        if !deliver(&tx, &e, resource, &mut last, selector.as_deref()).await {
                            return;
                        }
                    }
                    _ = tick.tick(), if bookmarks => {
                        // Events are broadcast under the state lock, so every event up to
                        // `rv` is already queued here: deliver them before promising `rv`.
                        let rv = api.lock().rv;
                        loop {
                            match live.try_recv() {
                                Ok(e) => {
                                    if !deliver(&tx, &e, resource, &mut last, selector.as_deref()).await {
                                        return;
                                    }
                                }
                                Err(broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => return,
                            }
                        }
                        let bm = json!({"type": "BOOKMARK", "object": {
                            "kind": resource.kind(), "apiVersion": resource.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()}}});
                        last = last.max(rv);
                        if tx.send(Ok(line(&bm))).await.is_err() { return }
                    }
                }
            }
        });
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Send one event if it is for this watch and newer than what was sent; false when the
/// client went away.
async fn deliver(
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
    e: &StoredEvent,
    resource: Resource,
    last: &mut u64,
    selector: Option<&str>,
) -> bool {
    if e.resource != resource || e.rv <= *last {
        return true;
    }
    *last = e.rv;
    if !field_selector_matches(selector, &e.object) {
        return true;
    }
    let ev = json!({"type": e.type_, "object": e.object});
    tx.send(Ok(line(&ev))).await.is_ok()
}
