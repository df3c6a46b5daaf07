//! `atls request URL`: one protected request, like curl.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use atls_core::{ClientConfig, CommonConfig};
use atls_http::{AtlsClient, ClientOptions, Layer, Mode};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};

use crate::common;

/// The end-to-end layer's options in `--help`.
const ATLS: &str = "ATLS layer (end to end, client to service)";
/// The hop-by-hop layer's: configured apart (draft §5.2).
const TRANSPORT: &str = "Transport layer (hop by hop: HTTPS, proxies, the coaps:// DTLS hop)";

/// Arguments of `atls request`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RequestArgs {
    /// The resource: scheme, server and path (http://host:port/path; a URL
    /// without a scheme is http://).
    pub(crate) url: String,
    /// Inner method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    pub(crate) method: String,
    /// Inner body (implies POST when -X is not given); `@FILE` reads a
    /// file, `@-` standard input. Sent as given (no newline stripping).
    #[arg(short = 'd', long = "data", value_name = "DATA")]
    pub(crate) data: Option<String>,
    /// The same as -d (curl's name for a body sent as is).
    #[arg(long = "data-binary", value_name = "DATA", conflicts_with = "data")]
    pub(crate) data_binary: Option<String>,
    /// Write the body (and with -i the head) to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Include the inner response head (status line, header fields) in the
    /// output, before the body.
    #[arg(short = 'i', long = "include")]
    pub(crate) include: bool,
    /// No status line on stderr (errors are still shown, as curl -sS).
    #[arg(short = 's', long = "silent")]
    pub(crate) silent: bool,
    /// Fail on an inner 4xx or 5xx: print no body, exit 5. Without it the
    /// body is printed and the exit code is 0, as curl does.
    #[arg(short = 'f', long = "fail")]
    pub(crate) fail: bool,
    /// Write the body of each outer exchange to DIR, for `atls inspect`:
    /// NN-KIND-request.bin and NN-KIND-response.bin (http(s):// URLs).
    #[arg(long, value_name = "DIR")]
    pub(crate) dump_flights: Option<PathBuf>,
    /// Seconds the whole request may take (handshake included); then exit 2.
    #[arg(long, value_name = "SECS")]
    pub(crate) max_time: Option<f64>,
    /// Inner header (repeatable): 'Name: value'.
    #[arg(short = 'H', long = "header")]
    pub(crate) headers: Vec<String>,
    /// Protection of the request.
    #[arg(long, default_value = "oscore", help_heading = ATLS)]
    pub(crate) mode: Mode,
    /// TLS engine for ATLS.
    #[arg(long, default_value = "openssl", value_parser = ["openssl", "rustls"], help_heading = ATLS)]
    pub(crate) engine: String,
    /// Only this TLS version (1.2 or 1.3); over CoAP also dtls1.2 (DTLS
    /// as the ATLS layer, OpenSSL engine).
    #[arg(long, value_name = "VERSION", help_heading = ATLS)]
    pub(crate) tls_version: Option<String>,
    /// CA that issued the ATLS server certificate (PEM). Defaults to the
    /// development CA of a local `atls serve`, when there is one.
    #[arg(long, value_name = "FILE", help_heading = ATLS)]
    pub(crate) ca: Option<PathBuf>,
    /// ATLS client certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "key", help_heading = ATLS)]
    pub(crate) cert: Option<PathBuf>,
    /// ATLS client private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = ATLS)]
    pub(crate) key: Option<PathBuf>,
    /// External PSK: IDENTITY:HEXKEY.
    #[arg(long, value_name = "ID:HEX", help_heading = ATLS)]
    pub(crate) psk: Option<String>,
    /// Name the ATLS server certificate must carry (default: the URL's host).
    #[arg(long, help_heading = ATLS)]
    pub(crate) server_name: Option<String>,
    /// HTTP forward proxy (default: HTTPS_PROXY / HTTP_PROXY).
    #[arg(long, value_name = "URL", help_heading = TRANSPORT)]
    pub(crate) proxy: Option<String>,
    /// Do not verify the transport TLS certificate (a TLS-terminating
    /// middlebox). ATLS is verified regardless.
    #[arg(long, help_heading = TRANSPORT)]
    pub(crate) insecure_transport: bool,
    /// Extra CA for the transport TLS layer (PEM); for coaps:// the CA of
    /// the DTLS server certificate (default: --ca).
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT)]
    pub(crate) transport_ca: Option<PathBuf>,
    /// Client certificate chain of the transport layer (PEM): for HTTPS
    /// servers and coaps:// hops that ask for one.
    #[arg(long, value_name = "FILE", requires = "transport_key", help_heading = TRANSPORT)]
    pub(crate) transport_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "transport_cert", help_heading = TRANSPORT)]
    pub(crate) transport_key: Option<PathBuf>,
    /// Only this TLS version on the HTTPS transport (1.2 or 1.3),
    /// whatever ATLS negotiates inside.
    #[arg(long, value_name = "VERSION", help_heading = TRANSPORT)]
    pub(crate) transport_tls_version: Option<String>,
    /// coaps://: the PSK of the DTLS hop, IDENTITY:HEXKEY (instead of a
    /// certificate).
    #[arg(long, value_name = "ID:HEX", help_heading = TRANSPORT)]
    pub(crate) transport_psk: Option<String>,
    /// Seconds connecting may take: the TCP connection (to the server or
    /// the proxy) of http(s)://, the DTLS handshake of the coaps:// hop (a
    /// wrong hop PSK shows as no answer: DTLS drops what it cannot
    /// authenticate).
    #[arg(long, value_name = "SECS", default_value_t = 20.0, help_heading = TRANSPORT)]
    pub(crate) connect_timeout: f64,
    /// Speak HTTP/2 to an http:// URL without negotiation (h2c).
    #[arg(long)]
    pub(crate) http2: bool,
    /// Show each step with timings on stderr.
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Directory of a local `atls serve`'s development CA.
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
}

