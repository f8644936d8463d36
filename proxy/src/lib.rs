//! Switchyard's daemon: sources, store, sync loop, dataplane backends, admin HTTP and CLI.

pub mod admin;
pub mod caps;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod dns;
pub mod dns_listen;
pub mod error;
pub mod healthcheck;
pub mod metrics;
pub mod netlink;
pub mod nl;
pub mod sockdiag;
pub mod source;
pub mod store;
pub mod sync;
