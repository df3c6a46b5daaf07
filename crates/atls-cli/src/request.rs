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
    /// Write the body (and with -i the head) to FILE instead of stdout
    /// (`-`: stdout).
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
    /// NN-KIND-request.bin and NN-KIND-response.bin (over CoAP: each
    /// handshake flight and its answer).
    #[arg(long, value_name = "DIR")]
    pub(crate) dump_flights: Option<PathBuf>,
    /// Seconds the whole request may take (reading the body and the
    /// handshake included); then exit 2. 0: no limit.
    #[arg(short = 'm', long, value_name = "SECS", value_parser = common::seconds)]
    pub(crate) max_time: Option<std::time::Duration>,
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
    #[arg(long, value_name = "SECS", default_value = "20", value_parser = common::positive_seconds, help_heading = TRANSPORT)]
    pub(crate) connect_timeout: std::time::Duration,
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

/// Largest body `atls request` reads from a file or stdin.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// Up to [`MAX_BODY`] bytes of `reader`; more is an error that names the
/// limit.
fn read_limited(reader: impl std::io::Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(reader, MAX_BODY + 1), &mut buf)
        .with_context(|| format!("reading {what}"))?;
    if buf.len() as u64 > MAX_BODY {
        anyhow::bail!(
            "{what} is over {} MiB, the largest body atls request sends",
            MAX_BODY >> 20
        );
    }
    Ok(buf)
}

/// The request body (-d, --data-binary), read before `deadline`: a stdin
/// that never ends is cut off by --max-time as the rest is.
fn read_body(args: &RequestArgs, deadline: Option<Instant>) -> Result<Bytes, ExitCode> {
    let Some(source) = data(args).cloned() else {
        return Ok(Bytes::new());
    };
    let job = move || -> anyhow::Result<Vec<u8>> {
        if source == "@-" {
            read_limited(std::io::stdin().lock(), "the body from stdin")
        } else if let Some(path) = source.strip_prefix('@') {
            let file = std::fs::File::open(path).with_context(|| format!("reading {path}"))?;
            read_limited(file, &format!("the body file {path}"))
        } else {
            Ok(source.into_bytes())
        }
    };
    let read = match deadline {
        None => job(),
        Some(at) => {
            // On a thread, so that the wait can end; a thread still
            // blocked in read ends with the process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(job());
            });
            match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(read) => read,
                Err(_) => {
                    eprintln!("atls: transport: --max-time ran out while reading the body");
                    return Err(exit_code(Layer::Transport));
                }
            }
        }
    };
    read.map(Bytes::from).map_err(|e| {
        eprintln!("atls: {e:#}");
        ExitCode::from(1)
    })
}

/// A user name and password, as bytes.
type Credentials = (Vec<u8>, Vec<u8>);

