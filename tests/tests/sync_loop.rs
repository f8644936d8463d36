//! The sync loop against a recording (and a faulty) dataplane: gating on the initial lists,
//! debouncing by minSyncPeriod, periodic full resyncs, and retry-as-full after a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::dataplane::{Call, Dataplane, FaultyDataplane, RecordingDataplane};
use switchyard::metrics::Metrics;
use switchyard::store::{Converted, Kind, ObjectId, Store};
use switchyard::sync::{SyncLoop, SyncTiming};
use switchyard_model::{ProxyConfig, manifest};
use tokio_util::sync::CancellationToken;

fn service(name: &str, n: u8) -> Converted {
    let y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: 10.96.0.{n}, ports: [{{port: 80}}]}}\n"
    );
    Converted::Service(manifest::parse("t", &y).unwrap().services.remove(0))
}

fn id(name: &str) -> ObjectId {
    ObjectId {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn start(
    dp: Box<dyn Dataplane>,
    min_sync: Duration,
    sync_period: Duration,
) -> (Arc<Store>, CancellationToken) {
    let store = Store::new(ProxyConfig::default(), Arc::new(Metrics::new()));
    let cancel = CancellationToken::new();
    let l = SyncLoop {
        store: Arc::clone(&store),
        dataplane: Arc::new(Mutex::new(dp)),
        timing: SyncTiming {
            min_sync_period: min_sync,
            sync_period,
            retry: Duration::from_millis(50),
        },
        hooks: Vec::new(),
    };
    tokio::spawn(l.run(cancel.clone()));
    (store, cancel)
}

fn list_all(store: &Store) {
    store.replace(Kind::Service, vec![(id("a"), Ok(service("a", 1)))]);
    store.replace(Kind::EndpointSlice, vec![]);
    store.replace(Kind::Node, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_programmed_before_every_initial_list() {
    let rec = RecordingDataplane::default();
    let (store, cancel) = start(
        Box::new(rec.clone()),
        Duration::from_millis(10),
        Duration::from_mins(1),
    );
    store.replace(Kind::Service, vec![(id("a"), Ok(service("a", 1)))]);
    store.replace(Kind::EndpointSlice, vec![]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rec.calls().is_empty(),
        "programmed before the Node list: {:?}",
        rec.calls()
    );
    store.replace(Kind::Node, vec![]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = rec.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    match &calls[0] {
        Call::FullSync { state } => assert_eq!(state.len(), 1),
        other => panic!("first call must be a full sync, got {other:?}"),
    }
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_within_min_sync_period_coalesce_into_one_apply() {
    let rec = RecordingDataplane::default();
    let (store, cancel) = start(
        Box::new(rec.clone()),
        Duration::from_millis(400),
        Duration::from_mins(1),
    );
    list_all(&store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (i, name) in ["b", "c", "d", "e", "f"].iter().enumerate() {
        store.apply(
            Kind::Service,
            &id(name),
            Ok(service(name, 2 + u8::try_from(i).unwrap())),
        );
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let calls = rec.calls();
    let applies: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Apply { .. }))
        .collect();
    assert_eq!(applies.len(), 1, "{calls:?}");
    let Call::Apply { changes, state_len } = applies[0] else {
        unreachable!()
    };
    assert_eq!(changes.added.len(), 5);
    assert_eq!(*state_len, 6);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_resync_every_sync_period() {
    let rec = RecordingDataplane::default();
    let (store, cancel) = start(
        Box::new(rec.clone()),
        Duration::from_millis(10),
        Duration::from_millis(250),
    );
    list_all(&store);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let fulls = rec
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::FullSync { .. }))
        .count();
    assert!(
        (3..=5).contains(&fulls),
        "want a full sync every 250ms, got {fulls}"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_apply_is_retried_as_a_full_sync_with_the_change() {
    let rec = RecordingDataplane::default();
    // Call 1 is the initial full sync; call 2 (the first apply) fails.
    let faulty = FaultyDataplane::new(rec.clone(), vec![2]);
    let (store, cancel) = start(
        Box::new(faulty),
        Duration::from_millis(10),
        Duration::from_mins(1),
    );
    list_all(&store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.apply(Kind::Service, &id("b"), Ok(service("b", 2)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let calls = rec.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    match &calls[1] {
        Call::FullSync { state } => assert_eq!(state.len(), 2, "the retry must carry the change"),
        other => panic!("want a full sync after the failure, got {other:?}"),
    }
    assert!(
        store
            .metrics()
            .encode()
            .contains("switchyard_sync_errors_total 1")
    );
    cancel.cancel();
}
