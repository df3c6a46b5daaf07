//! `atls gateway` between CoAP devices and `atls serve`, as processes on
//! loopback: the project's client over every device transport (DTLS as the
//! ATLS layer included), aiocoap with a pyOpenSSL handshake and its own
//! OSCORE, and the gateway's log, which shows what a middlebox may see and
//! nothing more.

mod support;

use support::*;

const HOP_PSK: &str = "device-hop:00112233445566778899aabbccddeeff";
const SECRET: &str = "inner plaintext the gateway must never see";

#[test]
fn devices_reach_atls_serve_through_the_gateway_on_every_transport() {
    let server = serve(&[]);
    let upstream = format!("http://{}", server.http);
    let metrics = format!("127.0.0.1:{}", free_port());
    let gateway = gateway(&[
        "--coap",
        "127.0.0.1:0",
        "--coap-tcp",
        "127.0.0.1:0",
        "--coaps",
        "127.0.0.1:0",
        "--coaps-psk",
        HOP_PSK,
        "--upstream",
        &upstream,
        "--metrics",
        &metrics,
    ]);
    let ca = server.ca.to_str().expect("path");
    let coap = gateway.coap.clone().expect("coap listener");
    let coap_tcp = gateway.coap_tcp.clone().expect("coap+tcp listener");
    let coaps = gateway.coaps.clone().expect("coaps listener");
    for (base, version) in [
        (&coap, "1.3"),
        (&coap, "1.2"),
        (&coap, "dtls1.2"),
        (&coap_tcp, "1.3"),
        (&coaps, "1.3"),
        (&coaps, "dtls1.2"),
    ] {
        let label = format!("{base} {version}");
        let mut args = vec![
            format!("{base}/echo"),
            "--ca".into(),
            ca.into(),
            "--server-name".into(),
            "localhost".into(),
            "--tls-version".into(),
            version.into(),
            "-d".into(),
            SECRET.into(),
        ];
        if base.starts_with("coaps://") {
            args.extend(["--transport-psk".into(), HOP_PSK.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = request(&args);
        assert!(out.status.success(), "{label}: {}", stderr(&out));
        assert_eq!(stdout(&out), SECRET, "{label}");
    }
    // The certificate hop of coaps:// uses the gateway's own development
    // certificate; trusting the ATLS CA for it is not enough (layers are
    // configured apart), and the hop's failure is a transport error (2).
    let wrong_hop = request(&[
        &format!("{coaps}/hello"),
        "--ca",
        ca,
        "--server-name",
        "localhost",
        "--transport-ca",
        ca,
    ]);
    assert_eq!(wrong_hop.status.code(), Some(2), "{}", stderr(&wrong_hop));
    let gateway_ca = gateway.state.path().join("gateway/ca.pem");
    let right_hop = request(&[
        &format!("{coaps}/hello"),
        "--ca",
        ca,
        "--server-name",
        "localhost",
        "--transport-ca",
        gateway_ca.to_str().expect("path"),
    ]);
    assert!(right_hop.status.success(), "{}", stderr(&right_hop));
    assert_eq!(stdout(&right_hop), "hello");

    // What the gateway logged: per exchange the content type, sizes,
    // record types and SNI — and never the inner plaintext.
    let log = gateway.log();
    assert!(log.contains("content_type=\"application/atls\""), "{log}");
    assert!(log.contains("content_type=\"application/oscore\""), "{log}");
    assert!(log.contains("sni=\"localhost\""), "{log}");
    assert!(log.contains("request_records=handshake:1"), "{log}");
    assert!(log.contains("transport=\"coaps\""), "{log}");
    assert!(log.contains("transport=\"coap+tcp\""), "{log}");
    assert!(!log.contains(SECRET), "the gateway saw the plaintext: {log}");

    // Its metrics: what it forwarded, by kind and CoAP code.
    let mut scrape = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(&metrics) {
        use std::io::{Read as _, Write as _};
        let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = s.read_to_string(&mut scrape);
    }
    assert!(
        scrape.contains("atls_gateway_forwarded_total{kind=\"flight\""),
        "{scrape}"
    );
    assert!(
        scrape.contains("atls_gateway_forwarded_total{kind=\"oscore\""),
        "{scrape}"
    );
}

#[test]
fn the_gateway_routes_by_sni_and_refuses_unknown_names() {
    let a = serve(&[]);
    let b = serve(&["--tls-version", "1.2"]);
    let gateway = gateway(&[
        "--coap",
        "127.0.0.1:0",
        "--route",
        &format!("localhost=http://{}", a.http),
        "--route",
        &format!("atls.test=http://{}", b.http),
    ]);
    let coap = gateway.coap.clone().expect("coap listener");
    // Both development CAs differ: each device trusts its own service's.
    let to_a = request(&[
        &format!("{coap}/session"),
        "--ca",
        a.ca.to_str().expect("path"),
        "--server-name",
        "localhost",
    ]);
    assert!(to_a.status.success(), "{}", stderr(&to_a));
    assert!(stdout(&to_a).contains("TLSv1.3"), "{}", stdout(&to_a));
    let to_b = request(&[
        &format!("{coap}/session"),
        "--ca",
        b.ca.to_str().expect("path"),
        "--server-name",
        "atls.test",
    ]);
    assert!(to_b.status.success(), "{}", stderr(&to_b));
    assert!(stdout(&to_b).contains("TLSv1.2"), "{}", stdout(&to_b));
    let nobody = request(&[
        &format!("{coap}/hello"),
        "--ca",
        a.ca.to_str().expect("path"),
        "--server-name",
        "nobody.test",
    ]);
    assert!(!nobody.status.success());
    assert!(stderr(&nobody).contains("4.04"), "{}", stderr(&nobody));
    // A bad --route is a usage error with a message.
    let bad = std::process::Command::new(ATLS)
        .args(["gateway", "--coap", "127.0.0.1:0", "--route", "no-equals-sign"])
        .output()
        .expect("atls gateway");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("NAME=URL"), "{}", stderr(&bad));
}

/// aiocoap as the device: a pyOpenSSL memory-BIO handshake carried in
/// aiocoap's blockwise POSTs, then aiocoap's own OSCORE (blockwise inside
/// OSCORE both ways), all through the gateway to `atls serve` over HTTP.
#[test]
fn aiocoap_with_pyopenssl_reaches_atls_serve_through_the_gateway() {
    require_python_interop();
    for engine in ["openssl", "rustls"] {
        let server = serve(&["--engine", engine]);
        let gateway = gateway(&[
            "--coap",
            "127.0.0.1:0",
            "--upstream",
            &format!("http://{}", server.http),
        ]);
        let coap = gateway.coap.clone().expect("coap listener");
        let port = coap.rsplit(':').next().expect("port");
        for version in ["1.3", "1.2"] {
            let label = format!("{engine} TLS {version}");
            let out = std::process::Command::new("python3")
                .arg(workspace().join("interop/aiocoap_atls_client.py"))
                .args([
                    "127.0.0.1",
                    port,
                    server.ca.to_str().expect("path"),
                    "localhost",
                    version,
                ])
                .output()
                .expect("python3");
            let text = stdout(&out);
            assert!(out.status.success(), "{label}: {text}\n{}", stderr(&out));
            assert!(text.contains("hello hello"), "{label}: {text}");
            assert!(text.contains("echo ok"), "{label}: {text}");
            assert!(
                text.contains("big ok"),
                "{label}: blockwise inside OSCORE: {text}"
            );
        }
        let log = gateway.log();
        assert!(log.contains("kind=\"oscore\""), "{log}");
    }
}

/// Layered TLS (draft §5.2, layered TLS §6): the transport layer of each
/// hop has its own trust anchors, identities, versions and client-auth
/// policy, apart from ATLS — on `serve`, `request` and `gateway` alike.
#[test]
fn transport_and_atls_layers_are_configured_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let transport_ca = atls_pki::DevCa::new("transport CA").expect("CA");
    let server_cert = transport_ca
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("cert");
    let client_cert = transport_ca.issue_client("gateway-1").expect("client cert");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("path").to_owned()
    };
    let tca = write("tca.pem", transport_ca.certificate_pem());
    let (tcert, tkey) = (
        write("t.pem", &server_cert.cert_pem),
        write("t.key", server_cert.dangerous_key_pem()),
    );
    let (ccert, ckey) = (
        write("c.pem", &client_cert.cert_pem),
        write("c.key", client_cert.dangerous_key_pem()),
    );
    // Transport: TLS 1.2 only, client certificates required. ATLS: TLS 1.3.
    let server = serve(&[
        "--https",
        "127.0.0.1:0",
        "--tls-cert",
        &tcert,
        "--tls-key",
        &tkey,
        "--transport-client-ca",
        &tca,
        "--transport-tls-version",
        "1.2",
        "--tls-version",
        "1.3",
    ]);
    let https = server.https.clone().expect("HTTPS listener");
    let atls_ca = server.ca.to_str().expect("path");
    let base = [
        "--ca",
        atls_ca,
        "--server-name",
        "localhost",
        "--transport-ca",
        &tca,
    ];
    let with = |extra: &[&str]| {
        let url = format!("{https}/session");
        let mut args = vec![url.as_str()];
        args.extend_from_slice(&base);
        args.extend_from_slice(extra);
        request(&args)
    };
    let ok = with(&[
        "--transport-cert",
        &ccert,
        "--transport-key",
        &ckey,
        "--transport-tls-version",
        "1.2",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("\"tls_version\":\"TLSv1.3\""),
        "ATLS runs TLS 1.3 inside a TLS 1.2 transport: {}",
        stdout(&ok)
    );
    // Without the transport client certificate: the transport refuses (2).
    let no_cert = with(&[]);
    assert_eq!(no_cert.status.code(), Some(2), "{}", stderr(&no_cert));
    // A transport version the listener does not serve: the transport (2).
    let wrong_version = with(&[
        "--transport-cert",
        &ccert,
        "--transport-key",
        &ckey,
        "--transport-tls-version",
        "1.3",
    ]);
    assert_eq!(wrong_version.status.code(), Some(2), "{}", stderr(&wrong_version));
    // The transport client certificate is no ATLS identity, nor the
    // transport CA an ATLS trust anchor: ATLS fails (3).
    let url = format!("{https}/hello");
    let crossed = request(&[
        &url,
        "--ca",
        &tca,
        "--transport-ca",
        &tca,
        "--transport-cert",
        &ccert,
        "--transport-key",
        &ckey,
    ]);
    assert_eq!(crossed.status.code(), Some(3), "{}", stderr(&crossed));

    // The gateway's upstream transport: its own client certificate, CA and
    // version towards the service; devices know none of it.
    let upstream = https.replace("127.0.0.1", "localhost");
    let gateway_ok = gateway(&[
        "--coap",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--upstream-ca",
        &tca,
        "--upstream-cert",
        &ccert,
        "--upstream-key",
        &ckey,
        "--upstream-tls-version",
        "1.2",
    ]);
    let coap = gateway_ok.coap.clone().expect("coap");
    let through = request(&[
        &format!("{coap}/hello"),
        "--ca",
        atls_ca,
        "--server-name",
        "localhost",
    ]);
    assert!(through.status.success(), "{}", stderr(&through));
    assert_eq!(stdout(&through), "hello");
    let gateway_without_cert = gateway(&[
        "--coap",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--upstream-ca",
        &tca,
    ]);
    let coap = gateway_without_cert.coap.clone().expect("coap");
    let refused = request(&[
        &format!("{coap}/hello"),
        "--ca",
        atls_ca,
        "--server-name",
        "localhost",
    ]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("5.02"), "{}", stderr(&refused));
}
