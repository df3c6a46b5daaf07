//! `atls serve`: an ATLS terminator in front of the built-in resources or of
//! any HTTP application (`--upstream`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use atls_core::{Certificate, CertifiedKey, CommonConfig, ServerConfig};
use atls_http::{app, AtlsLayer, AtlsServer, ServerLimits, ServerOptions};
use axum::body::Body;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::util::BoxCloneSyncService;
use tower::Layer as _;

use crate::common;

/// The end-to-end layer's options in `--help`.
const ATLS: &str = "ATLS layer (end to end, client to this server)";
/// The hop-by-hop layer's: configured apart (draft §5.2).
const TRANSPORT: &str = "Transport layer (hop by hop: the HTTPS listener, the coaps:// DTLS hop)";

/// Arguments of `atls serve`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    /// Read options from this TOML file: `flag-name = value` for every
    /// option (`http = "127.0.0.1:8080"`, `psk = ["id:hex"]`, `https = ...`).
    /// Precedence: the command line, then the environment (ATLS_SERVE_<FLAG>),
    /// then this file, then the defaults.
    #[arg(long, value_name = "FILE", env = "ATLS_SERVE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Plain HTTP listener (HTTP/1.1 and h2c). Default 127.0.0.1:8080 when
    /// no listener is given.
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_HTTP")]
    pub(crate) http: Option<SocketAddr>,
    /// CoAP over UDP listener (ATLS flights in POST /.well-known/atls, then
    /// OSCORE).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_COAP")]
    pub(crate) coap: Option<SocketAddr>,
    /// CoAP over TCP listener (RFC 8323).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_COAP_TCP")]
    pub(crate) coap_tcp: Option<SocketAddr>,
    /// CoAP over DTLS listener (coaps://, RFC 7252 §9): the DTLS hop uses
    /// --coaps-psk keys and/or the --tls-cert certificate (default: the
    /// ATLS certificate).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_COAPS")]
    pub(crate) coaps: Option<SocketAddr>,
    /// PSK of the coaps:// DTLS hop (repeatable): IDENTITY:HEXKEY.
    #[arg(long, value_name = "ID:HEX", help_heading = TRANSPORT, env = "ATLS_SERVE_COAPS_PSK", hide_env_values = true, value_delimiter = ',')]
    pub(crate) coaps_psk: Vec<String>,
    /// CoAP Content-Format number of ATLS payloads (IANA has assigned none).
    #[arg(long, default_value_t = atls_coap::CONTENT_FORMAT_ATLS, env = "ATLS_SERVE_COAP_CONTENT_FORMAT")]
    pub(crate) coap_content_format: u16,
    /// CoAP block size of the server's Block2 answers (16..=1024).
    #[arg(long, default_value_t = 512, env = "ATLS_SERVE_COAP_BLOCK_SIZE")]
    pub(crate) coap_block_size: usize,
    /// HTTPS listener (the transport TLS layer; needs --tls-cert, --tls-key).
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"], value_parser = common::listen_addr, env = "ATLS_SERVE_HTTPS")]
    pub(crate) https: Option<SocketAddr>,
    /// Transport TLS certificate chain (PEM): the HTTPS listener's, and the
    /// coaps:// hop's.
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT, env = "ATLS_SERVE_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Transport TLS private key (PEM).
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT, env = "ATLS_SERVE_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require transport client certificates issued by this CA (PEM) on the
    /// HTTPS listener and the coaps:// hop (where a --coaps-psk key does
    /// too). Says nothing of who may open an ATLS session: --client-ca.
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT, env = "ATLS_SERVE_TRANSPORT_CLIENT_CA")]
    pub(crate) transport_client_ca: Option<PathBuf>,
    /// Only this TLS version on the HTTPS listener (1.2 or 1.3), whatever
    /// ATLS negotiates inside (--tls-version).
    #[arg(long, value_name = "VERSION", help_heading = TRANSPORT, env = "ATLS_SERVE_TRANSPORT_TLS_VERSION")]
    pub(crate) transport_tls_version: Option<String>,
    /// ATLS certificate chain (PEM). Without it a development CA and server
    /// certificate are created in --state-dir.
    #[arg(long, value_name = "FILE", requires = "key", help_heading = ATLS, env = "ATLS_SERVE_CERT")]
    pub(crate) cert: Option<PathBuf>,
    /// ATLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = ATLS, env = "ATLS_SERVE_KEY")]
    pub(crate) key: Option<PathBuf>,
    /// Require ATLS client certificates issued by this CA (PEM).
    #[arg(long, value_name = "FILE", help_heading = ATLS, env = "ATLS_SERVE_CLIENT_CA")]
    pub(crate) client_ca: Option<PathBuf>,
    /// Accept an external PSK (repeatable): IDENTITY:HEXKEY. Without --cert
    /// the server is then PSK-only: no development certificate is made,
    /// and clients that expect a certificate are refused.
    #[arg(long, value_name = "ID:HEX", help_heading = ATLS, env = "ATLS_SERVE_PSK", hide_env_values = true, value_delimiter = ',')]
    pub(crate) psk: Vec<String>,
    /// TLS engine for ATLS.
    #[arg(long, default_value = "openssl", value_parser = ["openssl", "rustls"], help_heading = ATLS, env = "ATLS_SERVE_ENGINE")]
    pub(crate) engine: String,
    /// Only this ATLS version (1.2 or 1.3); both by default (DTLS 1.2 is
    /// always served beside them).
    #[arg(long, value_name = "VERSION", help_heading = ATLS, env = "ATLS_SERVE_TLS_VERSION")]
    pub(crate) tls_version: Option<String>,
    /// Serve these PEM certificates at GET /trust-anchors (built-in app): the
    /// local domain's trust anchors, e.g. of its TLS-intercepting
    /// middlebox, for clients to bootstrap over ATLS (draft §3.2).
    #[arg(long, value_name = "FILE", env = "ATLS_SERVE_TRUST_ANCHORS")]
    pub(crate) trust_anchors: Option<PathBuf>,
    /// Send every inner request to this HTTP application (a reverse proxy;
    /// an http:// URL). Without it the built-in resources answer: GET
    /// /hello, POST /echo, GET /session, GET /trust-anchors (with
    /// --trust-anchors); GET /health is answered outside ATLS either way.
    #[arg(long, value_name = "URL", value_parser = common::HttpUrlParser, env = "ATLS_SERVE_UPSTREAM", hide_env_values = true)]
    pub(crate) upstream: Option<String>,
    /// Seconds the --upstream application may take to answer (then 504).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "30",
        value_parser = common::positive_seconds,
        env = "ATLS_SERVE_UPSTREAM_TIMEOUT"
    )]
    pub(crate) upstream_timeout: Duration,
    /// Serve the same application without ATLS on this listener: the
    /// baseline of `atls bench --baseline`. Nothing on it is protected: for
    /// measurements only, never for production (loopback addresses only).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_PLAIN")]
    pub(crate) plain: Option<SocketAddr>,
    /// Serve the same application without ATLS over HTTPS on this listener,
    /// with the ATLS certificate and the ATLS engine's TLS library (OpenSSL
    /// or rustls), without session resumption: the "new HTTPS connection"
    /// baseline of `atls bench --baseline https://…`. For measurements only
    /// (loopback addresses only).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_PLAIN_HTTPS")]
    pub(crate) plain_https: Option<SocketAddr>,
    /// Prometheus metrics listener (a separate port: handshakes by outcome,
    /// requests by mode and status, latency, sessions).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_SERVE_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Seconds requests in flight may take to finish after SIGTERM or
    /// SIGINT, before the server exits (a second signal exits at once).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        value_parser = common::seconds,
        env = "ATLS_SERVE_SHUTDOWN_GRACE"
    )]
    pub(crate) shutdown_grace: Duration,
    /// Directory for the development PKI, created 0700 (default:
    /// $XDG_DATA_HOME/atls, else ~/.local/share/atls).
    #[arg(long, value_name = "DIR", env = "ATLS_SERVE_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Most 0-RTT bytes accepted per TLS 1.3 session (0 disables 0-RTT).
    #[arg(long, default_value_t = 16384, env = "ATLS_SERVE_MAX_EARLY_DATA")]
    pub(crate) max_early_data: u32,
    /// Issue no session tickets and keep no session cache: every session is
    /// a full handshake (and 0-RTT is off). Saves the engines' per-ticket
    /// state (OpenSSL keeps stateful tickets when 0-RTT is on).
    #[arg(long, env = "ATLS_SERVE_NO_RESUMPTION")]
    pub(crate) no_resumption: bool,
    /// Most sessions held at once.
    #[arg(long, default_value_t = 10_000, env = "ATLS_SERVE_MAX_SESSIONS")]
    pub(crate) max_sessions: usize,
    /// Most handshakes in progress at once (beyond: 503 with Retry-After).
    #[arg(long, default_value_t = 1_000, env = "ATLS_SERVE_MAX_HALF_OPEN")]
    pub(crate) max_half_open: usize,
    /// Most handshakes in progress from one client address (IPv4 address or
    /// IPv6 /64); 0 for no per-client cap.
    #[arg(long, default_value_t = 100, env = "ATLS_SERVE_MAX_HALF_OPEN_PER_CLIENT")]
    pub(crate) max_half_open_per_client: usize,
    /// Seconds a handshake may take.
    #[arg(long, default_value_t = 30, env = "ATLS_SERVE_HANDSHAKE_TIMEOUT")]
    pub(crate) handshake_timeout: u64,
    /// Seconds an unused session is kept.
    #[arg(long, default_value_t = 600, env = "ATLS_SERVE_IDLE_TIMEOUT")]
    pub(crate) idle_timeout: u64,
    /// With --max-sessions established sessions, a completed handshake takes
    /// the place of the least recently used one if it has been unused this
    /// many seconds; "never" refuses newcomers instead.
    #[arg(
        long,
        default_value = "30",
        value_name = "SECS|never",
        env = "ATLS_SERVE_EVICT_IDLE_AFTER"
    )]
    pub(crate) evict_idle_after: String,
    /// Largest inner request body, in bytes (every mode).
    #[arg(long, default_value_t = 1024 * 1024, env = "ATLS_SERVE_MAX_REQUEST")]
    pub(crate) max_request: usize,
    /// Largest inner response body, in bytes (every mode).
    #[arg(long, default_value_t = 4 * 1024 * 1024, env = "ATLS_SERVE_MAX_RESPONSE")]
    pub(crate) max_response: usize,
    /// Name of the session cookie.
    #[arg(long, default_value = atls_http::wire::COOKIE_NAME, env = "ATLS_SERVE_COOKIE_NAME")]
    pub(crate) cookie_name: String,
    /// Count handshakes per client by the last address in this header (set
    /// by a trusted reverse proxy, e.g. x-forwarded-for) instead of the
    /// connection's peer address.
    #[arg(long, value_name = "HEADER", env = "ATLS_SERVE_CLIENT_ADDRESS_HEADER")]
    pub(crate) client_address_header: Option<String>,
}

