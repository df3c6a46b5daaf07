//! DTLS 1.2 on the OpenSSL engine (complete handshakes, loss and
//! retransmission on the caller's timer, duplicates) and external PSK with the
//! RFC 7925 CCM_8 suites on DTLS 1.2 and TLS 1.3.

use std::thread::sleep;
use std::time::{Duration, Instant};

use atls_core::pair::exchange;
use atls_core::{
    CipherSuite, ClientConfig, CommonConfig, DtlsConfig, Error, PeerIdentity, ProtectionKind, Psk,
    ServerConfig, ServerSessionParams, Session, TlsVersion,
};
use atls_openssl::OpenSslEngine;
use atls_tests::*;

fn dtls_common(initial_timeout: Duration) -> CommonConfig {
    CommonConfig {
        versions: vec![TlsVersion::Dtls12],
        dtls: DtlsConfig {
            initial_timeout,
            ..DtlsConfig::default()
        },
        ..CommonConfig::default()
    }
}

#[test]
fn dtls12_handshake_exports_equal_keys() {
    let (c, s) = endpoints(
        &OpenSslEngine,
        &client_config(TlsVersion::Dtls12),
        &OpenSslEngine,
        &server_config(TlsVersion::Dtls12),
    );
    let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
    assert_complete(&h);
    assert_eq!(
        h.client.handshake_info().expect("info").version,
        TlsVersion::Dtls12
    );
    assert_eq!(
        h.client
            .atls_keys(ProtectionKind::Oscore)
            .expect("keys")
            .master_secret,
        h.server
            .atls_keys(ProtectionKind::Oscore)
            .expect("keys")
            .master_secret
    );
    let empty = h
        .client
        .export_keying_material(b"atls-oscore", Some(b""), 32)
        .expect("export");
    let none = h
        .client
        .export_keying_material(b"atls-oscore", None, 32)
        .expect("export");
    assert_ne!(empty, none, "DTLS 1.2 distinguishes the empty context");
}

#[test]
fn dtls12_records_respect_the_mtu_and_carry_data() {
    let mut cc = client_config(TlsVersion::Dtls12);
    cc.common.dtls.mtu = 400;
    let mut sc = server_config(TlsVersion::Dtls12);
    sc.common.dtls.mtu = 400;
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    let mut h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
    assert_complete(&h);
    for flight in &h.transcript.flights {
        for record in
            atls_core::records::split_records(atls_core::Framing::Dtls, &flight.bytes).expect("records")
        {
            assert!(
                record.bytes.len() <= 400,
                "record of {} bytes over the MTU",
                record.bytes.len()
            );
        }
    }
    let now = Instant::now();
    let data = vec![0x5A; 3000];
    h.client.send(&data).expect("send");
    let flight = h.client.take_flight(now).expect("take").expect("records");
    h.server.push_flight(&flight, now).expect("push");
    assert_eq!(h.server.take_received(), data);
}

/// The client's flight is lost once; nothing happens until the caller's timer
/// fires, then the same flight goes out again and the handshake completes.
#[test]
fn dtls12_lost_flight_is_retransmitted_on_the_timer() {
    let timeout = Duration::from_millis(50);
    let cc = ClientConfig {
        common: dtls_common(timeout),
        ..client_config(TlsVersion::Dtls12)
    };
    let sc = ServerConfig {
        common: dtls_common(timeout),
        ..server_config(TlsVersion::Dtls12)
    };
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    let mut client = Session::client(&*c, &client_params()).expect("client");
    let mut server = Session::server(&*s, &ServerSessionParams::default()).expect("server");

    let start = Instant::now();
    let lost = client.take_flight(start).expect("take").expect("ClientHello");
    let deadline = client.next_timeout().expect("a DTLS client arms its timer");
    assert!(deadline > start, "the deadline lies ahead");
    assert!(
        deadline <= start + timeout + Duration::from_millis(5),
        "deadline follows the configured schedule"
    );

    // Before the deadline the timer does nothing.
    client.handle_timeout(start).expect("early call");
    assert_eq!(
        client.take_flight(start).expect("take"),
        None,
        "nothing before the deadline"
    );

    // Wait out the timer (OpenSSL keeps its own timer on the system clock).
    sleep(deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(20));
    let now = Instant::now();
    client.handle_timeout(now).expect("timeout");
    let retransmitted = client.take_flight(now).expect("take").expect("retransmission");
    let original = atls_core::inspect::inspect(&lost);
    let again = atls_core::inspect::inspect(&retransmitted);
    assert_eq!(
        original.client_hello(),
        again.client_hello(),
        "the same ClientHello is sent again"
    );
    assert_ne!(
        original.records[0].sequence, again.records[0].sequence,
        "under a new record sequence number"
    );
    let next = client.next_timeout().expect("timer re-armed");
    assert!(next - now >= timeout, "the timer backs off: {:?}", next - now);

    server
        .push_flight(&retransmitted, now)
        .expect("server receives the retransmission");
    let t = exchange(&mut client, &mut server, now);
    assert!(t.is_ok(), "{t:?}");
    assert!(client.is_handshake_complete() && server.is_handshake_complete());
    assert_eq!(client.next_timeout(), None, "no timer after the handshake");
}

