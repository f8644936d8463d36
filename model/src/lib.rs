//! Switchyard's pure model: Kubernetes Services, EndpointSlices and the local Node in, the
//! desired state per service port and the ChangeSet between two states out. No I/O here.

pub mod convert;
pub mod engine;
pub mod error;
pub mod fixtures;
pub mod intern;
pub mod manifest;
pub mod plan;
pub mod selector;
pub mod state;
pub mod synthetic;
pub mod types;

pub use engine::{ChangeSet, DesiredState, Engine, ServicePortChange};
pub use error::ModelError;
pub use selector::Selector;
pub use state::{
    Backend, Frontend, FrontendKind, NodePortAddresses, ProxyConfig, Route, ServicePortKey,
    ServicePortState,
};
pub use types::{
    Endpoint, EndpointExtra, EndpointPort, EndpointSlice, IpFamily, Node, Pod, Protocol, Service,
    ServiceKey, ServicePort, ServiceType,
};
