//! `cargo xtask soak` (root): restarts and upgrades under load, in the sandbox.
//!
//! For each backend, while load runs through every path, the daemon is stopped (SIGTERM) and
//! started again, killed (SIGKILL) and started again, and replaced by a different build (an
//! upgrade: SIGTERM to the old binary, the new one started on the same pinned state). The
//! load, each kind in its own process:
//! - short connections (a new TCP connection per request, several workers, as wrk makes
//!   them) to a ClusterIP from the node (eBPF: socket LB), to the same ClusterIP from a pod
//!   (eBPF: tc path), to a NodePort from an outside client, and to a ClientIP-affinity
//!   ClusterIP from a pod (affinity kept: one backend answers all of them);
//! - long-lived streams (keep-alive requests every 50 ms on one connection) on the same
//!   three paths: a stream is broken by its first failed request;
//! - DNS lookups from a pod to the cluster DNS Service (intercepted to the node-local
//!   resolver while it serves), one query per socket as a stub resolver sends them.
//!
//! Prints one table (attempted / failed / reset / longest outage per path and event) and
//! with `--json FILE` writes the same rows for a test to check.
//!
//! `sy-soak tamper` instead damages the kernel state by hand, one act at a time, while the
//! daemon runs (service and backend map entries deleted, tc and cgroup programs detached,
//! map pins removed, SY- chains flushed and deleted, the DNS listen address deleted) and
//! times how long until traffic flows again, with the default syncPeriod and a short one.
//!
//! sy-soak [--backend ebpf|iptables]... [--from BIN] [--to BIN] [--load-ms MS] [--gap-ms MS]
//!         [--rounds N] [--json FILE]
//! `--from` is the build that runs first (default: the `switchyard` beside this binary),
//! `--to` the build the upgrade installs (required).
//! sy-soak tamper [--backend B]... [--sync-period P]... [--only TEXT] [--json FILE]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use switchyard_model::fixtures::{self, Port};
use switchyard_tests::client::{CLUSTER_DNS_SERVER, dns_a, error_kind, http};
use switchyard_tests::sandbox::{BackendSpec, Sandbox, require_root};

const TIMEOUT: Duration = Duration::from_millis(500);
const NODE_IP: &str = "172.30.0.10";

/// What one load process saw.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Tally {
    attempted: u64,
    failed: u64,
    reset: u64,
    /// The longest time from the start of a failed request to the next success (of any
    /// thread), in ms: how long the path was out (0 without failures).
    outage_ms: u64,
    /// Who answered, and how often.
    backends: BTreeMap<String, u64>,
    streams: u64,
    broken: u64,
    /// The first few failures, named, and the last.
    errors: Vec<String>,
    last_error: String,
}

#[derive(Debug)]
struct Shared {
    started: Instant,
    tally: Mutex<Tally>,
    /// The first failure since the last success.
    first_fail: Mutex<Option<Instant>>,
    stop: AtomicBool,
}

