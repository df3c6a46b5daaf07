//! The client side: one API for the three modes.
//!
//! [`AtlsClient`] handshakes lazily on its first request, keeps the cookies
//! the server (and any load balancer in front of it) sets, reuses the
//! session for later requests, and, in record mode, sends the first request
//! of a resumed TLS 1.3 session as 0-RTT data when the engine holds a ticket
//! that allows it.
//!
//! When the server has forgotten the session (an outer 404), the client
//! handshakes again and resends the request only if its method is idempotent
//! (RFC 9110 §9.2.2); otherwise it returns [`ClientError::SessionLost`], since
//! a middlebox may have swallowed a real answer.
//!
//! Cookies are kept as HTTP clients keep them (RFC 6265, any name, Domain,
//! Path, Max-Age, Expires, Secure), in one store per ATLS session: a new
//! handshake starts with an empty store, so no cookie of a previous session
//! (the old session cookie, a load balancer's affinity cookie) rides along.
//!
//! OSCORE and COSE requests of one client run concurrently (each takes the
//! context's lock only to protect or verify); record-mode requests take turns,
//! since TLS records must travel in order.
//!
//! The outer HTTP runs on reqwest: HTTP/1.1 or HTTP/2 (h2c with prior
//! knowledge, or ALPN over transport TLS), forward proxies (given, or from
//! `HTTPS_PROXY`/`HTTP_PROXY`), and a transport TLS layer that is verified
//! separately from ATLS: two layers, two trust domains (draft §5.2).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atls_core::{
    Certificate, CertifiedKey, ClientEndpoint, ClientSessionParams, ConnectionId, Error as TlsError,
    HandshakeInfo, ProtectionKind, Session, TlsVersion,
};
use atls_oscore::{cose, http as oscore_http, ContextParams, SecurityContext};
use bytes::Bytes;
use cookie_store::CookieStore;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::error::ClientError;
use crate::limits::DerivedLimits;
use crate::wire::{self, Mode};

/// The transport TLS layer of an HTTPS client of ATLS, configured apart
/// from the ATLS layer (draft §5.2; layered TLS §6): its own trust
/// anchors, identity and versions. Trusting a transport CA never makes an
/// ATLS server trusted, nor the reverse.
#[derive(Clone, Debug, Default)]
pub struct TransportTls {
    /// Do not verify the server certificate (a TLS-terminating middlebox
    /// the client cannot validate yet, §5.3). ATLS is verified regardless.
    pub insecure: bool,
    /// Trust anchors besides the public roots.
    pub roots: Vec<Certificate>,
    /// A client certificate, for servers that ask for one.
    pub identity: Option<CertifiedKey>,
    /// Versions offered; empty for TLS 1.2 and 1.3. (DTLS is not a
    /// transport of HTTP.)
    pub versions: Vec<TlsVersion>,
}

/// How an [`AtlsClient`] reaches the server and protects requests.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Protection of application messages.
    pub mode: Mode,
    /// The name ATLS verifies the server certificate against (and sends as
    /// SNI); defaults to the URL's host.
    pub server_name: Option<String>,
    /// Offer the §11 connection-ID extensions (engines that cannot carry them
    /// ignore this and use the fallback IDs).
    pub offer_cids: bool,
    /// Speak HTTP/2 without negotiation on `http://` URLs (h2c prior knowledge).
    pub http2_prior_knowledge: bool,
    /// A forward proxy for every request; `None` uses `HTTPS_PROXY`/`HTTP_PROXY`.
    pub proxy: Option<String>,
    /// The transport TLS layer (https:// URLs and proxies), configured
    /// apart from ATLS.
    pub transport: TransportTls,
    /// Limit for one outer exchange.
    pub timeout: Duration,
    /// Limit for connecting to the server or proxy (default: `timeout`).
    pub connect_timeout: Option<Duration>,
    /// Largest inner response body accepted. A larger one is a
    /// [`ClientError::ResponseTooLarge`]; the session stays usable.
    pub max_response: usize,
    /// Send the first record-mode request of a resumed TLS 1.3 session as 0-RTT data.
    pub early_data: bool,
    /// Keep each outer exchange's bodies in its [`WireEvent`].
    pub capture_bodies: bool,
    /// Open a new outer connection for every exchange (for hops such as
    /// tinyproxy that close kept-alive connections unannounced).
    pub no_connection_reuse: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            server_name: None,
            offer_cids: true,
            http2_prior_knowledge: false,
            proxy: None,
            transport: TransportTls::default(),
            timeout: Duration::from_secs(30),
            connect_timeout: None,
            max_response: 4 * 1024 * 1024,
            early_data: true,
            capture_bodies: false,
            no_connection_reuse: false,
        }
    }
}