/// The exit codes of `atls request`, shown by `--help`.
pub(crate) const EXIT_CODES: &str = "Exit codes:
  0   the request was answered (any inner status, unless --fail)
  1   a local or configuration error (a file that cannot be read, a bad key, an invalid URL)
  2   the transport failed (connection, proxy, transport TLS, the coaps:// hop, --max-time)
  3   the ATLS handshake failed (or the server refused it)
  4   protection failed (OSCORE, COSE or records)
  5   with --fail: the inner response is 4xx or 5xx
  64  a usage error (an unknown option, a missing value)";

/// Exit codes, one per failing layer.
fn exit_code(layer: Layer) -> ExitCode {
    ExitCode::from(match layer {
        Layer::Transport => 2,
        Layer::Handshake => 3,
        Layer::Protection => 4,
        Layer::Application => 5,
    })
}

/// The ATLS client configuration the arguments describe.
fn client_config(args: &RequestArgs) -> anyhow::Result<ClientConfig> {
    let ca = match &args.ca {
        Some(ca) => Some(ca.clone()),
        None => {
            let dir = args.state_dir.clone().unwrap_or_else(common::default_state_dir);
            Some(dir.join("ca.pem")).filter(|p| p.exists() && args.psk.is_none())
        }
    };
    if ca.is_none() && args.psk.is_none() {
        let looked = args
            .state_dir
            .clone()
            .unwrap_or_else(common::default_state_dir)
            .join("ca.pem");
        anyhow::bail!(
            "ATLS needs a trust anchor: --ca FILE (or --psk ID:HEX); there is no development CA of a local `atls serve` at {}",
            looked.display()
        );
    }
    let config = ClientConfig {
        common: CommonConfig {
            versions: common::versions(args.tls_version.as_deref())?,
            ..CommonConfig::default()
        },
        trust_anchors: ca
            .as_deref()
            .map(common::certificates)
            .transpose()?
            .unwrap_or_default(),
        client_auth: match (&args.cert, &args.key) {
            (Some(c), Some(k)) => Some(common::certified_key(c, k)?),
            _ => None,
        },
        psk: args
            .psk
            .as_deref()
            .map(|p| common::psks(&[p.to_owned()]))
            .transpose()?
            .and_then(|mut v| v.pop()),
        early_data: true,
    };
    Ok(config)
}

/// The body given with -d or --data-binary.
fn data(args: &RequestArgs) -> Option<&String> {
    args.data.as_ref().or(args.data_binary.as_ref())
}

fn body(args: &RequestArgs) -> anyhow::Result<Bytes> {
    Ok(match data(args) {
        Some(d) if d == "@-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("reading the body from stdin")?;
            Bytes::from(buf)
        }
        Some(d) if d.starts_with('@') => Bytes::from(common::read(std::path::Path::new(&d[1..]))?),
        Some(d) => Bytes::from(d.clone().into_bytes()),
        None => Bytes::new(),
    })
}

