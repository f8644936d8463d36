//! Cluster DNS for `*.svc.<zone>` answered from model snapshots (filled by the DNS issue).
//! For now it carries the snapshot type the proxy publishes on every sync.

use std::sync::Arc;

use switchyard_model::DesiredState;

/// What the resolver answers from; swapped atomically on every sync.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub state: Arc<DesiredState>,
    pub synced: bool,
}
