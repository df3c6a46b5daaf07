//! `atls-gateway` on loopback between real CoAP devices and real HTTP ATLS
//! terminators: every device transport × every ATLS layer, SNI routing,
//! refusal of what is not ATLS, upstream faults, and bounded device state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atls_coap::{
    inner_request, AtlsCoapClient, CoapClientError, CoapClientOptions, CoapMode, DtlsServerConfig,
};
use atls_core::{ClientConfig, ClientEndpoint, ClientSessionParams, Psk, ServerConfig, TlsVersion};
use atls_gateway::{Gateway, GatewayConfig, Route};
use atls_http::{app, AtlsLayer, AtlsServer, ServerOptions};
use atls_tests::{client_config, engines, server_config, SERVER_NAME};
use axum::ServiceExt;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tower::Layer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Udp,
    Tcp,
    Dtls,
}

const HOP_PSK_ID: &str = "device-hop";

fn hop_psk() -> Psk {
    Psk::new(HOP_PSK_ID, b"0123456789abcdef0123456789abcdef".to_vec()).expect("psk")
}

/// An HTTP ATLS terminator (TLS on `engine`, DTLS on OpenSSL) with the
/// built-in app, counting the outer requests it gets.
struct Terminator {
    url: String,
    server: Arc<AtlsServer>,
    hits: Arc<AtomicUsize>,
    /// (peer address, Cookie header) of every outer request.
    peers: Arc<std::sync::Mutex<Vec<(SocketAddr, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn terminator(engine: &dyn atls_core::Engine, version: TlsVersion) -> Terminator {
    let tls = engine.server(&server_config(version)).expect("tls endpoint");
    let dtls = engines()[0]
        .server(&server_config(TlsVersion::Dtls12))
        .expect("dtls endpoint");
    let server = AtlsServer::with_dtls(tls, dtls, ServerOptions::default()).expect("server");
    let hits = Arc::new(AtomicUsize::new(0));
    let peers: Arc<std::sync::Mutex<Vec<(SocketAddr, String)>>> = Arc::default();
    let counter = hits.clone();
    let seen = peers.clone();
    let service = tower::ServiceBuilder::new()
        .map_request(move |r: http::Request<axum::body::Body>| {
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(axum::extract::ConnectInfo(peer)) =
                r.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>()
            {
                let cookie = r
                    .headers()
                    .get(http::header::COOKIE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().expect("peers").push((*peer, cookie));
            }
            r
        })
        .service(AtlsLayer::new(server.clone()).layer(app::builtin()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            service.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    Terminator {
        url: format!("http://{addr}"),
        server,
        hits,
        peers,
        task,
    }
}

/// A gateway on UDP, TCP and DTLS (PSK hop).
struct Rig {
    udp: SocketAddr,
    tcp: SocketAddr,
    coaps: SocketAddr,
    gateway: Arc<Gateway>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

async fn gateway(config: GatewayConfig) -> Rig {
    let gateway = Gateway::new(config).expect("gateway");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coaps = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (udp_addr, tcp_addr, coaps_addr) = (
        udp.local_addr().expect("addr"),
        tcp.local_addr().expect("addr"),
        coaps.local_addr().expect("addr"),
    );
    let mut hop = ServerConfig {
        common: atls_tests::common(TlsVersion::Dtls12),
        psks: vec![hop_psk()],
        ..ServerConfig::default()
    };
    hop.common.dtls.cookie_exchange = true;
    let transport = engines()[0].server(&hop).expect("hop");
    let tasks = vec![
        tokio::spawn(atls_coap::udp::serve(udp, gateway.clone())),
        tokio::spawn(atls_coap::tcp::serve(tcp, gateway.clone())),
        tokio::spawn(atls_coap::dtls::serve(
            coaps,
            transport,
            gateway.clone(),
            DtlsServerConfig::default(),
        )),
    ];
    Rig {
        udp: udp_addr,
        tcp: tcp_addr,
        coaps: coaps_addr,
        gateway,
        tasks,
    }
}

fn to(url: &str) -> reqwest::Url {
    reqwest::Url::parse(url).expect("url")
}

fn options(server_name: &str) -> CoapClientOptions {
    CoapClientOptions {
        block_size: 256,
        mode: CoapMode::Oscore,
        server_name: Some(server_name.into()),
        transmission: atls_coap::udp::Transmission {
            ack_timeout: Duration::from_millis(200),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            separate_timeout: Duration::from_secs(5),
        },
        ..CoapClientOptions::default()
    }
}

fn atls_client(layer: TlsVersion) -> Arc<dyn ClientEndpoint> {
    engines()[0]
        .client(&client_config(layer))
        .expect("client endpoint")
}

async fn device(wire: Wire, rig: &Rig, layer: TlsVersion, server_name: &str) -> AtlsCoapClient {
    let endpoint = atls_client(layer);
    let options = options(server_name);
    match wire {
        Wire::Udp => AtlsCoapClient::new(rig.udp, endpoint, options).await,
        Wire::Tcp => AtlsCoapClient::new_tcp(rig.tcp, endpoint, options).await,
        Wire::Dtls => {
            let hop = engines()[0]
                .client(&ClientConfig {
                    common: atls_tests::common(TlsVersion::Dtls12),
                    psk: Some(hop_psk()),
                    ..ClientConfig::default()
                })
                .expect("hop client");
            AtlsCoapClient::new_dtls(rig.coaps, hop, endpoint, options).await
        }
    }
    .expect("device")
}

fn code(p: &Packet) -> MessageClass {
    p.header.code
}

async fn session_json(client: &AtlsCoapClient) -> serde_json::Value {
    let session = client
        .request(&inner_request(RequestType::Get, "/session", b""))
        .await
        .expect("GET /session");
    serde_json::from_slice(&session.payload).expect("json")
}

/// The device's ATLS session runs end to end with the HTTP terminator
/// through the gateway, on every device transport and every ATLS layer
/// (DTLS 1.2 included: layered TLS over an unreliable link), with flights
/// blockwise both ways and OSCORE requests blockwise inside OSCORE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_transport_and_atls_layer_reaches_the_http_service() {
    for engine in engines() {
        let service = terminator(engine, TlsVersion::Tls13).await;
        let service12 = terminator(engine, TlsVersion::Tls12).await;
        let rig = gateway(GatewayConfig {
            // TLS 1.2 devices name "localhost" (the certificate names it
            // too) and reach the TLS 1.2 service by that SNI.
            routes: vec![Route {
                name: "localhost".into(),
                upstream: to(&service12.url),
            }],
            default_upstream: Some(to(&service.url)),
            block_size: 256,
            ..GatewayConfig::default()
        })
        .await;
        for layer in [TlsVersion::Tls13, TlsVersion::Tls12, TlsVersion::Dtls12] {
            for wire in [Wire::Udp, Wire::Tcp, Wire::Dtls] {
                let label = format!("{} service, {layer:?} over {wire:?}", engine.name());
                let name = if layer == TlsVersion::Tls12 {
                    "localhost"
                } else {
                    SERVER_NAME
                };
                let client = device(wire, &rig, layer, name).await;
                let hello = client
                    .request(&inner_request(RequestType::Get, "/hello", b""))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(
                    code(&hello),
                    MessageClass::Response(ResponseType::Content),
                    "{label}"
                );
                assert_eq!(hello.payload, b"hello", "{label}");
                // Larger than a block: inner Block1 up, inner Block2 down.
                let body: Vec<u8> = (0..1500u32).map(|i| (i * 13) as u8).collect();
                let echo = client
                    .request(&inner_request(RequestType::Post, "/echo", &body))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(echo.payload, body, "{label}");
                let json = session_json(&client).await;
                assert_eq!(json["tls_version"], layer.name(), "{label}: {json}");
                assert_eq!(json["mode"], "oscore", "{label}: {json}");
            }
        }
        let stats = rig.gateway.stats(Instant::now());
        assert_eq!(stats.established, 9, "{stats:?}");
        assert_eq!(stats.upstream_in_flight, 0, "{stats:?}");
        assert_eq!(
            service.server.stats().established,
            6,
            "{:?}",
            service.server.stats()
        );
        assert_eq!(
            service12.server.stats().established,
            3,
            "{:?}",
            service12.server.stats()
        );
    }
}

/// §5.1.5: the SNI of a device's ClientHello chooses its service; a name
/// no route serves, without a default, is 4.04 and reaches no service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_hello_sni_chooses_the_service() {
    let a = terminator(engines()[0], TlsVersion::Tls13).await;
    let b = terminator(engines()[1], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        routes: vec![
            Route {
                name: SERVER_NAME.into(),
                upstream: to(&a.url),
            },
            Route {
                name: "localhost".into(),
                upstream: to(&b.url),
            },
        ],
        ..GatewayConfig::default()
    })
    .await;
    for wire in [Wire::Udp, Wire::Tcp, Wire::Dtls] {
        let to_a = device(wire, &rig, TlsVersion::Tls13, SERVER_NAME).await;
        assert_eq!(session_json(&to_a).await["tls_version"], "TLSv1.3");
        let to_b = device(wire, &rig, TlsVersion::Tls13, "localhost").await;
        assert_eq!(session_json(&to_b).await["tls_version"], "TLSv1.3");
    }
    assert_eq!(a.server.stats().established, 3, "{:?}", a.server.stats());
    assert_eq!(b.server.stats().established, 3, "{:?}", b.server.stats());
    let before = a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed);
    let stranger = device(Wire::Udp, &rig, TlsVersion::Tls13, "nobody.test").await;
    match stranger
        .request(&inner_request(RequestType::Get, "/hello", b""))
        .await
    {
        Err(CoapClientError::Refused { code, .. }) => assert_eq!(code, "4.04"),
        other => panic!("unroutable SNI: {other:?}"),
    }
    let after = a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed);
    assert_eq!(before, after, "nothing reached a service");
}

/// A raw CoAP peer of the gateway over UDP (it answers the Echo challenge
/// once, as a real device does).
struct Raw {
    socket: tokio::net::UdpSocket,
    to: SocketAddr,
    mid: u16,
    echo: Option<Vec<u8>>,
}

impl Raw {
    async fn new(to: SocketAddr) -> Self {
        Self {
            socket: tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
            to,
            mid: 1,
            echo: None,
        }
    }

