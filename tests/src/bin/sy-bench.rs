//! `cargo xtask bench ebpf` (root): eBPF backend figures, each beside a peer measured in the
//! same run.
//!
//! (a) full sync of N services × 10 endpoints into the maps vs the same number of raw map
//!     updates; (b) p50/p99 of a one-endpoint change at that size vs a raw single update;
//! (c) new connections/s (wrk, Connection: close) through the tc path and the socket LB vs the
//!     same backend addressed directly, at 1 / 1k / 10k services.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard::dataplane::ebpf::io::{MapIo, Op};
use switchyard::dataplane::ebpf::render::RenderConfig;
use switchyard::dataplane::ebpf::writer::{Capacity, Globals, Writer};
use switchyard::dataplane::ebpf::{cleanup_pins, load_maps};
use switchyard_ebpf_common::{Frontend4Key, FrontendValue};
use switchyard_model::{Engine, ProxyConfig, synthetic};
use switchyard_tests::sandbox::{
    VethEnd, add_netns, bin, cgroup2_root, http_get_in, require_root, sh, veth,
};

#[path = "../bench/scale.rs"]
mod scale;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn cap() -> Capacity {
    Capacity {
        services: 65_536,
        backends: 1 << 20,
        slots: 1 << 21,
    }
}

fn maps_bench(services: u32) -> anyhow::Result<()> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/sybench{}", std::process::id()));
    let (svcs, slices) = synthetic::cluster(services, 10);
    let mut engine = Engine::new(ProxyConfig::default());
    engine.replace_all(svcs, slices);
    engine.sync();

    let mut full = Vec::new();
    let mut writes = 0;
    let mut change = Vec::new();
    for run in 0..3 {
        let _ = cleanup_pins(&pin);
        let (_ebpf, maps) = load_maps(&pin, &cap())?;
        let mut w = Writer::new(maps, RenderConfig::default(), cap(), Globals::default());
        let t = Instant::now();
        let r = w.full_sync(engine.state())?;
        full.push(t.elapsed());
        writes = r.writes;
        if run == 0 {
            for k in 0..1000u32 {
                let i = (k * 7919) % services;
                let mut s = synthetic::slice(i, 10);
                s.endpoints[3].address = std::net::IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + k));
                engine.upsert_slice(s);
                let cs = engine.sync();
                let t = Instant::now();
                w.apply(&cs, engine.state())?;
                change.push(t.elapsed());
            }
        }
        drop(w);
        let _ = cleanup_pins(&pin);
    }

    // The floor, same run: as many raw single updates of fresh keys into a service map.
    let (_ebpf, mut maps) = load_maps(&pin, &cap())?;
    let mut single = Vec::with_capacity(writes);
    let t = Instant::now();
    for i in 0..u32::try_from(writes).unwrap_or(u32::MAX) {
        let k = Frontend4Key {
            addr: i,
            port: 80,
            proto: 6,
            scope: 1,
        };
        let t1 = Instant::now();
        maps.write(&Op::PutFrontend4(
            k,
            FrontendValue {
                set_id: i,
                flags: 0,
            },
        ))?;
        single.push(t1.elapsed());
    }
    let raw_total = t.elapsed();
    drop(maps);
    let _ = cleanup_pins(&pin);

    let full_p50 = pct(&mut full, 0.5);
    let (c50, c99) = (pct(&mut change, 0.5), pct(&mut change, 0.99));
    let (s50, s99) = (pct(&mut single, 0.5), pct(&mut single, 0.99));
    println!(
        "\n### eBPF map programming: {services} services × 10 endpoints ({writes} map writes per full sync)\n"
    );
    println!("| work | Switchyard | raw map-update floor, same run | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| full sync (median of 3, fresh maps) | {:.3} s | {:.3} s ({writes} single updates) | {:.2}× |",
        full_p50.as_secs_f64(),
        raw_total.as_secs_f64(),
        full_p50.as_secs_f64() / raw_total.as_secs_f64()
    );
    println!(
        "| one-endpoint change p50 (1000 changes) | {:.1} µs | {:.2} µs (one update) | {:.1}× |",
        c50.as_secs_f64() * 1e6,
        s50.as_secs_f64() * 1e6,
        c50.as_secs_f64() / s50.as_secs_f64()
    );
    println!(
        "| one-endpoint change p99 | {:.1} µs | {:.2} µs | {:.1}× |",
        c99.as_secs_f64() * 1e6,
        s99.as_secs_f64() * 1e6,
        c99.as_secs_f64() / s99.as_secs_f64()
    );
    Ok(())
}

struct Topo {
    tag: String,
    work: tempfile::TempDir,
    cgroup: PathBuf,
    daemon: Option<std::process::Child>,
}

impl Topo {
    fn node(&self) -> String {
        format!("{}-node", self.tag)
    }
    fn cli(&self) -> String {
        format!("{}-cli", self.tag)
    }
    fn be(&self) -> String {
        format!("{}-be", self.tag)
    }

