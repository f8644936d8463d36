//! The eBPF reconciler against in-memory maps: the exact writes for a ChangeSet, no
//! half-written backend set at any point, capacity errors naming the service, drift repair,
//! re-adoption after a restart, and recovery from a failed write. No root needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard::dataplane::ebpf::io::{Dump, FakeMaps, FaultyMaps, MapIo, Op};
use switchyard::dataplane::ebpf::render::RenderConfig;
use switchyard::dataplane::ebpf::writer::{Capacity, Checked, Globals, Writer};
use switchyard::dataplane::ebpf::{inspect, render};
use switchyard::source::manifests::ManifestDir;
use switchyard_ebpf_common::{Frontend4Key, Frontend6Key, SCOPE_EXTERNAL, SCOPE_INTERNAL, SlotKey};
use switchyard_model::fixtures::{self, Port};
use switchyard_model::plan::Plan;
use switchyard_model::{Engine, ProxyConfig, Selector, manifest};

fn cap() -> Capacity {
    Capacity {
        services: 1024,
        backends: 4096,
        slots: 1 << 18,
    }
}

fn writer<M: MapIo>(io: M) -> Writer<M> {
    Writer::new(
        io,
        RenderConfig::default(),
        cap(),
        Globals {
            masquerade_all: false,
            cluster_cidrs4: vec![(u32::from_ne_bytes([10, 244, 0, 0]), 16)],
            cluster_cidrs6: vec![],
        },
    )
}

fn examples_engine() -> Engine {
    let mut md = ManifestDir::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let (objs, errors) = md.load().unwrap();
    assert!(errors.is_empty());
    let cfg = ProxyConfig {
        node_name: "node-a".into(),
        ..ProxyConfig::default()
    };
    Engine::with_objects(cfg, objs)
}

/// Every frontend points at an existing set whose live slots all point at existing backends.
fn consistent(d: &Dump) -> Result<(), String> {
    let sets = d
        .frontends4
        .values()
        .map(|v| v.set_id)
        .chain(d.frontends6.values().map(|v| v.set_id));
    for set_id in sets {
        let set = d
            .sets
            .get(&set_id)
            .ok_or(format!("frontend -> missing set {set_id}"))?;
        for i in 0..set.count {
            let k = SlotKey {
                set_id,
                slot: set.slot_base + i,
            };
            let be = d
                .slots
                .get(&k)
                .ok_or(format!("set {set_id}: missing live slot {}", k.slot))?;
            d.backends
                .get(be)
                .ok_or(format!("slot -> missing backend {be}"))?;
        }
    }
    Ok(())
}

/// Replay `ops` from `start`, checking consistency after every single write.
fn replay_consistent(start: &Dump, ops: &[Op]) {
    let mut fake = FakeMaps {
        content: start.clone(),
        log: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        fake.write(op).unwrap();
        if let Err(e) = consistent(&fake.content) {
            panic!("after write {i} ({op:?}) a lookup could fail: {e}");
        }
    }
}

