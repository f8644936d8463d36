//! Per-service-port packet, byte and connection counters from the kernel's `COUNTERS` map,
//! exported at scrape time (`serviceCounters: true`). Cardinality is bounded by the
//! programmed service ports (at most `maxServices`); the switch is off by default because a
//! large cluster's every port is a series.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use switchyard_model::{IpFamily, ServicePortKey};

use super::io::read_counters_of;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServicePortLabels {
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub protocol: String,
    pub ip_family: String,
}

impl ServicePortLabels {
    pub fn of(k: &ServicePortKey) -> ServicePortLabels {
        ServicePortLabels {
            namespace: k.service.namespace.clone(),
            service: k.service.name.clone(),
            port: k.port_name.clone(),
            protocol: k.protocol.as_str().into(),
            ip_family: match k.family {
                IpFamily::IPv4 => "IPv4",
                IpFamily::IPv6 => "IPv6",
            }
            .into(),
        }
    }
}

/// Reads the pinned counters of the programmed service ports at every scrape.
#[derive(Debug, Clone)]
pub struct ServiceCounters {
    pin_dir: PathBuf,
    /// service id -> labels, replaced after every sync.
    ports: Arc<Mutex<BTreeMap<u32, ServicePortLabels>>>,
}

impl ServiceCounters {
    pub fn new(pin_dir: PathBuf) -> ServiceCounters {
        ServiceCounters {
            pin_dir,
            ports: Arc::default(),
        }
    }

    pub fn set_ports(&self, ports: BTreeMap<u32, ServicePortLabels>) {
        *self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ports;
    }
}

impl Collector for ServiceCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ports = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let counters = match read_counters_of(&self.pin_dir, ports.keys().copied()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the per-service counters for a scrape");
                return Ok(());
            }
        };
        for (name, help, pick) in [
            (
                "switchyard_service_packets",
                "Packets the per-packet path balanced, per service port",
                (|c: &switchyard_ebpf_common::Counters| c.packets) as fn(&_) -> u64,
            ),
            (
                "switchyard_service_bytes",
                "Bytes the per-packet path balanced, per service port",
                |c| c.bytes,
            ),
            (
                "switchyard_service_connections",
                "New flows (connections, connected sockets or first datagrams) balanced, per service port",
                |c| c.connections,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (id, labels) in &ports {
                let v = counters.get(id).map(pick).unwrap_or_default();
                ConstCounter::new(v).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}
