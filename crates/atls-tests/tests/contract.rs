//! The contract every engine passes: handshakes over buffers, key export as
//! the draft specifies, record-mode data, close, mutual authentication,
//! verification failures, resumption and 0-RTT.

use std::time::Instant;

use atls_core::pair::exchange;
use atls_core::{
    CipherSuite, ClientSessionParams, Engine, Error, IdSource, PeerIdentity, ProtectionKind,
    ServerSessionParams, Session, TlsVersion, LABEL_COSE, LABEL_GENERIC, LABEL_OSCORE,
};
use atls_tests::*;

const STREAM_VERSIONS: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

fn each_engine_and_version(mut f: impl FnMut(&'static dyn Engine, TlsVersion)) {
    for engine in engines() {
        for version in STREAM_VERSIONS {
            f(engine, version);
        }
    }
}

#[test]
fn handshake_completes_and_reports_what_was_negotiated() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let ci = h.client.handshake_info().expect("client info");
        let si = h.server.handshake_info().expect("server info");
        assert_eq!(ci.version, version, "{}", engine.name());
        assert_eq!(si.version, version);
        assert_eq!(ci.cipher_suite, si.cipher_suite);
        assert!(
            ci.cipher_suite.atls_mapping().is_ok(),
            "default suites are all mapped"
        );
        assert_eq!(ci.server_name.as_deref(), Some(SERVER_NAME));
        assert_eq!(
            si.server_name.as_deref(),
            Some(SERVER_NAME),
            "server sees the SNI"
        );
        match &ci.peer {
            PeerIdentity::Certificates(chain) => assert_eq!(chain[0], pki().server.cert),
            other => panic!("client should see the server chain, got {other:?}"),
        }
        assert_eq!(si.peer, PeerIdentity::Anonymous);
        assert!(!ci.resumed);
    });
}

#[test]
fn atls_exports_match_and_split_into_secret_and_salt() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        for kind in [ProtectionKind::Oscore, ProtectionKind::Cose] {
            let ck = h.client.atls_keys(kind).expect("client keys");
            let sk = h.server.atls_keys(kind).expect("server keys");
            let key_len = ck.algorithms.aead.key_len();
            assert_eq!(ck.master_secret.len(), key_len);
            assert_eq!(ck.master_salt.len(), key_len);
            assert_eq!(
                ck.master_secret,
                sk.master_secret,
                "{} {version} {kind:?}",
                engine.name()
            );
            assert_eq!(ck.master_salt, sk.master_salt);
            // The split is exactly the label's export with the empty context.
            let whole = h
                .client
                .export_keying_material(kind.label(), Some(b""), 2 * key_len)
                .expect("export");
            let (secret, salt) = whole.dangerous_as_bytes().split_at(key_len);
            assert_eq!(secret, ck.master_secret.dangerous_as_bytes());
            assert_eq!(salt, ck.master_salt.dangerous_as_bytes());
        }
        let oscore = h.client.atls_keys(ProtectionKind::Oscore).expect("keys");
        let cose = h.client.atls_keys(ProtectionKind::Cose).expect("keys");
        assert_ne!(
            oscore.master_secret, cose.master_secret,
            "labels separate the keys"
        );
        // Secrets never print.
        let printed = format!("{oscore:?}");
        let secret_hex: String = oscore
            .master_secret
            .dangerous_as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            printed.contains("redacted") && !printed.contains(&secret_hex),
            "secrets never print"
        );
    });
}

#[test]
fn generic_and_caller_labels_export_equal_keys() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        for label in [
            LABEL_GENERIC,
            LABEL_OSCORE,
            LABEL_COSE,
            b"EXPORTER-my-app".as_slice(),
        ] {
            for context in [None, Some(b"".as_slice()), Some(b"ctx".as_slice())] {
                let a = h
                    .client
                    .export_keying_material(label, context, 48)
                    .expect("client export");
                let b = h
                    .server
                    .export_keying_material(label, context, 48)
                    .expect("server export");
                assert_eq!(
                    a,
                    b,
                    "{} {version} label {:?}",
                    engine.name(),
                    String::from_utf8_lossy(label)
                );
            }
        }
    });
}

/// RFC 5705: in (D)TLS 1.2 an empty context is hashed with its length and so
/// differs from no context; RFC 8446 §7.5 makes them equal in TLS 1.3. The
/// draft's "empty" context must be the zero-length one.
#[test]
fn empty_context_differs_from_no_context_in_tls12_only() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let empty = h
            .client
            .export_keying_material(LABEL_OSCORE, Some(b""), 32)
            .expect("export");
        let none = h
            .client
            .export_keying_material(LABEL_OSCORE, None, 32)
            .expect("export");
        let keys = h.client.atls_keys(ProtectionKind::Oscore).expect("keys");
        let len = keys.algorithms.export_len();
        let atls = h
            .client
            .export_keying_material(LABEL_OSCORE, Some(b""), len)
            .expect("export");
        assert_eq!(
            &atls.dangerous_as_bytes()[..keys.master_secret.len()],
            keys.master_secret.dangerous_as_bytes()
        );
        match version {
            TlsVersion::Tls12 => assert_ne!(empty, none, "{}: TLS 1.2 empty vs none", engine.name()),
            _ => assert_eq!(empty, none, "{}: TLS 1.3 empty equals none", engine.name()),
        }
    });
}

