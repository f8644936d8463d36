use clap::Args;

use crate::dataplane::{BackendChoice, select};

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Only this backend's state (default: every backend's).
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
}

pub fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    let choices = match args.backend {
        Some(b) => vec![b],
        None => vec![BackendChoice::None],
    };
    for c in choices {
        let (mut dp, _) = select(c)?;
        dp.cleanup()?;
        println!("cleaned up backend {}", dp.name());
    }
    Ok(())
}
