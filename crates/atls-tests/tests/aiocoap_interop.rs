//! Interop with an independent OSCORE implementation: aiocoap (Python), over
//! real UDP sockets on loopback, with the same security context on both
//! sides, for every AEAD of the ATLS §10 table. Requests and responses verify
//! in both directions; a restarted Rust server recovers its replay window with
//! aiocoap's client through Echo.
//!
//! Needs `python3` with `aiocoap[oscore]` (installed by scripts/setup.sh).

use std::net::UdpSocket;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use atls_core::{CoseAead, HkdfHash};
use atls_oscore::*;
use atls_tests::aiocoap::*;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use zeroize::Zeroizing;

const AEADS: [(CoseAead, &str); 7] = [
    (CoseAead::AesCcm16_64_128, "AES-CCM-16-64-128"),
    (CoseAead::AesCcm16_64_256, "AES-CCM-16-64-256"),
    (CoseAead::AesCcm16_128_128, "AES-CCM-16-128-128"),
    (CoseAead::AesCcm16_128_256, "AES-CCM-16-128-256"),
    (CoseAead::A128Gcm, "A128GCM"),
    (CoseAead::A256Gcm, "A256GCM"),
    (CoseAead::ChaCha20Poly1305, "ChaCha20/Poly1305"),
];

fn coap_request(code: RequestType, path: &str, payload: &[u8], mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(code);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
    p.payload = payload.to_vec();
    p
}

/// Our side's parameters; aiocoap gets the mirror image.
fn rust_params(aead: CoseAead, hkdf: HkdfHash, rust_is_client: bool) -> ContextParams {
    let (sender, recipient) = if rust_is_client {
        (vec![0x0C], vec![0x5E])
    } else {
        (vec![0x5E], vec![0x0C])
    };
    ContextParams {
        master_secret: Zeroizing::new((0..aead.key_len() as u8).collect()),
        master_salt: Zeroizing::new(vec![0x9e, 0x7c, 0xa9, 0x22, 0x23, 0x78, 0x63, 0x40]),
        aead,
        hkdf,
        sender_id: sender,
        recipient_id: recipient,
        id_context: None,
        replay_window: 32,
    }
}

#[test]
fn rust_client_to_aiocoap_server_on_every_aead() {
    require_aiocoap();
    for (aead, alg) in AEADS {
        let hkdf = if aead.key_len() == 16 {
            HkdfHash::Sha256
        } else {
            HkdfHash::Sha384
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = rust_params(aead, hkdf, true);
        write_aiocoap_context(
            dir.path(),
            &ours,
            alg,
            if hkdf == HkdfHash::Sha256 {
                "sha256"
            } else {
                "sha384"
            },
        );
        let port = free_udp_port();
        let _server = start_aiocoap_server(dir.path(), port);
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.connect(("127.0.0.1", port)).expect("connect");
        let mut ctx = SecurityContext::new_in_memory(&ours).expect("context");

        let (wire, binding) =
            protect_request(&mut ctx, &coap_request(RequestType::Get, "hello", b"", 1)).expect("protect");
        let response = exchange(&socket, &wire);
        let plain = unprotect_response(&mut ctx, &response, &binding).expect("aiocoap's response verifies");
        assert_eq!(
            plain.header.code,
            MessageClass::Response(ResponseType::Content),
            "{alg}"
        );
        assert_eq!(plain.payload, b"hello from aiocoap", "{alg}");

        let (wire, binding) = protect_request(
            &mut ctx,
            &coap_request(RequestType::Post, "echo", b"ATLS over OSCORE", 2),
        )
        .expect("protect");
        let response = exchange(&socket, &wire);
        let plain = unprotect_response(&mut ctx, &response, &binding).expect("verifies");
        assert_eq!(plain.header.code, MessageClass::Response(ResponseType::Changed));
        assert_eq!(plain.payload, b"ATLS over OSCORE", "{alg}");

        // aiocoap refuses a replay of our request.
        let response = exchange(&socket, &{
            let mut again = wire.clone();
            again.header.message_id = 99;
            again
        });
        assert!(
            matches!(
                response.header.code,
                MessageClass::Response(ResponseType::Unauthorized)
            ),
            "{alg}: aiocoap must reject a replay, got {:?}",
            response.header.code
        );
    }
}

/// A minimal OSCORE CoAP server on a UDP socket, answering `count` requests.
fn serve(
    socket: UdpSocket,
    mut ctx: SecurityContext,
    count: usize,
    echo: Option<Vec<u8>>,
) -> SecurityContext {
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let mut answered = 0;
    while answered < count {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            break;
        };
        let Ok(request) = Packet::from_bytes(&buf[..n]) else {
            continue;
        };
        let mut response = match unprotect_request(&mut ctx, &request) {
            Ok((plain, binding)) => {
                let path: Vec<u8> = plain
                    .get_option(CoapOption::UriPath)
                    .and_then(|v| v.front().cloned())
                    .unwrap_or_default();
                let mut inner = Packet::new();
                inner.header.code = MessageClass::Response(ResponseType::Content);
                inner.payload = match path.as_slice() {
                    b"hello" => b"hello from rust".to_vec(),
                    _ => {
                        inner.header.code = MessageClass::Response(ResponseType::Changed);
                        plain.payload.clone()
                    }
                };
                answered += 1;
                protect_response(&mut ctx, &inner, &binding, false).expect("protect")
            }
            Err(OscoreError::FreshnessRequired) => {
                protect_echo_challenge(&mut ctx, &request, echo.clone().expect("echo value"))
                    .expect("challenge")
            }
            Err(e) => error_response(&request, &e).expect("an error response"),
        };
        response.header.set_type(MessageType::Acknowledgement);
        response.header.message_id = request.header.message_id;
        response.set_token(request.get_token().to_vec());
        socket
            .send_to(&response.to_bytes().expect("encode"), peer)
            .expect("send");
    }
    ctx
}

