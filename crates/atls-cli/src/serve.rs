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
use axum::ServiceExt as _;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::util::BoxCloneService;
use tower::Layer as _;

use crate::common;

/// The end-to-end layer's options in `--help`.
const ATLS: &str = "ATLS layer (end to end, client to this server)";
/// The hop-by-hop layer's: configured apart (draft §5.2).
const TRANSPORT: &str = "Transport layer (hop by hop: the HTTPS listener, the coaps:// DTLS hop)";

/// Arguments of `atls serve`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    /// Plain HTTP listener (HTTP/1.1 and h2c). Default 127.0.0.1:8080 when
    /// no listener is given.
    #[arg(long, value_name = "ADDR")]
    pub(crate) http: Option<SocketAddr>,
    /// CoAP over UDP listener (ATLS flights in POST /.well-known/atls, then
    /// OSCORE).
    #[arg(long, value_name = "ADDR")]
    pub(crate) coap: Option<SocketAddr>,
    /// CoAP over TCP listener (RFC 8323).
    #[arg(long, value_name = "ADDR")]
    pub(crate) coap_tcp: Option<SocketAddr>,
    /// CoAP over DTLS listener (coaps://, RFC 7252 §9): the DTLS hop uses
    /// --coaps-psk keys and/or the --tls-cert certificate (default: the
    /// ATLS certificate).
    #[arg(long, value_name = "ADDR")]
    pub(crate) coaps: Option<SocketAddr>,
    /// PSK of the coaps:// DTLS hop (repeatable): IDENTITY:HEXKEY.
    #[arg(long, value_name = "ID:HEX", help_heading = TRANSPORT)]
    pub(crate) coaps_psk: Vec<String>,
    /// CoAP Content-Format number of ATLS payloads (IANA has assigned none).
    #[arg(long, default_value_t = atls_coap::CONTENT_FORMAT_ATLS)]
    pub(crate) coap_content_format: u16,
    /// CoAP block size of the server's Block2 answers (16..=1024).
    #[arg(long, default_value_t = 512)]
    pub(crate) coap_block_size: usize,
    /// HTTPS listener (the transport TLS layer; needs --tls-cert, --tls-key).
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) https: Option<SocketAddr>,
    /// Transport TLS certificate chain (PEM): the HTTPS listener's, and the
    /// coaps:// hop's.
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT)]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Transport TLS private key (PEM).
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT)]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require transport client certificates issued by this CA (PEM) on the
    /// HTTPS listener and the coaps:// hop (where a --coaps-psk key does
    /// too). Says nothing of who may open an ATLS session: --client-ca.
    #[arg(long, value_name = "FILE", help_heading = TRANSPORT)]
    pub(crate) transport_client_ca: Option<PathBuf>,
    /// Only this TLS version on the HTTPS listener (1.2 or 1.3), whatever
    /// ATLS negotiates inside (--tls-version).
    #[arg(long, value_name = "VERSION", help_heading = TRANSPORT)]
    pub(crate) transport_tls_version: Option<String>,
    /// ATLS certificate chain (PEM). Without it a development CA and server
    /// certificate are created in --state-dir.
    #[arg(long, value_name = "FILE", requires = "key", help_heading = ATLS)]
    pub(crate) cert: Option<PathBuf>,
    /// ATLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = ATLS)]
    pub(crate) key: Option<PathBuf>,
    /// Require ATLS client certificates issued by this CA (PEM).
    #[arg(long, value_name = "FILE", help_heading = ATLS)]
    pub(crate) client_ca: Option<PathBuf>,
    /// Accept an external PSK (repeatable): IDENTITY:HEXKEY.
    #[arg(long, value_name = "ID:HEX", help_heading = ATLS)]
    pub(crate) psk: Vec<String>,
    /// TLS engine for ATLS.
    #[arg(long, default_value = "openssl", value_parser = ["openssl", "rustls"], help_heading = ATLS)]
    pub(crate) engine: String,
    /// Only this ATLS version (1.2 or 1.3); both by default (DTLS 1.2 is
    /// always served beside them).
    #[arg(long, value_name = "VERSION", help_heading = ATLS)]
    pub(crate) tls_version: Option<String>,
    /// Serve these PEM certificates at GET /trust-anchors (built-in app): the
    /// local domain's trust anchors, e.g. of its TLS-intercepting
    /// middlebox, for clients to bootstrap over ATLS (draft §3.2).
    #[arg(long, value_name = "FILE")]
    pub(crate) trust_anchors: Option<PathBuf>,
    /// Send every inner request to this HTTP application (a reverse proxy).
    #[arg(long, value_name = "URL")]
    pub(crate) upstream: Option<String>,
    /// Directory for the development PKI.
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Most 0-RTT bytes accepted per TLS 1.3 session (0 disables 0-RTT).
    #[arg(long, default_value_t = 16384)]
    pub(crate) max_early_data: u32,
    /// Most sessions held at once.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) max_sessions: usize,
    /// Most handshakes in progress at once (beyond: 503 with Retry-After).
    #[arg(long, default_value_t = 1_000)]
    pub(crate) max_half_open: usize,
    /// Most handshakes in progress from one client address (IPv4 address or
    /// IPv6 /64); 0 for no per-client cap.
    #[arg(long, default_value_t = 100)]
    pub(crate) max_half_open_per_client: usize,
    /// Seconds a handshake may take.
    #[arg(long, default_value_t = 30)]
    pub(crate) handshake_timeout: u64,
    /// Seconds an unused session is kept.
    #[arg(long, default_value_t = 600)]
    pub(crate) idle_timeout: u64,
    /// With --max-sessions established sessions, a completed handshake takes
    /// the place of the least recently used one if it has been unused this
    /// many seconds; "never" refuses newcomers instead.
    #[arg(long, default_value = "30", value_name = "SECS|never")]
    pub(crate) evict_idle_after: String,
    /// Largest inner request body, in bytes (every mode).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub(crate) max_request: usize,
    /// Largest inner response body, in bytes (every mode).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub(crate) max_response: usize,
    /// Name of the session cookie.
    #[arg(long, default_value = atls_http::wire::COOKIE_NAME)]
    pub(crate) cookie_name: String,
    /// Count handshakes per client by the last address in this header (set
    /// by a trusted reverse proxy, e.g. x-forwarded-for) instead of the
    /// connection's peer address.
    #[arg(long, value_name = "HEADER")]
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
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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

