//! The client against what sits between it and the server: another cookie
//! name, a middlebox that adds cookies of its own, swallows answers or
//! tampers with what it forwards; and a client's concurrent requests.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use atls_core::TlsVersion;
use atls_http::{ClientError, Mode, ServerLimits, ServerOptions};
use common::*;

fn options_with_cookie(name: &str) -> ServerOptions {
    ServerOptions {
        cookie_name: name.to_owned(),
        ..ServerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_whatever_cookie_the_server_names() {
    for engine in engines() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            let server = serve_app(
                engine,
                &server_config(version),
                options_with_cookie("JSESSIONID"),
                atls_http::app::builtin(),
            )
            .await;
            for mode in Mode::ALL {
                let label = format!("{} {version:?} {mode}", engine.name());
                let c = client(engine, &client_config(version), &server.url(), mode_options(mode));
                for _ in 0..2 {
                    let echo = c
                        .send(post("/echo", b"hi"))
                        .await
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(echo.body().as_ref(), b"hi", "{label}");
                }
                let names: Vec<String> = c.cookies().await.into_iter().map(|(n, _)| n).collect();
                assert_eq!(names, ["JSESSIONID"], "{label}");
            }
            assert!(
                atls_http::AtlsServer::with_options(
                    engine.server(&server_config(version)).expect("endpoint"),
                    options_with_cookie("not a token"),
                )
                .is_err(),
                "a cookie name that is not a token is refused"
            );
        }
    }
}

/// A load balancer in front sets cookies of its own: the client returns
/// them as RFC 6265 says (Path, Secure, Max-Age), and a new session starts
/// with none of the old session's cookies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_set_by_a_middlebox_follow_rfc_6265() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let proxy = tamper_proxy(&server.url()).await;
        // (A `Secure` cookie would be sent here too: loopback is a secure
        // context for cookies, as in browsers.)
        *proxy.tamper.set_cookies.lock().expect("lock") = vec![
            "lb=node-2; Path=/".into(),
            "scoped=1; Path=/elsewhere".into(),
            "other-host=1; Path=/; Domain=example.com".into(),
            "gone=1; Path=/; Max-Age=0".into(),
            "later=1; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT".into(),
        ];
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &proxy.url(),
                mode_options(mode),
            );
            proxy.tamper.cookies_seen.lock().expect("lock").clear();
            c.send(get("/hello"))
                .await
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            c.send(get("/hello"))
                .await
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let seen = proxy.tamper.cookies_seen.lock().expect("lock").clone();
            assert_eq!(
                seen.first().map(String::as_str),
                Some(""),
                "{label}: the first flight carries no cookie"
            );
            for cookie in &seen[1..] {
                assert!(cookie.contains("lb=node-2"), "{label}: {cookie}");
                assert!(cookie.contains("atls-session="), "{label}: {cookie}");
                for absent in ["scoped=", "other-host=", "gone=", "later="] {
                    assert!(!cookie.contains(absent), "{label}: {absent} in {cookie}");
                }
            }
            // A new session starts with an empty store.
            c.reset().await;
            proxy.tamper.cookies_seen.lock().expect("lock").clear();
            c.send(get("/hello")).await.expect("new session");
            let seen = proxy.tamper.cookies_seen.lock().expect("lock").clone();
            assert_eq!(seen.first().map(String::as_str), Some(""), "{label}: {seen:?}");
        }
    }
}

/// A middlebox that forwards a request and then answers 404 in place of the
/// real answer: the client starts a new session and repeats only idempotent
/// requests, so the application never runs a POST twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_repeats_only_idempotent_requests() {
    for engine in engines() {
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let counter = Arc::new(AtomicUsize::new(0));
            let server = serve_app(
                engine,
                &server_config(TlsVersion::Tls13),
                ServerOptions::default(),
                test_app(counter.clone()),
            )
            .await;
            let proxy = tamper_proxy(&server.url()).await;
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &proxy.url(),
                mode_options(mode),
            );
            c.send(get("/hello")).await.expect("session");

            proxy.tamper.swallow.store(1, Ordering::SeqCst);
            match c.send(post("/count", b"")).await {
                Err(e @ ClientError::SessionLost { .. }) => {
                    assert_eq!(e.layer(), atls_http::Layer::Transport, "{label}")
                }
                other => panic!("{label}: a POST whose answer was swallowed: {other:?}"),
            }
            assert_eq!(counter.load(Ordering::SeqCst), 1, "{label}: the POST ran once");
            // (A record-mode request on a new session travels with the
            // handshake: start the session first.)
            c.send(get("/hello")).await.expect("new session");

            proxy.tamper.swallow.store(1, Ordering::SeqCst);
            let again = c.send_traced(get("/count")).await.expect("GET is repeated");
            assert_eq!(again.response.body().as_ref(), b"3", "{label}: the GET ran twice");
            assert!(again.events.iter().any(|e| e.kind == "handshake"), "{label}");
            assert_eq!(
                again.events.iter().filter(|e| e.status == 404).count(),
                1,
                "{label}"
            );
        }
    }
}

