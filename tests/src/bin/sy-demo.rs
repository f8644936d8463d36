//! `cargo xtask demo`: a sandbox of network namespaces running `switchyard run --source
//! manifests:examples/ --backend ebpf`, traffic through a ClusterIP, an affinity service and
//! NodePorts (which backend answered each request), the programmed maps, then teardown (also
//! on Ctrl-C).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_tests::sandbox::{BackendSpec, Sandbox, bin, require_root};

fn backends() -> Vec<BackendSpec> {
    [
        ("fe-a1", [10, 244, 1, 11]),
        ("fe-a2", [10, 244, 1, 12]),
        ("fe-b1", [10, 244, 2, 11]),
        ("cart-a1", [10, 244, 1, 21]),
        ("cart-a2", [10, 244, 1, 22]),
        ("cart-b1", [10, 244, 2, 21]),
        ("cat-a1", [10, 244, 1, 31]),
        ("cat-b1", [10, 244, 2, 31]),
        ("search-a1", [10, 244, 1, 41]),
    ]
    .iter()
    .map(|(n, ip)| BackendSpec::new(n, Ipv4Addr::from(*ip)))
    .collect()
}

fn tally(lines: &[String]) -> String {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for l in lines {
        let k = match l.strip_prefix("ok ") {
            Some(rest) => {
                let mut w = rest.split_whitespace();
                format!(
                    "{} (saw client {})",
                    w.next().unwrap_or(""),
                    w.next().unwrap_or("")
                )
            }
            None => l.clone(),
        };
        *m.entry(k).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{v:>3} × {k}"))
        .collect::<Vec<_>>()
        .join("\n      ")
}

fn run(sb: &Arc<Mutex<Option<Sandbox>>>, examples: &std::path::Path) -> anyhow::Result<()> {
    let with =
        |f: &dyn Fn(&mut Sandbox) -> anyhow::Result<Vec<String>>| -> anyhow::Result<Vec<String>> {
            let mut g = sb.lock().map_err(|_| anyhow::anyhow!("sandbox lock"))?;
            let s = g.as_mut().ok_or_else(|| anyhow::anyhow!("interrupted"))?;
            f(s)
        };
    println!(
        "== starting switchyard run --source manifests:{} --backend ebpf (node namespace)",
        examples.display()
    );
    with(&|s| {
        s.start_daemon(examples, "ebpf", "")?;
        Ok(Vec::new())
    })?;
    let start = Instant::now();
    loop {
        let got = with(&|s| s.probe_from_cgroup(&["--tcp", "10.96.10.10:80"]))?;
        if got.iter().all(|l| l.starts_with("ok ")) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let log = with(&|s| Ok(vec![s.daemon_log()]))?;
            anyhow::bail!("switchyard did not program the services:\n{}", log.join(""));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let show = |title: &str, lines: anyhow::Result<Vec<String>>| -> anyhow::Result<()> {
        println!("\n== {title}\n      {}", tally(&lines?));
        Ok(())
    };
    show(
        "shop/frontend ClusterIP 10.96.10.10:80, 12 connections from a host process (socket LB)",
        with(&|s| s.probe_from_cgroup(&["--tcp", "10.96.10.10:80", "--count", "12"])),
    )?;
    show(
        "shop/cart ClusterIP 10.96.10.20:80 with ClientIP affinity, 12 connections from one client",
        with(&|s| s.probe_from_cgroup(&["--tcp", "10.96.10.20:80", "--count", "12"])),
    )?;
    show(
        "shop/frontend NodePort 172.30.0.10:30080 from the outside client (eTP=Cluster: masqueraded)",
        with(&|s| s.probe_from_client(&["--tcp", "172.30.0.10:30080", "--count", "12"])),
    )?;
    show(
        "shop/catalog NodePort 172.30.0.10:30030 from the outside client (eTP=Local: local pods, client kept)",
        with(&|s| s.probe_from_client(&["--tcp", "172.30.0.10:30030", "--count", "12"])),
    )?;
    show(
        "shop/search UDP 10.96.10.40:9125 (ready endpoint only; the terminating one is not used)",
        with(&|s| s.probe_from_cgroup(&["--udp", "10.96.10.40:9125", "--count", "4"])),
    )?;
    show(
        "monitoring/grafana 10.96.20.20:3000 has no endpoints: refused at once",
        with(&|s| s.probe_from_cgroup(&["--tcp", "10.96.20.20:3000"])),
    )?;
    let maps = with(&|s| {
        let out = std::process::Command::new(bin("switchyard"))
            .args(["maps", "--pin-dir"])
            .arg(&s.pin_dir)
            .output()?;
        Ok(vec![String::from_utf8_lossy(&out.stdout).into_owned()])
    })?;
    println!(
        "\n== programmed services (switchyard maps)\n{}",
        maps.join("")
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    require_root();
    let examples = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "examples".into()));
    println!(
        "== creating the sandbox: node, outside client and {} backend namespaces",
        backends().len()
    );
    let sb = Arc::new(Mutex::new(Some(Sandbox::create("sydemo", &backends())?)));
    // Ctrl-C tears the sandbox down before exiting.
    let on_signal = Arc::clone(&sb);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        eprintln!("\ninterrupted: tearing the sandbox down");
        let taken = on_signal.lock().map(|mut g| g.take());
        drop(taken);
        std::process::exit(130);
    });
    let result = run(&sb, &examples);
    let taken = sb.lock().map(|mut g| g.take());
    drop(taken);
    println!("\n== sandbox removed (namespaces, cgroup, pins)");
    result
}
