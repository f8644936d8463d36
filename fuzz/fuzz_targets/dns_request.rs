//! The DNS request path both transports share: decode, resolve against a cluster zone
//! (ClusterIP, headless with hostnames, ExternalName, pod records), encode; FORMERR for what
//! does not decode. The first byte picks the framing: UDP (one datagram) or TCP (a stream of
//! 2-byte length-prefixed messages). Whatever the server sends must decode.
#![no_main]

use std::sync::LazyLock;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use switchyard_dns::fast::{encode, formerr};
use switchyard_dns::resolve::{Outcome, resolve};
use switchyard_dns::{PodsMode, Snapshot, ZoneConfig};
use switchyard_model::engine::Engine;
use switchyard_model::{ProxyConfig, manifest};

const ZONE: &str = include_str!("../corpus-zone.yaml");

static SNAP: LazyLock<Snapshot> = LazyLock::new(|| {
    let objs = manifest::parse("zone", ZONE).expect("the fuzz zone parses");
    let e = Engine::with_objects(ProxyConfig::default(), objs);
    Snapshot::build(
        ZoneConfig {
            zone: "cluster.local".into(),
            ttl: 5,
            pods: PodsMode::Insecure,
        },
        e.services().map(AsRef::as_ref),
        |s| e.slices_of(&s.key).map(AsRef::as_ref).collect(),
        1,
    )
});

fn handle(raw: &[u8]) {
    let req = match Message::from_vec(raw) {
        Ok(m) if m.metadata.message_type == MessageType::Query => m,
        _ => {
            if let Some(out) = formerr(raw) {
                Message::from_vec(&out).expect("our FORMERR decodes");
            }
            return;
        }
    };
    if let Outcome::Answer(resp) = resolve(&SNAP, &req)
        && let Some(out) = encode(&req, *resp)
    {
        let back = Message::from_vec(&out).expect("what we send decodes");
        assert_eq!(
            back.metadata.id, req.metadata.id,
            "the answer carries the query's id"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        handle(rest);
        return;
    }
    let mut rest = rest;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let Some(frame) = rest.get(2..2 + len) else {
            return;
        };
        handle(frame);
        rest = &rest[2 + len..];
    }
});
