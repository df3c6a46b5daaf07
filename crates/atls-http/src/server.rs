//! The server side: a tower [`Layer`] that terminates ATLS in front of any
//! HTTP application.
//!
//! [`AtlsServer`] owns the TLS endpoint and the session table; [`AtlsLayer`]
//! wraps an application service. The wrapped service sees only plaintext
//! requests, each carrying an [`AtlsPeer`] extension that says who the peer
//! proved to be and how the request was protected.
//!
//! Sessions live in an [`atls_sessions::SessionTable`] keyed by the session
//! cookie and the server's connection IDs, with its admission policy: a body
//! opens a session only once the TLS engine answered it, caps are checked
//! before anything is evicted, a half-open handshake never evicts an
//! established session, and a session counts as used only when a request of
//! it verified. Their keys die with the table, so the OSCORE and COSE
//! contexts derived from them keep their sequence numbers in memory: a
//! restarted server has no context to reuse a nonce with, and clients
//! handshake again (404 → new session).
//!
//! Once a request has verified, every answer travels protected, errors
//! included (413 for an inner body over the limit, 502 for an application
//! response over it): the client learns the outcome end to end and the
//! session stays usable.

// Handlers return a ready HTTP response as their error: it is built once per
// refused request, and boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atls_coap::inner::InnerTransfers;
use atls_core::records::{self, FirstFlight};
use atls_core::{Error as TlsError, Framing, PeerIdentity, ServerEndpoint};
use atls_oscore::{cose, http as oscore_http, OscoreError};
use atls_sessions::SessionId;
use atls_sessions::{
    ClientKey, Eviction, Found, KidKind, Phase, Policy, Refusal, ServerSession, SessionTable, TableStats,
};
use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::error::InvalidOptions;
use crate::limits::DerivedLimits;
use crate::wire::{self, CookieLookup, Mode};

/// Bounds of the session table and of bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most established sessions held at once.
    pub max_sessions: usize,
    /// Most handshakes in progress at once, on top of `max_sessions`;
    /// beyond it new handshakes get 503 with `Retry-After`.
    pub max_half_open: usize,
    /// Most handshakes in progress from one client address (an IPv4
    /// address or an IPv6 /64); 0 for no per-client cap.
    pub max_half_open_per_client: usize,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// An established session with no verified request for this long is dropped.
    pub idle_timeout: Duration,
    /// No session lives longer than this (the cookie's Max-Age).
    pub lifetime: Duration,
    /// With `max_sessions` established sessions, a completed handshake takes
    /// the place of the least recently used one if it has been unused for at
    /// least this long; `None` never evicts (newcomers get 503 instead).
    pub evict_idle_after: Option<Duration>,
    /// Largest inner request body the application receives, in every mode.
    pub max_request: usize,
    /// Largest inner response body the application may return, in every mode.
    pub max_response: usize,
    /// Largest handshake flight (a ClientHello, a client certificate chain).
    pub max_handshake_flight: usize,
}

impl Default for ServerLimits {
    /// The table's defaults ([`Policy::default`]), 1 MiB requests, 4 MiB
    /// responses, 64 KiB handshake flights.
    fn default() -> Self {
        let policy = Policy::default();
        Self {
            max_sessions: policy.max_sessions,
            max_half_open: policy.max_half_open,
            max_half_open_per_client: policy.max_half_open_per_client,
            handshake_timeout: policy.handshake_timeout,
            idle_timeout: policy.idle_timeout,
            lifetime: policy.lifetime,
            evict_idle_after: match policy.eviction {
                Eviction::LeastRecentlyUsed { min_idle } => Some(min_idle),
                Eviction::Never => None,
            },
            max_request: 1024 * 1024,
            max_response: 4 * 1024 * 1024,
            max_handshake_flight: 64 * 1024,
        }
    }
}

impl ServerLimits {
    /// The table policy these limits give.
    pub fn policy(&self) -> Policy {
        Policy {
            max_sessions: self.max_sessions,
            max_half_open: self.max_half_open,
            max_half_open_per_client: self.max_half_open_per_client,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            lifetime: self.lifetime,
            eviction: match self.evict_idle_after {
                Some(min_idle) => Eviction::LeastRecentlyUsed { min_idle },
                None => Eviction::Never,
            },
            cid_len: 4,
        }
    }

    /// Every body and buffer limit, for a server accepting up to
    /// `max_early_data` bytes of 0-RTT data.
    pub fn derived(&self, max_early_data: usize) -> DerivedLimits {
        DerivedLimits::new(
            (self.max_request, self.max_response),
            self.max_request,
            self.max_response,
            self.max_handshake_flight,
            max_early_data,
        )
    }
}

/// Server settings besides the limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Table and body limits.
    pub limits: ServerLimits,
    /// Name of the session cookie (an RFC 6265 token).
    pub cookie_name: String,
    /// Take the client address for the per-client handshake cap from the
    /// last entry of this header (e.g. `x-forwarded-for`, set by a trusted
    /// reverse proxy) instead of the connection's peer address.
    pub client_address_header: Option<HeaderName>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            limits: ServerLimits::default(),
            cookie_name: wire::COOKIE_NAME.to_owned(),
            client_address_header: None,
        }
    }
}

