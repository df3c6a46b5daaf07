//! The server side: a tower [`Layer`] that terminates ATLS in front of any
//! HTTP application.
//!
//! [`AtlsServer`] owns the TLS endpoint and the session table; [`AtlsLayer`]
//! wraps an application service. The wrapped service sees only plaintext
//! requests, each carrying an [`AtlsPeer`] extension that says who the peer
//! proved to be and how the request was protected.
//!
//! Sessions live in a bounded in-memory table keyed by the session cookie:
//! idle and absolute expiry, a cap on half-open handshakes. Their keys die
//! with the table, so the OSCORE and COSE contexts derived from them keep
//! their sequence numbers in memory: a restarted server has no context to
//! reuse a nonce with, and clients handshake again (404 → new session).

// Handlers return a ready HTTP response as their error: it is built once per
// refused request, and boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atls_core::{
    ConnectionId, Error as TlsError, HandshakeInfo, PeerIdentity, ProtectionKind, ServerEndpoint,
    ServerSessionParams, Session,
};
use atls_oscore::{http as oscore_http, ContextParams, OscoreError, SecurityContext};
use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::wire::{self, Mode, SessionId};

/// Bounds of the session table and of bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most sessions (half-open and established) held at once.
    pub max_sessions: usize,
    /// Most sessions still handshaking; beyond it new handshakes get 503.
    pub max_half_open: usize,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// An established session unused for this long is dropped.
    pub idle_timeout: Duration,
    /// No session lives longer than this (the cookie's Max-Age).
    pub lifetime: Duration,
    /// Largest outer request body (a flight, records, an OSCORE or COSE message).
    pub max_body: usize,
    /// Largest inner response body the application may return.
    pub max_response: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_half_open: 1_000,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10 * 60),
            lifetime: Duration::from_secs(60 * 60),
            max_body: 1024 * 1024,
            max_response: 4 * 1024 * 1024,
        }
    }
}

/// Seconds a client is asked to wait when the half-open table is full.
const RETRY_AFTER_SECS: u64 = 1;
/// Bytes of a server CID (OSCORE Recipient ID / COSE kid); fits every AEAD's
/// nonce (at most nonce length − 6 = 1 for 7-byte nonces is never negotiated
/// here: the §10 AEADs have 12- or 13-byte nonces).
const CID_LEN: usize = 4;

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

/// An established session's protection state.
struct Established {
    info: HandshakeInfo,
    oscore: SecurityContext,
    cose: SecurityContext,
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

struct Entry {
    session: Session,
    created: Instant,
    last_used: Instant,
    established: Option<Established>,
    /// A request received as 0-RTT data, served once the handshake completes.
    early_request: Option<Vec<u8>>,
    id: SessionId,
}

impl Entry {
    fn expired(&self, now: Instant, limits: &ServerLimits) -> bool {
        let idle = if self.established.is_some() {
            limits.idle_timeout
        } else {
            limits.handshake_timeout
        };
        now.duration_since(self.created) >= limits.lifetime || now.duration_since(self.last_used) >= idle
    }

    fn peer(&self, mode: Mode, early_data: bool) -> Option<AtlsPeer> {
        let est = self.established.as_ref()?;
        let info = &est.info;
        let cids = match mode {
            Mode::Cose => info.cose_cids.is_negotiated(),
            _ => info.oscore_cids.is_negotiated(),
        };
        Some(AtlsPeer {
            mode,
            engine: self.session.engine_name(),
            tls_version: info.version.name(),
            cipher_suite: info.cipher_suite.to_string(),
            cids_negotiated: cids,
            peer: PeerSummary::of(&info.peer),
            resumed: info.resumed,
            early_data,
        })
    }
}

type Shared = Arc<Mutex<Entry>>;

/// A session as the table holds it: what removal needs is kept here, so the
/// table never waits for a session's lock.
struct Slot {
    entry: Shared,
    oscore_cid: Vec<u8>,
    cose_cid: Vec<u8>,
}

/// Lock order: a session's lock may be held while taking the table's, never
/// the reverse (the table only ever `try_lock`s a session).
#[derive(Default)]
struct Table {
    sessions: HashMap<SessionId, Slot>,
    /// Server CIDs (= the client's Sender ID / kid) of live sessions.
    oscore_kids: HashMap<Vec<u8>, SessionId>,
    cose_kids: HashMap<Vec<u8>, SessionId>,
    /// Sessions still handshaking.
    half_open: HashSet<SessionId>,
    last_sweep: Option<Instant>,
}

impl Table {
    fn remove(&mut self, id: &SessionId) {
        if let Some(slot) = self.sessions.remove(id) {
            self.half_open.remove(id);
            self.oscore_kids.remove(&slot.oscore_cid);
            self.cose_kids.remove(&slot.cose_cid);
        }
    }

