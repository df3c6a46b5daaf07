//! The §11 extensions on the OpenSSL engine: offered in ClientHello, answered
//! in ServerHello (TLS/DTLS 1.2) or EncryptedExtensions (TLS 1.3), and the
//! Sender/Recipient IDs they yield, with and without negotiation.

use atls_core::inspect::inspect;
use atls_core::Role;
use atls_core::{ConnectionId, IdSource, ProtectionKind, ServerSessionParams, TlsVersion};
use atls_openssl::OpenSslEngine;
use atls_tests::*;

const ALL: [TlsVersion; 3] = [TlsVersion::Tls12, TlsVersion::Tls13, TlsVersion::Dtls12];

fn cid(bytes: &[u8]) -> Option<ConnectionId> {
    Some(ConnectionId::new(bytes.to_vec()).expect("cid"))
}

#[test]
fn cids_round_trip_and_map_to_sender_and_recipient_ids() {
    for version in ALL {
        let (c, s) = endpoints(
            &OpenSslEngine,
            &client_config(version),
            &OpenSslEngine,
            &server_config(version),
        );
        let mut cp = client_params();
        cp.oscore_cid = cid(&[0xC1, 0x01]);
        cp.cose_cid = cid(&[0xC2]);
        let sp = ServerSessionParams {
            oscore_cid: cid(&[0x5E, 0x01, 0x02]),
            cose_cid: cid(&[]),
            ..ServerSessionParams::default()
        };
        let h = handshake(&*c, &cp, &*s, &sp);
        assert_complete(&h);

        let client = h.client.protection_ids(ProtectionKind::Oscore).expect("ids");
        let server = h.server.protection_ids(ProtectionKind::Oscore).expect("ids");
        assert_eq!(client.source, IdSource::Negotiated, "{version}");
        assert_eq!(
            client.sender_id,
            [0x5E, 0x01, 0x02],
            "{version}: client Sender ID = server CID"
        );
        assert_eq!(
            client.recipient_id,
            [0xC1, 0x01],
            "{version}: client Recipient ID = own CID"
        );
        assert_eq!(
            server.sender_id,
            [0xC1, 0x01],
            "{version}: server Sender ID = client CID"
        );
        assert_eq!(server.recipient_id, [0x5E, 0x01, 0x02]);

        let client = h.client.protection_ids(ProtectionKind::Cose).expect("ids");
        let server = h.server.protection_ids(ProtectionKind::Cose).expect("ids");
        assert_eq!(client.source, IdSource::Negotiated);
        assert_eq!(client.sender_id, b"", "{version}: an empty CID is a valid kid");
        assert_eq!(client.recipient_id, [0xC2]);
        assert_eq!(server.sender_id, [0xC2]);

        // On the wire: the ClientHello carries both; the ServerHello only in
        // (D)TLS 1.2, because TLS 1.3 answers inside EncryptedExtensions.
        let client_hello = &h.transcript.flights[0];
        assert_eq!(client_hello.from, Role::Client);
        let ch = inspect(&client_hello.bytes);
        let hello = ch.client_hello().expect("ClientHello");
        assert_eq!(hello.oscore_cid, cid(&[0xC1, 0x01]));
        assert_eq!(hello.cose_cid, cid(&[0xC2]));
        let server_flight = h
            .transcript
            .flights
            .iter()
            .find(|f| f.from == Role::Server)
            .expect("server flight");
        let sh = inspect(&server_flight.bytes);
        let server_hello = sh.server_hello().expect("ServerHello");
        match version {
            TlsVersion::Tls13 => assert_eq!(server_hello.oscore_cid, None, "TLS 1.3 keeps it encrypted"),
            _ => {
                assert_eq!(server_hello.oscore_cid, cid(&[0x5E, 0x01, 0x02]), "{version}");
                assert_eq!(server_hello.cose_cid, cid(&[]));
            }
        }
    }
}

