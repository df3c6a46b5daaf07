//! The middleboxes of the draft's deployments, as `atls demo` runs them
//! when no third-party ones are asked for: a TLS terminator (HTTPS in, HTTP
//! out), a TLS-intercepting middlebox (a forward proxy that terminates each
//! CONNECT tunnel with a certificate it mints from its own CA, §3.2,
//! Figure 10), and a plain forward proxy (absolute-form requests forwarded,
//! CONNECT tunnelled, Appendix B). Each records what it could read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use atls_core::Certificate;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Largest body a demo middlebox reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Headers of one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// What a hop could read of one exchange.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// Request line as the hop saw it ("POST /.well-known/atls",
    /// "CONNECT localhost:8443").
    pub(crate) line: String,
    pub(crate) request_type: String,
    pub(crate) request_body: Vec<u8>,
    pub(crate) status: u16,
    pub(crate) response_type: String,
    pub(crate) response_body: Vec<u8>,
}

pub(crate) type Log = Arc<Mutex<Vec<Seen>>>;

/// Exchanges a demo middlebox remembers.
const MAX_LOG: usize = 1000;

fn push(log: &Log, seen: Seen) {
    let mut log = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if log.len() < MAX_LOG {
        log.push(seen);
    }
}

/// The demo's middleboxes reach only this machine.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A running middlebox; dropping it stops it.
pub(crate) struct Hop {
    pub(crate) addr: SocketAddr,
    pub(crate) log: Log,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hop {
    /// What it recorded so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn content_type(headers: &http::HeaderMap) -> String {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = status;
    r
}

/// A TLS acceptor for a PEM chain and key held in memory.
pub(crate) fn acceptor(chain_pem: &str, key_pem: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("certificate PEM")?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("key PEM")?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("middlebox certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// An HTTP client of the next hop: HTTPS verified with `roots` (and the
/// public ones), no proxy.
fn next_hop_client(roots: &[Certificate]) -> anyhow::Result<reqwest::Client> {
    let tls = atls_http::client::transport_tls_config(&atls_http::TransportTls {
        roots: roots.to_vec(),
        ..atls_http::TransportTls::default()
    })?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Forward `request` to `url` with `client`, recording what was read.
async fn forward(
    client: &reqwest::Client,
    url: reqwest::Url,
    request: Request<Incoming>,
    log: &Log,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let line = format!("{} {}", parts.method, parts.uri);
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let mut builder = client.request(parts.method.clone(), url);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            builder = builder.header(name, value);
        }
    }
    let mut seen = Seen {
        line,
        request_type: content_type(&parts.headers),
        request_body: body.to_vec(),
        ..Seen::default()
    };
    let mut response = match builder.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            seen.status = 502;
            push(log, seen);
            return reply(StatusCode::BAD_GATEWAY, &format!("next hop: {e}"));
        }
    };
    let status = response.status();
    let headers = response.headers().clone();
    let mut collected = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if collected.len().saturating_add(chunk.len()) <= MAX_BODY => {
                collected.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            _ => {
                seen.status = 502;
                push(log, seen);
                return reply(
                    StatusCode::BAD_GATEWAY,
                    "next hop: the answer failed or is too large",
                );
            }
        }
    }
    let bytes = Bytes::from(collected);
    seen.status = status.as_u16();
    seen.response_type = content_type(&headers);
    seen.response_body = bytes.to_vec();
    push(log, seen);
    let mut out = Response::new(Full::new(bytes));
    *out.status_mut() = status;
    for (name, value) in &headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// `path and query` of `uri` under `base` (its path prefix kept).
fn under(base: &reqwest::Url, uri: &http::Uri) -> reqwest::Url {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}{}", uri.path()));
    url.set_query(uri.query());
    url
}

/// A TLS terminator: HTTPS with `acceptor`'s certificate in, every request
/// forwarded to `upstream`.
pub(crate) async fn terminator(
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: reqwest::Url,
    roots: &[Certificate],
) -> anyhow::Result<Hop> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let log: Log = Arc::default();
    let client = next_hop_client(roots)?;
    let log_ = log.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, client, log, upstream) =
                (acceptor.clone(), client.clone(), log_.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (client, log) = (client.clone(), log.clone());
                    let url = under(&upstream, request.uri());
                    async move { Ok::<_, std::convert::Infallible>(forward(&client, url, request, &log).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(Hop { addr, log, task })
}

/// How a forward proxy treats CONNECT.
#[derive(Clone)]
pub(crate) enum Connect {
    /// Opens the tunnel and relays bytes it cannot read (Appendix B).
    Tunnel,
    /// Terminates the tunnel's TLS with a certificate for the target minted
    /// by this CA, reads the requests, and forwards them over a TLS
    /// connection of its own to the target (a TLS-intercepting
    /// middlebox, §3.2).
    Intercept(Arc<atls_pki::DevCa>),
}

/// A forward proxy: absolute-form requests are forwarded (and read);
/// CONNECT per `connect`. Next hops' TLS is verified with `roots`.
pub(crate) async fn proxy(connect: Connect, roots: &[Certificate]) -> anyhow::Result<Hop> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let log: Log = Arc::default();
    let client = next_hop_client(roots)?;
    let log_ = log.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (client, log, connect) = (client.clone(), log_.clone(), connect.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (client, log, connect) = (client.clone(), log.clone(), connect.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(proxy_request(request, client, log, connect).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(Hop { addr, log, task })
}

async fn proxy_request(
    request: Request<Incoming>,
    client: reqwest::Client,
    log: Log,
    connect: Connect,
) -> Response<Full<Bytes>> {
    if request.method() == http::Method::CONNECT {
        let Some(authority) = request.uri().authority().cloned() else {
            return reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        if !loopback(authority.host()) {
            return reply(
                StatusCode::FORBIDDEN,
                "the demo's proxy reaches only this machine",
            );
        }
        push(
            &log,
            Seen {
                line: format!("CONNECT {authority}"),
                request_type: "-".into(),
                status: 200,
                response_type: "-".into(),
                ..Seen::default()
            },
        );
        tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(request).await else {
                return;
            };
            match connect {
                Connect::Tunnel => {
                    let Ok(mut target) = tokio::net::TcpStream::connect(authority.as_str()).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut target).await;
                }
                Connect::Intercept(ca) => {
                    let host = authority
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let Ok(minted) = ca.issue_server(&[host.as_str()]) else {
                        return;
                    };
                    let chain = format!("{}{}", minted.cert_pem, ca.certificate_pem());
                    let Ok(acceptor) = acceptor(&chain, minted.dangerous_key_pem()) else {
                        return;
                    };
                    let Ok(tls) = acceptor.accept(TokioIo::new(upgraded)).await else {
                        return;
                    };
                    let Ok(base) = reqwest::Url::parse(&format!("https://{authority}/")) else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (client, log) = (client.clone(), log.clone());
                        let url = under(&base, request.uri());
                        async move {
                            Ok::<_, std::convert::Infallible>(forward(&client, url, request, &log).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                }
            }
        });
        return Response::new(Full::new(Bytes::new()));
    }
    let Ok(url) = reqwest::Url::parse(&request.uri().to_string()) else {
        return reply(StatusCode::BAD_REQUEST, "a proxy request has an absolute URI");
    };
    if !url.host_str().is_some_and(loopback) {
        return reply(
            StatusCode::FORBIDDEN,
            "the demo's proxy reaches only this machine",
        );
    }
    forward(&client, url, request, &log).await
}
