//! The offline view `switchyard plan` prints: each service port with its frontends and where
//! internal and external traffic goes. Stable, sorted output in table and JSON form.

use std::fmt::Write as _;

use serde::Serialize;

use crate::engine::Engine;
use crate::selector::Selector;
use crate::state::{Route, ServicePortState, Skipped, skip_reason};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanFrontend {
    pub kind: String,
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRoute {
    /// `backends`, `reject` or `drop`.
    pub action: &'static str,
    pub backends: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanServicePort {
    pub service: String,
    pub port_name: String,
    pub protocol: String,
    pub family: String,
    pub frontends: Vec<PlanFrontend>,
    pub internal: PlanRoute,
    /// Present when the port has NodePort, externalIP or LoadBalancer frontends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<PlanRoute>,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanSkipped {
    pub service: String,
    pub reason: Skipped,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub service_ports: Vec<PlanServicePort>,
    pub skipped: Vec<PlanSkipped>,
}

fn route(r: Route<'_>) -> PlanRoute {
    match r {
        Route::Backends(b) => PlanRoute {
            action: "backends",
            backends: b.iter().map(ToString::to_string).collect(),
        },
        Route::Reject => PlanRoute {
            action: "reject",
            backends: Vec::new(),
        },
        Route::Drop => PlanRoute {
            action: "drop",
            backends: Vec::new(),
        },
    }
}

fn policy(local: bool) -> &'static str {
    if local { "Local" } else { "Cluster" }
}

impl PlanServicePort {
    pub fn from_state(s: &ServicePortState) -> Self {
        let has_external = s.frontends.iter().any(|f| f.kind.is_external());
        PlanServicePort {
            service: s.key.service.to_string(),
            port_name: s.key.port_name.to_string(),
            protocol: s.key.protocol.to_string(),
            family: s.key.family.to_string(),
            frontends: s
                .frontends
                .iter()
                .map(|f| PlanFrontend {
                    kind: format!("{:?}", f.kind),
                    address: f.addr.to_string(),
                    port: f.port,
                })
                .collect(),
            internal: route(s.internal_route()),
            external: has_external.then(|| route(s.external_route())),
            internal_traffic_policy: policy(s.internal_traffic_local),
            external_traffic_policy: policy(s.external_traffic_local),
            session_affinity_timeout_seconds: s.affinity_timeout_seconds,
            load_balancer_source_ranges: s.source_ranges.iter().map(ToString::to_string).collect(),
            health_check_node_port: s.health_check_node_port,
        }
    }
}

impl Plan {
    /// The plan of every service matching `selector` (by the Service's labels).
    pub fn build(engine: &Engine, selector: &Selector) -> Plan {
        let mut plan = Plan::default();
        for s in engine.state().values() {
            let Some(svc) = engine.service(&s.key.service) else {
                continue;
            };
            if selector.matches(&svc.labels) {
                plan.service_ports.push(PlanServicePort::from_state(s));
            }
        }
        for svc in engine.services() {
            if let Some(reason) = skip_reason(svc)
                && selector.matches(&svc.labels)
            {
                plan.skipped.push(PlanSkipped {
                    service: svc.key.to_string(),
                    reason,
                });
            }
        }
        plan.skipped.sort_by(|a, b| a.service.cmp(&b.service));
        plan
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        for p in &self.service_ports {
            let port = if p.port_name.is_empty() {
                String::new()
            } else {
                format!(":{}", p.port_name)
            };
            let _ = write!(out, "{}{}/{} {}", p.service, port, p.protocol, p.family);
            if let Some(t) = p.session_affinity_timeout_seconds {
                let _ = write!(out, "  affinity=ClientIP({t}s)");
            }
            if p.internal_traffic_policy == "Local" {
                out.push_str("  iTP=Local");
            }
            if p.external_traffic_policy == "Local" {
                out.push_str("  eTP=Local");
            }
            if let Some(h) = p.health_check_node_port {
                let _ = write!(out, "  healthCheckNodePort={h}");
            }
            out.push('\n');
            for f in &p.frontends {
                let addr = if f.address.contains(':') {
                    format!("[{}]:{}", f.address, f.port)
                } else {
                    format!("{}:{}", f.address, f.port)
                };
                let _ = writeln!(out, "  {:<13} {addr}", f.kind);
            }
            if !p.load_balancer_source_ranges.is_empty() {
                let _ = writeln!(
                    out,
                    "  sourceRanges  {}",
                    p.load_balancer_source_ranges.join(", ")
                );
            }
            let show = |r: &PlanRoute| match r.action {
                "backends" => r.backends.join(", "),
                other => other.to_uppercase(),
            };
            let _ = writeln!(out, "  internal   -> {}", show(&p.internal));
            if let Some(e) = &p.external {
                let _ = writeln!(out, "  external   -> {}", show(e));
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "{} (skipped: {:?})", s.service, s.reason);
        }
        out
    }
}
