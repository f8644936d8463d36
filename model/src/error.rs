use thiserror::Error;

/// Errors of the model crate. Every variant names the object and the field at fault so an
/// operator can find the bad input.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{kind} {object}: {field}: {reason}")]
    InvalidField {
        kind: &'static str,
        object: String,
        field: String,
        reason: String,
    },

    #[error("{kind} {object}: {field} is required")]
    MissingField {
        kind: &'static str,
        object: String,
        field: String,
    },

    #[error("{source_name}: document {document}: {reason}")]
    Document {
        source_name: String,
        document: usize,
        reason: String,
    },

    #[error("{source_name}: document {document}: {source}")]
    InvalidDocument {
        source_name: String,
        document: usize,
        #[source]
        source: Box<ModelError>,
    },

    #[error("{source_name}: YAML: {source}")]
    Yaml {
        source_name: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },

    #[error("{source_name}: document {document}: {source}")]
    Decode {
        source_name: String,
        document: usize,
        #[source]
        source: serde_json::Error,
    },

    #[error("label selector {selector:?}: {source}")]
    Selector {
        selector: String,
        #[source]
        source: crate::selector::SelectorSyntax,
    },

    #[error("{value:?} is neither a CIDR nor \"primary\": {source}")]
    NodePortAddress {
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },

    #[error("{value:?} is not a CIDR")]
    SourceRange { value: String },
}

impl ModelError {
    pub(crate) fn invalid(
        kind: &'static str,
        object: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ModelError::InvalidField {
            kind,
            object: object.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
