//! The draft's deployments on loopback (`atls demo figure9`, `figure10`,
//! `appendix-b`): each hop prints what it could read, and the scenario
//! fails unless only the two ATLS endpoints saw the plaintext.
//!
//! The middleboxes are the project's own ([`crate::middlebox`]) or, with
//! `--third-party`, real ones started on loopback: nginx as the TLS
//! terminator, mitmproxy as the TLS-intercepting middlebox (recording every
//! flow it intercepted to `mitmproxy-flows.jsonl`), tinyproxy as the
//! forward proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use atls_coap::{inner_request, AtlsCoapClient, CoapClientOptions, CoapMode};
use atls_core::{Certificate, ClientConfig, CommonConfig, Psk, ServerConfig, TlsVersion};
use atls_gateway::{Gateway, GatewayConfig, Observation};
use atls_http::{AtlsClient, ClientOptions, Mode};
use atls_pki::DevCa;
use bytes::Bytes;
use coap_lite::RequestType;
use http::Request;

use crate::middlebox::{self, Connect, Seen};
use crate::serve::{self, ServeArgs};

/// The plaintext the device sends: no hop but the service may see it.
const MESSAGE: &[u8] = b"temperature=21.5;valve=open";

/// Which deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Subcommand)]
pub(crate) enum Deployment {
    /// Figure 9: device (CoAP over DTLS) → untrusted gateway → TLS
    /// terminator → service; ATLS end to end, then OSCORE requests.
    Figure9,
    /// Figure 10 and §3.2: client → TLS-intercepting middlebox → TLS
    /// terminator → service; the client bootstraps the middlebox's trust
    /// anchors over ATLS, then validates the middlebox with them.
    Figure10,
    /// Appendix B: ATLS through an HTTP forward proxy, beside a CONNECT
    /// tunnel through the same proxy.
    AppendixB,
}

impl Deployment {
    pub(crate) const ALL: [Deployment; 3] = [Self::Figure9, Self::Figure10, Self::AppendixB];

    fn title(self) -> &'static str {
        match self {
            Self::Figure9 => "Figure 9: device → gateway (CoAP/DTLS to HTTPS) → TLS terminator → service",
            Self::Figure10 => {
                "Figure 10 / §3.2: client → TLS-intercepting middlebox → TLS terminator → service"
            }
            Self::AppendixB => "Appendix B: ATLS through an HTTP forward proxy, beside a CONNECT tunnel",
        }
    }
}

/// Options of the deployment demos.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeployOptions {
    /// Real nginx, mitmproxy and tinyproxy instead of the project's own.
    pub(crate) third_party: bool,
    /// Keep the working directory (configurations, logs, mitmproxy's
    /// record) here instead of a temporary one.
    pub(crate) keep: Option<PathBuf>,
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find(program: &str, also: &[&str]) -> anyhow::Result<PathBuf> {
    let candidates = also.iter().map(PathBuf::from).chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(program))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!("{program} is needed for --third-party (scripts/setup.sh installs it)")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not start listening on port {port}")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A TLS terminator in front of `upstream` (host:port, plain HTTP): the
/// project's own, or nginx. Returns its port and, for nginx, its log.
enum Terminator {
    Own(middlebox::Hop),
    // The process is held for its Drop.
    Nginx(#[allow(dead_code)] Process, PathBuf, u16),
}

impl Terminator {
    fn port(&self) -> u16 {
        match self {
            Self::Own(hop) => hop.addr.port(),
            Self::Nginx(_, _, port) => *port,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Own(_) => "TLS terminator (atls demo's)",
            Self::Nginx(..) => "TLS terminator (nginx)",
        }
    }

