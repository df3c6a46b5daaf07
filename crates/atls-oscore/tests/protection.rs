//! OSCORE and COSE-profile behaviour: round trips on every AEAD, and each bad
//! input giving the RFC's error, never a panic.

use std::sync::Arc;

use atls_core::{CoseAead, HkdfHash};
use atls_oscore::*;
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use proptest::prelude::*;
use zeroize::Zeroizing;

const AEADS: [CoseAead; 7] = [
    CoseAead::AesCcm16_64_128,
    CoseAead::AesCcm16_64_256,
    CoseAead::AesCcm16_128_128,
    CoseAead::AesCcm16_128_256,
    CoseAead::A128Gcm,
    CoseAead::A256Gcm,
    CoseAead::ChaCha20Poly1305,
];

fn pair(aead: CoseAead, hkdf: HkdfHash) -> (ContextParams, ContextParams) {
    let client = ContextParams {
        master_secret: Zeroizing::new(vec![0x11; aead.key_len()]),
        master_salt: Zeroizing::new(vec![0x22; aead.key_len()]),
        aead,
        hkdf,
        sender_id: vec![],
        recipient_id: vec![0x01],
        id_context: None,
        replay_window: 32,
    };
    let server = ContextParams {
        sender_id: vec![0x01],
        recipient_id: vec![],
        ..client.clone()
    };
    (client, server)
}

fn get(path: &str) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Get);
    p.header.message_id = 0x1234;
    p.set_token(vec![1, 2, 3, 4]);
    p.add_option(CoapOption::UriHost, b"atls.test".to_vec());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p
}

fn content(payload: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(ResponseType::Content);
    p.set_token(vec![1, 2, 3, 4]);
    p.payload = payload.to_vec();
    p
}

#[test]
fn oscore_round_trips_on_every_aead_and_hkdf() {
    for aead in AEADS {
        for hkdf in [HkdfHash::Sha256, HkdfHash::Sha384, HkdfHash::Sha512] {
            let (cp, sp) = pair(aead, hkdf);
            let mut client = SecurityContext::new_in_memory(&cp).expect("client");
            let mut server = SecurityContext::new_in_memory(&sp).expect("server");
            let request = get("/sensors/temp");
            let (wire, binding) = protect_request(&mut client, &request).expect("protect");
            assert_eq!(
                wire.header.code,
                MessageClass::Request(RequestType::Post),
                "outer code is POST"
            );
            assert!(
                wire.get_option(CoapOption::UriPath).is_none(),
                "Uri-Path travels encrypted"
            );
            assert!(
                wire.get_option(CoapOption::UriHost).is_some(),
                "Uri-Host stays outer"
            );
            let (plain, sbinding) = unprotect_request(&mut server, &wire).expect("unprotect");
            assert_eq!(
                plain.to_bytes().expect("enc"),
                request.to_bytes().expect("enc"),
                "{aead:?}"
            );
            for own_piv in [false, true] {
                let response =
                    protect_response(&mut server, &content(b"21.5 C"), &sbinding, own_piv).expect("protect");
                assert_eq!(
                    response.header.code,
                    MessageClass::Response(ResponseType::Changed)
                );
                let plain = unprotect_response(&mut client, &response, &binding).expect("unprotect");
                assert_eq!(plain.payload, b"21.5 C");
                assert_eq!(plain.header.code, MessageClass::Response(ResponseType::Content));
            }
        }
    }
}

fn error_code(e: &OscoreError) -> (u8, u8) {
    e.coap_error().expect("a peer error").0
}

