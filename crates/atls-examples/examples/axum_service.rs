//! An axum application behind ATLS: `cargo run -p atls-examples --example
//! axum_service`, then `cargo run -p atls-examples --example client_modes`.
//! The application sees only plaintext requests, each with the ATLS peer.

use std::net::SocketAddr;

use atls_core::{Engine, ServerConfig};
use axum::routing::get;
use axum::{Extension, Router, ServiceExt};
use tower::Layer;

async fn hello(Extension(peer): Extension<atls_http::AtlsPeer>) -> String {
    format!("hello over {} ({:?} mode)\n", peer.tls_version, peer.mode)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A development CA and a server certificate; a real service loads its own.
    let ca = atls_pki::DevCa::new("example CA")?;
    std::fs::write("example-ca.pem", ca.certificate_pem())?;
    let identity = ca.issue_server(&["localhost", "127.0.0.1"])?.certified_key();
    let endpoint = atls_openssl::OpenSslEngine.server(&ServerConfig {
        identity: Some(identity),
        ..ServerConfig::default()
    })?;

    let app = Router::new().route("/hello", get(hello));
    let server = atls_http::AtlsServer::new(endpoint, atls_http::ServerLimits::default());
    // The layer wraps the whole router (not `Router::layer`, which wraps routes).
    let service = atls_http::AtlsLayer::new(server).layer(app);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!("ATLS on http://{} (CA in example-ca.pem)", listener.local_addr()?);
    axum::serve(
        listener,
        service.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
