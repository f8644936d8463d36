//! The sync loop: waits for the initial lists, then applies ChangeSets no more often than
//! `minSyncPeriod` and a full sync every `syncPeriod` (repairing drift). A failed sync is
//! retried as a full sync.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::dataplane::Dataplane;
use crate::store::{Store, SyncOutput};

/// Called after every successful sync with the new state (feeds DNS and status).
pub type SyncHook = Box<dyn Fn(&SyncOutput) + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// First retry delay after a failed sync (doubles up to `sync_period`).
    pub retry: Duration,
}

pub struct SyncLoop {
    pub store: Arc<Store>,
    pub dataplane: Arc<Mutex<Box<dyn Dataplane>>>,
    pub timing: SyncTiming,
    pub hooks: Vec<SyncHook>,
}

impl std::fmt::Debug for SyncLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLoop")
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl SyncLoop {
    pub async fn run(self, cancel: CancellationToken) {
        let mut changed = self.store.subscribe();
        // Nothing is programmed before every kind's initial list is complete.
        while !self.store.initialized() {
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
        loop {
            if pending || need_full {
                // Debounce: at most one sync per minSyncPeriod; events in between coalesce.
                if let Some(t) = last_sync {
                    let earliest = t + self.timing.min_sync_period;
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = sleep_until(earliest.into()) => {}
                    }
                }
                let full = need_full || Instant::now() >= next_full;
                match self.sync_once(full).await {
                    Ok(()) => {
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
            tokio::select! {
                () = cancel.cancelled() => return,
                r = changed.changed() => {
                    if r.is_err() { return }
                    pending = true;
                }
                () = sleep_until(next_full.into()) => {
                    need_full = true;
                }
            }
        }
    }

    async fn sync_once(&self, full: bool) -> Result<(), ()> {
        let Some(out) = self.store.sync() else {
            return Ok(());
        };
        if !full && out.changes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let dp = Arc::clone(&self.dataplane);
        let state = Arc::clone(&out.state);
        let changes = out.changes.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if full {
                dp.full_sync(&state)
            } else {
                dp.apply(&changes, &state)
            }
        })
        .await;
        let metrics = self.store.metrics();
        match result {
            Ok(Ok(())) => {
                let took = started.elapsed();
                metrics.sync_duration.observe(took.as_secs_f64());
                if let Some(since) = out.pending_since {
                    metrics
                        .network_programming
                        .observe(since.elapsed().as_secs_f64());
                }
                metrics.last_sync_timestamp.set(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default(),
                );
                metrics
                    .service_ports
                    .set(i64::try_from(out.state.len()).unwrap_or(i64::MAX));
                tracing::debug!(
                    full,
                    added = out.changes.added.len(),
                    changed = out.changes.changed.len(),
                    removed = out.changes.removed.len(),
                    took_us = took.as_micros(),
                    "synced"
                );
                for h in &self.hooks {
                    h(&out);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                metrics.sync_errors.inc();
                tracing::error!(error = %e, full, "sync failed; will retry with a full sync");
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
