//! Bytes on the wire per handshake, flights alone (whole records, no
//! transport framing), for the configurations docs/BENCHMARKS.md compares
//! with draft-ietf-iotops-security-protocol-comparison. Run with
//! `--nocapture` to print the table; the assertions hold what the table
//! shows (PSK handshakes carry no certificate, DTLS adds record and
//! handshake header bytes).

use atls_core::{Role, ServerSessionParams};
use atls_tests::*;

#[test]
fn handshake_bytes_per_configuration() {
    let mut rows = Vec::new();
    for config in wire_configs() {
        let (c, s) = endpoints(config.engine, &config.client, config.engine, &config.server);
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
        let flights: Vec<(Role, usize)> = h
            .transcript
            .flights
            .iter()
            .map(|f| (f.from, f.bytes.len()))
            .collect();
        let sent = |role: Role| {
            flights
                .iter()
                .filter(|(r, _)| *r == role)
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        let (client, server) = (sent(Role::Client), sent(Role::Server));
        let shape: Vec<String> = flights
            .iter()
            .map(|(r, n)| format!("{}{n}", if *r == Role::Client { "C" } else { "S" }))
            .collect();
        println!(
            "| {} | {client} B | {server} B | {} B | {} |",
            config.name,
            client + server,
            shape.join(" ")
        );
        rows.push((config.name, client + server));
    }
    let total = |prefix: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| *t)
            .expect("row")
    };
    let certificate = total("TLS 1.3, P-256 certificate, X25519 (openssl)");
    let psk_ecdhe = total("TLS 1.3 PSK-ECDHE");
    let psk12 = total("TLS 1.2 PSK");
    let dtls_psk = total("DTLS 1.2 PSK");
    assert!(
        psk_ecdhe < certificate / 2,
        "a PSK handshake carries no certificate chain"
    );
    assert!(psk12 < psk_ecdhe, "no key shares in plain PSK");
    assert!(
        dtls_psk > psk12,
        "DTLS headers and the cookie exchange cost bytes"
    );
}
