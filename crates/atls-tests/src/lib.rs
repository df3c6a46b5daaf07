//! Shared fixtures for the ATLS integration tests: the engines, a development
//! PKI and configuration builders. Not published.
#![forbid(unsafe_code)]

pub mod aiocoap;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use atls_core::pair::{exchange, Transcript};
use atls_core::{
    ClientConfig, ClientEndpoint, ClientSessionParams, CommonConfig, Engine, ServerConfig, ServerEndpoint,
    ServerSessionParams, Session, TlsVersion,
};
use atls_openssl::OpenSslEngine;
use atls_pki::{DevCa, IssuedCert};
use atls_rustls::RustlsEngine;

/// The server name every fixture certificate carries.
pub const SERVER_NAME: &str = "atls.test";

/// Both engines.
pub fn engines() -> [&'static dyn Engine; 2] {
    [&OpenSslEngine, &RustlsEngine]
}

/// A CA with a server and a client certificate, plus an unrelated CA.
#[derive(Debug)]
pub struct Pki {
    /// The CA both sides trust.
    pub ca: DevCa,
    /// Server certificate for [`SERVER_NAME`] and localhost.
    pub server: IssuedCert,
    /// Client certificate.
    pub client: IssuedCert,
    /// A CA nobody trusts, with a server certificate of its own.
    pub rogue_ca: DevCa,
    /// A server certificate from the rogue CA.
    pub rogue_server: IssuedCert,
}

/// The fixture PKI, generated once per test process.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = DevCa::new("ATLS test CA").expect("CA");
        let server = ca
            .issue_server(&[SERVER_NAME, "localhost", "127.0.0.1"])
            .expect("server cert");
        let client = ca.issue_client("device-42").expect("client cert");
        let rogue_ca = DevCa::new("Rogue CA").expect("rogue CA");
        let rogue_server = rogue_ca.issue_server(&[SERVER_NAME]).expect("rogue cert");
        Pki {
            ca,
            server,
            client,
            rogue_ca,
            rogue_server,
        }
    })
}

/// Common settings for one version.
pub fn common(version: TlsVersion) -> CommonConfig {
    CommonConfig {
        versions: vec![version],
        ..CommonConfig::default()
    }
}

/// A client trusting the fixture CA.
pub fn client_config(version: TlsVersion) -> ClientConfig {
    ClientConfig {
        common: common(version),
        trust_anchors: vec![pki().ca.certificate().clone()],
        ..ClientConfig::default()
    }
}

/// A server with the fixture certificate.
pub fn server_config(version: TlsVersion) -> ServerConfig {
    ServerConfig {
        common: common(version),
        identity: Some(pki().server.certified_key()),
        ..ServerConfig::default()
    }
}

/// Session parameters naming [`SERVER_NAME`].
pub fn client_params() -> ClientSessionParams {
    ClientSessionParams {
        server_name: Some(SERVER_NAME.into()),
        ..ClientSessionParams::default()
    }
}

/// Endpoints built by two (possibly different) engines.
pub fn endpoints(
    client_engine: &dyn Engine,
    client: &ClientConfig,
    server_engine: &dyn Engine,
    server: &ServerConfig,
) -> (Arc<dyn ClientEndpoint>, Arc<dyn ServerEndpoint>) {
    (
        client_engine.client(client).expect("client endpoint"),
        server_engine.server(server).expect("server endpoint"),
    )
}

/// A completed (or failed) in-memory handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The client session.
    pub client: Session,
    /// The server session.
    pub server: Session,
    /// What crossed.
    pub transcript: Transcript,
}

/// Run a handshake between fresh sessions of two endpoints.
pub fn handshake(
    client: &dyn ClientEndpoint,
    client_params: &ClientSessionParams,
    server: &dyn ServerEndpoint,
    server_params: &ServerSessionParams,
) -> Handshake {
    let mut c = Session::client(client, client_params).expect("client session");
    let mut s = Session::server(server, server_params).expect("server session");
    let transcript = exchange(&mut c, &mut s, Instant::now());
    Handshake {
        client: c,
        server: s,
        transcript,
    }
}

/// Assert a handshake completed on both sides.
pub fn assert_complete(h: &Handshake) {
    assert!(h.transcript.is_ok(), "handshake failed: {:?}", h.transcript);
    assert!(
        h.client.is_handshake_complete(),
        "client not complete: {:?}",
        h.client
    );
    assert!(
        h.server.is_handshake_complete(),
        "server not complete: {:?}",
        h.server
    );
}

/// The handshakes whose bytes on the wire docs/BENCHMARKS.md reports beside
/// draft-ietf-iotops-security-protocol-comparison: TLS 1.3 with the fixture's
/// P-256 chain on both engines, TLS 1.3 PSK with ECDHE and CCM_8, TLS 1.2 PSK
/// (no ECDHE) with CCM_8, and DTLS 1.2 PSK with CCM_8 (OpenSSL: rustls has
/// no external PSKs). Resumption is off, so no session tickets travel.
pub fn wire_configs() -> Vec<WireConfig> {
    let psk = || atls_core::Psk::new(b"device-7".to_vec(), (0u8..16).collect::<Vec<_>>()).expect("psk");
    let mut out = Vec::new();
    for engine in engines() {
        let mut client = client_config(TlsVersion::Tls13);
        let mut server = server_config(TlsVersion::Tls13);
        client.common.resumption = false;
        server.common.resumption = false;
        out.push(WireConfig {
            name: format!("TLS 1.3, P-256 certificate, X25519 ({})", engine.name()),
            engine,
            client,
            server,
        });
    }
    for (name, version, suite) in [
        (
            "TLS 1.3 PSK-ECDHE, AES_128_CCM_8",
            TlsVersion::Tls13,
            "TLS_AES_128_CCM_8_SHA256",
        ),
        (
            "TLS 1.2 PSK, AES_128_CCM_8",
            TlsVersion::Tls12,
            "TLS_PSK_WITH_AES_128_CCM_8",
        ),
        (
            "DTLS 1.2 PSK, AES_128_CCM_8",
            TlsVersion::Dtls12,
            "TLS_PSK_WITH_AES_128_CCM_8",
        ),
    ] {
        let common = CommonConfig {
            versions: vec![version],
            cipher_suites: Some(vec![
                atls_core::CipherSuite::from_name(suite).expect("known suite")
            ]),
            resumption: false,
            ..CommonConfig::default()
        };
        out.push(WireConfig {
            name: format!("{name} (openssl)"),
            engine: &OpenSslEngine,
            client: ClientConfig {
                common: common.clone(),
                psk: Some(psk()),
                ..ClientConfig::default()
            },
            server: ServerConfig {
                common,
                psks: vec![psk()],
                ..ServerConfig::default()
            },
        });
    }
    out
}

/// One handshake configuration of [`wire_configs`].
#[derive(Debug)]
pub struct WireConfig {
    /// What the table calls it.
    pub name: String,
    /// The engine of both sides.
    pub engine: &'static dyn Engine,
    /// The client's configuration.
    pub client: ClientConfig,
    /// The server's configuration.
    pub server: ServerConfig,
}
