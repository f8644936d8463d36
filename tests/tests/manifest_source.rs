//! The manifest-directory source: loads a directory, follows edits through inotify, and keeps
//! a file's last good content when an edit breaks it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::metrics::Metrics;
use switchyard::source::manifests;
use switchyard::store::Store;
use switchyard_model::ProxyConfig;
use switchyard_model::fixtures::{self, Port};
use tokio_util::sync::CancellationToken;

fn services(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = store.read(|e| {
        e.services()
            .map(|s| format!("{}={}", s.key.name, s.cluster_ips[0]))
            .collect()
    });
    v.sort();
    v
}

async fn until(store: &Store, want: &[&str], what: &str) {
    let start = Instant::now();
    loop {
        let got = services(store);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: got {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn svc(name: &str, ip: &str) -> String {
    fixtures::service("default", name, ip, &[Port::tcp("http", 80)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_edits_and_keeps_last_good_file_content() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    let store = Store::new(ProxyConfig::default(), Arc::new(Metrics::new()));
    let cancel = CancellationToken::new();
    tokio::spawn(manifests::run(
        dir.path().to_path_buf(),
        None,
        Arc::clone(&store),
        cancel.clone(),
    ));
    until(&store, &["a=10.96.0.1"], "initial load").await;
    assert!(store.initialized());

    // A new file and an edit are picked up.
    std::fs::write(
        dir.path().join("b.yaml"),
        format!("{}---\n{}", svc("b", "10.96.0.2"), svc("c", "10.96.0.3")),
    )
    .unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.11")).unwrap();
    until(
        &store,
        &["a=10.96.0.11", "b=10.96.0.2", "c=10.96.0.3"],
        "edits",
    )
    .await;

    // Breaking b.yaml keeps its last good content (b and c stay); a.yaml is unaffected.
    std::fs::write(
        dir.path().join("b.yaml"),
        format!("{}---\n{}", svc("b", "10.96.0.2"), svc("c", "10.96.0.300")),
    )
    .unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.12")).unwrap();
    until(
        &store,
        &["a=10.96.0.12", "b=10.96.0.2", "c=10.96.0.3"],
        "broken file",
    )
    .await;
    assert!(
        store
            .metrics()
            .encode()
            .contains("switchyard_source_errors_total{kind=\"manifest\"}")
    );

    // Removing a file removes its objects.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    until(&store, &["a=10.96.0.12"], "file removed").await;
    cancel.cancel();
}

#[test]
fn load_reports_file_document_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        format!("{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{ports: [{{port: 80, protocol: ICMP}}]}}\n", svc("ok", "10.96.0.1")),
    )
    .unwrap();
    let mut md = manifests::ManifestDir::new(dir.path());
    let (objs, errors) = md.load().unwrap();
    assert!(
        objs.services.is_empty(),
        "a bad file contributes nothing on first load"
    );
    let msg = errors[0].to_string();
    assert!(msg.contains("x.yaml: document 2: Service default/bad: spec.ports[0].protocol: unsupported protocol \"ICMP\""), "{msg}");
}