impl Shared {
    fn ok(&self, body: &str) {
        let outage = self
            .first_fail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|since| since.elapsed());
        let mut t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = outage {
            t.outage_ms = t
                .outage_ms
                .max(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        t.attempted += 1;
        let who = body.split_whitespace().next().unwrap_or("?").to_string();
        *t.backends.entry(who).or_default() += 1;
    }

    /// A request begun at `began` failed.
    fn fail(&self, what: &str, began: Instant) {
        let now = Instant::now();
        let mut first = self
            .first_fail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = *first.get_or_insert(began);
        let mut t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.attempted += 1;
        t.failed += 1;
        if what.starts_with("reset") {
            t.reset += 1;
        }
        t.outage_ms = t
            .outage_ms
            .max(u64::try_from(now.duration_since(first).as_millis()).unwrap_or(u64::MAX));
        let at = now.duration_since(self.started).as_millis();
        if t.errors.len() < 5 {
            t.errors.push(format!("{what} (at {at} ms)"));
        } else {
            t.last_error = format!("{what} (at {at} ms)");
        }
    }
}

/// `sy-soak worker MODE TARGET [--cgroup DIR] [--netns NAME] [--threads N]`: load until
/// stdin closes, then print the tally as JSON. MODE: conn, stream, dns.
fn worker(args: &[String]) -> anyhow::Result<()> {
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(mode), Some(target)) = (args.first(), args.get(1)) else {
        bail!("worker MODE TARGET")
    };
    let addr: SocketAddr = target.parse().with_context(|| target.clone())?;
    if let Some(cg) = get("--cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(ns) = get("--netns") {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let threads: usize = get("--threads").and_then(|t| t.parse().ok()).unwrap_or(1);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        tally: Mutex::new(Tally::default()),
        first_fail: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    let ids = Arc::new(AtomicU16::new(1));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let sh = shared.clone();
        let mode = mode.clone();
        let ids = ids.clone();
        handles.push(std::thread::spawn(move || match mode.as_str() {
            "conn" => conn_loop(&sh, addr),
            "stream" => stream_loop(&sh, addr),
            _ => dns_loop(&sh, addr, &ids),
        }));
    }
    // Ready once every stream is connected (a stream that cannot connect counts as broken).
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    shared.stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    let t = shared
        .tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    println!("{}", serde_json::to_string(&t)?);
    Ok(())
}

/// New connections back to back (one request each), at most about 100/s per thread: one
/// client address towards two backends has about 28k source ports and each closed
/// connection holds its tuple for a minute in TIME_WAIT (at the backend), so a faster loop
/// measures the tuple space, not the dataplane.
fn conn_loop(sh: &Shared, addr: SocketAddr) {
    while !sh.stop.load(Ordering::SeqCst) {
        let began = Instant::now();
        let r = TcpStream::connect_timeout(&addr, TIMEOUT).and_then(|mut s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            http(&mut s, false)
        });
        match r {
            Ok(body) => sh.ok(&body),
            Err(e) => sh.fail(&format!("{} {e}", error_kind(&e)), began),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One connection for the whole run, a keep-alive request every 50 ms.
fn stream_loop(sh: &Shared, addr: SocketAddr) {
    let began = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            sh.fail(&format!("connect {} {e}", error_kind(&e)), began);
            let mut t = sh
                .tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.streams += 1;
            t.broken += 1;
            return;
        }
    };
    {
        let mut t = sh
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.streams += 1;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    while !sh.stop.load(Ordering::SeqCst) {
        let began = Instant::now();
        match http(&mut s, true) {
            Ok(body) => sh.ok(&body),
            Err(e) => {
                sh.fail(&format!("{} {e}", error_kind(&e)), began);
                let mut t = sh
                    .tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.broken += 1;
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lookup every 5 ms, each from a fresh socket with a 500 ms timeout and no retry.
fn dns_loop(sh: &Shared, addr: SocketAddr, ids: &AtomicU16) {
    while !sh.stop.load(Ordering::SeqCst) {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let began = Instant::now();
        match dns_a(addr, "web.t.svc.cluster.local", id, TIMEOUT) {
            Ok(n) if n > 0 => sh.ok("dns"),
            Ok(_) => sh.fail("no answer", began),
            Err(e) => sh.fail(&format!("{} {e}", error_kind(&e)), began),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Load {
    path: &'static str,
    kind: &'static str,
    child: Child,
}

fn spawn(
    sb: &Sandbox,
    path: &'static str,
    kind: &'static str,
    args: &[&str],
) -> anyhow::Result<Load> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("worker")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        // Read the "ready" line byte by byte so nothing after it is buffered away.
        let mut b = [0u8; 1];
        while out.read(&mut b)? == 1 && b[0] != b'\n' {
            line.push(char::from(b[0]));
        }
    }
    if line != "ready" {
        let _ = child.kill();
        bail!(
            "{path}: load process did not start ({line:?})\n{}",
            sb.daemon_log()
        );
    }
    Ok(Load { path, kind, child })
}

fn finish(l: Load) -> anyhow::Result<(String, String, Tally)> {
    let Load {
        path,
        kind,
        mut child,
    } = l;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let t: Tally = serde_json::from_str(last).with_context(|| format!("{path}: {text}"))?;
    Ok((path.to_string(), kind.to_string(), t))
}

/// One row of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    backend: String,
    event: String,
    path: String,
    kind: String,
    tally: Tally,
    /// From the restart to the dataplane answering on every path again, in ms.
    ready_ms: u64,
}

fn manifests() -> String {
    let node = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE_IP}}}]\n"
    );
    let web = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.70\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30170}\n";
    let sticky = "---\napiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: t}\nspec:\n  clusterIP: 10.96.0.71\n  sessionAffinity: ClientIP\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";
    let eps = [
        ("10.244.1.11", Some("node-a")),
        ("10.244.1.12", Some("node-a")),
    ];
    let slices = fixtures::slice("t", "web", "web-1", &[Port::tcp("http", 8080)], &eps)
        + &fixtures::slice("t", "sticky", "sticky-1", &[Port::tcp("http", 8080)], &eps);
    let dns = fixtures::service(
        "kube-system",
        "kube-dns",
        "10.96.0.10",
        &[Port::udp("dns", 53).to(10053)],
    ) + &fixtures::slice(
        "kube-system",
        "kube-dns",
        "kube-dns-1",
        &[Port::udp("dns", 10053)],
        &[("10.244.1.31", Some("node-a"))],
    );
    format!("{node}{web}{sticky}{slices}{dns}")
}

