//! `atls serve` and `atls request` as processes, against each other, an
//! independent pyOpenSSL client, nginx terminating transport TLS, tinyproxy
//! as a forward proxy, and an upstream application.

mod support;

use std::process::Command;

use support::*;

/// nginx terminating transport TLS in front of `upstream`, with a
/// certificate from its own CA (a second trust domain). Returns nginx, its
/// port and the path of its CA.
fn middlebox_nginx(dir: &std::path::Path, upstream: &str) -> (Process, u16, std::path::PathBuf) {
    let transport_ca = atls_pki::DevCa::new("middlebox CA").expect("CA");
    let cert = transport_ca
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("cert");
    let (cert_path, key_path, ca_path) = (dir.join("t.pem"), dir.join("t.key"), dir.join("tca.pem"));
    std::fs::write(&cert_path, &cert.cert_pem).expect("write");
    std::fs::write(&key_path, cert.dangerous_key_pem()).expect("write");
    std::fs::write(&ca_path, transport_ca.certificate_pem()).expect("write");
    let port = free_port();
    (nginx(dir, port, upstream, &cert_path, &key_path), port, ca_path)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("JSON {e}: {text}"))
}

#[test]
fn request_in_every_mode_on_every_engine() {
    for server_engine in ["openssl", "rustls"] {
        let server = serve(&["--engine", server_engine]);
        let ca = server.ca.to_str().expect("path");
        for client_engine in ["openssl", "rustls"] {
            for mode in ["records", "oscore", "cose"] {
                for version in ["1.2", "1.3"] {
                    let label = format!("{client_engine} → {server_engine} {mode} TLS {version}");
                    let url = format!("http://{}/session", server.http);
                    let out = request(&[
                        &url,
                        "--ca",
                        ca,
                        "--engine",
                        client_engine,
                        "--mode",
                        mode,
                        "--tls-version",
                        version,
                        "--server-name",
                        "localhost",
                    ]);
                    assert!(out.status.success(), "{label}: {}", stderr(&out));
                    assert!(stderr(&out).starts_with("200 OK"), "{label}: {}", stderr(&out));
                    let session = json(&stdout(&out));
                    assert_eq!(session["mode"], mode, "{label}");
                    assert_eq!(session["engine"], server_engine, "{label}");
                    assert_eq!(session["tls_version"], format!("TLSv{version}"), "{label}");
                }
            }
        }
        let echo = request(&[
            &format!("http://{}/echo", server.http),
            "--ca",
            ca,
            "-d",
            "ping",
            "--http2",
        ]);
        assert!(echo.status.success(), "{}", stderr(&echo));
        assert_eq!(stdout(&echo), "ping");
    }
}

#[test]
fn failures_name_their_layer_in_message_and_exit_code() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");

    let missing = request(&[&format!("http://{}/missing", server.http), "--ca", ca, "--fail"]);
    assert_eq!(missing.status.code(), Some(5), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("application"), "{}", stderr(&missing));

    let other = tempfile::tempdir().expect("dir");
    let other_ca = other_ca(other.path());
    let wrong_ca = request(&[
        &format!("http://{}/hello", server.http),
        "--ca",
        other_ca.to_str().expect("path"),
    ]);
    assert_eq!(wrong_ca.status.code(), Some(3), "{}", stderr(&wrong_ca));
    assert!(
        stderr(&wrong_ca).contains("ATLS handshake"),
        "{}",
        stderr(&wrong_ca)
    );

    let port = free_port();
    let unreachable = request(&[&format!("http://127.0.0.1:{port}/hello"), "--ca", ca]);
    assert_eq!(unreachable.status.code(), Some(2), "{}", stderr(&unreachable));
    assert!(
        stderr(&unreachable).contains("transport"),
        "{}",
        stderr(&unreachable)
    );

    let verbose = request(&[&format!("http://{}/hello", server.http), "--ca", ca, "-v"]);
    assert!(verbose.status.success());
    let steps = stderr(&verbose);
    assert!(steps.contains("handshake") && steps.contains(" ms"), "{steps}");
}

