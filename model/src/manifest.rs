//! Multi-document YAML manifests of Services, EndpointSlices and Nodes, as `kubectl apply -f`
//! would take them. Errors name the source, the document (1-based) and the field.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;

use crate::convert;
use crate::error::ModelError;
use crate::types::{EndpointSlice, Node, Pod, Service};

/// One object read from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    Pod(Box<Pod>),
}

/// Everything one or more manifests hold, in the model's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
}

impl Objects {
    /// The Node this proxy runs on: the one named `node_name`; without a name, the only one.
    pub fn node(&self, node_name: Option<&str>) -> Option<Node> {
        match node_name {
            Some(n) => self.nodes.iter().find(|x| x.name == n).cloned(),
            None if self.nodes.len() == 1 => self.nodes.first().cloned(),
            None => None,
        }
    }

    pub fn push(&mut self, o: Object) {
        match o {
            Object::Service(s) => self.services.push(*s),
            Object::EndpointSlice(s) => self.slices.push(*s),
            Object::Node(n) => self.nodes.push(*n),
            Object::Pod(p) => self.pods.push(*p),
        }
    }

    pub fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.nodes.extend(other.nodes);
        self.pods.extend(other.pods);
    }
}

fn decode<T: DeserializeOwned>(
    source_name: &str,
    document: usize,
    value: serde_json::Value,
) -> Result<T, ModelError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ModelError::Document {
            source_name: source_name.to_string(),
            document,
            reason: format!("field {path}: {}", e.inner()),
        }
    })
}

fn wrap(source_name: &str, document: usize, e: ModelError) -> ModelError {
    ModelError::InvalidDocument {
        source_name: source_name.to_string(),
        document,
        source: Box::new(e),
    }
}

/// Decode one document (already parsed to a JSON value). Kinds the proxy does not watch
/// (Deployments, ConfigMaps, …) are ignored so a whole application manifest can be used.
fn object(
    source_name: &str,
    document: usize,
    value: serde_json::Value,
    out: &mut Objects,
) -> Result<(), ModelError> {
    let doc_err = |reason: String| ModelError::Document {
        source_name: source_name.to_string(),
        document,
        reason,
    };
    let kind = value
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| doc_err("field kind: missing".into()))?
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| doc_err("field apiVersion: missing".into()))?
        .to_string();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let svc: core::Service = decode(source_name, document, value)?;
            out.services
                .push(convert::service(&svc).map_err(|e| wrap(source_name, document, e))?);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let s: discovery::EndpointSlice = decode(source_name, document, value)?;
            if let Some(s) =
                convert::endpoint_slice(&s).map_err(|e| wrap(source_name, document, e))?
            {
                out.slices.push(s);
            }
        }
        ("v1", "Node") => {
            let n: core::Node = decode(source_name, document, value)?;
            out.nodes
                .push(convert::node(&n).map_err(|e| wrap(source_name, document, e))?);
        }
        ("v1", "Pod") => {
            let p: core::Pod = decode(source_name, document, value)?;
            out.pods
                .push(convert::pod(&p).map_err(|e| wrap(source_name, document, e))?);
        }
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                object(source_name, document, item, out)?;
            }
        }
        (_, "Service" | "Node" | "EndpointSlice" | "Pod") => {
            return Err(doc_err(format!(
                "field apiVersion: {api_version:?} is not served for kind {kind} (want {})",
                if kind == "EndpointSlice" {
                    "discovery.k8s.io/v1"
                } else {
                    "v1"
                }
            )));
        }
        _ => {}
    }
    Ok(())
}

/// What names an object in a manifest: its kind, namespace (none for Nodes) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

