//! ATLS over CoAP over UDP on loopback: handshakes whose flights need
//! Block1 and Block2, then OSCORE requests, on every engine pairing, TLS 1.2
//! and 1.3; and hostile datagrams answered with their codes while an
//! established client keeps working.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atls_coap::{inner_request, AtlsCoapClient, CoapClientOptions, CoapConfig, CoapServer};
use atls_core::TlsVersion;
use atls_tests::{client_config, engines, server_config, SERVER_NAME};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

mod support;
use support::lossy_relay;

async fn serve(
    engine: &dyn atls_core::Engine,
    version: TlsVersion,
    config: CoapConfig,
) -> (SocketAddr, Arc<CoapServer>) {
    let endpoint = engine.server(&server_config(version)).expect("endpoint");
    let server = CoapServer::new(endpoint, config);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(atls_coap::udp::serve(socket, server.clone()));
    (addr, server)
}

fn options(block_size: usize) -> CoapClientOptions {
    CoapClientOptions {
        block_size,
        server_name: Some(SERVER_NAME.into()),
        ..CoapClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_with_blockwise_flights_then_oscore_requests() {
    for server_engine in engines() {
        for client_engine in engines() {
            for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
                for block_size in [64, 512] {
                    let label = format!(
                        "{} → {} {version:?} blocks of {block_size}",
                        client_engine.name(),
                        server_engine.name()
                    );
                    let config = CoapConfig {
                        block_size,
                        ..CoapConfig::default()
                    };
                    let (addr, server) = serve(server_engine, version, config).await;
                    let endpoint = client_engine
                        .client(&client_config(version))
                        .expect("client endpoint");
                    let client = AtlsCoapClient::new(addr, endpoint, options(block_size))
                        .await
                        .expect("client");
                    let hello = client
                        .request(&inner_request(RequestType::Get, "/hello", b""))
                        .await
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(
                        hello.header.code,
                        MessageClass::Response(ResponseType::Content),
                        "{label}"
                    );
                    assert_eq!(hello.payload, b"hello", "{label}");
                    let trips = client.last_handshake();
                    assert!(
                        trips.iter().any(|t| t.blocks_received > 1),
                        "{label}: the server flight travelled in Block2 blocks: {trips:?}"
                    );
                    if block_size == 64 {
                        assert!(
                            trips.iter().any(|t| t.blocks_sent > 1)
                                && trips.iter().all(|t| t.sent <= block_size || t.blocks_sent > 1),
                            "{label}: the client flights travelled in Block1 blocks: {trips:?}"
                        );
                    }
                    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
                    let echo = client
                        .request(&inner_request(RequestType::Post, "/echo", &payload))
                        .await
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(echo.payload, payload, "{label}");
                    let session = client
                        .request(&inner_request(RequestType::Get, "/session", b""))
                        .await
                        .expect("session");
                    let json: serde_json::Value = serde_json::from_slice(&session.payload).expect("json");
                    assert_eq!(json["tls_version"], version.name(), "{label}");
                    assert_eq!(json["engine"], server_engine.name(), "{label}");
                    let cids = server_engine.capabilities().atls_extensions
                        && client_engine.capabilities().atls_extensions;
                    assert_eq!(json["cids_negotiated"], cids, "{label}");
                    assert_eq!(
                        client.last_handshake(),
                        trips,
                        "{label}: one handshake for three requests"
                    );
                    assert_eq!(server.stats().established, 1, "{label}");
                    // A protected DELETE of /.well-known/atls ends the session
                    // (the server kept no TLS state for it).
                    let closed = client
                        .request(&inner_request(RequestType::Delete, "/.well-known/atls", b""))
                        .await
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(
                        closed.header.code,
                        MessageClass::Response(ResponseType::Deleted),
                        "{label}"
                    );
                    assert_eq!(server.stats().established, 0, "{label}: the session ended");
                }
            }
        }
    }
}

/// A raw CoAP exchange from a plain socket.
async fn raw(socket: &tokio::net::UdpSocket, to: SocketAddr, mut p: Packet) -> Option<Packet> {
    p.header.set_type(MessageType::Confirmable);
    socket
        .send_to(&p.to_bytes().expect("encode"), to)
        .await
        .expect("send");
    let mut buf = vec![0u8; 2048];
    let got = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await;
    let (n, _) = got.ok()?.expect("recv");
    Some(Packet::from_bytes(&buf[..n]).expect("answer parses"))
}

fn flight_post(payload: &[u8], mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(vec![1, 2, 3, 4]);
    p.add_option(CoapOption::UriPath, b".well-known".to_vec());
    p.add_option(CoapOption::UriPath, b"atls".to_vec());
    p.add_option(CoapOption::ContentFormat, 65000u16.to_be_bytes().to_vec());
    p.payload = payload.to_vec();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_get_their_codes_and_harm_no_one() {
    for engine in engines() {
        let (addr, server) = serve(engine, TlsVersion::Tls13, CoapConfig::default()).await;
        let endpoint = engine
            .client(&client_config(TlsVersion::Tls13))
            .expect("endpoint");
        let bystander = AtlsCoapClient::new(addr, endpoint, options(512))
            .await
            .expect("client");
        bystander
            .request(&inner_request(RequestType::Get, "/hello", b""))
            .await
            .expect("bystander");

        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let code = |p: &Packet| p.header.code;
        let mut mid = 100u16;
        let mut next = || {
            mid += 1;
            mid
        };
        // The endpoint is validated first: a 4.01 with Echo, repeated.
        let challenge = raw(&socket, addr, flight_post(b"hello?", next()))
            .await
            .expect("challenge");
        assert_eq!(
            code(&challenge),
            MessageClass::Response(ResponseType::Unauthorized)
        );
        let echo = challenge
            .get_first_option(CoapOption::Unknown(252))
            .expect("Echo")
            .clone();
        let mut again = flight_post(b"hello?", next());
        again.add_option(CoapOption::Unknown(252), echo);
        let a = raw(&socket, addr, again).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::BadRequest),
            "validated: the payload is judged"
        );
        // Not TLS records: 4.00. Junk handshake record: 4.04 (no session) or 4.00.
        let a = raw(&socket, addr, flight_post(b"not records", next()))
            .await
            .expect("answer");
        assert_eq!(code(&a), MessageClass::Response(ResponseType::BadRequest));
        let a = raw(&socket, addr, flight_post(&[22, 3, 1, 0, 1, 0], next()))
            .await
            .expect("answer");
        assert!(matches!(
            code(&a),
            MessageClass::Response(ResponseType::NotFound | ResponseType::BadRequest)
        ));
        // Wrong Content-Format: 4.15.
        let mut p = flight_post(&[22, 3, 1, 0, 1, 1], next());
        p.clear_option(CoapOption::ContentFormat);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::UnsupportedContentFormat)
        );
        // Block1 with a huge block number, with a lying Size1, with SZX 7.
        let mut p = flight_post(&[0; 16], next());
        p.add_option(CoapOption::Block1, vec![0xFF, 0xFF, 0x08]);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::RequestEntityIncomplete)
        );
        let mut p = flight_post(&[0; 16], next());
        p.add_option(CoapOption::Block1, vec![0x08]);
        p.add_option(CoapOption::Size1, vec![0x7F, 0xFF, 0xFF, 0xFF]);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::RequestEntityTooLarge)
        );
        let mut p = flight_post(&[0; 16], next());
        p.add_option(CoapOption::Block1, vec![0x0F]);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(code(&a), MessageClass::Response(ResponseType::BadOption));
        // An unknown critical option: 4.02; a proxy request: 5.05.
        let mut p = flight_post(b"x", next());
        p.add_option(CoapOption::Unknown(9999), vec![1]);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(code(&a), MessageClass::Response(ResponseType::BadOption));
        let mut p = flight_post(b"x", next());
        p.add_option(CoapOption::ProxyUri, b"coap://elsewhere/".to_vec());
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::ProxyingNotSupported)
        );
        // A ClientHello inside application/multipart-core (RFC 8710) opens a
        // session like a plain one.
        let hello = {
            let endpoint = engine
                .client(&client_config(TlsVersion::Tls13))
                .expect("endpoint");
            let mut s =
                atls_core::Session::client(endpoint.as_ref(), &atls_tests::client_params()).expect("session");
            s.take_flight(std::time::Instant::now())
                .expect("flight")
                .expect("hello")
        };
        let mut multipart = vec![0x82, 0x19, 0xFD, 0xE8];
        multipart.push(0x59);
        multipart.extend_from_slice(&(hello.len() as u16).to_be_bytes());
        multipart.extend_from_slice(&hello);
        let mut p = flight_post(&multipart, next());
        p.clear_option(CoapOption::ContentFormat);
        p.add_option(CoapOption::ContentFormat, vec![62]);
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(
            code(&a),
            MessageClass::Response(ResponseType::Changed),
            "{:?}",
            String::from_utf8_lossy(&a.payload)
        );
        assert_eq!(a.payload.first(), Some(&22), "a server flight");
        // An unprotected request to a resource: 4.01.
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = next();
        p.add_option(CoapOption::UriPath, b"hello".to_vec());
        let a = raw(&socket, addr, p).await.expect("answer");
        assert_eq!(code(&a), MessageClass::Response(ResponseType::Unauthorized));
        // Datagrams that are not CoAP, or truncated: dropped without an answer.
        for junk in [&[0xFFu8; 3][..], &[0x40, 0x01], &[0x4D, 0x01, 0, 1, 1]] {
            socket.send_to(junk, addr).await.expect("send");
        }
        // A retransmitted confirmable request gets the same answer.
        let repeat = flight_post(b"again", next());
        let first = raw(&socket, addr, repeat.clone()).await.expect("answer");
        let second = raw(&socket, addr, repeat).await.expect("answer");
        assert_eq!(first.to_bytes().ok(), second.to_bytes().ok());

        let again = bystander
            .request(&inner_request(RequestType::Post, "/echo", b"still here"))
            .await
            .expect("bystander after the abuse");
        assert_eq!(again.payload, b"still here");
        assert_eq!(server.stats().established, 1);
        assert_eq!(
            server.stats().half_open,
            1,
            "only the multipart ClientHello's handshake"
        );
    }
}

