//! The sync loop, the one and only writer of the dataplane: waits for the initial lists, then
//! applies ChangeSets (and the node's interfaces) no more often than `minSyncPeriod`, and a
//! full sync every `syncPeriod` that repairs drift: map entries, rules and programs detached
//! from interfaces come back. A failed sync is retried as a full sync.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::dataplane::{Dataplane, Prepared};
use crate::error::DataplaneError;
use crate::metrics::TrafficPolicyLabel;
use crate::store::{Store, SyncOutput};
use switchyard_model::ServicePortState;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Called after every successful sync with the new state (status reporting).
pub type SyncHook = Box<dyn Fn(&SyncOutput) + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// First retry delay after a failed sync (doubles up to `sync_period`).
    pub retry: Duration,
}

/// The most port changes a sync applies inline (`Dataplane::applies_inline`).
const INLINE_MAX: usize = 64;

/// What a sync attempt returns from the dataplane: the sync's result, the interfaces'
/// problem (`None`: links not synced), the capacity problem; `Err`: it panicked.
type Attempt = Result<
    (
        Result<(), DataplaneError>,
        Option<Option<String>>,
        Option<String>,
    ),
    String,
>;

pub struct SyncLoop {
    store: Arc<Store>,
    /// Behind a mutex only to move it into the blocking pool and back; nothing else holds it.
    dataplane: Arc<Mutex<Box<dyn Dataplane>>>,
    timing: SyncTiming,
    hooks: Vec<SyncHook>,
    health: Option<Arc<Health>>,
    /// The store generation the loop has handled (synced, or found nothing to do for).
    progress: watch::Sender<u64>,
}