/// The user name and password of a URL (`http://user:pass@host/`),
/// percent-decoded to bytes, and the URL without them. The userinfo is cut
/// out of the text: the rest of the URL is sent as given.
fn split_userinfo(url: &str) -> (String, Option<Credentials>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    // The authority ends where the URL parser ends it (`\\` counts as
    // `/` in http URLs), so that the host the credentials go to is the
    // host the request goes to.
    let end = rest.find(['/', '\\', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    if userinfo.is_empty() {
        // `http://@host/`: no credentials.
        return (format!("{scheme}://{host}{tail}"), None);
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
    (
        format!("{scheme}://{host}{tail}"),
        Some((decode(user), decode(password))),
    )
}

/// Write the head (with -i) and the body to -o FILE or stdout. A closed
/// stdout (a pipe whose reader left) is not an error.
fn emit(args: &RequestArgs, head: &str, body: &[u8]) -> Result<(), ExitCode> {
    use std::io::Write as _;
    let result = match args.output.as_ref().filter(|p| p.as_os_str() != "-") {
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
    let over_http = args.url.starts_with("http://") || args.url.starts_with("https://");
    if let Some(proxy) =
        proxy.filter(|_| over_http && (m.contains("(connect)") || m.contains("connection refused")))
    {
        return Some(format!(
            "the proxy {} cannot be reached (is it running?)",
            atls_http::app::redact_url(&proxy)
        ));
    }
    if m.contains("connection refused") {
        let authority = args
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| args.url.clone());
        return Some(format!(
            "nothing accepts connections at {authority} (is the server running, on that port?)"
        ));
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

fn build(
    args: &RequestArgs,
    body: Bytes,
    credentials: Option<&Credentials>,
) -> anyhow::Result<(AtlsClient, Request<Bytes>)> {
    if let Some(proxy) = &args.proxy {
        reqwest::Url::parse(proxy)
            .ok()
            .filter(|u| u.host_str().is_some())
            .with_context(|| {
                format!(
                    "--proxy {:?} is not a URL (e.g. http://proxy.example:3128)",
                    atls_http::app::redact_url(proxy)
                )
            })?;
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
        connect_timeout: Some(args.connect_timeout),
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

    let method = if data(args).is_some() && args.method == "GET" {
        Method::POST
    } else {
        Method::from_bytes(args.method.as_bytes()).context("invalid method")?
    };
    let mut request = Request::builder()
        .method(method)
        .uri(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()));
    let mut authorization = false;
    for h in &args.headers {
        let (name, value) = h.split_once(':').context("-H expects 'Name: value'")?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).context("invalid header name")?;
        authorization |= name == http::header::AUTHORIZATION;
        request = request.header(
            name,
            HeaderValue::from_str(value.trim()).context("invalid header value")?,
        );
    }
    // user:pass@ in the URL: Basic authentication, as curl does — but in
    // the inner request, protected end to end; the outer hop never sees it.
    if let (Some((user, password)), false) = (credentials, authorization) {
        use base64::Engine as _;
        let pair = [user.as_slice(), b":", password.as_slice()].concat();
        let token = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut value = HeaderValue::from_str(&format!("Basic {token}")).context("invalid credentials")?;
        value.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, value);
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
fn run_coap(args: &RequestArgs, body: Bytes, deadline: Option<Instant>) -> ExitCode {
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
        let mut inner = atls_coap::inner_request(method, uri.path(), &body);
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
            transport_timeout: args.connect_timeout,
            capture_flights: args.dump_flights.is_some(),
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
    if args.verbose {
        let (class, detail) = (
            u8::from(inner.header.code) >> 5,
            u8::from(inner.header.code) & 0x1F,
        );
        eprintln!(
            "* CoAP to {addr} ({})",
            args.url.split("://").next().unwrap_or("coap")
        );
        eprintln!(
            "> {class}.{detail:02} {}",
            inner.get_option(coap_lite::CoapOption::UriPath).map_or_else(
                || "/".to_owned(),
                |segments| segments
                    .iter()
                    .map(|s| format!("/{}", String::from_utf8_lossy(s)))
                    .collect::<String>(),
            )
        );
        eprintln!("> ({} B payload)", inner.payload.len());
    }
    let mode_name = args.mode;
    // The client is made first, so that the flights that did cross are
    // still shown (and dumped) when --max-time runs out during a later one.
    let exchange = async {
        let connect = async {
            match transport {
                Some(transport) => {
                    atls_coap::AtlsCoapClient::new_dtls(addr, transport, endpoint, options).await
                }
                None if tcp => atls_coap::AtlsCoapClient::new_tcp(addr, endpoint, options).await,
                None => atls_coap::AtlsCoapClient::new(addr, endpoint, options).await,
            }
        };
        let client = match within(deadline, connect).await {
            None => return (None, Vec::new(), None),
            Some(Err(e)) => return (Some(Err(e)), Vec::new(), None),
            Some(Ok(client)) => client,
        };
        let response = within(deadline, client.request(&inner)).await;
        let info = client.session_info().await;
        (response, client.last_handshake(), info)
    };
    let (result, trips, info) = runtime.block_on(exchange);
    dump_trips(args, &trips);
    if args.verbose {
        // Every flight that crossed, also when a later step failed.
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
        if let Some(info) = &info {
            eprintln!(
                "* ATLS {} {} engine={} resumed={} mode={mode_name}",
                info.version.name(),
                info.cipher_suite,
                args.engine,
                info.resumed,
            );
        }
    }
    let Some(result) = result else {
        eprintln!("atls: transport: no answer within --max-time");
        return exit_code(Layer::Transport);
    };
    match result {
        Ok(response) => {
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

/// `--dump-flights DIR` over CoAP: each handshake flight and its answer.
fn dump_trips(args: &RequestArgs, trips: &[atls_coap::FlightTrip]) {
    let Some(dir) = &args.dump_flights else { return };
    let bodies: Vec<(Vec<u8>, Vec<u8>)> = trips.iter().filter_map(|t| t.bodies.clone()).collect();
    write_dump(
        dir,
        bodies
            .iter()
            .map(|(q, r)| ("handshake", q.as_slice(), r.as_slice())),
    );
}

/// Write each exchange's bodies to `dir` as NN-KIND-request.bin and
/// NN-KIND-response.bin.
fn write_dump<'a>(dir: &std::path::Path, exchanges: impl Iterator<Item = (&'a str, &'a [u8], &'a [u8])>) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("atls: --dump-flights {}: {e}", dir.display());
        return;
    }
    for (i, (kind, request, response)) in exchanges.enumerate() {
        for (side, bytes) in [("request", request), ("response", response)] {
            let path = dir.join(format!("{:02}-{kind}-{side}.bin", i + 1));
            if let Err(err) = std::fs::write(&path, bytes) {
                eprintln!("atls: writing {}: {err}", path.display());
            }
        }
    }
}

/// `fut`, before `deadline` if there is one (`None`: it ran out).
async fn within<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at.into(), fut).await.ok(),
        None => Some(fut.await),
    }
}

/// `--dump-flights DIR`: each exchange's bodies, numbered in order.
fn dump(args: &RequestArgs, events: &[atls_http::WireEvent]) {
    let Some(dir) = &args.dump_flights else { return };
    write_dump(
        dir,
        events.iter().filter_map(|e| {
            e.bodies
                .as_ref()
                .map(|(request, response)| (e.kind, request.as_ref(), response.as_ref()))
        }),
    );
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
    // --max-time counts from here: reading the body is part of it.
    let deadline = args.max_time.filter(|d| !d.is_zero()).map(|d| Instant::now() + d);
    // A URL without a scheme is http://, as curl takes it.
    let mut owned = args.clone();
    if !args.url.contains("://") {
        owned.url = format!("http://{}", args.url);
    }
    let coap = ["coap://", "coap+tcp://", "coaps://"]
        .iter()
        .any(|scheme| owned.url.starts_with(scheme));
    let credentials = match split_userinfo(&owned.url) {
        (_, Some(_)) if coap => {
            eprintln!("atls: a CoAP URL carries no user name or password (RFC 7252 §6)");
            return ExitCode::from(1);
        }
        (_, Some(_)) if owned.mode == Mode::Oscore => {
            eprintln!(
                "atls: credentials in the URL travel as an Authorization field, which OSCORE cannot carry (RFC 8075's simple form): use --mode records or --mode cose"
            );
            return ExitCode::from(1);
        }
        (stripped, credentials) => {
            owned.url = stripped;
            credentials
        }
    };
    let args = &owned;
    // The URL is checked before a body is read (from a stdin that may
    // never end).
    if let Err(e) = args.url.parse::<http::Uri>() {
        eprintln!("atls: invalid URL {}: {e}", atls_http::app::redact_url(&args.url));
        return ExitCode::from(1);
    }
    let body = match read_body(args, deadline) {
        Ok(body) => body,
        Err(code) => return code,
    };
    if coap {
        return run_coap(args, body, deadline);
    }
    let (client, request) = match build(args, body, credentials.as_ref()) {
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
    if args.mode == Mode::Oscore {
        // RFC 8075's simple form: most header fields have no CoAP option.
        let dropped = atls_oscore::http::uncarried_headers(request.headers());
        if !dropped.is_empty() && !args.silent {
            let names: Vec<&str> = dropped.iter().map(http::HeaderName::as_str).collect();
            eprintln!(
                "atls: warning: OSCORE carries only Content-Type and Accept of the inner header fields; not sent: {} (--mode records or cose carry them)",
                names.join(", ")
            );
        }
    }
    if args.verbose {
        eprintln!("> {} {}", request.method(), request.uri());
        for (name, value) in request.headers() {
            if value.is_sensitive() {
                eprintln!("> {name}: (hidden)");
            } else {
                eprintln!("> {name}: {}", String::from_utf8_lossy(value.as_bytes()));
            }
        }
        eprintln!("> ({} B body)", request.body().len());
    }
    let start = Instant::now();
    let mut events = Vec::new();
    let outcome = runtime.block_on(within(deadline, client.send_recording(request, &mut events)));
    let result = match outcome {
        Some(result) => result,
        None => {
            dump(args, &events);
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

#[cfg(test)]
mod tests {
    use super::split_userinfo;

    #[test]
    fn userinfo_is_cut_out_of_the_text() {
        let cred = |u: &str, p: &str| Some((u.as_bytes().to_vec(), p.as_bytes().to_vec()));
        assert_eq!(
            split_userinfo("http://alice:s%3Acret@h:8080/a/%2e%2e/b?q='x'"),
            (
                "http://h:8080/a/%2e%2e/b?q='x'".to_owned(),
                cred("alice", "s:cret")
            )
        );
        assert_eq!(
            split_userinfo("http://user@h/"),
            ("http://h/".to_owned(), cred("user", ""))
        );
        assert_eq!(
            split_userinfo("http://u:p@[::1]:8080/x"),
            ("http://[::1]:8080/x".to_owned(), cred("u", "p"))
        );
        assert_eq!(split_userinfo("http://@h/"), ("http://h/".to_owned(), None));
        assert_eq!(split_userinfo("http://h/a@b"), ("http://h/a@b".to_owned(), None));
        assert_eq!(
            split_userinfo("http://h/?next=u@x"),
            ("http://h/?next=u@x".to_owned(), None)
        );
        // A backslash ends the authority, as the URL parser has it.
        assert_eq!(
            split_userinfo("http://u:p@good.example\\@evil.example/"),
            ("http://good.example\\@evil.example/".to_owned(), cred("u", "p"))
        );
        // Bytes that are no UTF-8 stay bytes.
        assert_eq!(
            split_userinfo("http://u:%FF@h/").1,
            Some((b"u".to_vec(), vec![0xFF]))
        );
    }
}
