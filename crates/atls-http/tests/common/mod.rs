//! Servers and clients on loopback for the end-to-end tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;

use atls_core::{ClientConfig, Engine, ServerConfig, TlsVersion};
use atls_http::{app, AtlsClient, AtlsLayer, AtlsServer, ClientOptions, Mode, ServerLimits, ServerOptions};
use axum::ServiceExt;
use bytes::Bytes;
use http::Request;
use tower::Layer;

pub use atls_tests::{client_config, engines, pki, server_config, SERVER_NAME};

/// A running `atls serve` equivalent on loopback.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<AtlsServer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A server config with 0-RTT enabled.
pub fn server_config_0rtt(version: TlsVersion) -> ServerConfig {
    ServerConfig {
        max_early_data: 16 * 1024,
        ..server_config(version)
    }
}

/// Serve the built-in application behind ATLS on `engine`.
pub async fn serve(engine: &dyn Engine, config: &ServerConfig, limits: ServerLimits) -> TestServer {
    let options = ServerOptions {
        limits,
        ..ServerOptions::default()
    };
    serve_app(engine, config, options, app::builtin()).await
}

/// Serve `app` behind ATLS on `engine` with `options`.
pub async fn serve_app(
    engine: &dyn Engine,
    config: &ServerConfig,
    options: ServerOptions,
    app: axum::Router,
) -> TestServer {
    let endpoint = engine.server(config).expect("server endpoint");
    let server = AtlsServer::with_options(endpoint, options).expect("server options");
    // The layer wraps the whole router (not `Router::layer`, which wraps
    // each route and would never see `/.well-known/atls`).
    let service = AtlsLayer::new(server.clone()).layer(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            service.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    TestServer { addr, server, task }
}

/// A client config for `version` with 0-RTT offered.
pub fn client_config_0rtt(version: TlsVersion) -> ClientConfig {
    ClientConfig {
        early_data: true,
        ..client_config(version)
    }
}

/// A client of `url` on `engine`, verifying the fixture server name.
pub fn client(engine: &dyn Engine, config: &ClientConfig, url: &str, options: ClientOptions) -> AtlsClient {
    let endpoint = engine.client(config).expect("client endpoint");
    AtlsClient::new(
        url,
        endpoint,
        ClientOptions {
            server_name: Some(SERVER_NAME.into()),
            ..options
        },
    )
    .expect("client")
}

pub fn get(path: &str) -> Request<Bytes> {
    Request::get(path).body(Bytes::new()).expect("request")
}

pub fn post(path: &str, body: &[u8]) -> Request<Bytes> {
    Request::post(path)
        .header("content-type", "application/octet-stream")
        .body(Bytes::copy_from_slice(body))
        .expect("request")
}

pub fn mode_options(mode: Mode) -> ClientOptions {
    ClientOptions {
        mode,
        ..ClientOptions::default()
    }
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("JSON: {e}: {}", String::from_utf8_lossy(body)))
}

/// A plain HTTP client for hand-made outer requests (no ATLS).
pub fn raw() -> reqwest::Client {
    raw_from(None)
}

/// A plain HTTP client whose connections leave from `local` (another
/// loopback address: a different client for the per-client caps).
pub fn raw_from(local: Option<std::net::IpAddr>) -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .local_address(local)
        .build()
        .expect("client")
}

/// A real TLS 1.3 ClientHello from a fresh client session.
pub fn client_hello() -> Vec<u8> {
    let endpoint = engines()[0]
        .client(&client_config(TlsVersion::Tls13))
        .expect("endpoint");
    let mut session =
        atls_core::Session::client(endpoint.as_ref(), &atls_tests::client_params()).expect("session");
    session
        .take_flight(std::time::Instant::now())
        .expect("flight")
        .expect("ClientHello")
}

/// POST `body` to the well-known ATLS path as application/atls.
pub async fn post_atls(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    cookie: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{url}{}", atls_http::wire::WELL_KNOWN_PATH))
        .header("content-type", atls_http::wire::CONTENT_TYPE_ATLS)
        .body(body);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.expect("send")
}