#[test]
fn pyopenssl_memory_bio_client_interoperates() {
    require_python_interop();
    for engine in ["openssl", "rustls"] {
        let server = serve(&["--engine", engine]);
        for version in ["1.2", "1.3"] {
            let out = Command::new("python3")
                .arg(workspace().join("interop/pyopenssl_client.py"))
                .arg(format!("http://{}", server.http))
                .arg(&server.ca)
                .args(["localhost", version])
                .output()
                .expect("python3");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{engine} {version}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = |prefix: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
                    .to_owned()
            };
            let records = json(&line("records "));
            assert_eq!(records["mode"], "records");
            assert_eq!(records["engine"], engine);
            assert_eq!(records["tls_version"], format!("TLSv{version}"));
            // The OSCORE request verifies only if pyOpenSSL's atls-oscore
            // export equals the server's: the same context on both ends.
            let oscore = json(&line("oscore "));
            assert_eq!(oscore["mode"], "oscore");
            assert_eq!(
                oscore["cids_negotiated"], false,
                "pyOpenSSL offers no CIDs: fallback IDs"
            );
            assert_eq!(oscore["cipher_suite"], records["cipher_suite"]);
        }
    }
}

#[test]
fn through_nginx_terminating_transport_tls() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");
    let dir = tempfile::tempdir().expect("dir");
    let (_nginx, port, tca_path) = middlebox_nginx(dir.path(), &server.http);
    let url = format!("https://127.0.0.1:{port}/echo");

    for mode in ["records", "oscore", "cose"] {
        for extra in [
            &["--insecure-transport"][..],
            &["--transport-ca", tca_path.to_str().expect("path")][..],
            &["--insecure-transport", "--http2"][..],
        ] {
            let mut args = vec![
                url.as_str(),
                "--ca",
                ca,
                "--server-name",
                "localhost",
                "--mode",
                mode,
                "-d",
                "through nginx",
            ];
            args.extend_from_slice(extra);
            let out = request(&args);
            assert!(out.status.success(), "{mode} {extra:?}: {}", stderr(&out));
            assert_eq!(stdout(&out), "through nginx");
        }
    }
    // Transport verification is separate from ATLS: without trusting the
    // middlebox the transport layer fails ...
    let out = request(&[&url, "--ca", ca, "--server-name", "localhost", "-d", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("transport"), "{}", stderr(&out));
    // ... and trusting the middlebox never lets it impersonate the ATLS server.
    let out = request(&[
        &url,
        "--ca",
        tca_path.to_str().expect("path"),
        "--insecure-transport",
        "--server-name",
        "localhost",
        "-d",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

/// A load balancer (nginx) in front of `atls serve` sets an affinity cookie
/// of its own and refuses a request that carries the session cookie without
/// it; the server names its session cookie differently. The client keeps
/// both, as HTTP clients do.
#[test]
fn cookies_of_a_load_balancer_and_another_session_cookie_name() {
    let server = serve(&["--cookie-name", "atls_sid"]);
    let ca = server.ca.to_str().expect("path");
    let dir = tempfile::tempdir().expect("dir");
    let transport_ca = atls_pki::DevCa::new("load balancer CA").expect("CA");
    let cert = transport_ca
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("cert");
    let (cert_path, key_path) = (dir.path().join("t.pem"), dir.path().join("t.key"));
    std::fs::write(&cert_path, &cert.cert_pem).expect("write");
    std::fs::write(&key_path, cert.dangerous_key_pem()).expect("write");
    let port = free_port();
    let affinity = r#"
            set $cookies "${cookie_atls_sid}:${cookie_lb}";
            if ($cookies ~ "^.+:$") { return 409 "session cookie without the affinity cookie\n"; }
            add_header Set-Cookie "lb=node-1; Path=/" always;"#;
    let _nginx = nginx_with(dir.path(), port, &server.http, &cert_path, &key_path, affinity);
    for engine in ["openssl", "rustls"] {
        for mode in ["records", "oscore", "cose"] {
            let out = request(&[
                &format!("https://127.0.0.1:{port}/echo"),
                "--ca",
                ca,
                "--server-name",
                "localhost",
                "--insecure-transport",
                "--engine",
                engine,
                "--mode",
                mode,
                "-d",
                "affinity",
            ]);
            assert!(out.status.success(), "{engine} {mode}: {}", stderr(&out));
            assert_eq!(stdout(&out), "affinity", "{engine} {mode}");
        }
    }
    let log = std::fs::read_to_string(dir.path().join("logs/cookies.log")).expect("cookie log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 12, "{log}");
    let (first, later): (Vec<&str>, Vec<&str>) = lines.iter().partition(|l| l.ends_with("\"-\""));
    assert_eq!(first.len(), 6, "one cookie-less first flight per request: {log}");
    assert!(
        later
            .iter()
            .all(|l| l.contains("lb=node-1") && l.contains("atls_sid=")),
        "every later request carries both cookies: {log}"
    );
}

#[test]
fn through_tinyproxy_as_forward_proxy() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let (_proxy, log) = tinyproxy(dir.path(), port);
    let proxy = format!("http://127.0.0.1:{port}");
    for mode in ["records", "oscore", "cose"] {
        let out = request(&[
            &format!("http://{}/echo", server.http),
            "--ca",
            ca,
            "--proxy",
            &proxy,
            "--mode",
            mode,
            "-d",
            mode,
        ]);
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        assert_eq!(stdout(&out), mode);
    }
    // The proxy carried the ATLS exchanges.
    let seen = std::fs::read_to_string(&log).expect("tinyproxy log");
    assert!(seen.contains("/.well-known/atls"), "{seen}");

    // HTTP_PROXY from the environment is honoured too.
    let out = Command::new(ATLS)
        .args(["request", &format!("http://{}/hello", server.http), "--ca", ca])
        .env("HTTP_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("atls request");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello");
    let requests = std::fs::read_to_string(&log)
        .expect("log")
        .matches("/.well-known/atls")
        .count();
    assert!(requests >= 4, "{requests}");
}

#[test]
fn upstream_application_behind_atls_serve() {
    // A plain Python HTTP application that reports what it received.
    let port = free_port();
    let app = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        out = json.dumps({"path": self.path, "method": "POST", "body": body.decode(),
            "mode": self.headers.get("atls-mode"), "spoofed": self.headers.get("atls-evil")}).encode()
        self.send_response(201); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let _app = Process(
        Command::new("python3")
            .args(["-c", app, &port.to_string()])
            .spawn()
            .expect("python upstream"),
    );
    wait_for_port(port, "upstream app");
    let server = serve(&["--upstream", &format!("http://127.0.0.1:{port}")]);
    let ca = server.ca.to_str().expect("path");
    for mode in ["records", "oscore", "cose"] {
        let out = request(&[
            &format!("http://{}/api/items?x=1", server.http),
            "--ca",
            ca,
            "--mode",
            mode,
            "-d",
            "item",
            "-H",
            "ATLS-Evil: 1",
        ]);
        // 201 is a success: exit 0.
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        // (OSCORE says first that it cannot carry the extra header field.)
        assert!(
            stderr(&out).lines().any(|l| l.starts_with("201")),
            "{mode}: {}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).contains("not sent: atls-evil"),
            mode == "oscore",
            "{mode}: {}",
            stderr(&out)
        );
        let seen = json(&stdout(&out));
        assert_eq!(seen["path"], "/api/items?x=1", "{mode}");
        assert_eq!(seen["body"], "item", "{mode}");
        assert_eq!(
            seen["mode"], mode,
            "{mode}: the upstream learns the protection mode"
        );
        assert!(
            seen["spoofed"].is_null(),
            "{mode}: ATLS-* headers from the client are dropped"
        );
    }
}

#[test]
fn https_listener_with_http2_and_client_certificates() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = atls_pki::DevCa::new("client and transport CA").expect("CA");
    let transport = pki
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("transport cert");
    let device = pki.issue_client("device-7").expect("client cert");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("path").to_owned()
    };
    let (tcert, tkey) = (
        write("t.pem", &transport.cert_pem),
        write("t.key", transport.dangerous_key_pem()),
    );
    let (ccert, ckey) = (
        write("c.pem", &device.cert_pem),
        write("c.key", device.dangerous_key_pem()),
    );
    let ca = write("ca.pem", pki.certificate_pem());
    for engine in ["openssl", "rustls"] {
        let server = serve(&[
            "--engine",
            engine,
            "--https",
            "127.0.0.1:0",
            "--tls-cert",
            &tcert,
            "--tls-key",
            &tkey,
            "--client-ca",
            &ca,
        ]);
        let https = server.https.clone().expect("HTTPS listener");
        let atls_ca = server.ca.to_str().expect("path");
        for mode in ["records", "oscore", "cose"] {
            let out = request(&[
                &format!("{https}/session"),
                "--ca",
                atls_ca,
                "--server-name",
                "localhost",
                "--transport-ca",
                &ca,
                "--cert",
                &ccert,
                "--key",
                &ckey,
                "--mode",
                mode,
                "--engine",
                engine,
            ]);
            assert!(out.status.success(), "{engine} {mode}: {}", stderr(&out));
            let session = json(&stdout(&out));
            assert_eq!(session["peer"]["kind"], "certificate", "{engine} {mode}");
            assert_eq!(session["peer"]["chain_len"], 1, "{engine} {mode}");
        }
        // Without a client certificate the ATLS handshake is refused.
        let out = request(&[
            &format!("{https}/hello"),
            "--ca",
            atls_ca,
            "--transport-ca",
            &ca,
            "--engine",
            engine,
        ]);
        assert_eq!(out.status.code(), Some(3), "{engine}: {}", stderr(&out));
    }
}

#[test]
fn external_psk_instead_of_certificates() {
    let psk = "device-9:000102030405060708090a0b0c0d0e0f";
    let server = serve(&["--psk", psk, "--tls-version", "1.3"]);
    for mode in ["records", "oscore", "cose"] {
        let out = request(&[
            &format!("http://{}/session", server.http),
            "--psk",
            psk,
            "--mode",
            mode,
        ]);
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let session = json(&stdout(&out));
        assert_eq!(session["peer"]["kind"], "psk", "{mode}");
        assert_eq!(session["peer"]["identity"], "device-9", "{mode}");
    }
    let wrong = request(&[
        &format!("http://{}/hello", server.http),
        "--psk",
        "device-9:ffffffffffffffffffffffffffffffff",
    ]);
    assert_eq!(wrong.status.code(), Some(3), "{}", stderr(&wrong));
}

/// The corporate path: HTTPS_PROXY → tinyproxy (CONNECT) → nginx terminating
/// transport TLS → `atls serve`. Two middleboxes, ATLS end to end.
#[test]
fn https_proxy_connect_then_tls_terminating_nginx() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");
    let dir = tempfile::tempdir().expect("dir");
    let (_nginx, nginx_port, _) = middlebox_nginx(dir.path(), &server.http);
    let proxy_port = free_port();
    let (_proxy, log) = tinyproxy(dir.path(), proxy_port);
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    for mode in ["records", "oscore", "cose"] {
        let out = Command::new(ATLS)
            .args([
                "request",
                &format!("https://127.0.0.1:{nginx_port}/echo"),
                "--ca",
                ca,
                "--server-name",
                "localhost",
                "--insecure-transport",
                "--mode",
                mode,
                "-d",
                "via CONNECT",
            ])
            .env("HTTPS_PROXY", &proxy)
            .env("https_proxy", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .expect("atls request");
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        assert_eq!(stdout(&out), "via CONNECT");
    }
    let seen = std::fs::read_to_string(&log).expect("tinyproxy log");
    assert!(
        seen.contains("CONNECT"),
        "the proxy tunnelled the TLS connection: {seen}"
    );
}

/// Keys in every PEM form OpenSSL writes — SEC1 ("EC PRIVATE KEY"), PKCS#1
/// ("RSA PRIVATE KEY") and PKCS#8 — made by the `openssl` command, serve
/// ATLS on both engines.
#[test]
fn sec1_pkcs1_and_pkcs8_keys_made_by_openssl_serve_on_both_engines() {
    let openssl = require("openssl");
    let dir = tempfile::tempdir().expect("dir");
    let run = |args: &[&str]| {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=key format CA",
        "-days",
        "2",
    ]);
    std::fs::write(dir.path().join("ext.cnf"), "subjectAltName=DNS:localhost\n").expect("ext");
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sec1.key",
    ]);
    run(&["genrsa", "-traditional", "-out", "pkcs1.key", "2048"]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "pkcs8.key",
    ]);
    for (key, marker) in [
        ("sec1", "BEGIN EC PRIVATE KEY"),
        ("pkcs1", "BEGIN RSA PRIVATE KEY"),
        ("pkcs8", "BEGIN PRIVATE KEY"),
    ] {
        let pem = std::fs::read_to_string(dir.path().join(format!("{key}.key"))).expect("key");
        assert!(pem.contains(marker), "{key}: {pem}");
        run(&[
            "req",
            "-new",
            "-key",
            &format!("{key}.key"),
            "-subj",
            "/CN=localhost",
            "-out",
            &format!("{key}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{key}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{key}.pem"),
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        for engine in ["openssl", "rustls"] {
            let cert = dir.path().join(format!("{key}.pem"));
            let keyfile = dir.path().join(format!("{key}.key"));
            let server = serve(&[
                "--engine",
                engine,
                "--cert",
                cert.to_str().expect("path"),
                "--key",
                keyfile.to_str().expect("path"),
            ]);
            let out = request(&[
                &format!("http://{}/hello", server.http),
                "--ca",
                dir.path().join("ca.pem").to_str().expect("path"),
                "--server-name",
                "localhost",
                "--engine",
                engine,
            ]);
            assert!(out.status.success(), "{key} on {engine}: {}", stderr(&out));
            assert_eq!(stdout(&out), "hello");
        }
    }
}

/// `atls serve --coap --coap-tcp` and `atls request coap://…`,
/// `coap+tcp://…`: the handshake over CoAP (blockwise on UDP), then OSCORE,
/// on both engines; failures keep their exit codes.
#[test]
fn coap_listener_and_coap_requests() {
    for engine in ["openssl", "rustls"] {
        let server = serve(&[
            "--engine",
            engine,
            "--coap",
            "127.0.0.1:0",
            "--coap-tcp",
            "127.0.0.1:0",
        ]);
        let coap = server.coap.clone().expect("the CoAP listener is reported");
        let coap_tcp = server
            .coap_tcp
            .clone()
            .expect("the CoAP over TCP listener is reported");
        let ca = server.ca.to_str().expect("path");
        for client_engine in ["openssl", "rustls"] {
            let hello = request(&[
                &format!("{coap}/hello"),
                "--ca",
                ca,
                "--server-name",
                "localhost",
                "--engine",
                client_engine,
                "-v",
            ]);
            assert!(
                hello.status.success(),
                "{engine}/{client_engine}: {}",
                stderr(&hello)
            );
            assert_eq!(stdout(&hello), "hello");
            assert!(stderr(&hello).contains("2.05"), "{}", stderr(&hello));
            assert!(
                stderr(&hello).contains("message(s)"),
                "-v shows the flights: {}",
                stderr(&hello)
            );
            let echo = request(&[
                &format!("{coap}/echo"),
                "--ca",
                ca,
                "--server-name",
                "localhost",
                "--engine",
                client_engine,
                "-d",
                "over coap",
            ]);
            assert!(echo.status.success(), "{}", stderr(&echo));
            assert_eq!(stdout(&echo), "over coap");
        }
        let over_tcp = request(&[
            &format!("{coap_tcp}/echo"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "-d",
            "over tcp",
        ]);
        assert!(over_tcp.status.success(), "{}", stderr(&over_tcp));
        assert_eq!(stdout(&over_tcp), "over tcp");
        let missing = request(&[
            &format!("{coap}/missing"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "-f",
        ]);
        assert_eq!(missing.status.code(), Some(5), "{}", stderr(&missing));
        let records = request(&[
            &format!("{coap}/echo"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "--mode",
            "records",
            "-d",
            "in records",
        ]);
        assert!(records.status.success(), "{}", stderr(&records));
        assert_eq!(stdout(&records), "in records");
        let cose = request(&[&format!("{coap}/hello"), "--ca", ca, "--mode", "cose"]);
        assert_eq!(cose.status.code(), Some(1), "{}", stderr(&cose));
    }
}

/// `atls serve --coaps` and `atls request coaps://…`: CoAP over DTLS as
/// the hop (PSK, or the server's certificate) with ATLS inside it, in both
/// modes; DTLS 1.2 as the ATLS layer over UDP; a wrong hop PSK is a
/// transport failure (exit 2).
#[test]
fn coaps_listener_and_dtls_as_the_atls_layer() {
    let psk = "hop:00112233445566778899aabbccddeeff";
    let server = serve(&[
        "--coap",
        "127.0.0.1:0",
        "--coaps",
        "127.0.0.1:0",
        "--coaps-psk",
        psk,
    ]);
    let coap = server.coap.clone().expect("the CoAP listener is reported");
    let coaps = server.coaps.clone().expect("the coaps listener is reported");
    let ca = server.ca.to_str().expect("path");
    for mode in ["oscore", "records"] {
        let with_psk = request(&[
            &format!("{coaps}/echo"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "--transport-psk",
            psk,
            "--mode",
            mode,
            "-d",
            "through the hop",
        ]);
        assert!(with_psk.status.success(), "{mode}: {}", stderr(&with_psk));
        assert_eq!(stdout(&with_psk), "through the hop");
        // The hop authenticated by the server certificate (the development
        // CA, as for ATLS).
        let with_cert = request(&[
            &format!("{coaps}/hello"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "--mode",
            mode,
        ]);
        assert!(with_cert.status.success(), "{mode}: {}", stderr(&with_cert));
        assert_eq!(stdout(&with_cert), "hello");
        let dtls_layer = request(&[
            &format!("{coap}/session"),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "--tls-version",
            "dtls1.2",
            "--mode",
            mode,
        ]);
        assert!(dtls_layer.status.success(), "{mode}: {}", stderr(&dtls_layer));
        assert!(
            stdout(&dtls_layer).contains("\"tls_version\":\"DTLSv1.2\""),
            "{}",
            stdout(&dtls_layer)
        );
        assert!(
            stdout(&dtls_layer).contains(&format!("\"mode\":\"{mode}\"")),
            "{}",
            stdout(&dtls_layer)
        );
    }
    let wrong = request(&[
        &format!("{coaps}/hello"),
        "--ca",
        ca,
        "--transport-psk",
        "hop:ffffffffffffffffffffffffffffffff",
        "--connect-timeout",
        "2",
    ]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    let rustls_dtls = request(&[
        &format!("{coap}/hello"),
        "--ca",
        ca,
        "--engine",
        "rustls",
        "--tls-version",
        "dtls1.2",
    ]);
    assert_eq!(rustls_dtls.status.code(), Some(1), "{}", stderr(&rustls_dtls));
    // The HTTP listener of the same server takes DTLS flights too.
    for mode in ["oscore", "cose", "records"] {
        let over_http = request(&[
            &format!("http://{}/session", server.http),
            "--ca",
            ca,
            "--server-name",
            "localhost",
            "--tls-version",
            "dtls1.2",
            "--mode",
            mode,
        ]);
        assert!(over_http.status.success(), "{mode}: {}", stderr(&over_http));
        assert!(
            stdout(&over_http).contains("DTLSv1.2"),
            "{mode}: {}",
            stdout(&over_http)
        );
    }
}