impl ObjectId {
    fn new(kind: &'static str, namespace: Option<&str>, name: &str) -> Self {
        ObjectId {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// The object a raw document names, when its kind is one we read and it has a name
    /// (read before, and whatever happens to, the rest of the document).
    fn of(value: &serde_json::Value) -> Option<ObjectId> {
        let kind = match value.get("kind")?.as_str()? {
            "Service" => "Service",
            "EndpointSlice" => "EndpointSlice",
            "Node" => "Node",
            "Pod" => "Pod",
            _ => return None,
        };
        let meta = value.get("metadata")?;
        let name = meta.get("name")?.as_str()?;
        let namespace = (kind != "Node").then(|| {
            meta.get("namespace")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("default")
        });
        Some(ObjectId::new(kind, namespace, name))
    }
}

impl Objects {
    /// Every object held, by what names it.
    pub fn ids(&self) -> std::collections::BTreeSet<ObjectId> {
        let mut ids = std::collections::BTreeSet::new();
        self.each(|id, _| {
            ids.insert(id);
        });
        ids
    }

    fn each(&self, mut f: impl FnMut(ObjectId, Object)) {
        for s in &self.services {
            let id = ObjectId::new("Service", Some(&s.key.namespace), &s.key.name);
            f(id, Object::Service(Box::new(s.clone())));
        }
        for s in &self.slices {
            let id = ObjectId::new("EndpointSlice", Some(&s.namespace), &s.name);
            f(id, Object::EndpointSlice(Box::new(s.clone())));
        }
        for n in &self.nodes {
            f(
                ObjectId::new("Node", None, &n.name),
                Object::Node(Box::new(n.clone())),
            );
        }
        for p in &self.pods {
            let id = ObjectId::new("Pod", Some(&p.namespace), &p.name);
            f(id, Object::Pod(Box::new(p.clone())));
        }
    }

    /// Add the objects of `earlier` that `keep` selects and that are not held already: the
    /// last good versions of objects whose new documents are broken.
    pub fn keep_from(&mut self, earlier: &Objects, keep: impl Fn(&ObjectId) -> bool) {
        let held = self.ids();
        let mut kept = Vec::new();
        earlier.each(|id, o| {
            if keep(&id) && !held.contains(&id) {
                kept.push(o);
            }
        });
        for o in kept {
            self.push(o);
        }
    }
}

/// A document (or an item of a `List`) that could not be used, with the object it names
/// when that much could be read.
#[derive(Debug)]
pub struct BadDocument {
    pub object: Option<ObjectId>,
    pub error: ModelError,
}

/// A manifest read document by document: what could be used, and each document that could
/// not, named.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Objects,
    pub bad: Vec<BadDocument>,
}

/// Parse a multi-document YAML text document by document, as `kubectl apply -f` takes a
/// file: each good document is used and each bad one is reported. Only YAML that cannot be
/// split into documents at all fails the whole text.
pub fn parse_each(source_name: &str, text: &str) -> Result<Parsed, ModelError> {
    // A whole cluster's manifests are large but legitimate: raise the document and node
    // budgets; the alias/anchor protections stay as they are.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1 << 21,
            max_nodes: 1 << 27,
            max_events: 1 << 29,
            max_total_scalar_bytes: 1 << 30,
        },
    };
    // One document at a time: a whole cluster's text as JSON values at once would take
    // about 16 times the text's size (190 MB for 12 MB, 10k services), and the allocator
    // keeps that memory after it is freed.
    let mut reader = text.as_bytes();
    let docs = serde_saphyr::read_with_options::<_, serde_json::Value>(&mut reader, options);
    let mut out = Parsed::default();
    for (i, doc) in docs.enumerate() {
        let doc = doc.map_err(|source| ModelError::Yaml {
            source_name: source_name.to_string(),
            source: Box::new(source),
        })?;
        if doc.is_null() {
            continue;
        }
        if !doc.is_object() {
            out.bad.push(BadDocument {
                object: None,
                error: ModelError::Document {
                    source_name: source_name.to_string(),
                    document: i + 1,
                    reason: "not a mapping".into(),
                },
            });
            continue;
        }
        // A List's items are objects of their own: one bad item spoils only itself.
        let items = match (
            doc.get("apiVersion").and_then(serde_json::Value::as_str),
            doc.get("kind").and_then(serde_json::Value::as_str),
        ) {
            (Some("v1"), Some("List")) => doc
                .get("items")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => vec![doc],
        };
        for item in items {
            let object = ObjectId::of(&item);
            if let Err(error) = self::object(source_name, i + 1, item, &mut out.objects) {
                out.bad.push(BadDocument { object, error });
            }
        }
    }
    Ok(out)
}

/// Parse a multi-document YAML text, all or nothing: the first bad document fails it (for
/// callers with no last good state to fall back to).
pub fn parse(source_name: &str, text: &str) -> Result<Objects, ModelError> {
    let parsed = parse_each(source_name, text)?;
    match parsed.bad.into_iter().next() {
        Some(b) => Err(b.error),
        None => Ok(parsed.objects),
    }
}