    async fn send(&mut self, mut p: Packet) -> Option<Packet> {
        for _ in 0..2 {
            self.mid = self.mid.wrapping_add(1);
            p.header.message_id = self.mid;
            p.header.set_type(MessageType::Confirmable);
            p.set_token(vec![1, 2, 3, 4]);
            if let Some(echo) = &self.echo {
                p.clear_option(CoapOption::Unknown(252));
                p.add_option(CoapOption::Unknown(252), echo.clone());
            }
            self.socket
                .send_to(&p.to_bytes_unlimited().expect("encode"), self.to)
                .await
                .expect("send");
            let mut buf = vec![0u8; 70_000];
            let got = tokio::time::timeout(Duration::from_secs(15), self.socket.recv_from(&mut buf)).await;
            let Ok(Ok((n, _))) = got else { return None };
            let answer = Packet::from_bytes(&buf[..n]).expect("answer parses");
            if let Some(echo) = answer.get_first_option(CoapOption::Unknown(252)) {
                if self.echo.is_none() {
                    self.echo = Some(echo.clone());
                    continue;
                }
            }
            return Some(answer);
        }
        None
    }
}

fn request(method: RequestType, path: &str) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(method);
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p
}

fn flight(payload: Vec<u8>, format: u16) -> Packet {
    let mut p = request(RequestType::Post, "/.well-known/atls");
    p.add_option(
        CoapOption::ContentFormat,
        atls_coap::server::uint_option(u64::from(format)),
    );
    p.payload = payload;
    p
}