const CONFIG: &str = "dns:\n  listen: ['169.254.20.10:53']\n  upstream: ['127.0.0.1:9']\n";

struct Opts {
    from: PathBuf,
    to: PathBuf,
    load: Duration,
    gap: Duration,
    rounds: usize,
}

/// Every path answers (the dataplane and the node-local resolver are back).
fn wait_ready(sb: &Sandbox, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let ok = |v: anyhow::Result<Vec<String>>| {
            v.is_ok_and(|l| !l.is_empty() && l.iter().all(|l| l.starts_with("ok ")))
        };
        let np = ok(sb.probe_from_client(&["--tcp", &format!("{NODE_IP}:30170")]));
        let cip = ok(sb.probe_from_backend("p1", &["--tcp", "10.96.0.70:80"]));
        let sock = ok(sb.probe_from_cgroup(&["--tcp", "10.96.0.70:80"]));
        let dns = switchyard_tests::sandbox::in_netns(&sb.node_ns(), || {
            dns_a(
                "169.254.20.10:53".parse().map_err(std::io::Error::other)?,
                "web.t.svc.cluster.local",
                7,
                TIMEOUT,
            )
        })
        .is_ok_and(|r| r.is_ok_and(|n| n > 0));
        if np && cip && sock && dns {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "not serving after {within:?}: NodePort {np}, ClusterIP from a pod {cip}, \
                 socket LB {sock}, node-local DNS {dns}\n{}",
                sb.daemon_log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_backend(backend: &str, o: &Opts) -> anyhow::Result<Vec<Row>> {
    let tag = if backend == "ebpf" { "e" } else { "i" };
    let mut sb = Sandbox::create(
        &format!("syk{tag}"),
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("a2", Ipv4Addr::new(10, 244, 1, 12)),
            BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21)),
            BackendSpec::new("d1", Ipv4Addr::new(10, 244, 1, 31)),
        ],
    )?;
    let mut dns = Command::new("ip")
        .args(["netns", "exec", &format!("{}-d1", sb.prefix)])
        .args(["python3", "-c", CLUSTER_DNS_SERVER, "10053", "10.96.0.70"])
        .arg(sb.dir.path().join("endpoint-queries"))
        .stdout(Stdio::null())
        .spawn()?;
    let result = (|| {
        let dir = sb.dir.path().join("manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("all.yaml"), manifests())?;
        sb.daemon_binary = Some(o.from.clone());
        sb.start_daemon(&dir, backend, CONFIG)?;
        wait_ready(&sb, Duration::from_secs(30))?;
        let mut rows = Vec::new();
        let events = [
            "none (baseline)",
            "SIGTERM, restart",
            "SIGKILL, restart",
            "upgrade",
        ];
        for round in 0..o.rounds {
            for event in events {
                let cg = sb.cgroup.display().to_string();
                let (node, client) = (sb.node_ns(), sb.client_ns());
                let pod = format!("{}-p1", sb.prefix);
                let np = format!("{NODE_IP}:30170");
                let loads = vec![
                    spawn(
                        &sb,
                        "ClusterIP from the node",
                        "conn",
                        &[
                            "conn",
                            "10.96.0.70:80",
                            "--cgroup",
                            &cg,
                            "--netns",
                            &node,
                            "--threads",
                            "2",
                        ],
                    )?,
                    spawn(
                        &sb,
                        "ClusterIP from a pod",
                        "conn",
                        &["conn", "10.96.0.70:80", "--netns", &pod, "--threads", "2"],
                    )?,
                    spawn(
                        &sb,
                        "NodePort from outside",
                        "conn",
                        &["conn", &np, "--netns", &client, "--threads", "2"],
                    )?,
                    spawn(
                        &sb,
                        "affinity ClusterIP from a pod",
                        "affinity",
                        &["conn", "10.96.0.71:80", "--netns", &pod],
                    )?,
                    spawn(
                        &sb,
                        "ClusterIP from the node",
                        "stream",
                        &[
                            "stream",
                            "10.96.0.70:80",
                            "--cgroup",
                            &cg,
                            "--netns",
                            &node,
                            "--threads",
                            "4",
                        ],
                    )?,
                    spawn(
                        &sb,
                        "ClusterIP from a pod",
                        "stream",
                        &["stream", "10.96.0.70:80", "--netns", &pod, "--threads", "4"],
                    )?,
                    spawn(
                        &sb,
                        "NodePort from outside",
                        "stream",
                        &["stream", &np, "--netns", &client, "--threads", "4"],
                    )?,
                    spawn(
                        &sb,
                        "cluster DNS from a pod",
                        "dns",
                        &["dns", "10.96.0.10:53", "--cgroup", &cg, "--netns", &pod],
                    )?,
                ];
                std::thread::sleep(o.load / 2);
                let ready = if event.starts_with("none") {
                    std::thread::sleep(o.gap);
                    Duration::ZERO
                } else {
                    if event.starts_with("SIGKILL") {
                        sb.kill_daemon();
                    } else {
                        sb.stop_daemon();
                    }
                    std::thread::sleep(o.gap);
                    if event == "upgrade" {
                        // Upgrades alternate between the two builds, so each round is one.
                        let next = if round % 2 == 0 { &o.to } else { &o.from };
                        sb.daemon_binary = Some(next.clone());
                    }
                    sb.start_daemon(&dir, backend, CONFIG)?;
                    wait_ready(&sb, Duration::from_secs(30))?
                };
                std::thread::sleep(o.load / 2);
                for l in loads {
                    let (path, kind, tally) = finish(l)?;
                    rows.push(Row {
                        backend: backend.to_string(),
                        event: if o.rounds > 1 {
                            format!("{event} #{}", round + 1)
                        } else {
                            event.to_string()
                        },
                        path,
                        kind,
                        tally,
                        ready_ms: u64::try_from(ready.as_millis()).unwrap_or(u64::MAX),
                    });
                }
            }
        }
        sb.stop_daemon();
        Ok(rows)
    })();
    let _ = dns.kill();
    let _ = dns.wait();
    result
}