#[test]
fn record_mode_carries_application_data_both_ways_then_closes() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let mut h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let now = Instant::now();
        let request = b"GET /hello HTTP/1.1\r\nHost: atls.test\r\n\r\n".repeat(100);
        h.client.send(&request).expect("send");
        let flight = h.client.take_flight(now).expect("take").expect("records");
        assert!(
            !flight.windows(9).any(|w| w == b"GET /hell"),
            "records are encrypted"
        );
        h.server.push_flight(&flight, now).expect("server push");
        assert_eq!(h.server.take_received(), request);
        h.server.send(b"HTTP/1.1 200 OK\r\n\r\nhello").expect("send");
        let flight = h.server.take_flight(now).expect("take").expect("records");
        h.client.push_flight(&flight, now).expect("client push");
        assert_eq!(h.client.take_received(), b"HTTP/1.1 200 OK\r\n\r\nhello");

        h.client.close();
        let close = h.client.take_flight(now).expect("take").expect("close_notify");
        h.server.push_flight(&close, now).expect("server sees close");
        assert!(
            h.server.is_closed(),
            "{} {version}: close_notify ends the server session",
            engine.name()
        );
        assert_eq!(h.client.send(b"more"), Err(Error::Closed));
    });
}

#[test]
fn mutual_certificate_authentication() {
    each_engine_and_version(|engine, version| {
        let mut cc = client_config(version);
        cc.client_auth = Some(pki().client.certified_key());
        let mut sc = server_config(version);
        sc.client_auth_roots = Some(vec![pki().ca.certificate().clone()]);
        let (c, s) = endpoints(engine, &cc, engine, &sc);
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        match &h.server.handshake_info().expect("info").peer {
            PeerIdentity::Certificates(chain) => assert_eq!(chain[0], pki().client.cert, "{}", engine.name()),
            other => panic!("server should see the client chain, got {other:?}"),
        }
    });
}

#[test]
fn server_requiring_a_client_certificate_rejects_a_client_without_one() {
    each_engine_and_version(|engine, version| {
        let mut sc = server_config(version);
        sc.client_auth_roots = Some(vec![pki().ca.certificate().clone()]);
        let (c, s) = endpoints(engine, &client_config(version), engine, &sc);
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert!(!h.server.is_handshake_complete());
        assert!(
            matches!(
                h.transcript.server_error,
                Some(Error::Verification(_) | Error::Protocol(_))
            ),
            "{} {version}: {:?}",
            engine.name(),
            h.transcript.server_error
        );
        assert!(h.transcript.client_error.is_some(), "the client learns it failed");
    });
}

#[test]
fn wrong_ca_fails_with_a_verification_error_and_the_server_gets_the_alert() {
    each_engine_and_version(|engine, version| {
        let mut sc = server_config(version);
        sc.identity = Some(pki().rogue_server.certified_key());
        let (c, s) = endpoints(engine, &client_config(version), engine, &sc);
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert!(
            matches!(h.transcript.client_error, Some(Error::Verification(_))),
            "{} {version}: client error {:?}",
            engine.name(),
            h.transcript.client_error
        );
        assert!(
            matches!(h.transcript.server_error, Some(Error::AlertReceived(_))),
            "{} {version}: server error {:?}",
            engine.name(),
            h.transcript.server_error
        );
        assert!(!h.client.is_handshake_complete());
        assert!(
            h.client.atls_keys(ProtectionKind::Oscore).is_err(),
            "no keys from a failed handshake"
        );
    });
}

#[test]
fn wrong_server_name_fails_verification() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let params = ClientSessionParams {
            server_name: Some("other.example".into()),
            ..ClientSessionParams::default()
        };
        let h = handshake(&*c, &params, &*s, &ServerSessionParams::default());
        assert!(
            matches!(h.transcript.client_error, Some(Error::Verification(_))),
            "{} {version}: {:?}",
            engine.name(),
            h.transcript.client_error
        );
    });
}