/// What the wrapped application learns about the ATLS peer of a request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AtlsPeer {
    /// How the request was protected.
    pub mode: Mode,
    /// The TLS engine of the session.
    pub engine: &'static str,
    /// Negotiated TLS version.
    pub tls_version: &'static str,
    /// Negotiated cipher suite.
    pub cipher_suite: String,
    /// Whether the §11 connection-ID extensions were negotiated.
    pub cids_negotiated: bool,
    /// The peer's identity.
    pub peer: PeerSummary,
    /// Whether the session was resumed.
    pub resumed: bool,
    /// Whether this request arrived as TLS 1.3 early data (acted on only
    /// after the handshake completed: see docs/PROTOCOL.md).
    pub early_data: bool,
}

/// A printable summary of a peer identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PeerSummary {
    /// No client authentication.
    Anonymous,
    /// A client certificate chain.
    Certificate {
        /// Hex of the end-entity certificate (DER).
        der_hex: String,
        /// Number of certificates in the chain.
        chain_len: usize,
    },
    /// An external PSK identity.
    Psk {
        /// The identity (lossy UTF-8).
        identity: String,
    },
}

impl PeerSummary {
    fn of(peer: &PeerIdentity) -> Self {
        match peer {
            PeerIdentity::Certificates(chain) => PeerSummary::Certificate {
                der_hex: chain.first().map(|c| hex::encode(&c.0)).unwrap_or_default(),
                chain_len: chain.len(),
            },
            PeerIdentity::Psk(id) => PeerSummary::Psk {
                identity: String::from_utf8_lossy(id).into_owned(),
            },
            _ => PeerSummary::Anonymous,
        }
    }
}

fn peer_of(session: &ServerSession, mode: Mode, early_data: bool) -> Option<AtlsPeer> {
    let info = &session.established()?.info;
    let cids = match mode {
        Mode::Cose => info.cose_cids.is_negotiated(),
        _ => info.oscore_cids.is_negotiated(),
    };
    Some(AtlsPeer {
        mode,
        engine: session.engine_name(),
        tls_version: info.version.name(),
        cipher_suite: info.cipher_suite.to_string(),
        cids_negotiated: cids,
        peer: PeerSummary::of(&info.peer),
        resumed: info.resumed,
        early_data,
    })
}

/// A session as the table holds it: its engine state behind its own lock,
/// held for engine calls only, never across an await. Lock order: a
/// session's lock may be held while taking the table's, never the reverse
/// (the table never locks a session).
type Entry = Mutex<ServerSession>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a session lock poisons only that session's data,
    // which stays consistent (every mutation is a single engine call).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ATLS terminator: a TLS server endpoint and its session table.
pub struct AtlsServer {
    endpoint: Arc<dyn ServerEndpoint>,
    /// DTLS 1.2 as the ATLS layer: first flights in DTLS framing (known
    /// from the first record) open sessions on this endpoint.
    dtls: Option<Arc<dyn ServerEndpoint>>,
    options: ServerOptions,
    limits: DerivedLimits,
    table: SessionTable<Entry>,
    /// Blockwise transfers inside OSCORE (CoAP devices behind a gateway,
    /// RFC 8613 §4.1.3.4.2), per session.
    inner_blocks: std::sync::Mutex<InnerTransfers<SessionId>>,
}

/// Inner blockwise transfers in progress at once, over all sessions.
const MAX_INNER_TRANSFERS: usize = 256;
/// Bytes of inner responses kept for Block2 follow-ups, over all sessions.
const MAX_INNER_BLOCK_BYTES: usize = 64 * 1024 * 1024;

impl fmt::Debug for AtlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtlsServer")
            .field("engine", &self.endpoint.engine_name())
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Result of a handler: a response, never an error (errors are statuses).
type Reply = Response<Body>;

/// A text/plain answer carrying `message`.
pub(crate) fn plain(status: StatusCode, message: &str) -> Reply {
    plain_bytes(status, message).map(Body::from)
}

fn plain_bytes(status: StatusCode, message: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn atls_body(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(wire::CONTENT_TYPE_ATLS),
    );
    response
}

fn refusal_reply(refusal: &Refusal) -> Reply {
    match refusal {
        Refusal::DuplicateFirstFlight => plain(
            StatusCode::BAD_REQUEST,
            "this first flight is already being answered; start a new handshake",
        ),
        Refusal::Gone => plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session"),
        Refusal::Random => plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot start an ATLS session"),
        other => {
            let mut reply = plain(StatusCode::SERVICE_UNAVAILABLE, &other.to_string());
            let secs = other
                .retry_after()
                .unwrap_or(Duration::from_secs(1))
                .as_secs_f64()
                .ceil();
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from((secs as u64).max(1)));
            reply
        }
    }
}

/// What the application is asked to do for one protected request.
struct Inner {
    request: Request<Bytes>,
    peer: AtlsPeer,
}

impl AtlsServer {
    /// A server on `endpoint` with `limits` and the default cookie name.
    pub fn new(endpoint: Arc<dyn ServerEndpoint>, limits: ServerLimits) -> Arc<Self> {
        let options = ServerOptions {
            limits,
            ..ServerOptions::default()
        };
        Self::build(endpoint, None, options)
    }

    /// A server on `endpoint` with `options`; fails on a cookie name that is
    /// not an RFC 6265 token.
    pub fn with_options(
        endpoint: Arc<dyn ServerEndpoint>,
        options: ServerOptions,
    ) -> Result<Arc<Self>, InvalidOptions> {
        Self::checked(endpoint, None, options)
    }