#[test]
fn bad_requests_get_the_rfc_errors() {
    let (cp, sp) = pair(CoseAead::AesCcm16_64_128, HkdfHash::Sha256);
    let mut client = SecurityContext::new_in_memory(&cp).expect("client");
    let mut server = SecurityContext::new_in_memory(&sp).expect("server");
    let (wire, _) = protect_request(&mut client, &get("/a")).expect("protect");

    // Replay: 4.01 Replay detected.
    unprotect_request(&mut server, &wire).expect("first");
    let e = unprotect_request(&mut server, &wire).expect_err("replay");
    assert_eq!(e, OscoreError::Replay);
    assert_eq!(e.coap_error(), Some(((4, 1), "Replay detected")));

    // Wrong key: 4.00 Decryption failed.
    let mut other = cp.clone();
    other.master_secret = Zeroizing::new(vec![0x99; 16]);
    let mut intruder = SecurityContext::new_in_memory(&other).expect("ctx");
    protect_request(&mut intruder, &get("/a")).expect("skip sequence number 0, already seen");
    let (forged, _) = protect_request(&mut intruder, &get("/a")).expect("protect");
    let e = unprotect_request(&mut server, &forged).expect_err("wrong key");
    assert_eq!(e.coap_error(), Some(((4, 0), "Decryption failed")));

    // Unknown kid: 4.01 Security context not found.
    let mut stranger_params = cp.clone();
    stranger_params.sender_id = vec![0x77];
    let mut stranger = SecurityContext::new_in_memory(&stranger_params).expect("ctx");
    let (unknown, _) = protect_request(&mut stranger, &get("/a")).expect("protect");
    let e = unprotect_request(&mut server, &unknown).expect_err("unknown kid");
    assert_eq!(e.coap_error(), Some(((4, 1), "Security context not found")));

    // Garbled or truncated OSCORE options: 4.02 Bad Option.
    for value in [
        vec![0x20],
        vec![0x0B, 0x00],
        vec![0x06, 1, 2, 3, 4, 5, 6],
        vec![0x19, 0x14],
        vec![0x01, 0x14],
    ] {
        let mut bad = wire.clone();
        bad.clear_option(CoapOption::Oscore);
        bad.add_option(CoapOption::Oscore, value.clone());
        let e = unprotect_request(&mut server, &bad).expect_err("bad option");
        assert_eq!(error_code(&e), (4, 2), "{value:02x?}: {e:?}");
    }

    // No OSCORE option at all.
    let e = unprotect_request(&mut server, &get("/a")).expect_err("plain");
    assert_eq!(e, OscoreError::NotProtected);

    // Tampered ciphertext and truncated payload: 4.00.
    let (fresh, _) = protect_request(&mut client, &get("/b")).expect("protect");
    let mut tampered = fresh.clone();
    tampered.payload[0] ^= 1;
    assert_eq!(
        error_code(&unprotect_request(&mut server, &tampered).expect_err("tampered")),
        (4, 0)
    );
    let mut truncated = fresh.clone();
    truncated.payload.truncate(3);
    assert_eq!(
        error_code(&unprotect_request(&mut server, &truncated).expect_err("truncated")),
        (4, 0)
    );
    // The genuine message still verifies: failed attempts did not touch the window.
    unprotect_request(&mut server, &fresh).expect("genuine");

    // The error responses are plain CoAP with the diagnostic payload.
    let response = error_response(&fresh, &OscoreError::Replay).expect("response");
    assert_eq!(
        response.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    assert_eq!(response.payload, b"Replay detected");
    assert!(response.get_option(CoapOption::Oscore).is_none());
}

#[test]
fn partial_iv_at_or_beyond_2_pow_40_is_refused() {
    let (cp, sp) = pair(CoseAead::AesCcm16_64_128, HkdfHash::Sha256);
    let mut server = SecurityContext::new_in_memory(&sp).expect("server");
    let mut client = SecurityContext::new_in_memory(&cp).expect("client");
    let (wire, _) = protect_request(&mut client, &get("/a")).expect("protect");
    let mut six_byte_piv = wire.clone();
    six_byte_piv.clear_option(CoapOption::Oscore);
    six_byte_piv.add_option(CoapOption::Oscore, vec![0x0E, 1, 0, 0, 0, 0, 0]);
    assert_eq!(
        error_code(&unprotect_request(&mut server, &six_byte_piv).expect_err("2^40")),
        (4, 2)
    );

    // A sender refuses to go past 2^40 - 1.
    let mut at_limit = SecurityContext::with_store(&cp, Arc::new(FixedStore((1 << 40) - 2)), 1).expect("ctx");
    assert_eq!(at_limit.next_sequence_number(), (1 << 40) - 1);
    protect_request(&mut at_limit, &get("/a")).expect("the last number");
    assert_eq!(
        protect_request(&mut at_limit, &get("/a")).map(|_| ()),
        Err(OscoreError::SequenceExhausted)
    );
}

/// A store that claims `0.0` was persisted for every context.
#[derive(Debug)]
struct FixedStore(u64);

impl SequenceStore for FixedStore {
    fn load(&self, _: &[u8]) -> Result<Option<u64>, OscoreError> {
        Ok(Some(self.0))
    }
    fn persist(&self, _: &[u8], _: u64) -> Result<(), OscoreError> {
        Ok(())
    }
}

#[test]
fn malformed_inner_plaintext_is_a_decode_error() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let (_, sp) = pair(CoseAead::A128Gcm, HkdfHash::Sha256);
    // Encrypt a plaintext that is not a CoAP message under the client's real key:
    // only the inner parsing can fail.
    let client_keys = atls_oscore::context::derive_keys(&ContextParams {
        sender_id: vec![],
        recipient_id: vec![0x01],
        ..sp.clone()
    })
    .expect("keys");
    let nonce = atls_oscore::context::nonce(&[], &[0], &client_keys.common_iv).expect("nonce");
    let aad = atls_oscore::context::aad(1, &[], &[0]);
    for plaintext in [vec![0x01, 0xF0, 0x00], vec![0x01, 0x0D], vec![0x01, 0xFF]] {
        let cipher = aes_gcm::Aes128Gcm::new_from_slice(&client_keys.sender_key).expect("key");
        let ct = cipher
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .expect("encrypt");
        let mut wire = get("/");
        wire.header.code = MessageClass::Request(RequestType::Post);
        wire.add_option(CoapOption::Oscore, vec![0x09, 0x00]);
        wire.payload = ct;
        let mut fresh = SecurityContext::new_in_memory(&sp).expect("server");
        let e = unprotect_request(&mut fresh, &wire).expect_err("malformed inner message");
        assert_eq!(
            e.coap_error().map(|c| c.0),
            Some((4, 2)),
            "{plaintext:02x?}: {e:?}"
        );
    }
}

