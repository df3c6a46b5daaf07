//! The client side: one API for the three modes.
//!
//! [`AtlsClient`] handshakes lazily on its first request, keeps the session
//! cookie, reuses the session for later requests, handshakes again when the
//! server has forgotten the session (404), and, in record mode, sends the
//! first request of a resumed TLS 1.3 session as 0-RTT data when the engine
//! holds a ticket that allows it.
//!
//! The outer HTTP runs on reqwest: HTTP/1.1 or HTTP/2 (h2c with prior
//! knowledge, or ALPN over transport TLS), forward proxies (given, or from
//! `HTTPS_PROXY`/`HTTP_PROXY`), and a transport TLS layer that is verified
//! separately from ATLS: two layers, two trust domains (draft §5.2).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atls_core::{
    Certificate, ClientEndpoint, ClientSessionParams, ConnectionId, Error as TlsError, HandshakeInfo,
    ProtectionKind, Session,
};
use atls_oscore::{http as oscore_http, ContextParams, SecurityContext};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};

use crate::error::ClientError;
use crate::wire::{self, Mode, SessionId};

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
    /// Do not verify the transport TLS certificate (a TLS-terminating
    /// middlebox in the path). ATLS is verified regardless.
    pub insecure_transport: bool,
    /// Extra trust anchors for the transport TLS layer (besides the public roots).
    pub transport_roots: Vec<Certificate>,
    /// Limit for one outer exchange.
    pub timeout: Duration,
    /// Largest response body accepted.
    pub max_response: usize,
    /// Send the first record-mode request of a resumed TLS 1.3 session as 0-RTT data.
    pub early_data: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            server_name: None,
            offer_cids: true,
            http2_prior_knowledge: false,
            proxy: None,
            insecure_transport: false,
            transport_roots: Vec::new(),
            timeout: Duration::from_secs(30),
            max_response: 4 * 1024 * 1024,
            early_data: true,
        }
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

struct Established {
    session: Session,
    cookie: SessionId,
    info: HandshakeInfo,
    oscore: SecurityContext,
    cose: SecurityContext,
}

