//! Test support shared by the integration and end-to-end tests.

pub mod client;
pub mod fake_api;
pub mod sandbox;
