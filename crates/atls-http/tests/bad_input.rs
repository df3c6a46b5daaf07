//! Each bad input gets its status code, and a session established before
//! keeps working through all of them.

mod common;

use std::time::Duration;

use atls_core::{Alert, TlsVersion};
use atls_http::{wire, ClientError, Mode, ServerLimits};
use bytes::Bytes;
use common::*;
use http::Request;

async fn post_atls(url: &str, body: Vec<u8>, cookie: Option<&str>) -> reqwest::Response {
    common::post_atls(&raw(), url, body, cookie).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_and_other_sessions_keep_working() {
    let limits = ServerLimits {
        max_half_open: 4,
        ..ServerLimits::default()
    };
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
        let url = server.url();
        let bystanders: Vec<_> = Mode::ALL
            .iter()
            .map(|mode| {
                client(
                    engine,
                    &client_config(TlsVersion::Tls13),
                    &url,
                    mode_options(*mode),
                )
            })
            .collect();
        for c in &bystanders {
            assert_eq!(
                c.send(get("/hello")).await.expect("bystander").body().as_ref(),
                b"hello"
            );
        }

        // 415: another content type.
        let r = raw()
            .post(format!("{url}{}", wire::WELL_KNOWN_PATH))
            .header("content-type", "application/octet-stream")
            .body(client_hello())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 415);

        // 413: a first flight over its limit (a ClientHello, plus 0-RTT data).
        let first_flight = server.server.derived_limits().first_flight;
        let r = post_atls(&url, vec![0x16; first_flight + 1], None).await;
        assert_eq!(r.status(), 413);
        // One byte less passes the size check and fails as what it is.
        let r = post_atls(&url, vec![0x16; first_flight], None).await;
        assert_eq!(r.status(), 400);

        // 400: not TLS records, truncated records, a stray handshake message,
        // an incomplete ClientHello, or a session not opened by a ClientHello.
        for body in [
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![],
            client_hello()[..20].to_vec(),
            vec![22, 3, 1, 0, 1, 0],
            vec![22, 3, 1, 0, 5, 1, 0, 1, 0, 0],
            vec![23, 3, 3, 0, 1, 0],
        ] {
            let r = post_atls(&url, body, None).await;
            assert_eq!(r.status(), 400);
        }
        assert_eq!(server.server.stats().half_open, 0, "none of them holds a place");

        // 404: records for an unknown, malformed or expired cookie.
        for cookie in [
            format!("{}={}", wire::COOKIE_NAME, "00".repeat(16)),
            format!("{}=not-hex", wire::COOKIE_NAME),
        ] {
            let r = post_atls(&url, vec![23, 3, 3, 0, 1, 0], Some(&cookie)).await;
            assert_eq!(r.status(), 404, "{cookie}");
        }
        // A ClientHello with a stale cookie starts a new session (a client
        // that kept the cookie of an expired session is not locked out).
        let stale = format!("{}={}", wire::COOKIE_NAME, "00".repeat(16));
        let r = post_atls(&url, client_hello(), Some(&stale)).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("set-cookie"));

        // A TLS failure: the body carries the server's alert record. A
        // ClientHello garbled in the middle of its extensions.
        let mut hello = client_hello();
        let garbled_at = hello.len() / 2;
        hello[garbled_at] ^= 0xFF;
        let r = post_atls(&url, hello, None).await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["content-type"], wire::CONTENT_TYPE_ATLS);
        let alert = r.bytes().await.expect("body");
        assert_eq!(alert.first(), Some(&21), "an alert record: {alert:?}");

        // 503 with Retry-After: the half-open table is full.
        let mut statuses = Vec::new();
        for _ in 0..limits.max_half_open + 2 {
            let r = post_atls(&url, client_hello(), None).await;
            statuses.push((r.status(), r.headers().get("retry-after").cloned()));
        }
        let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
        assert!(!refused.is_empty(), "{statuses:?}");
        assert!(refused.iter().all(|(_, retry)| retry.is_some()), "{statuses:?}");

        // 403: a plaintext request to the protected application.
        let r = raw().get(format!("{url}/hello")).send().await.expect("send");
        assert_eq!(r.status(), 403);

        // 405: the OSCORE header with another method than POST (RFC 8613 §11.1).
        for method in [
            http::Method::GET,
            http::Method::PUT,
            http::Method::from_bytes(b"FETCH").expect("method"),
        ] {
            let r = raw()
                .request(method.clone(), format!("{url}/"))
                .header("content-type", "application/oscore")
                .header("oscore", "CRQ")
                .body(vec![1, 2, 3])
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 405, "{method}");
            assert_eq!(r.headers()["allow"], "POST");
        }

        // OSCORE and COSE garbage: the RFC 8613 errors, as 400/401.
        let r = raw()
            .post(format!("{url}/"))
            .header("content-type", "application/oscore")
            .header("oscore", "CRQ")
            .body(vec![1, 2, 3])
            .send()
            .await
            .expect("send");
        assert!(matches!(r.status().as_u16(), 400 | 401), "{}", r.status());
        let r = raw()
            .post(format!("{url}/echo"))
            .header("content-type", wire::CONTENT_TYPE_COSE)
            .body(vec![0xd0, 0x83])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400);

        // Meanwhile the established sessions were never disturbed.
        for c in &bystanders {
            let echo = c
                .send(post("/echo", b"still here"))
                .await
                .expect("bystander after the abuse");
            assert_eq!(echo.body().as_ref(), b"still here", "{}", c.mode());
        }
    }
}

