//! The sync loop against a recording (and a faulty) dataplane: gating on the initial lists,
//! debouncing by minSyncPeriod, periodic full resyncs, and retry-as-full after a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use switchyard::dataplane::{Call, Dataplane, FaultyDataplane, RecordingDataplane};
use switchyard::metrics::Metrics;
use switchyard::store::{Converted, Kind, ObjectId, Store};
use switchyard::sync::{SyncLoop, SyncTiming};
use switchyard_model::fixtures::{self, Port};
use switchyard_model::{ProxyConfig, manifest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn service(name: &str, n: u8) -> Converted {
    let y = fixtures::service(
        "ns",
        name,
        &format!("10.96.0.{n}"),
        &[Port::tcp("http", 80)],
    );
    Converted::Service(manifest::parse("t", &y).unwrap().services.remove(0))
}

fn id(name: &str) -> ObjectId {
    ObjectId {
        namespace: "ns".into(),
        name: name.into(),
    }
}

struct Running {
    store: Arc<Store>,
    progress: watch::Receiver<u64>,
    cancel: CancellationToken,
}

impl Running {
    /// Wait until the loop has handled every store change made so far.
    async fn settled(&mut self) {
        let want = self.store.generation();
        tokio::time::timeout(
            Duration::from_secs(10),
            self.progress.wait_for(|g| *g >= want),
        )
        .await
        .expect("the sync loop did not handle the store's changes within 10 s")
        .expect("the sync loop stopped");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn start(dp: Box<dyn Dataplane>, min_sync: Duration, sync_period: Duration) -> Running {
    let store = Store::new(ProxyConfig::default(), Arc::new(Metrics::new()));
    let cancel = CancellationToken::new();
    let l = SyncLoop::new(
        Arc::clone(&store),
        dp,
        SyncTiming {
            min_sync_period: min_sync,
            sync_period,
            retry: Duration::from_millis(50),
        },
    );
    let progress = l.progress();
    tokio::spawn(l.run(cancel.clone()));
    Running {
        store,
        progress,
        cancel,
    }
}

fn list_all(store: &Store) {
    store.replace(Kind::Service, vec![(id("a"), Ok(service("a", 1)))]);
    store.replace(Kind::EndpointSlice, vec![]);
    store.replace(Kind::Node, vec![]);
}

const WAIT: Duration = Duration::from_secs(10);

fn count(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
    calls.iter().filter(|c| pred(c)).count()
}

/// Calls that program state (not the interface list every full sync hands over).
fn is_program(c: &Call) -> bool {
    !matches!(c, Call::Links { .. })
}

fn programs(rec: &RecordingDataplane) -> Vec<Call> {
    rec.calls().into_iter().filter(is_program).collect()
}

fn is_full(c: &Call) -> bool {
    matches!(c, Call::FullSync { .. })
}

fn is_apply(c: &Call) -> bool {
    matches!(c, Call::Apply { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_programmed_before_every_initial_list() {
    let rec = RecordingDataplane::default();
    let mut run = start(
        Box::new(rec.clone()),
        Duration::from_millis(10),
        Duration::from_mins(1),
    );
    run.store
        .replace(Kind::Service, vec![(id("a"), Ok(service("a", 1)))]);
    run.store.replace(Kind::EndpointSlice, vec![]);
    run.settled().await;
    assert!(
        programs(&rec).is_empty(),
        "programmed before the Node list: {:?}",
        programs(&rec)
    );
    run.store.replace(Kind::Node, vec![]);
    run.settled().await;
    let calls = programs(&rec);
    assert_eq!(calls.len(), 1, "{calls:?}");
    match &calls[0] {
        Call::FullSync { state } => assert_eq!(state.len(), 1),
        other => panic!("first call must be a full sync, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_within_min_sync_period_coalesce_into_one_apply() {
    coalesce(false).await;
}

/// The same with a backend whose small applies run on the sync task itself (eBPF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_within_min_sync_period_coalesce_into_one_inline_apply() {
    coalesce(true).await;
}

async fn coalesce(inline: bool) {
    let rec = RecordingDataplane::applying_inline(inline);
    let mut run = start(
        Box::new(rec.clone()),
        Duration::from_millis(400),
        Duration::from_mins(1),
    );
    list_all(&run.store);
    assert!(rec.wait_for(WAIT, |c| count(c, is_full) == 1).await);
    for (i, name) in ["b", "c", "d", "e", "f"].iter().enumerate() {
        run.store.apply(
            Kind::Service,
            &id(name),
            Ok(service(name, 2 + u8::try_from(i).unwrap())),
        );
    }
    run.settled().await;
    let calls = programs(&rec);
    let applies: Vec<&Call> = calls.iter().filter(|c| is_apply(c)).collect();
    assert_eq!(applies.len(), 1, "{calls:?}");
    let Call::Apply { changes, state_len } = applies[0] else {
        unreachable!()
    };
    assert_eq!(changes.added.len(), 5);
    assert_eq!(*state_len, 6);
    // And the debounce held it back: the apply came no sooner than minSyncPeriod after the
    // full sync.
    let timed = rec.timed_calls();
    let full_at = timed.iter().find(|(_, c)| is_full(c)).unwrap().0;
    let apply_at = timed.iter().find(|(_, c)| is_apply(c)).unwrap().0;
    assert!(apply_at - full_at >= Duration::from_millis(390));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_resync_every_sync_period() {
    let rec = RecordingDataplane::default();
    let run = start(
        Box::new(rec.clone()),
        Duration::from_millis(10),
        Duration::from_millis(250),
    );
    list_all(&run.store);
    assert!(
        rec.wait_for(WAIT, |c| count(c, is_full) >= 4).await,
        "want a full sync every 250ms: {:?}",
        programs(&rec)
    );
    let fulls: Vec<_> = rec
        .timed_calls()
        .into_iter()
        .filter(|(_, c)| is_full(c))
        .map(|(t, _)| t)
        .collect();
    for w in fulls.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(240) && gap < Duration::from_secs(2),
            "full syncs {gap:?} apart, want 250ms"
        );
    }
    assert_eq!(count(&programs(&rec), is_apply), 0, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_apply_is_retried_as_a_full_sync_with_the_change() {
    failed_apply_retried(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_inline_apply_is_retried_as_a_full_sync_with_the_change() {
    failed_apply_retried(true).await;
}

async fn failed_apply_retried(inline: bool) {
    let rec = RecordingDataplane::applying_inline(inline);
    // Call 1 is the initial full sync; call 2 (the first apply) fails.
    let faulty = FaultyDataplane::new(rec.clone(), vec![2]);
    let run = start(
        Box::new(faulty),
        Duration::from_millis(10),
        Duration::from_mins(1),
    );
    list_all(&run.store);
    assert!(rec.wait_for(WAIT, |c| count(c, is_program) == 1).await);
    run.store
        .apply(Kind::Service, &id("b"), Ok(service("b", 2)));
    assert!(rec.wait_for(WAIT, |c| count(c, is_program) == 2).await);
    let calls = programs(&rec);
    match &calls[1] {
        Call::FullSync { state } => assert_eq!(state.len(), 2, "the retry must carry the change"),
        other => panic!("want a full sync after the failure, got {other:?}"),
    }
    assert!(
        run.store
            .metrics()
            .encode()
            .contains("switchyard_sync_errors_total 1")
    );
}
