//! DTLS 1.2 as the ATLS layer over HTTP (a device behind a CoAP-to-HTTP
//! gateway whose ATLS layer is DTLS): the server tells the framing from the
//! first record and runs the flights on its DTLS endpoint; then OSCORE,
//! COSE and records mode, beside TLS clients of the same server.

mod common;

use std::net::SocketAddr;

use atls_core::TlsVersion;
use atls_http::{app, AtlsLayer, AtlsServer, Mode, ServerOptions};
use axum::ServiceExt;
use common::*;
use tower::Layer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_flights_over_http_then_every_mode() {
    let openssl = engines()[0];
    let tls = openssl
        .server(&server_config(TlsVersion::Tls13))
        .expect("tls endpoint");
    let dtls = openssl
        .server(&server_config(TlsVersion::Dtls12))
        .expect("dtls endpoint");
    let server = AtlsServer::with_dtls(tls, dtls, ServerOptions::default()).expect("server");
    let service = AtlsLayer::new(server.clone()).layer(app::builtin());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            service.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let url = format!("http://{addr}");
    for mode in [Mode::Oscore, Mode::Cose, Mode::Records] {
        let device = client(
            openssl,
            &client_config(TlsVersion::Dtls12),
            &url,
            mode_options(mode),
        );
        let echo = device
            .send(post("/echo", b"over DTLS"))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(echo.status(), 200, "{mode:?}");
        assert_eq!(echo.body().as_ref(), b"over DTLS", "{mode:?}");
        let session = device.send(get("/session")).await.expect("session");
        let json = json(session.body());
        assert_eq!(json["tls_version"], "DTLSv1.2", "{mode:?}: {json}");
        // A TLS client of the same server at the same time.
        let tls_client = client(
            openssl,
            &client_config(TlsVersion::Tls13),
            &url,
            mode_options(mode),
        );
        let hello = tls_client.send(get("/hello")).await.expect("tls client");
        assert_eq!(hello.status(), 200);
    }
    // A server without a DTLS endpoint refuses DTLS flights with a clear 400.
    let plain = serve(openssl, &server_config(TlsVersion::Tls13), Default::default()).await;
    let device = client(
        openssl,
        &client_config(TlsVersion::Dtls12),
        &plain.url(),
        mode_options(Mode::Oscore),
    );
    let refused = device.send(get("/hello")).await;
    assert!(refused.is_err(), "a TLS-only server refuses a DTLS handshake");
    task.abort();
}