#[test]
fn maps_match_the_model_for_the_examples() {
    let e = examples_engine();
    let mut w = writer(FakeMaps::default());
    w.full_sync(e.state()).unwrap();
    let views = inspect::view(&w.io.content);
    let plan = Plan::build(&e, &Selector::default());
    // Every plan frontend is in the maps with the backends (or verdict) the plan shows.
    let mut checked = 0;
    for p in &plan.service_ports {
        for f in &p.frontends {
            let fe = if f.address.contains(':') {
                format!("[{}]:{}", f.address, f.port)
            } else {
                format!("{}:{}", f.address, f.port)
            };
            let (scope, route) = if f.kind == "ClusterIP" {
                ("internal", &p.internal)
            } else {
                ("external", p.external.as_ref().unwrap())
            };
            let v = views
                .iter()
                .find(|v| v.frontend == fe && v.protocol == p.protocol && v.scope == scope)
                .unwrap_or_else(|| panic!("{fe}/{} {scope} not in the maps", p.protocol));
            assert_eq!(v.action, route.action, "{fe}");
            assert_eq!(v.backends, route.backends, "{fe}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
    consistent(&w.io.content).unwrap();
    // The tc path looks a packet's destination up in the external scope first and leaves
    // on a miss: every frontend has an external entry, except the socket LB's loopback
    // NodePorts (which the tc path must not serve).
    let d = &w.io.content;
    let mut internal = 0;
    for k in d.frontends4.keys().filter(|k| k.scope == SCOPE_INTERNAL) {
        let ip = std::net::Ipv4Addr::from(k.addr.to_ne_bytes());
        let ext = Frontend4Key {
            scope: SCOPE_EXTERNAL,
            ..*k
        };
        assert_eq!(
            d.frontends4.contains_key(&ext),
            !ip.is_loopback(),
            "{ip}:{}",
            u16::from_be(k.port)
        );
        internal += 1;
    }
    for k in d.frontends6.keys().filter(|k| k.scope == SCOPE_INTERNAL) {
        let ext = Frontend6Key {
            scope: SCOPE_EXTERNAL,
            ..*k
        };
        let loopback = k.addr == render::addr6(std::net::Ipv6Addr::LOCALHOST);
        assert_eq!(d.frontends6.contains_key(&ext), !loopback, "{k:?}");
        internal += 1;
    }
    assert!(internal >= 12, "{internal}");
    // The affinity service carries its timeout; eTP=Local's external key keeps the client.
    let cart = views
        .iter()
        .find(|v| v.frontend == "10.96.10.20:80")
        .unwrap();
    assert!(
        cart.options.contains(&"affinity=30s".to_string()),
        "{cart:?}"
    );
    let catalog_ext = views
        .iter()
        .find(|v| v.frontend == "172.30.0.10:30030" && v.scope == "external")
        .unwrap();
    assert!(!catalog_ext.options.contains(&"masquerade".to_string()));
    let frontend_ext = views
        .iter()
        .find(|v| v.frontend == "172.30.0.100:80" && v.scope == "external")
        .unwrap();
    assert!(frontend_ext.options.contains(&"masquerade".to_string()));
    assert!(
        frontend_ext
            .options
            .contains(&"sourceRanges=172.30.0.0/16,192.0.2.0/24".to_string()),
        "{frontend_ext:?}"
    );
}

fn svc_yaml(backends: &[&str], extra: &str) -> String {
    let eps: Vec<(&str, Option<&str>)> = backends.iter().map(|b| (*b, None)).collect();
    fixtures::service("t", "web", "10.96.0.10", &[Port::tcp("http", 80)])
        + extra
        + &fixtures::slice("t", "web", "web-1", &[Port::tcp("http", 8080)], &eps)
}

/// A second service, t/api, with one endpoint (10.244.0.9:8080).
fn api_yaml() -> String {
    fixtures::service("t", "api", "10.96.0.11", &[Port::tcp("http", 80)])
        + &fixtures::slice(
            "t",
            "api",
            "api-1",
            &[Port::tcp("http", 8080)],
            &[("10.244.0.9", None)],
        )
}

fn load(e: &mut Engine, yaml: &str) -> switchyard_model::ChangeSet {
    let objs = manifest::parse("t", yaml).unwrap();
    e.replace_all(objs.services, objs.slices);
    e.sync()
}

#[test]
fn replacing_a_backend_set_never_exposes_a_half_written_set() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = writer(FakeMaps::default());
    let cs = load(
        &mut e,
        &svc_yaml(&["10.244.0.1", "10.244.0.2", "10.244.0.3"], ""),
    );
    w.apply(&cs, e.state()).unwrap();
    let before = w.io.content.clone();
    let n = w.io.log.len();

    // One backend replaced, one added.
    let cs = load(
        &mut e,
        &svc_yaml(
            &["10.244.0.1", "10.244.0.3", "10.244.0.4", "10.244.0.5"],
            "",
        ),
    );
    w.apply(&cs, e.state()).unwrap();
    let ops = w.io.log[n..].to_vec();
    replay_consistent(&before, &ops);

    // The exact writes: new backends, the new slot half, one flip, the old half deleted, the
    // departed backend deleted; the frontends are untouched.
    let kinds: Vec<&str> = ops
        .iter()
        .map(|o| match o {
            Op::PutBackend(..) => "put-backend",
            Op::PutSlot(..) => "put-slot",
            Op::PutSet(..) => "flip",
            Op::DelSlot(..) => "del-slot",
            Op::DelBackend(..) => "del-backend",
            Op::PutFrontend4(..) => "put-frontend",
            other => panic!("unexpected write {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "put-backend",
            "put-backend", // .4 and .5
            "put-slot",
            "put-slot",
            "put-slot",
            "put-slot", // new half
            "flip",
            "del-slot",
            "del-slot",
            "del-slot",    // old half
            "del-backend", // .2
        ]
    );
    let v = inspect::view(&w.io.content);
    assert_eq!(
        v[0].backends,
        [
            "10.244.0.1:8080",
            "10.244.0.3:8080",
            "10.244.0.4:8080",
            "10.244.0.5:8080"
        ]
    );

    // A change that nets to nothing writes nothing.
    let n = w.io.log.len();
    let cs = load(
        &mut e,
        &svc_yaml(
            &["10.244.0.1", "10.244.0.3", "10.244.0.4", "10.244.0.5"],
            "",
        ),
    );
    w.apply(&cs, e.state()).unwrap();
    assert_eq!(w.io.log.len(), n);

    // Removing the service removes every entry.
    let cs = load(&mut e, "");
    w.apply(&cs, e.state()).unwrap();
    let d = &w.io.content;
    assert!(
        d.frontends4.is_empty() && d.sets.is_empty() && d.slots.is_empty() && d.backends.is_empty(),
        "{d:?}"
    );
}

#[test]
fn capacity_overflow_names_the_service_and_keeps_the_rest() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = Writer::new(
        FakeMaps::default(),
        RenderConfig::default(),
        Capacity {
            services: 16,
            backends: 3,
            slots: 1024,
        },
        Globals::default(),
    );
    let cs = load(&mut e, &svc_yaml(&["10.244.0.1", "10.244.0.2"], ""));
    w.apply(&cs, e.state()).unwrap();
    // Growing to 4 backends exceeds the backend capacity of 3.
    let cs = load(
        &mut e,
        &svc_yaml(
            &["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"],
            "",
        ),
    );
    let r = w.apply(&cs, e.state()).unwrap();
    assert_eq!(r.capacity_errors.len(), 1);
    assert_eq!(r.capacity_errors[0].service_port, "t/web:http/TCP IPv4");
    assert!(
        r.capacity_errors[0]
            .reason
            .contains("backend capacity 3 exhausted (raise maxBackends)")
    );
    // The last good state stays programmed.
    let v = inspect::view(&w.io.content);
    assert_eq!(v[0].backends, ["10.244.0.1:8080", "10.244.0.2:8080"]);
    // Shrinking back fits again (nothing leaked from the failed attempt).
    let cs = load(
        &mut e,
        &svc_yaml(&["10.244.0.1", "10.244.0.2", "10.244.0.3"], ""),
    );
    let r = w.apply(&cs, e.state()).unwrap();
    assert!(r.capacity_errors.is_empty(), "{r:?}");
}

/// A log sink for one test: what `tracing` writes while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let out = sink.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || out.clone())
        .finish();
    tracing::subscriber::with_default(sub, f);
    String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn many_services_beyond_capacity_log_a_few_lines_and_one_summary() {
    // 40 services, room for 15 (16 ids, 0 unused): 25 cannot be programmed. An operator at 100k services with
    // maps for 64k must not get one ERROR line per service.
    let yaml: String = (0..40)
        .map(|i| {
            let name = format!("s{i}");
            fixtures::service(
                "t",
                &name,
                &format!("10.96.1.{i}"),
                &[Port::tcp("http", 80)],
            ) + &fixtures::slice(
                "t",
                &name,
                &format!("{name}-1"),
                &[Port::tcp("http", 8080)],
                &[(&*format!("10.244.1.{i}"), None)],
            )
        })
        .collect();
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = Writer::new(
        FakeMaps::default(),
        RenderConfig::default(),
        Capacity {
            services: 16,
            backends: 1024,
            slots: 1 << 14,
        },
        Globals::default(),
    );
    let cs = load(&mut e, &yaml);
    let mut r = None;
    let log = logged(|| r = Some(w.apply(&cs, e.state()).unwrap()));
    let r = r.unwrap();
    assert_eq!(r.capacity_errors.len(), 25, "{r:?}");
    assert_eq!(w.unprogrammed().len(), 25);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        lines.len(),
        11,
        "10 ports one by one, then one summary:\n{log}"
    );
    let summary = lines[10];
    assert!(
        summary.contains("cannot program 15 more service ports")
            && summary.contains("raise maxServices")
            && summary.contains("total_unprogrammed=25"),
        "{summary}"
    );
    // The same ports still not fitting on the next full sync are not logged again.
    let log = logged(|| {
        w.full_sync(e.state()).unwrap();
    });
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn full_sync_repairs_drift_and_a_restart_adopts_without_writes() {
    let e = examples_engine();
    let mut w = writer(FakeMaps::default());
    w.full_sync(e.state()).unwrap();
    let good = w.io.content.clone();

    // Someone deletes a frontend, corrupts a set and adds a stray backend.
    let k = *good.frontends4.keys().next().unwrap();
    w.io.content.frontends4.remove(&k);
    let (sid, mut sv) = good.sets.iter().next().map(|(a, b)| (*a, *b)).unwrap();
    sv.count = 0;
    w.io.content.sets.insert(sid, sv);
    w.io.content
        .backends
        .insert(4000, good.backends.values().next().copied().unwrap());
    w.full_sync(e.state()).unwrap();
    consistent(&w.io.content).unwrap();
    assert_eq!(inspect::view(&w.io.content), inspect::view(&good));
    assert!(!w.io.content.backends.contains_key(&4000));

    // A new process over the same (pinned) maps adopts the ids and writes nothing.
    let mut w2 = writer(FakeMaps {
        content: w.io.content.clone(),
        log: Vec::new(),
    });
    let r = w2.full_sync(e.state()).unwrap();
    assert_eq!(r.writes, 0, "{:?}", w2.io.log);
    assert_eq!(w2.io.content, w.io.content);
}

#[test]
fn a_failed_write_is_repaired_by_the_next_full_sync() {
    let e = examples_engine();
    let mut w = writer(FaultyMaps::new(FakeMaps::default(), vec![7]));
    assert!(w.full_sync(e.state()).is_err());
    w.full_sync(e.state()).unwrap();
    let mut clean = writer(FakeMaps::default());
    clean.full_sync(e.state()).unwrap();
    assert_eq!(
        inspect::view(&w.io.inner.content),
        inspect::view(&clean.io.content)
    );
    consistent(&w.io.inner.content).unwrap();
}

#[test]
fn maglev_sets_fill_the_table_and_keep_surviving_backends_in_place() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = writer(FakeMaps::default());
    let maglev = "  \n";
    let yaml = |bs: &[&str]| {
        svc_yaml(bs, maglev).replace(
            "metadata: {name: web, namespace: t}",
            "metadata: {name: web, namespace: t, annotations: {switchyard.io/lb-algorithm: maglev}}",
        )
    };
    let cs = load(
        &mut e,
        &yaml(&["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"]),
    );
    w.apply(&cs, e.state()).unwrap();
    let set = *w.io.content.sets.values().next().unwrap();
    assert_eq!(set.count, 16_381);
    let table = |d: &Dump| -> Vec<String> {
        let s = d.sets.values().next().unwrap();
        (0..s.count)
            .map(|i| {
                let id = d.slots[&SlotKey {
                    set_id: *d.sets.keys().next().unwrap(),
                    slot: s.slot_base + i,
                }];
                let b = d.backends[&id];
                format!("{:?}", b.addr)
            })
            .collect()
    };
    let before = table(&w.io.content);
    let removed = format!(
        "{:?}",
        switchyard::dataplane::ebpf::render::backend_value(
            0,
            6,
            &switchyard_model::Backend {
                addr: "10.244.0.2".parse().unwrap(),
                port: 8080,
                local: false,
                terminating: false,
            }
        )
        .addr
    );
    let cs = load(&mut e, &yaml(&["10.244.0.1", "10.244.0.3", "10.244.0.4"]));
    w.apply(&cs, e.state()).unwrap();
    let after = table(&w.io.content);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != removed && b != a)
        .count();
    assert!(
        moved * 100 < before.len(),
        "{moved} entries of surviving backends moved"
    );
    assert!(!after.contains(&removed));
}

