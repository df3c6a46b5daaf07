//! Servers and clients on loopback for the end-to-end tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;

use atls_core::{ClientConfig, Engine, ServerConfig, TlsVersion};
use atls_http::{app, AtlsClient, AtlsLayer, AtlsServer, ClientOptions, Mode, ServerLimits};
use axum::ServiceExt;
use bytes::Bytes;
use http::Request;
use tower::Layer;

pub use atls_tests::{client_config, engines, pki, server_config, SERVER_NAME};

/// A running `atls serve` equivalent on loopback.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<AtlsServer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A server config with 0-RTT enabled.
pub fn server_config_0rtt(version: TlsVersion) -> ServerConfig {
    ServerConfig {
        max_early_data: 16 * 1024,
        ..server_config(version)
    }
}

/// Serve the built-in application behind ATLS on `engine`.
pub async fn serve(engine: &dyn Engine, config: &ServerConfig, limits: ServerLimits) -> TestServer {
    let endpoint = engine.server(config).expect("server endpoint");
    let server = AtlsServer::new(endpoint, limits);
    // The layer wraps the whole router (not `Router::layer`, which wraps
    // each route and would never see `/.well-known/atls`).
    let service = AtlsLayer::new(server.clone()).layer(app::builtin());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, service.into_make_service())
            .await
            .expect("serve");
    });
    TestServer { addr, server, task }
}

/// A client config for `version` with 0-RTT offered.
pub fn client_config_0rtt(version: TlsVersion) -> ClientConfig {
    ClientConfig {
        early_data: true,
        ..client_config(version)
    }
}

/// A client of `url` on `engine`, verifying the fixture server name.
pub fn client(engine: &dyn Engine, config: &ClientConfig, url: &str, options: ClientOptions) -> AtlsClient {
    let endpoint = engine.client(config).expect("client endpoint");
    AtlsClient::new(
        url,
        endpoint,
        ClientOptions {
            server_name: Some(SERVER_NAME.into()),
            ..options
        },
    )
    .expect("client")
}

pub fn get(path: &str) -> Request<Bytes> {
    Request::get(path).body(Bytes::new()).expect("request")
}

pub fn post(path: &str, body: &[u8]) -> Request<Bytes> {
    Request::post(path)
        .header("content-type", "application/octet-stream")
        .body(Bytes::copy_from_slice(body))
        .expect("request")
}

pub fn mode_options(mode: Mode) -> ClientOptions {
    ClientOptions {
        mode,
        ..ClientOptions::default()
    }
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("JSON: {e}: {}", String::from_utf8_lossy(body)))
}

/// A plain HTTP client for hand-made outer requests (no ATLS).
pub fn raw() -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .build()
        .expect("client")
}

/// A real TLS 1.3 ClientHello from a fresh client session.
pub fn client_hello() -> Vec<u8> {
    let endpoint = engines()[0]
        .client(&client_config(TlsVersion::Tls13))
        .expect("endpoint");
    let mut session =
        atls_core::Session::client(endpoint.as_ref(), &atls_tests::client_params()).expect("session");
    session
        .take_flight(std::time::Instant::now())
        .expect("flight")
        .expect("ClientHello")
}
