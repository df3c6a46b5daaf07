//! `atls`: the Application-Layer TLS command line tool.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod bench;
mod common;
mod config;
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
    /// Log format on stderr: text, or json (one object per line) for log
    /// shippers. Also ATLS_LOG_FORMAT.
    #[arg(long, global = true, value_name = "FORMAT", env = "ATLS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The log format chosen on the command line.
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
    #[command(after_help = request::EXIT_CODES)]
    Request(Box<request::RequestArgs>),
    /// Load an `atls serve` with new sessions or requests from concurrent
    /// clients, beside a plain-HTTP baseline; prints throughput, latency
    /// percentiles and the server's CPU per operation.
    Bench(Box<bench::BenchArgs>),
}

/// Log to stderr, filtered by `RUST_LOG` (default: info).
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Exit code of a usage error (sysexits EX_USAGE), apart from the codes
/// `atls request` gives each failing layer.
pub(crate) const EXIT_USAGE: u8 = 64;

/// A write to a closed pipe (`atls demo | head -1`) ends the process
/// quietly, as for any Unix filter (status 141, 128 + SIGPIPE), instead of
/// a panic message.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // Only println! to a closed stdout: any other panic (a task's, say)
        // goes to the default hook.
        if message.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    // A configuration file that cannot be read or holds what is no
    // option is a usage error, as a bad command line is.
    let expanded = match config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(expanded) => expanded,
        Err(e) => {
            eprintln!("atls: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cli = match Cli::try_parse_from(&expanded.argv) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            if let Some(note) = expanded.blames_file(&e) {
                eprintln!("note: {note}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    LOG_JSON.store(cli.log_format == "json", std::sync::atomic::Ordering::Relaxed);
    let result = match cli.command.unwrap_or(Command::Demo(demo::DemoArgs::default())) {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Gateway(args) => gateway::run(&args),
        Command::Bench(args) => bench::run(&args),
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