/// COSE mode binds the method and target of a request and the status of its
/// response: a middlebox that changes any of them is detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cose_mode_detects_a_changed_method_target_or_status() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let proxy = tamper_proxy(&server.url()).await;
        let c = client(
            engine,
            &client_config(TlsVersion::Tls13),
            &proxy.url(),
            mode_options(Mode::Cose),
        );
        c.send(post("/echo", b"x")).await.expect("untouched");

        *proxy.tamper.method.lock().expect("lock") = Some(http::Method::PUT);
        let e = c.send(post("/echo", b"x")).await.expect_err("method changed");
        assert!(
            matches!(e, ClientError::ProtectionRefused { status, .. } if status == 400),
            "{e}"
        );
        *proxy.tamper.method.lock().expect("lock") = None;

        *proxy.tamper.path.lock().expect("lock") = Some("/session".into());
        let e = c.send(get("/hello")).await.expect_err("target changed");
        assert!(matches!(e, ClientError::ProtectionRefused { .. }), "{e}");
        *proxy.tamper.path.lock().expect("lock") = None;

        *proxy.tamper.status.lock().expect("lock") = Some(http::StatusCode::INTERNAL_SERVER_ERROR);
        let e = c.send(get("/hello")).await.expect_err("status changed");
        assert!(matches!(e, ClientError::Protection(_)), "{e}");
        *proxy.tamper.status.lock().expect("lock") = None;

        // The session survived all of it.
        let ok = c.send_traced(post("/echo", b"y")).await.expect("untouched again");
        assert_eq!(ok.response.body().as_ref(), b"y");
        assert!(ok.events.iter().all(|e| e.kind != "handshake"));
    }
}

/// OSCORE and COSE requests of one client run at the same time: `/barrier`
/// answers only when two requests wait in it together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscore_and_cose_requests_of_one_client_run_concurrently() {
    for engine in engines() {
        let server = serve_app(
            engine,
            &server_config(TlsVersion::Tls13),
            ServerOptions::default(),
            test_app(Arc::new(AtomicUsize::new(0))),
        )
        .await;
        for mode in [Mode::Oscore, Mode::Cose] {
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                mode_options(mode),
            );
            c.send(get("/hello")).await.expect("session");
            let (a, b) = tokio::join!(c.send(get("/barrier")), c.send(get("/barrier")));
            for r in [a, b] {
                let r = r.expect("answered");
                assert_eq!(
                    (r.status().as_u16(), r.body().as_ref()),
                    (200, &b"together"[..]),
                    "{mode}"
                );
            }
            // Concurrent first requests of a fresh client share one handshake.
            let fresh = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &server.url(),
                mode_options(mode),
            );
            let (a, b) = tokio::join!(
                fresh.send_traced(get("/barrier")),
                fresh.send_traced(get("/barrier"))
            );
            let handshakes: usize = [a, b]
                .into_iter()
                .map(|r| {
                    r.expect("answered")
                        .events
                        .iter()
                        .filter(|e| e.kind == "handshake")
                        .count()
                })
                .sum();
            assert_eq!(
                handshakes, 2,
                "{mode}: one handshake of two flights, not two handshakes"
            );
        }
    }
}

/// A middlebox (or an HTTP stack retrying) sends a records body again, small
/// or large: the server refuses the repeat before the TLS stack sees it and
/// the session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_records_body_leaves_the_session_intact() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let proxy = tamper_proxy(&server.url()).await;
        let c = client(
            engine,
            &client_config(TlsVersion::Tls13),
            &proxy.url(),
            mode_options(Mode::Records),
        );
        c.send(get("/hello")).await.expect("session");
        for size in [10, 200_000] {
            let label = format!("{} {size} B", engine.name());
            let payload = vec![b'r'; size];
            let echo = c.send(post("/echo", &payload)).await.expect("echo");
            assert_eq!(echo.body().len(), size, "{label}");
            let (body, cookie) = proxy
                .tamper
                .last_protected
                .lock()
                .expect("lock")
                .clone()
                .expect("seen");
            assert!(body.len() > size, "{label}");
            let r = post_atls(&raw(), &server.url(), body, Some(&cookie)).await;
            assert_eq!(r.status(), 400, "{label}");
            let after = c.send_traced(get("/hello")).await.expect("after the repeat");
            assert_eq!(after.response.body().as_ref(), b"hello", "{label}");
            assert!(
                after.events.iter().all(|e| e.kind != "handshake"),
                "{label}: {:?}",
                after.events
            );
        }
    }
}