    /// A server whose ATLS layer is TLS on `endpoint` and, for first flights
    /// in DTLS framing (a device whose ATLS layer is DTLS 1.2, e.g. behind a
    /// CoAP-to-HTTP gateway), DTLS on `dtls`. The framing is told from the
    /// first record; OSCORE and COSE then work the same.
    pub fn with_dtls(
        endpoint: Arc<dyn ServerEndpoint>,
        dtls: Arc<dyn ServerEndpoint>,
        options: ServerOptions,
    ) -> Result<Arc<Self>, InvalidOptions> {
        Self::checked(endpoint, Some(dtls), options)
    }

    fn checked(
        endpoint: Arc<dyn ServerEndpoint>,
        dtls: Option<Arc<dyn ServerEndpoint>>,
        options: ServerOptions,
    ) -> Result<Arc<Self>, InvalidOptions> {
        if !wire::is_valid_cookie_name(&options.cookie_name) {
            return Err(InvalidOptions(format!(
                "cookie name {:?} is not an RFC 6265 token",
                options.cookie_name
            )));
        }
        Ok(Self::build(endpoint, dtls, options))
    }

    fn build(
        endpoint: Arc<dyn ServerEndpoint>,
        dtls: Option<Arc<dyn ServerEndpoint>>,
        options: ServerOptions,
    ) -> Arc<Self> {
        let early = usize::try_from(endpoint.config().max_early_data).unwrap_or(usize::MAX);
        Arc::new(Self {
            limits: options.limits.derived(early),
            table: SessionTable::new(options.limits.policy()),
            inner_blocks: std::sync::Mutex::new(InnerTransfers::new(
                MAX_INNER_TRANSFERS,
                options.limits.max_request,
                MAX_INNER_BLOCK_BYTES,
                1024,
            )),
            endpoint,
            dtls,
            options,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ServerLimits {
        &self.options.limits
    }

    /// Every size limit derived from them.
    pub fn derived_limits(&self) -> &DerivedLimits {
        &self.limits
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.options.cookie_name
    }

    /// The engine name.
    pub fn engine_name(&self) -> &'static str {
        self.endpoint.engine_name()
    }

    /// How many sessions are held, and what the table refused or evicted.
    pub fn stats(&self) -> TableStats {
        self.table.stats()
    }

    fn client_key(&self, request: &Request<Body>) -> Option<ClientKey> {
        let peer = || {
            request
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|info| ClientKey::from(info.0.ip()))
        };
        let Some(name) = &self.options.client_address_header else {
            return peer();
        };
        // The last address the trusted proxy appended; without one (a request
        // that bypassed the proxy, or a value that is no address) the
        // connection's peer counts, so nothing escapes the cap.
        let forwarded = request
            .headers()
            .get_all(name)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .and_then(|last| {
                last.parse::<IpAddr>()
                    .or_else(|_| last.parse::<SocketAddr>().map(|a| a.ip()))
                    .ok()
            });
        forwarded.map(ClientKey::from).or_else(peer)
    }
}

/// Reads a body up to `limit` bytes; `Err` is the 413 reply.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reply> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            // The rest of the body is not read, so the connection cannot
            // carry another request: say so, or a client would reuse it
            // and lose its next request to the close (RFC 9112 §9.6).
            let mut reply = plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body exceeds {limit} bytes"),
            );
            reply
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(reply)
        }
        Err(_) => Err(plain(StatusCode::BAD_REQUEST, "cannot read the request body")),
    }
}

/// Reads a body up to `limit` bytes. Returns everything when the body ends
/// within the limit, otherwise what was read (just over the limit) and the
/// rest of the body still to be read.
async fn read_head(mut body: Body, limit: usize) -> Result<(Vec<u8>, Option<Body>), Reply> {
    let mut head = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| plain(StatusCode::BAD_REQUEST, "cannot read the request body"))?;
        if let Ok(data) = frame.into_data() {
            head.extend_from_slice(&data);
            if head.len() > limit {
                return Ok((head, Some(body)));
            }
        }
    }
    Ok((head, None))
}

/// Why a records body stopped being processed.
enum Stop {
    /// The TLS session refused a flight.
    Flight(atls_sessions::FlightFailure),
    /// Not a sequence of TLS records.
    Malformed,
    /// The body ended (or broke off) inside a record.
    Truncated,
    /// More than the records limit.
    TooLarge,
}

/// What the pieces of one records body produced so far.
struct Inbound {
    /// Bytes of a record still arriving.
    pending: Vec<u8>,
    output: Vec<u8>,
    established: bool,
    application_data: Vec<u8>,
    early_data: bool,
    /// More application data arrived than `keep`; it was decrypted and dropped.
    overflow: bool,
    keep: usize,
}

impl Inbound {
    fn new(keep: usize) -> Self {
        Self {
            pending: Vec::new(),
            output: Vec::new(),
            established: false,
            application_data: Vec::new(),
            early_data: false,
            overflow: false,
            keep,
        }
    }

    /// Feed the whole records of `data` (and of what was pending) to the
    /// session, in pieces the session accepts (`max_piece` bytes, at most
    /// 256 records each).
    fn feed(&mut self, entry: &Entry, data: &[u8], max_piece: usize, now: Instant) -> Result<(), Stop> {
        self.pending.extend_from_slice(data);
        let framing = lock(entry).framing();
        let mut start = 0usize;
        loop {
            let rest = self.pending.get(start..).unwrap_or_default();
            let piece =
                records::complete_records_within(framing, rest, max_piece, records::MAX_RECORDS_PER_FLIGHT)
                    .map_err(|_| Stop::Malformed)?;
            if piece == 0 {
                break;
            }
            let progress = {
                let mut s = lock(entry);
                s.push_flight(rest.get(..piece).unwrap_or_default(), now)
                    .map_err(Stop::Flight)?
            };
            start = start.saturating_add(piece);
            self.established |= progress.established;
            self.early_data |= progress.early_data;
            self.output.extend_from_slice(&progress.output);
            if !self.overflow {
                if self
                    .application_data
                    .len()
                    .saturating_add(progress.application_data.len())
                    > self.keep
                {
                    self.overflow = true;
                    self.application_data = Vec::new();
                } else {
                    self.application_data
                        .extend_from_slice(&progress.application_data);
                }
            }
        }
        self.pending.drain(..start);
        Ok(())
    }
}