#[test]
fn resumption_then_zero_rtt_early_data() {
    for engine in engines() {
        for version in STREAM_VERSIONS {
            let mut cc = client_config(version);
            cc.early_data = true;
            let mut sc = server_config(version);
            sc.max_early_data = 16 * 1024;
            let (c, s) = endpoints(engine, &cc, engine, &sc);
            let first = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
            assert_complete(&first);
            assert!(!first.client.handshake_info().expect("info").resumed);
            // Sessions usually end by expiry, without close_notify: their tickets must survive.
            drop(first);

            let now = Instant::now();
            let mut client = Session::client(&*c, &client_params()).expect("client");
            let mut server = Session::server(&*s, &ServerSessionParams::default()).expect("server");
            let early = b"POST /echo 0-RTT";
            let written = client.write_early_data(early, now).expect("early data");
            let t = exchange(&mut client, &mut server, now);
            assert!(t.is_ok(), "{} {version}: {t:?}", engine.name());
            let ci = client.handshake_info().expect("info");
            assert!(
                ci.resumed,
                "{} {version}: second handshake resumes",
                engine.name()
            );
            if version == TlsVersion::Tls13 {
                assert_eq!(written, early.len(), "{}: 0-RTT offered", engine.name());
                assert!(ci.early_data_accepted, "{}: 0-RTT accepted", engine.name());
                assert_eq!(
                    server.take_early_data(),
                    early,
                    "{}: server got early data",
                    engine.name()
                );
            } else {
                assert_eq!(written, 0, "no 0-RTT in TLS 1.2");
            }
            // Resumed sessions export equal keys too.
            assert_eq!(
                client
                    .atls_keys(ProtectionKind::Oscore)
                    .expect("keys")
                    .master_secret,
                server
                    .atls_keys(ProtectionKind::Oscore)
                    .expect("keys")
                    .master_secret
            );
        }
    }
}

#[test]
fn every_later_handshake_resumes() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let resumed: Vec<bool> = (0..4)
            .map(|_| {
                let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
                assert_complete(&h);
                h.client.handshake_info().expect("info").resumed
            })
            .collect();
        assert_eq!(resumed, [false, true, true, true], "{} {version}", engine.name());
    });
}

#[test]
fn resumption_can_be_disabled() {
    each_engine_and_version(|engine, version| {
        let mut cc = client_config(version);
        cc.common.resumption = false;
        let (c, s) = endpoints(engine, &cc, engine, &server_config(version));
        for _ in 0..2 {
            let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
            assert_complete(&h);
            assert!(
                !h.client.handshake_info().expect("info").resumed,
                "{} {version}",
                engine.name()
            );
        }
    });
}

#[test]
fn without_extensions_both_sides_use_the_fallback_ids() {
    each_engine_and_version(|engine, version| {
        let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        for kind in [ProtectionKind::Oscore, ProtectionKind::Cose] {
            let ci = h.client.protection_ids(kind).expect("ids");
            let si = h.server.protection_ids(kind).expect("ids");
            assert_eq!(ci.source, IdSource::Fallback);
            assert_eq!(ci.sender_id, b"");
            assert_eq!(ci.recipient_id, [0x01]);
            assert_eq!(si.sender_id, ci.recipient_id);
            assert_eq!(si.recipient_id, ci.sender_id);
        }
    });
}

#[test]
fn restricting_cipher_suites_negotiates_the_configured_one() {
    for engine in engines() {
        for (version, name) in [
            (TlsVersion::Tls13, "TLS_AES_256_GCM_SHA384"),
            (TlsVersion::Tls13, "TLS_CHACHA20_POLY1305_SHA256"),
            (TlsVersion::Tls12, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
            (TlsVersion::Tls12, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
        ] {
            let suite = CipherSuite::from_name(name).expect("known");
            let mut cc = client_config(version);
            cc.common.cipher_suites = Some(vec![suite]);
            let (c, s) = endpoints(engine, &cc, engine, &server_config(version));
            let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
            assert_complete(&h);
            let info = h.server.handshake_info().expect("info");
            assert_eq!(info.cipher_suite, suite, "{}", engine.name());
            let keys = h.server.atls_keys(ProtectionKind::Oscore).expect("keys");
            assert_eq!(keys.algorithms, suite.atls_mapping().expect("mapped"));
        }
    }
}

#[test]
fn keys_are_not_available_before_the_handshake_completes() {
    for engine in engines() {
        let (c, _s) = endpoints(
            engine,
            &client_config(TlsVersion::Tls13),
            engine,
            &server_config(TlsVersion::Tls13),
        );
        let mut client = Session::client(&*c, &client_params()).expect("client");
        assert!(client.take_flight(Instant::now()).expect("hello").is_some());
        assert_eq!(
            client.atls_keys(ProtectionKind::Oscore).map(|_| ()),
            Err(Error::HandshakeNotComplete)
        );
        assert_eq!(client.send(b"x"), Err(Error::HandshakeNotComplete));
    }
}