/// Write the head (with -i) and the body to -o FILE or stdout. A closed
/// stdout (a pipe whose reader left) is not an error.
fn emit(args: &RequestArgs, head: &str, body: &[u8]) -> Result<(), ExitCode> {
    use std::io::Write as _;
    let result = match &args.output {
        Some(path) => std::fs::File::create(path)
            .and_then(|mut f| {
                if args.include {
                    f.write_all(head.as_bytes())?;
                }
                f.write_all(body)
            })
            .map_err(|e| format!("writing {}: {e}", path.display())),
        None => {
            let mut out = std::io::stdout().lock();
            let written = (|| {
                if args.include {
                    out.write_all(head.as_bytes())?;
                }
                out.write_all(body)?;
                out.flush()
            })();
            match written {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing stdout: {e}")),
                _ => Ok(()),
            }
        }
    };
    result.map_err(|e| {
        eprintln!("atls: {e}");
        ExitCode::from(1)
    })
}

/// The whole-request deadline of --max-time.
fn max_time(args: &RequestArgs) -> Result<Option<std::time::Duration>, ExitCode> {
    args.max_time
        .map(|s| {
            std::time::Duration::try_from_secs_f64(s).map_err(|_| {
                eprintln!("atls: --max-time expects seconds");
                ExitCode::from(1)
            })
        })
        .transpose()
}

/// A hint that names the likely cause of a failure in words a user knows.
fn hint(args: &RequestArgs, message: &str) -> Option<String> {
    let m = message.to_ascii_lowercase();
    let proxy = args.proxy.clone().or_else(|| {
        [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|p| !p.is_empty()))
    });
    if let Some(proxy) = proxy.filter(|_| m.contains("(connect)") || m.contains("connection refused")) {
        return Some(format!("the proxy {proxy} cannot be reached (is it running?)"));
    }
    if m.contains("does not name") || m.contains("hostname mismatch") {
        return Some("--server-name NAME says which name the server's certificate must carry".into());
    }
    if m.contains("not issued by a trusted ca")
        || m.contains("self-signed certificate")
        || m.contains("unable to get local issuer")
        || m.contains("certificate signature failure")
        || m.contains("signature does not verify")
        || m.contains("unknownissuer")
    {
        return Some(
            "give --ca the CA that issued the server's ATLS certificate (`atls serve` prints the development CA it created)".into(),
        );
    }
    if args.psk.is_some() && (m.contains("alert") || m.contains("decrypt")) {
        return Some("with --psk, a wrong key (or identity) is the likely cause".into());
    }
    None
}

fn build(args: &RequestArgs) -> anyhow::Result<(AtlsClient, Request<Bytes>)> {
    if let Some(proxy) = &args.proxy {
        reqwest::Url::parse(proxy)
            .ok()
            .filter(|u| u.host_str().is_some())
            .with_context(|| format!("--proxy {proxy:?} is not a URL (e.g. http://proxy.example:3128)"))?;
    }
    let engine = common::engine(&args.engine)?;
    let config = client_config(args)?;
    let endpoint = engine.client(&config).map_err(|e| {
        common::explain(
            e,
            "configuring the ATLS client",
            args.cert.as_deref(),
            args.key.as_deref(),
        )
    })?;

    let url = reqwest_url(&args.url)?;
    let base = format!(
        "{}://{}",
        url.scheme_str().unwrap_or("http"),
        url.authority().context("the URL has no host")?
    );
    let options = ClientOptions {
        mode: args.mode,
        server_name: args.server_name.clone(),
        http2_prior_knowledge: args.http2,
        proxy: args.proxy.clone(),
        capture_bodies: args.dump_flights.is_some(),
        connect_timeout: Some(
            std::time::Duration::try_from_secs_f64(args.connect_timeout)
                .context("--connect-timeout expects seconds")?,
        ),
        transport: atls_http::TransportTls {
            insecure: args.insecure_transport,
            roots: args
                .transport_ca
                .as_deref()
                .map(common::certificates)
                .transpose()?
                .unwrap_or_default(),
            identity: transport_identity(args)?,
            versions: match &args.transport_tls_version {
                Some(v) => common::versions(Some(v))?,
                None => Vec::new(),
            },
        },
        ..ClientOptions::default()
    };
    let client = AtlsClient::new(&base, endpoint, options)?;

    let body = body(args)?;
    let method = if data(args).is_some() && args.method == "GET" {
        Method::POST
    } else {
        Method::from_bytes(args.method.as_bytes()).context("invalid method")?
    };
    let mut request = Request::builder()
        .method(method)
        .uri(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()));
    for h in &args.headers {
        let (name, value) = h.split_once(':').context("-H expects 'Name: value'")?;
        request = request.header(
            HeaderName::from_bytes(name.trim().as_bytes()).context("invalid header name")?,
            HeaderValue::from_str(value.trim()).context("invalid header value")?,
        );
    }
    Ok((client, request.body(body)?))
}

