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

/// The request line of the COSE-profile tests.
const LINE: cose::RequestLine<'static> = cose::RequestLine {
    method: "POST",
    target: "/sensors/temp?unit=c",
};

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
        let (body, binding) = cose::seal_request(&mut client, &LINE, b"{\"temp\": 21}").expect("seal");
        assert_eq!(cose::request_kid(&body).expect("kid"), Vec::<u8>::new());
        let (plain, sbinding) = cose::open_request(&mut server, &LINE, &body).expect("open");
        assert_eq!(plain, b"{\"temp\": 21}");
        assert_eq!(
            cose::open_request(&mut server, &LINE, &body).map(|_| ()),
            Err(OscoreError::Replay),
            "{aead:?}"
        );
        let response = cose::seal_response(&mut server, 200, b"ok", &sbinding).expect("seal");
        assert_eq!(
            cose::open_response(&mut client, 200, &response, &binding).expect("open"),
            b"ok"
        );

        // A response bound to another request does not verify.
        let other = RequestBinding {
            kid: vec![],
            piv: vec![0x63],
        };
        assert_eq!(
            cose::open_response(&mut client, 200, &response, &other),
            Err(OscoreError::Decryption)
        );
        // Garbage, truncation and a tag flip.
        assert!(matches!(
            cose::open_request(&mut server, &LINE, b"\xff\x00garbage"),
            Err(OscoreError::Decode(_))
        ));
        assert!(matches!(
            cose::open_request(&mut server, &LINE, &body[..body.len() / 2]),
            Err(OscoreError::Decode(_))
        ));
        let (body2, _) = cose::seal_request(&mut client, &LINE, b"x").expect("seal");
        let mut flipped = body2.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert_eq!(
            cose::open_request(&mut server, &LINE, &flipped),
            Err(OscoreError::Decryption)
        );
        cose::open_request(&mut server, &LINE, &body2).expect("the genuine one still verifies");
    }
}

#[test]
fn cose_profile_binds_method_target_and_status() {
    for aead in AEADS {
        let (cp, sp) = pair(aead, HkdfHash::Sha256);
        let mut client = SecurityContext::new_in_memory(&cp).expect("client");
        let mut server = SecurityContext::new_in_memory(&sp).expect("server");
        let (body, binding) = cose::seal_request(&mut client, &LINE, b"21.5").expect("seal");
        let before = server.replay.clone();
        let tampered = [
            cose::RequestLine {
                method: "DELETE",
                ..LINE
            },
            cose::RequestLine {
                target: "/sensors/temp?unit=f",
                ..LINE
            },
            cose::RequestLine {
                method: "post",
                target: "/sensors/temp",
            },
        ];
        for line in &tampered {
            assert_eq!(
                cose::open_request(&mut server, line, &body),
                Err(OscoreError::Decryption),
                "{aead:?} {line:?}"
            );
            assert_eq!(server.replay, before, "a failed open leaves the window unmoved");
        }
        let (plain, sbinding) = cose::open_request(&mut server, &LINE, &body).expect("the genuine request");
        assert_eq!(plain, b"21.5");

        let response = cose::seal_response(&mut server, 200, b"ok", &sbinding).expect("seal");
        for status in [201, 404, 500, 0] {
            assert_eq!(
                cose::open_response(&mut client, status, &response, &binding),
                Err(OscoreError::Decryption),
                "{aead:?} status {status}"
            );
        }
        assert_eq!(
            cose::open_response(&mut client, 200, &response, &binding).expect("the genuine response"),
            b"ok"
        );

        // The next request is still accepted after failures on it.
        let (body2, _) = cose::seal_request(&mut client, &LINE, b"22").expect("seal");
        let before = server.replay.clone();
        assert_eq!(
            cose::open_request(&mut server, &tampered[0], &body2),
            Err(OscoreError::Decryption)
        );
        assert_eq!(server.replay, before);
        cose::open_request(&mut server, &LINE, &body2).expect("accepted after a tampered copy");
    }
}

fn post(payload_len: usize) -> Packet {
    let mut p = get("/upload");
    p.header.code = MessageClass::Request(RequestType::Post);
    p.payload = vec![0x5A; payload_len];
    p
}

fn too_large<T: std::fmt::Debug>(result: Result<T, OscoreError>) -> bool {
    matches!(result, Err(OscoreError::Decode("message too large")))
}

