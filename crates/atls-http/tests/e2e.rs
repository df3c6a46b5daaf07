//! End to end over real loopback sockets: every mode, every engine pairing,
//! TLS 1.2 and 1.3, HTTP/1.1 and h2c; resumption and 0-RTT.

mod common;

use atls_core::TlsVersion;
use atls_http::{ClientOptions, Mode, ServerLimits};
use common::*;

/// Three requests on one session: the built-in resources answer, the
/// application sees the mode and engine, and the handshake happened once.
async fn matrix(mode: Mode, http2: bool) {
    for server_engine in engines() {
        for client_engine in engines() {
            for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
                let label = format!(
                    "{mode} {} → {} {version:?} h2={http2}",
                    client_engine.name(),
                    server_engine.name()
                );
                let server = serve(server_engine, &server_config(version), ServerLimits::default()).await;
                let options = ClientOptions {
                    http2_prior_knowledge: http2,
                    ..mode_options(mode)
                };
                let client = client(client_engine, &client_config(version), &server.url(), options);

                let hello = client
                    .send_traced(get("/hello"))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(hello.response.status(), 200, "{label}");
                assert_eq!(hello.response.body().as_ref(), b"hello", "{label}");
                assert_eq!(hello.info.version, version, "{label}");
                assert!(hello.events.iter().any(|e| e.kind == "handshake"), "{label}");

                let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
                let echo = client.send_traced(post("/echo", &payload)).await.expect("echo");
                assert_eq!(echo.response.body().as_ref(), &payload[..], "{label}");
                assert!(
                    echo.events.iter().all(|e| e.kind != "handshake"),
                    "{label}: the session is reused"
                );
                let expected_type = match mode {
                    Mode::Records => "application/atls",
                    Mode::Oscore => "application/oscore",
                    Mode::Cose => "application/cose; cose-type=\"cose-encrypt0\"",
                };
                assert_eq!(echo.events[0].request_type, expected_type, "{label}");
                assert_eq!(echo.events[0].response_type, expected_type, "{label}");
                assert!(
                    !echo.events[0].request_line.contains("echo") || mode == Mode::Cose,
                    "{label}: the inner path is hidden in record and OSCORE modes"
                );

                let session = client.send(get("/session")).await.expect("session");
                let json = json(session.body());
                assert_eq!(json["mode"], mode.name(), "{label}");
                assert_eq!(json["engine"], server_engine.name(), "{label}");
                assert_eq!(json["tls_version"], version.name(), "{label}");
                let cids = server_engine.capabilities().atls_extensions
                    && client_engine.capabilities().atls_extensions
                    && mode != Mode::Records;
                assert_eq!(json["cids_negotiated"], cids, "{label}");
                assert_eq!(
                    server.server.stats().sessions,
                    1,
                    "{label}: one session for three requests"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_http1() {
    matrix(Mode::Records, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_h2c() {
    matrix(Mode::Records, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_over_http1() {
    matrix(Mode::Oscore, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_over_h2c() {
    matrix(Mode::Oscore, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cose_over_http1() {
    matrix(Mode::Cose, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cose_over_h2c() {
    matrix(Mode::Cose, true).await;
}

/// A second session of the same client endpoint resumes; in record mode on
/// TLS 1.3 its first request travels as 0-RTT data, and the application is
/// told so (RFC 8470 `Early-Data: 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_with_zero_rtt() {
    for engine in engines() {
        let server = serve(
            engine,
            &server_config_0rtt(TlsVersion::Tls13),
            ServerLimits::default(),
        )
        .await;
        let client = client(
            engine,
            &client_config_0rtt(TlsVersion::Tls13),
            &server.url(),
            mode_options(Mode::Records),
        );
        let first = client.send_traced(get("/session")).await.expect("first");
        assert!(!first.info.resumed, "{}", engine.name());
        assert!(!first.early_data);
        assert_eq!(json(first.response.body())["early_data"], false);

        client.reset().await;
        let second = client.send_traced(get("/session")).await.expect("resumed");
        assert!(second.info.resumed, "{}: resumed", engine.name());
        assert!(
            second.early_data,
            "{}: the request travelled as 0-RTT data",
            engine.name()
        );
        let json = json(second.response.body());
        assert_eq!(json["early_data"], true, "{}", engine.name());
        assert_eq!(json["resumed"], true, "{}", engine.name());
        // CH + early data, then Finished answered with the response: two exchanges.
        assert_eq!(second.events.len(), 2, "{}: {:?}", engine.name(), second.events);

        // Later requests on the resumed session are ordinary records.
        let echo = client.send(post("/echo", b"after 0-RTT")).await.expect("echo");
        assert_eq!(echo.body().as_ref(), b"after 0-RTT");
    }
}

/// OSCORE and COSE sessions resume too (their keys come from the new session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_and_cose_sessions_resume() {
    for engine in engines() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            for mode in [Mode::Oscore, Mode::Cose] {
                let server = serve(engine, &server_config(version), ServerLimits::default()).await;
                let client = client(engine, &client_config(version), &server.url(), mode_options(mode));
                let first = client.send_traced(get("/hello")).await.expect("first");
                assert!(!first.info.resumed);
                client.reset().await;
                let second = client.send_traced(get("/hello")).await.expect("second");
                assert!(second.info.resumed, "{} {version:?} {mode}", engine.name());
                assert_eq!(second.response.body().as_ref(), b"hello");
            }
        }
    }
}

/// Many clients at once, handshaking and sending while others' sessions are
/// looked up, swept and established: every request is answered correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_in_every_mode() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..24u32 {
            let mode = Mode::ALL[i as usize % 3];
            let client = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                mode_options(mode),
            );
            tasks.spawn(async move {
                for j in 0..5u32 {
                    let body = format!("client {i} request {j}");
                    let echo = client.send(post("/echo", body.as_bytes())).await.expect("echo");
                    assert_eq!(echo.body().as_ref(), body.as_bytes(), "{mode}");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("client task");
        }
        assert_eq!(server.server.stats().sessions, 24, "{}", engine.name());
        assert_eq!(server.server.stats().half_open, 0, "{}", engine.name());
    }
}

/// An application's 204 reaches the client in every mode, verified (in COSE
/// mode as 200 with an empty sealed body: HTTP/1.1 carries no body with 204).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_answers_are_verified_in_every_mode() {
    let engine = engines()[0];
    let server = serve_app(
        engine,
        &server_config(TlsVersion::Tls13),
        atls_http::ServerOptions::default(),
        test_app(std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0))),
    )
    .await;
    for mode in Mode::ALL {
        let c = client(
            engine,
            &client_config(TlsVersion::Tls13),
            &server.url(),
            mode_options(mode),
        );
        let response = c
            .send(get("/nothing"))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(response.status().is_success(), "{mode}: {}", response.status());
        assert!(response.body().is_empty(), "{mode}");
    }
}