/// A real first flight (ClientHello) naming `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let mut session = atls_core::Session::client(
        atls_client(TlsVersion::Tls13).as_ref(),
        &ClientSessionParams {
            server_name: Some(sni.into()),
            ..ClientSessionParams::default()
        },
    )
    .expect("session");
    session
        .take_flight(Instant::now())
        .expect("flight")
        .expect("a ClientHello")
}

fn code_of(p: &Option<Packet>) -> String {
    match p.as_ref().map(|p| p.header.code) {
        Some(MessageClass::Response(r)) => format!("{:?}", r),
        other => format!("{other:?}"),
    }
}

/// §5.1.2: what is not recognisably an ATLS flight or an OSCORE message is
/// refused with a CoAP error and never reaches a service; nor do OSCORE
/// messages for a service the gateway was not given (no open proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_atls_or_oscore_is_refused_and_reaches_no_service() {
    let service = terminator(engines()[0], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        default_upstream: Some(to(&service.url)),
        ..GatewayConfig::default()
    })
    .await;
    let mut raw = Raw::new(rig.udp).await;
    let cf = atls_coap::CONTENT_FORMAT_ATLS;
    let plain_get = raw.send(request(RequestType::Get, "/hello")).await;
    assert_eq!(code_of(&plain_get), "Forbidden");
    let not_records = raw.send(flight(b"GET / HTTP/1.1\r\n\r\n".to_vec(), cf)).await;
    assert_eq!(code_of(&not_records), "BadRequest");
    let wrong_format = raw.send(flight(client_hello(SERVER_NAME), 0)).await;
    assert_eq!(code_of(&wrong_format), "UnsupportedContentFormat");
    let wrong_method = {
        let mut p = flight(client_hello(SERVER_NAME), cf);
        p.header.code = MessageClass::Request(RequestType::Put);
        raw.send(p).await
    };
    assert_eq!(code_of(&wrong_method), "MethodNotAllowed");
    let mut elsewhere = request(RequestType::Post, "/");
    elsewhere.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
    elsewhere.add_option(CoapOption::ProxyUri, b"http://example.invalid/".to_vec());
    elsewhere.payload = vec![0; 16];
    assert_eq!(code_of(&raw.send(elsewhere).await), "ProxyingNotSupported");
    // Proxy-Uri / Proxy-Scheme name an origin of a configured service and
    // nothing else: no other port, no path, query or userinfo smuggled in.
    let port = service.url.rsplit(':').next().expect("port").to_owned();
    let other_port: u16 = port.parse::<u16>().expect("port").wrapping_add(1);
    for uri in [
        format!("{}/internal/admin", service.url),
        format!("{}/?delete=all", service.url),
        format!("http://admin:secret@127.0.0.1:{port}/"),
        format!("http://127.0.0.1:{other_port}/"),
        format!("https://127.0.0.1:{port}/"),
        "file:///etc/passwd".to_owned(),
    ] {
        let mut smuggled = request(RequestType::Post, "/");
        smuggled.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
        smuggled.add_option(CoapOption::ProxyUri, uri.clone().into_bytes());
        smuggled.payload = vec![0; 16];
        assert_eq!(
            code_of(&raw.send(smuggled).await),
            "ProxyingNotSupported",
            "{uri}"
        );
    }
    for (scheme, host) in [
        ("http://127.0.0.1/x?", "x"),
        ("http", "127.0.0.1/admin?"),
        ("http", "user@127.0.0.1"),
        ("gopher", "127.0.0.1"),
    ] {
        let mut smuggled = request(RequestType::Post, "/");
        smuggled.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
        smuggled.add_option(CoapOption::ProxyScheme, scheme.as_bytes().to_vec());
        smuggled.add_option(CoapOption::UriHost, host.as_bytes().to_vec());
        smuggled.add_option(
            CoapOption::UriPort,
            atls_coap::server::uint_option(u64::from(port.parse::<u16>().expect("port"))),
        );
        smuggled.payload = vec![0; 16];
        assert_eq!(
            code_of(&raw.send(smuggled).await),
            "ProxyingNotSupported",
            "{scheme} {host}"
        );
    }
    // An OSCORE option that is not one (reserved flag bits), or no ciphertext.
    let mut bogus = request(RequestType::Post, "/");
    bogus.add_option(CoapOption::Oscore, vec![0xe0]);
    bogus.payload = vec![0; 16];
    assert_eq!(code_of(&raw.send(bogus).await), "BadOption");
    let mut empty = request(RequestType::Post, "/");
    empty.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
    assert_eq!(code_of(&raw.send(empty).await), "BadOption");
    let mut critical = request(RequestType::Post, "/");
    critical.add_option(CoapOption::Unknown(65001), vec![1]);
    assert_eq!(code_of(&raw.send(critical).await), "BadOption");
    assert_eq!(
        service.hits.load(Ordering::Relaxed),
        0,
        "nothing reached the service"
    );
    // Proxy-Uri naming the configured service is forwarded (the service
    // then says it has no such OSCORE context: 4.01).
    let mut named = request(RequestType::Post, "/");
    named.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
    named.add_option(CoapOption::ProxyUri, format!("{}/", service.url).into_bytes());
    named.payload = vec![0; 16];
    let answer = raw.send(named).await;
    assert_eq!(code_of(&answer), "Unauthorized", "{answer:?}");
    assert_eq!(service.hits.load(Ordering::Relaxed), 1);
    // A well-formed flight is forwarded: a ServerHello comes back.
    let hello = raw
        .send(flight(client_hello(SERVER_NAME), cf))
        .await
        .expect("answer");
    assert_eq!(hello.header.code, MessageClass::Response(ResponseType::Changed));
    assert_eq!(service.server.stats().half_open, 1);
}