    fn sweep(&mut self, now: Instant, limits: &ServerLimits) {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, slot)| slot.entry.try_lock().is_ok_and(|e| e.expired(now, limits)))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove(&id);
        }
        self.last_sweep = Some(now);
    }

    fn evict_least_recently_used(&mut self) {
        let victim = self
            .sessions
            .iter()
            .filter_map(|(id, slot)| {
                let e = slot.entry.try_lock().ok()?;
                e.established.as_ref().map(|_| (e.last_used, *id))
            })
            .min()
            .map(|(_, id)| id);
        if let Some(id) = victim {
            tracing::debug!(session = ?id, "evicting the least recently used ATLS session");
            self.remove(&id);
        }
    }
}

/// A random server CID not in `index`.
fn fresh_cid(index: &HashMap<Vec<u8>, SessionId>) -> Result<Vec<u8>, crate::error::WireError> {
    loop {
        let mut cid = vec![0u8; CID_LEN];
        getrandom::fill(&mut cid).map_err(|e| crate::error::WireError::Random(e.to_string()))?;
        if !index.contains_key(&cid) {
            return Ok(cid);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a session lock poisons only that session's data,
    // which stays consistent (every mutation is a single engine call).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counters of what the server refused, for operators and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableStats {
    /// Sessions held.
    pub sessions: usize,
    /// Of which still handshaking.
    pub half_open: usize,
}

/// The ATLS terminator: a TLS server endpoint and its session table.
pub struct AtlsServer {
    endpoint: Arc<dyn ServerEndpoint>,
    limits: ServerLimits,
    table: Mutex<Table>,
}

impl fmt::Debug for AtlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtlsServer")
            .field("engine", &self.endpoint.engine_name())
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Result of a handler: a response, never an error (errors are statuses).
type Reply = Response<Body>;

/// A text/plain answer carrying `message`.
pub(crate) fn plain(status: StatusCode, message: &str) -> Reply {
    let mut response = Response::new(Body::from(format!("{message}\n")));
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

/// What the application is asked to do for one protected request.
struct Inner {
    request: Request<Bytes>,
    peer: AtlsPeer,
}

impl AtlsServer {
    /// A server on `endpoint` with `limits`.
    pub fn new(endpoint: Arc<dyn ServerEndpoint>, limits: ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// The engine name.
    pub fn engine_name(&self) -> &'static str {
        self.endpoint.engine_name()
    }

    /// How many sessions are held.
    pub fn stats(&self) -> TableStats {
        let table = lock(&self.table);
        TableStats {
            sessions: table.sessions.len(),
            half_open: table.half_open.len(),
        }
    }

    fn maybe_sweep(&self, table: &mut Table, now: Instant) {
        let due = table
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            table.sweep(now, &self.limits);
        }
    }

    fn lookup(&self, id: SessionId, now: Instant) -> Option<Shared> {
        let entry = {
            let mut table = lock(&self.table);
            self.maybe_sweep(&mut table, now);
            table.sessions.get(&id)?.entry.clone()
        };
        let expired = lock(&entry).expired(now, &self.limits);
        if expired {
            self.remove(&id);
            return None;
        }
        Some(entry)
    }

    fn lookup_kid(&self, mode: Mode, kid: &[u8], now: Instant) -> Option<Shared> {
        let id = {
            let table = lock(&self.table);
            let index = match mode {
                Mode::Cose => &table.cose_kids,
                _ => &table.oscore_kids,
            };
            *index.get(kid)?
        };
        self.lookup(id, now)
    }

    fn create(&self, now: Instant) -> Result<(SessionId, Shared), Reply> {
        let mut table = lock(&self.table);
        self.maybe_sweep(&mut table, now);
        if table.half_open.len() >= self.limits.max_half_open
            || table.sessions.len() >= self.limits.max_sessions
        {
            // Sweep now rather than wait: expired entries may be holding the room.
            table.sweep(now, &self.limits);
        }
        if table.sessions.len() >= self.limits.max_sessions {
            // Full of established sessions: the least recently used one goes
            // (its client gets 404 and handshakes again) rather than turning
            // new clients away. Half-open handshakes are never evicted.
            table.evict_least_recently_used();
        }
        let refusal = if table.half_open.len() >= self.limits.max_half_open {
            Some("too many ATLS handshakes in progress")
        } else if table.sessions.len() >= self.limits.max_sessions {
            Some("the ATLS session table is full")
        } else {
            None
        };
        if let Some(message) = refusal {
            let mut reply = plain(StatusCode::SERVICE_UNAVAILABLE, message);
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            return Err(reply);
        }
        let internal = |e: &dyn fmt::Display| {
            tracing::error!(error = %e, "cannot start an ATLS session");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot start an ATLS session")
        };
        let id = loop {
            let id = SessionId::random().map_err(|e| internal(&e))?;
            if !table.sessions.contains_key(&id) {
                break id;
            }
        };
        let oscore_cid = fresh_cid(&table.oscore_kids).map_err(|e| internal(&e))?;
        let cose_cid = fresh_cid(&table.cose_kids).map_err(|e| internal(&e))?;
        let params = ServerSessionParams {
            oscore_cid: Some(ConnectionId::new(oscore_cid.clone()).map_err(|e| internal(&e))?),
            cose_cid: Some(ConnectionId::new(cose_cid.clone()).map_err(|e| internal(&e))?),
        };
        let session = Session::server(self.endpoint.as_ref(), &params).map_err(|e| internal(&e))?;
        let entry = Arc::new(Mutex::new(Entry {
            session,
            created: now,
            last_used: now,
            established: None,
            early_request: None,
            id,
        }));
        table.oscore_kids.insert(oscore_cid.clone(), id);
        table.cose_kids.insert(cose_cid.clone(), id);
        table.half_open.insert(id);
        table.sessions.insert(
            id,
            Slot {
                entry: entry.clone(),
                oscore_cid,
                cose_cid,
            },
        );
        Ok((id, entry))
    }

    fn remove(&self, id: &SessionId) {
        lock(&self.table).remove(id);
    }

    fn mark_established(&self, entry: &mut Entry) -> Result<(), TlsError> {
        let info = entry
            .session
            .handshake_info()
            .cloned()
            .ok_or(TlsError::HandshakeNotComplete)?;
        let context = |kind: ProtectionKind| -> Result<SecurityContext, TlsError> {
            let keys = entry.session.atls_keys(kind)?;
            let ids = entry.session.protection_ids(kind)?;
            SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids))
                .map_err(|e| TlsError::Engine(format!("deriving the {kind:?} context: {e}")))
        };
        let oscore = context(ProtectionKind::Oscore)?;
        let cose = context(ProtectionKind::Cose)?;
        entry.established = Some(Established { info, oscore, cose });
        lock(&self.table).half_open.remove(&entry.id);
        Ok(())
    }
}

