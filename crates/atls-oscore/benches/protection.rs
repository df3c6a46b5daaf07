//! The cost of OSCORE and COSE-profile protection per message against the
//! bare AEAD: protect + verify of a message with a 64-byte and a 1 KiB
//! payload, beside seal + open of the same payload with the same AEAD, in the
//! same run. Prints ns per message and the ratio bare / protected (1.0 would
//! mean protection costs nothing beyond the cipher; the goal is ≥ 0.5).
//!
//! `cargo bench -p atls-oscore --bench protection`

use std::hint::black_box;
use std::time::{Duration, Instant};

use aead::generic_array::GenericArray;
use aead::{AeadInPlace, KeyInit};
use atls_core::{CoseAead, HkdfHash};
use atls_oscore::{cose, protect_request, unprotect_request, ContextParams, SecurityContext};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType};
use zeroize::Zeroizing;

fn params(aead: CoseAead, client: bool) -> ContextParams {
    let (s, r) = if client {
        (vec![0x01], vec![0x02])
    } else {
        (vec![0x02], vec![0x01])
    };
    ContextParams {
        master_secret: Zeroizing::new(vec![1; aead.key_len()]),
        master_salt: Zeroizing::new(vec![2; aead.key_len()]),
        aead,
        hkdf: HkdfHash::Sha256,
        sender_id: s,
        recipient_id: r,
        id_context: None,
        replay_window: 32,
    }
}

/// Median of `rounds` timings of `iters` calls, in ns per call.
fn measure(mut f: impl FnMut(), iters: u32) -> f64 {
    for _ in 0..iters / 4 {
        f();
    }
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn bare<A: AeadInPlace + KeyInit>(key: &[u8], nonce_len: usize, payload: &[u8]) -> f64 {
    let cipher = A::new_from_slice(key).expect("key");
    let nonce = vec![7u8; nonce_len];
    let aad = [0u8; 20];
    let mut buf = Vec::with_capacity(payload.len() + 16);
    measure(
        || {
            buf.clear();
            buf.extend_from_slice(payload);
            cipher
                .encrypt_in_place(GenericArray::from_slice(&nonce), &aad, &mut buf)
                .expect("seal");
            cipher
                .decrypt_in_place(GenericArray::from_slice(&nonce), &aad, &mut buf)
                .expect("open");
            black_box(&buf);
        },
        20_000,
    )
}

fn main() {
    let _ = Duration::ZERO;
    println!(
        "{:<20} {:>6} {:>10} {:>12} {:>8} {:>12} {:>8}",
        "AEAD", "bytes", "bare ns", "OSCORE ns", "ratio", "COSE ns", "ratio"
    );
    for aead in [
        CoseAead::AesCcm16_64_128,
        CoseAead::A128Gcm,
        CoseAead::ChaCha20Poly1305,
    ] {
        for size in [64usize, 1024] {
            let payload = vec![0xA5u8; size];
            let key = vec![1u8; aead.key_len()];
            let bare_ns = match aead {
                CoseAead::AesCcm16_64_128 => {
                    bare::<ccm::Ccm<aes::Aes128, ccm::consts::U8, ccm::consts::U13>>(&key, 13, &payload)
                }
                CoseAead::A128Gcm => bare::<aes_gcm::Aes128Gcm>(&key, 12, &payload),
                _ => bare::<chacha20poly1305::ChaCha20Poly1305>(&key, 12, &payload),
            };

            let mut client = SecurityContext::new_in_memory(&params(aead, true)).expect("client");
            let mut server = SecurityContext::new_in_memory(&params(aead, false)).expect("server");
            let mut request = Packet::new();
            request.header.code = MessageClass::Request(RequestType::Post);
            request.add_option(CoapOption::UriPath, b"sensors".to_vec());
            request.payload = payload.clone();
            let oscore_ns = measure(
                || {
                    let (wire, _) = protect_request(&mut client, &request).expect("protect");
                    black_box(unprotect_request(&mut server, &wire).expect("unprotect"));
                },
                20_000,
            );

            let mut client = SecurityContext::new_in_memory(&params(aead, true)).expect("client");
            let mut server = SecurityContext::new_in_memory(&params(aead, false)).expect("server");
            let line = cose::RequestLine {
                method: "POST",
                target: "/sensors",
            };
            let cose_ns = measure(
                || {
                    let (body, _) = cose::seal_request(&mut client, &line, &payload).expect("seal");
                    black_box(cose::open_request(&mut server, &line, &body).expect("open"));
                },
                20_000,
            );
            println!(
                "{:<20} {:>6} {:>10.0} {:>12.0} {:>8.2} {:>12.0} {:>8.2}",
                aead.name(),
                size,
                bare_ns,
                oscore_ns,
                bare_ns / oscore_ns,
                cose_ns,
                bare_ns / cose_ns
            );
        }
    }
}
