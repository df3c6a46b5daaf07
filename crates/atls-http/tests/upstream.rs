//! `Upstream` (the reverse proxy of `atls serve --upstream`): an inner path
//! can never leave the configured prefix, in any mode.

mod common;

use std::sync::{Arc, Mutex};

use atls_core::TlsVersion;
use atls_http::{app::Upstream, Mode, ServerOptions};
use axum::ServiceExt;
use common::*;
use tower::Layer;

/// An upstream application that records every path it is asked for.
async fn recording_upstream() -> (String, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let log = log.clone();
        async move {
            log.lock().expect("lock").push(uri.path().to_owned());
            format!("upstream saw {}", uri.path())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("upstream");
    });
    (url, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_paths_cannot_climb_out_of_the_upstream_prefix() {
    let (upstream_url, seen, _upstream) = recording_upstream().await;
    for engine in engines() {
        let endpoint = engine
            .server(&server_config(TlsVersion::Tls13))
            .expect("endpoint");
        let server = atls_http::AtlsServer::with_options(endpoint, ServerOptions::default()).expect("server");
        let proxy = Upstream::new(&format!("{upstream_url}/app")).expect("upstream");
        let service = atls_http::AtlsLayer::new(server).layer(proxy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                service.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .expect("serve");
        });
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &url,
                mode_options(mode),
            );
            let ok = c.send(get("/x")).await.unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(ok.body().as_ref(), b"upstream saw /app/x", "{label}");
            for path in [
                "/../admin",
                "/a/../../admin",
                "/%2e%2e/admin",
                "/%2E%2E/admin",
                "/.%2e/admin",
                "/..%2fadmin",
                "/a/%2e%2e/%2e%2e/admin",
                "/./../admin",
            ] {
                // Refused by the terminator (an inner 400) or, where the
                // client's URL handling resolves the dots first, refused by
                // the protection (the COSE target no longer matches): never
                // forwarded outside /app.
                match c.send(get(path)).await {
                    Ok(r) => assert!(
                        r.status() == 400
                            || String::from_utf8_lossy(r.body()).starts_with("upstream saw /app/"),
                        "{label} {path}: {} {:?}",
                        r.status(),
                        r.body()
                    ),
                    Err(e) => assert_eq!(e.layer(), atls_http::Layer::Protection, "{label} {path}: {e}"),
                }
            }
        }
        task.abort();
    }
    let seen = seen.lock().expect("lock");
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|p| p.starts_with("/app/")),
        "the upstream was only ever asked for paths under /app: {seen:?}"
    );
}
