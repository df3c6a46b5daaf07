//! The CoAP part of `atls demo`: an ATLS-over-CoAP server on loopback and a
//! client on each engine pairing over UDP, then each transport (UDP, TCP,
//! DTLS) with OSCORE and records mode and DTLS 1.2 as the ATLS layer: the
//! handshake in CoAP messages (blockwise where a flight exceeds a block),
//! then one protected request, what crossed the wire beside what the
//! application saw.

use std::sync::Arc;

use atls_coap::{
    inner_request, AtlsCoapClient, CoapClientOptions, CoapConfig, CoapMode, CoapServer, DtlsServerConfig,
};
use atls_core::{ClientConfig, CommonConfig, Psk, ServerConfig, TlsVersion};
use atls_pki::DevCa;
use coap_lite::RequestType;

const MESSAGE: &[u8] = b"temperature=21.5";

/// Run the CoAP scenarios; returns (ran, failed).
pub(crate) fn run(engine_filter: Option<&str>) -> anyhow::Result<(usize, usize)> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_all(engine_filter))
}

/// One scenario: the client's transport, the ATLS layer, the protection.
#[derive(Clone, Copy)]
struct Scenario {
    wire: Wire,
    version: TlsVersion,
    mode: CoapMode,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Udp,
    Tcp,
    Dtls,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "CoAP over UDP",
            Self::Tcp => "CoAP over TCP",
            Self::Dtls => "CoAP over DTLS (coaps, PSK hop)",
        }
    }
}

const HOP_PSK_ID: &str = "demo-hop";

async fn run_all(engine_filter: Option<&str>) -> anyhow::Result<(usize, usize)> {
    println!("ATLS over CoAP on loopback: flights in POST /.well-known/atls (Content-Format 65000),");
    println!("Block1/Block2 where a flight exceeds a 512-byte block, then OSCORE from the ATLS export.\n");
    let ca = DevCa::new("atls demo CoAP CA")?;
    let identity = ca.issue_server(&["localhost"])?.certified_key();
    let (mut ran, mut failed) = (0, 0);
    let mut run = |label: String, result: anyhow::Result<()>| {
        ran += 1;
        if let Err(e) = result {
            failed += 1;
            println!("  FAILED ({label}): {e:#}");
        }
        println!();
    };
    for server_engine in ["openssl", "rustls"] {
        for client_engine in ["openssl", "rustls"] {
            if engine_filter.is_some_and(|f| f != server_engine && f != client_engine) {
                continue;
            }
            for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
                let label =
                    format!("{client_engine} client → {server_engine} server, {version}, CoAP over UDP");
                println!("== {label}");
                let scenario = Scenario {
                    wire: Wire::Udp,
                    version,
                    mode: CoapMode::Oscore,
                };
                run(
                    label,
                    one(server_engine, client_engine, scenario, &ca, &identity).await,
                );
            }
        }
    }
    println!("The other transports and records mode; DTLS 1.2 as the ATLS layer (OpenSSL).\n");
    for engine in ["openssl", "rustls"] {
        if engine_filter.is_some_and(|f| f != engine) {
            continue;
        }
        let mut scenarios = vec![
            (Wire::Tcp, TlsVersion::Tls13, CoapMode::Oscore),
            (Wire::Dtls, TlsVersion::Tls13, CoapMode::Oscore),
            (Wire::Udp, TlsVersion::Tls13, CoapMode::Records),
            (Wire::Tcp, TlsVersion::Tls12, CoapMode::Records),
        ];
        if engine == "openssl" {
            scenarios.push((Wire::Udp, TlsVersion::Dtls12, CoapMode::Oscore));
            scenarios.push((Wire::Dtls, TlsVersion::Dtls12, CoapMode::Records));
        }
        for (wire, version, mode) in scenarios {
            let label = format!("{engine}, {version} in {mode:?} mode, {}", wire.name());
            println!("== {label}");
            let scenario = Scenario { wire, version, mode };
            run(label, one(engine, engine, scenario, &ca, &identity).await);
        }
    }
    Ok((ran, failed))
}