/// The development PKI of a state directory: created once, reused after.
pub(crate) struct DevPki {
    pub(crate) ca_path: PathBuf,
    pub(crate) identity: CertifiedKey,
}

pub(crate) fn dev_pki(dir: &Path) -> anyhow::Result<DevPki> {
    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    if !(ca_path.exists() && cert_path.exists() && key_path.exists()) {
        common::create_private_dir(dir)?;
        let ca = atls_pki::DevCa::new("atls development CA").context("creating the development CA")?;
        let server = ca
            .issue_server(&["localhost", "127.0.0.1", "::1", "atls.test"])
            .context("issuing the server certificate")?;
        std::fs::write(&ca_path, ca.certificate_pem())
            .with_context(|| format!("writing {}", ca_path.display()))?;
        let chain = format!("{}{}", server.cert_pem, ca.certificate_pem());
        std::fs::write(&cert_path, chain).with_context(|| format!("writing {}", cert_path.display()))?;
        common::write_private(&key_path, server.dangerous_key_pem().as_bytes())?;
    }
    Ok(DevPki {
        identity: common::certified_key(&cert_path, &key_path)?,
        ca_path,
    })
}

type App = BoxCloneSyncService<Request<Body>, Response<Body>, std::convert::Infallible>;

/// A configured server, its listeners bound, serving. Dropping it stops them.
pub(crate) struct Running {
    pub(crate) http: Option<SocketAddr>,
    pub(crate) https: Option<SocketAddr>,
    pub(crate) coap: Option<SocketAddr>,
    pub(crate) coap_tcp: Option<SocketAddr>,
    pub(crate) coaps: Option<SocketAddr>,
    pub(crate) plain: Option<SocketAddr>,
    pub(crate) plain_https: Option<SocketAddr>,
    pub(crate) ca_path: Option<PathBuf>,
    pub(crate) server: Arc<AtlsServer>,
    /// Listeners stopped at once on shutdown (CoAP: each exchange is one
    /// message).
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    /// Listeners that drain on shutdown (HTTP, HTTPS).
    draining: tokio::task::JoinSet<anyhow::Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn next_end(set: &mut tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    match set.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(e.into()),
        None => std::future::pending().await,
    }
}