/// A TCP "service" that accepts and answers with `reply` (or never, when
/// `None`).
async fn fake_service(reply: Option<&'static [u8]>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 65536];
            let _ = stream.read(&mut buf).await;
            match reply {
                Some(bytes) => {
                    let _ = stream.write_all(bytes).await;
                    let _ = stream.shutdown().await;
                }
                None => held.push(stream),
            }
        }
    });
    (format!("http://{addr}"), task)
}

/// Upstream faults become CoAP errors — down or garbage 5.02, too slow
/// 5.04 — while the gateway goes on serving another device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_are_coap_errors_and_other_devices_carry_on() {
    let good = terminator(engines()[0], TlsVersion::Tls13).await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        format!("http://{addr}")
    };
    let (slow, _slow_task) = fake_service(None).await;
    let (html, _html_task) = fake_service(Some(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>",
    ))
    .await;
    let (junk, _junk_task) = fake_service(Some(b"\x00\x01garbage that is not HTTP\r\n\r\n")).await;
    let rig = gateway(GatewayConfig {
        routes: vec![
            Route {
                name: "down.test".into(),
                upstream: to(&down),
            },
            Route {
                name: "slow.test".into(),
                upstream: to(&slow),
            },
            Route {
                name: "html.test".into(),
                upstream: to(&html),
            },
            Route {
                name: "junk.test".into(),
                upstream: to(&junk),
            },
        ],
        default_upstream: Some(to(&good.url)),
        upstream_timeout: Duration::from_millis(800),
        ..GatewayConfig::default()
    })
    .await;
    let established = device(Wire::Udp, &rig, TlsVersion::Tls13, SERVER_NAME).await;
    assert_eq!(session_json(&established).await["mode"], "oscore");
    let cf = atls_coap::CONTENT_FORMAT_ATLS;
    for (sni, expected) in [
        ("down.test", "BadGateway"),
        ("slow.test", "GatewayTimeout"),
        ("html.test", "BadGateway"),
        ("junk.test", "BadGateway"),
    ] {
        let mut raw = Raw::new(rig.udp).await;
        let answer = raw.send(flight(client_hello(sni), cf)).await;
        assert_eq!(code_of(&answer), expected, "{sni}: {answer:?}");
        // The established device is served meanwhile.
        let hello = established
            .request(&inner_request(RequestType::Get, "/hello", b""))
            .await
            .unwrap_or_else(|e| panic!("after {sni}: {e}"));
        assert_eq!(hello.payload, b"hello");
    }
    // The project's own client names the failure with the CoAP code.
    let unlucky = device(Wire::Tcp, &rig, TlsVersion::Tls13, "down.test").await;
    match unlucky
        .request(&inner_request(RequestType::Get, "/hello", b""))
        .await
    {
        Err(CoapClientError::Refused { code, .. }) => assert_eq!(code, "5.02"),
        other => panic!("upstream down: {other:?}"),
    }
    let stats = rig.gateway.stats(Instant::now());
    assert_eq!(stats.upstream_in_flight, 0, "{stats:?}");
}