/// aiocoap (Python) as the CoAP client, carrying a pyOpenSSL memory-BIO
/// handshake (aiocoap does the blockwise transfer of the flights), then
/// aiocoap's own OSCORE keyed from pyOpenSSL's export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocoap_with_pyopenssl_interoperates() {
    atls_tests::aiocoap::require_aiocoap();
    let dir = std::env::temp_dir().join(format!("atls-coap-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, atls_tests::pki().ca.certificate_pem()).expect("ca");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/aiocoap_atls_client.py");
    for engine in engines() {
        for version in ["1.3", "1.2"] {
            let tls = if version == "1.3" {
                TlsVersion::Tls13
            } else {
                TlsVersion::Tls12
            };
            let (addr, server) = serve(engine, tls, CoapConfig::default()).await;
            let out = tokio::process::Command::new("python3")
                .arg(&script)
                .args([
                    "127.0.0.1",
                    &addr.port().to_string(),
                    ca.to_str().expect("path"),
                    SERVER_NAME,
                    version,
                ])
                .output()
                .await
                .expect("python3");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let label = format!("{} TLS {version}", engine.name());
            assert!(
                out.status.success(),
                "{label}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("hello hello"), "{label}: {stdout}");
            assert!(stdout.contains("echo ok"), "{label}: {stdout}");
            assert!(
                stdout.contains("big ok"),
                "{label}: blockwise inside OSCORE: {stdout}"
            );
            let largest: usize = stdout
                .lines()
                .find_map(|l| l.strip_prefix("blocks "))
                .and_then(|n| n.parse().ok())
                .expect("flight sizes");
            assert!(
                largest > 512,
                "{label}: a flight larger than one block ({largest} B) went blockwise"
            );
            assert_eq!(server.stats().established, 1, "{label}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// libcoap's `coap-client` POSTs a real ClientHello, in Block1 blocks, and
/// reassembles the server's flight from Block2 blocks: a well-formed TLS
/// flight starting with a ServerHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_coap_client_posts_a_client_hello_blockwise() {
    let coap_client = ["/usr/bin/coap-client-notls", "/usr/bin/coap-client"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libcoap's coap-client is required: run scripts/setup.sh");
    let dir = std::env::temp_dir().join(format!("atls-coap-libcoap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for engine in engines() {
        let (addr, server) = serve(engine, TlsVersion::Tls13, CoapConfig::default()).await;
        let endpoint = engine
            .client(&client_config(TlsVersion::Tls13))
            .expect("endpoint");
        let mut session =
            atls_core::Session::client(endpoint.as_ref(), &atls_tests::client_params()).expect("session");
        let hello = session
            .take_flight(std::time::Instant::now())
            .expect("flight")
            .expect("hello");
        let (hello_path, out_path) = (dir.join("hello.bin"), dir.join("flight.bin"));
        std::fs::write(&hello_path, &hello).expect("write");
        let _ = std::fs::remove_file(&out_path);
        let out = tokio::process::Command::new(coap_client)
            .args(["-m", "post", "-t", "65000", "-b", "64", "-B", "10", "-f"])
            .arg(&hello_path)
            .arg("-o")
            .arg(&out_path)
            .arg(format!("coap://{addr}/.well-known/atls"))
            .output()
            .await
            .expect("coap-client");
        assert!(
            out.status.success(),
            "{}: {}",
            engine.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let flight = std::fs::read(&out_path).expect("the server flight");
        assert!(flight.len() > 1000, "{}: {} B", engine.name(), flight.len());
        let records = atls_core::records::split_records(atls_core::Framing::Tls, &flight).expect("records");
        assert_eq!(
            records[0].content_type,
            atls_core::records::ContentType::Handshake
        );
        assert_eq!(
            records[0].body.first(),
            Some(&2),
            "{}: a ServerHello",
            engine.name()
        );
        // The flight really is the answer to our ClientHello: the session accepts it.
        session
            .push_flight(&flight, std::time::Instant::now())
            .expect("our session accepts the flight");
        assert_eq!(server.stats().half_open, 1, "{}", engine.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_requests_survive_a_lossy_link() {
    let mut seed = 0x5eed_u64;
    for engine in engines() {
        for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
            let label = format!("{} {version:?}", engine.name());
            let (addr, server) = serve(
                engine,
                version,
                CoapConfig {
                    block_size: 128,
                    ..CoapConfig::default()
                },
            )
            .await;
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (relay, faults) = lossy_relay(addr, seed).await;
            let faults = &faults.counts;
            let endpoint = engine.client(&client_config(version)).expect("endpoint");
            let client = AtlsCoapClient::new(
                relay,
                endpoint,
                CoapClientOptions {
                    block_size: 128,
                    transmission: atls_coap::udp::Transmission {
                        ack_timeout: Duration::from_millis(60),
                        ack_random_factor: 1.5,
                        max_retransmit: 10,
                        separate_timeout: Duration::from_secs(5),
                    },
                    ..options(128)
                },
            )
            .await
            .expect("client");
            for i in 0..5u8 {
                let payload = vec![i; 200];
                let echo = client
                    .request(&inner_request(RequestType::Post, "/echo", &payload))
                    .await
                    .unwrap_or_else(|e| panic!("{label} request {i}: {e}"));
                assert_eq!(echo.payload, payload, "{label}");
            }
            assert_eq!(
                server.stats().established,
                1,
                "{label}: one handshake despite the losses"
            );
            let (dropped, duplicated) = (
                faults[0].load(std::sync::atomic::Ordering::Relaxed),
                faults[1].load(std::sync::atomic::Ordering::Relaxed),
            );
            assert!(
                dropped > 0 && duplicated > 0,
                "{label}: the link really lost {dropped} and duplicated {duplicated}"
            );
        }
    }
}

/// Towards an endpoint that has not shown it receives what is sent to it,
/// the server sends at most three times the bytes it received, and keeps no
/// handshake state: a spoofed source cannot use it to amplify, nor fill the
/// table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvalidated_endpoint_gets_at_most_three_times_its_bytes() {
    for engine in engines() {
        let (addr, server) = serve(engine, TlsVersion::Tls13, CoapConfig::default()).await;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = engine
            .client(&client_config(TlsVersion::Tls13))
            .expect("endpoint");
        let (mut sent, mut received) = (0usize, 0usize);
        let mut buf = vec![0u8; 4096];
        for i in 0..20u16 {
            // Real ClientHellos, Block2 follow-ups, tiny requests: never an Echo.
            let mut p = match i % 3 {
                0 => {
                    let mut s = atls_core::Session::client(endpoint.as_ref(), &atls_tests::client_params())
                        .expect("session");
                    flight_post(
                        &s.take_flight(std::time::Instant::now())
                            .expect("flight")
                            .expect("hello"),
                        i,
                    )
                }
                1 => {
                    let mut p = flight_post(b"", i);
                    p.add_option(CoapOption::Block2, vec![0x15]);
                    p
                }
                _ => {
                    let mut p = Packet::new();
                    p.header.code = MessageClass::Request(RequestType::Get);
                    p.header.message_id = i;
                    p
                }
            };
            p.header.set_type(MessageType::Confirmable);
            let bytes = p.to_bytes().expect("encode");
            sent += bytes.len();
            socket.send_to(&bytes, addr).await.expect("send");
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf)).await
            {
                received += n;
            }
        }
        assert!(
            received > 0,
            "{}: the endpoint was answered (challenged)",
            engine.name()
        );
        assert!(
            received <= 3 * sent,
            "{}: {received} B out for {sent} B in",
            engine.name()
        );
        let stats = server.stats();
        assert_eq!(
            (stats.half_open, stats.counters.admitted),
            (0, 0),
            "{}: no state for it",
            engine.name()
        );
    }
}

/// CoAP over TCP (RFC 8323): CSM, whole messages, the same handshake and
/// OSCORE on every engine pairing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_coap_over_tcp() {
    for server_engine in engines() {
        for client_engine in engines() {
            for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
                let label = format!("{} → {} {version:?}", client_engine.name(), server_engine.name());
                let endpoint = server_engine.server(&server_config(version)).expect("endpoint");
                let server = CoapServer::new(endpoint, CoapConfig::default());
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let task = tokio::spawn(atls_coap::tcp::serve(listener, server.clone()));
                let endpoint = client_engine
                    .client(&client_config(version))
                    .expect("client endpoint");
                let client = AtlsCoapClient::new_tcp(addr, endpoint, options(512))
                    .await
                    .expect("client");
                let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
                let echo = client
                    .request(&inner_request(RequestType::Post, "/echo", &payload))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(echo.payload, payload, "{label}");
                let trips = client.last_handshake();
                assert!(
                    trips.iter().all(|t| t.blocks_sent == 1 && t.blocks_received == 1),
                    "{label}: whole flights over TCP: {trips:?}"
                );
                assert!(trips.iter().any(|t| t.received > 1000), "{label}: {trips:?}");
                let hello = client
                    .request(&inner_request(RequestType::Get, "/hello", b""))
                    .await
                    .expect("hello");
                assert_eq!(hello.payload, b"hello", "{label}");
                assert_eq!(server.stats().established, 1, "{label}");
                task.abort();
            }
        }
    }
}

/// A hostile server that answers every flight with Block2 blocks that
/// announce more but carry nothing: the client gives up with an error
/// instead of asking forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_endless_empty_blocks() {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(request) = Packet::from_bytes(&buf[..n]) else {
                continue;
            };
            let num = request
                .get_first_option(CoapOption::Block2)
                .and_then(|v| atls_coap::block::BlockValue::decode(v).ok())
                .map_or(0, |b| b.num);
            let mut p = Packet::new();
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = request.header.message_id;
            p.header.code = MessageClass::Response(ResponseType::Changed);
            p.set_token(request.get_token().to_vec());
            p.add_option(
                CoapOption::Block2,
                atls_coap::block::BlockValue {
                    num,
                    more: true,
                    szx: 0,
                }
                .encode(),
            );
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = socket.send_to(&p.to_bytes().expect("encode"), from).await;
        }
    });
    let endpoint = engines()[0]
        .client(&client_config(TlsVersion::Tls13))
        .expect("endpoint");
    let client = AtlsCoapClient::new(addr, endpoint, options(512))
        .await
        .expect("client");
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(&inner_request(RequestType::Get, "/hello", b"")),
    )
    .await
    .expect("the client gives up by itself");
    assert!(
        matches!(result, Err(atls_coap::CoapClientError::Unexpected(_))),
        "{result:?}"
    );
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed) < 10);
}