#[test]
fn the_message_size_cap_is_a_context_setting() {
    const CAP: usize = 200_000;
    let (cp, sp) = pair(CoseAead::A128Gcm, HkdfHash::Sha256);
    let mut client = SecurityContext::new_in_memory(&cp).expect("client");
    let mut server = SecurityContext::new_in_memory(&sp).expect("server");
    assert_eq!(client.max_message(), message::MAX_MESSAGE);
    assert_eq!(message::MAX_MESSAGE, 64 * 1024);
    client.set_max_message(CAP);
    server.set_max_message(CAP);
    assert_eq!(server.max_message(), CAP);

    // OSCORE: a payload of exactly the cap goes both ways...
    let (wire, binding) = protect_request(&mut client, &post(CAP)).expect("protect");
    let (plain, sb) = unprotect_request(&mut server, &wire).expect("unprotect");
    assert_eq!(plain.payload.len(), CAP);
    let response = protect_response(&mut server, &content(&vec![1; CAP]), &sb, false).expect("protect");
    assert_eq!(
        unprotect_response(&mut client, &response, &binding)
            .expect("unprotect")
            .payload
            .len(),
        CAP
    );
    // ...one byte more is refused by the sender and by the receiver.
    assert!(too_large(protect_request(&mut client, &post(CAP + 1))));
    assert!(too_large(protect_response(
        &mut server,
        &content(&vec![1; CAP + 1]),
        &sb,
        false
    )));
    let (bp, _) = pair(CoseAead::A128Gcm, HkdfHash::Sha256);
    let mut big_client = SecurityContext::new_in_memory(&bp).expect("client");
    big_client.set_max_message(2 * CAP);
    let mut big_server = SecurityContext::new_in_memory(&sp).expect("server");
    big_server.set_max_message(2 * CAP);
    // Past the sequence number `server` has already seen.
    protect_request(&mut big_client, &post(0)).expect("protect");
    let (wire, big_binding) = protect_request(&mut big_client, &post(CAP + 1)).expect("protect");
    let before = server.replay.clone();
    assert!(too_large(unprotect_request(&mut server, &wire)));
    assert_eq!(
        server.replay, before,
        "a refused request does not move the window"
    );
    let (_, bsb) = unprotect_request(&mut big_server, &wire).expect("a larger cap accepts it");
    let response =
        protect_response(&mut big_server, &content(&vec![1; CAP + 1]), &bsb, false).expect("protect");
    client.set_max_message(CAP);
    assert!(too_large(unprotect_response(
        &mut client,
        &response,
        &big_binding
    )));

    // The default context refuses 64 KiB + 1, as sender and as receiver;
    // a ciphertext far over the cap is refused before decryption.
    let mut default_client = SecurityContext::new_in_memory(&cp).expect("client");
    let mut default_server = SecurityContext::new_in_memory(&sp).expect("server");
    assert!(too_large(protect_request(
        &mut default_client,
        &post(message::MAX_MESSAGE + 1)
    )));
    let (wire, _) = protect_request(&mut big_client, &post(message::MAX_MESSAGE + 1)).expect("protect");
    assert!(too_large(unprotect_request(&mut default_server, &wire)));
    let mut huge = post(0);
    huge.add_option(CoapOption::Oscore, vec![0x09, 0x00]);
    huge.payload = vec![0; 4 * message::MAX_MESSAGE];
    assert!(too_large(unprotect_request(&mut default_server, &huge)));
    let (wire, _) = protect_request(&mut default_client, &post(message::MAX_MESSAGE)).expect("protect");
    unprotect_request(&mut default_server, &wire).expect("exactly 64 KiB is accepted");

    // COSE profile: the same setting governs plaintexts.
    let (body, cb) = cose::seal_request(&mut client, &LINE, &vec![2; CAP]).expect("seal");
    let (plain, csb) = cose::open_request(&mut server, &LINE, &body).expect("open");
    assert_eq!(plain.len(), CAP);
    let reply = cose::seal_response(&mut server, 200, &vec![3; CAP], &csb).expect("seal");
    assert_eq!(
        cose::open_response(&mut client, 200, &reply, &cb)
            .expect("open")
            .len(),
        CAP
    );
    assert!(too_large(cose::seal_request(
        &mut client,
        &LINE,
        &vec![2; CAP + 1]
    )));
    assert!(too_large(cose::seal_response(
        &mut server,
        200,
        &vec![3; CAP + 1],
        &csb
    )));
    let (body, _) = cose::seal_request(&mut big_client, &LINE, &vec![2; CAP + 1]).expect("seal");
    let before = server.replay.clone();
    assert!(too_large(cose::open_request(&mut server, &LINE, &body)));
    assert_eq!(server.replay, before);
    assert!(too_large(cose::seal_request(
        &mut default_client,
        &LINE,
        &vec![2; message::MAX_MESSAGE + 1]
    )));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), option in proptest::collection::vec(any::<u8>(), 0..20)) {
        let (_, sp) = pair(CoseAead::AesCcm16_64_128, HkdfHash::Sha256);
        let mut server = SecurityContext::new_in_memory(&sp).expect("server");
        let _ = cose::open_request(&mut server, &LINE, &bytes);
        if let Ok(mut packet) = Packet::from_bytes(&bytes) {
            packet.add_option(CoapOption::Oscore, option.clone());
            let _ = unprotect_request(&mut server, &packet);
            let binding = RequestBinding { kid: vec![], piv: vec![0] };
            let _ = unprotect_response(&mut server, &packet, &binding);
        }
        let _ = OscoreOption::decode(&option);
    }
}
