//! `atls demo` with no arguments: every in-memory scenario and the loopback
//! HTTP and CoAP scenarios succeed, and the output shows the wire beside the
//! app.

use std::process::Command;

#[test]
fn demo_runs_every_scenario_on_embedded_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_atls"))
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .expect("atls");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text.lines().last().expect("summary line");
    let ran: usize = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert_eq!(summary, format!("{ran} scenarios, {ran} succeeded, 0 failed"));
    for needle in [
        "keys AGREE",
        "wire: POST /.well-known/atls",
        "application/oscore",
        "application/cose; cose-type=\"cose-encrypt0\"",
        "app:  POST /echo \"temperature=21.5\" → 200 \"temperature=21.5\"",
        "session seen by the app: mode records, engine rustls",
        "ATLS over CoAP on loopback",
        "== rustls client → openssl server, TLSv1.2, CoAP over UDP",
        "wire: POST (OSCORE, path hidden)",
        "== openssl, TLSv1.3 in Oscore mode, CoAP over TCP",
        "== rustls, TLSv1.3 in Oscore mode, CoAP over DTLS (coaps, PSK hop)",
        "hop:  DTLSv1.2",
        "== openssl, DTLSv1.2 in Oscore mode, CoAP over UDP",
        "(DTLS flights in non-confirmable messages, resent by the DTLS timer only)",
        "== openssl, DTLSv1.2 in Records mode, CoAP over DTLS (coaps, PSK hop)",
        "wire: POST /.well-known/atls (records, path hidden)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
