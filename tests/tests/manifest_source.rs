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
    assert_eq!(objs.services.len(), 1, "the good document is used");
    assert_eq!(&*objs.services[0].key.name, "ok");
    let msg = errors[0].to_string();
    assert!(msg.contains("x.yaml: document 2: Service default/bad: spec.ports[0].protocol: unsupported protocol \"ICMP\" (want TCP, UDP or SCTP) (not loaded)"), "{msg}");
}

/// Service `i`'s document: good, or broken in one of four ways (a bad field the API server
/// would refuse, a wrong type, a missing kind, an address out of range).
fn service_doc(i: usize, generation: u8, broken: bool) -> String {
    let ip = format!("10.{}.{}.{}", 96 + generation, i / 250, i % 250 + 1);
    let name = format!("svc-{i}");
    if !broken {
        return svc(&name, &ip);
    }
    match (i / 10) % 4 {
        0 => format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80, protocol: ICMP}}]}}\n"
        ),
        1 => format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: eighty}}]}}\n"
        ),
        2 => format!(
            "---\napiVersion: v1\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        ),
        _ => format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}\n"
        ),
    }
}

/// 10k services in 10 files, one document in ten broken: the good ones are all loaded, each
/// bad one is named, and a later edit that breaks other documents keeps their last good
/// versions while the ones fixed meanwhile come in.
#[test]
fn ten_thousand_services_one_document_in_ten_broken() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let write = |generation: u8, broken: &dyn Fn(usize) -> bool| {
        for f in 0..10 {
            let text: String = (f * N / 10..(f + 1) * N / 10)
                .map(|i| service_doc(i, generation, broken(i)))
                .collect();
            std::fs::write(dir.path().join(format!("svc-{f}.yaml")), text).unwrap();
        }
    };
    let by_name =
        |objs: &switchyard_model::manifest::Objects| -> std::collections::BTreeMap<String, String> {
            objs.services
                .iter()
                .map(|s| (s.key.name.to_string(), s.cluster_ips[0].to_string()))
                .collect()
        };

    write(0, &|i| i % 10 == 7);
    let mut md = manifests::ManifestDir::new(dir.path());
    let start = Instant::now();
    let (objs, errors) = md.load().unwrap();
    let took = start.elapsed();
    let got = by_name(&objs);
    assert_eq!(got.len(), N - N / 10, "every good document is loaded");
    assert!(
        got.keys()
            .all(|n| n.trim_start_matches("svc-").parse::<usize>().unwrap() % 10 != 7)
    );
    assert_eq!(errors.len(), N / 10, "each bad document is reported once");
    for (k, e) in errors.iter().enumerate() {
        let i = k * 10 + 7;
        let msg = e.to_string();
        let doc = format!("svc-{}.yaml: document {}: ", i / (N / 10), i % (N / 10) + 1);
        assert!(msg.contains(&doc), "{msg} (want {doc})");
        if (i / 10) % 4 != 2 {
            // A document without a kind cannot be told from any other object.
            assert!(msg.contains(&format!("Service default/svc-{i}")), "{msg}");
        }
        assert!(msg.ends_with("not loaded)"), "{msg}");
    }
    println!(
        "10k documents, 1k broken: loaded in {:.0} ms",
        took.as_secs_f64() * 1e3
    );

    // Generation 1: new addresses everywhere; the documents broken before are fixed and a
    // different one in ten breaks (i % 10 == 3). A document that loses its kind cannot be
    // matched to an object: its file keeps every earlier object missing from the new text.
    write(1, &|i| i % 10 == 3);
    let (objs, errors) = md.load().unwrap();
    let got = by_name(&objs);
    assert_eq!(errors.len(), N / 10);
    for i in 0..N {
        let want_gen = u8::from(i % 10 != 3);
        let want = format!("10.{}.{}.{}", 96 + want_gen, i / 250, i % 250 + 1);
        assert_eq!(
            got.get(&format!("svc-{i}")),
            Some(&want),
            "svc-{i}: broken now, so its last good version stays; else the new one"
        );
    }
    for e in &errors {
        let msg = e.to_string();
        assert!(msg.ends_with("in force)"), "{msg}");
    }

    // A file that is not YAML at all keeps its whole last good content.
    std::fs::write(dir.path().join("svc-0.yaml"), "apiVersion: v1\n  kind: [").unwrap();
    let (objs, errors) = md.load().unwrap();
    assert_eq!(by_name(&objs), got);
    assert_eq!(
        errors.len(),
        N / 10 * 9 / 10 + 1,
        "{}",
        errors.last().unwrap()
    );
}
