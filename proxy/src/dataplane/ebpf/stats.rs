//! Per-service-port packet, byte and connection counters from the kernel's `COUNTERS` map,
//! exported at scrape time (`serviceCounters: true`). Cardinality is bounded by the
//! programmed service ports (at most `maxServices`); the switch is off by default because a
//! large cluster's every port is a series.

use std::collections::{BTreeMap, HashMap};
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
            namespace: k.service.namespace.to_string(),
            service: k.service.name.to_string(),
            port: k.port_name.to_string(),
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
    /// service id and labels of every programmed port: replaced after a full sync, updated
    /// for the ports a change touched otherwise (rebuilding 100k label sets per endpoint
    /// change cost the sync a walk of every port).
    ports: Arc<Mutex<HashMap<ServicePortKey, (u32, ServicePortLabels)>>>,
}

impl ServiceCounters {
    pub fn new(pin_dir: PathBuf) -> ServiceCounters {
        ServiceCounters {
            pin_dir,
            ports: Arc::default(),
        }
    }

    /// Every programmed port: (key, service id).
    pub fn set_ports<'a>(&self, ports: impl Iterator<Item = (&'a ServicePortKey, u32)>) {
        let all = ports
            .map(|(k, id)| (k.clone(), (id, ServicePortLabels::of(k))))
            .collect();
        *self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = all;
    }

    /// The ports a change touched, each with its service id now (`None`: not programmed).
    pub fn update<'a>(&self, touched: impl Iterator<Item = (&'a ServicePortKey, Option<u32>)>) {
        let mut ports = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, id) in touched {
            match id {
                Some(id) => match ports.get_mut(k) {
                    Some(e) => e.0 = id,
                    None => {
                        ports.insert(k.clone(), (id, ServicePortLabels::of(k)));
                    }
                },
                None => {
                    ports.remove(k);
                }
            }
        }
    }

    /// Service id -> labels of every programmed port, as a scrape reads them.
    pub fn labels(&self) -> BTreeMap<u32, ServicePortLabels> {
        self.ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|(id, l)| (*id, l.clone()))
            .collect()
    }
}

impl Collector for ServiceCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ports = self.labels();
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

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::{Protocol, ServiceKey};

    fn key(name: &str) -> ServicePortKey {
        ServicePortKey {
            service: ServiceKey {
                namespace: "t".into(),
                name: name.into(),
            },
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::IPv4,
        }
    }

    /// A change updates only the ports it touched: one added, one whose id changed, one
    /// removed, one left unprogrammed; the others keep their labels.
    #[test]
    fn a_change_updates_the_labels_of_the_ports_it_touched() {
        let c = ServiceCounters::new(PathBuf::from("/nonexistent"));
        let (a, b, d, e) = (key("a"), key("b"), key("d"), key("e"));
        c.set_ports([(&a, 1), (&b, 2), (&d, 4)].into_iter());
        c.update([(&b, Some(7)), (&d, None), (&e, Some(5)), (&key("x"), None)].into_iter());
        let got: Vec<(u32, String)> = c
            .labels()
            .into_iter()
            .map(|(id, l)| (id, l.service))
            .collect();
        assert_eq!(
            got,
            [(1, "a".into()), (5, "e".into()), (7, "b".into())],
            "{got:?}"
        );
    }
}
