use std::path::PathBuf;

use clap::{Args, ValueEnum};
use switchyard_model::plan::Plan;
use switchyard_model::{Engine, Selector};

use crate::config::Config;
use crate::source::manifests::ManifestDir;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Directory of Service, EndpointSlice and Node manifests.
    #[arg(long)]
    pub manifests: PathBuf,
    /// Label selector over the Services (kubectl syntax).
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// The node whose view to compute (default: the only Node in the manifests).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Configuration file (nodePortAddresses applies).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let selector = match &args.selector {
        Some(s) => Selector::parse(s)?,
        None => Selector::default(),
    };
    let settings = match &args.config {
        Some(p) => Config::load(p)?.validate()?,
        None => Config::default().validate()?,
    };
    let mut md = ManifestDir::new(&args.manifests);
    let (objs, errors) = md.load()?;
    if let Some(e) = errors.into_iter().next() {
        // Offline planning has no last good state to fall back to: refuse bad input.
        return Err(e.into());
    }
    let node = objs.node(args.node_name.as_deref());
    if let Some(n) = &args.node_name
        && node.is_none()
    {
        anyhow::bail!(
            "--node-name {n}: no Node of that name in {}",
            args.manifests.display()
        );
    }
    let node_name = node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
    let engine = Engine::with_objects(settings.proxy_config(&node_name), objs);
    let plan = Plan::build(&engine, &selector);
    match args.output {
        Output::Table => print!("{}", plan.to_table()),
        Output::Json => println!("{}", plan.to_json()),
    }
    Ok(())
}
