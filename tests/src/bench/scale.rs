//! `cargo xtask bench scale` (root): the eBPF backend at 1k / 10k / 100k services × 10
//! endpoints, each figure beside its peer measured in the same run, in one table.
//!
//! Per size, in fresh namespaces (the daemon with its default settings, DNS on):
//! - cold start: from the first request to the fake API server (list + watch) to the first
//!   sync landing (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`), and from the spawn
//!   of a daemon reading the same cluster as manifests; peers: as many raw single and batched
//!   BPF hash-map updates as the daemon wrote entries (shared/peers/bpf_map_bench.c's ns/op),
//!   and kube-proxy's iptables-legacy restore of the same cluster (300 s limit);
//! - one endpoint change: from the change reaching the fake API server (which sends the watch
//!   event at once) to the new backend being in the maps, found by point lookups of the
//!   service's frontend, the changes spread over 36 s so that a periodic full sync (default
//!   syncPeriod 30 s) falls among them; beside it
//!   `kubeproxy_network_programming_duration_seconds` over the same changes;
//! - resident memory (VmRSS and its anonymous part) after the cold start and after churn (1%
//!   of the slices changing per minute, 10 minutes by default);
//! - DNS QPS of the cluster zone vs Knot serving the same zone (dnsperf);
//! - new connections/s to the last-added service through the tc path and the socket LB vs the
//!   endpoint addressed directly.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchyard::dataplane::ebpf::io::AyaMaps;
use switchyard::dataplane::ebpf::render::addr4;
use switchyard_ebpf_common::{Frontend4Key, SCOPE_INTERNAL};
use switchyard_tests::fake_api::{FakeApi, Resource};
use switchyard_tests::sandbox::{http_get_in, in_netns};

use super::{
    CLUSTER_CIDR, DnsServers, PEER_TIMEOUT, PeerService, Topo, conn_rows, dns_servers, dnsperf,
    dnsperf_p99, kube_proxy_restore, map_capacity, pct, peer_model_manifests, peer_service,
    wait_idle,
};

const METRICS: &str = "127.0.0.1:10249";
const API_PORT: u16 = 6443;

struct Opts {
    /// shared/peers is beside the checkout (the peers' programs and generators).
    peers: bool,
    /// Only the API server part: cold start, one change, churn (quick re-measurements).
    api_only: bool,
    sizes: Vec<u32>,
    churn: Duration,
    changes: u32,
    secs: u32,
    /// Rounds of the connection-rate measurement (median reported).
    conn_reps: u32,
}

/// One line of the table.
struct Row {
    figure: &'static str,
    n: u32,
    ours: String,
    peer: String,
    ratio: String,
    goal: String,
}

const NO_PEERS: &str = "n/a: ../shared/peers missing";

/// Changes made after a cold start before the measured ones.
const WARMUP: u32 = 10;

/// The daemon's own receipt-to-programmed histogram.
const DAEMON_PART: &str = "switchyard_change_to_programmed_seconds";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    // CI's smoke run: every figure at 1k, briefly, without waiting for an idle machine.
    let smoke = args.iter().any(|a| a == "--smoke");
    let quick = smoke || args.iter().any(|a| a == "--quick");
    if smoke {
        super::SMOKE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let peers = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/peers")
        .exists();
    if !peers && !smoke {
        bail!("../shared/peers is missing beside the checkout: every figure needs its peer");
    }
    let arg = |name: &str| args.iter().find_map(|a| a.strip_prefix(name));
    let sizes = match arg("--sizes=") {
        Some(list) => list
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("--sizes=N,N,...")?,
        None if quick => vec![1000],
        None => vec![1000, 10_000, 100_000],
    };
    let churn_secs: u64 = match arg("--churn-secs=") {
        Some(v) => v.parse().context("--churn-secs=SECONDS")?,
        None if smoke => 2,
        None if quick => 20,
        None => 600,
    };
    let opts = Opts {
        peers,
        api_only: args.iter().any(|a| a == "--api-only"),
        sizes,
        churn: Duration::from_secs(churn_secs),
        changes: match arg("--changes=") {
            Some(v) => v.parse().context("--changes=N")?,
            None if smoke => 20,
            None if quick => 50,
            None => 200,
        },
        secs: if smoke {
            1
        } else if quick {
            3
        } else {
            8
        },
        conn_reps: match arg("--conn-reps=") {
            Some(v) => v.parse().context("--conn-reps=N")?,
            None if quick => 1,
            None => 3,
        },
    };
    let floor = if peers { Some(bpf_floor()?) } else { None };
    if let Some(floor) = floor {
        eprintln!(
            "BPF floor (shared/peers/bpf_map_bench.c, prealloc hash map): single update {:.0} ns, batched {:.0} ns per entry",
            floor.0, floor.1
        );
    }
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        let start = Instant::now();
        let r = size(n, &opts, floor)?;
        eprintln!(
            "{n} services measured in {:.0} s:",
            start.elapsed().as_secs_f64()
        );
        for row in &r {
            eprintln!("  {}", line(row));
        }
        rows.extend(r);
    }
    println!(
        "\n### Scale: N services × 10 endpoints, eBPF backend, default settings (churn {} s at 1% of slices per minute)\n",
        opts.churn.as_secs()
    );
    println!("| figure | N | Switchyard | peer, same run | Switchyard / peer | goal |");
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", line(row));
    }
    Ok(())
}