/// Tower layer that puts an [`AtlsServer`] in front of a service.
///
/// Wrap the whole application, so that the layer sees every request, and
/// serve it with connection info so that handshakes are counted per client:
///
/// ```no_run
/// # async fn run(endpoint: std::sync::Arc<dyn atls_core::ServerEndpoint>) {
/// use atls_http::{app, AtlsLayer, AtlsServer, ServerLimits};
/// use axum::ServiceExt;
/// use tower::Layer;
///
/// let server = AtlsServer::new(endpoint, ServerLimits::default());
/// let service = AtlsLayer::new(server).layer(app::builtin());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
/// axum::serve(
///     listener,
///     service.into_make_service_with_connect_info::<std::net::SocketAddr>(),
/// )
/// .await
/// .unwrap();
/// # }
/// ```
///
/// (`Router::layer` would wrap each route instead and never see
/// `/.well-known/atls` or `POST /`.)
#[derive(Clone, Debug)]
pub struct AtlsLayer {
    server: Arc<AtlsServer>,
    secure_cookies: bool,
}

impl AtlsLayer {
    /// Terminate ATLS with `server`. Cookies get `Secure` only after
    /// [`AtlsLayer::secure_cookies`] (for listeners that serve HTTPS).
    pub fn new(server: Arc<AtlsServer>) -> Self {
        Self {
            server,
            secure_cookies: false,
        }
    }

    /// Mark session cookies `Secure` (the listener serves HTTPS).
    pub fn secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }
}

impl<S> Layer<S> for AtlsLayer {
    type Service = AtlsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AtlsService {
            server: self.server.clone(),
            secure_cookies: self.secure_cookies,
            inner,
        }
    }
}

/// The service an [`AtlsLayer`] produces.
#[derive(Clone, Debug)]
pub struct AtlsService<S> {
    server: Arc<AtlsServer>,
    secure_cookies: bool,
    inner: S,
}

impl<S> Service<Request<Body>> for AtlsService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let handler = Handler {
            server: self.server.clone(),
            secure_cookies: self.secure_cookies,
            inner: self.inner.clone(),
        };
        Box::pin(async move { Ok(handler.handle(request).await) })
    }
}

struct Handler<S> {
    server: Arc<AtlsServer>,
    secure_cookies: bool,
    inner: S,
}

/// Run the application on a verified inner request. Never fails: an
/// application response over `limit` becomes a 502 to protect like any other.
async fn call_app<S>(inner: &mut S, inner_request: Inner, limit: usize) -> Response<Bytes>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let Inner { request, peer } = inner_request;
    let (mut parts, body) = request.into_parts();
    if peer.early_data {
        // RFC 8470 §5.1: tell the application the request came as early data.
        parts.headers.insert("early-data", HeaderValue::from_static("1"));
    }
    parts.extensions.insert(peer);
    let request = Request::from_parts(parts, Body::from(body));
    let response = match std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
        Ok(()) => inner.call(request).await,
        Err(e) => match e {},
    };
    let Ok(response) = response;
    let (parts, body) = response.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Response::from_parts(parts, collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => plain_bytes(
            StatusCode::BAD_GATEWAY,
            &format!("the application's response exceeds the limit of {limit} bytes"),
        ),
        Err(_) => plain_bytes(StatusCode::BAD_GATEWAY, "the application's response failed"),
    }
}

fn lock_blocks(
    m: &std::sync::Mutex<InnerTransfers<SessionId>>,
) -> std::sync::MutexGuard<'_, InnerTransfers<SessionId>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn oscore_error_reply(e: &OscoreError) -> Reply {
    match e.coap_error() {
        // RFC 8075 §7: 4.00 and 4.02 → 400, 4.01 → 401.
        Some(((4, 1), diagnostic)) => plain(StatusCode::UNAUTHORIZED, diagnostic),
        Some((_, diagnostic)) => plain(StatusCode::BAD_REQUEST, diagnostic),
        None => {
            tracing::error!(error = %e, "OSCORE failure");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "protection failure")
        }
    }
}

/// The media type (without parameters) of COSE-protected requests.
const COSE_MEDIA_TYPE: &str = "application/cose";

/// Whether a verified inner request ends its session (PROTOCOL.md §12: a
/// protected `DELETE /.well-known/atls`).
fn ends_session(method: &Method, path: &str) -> bool {
    method == Method::DELETE && path == wire::WELL_KNOWN_PATH
}

/// The inner answer to a protected close: `200` with an empty body (a 204
/// would lose a COSE body: HTTP/1.1 sends none with it).
fn session_ended() -> Response<Bytes> {
    Response::new(Bytes::new())
}

const RECORDS_ENDED: &str = "the records channel of this ATLS session has ended; start a new session";

const NOT_ESTABLISHED: &str = "the ATLS handshake of this session is not complete";

/// The inner request over the limit, answered inside the protection.
fn too_large(limit: usize) -> Response<Bytes> {
    plain_bytes(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body exceeds the limit of {limit} bytes"),
    )
}

