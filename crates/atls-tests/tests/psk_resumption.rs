//! What a resumed session reports about its peer and about resumption: an
//! external-PSK session (OpenSSL; rustls has no external PSK) keeps its PSK
//! identity when resumed, and only ticket resumption counts as resumed; a
//! resumed mutual-auth session keeps the client's certificate (the whole
//! chain on rustls, the leaf on an OpenSSL server).

use atls_core::{
    ClientConfig, CommonConfig, HandshakeInfo, PeerIdentity, Psk, ServerConfig, ServerSessionParams,
    TlsVersion,
};
use atls_openssl::OpenSslEngine;
use atls_tests::*;

const IDENTITY: &[u8] = b"device-7";

fn psk() -> Psk {
    Psk::new(IDENTITY.to_vec(), (0u8..16).collect::<Vec<_>>()).expect("psk")
}

/// Client and server infos of one handshake between the two endpoints.
fn infos(
    client: &dyn atls_core::ClientEndpoint,
    server: &dyn atls_core::ServerEndpoint,
) -> (HandshakeInfo, HandshakeInfo) {
    let h = handshake(client, &client_params(), server, &ServerSessionParams::default());
    assert_complete(&h);
    (
        h.client.handshake_info().expect("client info").clone(),
        h.server.handshake_info().expect("server info").clone(),
    )
}

#[test]
fn resumed_external_psk_sessions_keep_their_identity() {
    for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
        let common = CommonConfig {
            versions: vec![version],
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
        let (client, server) = infos(&*c, &*s);
        assert_eq!(server.peer, PeerIdentity::Psk(IDENTITY.to_vec()), "{version}");
        assert_eq!(client.peer, PeerIdentity::Psk(IDENTITY.to_vec()), "{version}");
        assert!(
            !client.resumed && !server.resumed,
            "{version}: an external-PSK handshake is not a resumption"
        );
        for round in 1..3 {
            let (client, server) = infos(&*c, &*s);
            assert!(
                client.resumed && server.resumed,
                "{version} round {round}: the same client resumes ({} / {})",
                client.resumed,
                server.resumed
            );
            assert_eq!(
                server.peer,
                PeerIdentity::Psk(IDENTITY.to_vec()),
                "{version} round {round}: the server still knows the PSK identity"
            );
            assert_eq!(
                client.peer,
                PeerIdentity::Psk(IDENTITY.to_vec()),
                "{version} round {round}"
            );
        }
    }
}

#[test]
fn resumed_mutual_auth_sessions_keep_the_client_certificate() {
    for engine in engines() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            let mut cc = client_config(version);
            cc.client_auth = Some(pki().client.certified_key());
            let mut sc = server_config(version);
            sc.client_auth_roots = Some(vec![pki().ca.certificate().clone()]);
            let (c, s) = endpoints(engine, &cc, engine, &sc);
            let (client, server) = infos(&*c, &*s);
            assert!(!client.resumed && !server.resumed);
            let PeerIdentity::Certificates(chain) = &server.peer else {
                panic!("{} {version}: {:?}", engine.name(), server.peer);
            };
            assert_eq!(
                chain.first(),
                Some(&pki().client.cert),
                "{} {version}",
                engine.name()
            );
            let server_chain = client.peer.clone();
            for round in 1..3 {
                let (resumed_client, resumed_server) = infos(&*c, &*s);
                assert!(
                    resumed_client.resumed && resumed_server.resumed,
                    "{} {version} round {round}: resumes",
                    engine.name()
                );
                // OpenSSL keeps only the peer's leaf in a server session (its
                // ticket carries no chain): the resumed peer is the client's
                // leaf alone. rustls keeps the whole chain.
                let expected = if engine.name() == "openssl" {
                    PeerIdentity::Certificates(vec![pki().client.cert.clone()])
                } else {
                    server.peer.clone()
                };
                assert_eq!(
                    resumed_server.peer,
                    expected,
                    "{} {version} round {round}: the client certificate survives resumption",
                    engine.name()
                );
                assert_eq!(
                    resumed_client.peer,
                    server_chain,
                    "{} {version} round {round}: so does the server chain",
                    engine.name()
                );
            }
        }
    }
}
