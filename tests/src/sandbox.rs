//! A sandbox of network namespaces for end-to-end tests and the demo:
//!
//! ```text
//!  client ns (172.30.0.2) ──veth── node ns (172.30.0.10, runs switchyard) ──veth── backend ns
//!                                          │                                 (10.244.x.y/32 each,
//!                                          └─ child cgroup (socket LB)         HTTP + UDP server)
//! ```
//!
//! Every link is dual-stack: the client is `fd00:30::2`, the node `fd00:30::10`, and a
//! backend `10.244.a.b` is also `fd00:244::a:b` (routed via the node's `fe80::1`).
//!
//! Every namespace, cgroup, pin directory and process it creates is removed by `Drop`, also
//! when a test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
/// The node side of every backend veth (Calico-style point-to-point routing).
const GATEWAY: &str = "169.254.1.1";
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x10);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x2);
const GATEWAY6: &str = "fe80::1";

pub fn sh(cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fail (not skip) when the test cannot run here.
/// The DaemonSet's `capabilities.add` in `deploy/switchyard.yaml` (the chart's default
/// render), as setpriv takes them (`+net_admin,...`): the daemon under test runs with exactly
/// these where a test sets `Sandbox::capabilities` to them.
#[allow(clippy::expect_used)]
pub fn daemonset_capabilities() -> String {
    let text = include_str!("../../deploy/switchyard.yaml");
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).expect("deploy/switchyard.yaml parses");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in deploy/switchyard.yaml");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("+{}", c.as_str().unwrap_or_default().to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether this kernel has IPVS (loading the module where it is one).
pub fn kernel_has_ipvs() -> bool {
    let _ = Command::new("modprobe").args(["-q", "ip_vs"]).status();
    Path::new("/proc/net/ip_vs").exists()
}

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces, BPF): run the test suite as root"
    );
}

/// Where cgroup v2 is mounted (as the daemon finds it); mounts one under /run if the host
/// has none (this machine kind's host is hybrid v1).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = switchyard::dataplane::ebpf::cgroup2_root() {
        return Ok(dir);
    }
    let dir = PathBuf::from("/run/switchyard-cgroup2");
    std::fs::create_dir_all(&dir)?;
    sh(&["mount", "-t", "cgroup2", "none", &dir.to_string_lossy()])?;
    Ok(dir)
}

/// The binaries the sandbox runs: switchyard and the test helpers, next to each other in the
/// cargo target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test executables live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl BackendSpec {
    pub fn new(name: &str, ip: Ipv4Addr) -> BackendSpec {
        BackendSpec {
            name: name.to_string(),
            ip,
        }
    }

    /// The backend's IPv6 address: `10.244.a.b` is `fd00:244::a:b` (the octets read as hex
    /// groups).
    pub fn ip6(&self) -> Ipv6Addr {
        let o = self.ip.octets();
        let hex = |b: u8| u16::from_str_radix(&b.to_string(), 16).unwrap_or(0);
        Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, hex(o[2]), hex(o[3]))
    }
}

/// No duplicate address detection in a test namespace: addresses are usable at once.
fn no_dad(ns: &str) -> anyhow::Result<()> {
    for k in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", k])?;
    }
    Ok(())
}

