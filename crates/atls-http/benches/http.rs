//! ATLS over HTTP on loopback: one protected request on an established
//! session, and a new session (handshake + first request), per mode and engine.

use std::sync::Arc;

use atls_core::{Engine, TlsVersion};
use atls_http::{app, AtlsClient, AtlsLayer, AtlsServer, ClientOptions, Mode, ServerLimits};
use axum::ServiceExt;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("http");
    group.sample_size(30);
    for engine in atls_tests::engines() {
        let addr = runtime.block_on(async {
            let endpoint = engine
                .server(&atls_tests::server_config(TlsVersion::Tls13))
                .expect("server");
            let server = AtlsServer::new(endpoint, ServerLimits::default());
            let service = AtlsLayer::new(server).layer(app::builtin());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move { axum::serve(listener, service.into_make_service()).await });
            addr
        });
        for mode in Mode::ALL {
            let client = new_client(engine, mode, &format!("http://{addr}"));
            let body = Bytes::from(vec![0x42u8; 64]);
            let request = || http::Request::post("/echo").body(body.clone()).expect("request");
            runtime.block_on(client.send(request())).expect("warm-up");
            group.bench_function(format!("{}/{mode}/request-64B", engine.name()), |b| {
                b.iter(|| runtime.block_on(client.send(request())).expect("request"))
            });
            group.bench_function(format!("{}/{mode}/new-session+request", engine.name()), |b| {
                b.iter(|| {
                    runtime.block_on(async {
                        client.close().await;
                        client.send(request()).await.expect("request")
                    })
                })
            });
        }
    }
    group.finish();
}

fn new_client(engine: &dyn Engine, mode: Mode, url: &str) -> AtlsClient {
    let config = atls_core::ClientConfig {
        // Full handshakes each time: measure the worst case.
        common: atls_core::CommonConfig {
            resumption: false,
            ..atls_tests::common(TlsVersion::Tls13)
        },
        ..atls_tests::client_config(TlsVersion::Tls13)
    };
    let endpoint: Arc<dyn atls_core::ClientEndpoint> = engine.client(&config).expect("client");
    AtlsClient::new(
        url,
        endpoint,
        ClientOptions {
            mode,
            server_name: Some(atls_tests::SERVER_NAME.into()),
            ..ClientOptions::default()
        },
    )
    .expect("client")
}

criterion_group!(benches, bench);
criterion_main!(benches);