#[test]
fn server_does_not_answer_an_extension_the_client_did_not_offer() {
    for version in ALL {
        let (c, s) = endpoints(
            &OpenSslEngine,
            &client_config(version),
            &OpenSslEngine,
            &server_config(version),
        );
        let mut cp = client_params();
        cp.cose_cid = cid(&[0xC2]);
        let sp = ServerSessionParams {
            oscore_cid: cid(&[0x5E]),
            cose_cid: cid(&[0x5F]),
            ..ServerSessionParams::default()
        };
        let h = handshake(&*c, &cp, &*s, &sp);
        assert_complete(&h);
        let oscore = h.client.protection_ids(ProtectionKind::Oscore).expect("ids");
        assert_eq!(
            oscore.source,
            IdSource::Fallback,
            "{version}: OSCORE was not offered"
        );
        assert_eq!(oscore.sender_id, b"");
        assert_eq!(oscore.recipient_id, [0x01]);
        let server = h.server.protection_ids(ProtectionKind::Oscore).expect("ids");
        assert_eq!(server.source, IdSource::Fallback);
        assert_eq!(server.sender_id, [0x01]);
        assert_eq!(
            h.server.handshake_info().expect("info").oscore_cids.own,
            None,
            "{version}: the server did not send its OSCORE CID"
        );
        let cose = h.client.protection_ids(ProtectionKind::Cose).expect("ids");
        assert_eq!(cose.source, IdSource::Negotiated);
        assert_eq!(cose.sender_id, [0x5F]);
    }
}

#[test]
fn client_falls_back_when_the_server_has_no_cid() {
    for version in ALL {
        let (c, s) = endpoints(
            &OpenSslEngine,
            &client_config(version),
            &OpenSslEngine,
            &server_config(version),
        );
        let mut cp = client_params();
        cp.oscore_cid = cid(&[0xC1]);
        let h = handshake(&*c, &cp, &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let ids = h.client.protection_ids(ProtectionKind::Oscore).expect("ids");
        assert_eq!(ids.source, IdSource::Fallback, "{version}");
        let ids = h.server.protection_ids(ProtectionKind::Oscore).expect("ids");
        assert_eq!(ids.source, IdSource::Fallback, "{version}");
    }
}

#[test]
fn code_points_are_configurable() {
    let version = TlsVersion::Tls12;
    let mut cc = client_config(version);
    cc.common.extensions.oscore_code_point = 0xFFA0;
    let mut sc = server_config(version);
    sc.common.extensions.oscore_code_point = 0xFFA0;
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    let mut cp = client_params();
    cp.oscore_cid = cid(&[7]);
    let sp = ServerSessionParams {
        oscore_cid: cid(&[8]),
        cose_cid: None,
        ..ServerSessionParams::default()
    };
    let h = handshake(&*c, &cp, &*s, &sp);
    assert_complete(&h);
    assert_eq!(
        h.client
            .protection_ids(ProtectionKind::Oscore)
            .expect("ids")
            .sender_id,
        [8]
    );
    let ch = inspect(&h.transcript.flights[0].bytes);
    let hello = ch.client_hello().expect("hello");
    assert!(hello.extensions.contains(&0xFFA0));
    assert!(!hello.extensions.contains(&0xFF41));
}

#[test]
fn mismatched_code_points_fall_back() {
    let version = TlsVersion::Tls13;
    let mut sc = server_config(version);
    sc.common.extensions.oscore_code_point = 0xFFA0;
    let (c, s) = endpoints(&OpenSslEngine, &client_config(version), &OpenSslEngine, &sc);
    let mut cp = client_params();
    cp.oscore_cid = cid(&[7]);
    let sp = ServerSessionParams {
        oscore_cid: cid(&[8]),
        cose_cid: None,
        ..ServerSessionParams::default()
    };
    let h = handshake(&*c, &cp, &*s, &sp);
    assert_complete(&h);
    assert_eq!(
        h.client
            .protection_ids(ProtectionKind::Oscore)
            .expect("ids")
            .source,
        IdSource::Fallback
    );
}
