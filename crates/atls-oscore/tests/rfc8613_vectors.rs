//! RFC 8613 Appendix C test vectors C.1–C.8.

use atls_core::{CoseAead, HkdfHash};
use atls_oscore::context::{aad, derive_keys, nonce};
use atls_oscore::*;
use coap_lite::Packet;
use zeroize::Zeroizing;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

fn params(salt: &str, sender: &str, recipient: &str, id_context: Option<&str>) -> ContextParams {
    ContextParams {
        master_secret: Zeroizing::new(h("0102030405060708090a0b0c0d0e0f10")),
        master_salt: Zeroizing::new(h(salt)),
        aead: CoseAead::AesCcm16_64_128,
        hkdf: HkdfHash::Sha256,
        sender_id: h(sender),
        recipient_id: h(recipient),
        id_context: id_context.map(h),
        replay_window: 32,
    }
}

fn check_derivation(
    p: &ContextParams,
    sender_key: &str,
    recipient_key: &str,
    iv: &str,
    sender_nonce: &str,
    recipient_nonce: &str,
) {
    let keys = derive_keys(p).expect("derive");
    assert_eq!(hex::encode(&*keys.sender_key), sender_key);
    assert_eq!(hex::encode(&*keys.recipient_key), recipient_key);
    assert_eq!(hex::encode(&keys.common_iv), iv);
    assert_eq!(
        hex::encode(nonce(&p.sender_id, &[0], &keys.common_iv).expect("nonce")),
        sender_nonce
    );
    assert_eq!(
        hex::encode(nonce(&p.recipient_id, &[0], &keys.common_iv).expect("nonce")),
        recipient_nonce
    );
}

#[test]
fn c1_key_derivation_with_master_salt() {
    check_derivation(
        &params("9e7ca92223786340", "", "01", None),
        "f0910ed7295e6ad4b54fc793154302ff",
        "ffb14e093c94c9cac9471648b4f98710",
        "4622d4dd6d944168eefb54987c",
        "4622d4dd6d944168eefb54987c",
        "4722d4dd6d944169eefb54987c",
    );
    check_derivation(
        &params("9e7ca92223786340", "01", "", None),
        "ffb14e093c94c9cac9471648b4f98710",
        "f0910ed7295e6ad4b54fc793154302ff",
        "4622d4dd6d944168eefb54987c",
        "4722d4dd6d944169eefb54987c",
        "4622d4dd6d944168eefb54987c",
    );
    assert_eq!(
        hex::encode(atls_oscore::context::info_for_tests(&[], None, 10, "Key", 16)),
        "8540f60a634b657910"
    );
    assert_eq!(
        hex::encode(atls_oscore::context::info_for_tests(&[], None, 10, "IV", 13)),
        "8540f60a6249560d"
    );
}

#[test]
fn c2_key_derivation_without_master_salt() {
    check_derivation(
        &params("", "00", "01", None),
        "321b26943253c7ffb6003b0b64d74041",
        "e57b5635815177cd679ab4bcec9d7dda",
        "be35ae297d2dace910c52e99f9",
        "bf35ae297d2dace910c52e99f9",
        "bf35ae297d2dace810c52e99f9",
    );
    check_derivation(
        &params("", "01", "00", None),
        "e57b5635815177cd679ab4bcec9d7dda",
        "321b26943253c7ffb6003b0b64d74041",
        "be35ae297d2dace910c52e99f9",
        "bf35ae297d2dace810c52e99f9",
        "bf35ae297d2dace910c52e99f9",
    );
}

#[test]
fn c3_key_derivation_with_id_context() {
    check_derivation(
        &params("9e7ca92223786340", "", "01", Some("37cbf3210017a2d3")),
        "af2a1300a5e95788b356336eeecd2b92",
        "e39a0c7c77b43f03b4b39ab9a268699f",
        "2ca58fb85ff1b81c0b7181b85e",
        "2ca58fb85ff1b81c0b7181b85e",
        "2da58fb85ff1b81d0b7181b85e",
    );
    check_derivation(
        &params("9e7ca92223786340", "01", "", Some("37cbf3210017a2d3")),
        "e39a0c7c77b43f03b4b39ab9a268699f",
        "af2a1300a5e95788b356336eeecd2b92",
        "2ca58fb85ff1b81c0b7181b85e",
        "2da58fb85ff1b81d0b7181b85e",
        "2ca58fb85ff1b81c0b7181b85e",
    );
}