/// Resolves when `stop` turns true.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl Running {
    /// Serve until a listener fails.
    pub(crate) async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            result = next_end(&mut self.tasks) => result,
            result = next_end(&mut self.draining) => result,
        }
    }

    /// Stop accepting, let requests in flight finish for up to `grace`,
    /// then stop everything. Returns whether every request finished.
    pub(crate) async fn shutdown(mut self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        let drained = tokio::time::timeout(grace, async {
            while self.draining.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        self.draining.abort_all();
        drained
    }
}

/// `GET /health`: liveness, outside ATLS, without secrets.
async fn health(server: Arc<AtlsServer>) -> Response<Body> {
    let stats = server.stats();
    let body = serde_json::json!({
        "status": "ok",
        "engine": server.engine_name(),
        "sessions": { "established": stats.established, "half_open": stats.half_open },
    });
    let mut r = Response::new(Body::from(body.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// One `info` event per outer request (target `atls::access`): what the
/// server saw outside ATLS — peer, method, outer path, content type, sizes,
/// status, time, the protection the content type says, and the session
/// cookie's first 8 hex digits (enough to follow a session, not to use it).
async fn access_log(
    axum::extract::State(cookie_name): axum::extract::State<Arc<str>>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response<Body> {
    let start = std::time::Instant::now();
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".into());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let mode = match content_type.split(';').next().unwrap_or_default().trim() {
        atls_http::wire::CONTENT_TYPE_ATLS => "atls",
        atls_http::wire::CONTENT_TYPE_OSCORE => "oscore",
        "application/cose" => "cose",
        _ => "-",
    };
    let request_bytes = http_body::Body::size_hint(request.body()).exact();
    let session = match atls_http::wire::session_cookie(request.headers(), &cookie_name) {
        atls_http::wire::CookieLookup::Session(id) => id.prefix(),
        _ => "-".into(),
    };
    let response = next.run(request).await;
    let response_bytes = http_body::Body::size_hint(response.body()).exact();
    let status = response.status().as_u16();
    metrics::counter!("atls_requests_total", "mode" => mode, "status" => status.to_string(), "transport" => "http").increment(1);
    metrics::histogram!("atls_request_duration_seconds", "mode" => mode, "transport" => "http")
        .record(start.elapsed().as_secs_f64());
    tracing::info!(
        target: "atls::access",
        peer,
        method = %method,
        path,
        content_type,
        mode,
        session,
        status = response.status().as_u16(),
        request_bytes,
        response_bytes,
        duration_us = start.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// The ATLS service with `GET /health` beside it, and the access log.
fn with_health<S>(server: Arc<AtlsServer>, atls: S) -> axum::Router
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let cookie_name: Arc<str> = Arc::from(server.cookie_name());
    let state = cookie_name;
    axum::Router::new()
        .route("/health", axum::routing::get(move || health(server.clone())))
        .fallback_service(atls)
        .layer(axum::middleware::from_fn_with_state(state, access_log))
}

/// A session table's counts as gauges, and its unfinished handshakes as
/// the `expired` outcome of `atls_handshakes_total`.
fn record_table(stats: &atls_http::TableStats, transport: &'static str) {
    metrics::gauge!("atls_sessions", "state" => "established", "transport" => transport)
        .set(stats.established as f64);
    metrics::gauge!("atls_sessions", "state" => "half_open", "transport" => transport)
        .set(stats.half_open as f64);
    metrics::counter!("atls_handshakes_total", "outcome" => "expired", "transport" => transport)
        .absolute(stats.counters.expired_half_open);
}

/// Serve Prometheus metrics on `addr` (the exporter answers any path, e.g.
/// GET /metrics).
pub(crate) fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        bail!("--metrics needs a port: one chosen by the system would be shown nowhere");
    }
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ])
        .context("histogram buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))?;
    Ok(())
}

/// Build the server and bind its listeners.
pub(crate) async fn start(args: &ServeArgs) -> anyhow::Result<Running> {
    let engine = common::engine(&args.engine)?;
    let (identity, ca_path) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (Some(common::certified_key(cert, key)?), None),
        _ if !args.psk.is_empty() => (None, None),
        _ => {
            let dir = args.state_dir.clone().unwrap_or_else(common::default_state_dir);
            let pki = dev_pki(&dir)?;
            (Some(pki.identity), Some(pki.ca_path))
        }
    };
    let config = ServerConfig {
        common: CommonConfig {
            versions: common::versions(args.tls_version.as_deref())?,
            resumption: !args.no_resumption,
            ..CommonConfig::default()
        },
        identity,
        client_auth_roots: args.client_ca.as_deref().map(common::certificates).transpose()?,
        psks: common::psks(&args.psk)?,
        max_early_data: if args.no_resumption {
            0
        } else {
            args.max_early_data
        },
    };
    let endpoint = engine.server(&config).map_err(|e| {
        common::explain(
            e,
            "configuring the ATLS server",
            args.cert.as_deref(),
            args.key.as_deref(),
        )
    })?;
    // DTLS 1.2 as the ATLS layer over CoAP (OpenSSL has it): the same
    // credentials, told apart from TLS by the first record.
    let dtls_endpoint = {
        let mut dtls = config.clone();
        dtls.common.versions = vec![atls_core::TlsVersion::Dtls12];
        dtls.max_early_data = 0;
        common::engine("openssl")?
            .server(&dtls)
            .context("configuring the DTLS ATLS server")?
    };
    let coaps_transport = match args.coaps {
        None => None,
        Some(_) => {
            let identity = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(common::certified_key(cert, key)?),
                _ => config.identity.clone(),
            };
            let psks = common::psks(&args.coaps_psk)?;
            if identity.is_none() && psks.is_empty() {
                bail!("--coaps needs --coaps-psk or a certificate");
            }
            let mut common = CommonConfig {
                versions: vec![atls_core::TlsVersion::Dtls12],
                ..CommonConfig::default()
            };
            common.resumption = false;
            common.dtls.cookie_exchange = true;
            let transport = ServerConfig {
                common,
                identity,
                psks,
                client_auth_roots: args
                    .transport_client_ca
                    .as_deref()
                    .map(common::certificates)
                    .transpose()?,
                ..ServerConfig::default()
            };
            Some(
                common::engine("openssl")?
                    .server(&transport)
                    .context("configuring the coaps:// DTLS hop")?,
            )
        }
    };
    let evict_idle_after = match args.evict_idle_after.as_str() {
        "never" => None,
        secs => Some(Duration::from_secs(
            secs.parse()
                .context("--evict-idle-after expects seconds or \"never\"")?,
        )),
    };
    let limits = ServerLimits {
        max_sessions: args.max_sessions,
        max_half_open: args.max_half_open,
        max_half_open_per_client: args.max_half_open_per_client,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        evict_idle_after,
        max_request: args.max_request,
        max_response: args.max_response,
        ..ServerLimits::default()
    };
    let client_address_header = args
        .client_address_header
        .as_deref()
        .map(|name| http::HeaderName::from_bytes(name.as_bytes()))
        .transpose()
        .context("--client-address-header expects a header name")?;
    let options = ServerOptions {
        limits,
        cookie_name: args.cookie_name.clone(),
        client_address_header,
    };
    let coap_endpoint = endpoint.clone();
    // DTLS flights over HTTP too (a device whose ATLS layer is DTLS, behind
    // a CoAP-to-HTTP gateway): told apart by the first record.
    let server = AtlsServer::with_dtls(endpoint, dtls_endpoint.clone(), options)?;
    let inner: App = match &args.upstream {
        Some(url) => BoxCloneSyncService::new(
            app::Upstream::new(url)
                .map_err(anyhow::Error::msg)?
                .with_limit(args.max_request.max(args.max_response))
                .with_timeout(args.upstream_timeout),
        ),
        None => {
            let anchors = match &args.trust_anchors {
                Some(path) => {
                    let pem = common::read(path)?;
                    Certificate::all_from_pem(&pem)
                        .ok()
                        .filter(|c| !c.is_empty())
                        .with_context(|| format!("no PEM certificate in {}", path.display()))?;
                    Some(bytes::Bytes::from(pem))
                }
                None => None,
            };
            BoxCloneSyncService::new(app::builtin_with_trust_anchors(anchors))
        }
    };

    if let Some(addr) = args.metrics {
        install_metrics(addr)?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut draining = tokio::task::JoinSet::new();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let http_addr = match (args.http, args.https) {
        (None, None) if args.coap.is_none() && args.coap_tcp.is_none() && args.coaps.is_none() => {
            Some(SocketAddr::from(([127, 0, 0, 1], 8080)))
        }
        (http, _) => http,
    };
    let mut http_bound = None;
    if let Some(addr) = http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        http_bound = Some(listener.local_addr()?);
        let service = with_health(
            server.clone(),
            AtlsLayer::new(server.clone()).layer(inner.clone()),
        );
        draining.spawn(serve_http(listener, service, stop_rx.clone(), "HTTP listener"));
    }
    let mut plain_bound = None;
    if let Some(addr) = args.plain {
        if !addr.ip().is_loopback() {
            bail!("--plain serves the application without ATLS: only on a loopback address (127.0.0.1, ::1)");
        }
        tracing::warn!(%addr, "--plain: serving the application WITHOUT ATLS on this listener (a benchmark baseline)");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        plain_bound = Some(listener.local_addr()?);
        // The same access log and metrics as the ATLS listeners, so that a
        // baseline differs from them by ATLS alone.
        let service = with_health(server.clone(), inner.clone());
        draining.spawn(serve_http(
            listener,
            service,
            stop_rx.clone(),
            "plain HTTP listener",
        ));
    }
    let mut plain_https_bound = None;
    if let Some(addr) = args.plain_https {
        if !addr.ip().is_loopback() {
            bail!("--plain-https serves the application without ATLS: only on a loopback address (127.0.0.1, ::1)");
        }
        let Some(identity) = &config.identity else {
            bail!("--plain-https needs the ATLS certificate (not a PSK-only server)");
        };
        tracing::warn!(%addr, "--plain-https: serving the application WITHOUT ATLS on this listener (a benchmark baseline)");
        let acceptor = baseline_acceptor(&args.engine, identity)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        plain_https_bound = Some(listener.local_addr()?);
        let service = with_health(server.clone(), inner.clone());
        draining.spawn(serve_https(listener, acceptor, service, stop_rx.clone()));
    }
    let mut https_bound = None;
    if let Some(addr) = args.https {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!("--https needs --tls-cert and --tls-key");
        };
        let acceptor = tls_acceptor(
            cert,
            key,
            args.transport_client_ca.as_deref(),
            args.transport_tls_version.as_deref(),
        )?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        https_bound = Some(listener.local_addr()?);
        let service = with_health(
            server.clone(),
            AtlsLayer::new(server.clone())
                .secure_cookies(true)
                .layer(inner.clone()),
        );
        draining.spawn(serve_https(
            listener,
            Acceptor::Rustls(acceptor),
            service,
            stop_rx.clone(),
        ));
    }
    let coap_config = atls_coap::CoapConfig {
        content_format: args.coap_content_format,
        block_size: args.coap_block_size.clamp(16, 1024),
        policy: limits.policy(),
        ..atls_coap::CoapConfig::default()
    };
    // One CoAP server for both transports: a device's sessions are the same
    // whichever it uses.
    let coap_server =
        atls_coap::CoapServer::with_dtls(coap_endpoint.clone(), Some(dtls_endpoint), coap_config);
    {
        // The tables' gauges, once a second: reading the counts takes the
        // table lock, which the request path does not.
        let (http, coap) = (server.clone(), coap_server.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                record_table(&http.stats(), "http");
                record_table(&coap.stats(), "coap");
            }
        });
    }
    let mut coap_tcp_bound = None;
    if let Some(addr) = args.coap_tcp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP {addr}"))?;
        coap_tcp_bound = Some(listener.local_addr()?);
        let coap = coap_server.clone();
        tasks.spawn(async move {
            atls_coap::tcp::serve(listener, coap)
                .await
                .context("CoAP over TCP listener")
        });
    }
    let mut coap_bound = None;
    if let Some(addr) = args.coap {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}"))?;
        coap_bound = Some(socket.local_addr()?);
        let coap = coap_server.clone();
        tasks.spawn(async move { atls_coap::udp::serve(socket, coap).await.context("CoAP listener") });
    }
    let mut coaps_bound = None;
    if let (Some(addr), Some(transport)) = (args.coaps, coaps_transport) {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}"))?;
        coaps_bound = Some(socket.local_addr()?);
        let coap = coap_server.clone();
        tasks.spawn(async move {
            atls_coap::dtls::serve(socket, transport, coap, atls_coap::DtlsServerConfig::default())
                .await
                .context("CoAP over DTLS listener")
        });
    }
    Ok(Running {
        plain: plain_bound,
        plain_https: plain_https_bound,
        coaps: coaps_bound,
        http: http_bound,
        coap: coap_bound,
        coap_tcp: coap_tcp_bound,
        https: https_bound,
        ca_path,
        server,
        tasks,
        draining,
        stop,
    })
}

