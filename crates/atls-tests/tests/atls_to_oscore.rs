//! From an ATLS handshake to protected messages (draft §9): both sides build
//! OSCORE and COSE contexts from their own exports and IDs, on both engines,
//! with negotiated and fallback identifiers; and an independent OSCORE stack
//! (aiocoap) keyed from one side's export talks to the other side.

use std::net::UdpSocket;

use atls_core::{ConnectionId, HkdfHash, IdSource, ProtectionKind, ServerSessionParams, Session, TlsVersion};
use atls_openssl::OpenSslEngine;
use atls_oscore::{
    cose, protect_request, protect_response, unprotect_request, unprotect_response, ContextParams,
    SecurityContext,
};
use atls_rustls::RustlsEngine;
use atls_tests::aiocoap::*;
use atls_tests::*;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

fn sessions(
    client: &dyn atls_core::Engine,
    server: &dyn atls_core::Engine,
    version: TlsVersion,
) -> (Session, Session) {
    let (c, s) = endpoints(client, &client_config(version), server, &server_config(version));
    let mut cp = client_params();
    cp.oscore_cid = Some(ConnectionId::new(vec![0xC1]).expect("cid"));
    cp.cose_cid = Some(ConnectionId::new(vec![0xC2]).expect("cid"));
    let sp = ServerSessionParams {
        oscore_cid: Some(ConnectionId::new(vec![0x51]).expect("cid")),
        cose_cid: Some(ConnectionId::new(vec![0x52]).expect("cid")),
        ..ServerSessionParams::default()
    };
    let h = handshake(&*c, &cp, &*s, &sp);
    assert_complete(&h);
    (h.client, h.server)
}

fn context(session: &Session, kind: ProtectionKind) -> SecurityContext {
    let keys = session.atls_keys(kind).expect("keys");
    let ids = session.protection_ids(kind).expect("ids");
    SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids)).expect("context")
}

fn get(path: &str) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Get);
    p.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
    p
}

#[test]
fn oscore_and_cose_from_every_engine_pairing() {
    for (client_engine, server_engine) in [
        (
            &OpenSslEngine as &dyn atls_core::Engine,
            &OpenSslEngine as &dyn atls_core::Engine,
        ),
        (&RustlsEngine, &RustlsEngine),
        (&RustlsEngine, &OpenSslEngine),
        (&OpenSslEngine, &RustlsEngine),
    ] {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            let (client, server) = sessions(client_engine, server_engine, version);
            let negotiated =
                client_engine.capabilities().atls_extensions && server_engine.capabilities().atls_extensions;
            let expected = if negotiated {
                IdSource::Negotiated
            } else {
                IdSource::Fallback
            };
            assert_eq!(
                client.protection_ids(ProtectionKind::Oscore).expect("ids").source,
                expected
            );

            let mut c = context(&client, ProtectionKind::Oscore);
            let mut s = context(&server, ProtectionKind::Oscore);
            if negotiated {
                assert_eq!(c.sender_id(), [0x51], "the client sends with the server's CID");
            }
            let (wire, binding) = protect_request(&mut c, &get("temperature")).expect("protect");
            let (plain, sb) = unprotect_request(&mut s, &wire).expect("server verifies");
            assert_eq!(
                plain
                    .get_option(CoapOption::UriPath)
                    .and_then(|v| v.front())
                    .expect("path"),
                b"temperature"
            );
            let mut answer = Packet::new();
            answer.header.code = MessageClass::Response(ResponseType::Content);
            answer.payload = b"22.1".to_vec();
            let response = protect_response(&mut s, &answer, &sb, false).expect("protect");
            assert_eq!(
                unprotect_response(&mut c, &response, &binding)
                    .expect("client verifies")
                    .payload,
                b"22.1"
            );

            let mut c = context(&client, ProtectionKind::Cose);
            let mut s = context(&server, ProtectionKind::Cose);
            let line = cose::RequestLine {
                method: "PUT",
                target: "/temperature",
            };
            let (body, binding) = cose::seal_request(&mut c, &line, b"cose request").expect("seal");
            let (plain, sb) = cose::open_request(&mut s, &line, &body).expect("open");
            assert_eq!(plain, b"cose request");
            let reply = cose::seal_response(&mut s, 201, b"cose response", &sb).expect("seal");
            assert_eq!(
                cose::open_response(&mut c, 201, &reply, &binding).expect("open"),
                b"cose response"
            );
        }
    }
}

/// aiocoap is keyed from the ATLS *server's* export (as the server), our
/// client from the ATLS *client's* export: agreement proves both exports and
/// the §9/§10 mapping match what an independent OSCORE stack derives.
#[test]
fn aiocoap_keyed_from_the_atls_export_talks_to_the_atls_client() {
    require_aiocoap();
    for (engine, version) in [
        (&OpenSslEngine as &dyn atls_core::Engine, TlsVersion::Tls13),
        (&RustlsEngine, TlsVersion::Tls12),
    ] {
        let (client, server) = sessions(engine, engine, version);
        let server_keys = server.atls_keys(ProtectionKind::Oscore).expect("keys");
        let server_ids = server.protection_ids(ProtectionKind::Oscore).expect("ids");
        let server_params = ContextParams::from_atls(&server_keys, &server_ids);
        let alg = match server_keys.algorithms.aead.cose_id() {
            1 => "A128GCM",
            3 => "A256GCM",
            24 => "ChaCha20/Poly1305",
            10 => "AES-CCM-16-64-128",
            other => panic!("unexpected default AEAD {other}"),
        };
        let hkdf = match server_keys.algorithms.hkdf {
            HkdfHash::Sha256 => "sha256",
            _ => "sha384",
        };
        // aiocoap's settings are the mirror image of the *client's* view: write
        // them from the server's parameters by swapping back.
        let dir = tempfile::tempdir().expect("tempdir");
        let client_view = ContextParams {
            sender_id: server_params.recipient_id.clone(),
            recipient_id: server_params.sender_id.clone(),
            ..server_params.clone()
        };
        write_aiocoap_context(dir.path(), &client_view, alg, hkdf);
        let port = free_udp_port();
        let _peer = start_aiocoap_server(dir.path(), port);

        let mut ours = context(&client, ProtectionKind::Oscore);
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.connect(("127.0.0.1", port)).expect("connect");
        let mut request = get("hello");
        request.header.set_type(MessageType::Confirmable);
        request.header.message_id = 7;
        request.set_token(vec![7]);
        let (wire, binding) = protect_request(&mut ours, &request).expect("protect");
        let response = exchange(&socket, &wire);
        let plain =
            unprotect_response(&mut ours, &response, &binding).expect("aiocoap answered with the same keys");
        assert_eq!(
            plain.payload,
            b"hello from aiocoap",
            "{} {version}",
            engine.name()
        );
    }
}
