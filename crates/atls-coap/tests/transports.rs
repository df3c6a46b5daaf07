//! Every transport × every ATLS layer × both modes, on loopback: CoAP over
//! UDP, TCP and DTLS (`coaps://`, PSK and certificates) carrying TLS 1.3,
//! TLS 1.2 and DTLS 1.2 handshakes whose flights need blockwise in both
//! directions, then OSCORE requests and records mode; and the same through
//! a lossy link on every UDP-based combination.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use atls_coap::{
    inner_request, AtlsCoapClient, CoapClientOptions, CoapConfig, CoapMode, CoapServer, DtlsServerConfig,
};
use atls_core::{ClientConfig, ClientEndpoint, CommonConfig, Engine, Psk, ServerConfig, TlsVersion};
use atls_tests::{client_config, engines, server_config, SERVER_NAME};
use coap_lite::{MessageClass, RequestType, ResponseType};

mod support;
use support::lossy_relay;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Udp,
    Tcp,
    Dtls,
}

const TRANSPORT_PSK_ID: &str = "gateway-hop";

fn fast_dtls(mut common: CommonConfig) -> CommonConfig {
    common.dtls.initial_timeout = Duration::from_millis(150);
    common
}

/// The `coaps://` hop as `atls serve` runs it: a HelloVerifyRequest first.
fn hop(mut common: CommonConfig) -> CommonConfig {
    common.dtls.cookie_exchange = true;
    fast_dtls(common)
}

fn transport_psk() -> Psk {
    Psk::new(TRANSPORT_PSK_ID, b"0123456789abcdef0123456789abcdef".to_vec()).expect("psk")
}

/// The hop-by-hop DTLS of `coaps://`: PSK or the fixture certificate.
fn transport_server(psk: bool) -> ServerConfig {
    let mut config = if psk {
        ServerConfig {
            common: atls_tests::common(TlsVersion::Dtls12),
            psks: vec![transport_psk()],
            ..ServerConfig::default()
        }
    } else {
        server_config(TlsVersion::Dtls12)
    };
    config.common = hop(config.common);
    config
}

fn transport_client(psk: bool) -> ClientConfig {
    let mut config = if psk {
        ClientConfig {
            common: atls_tests::common(TlsVersion::Dtls12),
            psk: Some(transport_psk()),
            ..ClientConfig::default()
        }
    } else {
        client_config(TlsVersion::Dtls12)
    };
    config.common = fast_dtls(config.common);
    config
}