/// A device that vanishes mid-handshake is forgotten after the handshake
/// timeout; an established one is kept; the table is bounded overall and
/// per address, and newcomers never push out established devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_is_bounded_and_expires() {
    let service = terminator(engines()[0], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        default_upstream: Some(to(&service.url)),
        handshake_timeout: Duration::from_millis(600),
        max_devices: 6,
        max_devices_per_ip: 1000,
        ..GatewayConfig::default()
    })
    .await;
    let cf = atls_coap::CONTENT_FORMAT_ATLS;
    let established = device(Wire::Udp, &rig, TlsVersion::Tls13, SERVER_NAME).await;
    assert_eq!(session_json(&established).await["mode"], "oscore");
    // Twenty strangers each send a ClientHello and vanish.
    let mut strangers = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::new(rig.udp).await;
        let answer = raw.send(flight(client_hello(SERVER_NAME), cf)).await;
        assert!(answer.is_some());
        strangers.push(raw);
        let stats = rig.gateway.stats(Instant::now());
        assert!(stats.devices <= 6, "{stats:?}");
        assert_eq!(stats.established, 1, "{stats:?}");
    }
    let hello = established
        .request(&inner_request(RequestType::Get, "/hello", b""))
        .await
        .expect("the established device survives the flood");
    assert_eq!(hello.payload, b"hello");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let stats = rig.gateway.stats(Instant::now());
    assert_eq!(stats.half_open, 0, "vanished devices are forgotten: {stats:?}");
    assert_eq!(stats.devices, 1, "{stats:?}");
    assert_eq!((stats.block1_transfers, stats.block2_bytes), (0, 0), "{stats:?}");

    // Per address: beyond the cap, 5.03 with Max-Age.
    let capped = gateway(GatewayConfig {
        default_upstream: Some(to(&service.url)),
        max_devices_per_ip: 2,
        ..GatewayConfig::default()
    })
    .await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::new(capped.udp).await;
        let answer = raw.send(flight(client_hello(SERVER_NAME), cf)).await;
        if let Some(a) = &answer {
            if code_of(&answer) == "ServiceUnavailable" {
                assert!(a.get_first_option(CoapOption::MaxAge).is_some());
            }
        }
        codes.push(code_of(&answer));
    }
    assert_eq!(codes, ["Changed", "Changed", "ServiceUnavailable"]);
}

