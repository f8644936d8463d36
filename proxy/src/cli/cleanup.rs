use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::dataplane::BackendChoice;
use crate::dataplane::ebpf::cleanup_pins;

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Only this backend's state (default: every backend's).
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// Configuration file (for the pin directory and chain names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Remove kube-proxy's state instead (its KUBE-* iptables chains, its nftables
    /// tables, IPVS services, kube-ipvs0 and KUBE-* ipsets): run once when migrating a node.
    #[arg(long)]
    pub kube_proxy: bool,
}

/// Remove what backends programmed, without starting them: pinned maps and links (which
/// detaches every program) for eBPF.
pub fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    if args.kube_proxy {
        for line in crate::dataplane::kube_proxy::cleanup()? {
            println!("{line}");
        }
        return Ok(());
    }
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let all = args.backend.is_none() || args.backend == Some(BackendChoice::Auto);
    if all || args.backend == Some(BackendChoice::Ebpf) {
        if let Err(e) = crate::dataplane::ebpf::unreserve_ports(&cfg.bpf_pin_dir) {
            eprintln!("ebpf: cannot release the reserved NodePort range: {e}");
        }
        let filters = crate::dataplane::ebpf::attach::detach_netlink_everywhere();
        if filters > 0 {
            println!("ebpf: removed the tc filter (netlink cls_bpf) from {filters} interfaces");
        }
        cleanup_pins(&cfg.bpf_pin_dir)?;
        println!("ebpf: removed pins under {}", cfg.bpf_pin_dir.display());
    }
    if all {
        let addrs: Vec<std::net::IpAddr> = cfg
            .dns
            .listen
            .iter()
            .filter_map(|l| l.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        for line in crate::dns_listen::unprovision(&addrs) {
            println!("{line}");
        }
    }
    if all || args.backend == Some(BackendChoice::Ipvs) {
        for line in crate::dataplane::ipvs::writer::cleanup()? {
            println!("{line}");
        }
    }
    if all || args.backend == Some(BackendChoice::Iptables) {
        crate::dataplane::iptables::cleanup_all()?;
        println!("iptables: removed SY- chains and hooks (legacy and nft)");
    }
    Ok(())
}
