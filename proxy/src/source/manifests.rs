//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file in a directory,
//! reloaded when the directory changes. Each document stands on its own (as with
//! `kubectl apply -f`): a bad one is reported with the file, document, object and field, the
//! good ones are used, and the bad object's last good version stays in force. A file that is
//! not YAML at all keeps its whole last good content.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use switchyard_model::manifest::{self, Objects};
use tokio_util::sync::CancellationToken;

use crate::error::SourceError;
use crate::store::Store;

/// The files of a manifest directory with the last good content of each.
#[derive(Debug, Default)]
pub struct ManifestDir {
    pub dir: PathBuf,
    last_good: BTreeMap<PathBuf, Objects>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    /// Read the directory again. Returns everything in force and the errors of this read.
    pub fn load(&mut self) -> Result<(Objects, Vec<SourceError>), SourceError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|source| SourceError::ReadDir {
                path: self.dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        let mut errors = Vec::new();
        self.last_good.retain(|p, _| files.contains(p));
        for f in &files {
            let text = match std::fs::read_to_string(f) {
                Ok(t) => t,
                Err(source) => {
                    errors.push(SourceError::ReadFile {
                        path: f.clone(),
                        source,
                    });
                    continue;
                }
            };
            match manifest::parse_each(&f.display().to_string(), &text) {
                Ok(parsed) => {
                    let mut objs = parsed.objects;
                    let earlier = self.last_good.get(f);
                    if !parsed.bad.is_empty()
                        && let Some(earlier) = earlier
                    {
                        // A bad document that names its object keeps that object's last
                        // good version; one that cannot even be named might have been any
                        // of them, so every earlier object not in the new text is kept.
                        let unnamed = parsed.bad.iter().any(|b| b.object.is_none());
                        let named: BTreeSet<_> =
                            parsed.bad.iter().filter_map(|b| b.object.clone()).collect();
                        objs.keep_from(earlier, |id| unnamed || named.contains(id));
                    }
                    let held = objs.ids();
                    for b in parsed.bad {
                        let kept = match &b.object {
                            Some(o) => held.contains(o),
                            None => earlier.is_some(),
                        };
                        errors.push(SourceError::BadObject {
                            object: b.object.map(Box::new),
                            kept,
                            source: Box::new(b.error),
                        });
                    }
                    self.last_good.insert(f.clone(), objs);
                }
                Err(e) => errors.push(SourceError::Model(e)),
            }
        }
        let mut all = Objects::default();
        for objs in self.last_good.values() {
            all.extend(objs.clone());
        }
        Ok((all, errors))
    }
}

/// Load once into the store, then follow the directory until cancelled.
pub async fn run(
    dir: PathBuf,
    node_name: Option<String>,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    let mut md = ManifestDir::new(&dir);
    let push = |md: &mut ManifestDir| -> Result<(), SourceError> {
        let (objs, errors) = md.load()?;
        for e in &errors {
            store.metrics().source_error("manifest");
            match e {
                SourceError::BadObject { .. } => {
                    tracing::error!(error = %e, "invalid manifest document");
                }
                _ => {
                    tracing::error!(error = %e, "invalid manifest; keeping the last good content of that file");
                }
            }
        }
        let node = objs.node(node_name.as_deref());
        tracing::info!(
            services = objs.services.len(),
            slices = objs.slices.len(),
            node = node.as_ref().map(|n| n.name.as_str()),
            "manifests loaded from {}",
            md.dir.display()
        );
        store.replace_all(objs.services, objs.slices, node);
        store.replace_pods(objs.pods);
        Ok(())
    };
    // Watch before the first load: an edit made between the load and the watch would
    // otherwise be lost until the next one.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Our own reads raise open/read/close events: reacting to them would reload forever.
        // A change is a create, remove, rename or write (or a close after writing).
        // Reading also updates access times (every read on a strictatime mount): a metadata
        // event is a change only when it is the modification time.
        use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
        if let Ok(ev) = ev {
            let change = match ev.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                EventKind::Modify(ModifyKind::Metadata(m)) => m == MetadataKind::WriteTime,
                _ => true,
            };
            if change {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|source| SourceError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| SourceError::Watch {
            path: dir.clone(),
            source,
        })?;
    push(&mut md)?;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            ev = rx.recv() => {
                if ev.is_none() { return Ok(()) }
                // Editors write in several steps; let the burst settle, then read once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                if let Err(e) = push(&mut md) {
                    tracing::error!(error = %e, "reloading manifests failed; keeping the last good state");
                }
            }
        }
    }
}