/// Largest server handshake flight a client accepts (certificate chains).
const MAX_SERVER_FLIGHT: usize = 64 * 1024;

impl ClientOptions {
    /// Every body and buffer limit the client applies, derived from
    /// `max_response`.
    pub fn derived(&self) -> DerivedLimits {
        // Requests are bounded by the server; what the client receives, by
        // `max_response`.
        DerivedLimits::new(
            (usize::MAX, self.max_response),
            self.max_response,
            usize::MAX,
            MAX_SERVER_FLIGHT,
            0,
        )
    }
}

/// One outer HTTP exchange, for `-v` output and the demo.
#[derive(Clone, Debug)]
pub struct WireEvent {
    /// What the exchange carried ("handshake", "records", "oscore", "cose").
    pub kind: &'static str,
    /// Outer method and path.
    pub request_line: String,
    /// Outer request content type and body size.
    pub request_type: String,
    /// Bytes of the outer request body.
    pub request_bytes: usize,
    /// Outer response status.
    pub status: StatusCode,
    /// Outer response content type.
    pub response_type: String,
    /// Bytes of the outer response body.
    pub response_bytes: usize,
    /// Time of the exchange.
    pub elapsed: Duration,
    /// The outer HTTP version.
    pub http_version: http::Version,
    /// The outer request and response bodies, when
    /// [`ClientOptions::capture_bodies`] is set (for `atls request
    /// --dump-flights`); empty otherwise.
    pub bodies: Option<(Bytes, Bytes)>,
}

/// A response and the outer exchanges it took.
#[derive(Debug)]
pub struct Exchange {
    /// The inner (plaintext) response.
    pub response: Response<Bytes>,
    /// What crossed the wire, in order.
    pub events: Vec<WireEvent>,
    /// What the ATLS handshake negotiated.
    pub info: HandshakeInfo,
    /// Whether the request travelled as accepted 0-RTT data.
    pub early_data: bool,
}

/// One ATLS session of a client.
struct ClientSession {
    info: HandshakeInfo,
    /// The cookies of this session, and only of it.
    cookies: Mutex<CookieStore>,
    /// Record mode: the TLS session, one exchange at a time.
    tls: tokio::sync::Mutex<Session>,
    oscore: Mutex<SecurityContext>,
    cose: Mutex<SecurityContext>,
}

/// An ATLS client bound to one server URL.
pub struct AtlsClient {
    http: reqwest::Client,
    base: reqwest::Url,
    endpoint: Arc<dyn ClientEndpoint>,
    options: ClientOptions,
    limits: DerivedLimits,
    /// The current session. Its lock is held to start one (concurrent first
    /// requests share one handshake) and to replace it, never for a request.
    current: tokio::sync::Mutex<Option<Arc<ClientSession>>>,
}

impl fmt::Debug for AtlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtlsClient")
            .field("base", &self.base.as_str())
            .field("engine", &self.endpoint.engine_name())
            .field("mode", &self.options.mode)
            .finish_non_exhaustive()
    }
}

