//! Random and mutated outer requests never crash the server, get one of the
//! documented statuses, and leave established sessions working.

mod common;

use atls_core::TlsVersion;
use atls_http::{wire, Mode, ServerLimits};
use common::*;
use proptest::prelude::*;

const ALLOWED: &[u16] = &[200, 400, 401, 403, 404, 405, 413, 415, 503];

#[derive(Debug, Clone)]
struct Hostile {
    path: &'static str,
    method: &'static str,
    content_type: Option<&'static str>,
    oscore_header: Option<String>,
    cookie: Option<String>,
    body: Vec<u8>,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let hello = client_hello();
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        // A real ClientHello with a few bytes flipped, or truncated.
        (
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            any::<prop::sample::Index>()
        )
            .prop_map(move |(flips, cut)| {
                let mut b = hello.clone();
                for (i, x) in flips {
                    let i = i.index(b.len());
                    b[i] ^= x | 1;
                }
                let keep = cut.index(b.len()) + 1;
                b.truncate(keep.max(b.len() / 2));
                b
            }),
        // Records with valid headers and random bodies.
        proptest::collection::vec(any::<u8>(), 1..200).prop_map(|body| {
            let mut b = vec![23, 3, 3];
            b.extend_from_slice(&(body.len() as u16).to_be_bytes());
            b.extend_from_slice(&body);
            b
        }),
    ];
    (
        prop::sample::select(vec![wire::WELL_KNOWN_PATH, "/", "/echo", "/session", "/%2e%2e/x"]),
        prop::sample::select(vec!["POST", "GET", "PUT", "FETCH"]),
        prop::sample::select(vec![
            Some(wire::CONTENT_TYPE_ATLS),
            Some(wire::CONTENT_TYPE_OSCORE),
            Some(wire::CONTENT_TYPE_COSE),
            Some("application/cose"),
            Some("text/plain"),
            None,
        ]),
        prop::option::of("[A-Za-z0-9_=+/-]{0,40}"),
        prop::option::of(prop_oneof![
            Just(format!("{}={}", wire::COOKIE_NAME, "00".repeat(16))),
            "[a-z-]{1,12}=[ -~]{0,40}".prop_map(|s| s.replace(';', "")),
            Just(format!("{}=", wire::COOKIE_NAME)),
        ]),
        body,
    )
        .prop_map(
            |(path, method, content_type, oscore_header, cookie, body)| Hostile {
                path,
                method,
                content_type,
                oscore_header,
                cookie,
                body,
            },
        )
}

#[test]
fn hostile_requests_get_documented_statuses_and_harm_no_one() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for engine in engines() {
        let limits = ServerLimits {
            max_half_open: 64,
            ..ServerLimits::default()
        };
        let (server, bystanders) = runtime.block_on(async {
            let server = serve(engine, &server_config(TlsVersion::Tls13), limits).await;
            let url = server.url();
            let bystanders: Vec<_> = Mode::ALL
                .iter()
                .map(|m| client(engine, &client_config(TlsVersion::Tls13), &url, mode_options(*m)))
                .collect();
            for c in &bystanders {
                c.send(get("/hello")).await.expect("bystander");
            }
            (server, bystanders)
        });
        let url = server.url();
        let http = raw();
        let config = ProptestConfig {
            cases: 200,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(h in hostile())| {
            let status = runtime.block_on(async {
                let mut r = http
                    .request(h.method.parse().expect("method"), format!("{url}{}", h.path))
                    .body(h.body.clone());
                if let Some(ct) = h.content_type {
                    r = r.header("content-type", ct);
                }
                if let Some(o) = &h.oscore_header {
                    r = r.header("oscore", o.as_str());
                }
                if let Some(c) = &h.cookie {
                    r = r.header("cookie", c.as_str());
                }
                r.send().await.expect("the server answers").status().as_u16()
            });
            prop_assert!(ALLOWED.contains(&status), "{status} for {h:?}");
        });
        runtime.block_on(async {
            for c in &bystanders {
                let echo = c
                    .send(post("/echo", b"unharmed"))
                    .await
                    .expect("bystander after the storm");
                assert_eq!(
                    echo.body().as_ref(),
                    b"unharmed",
                    "{} {}",
                    engine.name(),
                    c.mode()
                );
            }
        });
        assert!(server.server.stats().half_open <= limits.max_half_open);
    }
}
