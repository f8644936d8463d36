//! Where objects come from: the Kubernetes API (watch) or a directory of manifests.

pub mod client;
pub mod kube;
pub mod manifests;

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::SourceError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Kube,
    Manifests(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kube" {
            return Ok(SourceSpec::Kube);
        }
        match s.strip_prefix("manifests:") {
            Some(dir) if !dir.is_empty() => Ok(SourceSpec::Manifests(PathBuf::from(dir))),
            _ => Err(SourceError::BadSource {
                value: s.to_string(),
            }),
        }
    }
}
