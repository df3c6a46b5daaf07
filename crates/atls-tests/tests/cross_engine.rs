//! rustls client with OpenSSL server and the reverse, TLS 1.2 and 1.3: both
//! sides export identical keys.

use atls_core::{ProtectionKind, ServerSessionParams, TlsVersion, LABEL_GENERIC};
use atls_openssl::OpenSslEngine;
use atls_rustls::RustlsEngine;
use atls_tests::*;

fn cross(client: &dyn atls_core::Engine, server: &dyn atls_core::Engine) {
    for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
        let mut cc = client_config(version);
        cc.client_auth = Some(pki().client.certified_key());
        let mut sc = server_config(version);
        sc.client_auth_roots = Some(vec![pki().ca.certificate().clone()]);
        let (c, s) = endpoints(client, &cc, server, &sc);
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let ci = h.client.handshake_info().expect("info");
        assert_eq!(ci.version, version);
        for kind in [ProtectionKind::Oscore, ProtectionKind::Cose] {
            let a = h.client.atls_keys(kind).expect("client keys");
            let b = h.server.atls_keys(kind).expect("server keys");
            assert_eq!(
                a.master_secret,
                b.master_secret,
                "{}→{} {version} {kind:?}",
                client.name(),
                server.name()
            );
            assert_eq!(a.master_salt, b.master_salt);
            assert_eq!(a.algorithms, b.algorithms);
        }
        let a = h
            .client
            .export_keying_material(LABEL_GENERIC, Some(b""), 64)
            .expect("export");
        let b = h
            .server
            .export_keying_material(LABEL_GENERIC, Some(b""), 64)
            .expect("export");
        assert_eq!(a, b);
    }
}

#[test]
fn rustls_client_openssl_server() {
    cross(&RustlsEngine, &OpenSslEngine);
}

#[test]
fn openssl_client_rustls_server() {
    cross(&OpenSslEngine, &RustlsEngine);
}

#[test]
fn cids_offered_by_openssl_to_rustls_fall_back() {
    // rustls cannot answer the extension: the OpenSSL client must fall back.
    let (c, s) = endpoints(
        &OpenSslEngine,
        &client_config(TlsVersion::Tls13),
        &RustlsEngine,
        &server_config(TlsVersion::Tls13),
    );
    let mut params = client_params();
    params.oscore_cid = Some(atls_core::ConnectionId::new(vec![0xC1]).expect("cid"));
    let h = handshake(&*c, &params, &*s, &ServerSessionParams::default());
    assert_complete(&h);
    let ids = h.client.protection_ids(ProtectionKind::Oscore).expect("ids");
    assert_eq!(ids.source, atls_core::IdSource::Fallback);
    assert_eq!(ids.sender_id, b"");
}