#[test]
fn cose_profile_round_trips_and_rejects_bad_input() {
    for aead in AEADS {
        let (cp, sp) = pair(aead, HkdfHash::Sha256);
        let mut client = SecurityContext::new_in_memory(&cp).expect("client");
        let mut server = SecurityContext::new_in_memory(&sp).expect("server");
        let (body, binding) = cose::seal_request(&mut client, b"{\"temp\": 21}").expect("seal");
        assert_eq!(cose::request_kid(&body).expect("kid"), Vec::<u8>::new());
        let (plain, sbinding) = cose::open_request(&mut server, &body).expect("open");
        assert_eq!(plain, b"{\"temp\": 21}");
        assert_eq!(
            cose::open_request(&mut server, &body).map(|_| ()),
            Err(OscoreError::Replay),
            "{aead:?}"
        );
        let response = cose::seal_response(&mut server, b"ok", &sbinding).expect("seal");
        assert_eq!(
            cose::open_response(&mut client, &response, &binding).expect("open"),
            b"ok"
        );

        // A response bound to another request does not verify.
        let other = RequestBinding {
            kid: vec![],
            piv: vec![0x63],
        };
        assert_eq!(
            cose::open_response(&mut client, &response, &other),
            Err(OscoreError::Decryption)
        );
        // Garbage, truncation and a tag flip.
        assert!(matches!(
            cose::open_request(&mut server, b"\xff\x00garbage"),
            Err(OscoreError::Decode(_))
        ));
        assert!(matches!(
            cose::open_request(&mut server, &body[..body.len() / 2]),
            Err(OscoreError::Decode(_))
        ));
        let (body2, _) = cose::seal_request(&mut client, b"x").expect("seal");
        let mut flipped = body2.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert_eq!(
            cose::open_request(&mut server, &flipped),
            Err(OscoreError::Decryption)
        );
        cose::open_request(&mut server, &body2).expect("the genuine one still verifies");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), option in proptest::collection::vec(any::<u8>(), 0..20)) {
        let (_, sp) = pair(CoseAead::AesCcm16_64_128, HkdfHash::Sha256);
        let mut server = SecurityContext::new_in_memory(&sp).expect("server");
        let _ = cose::open_request(&mut server, &bytes);
        if let Ok(mut packet) = Packet::from_bytes(&bytes) {
            packet.add_option(CoapOption::Oscore, option.clone());
            let _ = unprotect_request(&mut server, &packet);
            let binding = RequestBinding { kid: vec![], piv: vec![0] };
            let _ = unprotect_response(&mut server, &packet, &binding);
        }
        let _ = OscoreOption::decode(&option);
    }
}
