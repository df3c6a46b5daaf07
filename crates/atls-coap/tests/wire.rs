//! Bytes on the wire per handshake with CoAP framing: the datagrams a relay
//! between client and server forwards for a new session over CoAP/UDP
//! (address validation with Echo, the flights in POST /.well-known/atls,
//! blockwise where a flight needs it), then for one OSCORE request. Run with
//! `--nocapture` to print the table of docs/BENCHMARKS.md.

use atls_coap::{inner_request, AtlsCoapClient, CoapClientOptions, CoapConfig, CoapServer};
use atls_core::records::Framing;
use atls_core::TlsVersion;
use atls_tests::{server_config, wire_configs, SERVER_NAME};
use coap_lite::{MessageClass, RequestType, ResponseType};

mod support;
use support::counting_relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_bytes_with_coap_framing() {
    let mut rows = Vec::new();
    for config in wire_configs() {
        let endpoint = config.engine.server(&config.server).expect("server endpoint");
        let dtls = config.server.common.framing().expect("framing") == Framing::Dtls;
        let server = if dtls {
            let tls = config
                .engine
                .server(&server_config(TlsVersion::Tls13))
                .expect("tls endpoint");
            CoapServer::with_dtls(tls, Some(endpoint), CoapConfig::default())
        } else {
            CoapServer::new(endpoint, CoapConfig::default())
        };
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let task = tokio::spawn(atls_coap::udp::serve(socket, server.clone()));
        let (relay, counted) = counting_relay(addr).await;
        let client_endpoint = config.engine.client(&config.client).expect("client endpoint");
        let options = CoapClientOptions {
            server_name: Some(SERVER_NAME.into()),
            ..CoapClientOptions::default()
        };
        let client = AtlsCoapClient::new(relay, client_endpoint, options)
            .await
            .expect("client");
        let hello = inner_request(RequestType::Get, "/hello", b"");
        let first = client
            .request(&hello)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", config.name));
        assert_eq!(first.header.code, MessageClass::Response(ResponseType::Content));
        let ((up_n, up), (down_n, down)) = counted.read();
        client.request(&hello).await.expect("second request");
        let ((up_n2, up2), (down_n2, down2)) = counted.read();
        let (req_n, req, resp_n, resp) = (up_n2 - up_n, up2 - up, down_n2 - down_n, down2 - down);
        if (req_n, resp_n) != (1, 1) {
            // A retransmission on a loaded machine: the figures would
            // count it, so this configuration's row is left out.
            println!("| {} | (a retransmission; not counted) |", config.name);
            task.abort();
            continue;
        }
        // The handshake: everything before the first request's own exchange.
        let (hs_up, hs_down) = (up - req, down - resp);
        let (hs_up_n, hs_down_n) = (up_n - req_n, down_n - resp_n);
        println!(
            "| {} | {hs_up} B in {hs_up_n} | {hs_down} B in {hs_down_n} | {} B | {req} B → {resp} B |",
            config.name,
            hs_up + hs_down
        );
        assert!(
            hs_up > req && hs_down > resp,
            "{}: the handshake costs more than a request",
            config.name
        );
        rows.push((config.name.clone(), hs_up + hs_down));
        assert_eq!(server.stats().established, 1, "{}", config.name);
        task.abort();
    }
    assert!(!rows.is_empty(), "no configuration was measured");
}
