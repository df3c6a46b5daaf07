//! Throwaway review tests: each one PASSES when the defect is present.
mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atls_core::TlsVersion;
use atls_http::{ClientError, ClientOptions, Mode, ServerLimits, ServerOptions};
use common::*;

async fn cookie_of(c: &atls_http::AtlsClient) -> String {
    c.cookies()
        .await
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// R1: whoever saw the cookie ends an established OSCORE/COSE/records
/// session with one junk application_data record on /.well-known/atls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zz_cookie_holder_kills_session_with_junk_record() {
    for engine in engines() {
        let server = serve(engine, &server_config(TlsVersion::Tls13), ServerLimits::default()).await;
        for mode in Mode::ALL {
            let label = format!("{} {mode}", engine.name());
            let c = client(engine, &client_config(TlsVersion::Tls13), &server.url(), mode_options(mode));
            c.send(get("/hello")).await.expect("hello");
            let cookie = cookie_of(&c).await;
            let mut junk = vec![0x17, 0x03, 0x03, 0x00, 0x20];
            junk.extend_from_slice(&[0xAB; 32]);
            let r = post_atls(&raw(), &server.url(), junk, Some(&cookie)).await;
            eprintln!("{label}: junk record with the cookie -> {}", r.status());
            let again = c.send_traced(get("/hello")).await.expect("again");
            eprintln!("{label}: events {:?}", again.events.iter().map(|e| (e.kind, e.status)).collect::<Vec<_>>());
            assert_eq!(again.events[0].status, 404, "{label}: the session was killed by a stranger");
        }
    }
}

/// R2: with `client_address_header` set, a request without it (or with a
/// garbage value) is counted against no client: the per-client cap is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zz_missing_forwarded_header_escapes_per_client_cap() {
    let options = ServerOptions {
        limits: ServerLimits {
            max_half_open: 50,
            max_half_open_per_client: 4,
            ..ServerLimits::default()
        },
        client_address_header: Some(http::HeaderName::from_static("x-forwarded-for")),
        ..ServerOptions::default()
    };
    let server = serve_app(engines()[0], &server_config(TlsVersion::Tls13), options, atls_http::app::builtin()).await;
    let mut ok = 0;
    for i in 0..12 {
        let mut req = raw()
            .post(format!("{}{}", server.url(), atls_http::wire::WELL_KNOWN_PATH))
            .header("content-type", atls_http::wire::CONTENT_TYPE_ATLS)
            .body(client_hello());
        if i % 2 == 0 {
            req = req.header("x-forwarded-for", "not-an-ip");
        }
        if req.send().await.expect("send").status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 12, "cap of 4 per client not applied");
    assert_eq!(server.server.stats().counters.refused_client, 0);
}

/// R3: a records-mode session the server forgot + a body over the
/// first-flight cap = 413, not 404: an idempotent PUT is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zz_forgotten_session_large_put_gets_413_not_retry() {
    let limits = ServerLimits {
        idle_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let server = serve(engines()[0], &server_config(TlsVersion::Tls13), limits).await;
    let c = client(engines()[0], &client_config(TlsVersion::Tls13), &server.url(), mode_options(Mode::Records));
    c.send(get("/hello")).await.expect("hello");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let put = http::Request::put("/echo").body(bytes::Bytes::from(vec![7u8; 200_000])).expect("req");
    let r = c.send(put).await;
    eprintln!("large PUT after the server forgot the session: {r:?}");
    assert!(matches!(r, Err(ClientError::RequestTooLarge { .. })), "{r:?}");
}

/// R4: records mode, response larger than the client accepts (well over):
/// the session is broken (next request handshakes), contrary to §2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zz_records_response_far_over_client_limit_breaks_session() {
    let app = test_app(Arc::new(AtomicUsize::new(0)));
    let server = serve_app(engines()[0], &server_config(TlsVersion::Tls13), ServerOptions::default(), app).await;
    let c = client(
        engines()[0],
        &client_config(TlsVersion::Tls13),
        &server.url(),
        ClientOptions { max_response: 100_000, ..mode_options(Mode::Records) },
    );
    c.send(get("/hello")).await.expect("hello");
    let r = c.send(get("/big/1000000")).await;
    assert!(matches!(r, Err(ClientError::ResponseTooLarge { .. })), "{r:?}");
    let again = c.send_traced(get("/hello")).await.expect("again");
    assert!(again.events.iter().any(|e| e.kind == "handshake"), "session survived");
}

/// R5: dot-segment forms check_path lets through.
#[test]
fn zz_check_path_misses() {
    for p in [
        "/..;/admin",
        "/a/..;x=1/..;/admin",
        "/%252e%252e/admin",
        "/%c0%ae%c0%ae/admin",
        "/%u002e%u002e/admin",
        "/.%00./admin",
        "/..%00/admin",
    ] {
        eprintln!("{p}: {:?}", atls_http::app::check_path(p));
    }
    assert!(atls_http::app::check_path("/..;/admin").is_ok());
    assert!(atls_http::app::check_path("/%252e%252e/admin").is_ok());
}

/// R6: the table loops forever under its lock once the CID space is used up.
#[test]
fn zz_cid_exhaustion_hangs_under_lock() {
    use atls_sessions::{Policy, SessionTable};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let table: SessionTable<u32> = SessionTable::new(Policy {
            max_sessions: 1000,
            max_half_open: 1000,
            max_half_open_per_client: 0,
            cid_len: 1,
            ..Policy::default()
        });
        let now = Instant::now();
        let mut held = Vec::new();
        for i in 0..300u32 {
            let a = table.admit(None, &i.to_be_bytes(), now).expect("admit");
            held.push(a.insert(i).expect("in"));
            let _ = tx.send(i);
        }
    });
    let mut last = 0;
    while let Ok(i) = rx.recv_timeout(Duration::from_secs(5)) {
        last = i;
    }
    eprintln!("admitted up to {last}");
    assert!(last < 299, "admissions stalled at {last}");
}