impl<S> Handler<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    async fn handle(mut self, request: Request<Body>) -> Reply {
        let headers = request.headers();
        if request.uri().path() == wire::WELL_KNOWN_PATH && !wire::is_media_type(headers, COSE_MEDIA_TYPE) {
            if request.method() != Method::POST {
                return method_not_allowed("ATLS flights are POSTed");
            }
            if !wire::is_media_type(headers, wire::CONTENT_TYPE_ATLS) {
                return plain(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "expected Content-Type: application/atls",
                );
            }
            return self.handle_records(request).await;
        }
        if wire::is_media_type(headers, wire::CONTENT_TYPE_OSCORE) {
            if request.method() != Method::POST {
                // RFC 8613 §11.1: the outer method of an OSCORE request is POST.
                return method_not_allowed("OSCORE requests are POSTed (RFC 8613 §11.1)");
            }
            return self.handle_oscore(request).await;
        }
        if wire::is_media_type(headers, COSE_MEDIA_TYPE) {
            return self.handle_cose(request).await;
        }
        plain(
            StatusCode::FORBIDDEN,
            "this resource is served only through ATLS (record, OSCORE or COSE protection)",
        )
    }

    /// The live session a request's cookies name, and whether it carried a
    /// session cookie at all.
    fn lookup(&self, headers: &http::HeaderMap, now: Instant) -> (Option<Found<Entry>>, bool) {
        let cookies = wire::session_cookies(headers, &self.server.options.cookie_name);
        let found = cookies.iter().find_map(|c| match c {
            CookieLookup::Session(id) => self.server.table.get(id, now),
            _ => None,
        });
        (found, !cookies.is_empty())
    }

    /// `POST /.well-known/atls`: a handshake flight, or records after it.
    async fn handle_records(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let client = self.server.client_key(&request);
        let (parts, body) = request.into_parts();
        let (found, cookie_present) = self.lookup(&parts.headers, now);
        let limits = self.server.limits;
        let (head, rest) = match read_head(body, limits.first_flight).await {
            Ok(read) => read,
            Err(reply) => return reply,
        };
        let Some(rest) = rest else {
            // The whole body is here (at most a first flight's size).
            let framing = records::detect_framing(&head).unwrap_or(Framing::Tls);
            let first = match records::classify_payload(framing, &head) {
                Ok(first) => first,
                Err(_) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        "the body is not a sequence of TLS records",
                    )
                }
            };
            return match (found, first) {
                // A session still handshaking takes every flight, a second
                // ClientHello after a HelloRetryRequest included.
                (Some(found), _) if found.phase == Phase::HalfOpen => {
                    self.continue_session(found, head, None, now).await
                }
                (Some(found), FirstFlight::Other | FirstFlight::IncompleteClientHello) => {
                    self.continue_session(found, head, None, now).await
                }
                // A ClientHello with a stale or foreign cookie opens a new session.
                (_, FirstFlight::ClientHello) => self.open_session(client, &head, now),
                (None, FirstFlight::IncompleteClientHello) => plain(
                    StatusCode::BAD_REQUEST,
                    "the ClientHello is incomplete: a first flight carries the whole message",
                ),
                (None, FirstFlight::Other) if cookie_present => {
                    plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session")
                }
                (None, FirstFlight::Other) => plain(
                    StatusCode::BAD_REQUEST,
                    "a new ATLS session starts with a ClientHello",
                ),
            };
        };
        // Longer than any first flight: only a live session's records.
        match found {
            Some(found) => self.continue_session(found, head, Some(rest), now).await,
            None if cookie_present => plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session"),
            None => plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a first flight exceeds {} bytes", limits.first_flight),
            ),
        }
    }

    /// A first flight: reserve a place, run the engine outside the table,
    /// keep the session only if the engine answered.
    fn open_session(&self, client: Option<ClientKey>, body: &[u8], now: Instant) -> Reply {
        let server = &self.server;
        let admission = match server.table.admit(client, body, now) {
            Ok(a) => a,
            Err(refusal) => {
                tracing::info!(target: "atls::handshake", transport = "http", client = %client_text(client), reason = refusal.reason(), "ATLS handshake refused");
                metrics::counter!("atls_handshakes_total", "outcome" => "refused", "reason" => refusal.reason(), "transport" => "http").increment(1);
                return refusal_reply(&refusal);
            }
        };
        let id = admission.id();
        let endpoint = match records::detect_framing(body) {
            Some(Framing::Dtls) => match &server.dtls {
                Some(dtls) => dtls.as_ref(),
                None => return plain(StatusCode::BAD_REQUEST, "this server does not run DTLS"),
            },
            _ => server.endpoint.as_ref(),
        };
        let mut session =
            match ServerSession::accept(endpoint, &admission, server.limits.tls, server.limits.max_message) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start an ATLS session");
                    return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot start an ATLS session");
                }
            };
        let progress = match session.push_flight(body, now) {
            Ok(p) => p,
            Err(failure) => {
                tracing::info!(target: "atls::handshake", transport = "http", client = %client_text(client), error = %failure.error, "ATLS handshake failed");
                metrics::counter!("atls_handshakes_total", "outcome" => "failed", "reason" => "tls", "transport" => "http")
                    .increment(1);
                return failure_reply(&failure.error, failure.alert);
            }
        };
        if progress.output.is_empty() && !progress.established {
            return plain(
                StatusCode::BAD_REQUEST,
                "the TLS stack did not answer this first flight",
            );
        }
        if let Err(refusal) = admission.insert(Mutex::new(session)) {
            return refusal_reply(&refusal);
        }
        if progress.established {
            if let Err(refusal) = server.table.establish(&id, now) {
                return refusal_reply(&refusal);
            }
        }
        let mut reply = atls_body(StatusCode::OK, progress.output);
        let max_age = server.options.limits.lifetime.as_secs();
        let value = wire::set_cookie(&server.options.cookie_name, id, max_age, self.secure_cookies);
        if let Ok(value) = HeaderValue::from_str(&value) {
            reply.headers_mut().insert(header::SET_COOKIE, value);
        }
        reply
    }

    /// Records of a session in the table: handshake flights, or one HTTP/1.1
    /// request. The body is fed to the TLS session as its records arrive
    /// (`head`, then `rest`), so a body over the limit is still decrypted —
    /// keeping the session in step — while at most one inner message is
    /// kept in memory.
    async fn continue_session(
        &mut self,
        found: Found<Entry>,
        head: Vec<u8>,
        rest: Option<Body>,
        now: Instant,
    ) -> Reply {
        let server = self.server.clone();
        let limits = server.limits;
        if found.phase == Phase::Established && !lock(&found.entry).records_open() {
            return plain(StatusCode::NOT_FOUND, RECORDS_ENDED);
        }
        let mut inbound = Inbound::new(limits.inner_message);
        // A body whose start repeats the previous body's (a retried POST)
        // is refused before the TLS stack sees it; the session is untouched.
        if lock(&found.entry).repeats_previous_payload(&head) {
            return plain(
                StatusCode::BAD_REQUEST,
                "ATLS: this body repeats the previous one (a retried request?); ignored",
            );
        }
        let piece = limits.tls.max_flight_len;
        let mut result = inbound.feed(&found.entry, &head, piece, now);
        if let (Ok(()), Some(mut rest)) = (&result, rest) {
            let mut total = head.len();
            while let Some(frame) = rest.frame().await {
                let Ok(frame) = frame else {
                    result = Err(Stop::Truncated);
                    break;
                };
                let Ok(data) = frame.into_data() else { continue };
                total = total.saturating_add(data.len());
                if total > limits.records_stream {
                    result = Err(Stop::TooLarge);
                    break;
                }
                result = inbound.feed(&found.entry, &data, piece, now);
                if result.is_err() {
                    break;
                }
            }
        }
        if result.is_ok() && !inbound.pending.is_empty() {
            result = Err(Stop::Truncated);
        }
        if let Err(stop) = result {
            return self.stopped(&found, stop);
        }
        if lock(&found.entry).peer_closed() {
            // An authenticated close_notify: the client ended the session.
            server.table.remove(&found.id);
        }
        if inbound.established {
            if let Err(refusal) = server.table.establish(&found.id, now) {
                tracing::info!(target: "atls::handshake", transport = "http", session = %found.id.prefix(), reason = refusal.reason(), "completed ATLS handshake refused");
                metrics::counter!("atls_handshakes_total", "outcome" => "refused", "reason" => refusal.reason(), "transport" => "http").increment(1);
                return refusal_reply(&refusal);
            }
            if let Some(peer) = peer_of(&lock(&found.entry), Mode::Oscore, false) {
                let kind = match &peer.peer {
                    PeerSummary::Anonymous => "anonymous",
                    PeerSummary::Certificate { .. } => "certificate",
                    PeerSummary::Psk { .. } => "psk",
                };
                tracing::info!(
                    target: "atls::handshake",
                    transport = "http",
                    session = %found.id.prefix(),
                    version = peer.tls_version,
                    suite = %peer.cipher_suite,
                    engine = peer.engine,
                    peer = kind,
                    resumed = peer.resumed,
                    cids = peer.cids_negotiated,
                    "ATLS handshake complete"
                );
                metrics::counter!(
                    "atls_handshakes_total",
                    "outcome" => "complete",
                    "version" => peer.tls_version,
                    "engine" => peer.engine,
                    "transport" => "http"
                )
                .increment(1);
            }
        }
        // From here on the output is always sent: dropping records the
        // engine counted would put the two record sequences out of step.
        let mut out = inbound.output;
        if inbound.application_data.is_empty() && !inbound.overflow {
            return atls_body(StatusCode::OK, out);
        }
        // The records decrypted: the session is in use.
        server.table.touch(&found.id, now);
        let max_request = limits.max_request;
        let peer = peer_of(&lock(&found.entry), Mode::Records, inbound.early_data);
        let parsed = if inbound.overflow {
            Err(crate::WireError::TooLarge)
        } else {
            wire::parse_request(&inbound.application_data, max_request)
        };
        let response = match (parsed, peer) {
            (Ok(request), Some(peer)) => {
                call_app(&mut self.inner, Inner { request, peer }, limits.max_response).await
            }
            (Ok(_), None) => plain_bytes(StatusCode::INTERNAL_SERVER_ERROR, NOT_ESTABLISHED),
            (Err(crate::WireError::TooLarge), _) => too_large(max_request),
            // The error travels back inside TLS, as the inner response.
            (Err(error), _) => plain_bytes(StatusCode::BAD_REQUEST, &error.to_string()),
        };
        let sent = lock(&found.entry).send(&wire::encode_response(&response), Instant::now());
        match sent {
            Ok(records) => {
                out.extend_from_slice(&records);
                atls_body(StatusCode::OK, out)
            }
            Err(TlsError::Closed) => plain(StatusCode::NOT_FOUND, RECORDS_ENDED),
            Err(error) => {
                tracing::warn!(session = %found.id.prefix(), %error, "cannot encrypt the response");
                lock(&found.entry).abandon_records();
                plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("ATLS: {error}"))
            }
        }
    }

    /// A records body that could not be processed. A half-open handshake
    /// ends; an established session keeps its OSCORE and COSE contexts and
    /// loses only its records channel (its TLS state is spent or out of
    /// step), so whoever knows a cookie cannot end a protected session.
    fn stopped(&self, found: &Found<Entry>, stop: Stop) -> Reply {
        // (A whole repeated body was refused before any piece was pushed; a
        // piece repeated inside a body is a failure like any other.)
        let established = found.phase == Phase::Established;
        if established {
            lock(&found.entry).abandon_records();
        } else {
            self.server.table.remove(&found.id);
        }
        let reason = match &stop {
            Stop::Flight(failure) => failure.error.to_string(),
            Stop::Malformed => "the body is not a sequence of TLS records".to_owned(),
            Stop::Truncated => "the body ends inside a TLS record".to_owned(),
            Stop::TooLarge => "the records body is over the limit".to_owned(),
        };
        if established {
            tracing::info!(target: "atls::handshake", transport = "http", session = %found.id.prefix(), error = %reason, "ATLS records channel ended");
        } else {
            // A failure after the first flight (a bad Finished, a wrong
            // PSK binder, a client certificate the server refuses).
            tracing::info!(target: "atls::handshake", transport = "http", session = %found.id.prefix(), error = %reason, "ATLS handshake failed");
            metrics::counter!("atls_handshakes_total", "outcome" => "failed", "reason" => "tls", "transport" => "http").increment(1);
        }
        match stop {
            // The engine was released meanwhile: an OSCORE or COSE request
            // of this session verified while this body streamed in.
            Stop::Flight(failure) if established && matches!(failure.error, TlsError::Closed) => {
                plain(StatusCode::NOT_FOUND, RECORDS_ENDED)
            }
            Stop::Flight(failure) => failure_reply(&failure.error, failure.alert),
            Stop::Malformed => plain(
                StatusCode::BAD_REQUEST,
                "the body is not a sequence of TLS records",
            ),
            Stop::Truncated => plain(StatusCode::BAD_REQUEST, "the body ends inside a TLS record"),
            Stop::TooLarge => {
                let mut reply = plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "the records body exceeds {} bytes; this session's records channel ended",
                        self.server.limits.records_stream
                    ),
                );
                // The rest of the body stays unread: the connection closes.
                reply
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                reply
            }
        }
    }

    /// The session of a protected request: by kid when the CIDs were
    /// negotiated, otherwise by cookie.
    fn find(
        &self,
        kind: KidKind,
        kid: Option<&[u8]>,
        headers: &http::HeaderMap,
        now: Instant,
    ) -> Result<Found<Entry>, Reply> {
        if let Some(kid) = kid.filter(|k| !k.is_empty()) {
            if let Some(found) = self.server.table.get_by_kid(kind, kid, now) {
                return Ok(found);
            }
        }
        match self.lookup(headers, now) {
            (Some(found), _) => Ok(found),
            (None, true) => Err(plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session")),
            (None, false) => Err(oscore_error_reply(&OscoreError::ContextNotFound)),
        }
    }

    /// RFC 8613 §11: `POST` with `application/oscore` and the `OSCORE` header.
    async fn handle_oscore(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let server = self.server.clone();
        let (parts, body) = request.into_parts();
        let body = match read_body(body, server.limits.oscore_body).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let host = parts.headers.get(header::HOST).cloned();
        let outer_http = Request::from_parts(parts, body.to_vec());
        let outer = match oscore_http::request_from_http(&outer_http) {
            Ok(p) => p,
            Err(e) => return oscore_error_reply(&e),
        };
        let kid = match atls_oscore::message::oscore_option(&outer) {
            Ok(option) => option.kid,
            Err(e) => return oscore_error_reply(&e),
        };
        let found = match self.find(KidKind::Oscore, kid.as_deref(), outer_http.headers(), now) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let ((inner_packet, binding), peer) = match open_in(&found.entry, Mode::Oscore, |est| {
            atls_oscore::unprotect_request(&mut est.oscore, &outer)
        }) {
            Ok(opened) => opened,
            Err(reply) => return reply,
        };
        server.table.touch(&found.id, now);
        // Blockwise inside OSCORE: a body arriving in inner Block1 blocks is
        // reassembled, a large answer leaves in inner Block2 blocks when the
        // client does blockwise; each block is its own protected exchange.
        let step = lock_blocks(&server.inner_blocks).request(&found.id, &inner_packet, now);
        let mut closing = false;
        let inner_response = match step {
            Err(block_answer) => block_answer,
            Ok(whole) => {
                let (response, method) = match oscore_http::http_request_from_coap(&whole) {
                    Ok(mut inner_http) => {
                        if let Some(host) = host {
                            inner_http.headers_mut().entry(header::HOST).or_insert(host);
                        }
                        let method = inner_http.method().clone();
                        closing = ends_session(&method, inner_http.uri().path());
                        let response = if closing {
                            session_ended()
                        } else if inner_http.body().len() > server.limits.max_request {
                            too_large(server.limits.max_request)
                        } else {
                            let request = Inner {
                                request: inner_http.map(Bytes::from),
                                peer,
                            };
                            call_app(&mut self.inner, request, server.limits.max_response).await
                        };
                        (response, method)
                    }
                    Err(e) => (plain_bytes(StatusCode::BAD_REQUEST, &e.to_string()), Method::POST),
                };
                let inner_response =
                    match oscore_http::coap_response_from_http(&response.map(|b| b.to_vec()), &method) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(error = %e, "the application's response has no CoAP form");
                            let fallback = plain_bytes(
                                StatusCode::BAD_GATEWAY,
                                "the response cannot be carried in OSCORE",
                            );
                            match oscore_http::coap_response_from_http(&fallback.map(|b| b.to_vec()), &method)
                            {
                                Ok(p) => p,
                                Err(e) => return oscore_error_reply(&e),
                            }
                        }
                    };
                lock_blocks(&server.inner_blocks).response(
                    &found.id,
                    &inner_packet,
                    inner_response,
                    Instant::now(),
                )
            }
        };
        let protected = match seal_in(&found.entry, |est| {
            atls_oscore::protect_response(&mut est.oscore, &inner_response, &binding, false)
        }) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        if closing {
            server.table.remove(&found.id);
            lock_blocks(&server.inner_blocks).remove(&found.id);
            tracing::debug!(target: "atls::handshake", transport = "http", session = %found.id.prefix(), "ATLS session ended by the client");
        }
        match oscore_http::response_to_http(&protected) {
            Ok(response) => response.map(Body::from),
            Err(e) => oscore_error_reply(&e),
        }
    }

    /// Draft §9.2 with this project's profile: COSE_Encrypt0 bodies; method
    /// and target bound to the request, status to the response.
    async fn handle_cose(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let server = self.server.clone();
        let (mut parts, body) = request.into_parts();
        let body = match read_body(body, server.limits.cose_body).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let kid = match cose::request_kid(&body) {
            Ok(kid) => kid,
            Err(e) => return oscore_error_reply(&e),
        };
        let found = match self.find(KidKind::Cose, Some(&kid), &parts.headers, now) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let line = cose::RequestLine {
            method: parts.method.as_str(),
            target: &target,
        };
        let ((plaintext, binding), peer) = match open_in(&found.entry, Mode::Cose, |est| {
            cose::open_request(&mut est.cose, &line, &body)
        }) {
            Ok(opened) => opened,
            Err(reply) => return reply,
        };
        server.table.touch(&found.id, now);
        let closing = ends_session(&parts.method, parts.uri.path());
        let response = if closing {
            session_ended()
        } else if plaintext.len() > server.limits.max_request {
            too_large(server.limits.max_request)
        } else {
            parts.headers.remove(header::CONTENT_TYPE);
            parts.headers.remove(header::CONTENT_LENGTH);
            let request = Inner {
                request: Request::from_parts(parts, Bytes::from(plaintext)),
                peer,
            };
            call_app(&mut self.inner, request, server.limits.max_response).await
        };
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::NO_CONTENT {
            // HTTP/1.1 sends no body with a 204, and the sealed body is what
            // authenticates the answer: "no content" travels as 200 with an
            // empty sealed body (PROTOCOL.md §12, COSE mode).
            parts.status = StatusCode::OK;
        }
        let status = parts.status.as_u16();
        match seal_in(&found.entry, |est| {
            cose::seal_response(&mut est.cose, status, &body, &binding)
        }) {
            Ok(sealed) => {
                if closing {
                    server.table.remove(&found.id);
                    tracing::debug!(target: "atls::handshake", transport = "http", session = %found.id.prefix(), "ATLS session ended by the client");
                }
                parts.headers.remove(header::CONTENT_LENGTH);
                parts.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(wire::CONTENT_TYPE_COSE),
                );
                Response::from_parts(parts, Body::from(sealed))
            }
            Err(reply) => reply,
        }
    }
}