    /// client (10.1.0.2) -> node (10.1.0.1 | 10.2.0.1) -> backend (10.2.0.2 + endpoint /32s,
    /// nginx answering 200 on 8080), like the peers' conn_rate.sh.
    fn new(tag: &str, endpoints: &[Ipv4Addr]) -> anyhow::Result<Topo> {
        let t = Topo {
            tag: tag.into(),
            work: tempfile::tempdir()?,
            cgroup: cgroup2_root()?.join(tag),
            daemon: None,
        };
        std::fs::create_dir_all(&t.cgroup)?;
        let (node, cli, be) = (t.node(), t.cli(), t.be());
        for ns in [&node, &cli, &be] {
            add_netns(ns)?;
        }
        veth(
            &format!("{tag}c"),
            VethEnd {
                ns: &cli,
                name: &format!("{tag}c"),
                addrs: &["10.1.0.2/24"],
            },
            VethEnd {
                ns: &node,
                name: &format!("{tag}n1"),
                addrs: &["10.1.0.1/24"],
            },
        )?;
        sh(&[
            "ip", "-n", &cli, "route", "add", "default", "via", "10.1.0.1",
        ])?;
        // The backend namespace holds every endpoint address, nginx answering on all.
        let eps: Vec<String> = endpoints.iter().map(|e| format!("{e}/32")).collect();
        let mut be_addrs: Vec<&str> = vec!["10.2.0.2/24"];
        be_addrs.extend(eps.iter().map(String::as_str));
        veth(
            &format!("{tag}b"),
            VethEnd {
                ns: &be,
                name: &format!("{tag}b"),
                addrs: &be_addrs,
            },
            VethEnd {
                ns: &node,
                name: &format!("{tag}n2"),
                addrs: &["10.2.0.1/24"],
            },
        )?;
        sh(&[
            "ip", "-n", &be, "route", "add", "default", "via", "10.2.0.1",
        ])?;
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "10.128.0.0/9",
            "via",
            "10.2.0.2",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        for ns in [&cli, &node] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_local_port_range=10000 65000",
            ])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
            ])?;
        }
        let w = t.work.path().display().to_string();
        std::fs::write(
            t.work.path().join("nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon on;\npid {w}/nginx.pid;\nerror_log {w}/nginx_error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  keepalive_timeout 0;\n  client_body_temp_path {w}/cb; proxy_temp_path {w}/px; fastcgi_temp_path {w}/fc; uwsgi_temp_path {w}/uw; scgi_temp_path {w}/sc;\n  server {{ listen 80 backlog=4096; listen 443 backlog=4096; listen 8080 backlog=4096; listen 9090 backlog=4096; listen 5432 backlog=4096; listen 6379 backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
            ),
        )?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &be,
            "nginx",
            "-c",
            &format!("{w}/nginx.conf"),
            "-p",
            &w,
            "-e",
            &format!("{w}/nginx_error.log"),
        ])?;
        Ok(t)
    }

    fn start_daemon(&mut self, manifests: &Path, backend: &str, n: u32) -> anyhow::Result<()> {
        let config = format!(
            "clusterCIDR: {CLUSTER_CIDR}\nsyncPeriod: 60s\nminSyncPeriod: 100ms\nhealthzBindAddress: ''\nmetricsBindAddress: ''\niptablesMode: legacy\nbpfPinDir: /sys/fs/bpf/{}\n{}",
            self.tag,
            map_capacity(n)
        );
        self.start_daemon_with(
            &[
                "--source".into(),
                format!("manifests:{}", manifests.display()),
            ],
            backend,
            &config,
        )
    }

    /// The daemon in the node namespace with this source (`--source ...` or `--master ...`)
    /// and config file text.
    fn start_daemon_with(
        &mut self,
        source: &[String],
        backend: &str,
        config: &str,
    ) -> anyhow::Result<()> {
        let cfg = self.work.path().join("config.yaml");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(self.work.path().join("daemon.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node()))
            .arg(bin("switchyard"))
            .args(["run", "--backend", backend, "--node-name", "node-0"])
            .args(source)
            .arg("--cgroup-path")
            .arg(&self.cgroup)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.daemon = Some(child);
        Ok(())
    }

    /// A shell command in the node namespace, best effort (teardown steps).
    fn node_sh(&self, script: &str) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.node(), "sh", "-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = cleanup_pins(Path::new(&format!("/sys/fs/bpf/{}", self.tag)));
    }

    /// wrk from the client namespace, or from the node namespace inside the socket-LB cgroup.
    fn wrk(&self, from_node_cgroup: bool, url: &str, secs: u32) -> anyhow::Result<(f64, f64, f64)> {
        let ns = if from_node_cgroup {
            self.node()
        } else {
            self.cli()
        };
        let cg = self.cgroup.join("cgroup.procs");
        let script = format!(
            "{} exec nsenter --net=/var/run/netns/{ns} wrk -t2 -c8 -d{secs}s --latency -H 'Connection: close' {url}",
            if from_node_cgroup {
                format!("echo $$ > {};", cg.display())
            } else {
                String::new()
            }
        );
        let out = Command::new("sh").args(["-c", &script]).output()?;
        let txt = String::from_utf8_lossy(&out.stdout).to_string();
        let rps: f64 = txt
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("wrk output: {txt}"))?;
        let ms = |label: &str| -> f64 {
            txt.lines()
                .find(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split_whitespace().nth(1))
                .map_or(0.0, |v| {
                    let (num, unit) =
                        v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                    let x: f64 = num.parse().unwrap_or(0.0);
                    match unit {
                        "us" => x / 1000.0,
                        "s" => x * 1000.0,
                        _ => x,
                    }
                })
        };
        if txt.contains("Socket errors") || txt.contains("Non-2xx") {
            eprintln!("wrk reported errors for {url}: {txt}");
        }
        Ok((rps, ms("50%"), ms("99%")))
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.stop_daemon();
        if let Ok(pid) = std::fs::read_to_string(self.work.path().join("nginx.pid")) {
            let _ = sh(&["kill", pid.trim()]);
        }
        for ns in [self.node(), self.cli(), self.be()] {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn wait_ok(t: &Topo, from_node: bool, url_addr: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let mut cmd = Command::new(bin("sy-probe"));
        if from_node {
            cmd.args([
                "--cgroup",
                &t.cgroup.to_string_lossy(),
                "--netns",
                &t.node(),
            ]);
        } else {
            cmd.args(["--netns", &t.cli()]);
        }
        let out = cmd
            .args(["--tcp", url_addr, "--timeout-ms", "500"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).starts_with("ok") {
            return Ok(());
        }
        if start.elapsed() > Duration::from_mins(2) {
            let log = std::fs::read_to_string(t.work.path().join("daemon.log")).unwrap_or_default();
            bail!("{url_addr} never answered; daemon log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The eBPF map sizes for `n` services × 10 endpoints (the defaults hold 65 536 services).
fn map_capacity(n: u32) -> String {
    let services = (n + n / 4).next_power_of_two().max(65_536);
    let backends = (n * 20).next_power_of_two().max(1 << 20);
    format!("maxServices: {services}\nmaxBackends: {backends}\n")
}

/// The peers' cluster model (shared/peers/cluster_model.py): pod CIDR 10.0.0.0/8, so the
/// client (10.1.0.2) is a pod and nothing is masqueraded, as in the peers' conn_rate.sh.
const CLUSTER_CIDR: &str = "10.0.0.0/8";
const PEER_PORTS: [(&str, u16); 6] = [
    ("http", 80),
    ("https", 443),
    ("grpc", 8080),
    ("metrics", 9090),
    ("postgres", 5432),
    ("redis", 6379),
];

/// Service `i` of the peers' model: (name, namespace, port name, port, ClusterIP, endpoints,
/// nodePort).
struct PeerService {
    name: String,
    ns: String,
    port_name: &'static str,
    port: u16,
    vip: Ipv4Addr,
    eps: Vec<Ipv4Addr>,
    node_port: Option<u16>,
}

fn peer_service(i: u32, eps: u32) -> PeerService {
    let (port_name, port) = PEER_PORTS[(i % 6) as usize];
    PeerService {
        name: format!("svc{i}"),
        ns: format!("ns{}", i % 10),
        port_name,
        port,
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 0, 10)) + i),
        eps: (0..eps)
            .map(|j| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + i * eps + j))
            .collect(),
        #[allow(clippy::cast_possible_truncation)]
        node_port: (i % 4 == 3).then(|| 30000 + (i / 4) as u16),
    }
}

/// The same cluster as Service and EndpointSlice manifests, for Switchyard.
fn peer_model_manifests(n: u32, eps: u32) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for i in 0..n {
        let p = peer_service(i, eps);
        let (ty, np) = match p.node_port {
            Some(np) => ("NodePort", format!(", nodePort: {np}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{type: {ty}, clusterIP: {}, ports: [{{name: {}, port: {}, targetPort: {}{np}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {}-abcde, namespace: {}, labels: {{kubernetes.io/service-name: {}}}}}\naddressType: IPv4\nports: [{{name: {}, port: {}, protocol: TCP}}]\nendpoints:\n",
            p.name,
            p.ns,
            p.vip,
            p.port_name,
            p.port,
            p.port,
            p.name,
            p.ns,
            p.name,
            p.port_name,
            p.port
        );
        for e in &p.eps {
            let _ = writeln!(s, "- addresses: [{e}]");
        }
    }
    s
}

/// One path measured in its own fresh topology (no TIME_WAIT or conntrack state carried over
/// from another path: a backend's TIME_WAIT entries from one source would make another
/// path's SYNs fail PAWS and retransmit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path_ {
    Direct,
    KubeProxyLegacy,
    Ebpf,
    IptablesLegacy,
}

/// Wait (at most `max`) until the machine is about idle (under 10% busy over a second), so a
/// daemon's start-up syncs are over before a measurement, as the peers' conn_rate.sh does.
/// Set by a smoke run: no waiting for an idle machine, and namespaces of its own names (a
/// smoke run may run beside a benchmark).
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn smoke() -> bool {
    SMOKE.load(std::sync::atomic::Ordering::Relaxed)
}

fn wait_idle(max: Duration) {
    if smoke() {
        return;
    }
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4)?;
        Some((v.iter().sum::<u64>() - idle, idle))
    };
    let start = Instant::now();
    while start.elapsed() < max {
        let Some((b0, i0)) = sample() else { return };
        std::thread::sleep(Duration::from_secs(1));
        let Some((b1, i1)) = sample() else { return };
        let (busy, idle) = (b1 - b0, i1 - i0);
        if busy * 10 < busy + idle {
            return;
        }
    }
}

