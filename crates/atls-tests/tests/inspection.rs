//! Inspection of real flights from both engines: what a middlebox reads
//! without keys (draft §5.1.2, §5.1.4, §5.1.5).

use atls_core::inspect::inspect;
use atls_core::records::{ContentType, Framing};
use atls_core::{CipherSuite, ConnectionId, Role, ServerSessionParams, TlsVersion};
use atls_openssl::OpenSslEngine;
use atls_tests::*;

#[test]
fn client_hello_from_each_engine_shows_sni_versions_and_suites() {
    for engine in engines() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            let suite = if version == TlsVersion::Tls13 {
                "TLS_AES_128_GCM_SHA256"
            } else {
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            };
            let suite = CipherSuite::from_name(suite).expect("known");
            let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
            let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
            assert_complete(&h);
            let first = inspect(&h.transcript.flights[0].bytes);
            assert_eq!(first.framing, Some(Framing::Tls));
            assert_eq!(first.error, None);
            assert_eq!(first.records[0].content_type, Some(ContentType::Handshake));
            let hello = first.client_hello().expect("ClientHello decoded");
            assert_eq!(
                hello.server_name.as_deref(),
                Some(SERVER_NAME),
                "{}",
                engine.name()
            );
            assert!(
                hello.cipher_suites.contains(&suite),
                "{} offers {suite}",
                engine.name()
            );
            let expected = if version == TlsVersion::Tls13 {
                0x0304
            } else {
                0x0303
            };
            assert!(
                hello.versions.contains(&expected),
                "{} {version}: {:?}",
                engine.name(),
                hello.versions
            );

            let reply = h
                .transcript
                .flights
                .iter()
                .find(|f| f.from == Role::Server)
                .expect("server flight");
            let server = inspect(&reply.bytes);
            let sh = server.server_hello().expect("ServerHello decoded");
            assert_eq!(sh.version, expected, "{}", engine.name());
            assert_eq!(
                sh.cipher_suite,
                h.client.handshake_info().expect("info").cipher_suite
            );
            if version == TlsVersion::Tls13 {
                assert!(
                    server
                        .records
                        .iter()
                        .any(|r| r.content_type == Some(ContentType::ApplicationData)),
                    "TLS 1.3 encrypts the rest of the server flight"
                );
            }
            // Application data stays opaque.
            assert!(server.to_string().contains("ServerHello"));
        }
    }
}

#[test]
fn dtls_client_hello_shows_cids_and_epoch() {
    let (c, s) = endpoints(
        &OpenSslEngine,
        &client_config(TlsVersion::Dtls12),
        &OpenSslEngine,
        &server_config(TlsVersion::Dtls12),
    );
    let mut params = client_params();
    params.oscore_cid = Some(ConnectionId::new(vec![0xAA, 0xBB]).expect("cid"));
    let h = handshake(&*c, &params, &*s, &ServerSessionParams::default());
    assert_complete(&h);
    let first = inspect(&h.transcript.flights[0].bytes);
    assert_eq!(first.framing, Some(Framing::Dtls));
    assert_eq!(first.records[0].epoch, 0);
    let hello = first.client_hello().expect("ClientHello");
    assert_eq!(hello.server_name.as_deref(), Some(SERVER_NAME));
    assert_eq!(
        hello.oscore_cid,
        Some(ConnectionId::new(vec![0xAA, 0xBB]).expect("cid"))
    );
    assert_eq!(hello.cose_cid, None);
    assert_eq!(hello.legacy_version, 0xFEFD);
    // Records after ChangeCipherSpec are in epoch 1.
    let last_client = h
        .transcript
        .flights
        .iter()
        .rfind(|f| f.from == Role::Client)
        .expect("flight");
    assert!(inspect(&last_client.bytes).records.iter().any(|r| r.epoch == 1));
}