/// Endpoint churn releases what it no longer uses: more replacements than the backend map
/// holds, each programmed, and the maps stay consistent with only the live backends.
#[test]
fn endpoint_churn_beyond_the_backend_capacity_releases_every_replaced_backend() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = writer(FakeMaps::default());
    for i in 0..5000u32 {
        let a = format!("10.244.{}.{}", i / 250, i % 250 + 1);
        let b = format!("10.245.{}.{}", i / 250, i % 250 + 1);
        let cs = load(&mut e, &svc_yaml(&["10.244.255.1", &a, &b], ""));
        let r = w.apply(&cs, e.state()).unwrap();
        assert!(
            r.capacity_errors.is_empty(),
            "change {i}: {:?}",
            r.capacity_errors
        );
    }
    consistent(&w.io.content).unwrap();
    assert_eq!(
        w.io.content.backends.len(),
        3,
        "{:?}",
        w.io.content.backends
    );
}

/// A periodic full sync reads the maps without the writer while changes keep landing, then
/// syncs from that read: the writes made meanwhile are replayed onto it, so a set flipped to
/// its other slot half in between is not flipped back onto deleted slots, and the result is
/// exactly what a full sync reading the maps at that moment would leave (nothing to fix).
#[test]
fn a_full_sync_from_an_earlier_read_keeps_the_changes_made_meanwhile() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = writer(FakeMaps::default());
    let cs = load(&mut e, &svc_yaml(&["10.244.0.1", "10.244.0.2"], ""));
    w.apply(&cs, e.state()).unwrap();
    w.full_sync(e.state()).unwrap();

    for stale_journal in [false, true] {
        let journal = w.start_journal();
        let read = w.io.content.clone();
        // Meanwhile: a backend replaced (the set flips to its other half, the old half is
        // deleted) and a second service added.
        let cs = load(
            &mut e,
            &(svc_yaml(&["10.244.0.1", "10.244.0.3"], "") + &api_yaml()),
        );
        w.apply(&cs, e.state()).unwrap();
        let programmed = w.io.content.clone();
        let n = w.io.log.len();
        let id = if stale_journal {
            // A full sync ran in between: that read is dropped and the maps read again.
            w.full_sync(e.state()).unwrap();
            journal
        } else {
            journal
        };
        let r = w.full_sync_prepared(e.state(), id, read).unwrap();
        assert_eq!(r.writes, 0, "{:?}", &w.io.log[n..]);
        assert_eq!(w.io.content, programmed);
        consistent(&w.io.content).unwrap();
        let v = inspect::view(&w.io.content);
        assert!(
            v.iter()
                .any(|p| p.backends == ["10.244.0.1:8080", "10.244.0.3:8080"]),
            "{v:?}"
        );
        // Back to the first state for the next round.
        let cs = load(&mut e, &svc_yaml(&["10.244.0.1", "10.244.0.2"], ""));
        w.apply(&cs, e.state()).unwrap();
    }
}