async fn one(
    server_engine: &str,
    client_engine: &str,
    scenario: Scenario,
    ca: &DevCa,
    identity: &atls_core::CertifiedKey,
) -> anyhow::Result<()> {
    let Scenario { wire, version, mode } = scenario;
    let tls_version = if version == TlsVersion::Dtls12 {
        TlsVersion::Tls13
    } else {
        version
    };
    let server_config = |version: TlsVersion| ServerConfig {
        common: CommonConfig {
            versions: vec![version],
            ..CommonConfig::default()
        },
        identity: Some(identity.clone()),
        ..ServerConfig::default()
    };
    let endpoint = crate::common::engine(server_engine)?.server(&server_config(tls_version))?;
    let dtls = crate::common::engine("openssl")?.server(&server_config(TlsVersion::Dtls12))?;
    let server = CoapServer::with_dtls(endpoint, Some(dtls), CoapConfig::default());
    let hop_psk = Psk::new(HOP_PSK_ID, atls_coap::server::random_bytes::<32>().to_vec())?;
    let hop_common = CommonConfig {
        versions: vec![TlsVersion::Dtls12],
        ..CommonConfig::default()
    };
    let (addr, task) = match wire {
        Wire::Udp => {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let addr = socket.local_addr()?;
            (
                addr,
                tokio::spawn(atls_coap::udp::serve(socket, Arc::clone(&server))),
            )
        }
        Wire::Tcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            (
                addr,
                tokio::spawn(atls_coap::tcp::serve(listener, Arc::clone(&server))),
            )
        }
        Wire::Dtls => {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let addr = socket.local_addr()?;
            let mut common = hop_common.clone();
            common.dtls.cookie_exchange = true;
            let hop = crate::common::engine("openssl")?.server(&ServerConfig {
                common,
                psks: vec![hop_psk.clone()],
                ..ServerConfig::default()
            })?;
            let serve = atls_coap::dtls::serve(socket, hop, Arc::clone(&server), DtlsServerConfig::default());
            (addr, tokio::spawn(serve))
        }
    };
    let client_config = ClientConfig {
        common: CommonConfig {
            versions: vec![version],
            ..CommonConfig::default()
        },
        trust_anchors: vec![ca.certificate().clone()],
        ..ClientConfig::default()
    };
    let client_engine = if version == TlsVersion::Dtls12 {
        "openssl"
    } else {
        client_engine
    };
    let endpoint = crate::common::engine(client_engine)?.client(&client_config)?;
    let options = CoapClientOptions {
        server_name: Some("localhost".into()),
        mode,
        ..CoapClientOptions::default()
    };
    let client = match wire {
        Wire::Udp => AtlsCoapClient::new(addr, endpoint, options).await?,
        Wire::Tcp => AtlsCoapClient::new_tcp(addr, endpoint, options).await?,
        Wire::Dtls => {
            let hop = crate::common::engine("openssl")?.client(&ClientConfig {
                common: hop_common,
                psk: Some(hop_psk),
                ..ClientConfig::default()
            })?;
            AtlsCoapClient::new_dtls(addr, hop, endpoint, options).await?
        }
    };
    let result = show(&client, wire, mode).await;
    task.abort();
    result
}

async fn show(client: &AtlsCoapClient, wire: Wire, mode: CoapMode) -> anyhow::Result<()> {
    let echo = client
        .request(&inner_request(RequestType::Post, "/echo", MESSAGE))
        .await?;
    let info = client
        .session_info()
        .await
        .ok_or_else(|| anyhow::anyhow!("no session"))?;
    if let Some(hop) = client.transport_info().await {
        println!(
            "  hop:  {} {} with PSK {:?}: the hop (a gateway) reads the CoAP messages, not what ATLS protects",
            hop.version.name(),
            hop.cipher_suite,
            HOP_PSK_ID
        );
    }
    println!(
        "  ATLS: {} {} (CIDs {})",
        info.version.name(),
        info.cipher_suite,
        if info.oscore_cids.is_negotiated() {
            "negotiated"
        } else {
            "fallback"
        }
    );
    if wire == Wire::Udp {
        println!(
            "    wire: (the first flight is answered 4.01 with Echo, then repeated: address validation)"
        );
    }
    if info.version == TlsVersion::Dtls12 && wire != Wire::Tcp {
        println!("    wire: (DTLS flights in non-confirmable messages, resent by the DTLS timer only)");
    }
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
    match mode {
        CoapMode::Records => println!(
            "    wire: POST /.well-known/atls (records, path hidden) {sent:>5} B → 2.04 {received:>5} B"
        ),
        _ => println!(
            "    wire: POST (OSCORE, path hidden)        {sent:>5} B → 2.04 (OSCORE) {received:>5} B"
        ),
    }
    println!(
        "    app:  POST /echo {:?} → {:?}",
        String::from_utf8_lossy(MESSAGE),
        String::from_utf8_lossy(&echo.payload)
    );
    anyhow::ensure!(echo.payload == MESSAGE, "the application's answer differs");
    if wire != Wire::Tcp {
        anyhow::ensure!(
            client.last_handshake().iter().any(|t| t.blocks_received > 1),
            "the server's flight should have needed Block2"
        );
    }
    Ok(())
}