/// A client context whose next sequence number is 20, as in C.4–C.6.
fn client_at_20(p: &ContextParams) -> SecurityContext {
    let mut ctx = SecurityContext::new_in_memory(p).expect("context");
    for _ in 0..20 {
        protect_request(&mut ctx, &Packet::new()).expect("protect");
    }
    assert_eq!(ctx.next_sequence_number(), 20);
    ctx
}

fn check_request(p: ContextParams, unprotected: &str, expected: &str) -> (SecurityContext, Packet) {
    let mut ctx = client_at_20(&p);
    let request = Packet::from_bytes(&h(unprotected)).expect("request");
    let (protected, binding) = protect_request(&mut ctx, &request).expect("protect");
    assert_eq!(hex::encode(protected.to_bytes().expect("encode")), expected);
    assert_eq!(binding.piv, vec![0x14]);

    // The server side of the same context verifies it and recovers the request.
    let server_params = ContextParams {
        sender_id: p.recipient_id.clone(),
        recipient_id: p.sender_id.clone(),
        ..p
    };
    let mut server = SecurityContext::new_in_memory(&server_params).expect("server");
    let wire = Packet::from_bytes(&h(expected)).expect("wire");
    let (plain, server_binding) = unprotect_request(&mut server, &wire).expect("unprotect");
    assert_eq!(
        plain.to_bytes().expect("encode"),
        request.to_bytes().expect("encode")
    );
    assert_eq!(server_binding, binding);
    // And a replay of it is refused.
    assert_eq!(
        unprotect_request(&mut server, &wire).map(|_| ()),
        Err(OscoreError::Replay)
    );
    (server, wire)
}

#[test]
fn c4_request_with_empty_sender_id() {
    check_request(
        params("9e7ca92223786340", "", "01", None),
        "44015d1f00003974396c6f63616c686f737483747631",
        "44025d1f00003974396c6f63616c686f7374620914ff612f1092f1776f1c1668b3825e",
    );
    assert_eq!(
        hex::encode(aad(10, &[], &[0x14])),
        "8368456e63727970743040488501810a40411440"
    );
}

#[test]
fn c5_request_with_sender_id() {
    check_request(
        params("", "00", "01", None),
        "440171c30000b932396c6f63616c686f737483747631",
        "440271c30000b932396c6f63616c686f737463091400ff4ed339a5a379b0b8bc731fffb0",
    );
}

#[test]
fn c6_request_with_kid_context() {
    check_request(
        params("9e7ca92223786340", "", "01", Some("37cbf3210017a2d3")),
        "44012f8eef9bbf7a396c6f63616c686f737483747631",
        "44022f8eef9bbf7a396c6f63616c686f73746b19140837cbf3210017a2d3ff72cd7273fd331ac45cffbe55c3",
    );
}

fn response_case(own_piv: bool, expected: &str) {
    let server_params = params("9e7ca92223786340", "01", "", None);
    let mut server = SecurityContext::new_in_memory(&server_params).expect("server");
    let binding = RequestBinding {
        kid: vec![],
        piv: vec![0x14],
    };
    let response = Packet::from_bytes(&h("64455d1f00003974ff48656c6c6f20576f726c6421")).expect("response");
    let protected = protect_response(&mut server, &response, &binding, own_piv).expect("protect");
    assert_eq!(hex::encode(protected.to_bytes().expect("encode")), expected);

    let mut client =
        SecurityContext::new_in_memory(&params("9e7ca92223786340", "", "01", None)).expect("client");
    let plain = unprotect_response(
        &mut client,
        &Packet::from_bytes(&h(expected)).expect("wire"),
        &binding,
    )
    .expect("unprotect");
    assert_eq!(plain.payload, b"Hello World!");
    assert_eq!(
        plain.to_bytes().expect("encode"),
        response.to_bytes().expect("encode")
    );
}

#[test]
fn c7_response_without_partial_iv() {
    response_case(
        false,
        "64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106",
    );
}

#[test]
fn c8_response_with_partial_iv() {
    response_case(
        true,
        "64445d1f00003974920100ff4d4c13669384b67354b2b6175ff4b8658c666a6cf88e",
    );
}
