//! kube's real client and watcher against the fake API server: the store converges after
//! live events, a dropped watch, a 410 Gone with a relist, and invalid objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard::metrics::Metrics;
use switchyard::source;
use switchyard::store::Store;
use switchyard_model::ProxyConfig;
use switchyard_model::fixtures::{self, Port};
use switchyard_tests::fake_api::{FakeApi, Resource};
use tokio_util::sync::CancellationToken;

fn svc(name: &str, ip: &str) -> Value {
    fixtures::to_json(&fixtures::service(
        "shop",
        name,
        ip,
        &[Port::tcp("http", 80)],
    ))
    .unwrap()
}

fn slice(name: &str, service: &str, ips: &[&str]) -> Value {
    let eps: Vec<(&str, Option<&str>)> = ips.iter().map(|ip| (*ip, None)).collect();
    let doc = fixtures::slice("shop", service, name, &[Port::tcp("http", 8080)], &eps);
    fixtures::to_json(&doc).unwrap()
}

fn node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

/// What the store holds, in a form tests can compare.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Held {
    initialized: bool,
    /// name -> cluster IPs
    services: BTreeMap<String, String>,
    /// slice name -> endpoint addresses
    slices: BTreeMap<String, String>,
    node: Option<String>,
}

fn held(store: &Store) -> Held {
    let initialized = store.initialized();
    store.read(|e| Held {
        initialized,
        services: e
            .services()
            .map(|s| {
                let ips: Vec<String> = s.cluster_ips.iter().map(ToString::to_string).collect();
                (s.key.name.to_string(), ips.join(","))
            })
            .collect(),
        slices: e
            .all_slices()
            .map(|s| {
                let ips: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
                (s.name.clone(), ips.join(","))
            })
            .collect(),
        node: e.node().map(|n| format!("{}={}", n.name, n.addresses[0])),
    })
}

fn expect(services: &[(&str, &str)], slices: &[(&str, &str)], node: Option<&str>) -> Held {
    Held {
        initialized: true,
        services: services
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect(),
        slices: slices
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect(),
        node: node.map(ToString::to_string),
    }
}