/// Reads a body up to `limit` bytes; `Err` is the 413 reply.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reply> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body exceeds {limit} bytes"),
        )),
        Err(_) => Err(plain(StatusCode::BAD_REQUEST, "cannot read the request body")),
    }
}

/// Tower layer that puts an [`AtlsServer`] in front of a service.
///
/// Wrap the whole application, so that the layer sees every request:
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
/// axum::serve(listener, service.into_make_service()).await.unwrap();
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

/// Outcome of running the application on an inner request.
async fn call_app<S>(inner: &mut S, inner_request: Inner, limit: usize) -> Result<Response<Bytes>, Reply>
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
        Ok(collected) => Ok(Response::from_parts(parts, collected.to_bytes())),
        Err(_) => Err(plain(
            StatusCode::BAD_GATEWAY,
            "the application's response exceeds the ATLS response limit",
        )),
    }
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

impl<S> Handler<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    async fn handle(mut self, request: Request<Body>) -> Reply {
        let headers = request.headers();
        if request.uri().path() == wire::WELL_KNOWN_PATH {
            if request.method() != Method::POST {
                let mut reply = plain(StatusCode::METHOD_NOT_ALLOWED, "ATLS flights are POSTed");
                reply
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                return reply;
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
            return self.handle_oscore(request).await;
        }
        if wire::is_media_type(headers, "application/cose") {
            return self.handle_cose(request).await;
        }
        plain(
            StatusCode::FORBIDDEN,
            "this resource is served only through ATLS (record, OSCORE or COSE protection)",
        )
    }

