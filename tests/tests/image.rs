//! The container image (`cargo xtask image`: localhost/switchyard:VERSION) run as the
//! DaemonSet in `deploy/switchyard.yaml` runs it: host network (the sandbox's node
//! namespace), exactly the DaemonSet's capabilities, its mounts (bpffs, cgroup, the xtables
//! lock, /lib/modules, the ConfigMap as /etc/switchyard), the image's own entrypoint and
//! tools. This machine's podman cannot start containers (its OCI runtimes fail to set
//! rlimits without CAP_SYS_RESOURCE in the bounding set), so the image's root filesystem
//! comes from `podman image mount` and runs under unshare + chroot + setpriv, which is what
//! the runtime would do. Traffic flows for the eBPF and iptables backends, and a rolling
//! update (old pod stopped, new pod started with the pinned state) keeps established
//! connections and every DNS query from a pod answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_model::fixtures::{self, Port};
use switchyard_tests::client::CLUSTER_DNS_SERVER;
use switchyard_tests::sandbox::{
    BackendSpec, EtcNetns, Sandbox, bin, daemonset_capabilities, require_root, sh,
};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.10}]\n";
const IMAGE: &str = concat!("localhost/switchyard:", env!("CARGO_PKG_VERSION"));

/// The image's root filesystem, mounted read-only by podman for the test's lifetime.
struct ImageMount(PathBuf);

