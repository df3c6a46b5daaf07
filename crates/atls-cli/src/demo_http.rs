//! The HTTP part of `atls demo`: `atls serve` and a client on loopback, one
//! request in each mode on each engine, showing what crossed the wire beside
//! what the application saw.

use std::path::Path;

use anyhow::Context;
use atls_core::{Certificate, ClientConfig};
use atls_http::{AtlsClient, ClientOptions, Mode};
use bytes::Bytes;
use http::Request;

use crate::serve::{self, ServeArgs};

const MESSAGE: &[u8] = b"temperature=21.5";

fn serve_args(engine: &str, state_dir: &Path) -> ServeArgs {
    /// `atls serve`'s own argument parser, so the demo runs on its defaults.
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }
    let state_dir = state_dir.to_string_lossy();
    let argv = [
        "serve",
        "--http",
        "127.0.0.1:0",
        "--engine",
        engine,
        "--state-dir",
        &state_dir,
        "--max-sessions",
        "100",
        "--max-half-open",
        "100",
    ];
    <Serve as clap::Parser>::parse_from(argv).args
}

/// Run the HTTP scenarios; returns (ran, failed).
pub(crate) fn run(engine_filter: Option<&str>) -> anyhow::Result<(usize, usize)> {
    let runtime = tokio::runtime::Runtime::new()?;
    let state = std::env::temp_dir().join(format!("atls-demo-{}", std::process::id()));
    let result = runtime.block_on(run_all(engine_filter, &state));
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn run_all(engine_filter: Option<&str>, state: &Path) -> anyhow::Result<(usize, usize)> {
    println!("ATLS over HTTP on loopback: `atls serve` and a client, one request per mode.");
    println!("The middlebox view (outer request → outer response) beside what the application saw.\n");
    let (mut ran, mut failed) = (0, 0);
    for engine in ["openssl", "rustls"] {
        if engine_filter.is_some_and(|f| f != engine) {
            continue;
        }
        let running = serve::start(&serve_args(engine, state)).await?;
        let addr = running.http.context("the demo server has an HTTP listener")?;
        let ca = Certificate::all_from_pem(&std::fs::read(state.join("ca.pem"))?)?;
        println!("[server engine {engine}, listening on http://{addr}]");
        for mode in Mode::ALL {
            ran += 1;
            match one(engine, mode, &format!("http://{addr}"), &ca).await {
                Ok(()) => {}
                Err(e) => {
                    failed += 1;
                    println!("  {mode}: FAILED: {e:#}");
                }
            }
        }
        println!();
        drop(running);
    }
    Ok((ran, failed))
}

async fn one(engine: &str, mode: Mode, url: &str, ca: &[Certificate]) -> anyhow::Result<()> {
    let config = ClientConfig {
        trust_anchors: ca.to_vec(),
        ..ClientConfig::default()
    };
    let endpoint = crate::common::engine(engine)?.client(&config)?;
    let client = AtlsClient::new(
        url,
        endpoint,
        ClientOptions {
            mode,
            server_name: Some("localhost".into()),
            ..ClientOptions::default()
        },
    )?;
    let request = Request::post("/echo")
        .header("content-type", "text/plain")
        .body(Bytes::from_static(MESSAGE))?;
    let exchange = client.send_traced(request).await?;
    let session = client
        .send(Request::get("/session").body(Bytes::new())?)
        .await
        .context("GET /session")?;
    let seen: serde_json::Value = serde_json::from_slice(session.body()).context("session JSON")?;
    let info = &exchange.info;
    println!(
        "  mode {mode:<7} {} {} (CIDs {})",
        info.version.name(),
        info.cipher_suite,
        if seen["cids_negotiated"] == true {
            "negotiated"
        } else {
            "fallback"
        }
    );
    for e in &exchange.events {
        println!(
            "    wire: {:<26} {:<44} {:>5} B → {} {:<44} {:>5} B",
            e.request_line,
            e.request_type,
            e.request_bytes,
            e.status.as_u16(),
            e.response_type,
            e.response_bytes
        );
    }
    let echoed = exchange.response.body();
    println!(
        "    app:  POST /echo {:?} → {} {:?}   (session seen by the app: mode {}, engine {})",
        String::from_utf8_lossy(MESSAGE),
        exchange.response.status().as_u16(),
        String::from_utf8_lossy(echoed),
        seen["mode"].as_str().unwrap_or("?"),
        seen["engine"].as_str().unwrap_or("?"),
    );
    anyhow::ensure!(echoed.as_ref() == MESSAGE, "the application's answer differs");
    anyhow::ensure!(seen["mode"] == mode.name(), "the application saw another mode");
    Ok(())
}