/// One row of the connection-rate table: (path, (conn/s, p50 ms, p99 ms), conn/s vs direct,
/// p99 vs direct).
type ConnRow = (String, (f64, f64, f64), f64, f64);

fn conn_bench(sizes: &[u32], secs: u32, reps: u32) -> anyhow::Result<()> {
    println!(
        "\n### New connections/s (wrk -t2 -c8 -d{secs}s, Connection: close), probed service = the last one, median of {reps} round(s)\n"
    );
    println!(
        "Each path runs in fresh namespaces on the peers' cluster model (pod CIDR 10.0.0.0/8, 10 endpoints per service). The kube-proxy row loads shared/peers/gen_iptables.py's rules into the node namespace.\n"
    );
    println!("| path | N services | conn/s | p50 ms | p99 ms | conn/s vs direct | p99 vs direct |");
    println!("|---|---|---|---|---|---|---|");
    for &n in sizes {
        for (name, r, vs, p99_vs) in conn_rows(n, secs, true, reps)? {
            println!(
                "| {name} | {n} | {:.0} | {:.3} | {:.3} | {vs:.2} | {p99_vs:.2} |",
                r.0, r.1, r.2
            );
        }
    }
    Ok(())
}

/// New connections/s to the last of `n` services, each path in fresh namespaces; the
/// kube-proxy rules and Switchyard's iptables backend only with `all_paths`. With `reps` > 1
/// every path is measured `reps` times, the rounds one after another (direct, peers, ours;
/// again), and a row gives the median of its rounds: conn/s, and its ratio to the direct run
/// of the same round (one run varies by about ±5 % on this machine; a ratio within a round
/// cancels most of the drift between rounds).
fn conn_rows(n: u32, secs: u32, all_paths: bool, reps: u32) -> anyhow::Result<Vec<ConnRow>> {
    let mut rounds = Vec::new();
    for _ in 0..reps.max(1) {
        rounds.push(conn_round(n, secs, all_paths)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            f64::midpoint(v[m - 1], v[m])
        }
    };
    let mut out = Vec::new();
    for (i, (name, ..)) in rounds[0].iter().enumerate() {
        let of = |f: fn(&ConnRow) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
        out.push((
            name.clone(),
            (of(|r| r.1.0), of(|r| r.1.1), of(|r| r.1.2)),
            of(|r| r.2),
            of(|r| r.3),
        ));
    }
    Ok(out)
}

