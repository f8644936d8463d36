//! Node-local cluster DNS: answers `*.svc.<zone>` (and PTRs of cluster addresses) from an
//! immutable snapshot of the model, swapped atomically after every sync, and forwards every
//! other name upstream with a bounded cache.

pub mod fast;
pub mod forward;
pub mod metrics;
pub mod resolve;
pub mod server;
pub mod snapshot;

pub use forward::{ForwardConfig, Forwarder};
pub use metrics::DnsMetrics;
pub use server::{Handler, SharedSnapshot, serve};
pub use snapshot::{PodsMode, ServiceRecords, Snapshot, ZoneBuilder, ZoneConfig};