    /// (request line, request content type, request body as nginx logged
    /// it, status, response content type) per request.
    fn seen(&self) -> Vec<Seen> {
        match self {
            Self::Own(hop) => hop.seen(),
            Self::Nginx(_, log, _) => std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    let [line, request_type, status, response_type, body] = f.as_slice() else {
                        return None;
                    };
                    // (nginx logs the body escaped: \xHH for each byte
                    // that is not printable.)
                    Some(Seen {
                        line: line.trim_end_matches(" HTTP/1.1").to_owned(),
                        request_type: (*request_type).to_owned(),
                        request_body: body.as_bytes().to_vec(),
                        status: status.parse().unwrap_or(0),
                        response_type: (*response_type).to_owned(),
                        response_body: Vec::new(),
                    })
                })
                .collect(),
        }
    }
}

async fn terminator(
    work: &Path,
    third_party: bool,
    upstream: SocketAddr,
    pki: &Pki,
) -> anyhow::Result<Terminator> {
    if !third_party {
        let acceptor = middlebox::acceptor(&pki.terminator_chain, &pki.terminator_key)?;
        let url = reqwest::Url::parse(&format!("http://{upstream}/"))?;
        return Ok(Terminator::Own(middlebox::terminator(acceptor, url, &[]).await?));
    }
    let nginx = find("nginx", &["/usr/sbin/nginx"])?;
    let dir = work.join("nginx");
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("cert.pem"), &pki.terminator_chain)?;
    crate::common::write_private(&dir.join("key.pem"), pki.terminator_key.as_bytes())?;
    let port = free_port()?;
    let user = if running_as_root() { "user root;" } else { "" };
    let conf = format!(
        r#"{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format seen '$request\t$content_type\t$status\t$upstream_http_content_type\t$request_body';
    client_body_temp_path {dir}/tmp/body;
    client_body_buffer_size 1m;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        access_log {dir}/logs/seen.log seen;
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
        }}
    }}
}}
"#,
        dir = dir.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let process = Process(child);
    wait_for(port, "nginx").await?;
    Ok(Terminator::Nginx(process, dir.join("logs/seen.log"), port))
}

/// The certificates of one run: the service's ATLS CA (from `atls serve`'s
/// state directory), and the transport CAs of the terminator and of the
/// local domain (the intercepting middlebox's own).
struct Pki {
    terminator_ca: Certificate,
    terminator_ca_pem: String,
    terminator_chain: String,
    terminator_key: String,
}

fn pki() -> anyhow::Result<Pki> {
    let ca = DevCa::new("demo TLS terminator CA")?;
    let leaf = ca.issue_server(&["localhost", "127.0.0.1"])?;
    Ok(Pki {
        terminator_ca: ca.certificate().clone(),
        terminator_ca_pem: ca.certificate_pem().to_owned(),
        terminator_chain: format!("{}{}", leaf.cert_pem, ca.certificate_pem()),
        terminator_key: leaf.dangerous_key_pem().to_owned(),
    })
}

fn serve_args(state: &Path, extra: &[&str]) -> ServeArgs {
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }
    let state = state.to_string_lossy();
    let mut argv = vec!["serve", "--http", "127.0.0.1:0", "--state-dir", &state];
    argv.extend_from_slice(extra);
    <Serve as clap::Parser>::parse_from(argv).args
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Print one hop's view and check it holds no plaintext and only the ATLS
/// media types (`allowed`).
fn report(hop: &str, seen: &[Seen], allowed: &[&str], failures: &mut Vec<String>) {
    println!("  {hop} could read:");
    if seen.is_empty() {
        println!("    (nothing)");
    }
    for s in seen {
        println!(
            "    {:<48} {:<44} {:>5} B → {} {:<40} {:>5} B",
            s.line,
            s.request_type,
            s.request_body.len(),
            if s.status == 0 {
                "-".to_owned()
            } else {
                s.status.to_string()
            },
            if s.response_type.is_empty() {
                "-"
            } else {
                &s.response_type
            },
            s.response_body.len()
        );
        for body in [&s.request_body, &s.response_body] {
            if contains(body, MESSAGE) {
                failures.push(format!("{hop} saw the plaintext"));
            }
        }
        for t in [&s.request_type, &s.response_type] {
            let media = t.split(';').next().unwrap_or_default().trim();
            if !media.is_empty() && media != "-" && !allowed.contains(&media) {
                failures.push(format!("{hop} saw content of type {t}"));
            }
        }
    }
}