#[test]
fn aiocoap_client_to_rust_server_on_every_aead() {
    require_aiocoap();
    for (aead, alg) in AEADS {
        let hkdf = if aead.key_len() == 16 {
            HkdfHash::Sha256
        } else {
            HkdfHash::Sha384
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = rust_params(aead, hkdf, false);
        write_aiocoap_context(
            dir.path(),
            &ours,
            alg,
            if hkdf == HkdfHash::Sha256 {
                "sha256"
            } else {
                "sha384"
            },
        );
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        let ctx = SecurityContext::new_in_memory(&ours).expect("context");
        let server = thread::spawn(move || serve(socket, ctx, 2, None));
        assert_eq!(
            aiocoap_client(dir.path(), port, "hello", "GET", ""),
            ("2.05".into(), b"hello from rust".to_vec()),
            "{alg}"
        );
        assert_eq!(
            aiocoap_client(dir.path(), port, "echo", "POST", "from aiocoap"),
            ("2.04".into(), b"from aiocoap".to_vec()),
            "{alg}"
        );
        server.join().expect("server thread");
    }
}

#[test]
fn restarted_rust_server_recovers_with_aiocoaps_echo() {
    require_aiocoap();
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = rust_params(CoseAead::AesCcm16_64_128, HkdfHash::Sha256, false);
    write_aiocoap_context(dir.path(), &ours, "AES-CCM-16-64-128", "sha256");
    let store: Arc<dyn SequenceStore> =
        Arc::new(RedbStore::open(&dir.path().join("rust.redb")).expect("store"));
    // First life: one request served, sequence numbers persisted.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = socket.local_addr().expect("addr").port();
    let ctx = SecurityContext::with_store(&ours, store.clone(), 16).expect("context");
    let server = thread::spawn(move || serve(socket, ctx, 1, None));
    assert_eq!(aiocoap_client(dir.path(), port, "hello", "GET", "").0, "2.05");
    drop(server.join().expect("server"));

    // Second life: the window is unknown; aiocoap answers the Echo challenge.
    let socket = UdpSocket::bind(("127.0.0.1", port)).expect("rebind");
    let ctx = SecurityContext::with_store(&ours, store, 16).expect("restarted");
    assert_eq!(ctx.replay, ReplayWindow::Uninitialized);
    let server =
        thread::spawn(move || serve(socket, ctx, 1, Some(b"\x01\x02\x03\x04\x05\x06\x07\x08".to_vec())));
    assert_eq!(
        aiocoap_client(dir.path(), port, "hello", "GET", ""),
        ("2.05".into(), b"hello from rust".to_vec())
    );
    let ctx = server.join().expect("server");
    assert!(
        matches!(ctx.replay, ReplayWindow::Active { .. }),
        "the window is recovered"
    );
}

/// The HTTP endpoint of RFC 8613 §11.4: OSCORE terminated in HTTP, the inner
/// request handled as plain HTTP (simple form of RFC 8075).
fn http_endpoint(ctx: &mut SecurityContext, request: &::http::Request<Vec<u8>>) -> ::http::Response<Vec<u8>> {
    let result = (|| {
        let outer = atls_oscore::http::request_from_http(request)?;
        let (inner, binding) = unprotect_request(ctx, &outer)?;
        let inner_http = atls_oscore::http::http_request_from_coap(&inner)?;
        let app_response = match (inner_http.method().as_str(), inner_http.uri().path()) {
            ("GET", "/hello") => ::http::Response::builder()
                .status(200)
                .header("content-type", "text/plain;charset=utf-8")
                .body(b"hello over HTTP".to_vec()),
            ("POST", "/echo") => ::http::Response::builder()
                .status(200)
                .body(inner_http.body().clone()),
            _ => ::http::Response::builder().status(404).body(Vec::new()),
        }
        .expect("response");
        let inner_response = atls_oscore::http::coap_response_from_http(&app_response, inner_http.method())?;
        let outer_response = protect_response(ctx, &inner_response, &binding, false)?;
        atls_oscore::http::response_to_http(&outer_response)
    })();
    result.unwrap_or_else(|e: OscoreError| {
        let ((class, detail), text) = e.coap_error().unwrap_or(((5, 0), "internal error"));
        let status = match (class, detail) {
            (4, 1) => 401,
            (4, 0) | (4, 2) => 400,
            _ => 500,
        };
        ::http::Response::builder()
            .status(status)
            .body(text.as_bytes().to_vec())
            .expect("response")
    })
}

/// aiocoap client → (CoAP over UDP) → gateway → (HTTP, §11.2) → Rust HTTP
/// endpoint, and the response back the same way: aiocoap verifies it.
#[test]
fn aiocoap_client_through_the_http_mapping() {
    require_aiocoap();
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = rust_params(CoseAead::AesCcm16_64_128, HkdfHash::Sha256, false);
    write_aiocoap_context(dir.path(), &ours, "AES-CCM-16-64-128", "sha256");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = socket.local_addr().expect("addr").port();
    let gateway = thread::spawn(move || {
        let mut ctx = SecurityContext::new_in_memory(&ours).expect("context");
        let mut seen_http = Vec::new();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        while seen_http.len() < 2 {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                break;
            };
            let request = Packet::from_bytes(&buf[..n]).expect("coap");
            let http_request = atls_oscore::http::request_to_http(&request, "/").expect("to http");
            let http_response = http_endpoint(&mut ctx, &http_request);
            seen_http.push((http_request.clone(), http_response.status()));
            let mut response = atls_oscore::http::response_from_http(&http_response).expect("from http");
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = request.header.message_id;
            response.set_token(request.get_token().to_vec());
            socket
                .send_to(&response.to_bytes().expect("encode"), peer)
                .expect("send");
        }
        seen_http
    });
    assert_eq!(
        aiocoap_client(dir.path(), port, "hello", "GET", ""),
        ("2.05".into(), b"hello over HTTP".to_vec())
    );
    assert_eq!(
        aiocoap_client(dir.path(), port, "echo", "POST", "via http").1,
        b"via http".to_vec()
    );
    let seen = gateway.join().expect("gateway");
    for (request, status) in seen {
        // What crossed HTTP: POST /, application/oscore, the OSCORE header, no inner path.
        assert_eq!(request.method(), ::http::Method::POST);
        assert_eq!(request.uri().path(), "/");
        assert_eq!(request.headers()["content-type"], "application/oscore");
        assert!(request.headers().contains_key("oscore"));
        assert!(
            !request.body().windows(5).any(|w| w == b"hello"),
            "the inner request is encrypted"
        );
        assert_eq!(status, ::http::StatusCode::OK);
    }
}