fn print(rows: &[Row]) {
    println!(
        "{:<8} {:<18} {:<30} {:<8} {:>9} {:>6} {:>5} {:>9} {:>8}  notes",
        "backend", "event", "path", "load", "attempted", "failed", "reset", "outage ms", "ready ms"
    );
    for r in rows {
        let t = &r.tally;
        let notes = match r.kind.as_str() {
            "stream" => format!("{} streams, {} broken", t.streams, t.broken),
            "affinity" => format!(
                "{} backend(s) answered{}",
                t.backends.len(),
                if t.backends.len() == 1 {
                    " (kept)"
                } else {
                    " (NOT kept)"
                }
            ),
            _ => String::new(),
        };
        let errors = if t.errors.is_empty() {
            String::new()
        } else {
            format!(" first errors: {:?}; last: {}", t.errors, t.last_error)
        };
        println!(
            "{:<8} {:<18} {:<30} {:<8} {:>9} {:>6} {:>5} {:>9} {:>8}  {notes}{errors}",
            r.backend,
            r.event,
            r.path,
            r.kind,
            t.attempted,
            t.failed,
            t.reset,
            t.outage_ms,
            r.ready_ms
        );
    }
}

/// Which path a tamper action breaks, probed every 20 ms.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// ClusterIP from a pod (eBPF: tc path).
    PodClusterIp,
    /// ClusterIP from the node's cgroup (eBPF: socket LB).
    NodeClusterIp,
    /// NodePort from the outside client.
    NodePort,
    /// The node-local resolver at its listen address.
    Dns,
}