impl ImageMount {
    fn new() -> ImageMount {
        let exists = Command::new("podman")
            .args(["image", "exists", IMAGE])
            .status()
            .expect("podman (scripts/bootstrap.sh installs it)");
        assert!(
            exists.success(),
            "no image {IMAGE}: build it with `cargo xtask image` (`cargo xtask test` does)"
        );
        let out = Command::new("podman")
            .args(["image", "mount", IMAGE])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman image mount {IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ImageMount(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["image", "unmount", IMAGE])
            .output();
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn manifests() -> String {
    let web = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.80\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30180}\n";
    let slice = fixtures::slice(
        "t",
        "web",
        "web-1",
        &[Port::tcp("http", 8080)],
        &[("10.244.1.11", Some("node-a"))],
    );
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
    format!("{NODE}{web}{slice}{dns}")
}

struct Pod {
    sb: Sandbox,
    dir: PathBuf,
    netns: String,
    _etc: EtcNetns,
    _dns: Killed,
    _image: ImageMount,
}

const CONFIG: &str = "healthzBindAddress: 127.0.0.1:10256\nmetricsBindAddress: 127.0.0.1:10249\ndns:\n  listen: ['169.254.20.10:53']\n  upstream: ['127.0.0.1:9']\n";

fn start(tag: &str, backend: &str) -> Pod {
    require_root();
    let image = ImageMount::new();
    let mut sb = Sandbox::create(
        &format!("sym{tag}"),
        &[
            BackendSpec::new("a1", Ipv4Addr::new(10, 244, 1, 11)),
            BackendSpec::new("p1", Ipv4Addr::new(10, 244, 1, 21)),
            BackendSpec::new("d1", Ipv4Addr::new(10, 244, 1, 31)),
        ],
    )
    .unwrap();
    let dns = Command::new("ip")
        .args(["netns", "exec", &format!("{}-d1", sb.prefix)])
        .args(["python3", "-c", CLUSTER_DNS_SERVER, "10053", "10.96.0.80"])
        .arg(sb.dir.path().join("endpoint-queries"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pod = format!("{}-p1", sb.prefix);
    let etc = EtcNetns::resolv_conf(
        &pod,
        "search t.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5 timeout:1 attempts:2\n",
    )
    .unwrap();
    let dir = sb.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    sb.capabilities = Some(daemonset_capabilities());
    sb.image_root = Some(image.0.clone());
    sb.start_daemon(&dir, backend, CONFIG).unwrap();
    Pod {
        sb,
        dir,
        netns: pod,
        _etc: etc,
        _dns: Killed(dns),
        _image: image,
    }
}

impl Pod {
    /// Queries the kube-dns endpoint (the cluster's own DNS) has answered.
    fn endpoint_queries(&self) -> u64 {
        std::fs::read_to_string(self.sb.dir.path().join("endpoint-queries"))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Run `cmd` in the pod namespace as a process of the socket-LB cgroup.
    fn in_pod(&self, cmd: &str) -> String {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} {cmd}",
            self.sb.cgroup.display(),
            self.netns
        );
        sh(&["sh", "-c", &script]).unwrap_or_else(|e| e.to_string())
    }

    fn wait_serving(&self, what: &str) {
        let start = Instant::now();
        loop {
            let np = self
                .sb
                .probe_from_client(&["--tcp", "172.30.0.10:30180"])
                .unwrap_or_default();
            let cip = self
                .sb
                .probe_from_backend("p1", &["--tcp", "10.96.0.80:80"])
                .unwrap_or_default();
            let dns = self.in_pod("getent hosts web");
            if np.iter().all(|l| l.starts_with("ok a1"))
                && !np.is_empty()
                && cip.iter().all(|l| l.starts_with("ok a1"))
                && !cip.is_empty()
                && dns.contains("10.96.0.80")
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: NodePort {np:?}, ClusterIP {cip:?}, DNS {dns}\n{}",
                self.sb.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Until a pod's lookup is answered without the kube-dns endpoint seeing it (the
    /// node-local resolver has DNS); how long that took.
    fn wait_dns_local(&self, what: &str) -> Duration {
        let t = Instant::now();
        loop {
            let n = self.endpoint_queries();
            let got = self.in_pod("getent hosts web");
            if got.contains("10.96.0.80") && self.endpoint_queries() == n {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: the node-local resolver never took the pod's DNS:\n{}",
                self.sb.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon runs the image's binary, chrooted into the image.
    fn assert_runs_from_image(&self) {
        let pid = self.sb.daemon_pid().unwrap();
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            root.starts_with(self.sb.dir.path()) && root.ends_with("root"),
            "the daemon's root is {}, not the pod's",
            root.display()
        );
        assert_eq!(exe, root.join("usr/local/bin/switchyard"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let eff = status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        // NET_BIND_SERVICE 10, NET_ADMIN 12, NET_RAW 13, SYS_MODULE 16, SYS_ADMIN 21,
        // PERFMON 38, BPF 39.
        let want: u64 =
            (1 << 10) | (1 << 12) | (1 << 13) | (1 << 16) | (1 << 21) | (1 << 38) | (1 << 39);
        assert_eq!(
            u64::from_str_radix(&eff, 16).unwrap(),
            want,
            "effective capabilities {eff}"
        );
    }
}

#[test]
fn the_image_serves_as_the_daemonset_runs_it_ebpf() {
    let p = start("e", "ebpf");
    p.wait_serving("eBPF from the image");
    p.assert_runs_from_image();
    // The socket LB from a pod's cgroup, too.
    let got = p.sb.probe_from_cgroup(&["--tcp", "10.96.0.80:80"]).unwrap();
    assert!(got.iter().all(|l| l.starts_with("ok a1")), "{got:?}");
}

#[test]
fn the_image_serves_as_the_daemonset_runs_it_iptables() {
    let p = start("i", "iptables");
    p.wait_serving("iptables from the image");
    p.assert_runs_from_image();
    // The image's own iptables wrote the rules the host sees.
    let rules = sh(&["ip", "netns", "exec", &p.sb.node_ns(), "iptables-save"]).unwrap_or_default()
        + &sh(&[
            "ip",
            "netns",
            "exec",
            &p.sb.node_ns(),
            "iptables-legacy-save",
        ])
        .unwrap_or_default();
    assert!(rules.contains("SY-SERVICES"), "{rules}");
}

#[test]
fn a_rolling_update_keeps_connections_and_dns_answering() {
    let mut p = start("u", "ebpf");
    p.wait_serving("first pod");

    // A connection through the NodePort (tc path) held across the update.
    let mut held = Killed(
        Command::new(bin("sy-probe"))
            .args([
                "--netns",
                &p.sb.client_ns(),
                "--tcp",
                "172.30.0.10:30180",
                "--hold",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdin = held.0.stdin.take().unwrap();
    let mut out = BufReader::new(held.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("connected"), "{line}");
    let mut ask = || {
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    let before = ask();
    assert!(before.starts_with("ok a1"), "{before}");
    // Serving DNS may at first mean the kube-dns endpoint answering (interception turns on
    // once the resolver serves): wait for the pod's lookups to stay local.
    p.wait_dns_local("first pod");
    let base = p.endpoint_queries();

    // The pod's lookups, one every 100 ms, all through the update.
    let stop = Arc::new(AtomicBool::new(false));
    let (asked, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looker = {
        let (stop, asked, failed) = (stop.clone(), asked.clone(), failed.clone());
        let cgroup = p.sb.cgroup.clone();
        let pod = p.netns.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let script = format!(
                    "echo $$ > {}/cgroup.procs && exec ip netns exec {pod} getent hosts web",
                    cgroup.display()
                );
                let got = sh(&["sh", "-c", &script]).unwrap_or_else(|e| e.to_string());
                asked.fetch_add(1, Ordering::Relaxed);
                if !got.contains("10.96.0.80") {
                    failed.fetch_add(1, Ordering::Relaxed);
                    failures.push(got);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            failures
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        p.endpoint_queries(),
        base,
        "with the node-local resolver up, the pod's lookups are answered locally"
    );

    // The update: the old pod gets SIGTERM and goes; a second later the new one starts
    // from the image with the pinned state.
    p.sb.stop_daemon();
    assert_eq!(ask(), before, "the connection while no pod runs");
    std::thread::sleep(Duration::from_secs(1));
    let during = p.endpoint_queries();
    assert!(
        during > base,
        "while no pod runs, the pod's lookups go to the kube-dns endpoints"
    );
    let dir = p.dir.clone();
    p.sb.start_daemon(&dir, "ebpf", CONFIG).unwrap();
    let t = Instant::now();
    while !p.sb.daemon_log().contains("re-adopted") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the new pod must adopt the pinned state:\n{}",
            p.sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.wait_serving("new pod");
    // The new pod's resolver takes the pod's DNS back.
    let back = p.wait_dns_local("new pod");
    stop.store(true, Ordering::Relaxed);
    let failures = looker.join().unwrap();
    assert_eq!(
        ask(),
        before,
        "same connection, same endpoint after the update"
    );
    p.assert_runs_from_image();
    let (asked, failed) = (
        asked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "rolling update: {asked} lookups, {failed} failed, {} queries answered by the kube-dns \
         endpoint, local again {back:?} after the new pod served",
        p.endpoint_queries()
    );
    assert!(asked >= 10, "only {asked} lookups");
    assert_eq!(failed, 0, "lookups failed during the update: {failures:?}");
}