struct Rig {
    udp: SocketAddr,
    tcp: SocketAddr,
    coaps: SocketAddr,
    server: Arc<CoapServer>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// A server on all three transports whose ATLS layer is `layer` on `engine`
/// (DTLS 1.2 on OpenSSL beside it).
async fn rig(engine: &dyn Engine, layer: TlsVersion, block_size: usize, psk_transport: bool) -> Rig {
    let openssl = engines()[0];
    let tls_version = if layer == TlsVersion::Dtls12 {
        TlsVersion::Tls13
    } else {
        layer
    };
    let tls = engine.server(&server_config(tls_version)).expect("tls endpoint");
    let mut dtls_config = server_config(TlsVersion::Dtls12);
    dtls_config.common = fast_dtls(dtls_config.common);
    let dtls = openssl.server(&dtls_config).expect("dtls endpoint");
    let config = CoapConfig {
        block_size,
        ..CoapConfig::default()
    };
    let server = CoapServer::with_dtls(tls, Some(dtls), config);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coaps = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (udp_addr, tcp_addr, coaps_addr) = (
        udp.local_addr().expect("addr"),
        tcp.local_addr().expect("addr"),
        coaps.local_addr().expect("addr"),
    );
    let transport = openssl
        .server(&transport_server(psk_transport))
        .expect("transport");
    let tasks = vec![
        tokio::spawn(atls_coap::udp::serve(udp, server.clone())),
        tokio::spawn(atls_coap::tcp::serve(tcp, server.clone())),
        tokio::spawn(atls_coap::dtls::serve(
            coaps,
            transport,
            server.clone(),
            DtlsServerConfig::default(),
        )),
    ];
    Rig {
        udp: udp_addr,
        tcp: tcp_addr,
        coaps: coaps_addr,
        server,
        tasks,
    }
}

fn atls_client(engine: &dyn Engine, layer: TlsVersion) -> Arc<dyn ClientEndpoint> {
    let mut config = client_config(layer);
    config.common = fast_dtls(config.common);
    let engine = if layer == TlsVersion::Dtls12 {
        engines()[0]
    } else {
        engine
    };
    engine.client(&config).expect("client endpoint")
}

async fn connect(
    wire: Wire,
    to: SocketAddr,
    endpoint: Arc<dyn ClientEndpoint>,
    options: CoapClientOptions,
    psk_transport: bool,
) -> AtlsCoapClient {
    match wire {
        Wire::Udp => AtlsCoapClient::new(to, endpoint, options).await,
        Wire::Tcp => AtlsCoapClient::new_tcp(to, endpoint, options).await,
        Wire::Dtls => {
            let transport = engines()[0]
                .client(&transport_client(psk_transport))
                .expect("transport endpoint");
            AtlsCoapClient::new_dtls(to, transport, endpoint, options).await
        }
    }
    .expect("client")
}

fn options(block_size: usize, mode: CoapMode) -> CoapClientOptions {
    CoapClientOptions {
        block_size,
        mode,
        server_name: Some(SERVER_NAME.into()),
        transmission: atls_coap::udp::Transmission {
            ack_timeout: Duration::from_millis(80),
            ack_random_factor: 1.5,
            max_retransmit: 6,
            separate_timeout: Duration::from_secs(5),
        },
        ..CoapClientOptions::default()
    }
}

/// GET /hello, a POST /echo far larger than a block, GET /session: what
/// every combination must do.
async fn exercise(client: &AtlsCoapClient, label: &str, layer: TlsVersion, mode: CoapMode) {
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
    let payload: Vec<u8> = (0..1500u32).map(|i| (i * 7) as u8).collect();
    let echo = client
        .request(&inner_request(RequestType::Post, "/echo", &payload))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(
        echo.header.code,
        MessageClass::Response(ResponseType::Changed),
        "{label}"
    );
    assert_eq!(echo.payload, payload, "{label}");
    let session = client
        .request(&inner_request(RequestType::Get, "/session", b""))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let json: serde_json::Value = serde_json::from_slice(&session.payload).expect("json");
    assert_eq!(json["tls_version"], layer.name(), "{label}");
    let expected_mode = match mode {
        CoapMode::Records => "records",
        _ => "oscore",
    };
    assert_eq!(json["mode"], expected_mode, "{label}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_every_layer_both_modes() {
    for engine in engines() {
        for layer in [TlsVersion::Tls13, TlsVersion::Tls12, TlsVersion::Dtls12] {
            if layer == TlsVersion::Dtls12 && engine.name() != "openssl" {
                continue; // DTLS is OpenSSL's
            }
            for wire in [Wire::Udp, Wire::Tcp, Wire::Dtls] {
                for mode in [CoapMode::Oscore, CoapMode::Records] {
                    let psk_transport = engine.name() == "openssl";
                    let label = format!("{} {layer:?} over {wire:?} in {mode:?}", engine.name());
                    let rig = rig(engine, layer, 64, psk_transport).await;
                    let to = match wire {
                        Wire::Udp => rig.udp,
                        Wire::Tcp => rig.tcp,
                        Wire::Dtls => rig.coaps,
                    };
                    let client = connect(
                        wire,
                        to,
                        atls_client(engine, layer),
                        options(64, mode),
                        psk_transport,
                    )
                    .await;
                    exercise(&client, &label, layer, mode).await;
                    let trips = client.last_handshake();
                    if wire == Wire::Tcp {
                        assert!(
                            trips.iter().all(|t| t.blocks_sent == 1 && t.blocks_received == 1),
                            "{label}: whole flights over TCP: {trips:?}"
                        );
                    } else {
                        assert!(
                            trips.iter().any(|t| t.blocks_sent > 1)
                                && trips.iter().any(|t| t.blocks_received > 1),
                            "{label}: flights in Block1 and Block2 blocks: {trips:?}"
                        );
                    }
                    if wire == Wire::Dtls {
                        let transport = client.transport_info().await.expect("DTLS transport");
                        assert_eq!(transport.version, TlsVersion::Dtls12, "{label}");
                        let expected = if psk_transport {
                            atls_core::PeerIdentity::Psk(TRANSPORT_PSK_ID.as_bytes().to_vec())
                        } else {
                            transport.peer.clone()
                        };
                        assert_eq!(transport.peer, expected, "{label}");
                        if !psk_transport {
                            assert!(
                                matches!(transport.peer, atls_core::PeerIdentity::Certificates(_)),
                                "{label}"
                            );
                        }
                    }
                    assert_eq!(rig.server.stats().established, 1, "{label}: one handshake");
                }
            }
        }
    }
}

/// A lossy link (drops, duplicates, delays, reorders) on every UDP-based
/// combination (each engine, UDP and DTLS transports, both modes) with
/// ATLS layer `layer`. With DTLS as the ATLS layer the
/// flights travel in non-confirmable messages, retransmitted by the DTLS
/// timer only.
async fn survives_a_lossy_link(layer: TlsVersion, mut seed: u64) {
    for (engine, wire, mode) in engines()
        .into_iter()
        .filter(|e| layer != TlsVersion::Dtls12 || e.name() == "openssl")
        .flat_map(|e| [Wire::Udp, Wire::Dtls].map(|w| (e, w)))
        .flat_map(|(e, w)| [CoapMode::Oscore, CoapMode::Records].map(|m| (e, w, m)))
    {
        {
            let label = format!("{} {layer:?} over a lossy {wire:?} in {mode:?}", engine.name());
            let rig = rig(engine, layer, 256, true).await;
            let to = if wire == Wire::Udp { rig.udp } else { rig.coaps };
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (relay, faults) = lossy_relay(to, seed).await;
            let client = connect(wire, relay, atls_client(engine, layer), options(256, mode), true).await;
            for i in 0..3u8 {
                let payload = vec![i; 600];
                let echo = client
                    .request(&inner_request(RequestType::Post, "/echo", &payload))
                    .await
                    .unwrap_or_else(|e| panic!("{label} request {i}: {e}"));
                assert_eq!(echo.payload, payload, "{label}");
            }
            assert_eq!(rig.server.stats().established, 1, "{label}: one handshake");
            let (dropped, duplicated) = (
                faults.counts[0].load(Ordering::Relaxed),
                faults.counts[1].load(Ordering::Relaxed),
            );
            assert!(
                dropped > 0 && duplicated > 0,
                "{label}: the link lost {dropped} and duplicated {duplicated}"
            );
            if wire == Wire::Udp {
                let non = faults.non_confirmable.load(Ordering::Relaxed);
                if layer == TlsVersion::Dtls12 {
                    assert!(non > 0, "{label}: DTLS flights travel non-confirmable");
                } else {
                    assert_eq!(non, 0, "{label}: TLS flights travel confirmable");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_over_a_lossy_link() {
    survives_a_lossy_link(TlsVersion::Tls13, 0x1055).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_over_a_lossy_link() {
    survives_a_lossy_link(TlsVersion::Tls12, 0x2055).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls12_over_a_lossy_link() {
    survives_a_lossy_link(TlsVersion::Dtls12, 0x3055).await;
}

/// libcoap's `coap-client` (OpenSSL build) over CoAP over DTLS with a PSK:
/// it POSTs a real ClientHello blockwise inside its DTLS session and
/// receives a well-formed server flight, which our session accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_posts_a_client_hello_over_dtls_with_a_psk() {
    let coap_client = "/usr/bin/coap-client-openssl";
    assert!(
        std::path::Path::new(coap_client).exists(),
        "libcoap's coap-client-openssl is required: run scripts/setup.sh"
    );
    let dir = std::env::temp_dir().join(format!("atls-coaps-libcoap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for engine in engines() {
        let rig = rig(engine, TlsVersion::Tls13, 512, true).await;
        let endpoint = atls_client(engine, TlsVersion::Tls13);
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
            .args(["-m", "post", "-t", "65000", "-b", "64", "-B", "10"])
            .args([
                "-u",
                TRANSPORT_PSK_ID,
                "-k",
                "0123456789abcdef0123456789abcdef",
                "-f",
            ])
            .arg(&hello_path)
            .arg("-o")
            .arg(&out_path)
            .arg(format!("coaps://{}/.well-known/atls", rig.coaps))
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
        session
            .push_flight(&flight, std::time::Instant::now())
            .expect("our session accepts the flight");
        assert_eq!(rig.server.stats().half_open, 1, "{}", engine.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `coaps://` listener under a flood from strangers: garbage datagrams,
/// truncated ClientHellos and more real ClientHellos than the handshake cap
/// (never finished). An established device keeps being served throughout,
/// a newcomer beyond the per-address cap gets no state, and once the
/// unfinished handshakes time out newcomers are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coaps_listener_holds_against_a_flood() {
    let openssl = engines()[0];
    let tls = openssl
        .server(&server_config(TlsVersion::Tls13))
        .expect("tls endpoint");
    let server = CoapServer::new(tls, CoapConfig::default());
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let limits = DtlsServerConfig {
        max_handshakes: 8,
        max_handshakes_per_ip: 4,
        handshake_timeout: Duration::from_secs(2),
        ..DtlsServerConfig::default()
    };
    let transport = openssl.server(&transport_server(true)).expect("transport");
    let task = tokio::spawn(atls_coap::dtls::serve(socket, transport, server.clone(), limits));
    let device = connect(
        Wire::Dtls,
        addr,
        atls_client(openssl, TlsVersion::Tls13),
        options(512, CoapMode::Oscore),
        true,
    )
    .await;
    exercise(&device, "established device", TlsVersion::Tls13, CoapMode::Oscore).await;

    // Spoofers: garbage, truncated hellos, and 12 real ClientHellos that
    // never return the cookie. Each gets a HelloVerifyRequest, smaller than
    // its ClientHello, and the server keeps nothing for it.
    let hop_client = openssl.client(&transport_client(true)).expect("endpoint");
    let hello_session = || {
        atls_core::Session::client(hop_client.as_ref(), &atls_core::ClientSessionParams::default())
            .expect("session")
    };
    let receive = |socket: Arc<tokio::net::UdpSocket>| async move {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|(n, _)| buf[..n].to_vec())
    };
    let mut waits = tokio::task::JoinSet::new();
    let mut hello_len = 0;
    for i in 0..12 {
        let spoofer = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let hello = hello_session()
            .take_flight(std::time::Instant::now())
            .expect("flight")
            .expect("hello");
        hello_len = hello.len();
        spoofer
            .send_to(&hello[..hello.len() / 2], addr)
            .await
            .expect("send");
        spoofer
            .send_to(&[0x16, 0xfe, 0xfd, 0xff], addr)
            .await
            .expect("send");
        spoofer.send_to(&vec![i as u8; 900], addr).await.expect("send");
        spoofer.send_to(&hello, addr).await.expect("send");
        waits.spawn(receive(spoofer));
    }
    let answers: Vec<Vec<u8>> = waits.join_all().await.into_iter().flatten().collect();
    assert_eq!(answers.len(), 12, "every ClientHello is answered, statelessly");
    for answer in &answers {
        assert_eq!(answer.get(13), Some(&3), "a HelloVerifyRequest: {answer:02x?}");
        assert!(
            answer.len() < hello_len,
            "the answer to an unverified ClientHello is {} B, the hello {hello_len} B",
            answer.len()
        );
    }
    // Peers that return the cookie and then stop: they hold handshake
    // slots, at most the per-address cap of 4.
    let mut stalled = Vec::new();
    let mut waits = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let peer = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let mut session = hello_session();
        let hello = session
            .take_flight(std::time::Instant::now())
            .expect("flight")
            .expect("hello");
        peer.send_to(&hello, addr).await.expect("send");
        let verify = receive(peer.clone()).await.expect("a HelloVerifyRequest");
        session
            .push_flight(&verify, std::time::Instant::now())
            .expect("HelloVerifyRequest accepted");
        let second = session
            .take_flight(std::time::Instant::now())
            .expect("flight")
            .expect("hello");
        peer.send_to(&second, addr).await.expect("send");
        waits.spawn(receive(peer.clone()));
        stalled.push((peer, session));
    }
    let flights: Vec<Vec<u8>> = waits.join_all().await.into_iter().flatten().collect();
    assert_eq!(flights.len(), 4, "only the per-address cap of handshakes started");
    assert!(
        flights.iter().all(|f| f.get(13) == Some(&2)),
        "each a ServerHello"
    );
    // The device is still served while the strangers hold their places.
    exercise(
        &device,
        "established device during the flood",
        TlsVersion::Tls13,
        CoapMode::Oscore,
    )
    .await;
    // A newcomer from the same address gets nothing while the cap is full...
    let mut quick = options(512, CoapMode::Oscore);
    quick.transport_timeout = Duration::from_millis(400);
    let refused = AtlsCoapClient::new_dtls(
        addr,
        openssl.client(&transport_client(true)).expect("transport"),
        atls_client(openssl, TlsVersion::Tls13),
        quick,
    )
    .await;
    assert!(
        matches!(refused, Err(atls_coap::CoapClientError::Link(_))),
        "a newcomer beyond the cap gets no handshake"
    );
    // ...and is served once the unfinished handshakes have timed out.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let newcomer = connect(
        Wire::Dtls,
        addr,
        atls_client(openssl, TlsVersion::Tls13),
        options(512, CoapMode::Oscore),
        true,
    )
    .await;
    exercise(
        &newcomer,
        "newcomer after the timeout",
        TlsVersion::Tls13,
        CoapMode::Oscore,
    )
    .await;
    exercise(
        &device,
        "established device after the flood",
        TlsVersion::Tls13,
        CoapMode::Oscore,
    )
    .await;
    task.abort();
}

/// A records-mode POST carrying more CoAP requests than one POST may
/// (16): 4.13, and the answers are never built; 16 are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_post_is_bounded_in_messages() {
    use coap_lite::{CoapOption, Packet};
    let openssl = engines()[0];
    let endpoint = openssl
        .server(&server_config(TlsVersion::Tls13))
        .expect("endpoint");
    let server = CoapServer::new(endpoint, CoapConfig::default());
    let from: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let post = |payload: Vec<u8>| {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        p.set_token(vec![1, 2, 3, 4]);
        p.add_option(CoapOption::UriPath, b".well-known".to_vec());
        p.add_option(CoapOption::UriPath, b"atls".to_vec());
        p.add_option(CoapOption::ContentFormat, 65000u16.to_be_bytes().to_vec());
        p.payload = payload;
        p
    };
    let client = atls_client(openssl, TlsVersion::Tls13);
    let mut session =
        atls_core::Session::client(client.as_ref(), &atls_tests::client_params()).expect("session");
    while let Some(flight) = session.take_flight(std::time::Instant::now()).expect("flight") {
        let answer = server
            .handle_reliable(&post(flight), from, std::time::Instant::now())
            .expect("answer");
        assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Changed));
        if !answer.payload.is_empty() {
            session
                .push_flight(&answer.payload, std::time::Instant::now())
                .expect("push");
        }
        if session.is_handshake_complete() && !session.wants_write() {
            break;
        }
    }
    assert!(session.is_handshake_complete());
    let frames = |n: usize| {
        let mut stream = Vec::new();
        for _ in 0..n {
            stream.extend(
                atls_coap::tcp::encode(&inner_request(RequestType::Get, "/session", b"")).expect("frame"),
            );
        }
        stream
    };
    session.send(&frames(16)).expect("send");
    let records = session
        .take_flight(std::time::Instant::now())
        .expect("flight")
        .expect("records");
    let answer = server
        .handle_reliable(&post(records), from, std::time::Instant::now())
        .expect("answer");
    assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Changed));
    session
        .push_flight(&answer.payload, std::time::Instant::now())
        .expect("push");
    let data = session.take_received();
    let mut rest = data.as_slice();
    let mut answered = 0;
    while let Some(len) = atls_coap::tcp::frame_len(rest).filter(|n| *n <= rest.len()) {
        let (_, response) = atls_coap::tcp::decode(&rest[..len]).expect("frame");
        assert_eq!(
            response.header.code,
            MessageClass::Response(ResponseType::Content)
        );
        answered += 1;
        rest = &rest[len..];
    }
    assert_eq!(answered, 16);
    session.send(&frames(17)).expect("send");
    let records = session
        .take_flight(std::time::Instant::now())
        .expect("flight")
        .expect("records");
    let answer = server
        .handle_reliable(&post(records), from, std::time::Instant::now())
        .expect("answer");
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::RequestEntityTooLarge)
    );
}

/// The server drops an idle DTLS session; the client's next request runs
/// a new DTLS handshake from the same port and is served (the ATLS session
/// inside goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coaps_client_reconnects_after_the_server_dropped_it() {
    let openssl = engines()[0];
    let tls = openssl
        .server(&server_config(TlsVersion::Tls13))
        .expect("tls endpoint");
    let mut dtls_config = server_config(TlsVersion::Dtls12);
    dtls_config.common = fast_dtls(dtls_config.common);
    let dtls = openssl.server(&dtls_config).expect("dtls endpoint");
    let server = CoapServer::with_dtls(tls, Some(dtls), CoapConfig::default());
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let limits = DtlsServerConfig {
        idle_timeout: Duration::from_millis(500),
        ..DtlsServerConfig::default()
    };
    let transport = openssl.server(&transport_server(true)).expect("transport");
    let task = tokio::spawn(atls_coap::dtls::serve(socket, transport, server.clone(), limits));
    let mut quick = options(512, CoapMode::Oscore);
    quick.transmission.max_retransmit = 2;
    let device = connect(
        Wire::Dtls,
        addr,
        atls_client(openssl, TlsVersion::Tls13),
        quick.clone(),
        true,
    )
    .await;
    exercise(&device, "before", TlsVersion::Tls13, CoapMode::Oscore).await;
    let port = device.local_addr().await.expect("addr").port();
    // A device whose ATLS layer is DTLS and that has not handshaken yet:
    // its first flight goes non-confirmable over the dead link.
    let late = connect(
        Wire::Dtls,
        addr,
        atls_client(openssl, TlsVersion::Dtls12),
        quick,
        true,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    exercise(
        &device,
        "after the server dropped the DTLS session",
        TlsVersion::Tls13,
        CoapMode::Oscore,
    )
    .await;
    assert_eq!(
        device.local_addr().await.expect("addr").port(),
        port,
        "the same port"
    );
    exercise(
        &late,
        "a first ATLS handshake over a dropped link",
        TlsVersion::Dtls12,
        CoapMode::Oscore,
    )
    .await;
    assert_eq!(server.stats().established, 2, "the first ATLS session went on");
    task.abort();
}