/// Create a network namespace with loopback up and no duplicate address detection.
pub fn add_netns(ns: &str) -> anyhow::Result<()> {
    sh(&["ip", "netns", "add", ns])?;
    no_dad(ns)?;
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Run `f` on a thread that has entered network namespace `ns` (sockets it opens stay in
/// that namespace whichever thread uses them later).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// `/etc/netns/<ns>` (where `ip netns exec` finds the namespace's resolv.conf), removed on
/// drop.
#[derive(Debug)]
pub struct EtcNetns(pub PathBuf);

impl EtcNetns {
    /// Give namespace `ns` this resolv.conf.
    pub fn resolv_conf(ns: &str, text: &str) -> anyhow::Result<EtcNetns> {
        let e = EtcNetns(PathBuf::from(format!("/etc/netns/{ns}")));
        std::fs::create_dir_all(&e.0)?;
        std::fs::write(e.0.join("resolv.conf"), text)?;
        Ok(e)
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            // Only if empty: other namespaces may have their own files there.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `GET path` on `addr` from inside network namespace `ns`: the whole response (status line,
/// headers and body), or "" when nothing answers.
pub fn http_get_in(ns: &str, addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let path = path.to_string();
    in_netns(ns, move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .is_err()
        {
            return String::new();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .unwrap_or_default()
}

/// Run `cmd` in network namespace `ns` with `input` on its stdin; an error carries stderr.
pub fn feed_in(ns: &str, cmd: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} refused the input: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A network namespace removed on drop (also when the test fails).
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        let _ = sh(&["ip", "netns", "del", name]);
        add_netns(name)?;
        Ok(Netns(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.0]) {
            let msg = format!("netns {} left behind: {e}", self.0);
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// One end of a veth pair: its namespace, its name there and its addresses (`ADDR/LEN`).
#[derive(Debug, Clone, Copy)]
pub struct VethEnd<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub addrs: &'a [&'a str],
}

/// A veth pair between two namespaces, addressed and up. `tmp` names the pair while it is
/// still in the caller's namespace (unique, at most 13 characters).
pub fn veth(tmp: &str, a: VethEnd<'_>, b: VethEnd<'_>) -> anyhow::Result<()> {
    let (ta, tb) = (format!("{tmp}a"), format!("{tmp}b"));
    sh(&[
        "ip", "link", "add", &ta, "type", "veth", "peer", "name", &tb,
    ])?;
    for (t, end) in [(&ta, a), (&tb, b)] {
        sh(&["ip", "link", "set", t, "netns", end.ns, "name", end.name])?;
        for addr in end.addrs {
            let mut cmd = vec!["ip", "-n", end.ns, "addr", "add", addr, "dev", end.name];
            if addr.contains(':') {
                cmd.push("nodad");
            }
            sh(&cmd)?;
        }
        sh(&["ip", "-n", end.ns, "link", "set", end.name, "up"])?;
    }
    Ok(())
}

#[derive(Debug)]
pub struct Sandbox {
    pub prefix: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    backends: BTreeMap<String, (BackendSpec, Option<Child>)>,
    daemon: Option<Child>,
    /// Start the daemon with only these capabilities (`+net_admin,+bpf,...`); `None`: all.
    pub capabilities: Option<String>,
    /// Run the daemon from this container image root filesystem (read-only, e.g. from
    /// `podman image mount`) as the DaemonSet does; `None`: the test build on the host.
    pub image_root: Option<PathBuf>,
    /// Run this build of `switchyard` (e.g. another profile's, as an upgrade); `None`: the
    /// one next to the test binaries.
    pub daemon_binary: Option<PathBuf>,
}

impl Sandbox {
    pub fn node_ns(&self) -> String {
        format!("{}-node", self.prefix)
    }

    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    fn ns_path(ns: &str) -> String {
        format!("/var/run/netns/{ns}")
    }

    /// Build the topology and start a backend server in each backend namespace.
    pub fn create(prefix: &str, backends: &[BackendSpec]) -> anyhow::Result<Sandbox> {
        // The host's BPF filesystem, as systemd mounts it at boot (the DaemonSet, without
        // CAP_SYS_ADMIN, can only use one).
        switchyard::dataplane::ebpf::host::ensure_bpffs(Path::new("/sys/fs/bpf"))
            .context("mounting the host's bpffs")?;
        let cg_root = cgroup2_root()?;
        let mut sb = Sandbox {
            prefix: prefix.to_string(),
            cgroup: cg_root.join(prefix),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
            dir: tempfile::tempdir()?,
            namespaces: Vec::new(),
            backends: BTreeMap::new(),
            daemon: None,
            capabilities: None,
            image_root: None,
            daemon_binary: None,
        };
        // Leftovers of an earlier run that was killed hard.
        sb.remove_leftovers();
        std::fs::create_dir_all(&sb.cgroup).context("creating the test cgroup")?;
        let node = sb.node_ns();
        let client = sb.client_ns();
        for ns in [&node, &client] {
            add_netns(ns)?;
            sb.namespaces.push(ns.clone());
        }
        let (node4, node6) = (format!("{NODE_IP}/24"), format!("{NODE_IP6}/64"));
        let (client4, client6) = (format!("{CLIENT_IP}/24"), format!("{CLIENT_IP6}/64"));
        veth(
            &format!("{prefix}x"),
            VethEnd {
                ns: &node,
                name: "ext0",
                addrs: &[&node4, &node6],
            },
            VethEnd {
                ns: &client,
                name: "eth0",
                addrs: &[&client4, &client6],
            },
        )?;
        sh(&[
            "ip",
            "-n",
            &client,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &NODE_IP6.to_string(),
        ])?;
        sh(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ])?;
        // LoadBalancer IPs of the examples sit in the node's subnet: route them via the node.
        sh(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "172.30.0.100/32",
            "via",
            &NODE_IP.to_string(),
        ])?;
        // A default route, as a real node has: locally originated traffic to a ClusterIP must
        // route somewhere before iptables' OUTPUT DNAT can rewrite it.
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "default",
            "via",
            &CLIENT_IP.to_string(),
        ])?;
        sh(&[
            "ip",
            "-n",
            &node,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &CLIENT_IP6.to_string(),
        ])?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sh(&[
                "ip",
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                &format!("{k}={v}"),
            ])?;
        }
        for b in backends {
            sb.add_backend(b)?;
        }
        Ok(sb)
    }

    /// Add a backend namespace with its server.
    pub fn add_backend(&mut self, b: &BackendSpec) -> anyhow::Result<()> {
        let node = self.node_ns();
        let ns = format!("{}-{}", self.prefix, b.name);
        add_netns(&ns)?;
        self.namespaces.push(ns.clone());
        let host_if = format!("b{}", &b.name[..b.name.len().min(12)]);
        let (gw4, gw6) = (format!("{GATEWAY}/32"), format!("{GATEWAY6}/64"));
        let (ip4, ip6) = (format!("{}/32", b.ip), format!("{}/128", b.ip6()));
        veth(
            &format!("{}t{}", self.prefix, self.backends.len()),
            VethEnd {
                ns: &node,
                name: &host_if,
                addrs: &[&gw4, &gw6],
            },
            VethEnd {
                ns: &ns,
                name: "eth0",
                addrs: &[&ip4, &ip6],
            },
        )?;
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            &format!("{}/32", b.ip),
            "dev",
            &host_if,
        ])?;
        sh(&[
            "ip",
            "-n",
            &node,
            "-6",
            "route",
            "add",
            &format!("{}/128", b.ip6()),
            "dev",
            &host_if,
        ])?;
        sh(&[
            "ip", "-n", &ns, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ])?;
        sh(&[
            "ip", "-n", &ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
        ])?;
        sh(&[
            "ip", "-n", &ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
        ])?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(bin("sy-backend"))
            .args([
                "--name", &b.name, "--bind", "[::]", "--tcp", "8080", "--udp", "9125",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sy-backend")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("backend {} did not start", b.name);
        }
        self.backends
            .insert(b.name.clone(), (b.clone(), Some(child)));
        Ok(())
    }

    /// Stop a backend's server (the namespace stays).
    pub fn stop_backend(&mut self, name: &str) {
        if let Some((_, Some(mut c))) = self.backends.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's config for this sandbox.
    /// `extra` may set `syncPeriod`, `healthzBindAddress` and `metricsBindAddress` itself
    /// (by default the admin endpoints are off).
    pub fn config_yaml(&self, extra: &str) -> String {
        let default = |key: &str, value: &str| {
            if extra.lines().any(|l| l.starts_with(&format!("{key}:"))) {
                String::new()
            } else {
                format!("{key}: {value}\n")
            }
        };
        format!(
            "clusterCIDR: 10.244.0.0/16\n{}minSyncPeriod: 50ms\n{}{}bpfPinDir: {}\n{extra}",
            default("syncPeriod", "10s"),
            default("healthzBindAddress", "''"),
            default("metricsBindAddress", "''"),
            self.pin_dir.display()
        )
    }

    /// Start `switchyard run` in the node namespace (only its network namespace: it keeps the
    /// host's /sys, so bpffs and cgroup2 stay visible).
    pub fn start_daemon(
        &mut self,
        manifests: &Path,
        backend: &str,
        extra_config: &str,
    ) -> anyhow::Result<()> {
        let cfg = self.dir.path().join("config.yaml");
        std::fs::write(&cfg, self.config_yaml(extra_config))?;
        let log = std::fs::File::create(self.dir.path().join("daemon.log"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", Self::ns_path(&self.node_ns())));
        if let Some(root) = &self.image_root {
            let root = root.clone();
            return self.start_daemon_from_image(cmd, &root, manifests, backend, &cfg, log);
        }
        if let Some(caps) = &self.capabilities {
            // Exactly these capabilities (root keeps no others): the DaemonSet's set.
            cmd.arg("setpriv")
                .arg(format!("--bounding-set=-all,{caps}"))
                .arg(format!("--inh-caps=-all,{caps}"))
                .arg(format!("--ambient-caps=-all,{caps}"))
                .arg("--");
        }
        let child = cmd
            .arg(
                self.daemon_binary
                    .clone()
                    .unwrap_or_else(|| bin("switchyard")),
            )
            .args(["run", "--source"])
            .arg(format!("manifests:{}", manifests.display()))
            .args([
                "--backend",
                backend,
                "--node-name",
                "node-a",
                "--cgroup-path",
            ])
            .arg(&self.cgroup)
            .arg("--config")
            .arg(&cfg)
            .env("SWITCHYARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting switchyard")?;
        self.daemon = Some(child);
        Ok(())
    }

    /// What a container runtime does for the DaemonSet's pod, with util-linux: a private
    /// mount namespace, a writable overlay over the image, the pod's mounts (/proc, the
    /// node's /sys with the bpffs and cgroup hostPaths, /dev, the xtables lock, /lib/modules,
    /// /run/netns, the ConfigMap as /etc/switchyard, and here the manifest directory), chroot, and
    /// exactly the DaemonSet's capabilities; host network is the node namespace. The
    /// entrypoint is the image's `/usr/local/bin/switchyard`.
    fn start_daemon_from_image(
        &mut self,
        mut cmd: Command,
        image: &Path,
        manifests: &Path,
        backend: &str,
        cfg: &Path,
        log: std::fs::File,
    ) -> anyhow::Result<()> {
        let pod = tempfile::Builder::new()
            .prefix("pod-")
            .tempdir_in(self.dir.path())?
            .keep();
        for d in ["upper", "work", "root", "configmap"] {
            std::fs::create_dir_all(pod.join(d))?;
        }
        std::fs::copy(cfg, pod.join("configmap/config.yaml"))?;
        let caps = self.capabilities.clone().unwrap_or_else(|| "+all".into());
        let script = r#"set -e
m=$POD/root
mount -t overlay overlay -o "lowerdir=$IMAGE,upperdir=$POD/upper,workdir=$POD/work" "$m"
mount -t proc proc "$m/proc"
mount -t sysfs sysfs "$m/sys"
mount --rbind /sys/fs/bpf "$m/sys/fs/bpf"
mount --rbind /sys/fs/cgroup "$m/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$m/dev"
for d in null zero random urandom; do touch "$m/dev/$d"; mount --bind "/dev/$d" "$m/dev/$d"; done
touch /run/xtables.lock "$m/run/xtables.lock"
mount --bind /run/xtables.lock "$m/run/xtables.lock"
mkdir -p "$m/lib/modules" "$m/etc/switchyard" "$m$MANIFESTS"
if [ -d /lib/modules ]; then mount --bind -o ro /lib/modules "$m/lib/modules"; fi
mkdir -p /run/netns "$m/run/netns"
mount --rbind -o ro /run/netns "$m/run/netns"
mount --bind "$POD/configmap" "$m/etc/switchyard"
mount --bind "$MANIFESTS" "$m$MANIFESTS"
exec chroot "$m" setpriv --bounding-set="-all,$CAPS" --inh-caps="-all,$CAPS" --ambient-caps="-all,$CAPS" -- \
  /usr/local/bin/switchyard run --source "manifests:$MANIFESTS" --backend "$BACKEND" \
  --node-name node-a --cgroup-path "$CGROUP" --config /etc/switchyard/config.yaml
"#;
        let child = cmd
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ])
            .env("POD", &pod)
            .env("IMAGE", image)
            .env("MANIFESTS", manifests)
            .env("BACKEND", backend)
            .env("CGROUP", &self.cgroup)
            .env("CAPS", &caps)
            .env("SWITCHYARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting switchyard from the image")?;
        self.daemon = Some(child);
        Ok(())
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Stop the daemon as an operator would (SIGTERM), leaving pinned state in place.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill the daemon outright (SIGKILL): no clean-up code of its own runs.
    /// Send `sig` to the running daemon (e.g. SIGSTOP/SIGCONT to change the node while it
    /// cannot react).
    pub fn signal_daemon(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.daemon {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                sig,
            );
        }
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn daemon_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Run sy-probe with the given arguments; one line per request.
    pub fn probe(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let out = Command::new(bin("sy-probe"))
            .args(args)
            .output()
            .context("running sy-probe")?;
        if !out.status.success() {
            bail!(
                "sy-probe {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// A probe from a process in the socket-LB cgroup, in the node's network namespace.
    pub fn probe_from_cgroup(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let cg = self.cgroup.to_string_lossy().to_string();
        let ns = self.node_ns();
        let mut a = vec!["--cgroup", &cg, "--netns", &ns];
        a.extend_from_slice(args);
        self.probe(&a)
    }

    /// A probe from the outside client namespace.
    pub fn probe_from_client(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let ns = self.client_ns();
        let mut a = vec!["--netns", &ns];
        a.extend_from_slice(args);
        self.probe(&a)
    }

    /// A probe from inside a backend's namespace (a pod not in the socket-LB cgroup: its
    /// traffic takes the tc path through its veth).
    pub fn probe_from_backend(&self, backend: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let ns = format!("{}-{backend}", self.prefix);
        let mut a = vec!["--netns", &ns];
        a.extend_from_slice(args);
        self.probe(&a)
    }

    /// `ip netns exec <node> <cmd>`.
    pub fn in_node(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let ns = self.node_ns();
        let mut a = vec!["ip", "netns", "exec", &ns];
        a.extend_from_slice(cmd);
        sh(&a)
    }

    fn remove_leftovers(&self) {
        if let Ok(list) = sh(&["ip", "netns", "list"]) {
            for l in list.lines() {
                let name = l.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&format!("{}-", self.prefix)) {
                    let _ = sh(&["ip", "netns", "del", name]);
                }
            }
        }
        let _ = switchyard::dataplane::ebpf::cleanup_pins(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

impl Drop for Sandbox {
    /// Removes everything the sandbox made. What cannot be removed is reported: a panic
    /// (unless the test is already panicking, whose message matters more), as aya's test
    /// guards do, so a leak fails the test that made it.
    fn drop(&mut self) {
        let mut failures: Vec<String> = Vec::new();
        self.stop_daemon();
        let names: Vec<String> = self.backends.keys().cloned().collect();
        for n in names {
            self.stop_backend(&n);
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = sh(&["ip", "netns", "del", &ns]) {
                failures.push(format!("deleting netns {ns}: {e}"));
            }
        }
        if let Err(e) = switchyard::dataplane::ebpf::cleanup_pins(&self.pin_dir) {
            failures.push(format!("removing pins {}: {e}", self.pin_dir.display()));
        }
        // Processes that joined the cgroup are gone; the directory can go.
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            let parent = self.cgroup.parent().map(|p| p.join("cgroup.procs"));
            for pid in procs.lines() {
                if let Some(p) = &parent {
                    let _ = std::fs::write(p, pid);
                }
            }
        }
        if self.cgroup.exists()
            && let Err(e) = std::fs::remove_dir(&self.cgroup)
        {
            failures.push(format!("removing cgroup {}: {e}", self.cgroup.display()));
        }
        if !failures.is_empty() {
            let msg = format!(
                "sandbox {} left state behind: {}",
                self.prefix,
                failures.join("; ")
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}