async fn converge(store: &Store, want: &Held, what: &str) {
    let start = Instant::now();
    loop {
        let got = held(store);
        if &got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: store did not converge\n got: {got:?}\nwant: {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Harness {
    api: FakeApi,
    store: Arc<Store>,
    cancel: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.api.stop();
    }
}

async fn start(seed: impl FnOnce(&FakeApi)) -> Harness {
    let api = FakeApi::start().await.unwrap();
    seed(&api);
    let store = Store::new(
        ProxyConfig {
            node_name: "node-a".into(),
            ..ProxyConfig::default()
        },
        Arc::new(Metrics::new()),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(source::kube::run(
        api.client().unwrap(),
        "node-a".into(),
        true,
        Arc::clone(&store),
        cancel.clone(),
    ));
    Harness { api, store, cancel }
}

fn seed(api: &FakeApi) {
    api.apply(Resource::Service, svc("a", "10.96.0.1"));
    api.apply(Resource::Service, svc("b", "10.96.0.2"));
    api.apply(Resource::EndpointSlice, slice("a-1", "a", &["10.244.1.1"]));
    api.apply(Resource::EndpointSlice, slice("b-1", "b", &["10.244.1.2"]));
    api.apply(Resource::Node, node("node-a", "172.30.0.10"));
    // Another node: the field selector must keep it out.
    api.apply(Resource::Node, node("node-b", "172.30.0.11"));
}

/// What the store holds once it has listed `seed`.
fn seeded() -> Held {
    expect(
        &[("a", "10.96.0.1"), ("b", "10.96.0.2")],
        &[("a-1", "10.244.1.1"), ("b-1", "10.244.1.2")],
        Some("node-a=172.30.0.10"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_live_events() {
    let h = start(seed).await;
    converge(&h.store, &seeded(), "initial list").await;

    h.api.apply(Resource::Service, svc("c", "10.96.0.3"));
    h.api.apply(
        Resource::EndpointSlice,
        slice("a-1", "a", &["10.244.1.1", "10.244.1.9"]),
    );
    h.api.delete(Resource::Service, "shop", "b");
    h.api.delete(Resource::EndpointSlice, "shop", "b-1");
    h.api.apply(Resource::Node, node("node-a", "172.30.0.20"));
    converge(
        &h.store,
        &expect(
            &[("a", "10.96.0.1"), ("c", "10.96.0.3")],
            &[("a-1", "10.244.1.1,10.244.1.9")],
            Some("node-a=172.30.0.20"),
        ),
        "live events",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_from_its_resource_version() {
    let h = start(seed).await;
    converge(&h.store, &seeded(), "initial list").await;
    let lists_before = h.api.list_count("/api/v1/services");

    // Drop every stream, and change things before the client can come back.
    h.api.drop_watches();
    h.api.apply(Resource::Service, svc("a", "10.96.0.11"));
    h.api.delete(Resource::EndpointSlice, "shop", "b-1");
    h.api
        .apply(Resource::EndpointSlice, slice("b-2", "b", &["10.244.1.3"]));
    converge(
        &h.store,
        &expect(
            &[("a", "10.96.0.11"), ("b", "10.96.0.2")],
            &[("a-1", "10.244.1.1"), ("b-2", "10.244.1.3")],
            Some("node-a=172.30.0.10"),
        ),
        "after dropped watch",
    )
    .await;
    // The history was still there, so the watcher resumed without listing again.
    assert_eq!(h.api.list_count("/api/v1/services"), lists_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists_and_drops_what_was_deleted_meanwhile() {
    let h = start(seed).await;
    converge(&h.store, &seeded(), "initial list").await;
    let lists_before = h.api.list_count("/api/v1/services");

    // The API server goes away; while it is away objects are deleted and created, and its
    // history is compacted, so the client's resourceVersion is too old when it returns.
    h.api.refuse_watches(true);
    h.api.drop_watches();
    h.api.delete(Resource::Service, "shop", "b");
    h.api.delete(Resource::EndpointSlice, "shop", "b-1");
    h.api.apply(Resource::Service, svc("c", "10.96.0.3"));
    h.api
        .apply(Resource::EndpointSlice, slice("c-1", "c", &["10.244.1.4"]));
    h.api.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.api.refuse_watches(false);

    converge(
        &h.store,
        &expect(
            &[("a", "10.96.0.1"), ("c", "10.96.0.3")],
            &[("a-1", "10.244.1.1"), ("c-1", "10.244.1.4")],
            Some("node-a=172.30.0.10"),
        ),
        "after 410 Gone",
    )
    .await;
    assert!(
        h.api.list_count("/api/v1/services") > lists_before,
        "a 410 must lead to a relist: {:?}",
        h.api.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_update_keeps_the_last_good_version() {
    let h = start(seed).await;
    let good = seeded();
    converge(&h.store, &good, "initial list").await;
    h.api.apply(Resource::Service, svc("a", "10.96.0.999"));
    // A later valid event proves the bad one was processed (and skipped) before it.
    h.api.apply(Resource::Service, svc("z", "10.96.0.26"));
    let mut want = good.clone();
    want.services.insert("z".into(), "10.96.0.26".into());
    converge(&h.store, &want, "after invalid update").await;
    let metrics = h.store.metrics().encode();
    assert!(
        metrics.contains("switchyard_source_errors_total{kind=\"Service\"} 1"),
        "{metrics}"
    );
}

/// This node's pods are watched (field selector `spec.nodeName`) for DNS's server-side search
/// paths: another node's pods and host-network pods stay out; deletions take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_nodes_pods_reach_the_pod_directory() {
    let pod = |name: &str, node: &str, ip: &str, host: bool| {
        json!({"metadata": {"name": name, "namespace": "shop"},
               "spec": {"nodeName": node, "hostNetwork": host, "containers": []},
               "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})
    };
    let h = start(|api| {
        seed(api);
        api.apply(Resource::Pod, pod("web-1", "node-a", "10.244.1.5", false));
        api.apply(Resource::Pod, pod("web-2", "node-b", "10.244.2.5", false));
        api.apply(Resource::Pod, pod("agent", "node-a", "172.30.0.10", true));
    })
    .await;
    let dir = h.store.pod_directory();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.namespace_of("10.244.1.5".parse().unwrap()).is_none() {
        assert!(Instant::now() < deadline, "node-a's pod never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dir.len(), 1, "another node's or a host-network pod got in");
    h.api.delete(Resource::Pod, "shop", "web-1");
    while dir.namespace_of("10.244.1.5".parse().unwrap()).is_some() {
        assert!(Instant::now() < deadline, "the deleted pod stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        h.api
            .requests()
            .iter()
            .any(|r| r.starts_with("/api/v1/pods") && r.contains("spec.nodeName%3Dnode-a")),
        "{:?}",
        h.api.requests()
    );
}

/// Objects of absurd size (beyond what the API server's validation admits) are refused with
/// an error naming them, and the objects after them are processed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurdly_large_slices_are_refused_and_do_not_starve_the_rest() {
    let h = start(seed).await;
    let good = seeded();
    converge(&h.store, &good, "initial list").await;

    let mut huge = slice("a-2", "a", &["10.244.1.1"]);
    let endpoints: Vec<Value> = (0..100_000u32)
        .map(|i| json!({"addresses": [format!("10.{}.{}.{}", 100 + (i >> 16), (i >> 8) & 255, i & 255)]}))
        .collect();
    huge["endpoints"] = Value::Array(endpoints);
    let mut wide = slice("b-2", "b", &["10.244.1.2"]);
    let ports: Vec<Value> = (0..10_000u32)
        .map(|i| json!({"name": format!("p{i}"), "port": 1000 + i, "protocol": "TCP"}))
        .collect();
    wide["ports"] = Value::Array(ports);
    h.api.apply(Resource::EndpointSlice, huge);
    h.api.apply(Resource::EndpointSlice, wide);
    let t = std::time::Instant::now();
    h.api
        .apply(Resource::EndpointSlice, slice("a-3", "a", &["10.244.1.7"]));
    let mut want = good.clone();
    want.slices.insert("a-3".into(), "10.244.1.7".into());
    converge(&h.store, &want, "after the absurd slices").await;
    eprintln!(
        "the slice after them was in the store {:?} later",
        t.elapsed()
    );
    let metrics = h.store.metrics().encode();
    assert!(
        metrics.contains("switchyard_source_errors_total{kind=\"EndpointSlice\"} 2"),
        "{metrics}"
    );
}

/// 1200 services, so a paginated list takes three pages of kube's 500.
fn seed_many(api: &FakeApi) {
    seed(api);
    for i in 0..1200 {
        api.apply(
            Resource::Service,
            svc(
                &format!("s{i:04}"),
                &format!("10.97.{}.{}", i / 250, i % 250 + 1),
            ),
        );
    }
}

async fn converge_count(store: &Store, services: usize, what: &str) {
    let start = Instant::now();
    loop {
        let got = held(store);
        if got.initialized && got.services.len() == services {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {} services held, want {services}",
            got.services.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the server offers streaming lists (KEP-3157), the initial objects come on the
/// watch: no list request at all, one watch per kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_are_used_where_the_server_offers_them() {
    let h = start(seed_many).await;
    converge_count(&h.store, 1202, "streaming list").await;
    let reqs = h.api.requests();
    let lists: Vec<&String> = reqs
        .iter()
        .filter(|r| !r.contains("watch=true") && !r.contains("watch=1"))
        .collect();
    assert!(lists.is_empty(), "no list request expected: {lists:?}");
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/nodes",
        "/api/v1/pods",
    ] {
        let watches: Vec<&String> = reqs.iter().filter(|r| r.starts_with(path)).collect();
        assert_eq!(watches.len(), 1, "one watch for {path}: {watches:?}");
        assert!(
            watches[0].contains("sendInitialEvents=true")
                && watches[0].contains("allowWatchBookmarks=true"),
            "{watches:?}"
        );
    }
    // Live events still arrive on the same watch.
    h.api.apply(Resource::Service, svc("late", "10.96.0.9"));
    converge_count(&h.store, 1203, "live event after a streaming list").await;
}

/// A server without streaming lists (422, as without the WatchList feature): the watcher
/// falls back to paginated lists, 500 per page, and the store is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_streaming_lists_paginated_lists_are_used() {
    let h = start(|api| {
        api.refuse_streaming_lists(true);
        seed_many(api);
    })
    .await;
    converge_count(&h.store, 1202, "paginated list").await;
    let reqs = h.api.requests();
    let pages: Vec<&String> = reqs
        .iter()
        .filter(|r| r.starts_with("/api/v1/services") && !r.contains("watch="))
        .collect();
    assert_eq!(pages.len(), 3, "three pages of 500: {pages:?}");
    assert!(pages.iter().all(|p| p.contains("limit=500")), "{pages:?}");
    assert_eq!(
        pages.iter().filter(|p| p.contains("continue=")).count(),
        2,
        "{pages:?}"
    );
    assert_eq!(h.api.list_count("/api/v1/services"), 2, "{reqs:?}");
}

/// A continue token that expires mid-list (410): the list starts again from the first page
/// and completes; nothing half-listed reaches the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_continue_token_restarts_the_list() {
    let h = start(|api| {
        api.refuse_streaming_lists(true);
        api.expire_next_continue();
        seed_many(api);
    })
    .await;
    converge_count(&h.store, 1202, "list after an expired continue token").await;
    let reqs = h.api.requests();
    let firsts = reqs
        .iter()
        .filter(|r| {
            r.starts_with("/api/v1/services") && !r.contains("watch=") && !r.contains("continue=")
        })
        .count();
    // The refused streaming attempt, then two first pages: the one whose continuation
    // expired, and the one that completed.
    assert!(firsts >= 2, "the list must start again: {reqs:?}");
    assert!(
        h.store
            .metrics()
            .encode()
            .contains("switchyard_api_watch_errors_total{kind=\"Service\"} 1"),
        "{}",
        h.store.metrics().encode()
    );
}
