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
    assert_eq!(
        text.matches("OK: plaintext only at the two endpoints").count(),
        3,
        "{text}"
    );
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
        "== Figure 9: device → gateway (CoAP/DTLS to HTTPS) → TLS terminator → service",
        "gateway (holds the device's DTLS keys: reads CoAP) could read:",
        "CoAP POST (OSCORE) 2.04 (SNI localhost)",
        "== Figure 10 / §3.2: client → TLS-intercepting middlebox → TLS terminator → service",
        "1. transport TLS to the middlebox, public roots only: refused",
        "GET /trust-anchors → 1 certificate(s)",
        "3. transport TLS validated with them",
        "== Appendix B: ATLS through an HTTP forward proxy, beside a CONNECT tunnel",
        "CONNECT localhost:",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

/// The plaintext of the deployment demos (`demo_deploy::MESSAGE`).
const DEPLOY_MESSAGE: &[u8] = b"temperature=21.5;valve=open";

/// The deployments again through real third-party middleboxes — nginx as
/// the TLS terminator, mitmproxy intercepting transport TLS with its own
/// CA, tinyproxy as the forward proxy — and what mitmproxy recorded of
/// every flow it intercepted, read here on its own: only application/atls
/// and application/oscore bodies, never the inner plaintext nor the trust
/// anchors that travelled inside ATLS.
#[test]
fn deployments_through_nginx_mitmproxy_and_tinyproxy() {
    for program in ["mitmdump", "tinyproxy"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
            .unwrap_or(false);
        assert!(found, "{program} is required: run scripts/setup.sh");
    }
    let keep = tempfile::tempdir().expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_atls"))
        .args(["demo", "--third-party", "--keep"])
        .arg(keep.path())
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("atls");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TLS terminator (nginx) could read:"), "{text}");
    assert!(
        text.contains("TLS-intercepting middlebox (mitmproxy) could read:"),
        "{text}"
    );
    assert!(text.contains("forward proxy (tinyproxy"), "{text}");
    assert_eq!(
        text.matches("OK: plaintext only at the two endpoints").count(),
        3,
        "{text}"
    );

    let figure10 = keep.path().join("1-figure10");
    let flows = std::fs::read_to_string(figure10.join("mitmproxy-flows.jsonl")).expect("mitmproxy's record");
    let mut types = std::collections::BTreeSet::new();
    let mut count = 0;
    for line in flows.lines() {
        let flow: serde_json::Value = serde_json::from_str(line).expect("a JSON flow");
        count += 1;
        for (kind, body) in [("request", "request_body"), ("response", "response_body")] {
            let media = flow[format!("{kind}_type")].as_str().expect("type").to_owned();
            types.insert(media);
            let bytes = hex::decode(flow[body].as_str().expect("body")).expect("hex");
            assert!(
                !bytes.windows(DEPLOY_MESSAGE.len()).any(|w| w == DEPLOY_MESSAGE),
                "mitmproxy read the plaintext: {line}"
            );
            assert!(
                !bytes.windows(17).any(|w| w == b"BEGIN CERTIFICATE"),
                "mitmproxy read the trust anchors: {line}"
            );
        }
    }
    assert!(
        count >= 6,
        "mitmproxy intercepted the handshakes and requests: {flows}"
    );
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["application/atls", "application/oscore"],
        "{flows}"
    );
    // The service handed out mitmproxy's own CA, and the client then
    // validated mitmproxy with it.
    let mitm_ca =
        std::fs::read_to_string(figure10.join("mitmproxy/mitmproxy-ca-cert.pem")).expect("mitmproxy CA");
    let served = std::fs::read_to_string(figure10.join("local-domain-ca.pem")).expect("served anchors");
    assert_eq!(mitm_ca, served);
    assert!(text.contains("3. transport TLS validated with them"), "{text}");
}
