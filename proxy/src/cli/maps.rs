use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::cli::plan::Output;
use crate::config::Config;
use crate::dataplane::ebpf::inspect;
use crate::dataplane::ebpf::io::{AyaMaps, MapIo, read_counters};

#[derive(Debug, Args)]
pub struct MapsArgs {
    /// Configuration file (for the pin directory).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The pin directory (overrides the config).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Print what the eBPF backend programmed: every frontend with its backends, read from the
/// pinned maps, with the per-service packet/byte/connection counters.
pub fn run(args: &MapsArgs) -> anyhow::Result<()> {
    let dir = match &args.pin_dir {
        Some(d) => d.clone(),
        None => match &args.config {
            Some(p) => Config::load(p)?.bpf_pin_dir,
            None => Config::default().bpf_pin_dir,
        },
    };
    let maps = AyaMaps::from_pins(&dir).map_err(|e| {
        let bpffs_root = dir.ancestors().find(|p| p.exists()).unwrap_or(&dir);
        if crate::dataplane::ebpf::host::on_bpffs(bpffs_root) {
            anyhow::anyhow!(
                "{e} (is `switchyard run --backend ebpf` running with pin directory {}?)",
                dir.display()
            )
        } else {
            anyhow::anyhow!(
                "{e}: no BPF filesystem is mounted at {} here (`ip netns exec` mounts a fresh /sys; run it with `nsenter --net=/var/run/netns/NAME` instead)",
                bpffs_root.display()
            )
        }
    })?;
    let dump = maps.dump()?;
    let views = inspect::view(&dump);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
        Output::Table => {
            let counters = read_counters(&dir)?;
            let mut by_frontend = BTreeMap::new();
            for (k, v) in &dump.frontends4 {
                if let Some(set) = dump.sets.get(&v.set_id)
                    && let Some(c) = counters.get(&set.service_id)
                {
                    let ip = std::net::Ipv4Addr::from(k.addr.to_ne_bytes());
                    let proto = match k.proto {
                        6 => "TCP",
                        17 => "UDP",
                        _ => "SCTP",
                    };
                    by_frontend.insert(
                        format!("{ip}:{} {proto}", u16::from_be(k.port)),
                        (c.packets, c.bytes, c.connections),
                    );
                }
            }
            print!("{}", inspect::to_table(&views, &by_frontend));
        }
    }
    Ok(())
}
