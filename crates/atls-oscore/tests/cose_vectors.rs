//! The cose-wg COSE_Encrypt0 examples for every AEAD of the ATLS §10 table,
//! and the pass/fail cases, through the low-level COSE layer.

use std::collections::BTreeSet;
use std::path::PathBuf;

use atls_oscore::cose::{decrypt0, encrypt0, message_algorithm, parse_encrypt0};
use base64::Engine as _;
use coset::TaggedCborSerializable;
use serde_json::Value;

fn vectors() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/cose");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("vector dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                serde_json::from_str(&text).expect("json"),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The §10 AEADs by their cose-wg example names.
fn in_atls_table(alg: &str) -> bool {
    matches!(
        alg,
        "AES-CCM-16-128/64"
            | "AES-CCM-16-256/64"
            | "AES-CCM-16-128/128"
            | "AES-CCM-16-256/128"
            | "A128GCM"
            | "A256GCM"
            | "ChaCha-Poly1305"
    )
}

fn alg_name(v: &Value) -> String {
    let enc = &v["input"]["encrypted"];
    enc["protected"]["alg"]
        .as_str()
        .or(enc["unprotected"]["alg"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn key(v: &Value) -> Vec<u8> {
    let k = v["input"]["encrypted"]["recipients"][0]["key"]["k"]
        .as_str()
        .expect("k");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(k)
        .expect("base64url key")
}

fn external(v: &Value) -> Vec<u8> {
    v["input"]["encrypted"]["external"]
        .as_str()
        .map(|h| hex::decode(h).expect("hex"))
        .unwrap_or_default()
}

#[test]
fn every_atls_aead_decrypts_and_reencrypts_its_examples() {
    let mut covered = BTreeSet::new();
    for (name, v) in vectors() {
        let alg = alg_name(&v);
        if !in_atls_table(&alg) || v["input"].get("failures").is_some() {
            continue; // failure cases are checked below
        }
        let expected = hex::decode(v["output"]["cbor"].as_str().expect("cbor")).expect("hex");
        let message = parse_encrypt0(&expected).unwrap_or_else(|e| panic!("{name}: {e}"));
        let nonce = message.unprotected.iv.clone();
        let plaintext =
            decrypt0(&message, &key(&v), &nonce, &external(&v)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            plaintext,
            v["input"]["plaintext"].as_str().expect("plaintext").as_bytes(),
            "{name}"
        );

        // Encrypting the same input with the same headers gives the same bytes.
        let alg_id = message_algorithm(&message).expect("alg");
        let again = encrypt0(
            alg_id,
            &key(&v),
            message.protected.header.clone(),
            message.unprotected.clone(),
            &nonce,
            &external(&v),
            &plaintext,
        )
        .expect("encrypt");
        let mut again = again;
        again.protected.original_data = message.protected.original_data.clone();
        let bytes = if expected.first() == Some(&0xD0) {
            again.to_tagged_vec().expect("encode")
        } else {
            coset::CborSerializable::to_vec(again).expect("encode")
        };
        assert_eq!(hex::encode(bytes), hex::encode(&expected), "{name}");
        covered.insert(alg_id.cose_id());
    }
    assert_eq!(
        covered,
        BTreeSet::from([1, 3, 10, 11, 24, 30, 31]),
        "one example per AEAD of the §10 table"
    );
}

#[test]
fn failure_cases_are_rejected() {
    let mut checked = 0;
    for (name, v) in vectors() {
        let Some(failures) = v["input"].get("failures") else {
            continue;
        };
        let must_fail = !name.starts_with("enc-pass");
        let bytes = hex::decode(v["output"]["cbor"].as_str().expect("cbor")).expect("hex");
        let result = parse_encrypt0(&bytes).and_then(|message| {
            let nonce = message.unprotected.iv.clone();
            decrypt0(&message, &key(&v), &nonce, &external(&v))
        });
        if must_fail {
            assert!(result.is_err(), "{name} ({failures}) must be rejected");
        } else {
            assert_eq!(
                result.unwrap_or_else(|e| panic!("{name}: {e}")),
                v["input"]["plaintext"].as_str().expect("plaintext").as_bytes(),
                "{name}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 9);
}