/// One round of `conn_rows`: every path once.
fn conn_round(n: u32, secs: u32, all_paths: bool) -> anyhow::Result<Vec<ConnRow>> {
    let gen_iptables =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/gen_iptables.py");
    // The peer is the point of the table: without it there is nothing to compare with.
    if all_paths && !gen_iptables.exists() {
        bail!(
            "{} is missing: the kube-proxy peer row needs shared/peers beside the checkout",
            gen_iptables.display()
        );
    }
    let last = peer_service(n - 1, 10);
    let vip = format!("{}:{}", last.vip, last.port);
    let vip_url = format!("http://{vip}/");
    let direct_url = format!("http://{}:{}/", last.eps[0], last.port);
    let manifests = peer_model_manifests(n, 10);
    let mut rows: Vec<(String, (f64, f64, f64), bool)> = Vec::new();
    let paths: &[Path_] = if all_paths {
        &[
            Path_::Direct,
            Path_::KubeProxyLegacy,
            Path_::Ebpf,
            Path_::IptablesLegacy,
        ]
    } else {
        &[Path_::Direct, Path_::Ebpf]
    };
    for &path in paths {
        wait_idle(Duration::from_mins(2));
        let tag = if smoke() { "sybm" } else { "sybn" };
        let mut t = Topo::new(&format!("{tag}{n}"), &last.eps)?;
        let dir = t.work.path().join("manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cluster.yaml"), &manifests)?;
        match path {
            Path_::Direct => {
                rows.push((
                    "direct, client ns -> endpoint (routed)".into(),
                    t.wrk(false, &direct_url, secs)?,
                    false,
                ));
                rows.push((
                    "direct, node ns -> endpoint".into(),
                    t.wrk(true, &direct_url, secs)?,
                    true,
                ));
            }
            Path_::KubeProxyLegacy => {
                let script = format!(
                    "python3 {} {n} 10 | ip netns exec {} iptables-legacy-restore -w 5",
                    gen_iptables.display(),
                    t.node()
                );
                let out = Command::new("sh").args(["-c", &script]).output()?;
                if !out.status.success() {
                    bail!(
                        "loading the kube-proxy rules: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                wait_ok(&t, false, &vip)?;
                wait_idle(Duration::from_mins(2));
                let _ = t.wrk(false, &vip_url, 1)?;
                rows.push((
                    "kube-proxy iptables-legacy rules (peer), client ns -> ClusterIP".into(),
                    t.wrk(false, &vip_url, secs)?,
                    false,
                ));
                t.node_sh("iptables-legacy -t nat -F; iptables-legacy -t nat -X; iptables-legacy -F; iptables-legacy -X");
            }
            Path_::Ebpf => {
                t.start_daemon(&dir, "ebpf", n)?;
                wait_ok(&t, false, &vip)?;
                wait_ok(&t, true, &vip)?;
                wait_idle(Duration::from_mins(2));
                let _ = t.wrk(false, &vip_url, 1)?;
                rows.push((
                    "Switchyard eBPF tc path, client ns -> ClusterIP".into(),
                    t.wrk(false, &vip_url, secs)?,
                    false,
                ));
                rows.push((
                    "Switchyard eBPF socket LB, node ns -> ClusterIP".into(),
                    t.wrk(true, &vip_url, secs)?,
                    true,
                ));
            }
            Path_::IptablesLegacy => {
                t.start_daemon(&dir, "iptables", n)?;
                wait_ok(&t, false, &vip)?;
                wait_idle(Duration::from_mins(2));
                let _ = t.wrk(false, &vip_url, 1)?;
                rows.push((
                    "Switchyard iptables-legacy, client ns -> ClusterIP".into(),
                    t.wrk(false, &vip_url, secs)?,
                    false,
                ));
                t.stop_daemon();
                t.node_sh(&format!(
                    "{} cleanup --backend iptables",
                    bin("switchyard").display()
                ));
            }
        }
        drop(t);
    }
    let base = |node: bool| {
        rows.iter()
            .find(|(name, _, from_node)| name.starts_with("direct") && *from_node == node)
            .map(|r| r.1)
            .ok_or_else(|| anyhow::anyhow!("no direct row to compare with ({n} services)"))
    };
    let mut out = Vec::new();
    for (name, r, from_node) in &rows {
        let b = base(*from_node)?;
        out.push((name.clone(), *r, r.0 / b.0, r.2 / b.2));
    }
    Ok(out)
}

/// The peers' synthetic cluster (shared/peers/cluster_model.py + gen_zone.py) as manifests, so
/// Switchyard serves exactly the records the peer servers load from zone files.
fn peer_cluster_manifests(n: u32) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = write!(
        s,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: kubernetes, namespace: default}}\nspec: {{clusterIP: 172.30.0.1, ports: [{{name: https, port: 443}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\nspec: {{clusterIP: 172.30.0.2, ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53}}, {{name: metrics, port: 9153}}]}}\n"
    );
    for i in 0..n {
        // Headless services have 5 endpoints in the zone model.
        let PeerService {
            name,
            ns,
            port_name: pname,
            port,
            vip,
            eps,
            ..
        } = peer_service(i, 5);
        if i % 10 == 5 {
            let _ = write!(
                s,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: None, ports: [{{name: {pname}, port: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: {pname}, port: {port}, protocol: TCP}}]\nendpoints:\n"
            );
            for (k, ep) in eps.iter().enumerate() {
                let _ = writeln!(s, "- {{addresses: [{ep}], hostname: {name}-{k}}}");
            }
        } else {
            let _ = write!(
                s,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: {vip}, ports: [{{name: {pname}, port: {port}}}]}}\n"
            );
        }
    }
    s
}

fn dnsperf(
    ns: &str,
    port: u16,
    queries: &Path,
    secs: u32,
    extra: &[&str],
) -> anyhow::Result<(f64, f64, String)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
        ])
        .arg(queries)
        .args(["-c", "32", "-l", &secs.to_string()])
        .args(extra)
        .output()?;
    dnsperf_summary(&String::from_utf8_lossy(&out.stdout))
}

/// QPS, average latency (ms) and response codes from dnsperf's summary.
fn dnsperf_summary(txt: &str) -> anyhow::Result<(f64, f64, String)> {
    let qps: f64 = txt
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("dnsperf output: {txt}"))?;
    let avg: f64 = txt
        .lines()
        .find_map(|l| l.trim().strip_prefix("Average Latency (s):"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let codes = txt
        .lines()
        .find_map(|l| l.trim().strip_prefix("Response codes:"))
        .unwrap_or("-")
        .trim()
        .to_string();
    Ok((qps, avg * 1000.0, codes))
}

fn dnsperf_p99(ns: &str, port: u16, queries: &Path, secs: u32) -> anyhow::Result<(f64, f64)> {
    dnsperf_p99_at(ns, port, queries, secs, None)
}

/// p50 and p99 latency (ms), at full speed or with the offered load capped at `qps`.
fn dnsperf_p99_at(
    ns: &str,
    port: u16,
    queries: &Path,
    secs: u32,
    qps: Option<u32>,
) -> anyhow::Result<(f64, f64)> {
    let rate: Vec<String> = qps
        .map(|q| vec!["-Q".to_string(), q.to_string()])
        .unwrap_or_default();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
        ])
        .arg(queries)
        .args(["-c", "32", "-l", &secs.to_string(), "-v"])
        .args(&rate)
        .output()?;
    let txt = String::from_utf8_lossy(&out.stdout);
    let mut lat: Vec<f64> = txt
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    if lat.is_empty() {
        return Ok((0.0, 0.0));
    }
    lat.sort_by(f64::total_cmp);
    Ok((
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    ))
}

