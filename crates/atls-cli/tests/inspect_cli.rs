//! `atls inspect`: what a middlebox can read from real TLS and DTLS
//! flights, as text and as JSON; record types and versions it does not
//! know are shown, not refused (draft §5.1.4).

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use atls_core::{
    ClientConfig, ClientSessionParams, CommonConfig, ConnectionId, Engine as _, Psk, Session, TlsVersion,
};
use atls_openssl::OpenSslEngine;
use serde_json::Value;

const ATLS: &str = env!("CARGO_BIN_EXE_atls");

fn inspect(args: &[&str], input: &[u8]) -> (bool, String) {
    let mut child = Command::new(ATLS)
        .arg("inspect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("atls inspect");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn first_flight(version: TlsVersion) -> Vec<u8> {
    let endpoint = OpenSslEngine
        .client(&ClientConfig {
            common: CommonConfig {
                versions: vec![version],
                ..CommonConfig::default()
            },
            psk: Some(Psk::new("inspect", vec![1u8; 32]).expect("psk")),
            ..ClientConfig::default()
        })
        .expect("client");
    let params = ClientSessionParams {
        server_name: Some("service.example".into()),
        oscore_cid: Some(ConnectionId::new(vec![0xC1, 0xD0]).expect("cid")),
        cose_cid: None,
    };
    let mut session = Session::client(endpoint.as_ref(), &params).expect("session");
    session
        .take_flight(Instant::now())
        .expect("flight")
        .expect("hello")
}

#[test]
fn inspect_shows_a_client_hello_as_json_tls_and_dtls() {
    for (version, framing, record_version) in [
        (TlsVersion::Tls13, "tls", 0x0301),
        (TlsVersion::Dtls12, "dtls", 0xFEFF),
    ] {
        let hello = first_flight(version);
        let (ok, out) = inspect(&["--json"], &hello);
        assert!(ok, "{out}");
        let json: Value = serde_json::from_str(&out).expect("one JSON object");
        assert_eq!(json["framing"], framing);
        assert_eq!(json["bytes"], hello.len());
        assert_eq!(json["records"][0]["content_type"], "handshake");
        let record_version_code = json["records"][0]["version"]["code"].as_u64().expect("code");
        assert!(
            record_version_code == record_version
                || record_version_code == 0xFEFD
                || record_version_code == 0x0303,
            "{framing}: record version {record_version_code:#x}"
        );
        let ch = &json["handshake"][0];
        assert_eq!(ch["type"], "client_hello", "{framing}: {out}");
        assert_eq!(ch["server_name"], "service.example");
        assert_eq!(ch["oscore_connection_id"], "c1d0");
        assert!(ch["cipher_suites"].as_array().is_some_and(|s| !s.is_empty()));
        assert_eq!(json["error"], Value::Null);
        // The same as hex text, in the human-readable form.
        let (ok, text) = inspect(&["--hex"], hex::encode(&hello).as_bytes());
        assert!(ok);
        assert!(text.contains("ClientHello, SNI service.example"), "{text}");
    }
}

#[test]
fn unknown_record_types_and_versions_are_shown_not_refused() {
    let hello = first_flight(TlsVersion::Tls13);
    // A record of content type 30 and version 0x0305 (neither assigned),
    // then a real ClientHello.
    let mut payload = vec![30, 0x03, 0x05, 0x00, 0x02, 0xAA, 0xBB];
    payload.extend_from_slice(&hello);
    let (ok, out) = inspect(&["--json"], &payload);
    assert!(ok, "{out}");
    let json: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["framing"], "tls");
    assert_eq!(json["records"][0]["content_type"], Value::Null);
    assert_eq!(json["records"][0]["content_type_code"], 30);
    assert_eq!(json["records"][0]["version"]["code"], 0x0305);
    assert_eq!(json["records"][0]["version"]["name"], "unknown");
    assert_eq!(json["records"][1]["content_type"], "handshake");
    assert_eq!(json["handshake"][0]["type"], "client_hello");
    let (ok, text) = inspect(&[], &payload);
    assert!(ok);
    assert!(text.contains("unknown(30) unknown(0x0305) len=2"), "{text}");
    // A cut record is reported, with everything before it, and the exit
    // status says the payload is not clean.
    let (ok, out) = inspect(&["--json"], &payload[..payload.len() - 3]);
    assert!(!ok, "a truncated payload fails: {out}");
    let json: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["records"].as_array().map(Vec::len), Some(1));
    assert!(
        json["error"].as_str().is_some_and(|e| e.contains("truncated")),
        "{out}"
    );
}

/// The text form reads like the demo's lines (no debug formatting); input
/// that is not ATLS fails; flights captured by `atls request
/// --dump-flights` inspect as they crossed the wire.
#[test]
fn readable_output_non_atls_input_and_captured_flights() {
    let hello = first_flight(TlsVersion::Tls13);
    let (ok, text) = inspect(&[], &hello);
    assert!(ok, "{text}");
    assert!(text.contains("TLS records"), "{text}");
    assert!(
        !text.contains("Some(") && !text.contains("None"),
        "no debug formatting: {text}"
    );
    let (ok, text) = inspect(&[], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!ok, "plain HTTP is not an ATLS payload: {text}");

    let server = support::serve(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let out = support::request(&[
        &format!("http://{}/hello", server.http),
        "--ca",
        server.ca.to_str().expect("path"),
        "--server-name",
        "localhost",
        "--dump-flights",
        dir.path().to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let first = std::fs::read(dir.path().join("01-handshake-request.bin")).expect("the first flight");
    let (ok, text) = inspect(&[], &first);
    assert!(ok, "{text}");
    assert!(text.contains("ClientHello, SNI localhost"), "{text}");
    let answer = std::fs::read(dir.path().join("01-handshake-response.bin")).expect("the answer");
    let (ok, text) = inspect(&[], &answer);
    assert!(ok, "{text}");
    assert!(text.contains("ServerHello"), "{text}");
    assert!(dir.path().join("03-oscore-request.bin").exists());
}
