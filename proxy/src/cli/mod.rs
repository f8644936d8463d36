//! `switchyard` command line: one subcommand per file.

pub mod cleanup;
pub mod maps;
pub mod plan;
pub mod run;
pub mod version;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    about = "Kubernetes node dataplane: service load balancing and cluster DNS",
    version
)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `switchyard=debug`.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_LOG",
        default_value = "info,hickory_server=warn,hickory_proto=warn"
    )]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the dataplane: watch a source and program the chosen backend.
    Run(run::RunArgs),
    /// Print the frontends -> backends computed from a manifest directory (no root needed).
    Plan(plan::PlanArgs),
    /// Show what the eBPF backend programmed (from the pinned maps), with counters.
    Maps(maps::MapsArgs),
    /// Remove everything any backend programmed.
    Cleanup(cleanup::CleanupArgs),
    /// Print the version.
    Version,
}