fn line(r: &Row) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} |",
        r.figure, r.n, r.ours, r.peer, r.ratio, r.goal
    )
}

/// ns per entry of single `BPF_MAP_UPDATE_ELEM` inserts and of `BPF_MAP_UPDATE_BATCH`
/// (batches of 1024), medians of the peer program's runs.
fn bpf_floor() -> anyhow::Result<(f64, f64)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/bpf_map_bench.c");
    if !src.exists() {
        bail!(
            "{} is missing: the BPF floor is the peer of the cold start",
            src.display()
        );
    }
    let work = tempfile::tempdir()?;
    let exe = work.path().join("bpf_map_bench");
    let out = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .context("gcc (for shared/peers/bpf_map_bench.c)")?;
    if !out.status.success() {
        bail!(
            "building bpf_map_bench.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(&exe).arg("3").output()?;
    let txt = String::from_utf8_lossy(&out.stdout);
    let median = |case: &str| -> anyhow::Result<f64> {
        txt.lines()
            .find(|l| l.starts_with(case))
            .and_then(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .with_context(|| format!("no `{case}` in bpf_map_bench output:\n{txt}"))
    };
    Ok((
        median("prealloc single UPDATE_ELEM insert")?,
        median("prealloc UPDATE_BATCH(batch=1024) insert")?,
    ))
}

fn service_json(p: &PeerService) -> Value {
    let mut port =
        json!({"name": p.port_name, "port": p.port, "targetPort": p.port, "protocol": "TCP"});
    let ty = match p.node_port {
        Some(np) => {
            port["nodePort"] = json!(np);
            "NodePort"
        }
        None => "ClusterIP",
    };
    json!({
        "metadata": {"name": p.name, "namespace": p.ns},
        "spec": {"type": ty, "clusterIP": p.vip.to_string(), "clusterIPs": [p.vip.to_string()],
                 "ipFamilies": ["IPv4"], "ports": [port]}
    })
}

fn slice_json(p: &PeerService, eps: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| json!({"addresses": [e.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "metadata": {"name": format!("{}-abcde", p.name), "namespace": p.ns,
                     "labels": {"kubernetes.io/service-name": p.name}},
        "addressType": "IPv4",
        "ports": [{"name": p.port_name, "port": p.port, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// The daemon's config: defaults, but for the addresses of this sandbox and maps sized for
/// `n` services (the defaults hold 65 536 services and 1 Mi backends).
fn config(tag: &str, n: u32) -> String {
    format!(
        "clusterCIDR: {CLUSTER_CIDR}\nhealthzBindAddress: ''\nmetricsBindAddress: {METRICS}\nbpfPinDir: /sys/fs/bpf/{tag}\n{}",
        map_capacity(n)
    )
}

fn scrape(t: &Topo) -> anyhow::Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    Ok(http_get_in(&t.node(), addr, "/metrics"))
}

/// The value of an unlabelled series, or the sum of a labelled one's series.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `kubeproxy_network_programming_duration_seconds`: (count, sum, cumulative buckets).
fn programming_histogram(text: &str) -> (f64, f64, Vec<(f64, f64)>) {
    histogram(text, "kubeproxy_network_programming_duration_seconds")
}

/// A histogram's (count, sum, cumulative buckets) from a scrape.
fn histogram(text: &str, h: &str) -> (f64, f64, Vec<(f64, f64)>) {
    let buckets = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(h)?.strip_prefix("_bucket{le=\"")?;
            let (le, v) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect();
    (
        metric(text, &format!("{h}_count")),
        metric(text, &format!("{h}_sum")),
        buckets,
    )
}

/// The upper bound of the bucket holding quantile `q` of what was observed between two
/// scrapes of one histogram.
fn bucket_quantile(
    before: &(f64, f64, Vec<(f64, f64)>),
    after: &(f64, f64, Vec<(f64, f64)>),
    q: f64,
) -> f64 {
    let count = after.0 - before.0;
    after
        .2
        .iter()
        .zip(before.2.iter())
        .find(|((_, a), (_, b))| a - b >= q * count)
        .map_or(f64::INFINITY, |((le, _), _)| *le)
}

fn log_tail(t: &Topo) -> String {
    let log = std::fs::read_to_string(t.work.path().join("daemon.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Wait until the daemon has programmed `n` service ports; the time its first such sync
/// landed (Unix seconds, from its own metric).
fn wait_programmed(t: &mut Topo, n: u32) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let m = scrape(t)?;
        let last = metric(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        if metric(&m, "switchyard_service_ports") >= f64::from(n) && last > 0.0 {
            return Ok(last);
        }
        if let Some(d) = t.daemon.as_mut()
            && let Some(status) = d.try_wait()?
        {
            bail!(
                "the daemon exited ({status}) before programming {n} services:\n{}",
                log_tail(t)
            );
        }
        if start.elapsed() > Duration::from_mins(15) {
            bail!("{n} services not programmed in 15 min:\n{}", log_tail(t));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// (VmRSS, RssAnon) in MiB.
fn rss(t: &Topo) -> anyhow::Result<(f64, f64)> {
    let pid = t.daemon.as_ref().context("no daemon")?.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((kib("VmRSS:") / 1024.0, kib("RssAnon:") / 1024.0))
}

/// Wait until `addr` is among the backends of the service's frontend; the time it took.
fn until_backend(
    maps: &AyaMaps,
    p: &PeerService,
    addr: Ipv4Addr,
    since: Instant,
) -> anyhow::Result<Duration> {
    let key = Frontend4Key {
        addr: addr4(p.vip),
        port: p.port.to_be(),
        proto: 6,
        scope: SCOPE_INTERNAL,
    };
    let want = addr4(addr);
    loop {
        if maps
            .backends_of4(&key)?
            .is_some_and(|b| b.iter().any(|b| b.addr[0] == want))
        {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(10) {
            bail!("{addr} not in the maps for {}/{} after 10 s", p.ns, p.name);
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// p50, p99 and max of `v`.
fn quantiles(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    let max = v.iter().max().copied().unwrap_or_default();
    (pct(v, 0.5), pct(v, 0.99), max)
}

/// `p50 / p99 / max µs`.
fn micros3((a, b, c): (Duration, Duration, Duration)) -> String {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!("{:.0} / {:.0} / {:.0} µs", us(a), us(b), us(c))
}

fn mib(v: (f64, f64)) -> String {
    format!("{:.0} MiB ({:.0} anon)", v.0, v.1)
}

fn secs(d: f64) -> String {
    if d < 1.0 {
        format!("{:.0} ms", d * 1000.0)
    } else {
        format!("{d:.2} s")
    }
}

#[allow(clippy::too_many_lines)]
fn size(n: u32, o: &Opts, floor: Option<(f64, f64)>) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let tag = format!("{}{n}", if super::smoke() { "sysm" } else { "sysc" });
    let last = peer_service(n - 1, 10);
    let services: Vec<PeerService> = (0..n).map(|i| peer_service(i, 10)).collect();

    // 1. The API server's objects: cold start, one change, churn.
    wait_idle(Duration::from_mins(2));
    let mut t = Topo::new(&tag, &last.eps)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _rt = rt.enter();
    let listener = in_netns(&t.node(), || {
        std::net::TcpListener::bind(("127.0.0.1", API_PORT))
    })??;
    let api = FakeApi::start_on(listener)?;
    api.apply(
        Resource::Node,
        json!({"metadata": {"name": "node-0"},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.1.0.1"}]}}),
    );
    let mut eps: Vec<Vec<Ipv4Addr>> = Vec::with_capacity(services.len());
    for p in &services {
        api.apply(Resource::Service, service_json(p));
        api.apply(Resource::EndpointSlice, slice_json(p, &p.eps));
        eps.push(p.eps.clone());
    }
    // The initial state is the server's, not a history of creations.
    api.compact();
    t.start_daemon_with(&["--master".into(), api.url()], "ebpf", &config(&tag, n))?;
    let programmed = wait_programmed(&mut t, n)?;
    let first = api
        .first_request_at()
        .context("the daemon never asked the API server")?;
    let cold_api = programmed - unix(first);
    let m = scrape(&t)?;
    let entries = metric(&m, "switchyard_bpf_map_entries");
    // The first sync is the only full one yet: the dataplane's share of the cold start.
    let full_sync = metric(&m, "kubeproxy_sync_full_proxy_rules_duration_seconds_sum");
    let floor_total = floor.map(|f| (entries * f.0 * 1e-9, entries * f.1 * 1e-9));
    std::thread::sleep(Duration::from_secs(2));
    let rss_cold = rss(&t)?;

    // One endpoint change at a time: the fourth endpoint of a service gets a new address.
    wait_idle(Duration::from_mins(2));
    let maps = AyaMaps::from_pins(Path::new(&format!("/sys/fs/bpf/{tag}")))?;
    let mut fresh = 0x0b00_0000u32;
    let mut next_addr = || {
        fresh += 1;
        Ipv4Addr::from(fresh)
    };
    // One change: the fourth endpoint of service `i` gets a new address; the time until the
    // maps hold it.
    let mut change = |i: usize| -> anyhow::Result<Duration> {
        let a = next_addr();
        eps[i][3] = a;
        let t0 = Instant::now();
        api.apply(Resource::EndpointSlice, slice_json(&services[i], &eps[i]));
        until_backend(&maps, &services[i], a, t0)
    };
    // The first changes after a cold start of 100k are slower (tens of ms for the first
    // few, outside the daemon's own sync: its receipt-to-programmed stays under a
    // millisecond), so a few go first, reported on their own row, not in the percentiles.
    let mut warmup = Vec::new();
    for k in 0..WARMUP {
        let i = usize::try_from((u64::from(k) * 104_729 + 7) % u64::from(n))?;
        warmup.push(change(i)?);
        if !super::smoke() {
            std::thread::sleep(Duration::from_millis(180));
        }
    }
    let before_text = scrape(&t)?;
    let before = programming_histogram(&before_text);
    let daemon_before = histogram(&before_text, DAEMON_PART);
    let mut changes = Vec::new();
    // Spread over more than a syncPeriod: changes that meet a periodic full sync count too.
    let spread = if super::smoke() {
        Duration::ZERO
    } else {
        Duration::from_secs(36)
    };
    let paced = Instant::now();
    for k in 0..o.changes {
        if let Some(wait) = (spread * k / o.changes.max(1)).checked_sub(paced.elapsed()) {
            std::thread::sleep(wait);
        }
        let i = usize::try_from((u64::from(k) * 7919 + 13) % u64::from(n))?;
        changes.push(change(i)?);
    }
    let after_text = scrape(&t)?;
    let after = programming_histogram(&after_text);
    let daemon_after = histogram(&after_text, DAEMON_PART);
    let daemon_part = (
        bucket_quantile(&daemon_before, &daemon_after, 0.5),
        bucket_quantile(&daemon_before, &daemon_after, 0.99),
        daemon_after.0 - daemon_before.0,
    );
    // A periodic full sync may still be reading (seconds at 100k): its figure waits for it.
    let mut fulls_text = after_text.clone();
    let waited = Instant::now();
    while !super::smoke()
        && metric(
            &fulls_text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        ) < 2.0
        && waited.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_millis(500));
        fulls_text = scrape(&t)?;
    }
    let after_text = fulls_text;
    // Full syncs after the first (periodic ones, every syncPeriod): the part that holds the
    // dataplane (the maps are read before, in the background).
    let fulls = metric(
        &after_text,
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
    );
    let periodic_full = (fulls > 1.0).then(|| {
        (metric(
            &after_text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_sum",
        ) - full_sync)
            / (fulls - 1.0)
    });
    let (count, sum) = (after.0 - before.0, after.1 - before.1);
    let metric_p99 = bucket_quantile(&before, &after, 0.99);
    let measured_mean =
        changes.iter().sum::<Duration>().as_secs_f64() / f64::from(o.changes.max(1));
    let (c50, c99, cmax) = quantiles(&mut changes);

    // The harness's own share of those figures: the same kind of change, from the fake API
    // server to a bare watch reader in the node namespace (no parsing, no daemon work).
    let mut bare = Vec::new();
    {
        let rv = api.apply(Resource::EndpointSlice, slice_json(&services[0], &eps[0]));
        let reader = BareWatch::start(&t, rv)?;
        for k in 0..o.changes {
            let i = usize::try_from((u64::from(k) * 6007 + 29) % u64::from(n))?;
            let a = next_addr();
            eps[i][3] = a;
            reader.want(&a.to_string());
            let t0 = Instant::now();
            api.apply(Resource::EndpointSlice, slice_json(&services[i], &eps[i]));
            bare.push(reader.seen(t0)?);
            if !super::smoke() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let (b50, b99, bmax) = quantiles(&mut bare);

    // Churn: 1% of the slices per minute, evenly spread.
    let interval = Duration::from_secs_f64(6000.0 / f64::from(n));
    let churn_start = Instant::now();
    let mut churned = 0u32;
    let mut last_change = None;
    while churn_start.elapsed() < o.churn {
        let i = usize::try_from((u64::from(churned) * 104_729 + 7) % u64::from(n))?;
        let a = next_addr();
        eps[i][churned as usize % 10] = a;
        api.apply(Resource::EndpointSlice, slice_json(&services[i], &eps[i]));
        last_change = Some((i, a));
        churned += 1;
        let due = (interval * churned).min(o.churn);
        if let Some(wait) = due.checked_sub(churn_start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let churned_for = churn_start.elapsed();
    if let Some((i, a)) = last_change {
        until_backend(&maps, &services[i], a, Instant::now())?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_churn = rss(&t)?;
    drop(maps);
    t.stop_daemon();
    api.stop();
    drop(t);

    // 2. The same cluster from manifests.
    let manifests = if o.api_only {
        None
    } else {
        wait_idle(Duration::from_mins(2));
        let mut t = Topo::new(&tag, &last.eps)?;
        let dir = t.work.path().join("manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cluster.yaml"), peer_model_manifests(n, 10))?;
        let spawned = SystemTime::now();
        t.start_daemon_with(
            &["--source".into(), format!("manifests:{}", dir.display())],
            "ebpf",
            &config(&tag, n),
        )?;
        let cold = wait_programmed(&mut t, n)? - unix(spawned);
        std::thread::sleep(Duration::from_secs(2));
        Some((cold, rss(&t)?))
    };

    // 3. kube-proxy's iptables-legacy restore of the same cluster.
    let kp = if o.peers && !o.api_only {
        wait_idle(Duration::from_mins(2));
        // The peers' generator stops at what 172.30.0.0/16 holds (about 65k services): the
        // row then says why, and the figures measured so far are kept.
        Some(kube_proxy_restore("iptables-legacy", n).map(|r| r.0))
    } else {
        None
    };

    let floor_peer = floor_total.map_or(NO_PEERS.to_string(), |(single, batched)| {
        format!(
            "{} single / {} batched ({entries:.0} entries)",
            secs(single),
            secs(batched)
        )
    });
    for (figure, took) in [
        (
            "cold start, API server (list + watch) → maps",
            Some(cold_api),
        ),
        ("cold start, manifests → maps", manifests.map(|m| m.0)),
        (
            "first full sync, maps + program links (daemon's metric)",
            Some(full_sync),
        ),
    ] {
        let Some(took) = took else { continue };
        rows.push(Row {
            figure,
            n,
            ours: secs(took),
            peer: floor_peer.clone(),
            ratio: floor_total.map_or("-".into(), |(single, batched)| {
                format!("{:.2}× / {:.2}×", took / single, took / batched)
            }),
            goal: if n >= 100_000 {
                "≤ 1.5× batched".into()
            } else {
                String::new()
            },
        });
    }
    if !o.api_only {
        rows.push(Row {
            figure: "cold start vs kube-proxy iptables-legacy restore",
            n,
            ours: secs(cold_api),
            peer: match &kp {
                None => NO_PEERS.into(),
                Some(Err(e)) => format!("not run: {}", e.root_cause()),
                Some(Ok(None)) => format!("> {PEER_TIMEOUT} s"),
                Some(Ok(Some(d))) => secs(d.as_secs_f64()),
            },
            ratio: match &kp {
                None | Some(Err(_)) => "-".into(),
                Some(Ok(None)) => format!(
                    "< {:.3}×",
                    cold_api / Duration::from_secs(PEER_TIMEOUT).as_secs_f64()
                ),
                Some(Ok(Some(d))) => format!("{:.3}×", cold_api / d.as_secs_f64()),
            },
            goal: String::new(),
        });
    }
    rows.push(Row {
        figure: "one endpoint change (200 over 36 s), watch event → maps, p50 / p99 / max",
        n,
        ours: micros3((c50, c99, cmax)),
        peer: floor.map_or(NO_PEERS.into(), |f| {
            format!("{:.2} µs (one single update)", f.0 / 1000.0)
        }),
        ratio: floor.map_or("-".into(), |f| {
            format!("{:.0}× (p50)", c50.as_secs_f64() * 1e9 / f.0)
        }),
        goal: "p99 ≤ 1 ms".into(),
    });
    rows.push(Row {
        figure: "the harness alone: the same changes from the fake API server to a bare watch reader, p50 / p99 / max",
        n,
        ours: micros3((b50, b99, bmax)),
        peer: "the end-to-end row above".into(),
        ratio: format!(
            "{:.2} / {:.2} of it",
            b50.as_secs_f64() / c50.as_secs_f64().max(1e-9),
            b99.as_secs_f64() / c99.as_secs_f64().max(1e-9)
        ),
        goal: String::new(),
    });
    rows.push(Row {
        figure: "the same changes, the daemon's part (receipt → programmed, switchyard_change_to_programmed_seconds): p50 / p99 bucket",
        n,
        ours: format!(
            "≤ {:.0} / ≤ {:.0} µs ({:.0} observed)",
            daemon_part.0 * 1e6,
            daemon_part.1 * 1e6,
            daemon_part.2
        ),
        peer: "-".into(),
        ratio: "-".into(),
        goal: "p99 ≤ 1 ms".into(),
    });
    rows.push(Row {
        figure: "the first changes after the cold start (not in the rows above): max",
        n,
        ours: format!(
            "{:.0} µs ({WARMUP} changes)",
            warmup
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e6
        ),
        peer: "-".into(),
        ratio: "-".into(),
        goal: String::new(),
    });
    rows.push(Row {
        figure: "periodic full sync: time holding the dataplane, mean (maps read beforehand)",
        n,
        ours: periodic_full.map_or("none ran".into(), |d| format!("{:.0} ms", d * 1e3)),
        peer: format!(
            "{:.0} ms (first full sync, maps read under it)",
            full_sync * 1e3
        ),
        ratio: periodic_full.map_or("-".into(), |d| format!("{:.2}×", d / full_sync)),
        goal: String::new(),
    });
    rows.push(Row {
        figure: "network_programming_duration_seconds (from the daemon's receipt), same changes: mean / p99 bucket",
        n,
        ours: format!(
            "{:.0} µs / ≤ {} ms ({count:.0} observed)",
            sum / count.max(1.0) * 1e6,
            metric_p99 * 1000.0
        ),
        peer: format!("{:.0} µs mean measured above", measured_mean * 1e6),
        ratio: format!("{:.2}×", (sum / count.max(1.0)) / measured_mean),
        goal: "agrees".into(),
    });
    let mem_goal = match n {
        10_000 => "≤ 64 MiB",
        100_000 => "≤ 400 MiB",
        _ => "",
    };
    for (figure, v) in [
        ("RSS after cold start (API server)", Some(rss_cold)),
        ("RSS after churn", Some(rss_churn)),
        ("RSS after cold start (manifests)", manifests.map(|m| m.1)),
    ] {
        let Some(v) = v else { continue };
        rows.push(Row {
            figure,
            n,
            ours: mib(v),
            peer: "-".into(),
            ratio: "-".into(),
            goal: mem_goal.into(),
        });
    }
    rows.push(Row {
        figure: "churn applied",
        n,
        ours: format!(
            "{churned} slice changes in {:.0} s",
            churned_for.as_secs_f64()
        ),
        peer: "-".into(),
        ratio: "-".into(),
        goal: "1% of slices per minute".into(),
    });
    if o.api_only {
        return Ok(rows);
    }
    // A failure of a later part names itself in its row; the figures above are kept.
    let failed = |figure: &'static str, e: &anyhow::Error| Row {
        figure,
        n,
        ours: format!("failed: {e:#}"),
        peer: "-".into(),
        ratio: "-".into(),
        goal: String::new(),
    };
    if o.peers {
        match dns_rows(n, o.secs) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(failed("DNS QPS, cluster zone (p99)", &e)),
        }
    } else {
        rows.push(Row {
            figure: "DNS QPS, cluster zone (p99)",
            n,
            ours: "not run".into(),
            peer: NO_PEERS.into(),
            ratio: "-".into(),
            goal: "≥ 1.0×".into(),
        });
    }
    let conn = match conn_rows(n, o.secs, false, o.conn_reps) {
        Ok(c) => c,
        Err(e) => {
            rows.push(failed("new connections/s", &e));
            Vec::new()
        }
    };
    for (name, r, vs, _) in conn {
        if name.starts_with("Switchyard") {
            rows.push(Row {
                figure: if name.contains("socket LB") {
                    "new connections/s, socket LB (node ns)"
                } else {
                    "new connections/s, tc path (client ns)"
                },
                n,
                ours: format!("{:.0}", r.0),
                peer: format!("{:.0} direct", r.0 / vs),
                ratio: format!("{vs:.2}×"),
                goal: "≥ 0.95×".into(),
            });
        }
    }
    Ok(rows)
}

fn dns_rows(n: u32, secs: u32) -> anyhow::Result<Vec<Row>> {
    wait_idle(Duration::from_mins(2));
    // Every part is kept to the end: the work directory holds the zone and the manifests.
    let DnsServers {
        work: _work,
        ns,
        guard,
        queries,
        mdir: _mdir,
    } = dns_servers(n, &[(5302, "cluster.local")])?;
    let mut got = HashMap::new();
    for port in [5300u16, 5302] {
        let _ = dnsperf(&ns, port, &queries, 2, &[])?;
        let (qps, _, _) = dnsperf(&ns, port, &queries, secs, &[])?;
        let (_, p99) = dnsperf_p99(&ns, port, &queries, secs.min(5))?;
        got.insert(port, (qps, p99));
    }
    drop(guard);
    let (knot, ours) = (got[&5300], got[&5302]);
    Ok(vec![Row {
        figure: "DNS QPS, cluster zone (p99)",
        n,
        ours: format!("{:.0} ({:.2} ms)", ours.0, ours.1),
        peer: format!("{:.0} ({:.2} ms) Knot", knot.0, knot.1),
        ratio: format!("{:.2}×", ours.0 / knot.0),
        goal: "≥ 1.0×".into(),
    }])
}

/// A watch of EndpointSlices read as raw bytes on a thread of its own: when the text it was
/// told to want appears, it notes the time.
struct BareWatch {
    want: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    seen: std::sync::mpsc::Receiver<Instant>,
}

impl BareWatch {
    fn start(t: &Topo, rv: u64) -> anyhow::Result<BareWatch> {
        use std::io::{Read, Write};
        let mut s = in_netns(&t.node(), || {
            std::net::TcpStream::connect(("127.0.0.1", API_PORT))
        })??;
        s.set_nodelay(true)?;
        write!(
            s,
            "GET /apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv} HTTP/1.1\r\nHost: api\r\n\r\n"
        )?;
        let want = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let (tx, seen) = std::sync::mpsc::channel();
        let w = std::sync::Arc::clone(&want);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // The tail of the previous read, so a match split between two reads is found.
            let mut text = String::new();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let at = Instant::now();
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                let mut want = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if want.as_ref().is_some_and(|x| text.contains(x.as_str())) {
                    *want = None;
                    if tx.send(at).is_err() {
                        return;
                    }
                }
                let keep = text.len().saturating_sub(64);
                let keep = (keep..text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                text.drain(..keep);
            }
        });
        Ok(BareWatch { want, seen })
    }

    fn want(&self, what: &str) {
        *self
            .want
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!("\"{what}\""));
    }

    fn seen(&self, since: Instant) -> anyhow::Result<Duration> {
        let at = self
            .seen
            .recv_timeout(Duration::from_secs(10))
            .context("the bare watch reader did not see the change within 10 s")?;
        Ok(at.saturating_duration_since(since))
    }
}
