//! The admission policy under attack, over real sockets: floods of junk and
//! unfinished handshakes cost no established session, caps hold per client,
//! a repeated first flight holds one place, and only verified requests keep
//! a session recent.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use atls_core::TlsVersion;
use atls_http::{wire, AtlsClient, ClientError, Mode, ServerLimits};
use common::*;

fn clients(engine: &dyn atls_core::Engine, url: &str, n: usize) -> Vec<AtlsClient> {
    (0..n)
        .map(|i| {
            client(
                engine,
                &client_config(TlsVersion::Tls13),
                url,
                mode_options(Mode::ALL[i % 3]),
            )
        })
        .collect()
}

/// The seconds of a 503's `Retry-After`.
fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds")
}

/// Every established client gets its answer on its existing session.
async fn all_answered_without_handshake(clients: &[AtlsClient], label: &str) {
    for (i, c) in clients.iter().enumerate() {
        let exchange = c
            .send_traced(post("/echo", format!("client {i}").as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("{label}: established client {i} ({}): {e}", c.mode()));
        assert_eq!(
            exchange.response.body().as_ref(),
            format!("client {i}").as_bytes()
        );
        assert!(
            exchange
                .events
                .iter()
                .all(|e| e.kind != "handshake" && e.status == 200),
            "{label}: client {i} kept its session: {:?}",
            exchange.events
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_and_unfinished_handshakes_costs_no_established_session() {
    let limits = ServerLimits {
        max_sessions: 16,
        max_half_open: 8,
        max_half_open_per_client: 0,
        handshake_timeout: Duration::from_secs(2),
        ..ServerLimits::default()
    };
    for engine in engines() {
        let label = engine.name();
        let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
        let url = server.url();
        let established = clients(engine, &url, 16);
        for c in &established {
            c.send(get("/hello")).await.expect("established");
        }
        assert_eq!(server.server.stats().established, 16);

        // The flood, from strangers: junk handshake records, truncated
        // ClientHellos, one ClientHello repeated, and complete ClientHellos
        // that are never continued.
        let stranger = raw();
        let flood = |round: usize| {
            let (stranger, url) = (stranger.clone(), url.clone());
            async move {
                let hello = client_hello();
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                for i in 0..80 {
                    let body = match i % 4 {
                        0 => vec![0x16, 0x03, 0x01, 0x00, 0x01, 0x00],
                        1 => hello[..hello.len() / 2].to_vec(),
                        2 => hello.clone(),
                        _ => client_hello(),
                    };
                    let r = post_atls(&stranger, &url, body, None).await;
                    if r.status() == 503 {
                        assert!(
                            r.headers().contains_key("retry-after"),
                            "round {round}: 503 carries Retry-After"
                        );
                    }
                    *statuses.entry(r.status().as_u16()).or_default() += 1;
                }
                statuses
            }
        };

        // 1. The table is full of sessions in use: every ClientHello is
        // refused before anything else happens, and nothing is evicted.
        let statuses = flood(1).await;
        let stats = server.server.stats();
        assert_eq!(
            (stats.established, stats.half_open),
            (16, 0),
            "{label}: {statuses:?}"
        );
        assert_eq!(statuses.get(&503), Some(&40), "{label}: {statuses:?}");
        assert_eq!(
            statuses.get(&400),
            Some(&40),
            "{label}: junk and truncated hellos: {statuses:?}"
        );
        all_answered_without_handshake(&established, label).await;
        let r = post_atls(&raw(), &url, client_hello(), None).await;
        assert_eq!(r.status(), 503, "{label}: a newcomer");
        let retry = retry_after(&r);
        assert!(
            (1..=30).contains(&retry),
            "{label}: until a session may give its place: {retry}"
        );

        // 2. One session leaves: now unfinished handshakes fill the half-open
        // places, and only those; the established sessions are untouched.
        established[0].close().await;
        let established = &established[1..];
        let statuses = flood(2).await;
        let stats = server.server.stats();
        assert_eq!(
            (stats.established, stats.half_open),
            (15, 8),
            "{label}: {statuses:?}"
        );
        assert_eq!(stats.counters.evicted, 0, "{label}");
        all_answered_without_handshake(established, label).await;

        // A new client is turned away with 503 and Retry-After...
        let newcomer = client(
            engine,
            &client_config(TlsVersion::Tls13),
            &url,
            mode_options(Mode::Oscore),
        );
        match newcomer.send(get("/hello")).await {
            Err(ClientError::UnexpectedStatus { status, .. }) => assert_eq!(status, 503, "{label}"),
            other => panic!("{label}: newcomer while the half-open places are taken: {other:?}"),
        }
        let r = post_atls(&raw(), &url, client_hello(), None).await;
        assert_eq!(r.status(), 503);
        let retry = retry_after(&r);
        assert!(
            (1..=2).contains(&retry),
            "{label}: retry after the half-open ones expire: {retry}"
        );

        // ...until room frees: the unfinished handshakes time out.
        tokio::time::sleep(limits.handshake_timeout + Duration::from_millis(200)).await;
        let hello = newcomer
            .send(get("/hello"))
            .await
            .expect("a newcomer once room frees");
        assert_eq!(hello.body().as_ref(), b"hello");
        all_answered_without_handshake(established, label).await;
        let stats = server.server.stats();
        assert_eq!((stats.established, stats.counters.evicted), (16, 0), "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_half_open_place() {
    let limits = ServerLimits {
        max_half_open: 50,
        max_half_open_per_client: 4,
        ..ServerLimits::default()
    };
    let server = serve(engines()[0], &server_config(TlsVersion::Tls13), limits).await;
    let url = server.url();
    let attacker = raw_from(Some(IpAddr::from([127, 0, 0, 2])));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            post_atls(&attacker, &url, client_hello(), None)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 6, "{statuses:?}");
    // Another address is not affected, nor is a full client on a third one.
    let bystander = raw_from(Some(IpAddr::from([127, 0, 0, 3])));
    assert_eq!(
        post_atls(&bystander, &url, client_hello(), None).await.status(),
        200
    );
    let c = client(
        engines()[0],
        &client_config(TlsVersion::Tls13),
        &url,
        mode_options(Mode::Oscore),
    );
    assert_eq!(
        c.send(get("/hello")).await.expect("served").body().as_ref(),
        b"hello"
    );
    assert_eq!(server.server.stats().counters.refused_client, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_first_flight_holds_one_place() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let hello = client_hello();
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(
                post_atls(&raw(), &server.url(), hello.clone(), None)
                    .await
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(statuses, [200, 400, 400, 400, 400], "{}", engine.name());
        let stats = server.server.stats();
        assert_eq!(stats.half_open, 1);
        assert_eq!(stats.counters.refused_duplicate, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_verified_requests_keep_a_session_recent() {
    let limits = ServerLimits {
        max_sessions: 2,
        evict_idle_after: Some(Duration::ZERO),
        ..ServerLimits::default()
    };
    for engine in engines() {
        let label = engine.name();
        let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
        let url = server.url();
        let new_client = || {
            client(
                engine,
                &client_config(TlsVersion::Tls13),
                &url,
                mode_options(Mode::Oscore),
            )
        };
        let (a, b) = (new_client(), new_client());
        a.send(get("/hello")).await.expect("a");
        b.send(get("/hello")).await.expect("b");

        // Someone who saw a's cookie sends forged OSCORE requests with it,
        // again and again: they fail and must not make a recent.
        let cookie = a
            .cookies()
            .await
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        assert!(cookie.contains(wire::COOKIE_NAME), "{cookie}");
        for seq in 0..5u8 {
            let r = raw()
                .post(format!("{url}/"))
                .header("content-type", "application/oscore")
                .header(
                    "oscore",
                    atls_oscore::http::header_value(&[0x09, seq, 0xFF, 0xFF]),
                )
                .header("cookie", &cookie)
                .body(vec![0xAB; 24])
                .send()
                .await
                .expect("send");
            assert!(
                matches!(r.status().as_u16(), 400 | 401),
                "{label}: {}",
                r.status()
            );
        }

        // A newcomer takes the least recently *verified* session's place: a's.
        let c = new_client();
        c.send(get("/hello")).await.expect("newcomer");
        let b_again = b.send_traced(get("/hello")).await.expect("b");
        assert!(
            b_again.events.iter().all(|e| e.kind != "handshake"),
            "{label}: b kept its session"
        );
        let a_again = a.send_traced(get("/hello")).await.expect("a starts over");
        assert_eq!(a_again.events[0].status, 404, "{label}: a was evicted");
        assert_eq!(server.server.stats().counters.evicted, 2, "{label}");
    }
}

/// Whoever saw a session's cookie (it travels in the clear over plain HTTP)
/// sends junk records, a truncated record and an oversized body with it: an
/// OSCORE or COSE session keeps working; a records session loses only its
/// records channel, and its client starts over transparently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_cookie_cannot_end_a_protected_session() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        let url = server.url();
        let stream_limit = server.server.derived_limits().records_stream;
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let c = client(
                engine,
                &client_config(TlsVersion::Tls13),
                &url,
                mode_options(mode),
            );
            c.send(get("/hello")).await.expect("session");
            // A stale session cookie first, as a confused client might send:
            // the server still finds the live one.
            let cookie = format!(
                "{}={}; {}",
                wire::COOKIE_NAME,
                "00".repeat(16),
                c.cookies()
                    .await
                    .into_iter()
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let mut junk = vec![23, 3, 3, 0, 32];
            junk.extend_from_slice(&[0xAB; 32]);
            let r = post_atls(&raw(), &url, junk, Some(&cookie)).await;
            if mode == Mode::Records {
                assert_eq!(r.status(), 400, "{label}");
            } else {
                // The client used the exported keys: the server dropped the
                // TLS engine, and with it the records channel.
                assert_eq!(r.status(), 404, "{label}");
                let text = r.text().await.expect("body");
                assert!(text.contains("records channel"), "{label}: {text}");
            }
            let r = post_atls(&raw(), &url, vec![23, 3, 3, 0, 32, 1, 2], Some(&cookie)).await;
            assert!(
                matches!(r.status().as_u16(), 400 | 404),
                "{label}: {}",
                r.status()
            );
            let mut big = Vec::new();
            while big.len() <= stream_limit {
                big.extend_from_slice(&[23, 3, 3, 0x40, 0x00]);
                big.extend_from_slice(&[0xCD; 0x4000]);
            }
            // (The server answers before the body ends, so the upload may
            // also just be cut off.)
            let r = raw()
                .post(format!("{url}{}", wire::WELL_KNOWN_PATH))
                .header("content-type", wire::CONTENT_TYPE_ATLS)
                .header("cookie", &cookie)
                .body(big)
                .send()
                .await;
            if let Ok(r) = r {
                assert!(
                    matches!(r.status().as_u16(), 400 | 404 | 413),
                    "{label}: {}",
                    r.status()
                );
            }

            if mode == Mode::Records {
                // TLS semantics: the junk records spent that session's
                // records channel. The client learns it with 404 and starts
                // over; a POST is not repeated on its own.
                let lost = c
                    .send(post("/echo", b"mine"))
                    .await
                    .expect_err("records channel ended");
                assert!(matches!(lost, ClientError::SessionLost { .. }), "{label}: {lost}");
                let again = c
                    .send_traced(post("/echo", b"mine"))
                    .await
                    .expect("a new session");
                assert!(again.events.iter().any(|e| e.kind == "handshake"), "{label}");
            } else {
                let after = c
                    .send_traced(post("/echo", b"still mine"))
                    .await
                    .expect("answered");
                assert_eq!(after.response.body().as_ref(), b"still mine", "{label}");
                assert!(
                    after.events.iter().all(|e| e.kind != "handshake"),
                    "{label}: the session survived: {:?}",
                    after.events
                );
            }
        }
    }
}

/// Behind a trusted reverse proxy the per-client cap counts the forwarded
/// address; a request without a usable one counts against its connection's
/// peer, so nothing escapes the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_follows_the_forwarded_address() {
    let options = atls_http::ServerOptions {
        limits: ServerLimits {
            max_half_open_per_client: 2,
            ..ServerLimits::default()
        },
        client_address_header: Some(http::HeaderName::from_static("x-forwarded-for")),
        ..atls_http::ServerOptions::default()
    };
    let server = serve_app(
        engines()[0],
        &server_config(TlsVersion::Tls13),
        options,
        atls_http::app::builtin(),
    )
    .await;
    let url = format!("{}{}", server.url(), wire::WELL_KNOWN_PATH);
    let send = |forwarded: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut r = raw_from(Some(IpAddr::from([127, 0, 0, 2])))
                .post(url)
                .header("content-type", wire::CONTENT_TYPE_ATLS)
                .body(client_hello());
            if let Some(f) = forwarded {
                r = r.header("x-forwarded-for", f);
            }
            r.send().await.expect("send").status().as_u16()
        }
    };
    let mut proxied = Vec::new();
    for _ in 0..3 {
        proxied.push(send(Some("192.0.2.7, 198.51.100.9")).await);
    }
    assert_eq!(proxied, [200, 200, 503], "the last forwarded address is capped");
    assert_eq!(
        send(Some("192.0.2.7, 198.51.100.10")).await,
        200,
        "another forwarded client"
    );
    let mut bypass = Vec::new();
    for forwarded in [None, Some("not an address"), None] {
        bypass.push(send(forwarded).await);
    }
    assert_eq!(
        bypass,
        [200, 200, 503],
        "without a usable header the peer address is capped"
    );
}