fn reqwest_url(url: &str) -> anyhow::Result<http::Uri> {
    let uri: http::Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => Ok(uri),
        _ => anyhow::bail!("the URL must start with http://, https://, coap://, coap+tcp:// or coaps://"),
    }
}

/// The single-threaded runtime of one request; exit 1 when it cannot start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("atls: {e}");
            ExitCode::from(1)
        })
}

/// The transport layer's client certificate, if given.
fn transport_identity(args: &RequestArgs) -> anyhow::Result<Option<atls_core::CertifiedKey>> {
    Ok(match (&args.transport_cert, &args.transport_key) {
        (Some(c), Some(k)) => Some(common::certified_key(c, k)?),
        _ => None,
    })
}

/// The DTLS hop of `coaps://`: a PSK, or the CA of the server certificate
/// (and a client certificate when given).
fn transport_config(args: &RequestArgs) -> anyhow::Result<ClientConfig> {
    let mut common = CommonConfig {
        versions: vec![atls_core::TlsVersion::Dtls12],
        ..CommonConfig::default()
    };
    common.resumption = false;
    if let Some(psk) = &args.transport_psk {
        return Ok(ClientConfig {
            common,
            psk: common::psks(std::slice::from_ref(psk))?.pop(),
            ..ClientConfig::default()
        });
    }
    let ca = match (&args.transport_ca, &args.ca) {
        (Some(ca), _) | (None, Some(ca)) => ca.clone(),
        (None, None) => args
            .state_dir
            .clone()
            .unwrap_or_else(common::default_state_dir)
            .join("ca.pem"),
    };
    if !ca.exists() {
        anyhow::bail!("coaps:// needs --transport-psk ID:HEX or --transport-ca FILE");
    }
    Ok(ClientConfig {
        common,
        trust_anchors: common::certificates(&ca)?,
        client_auth: transport_identity(args)?,
        ..ClientConfig::default()
    })
}

