//! Manifest text to the model: YAML documents to Services, EndpointSlices and the Node, then
//! the desired state the backends program and the DNS zone built from it. Bad documents are
//! errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_dns::{PodsMode, Snapshot, ZoneConfig};
use switchyard_model::engine::Engine;
use switchyard_model::{ProxyConfig, manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objs) = manifest::parse("fuzz", text) else {
        return;
    };
    let e = Engine::with_objects(ProxyConfig::default(), objs);
    let _ = e.state().len();
    let _ = Snapshot::build(
        ZoneConfig {
            zone: "cluster.local".into(),
            ttl: 5,
            pods: PodsMode::Insecure,
        },
        e.services().map(AsRef::as_ref),
        |s| e.slices_of(&s.key).map(AsRef::as_ref).collect(),
        1,
    );
});