impl Probe {
    fn name(self) -> &'static str {
        match self {
            Probe::PodClusterIp => "ClusterIP from a pod",
            Probe::NodeClusterIp => "ClusterIP from the node",
            Probe::NodePort => "NodePort from outside",
            Probe::Dns => "DNS at the listen address",
        }
    }

    fn ok(self, sb: &Sandbox) -> bool {
        let all_ok = |v: anyhow::Result<Vec<String>>| {
            v.is_ok_and(|l| !l.is_empty() && l.iter().all(|l| l.starts_with("ok ")))
        };
        let t = ["--timeout-ms", "200"];
        match self {
            Probe::PodClusterIp => {
                all_ok(sb.probe_from_backend("p1", &[&["--tcp", "10.96.0.70:80"][..], &t].concat()))
            }
            Probe::NodeClusterIp => {
                all_ok(sb.probe_from_cgroup(&[&["--tcp", "10.96.0.70:80"][..], &t].concat()))
            }
            Probe::NodePort => all_ok(
                sb.probe_from_client(&[&["--tcp", &format!("{NODE_IP}:30170")][..], &t].concat()),
            ),
            Probe::Dns => switchyard_tests::sandbox::in_netns(&sb.node_ns(), || {
                dns_a(
                    "169.254.20.10:53".parse().map_err(std::io::Error::other)?,
                    "web.t.svc.cluster.local",
                    9,
                    Duration::from_millis(200),
                )
            })
            .is_ok_and(|r| r.is_ok_and(|n| n > 0)),
        }
    }
}

/// One act of damage, as an operator's tool or another agent would do it.
struct Tamper {
    what: &'static str,
    backend: &'static str,
    probe: Probe,
    /// Shell commands, run with PIN (the pin directory), NODE (the node namespace) and
    /// CGROUP set.
    script: &'static str,
    /// When traffic is unaffected: how the repair shows (a shell check, with the same
    /// variables, that succeeds once the damaged state is back).
    restored: Option<&'static str>,
}