/// What an on-path middlebox in the tests does to the traffic it forwards.
#[derive(Default)]
pub struct Tamper {
    /// Forward the next this many protected requests (OSCORE, COSE, or
    /// application-data records) but answer the client 404, swallowing the
    /// real answer.
    pub swallow: std::sync::atomic::AtomicUsize,
    /// Rewrite the method of protected requests.
    pub method: std::sync::Mutex<Option<http::Method>>,
    /// Rewrite the path of protected requests.
    pub path: std::sync::Mutex<Option<String>>,
    /// Rewrite the status of answers to protected requests.
    pub status: std::sync::Mutex<Option<http::StatusCode>>,
    /// `Set-Cookie` values added to every answer.
    pub set_cookies: std::sync::Mutex<Vec<String>>,
    /// The `Cookie` header of every request forwarded, in order.
    pub cookies_seen: std::sync::Mutex<Vec<String>>,
    /// The body and `Cookie` header of the last protected request forwarded.
    pub last_protected: std::sync::Mutex<Option<(Vec<u8>, String)>>,
}

/// A forwarding HTTP proxy on loopback in front of `upstream` that applies
/// its [`Tamper`] settings.
pub struct TamperProxy {
    pub addr: SocketAddr,
    pub tamper: Arc<Tamper>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TamperProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn is_protected(headers: &http::HeaderMap, body: &[u8]) -> bool {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ct.starts_with("application/oscore") || ct.starts_with("application/cose") || body.first() == Some(&23)
}

pub async fn tamper_proxy(upstream: &str) -> TamperProxy {
    use std::sync::atomic::Ordering;
    let tamper = Arc::new(Tamper::default());
    let upstream = upstream.to_owned();
    let client = raw();
    let state = tamper.clone();
    let handler = move |request: Request<axum::body::Body>| {
        let (client, upstream, tamper) = (client.clone(), upstream.clone(), state.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.expect("body");
            let protected = is_protected(&parts.headers, &body);
            if protected {
                let cookie = parts
                    .headers
                    .get("cookie")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                *tamper.last_protected.lock().expect("lock") = Some((body.to_vec(), cookie));
            }
            let mut method = parts.method.clone();
            let mut path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            if protected {
                if let Some(m) = tamper.method.lock().expect("lock").clone() {
                    method = m;
                }
                if let Some(p) = tamper.path.lock().expect("lock").clone() {
                    path = p;
                }
            }
            if let Some(cookie) = parts.headers.get("cookie").and_then(|v| v.to_str().ok()) {
                tamper.cookies_seen.lock().expect("lock").push(cookie.to_owned());
            } else {
                tamper.cookies_seen.lock().expect("lock").push(String::new());
            }
            let mut forward = client.request(method, format!("{upstream}{path}")).body(body);
            for (name, value) in &parts.headers {
                if name != "host" && name != "content-length" {
                    forward = forward.header(name, value);
                }
            }
            let answer = forward.send().await.expect("upstream");
            let mut status = answer.status();
            let headers = answer.headers().clone();
            let bytes = answer.bytes().await.expect("upstream body");
            let mut response = http::Response::new(axum::body::Body::from(bytes));
            for (name, value) in &headers {
                if name != "content-length" && name != "transfer-encoding" {
                    response.headers_mut().append(name, value.clone());
                }
            }
            if protected {
                if let Some(s) = *tamper.status.lock().expect("lock") {
                    status = s;
                }
                let swallow = tamper
                    .swallow
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if swallow {
                    let mut lost = http::Response::new(axum::body::Body::from("swallowed\n"));
                    *lost.status_mut() = http::StatusCode::NOT_FOUND;
                    return lost;
                }
            }
            *response.status_mut() = status;
            for cookie in tamper.set_cookies.lock().expect("lock").iter() {
                response
                    .headers_mut()
                    .append("set-cookie", cookie.parse().expect("cookie"));
            }
            response
        }
    };
    let app = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("proxy");
    });
    TamperProxy { addr, tamper, task }
}

/// The built-in application plus test routes: `/count` (POST and GET)
/// counts how often the application ran it; `/barrier` answers 200 only once
/// two requests wait in it at the same time (500 after 10 s alone); `/big/N`
/// returns N bytes; `/nothing` answers 204 No Content.
pub fn test_app(counter: Arc<std::sync::atomic::AtomicUsize>) -> axum::Router {
    use axum::routing::get;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let count = move || {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            n.to_string()
        }
    };
    app::builtin()
        .route("/count", get(count.clone()).post(count))
        .route(
            "/barrier",
            get(move || {
                let barrier = barrier.clone();
                async move {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), barrier.wait()).await {
                        Ok(_) => (http::StatusCode::OK, "together"),
                        Err(_) => (http::StatusCode::INTERNAL_SERVER_ERROR, "alone"),
                    }
                }
            }),
        )
        .route("/nothing", get(|| async { http::StatusCode::NO_CONTENT }))
        .route(
            "/big/{n}",
            get(|axum::extract::Path(n): axum::extract::Path<usize>| async move { vec![b'x'; n] }),
        )
}