/// A handshake the server refuses reaches the client as the real TLS alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_names_the_alert() {
    for engine in engines() {
        let config = atls_core::ServerConfig {
            client_auth_roots: Some(vec![pki().rogue_ca.certificate().clone()]),
            ..server_config(TlsVersion::Tls12)
        };
        let server = serve(engine, &config, ServerLimits::default()).await;
        let client_cfg = atls_core::ClientConfig {
            client_auth: Some(pki().client.certified_key()),
            ..client_config(TlsVersion::Tls12)
        };
        let c = client(engine, &client_cfg, &server.url(), mode_options(Mode::Oscore));
        let error = c
            .send(get("/hello"))
            .await
            .expect_err("the server distrusts our certificate");
        assert_eq!(error.layer(), atls_http::Layer::Handshake, "{error}");
        match error {
            ClientError::HandshakeRefused { status, alert } => {
                assert_eq!(status, 400);
                let alert = alert.expect("the alert travelled in the body");
                assert!(
                    [
                        Alert::UNKNOWN_CA,
                        Alert::BAD_CERTIFICATE,
                        Alert(46),
                        Alert::DECRYPT_ERROR
                    ]
                    .contains(&alert),
                    "{}: {alert:?}",
                    engine.name()
                );
            }
            other => panic!("{}: {other}", engine.name()),
        }
        assert_eq!(server.server.stats().sessions, 0, "the failed session is gone");
    }
}

/// A session the server has forgotten (expired) is redone transparently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_get_404_and_the_client_handshakes_again() {
    let limits = ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let server = serve(engines()[0], &server_config(TlsVersion::Tls13), limits).await;
    let c = client(
        engines()[0],
        &client_config(TlsVersion::Tls13),
        &server.url(),
        mode_options(Mode::Oscore),
    );
    c.send(get("/hello")).await.expect("first");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = c.send_traced(get("/hello")).await.expect("after expiry");
    assert_eq!(again.response.body().as_ref(), b"hello");
    let statuses: Vec<u16> = again.events.iter().map(|e| e.status.as_u16()).collect();
    assert_eq!(statuses.first(), Some(&404), "{statuses:?}");
    assert!(again.events.iter().any(|e| e.kind == "handshake"));
}

/// close_notify frees the server's session at once; a full table evicts the
/// least recently used established session instead of refusing newcomers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_are_freed_and_a_full_table_evicts_the_oldest() {
    for engine in engines() {
        let limits = ServerLimits {
            max_sessions: 3,
            evict_idle_after: Some(Duration::ZERO),
            ..ServerLimits::default()
        };
        let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
        let url = server.url();
        for mode in Mode::ALL {
            let first = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &url,
                mode_options(mode),
            );
            first.send(get("/hello")).await.expect("first");
            assert_eq!(server.server.stats().sessions, 1);
            // Records: close_notify; OSCORE and COSE: a protected DELETE of
            // /.well-known/atls (the server holds no TLS state for them).
            first.close().await;
            assert_eq!(
                server.server.stats().sessions,
                0,
                "{} {mode}: closing frees the session",
                engine.name()
            );
        }
        // A protected DELETE of /.well-known/atls sent as an ordinary
        // request (here on the new session the client starts after its
        // close) ends that session too; the application never sees it.
        for mode in [Mode::Oscore, Mode::Cose] {
            let gone = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &url,
                mode_options(mode),
            );
            gone.send(get("/hello")).await.expect("session");
            gone.close().await;
            let request = Request::builder()
                .method(http::Method::DELETE)
                .uri(wire::WELL_KNOWN_PATH)
                .body(Bytes::new())
                .expect("request");
            let again = gone.send_traced(request).await.expect("a new session answers");
            assert!(again.events.iter().any(|e| e.kind == "handshake"));
            assert!(
                again.response.status().is_success(),
                "{}",
                again.response.status()
            );
            assert_eq!(
                server.server.stats().sessions,
                0,
                "{}: a DELETE of /.well-known/atls on a new session ends it too",
                engine.name()
            );
        }

        let clients: Vec<_> = (0..4)
            .map(|_| {
                client(
                    engine,
                    &client_config(TlsVersion::Tls13),
                    &url,
                    mode_options(Mode::Records),
                )
            })
            .collect();
        for c in &clients {
            c.send(get("/hello")).await.expect("newcomers are served");
        }
        assert_eq!(server.server.stats().sessions, 3);
        // The evicted (oldest) client is told 404 and transparently starts over.
        let again = clients[0]
            .send_traced(get("/hello"))
            .await
            .expect("evicted client");
        assert_eq!(again.events[0].status, 404);
        assert_eq!(again.response.body().as_ref(), b"hello");
    }
}