    fn session_for(
        &self,
        headers: &http::HeaderMap,
        now: Instant,
    ) -> Result<Option<(SessionId, Shared)>, Reply> {
        match wire::session_cookie(headers) {
            None => Ok(None),
            Some(Some(id)) => match self.server.lookup(id, now) {
                Some(entry) => Ok(Some((id, entry))),
                None => Err(plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session")),
            },
            Some(None) => Err(plain(StatusCode::NOT_FOUND, "unknown or expired ATLS session")),
        }
    }

    /// `POST /.well-known/atls`: a handshake flight, or records after it.
    async fn handle_records(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let (parts, body) = request.into_parts();
        let body = match read_body(body, self.server.limits.max_body).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let starts_handshake = match atls_core::records::split_records(atls_core::Framing::Tls, &body) {
            Ok(records) => records
                .first()
                .is_some_and(|r| r.content_type == atls_core::records::ContentType::Handshake),
            Err(_) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "the body is not a sequence of TLS records",
                )
            }
        };
        let (id, entry, new) = match self.session_for(&parts.headers, now) {
            Err(reply) => return reply,
            Ok(Some((id, entry))) => (id, entry, false),
            // Without a cookie only a ClientHello may open a session.
            Ok(None) if !starts_handshake => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "a new ATLS session starts with a handshake record",
                )
            }
            Ok(None) => match self.server.create(now) {
                Ok((id, entry)) => (id, entry, true),
                Err(reply) => return reply,
            },
        };

        // Drive the TLS session with the flight; collect a request to serve.
        let (step, closed) = {
            let mut e = lock(&entry);
            e.last_used = now;
            let step = self.step(&mut e, &body, now);
            (step, e.session.is_closed())
        };
        if closed {
            // close_notify (or a fatal alert): the session ends here.
            self.server.remove(&id);
        }
        let (mut out, inner_request) = match step {
            Ok(step) => step,
            Err(StepError(error, alert)) => {
                tracing::debug!(session = ?id, %error, "ATLS handshake failed");
                if !matches!(error, TlsError::DuplicateFlight) {
                    self.server.remove(&id);
                }
                return match alert {
                    Some(alert) => atls_body(StatusCode::BAD_REQUEST, alert),
                    None => plain(StatusCode::BAD_REQUEST, &format!("ATLS: {error}")),
                };
            }
        };

        if let Some(inner_request) = inner_request {
            let response =
                match call_app(&mut self.inner, inner_request, self.server.limits.max_response).await {
                    Ok(r) => r,
                    Err(reply) => return reply,
                };
            let mut e = lock(&entry);
            if let Err(error) = e.session.send(&wire::encode_response(&response)) {
                self.server.remove(&id);
                return plain(StatusCode::BAD_REQUEST, &format!("ATLS: {error}"));
            }
            match e.session.take_flight(now) {
                Ok(Some(flight)) => out.extend_from_slice(&flight),
                Ok(None) => {}
                Err(error) => return plain(StatusCode::BAD_REQUEST, &format!("ATLS: {error}")),
            }
        }
        let mut reply = atls_body(StatusCode::OK, out);
        if new {
            let max_age = self.server.limits.lifetime.as_secs();
            if let Ok(value) = HeaderValue::from_str(&wire::set_cookie(id, max_age, self.secure_cookies)) {
                reply.headers_mut().insert(header::SET_COOKIE, value);
            }
        }
        reply
    }

    /// Push a flight; returns the bytes to answer with and a request to serve.
    fn step(&self, e: &mut Entry, body: &[u8], now: Instant) -> Result<(Vec<u8>, Option<Inner>), StepError> {
        let was_established = e.established.is_some();
        if let Err(error) = e.session.push_flight(body, now) {
            let alert = e.session.take_flight(now).ok().flatten();
            return Err(StepError(error, alert));
        }
        let early = e.session.take_early_data();
        if !early.is_empty() {
            // Served only once the client's Finished proves it is not a replay.
            e.early_request
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&early);
        }
        if !was_established && e.session.is_handshake_complete() {
            if let Err(error) = self.server.mark_established(e) {
                return Err(StepError(error, None));
            }
        }
        let mut out = match e.session.take_flight(now) {
            Ok(flight) => flight.unwrap_or_default(),
            Err(error) => return Err(StepError(error, None)),
        };
        if e.established.is_none() {
            return Ok((out, None));
        }
        let received = e.session.take_received();
        // A request sent partly as early data continues in the first records.
        let (bytes, early_data) = match e.early_request.take() {
            Some(mut early) => {
                early.extend_from_slice(&received);
                (early, true)
            }
            None => (received, false),
        };
        if bytes.is_empty() {
            return Ok((out, None));
        }
        let request = match wire::parse_request(&bytes, self.server.limits.max_body) {
            Ok(r) => r,
            Err(error) => {
                // The error travels back inside TLS, as the inner response.
                let response = Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(Bytes::from(format!("{error}\n")))
                    .unwrap_or_default();
                if e.session.send(&wire::encode_response(&response)).is_ok() {
                    if let Ok(Some(flight)) = e.session.take_flight(now) {
                        out.extend_from_slice(&flight);
                    }
                }
                return Ok((out, None));
            }
        };
        let peer = e
            .peer(Mode::Records, early_data)
            .ok_or(StepError(TlsError::HandshakeNotComplete, None))?;
        Ok((out, Some(Inner { request, peer })))
    }

    /// RFC 8613 §11: `POST` with `application/oscore` and the `OSCORE` header.
    async fn handle_oscore(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let (parts, body) = request.into_parts();
        let body = match read_body(
            body,
            self.server.limits.max_body.min(atls_oscore::message::MAX_MESSAGE),
        )
        .await
        {
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
        let Some(entry) = (match self.find(Mode::Oscore, kid.as_deref(), outer_http.headers(), now) {
            Ok(found) => found,
            Err(reply) => return reply,
        }) else {
            return oscore_error_reply(&OscoreError::ContextNotFound);
        };

        let ((inner_packet, binding), peer) = match open_in(&entry, Mode::Oscore, now, |est| {
            atls_oscore::unprotect_request(&mut est.oscore, &outer)
        }) {
            Ok(opened) => opened,
            Err(reply) => return reply,
        };
        let mut inner_http = match oscore_http::http_request_from_coap(&inner_packet) {
            Ok(r) => r,
            Err(e) => return oscore_error_reply(&e),
        };
        if let Some(host) = host {
            inner_http.headers_mut().entry(header::HOST).or_insert(host);
        }
        let method = inner_http.method().clone();
        let inner_request = Inner {
            request: inner_http.map(Bytes::from),
            peer,
        };
        let response = match call_app(&mut self.inner, inner_request, self.server.limits.max_response).await {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let inner_response =
            match oscore_http::coap_response_from_http(&response.map(|b| b.to_vec()), &method) {
                Ok(p) => p,
                Err(e) => return oscore_error_reply(&e),
            };
        let protected = match seal_in(&entry, |est| {
            atls_oscore::protect_response(&mut est.oscore, &inner_response, &binding, false)
        }) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        match oscore_http::response_to_http(&protected) {
            Ok(response) => response.map(Body::from),
            Err(e) => oscore_error_reply(&e),
        }
    }

    /// The session of a protected request: by kid when the CIDs were
    /// negotiated, otherwise by cookie.
    fn find(
        &self,
        mode: Mode,
        kid: Option<&[u8]>,
        headers: &http::HeaderMap,
        now: Instant,
    ) -> Result<Option<Shared>, Reply> {
        if let Some(kid) = kid.filter(|k| !k.is_empty()) {
            if let Some(found) = self.server.lookup_kid(mode, kid, now) {
                return Ok(Some(found));
            }
        }
        Ok(self.session_for(headers, now)?.map(|(_, entry)| entry))
    }

    /// Draft §9.2: COSE_Encrypt0 bodies; method, path and headers in the clear.
    async fn handle_cose(&mut self, request: Request<Body>) -> Reply {
        let now = Instant::now();
        let (mut parts, body) = request.into_parts();
        let body = match read_body(body, self.server.limits.max_body).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let kid = match atls_oscore::cose::request_kid(&body) {
            Ok(kid) => kid,
            Err(e) => return oscore_error_reply(&e),
        };
        let Some(entry) = (match self.find(Mode::Cose, Some(&kid), &parts.headers, now) {
            Ok(found) => found,
            Err(reply) => return reply,
        }) else {
            return oscore_error_reply(&OscoreError::ContextNotFound);
        };
        let ((plaintext, binding), peer) = match open_in(&entry, Mode::Cose, now, |est| {
            atls_oscore::cose::open_request(&mut est.cose, &body)
        }) {
            Ok(opened) => opened,
            Err(reply) => return reply,
        };
        parts.headers.remove(header::CONTENT_TYPE);
        parts.headers.remove(header::CONTENT_LENGTH);
        let inner_request = Inner {
            request: Request::from_parts(parts, Bytes::from(plaintext)),
            peer,
        };
        let response = match call_app(&mut self.inner, inner_request, self.server.limits.max_response).await {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let (mut parts, body) = response.into_parts();
        match seal_in(&entry, |est| {
            atls_oscore::cose::seal_response(&mut est.cose, &body, &binding)
        }) {
            Ok(sealed) => {
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

const NOT_ESTABLISHED: &str = "the ATLS handshake of this session is not complete";

/// Verify a protected request with the session's established contexts.
fn open_in<T>(
    entry: &Shared,
    mode: Mode,
    now: Instant,
    open: impl FnOnce(&mut Established) -> Result<T, OscoreError>,
) -> Result<(T, AtlsPeer), Reply> {
    let mut e = lock(entry);
    e.last_used = now;
    let peer = e
        .peer(mode, false)
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    let est = e
        .established
        .as_mut()
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    open(est)
        .map(|opened| (opened, peer))
        .map_err(|e| oscore_error_reply(&e))
}

/// Protect a response with the session's established contexts.
fn seal_in<T>(
    entry: &Shared,
    seal: impl FnOnce(&mut Established) -> Result<T, OscoreError>,
) -> Result<T, Reply> {
    let mut e = lock(entry);
    let est = e
        .established
        .as_mut()
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, NOT_ESTABLISHED))?;
    seal(est).map_err(|e| oscore_error_reply(&e))
}

/// A TLS failure and the alert flight to answer with, if any.
struct StepError(TlsError, Option<Vec<u8>>);