/// The server's answer is lost: the client's timer recovers the exchange.
#[test]
fn dtls12_lost_server_flight_is_recovered() {
    let timeout = Duration::from_millis(50);
    let cc = ClientConfig {
        common: dtls_common(timeout),
        ..client_config(TlsVersion::Dtls12)
    };
    let sc = ServerConfig {
        common: dtls_common(timeout),
        ..server_config(TlsVersion::Dtls12)
    };
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    let mut client = Session::client(&*c, &client_params()).expect("client");
    let mut server = Session::server(&*s, &ServerSessionParams::default()).expect("server");
    let now = Instant::now();
    let hello = client.take_flight(now).expect("take").expect("hello");
    server.push_flight(&hello, now).expect("push");
    let _dropped = server.take_flight(now).expect("take").expect("server flight");

    for _ in 0..20 {
        if client.is_handshake_complete() {
            break;
        }
        let deadline = client
            .next_timeout()
            .or(server.next_timeout())
            .expect("a timer runs");
        sleep(deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(20));
        let now = Instant::now();
        client.handle_timeout(now).expect("client timer");
        server.handle_timeout(now).expect("server timer");
        let t = exchange(&mut client, &mut server, now);
        assert!(t.is_ok(), "{t:?}");
    }
    assert!(client.is_handshake_complete() && server.is_handshake_complete());
}

#[test]
fn dtls12_duplicated_flight_is_absorbed() {
    let (c, s) = endpoints(
        &OpenSslEngine,
        &client_config(TlsVersion::Dtls12),
        &OpenSslEngine,
        &server_config(TlsVersion::Dtls12),
    );
    let mut client = Session::client(&*c, &client_params()).expect("client");
    let mut server = Session::server(&*s, &ServerSessionParams::default()).expect("server");
    let now = Instant::now();
    let hello = client.take_flight(now).expect("take").expect("hello");
    server.push_flight(&hello, now).expect("push");
    let answer = server.take_flight(now).expect("take").expect("answer");
    // A datagram transport may duplicate: DTLS drops the copy by its replay window.
    server
        .push_flight(&hello, now)
        .expect("a duplicate is not an error on DTLS");
    let _ = server.take_flight(now).expect("take");
    client.push_flight(&answer, now).expect("push");
    let t = exchange(&mut client, &mut server, now);
    assert!(t.is_ok(), "{t:?}");
    assert!(client.is_handshake_complete() && server.is_handshake_complete());
}

fn psk() -> Psk {
    Psk::new(b"device-7".to_vec(), (0u8..16).collect::<Vec<_>>()).expect("psk")
}

fn psk_pair(version: TlsVersion, suite: &str) -> Handshake {
    let suite = CipherSuite::from_name(suite).expect("known suite");
    let common = CommonConfig {
        versions: vec![version],
        cipher_suites: Some(vec![suite]),
        ..CommonConfig::default()
    };
    let cc = ClientConfig {
        common: common.clone(),
        psk: Some(psk()),
        ..ClientConfig::default()
    };
    let sc = ServerConfig {
        common,
        psks: vec![psk()],
        ..ServerConfig::default()
    };
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
    assert_complete(&h);
    assert_eq!(h.server.handshake_info().expect("info").cipher_suite, suite);
    h
}

#[test]
fn psk_aes_128_ccm_8_on_dtls12() {
    let h = psk_pair(TlsVersion::Dtls12, "TLS_PSK_WITH_AES_128_CCM_8");
    let info = h.server.handshake_info().expect("info");
    assert_eq!(info.peer, PeerIdentity::Psk(b"device-7".to_vec()));
    let keys = h.client.atls_keys(ProtectionKind::Oscore).expect("keys");
    assert_eq!(keys.algorithms.aead.cose_id(), 10, "AES-CCM-16-64-128");
    assert_eq!(keys.master_secret.len(), 16);
    assert_eq!(
        keys.master_secret,
        h.server
            .atls_keys(ProtectionKind::Oscore)
            .expect("keys")
            .master_secret
    );
}