/// The ATLS client configuration: the service's CA only.
fn atls_client_config(service_ca: &[Certificate]) -> ClientConfig {
    ClientConfig {
        trust_anchors: service_ca.to_vec(),
        ..ClientConfig::default()
    }
}

async fn echo_and_session(client: &AtlsClient) -> anyhow::Result<serde_json::Value> {
    let echo = client
        .send(
            Request::post("/echo")
                .header("content-type", "text/plain")
                .body(Bytes::from_static(MESSAGE))?,
        )
        .await?;
    ensure!(echo.body().as_ref() == MESSAGE, "the echo differs");
    let session = client.send(Request::get("/session").body(Bytes::new())?).await?;
    Ok(serde_json::from_slice(session.body())?)
}

async fn figure9(work: &Path, third_party: bool) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let state = work.join("service");
    let service = serve::start(&serve_args(&state, &[])).await?;
    let service_addr = service.http.context("service address")?;
    let service_ca = Certificate::all_from_pem(&std::fs::read(state.join("ca.pem"))?)?;
    let pki = pki()?;
    let terminator = terminator(work, third_party, service_addr, &pki).await?;
    // The gateway: its own transport layers — DTLS towards devices (a PSK),
    // HTTPS towards the terminator (the terminator's CA) — and no ATLS
    // configuration at all.
    let observed: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let sink = observed.clone();
    let gateway = Gateway::with_observer(
        GatewayConfig {
            default_upstream: Some(reqwest::Url::parse(&format!(
                "https://localhost:{}/",
                terminator.port()
            ))?),
            upstream_tls: atls_http::TransportTls {
                roots: vec![pki.terminator_ca.clone()],
                ..atls_http::TransportTls::default()
            },
            ..GatewayConfig::default()
        },
        Arc::new(move |o: &Observation| {
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(o.clone())
        }),
    )?;
    let hop_psk = Psk::new("device-17", b"demo device-to-gateway DTLS key!".to_vec())?;
    let mut hop = ServerConfig {
        common: CommonConfig {
            versions: vec![TlsVersion::Dtls12],
            ..CommonConfig::default()
        },
        psks: vec![hop_psk.clone()],
        ..ServerConfig::default()
    };
    hop.common.resumption = false;
    hop.common.dtls.cookie_exchange = true;
    let hop_endpoint = crate::common::engine("openssl")?.server(&hop)?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let coaps = socket.local_addr()?;
    let g = gateway.clone();
    let gateway_task = tokio::spawn(async move {
        let _ = atls_coap::dtls::serve(socket, hop_endpoint, g, atls_coap::DtlsServerConfig::default()).await;
    });
    println!(
        "  service http://{service_addr} ← {} https://localhost:{} ← gateway coaps://{coaps} ← device",
        terminator.name(),
        terminator.port()
    );
    let device_hop = crate::common::engine("openssl")?.client(&ClientConfig {
        common: CommonConfig {
            versions: vec![TlsVersion::Dtls12],
            ..CommonConfig::default()
        },
        psk: Some(hop_psk),
        ..ClientConfig::default()
    })?;
    let device_atls = crate::common::engine("openssl")?.client(&atls_client_config(&service_ca))?;
    let device = AtlsCoapClient::new_dtls(
        coaps,
        device_hop,
        device_atls,
        CoapClientOptions {
            server_name: Some("localhost".into()),
            mode: CoapMode::Oscore,
            ..CoapClientOptions::default()
        },
    )
    .await?;
    let echo = device
        .request(&inner_request(RequestType::Post, "/echo", MESSAGE))
        .await?;
    let session = device
        .request(&inner_request(RequestType::Get, "/session", b""))
        .await?;
    let seen: serde_json::Value = serde_json::from_slice(&session.payload)?;
    let observations = observed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let gateway_view: Vec<Seen> = observations
        .iter()
        .map(|o| Seen {
            line: format!(
                "CoAP {} {} (SNI {})",
                if o.kind == "flight" {
                    "POST /.well-known/atls"
                } else {
                    "POST (OSCORE)"
                },
                o.code,
                o.sni.as_deref().unwrap_or("-")
            ),
            request_type: if o.kind == "flight" {
                "application/atls"
            } else {
                "application/oscore"
            }
            .into(),
            request_body: o.request.clone(),
            status: o.status.unwrap_or(0),
            response_type: o.response_type.clone().unwrap_or_default(),
            response_body: o.response.clone(),
        })
        .collect();
    report(
        "gateway (holds the device's DTLS keys: reads CoAP)",
        &gateway_view,
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    report(
        terminator.name(),
        &terminator.seen(),
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    println!(
        "  service application read: POST /echo {:?} → {:?}; session {} {} (mode {})",
        String::from_utf8_lossy(MESSAGE),
        String::from_utf8_lossy(&echo.payload),
        seen["tls_version"].as_str().unwrap_or("?"),
        seen["cipher_suite"].as_str().unwrap_or("?"),
        seen["mode"].as_str().unwrap_or("?"),
    );
    if echo.payload != MESSAGE {
        failures.push("the device did not get its message back".into());
    }
    if !observations.iter().any(|o| o.kind == "oscore") {
        failures.push("no OSCORE request crossed the gateway".into());
    }
    gateway_task.abort();
    Ok(failures)
}

/// A TLS-intercepting middlebox: the project's own, or mitmproxy. Its CA
/// is the local domain's.
enum Middlebox {
    Own(middlebox::Hop, String),
    Mitmproxy(#[allow(dead_code)] Process, PathBuf, u16, String),
}

impl Middlebox {
    fn port(&self) -> u16 {
        match self {
            Self::Own(hop, _) => hop.addr.port(),
            Self::Mitmproxy(_, _, port, _) => *port,
        }
    }

    fn ca_pem(&self) -> &str {
        match self {
            Self::Own(_, pem) | Self::Mitmproxy(_, _, _, pem) => pem,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Own(..) => "TLS-intercepting middlebox (atls demo's)",
            Self::Mitmproxy(..) => "TLS-intercepting middlebox (mitmproxy)",
        }
    }

    fn seen(&self) -> Vec<Seen> {
        match self {
            Self::Own(hop, _) => hop.seen(),
            Self::Mitmproxy(_, record, _, _) => read_mitmproxy_flows(record),
        }
    }
}

/// mitmproxy's record: one JSON object per flow it intercepted.
pub(crate) fn read_mitmproxy_flows(path: &Path) -> Vec<Seen> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Seen {
            line: format!(
                "{} {}",
                v["method"].as_str().unwrap_or("?"),
                v["path"].as_str().unwrap_or("?")
            ),
            request_type: v["request_type"].as_str().unwrap_or("-").to_owned(),
            request_body: hex::decode(v["request_body"].as_str().unwrap_or_default()).unwrap_or_default(),
            status: v["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
            response_type: v["response_type"].as_str().unwrap_or("-").to_owned(),
            response_body: hex::decode(v["response_body"].as_str().unwrap_or_default()).unwrap_or_default(),
        })
        .collect()
}

/// The mitmproxy addon that records each intercepted flow.
const MITMPROXY_ADDON: &str = r#"
import json, os

OUT = os.environ["ATLS_DEMO_FLOWS"]

def response(flow):
    req, resp = flow.request, flow.response
    with open(OUT, "a") as f:
        f.write(json.dumps({
            "method": req.method,
            "path": req.path,
            "host": req.pretty_host,
            "request_type": req.headers.get("content-type", "-"),
            "request_body": (req.raw_content or b"").hex(),
            "status": resp.status_code,
            "response_type": resp.headers.get("content-type", "-"),
            "response_body": (resp.raw_content or b"").hex(),
        }) + "\n")
"#;

async fn intercepting_middlebox(work: &Path, third_party: bool, pki: &Pki) -> anyhow::Result<Middlebox> {
    if !third_party {
        let ca = Arc::new(DevCa::new("local domain CA (intercepting middlebox)")?);
        let pem = ca.certificate_pem().to_owned();
        let hop = middlebox::proxy(Connect::Intercept(ca), std::slice::from_ref(&pki.terminator_ca)).await?;
        return Ok(Middlebox::Own(hop, pem));
    }
    let mitmdump = find("mitmdump", &["/usr/bin/mitmdump"])?;
    let dir = work.join("mitmproxy");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("record.py"), MITMPROXY_ADDON)?;
    std::fs::write(dir.join("terminator-ca.pem"), &pki.terminator_ca_pem)?;
    let record = work.join("mitmproxy-flows.jsonl");
    let port = free_port()?;
    let child = Command::new(mitmdump)
        .args([
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &port.to_string(),
            "-q",
        ])
        .arg("--set")
        .arg(format!("confdir={}", dir.display()))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            dir.join("terminator-ca.pem").display()
        ))
        .arg("-s")
        .arg(dir.join("record.py"))
        .env("ATLS_DEMO_FLOWS", &record)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mitmdump.log"))?)
        .spawn()
        .context("starting mitmdump")?;
    let process = Process(child);
    wait_for(port, "mitmproxy").await?;
    let ca_path = dir.join("mitmproxy-ca-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ca_path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pem = std::fs::read_to_string(&ca_path).context("mitmproxy's CA")?;
    Ok(Middlebox::Mitmproxy(process, record, port, pem))
}

