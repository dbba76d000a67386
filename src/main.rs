//! The `driftguard` command: parses the CLI and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "driftguard", version, about = "Sidecar reverse proxy that guards a RAG / LLM service")]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, env = "DRIFTGUARD_CONFIG", default_value = "driftguard.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and print every error with its key path.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match driftguard::run(&cli.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("driftguard: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check => match driftguard::app::load(&cli.config) {
            Ok(loaded) => {
                let c = &loaded.config;
                let arms: Vec<String> = c.arms.iter().map(|a| format!("{} (weight {})", a.name, a.weight)).collect();
                println!("{}: ok — {} arm(s): {}", cli.config.display(), c.arms.len(), arms.join(", "));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", cli.config.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        },
    }
}
