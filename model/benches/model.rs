//! `cargo xtask bench model`: the full desired-state build for 10k services × 10 endpoints
//! against the ChangeSet for one endpoint change at that size, in one run.
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use switchyard_model::{Engine, ProxyConfig, synthetic};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn engine() -> Engine {
    Engine::new(ProxyConfig {
        node_name: "node-0".into(),
        ..ProxyConfig::default()
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

fn main() {
    let (services, slices) = synthetic::cluster(SERVICES, ENDPOINTS);

    // Full build: every object into a fresh engine and the first sync.
    let mut full = Vec::new();
    let mut e = engine();
    for _ in 0..5 {
        let (svcs, sl) = (services.clone(), slices.clone());
        e = engine();
        let t = Instant::now();
        e.replace_all(svcs, sl);
        let cs = e.sync();
        full.push(t.elapsed());
        assert_eq!(cs.added.len(), SERVICES as usize);
    }
    let full_p50 = percentile(&mut full, 0.5);

    // One endpoint of one service changes: event in, ChangeSet out.
    let mut one = Vec::new();
    for round in 0..2000u32 {
        let i = (round * 7919) % SERVICES;
        let mut s = synthetic::slice(i, ENDPOINTS);
        s.endpoints[3].address = ip(0x0b00_0000 + round);
        let t = Instant::now();
        e.upsert_slice(s);
        let cs = e.sync();
        one.push(t.elapsed());
        assert_eq!(cs.changed.len(), 1);
        assert_eq!(cs.changed[0].backends_added.len(), 1);
    }
    let one_p50 = percentile(&mut one, 0.5);
    let one_p99 = percentile(&mut one, 0.99);

    println!("model benchmark: {SERVICES} services x {ENDPOINTS} endpoints (one port each)");
    println!("| work | time | ratio to full build |");
    println!("|---|---|---|");
    println!(
        "| full desired-state build (p50 of 5) | {:.1} ms | 1 |",
        full_p50.as_secs_f64() * 1e3
    );
    println!(
        "| one-endpoint ChangeSet p50 (2000 changes) | {:.1} µs | 1/{:.0} |",
        one_p50.as_secs_f64() * 1e6,
        full_p50.as_secs_f64() / one_p50.as_secs_f64()
    );
    println!(
        "| one-endpoint ChangeSet p99 | {:.1} µs | 1/{:.0} |",
        one_p99.as_secs_f64() * 1e6,
        full_p50.as_secs_f64() / one_p99.as_secs_f64()
    );
}
