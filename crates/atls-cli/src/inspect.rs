//! `atls inspect`: decode an ATLS payload as a middlebox would.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use atls_core::inspect::{handshake_type_name, inspect, version_name, HandshakeSummary, Inspection};
use atls_core::Framing;
use serde_json::{json, Value};

/// Arguments of `atls inspect`.
///
/// To capture flights: `atls request --dump-flights DIR URL` writes the body
/// of each outer exchange to DIR (`01-handshake-request.bin`,
/// `01-handshake-response.bin`, ...); `atls inspect DIR/01-handshake-request.bin`
/// then shows what a middlebox saw. A hex dump (from a proxy's log, say)
/// goes with `--hex`.
#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// File with the payload (an HTTP body or CoAP payload); `-` reads stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
    /// The input is hex text rather than binary.
    #[arg(long)]
    hex: bool,
    /// Print JSON (one object) for tools.
    #[arg(long)]
    json: bool,
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
    if args.json {
        println!("{}", to_json(&inspection, payload.len()));
    } else {
        let framing = match inspection.framing {
            Some(Framing::Tls) => "TLS records",
            Some(Framing::Dtls) => "DTLS records",
            None => "not TLS or DTLS records",
        };
        println!("{} bytes, {framing}", payload.len());
        print!("{inspection}");
    }
    // Input that is not ATLS at all (no record could be read) fails, so
    // scripts can tell.
    if inspection.framing.is_none() || inspection.records.is_empty() {
        bail!("the input is not an ATLS payload (TLS or DTLS records)");
    }
    // Records followed by what is no record (a truncated capture, bytes
    // appended): shown above, and not a clean ATLS payload either.
    if let Some(error) = &inspection.error {
        bail!("the input does not end with whole TLS or DTLS records: {error}");
    }
    Ok(())
}

fn version(v: u16) -> Value {
    json!({ "code": v, "name": version_name(v) })
}

fn cid(c: Option<&atls_core::ConnectionId>) -> Value {
    c.map_or(Value::Null, |c| Value::String(hex::encode(c.as_bytes())))
}

/// The inspection as one JSON object: what a middlebox can know.
fn to_json(i: &Inspection, bytes: usize) -> Value {
    let records: Vec<Value> = i
        .records
        .iter()
        .map(|r| {
            json!({
                "content_type": r.content_type.map(|t| t.name()),
                "content_type_code": r.content_type_code,
                "version": version(r.version),
                "epoch": r.epoch,
                "sequence": r.sequence,
                "length": r.length,
            })
        })
        .collect();
    let handshake: Vec<Value> = i
        .handshake
        .iter()
        .map(|h| match h {
            HandshakeSummary::ClientHello(ch) => json!({
                "type": "client_hello",
                "legacy_version": version(ch.legacy_version),
                "server_name": ch.server_name,
                "versions": ch.versions.iter().map(|v| version(*v)).collect::<Vec<_>>(),
                "cipher_suites": ch.cipher_suites.iter().map(|s| json!({"code": s.0, "name": s.to_string()})).collect::<Vec<_>>(),
                "extensions": ch.extensions,
                "oscore_connection_id": cid(ch.oscore_cid.as_ref()),
                "cose_ext": cid(ch.cose_cid.as_ref()),
            }),
            HandshakeSummary::ServerHello(sh) => json!({
                "type": "server_hello",
                "version": version(sh.version),
                "cipher_suite": {"code": sh.cipher_suite.0, "name": sh.cipher_suite.to_string()},
                "extensions": sh.extensions,
                "oscore_connection_id": cid(sh.oscore_cid.as_ref()),
                "cose_ext": cid(sh.cose_cid.as_ref()),
            }),
            HandshakeSummary::Other { msg_type, length } => json!({
                "type": handshake_type_name(*msg_type),
                "msg_type": msg_type,
                "length": length,
            }),
            HandshakeSummary::Undecodable { msg_type, reason } => json!({
                "type": "undecodable",
                "msg_type": msg_type,
                "reason": reason,
            }),
        })
        .collect();
    json!({
        "bytes": bytes,
        "framing": i.framing.map(|f| match f {
            Framing::Tls => "tls",
            Framing::Dtls => "dtls",
        }),
        "records": records,
        "handshake": handshake,
        "error": i.error,
    })
}
