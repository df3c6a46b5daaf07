//! Resumed sessions over real sockets keep who the peer is: an external-PSK
//! session (OpenSSL; the rustls engine has no external PSK) keeps its
//! identity, and a mutual-auth session keeps the client certificate, on
//! both engines; only ticket resumption is reported as resumed.

mod common;

use atls_core::{ClientConfig, CommonConfig, Psk, ServerConfig, TlsVersion};
use atls_http::{Mode, ServerLimits};
use common::*;

fn psk() -> Psk {
    Psk::new(b"device-7".to_vec(), (0u8..16).collect::<Vec<_>>()).expect("psk")
}

/// `/session` of a fresh session, then of a resumed one (the client forgets
/// its session but keeps its ticket).
async fn first_and_resumed(c: &atls_http::AtlsClient) -> (serde_json::Value, serde_json::Value) {
    let first = json(c.send(get("/session")).await.expect("first").body());
    c.reset().await;
    let resumed = json(c.send(get("/session")).await.expect("resumed").body());
    (first, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_psk_session_keeps_its_identity() {
    let openssl = engines()[0];
    assert_eq!(openssl.name(), "openssl");
    for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
        let common = CommonConfig {
            versions: vec![version],
            ..CommonConfig::default()
        };
        let server_config = ServerConfig {
            common: common.clone(),
            psks: vec![psk()],
            ..ServerConfig::default()
        };
        let client_config = ClientConfig {
            common,
            psk: Some(psk()),
            ..ClientConfig::default()
        };
        let server = serve(openssl, &server_config, ServerLimits::default()).await;
        for mode in Mode::ALL {
            let label = format!("{version:?} {mode}");
            let c = client(openssl, &client_config, &server.url(), mode_options(mode));
            let (first, resumed) = first_and_resumed(&c).await;
            for (round, session) in [("first", &first), ("resumed", &resumed)] {
                assert_eq!(session["peer"]["kind"], "psk", "{label} {round}: {session}");
                assert_eq!(session["peer"]["identity"], "device-7", "{label} {round}");
            }
            assert_eq!(
                first["resumed"], false,
                "{label}: an external PSK is not a resumption"
            );
            assert_eq!(resumed["resumed"], true, "{label}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_mutual_auth_session_keeps_the_client_certificate() {
    let leaf = hex::encode(&pki().client.certified_key().chain[0].0);
    for engine in engines() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            let config = ServerConfig {
                client_auth_roots: Some(vec![pki().ca.certificate().clone()]),
                ..server_config(version)
            };
            let server = serve(engine, &config, ServerLimits::default()).await;
            let client_config = ClientConfig {
                client_auth: Some(pki().client.certified_key()),
                ..client_config(version)
            };
            let label = format!("{} {version:?}", engine.name());
            let c = client(engine, &client_config, &server.url(), mode_options(Mode::Oscore));
            let (first, resumed) = first_and_resumed(&c).await;
            for (round, session) in [("first", &first), ("resumed", &resumed)] {
                assert_eq!(
                    session["peer"]["kind"], "certificate",
                    "{label} {round}: {session}"
                );
                assert_eq!(session["peer"]["der_hex"], leaf.as_str(), "{label} {round}");
            }
            assert_eq!(
                (first["resumed"].clone(), resumed["resumed"].clone()),
                (false.into(), true.into()),
                "{label}"
            );
        }
    }
}
