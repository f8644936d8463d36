use clap::Parser;
use switchyard::cli::{Cli, Command, cleanup, maps, plan, run, version};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs` and log shippers get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Version => {
            version::run();
            Ok(())
        }
        Command::Plan(a) => plan::run(&a),
        Command::Cleanup(a) => cleanup::run(&a),
        Command::Maps(a) => maps::run(&a),
        Command::Run(a) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run::run(a)),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
