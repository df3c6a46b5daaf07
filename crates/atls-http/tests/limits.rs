//! Every limit is the advertised one, in every mode on both engines: bodies
//! of hundreds of kilobytes pass, one byte over a limit gets 413 (or a typed
//! client error), and the session stays usable afterwards.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use atls_core::TlsVersion;
use atls_http::{ClientError, ClientOptions, Mode, ServerLimits, ServerOptions};
use common::*;

const MAX_REQUEST: usize = 200_000;
const MAX_RESPONSE: usize = 300_000;

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// The next request is served on the same session (no handshake).
async fn still_usable(c: &atls_http::AtlsClient, label: &str) {
    let exchange = c
        .send_traced(get("/hello"))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(exchange.response.body().as_ref(), b"hello", "{label}");
    assert!(
        exchange.events.iter().all(|e| e.kind != "handshake"),
        "{label}: the session survived: {:?}",
        exchange.events
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_at_and_over_the_limit_in_every_mode() {
    let limits = ServerLimits {
        max_request: MAX_REQUEST,
        max_response: MAX_RESPONSE,
        ..ServerLimits::default()
    };
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                mode_options(mode),
            );
            c.send(get("/hello")).await.expect("handshake");
            for n in [MAX_REQUEST - 1, MAX_REQUEST] {
                let payload = body(n);
                let echo = c
                    .send(post("/echo", &payload))
                    .await
                    .unwrap_or_else(|e| panic!("{label} {n} B: {e}"));
                assert_eq!(echo.status(), 200, "{label} {n} B");
                assert!(
                    echo.body().as_ref() == payload.as_slice(),
                    "{label}: {n} B echoed"
                );
            }
            // One byte over: 413, answered inside the protection.
            let over = c
                .send(post("/echo", &body(MAX_REQUEST + 1)))
                .await
                .expect("answered");
            assert_eq!(over.status(), 413, "{label}");
            assert!(
                String::from_utf8_lossy(over.body()).contains(&MAX_REQUEST.to_string()),
                "{label}: the answer names the limit"
            );
            still_usable(&c, &label).await;

            // Far over (three times the limit): OSCORE and COSE bodies are
            // refused unread (413); a records body is still decrypted as it
            // streams through, so its 413 comes inside TLS. Either way the
            // session survives.
            match (mode, c.send(post("/echo", &body(MAX_REQUEST * 3))).await) {
                (Mode::Records, Ok(r)) => assert_eq!(r.status(), 413, "{label}"),
                (_, Err(ClientError::RequestTooLarge { status, message })) => {
                    assert_eq!(status, 413, "{label}");
                    assert!(message.contains("exceeds"), "{label}: {message}");
                }
                (_, other) => panic!("{label}: far over the limit: {other:?}"),
            }
            still_usable(&c, &label).await;
            if mode == Mode::Records {
                // Beyond the records stream limit the server stops reading:
                // that session's records channel ends and the client starts over.
                let stream_limit = server.server.derived_limits().records_stream;
                let beyond = c.send(post("/echo", &body(stream_limit + 1))).await;
                assert!(beyond.is_err(), "{label}: {beyond:?}");
                let again = c.send_traced(get("/hello")).await.expect("a new session");
                assert!(again.events.iter().any(|e| e.kind == "handshake"), "{label}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_at_and_over_each_limit_in_every_mode() {
    let limits = ServerLimits {
        max_response: MAX_RESPONSE,
        ..ServerLimits::default()
    };
    let options = ServerOptions {
        limits,
        ..ServerOptions::default()
    };
    for engine in engines() {
        let app = test_app(Arc::new(AtomicUsize::new(0)));
        let server = serve_app(engine, &server_config(TlsVersion::Tls13), options.clone(), app).await;
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            // The client accepts 250,000 bytes; the server lets the
            // application answer up to 300,000.
            let client_limit = 250_000;
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                ClientOptions {
                    max_response: client_limit,
                    ..mode_options(mode)
                },
            );
            let at = c
                .send(get(&format!("/big/{client_limit}")))
                .await
                .expect("at the limit");
            assert_eq!(at.body().len(), client_limit, "{label}");
            for over in [client_limit + 1, MAX_RESPONSE] {
                match c.send(get(&format!("/big/{over}"))).await {
                    Err(ClientError::ResponseTooLarge { limit }) => {
                        assert_eq!(limit, client_limit, "{label}")
                    }
                    other => panic!("{label}: {over} B, over the client's limit: {other:?}"),
                }
                still_usable(&c, &label).await;
            }

            // Over the server's limit: a protected 502 from the terminator.
            let roomy = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                mode_options(mode),
            );
            let at = roomy
                .send(get(&format!("/big/{MAX_RESPONSE}")))
                .await
                .expect("server limit");
            assert_eq!(
                (at.status().as_u16(), at.body().len()),
                (200, MAX_RESPONSE),
                "{label}"
            );
            let over = roomy
                .send(get(&format!("/big/{}", MAX_RESPONSE + 1)))
                .await
                .expect("answered");
            assert_eq!(over.status(), 502, "{label}");
            still_usable(&roomy, &label).await;
        }
    }
}

/// Bodies of several hundred kilobytes with the default limits, on every
/// engine pairing, TLS 1.2 and 1.3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_with_the_default_limits() {
    let payload = body(600_000);
    for server_engine in engines() {
        let server = serve(
            server_engine,
            &server_config(TlsVersion::Tls12),
            ServerLimits::default(),
        )
        .await;
        for client_engine in engines() {
            for mode in Mode::ALL {
                let label = format!("{} → {} {mode}", client_engine.name(), server_engine.name());
                let c = client(
                    client_engine,
                    &client_config(TlsVersion::Tls12),
                    &server.url(),
                    mode_options(mode),
                );
                let echo = c
                    .send(post("/echo", &payload))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert!(echo.body().as_ref() == payload.as_slice(), "{label}");
            }
        }
    }
}

/// In record mode the first request rides with the client's Finished, and
/// the server's answer carries its NewSessionTicket records beside the
/// response: when the application's answer is refused, those records still
/// travel and the two record sequences stay in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_answer_keeps_the_record_sequences_in_step() {
    let options = ServerOptions {
        limits: ServerLimits {
            max_response: 1000,
            ..ServerLimits::default()
        },
        ..ServerOptions::default()
    };
    for engine in engines() {
        for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
            let label = format!("{} {version:?}", engine.name());
            let app = test_app(Arc::new(AtomicUsize::new(0)));
            let server = serve_app(engine, &server_config(version), options.clone(), app).await;
            let c = client(
                engine,
                &client_config(version),
                &server.url(),
                mode_options(Mode::Records),
            );
            let first = c.send_traced(get("/big/2000")).await.expect("answered");
            assert!(first.events.iter().any(|e| e.kind == "handshake"), "{label}");
            assert_eq!(first.response.status(), 502, "{label}");
            for _ in 0..3 {
                still_usable(&c, &label).await;
            }
        }
    }
}