#[test]
fn psk_aes_128_ccm_8_on_tls12() {
    let h = psk_pair(TlsVersion::Tls12, "TLS_PSK_WITH_AES_128_CCM_8");
    assert_eq!(
        h.client.handshake_info().expect("info").peer,
        PeerIdentity::Psk(b"device-7".to_vec())
    );
}

#[test]
fn psk_tls13_aes_128_ccm_8_sha256() {
    let h = psk_pair(TlsVersion::Tls13, "TLS_AES_128_CCM_8_SHA256");
    assert_eq!(
        h.server.handshake_info().expect("info").peer,
        PeerIdentity::Psk(b"device-7".to_vec())
    );
    let keys = h.server.atls_keys(ProtectionKind::Cose).expect("keys");
    assert_eq!(keys.algorithms.aead.cose_id(), 10);
    assert_eq!(
        keys.master_salt,
        h.client
            .atls_keys(ProtectionKind::Cose)
            .expect("keys")
            .master_salt
    );
}

#[test]
fn ecdhe_ecdsa_aes_128_ccm_8_on_dtls12() {
    let suite = CipherSuite::from_name("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8").expect("known");
    let mut cc = client_config(TlsVersion::Dtls12);
    cc.common.cipher_suites = Some(vec![suite]);
    let (c, s) = endpoints(
        &OpenSslEngine,
        &cc,
        &OpenSslEngine,
        &server_config(TlsVersion::Dtls12),
    );
    let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
    assert_complete(&h);
    assert_eq!(h.client.handshake_info().expect("info").cipher_suite, suite);
}

fn wrong_psk_pair(version: TlsVersion) -> Handshake {
    let common = CommonConfig {
        versions: vec![version],
        cipher_suites: Some(vec![
            CipherSuite::from_name("TLS_PSK_WITH_AES_128_CCM_8").expect("known")
        ]),
        ..CommonConfig::default()
    };
    let cc = ClientConfig {
        common: common.clone(),
        psk: Some(Psk::new(b"device-7".to_vec(), vec![9u8; 16]).expect("psk")),
        ..ClientConfig::default()
    };
    let sc = ServerConfig {
        common,
        psks: vec![psk()],
        ..ServerConfig::default()
    };
    let (c, s) = endpoints(&OpenSslEngine, &cc, &OpenSslEngine, &sc);
    handshake(&*c, &client_params(), &*s, &ServerSessionParams::default())
}

#[test]
fn wrong_psk_fails_the_tls_handshake_with_a_typed_error() {
    let h = wrong_psk_pair(TlsVersion::Tls12);
    assert!(!h.server.is_handshake_complete());
    assert!(
        matches!(h.transcript.server_error, Some(Error::Protocol(_))),
        "the server cannot decrypt the client's Finished: {:?}",
        h.transcript
    );
    assert!(
        matches!(h.transcript.client_error, Some(Error::AlertReceived(_))),
        "the client gets the server's alert: {:?}",
        h.transcript
    );
}

/// RFC 6347 §4.1.2.7: DTLS silently discards records that fail authentication,
/// so a wrong PSK never completes (the caller's timer eventually gives up).
#[test]
fn wrong_psk_never_completes_a_dtls_handshake() {
    let h = wrong_psk_pair(TlsVersion::Dtls12);
    assert!(!h.server.is_handshake_complete());
    assert!(!h.client.is_handshake_complete());
    assert!(h.server.atls_keys(ProtectionKind::Oscore).is_err());
    assert!(
        h.client.next_timeout().is_some(),
        "the client keeps its retransmission timer armed"
    );
}

#[test]
fn rustls_refuses_what_it_cannot_do_with_a_typed_error() {
    use atls_core::Engine;
    let rustls = atls_rustls::RustlsEngine;
    let err = rustls
        .client(&client_config(TlsVersion::Dtls12))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { engine: "rustls", .. }),
        "{err:?}"
    );
    let cc = ClientConfig {
        psk: Some(psk()),
        ..client_config(TlsVersion::Tls13)
    };
    assert!(matches!(
        rustls.client(&cc).map(|_| ()),
        Err(Error::Unsupported { .. })
    ));
}