struct NsGuard(String, Vec<std::process::Child>);
impl Drop for NsGuard {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh(&["ip", "netns", "del", &self.0]);
        // A resolv.conf given to the namespace (the autopath rows).
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// Knot on 5300 serving the peers' zone for `n` services, and one Switchyard (DNS only, from
/// the same cluster as manifests) per `(port, cluster domain)`, forwarding to Knot, each in
/// one fresh namespace and ready (answering svc0).
struct DnsServers {
    work: tempfile::TempDir,
    ns: String,
    guard: NsGuard,
    /// The peers' query mix for the zone.
    queries: PathBuf,
    mdir: PathBuf,
}

fn dns_servers(n: u32, instances: &[(u16, &str)]) -> anyhow::Result<DnsServers> {
    let work = tempfile::tempdir()?;
    let ns = format!("sybdns{}", std::process::id());
    sh(&["ip", "netns", "add", &ns])?;
    let mut guard = NsGuard(ns.clone(), Vec::new());
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    let zones = work.path().join("zones");
    let gen_zone = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/gen_zone.py");
    sh(&[
        "python3",
        &gen_zone.to_string_lossy(),
        &n.to_string(),
        "--out",
        &zones.to_string_lossy(),
    ])?;
    let queries = zones.join("queries.txt");

    // Knot serving the zone files.
    let knot = work.path().join("knot");
    std::fs::create_dir_all(knot.join("run"))?;
    std::fs::create_dir_all(knot.join("db"))?;
    std::fs::write(
        knot.join("knot.conf"),
        format!(
            "server:\n    rundir: \"{k}/run\"\n    listen: 127.0.0.1@5300\nlog:\n  - target: stderr\n    any: warning\ndatabase:\n    storage: \"{k}/db\"\ncontrol:\n    listen: \"{k}/run/knot.sock\"\ntemplate:\n  - id: default\n    storage: \"{z}\"\n    file: \"%s.zone\"\n    semantic-checks: off\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\nzone:\n  - domain: cluster.local.\n  - domain: 30.172.in-addr.arpa.\n  - domain: 10.in-addr.arpa.\n",
            k = knot.display(),
            z = zones.display()
        ),
    )?;
    guard.1.push(
        Command::new("ip")
            .args(["netns", "exec", &ns, "knotd", "-c"])
            .arg(knot.join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // Switchyard serving the same cluster from manifests (DNS only), and a second instance
    // with another cluster domain that forwards cluster.local to Knot (the cache-hit path).
    let mdir = work.path().join("manifests");
    std::fs::create_dir_all(&mdir)?;
    std::fs::write(mdir.join("cluster.yaml"), peer_cluster_manifests(n))?;
    let cfg = work.path().join("sy.yaml");
    std::fs::write(
        &cfg,
        "healthzBindAddress: ''\nmetricsBindAddress: ''\ndns:\n  upstream: ['127.0.0.1:5300']\n  cacheMaxTtl: 300\n",
    )?;
    for &(port, domain) in instances {
        guard.1.push(
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(bin("switchyard"))
                .args([
                    "run",
                    "--backend",
                    "none",
                    "--node-name",
                    "node-0",
                    "--cluster-domain",
                    domain,
                    "--source",
                ])
                .arg(format!("manifests:{}", mdir.display()))
                .arg("--config")
                .arg(&cfg)
                .args(["--dns-listen", &format!("127.0.0.1:{port}")])
                .env("SWITCHYARD_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    // Ready when each answers svc0.
    for port in std::iter::once(5300u16).chain(instances.iter().map(|i| i.0)) {
        let start = Instant::now();
        loop {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "-p",
                    &port.to_string(),
                    "@127.0.0.1",
                    "svc0.ns0.svc.cluster.local",
                ])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "172.30.0.10" {
                break;
            }
            if start.elapsed() > Duration::from_mins(2) {
                bail!("DNS server on {port} never answered");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(DnsServers {
        work,
        ns,
        guard,
        queries,
        mdir,
    })
}

fn dns_bench(n: u32, secs: u32) -> anyhow::Result<()> {
    let DnsServers {
        work,
        ns,
        mut guard,
        queries,
        mdir,
    } = dns_servers(n, &[(5302, "cluster.local"), (5303, "cluster2.local")])?;
    // The forwarded-name mix: only names the upstream answers (positive A).
    let fwd_q = work.path().join("fwd_queries.txt");
    let fwd: String = (0..n.min(2000))
        .filter(|i| i % 10 != 5)
        .map(|i| format!("svc{i}.ns{}.svc.cluster.local A\n", i % 10))
        .collect();
    std::fs::write(&fwd_q, fwd)?;

    println!(
        "\n### Cluster DNS, {n} services (peers' gen_zone.py data and query mix), dnsperf -c 32 -l {secs}s, median of {ROUNDS} alternating runs\n"
    );
    // Tails at full speed mix throughput into latency (the faster server is offered more);
    // the same offered load for everyone compares latency alone. It is set below what either
    // server answers on 2 shared cores (70-100k/s), so it measures answering, not queueing.
    let fixed: u32 = 50_000;
    println!(
        "| server | QPS | avg ms | p50 ms | p99 ms | p99 ms at {}k/s | QPS vs Knot | response codes |",
        fixed / 1000
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Each Switchyard path and its Knot peer alternate (A B A B A B) and the medians are
    // compared: on a shared machine a slow minute otherwise falls on one side of a ratio.
    let servers = [
        ("Knot (authoritative, zone files)", 5300u16, &queries),
        ("Switchyard (cluster zone from manifests)", 5302, &queries),
        ("Switchyard forwarding to Knot, cache hits", 5303, &fwd_q),
        ("Knot direct, same forwarded names", 5300, &fwd_q),
    ];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); servers.len()];
    for pair in [[0usize, 1], [2, 3]] {
        for &i in &pair {
            let (_, port, q) = servers[i];
            let _ = dnsperf(&ns, port, q, 2, &[])?;
        }
        for _ in 0..ROUNDS {
            for &i in &pair {
                let (_, port, q) = servers[i];
                let (qps, avg, codes) = dnsperf(&ns, port, q, secs, &[])?;
                let (p50, p99) = dnsperf_p99(&ns, port, q, secs.min(3))?;
                let (_, p99_fixed) = dnsperf_p99_at(&ns, port, q, secs.min(3), Some(fixed))?;
                runs[i].push((qps, avg, codes, p50, p99, p99_fixed));
            }
        }
    }
    let median = |v: &[Run], f: fn(&Run) -> f64| -> f64 {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let mut rows = Vec::new();
    for ((name, _, _), r) in servers.iter().zip(&runs) {
        let qps = median(r, |x| x.0);
        // The response codes of the run with the median QPS.
        let codes = r
            .iter()
            .find(|x| x.0.total_cmp(&qps).is_eq())
            .map(|x| x.2.clone())
            .unwrap_or_default();
        rows.push((
            *name,
            qps,
            median(r, |x| x.1),
            median(r, |x| x.3),
            median(r, |x| x.4),
            median(r, |x| x.5),
            codes,
        ));
    }
    let knot_qps = rows[0].1;
    let knot_fwd = rows[3].1;
    for (i, (name, qps, avg, p50, p99, p99_fixed, codes)) in rows.iter().enumerate() {
        let base = if i >= 2 { knot_fwd } else { knot_qps };
        println!(
            "| {name} | {qps:.0} | {avg:.3} | {p50:.3} | {p99:.3} | {p99_fixed:.3} | {:.2} | {codes} |",
            qps / base
        );
    }
    autopath_bench(&ns, work.path(), &mdir, &mut guard)?;
    drop(guard);
    intercept_bench(secs)?;
    Ok(())
}

/// Alternating runs per server or path in the DNS benches (the median is kept).
const ROUNDS: usize = 3;

/// One dnsperf round of a server: QPS, avg ms, response codes, p50, p99 and p99 at a fixed
/// offered load.
type Run = (f64, f64, String, f64, f64, f64);

/// A pod's queries to the cluster DNS Service, three ways, from a process in the socket-LB
/// cgroup of a sandbox node (eBPF backend): intercepted to the node-local resolver; sent by
/// the socket LB to the Service's endpoint (another resolver, in a pod namespace) with
/// interception off; and to the node-local resolver addressed directly. dnsperf -c 32.
fn intercept_bench(secs: u32) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    use switchyard_tests::sandbox::{BackendSpec, Sandbox};
    let mut sb = Sandbox::create(
        "sybi",
        &[BackendSpec::new("k1", Ipv4Addr::new(10, 244, 1, 31))],
    )?;
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir)?;
    let mut m = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kube-dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}\naddressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]\nendpoints:\n- {addresses: [10.244.1.31], nodeName: node-a}\n",
    );
    let mut q = String::new();
    for i in 0..200u32 {
        let _ = write!(
            m,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: b}}\nspec: {{clusterIP: 10.97.{}.{}, ports: [{{name: http, port: 80}}]}}\n",
            i / 200,
            i % 200 + 1
        );
        let _ = writeln!(q, "svc{i}.b.svc.cluster.local A");
    }
    std::fs::write(dir.join("cluster.yaml"), &m)?;
    let queries = sb.dir.path().join("queries.txt");
    std::fs::write(&queries, q)?;
    // The Service's endpoint: a resolver with the same data in a pod namespace (CoreDNS's
    // place in a cluster).
    let pod = format!("{}-k1", sb.prefix);
    let mut endpoint = Command::new("ip")
        .args(["netns", "exec", &pod])
        .arg(bin("switchyard"))
        .args([
            "run",
            "--backend",
            "none",
            "--node-name",
            "node-a",
            "--source",
        ])
        .arg(format!("manifests:{}", dir.display()))
        .args([
            "--dns-listen",
            "10.244.1.31:53",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ])
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let cg = sb.cgroup.display().to_string();
    let node = sb.node_ns();
    let in_pod = |cmd: &str| -> anyhow::Result<String> {
        sh(&[
            "sh",
            "-c",
            &format!("echo $$ > {cg}/cgroup.procs && exec ip netns exec {node} {cmd}"),
        ])
    };
    let run = |server: &str, secs: u32| -> anyhow::Result<(f64, f64)> {
        let txt = in_pod(&format!(
            "dnsperf -s {server} -p 53 -d {} -c 32 -l {secs}",
            queries.display()
        ))?;
        let (qps, avg, _) = dnsperf_summary(&txt)?;
        Ok((qps, avg))
    };
    // Each path is compared with the resolver addressed directly through the same daemon, the
    // two alternating (A B A B A B), and the median of each kept: one daemon's start-up work
    // or a noisy second no longer decides a ratio.
    let median = |mut v: Vec<(f64, f64)>| -> (f64, f64) {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for (label, intercept, server) in [
        (
            "pod -> kube-dns ClusterIP, intercepted to the node-local resolver",
            true,
            "10.96.0.10",
        ),
        (
            "pod -> kube-dns ClusterIP -> its endpoint (socket LB, interception off)",
            false,
            "10.96.0.10",
        ),
    ] {
        sb.start_daemon(
            &dir,
            "ebpf",
            &format!(
                "dns:\n  listen: ['169.254.20.10:53']\n  upstream: ['127.0.0.1:9']\n  interceptClusterDNS: {intercept}\n"
            ),
        )?;
        for srv in [server, "169.254.20.10"] {
            let start = Instant::now();
            while in_pod(&format!(
                "dig +short +time=1 +tries=1 @{srv} svc1.b.svc.cluster.local"
            ))
            .unwrap_or_default()
            .trim()
                != "10.97.0.2"
            {
                if start.elapsed() > Duration::from_mins(1) {
                    let _ = endpoint.kill();
                    bail!("{label}: {srv} never answered:\n{}", sb.daemon_log());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        std::thread::sleep(Duration::from_millis(600));
        let _ = run(server, 1)?;
        let _ = run("169.254.20.10", 1)?;
        let (mut path, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            path.push(run(server, secs)?);
            direct.push(run("169.254.20.10", secs)?);
        }
        rows.push((label, median(path), median(direct)));
        sb.stop_daemon();
    }
    let _ = endpoint.kill();
    let _ = endpoint.wait();
    println!(
        "\n### A pod's queries to the cluster DNS Service (eBPF socket LB, dnsperf -c 32 -l {secs}s, 200 names, median of {ROUNDS} alternating runs)\n"
    );
    println!(
        "| path | QPS | avg ms | resolver addressed directly, same daemon: QPS | avg ms | QPS vs direct |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, (qps, avg), (dqps, davg)) in &rows {
        println!(
            "| {label} | {qps:.0} | {avg:.3} | {dqps:.0} | {davg:.3} | {:.2} |",
            qps / dqps
        );
    }
    Ok(())
}

/// A pod's lookup of a name outside its cluster zone with `ndots:5` (glibc's resolver,
/// `getent`): queries on the wire and time per lookup, with autopath and without (what
/// CoreDNS without autopath gives). The "pod" is this namespace's 127.0.0.1, listed as a Pod
/// of ns0; its cluster domain is cluster2.local and the names it looks up are Knot's
/// (cluster.local), reached through the forwarder.
fn autopath_bench(ns: &str, work: &Path, mdir: &Path, guard: &mut NsGuard) -> anyhow::Result<()> {
    let pod = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns0}\nspec: {nodeName: node-0, containers: []}\nstatus: {podIP: 127.0.0.1}\n";
    let pdir = work.join("manifests-pod");
    std::fs::create_dir_all(&pdir)?;
    std::fs::write(
        pdir.join("cluster.yaml"),
        std::fs::read_to_string(mdir.join("cluster.yaml"))? + pod,
    )?;
    // glibc's AI_ADDRCONFIG answers IPv4 only where the host has a non-loopback IPv4 address.
    sh(&["ip", "-n", ns, "addr", "add", "10.255.0.1/32", "dev", "lo"])?;
    let lookups: u32 = 200;
    let mut rows = Vec::new();
    for (label, addr, autopath, metrics) in [
        ("autopath on", "127.0.0.2", true, 10_262u16),
        ("autopath off (CoreDNS default)", "127.0.0.3", false, 10_263),
    ] {
        let cfg = work.join(format!("ap-{metrics}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "healthzBindAddress: ''\nmetricsBindAddress: 127.0.0.1:{metrics}\ndns:\n  upstream: ['127.0.0.1:5300']\n  autopath: {autopath}\n"
            ),
        )?;
        guard.1.push(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(bin("switchyard"))
                .args([
                    "run",
                    "--backend",
                    "none",
                    "--node-name",
                    "node-0",
                    "--cluster-domain",
                    "cluster2.local",
                    "--source",
                ])
                .arg(format!("manifests:{}", pdir.display()))
                .arg("--config")
                .arg(&cfg)
                .args(["--dns-listen", &format!("{addr}:53")])
                .env("SWITCHYARD_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let etc = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("resolv.conf"),
            format!(
                "search ns0.svc.cluster2.local svc.cluster2.local cluster2.local\nnameserver {addr}\noptions ndots:5 timeout:1 attempts:2\n"
            ),
        )?;
        let requests = || -> f64 {
            let out = http_get_in(
                ns,
                std::net::SocketAddr::from(([127, 0, 0, 1], metrics)),
                "/metrics",
            );
            out.lines()
                .filter(|l| l.starts_with("coredns_dns_requests_total{"))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum()
        };
        let script = |from: u32, to: u32| {
            format!(
                "for i in $(seq {from} {to}); do getent ahostsv4 svc$i.ns$((i % 10)).svc.cluster.local >/dev/null || exit 1; done"
            )
        };
        // Warm: the server is up and every name is in its cache.
        let start = Instant::now();
        while !Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &script(1, 1)])
            .status()?
            .success()
        {
            if start.elapsed() > Duration::from_mins(1) {
                bail!("{label}: the pod lookup never worked");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        sh(&["ip", "netns", "exec", ns, "sh", "-c", &script(1, lookups)])?;
        std::thread::sleep(Duration::from_millis(500));
        let before = requests();
        let t = Instant::now();
        sh(&["ip", "netns", "exec", ns, "sh", "-c", &script(1, lookups)])?;
        let took = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let queries = (requests() - before) / f64::from(lookups);
        rows.push((
            label,
            queries,
            took.as_secs_f64() * 1000.0 / f64::from(lookups),
        ));
        let _ = std::fs::remove_dir_all(&etc);
    }
    println!(
        "\n### A pod's lookup of a name outside its zone, ndots:5, 3 search domains (glibc getent, {lookups} lookups, answers cached)\n"
    );
    println!(
        "| server | queries per lookup | ms per lookup (incl. getent exec) | queries vs autopath off |"
    );
    println!("|---|---|---|---|");
    let off = rows[1].1;
    for (label, q, ms) in &rows {
        println!("| {label} | {q:.2} | {ms:.2} | {:.2} |", q / off);
    }
    Ok(())
}

/// iptables backend programming time (full sync and one-service update) at several sizes,
/// in a fresh network namespace, for one flavor.
fn iptables_sync_bench(sizes: &[u32]) -> anyhow::Result<()> {
    use switchyard::dataplane::Dataplane;
    use switchyard::dataplane::iptables::{Flavor, IptablesBackend, IptablesConfig};
    println!("\n### iptables backend programming (10 endpoints per service)\n");
    println!(
        "Switchyard: `full_sync` (save, render, one restore) into an empty namespace, then a one-endpoint change (`apply`). Peer: kube-proxy's rules from shared/peers/gen_iptables.py through `<flavor>-restore --noflush` into an empty namespace, then its `--update` partial sync; {PEER_TIMEOUT} s limit as in the peers' sync_time.sh.\n"
    );
    println!(
        "| flavor | N services | Switchyard full | kube-proxy full | full vs kube-proxy | Switchyard one-service | kube-proxy one-service | one-service vs kube-proxy |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for flavor in [Flavor::Legacy, Flavor::Nft] {
        for &n in sizes {
            let ns = format!("sybipt{n}");
            let _ = sh(&["ip", "netns", "del", &ns]);
            sh(&["ip", "netns", "add", &ns])?;
            let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
            // Measure in a thread that lives in the namespace.
            let r = std::thread::scope(|sc| {
                sc.spawn(|| -> anyhow::Result<(Duration, Duration)> {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let (svcs, slices) = synthetic::cluster(n, 10);
                    let mut e = Engine::new(ProxyConfig::default());
                    e.replace_all(svcs, slices);
                    e.sync();
                    let mut dp = IptablesBackend::start(
                        &IptablesConfig {
                            flavor,
                            cluster_cidrs: vec!["10.128.0.0/9".parse()?],
                            masquerade_all: false,
                            masquerade_bit: 14,
                        },
                        std::sync::Arc::new(switchyard::metrics::Metrics::new()),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let t = Instant::now();
                    dp.full_sync(e.state())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let full = t.elapsed();
                    let mut s = synthetic::slice(n / 2, 10);
                    s.endpoints[0].address = std::net::IpAddr::V4(Ipv4Addr::new(10, 127, 0, 1));
                    e.upsert_slice(s);
                    let cs = e.sync();
                    let t = Instant::now();
                    dp.apply(&cs, e.state())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok((full, t.elapsed()))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
            });
            let _ = sh(&["ip", "netns", "del", &ns]);
            let (full, one) = r?;
            let (kp_full, kp_one) = kube_proxy_restore(flavor.name(), n)?;
            let secs = |d: Option<Duration>| {
                d.map_or(format!("> {PEER_TIMEOUT} s"), |d| {
                    format!("{:.3} s", d.as_secs_f64())
                })
            };
            let ratio = |ours: Duration, peer: Option<Duration>| {
                peer.map_or(
                    format!(
                        "< {:.2}",
                        ours.as_secs_f64() / Duration::from_secs(PEER_TIMEOUT).as_secs_f64()
                    ),
                    |p| format!("{:.2}", ours.as_secs_f64() / p.as_secs_f64()),
                )
            };
            // Without a finished full sync the peer's partial sync is not measured.
            let (kp_one_s, one_ratio) = if kp_full.is_some() {
                (secs(kp_one), ratio(one, kp_one))
            } else {
                ("not run".to_string(), "-".to_string())
            };
            println!(
                "| {} | {n} | {:.3} s | {} | {} | {:.3} s | {kp_one_s} | {one_ratio} |",
                flavor.name(),
                full.as_secs_f64(),
                secs(kp_full),
                ratio(full, kp_full),
                one.as_secs_f64(),
            );
        }
    }
    Ok(())
}

const PEER_TIMEOUT: u64 = 300;

/// kube-proxy's rule set for N services restored into a fresh namespace (full sync) and
/// then its one-service partial sync; `None` past the time limit.
fn kube_proxy_restore(tool: &str, n: u32) -> anyhow::Result<(Option<Duration>, Option<Duration>)> {
    let gen_iptables =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/gen_iptables.py");
    let work = tempfile::tempdir()?;
    let full = work.path().join("full.txt");
    let update = work.path().join("update.txt");
    for (file, extra) in [(&full, ""), (&update, " --update")] {
        sh(&[
            "sh",
            "-c",
            &format!(
                "python3 {} {n} 10{extra} > {}",
                gen_iptables.display(),
                file.display()
            ),
        ])?;
    }
    let ns = format!("{}{n}", if smoke() { "sybkm" } else { "sybkp" });
    let _ = sh(&["ip", "netns", "del", &ns]);
    sh(&["ip", "netns", "add", &ns])?;
    let timed = |file: &Path| -> anyhow::Result<Option<Duration>> {
        let t = Instant::now();
        let status = Command::new("timeout")
            .arg(PEER_TIMEOUT.to_string())
            .args(["ip", "netns", "exec", &ns])
            .arg(format!("{tool}-restore"))
            .arg("--noflush")
            .stdin(std::fs::File::open(file)?)
            .stdout(Stdio::null())
            .status()?;
        let took = t.elapsed();
        if status.code() == Some(124) {
            return Ok(None);
        }
        if !status.success() {
            bail!("{tool}-restore of kube-proxy's rules failed: {status}");
        }
        Ok(Some(took))
    };
    let f = timed(&full);
    let u = match &f {
        Ok(Some(_)) => timed(&update),
        _ => Ok(None),
    };
    let _ = sh(&["ip", "netns", "del", &ns]);
    Ok((f?, u?))
}

fn main() -> anyhow::Result<()> {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "scale") {
        return scale::run(&args);
    }
    // Rounds of the connection-rate measurement: 3 unless quick or `--reps=N`.
    let reps = match args.iter().find_map(|a| a.strip_prefix("--reps=")) {
        Some(v) => v.parse().context("--reps=N")?,
        None if args.iter().any(|a| a == "--quick") => 1,
        None => 3,
    };
    if args.iter().any(|a| a == "iptables") {
        let quick = args.iter().any(|a| a == "--quick");
        let sizes: &[u32] = if quick {
            &[1000]
        } else {
            &[1000, 5000, 10_000]
        };
        iptables_sync_bench(sizes)?;
        return conn_bench(sizes, if quick { 3 } else { 8 }, reps);
    }
    if args.iter().any(|a| a == "dns") {
        let quick = args.iter().any(|a| a == "--quick");
        if args.iter().any(|a| a == "--intercept-only") {
            return intercept_bench(if quick { 3 } else { 10 });
        }
        let services = match args.iter().find_map(|a| a.strip_prefix("--services=")) {
            Some(n) => n.parse().context("--services=N")?,
            None if quick => 2000,
            None => 10_000,
        };
        return dns_bench(services, if quick { 3 } else { 10 });
    }
    let quick = args.iter().any(|a| a == "--quick");
    let services = if quick { 2000 } else { 10_000 };
    if !args.iter().any(|a| a == "conn") {
        maps_bench(services)?;
    }
    let sizes: Vec<u32> = if quick {
        vec![1, 1000]
    } else {
        vec![1, 1000, 10_000]
    };
    if let Some(list) = args.iter().find_map(|a| a.strip_prefix("--sizes=")) {
        let sizes: Vec<u32> = list
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("--sizes=N,N,...")?;
        return conn_bench(&sizes, if quick { 3 } else { 8 }, reps);
    }
    conn_bench(&sizes, if quick { 3 } else { 8 }, reps)?;
    Ok(())
}