const TAMPERS: &[Tamper] = &[
    Tamper {
        what: "service map entries deleted",
        backend: "ebpf",
        probe: Probe::PodClusterIp,
        script: r#"m=$PIN/SY_FRONTENDS4; bpftool -j map dump pinned $m | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    print(" ".join(e["key"]))' | while read -r k; do bpftool map delete pinned $m key hex $k; done"#,
        restored: None,
    },
    Tamper {
        what: "backend map entries deleted",
        backend: "ebpf",
        probe: Probe::NodePort,
        script: r#"m=$PIN/SY_BACKENDS; bpftool -j map dump pinned $m | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    print(" ".join(e["key"]))' | while read -r k; do bpftool map delete pinned $m key hex $k; done"#,
        restored: None,
    },
    Tamper {
        what: "tc programs detached",
        backend: "ebpf",
        probe: Probe::NodePort,
        script: r"for l in $PIN/links/tc-*; do bpftool link detach pinned $l; done",
        restored: None,
    },
    Tamper {
        what: "cgroup programs detached",
        backend: "ebpf",
        probe: Probe::NodeClusterIp,
        script: r"for l in $PIN/links/*; do case $(basename $l) in tc-*) ;; *) bpftool link detach pinned $l;; esac; done",
        restored: None,
    },
    Tamper {
        what: "map pins removed",
        backend: "ebpf",
        probe: Probe::NodePort,
        script: r"rm $PIN/SY_FRONTENDS4 $PIN/SY_BACKENDS",
        restored: Some(r"test -e $PIN/SY_FRONTENDS4 && test -e $PIN/SY_BACKENDS"),
    },
    Tamper {
        what: "DNS listen address deleted",
        backend: "ebpf",
        probe: Probe::Dns,
        script: r"ip -n $NODE -o addr show | awk '/169\.254\.20\.10\// {print $2}' | while read -r d; do ip -n $NODE addr del 169.254.20.10/32 dev $d; done",
        restored: None,
    },
    Tamper {
        what: "SY-SERVICES chain flushed",
        backend: "iptables",
        probe: Probe::PodClusterIp,
        script: r"for t in iptables-legacy iptables-nft; do ip netns exec $NODE $t -w -t nat -F SY-SERVICES 2>/dev/null || true; done",
        restored: None,
    },
    Tamper {
        what: "every SY- chain deleted",
        backend: "iptables",
        probe: Probe::NodePort,
        script: DELETE_SY_CHAINS,
        restored: None,
    },
    Tamper {
        what: "DNS listen address deleted",
        backend: "iptables",
        probe: Probe::Dns,
        script: r"ip -n $NODE -o addr show | awk '/169\.254\.20\.10\// {print $2}' | while read -r d; do ip -n $NODE addr del 169.254.20.10/32 dev $d; done",
        restored: None,
    },
    Tamper {
        what: "IPVS virtual services deleted",
        backend: "ipvs",
        probe: Probe::PodClusterIp,
        script: r"ip netns exec $NODE ipvsadm -C",
        restored: None,
    },
    Tamper {
        what: "VIPs removed from sy-ipvs0",
        backend: "ipvs",
        probe: Probe::PodClusterIp,
        script: r"ip -n $NODE addr flush dev sy-ipvs0",
        restored: None,
    },
    Tamper {
        what: "every SY- chain deleted",
        backend: "ipvs",
        // IPVS forwards without the companion chains (they masquerade and filter): the
        // repair shows as the chains being back.
        probe: Probe::NodePort,
        script: DELETE_SY_CHAINS,
        restored: Some(
            r"for t in iptables-nft iptables-legacy; do ip netns exec $NODE $t -w -t nat -S SY-SERVICES >/dev/null 2>&1 && exit 0; done; exit 1",
        ),
    },
];

/// Every `SY-` chain and the jumps to it, in both iptables flavours and both tables.
const DELETE_SY_CHAINS: &str = r"set +e
for t in iptables-legacy iptables-nft; do for tab in nat filter; do
  ip netns exec $NODE $t -w -t $tab -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j SY-' | sed 's/^-A/-D/' | while read -r r; do eval ip netns exec $NODE $t -w -t $tab $r; done
  for c in $(ip netns exec $NODE $t -w -t $tab -S 2>/dev/null | awk '/^-N SY-/ {print $2}'); do ip netns exec $NODE $t -w -t $tab -F $c; done
  for c in $(ip netns exec $NODE $t -w -t $tab -S 2>/dev/null | awk '/^-N SY-/ {print $2}'); do ip netns exec $NODE $t -w -t $tab -X $c; done