impl std::fmt::Debug for SyncLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLoop")
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl SyncLoop {
    /// The loop takes the dataplane: from now on it is the only code that writes to it.
    pub fn new(store: Arc<Store>, dataplane: Box<dyn Dataplane>, timing: SyncTiming) -> Self {
        SyncLoop {
            store,
            dataplane: Arc::new(Mutex::new(dataplane)),
            timing,
            hooks: Vec::new(),
            health: None,
            progress: watch::channel(0).0,
        }
    }

    /// Follows the store generation the loop has handled: a sync attempt (or the decision
    /// that there is nothing to program yet) covering every change up to it is over.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Run `hook` after every successful sync.
    #[must_use]
    pub fn with_hook(mut self, hook: SyncHook) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Report to `health` as kube-proxy's sync loop does: an update is queued by every change
    /// and every periodic full sync that falls due, and cleared by a sync that lands.
    #[must_use]
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    fn queued(&self) {
        if let Some(h) = &self.health {
            h.queued();
        }
        self.store.metrics().last_queued_timestamp.set(unix_now());
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut changed = self.store.subscribe();
        // Start-up is a pending update: a daemon that never gets its lists is not healthy.
        self.queued();
        // Nothing is programmed before every kind's initial list is complete.
        loop {
            let generation = *changed.borrow_and_update();
            if self.store.initialized() {
                break;
            }
            self.progress.send_replace(generation);
            tokio::select! {
                () = cancel.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
        }
        let mut need_full = true;
        let mut last_sync: Option<Instant> = None;
        let mut next_full = Instant::now();
        let mut retry = self.timing.retry;
        let mut pending = true;
        // A periodic full sync reads the kernel state in the background while changes keep
        // landing (`reading`), may compare it there with what is programmed (`checking`: the
        // task running is that second step), then syncs from the result (`prepared`).
        let mut reading: Option<tokio::task::JoinHandle<Result<Prepared, DataplaneError>>> = None;
        let mut checking = false;
        let mut prepared: Option<Prepared> = None;
        loop {
            if pending || need_full || prepared.is_some() {
                // Debounce: at most one sync per minSyncPeriod; events in between coalesce.
                // (Only when that is still ahead: a timer rounds up to the next millisecond
                // tick, which would add up to a millisecond to every change at minSyncPeriod 0.)
                if let Some(earliest) = last_sync
                    .map(|t| t + self.timing.min_sync_period)
                    .filter(|e| *e > Instant::now())
                {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = sleep_until(earliest.into()) => {}
                    }
                }
                let full = need_full || prepared.is_some();
                // A forced full sync (start, or after a failure) reads the maps itself.
                let from = prepared.take().filter(|_| !need_full);
                let generation = *changed.borrow_and_update();
                let result = self.sync_once(full, from).await;
                self.progress.send_replace(generation);
                match result {
                    Ok(()) => {
                        if let Some(h) = &self.health {
                            h.updated();
                        }
                        need_full = false;
                        retry = self.timing.retry;
                        if full {
                            next_full = Instant::now() + self.timing.sync_period;
                        }
                    }
                    Err(()) => {
                        need_full = true;
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(self.timing.sync_period);
                    }
                }
                last_sync = Some(Instant::now());
                pending = false;
                continue;
            }
            if reading.is_none() && Instant::now() >= next_full {
                self.queued();
                match self.start_read().await {
                    Some(handle) => reading = Some(handle),
                    None => {
                        need_full = true;
                        continue;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                r = changed.changed() => {
                    if r.is_err() { return }
                    pending = true;
                    self.queued();
                }
                () = sleep_until(next_full.into()), if reading.is_none() => {}
                r = async {
                    match reading.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if reading.is_some() => {
                    reading = None;
                    match r {
                        Ok(Ok(p)) if !checking => match self.start_check(p).await {
                            Ok(handle) => {
                                reading = Some(handle);
                                checking = true;
                            }
                            Err(Some(p)) => prepared = Some(p),
                            Err(None) => need_full = true,
                        },
                        Ok(Ok(p)) => {
                            checking = false;
                            prepared = Some(p);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %crate::error::chain(&e), "reading the maps for a periodic full sync; reading them again under the sync");
                            checking = false;
                            need_full = true;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the periodic full sync's read panicked; reading again under the sync");
                            checking = false;
                            need_full = true;
                        }
                    }
                }
            }
        }
    }

    /// Start the read half of a periodic full sync in the background, when the backend
    /// has one (see `Dataplane::full_sync_reader`).
    async fn start_read(
        &self,
    ) -> Option<tokio::task::JoinHandle<Result<Prepared, DataplaneError>>> {
        let dp = Arc::clone(&self.dataplane);
        let reader = tokio::task::spawn_blocking(move || {
            dp.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .full_sync_reader()
        })
        .await
        .ok()
        .flatten()?;
        Some(tokio::task::spawn_blocking(reader))
    }

    /// Hand a finished read to the backend's check step (`Dataplane::full_sync_check`),
    /// started in the background; `Err` with what goes to the full sync when there is none
    /// (`None`: the backend went away, a full sync reads again).
    async fn start_check(
        &self,
        read: Prepared,
    ) -> Result<tokio::task::JoinHandle<Result<Prepared, DataplaneError>>, Option<Prepared>> {
        let dp = Arc::clone(&self.dataplane);
        let check = tokio::task::spawn_blocking(move || {
            dp.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .full_sync_check(read)
        })
        .await
        .map_err(|_| None)?
        .map_err(Some)?;
        Ok(tokio::task::spawn_blocking(check))
    }

    async fn sync_once(&self, full: bool, prepared: Option<Prepared>) -> Result<(), ()> {
        let Some(out) = self.store.sync() else {
            return Ok(());
        };
        if !full && out.changes.is_empty() && !out.links_changed {
            return Ok(());
        }
        let started = Instant::now();
        let dp = Arc::clone(&self.dataplane);
        let state = Arc::clone(&out.state);
        let changes = out.changes.clone();
        let links = Arc::clone(&out.links);
        let links_changed = out.links_changed;
        let span = tracing::info_span!(
            "sync",
            full,
            added = changes.added.len(),
            changed = changes.changed.len(),
            removed = changes.removed.len()
        );
        // A small change to a backend that applies inline runs right here (see
        // `Dataplane::applies_inline`). Only this loop takes the lock, so it is free; a
        // lock found held falls back to the blocking thread rather than wait on this task.
        if !full && !links_changed && changes.len() <= INLINE_MAX {
            let guard = match self.dataplane.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if let Some(mut dp) = guard.filter(|dp| dp.applies_inline()) {
                let _enter = span.enter();
                // A panic is handled as one on the blocking thread would be (the sync loop
                // goes on, with a full sync).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    (dp.apply(&changes, &state), None, dp.capacity_problem())
                }))
                .map_err(|_| "the inline apply panicked".to_string());
                drop(dp);
                return self.synced(full, started, &out, r);
            }
        }
        let result = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let mut dp = dp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A full sync also re-attaches programs someone detached. An interface that
            // refuses a program must not keep the maps from being programmed: both run, and
            // either failure fails the sync (retried, counted, reported by /healthz).
            let links = (full || links_changed).then(|| dp.sync_links(&links, full));
            let state = if full {
                match prepared {
                    Some(p) => dp.full_sync_prepared(&state, &changes, p),
                    None => dp.full_sync(&state),
                }
            } else if changes.is_empty() {
                Ok(())
            } else {
                dp.apply(&changes, &state)
            };
            let problem = links
                .as_ref()
                .map(|r| r.as_ref().err().map(|e| crate::error::chain(e)));
            let capacity = dp.capacity_problem();
            (state.and(links.unwrap_or(Ok(()))), problem, capacity)
        })
        .await
        .map_err(|e| e.to_string());
        self.synced(full, started, &out, result)
    }

    /// The end of a sync attempt: health, metrics, hooks.
    fn synced(
        &self,
        full: bool,
        started: Instant,
        out: &SyncOutput,
        result: Attempt,
    ) -> Result<(), ()> {
        // An interface without its program is a black hole for traffic from outside the
        // node: unhealthy at once (not only after the health timeout), until it attaches.
        // So is a service that did not fit the maps (as a failed sync is for kube-proxy).
        let result = result.map(|(r, problem, capacity)| {
            if let Some(h) = &self.health {
                if let Some(p) = problem {
                    h.set_problem("interfaces", p);
                }
                h.set_problem("capacity", capacity);
            }
            r
        });
        let metrics = self.store.metrics();
        match result {
            Ok(Ok(())) => {
                let took = started.elapsed();
                metrics.sync_duration.observe(took.as_secs_f64());
                if full {
                    metrics.sync_full_duration.observe(took.as_secs_f64());
                } else {
                    metrics.sync_partial_duration.observe(took.as_secs_f64());
                }
                // Counted over every port by a full sync, adjusted by the changes otherwise
                // (a walk of 100k ports per endpoint change was a sixth of the sync thread).
                let no_local = |p: &ServicePortState| {
                    if p.local_backends.is_empty() {
                        (
                            i64::from(p.internal_traffic_local),
                            i64::from(p.external_traffic_local),
                        )
                    } else {
                        (0, 0)
                    }
                };
                let (mut internal, mut external) = (0, 0);
                let mut count = |p: &ServicePortState, sign: i64| {
                    let (i, e) = no_local(p);
                    internal += sign * i;
                    external += sign * e;
                };
                if full {
                    out.state.values().for_each(|p| count(p, 1));
                } else {
                    let c = &out.changes;
                    c.added.iter().for_each(|p| count(p, 1));
                    c.removed.iter().for_each(|p| count(p, -1));
                    for ch in &c.changed {
                        count(&ch.old, -1);
                        count(&ch.new, 1);
                    }
                }
                for (policy, n) in [("internal", internal), ("external", external)] {
                    let g = metrics
                        .no_local_endpoints
                        .get_or_create(&TrafficPolicyLabel {
                            traffic_policy: policy.into(),
                        });
                    if full {
                        g.set(n);
                    } else {
                        g.inc_by(n);
                    }
                }
                if let Some(since) = out.pending_since {
                    let took = since.elapsed().as_secs_f64();
                    metrics.network_programming.observe(took);
                    metrics.change_to_programmed.observe(took);
                }
                metrics.last_sync_timestamp.set(unix_now());
                metrics
                    .service_ports
                    .set(i64::try_from(out.state.len()).unwrap_or(i64::MAX));
                tracing::debug!(
                    full,
                    added = out.changes.added.len(),
                    changed = out.changes.changed.len(),
                    removed = out.changes.removed.len(),
                    took_us = took.as_micros(),
                    since_receipt_us = out.pending_since.map(|s| s.elapsed().as_micros()),
                    "synced"
                );
                for h in &self.hooks {
                    h(out);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                metrics.sync_errors.inc();
                tracing::error!(error = %crate::error::chain(&e), full, "sync failed; will retry with a full sync");
                Err(())
            }
            Err(e) => {
                metrics.sync_errors.inc();
                tracing::error!(error = %e, "sync task panicked; will retry with a full sync");
                Err(())
            }
        }
    }
}