/// `atls request coap://HOST[:PORT]/PATH` (also `coap+tcp://`, `coaps://`):
/// the handshake over CoAP, then one request protected with OSCORE or in
/// records.
fn run_coap(args: &RequestArgs) -> ExitCode {
    use coap_lite::{MessageClass, RequestType};
    let coaps = args.url.starts_with("coaps://");
    let prepared = (|| -> anyhow::Result<_> {
        let mode = match args.mode {
            Mode::Oscore => atls_coap::CoapMode::Oscore,
            Mode::Records => atls_coap::CoapMode::Records,
            _ => anyhow::bail!("over CoAP the protection is OSCORE or records (--mode oscore|records)"),
        };
        let dtls_layer = args.tls_version.as_deref() == Some("dtls1.2");
        if dtls_layer && args.engine != "openssl" {
            anyhow::bail!("DTLS as the ATLS layer needs the OpenSSL engine");
        }
        let engine = common::engine(&args.engine)?;
        let endpoint = engine.client(&client_config(args)?).map_err(|e| {
            common::explain(
                e,
                "configuring the ATLS client",
                args.cert.as_deref(),
                args.key.as_deref(),
            )
        })?;
        let uri: http::Uri = args
            .url
            .parse()
            .with_context(|| format!("invalid URL {}", args.url))?;
        let host = uri
            .host()
            .context("the URL has no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(if coaps { 5684 } else { 5683 });
        let transport = if coaps {
            Some(
                common::engine("openssl")?
                    .client(&transport_config(args)?)
                    .context("configuring the DTLS hop")?,
            )
        } else {
            None
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("no address for {host}"))?;
        let method = match (args.method.as_str(), data(args).is_some()) {
            ("GET", true) | ("POST", _) => RequestType::Post,
            ("GET", false) => RequestType::Get,
            ("PUT", _) => RequestType::Put,
            ("DELETE", _) => RequestType::Delete,
            ("FETCH", _) => RequestType::Fetch,
            ("PATCH", _) => RequestType::Patch,
            (other, _) => anyhow::bail!("CoAP has no method {other}"),
        };
        let mut inner = atls_coap::inner_request(method, uri.path(), &body(args)?);
        for query in uri
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|q| !q.is_empty())
        {
            inner.add_option(coap_lite::CoapOption::UriQuery, query.as_bytes().to_vec());
        }
        let options = atls_coap::CoapClientOptions {
            server_name: Some(args.server_name.clone().unwrap_or(host)),
            mode,
            transport_timeout: std::time::Duration::try_from_secs_f64(args.connect_timeout)
                .context("--connect-timeout expects seconds")?,
            ..atls_coap::CoapClientOptions::default()
        };
        Ok((addr, endpoint, transport, options, inner))
    })();
    let (addr, endpoint, transport, options, inner) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("atls: {e:#}");
            return ExitCode::from(1);
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let tcp = args.url.starts_with("coap+tcp://");
    let deadline = match max_time(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let exchange = async {
        let client = match transport {
            Some(transport) => {
                atls_coap::AtlsCoapClient::new_dtls(addr, transport, endpoint, options).await?
            }
            None if tcp => atls_coap::AtlsCoapClient::new_tcp(addr, endpoint, options).await?,
            None => atls_coap::AtlsCoapClient::new(addr, endpoint, options).await?,
        };
        let response = client.request(&inner).await?;
        Ok::<_, atls_coap::CoapClientError>((response, client.last_handshake()))
    };
    let result = match runtime.block_on(within(deadline, exchange)) {
        Some(result) => result,
        None => {
            eprintln!("atls: transport: no answer within --max-time");
            return exit_code(Layer::Transport);
        }
    };
    match result {
        Ok((response, trips)) => {
            if args.verbose {
                for (i, t) in trips.iter().enumerate() {
                    eprintln!(
                        "* flight {}: {} B in {} message(s) -> {} B in {} message(s)",
                        i + 1,
                        t.sent,
                        t.blocks_sent,
                        t.received,
                        t.blocks_received
                    );
                }
            }
            let code = u8::from(response.header.code);
            let (class, detail) = (code >> 5, code & 0x1F);
            let status = format!("{class}.{detail:02}");
            if args.verbose {
                eprintln!("< {status}");
                for (number, values) in response.options() {
                    for value in values {
                        eprintln!("< option {number}: {}", hex::encode(value));
                    }
                }
            }
            if !args.silent {
                eprintln!("{status}");
            }
            let failed = !matches!(response.header.code, MessageClass::Response(_)) || class >= 4;
            if failed && args.fail {
                eprintln!("atls: application: the inner response is {status}");
                return exit_code(Layer::Application);
            }
            if let Err(code) = emit(args, &format!("{status}\n\n"), &response.payload) {
                return code;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let message = e.to_string();
            eprintln!("atls: {message}");
            if let Some(hint) = hint(args, &message) {
                eprintln!("atls: hint: {hint}");
            }
            exit_code(match e {
                atls_coap::CoapClientError::Handshake(_) | atls_coap::CoapClientError::Refused { .. } => {
                    Layer::Handshake
                }
                atls_coap::CoapClientError::Protection(_) => Layer::Protection,
                _ => Layer::Transport,
            })
        }
    }
}

/// `fut`, within `deadline` if there is one (`None`: it ran out).
async fn within<F: std::future::Future>(deadline: Option<std::time::Duration>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// `--dump-flights DIR`: each exchange's bodies, numbered in order.
fn dump(args: &RequestArgs, events: &[atls_http::WireEvent]) {
    let Some(dir) = &args.dump_flights else { return };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("atls: --dump-flights {}: {e}", dir.display());
        return;
    }
    for (i, e) in events.iter().enumerate() {
        let Some((request, response)) = &e.bodies else {
            continue;
        };
        for (side, bytes) in [("request", request), ("response", response)] {
            let path = dir.join(format!("{:02}-{}-{side}.bin", i + 1, e.kind));
            if let Err(err) = std::fs::write(&path, bytes) {
                eprintln!("atls: writing {}: {err}", path.display());
            }
        }
    }
}

fn print_event(e: &atls_http::WireEvent) {
    eprintln!(
        "* {:<9} {:?} {} [{} {} B] -> {} [{} {} B] {:.1} ms",
        e.kind,
        e.http_version,
        e.request_line,
        e.request_type,
        e.request_bytes,
        e.status.as_u16(),
        e.response_type,
        e.response_bytes,
        e.elapsed.as_secs_f64() * 1e3
    );
}

/// The inner response head, as `-i` writes it.
fn head(response: &http::Response<Bytes>) -> String {
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        head.push_str(&format!(
            "{name}: {}\r\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    head.push_str("\r\n");
    head
}

/// Run `atls request`; the exit code names the failing layer.
pub(crate) fn run(args: &RequestArgs) -> ExitCode {
    if args.verbose {
        crate::init_tracing();
    }
    // A URL without a scheme is http://, as curl takes it.
    let mut owned;
    let args = if args.url.contains("://") {
        args
    } else {
        owned = args.clone();
        owned.url = format!("http://{}", args.url);
        &owned
    };
    if ["coap://", "coap+tcp://", "coaps://"]
        .iter()
        .any(|scheme| args.url.starts_with(scheme))
    {
        return run_coap(args);
    }
    let (client, request) = match build(args) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("atls: {e:#}");
            return ExitCode::from(1);
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let deadline = match max_time(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if args.verbose {
        eprintln!("> {} {}", request.method(), request.uri());
        for (name, value) in request.headers() {
            eprintln!("> {name}: {}", String::from_utf8_lossy(value.as_bytes()));
        }
        eprintln!("> ({} B body)", request.body().len());
    }
    let start = Instant::now();
    let mut events = Vec::new();
    let outcome = runtime.block_on(within(deadline, client.send_recording(request, &mut events)));
    let result = match outcome {
        Some(result) => result,
        None => {
            if args.verbose {
                events.iter().for_each(print_event);
            }
            eprintln!("atls: transport: no answer within --max-time");
            return exit_code(Layer::Transport);
        }
    };
    match result {
        Ok(exchange) => {
            dump(args, &exchange.events);
            if args.verbose {
                exchange.events.iter().for_each(print_event);
                let info = &exchange.info;
                if exchange.early_data {
                    eprintln!("* the request rode in the handshake, as TLS 1.3 early data (0-RTT)");
                } else if exchange.events.first().is_some_and(|e| e.kind == "handshake")
                    && args.mode == Mode::Records
                    && exchange.events.iter().filter(|e| e.kind != "handshake").count() == 0
                {
                    eprintln!("* the request rode in the client's last handshake flight");
                }
                eprintln!(
                    "* ATLS {} {} engine={} resumed={} 0-RTT={} mode={} total {:.1} ms",
                    info.version.name(),
                    info.cipher_suite,
                    args.engine,
                    info.resumed,
                    exchange.early_data,
                    args.mode,
                    start.elapsed().as_secs_f64() * 1e3
                );
                let status = exchange.response.status();
                eprintln!(
                    "< {} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                );
                for (name, value) in exchange.response.headers() {
                    eprintln!("< {name}: {}", String::from_utf8_lossy(value.as_bytes()));
                }
            }
            let status = exchange.response.status();
            if !args.silent {
                eprintln!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
            }
            if (status.is_client_error() || status.is_server_error()) && args.fail {
                eprintln!("atls: application: the inner response is {status}");
                return exit_code(Layer::Application);
            }
            if let Err(code) = emit(args, &head(&exchange.response), exchange.response.body()) {
                return code;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            dump(args, &events);
            if args.verbose {
                // The steps that did happen, before the one that failed.
                events.iter().for_each(print_event);
            }
            // Every error's message starts with the layer that failed.
            let message = e.to_string();
            eprintln!("atls: {message}");
            if let Some(hint) = hint(args, &message) {
                eprintln!("atls: hint: {hint}");
            }
            exit_code(e.layer())
        }
    }
}