/// Rust HTTP client originating OSCORE (§11.4) → (HTTP) → gateway → (CoAP
/// over UDP) → aiocoap server, and back.
#[test]
fn rust_http_client_through_the_http_mapping_to_aiocoap() {
    require_aiocoap();
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = rust_params(CoseAead::A128Gcm, HkdfHash::Sha256, true);
    write_aiocoap_context(dir.path(), &ours, "A128GCM", "sha256");
    let port = free_udp_port();
    let _server = start_aiocoap_server(dir.path(), port);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(("127.0.0.1", port)).expect("connect");
    let mut ctx = SecurityContext::new_in_memory(&ours).expect("context");

    for (mid, (method, path, body, expected)) in [
        ("GET", "/hello", &b""[..], &b"hello from aiocoap"[..]),
        (
            "POST",
            "/echo",
            &b"HTTP all the way"[..],
            &b"HTTP all the way"[..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let inner = ::http::Request::builder()
            .method(method)
            .uri(path)
            .body(body.to_vec())
            .expect("request");
        let coap = atls_oscore::http::coap_request_from_http(&inner).expect("simple form");
        let (outer, binding) = protect_request(&mut ctx, &coap).expect("protect");
        let on_the_wire = atls_oscore::http::request_to_http(&outer, "/").expect("to http");

        // The gateway: HTTP → CoAP over UDP → HTTP.
        let mut gateway_request = atls_oscore::http::request_from_http(&on_the_wire).expect("from http");
        gateway_request.header.set_type(MessageType::Confirmable);
        gateway_request.header.message_id = 100 + mid as u16;
        gateway_request.set_token(vec![mid as u8 + 1]);
        let coap_response = exchange(&socket, &gateway_request);
        let http_response = atls_oscore::http::response_to_http(&coap_response).expect("to http");
        assert_eq!(http_response.status(), ::http::StatusCode::OK);

        let outer_response = atls_oscore::http::response_from_http(&http_response).expect("from http");
        let inner_response = unprotect_response(&mut ctx, &outer_response, &binding).expect("verifies");
        let app = atls_oscore::http::http_response_from_coap(&inner_response).expect("simple form");
        assert_eq!(app.status(), ::http::StatusCode::OK, "{method} {path}");
        assert_eq!(app.body(), expected);
    }
}