/// Requests the gateway has nowhere to send (an OSCORE request of a device
/// that never handshook through it, with no default service) are 4.04 and
/// leave nothing counted: a device sending many of them neither blocks
/// itself nor the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_requests_are_refused_and_counted_nowhere() {
    let service = terminator(engines()[0], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        routes: vec![Route {
            name: SERVER_NAME.into(),
            upstream: to(&service.url),
        }],
        max_upstream_requests: 4,
        ..GatewayConfig::default()
    })
    .await;
    let mut raw = Raw::new(rig.udp).await;
    for _ in 0..12 {
        let mut oscore = request(RequestType::Post, "/");
        oscore.add_option(CoapOption::Oscore, vec![0x09, 0x01, 0x00]);
        oscore.payload = vec![0; 16];
        assert_eq!(code_of(&raw.send(oscore).await), "NotFound");
        let stray = raw
            .send(flight(
                vec![0x17, 0x03, 0x03, 0x00, 0x01, 0x00],
                atls_coap::CONTENT_FORMAT_ATLS,
            ))
            .await;
        assert_eq!(
            code_of(&stray),
            "NotFound",
            "a non-ClientHello flight with no route"
        );
    }
    let stats = rig.gateway.stats(Instant::now());
    assert_eq!(stats.upstream_in_flight, 0, "{stats:?}");
    let client = device(Wire::Udp, &rig, TlsVersion::Tls13, SERVER_NAME).await;
    assert_eq!(session_json(&client).await["mode"], "oscore");
    assert_eq!(
        service.hits.load(Ordering::Relaxed),
        3,
        "only the real device's exchanges"
    );
}