/// A periodic full sync that compares its read with what is programmed, without the writer:
/// when the maps hold what was programmed, the check says so although changes landed
/// between the read, the snapshot and the end, and the end programs only the changes since
/// the last sync (what a full sync would write for them, and nothing else).
#[test]
fn a_periodic_check_of_maps_as_programmed_ends_with_only_the_changes() {
    let mut e = Engine::new(ProxyConfig::default());
    let mut w = writer(FakeMaps::default());
    let cs = load(&mut e, &svc_yaml(&["10.244.0.1", "10.244.0.2"], ""));
    w.apply(&cs, e.state()).unwrap();
    w.full_sync(e.state()).unwrap();

    let journal = w.start_journal();
    let read = w.io.content.clone();
    // Between the read and the snapshot: a backend replaced (its set flips halves).
    let cs = load(&mut e, &svc_yaml(&["10.244.0.1", "10.244.0.3"], ""));
    w.apply(&cs, e.state()).unwrap();
    let snapshot = w.snapshot(journal).expect("a current read");
    // Between the snapshot and the check's end: another flip, programmed as usual.
    let cs = load(&mut e, &svc_yaml(&["10.244.0.4", "10.244.0.3"], ""));
    w.apply(&cs, e.state()).unwrap();
    let checked = snapshot.check(read);
    assert!(matches!(checked, Checked::Clean { .. }), "{checked:?}");

    // The changes not yet programmed when the check ends: a second service.
    let cs = load(
        &mut e,
        &svc_yaml(&["10.244.0.4", "10.244.0.3"], &api_yaml()),
    );
    assert_eq!(cs.added.len(), 1);
    let n = w.io.log.len();
    let (r, clean) = w.full_sync_checked(e.state(), &cs, checked).unwrap();
    assert!(clean);
    let written = &w.io.log[n..];
    assert_eq!(r.writes, written.len());
    // Backend, set (slots + flip), frontend of the new service; nothing of the old one.
    assert!(!written.is_empty() && written.len() <= 6, "{written:?}");
    consistent(&w.io.content).unwrap();
    let programmed = w.io.content.clone();
    let r = w.full_sync(e.state()).unwrap();
    assert_eq!(
        r.writes,
        0,
        "a full sync found more to do: {:?}",
        &w.io.log[n..]
    );
    assert_eq!(w.io.content, programmed);
    let v = inspect::view(&w.io.content);
    assert!(
        v.iter()
            .any(|p| p.backends == ["10.244.0.3:8080", "10.244.0.4:8080"]),
        "{v:?}"
    );
    assert!(v.iter().any(|p| p.backends == ["10.244.0.9:8080"]), "{v:?}");
}