/// An ATLS client bound to one server URL.
pub struct AtlsClient {
    http: reqwest::Client,
    base: reqwest::Url,
    endpoint: Arc<dyn ClientEndpoint>,
    options: ClientOptions,
    state: tokio::sync::Mutex<Option<Established>>,
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(transport)?;
    let mut config = if options.insecure_transport {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoTransportVerification(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in &options.transport_roots {
            roots
                .add(rustls_pki_types::CertificateDer::from(cert.0.clone()))
                .map_err(|e| ClientError::Invalid(format!("transport CA: {e}")))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
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

/// One outer HTTP request.
struct OuterRequest<'a> {
    kind: &'static str,
    method: Method,
    path: &'a str,
    headers: HeaderMap,
    body: Vec<u8>,
    cookie: Option<SessionId>,
}

/// The outer answer to one POST.
struct Outer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
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
            .connect_timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none());
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
            options,
            state: tokio::sync::Mutex::new(None),
        })
    }

    /// The mode requests are protected with.
    pub fn mode(&self) -> Mode {
        self.options.mode
    }

    /// What the current session negotiated, if there is one.
    pub async fn session_info(&self) -> Option<HandshakeInfo> {
        self.state.lock().await.as_ref().map(|s| s.info.clone())
    }

    /// Forget the current session without telling the server (the next
    /// request handshakes again, resuming when the engine holds a ticket).
    pub async fn reset(&self) {
        *self.state.lock().await = None;
    }

    /// End the current session: send close_notify so the server frees it at
    /// once, then forget it. Failures to reach the server are ignored (the
    /// server expires the session anyway).
    pub async fn close(&self) {
        let Some(mut est) = self.state.lock().await.take() else {
            return;
        };
        est.session.close();
        if let Ok(Some(flight)) = est.session.take_flight(Instant::now()) {
            let request = OuterRequest {
                kind: "close",
                method: Method::POST,
                path: wire::WELL_KNOWN_PATH,
                headers: Self::atls_headers(),
                body: flight,
                cookie: Some(est.cookie),
            };
            let _ = self.post(request, &mut Vec::new()).await;
        }
    }

    fn url(&self, path_and_query: &str) -> Result<reqwest::Url, ClientError> {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        url.set_path(&format!("{prefix}{path}"));
        url.set_query((!query.is_empty()).then_some(query));
        Ok(url)
    }

    async fn post(
        &self,
        request: OuterRequest<'_>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Outer, ClientError> {
        let OuterRequest {
            kind,
            method,
            path,
            headers,
            body,
            cookie,
        } = request;
        let start = Instant::now();
        let url = self.url(path)?;
        let request_type = content_type(&headers);
        let request_bytes = body.len();
        let mut builder = self.http.request(method.clone(), url).headers(headers).body(body);
        if let Some(cookie) = cookie {
            builder = builder.header(
                header::COOKIE,
                format!("{}={}", wire::COOKIE_NAME, cookie.to_cookie_value()),
            );
        }
        let response = builder.send().await.map_err(|e| {
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
        if response
            .content_length()
            .is_some_and(|l| l > self.options.max_response as u64)
        {
            return Err(ClientError::Transport("response body too large".into()));
        }
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > self.options.max_response {
                return Err(ClientError::Transport("response body too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        events.push(WireEvent {
            kind,
            request_line: format!("{method} {path}"),
            request_type,
            request_bytes,
            status,
            response_type: content_type(&headers),
            response_bytes: body.len(),
            elapsed: start.elapsed(),
            http_version,
        });
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
    ) -> Result<(Established, Option<Vec<u8>>, bool), ClientError> {
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
        let mut early_written = 0;
        if let Some(bytes) = request.filter(|_| self.options.early_data) {
            early_written = session.write_early_data(bytes, Instant::now())?;
        }
        let mut cookie = None;
        let mut answer: Option<Vec<u8>> = None;
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
            let outer = self
                .post(
                    OuterRequest {
                        kind: "handshake",
                        method: Method::POST,
                        path: wire::WELL_KNOWN_PATH,
                        headers: Self::atls_headers(),
                        body: flight,
                        cookie,
                    },
                    events,
                )
                .await?;
            if cookie.is_none() {
                cookie = wire::cookie_from_set_cookie(&outer.headers);
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
            if !outer.body.is_empty() {
                session.push_flight(&outer.body, Instant::now())?;
                let received = session.take_received();
                if !received.is_empty() {
                    answer.get_or_insert_with(Vec::new).extend_from_slice(&received);
                }
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
        let cookie = cookie.ok_or_else(|| ClientError::UnexpectedStatus {
            status: StatusCode::OK,
            message: "the server set no session cookie".into(),
        })?;
        let info = session
            .handshake_info()
            .cloned()
            .ok_or(TlsError::HandshakeNotComplete)?;
        let context = |kind: ProtectionKind| -> Result<SecurityContext, ClientError> {
            let keys = session.atls_keys(kind)?;
            let ids = session.protection_ids(kind)?;
            // Client contexts die with the session: a restarted client
            // handshakes again and never reuses these keys.
            Ok(SecurityContext::new_in_memory(&ContextParams::from_atls(
                &keys, &ids,
            ))?)
        };
        let oscore = context(ProtectionKind::Oscore)?;
        let cose = context(ProtectionKind::Cose)?;
        let early = early_written > 0 && info.early_data_accepted;
        Ok((
            Established {
                session,
                cookie,
                info,
                oscore,
                cose,
            },
            answer.filter(|_| request_sent),
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
        ClientError::UnexpectedStatus {
            status: outer.status,
            message: snippet(&outer.body),
        }
    }

    /// Send one request, protected in the configured mode; returns the inner response.
    pub async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ClientError> {
        self.send_traced(request).await.map(|e| e.response)
    }

    /// Like [`AtlsClient::send`], also reporting what crossed the wire.
    pub async fn send_traced(&self, request: Request<Bytes>) -> Result<Exchange, ClientError> {
        let mut events = Vec::new();
        let mut state = self.state.lock().await;
        // One retry: the server may have forgotten the session (404).
        for attempt in 0..2 {
            // A new session answers a record-mode request during its handshake.
            let mut answered = None;
            let established = match state.as_mut() {
                Some(established) => established,
                None => {
                    let inner = (self.options.mode == Mode::Records).then(|| wire::encode_request(&request));
                    let (established, answer, early) = self.handshake(inner.as_deref(), &mut events).await?;
                    if let Some(bytes) = answer {
                        answered = Some((wire::parse_response(&bytes, self.options.max_response)?, early));
                    }
                    state.insert(established)
                }
            };
            let (response, early) = match answered {
                Some((response, early)) => (Ok(response), early),
                None => (
                    match self.options.mode {
                        Mode::Records => self.send_records(established, &request, &mut events).await,
                        Mode::Oscore => self.send_oscore(established, &request, &mut events).await,
                        Mode::Cose => self.send_cose(established, &request, &mut events).await,
                    },
                    false,
                ),
            };
            match response {
                Ok(response) => {
                    let info = established.info.clone();
                    return Ok(Exchange {
                        response,
                        events,
                        info,
                        early_data: early,
                    });
                }
                Err(ClientError::UnexpectedStatus { status, .. })
                    if status == StatusCode::NOT_FOUND && attempt == 0 =>
                {
                    tracing::debug!("the server forgot the ATLS session; handshaking again");
                    *state = None;
                }
                Err(e) => {
                    if matches!(
                        e,
                        ClientError::Handshake(_) | ClientError::Protection(_) | ClientError::Wire(_)
                    ) {
                        *state = None;
                    }
                    return Err(e);
                }
            }
        }
        Err(ClientError::UnexpectedStatus {
            status: StatusCode::NOT_FOUND,
            message: "the server forgot the new session at once".into(),
        })
    }

    fn path_of(uri: &Uri) -> String {
        uri.path_and_query().map_or("/", |p| p.as_str()).to_owned()
    }

    async fn send_records(
        &self,
        est: &mut Established,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Response<Bytes>, ClientError> {
        est.session.send(&wire::encode_request(request))?;
        let records = est.session.take_flight(Instant::now())?.unwrap_or_default();
        let outer = self
            .post(
                OuterRequest {
                    kind: "records",
                    method: Method::POST,
                    path: wire::WELL_KNOWN_PATH,
                    headers: Self::atls_headers(),
                    body: records,
                    cookie: Some(est.cookie),
                },
                events,
            )
            .await?;
        if outer.status != StatusCode::OK || !wire::is_media_type(&outer.headers, wire::CONTENT_TYPE_ATLS) {
            return Err(ClientError::UnexpectedStatus {
                status: outer.status,
                message: snippet(&outer.body),
            });
        }
        est.session.push_flight(&outer.body, Instant::now())?;
        let bytes = est.session.take_received();
        Ok(wire::parse_response(&bytes, self.options.max_response)?)
    }

    async fn send_oscore(
        &self,
        est: &mut Established,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Response<Bytes>, ClientError> {
        let inner = request.clone().map(|b| b.to_vec());
        let packet = oscore_http::coap_request_from_http(&inner)?;
        let (outer, binding) = atls_oscore::protect_request(&mut est.oscore, &packet)?;
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
                    cookie: Some(est.cookie),
                },
                events,
            )
            .await?;
        if answer.status == StatusCode::OK && wire::is_media_type(&answer.headers, wire::CONTENT_TYPE_OSCORE)
        {
            let mut response = Response::new(answer.body.to_vec());
            *response.headers_mut() = answer.headers;
            let outer = oscore_http::response_from_http(&response)?;
            let inner = atls_oscore::unprotect_response(&mut est.oscore, &outer, &binding)?;
            let response = oscore_http::http_response_from_coap(&inner)?;
            return Ok(response.map(Bytes::from));
        }
        Err(Self::protection_refused(answer))
    }

    fn protection_refused(answer: Outer) -> ClientError {
        match answer.status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => ClientError::ProtectionRefused {
                status: answer.status,
                message: snippet(&answer.body),
            },
            status => ClientError::UnexpectedStatus {
                status,
                message: snippet(&answer.body),
            },
        }
    }

    async fn send_cose(
        &self,
        est: &mut Established,
        request: &Request<Bytes>,
        events: &mut Vec<WireEvent>,
    ) -> Result<Response<Bytes>, ClientError> {
        let (sealed, binding) = atls_oscore::cose::seal_request(&mut est.cose, request.body())?;
        let mut headers = request.headers().clone();
        for name in [header::HOST, header::CONTENT_LENGTH, header::CONTENT_TYPE] {
            headers.remove(name);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(wire::CONTENT_TYPE_COSE),
        );
        let path = Self::path_of(request.uri());
        let answer = self
            .post(
                OuterRequest {
                    kind: "cose",
                    method: request.method().clone(),
                    path: &path,
                    headers,
                    body: sealed,
                    cookie: Some(est.cookie),
                },
                events,
            )
            .await?;
        if wire::is_media_type(&answer.headers, "application/cose") {
            let plaintext = atls_oscore::cose::open_response(&mut est.cose, &answer.body, &binding)?;
            let mut response = Response::new(Bytes::from(plaintext));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            response.headers_mut().remove(header::CONTENT_TYPE);
            response.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(response);
        }
        Err(Self::protection_refused(answer))
    }
}
