//! `atls inspect`: decode an ATLS payload as a middlebox would.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use atls_core::inspect::inspect;

/// Arguments of `atls inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// File with the payload (an HTTP body or CoAP payload); `-` reads stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
    /// The input is hex text rather than binary.
    #[arg(long)]
    hex: bool,
}

/// Largest payload read.
const MAX_INPUT: u64 = 16 * 1024 * 1024;

pub(crate) fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let mut raw = Vec::new();
    if args.input.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_INPUT)
            .read_to_end(&mut raw)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(&args.input)
            .with_context(|| format!("opening {}", args.input.display()))?
            .take(MAX_INPUT)
            .read_to_end(&mut raw)
            .with_context(|| format!("reading {}", args.input.display()))?;
    }
    let payload = if args.hex {
        let text: String = String::from_utf8_lossy(&raw).split_whitespace().collect();
        hex::decode(text).context("the input is not hex")?
    } else {
        raw
    };
    if payload.is_empty() {
        bail!("empty payload");
    }
    let inspection = inspect(&payload);
    println!("{} bytes, {:?} framing", payload.len(), inspection.framing);
    print!("{inspection}");
    Ok(())
}