fn method_not_allowed(message: &str) -> Reply {
    let mut reply = plain(StatusCode::METHOD_NOT_ALLOWED, message);
    reply
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    reply
}

/// The answer to a flight that broke its session: the alert when the engine
/// queued one.
fn failure_reply(error: &TlsError, alert: Option<Vec<u8>>) -> Reply {
    match alert {
        Some(alert) if !alert.is_empty() => atls_body(StatusCode::BAD_REQUEST, alert),
        _ => plain(StatusCode::BAD_REQUEST, &format!("ATLS: {error}")),
    }
}

/// Verify a protected request with the session's established contexts.
fn open_in<T>(
    entry: &Entry,
    mode: Mode,
    open: impl FnOnce(&mut atls_sessions::Established) -> Result<T, OscoreError>,
) -> Result<(T, AtlsPeer), Reply> {
    let mut s = lock(entry);
    let est = s
        .established_mut()
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    let opened = open(est).map_err(|e| oscore_error_reply(&e))?;
    // Described only for a request that verified: a forged one costs no
    // more than the failed check.
    let peer = peer_of(&s, mode, false).ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    // The client uses the exported keys: the TLS engine has done its work.
    s.release_engine();
    Ok((opened, peer))
}

/// Protect a response with the session's established contexts.
fn seal_in<T>(
    entry: &Entry,
    seal: impl FnOnce(&mut atls_sessions::Established) -> Result<T, OscoreError>,
) -> Result<T, Reply> {
    let mut s = lock(entry);
    let est = s
        .established_mut()
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    seal(est).map_err(|e| oscore_error_reply(&e))
}

/// A client key as logs show it (`-` when handshakes are not counted per client).
fn client_text(client: Option<ClientKey>) -> String {
    client.map_or_else(|| "-".to_owned(), |c| c.to_string())
}