/// DTLS 1.2 as the ATLS layer over CoAP (layered TLS over an unreliable
/// link; OpenSSL, the engine with DTLS): the server tells the framing from
/// the first record, the flights (fragmented to the DTLS MTU) travel
/// blockwise, then OSCORE keyed from the DTLS export — also through the
/// lossy relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_as_the_atls_layer_over_coap() {
    let openssl = engines()[0];
    assert!(openssl.capabilities().versions.contains(&TlsVersion::Dtls12));
    for lossy in [false, true] {
        let tls = openssl
            .server(&server_config(TlsVersion::Tls13))
            .expect("tls endpoint");
        let dtls = openssl
            .server(&server_config(TlsVersion::Dtls12))
            .expect("dtls endpoint");
        let server = CoapServer::with_dtls(tls, Some(dtls), CoapConfig::default());
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(atls_coap::udp::serve(socket, server.clone()));
        let target = if lossy {
            lossy_relay(addr, 0xD715).await.0
        } else {
            addr
        };
        let endpoint = openssl
            .client(&client_config(TlsVersion::Dtls12))
            .expect("client endpoint");
        let client = AtlsCoapClient::new(
            target,
            endpoint,
            CoapClientOptions {
                transmission: atls_coap::udp::Transmission {
                    ack_timeout: Duration::from_millis(60),
                    ack_random_factor: 1.5,
                    max_retransmit: 10,
                    separate_timeout: Duration::from_secs(5),
                },
                ..options(256)
            },
        )
        .await
        .expect("client");
        let echo = client
            .request(&inner_request(RequestType::Post, "/echo", b"over DTLS"))
            .await
            .unwrap_or_else(|e| panic!("lossy={lossy}: {e}"));
        assert_eq!(echo.payload, b"over DTLS");
        let info = client.session_info().await.expect("session");
        assert_eq!(info.version, TlsVersion::Dtls12);
        assert!(
            client.last_handshake().iter().any(|t| t.blocks_received > 1),
            "blockwise flights"
        );
        let session = client
            .request(&inner_request(RequestType::Get, "/session", b""))
            .await
            .expect("session");
        let json: serde_json::Value = serde_json::from_slice(&session.payload).expect("json");
        assert_eq!(json["tls_version"], "DTLSv1.2");
        assert_eq!(server.stats().established, 1);
    }
}