/// Drift in the maps (an entry removed, one corrupted, one stray, or a set moved to its
/// other slot half by hand) is found by the check, and the end repairs it with a full sync
/// from the read; a read made stale by a full sync in between gets no snapshot.
#[test]
fn a_periodic_check_finds_drift_and_the_full_sync_repairs_it() {
    type Tamper = fn(&mut Dump);
    let e = examples_engine();
    let tampers: [(&str, Tamper); 4] = [
        ("frontend removed", |d| {
            let k = *d.frontends4.keys().next().unwrap();
            d.frontends4.remove(&k);
        }),
        ("set emptied", |d| {
            let (id, mut v) = d.sets.iter().map(|(a, b)| (*a, *b)).next().unwrap();
            v.count = 0;
            d.sets.insert(id, v);
        }),
        ("stray backend", |d| {
            let v = d.backends.values().next().copied().unwrap();
            d.backends.insert(4000, v);
        }),
        ("set moved to its other half", |d| {
            let (id, mut v) = d
                .sets
                .iter()
                .map(|(a, b)| (*a, *b))
                .find(|(_, v)| v.count > 0)
                .unwrap();
            let other = if v.slot_base == switchyard_ebpf_common::SLOT_BASE_A {
                switchyard_ebpf_common::SLOT_BASE_B
            } else {
                switchyard_ebpf_common::SLOT_BASE_A
            };
            for i in 0..v.count {
                let be = d
                    .slots
                    .remove(&SlotKey {
                        set_id: id,
                        slot: v.slot_base + i,
                    })
                    .unwrap();
                d.slots.insert(
                    SlotKey {
                        set_id: id,
                        slot: other + i,
                    },
                    be,
                );
            }
            v.slot_base = other;
            d.sets.insert(id, v);
        }),
    ];
    for (what, tamper) in tampers {
        let mut w = writer(FakeMaps::default());
        w.full_sync(e.state()).unwrap();
        let good = w.io.content.clone();
        tamper(&mut w.io.content);

        let journal = w.start_journal();
        let read = w.io.content.clone();
        let checked = w.snapshot(journal).unwrap().check(read);
        assert!(
            matches!(checked, Checked::Drift { .. }),
            "{what}: {checked:?}"
        );
        let (_, clean) = w
            .full_sync_checked(e.state(), &switchyard_model::ChangeSet::default(), checked)
            .unwrap();
        assert!(!clean, "{what}");
        consistent(&w.io.content).unwrap();
        assert_eq!(inspect::view(&w.io.content), inspect::view(&good), "{what}");
        let n = w.io.log.len();
        assert_eq!(
            w.full_sync(e.state()).unwrap().writes,
            0,
            "{what}: {:?}",
            &w.io.log[n..]
        );
        assert!(!w.io.content.backends.contains_key(&4000), "{what}");
    }

    let mut w = writer(FakeMaps::default());
    w.full_sync(e.state()).unwrap();
    let journal = w.start_journal();
    w.full_sync(e.state()).unwrap();
    assert!(w.snapshot(journal).is_none(), "a stale read was checked");
}
