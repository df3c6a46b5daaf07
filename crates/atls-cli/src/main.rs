//! `atls`: the Application-Layer TLS command line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod common;
mod demo;
mod demo_coap;
mod demo_deploy;
mod demo_http;
mod gateway;
mod inspect;
mod middlebox;
mod request;
mod serve;

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
    /// Terminate ATLS over HTTP in front of the built-in resources or an
    /// upstream HTTP application.
    Serve(Box<serve::ServeArgs>),
    /// The untrusted CoAP-to-HTTP gateway (draft Figure 9): forwards ATLS
    /// flights and OSCORE messages from CoAP devices to HTTP services
    /// without being able to read them.
    Gateway(Box<gateway::GatewayArgs>),
    /// Make one ATLS-protected HTTP request; the body goes to stdout, the
    /// inner status to stderr.
    Request(Box<request::RequestArgs>),
}

/// Log to stderr, filtered by `RUST_LOG` (default: info).
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo(demo::DemoArgs::default())) {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Gateway(args) => gateway::run(&args),
        Command::Request(args) => return request::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atls: {e:#}");
            ExitCode::FAILURE
        }
    }
}