done; done; true";

/// One row of the tamper table.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Repair {
    backend: String,
    sync_period: String,
    what: String,
    path: String,
    /// Whether the damage stopped traffic at all.
    broke: bool,
    /// From the damage to traffic flowing again (or the state restored), in ms; `None`: not
    /// repaired within the limit.
    repaired_ms: Option<u64>,
    /// Whether the repair was seen as the state being back (traffic does not need it).
    #[serde(default)]
    restored_check: bool,
}

fn tamper_backend(
    backend: &str,
    period: &str,
    limit: Duration,
    only: Option<&str>,
) -> anyhow::Result<Vec<Repair>> {
    let tag = match backend {
        "ebpf" => "te",
        "ipvs" => "tv",
        _ => "ti",
    };
    let mut sb = Sandbox::create(
        &format!("syk{tag}"),
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("a2", Ipv4Addr::new(10, 244, 1, 12)),
            BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21)),
            BackendSpec::new("d1", Ipv4Addr::new(10, 244, 1, 31)),
        ],
    )?;
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("all.yaml"), manifests())?;
    sb.start_daemon(&dir, backend, &format!("{CONFIG}syncPeriod: {period}\n"))?;
    let mut rows = Vec::new();
    for t in TAMPERS
        .iter()
        .filter(|t| t.backend == backend && only.is_none_or(|o| t.what.contains(o)))
    {
        wait_ready(&sb, Duration::from_mins(1))?;
        // Let a sync that the previous repair started finish first.
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("bash")
            .args(["-c", &format!("set -eo pipefail\n{}", t.script)])
            .env("PIN", &sb.pin_dir)
            .env("NODE", sb.node_ns())
            .env("CGROUP", &sb.cgroup)
            .output()?;
        let at = Instant::now();
        if !out.status.success() {
            bail!("{}: {}", t.what, String::from_utf8_lossy(&out.stderr));
        }
        let mut broke = false;
        let mut repaired = None;
        while at.elapsed() < limit {
            let ok = t.probe.ok(&sb);
            let restored = t.restored.is_none_or(|check| {
                Command::new("bash")
                    .args(["-c", check])
                    .env("PIN", &sb.pin_dir)
                    .env("NODE", sb.node_ns())
                    .env("CGROUP", &sb.cgroup)
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !ok {
                broke = true;
            } else if (broke || t.restored.is_some()) && restored {
                repaired = Some(at.elapsed());
                break;
            } else if !broke && at.elapsed() > Duration::from_secs(2) && t.restored.is_none() {
                // Two seconds with traffic flowing: the damage did not reach it.
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !sb.daemon_running() {
            bail!("{}: the daemon exited\n{}", t.what, sb.daemon_log());
        }
        let row = Repair {
            backend: backend.into(),
            sync_period: period.into(),
            what: t.what.into(),
            path: t.probe.name().into(),
            broke,
            repaired_ms: repaired.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            restored_check: t.restored.is_some(),
        };
        eprintln!("tamper: {row:?}");
        rows.push(row);
        if repaired.is_none() && (broke || t.restored.is_some()) {
            let log = sb.daemon_log();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            eprintln!("tamper: {} not repaired; the daemon's log ends:", t.what);
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            // Not repaired: start afresh so the next row measures its own damage.
            sb.stop_daemon();
            sb.start_daemon(&dir, backend, &format!("{CONFIG}syncPeriod: {period}\n"))?;
        }
    }
    sb.stop_daemon();
    Ok(rows)
}

fn print_repairs(rows: &[Repair]) {
    println!(
        "{:<9} {:<11} {:<30} {:<26} {:>12}",
        "backend", "syncPeriod", "damage", "path probed", "repaired in"
    );
    for r in rows {
        let repaired = match (r.broke, r.repaired_ms) {
            (_, Some(ms)) if r.broke => format!("{:.2} s", Duration::from_millis(ms).as_secs_f64()),
            (_, Some(ms)) => format!(
                "{:.2} s (traffic unaffected)",
                Duration::from_millis(ms).as_secs_f64()
            ),
            (false, None) => "traffic unaffected".to_string(),
            (true, None) => "NOT repaired".to_string(),
        };
        println!(
            "{:<9} {:<11} {:<30} {:<26} {:>12}",
            r.backend, r.sync_period, r.what, r.path, repaired
        );
    }
}

/// `sy-soak tamper [--backend B]... [--sync-period P]... [--json FILE]`
fn tamper_main(args: &[String]) -> anyhow::Result<()> {
    let many = |flag: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    };
    let mut backends = many("--backend");
    if backends.is_empty() {
        backends = vec!["ebpf".into(), "iptables".into()];
        if switchyard_tests::sandbox::kernel_has_ipvs() {
            backends.push("ipvs".into());
        } else {
            eprintln!(
                "tamper: ipvs NOT RUN on this kernel (no IPVS): `cargo xtask vm-test --test soak -- ipvs` runs it on Debian's 6.1"
            );
        }
    } else if backends.iter().any(|b| b == "ipvs") && !switchyard_tests::sandbox::kernel_has_ipvs()
    {
        bail!("--backend ipvs: this kernel has no IPVS (CONFIG_IP_VS; /proc/net/ip_vs is missing)");
    }
    let mut periods = many("--sync-period");
    if periods.is_empty() {
        periods = vec!["30s".into(), "2s".into()];
    }
    let mut rows = Vec::new();
    for p in &periods {
        let limit = switchyard::config::parse_duration(p)
            .map_err(|e| anyhow::anyhow!("--sync-period {p}: {e}"))?
            + Duration::from_secs(10);
        for b in &backends {
            rows.extend(tamper_backend(
                b,
                p,
                limit,
                many("--only").last().map(String::as_str),
            )?);
        }
    }
    print_repairs(&rows);
    if let Some(f) = many("--json").last() {
        std::fs::write(f, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        return worker(&args[1..]);
    }
    require_root();
    if args.first().map(String::as_str) == Some("tamper") {
        return tamper_main(&args[1..]);
    }
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mut backends: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--backend")
        .map(|w| w[1].clone())
        .collect();
    if backends.is_empty() {
        backends = vec!["ebpf".into(), "iptables".into()];
    }
    let ms = |flag: &str, default: u64| {
        Duration::from_millis(get(flag).and_then(|v| v.parse().ok()).unwrap_or(default))
    };
    let from = get("--from").map_or_else(
        || switchyard_tests::sandbox::bin("switchyard"),
        PathBuf::from,
    );
    let Some(to) = get("--to").map(PathBuf::from) else {
        bail!("--to BIN: the build the upgrade installs (e.g. target/release/switchyard)")
    };
    for b in [&from, &to] {
        if !Path::new(b).is_file() {
            bail!("{}: no such build of switchyard", b.display());
        }
    }
    if std::fs::read(&from)? == std::fs::read(&to)? {
        bail!("--from and --to are the same build: an upgrade needs two");
    }
    let o = Opts {
        from,
        to,
        load: ms("--load-ms", 4000),
        gap: ms("--gap-ms", 1500),
        rounds: get("--rounds").and_then(|r| r.parse().ok()).unwrap_or(1),
    };
    println!(
        "soak: upgrade {} <-> {}; {:?} of load around each event, {:?} with no daemon",
        o.from.display(),
        o.to.display(),
        o.load,
        o.gap
    );
    let mut rows = Vec::new();
    for b in &backends {
        rows.extend(run_backend(b, &o)?);
    }
    print(&rows);
    if let Some(f) = get("--json") {
        std::fs::write(&f, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
