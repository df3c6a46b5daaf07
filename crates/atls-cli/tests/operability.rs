//! `atls request` with curl's habits, `atls serve` as operators run it
//! (health, graceful shutdown, upstream timeouts, listener names, a
//! private state directory), and the exit-code table.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// A real TLS 1.3 ClientHello, as the first flight of a session.
fn client_hello() -> Vec<u8> {
    use atls_core::{ClientConfig, ClientSessionParams, Engine as _, Session};
    let endpoint = atls_openssl::OpenSslEngine
        .client(&ClientConfig {
            psk: Some(atls_core::Psk::new("probe", vec![7u8; 32]).expect("psk")),
            ..ClientConfig::default()
        })
        .expect("client");
    let mut session = Session::client(endpoint.as_ref(), &ClientSessionParams::default()).expect("session");
    session
        .take_flight(std::time::Instant::now())
        .expect("flight")
        .expect("hello")
}

/// POST `body` to `/.well-known/atls` at `addr` over a raw connection; the
/// whole response as text.
fn post_atls(addr: &str, body: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /.well-known/atls HTTP/1.1\r\nHost: x\r\nContent-Type: application/atls\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    s.write_all(body).expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/1.1 application that answers every request after `delay` with
/// `body`.
fn slow_app(delay: Duration, body: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                std::thread::sleep(delay);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (port, handle)
}

/// What `out` prints until `marker` appears (or it ends, or 10 s pass).
fn read_until(out: &mut impl Read, marker: &str) -> String {
    let mut text = String::new();
    let mut buf = [0u8; 512];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !text.contains(marker) && std::time::Instant::now() < deadline {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn request_has_curls_habits() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");
    let base = format!("http://{}", server.http);
    let dir = tempfile::tempdir().expect("dir");

    // -o FILE: the body in the file, nothing on stdout.
    let file = dir.path().join("out.txt");
    let out = request(&[
        &format!("{base}/hello"),
        "--ca",
        ca,
        "-o",
        file.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(std::fs::read_to_string(&file).expect("file"), "hello");

    // -i: the inner response head before the body; -s: no status line.
    let out = request(&[&format!("{base}/hello"), "--ca", ca, "-i", "-s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).ends_with("\r\n\r\nhello"), "{}", stdout(&out));
    assert_eq!(stderr(&out), "", "-s prints no status line");

    // An inner 404: without -f the body and exit 0, as curl; with -f exit 5
    // and no body.
    let missing = format!("{base}/no-such-resource");
    let out = request(&[&missing, "--ca", ca]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("404"), "{}", stderr(&out));
    let out = request(&[&missing, "--ca", ca, "-f"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("the inner response is 404"),
        "{}",
        stderr(&out)
    );

    // -d @- reads stdin; --data-binary @FILE reads a file, sent as is.
    let mut child = Command::new(ATLS)
        .args(["request", &format!("{base}/echo"), "--ca", ca, "-d", "@-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("atls request");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from stdin\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from stdin\n");
    let body = dir.path().join("body.bin");
    std::fs::write(&body, b"line one\nline two\n\x00\x01").expect("write");
    let at = format!("@{}", body.display());
    let out = request(&[&format!("{base}/echo"), "--ca", ca, "--data-binary", &at]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"line one\nline two\n\x00\x01");

    // A URL without a scheme is http://.
    let out = request(&[&format!("{}/hello", server.http), "--ca", ca]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello");

    // -v: the inner heads as > and < lines, and the steps on the wire.
    let out = request(&[&format!("{base}/hello"), "--ca", ca, "-v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("> GET /hello"), "{err}");
    assert!(err.contains("< 200 OK"), "{err}");
    assert!(err.contains("* handshake"), "{err}");

    // -v when a later step fails: the steps that happened are still shown
    // (a wrong CA fails the handshake after the server's first flight).
    let wrong_ca = other_ca(dir.path());
    let out = request(&[
        &format!("{base}/hello"),
        "--ca",
        wrong_ca.to_str().expect("path"),
        "-v",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("* handshake"),
        "the first flight's exchange is shown: {err}"
    );
    assert!(err.contains("atls: "), "{err}");
}

#[test]
fn exit_codes_do_not_collide() {
    // A usage error is 64, not 2 (a transport failure).
    let out = request(&["http://127.0.0.1:1/", "--no-such-option"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    // A local error (a CA file that is not there) is 1.
    let out = request(&["http://127.0.0.1:1/", "--ca", "/nonexistent/ca.pem"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The transport: nothing listens (2).
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, atls_pki::DevCa::new("a CA").expect("CA").certificate_pem()).expect("write");
    let port = free_port();
    let out = request(&[
        &format!("http://127.0.0.1:{port}/"),
        "--ca",
        ca.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // --max-time against a server that accepts and never answers (2).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _holder = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(2).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
    });
    let out = request(&[
        &format!("http://{addr}/"),
        "--ca",
        ca.to_str().expect("path"),
        "--max-time",
        "0.5",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-time"), "{}", stderr(&out));
    // The table is in --help.
    let help = request(&["--help"]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("64  a usage error"), "{}", stdout(&help));
}

#[test]
fn serve_health_upstream_timeout_and_graceful_shutdown() {
    let (slow_port, _app) = slow_app(Duration::from_millis(1500), "slow answer");
    let upstream = format!("http://127.0.0.1:{slow_port}");
    let server = serve(&["--upstream", &upstream, "--upstream-timeout", "5"]);
    let ca = server.ca.to_str().expect("path");
    // /health answers outside ATLS, with no secrets.
    let health = get(&server.http, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    // The state directory is the owner's alone.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // A state directory serve creates is 0700; one that exists keeps
        // its mode (serve never chmods, say, /tmp).
        let parent = tempfile::tempdir().expect("dir");
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let fresh = parent.path().join("new-state");
        let _ = serve_address(
            &[
                "serve",
                "--http",
                "127.0.0.1:0",
                "--state-dir",
                fresh.to_str().expect("path"),
            ],
            &[],
        );
        let mode = std::fs::metadata(&fresh).expect("state dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "state dir mode {mode:o}");
        let kept = std::fs::metadata(parent.path())
            .expect("parent")
            .permissions()
            .mode();
        assert_eq!(kept & 0o777, 0o755, "an existing directory keeps its mode");
    }
    // A request in flight when SIGTERM arrives is answered; then the
    // server exits 0.
    let url = format!("http://{}/slow", server.http);
    let ca_owned = ca.to_owned();
    let in_flight = std::thread::spawn(move || request(&[&url, "--ca", &ca_owned]));
    std::thread::sleep(Duration::from_millis(500));
    let mut server = server;
    let pid = server.process.0.id();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let answered = in_flight.join().expect("request thread");
    assert!(answered.status.success(), "{}", stderr(&answered));
    assert_eq!(stdout(&answered), "slow answer");
    let status = server.process.0.wait().expect("serve exits");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");

    // An upstream slower than --upstream-timeout: 504, said in words.
    let (slower, _app2) = slow_app(Duration::from_secs(3), "too late");
    let server = serve(&[
        "--upstream",
        &format!("http://127.0.0.1:{slower}"),
        "--upstream-timeout",
        "0.5",
    ]);
    let out = request(&[
        &format!("http://{}/x", server.http),
        "--ca",
        server.ca.to_str().expect("path"),
        "-f",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("504"), "{}", stderr(&out));
}

#[test]
fn serve_takes_names_and_says_what_a_url_needs() {
    let server = serve(&["--coap", "localhost:0"]);
    assert!(server.coap.is_some(), "a listener given by name");
    let out = Command::new(ATLS)
        .args(["serve", "--upstream", "127.0.0.1:3000"])
        .output()
        .expect("atls serve");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("http://127.0.0.1:3000"), "{}", stderr(&out));
    let help = Command::new(ATLS)
        .args(["serve", "--help"])
        .output()
        .expect("help");
    let text = stdout(&help);
    for needle in ["GET /hello", "GET /health", "[default: 30]", "0700", "PSK-only"] {
        assert!(text.contains(needle), "serve --help lacks {needle:?}:\n{text}");
    }
    // PSK without a certificate: said at start-up.
    let state = tempfile::tempdir().expect("dir");
    let mut child = Command::new(ATLS)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--psk",
            "d:00112233445566778899aabbccddeeff",
            "--state-dir",
        ])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut out = child.stdout.take().expect("stdout");
    let first = read_until(&mut out, "PSK only");
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("PSK only"), "{first}");
}

#[test]
fn a_closed_pipe_ends_the_demo_quietly() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("'{ATLS}' demo --memory-only | head -1"))
        .output()
        .expect("sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// `--log-format json`: one JSON object per line, with an access-log event
/// per outer request and the handshake's outcome at info; no ANSI colour.
#[test]
fn serve_logs_requests_and_handshakes_as_json() {
    let state = tempfile::tempdir().expect("dir");
    let log = state.path().join("serve.log");
    let mut child = Command::new(ATLS)
        .args([
            "--log-format",
            "json",
            "serve",
            "--http",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(state.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let mut stdout_pipe = child.stdout.take().expect("stdout");
    let text = read_until(&mut stdout_pipe, "ATLS over HTTP on http://");
    assert!(text.contains("ATLS over HTTP on http://"), "serve ended: {text}");
    let addr = text
        .split("ATLS over HTTP on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address")
        .to_owned();
    let ca = state.path().join("ca.pem");
    let out = request(&[
        &format!("http://{addr}/hello"),
        "--ca",
        ca.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A complete ClientHello the TLS stack refuses (its body is garbage).
    let hello = [
        0x16u8, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef,
    ];
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        s,
        "POST /.well-known/atls HTTP/1.1\r\nHost: x\r\nContent-Type: application/atls\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        hello.len()
    )
    .expect("write");
    s.write_all(&hello).expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(!logged.contains('\u{1b}'), "no ANSI escapes: {logged}");
    let events: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = events.iter().filter(|e| e["target"] == "atls::access").collect();
    assert!(access.len() >= 3, "{logged}");
    let first = &access[0]["fields"];
    assert_eq!(first["method"], "POST", "{first}");
    assert_eq!(first["path"], "/.well-known/atls", "{first}");
    assert_eq!(first["mode"], "atls", "{first}");
    assert_eq!(first["status"], 200, "{first}");
    assert!(access.iter().any(|e| e["fields"]["mode"] == "oscore"), "{logged}");
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "ATLS handshake complete"
                && e["fields"]["version"] == "TLSv1.3"),
        "{logged}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "ATLS handshake failed"),
        "a refused handshake is logged at info with its reason: {logged}"
    );
}

/// Start `atls serve` with `args` and `env`, return the address of its HTTP
/// listener, and stop it.
fn serve_address(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(ATLS);
    child.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in env {
        child.env(k, v);
    }
    let mut child = child.spawn().expect("serve");
    let mut out = child.stdout.take().expect("stdout");
    let text = read_until(&mut out, "ATLS over HTTP on http://");
    let _ = child.kill();
    let _ = child.wait();
    text.split("ATLS over HTTP on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no HTTP listener: {text}"))
        .to_owned()
}

/// Every option from a TOML file or the environment, with the command line
/// first, then the environment, then the file.
#[test]
fn serve_reads_a_toml_file_and_the_environment() {
    let dir = tempfile::tempdir().expect("dir");
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let config = dir.path().join("atls.toml");
    std::fs::write(
        &config,
        format!("http = \"127.0.0.1:{p1}\"\ncookie-name = \"fromfile\"\nmax-sessions = 50\npsk = [\"a:00112233445566778899aabbccddeeff\"]\n"),
    )
    .expect("write");
    let state = dir.path().join("state");
    let base = [
        "serve",
        "--config",
        config.to_str().expect("path"),
        "--state-dir",
        state.to_str().expect("path"),
    ];
    assert_eq!(serve_address(&base, &[]), format!("127.0.0.1:{p1}"), "the file");
    let from_env = format!("127.0.0.1:{p2}");
    assert_eq!(
        serve_address(&base, &[("ATLS_SERVE_HTTP", &from_env)]),
        from_env,
        "the environment beats the file"
    );
    let mut with_cli = base.to_vec();
    let from_cli = format!("127.0.0.1:{p3}");
    with_cli.extend(["--http", &from_cli]);
    assert_eq!(
        serve_address(&with_cli, &[("ATLS_SERVE_HTTP", &from_env)]),
        from_cli,
        "the command line beats both"
    );
    // The file named by the environment.
    assert_eq!(
        serve_address(
            &["serve", "--state-dir", state.to_str().expect("path")],
            &[("ATLS_SERVE_CONFIG", config.to_str().expect("path"))]
        ),
        format!("127.0.0.1:{p1}")
    );
    // A key that is no option is a local error naming it.
    std::fs::write(&config, "htp = \"127.0.0.1:1\"\n").expect("write");
    let out = Command::new(ATLS)
        .args(["serve", "--config", config.to_str().expect("path")])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(64), "a usage error: {}", stderr(&out));
    assert!(
        stderr(&out).contains("`htp` is not an option of atls serve"),
        "{}",
        stderr(&out)
    );
    // A value that starts with dashes stays a value (one --flag=value
    // argument per entry), and the file may set the log format.
    std::fs::write(
        &config,
        format!("http = \"127.0.0.1:{p1}\"\ncookie-name = \"--dashes\"\nlog-format = \"json\"\n"),
    )
    .expect("write");
    let mut child = Command::new(ATLS)
        .args(["serve", "--config", config.to_str().expect("path"), "--state-dir"])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut out = child.stdout.take().expect("stdout");
    let text = read_until(&mut out, "ATLS over HTTP on http://");
    assert!(text.contains(&format!("127.0.0.1:{p1}")), "{text}");
    let answer = post_atls(&format!("127.0.0.1:{p1}"), &client_hello());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("set-cookie: --dashes="),
        "the session cookie has the file's name: {answer}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut log = String::new();
    let _ = child.stderr.take().expect("stderr").read_to_string(&mut log);
    let first = log.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "log-format from the file: {log}"
    );
    // An array for a single-valued option, and a bad value from the file:
    // usage errors that name the file.
    std::fs::write(&config, "http = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n").expect("write");
    let out = Command::new(ATLS)
        .args(["serve", "--config", config.to_str().expect("path")])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("takes one value"), "{}", stderr(&out));
    assert!(stderr(&out).contains("atls.toml"), "{}", stderr(&out));
    std::fs::write(&config, "max-sessions = \"many\"\n").expect("write");
    let out = Command::new(ATLS)
        .args(["serve", "--config", config.to_str().expect("path")])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`max-sessions` comes from the configuration file")
            && stderr(&out).contains("atls.toml"),
        "{}",
        stderr(&out)
    );
}

/// `--metrics ADDR`: a Prometheus scrape on its own port shows the
/// handshake counter moving with each new session, requests by mode and
/// status, and the sessions gauge; the gateway's shows what it forwarded.
#[test]
fn metrics_show_handshakes_and_requests() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let server = serve(&["--metrics", &metrics]);
    let ca = server.ca.to_str().expect("path");
    let scrape = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&metrics) {
                let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return out;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no metrics listener");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let counter = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("atls_handshakes_total{") && l.contains("outcome=\"complete\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(counter(&scrape()), 0);
    for expected in 1..=2u64 {
        let out = request(&[&format!("http://{}/hello", server.http), "--ca", ca]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = scrape();
        assert_eq!(counter(&text), expected, "{text}");
        assert!(
            text.contains("atls_requests_total{mode=\"oscore\",status=\"200\",transport=\"http\"}"),
            "{text}"
        );
        assert!(text.contains("atls_request_duration_seconds_bucket"), "{text}");
        assert!(
            text.contains("atls_sessions{state=\"established\",transport=\"http\"}"),
            "{text}"
        );
    }
    // The CoAP listeners count too, apart from HTTP.
    let coap_metrics = format!("127.0.0.1:{}", free_port());
    let coap = serve(&["--coap", "127.0.0.1:0", "--metrics", &coap_metrics]);
    let out = request(&[
        &format!("{}/hello", coap.coap.as_deref().expect("coap")),
        "--ca",
        coap.ca.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(&coap_metrics) {
            let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        if text.contains("transport=\"coap\"") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.lines().any(|l| l.starts_with("atls_handshakes_total{")
            && l.contains("outcome=\"complete\"")
            && l.contains("transport=\"coap\"")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("atls_requests_total{")
            && l.contains("mode=\"oscore\"")
            && l.contains("status=\"2.04\"")
            && l.contains("transport=\"coap\"")),
        "{text}"
    );
}

/// Errors name the cause in words a user knows, with a hint where one helps.
#[test]
fn errors_name_the_cause() {
    let server = serve(&[]);
    let ca = server.ca.to_str().expect("path");
    let url = format!("http://{}/hello", server.http);
    let run = |args: &[&str]| {
        let mut all = vec![url.as_str()];
        all.extend_from_slice(args);
        let out = request(&all);
        (out.status.code(), stderr(&out))
    };
    let (code, err) = run(&["--ca", ca, "--proxy", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("the proxy http://127.0.0.1:1 cannot be reached"),
        "{err}"
    );
    let (code, err) = run(&["--ca", ca, "--proxy", "not a url"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--proxy \"not a url\" is not a URL"), "{err}");
    let dir = tempfile::tempdir().expect("dir");
    let other = dir.path().join("other.pem");
    std::fs::write(
        &other,
        atls_pki::DevCa::new("other").expect("CA").certificate_pem(),
    )
    .expect("write");
    for engine in ["openssl", "rustls"] {
        let (code, err) = run(&["--ca", other.to_str().expect("path"), "--engine", engine]);
        assert_eq!(code, Some(3), "{engine}: {err}");
        assert!(
            err.contains("hint: give --ca the CA that issued"),
            "{engine}: {err}"
        );
    }
    for engine in ["openssl", "rustls"] {
        let (code, err) = run(&["--ca", ca, "--engine", engine, "--server-name", "wrong.example"]);
        assert_eq!(code, Some(3), "{engine}: {err}");
        assert!(
            err.contains("the certificate does not name wrong.example (it names localhost"),
            "{engine}: {err}"
        );
        assert!(err.contains("hint: --server-name"), "{engine}: {err}");
    }
    let (code, err) = run(&["--state-dir", dir.path().to_str().expect("path")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{}", dir.path().join("ca.pem").display())),
        "says where it looked: {err}"
    );
    // A key that does not belong to its certificate: both files named.
    let foreign = dir.path().join("foreign-key.pem");
    let other_ca = atls_pki::DevCa::new("foreign").expect("CA");
    let other_leaf = other_ca.issue_server(&["localhost"]).expect("leaf");
    std::fs::write(&foreign, other_leaf.dangerous_key_pem()).expect("write");
    let cert = server.state.path().join("server-cert.pem");
    let out = Command::new(ATLS)
        .args(["serve", "--http", "127.0.0.1:0", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&foreign)
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the private key in {} does not belong to the certificate in {}",
            foreign.display(),
            cert.display()
        )),
        "{err}"
    );
    let psk = serve(&["--psk", "d:00112233445566778899aabbccddeeff"]);
    let out = request(&[
        &format!("http://{}/hello", psk.http),
        "--psk",
        "d:ffffffffffffffffffffffffffffffff",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("a wrong key"), "{}", stderr(&out));
    // With the right key: a full handshake, not a resumption.
    let out = request(&[
        &format!("http://{}/hello", psk.http),
        "--psk",
        "d:00112233445566778899aabbccddeeff",
        "-v",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resumed=false"), "{}", stderr(&out));
}

/// `atls gateway` as operators run it: options from a TOML file, SIGTERM
/// ends it with 0.
#[test]
fn gateway_reads_a_toml_file_and_stops_on_sigterm() {
    let server = serve(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("gateway.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "upstream = \"http://{}\"\ncoap-tcp = \"127.0.0.1:{port}\"\nmax-devices = 64\n",
            server.http
        ),
    )
    .expect("write");
    let mut child = Command::new(ATLS)
        .args(["gateway", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway");
    let mut out = child.stdout.take().expect("stdout");
    let text = read_until(&mut out, "coap+tcp://");
    assert!(
        text.contains(&format!("ATLS gateway on coap+tcp://127.0.0.1:{port}")),
        "{text}"
    );
    let through = request(&[
        &format!("coap+tcp://127.0.0.1:{port}/hello"),
        "--ca",
        server.ca.to_str().expect("path"),
        "--server-name",
        "localhost",
    ]);
    assert!(through.status.success(), "{}", stderr(&through));
    assert_eq!(stdout(&through), "hello");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exit");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A TCP relay to `target` that records what clients send, and holds each
/// connection's first bytes for `delay` before passing them on.
fn relay(target: String, delay: Duration) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let target = target.clone();
            let record = record.clone();
            std::thread::spawn(move || {
                let Ok(mut server) = std::net::TcpStream::connect(&target) else {
                    return;
                };
                let (Ok(mut client_reader), Ok(mut server_writer)) = (client.try_clone(), server.try_clone())
                else {
                    return;
                };
                let upward = std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    let mut first = true;
                    while let Ok(n) = client_reader.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if first {
                            std::thread::sleep(delay);
                            first = false;
                        }
                        record.lock().expect("record").extend_from_slice(&buf[..n]);
                        if server_writer.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server_writer.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
                let _ = upward.join();
            });
        }
    });
    (addr, seen)
}

/// An HTTP/1.1 application that answers each request with its own head
/// (what reached the service through the ATLS terminator).
fn mirror_app() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let head = read_until(&mut stream, "\r\n\r\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
                head.len()
            );
        }
    });
    port
}

/// User name and password in the URL travel as Basic authentication inside
/// ATLS only; bodies from files and stdin are bounded and count against
/// --max-time; timeouts are checked as usage; `-o -` is stdout; a refused
/// connection is named.
#[test]
fn request_credentials_bodies_and_timeouts() {
    let upstream = mirror_app();
    let server = serve(&["--upstream", &format!("http://127.0.0.1:{upstream}")]);
    let ca = server.ca.to_str().expect("path");
    let (via, seen) = relay(server.http.clone(), Duration::ZERO);
    let out = request(&[
        &format!("http://alice:s%3Acret@{via}/private"),
        "--ca",
        ca,
        "--server-name",
        "localhost",
        "--mode",
        "records",
        "-v",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let head = stdout(&out).to_ascii_lowercase();
    // base64("alice:s:cret")
    assert!(head.contains("authorization: basic ywxpy2u6czpjcmv0"), "{head}");
    // The inner request as -v shows it: Host without the userinfo.
    assert!(
        stderr(&out).contains(&format!("> host: {via}")),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("alice"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("YWxpY2U6czpjcmV0"),
        "-v hides the credentials: {}",
        stderr(&out)
    );
    let outer = String::from_utf8_lossy(&seen.lock().expect("seen")).to_ascii_lowercase();
    assert!(
        outer.contains("post /.well-known/atls"),
        "the relay saw the exchange: {outer}"
    );
    assert!(
        !outer.contains("alice") && !outer.contains("authorization"),
        "the outer hop carries no credentials: {outer}"
    );
    // OSCORE's simple form carries no Authorization: credentials in the
    // URL are refused rather than dropped, other header fields named.
    let out = request(&[&format!("http://alice:pw@{}/private", server.http), "--ca", ca]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--mode records"), "{}", stderr(&out));
    let out = request(&[
        &format!("http://{}/private", server.http),
        "--ca",
        ca,
        "-H",
        "X-Trace: 1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not sent: x-trace"), "{}", stderr(&out));
    // A password in a service URL never shows in clap's error.
    let out = Command::new(ATLS)
        .args(["gateway", "--upstream", "ftp://u:s3cret@h/"])
        .output()
        .expect("gateway");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret"), "{}", stderr(&out));
    assert!(stderr(&out).contains("u:***@h"), "{}", stderr(&out));
    for bad in [
        "user:s3cret@host:8080",
        "http://u:s3cret@h:99999/",
        "http://u:s3#cret@h/",
    ] {
        let out = Command::new(ATLS)
            .args(["serve", "--upstream", bad])
            .output()
            .expect("serve");
        assert_eq!(out.status.code(), Some(64), "{bad}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("s3cret") && !stderr(&out).contains("cret@"),
            "{bad}: {}",
            stderr(&out)
        );
    }
    // CoAP URLs have no userinfo.
    let out = request(&["coap://bob:pw@127.0.0.1:1/x", "--ca", ca]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let dir = tempfile::tempdir().expect("dir");
    // A body file over the 64 MiB bound: refused before anything is sent.
    let big = dir.path().join("big.bin");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(64 * 1024 * 1024 + 1))
        .expect("big file");
    let out = request(&[
        &format!("http://{}/echo", server.http),
        "--ca",
        ca,
        "--data-binary",
        &format!("@{}", big.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("over 64 MiB"), "{}", stderr(&out));
    // A stdin that never ends is cut off by --max-time (exit 2).
    let mut child = Command::new(ATLS)
        .args([
            "request",
            &format!("http://{}/echo", server.http),
            "--ca",
            ca,
            "-d",
            "@-",
            "--max-time",
            "0.5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("atls request");
    let _held_open = child.stdin.take();
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-time"), "{}", stderr(&out));
    // --max-time 0 is no limit; -o - is stdout.
    let out = request(&[
        &format!("http://{}/hello", server.http),
        "--ca",
        ca,
        "--max-time",
        "0",
        "-o",
        "-",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("GET /hello"), "{}", stdout(&out));
    // Timeouts that are no durations are usage errors (64).
    for bad in [
        ["--max-time", "nan"],
        ["--max-time", "-1"],
        ["--connect-timeout", "0"],
        ["--connect-timeout", "inf"],
    ] {
        let out = request(&[
            &format!("http://{}/hello", server.http),
            "--ca",
            ca,
            bad[0],
            bad[1],
        ]);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {}", stderr(&out));
    }
    // Nothing listening: said in words, with the address.
    let port = free_port();
    let out = request(&[&format!("http://127.0.0.1:{port}/"), "--ca", ca]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("nothing accepts connections at 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

/// `-v` and `--dump-flights` over CoAP: each flight, also when a later step
/// fails, and the captured flights inspect as ATLS.
#[test]
fn request_verbose_and_dump_over_coap() {
    let server = serve(&["--coap", "127.0.0.1:0"]);
    let coap = server.coap.clone().expect("coap");
    let ca = server.ca.to_str().expect("path");
    let dir = tempfile::tempdir().expect("dir");
    let dump = dir.path().join("flights");
    let out = request(&[
        &format!("{coap}/hello"),
        "--ca",
        ca,
        "-v",
        "--dump-flights",
        dump.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    for needle in ["> 0.01 /hello", "* flight 1:", "* ATLS TLSv1.3", "< 2.05"] {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    let hello = dump.join("01-handshake-request.bin");
    let inspected = Command::new(ATLS)
        .args(["inspect", "--json"])
        .arg(&hello)
        .output()
        .expect("inspect");
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    assert!(
        stdout(&inspected).contains("client_hello"),
        "{}",
        stdout(&inspected)
    );
    assert!(dump.join("01-handshake-response.bin").exists());
    // A wrong CA fails the handshake (3) after the first flight, which -v
    // still shows.
    let other = other_ca(dir.path());
    let out = request(&[
        &format!("{coap}/hello"),
        "--ca",
        other.to_str().expect("path"),
        "-v",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("* flight 1:"), "{}", stderr(&out));
}

/// Handshakes that fail after the first flight and handshakes that never
/// finish are logged at info, with the session's prefix (not debug
/// formatting); CoAP requests get an access line and handshake lines too.
#[test]
fn serve_logs_late_failures_expiries_and_coap() {
    let state = tempfile::tempdir().expect("dir");
    let log = state.path().join("serve.log");
    let ca = state.path().join("ca.pem");
    // The development CA is made by the first start; require client
    // certificates from it.
    let _ = serve_address(
        &[
            "serve",
            "--http",
            "127.0.0.1:0",
            "--state-dir",
            state.path().to_str().expect("path"),
        ],
        &[],
    );
    let mut child = Command::new(ATLS)
        .args([
            "--log-format",
            "json",
            "serve",
            "--http",
            "127.0.0.1:0",
            "--coap",
            "127.0.0.1:0",
            "--handshake-timeout",
            "1",
            "--client-ca",
            ca.to_str().expect("path"),
            "--state-dir",
        ])
        .arg(state.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let mut stdout_pipe = child.stdout.take().expect("stdout");
    let mut text = read_until(&mut stdout_pipe, "ATLS over CoAP on ");
    if !text
        .split("ATLS over CoAP on ")
        .nth(1)
        .is_some_and(|rest| rest.contains('\n'))
    {
        text.push_str(&read_until(&mut stdout_pipe, "\n"));
    }
    let coap = text
        .split("ATLS over CoAP on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("coap address")
        .to_owned();
    let addr = text
        .split("ATLS over HTTP on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address")
        .to_owned();
    // No client certificate: TLS 1.3 fails on the client's second flight,
    // over HTTP and over CoAP.
    for base in [format!("http://{addr}"), coap.clone()] {
        let out = request(&[
            &format!("{base}/hello"),
            "--ca",
            ca.to_str().expect("path"),
            "--tls-version",
            "1.3",
        ]);
        assert_eq!(out.status.code(), Some(3), "{base}: {}", stderr(&out));
    }
    // A first flight never continued, then (after the handshake timeout)
    // another, whose admission sweeps the first away.
    assert!(post_atls(&addr, &client_hello()).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(post_atls(&addr, &client_hello()).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).expect("log");
    let events: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let is_prefix = |v: &serde_json::Value| {
        v.as_str()
            .is_some_and(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let late = events
        .iter()
        .filter(|e| e["fields"]["message"] == "ATLS handshake failed" && e["level"] == "INFO")
        .collect::<Vec<_>>();
    assert!(
        late.iter()
            .any(|e| is_prefix(&e["fields"]["session"]) && e["fields"]["transport"] == "http"),
        "an HTTP failure after the first flight, with the session prefix: {logged}"
    );
    assert!(
        late.iter()
            .any(|e| e["fields"]["transport"] == "coap" && is_prefix(&e["fields"]["session"])),
        "a CoAP failure after the first flight: {logged}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "ATLS handshake expired unfinished"
                && is_prefix(&e["fields"]["session"])
                && e["fields"]["client"] == "127.0.0.1"),
        "{logged}"
    );
    assert!(
        events.iter().any(|e| e["target"] == "atls::access"
            && e["fields"]["transport"] == "coap"
            && e["fields"]["path"] == "/.well-known/atls"),
        "a CoAP access line: {logged}"
    );
    assert!(!logged.contains("SessionId("), "no debug formatting: {logged}");
}

/// A second SIGTERM during the drain exits at once (143); a grace that is
/// no duration is a usage error; the gateway drains: new exchanges get 5.03
/// while the one in progress is answered, then it exits 0.
#[test]
fn second_signal_and_gateway_drain() {
    let out = Command::new(ATLS)
        .args(["serve", "--shutdown-grace", "nan"])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    let (slow_port, _app) = slow_app(Duration::from_secs(8), "slow answer");
    let server = serve(&[
        "--upstream",
        &format!("http://127.0.0.1:{slow_port}"),
        "--shutdown-grace",
        "30",
    ]);
    let url = format!("http://{}/slow", server.http);
    let ca = server.ca.to_str().expect("path").to_owned();
    let in_flight = std::thread::spawn(move || request(&[&url, "--ca", &ca]));
    std::thread::sleep(Duration::from_millis(700));
    let mut server = server;
    let pid = server.process.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = server.process.0.wait().expect("exit");
    assert_eq!(
        status.code(),
        Some(143),
        "forced out by the second signal: {status:?}"
    );
    let _ = in_flight.join();

    // The gateway: its service answers each exchange after a pause.
    let service = serve(&[]);
    let (slow_service, _seen) = relay(service.http.clone(), Duration::from_millis(1500));
    let gateway = gateway(&[
        "--coap",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://{slow_service}"),
    ]);
    let coap = gateway.coap.clone().expect("coap");
    let ca = service.ca.to_str().expect("path").to_owned();
    let (coap1, ca1) = (coap.clone(), ca.clone());
    let device = std::thread::spawn(move || {
        request(&[
            &format!("{coap1}/hello"),
            "--ca",
            &ca1,
            "--server-name",
            "localhost",
            "--max-time",
            "6",
            "-v",
        ])
    });
    std::thread::sleep(Duration::from_millis(700));
    let mut gateway = gateway;
    let _ = Command::new("kill")
        .args(["-TERM", &gateway.process.0.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    // A device that starts now is turned away.
    let late = request(&[
        &format!("{coap}/hello"),
        "--ca",
        &ca,
        "--server-name",
        "localhost",
        "--max-time",
        "6",
    ]);
    assert!(!late.status.success());
    assert!(stderr(&late).contains("shutting down"), "{}", stderr(&late));
    let status = gateway.process.0.wait().expect("exit");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let log = gateway.log();
    assert!(
        log.contains("hello=true"),
        "the exchange in progress was forwarded and answered: {log}"
    );
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("still in progress"), "{log}");
    // The device got the whole answer to its flight in progress (a flight
    // answer is recorded only once all its Block2 blocks arrived), in
    // several blocks; its next flight came during the drain.
    let device = device.join().expect("device");
    let err = stderr(&device);
    let first = err
        .lines()
        .find(|l| l.starts_with("* flight 1:"))
        .unwrap_or_else(|| panic!("the flight in progress was answered whole: {err}"));
    assert!(!first.ends_with("in 1 message(s)"), "a Block2 answer: {first}");
}

/// `atls bench` against `atls serve` and its plain-HTTP baseline (no
/// timing is asserted: only that every operation ran and was measured).
#[test]
fn bench_loads_serve_and_its_plain_baseline() {
    // The HTTPS baseline (new connections, full handshakes) on both engines.
    for engine in ["rustls", "openssl"] {
        let plain_https = format!("127.0.0.1:{}", free_port());
        let server = serve(&["--engine", engine, "--plain-https", &plain_https]);
        let out = Command::new(ATLS)
            .args(["bench", &format!("http://{}", server.http), "--ca"])
            .arg(&server.ca)
            .args([
                "--workload",
                "session",
                "-n",
                "6",
                "-c",
                "2",
                "--json",
                "--server-pid",
            ])
            .arg(server.process.0.id().to_string())
            .args(["--baseline", &format!("https://{plain_https}")])
            .output()
            .expect("atls bench");
        assert!(out.status.success(), "{engine}: {}", stderr(&out));
        let lines: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{}", stdout(&out));
        assert_eq!(lines[0]["errors"], 0, "{engine}: {}", lines[0]);
        assert_eq!(lines[1]["target"], "plain https", "{engine}");
        assert_eq!(lines[1]["ops"], 6, "{engine}: {}", lines[1]);
        assert_eq!(lines[1]["errors"], 0, "{engine}: {}", lines[1]);
    }
    let state = tempfile::tempdir().expect("state dir");
    let refused = Command::new(ATLS)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--plain-https",
            "0.0.0.0:0",
            "--state-dir",
        ])
        .arg(state.path())
        .output()
        .expect("atls serve");
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("loopback"), "{}", stderr(&refused));

    let plain = format!("127.0.0.1:{}", free_port());
    let server = serve(&["--plain", &plain]);
    let pid = server.process.0.id().to_string();
    let ca = server.ca.to_str().expect("path");
    for (workload, mode, count) in [
        ("request", "oscore", "40"),
        ("session", "records", "6"),
        ("request", "cose", "10"),
    ] {
        let out = Command::new(ATLS)
            .args([
                "bench",
                &format!("http://{}", server.http),
                "--ca",
                ca,
                "--workload",
                workload,
                "--mode",
                mode,
                "-n",
                count,
                "-c",
                "2",
                "--server-pid",
                &pid,
                "--baseline",
                &format!("http://{plain}"),
                "--json",
            ])
            .output()
            .expect("atls bench");
        assert!(out.status.success(), "{workload} {mode}: {}", stderr(&out));
        let lines: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{}", stdout(&out));
        assert_eq!(lines[0]["target"], format!("atls {mode}"));
        assert_eq!(lines[1]["target"], "plain http");
        for line in &lines {
            assert_eq!(line["ops"].to_string(), count, "{line}");
            assert_eq!(line["errors"], 0, "{line}");
            assert!(line["server_cpu_us_per_op"].is_number(), "{line}");
            assert!(
                line["latency_us"]["p99"].as_u64().is_some_and(|p| p > 0),
                "{line}"
            );
        }
    }
    // Memory per held session and per half-open handshake.
    for workload in ["hold", "half-open"] {
        let out = Command::new(ATLS)
            .args([
                "bench",
                &format!("http://{}", server.http),
                "--ca",
                ca,
                "--workload",
                workload,
                "-n",
                "12",
                "-c",
                "3",
                "--server-pid",
                &pid,
                "--json",
            ])
            .output()
            .expect("atls bench");
        assert!(out.status.success(), "{workload}: {}", stderr(&out));
        let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
        assert_eq!(line["opened"], 12, "{line}");
        assert_eq!(line["errors"], 0, "{line}");
        assert!(line["rss_after"].as_u64() >= Some(1), "{line}");
    }
    let out = Command::new(ATLS)
        .args([
            "bench",
            &format!("http://{}", server.http),
            "--ca",
            ca,
            "--workload",
            "hold",
            "-n",
            "2",
        ])
        .output()
        .expect("atls bench");
    assert_eq!(out.status.code(), Some(1), "needs --server-pid: {}", stderr(&out));
    // The table, and a wrong CA: no operation succeeds, exit 1.
    let out = Command::new(ATLS)
        .args([
            "bench",
            &format!("http://{}", server.http),
            "--ca",
            ca,
            "-n",
            "4",
            "-c",
            "1",
        ])
        .output()
        .expect("atls bench");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("server CPU/op"), "{}", stdout(&out));
    let dir = tempfile::tempdir().expect("dir");
    let other = other_ca(dir.path());
    let out = Command::new(ATLS)
        .args([
            "bench",
            &format!("http://{}", server.http),
            "--ca",
            other.to_str().expect("path"),
            "-n",
            "2",
        ])
        .output()
        .expect("atls bench");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no operation succeeded"),
        "{}",
        stderr(&out)
    );
}
