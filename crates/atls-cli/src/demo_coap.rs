//! The CoAP part of `atls demo`: an ATLS-over-CoAP server on UDP loopback
//! and a client on each engine pairing: the handshake in CoAP messages
//! (blockwise where a flight exceeds a block), then one OSCORE request,
//! what crossed the wire beside what the application saw.

use std::sync::Arc;

use atls_coap::{inner_request, AtlsCoapClient, CoapClientOptions, CoapConfig, CoapServer};
use atls_core::{ClientConfig, CommonConfig, ServerConfig, TlsVersion};
use atls_pki::DevCa;
use coap_lite::RequestType;

const MESSAGE: &[u8] = b"temperature=21.5";

/// Run the CoAP scenarios; returns (ran, failed).
pub(crate) fn run(engine_filter: Option<&str>) -> anyhow::Result<(usize, usize)> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_all(engine_filter))
}

async fn run_all(engine_filter: Option<&str>) -> anyhow::Result<(usize, usize)> {
    println!(
        "ATLS over CoAP over UDP on loopback: flights in POST /.well-known/atls (Content-Format 65000),"
    );
    println!("Block1/Block2 where a flight exceeds a 512-byte block, then OSCORE from the ATLS export.\n");
    let ca = DevCa::new("atls demo CoAP CA")?;
    let identity = ca.issue_server(&["localhost"])?.certified_key();
    let (mut ran, mut failed) = (0, 0);
    for server_engine in ["openssl", "rustls"] {
        for client_engine in ["openssl", "rustls"] {
            if engine_filter.is_some_and(|f| f != server_engine && f != client_engine) {
                continue;
            }
            for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
                ran += 1;
                let label = format!("{client_engine} client → {server_engine} server, {version}");
                println!("== {label}");
                if let Err(e) = one(server_engine, client_engine, version, &ca, &identity).await {
                    failed += 1;
                    println!("  FAILED: {e:#}");
                }
                println!();
            }
        }
    }
    Ok((ran, failed))
}

async fn one(
    server_engine: &str,
    client_engine: &str,
    version: TlsVersion,
    ca: &DevCa,
    identity: &atls_core::CertifiedKey,
) -> anyhow::Result<()> {
    let common = CommonConfig {
        versions: vec![version],
        ..CommonConfig::default()
    };
    let server_config = ServerConfig {
        common: common.clone(),
        identity: Some(identity.clone()),
        ..ServerConfig::default()
    };
    let endpoint = crate::common::engine(server_engine)?.server(&server_config)?;
    let server = CoapServer::new(endpoint, CoapConfig::default());
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let task = tokio::spawn(atls_coap::udp::serve(socket, Arc::clone(&server)));
    let client_config = ClientConfig {
        common,
        trust_anchors: vec![ca.certificate().clone()],
        ..ClientConfig::default()
    };
    let endpoint = crate::common::engine(client_engine)?.client(&client_config)?;
    let client = AtlsCoapClient::new(
        addr,
        endpoint,
        CoapClientOptions {
            server_name: Some("localhost".into()),
            ..CoapClientOptions::default()
        },
    )
    .await?;
    let echo = client
        .request(&inner_request(RequestType::Post, "/echo", MESSAGE))
        .await?;
    let info = client
        .session_info()
        .await
        .ok_or_else(|| anyhow::anyhow!("no session"))?;
    println!(
        "  negotiated {} {} (CIDs {})",
        info.version.name(),
        info.cipher_suite,
        if info.oscore_cids.is_negotiated() {
            "negotiated"
        } else {
            "fallback"
        }
    );
    println!("    wire: (the first flight is answered 4.01 with Echo, then repeated: address validation)");
    for (i, t) in client.last_handshake().iter().enumerate() {
        println!(
            "    wire: POST /.well-known/atls  flight {}: {:>5} B in {} message(s) → 2.04 {:>5} B in {} message(s)",
            i + 1,
            t.sent,
            t.blocks_sent,
            t.received,
            t.blocks_received
        );
    }
    let (sent, received) = client.last_request();
    println!("    wire: POST (OSCORE, path hidden)        {sent:>5} B → 2.04 (OSCORE) {received:>5} B");
    println!(
        "    app:  POST /echo {:?} → {:?}",
        String::from_utf8_lossy(MESSAGE),
        String::from_utf8_lossy(&echo.payload)
    );
    task.abort();
    anyhow::ensure!(echo.payload == MESSAGE, "the application's answer differs");
    anyhow::ensure!(
        client.last_handshake().iter().any(|t| t.blocks_received > 1),
        "the server's flight should have needed Block2"
    );
    Ok(())
}