/// One cookie store and one connection pool per device (§5.1.5): no
/// upstream connection ever carries two devices' requests, and each device
/// presents only its own session cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_has_its_own_cookies_and_upstream_connections() {
    let service = terminator(engines()[0], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        default_upstream: Some(to(&service.url)),
        ..GatewayConfig::default()
    })
    .await;
    // Fallback IDs (no CIDs): the service finds each device's context by
    // its cookie alone, so a cookie of one device reaching another's
    // session would show as a wrong answer or a refusal.
    let mut devices = Vec::new();
    for _ in 0..4 {
        let mut opts = options(SERVER_NAME);
        opts.offer_cids = false;
        devices.push(
            AtlsCoapClient::new(rig.udp, atls_client(TlsVersion::Tls13), opts)
                .await
                .expect("device"),
        );
    }
    for round in 0..3 {
        for (i, d) in devices.iter().enumerate() {
            let body = format!("device {i} round {round}");
            let echo = d
                .request(&inner_request(RequestType::Post, "/echo", body.as_bytes()))
                .await
                .unwrap_or_else(|e| panic!("device {i}: {e}"));
            assert_eq!(echo.payload, body.as_bytes());
        }
    }
    let peers = service.peers.lock().expect("peers").clone();
    let mut cookie_of_connection: std::collections::HashMap<SocketAddr, String> = Default::default();
    let mut cookies = std::collections::BTreeSet::new();
    for (peer, cookie) in &peers {
        if cookie.is_empty() {
            continue; // the first flight of a device, before its cookie
        }
        cookies.insert(cookie.clone());
        let first = cookie_of_connection
            .entry(*peer)
            .or_insert_with(|| cookie.clone());
        assert_eq!(first, cookie, "connection {peer} carried two devices' requests");
    }
    assert_eq!(cookies.len(), 4, "four devices, four cookie stores: {cookies:?}");
    assert!(
        cookie_of_connection.len() >= 4,
        "at least one connection per device"
    );
}