/// A plain HTTP listener (HTTP/1.1 and h2c) serving `service` with the
/// peer address, until `stop`; then it returns once its connections have
/// finished their requests.
async fn serve_http(
    listener: tokio::net::TcpListener,
    service: axum::Router,
    stop: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
) -> anyhow::Result<()> {
    axum::serve(
        listener,
        service.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stopped(stop))
    .await
    .context(what)
}

/// The HTTPS listener's TLS: its certificate, optionally client
/// certificates from `client_ca`, optionally one version.
fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    version: Option<&str>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(&common::read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("certificates in {}", cert.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&common::read(key)?)
        .with_context(|| format!("private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match version {
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
        Some("1.3") => vec![&rustls::version::TLS13],
        Some("1.2") => vec![&rustls::version::TLS12],
        Some(other) => bail!("--transport-tls-version {other:?}: 1.2 or 1.3"),
    };
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&versions)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in common::certificates(ca)? {
                roots
                    .add(rustls_pki_types::CertificateDer::from(c.0))
                    .context("transport client CA")?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .context("transport client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("transport TLS certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The TLS library an HTTPS listener terminates with.
#[derive(Clone)]
enum Acceptor {
    Rustls(tokio_rustls::TlsAcceptor),
    OpenSsl(Arc<openssl::ssl::SslAcceptor>),
}

/// The `--plain-https` baseline's TLS: the ATLS certificate on the ATLS
/// engine's library, TLS 1.2 and 1.3, no tickets or session cache.
fn baseline_acceptor(engine: &str, identity: &CertifiedKey) -> anyhow::Result<Acceptor> {
    if engine == "rustls" {
        let (chain, key) = atls_rustls::chain_and_key(identity).context("the ATLS certificate and key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        return Ok(Acceptor::Rustls(tokio_rustls::TlsAcceptor::from(Arc::new(
            config,
        ))));
    }
    use openssl::ssl::{SslAcceptor, SslMethod, SslOptions, SslSessionCacheMode};
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    let (leaf, rest) = identity
        .chain
        .split_first()
        .context("the ATLS certificate chain is empty")?;
    let leaf = openssl::x509::X509::from_der(&leaf.0)?;
    builder.set_certificate(&leaf)?;
    for cert in rest {
        builder.add_extra_chain_cert(openssl::x509::X509::from_der(&cert.0)?)?;
    }
    let key = openssl::pkey::PKey::private_key_from_der(identity.key.dangerous_der())?;
    builder.set_private_key(&key)?;
    builder.check_private_key()?;
    builder.set_options(SslOptions::NO_TICKET);
    builder.set_session_cache_mode(SslSessionCacheMode::OFF);
    builder.set_num_tickets(0)?;
    Ok(Acceptor::OpenSsl(Arc::new(builder.build())))
}