fn transport(e: impl fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Certificate verifier that accepts any transport certificate: only for a
/// transport TLS layer terminated by a middlebox the user chose not to trust.
#[derive(Debug)]
struct NoTransportVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoTransportVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn transport_tls(options: &ClientOptions) -> Result<rustls::ClientConfig, ClientError> {
    transport_tls_config(&options.transport)
}

/// The rustls configuration of the transport layer `t`: the public roots
/// plus `t.roots` (or no verification with `t.insecure`), `t.identity` as
/// the client certificate, `t.versions`; ALPN h2 and http/1.1.
pub fn transport_tls_config(t: &TransportTls) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    for v in &t.versions {
        match v {
            TlsVersion::Tls13 => versions.push(&rustls::version::TLS13),
            TlsVersion::Tls12 => versions.push(&rustls::version::TLS12),
            other => {
                return Err(ClientError::Invalid(format!(
                    "{} is not a transport of HTTP",
                    other.name()
                )))
            }
        }
    }
    if versions.is_empty() {
        versions = vec![&rustls::version::TLS13, &rustls::version::TLS12];
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(transport)?;
    let builder = if t.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoTransportVerification(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in &t.roots {
            roots
                .add(rustls_pki_types::CertificateDer::from(cert.0.clone()))
                .map_err(|e| ClientError::Invalid(format!("transport CA: {e}")))?;
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &t.identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = identity
                .chain
                .iter()
                .map(|c| rustls_pki_types::CertificateDer::from(c.0.clone()))
                .collect();
            let key = rustls_pki_types::PrivateKeyDer::try_from(identity.key.dangerous_der().to_vec())
                .map_err(|e| ClientError::Invalid(format!("transport client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Invalid(format!("transport client certificate: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn random_cid() -> Result<Option<ConnectionId>, ClientError> {
    let mut cid = [0u8; 4];
    getrandom::fill(&mut cid).map_err(|e| ClientError::Invalid(format!("random: {e}")))?;
    Ok(ConnectionId::new(cid.to_vec()).ok())
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_owned()
}

/// RFC 9110 §9.2.2: requests that may be sent again without changing the outcome.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// One outer HTTP request.
struct OuterRequest<'a> {
    kind: &'static str,
    method: Method,
    path: &'a str,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Largest answer body read.
    limit: usize,
}

/// The outer answer to one request.
struct Outer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Outer {
    /// An outer 404 without the expected protected media type: the server
    /// does not know the session.
    fn is_session_lost(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
            && !wire::is_media_type(&self.headers, wire::CONTENT_TYPE_ATLS)
            && !wire::is_media_type(&self.headers, wire::CONTENT_TYPE_OSCORE)
            && !wire::is_media_type(&self.headers, "application/cose")
    }
}

/// Where the records of an `application/atls` answer go as they arrive:
/// into the TLS session, keeping at most `keep` bytes of plaintext.
struct RecordSink<'s> {
    tls: &'s mut Session,
    plaintext: Vec<u8>,
    keep: usize,
    /// More plaintext arrived than `keep`: it was decrypted (the session
    /// stays in step) and dropped.
    overflow: bool,
}

impl<'s> RecordSink<'s> {
    fn new(tls: &'s mut Session, keep: usize) -> Self {
        Self {
            tls,
            plaintext: Vec::new(),
            keep,
            overflow: false,
        }
    }

    fn take(&mut self) {
        let data = self.tls.take_received();
        if self.overflow || data.is_empty() {
            return;
        }
        if self.plaintext.len().saturating_add(data.len()) > self.keep {
            self.overflow = true;
            self.plaintext = Vec::new();
        } else {
            self.plaintext.extend_from_slice(&data);
        }
    }
}

/// How a request on an existing session ended.
enum Attempt {
    Done(Response<Bytes>),
    /// The exchange failed but left the session in step (a response over
    /// the client's limit that still decrypted).
    Kept(ClientError),
    /// The server does not know the session.
    Lost(StatusCode),
}

impl AtlsClient {
    /// A client for the ATLS server at `base` (scheme, authority and an
    /// optional path prefix), running sessions on `endpoint`.
    pub fn new(
        base: &str,
        endpoint: Arc<dyn ClientEndpoint>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let base = reqwest::Url::parse(base).map_err(|e| ClientError::Invalid(format!("URL {base}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Invalid(format!(
                "URL scheme {} is not http or https",
                base.scheme()
            )));
        }
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(transport_tls(&options)?)
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout.unwrap_or(options.timeout))
            .redirect(reqwest::redirect::Policy::none());
        if options.no_connection_reuse {
            builder = builder.pool_max_idle_per_host(0);
        }
        if options.http2_prior_knowledge {
            builder = builder.http2_prior_knowledge();
        }
        if let Some(proxy) = &options.proxy {
            builder =
                builder.proxy(reqwest::Proxy::all(proxy).map_err(|e| ClientError::Invalid(e.to_string()))?);
        }
        let http = builder.build().map_err(transport)?;
        Ok(Self {
            http,
            base,
            endpoint,
            limits: options.derived(),
            options,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The mode requests are protected with.
    pub fn mode(&self) -> Mode {
        self.options.mode
    }

    /// What the current session negotiated, if there is one.
    pub async fn session_info(&self) -> Option<HandshakeInfo> {
        self.current.lock().await.as_ref().map(|s| s.info.clone())
    }

    /// The cookies the current session sends to the server's base URL, as
    /// `name=value` pairs.
    pub async fn cookies(&self) -> Vec<(String, String)> {
        let Some(session) = self.current.lock().await.clone() else {
            return Vec::new();
        };
        let store = lock(&session.cookies);
        store
            .get_request_values(&self.base)
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    /// Forget the current session without telling the server (the next
    /// request handshakes again, resuming when the engine holds a ticket).
    pub async fn reset(&self) {
        *self.current.lock().await = None;
    }

    /// End the current session so the server frees it at once, then forget
    /// it: in record mode with close_notify, in OSCORE and COSE modes with a
    /// protected `DELETE /.well-known/atls` (the server keeps no TLS state
    /// for those sessions once they are used; PROTOCOL.md §12). Failures to
    /// reach the server are ignored (the server expires the session anyway).
    pub async fn close(&self) {
        let Some(session) = self.current.lock().await.take() else {
            return;
        };
        if self.options.mode != Mode::Records {
            let Ok(request) = Request::builder()
                .method(Method::DELETE)
                .uri(wire::WELL_KNOWN_PATH)
                .body(Bytes::new())
            else {
                return;
            };
            let mut events = Vec::new();
            let _ = match self.options.mode {
                Mode::Cose => self.send_cose(&session, &request, &mut events).await,
                _ => self.send_oscore(&session, &request, &mut events).await,
            };
            return;
        }
        let flight = {
            let mut tls = session.tls.lock().await;
            tls.close();
            tls.take_flight(Instant::now())
        };
        if let Ok(Some(flight)) = flight {
            let request = OuterRequest {
                kind: "close",
                method: Method::POST,
                path: wire::WELL_KNOWN_PATH,
                headers: Self::atls_headers(),
                body: flight,
                limit: MAX_SERVER_FLIGHT,
            };
            let _ = self.post(request, &session.cookies, &mut Vec::new(), None).await;
        }
    }

    fn url(&self, path_and_query: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        url.set_path(&format!("{prefix}{path}"));
        url.set_query((!query.is_empty()).then_some(query));
        url
    }

    /// One outer exchange. With a `sink`, a 200 `application/atls` answer is
    /// fed to the TLS session record by record as it arrives (up to the
    /// records-stream limit), and the returned body is empty; any other
    /// answer is read whole, up to the request's `limit`.
    async fn post(
        &self,
        request: OuterRequest<'_>,
        cookies: &Mutex<CookieStore>,
        events: &mut Vec<WireEvent>,
        sink: Option<&mut RecordSink<'_>>,
    ) -> Result<Outer, ClientError> {
        let OuterRequest {
            kind,
            method,
            path,
            headers,
            body,
            limit,
        } = request;
        let start = Instant::now();
        let url = self.url(path);
        let request_type = content_type(&headers);
        let request_bytes = body.len();
        let captured_request = self.options.capture_bodies.then(|| Bytes::from(body.clone()));
        let mut captured_response: Vec<u8> = Vec::new();
        let mut builder = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers)
            .body(body);
        let cookie_header = {
            let store = lock(cookies);
            let pairs: Vec<String> = store
                .get_request_values(&url)
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            pairs.join("; ")
        };
        if !cookie_header.is_empty() {
            builder = builder.header(header::COOKIE, cookie_header);
        }
        let mut response = builder.send().await.map_err(|e| {
            // reqwest's Display omits the cause chain, which names the real failure.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            ClientError::Transport(message)
        })?;
        let status = response.status();
        let http_version = response.version();
        let headers = response.headers().clone();
        {
            let mut store = lock(cookies);
            for value in headers.get_all(header::SET_COOKIE) {
                if let Ok(text) = value.to_str() {
                    // A cookie the store refuses (wrong domain, bad syntax) is ignored, as browsers do.
                    let _ = store.parse(text, &url);
                }
            }
        }
        let too_large = ClientError::ResponseTooLarge {
            limit: self.options.max_response,
        };
        let streamed = status == StatusCode::OK && wire::is_media_type(&headers, wire::CONTENT_TYPE_ATLS);
        let mut body = Vec::new();
        let mut received = 0usize;
        // The exchange is recorded even when reading or feeding its answer
        // fails (`-v` shows the steps that happened).
        let read: Result<(), ClientError> = async {
            match sink.filter(|_| streamed) {
                Some(sink) => {
                    let mut pending = Vec::new();
                    while let Some(chunk) = response.chunk().await.map_err(transport)? {
                        received = received.saturating_add(chunk.len());
                        if received > self.limits.records_stream {
                            return Err(too_large);
                        }
                        pending.extend_from_slice(&chunk);
                        if captured_request.is_some() {
                            captured_response.extend_from_slice(&chunk);
                        }
                        let mut start = 0usize;
                        loop {
                            let rest = pending.get(start..).unwrap_or_default();
                            let piece = atls_core::records::complete_records_within(
                                sink.tls.framing(),
                                rest,
                                self.limits.tls.max_flight_len,
                                atls_core::records::MAX_RECORDS_PER_FLIGHT,
                            )
                            .map_err(|e| ClientError::Handshake(TlsError::MalformedFlight(e)))?;
                            if piece == 0 {
                                break;
                            }
                            sink.tls
                                .push_flight(rest.get(..piece).unwrap_or_default(), Instant::now())?;
                            start += piece;
                            sink.take();
                        }
                        pending.drain(..start);
                    }
                    if !pending.is_empty() {
                        return Err(ClientError::Handshake(TlsError::MalformedFlight(
                            atls_core::FlightError::Truncated {
                                offset: received - pending.len(),
                            },
                        )));
                    }
                }
                None => {
                    if response.content_length().is_some_and(|l| l > limit as u64) {
                        return Err(too_large);
                    }
                    while let Some(chunk) = response.chunk().await.map_err(transport)? {
                        if body.len() + chunk.len() > limit {
                            return Err(too_large);
                        }
                        body.extend_from_slice(&chunk);
                    }
                    received = body.len();
                }
            }
            Ok(())
        }
        .await;
        events.push(WireEvent {
            kind,
            request_line: format!("{method} {path}"),
            request_type,
            request_bytes,
            status,
            response_type: content_type(&headers),
            response_bytes: received,
            elapsed: start.elapsed(),
            http_version,
            bodies: captured_request.map(|request| {
                let response = if captured_response.is_empty() {
                    Bytes::from(body.clone())
                } else {
                    Bytes::from(captured_response)
                };
                (request, response)
            }),
        });
        read?;
        Ok(Outer {
            status,
            headers,
            body: Bytes::from(body),
        })
    }

    fn atls_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(wire::CONTENT_TYPE_ATLS),
        );
        headers
    }

    /// Run a handshake; in record mode `request` (HTTP/1.1 bytes) rides along:
    /// as 0-RTT data when possible, otherwise with the client's Finished.
    /// Returns the session and the response bytes when the request was answered.
    async fn handshake(
        &self,
        mut request: Option<&[u8]>,
        events: &mut Vec<WireEvent>,
    ) -> Result<(ClientSession, Option<Result<Vec<u8>, ClientError>>, bool), ClientError> {
        let host = self
            .base
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let params = ClientSessionParams {
            server_name: Some(self.options.server_name.clone().unwrap_or(host)),
            // Each mode offers only its own extension.
            oscore_cid: if self.options.offer_cids && self.options.mode == Mode::Oscore {
                random_cid()?
            } else {
                None
            },
            cose_cid: if self.options.offer_cids && self.options.mode == Mode::Cose {
                random_cid()?
            } else {
                None
            },
        };
        let mut session = Session::client(self.endpoint.as_ref(), &params)?;
        session.set_limits(self.limits.tls);
        let cookies = Mutex::new(CookieStore::default());
        let mut early_written = 0;
        if let Some(bytes) = request.filter(|_| self.options.early_data) {
            early_written = session.write_early_data(bytes, Instant::now())?;
        }
        let mut answer: Option<Vec<u8>> = None;
        let mut overflow = false;
        let mut request_sent = early_written > 0;
        loop {
            if session.is_handshake_complete() {
                if let Some(bytes) = request.take() {
                    let accepted = session.handshake_info().is_some_and(|i| i.early_data_accepted);
                    let rest = if accepted {
                        &bytes[early_written.min(bytes.len())..]
                    } else {
                        bytes
                    };
                    if !accepted {
                        early_written = 0;
                    }
                    if !rest.is_empty() {
                        session.send(rest)?;
                    }
                    request_sent = true;
                }
            }
            let Some(flight) = session.take_flight(Instant::now())? else {
                if session.is_handshake_complete() {
                    break;
                }
                return Err(TlsError::Protocol(
                    "the handshake stalled: nothing to send, not complete".into(),
                )
                .into());
            };
            let mut sink = RecordSink::new(&mut session, self.limits.inner_message);
            let outer = self
                .post(
                    OuterRequest {
                        kind: "handshake",
                        method: Method::POST,
                        path: wire::WELL_KNOWN_PATH,
                        headers: Self::atls_headers(),
                        body: flight,
                        limit: MAX_SERVER_FLIGHT,
                    },
                    &cookies,
                    events,
                    Some(&mut sink),
                )
                .await?;
            let (plaintext, too_much) = (std::mem::take(&mut sink.plaintext), sink.overflow);
            drop(sink);
            if too_much {
                overflow = true;
                answer.get_or_insert_with(Vec::new);
            } else if !plaintext.is_empty() && !overflow {
                answer.get_or_insert_with(Vec::new).extend_from_slice(&plaintext);
            }
            if outer.status != StatusCode::OK {
                return Err(self.refused(&mut session, outer));
            }
            if !wire::is_media_type(&outer.headers, wire::CONTENT_TYPE_ATLS) {
                return Err(ClientError::UnexpectedStatus {
                    status: outer.status,
                    message: format!("answer is {}, not application/atls", content_type(&outer.headers)),
                });
            }
            let done = session.is_handshake_complete() && !session.wants_write() && request.is_none();
            if done && (!request_sent || answer.is_some()) {
                break;
            }
        }
        if request_sent && answer.is_none() {
            // Never send the request again: the server may have acted on it.
            return Err(ClientError::UnexpectedStatus {
                status: StatusCode::OK,
                message: "the server did not answer the request sent with the handshake".into(),
            });
        }
        let info = session
            .handshake_info()
            .cloned()
            .ok_or(TlsError::HandshakeNotComplete)?;
        let context = |kind: ProtectionKind| -> Result<SecurityContext, ClientError> {
            let keys = session.atls_keys(kind)?;
            let ids = session.protection_ids(kind)?;
            // Client contexts die with the session: a restarted client
            // handshakes again and never reuses these keys.
            let mut ctx = SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids))?;
            ctx.set_max_message(self.limits.max_message);
            Ok(ctx)
        };
        let oscore = Mutex::new(context(ProtectionKind::Oscore)?);
        let cose = Mutex::new(context(ProtectionKind::Cose)?);
        let early = early_written > 0 && info.early_data_accepted;
        Ok((
            ClientSession {
                info,
                cookies,
                tls: tokio::sync::Mutex::new(session),
                oscore,
                cose,
            },
            answer.filter(|_| request_sent).map(|bytes| {
                if overflow {
                    Err(ClientError::ResponseTooLarge {
                        limit: self.options.max_response,
                    })
                } else {
                    Ok(bytes)
                }
            }),
            early,
        ))
    }

    /// The error for a non-200 answer to a handshake flight.
    fn refused(&self, session: &mut Session, outer: Outer) -> ClientError {
        if wire::is_media_type(&outer.headers, wire::CONTENT_TYPE_ATLS) && !outer.body.is_empty() {
            // The body is the server's alert: let the engine decode it.
            match session.push_flight(&outer.body, Instant::now()) {
                Err(TlsError::AlertReceived(alert)) => {
                    return ClientError::HandshakeRefused {
                        status: outer.status,
                        alert: Some(alert),
                    }
                }
                Err(e) => return ClientError::Handshake(e),
                Ok(()) => {}
            }
        }
        if outer.status == StatusCode::BAD_REQUEST {
            return ClientError::HandshakeRefused {
                status: outer.status,
                alert: None,
            };
        }
        Self::unexpected(outer)
    }

    fn unexpected(outer: Outer) -> ClientError {
        match outer.status {
            StatusCode::PAYLOAD_TOO_LARGE => ClientError::RequestTooLarge {
                status: outer.status,
                message: snippet(&outer.body),
            },
            status => ClientError::UnexpectedStatus {
                status,
                message: snippet(&outer.body),
            },
        }
    }

    /// Send one request, protected in the configured mode; returns the inner response.
    pub async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ClientError> {
        self.send_traced(request).await.map(|e| e.response)
    }

    /// Like [`AtlsClient::send`], also reporting what crossed the wire.
    pub async fn send_traced(&self, request: Request<Bytes>) -> Result<Exchange, ClientError> {
        let mut events = Vec::new();
        self.send_recording(request, &mut events).await
    }

    /// [`send_traced`](Self::send_traced), recording each outer exchange in
    /// `events` as it happens: on success they move into the returned
    /// [`Exchange`], on failure they stay in `events` (for `-v` output of
    /// the steps that did happen).
    pub async fn send_recording(
        &self,
        request: Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Exchange, ClientError> {
        // A forgotten session is redone once, for idempotent requests only.
        for attempt in 0..2 {
            let (session, answered) = self.session(&request, events).await?;
            if let Some((bytes, early)) = answered {
                // A new record-mode session answered the request during its
                // handshake (an answer over the limit leaves the session in step).
                let response = self.parse_records_response(&bytes?)?;
                return Ok(Exchange {
                    response,
                    events: std::mem::take(events),
                    info: session.info.clone(),
                    early_data: early,
                });
            }
            let attempt_result = match self.options.mode {
                Mode::Records => self.send_records(&session, &request, events).await,
                Mode::Oscore => self.send_oscore(&session, &request, events).await,
                Mode::Cose => self.send_cose(&session, &request, events).await,
            };
            match attempt_result {
                Ok(Attempt::Done(response)) => {
                    return Ok(Exchange {
                        response,
                        events: std::mem::take(events),
                        info: session.info.clone(),
                        early_data: false,
                    })
                }
                Ok(Attempt::Kept(e)) => return Err(e),
                Ok(Attempt::Lost(status)) => {
                    tracing::debug!("the server forgot the ATLS session");
                    self.forget(&session).await;
                    if attempt == 0 && is_idempotent(request.method()) {
                        continue;
                    }
                    return Err(ClientError::SessionLost {
                        method: request.method().clone(),
                        status,
                    });
                }
                Err(e) => {
                    if self.breaks_session(&e) {
                        self.forget(&session).await;
                    }
                    return Err(e);
                }
            }
        }
        Err(ClientError::SessionLost {
            method: request.method().clone(),
            status: StatusCode::NOT_FOUND,
        })
    }

    /// Whether an error leaves the session unusable. Record mode: any
    /// failure of the exchange (the record sequences may be out of step; an
    /// in-step failure is an [`Attempt::Kept`]). OSCORE/COSE: only an
    /// exhausted context; a refused or tampered message leaves it intact.
    fn breaks_session(&self, e: &ClientError) -> bool {
        match self.options.mode {
            Mode::Records => !matches!(e, ClientError::Invalid(_)),
            Mode::Oscore | Mode::Cose => matches!(
                e,
                ClientError::Protection(atls_oscore::OscoreError::SequenceExhausted)
            ),
        }
    }

    /// The current session, or a new one. In record mode a new session
    /// carries `request` in its handshake and returns its answer.
    async fn session(
        &self,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<(Arc<ClientSession>, Option<(Result<Vec<u8>, ClientError>, bool)>), ClientError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref() {
            return Ok((session.clone(), None));
        }
        let inner = (self.options.mode == Mode::Records).then(|| wire::encode_request(request));
        let (session, answer, early) = self.handshake(inner.as_deref(), events).await?;
        let session = Arc::new(session);
        *current = Some(session.clone());
        Ok((session, answer.map(|bytes| (bytes, early))))
    }

    /// Drop `session` if it is still the current one.
    async fn forget(&self, session: &Arc<ClientSession>) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }

    fn parse_records_response(&self, bytes: &[u8]) -> Result<Response<Bytes>, ClientError> {
        match wire::parse_response(bytes, self.options.max_response) {
            Ok(response) => Ok(response),
            Err(crate::WireError::TooLarge) => Err(ClientError::ResponseTooLarge {
                limit: self.options.max_response,
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn send_records(
        &self,
        session: &ClientSession,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Attempt, ClientError> {
        let mut tls = session.tls.lock().await;
        tls.send(&wire::encode_request(request))?;
        let records = tls.take_flight(Instant::now())?.unwrap_or_default();
        let mut sink = RecordSink::new(&mut tls, self.limits.inner_message);
        let outer = self
            .post(
                OuterRequest {
                    kind: "records",
                    method: Method::POST,
                    path: wire::WELL_KNOWN_PATH,
                    headers: Self::atls_headers(),
                    body: records,
                    limit: MAX_SERVER_FLIGHT,
                },
                &session.cookies,
                events,
                Some(&mut sink),
            )
            .await?;
        if outer.is_session_lost() {
            return Ok(Attempt::Lost(outer.status));
        }
        if outer.status != StatusCode::OK || !wire::is_media_type(&outer.headers, wire::CONTENT_TYPE_ATLS) {
            return Err(Self::unexpected(outer));
        }
        if sink.overflow {
            return Ok(Attempt::Kept(ClientError::ResponseTooLarge {
                limit: self.options.max_response,
            }));
        }
        match self.parse_records_response(&sink.plaintext) {
            Ok(response) => Ok(Attempt::Done(response)),
            // In step: the answer decrypted, only its body is too large.
            Err(e @ ClientError::ResponseTooLarge { .. }) => Ok(Attempt::Kept(e)),
            // An answer missing or cut short: the record sequences may be
            // out of step.
            Err(e) => Err(e),
        }
    }

    async fn send_oscore(
        &self,
        session: &ClientSession,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Attempt, ClientError> {
        let inner = request.clone().map(|b| b.to_vec());
        let packet = oscore_http::coap_request_from_http(&inner)?;
        let (outer, binding) = atls_oscore::protect_request(&mut lock(&session.oscore), &packet)?;
        let outer_http = oscore_http::request_to_http(&outer, "/")?;
        let mut headers = outer_http.headers().clone();
        headers.remove(header::HOST);
        let answer = self
            .post(
                OuterRequest {
                    kind: "oscore",
                    method: Method::POST,
                    path: "/",
                    headers,
                    body: outer_http.into_body(),
                    limit: self.limits.oscore_body,
                },
                &session.cookies,
                events,
                None,
            )
            .await?;
        if answer.is_session_lost() {
            return Ok(Attempt::Lost(answer.status));
        }
        if answer.status == StatusCode::OK && wire::is_media_type(&answer.headers, wire::CONTENT_TYPE_OSCORE)
        {
            let mut response = Response::new(answer.body.to_vec());
            *response.headers_mut() = answer.headers;
            let outer = oscore_http::response_from_http(&response)?;
            let inner = atls_oscore::unprotect_response(&mut lock(&session.oscore), &outer, &binding)?;
            if inner.payload.len() > self.options.max_response {
                return Err(ClientError::ResponseTooLarge {
                    limit: self.options.max_response,
                });
            }
            let response = oscore_http::http_response_from_coap(&inner)?;
            return Ok(Attempt::Done(response.map(Bytes::from)));
        }
        Err(Self::protection_refused(answer))
    }

    fn protection_refused(answer: Outer) -> ClientError {
        match answer.status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => ClientError::ProtectionRefused {
                status: answer.status,
                message: snippet(&answer.body),
            },
            _ => Self::unexpected(answer),
        }
    }

    async fn send_cose(
        &self,
        session: &ClientSession,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Attempt, ClientError> {
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // Bind the target as it goes on the wire (the URL parser resolves
        // dot segments and drops an empty query), base path included.
        let url = self.url(&target);
        let sent = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let line = cose::RequestLine {
            method: request.method().as_str(),
            target: &sent,
        };
        let (sealed, binding) = cose::seal_request(&mut lock(&session.cose), &line, request.body())?;
        let mut headers = request.headers().clone();
        for name in [header::HOST, header::CONTENT_LENGTH, header::CONTENT_TYPE] {
            headers.remove(name);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(wire::CONTENT_TYPE_COSE),
        );
        let answer = self
            .post(
                OuterRequest {
                    kind: "cose",
                    method: request.method().clone(),
                    path: &target,
                    headers,
                    body: sealed,
                    limit: self.limits.cose_body,
                },
                &session.cookies,
                events,
                None,
            )
            .await?;
        if answer.is_session_lost() {
            return Ok(Attempt::Lost(answer.status));
        }
        if wire::is_media_type(&answer.headers, "application/cose") {
            let plaintext = cose::open_response(
                &mut lock(&session.cose),
                answer.status.as_u16(),
                &answer.body,
                &binding,
            )?;
            if plaintext.len() > self.options.max_response {
                return Err(ClientError::ResponseTooLarge {
                    limit: self.options.max_response,
                });
            }
            let mut response = Response::new(Bytes::from(plaintext));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            response.headers_mut().remove(header::CONTENT_TYPE);
            response.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(Attempt::Done(response));
        }
        Err(Self::protection_refused(answer))
    }
}