/// A hanging service holds at most its own share of the upstream slots:
/// devices of another service are served while it hangs, and its own
/// extra devices get 5.03 rather than queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_service_cannot_take_every_slot() {
    let good = terminator(engines()[0], TlsVersion::Tls13).await;
    let (hanging, _task) = fake_service(None).await;
    let rig = gateway(GatewayConfig {
        routes: vec![Route {
            name: "slow.test".into(),
            upstream: to(&hanging),
        }],
        default_upstream: Some(to(&good.url)),
        upstream_timeout: Duration::from_secs(3),
        max_upstream_requests: 8,
        max_requests_per_service: 4,
        ..GatewayConfig::default()
    })
    .await;
    let established = device(Wire::Udp, &rig, TlsVersion::Tls13, SERVER_NAME).await;
    assert_eq!(session_json(&established).await["mode"], "oscore");
    let hello = client_hello("slow.test");
    let mut waiting = Vec::new();
    for _ in 0..8 {
        let mut raw = Raw::new(rig.udp).await;
        let hello = hello.clone();
        waiting.push(tokio::spawn(async move {
            code_of(&raw.send(flight(hello, atls_coap::CONTENT_FORMAT_ATLS)).await)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While the hanging service holds its four slots (and the four more
    // it asked for are refused), the other service's device is served:
    // without the per-service share the eight would hold every slot and
    // this request would get 5.03.
    let answer = established
        .request(&inner_request(RequestType::Get, "/hello", b""))
        .await
        .expect("the other service is served while one hangs");
    assert_eq!(answer.payload, b"hello");
    let mut codes = Vec::new();
    for w in waiting {
        codes.push(w.await.expect("task"));
    }
    codes.sort();
    assert_eq!(
        codes,
        [
            "GatewayTimeout",
            "GatewayTimeout",
            "GatewayTimeout",
            "GatewayTimeout",
            "ServiceUnavailable",
            "ServiceUnavailable",
            "ServiceUnavailable",
            "ServiceUnavailable"
        ]
    );
    assert_eq!(rig.gateway.stats(Instant::now()).upstream_in_flight, 0);
}

/// Blockwise state is bounded per host and dropped when abandoned; a
/// device forgotten mid-handshake is refused, not sent to another service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_transfers_and_forgotten_devices() {
    let a = terminator(engines()[0], TlsVersion::Tls13).await;
    let b = terminator(engines()[0], TlsVersion::Tls13).await;
    let rig = gateway(GatewayConfig {
        routes: vec![Route {
            name: SERVER_NAME.into(),
            upstream: to(&a.url),
        }],
        default_upstream: Some(to(&b.url)),
        handshake_timeout: Duration::from_millis(500),
        transfer_timeout: Duration::from_millis(500),
        ..GatewayConfig::default()
    })
    .await;
    let cf = atls_coap::CONTENT_FORMAT_ATLS;
    let hello = client_hello(SERVER_NAME);
    let first_block = |num: u32, more: bool| {
        let mut p = flight(hello[..64].to_vec(), cf);
        p.add_option(
            CoapOption::Block1,
            atls_coap::block::BlockValue { num, more, szx: 2 }.encode(),
        );
        p
    };
    // One host starts Block1 uploads on many ports: a few are taken, the
    // rest refused, and the table's other hosts keep their share.
    let mut codes = Vec::new();
    let mut holders = Vec::new();
    for _ in 0..10 {
        let mut raw = Raw::new(rig.udp).await;
        codes.push(code_of(&raw.send(first_block(0, true)).await));
        holders.push(raw);
    }
    assert_eq!(codes.iter().filter(|c| *c == "Continue").count(), 8, "{codes:?}");
    assert_eq!(
        codes.iter().filter(|c| *c == "ServiceUnavailable").count(),
        2,
        "{codes:?}"
    );
    assert_eq!(rig.gateway.stats(Instant::now()).block1_transfers, 8);
    // Abandoned, they are dropped by the sweep, and the host may start again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    rig.gateway.sweep(Instant::now());
    assert_eq!(rig.gateway.stats(Instant::now()).block1_transfers, 0);
    let mut again = Raw::new(rig.udp).await;
    assert_eq!(code_of(&again.send(first_block(0, true)).await), "Continue");

    // A device whose ClientHello went to A, forgotten mid-handshake, sends
    // its next flight: refused, and B never sees it.
    let mut device_raw = Raw::new(rig.udp).await;
    let answer = device_raw.send(flight(hello.clone(), cf)).await;
    assert_eq!(code_of(&answer), "Changed");
    tokio::time::sleep(Duration::from_millis(800)).await;
    rig.gateway.sweep(Instant::now());
    let b_before = b.hits.load(Ordering::Relaxed);
    let next = device_raw
        .send(flight(vec![0x17, 0x03, 0x03, 0x00, 0x01, 0x00], cf))
        .await;
    assert_eq!(code_of(&next), "NotFound", "{next:?}");
    assert_eq!(
        b.hits.load(Ordering::Relaxed),
        b_before,
        "nothing went to the other service"
    );
}

/// A service's Set-Cookie headers cannot grow a device's state without
/// bound: at most 16 cookies, whatever their names and paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_cannot_grow_a_devices_cookie_store() {
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/.well-known/atls",
        axum::routing::post(move |headers: http::HeaderMap| {
            let log = log.clone();
            async move {
                let cookie = headers
                    .get(http::header::COOKIE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                log.lock().expect("log").push(cookie);
                let mut response = http::Response::builder()
                    .status(200)
                    .header(http::header::CONTENT_TYPE, "application/atls");
                for i in 0..40 {
                    response = response
                        .header(
                            http::header::SET_COOKIE,
                            format!("n{i}={}; Path=/", "v".repeat(100)),
                        )
                        .header(http::header::SET_COOKIE, format!("same=x; Path=/p{i}"));
                }
                // An alert record: a well-formed TLS payload.
                response
                    .body(axum::body::Body::from(vec![
                        0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28,
                    ]))
                    .expect("response")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let rig = gateway(GatewayConfig {
        default_upstream: Some(to(&format!("http://{addr}"))),
        ..GatewayConfig::default()
    })
    .await;
    let mut raw = Raw::new(rig.udp).await;
    let cf = atls_coap::CONTENT_FORMAT_ATLS;
    for _ in 0..3 {
        assert_eq!(
            code_of(&raw.send(flight(client_hello(SERVER_NAME), cf)).await),
            "Changed"
        );
    }
    let cookies = seen.lock().expect("log").clone();
    assert_eq!(cookies.len(), 3);
    assert_eq!(cookies[0], "", "a new device has no cookies");
    for later in &cookies[1..] {
        let n = later.split("; ").filter(|c| !c.is_empty()).count();
        assert!(n > 0 && n <= 16, "{n} cookies sent: {later}");
        assert!(later.len() <= 8192 + 64, "{} bytes of cookies", later.len());
    }
}
