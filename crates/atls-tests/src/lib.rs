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