type App = BoxCloneService<Request<Body>, Response<Body>, std::convert::Infallible>;

/// A configured server, its listeners bound, serving. Dropping it stops them.
pub(crate) struct Running {
    pub(crate) http: Option<SocketAddr>,
    pub(crate) https: Option<SocketAddr>,
    pub(crate) coap: Option<SocketAddr>,
    pub(crate) coap_tcp: Option<SocketAddr>,
    pub(crate) coaps: Option<SocketAddr>,
    pub(crate) ca_path: Option<PathBuf>,
    pub(crate) server: Arc<AtlsServer>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Serve until a listener fails.
    pub(crate) async fn wait(mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(e.into()),
            None => Ok(()),
        }
    }
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
            ..CommonConfig::default()
        },
        identity,
        client_auth_roots: args.client_ca.as_deref().map(common::certificates).transpose()?,
        psks: common::psks(&args.psk)?,
        max_early_data: args.max_early_data,
    };
    let endpoint = engine.server(&config).context("configuring the ATLS server")?;
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
        Some(url) => BoxCloneService::new(
            app::Upstream::new(url)
                .map_err(anyhow::Error::msg)?
                .with_limit(args.max_request.max(args.max_response)),
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
            BoxCloneService::new(app::builtin_with_trust_anchors(anchors))
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
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
        let service = AtlsLayer::new(server.clone()).layer(inner.clone());
        tasks.spawn(async move {
            axum::serve(
                listener,
                service.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .context("HTTP listener")
        });
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
        let service = AtlsLayer::new(server.clone())
            .secure_cookies(true)
            .layer(inner.clone());
        tasks.spawn(serve_https(listener, acceptor, service));
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
        coaps: coaps_bound,
        http: http_bound,
        coap: coap_bound,
        coap_tcp: coap_tcp_bound,
        https: https_bound,
        ca_path,
        server,
        tasks,
    })
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

async fn serve_https<S>(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    service: S,
) -> anyhow::Result<()>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let hyper_service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let mut service = service.clone();
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                async move { service.call(request).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), hyper_service)
                .await;
        });
    }
}

/// Run `atls serve` until interrupted.
pub(crate) fn run(args: &ServeArgs) -> anyhow::Result<()> {
    crate::init_tracing();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let running = start(args).await?;
        if let Some(ca) = &running.ca_path {
            println!("development CA (give it to clients with --ca): {}", ca.display());
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
        tokio::select! {
            result = running.wait() => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
