#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ChangeSet is exact: what was added, changed (with the frontends and backends that
//! moved) and removed, and nothing when a change nets to nothing.

use switchyard_model::fixtures::{self, Port};
use switchyard_model::{Engine, ProxyConfig, manifest};

fn engine() -> Engine {
    Engine::new(ProxyConfig {
        node_name: "node-a".into(),
        ..ProxyConfig::default()
    })
}

fn svc(name: &str, ip: &str) -> switchyard_model::Service {
    let y = fixtures::service("ns", name, ip, &[Port::tcp("p", 80)]);
    manifest::parse("svc", &y).unwrap().services.remove(0)
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> switchyard_model::EndpointSlice {
    let eps: Vec<(&str, Option<&str>)> = ips.iter().map(|ip| (*ip, None)).collect();
    let y = fixtures::slice("ns", svc, name, &[Port::tcp("p", 8080)], &eps);
    manifest::parse("slice", &y).unwrap().slices.remove(0)
}

#[test]
fn add_change_remove_are_exact() {
    let mut e = engine();
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_slice(slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]));
    e.upsert_service(svc("b", "10.96.0.2"));
    let cs = e.sync();
    assert_eq!(cs.added.len(), 2);
    assert!(cs.changed.is_empty() && cs.removed.is_empty());

    // One endpoint replaced: one change, naming exactly the backend that left and came.
    e.upsert_slice(slice("a-1", "a", &["10.0.0.1", "10.0.0.3"]));
    let cs = e.sync();
    assert_eq!(cs.len(), 1);
    let ch = &cs.changed[0];
    assert_eq!(&*ch.new.key.service.name, "a");
    assert_eq!(ch.backends_added.len(), 1);
    assert_eq!(ch.backends_added[0].addr.to_string(), "10.0.0.3");
    assert_eq!(ch.backends_removed[0].addr.to_string(), "10.0.0.2");
    assert!(ch.frontends_added.is_empty() && ch.frontends_removed.is_empty());

    // ClusterIP moved: frontends change, backends do not.
    e.upsert_service(svc("b", "10.96.0.22"));
    let cs = e.sync();
    assert_eq!(cs.changed.len(), 1);
    assert_eq!(
        cs.changed[0].frontends_added[0].addr.to_string(),
        "10.96.0.22"
    );
    assert_eq!(
        cs.changed[0].frontends_removed[0].addr.to_string(),
        "10.96.0.2"
    );

    e.delete_service(&switchyard_model::ServiceKey::new("ns", "b"));
    let cs = e.sync();
    assert_eq!(cs.removed.len(), 1);
    assert_eq!(&*cs.removed[0].key.service.name, "b");
    assert_eq!(e.state().len(), 1);
}

#[test]
fn keys_name_every_touched_port_once() {
    let mut e = engine();
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_service(svc("b", "10.96.0.2"));
    e.sync();

    // One of each: c added, a changed, b removed.
    e.upsert_service(svc("c", "10.96.0.3"));
    e.upsert_slice(slice("a-1", "a", &["10.0.0.1"]));
    e.delete_service(&switchyard_model::ServiceKey::new("ns", "b"));
    let cs = e.sync();
    let names: Vec<&str> = cs.keys().map(|k| &*k.service.name).collect();
    assert_eq!(names, ["c", "a", "b"]);
    assert_eq!(cs.keys().count(), cs.len());
}

#[test]
fn changes_that_net_to_nothing_produce_nothing() {
    let mut e = engine();
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_slice(slice("a-1", "a", &["10.0.0.1"]));
    e.sync();

    // Same object again, and an add-then-remove between two syncs.
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_slice(slice("a-2", "a", &["10.0.0.9"]));
    e.delete_slice("ns", "a-2");
    assert!(e.sync().is_empty());

    // A relist that returns what we already hold.
    e.replace_all(
        vec![svc("a", "10.96.0.1")],
        vec![slice("a-1", "a", &["10.0.0.1"])],
    );
    assert!(e.sync().is_empty());
}

#[test]
fn relist_removes_what_was_deleted_while_away() {
    let mut e = engine();
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_service(svc("b", "10.96.0.2"));
    e.upsert_slice(slice("a-1", "a", &["10.0.0.1"]));
    e.sync();
    e.replace_all(vec![svc("a", "10.96.0.1")], vec![]);
    let cs = e.sync();
    assert_eq!(cs.removed.len(), 1);
    assert_eq!(cs.changed.len(), 1);
    assert_eq!(cs.changed[0].backends_removed.len(), 1);
}

#[test]
fn slice_moving_to_another_service_updates_both() {
    let mut e = engine();
    e.upsert_service(svc("a", "10.96.0.1"));
    e.upsert_service(svc("b", "10.96.0.2"));
    e.upsert_slice(slice("s", "a", &["10.0.0.1"]));
    e.sync();
    e.upsert_slice(slice("s", "b", &["10.0.0.1"]));
    let cs = e.sync();
    assert_eq!(cs.changed.len(), 2);
}

#[test]
fn sync_touches_only_dirty_services() {
    let mut e = engine();
    for i in 0..1000 {
        e.upsert_service(svc(
            &format!("s{i}"),
            &format!("10.96.{}.{}", i / 250, i % 250 + 1),
        ));
    }
    e.sync();
    e.upsert_slice(slice("s7-1", "s7", &["10.0.0.7"]));
    let cs = e.sync();
    assert_eq!(cs.len(), 1);
    assert_eq!(&*cs.changed[0].new.key.service.name, "s7");
}
