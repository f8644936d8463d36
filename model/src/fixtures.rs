//! Manifest text for small test clusters, written once: a Service and an EndpointSlice as
//! `kubectl apply -f` takes them. Tests of every crate (and the fake API server, through
//! `to_json`) build their objects from these.

use std::fmt::Write as _;

/// One port of a Service (`targetPort` only when set) or of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target: Option<u16>,
    pub protocol: &'a str,
}

impl<'a> Port<'a> {
    pub fn tcp(name: &'a str, port: u16) -> Self {
        Port {
            name,
            port,
            target: None,
            protocol: "TCP",
        }
    }

    pub fn udp(name: &'a str, port: u16) -> Self {
        Port {
            protocol: "UDP",
            ..Port::tcp(name, port)
        }
    }

    /// The same port forwarding to `target` (a Service port's `targetPort`).
    #[must_use]
    pub fn to(self, target: u16) -> Self {
        Port {
            target: Some(target),
            ..self
        }
    }

    fn flow(&self) -> String {
        let mut s = format!("{{name: {}, port: {}", self.name, self.port);
        if let Some(t) = self.target {
            let _ = write!(s, ", targetPort: {t}");
        }
        let _ = write!(s, ", protocol: {}}}", self.protocol);
        s
    }
}

/// A Service document. `spec` lines (indented by two, e.g. `"  type: NodePort\n"`) may be
/// appended by the caller: `ports` comes last.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[Port<'_>]) -> String {
    let mut s = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  clusterIP: {cluster_ip}\n  ports:\n"
    );
    for p in ports {
        let _ = writeln!(s, "  - {}", p.flow());
    }
    s
}

/// An IPv4 EndpointSlice document of service `service`, endpoints as (address, nodeName).
pub fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    ports: &[Port<'_>],
    endpoints: &[(&str, Option<&str>)],
) -> String {
    let ports: Vec<String> = ports.iter().map(Port::flow).collect();
    let mut s = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{}]\nendpoints:",
        ports.join(", ")
    );
    s.push_str(if endpoints.is_empty() { " []\n" } else { "\n" });
    for (ip, node) in endpoints {
        match node {
            Some(n) => {
                let _ = writeln!(s, "- {{addresses: [{ip}], nodeName: {n}}}");
            }
            None => {
                let _ = writeln!(s, "- {{addresses: [{ip}]}}");
            }
        }
    }
    s
}

/// One document as a JSON value (what an API server would return for it).
pub fn to_json(doc: &str) -> Result<serde_json::Value, crate::ModelError> {
    serde_saphyr::from_str(doc).map_err(|e| crate::ModelError::Yaml {
        source_name: "fixture".into(),
        source: Box::new(e),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_fixtures_parse_into_what_they_say() {
        let y = service("t", "web", "10.96.0.10", &[Port::tcp("http", 80).to(8080)])
            + "  type: NodePort\n"
            + &slice(
                "t",
                "web",
                "web-1",
                &[Port::tcp("http", 8080)],
                &[("10.244.1.1", Some("node-a")), ("10.244.1.2", None)],
            );
        let o = crate::manifest::parse("t", &y).unwrap();
        assert_eq!(o.services[0].service_type, crate::ServiceType::NodePort);
        assert_eq!(o.services[0].ports[0].target_port.as_deref(), Some("8080"));
        assert_eq!(o.slices[0].endpoints.len(), 2);
        assert_eq!(
            o.slices[0].endpoints[0].node_name.as_deref(),
            Some("node-a")
        );
        let j = to_json(&slice("t", "web", "web-1", &[Port::udp("dns", 53)], &[])).unwrap();
        assert_eq!(j["ports"][0]["protocol"], "UDP");
    }
}