async fn figure10(work: &Path, third_party: bool) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let pki = pki()?;
    let middlebox = intercepting_middlebox(work, third_party, &pki).await?;
    // The service serves the local domain's trust anchors (the
    // middlebox's CA) over ATLS.
    let anchors = work.join("local-domain-ca.pem");
    std::fs::write(&anchors, middlebox.ca_pem())?;
    let state = work.join("service");
    let anchors_arg = anchors.to_string_lossy().into_owned();
    let service = serve::start(&serve_args(&state, &["--trust-anchors", &anchors_arg])).await?;
    let service_addr = service.http.context("service address")?;
    let service_ca = Certificate::all_from_pem(&std::fs::read(state.join("ca.pem"))?)?;
    let terminator = terminator(work, third_party, service_addr, &pki).await?;
    let base = format!("https://localhost:{}", terminator.port());
    let proxy = format!("http://127.0.0.1:{}", middlebox.port());
    println!(
        "  service http://{service_addr} ← {} {base} ← {} {proxy} ← client",
        terminator.name(),
        middlebox.name()
    );
    let endpoint =
        || crate::common::engine("openssl").and_then(|e| Ok(e.client(&atls_client_config(&service_ca))?));
    let options = |insecure: bool, roots: Vec<Certificate>| ClientOptions {
        mode: Mode::Oscore,
        server_name: Some("localhost".into()),
        proxy: Some(proxy.clone()),
        transport: atls_http::TransportTls {
            insecure,
            roots,
            ..atls_http::TransportTls::default()
        },
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    // 1. The client cannot validate the middlebox: with the public roots
    //    alone, its transport TLS fails.
    let strict = AtlsClient::new(&base, endpoint()?, options(false, Vec::new()))?;
    match strict.send(Request::get("/hello").body(Bytes::new())?).await {
        Err(e) => println!("  1. transport TLS to the middlebox, public roots only: refused ({e})"),
        Ok(_) => failures.push("the middlebox was accepted without its CA".into()),
    }
    // 2. It ignores the middlebox's certificate (§5.3) and fetches the
    //    local domain's trust anchors over ATLS, authenticated end to end.
    let bootstrap = AtlsClient::new(&base, endpoint()?, options(true, Vec::new()))?;
    let fetched = bootstrap
        .send(Request::get("/trust-anchors").body(Bytes::new())?)
        .await?;
    let installed = Certificate::all_from_pem(fetched.body()).context("the trust anchors")?;
    println!(
        "  2. over ATLS (transport unverified, ATLS verified): GET /trust-anchors → {} certificate(s), {} B",
        installed.len(),
        fetched.body().len()
    );
    if fetched.body().as_ref() != middlebox.ca_pem().as_bytes() {
        failures.push("the trust anchors fetched are not the middlebox's CA".into());
    }
    // 3. Installed, they validate the middlebox's transport TLS.
    let validated = AtlsClient::new(&base, endpoint()?, options(false, installed))?;
    let seen = echo_and_session(&validated).await?;
    println!(
        "  3. transport TLS validated with them; ATLS inside: {} {} (mode {})",
        seen["tls_version"].as_str().unwrap_or("?"),
        seen["cipher_suite"].as_str().unwrap_or("?"),
        seen["mode"].as_str().unwrap_or("?")
    );
    let middle = middlebox.seen();
    report(
        middlebox.name(),
        &middle,
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    if middle
        .iter()
        .any(|s| contains(&s.response_body, b"BEGIN CERTIFICATE"))
    {
        failures.push("the middlebox read the trust anchors".into());
    }
    if middle.is_empty() {
        failures.push("the middlebox recorded nothing".into());
    }
    report(
        terminator.name(),
        &terminator.seen(),
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    println!(
        "  service application read: POST /echo {:?}, GET /trust-anchors",
        String::from_utf8_lossy(MESSAGE)
    );
    Ok(failures)
}

/// A forward proxy: the project's own, or tinyproxy.
enum Forward {
    Own(middlebox::Hop),
    Tinyproxy(#[allow(dead_code)] Process, PathBuf, u16),
}

impl Forward {
    fn port(&self) -> u16 {
        match self {
            Self::Own(hop) => hop.addr.port(),
            Self::Tinyproxy(_, _, port) => *port,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Own(_) => "forward proxy (atls demo's)",
            Self::Tinyproxy(..) => "forward proxy (tinyproxy, logs request lines only)",
        }
    }

    fn seen(&self) -> Vec<Seen> {
        match self {
            Self::Own(hop) => hop.seen(),
            // tinyproxy logs request lines, not bodies.
            Self::Tinyproxy(_, log, _) => std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once("): ").map(|(_, r)| r.to_owned()))
                .filter(|r| r.starts_with("CONNECT") || r.starts_with("POST") || r.starts_with("GET"))
                .map(|line| Seen {
                    line: line.trim_end_matches(" HTTP/1.1").to_owned(),
                    request_type: "-".into(),
                    ..Seen::default()
                })
                .collect(),
        }
    }
}

async fn forward_proxy(work: &Path, third_party: bool, roots: &[Certificate]) -> anyhow::Result<Forward> {
    if !third_party {
        return Ok(Forward::Own(middlebox::proxy(Connect::Tunnel, roots).await?));
    }
    let tinyproxy = find("tinyproxy", &["/usr/bin/tinyproxy"])?;
    let dir = work.join("tinyproxy");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("tinyproxy.log");
    let port = free_port()?;
    let user = if running_as_root() {
        "User root\nGroup root\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 20\nAllow 127.0.0.1\n",
        log.display()
    );
    std::fs::write(dir.join("tinyproxy.conf"), conf)?;
    let child = Command::new(tinyproxy)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("tinyproxy.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tinyproxy")?;
    let process = Process(child);
    wait_for(port, "tinyproxy").await?;
    Ok(Forward::Tinyproxy(process, log, port))
}

async fn appendix_b(work: &Path, third_party: bool) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let pki = pki()?;
    let state = work.join("service");
    let service = serve::start(&serve_args(&state, &[])).await?;
    let service_addr = service.http.context("service address")?;
    let service_ca = Certificate::all_from_pem(&std::fs::read(state.join("ca.pem"))?)?;
    let terminator = terminator(work, third_party, service_addr, &pki).await?;
    let proxy = forward_proxy(work, third_party, &[]).await?;
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port());
    let client = |base: &str, roots: Vec<Certificate>| -> anyhow::Result<AtlsClient> {
        let endpoint = crate::common::engine("openssl")?.client(&atls_client_config(&service_ca))?;
        Ok(AtlsClient::new(
            base,
            endpoint,
            ClientOptions {
                mode: Mode::Oscore,
                server_name: Some("localhost".into()),
                proxy: Some(proxy_url.clone()),
                // tinyproxy may close a kept-alive connection between two
                // requests; a connection per exchange avoids the race.
                no_connection_reuse: third_party,
                transport: atls_http::TransportTls {
                    roots,
                    ..atls_http::TransportTls::default()
                },
                ..ClientOptions::default()
            },
        )?)
    };
    println!(
        "  service http://{service_addr} (and https://localhost:{} via {}) ← {} {proxy_url} ← client",
        terminator.port(),
        terminator.name(),
        proxy.name()
    );
    // ATLS through the proxy: it forwards the requests, reads their heads,
    // sees application/atls and application/oscore bodies it cannot read.
    let through = client(&format!("http://{service_addr}"), Vec::new())?;
    echo_and_session(&through).await?;
    let atls_view = proxy.seen();
    println!("  a. ATLS over plain HTTP through the proxy (absolute-form requests):");
    report(
        proxy.name(),
        &atls_view,
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    if !atls_view.iter().any(|s| s.line.contains("/.well-known/atls")) {
        failures.push("the proxy did not carry the ATLS flights".into());
    }
    // The same through a CONNECT tunnel to the TLS terminator: the proxy
    // sees the tunnel's target and nothing else.
    let tunnelled = client(
        &format!("https://localhost:{}", terminator.port()),
        vec![pki.terminator_ca.clone()],
    )?;
    echo_and_session(&tunnelled).await?;
    let all = proxy.seen();
    let tunnel_view: Vec<Seen> = all.get(atls_view.len()..).unwrap_or_default().to_vec();
    println!("  b. the same inside a CONNECT tunnel (HTTPS to the terminator):");
    report(proxy.name(), &tunnel_view, &[], &mut failures);
    if !tunnel_view.iter().all(|s| s.line.starts_with("CONNECT")) || tunnel_view.is_empty() {
        failures.push("the proxy saw more than a CONNECT for the tunnel".into());
    }
    report(
        terminator.name(),
        &terminator.seen(),
        &["application/atls", "application/oscore"],
        &mut failures,
    );
    println!("  The proxy forwards ATLS unchanged in both cases: no change to CONNECT semantics is needed.");
    Ok(failures)
}

/// Run `deployments`; returns (ran, failed).
pub(crate) fn run(deployments: &[Deployment], options: &DeployOptions) -> anyhow::Result<(usize, usize)> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (work, temporary) = match &options.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), false)
        }
        None => (
            std::env::temp_dir().join(format!("atls-demo-deploy-{}", std::process::id())),
            true,
        ),
    };
    let mut failed = 0;
    for (i, deployment) in deployments.iter().enumerate() {
        let dir = work.join(format!("{i}-{deployment:?}").to_ascii_lowercase());
        std::fs::create_dir_all(&dir)?;
        println!(
            "== {}{}",
            deployment.title(),
            if options.third_party {
                " [nginx, mitmproxy, tinyproxy]"
            } else {
                ""
            }
        );
        let result = runtime.block_on(async {
            match deployment {
                Deployment::Figure9 => figure9(&dir, options.third_party).await,
                Deployment::Figure10 => figure10(&dir, options.third_party).await,
                Deployment::AppendixB => appendix_b(&dir, options.third_party).await,
            }
        });
        match result {
            Ok(problems) if problems.is_empty() => println!("  OK: plaintext only at the two endpoints\n"),
            Ok(problems) => {
                failed += 1;
                for p in problems {
                    println!("  FAILED: {p}");
                }
                println!();
            }
            Err(e) => {
                failed += 1;
                println!("  FAILED: {e:#}\n");
            }
        }
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok((deployments.len(), failed))
}
