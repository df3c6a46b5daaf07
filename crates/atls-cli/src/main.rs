//! `atls`: the Application-Layer TLS command line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod inspect;

/// Application-Layer TLS (draft-friel-tls-atls): end-to-end TLS through
/// gateways and middleboxes that terminate transport TLS.
#[derive(Debug, Parser)]
#[command(name = "atls", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the draft's handshakes in memory on every engine and version and
    /// show what crosses the wire (the default command).
    Demo(demo::DemoArgs),
    /// Show what a middlebox can read from an ATLS payload, without keys.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo(demo::DemoArgs::default())) {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect(args) => inspect::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atls: {e:#}");
            ExitCode::FAILURE
        }
    }
}