/// The HTTPS listener. On `stop` it accepts no more connections and
/// returns once the connections it has finished their requests.
async fn serve_https<S>(
    listener: tokio::net::TcpListener,
    acceptor: Acceptor,
    service: S,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stopping = std::pin::pin!(stopped(stop));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopping => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let hyper_service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let mut service = service.clone();
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                async move { service.call(request).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let handshake = Duration::from_secs(10);
            match acceptor {
                Acceptor::Rustls(acceptor) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(handshake, acceptor.accept(stream)).await else {
                        return;
                    };
                    let connection = builder
                        .serve_connection(TokioIo::new(tls), hyper_service)
                        .into_owned();
                    let _ = watcher.watch(connection).await;
                }
                Acceptor::OpenSsl(acceptor) => {
                    let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
                        return;
                    };
                    let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, stream) else {
                        return;
                    };
                    let accepted =
                        tokio::time::timeout(handshake, std::pin::Pin::new(&mut tls).accept()).await;
                    if !matches!(accepted, Ok(Ok(()))) {
                        return;
                    }
                    let connection = builder
                        .serve_connection(TokioIo::new(tls), hyper_service)
                        .into_owned();
                    let _ = watcher.watch(connection).await;
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Run `atls serve` until interrupted.
pub(crate) fn run(args: &ServeArgs) -> anyhow::Result<()> {
    crate::init_tracing();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut signals = Signals::new();
        let running = start(args).await?;
        if let Some(ca) = &running.ca_path {
            println!("development CA (give it to clients with --ca): {}", ca.display());
        }
        if args.cert.is_none() && !args.psk.is_empty() {
            println!("PSK only: no ATLS certificate (give --cert and --key to serve certificate clients too)");
        }
        if let Some(addr) = running.http {
            println!(
                "ATLS over HTTP on http://{addr} (engine {})",
                running.server.engine_name()
            );
        }
        if let Some(addr) = running.coap {
            println!(
                "ATLS over CoAP on coap://{addr} (engine {})",
                running.server.engine_name()
            );
        }
        if let Some(addr) = running.coap_tcp {
            println!(
                "ATLS over CoAP over TCP on coap+tcp://{addr} (engine {})",
                running.server.engine_name()
            );
        }
        if let Some(addr) = running.coaps {
            println!(
                "ATLS over CoAP over DTLS on coaps://{addr} (engine {})",
                running.server.engine_name()
            );
        }
        if let Some(addr) = running.https {
            println!(
                "ATLS over HTTPS on https://{addr} (engine {})",
                running.server.engine_name()
            );
        }
        if let Some(addr) = running.plain {
            println!("plain HTTP without ATLS (a baseline for atls bench) on http://{addr}");
        }
        if let Some(addr) = running.plain_https {
            println!("HTTPS without ATLS (a baseline for atls bench) on https://{addr}");
        }
        if let Some(addr) = args.metrics {
            println!("metrics on http://{addr}/metrics");
        }
        let mut running = running;
        tokio::select! {
            result = running.wait() => return result,
            name = signals.next() => tracing::info!(signal = name, "stopping: no new connections; draining requests in flight"),
        }
        let grace = args.shutdown_grace;
        tokio::select! {
            drained = running.shutdown(grace) => {
                if drained {
                    tracing::info!("stopped");
                } else {
                    tracing::warn!(grace_secs = grace.as_secs_f64(), "stopped with requests still in flight after the grace period");
                }
            }
            name = signals.next() => force_exit(name),
        }
        Ok(())
    })
}

/// A second signal during the drain: exit at once, with the status of a
/// process that signal ended (130 for SIGINT, 143 for SIGTERM).
pub(crate) fn force_exit(signal: &'static str) -> ! {
    tracing::warn!(
        signal,
        "second signal: exiting without waiting for requests in flight"
    );
    std::process::exit(if signal == "SIGINT" { 130 } else { 143 })
}

/// SIGINT and SIGTERM, listened for from start-up to exit: a signal that
/// arrives while the first is being handled is not lost.
pub(crate) struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Start listening (inside the runtime).
    pub(crate) fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The name of the next signal.
    pub(crate) async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.int) => "SIGINT",
                () = recv(&mut self.term) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
