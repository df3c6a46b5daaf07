//! Private keys in every PEM format the configuration accepts: PKCS#8
//! (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`),
//! on both engines as server and as client (client authentication).

use atls_core::{Certificate, CertifiedKey, PeerIdentity, PrivateKey, ServerSessionParams, TlsVersion};
use atls_tests::*;
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

/// A key and its PEM in one of the legacy formats.
struct Key {
    pkey: PKey<Private>,
    pem: Vec<u8>,
    label: &'static str,
}

fn ec_sec1() -> Key {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    let ec = EcKey::generate(&group).expect("EC key");
    let pem = ec.private_key_to_pem().expect("SEC1 PEM");
    Key {
        pkey: PKey::from_ec_key(ec).expect("pkey"),
        pem,
        label: "-----BEGIN EC PRIVATE KEY-----",
    }
}

fn rsa_pkcs1() -> Key {
    let rsa = Rsa::generate(2048).expect("RSA key");
    let pem = rsa.private_key_to_pem().expect("PKCS#1 PEM");
    Key {
        pkey: PKey::from_rsa(rsa).expect("pkey"),
        pem,
        label: "-----BEGIN RSA PRIVATE KEY-----",
    }
}

fn pkcs8(key: &Key) -> Key {
    Key {
        pkey: key.pkey.clone(),
        pem: key.pkey.private_key_to_pem_pkcs8().expect("PKCS#8 PEM"),
        label: "-----BEGIN PRIVATE KEY-----",
    }
}

fn certificate(
    subject: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    server: bool,
) -> X509 {
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_nid(Nid::COMMONNAME, subject).expect("CN");
    let name = name.build();
    let mut b = X509::builder().expect("builder");
    b.set_version(2).expect("v3");
    let serial = BigNum::from_u32(rand_serial()).expect("serial");
    b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
        .expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(issuer.map_or(&*name, |(ca, _)| ca.subject_name()))
        .expect("issuer");
    b.set_pubkey(key).expect("public key");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("not before");
    b.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
        .expect("not after");
    match issuer {
        None => {
            b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
        }
        Some(_) => {
            b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .key_encipherment()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
            let mut eku = ExtendedKeyUsage::new();
            if server {
                eku.server_auth();
            } else {
                eku.client_auth();
            }
            b.append_extension(eku.build().expect("eku")).expect("eku");
            let san = SubjectAlternativeName::new()
                .dns(subject)
                .build(&b.x509v3_context(issuer.map(|(ca, _)| &**ca), None))
                .expect("san");
            b.append_extension(san).expect("san");
        }
    }
    let signer = issuer.map_or(key, |(_, k)| k);
    b.sign(signer, MessageDigest::sha256()).expect("sign");
    b.build()
}

fn rand_serial() -> u32 {
    let mut bytes = [0u8; 4];
    openssl::rand::rand_bytes(&mut bytes).expect("random");
    u32::from_be_bytes(bytes) >> 1
}

fn der(cert: &X509) -> Certificate {
    Certificate(cert.to_der().expect("DER"))
}

/// A CA and, under it, a certificate for `name` whose key is `key`, loaded
/// from its PEM as a configuration would.
fn identity(ca: &X509, ca_key: &PKey<Private>, name: &str, key: &Key, server: bool) -> CertifiedKey {
    let pem = String::from_utf8(key.pem.clone()).expect("PEM is text");
    assert!(pem.starts_with(key.label), "{pem:.40}");
    let leaf = certificate(name, &key.pkey, Some((ca, ca_key)), server);
    CertifiedKey {
        chain: vec![der(&leaf), der(ca)],
        key: PrivateKey::from_pem(&key.pem).expect("key PEM"),
    }
}

#[test]
fn sec1_pkcs1_and_pkcs8_keys_work_on_both_engines() {
    let ca_key = ec_sec1().pkey;
    let ca = certificate("key formats CA", &ca_key, None, false);
    let ec = ec_sec1();
    let rsa = rsa_pkcs1();
    let keys = [
        ("SEC1 P-256", ec_sec1(), ec_sec1()),
        ("PKCS#1 RSA-2048", rsa_pkcs1(), rsa_pkcs1()),
        ("PKCS#8 P-256", pkcs8(&ec), pkcs8(&ec_sec1())),
        ("PKCS#8 RSA-2048", pkcs8(&rsa), pkcs8(&ec)),
    ];
    for (format, server_key, client_key) in &keys {
        let server_id = identity(&ca, &ca_key, SERVER_NAME, server_key, true);
        let client_id = identity(&ca, &ca_key, "device-9", client_key, false);
        for server_engine in engines() {
            for client_engine in engines() {
                for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
                    let what = format!(
                        "{format}: {} client → {} server, {version}",
                        client_engine.name(),
                        server_engine.name()
                    );
                    let mut cc = client_config(version);
                    cc.trust_anchors = vec![der(&ca)];
                    cc.client_auth = Some(client_id.clone());
                    let mut sc = server_config(version);
                    sc.identity = Some(server_id.clone());
                    sc.client_auth_roots = Some(vec![der(&ca)]);
                    let c = client_engine
                        .client(&cc)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let s = server_engine
                        .server(&sc)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
                    assert!(h.transcript.is_ok(), "{what}: {:?}", h.transcript);
                    assert_complete(&h);
                    let peer = &h.server.handshake_info().expect("info").peer;
                    let PeerIdentity::Certificates(chain) = peer else {
                        panic!("{what}: {peer:?}");
                    };
                    assert_eq!(chain.first(), client_id.chain.first(), "{what}");
                }
            }
        }
    }
}
