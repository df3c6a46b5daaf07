//! The CoAP side of an ATLS server: one datagram in, at most one out.
//!
//! [`CoapServer::handle`] does no IO: a transport (the UDP loop in
//! [`crate::udp`]) passes each datagram with its source endpoint and the
//! time. Handshake flights arrive as `POST /.well-known/atls` with the
//! ATLS Content-Format, in Block1 blocks when they do not fit one message,
//! and are answered `2.04 Changed` with the server's flight, in Block2
//! blocks when it is larger than a block. Once established, OSCORE requests
//! (RFC 8613) with the context of the ATLS export reach the built-in
//! resources.
//!
//! Sessions live in the transport-agnostic [`SessionTable`] (admission,
//! caps, expiry, LRU); a client endpoint (address and port) names its
//! handshake and, without the §11 CIDs, its OSCORE context.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atls_core::records::{self, FirstFlight};
use atls_core::{Framing, Limits, ServerEndpoint};
use atls_oscore::OscoreError;
use atls_sessions::{ClientKey, KidKind, Phase, Policy, Refusal, ServerSession, SessionId, SessionTable};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use crate::app;
use crate::block::{block2_slice, Block1Assembly, Block1Step, BlockError, BlockValue};

/// Content-Format of `application/atls`: IANA has assigned none (draft §12),
/// so a value from the experimental range (RFC 7252 §12.3), configurable.
pub const CONTENT_FORMAT_ATLS: u16 = 65000;

/// Settings of a [`CoapServer`].
#[derive(Clone, Debug)]
pub struct CoapConfig {
    /// Content-Format number of ATLS payloads.
    pub content_format: u16,
    /// Block size for Block2 answers, and the largest this server accepts
    /// in one message (16..=1024, a power of two).
    pub block_size: usize,
    /// The session table's bounds.
    pub policy: Policy,
    /// Largest handshake flight reassembled from Block1 blocks.
    pub max_flight: usize,
    /// Client endpoints remembered (handshakes, blockwise transfers,
    /// deduplication); the least recently seen is forgotten beyond it.
    pub max_endpoints: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            content_format: CONTENT_FORMAT_ATLS,
            block_size: 512,
            policy: Policy::default(),
            max_flight: 64 * 1024,
            max_endpoints: 20_000,
        }
    }
}

/// Responses remembered per endpoint for deduplication (RFC 7252 §4.5).
const RECENT_PER_ENDPOINT: usize = 4;
/// How long a message ID is remembered (EXCHANGE_LIFETIME is 247 s; what
/// matters is covering a client's retransmissions).
const DEDUP_LIFETIME: Duration = Duration::from_secs(247);

/// What the server knows of one client endpoint.
struct Peer {
    half_open: Option<SessionId>,
    established: Option<SessionId>,
    block1: Option<Block1Assembly>,
    /// The last answer too large for one message, served in Block2 blocks.
    block2: Option<Vec<u8>>,
    /// (message ID, answer) of recent confirmable requests.
    recent: VecDeque<(u16, Instant, Vec<u8>)>,
    seen: Instant,
    /// The endpoint proved it receives what is sent to it (it returned an
    /// Echo value, or completed a handshake): no amplification limit.
    validated: bool,
    /// Bytes received from and sent to the endpoint while unvalidated.
    bytes_in: u64,
    bytes_out: u64,
    /// The Echo value (RFC 9175) of the last challenge.
    echo: Option<Vec<u8>>,
    /// Blockwise inside OSCORE (RFC 8613 §4.1.3.4.2: Block options are
    /// inner): a request body arriving, and the last large response.
    inner_block1: Option<Block1Assembly>,
    inner_block2: Option<(coap_lite::MessageClass, Vec<u8>)>,
}

/// An unvalidated endpoint is sent at most this many times the bytes it sent.
pub const AMPLIFICATION_FACTOR: u64 = 3;
/// CoAP option number of Echo (RFC 9175).
const OPTION_ECHO: u16 = 252;

/// The endpoints the server knows, with least-recently-seen order kept
/// separately for unvalidated and validated ones: at capacity an
/// unvalidated endpoint is forgotten first, so a flood from spoofed
/// addresses cannot push out the state of endpoints that proved themselves.
/// Every operation is O(log n).
#[derive(Default)]
struct Peers {
    map: HashMap<SocketAddr, Peer>,
    order: [BTreeSet<(Instant, SocketAddr)>; 2],
}

impl Peers {
    fn with<R>(
        &mut self,
        from: SocketAddr,
        now: Instant,
        capacity: usize,
        f: impl FnOnce(&mut Peer) -> R,
    ) -> R {
        if !self.map.contains_key(&from) && self.map.len() >= capacity.max(1) {
            let oldest = self.order[0].first().or_else(|| self.order[1].first()).copied();
            if let Some((seen, addr)) = oldest {
                self.order[0].remove(&(seen, addr));
                self.order[1].remove(&(seen, addr));
                self.map.remove(&addr);
            }
        }
        let peer = self.map.entry(from).or_insert_with(|| Peer {
            half_open: None,
            established: None,
            block1: None,
            block2: None,
            recent: VecDeque::new(),
            seen: now,
            validated: false,
            bytes_in: 0,
            bytes_out: 0,
            echo: None,
            inner_block1: None,
            inner_block2: None,
        });
        let before = (peer.seen, usize::from(peer.validated));
        peer.seen = peer.seen.max(now);
        let result = f(peer);
        let after = (peer.seen, usize::from(peer.validated));
        if let Some(set) = self.order.get_mut(before.1) {
            set.remove(&(before.0, from));
        }
        if let Some(set) = self.order.get_mut(after.1) {
            set.insert((after.0, from));
        }
        result
    }
}

type Entry = Mutex<ServerSession>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ATLS-over-CoAP server core.
pub struct CoapServer {
    endpoint: Arc<dyn ServerEndpoint>,
    config: CoapConfig,
    table: SessionTable<Entry>,
    peers: Mutex<Peers>,
}

impl fmt::Debug for CoapServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoapServer")
            .field("engine", &self.endpoint.engine_name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// An answer under construction: code, options, payload.
fn answer(request: &Packet, code: ResponseType) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p.set_token(request.get_token().to_vec());
    match request.header.get_type() {
        MessageType::Confirmable => {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = request.header.message_id;
        }
        _ => {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = random_mid();
        }
    }
    p
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let _ = getrandom::fill(&mut b);
    b
}

fn random_mid() -> u16 {
    u16::from_be_bytes(random::<2>())
}

fn diagnostic(request: &Packet, code: ResponseType, text: &str) -> Packet {
    // (Diagnostic payloads are plain text, RFC 7252 §5.5.2.)
    let mut p = answer(request, code);
    p.payload = text.as_bytes().to_vec();
    p
}

fn uint_option(value: u64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes.get(skip..).unwrap_or_default().to_vec()
}

fn read_uint(bytes: &[u8]) -> Option<u64> {
    (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

fn block_error(request: &Packet, e: BlockError) -> Packet {
    let code = match e {
        BlockError::BadOption => ResponseType::BadOption,
        BlockError::Incomplete => ResponseType::RequestEntityIncomplete,
        BlockError::TooLarge => ResponseType::RequestEntityTooLarge,
    };
    diagnostic(request, code, &e.to_string())
}

fn is_atls_path(request: &Packet) -> bool {
    let Some(path) = request.get_option(CoapOption::UriPath) else {
        return false;
    };
    path.len() == 2 && path.iter().map(Vec::as_slice).eq([&b".well-known"[..], b"atls"])
}

impl CoapServer {
    /// A server on `endpoint` with `config`.
    pub fn new(endpoint: Arc<dyn ServerEndpoint>, config: CoapConfig) -> Arc<Self> {
        Arc::new(Self {
            table: SessionTable::new(config.policy),
            endpoint,
            config,
            peers: Mutex::new(Peers::default()),
        })
    }

    /// The session table's counts.
    pub fn stats(&self) -> atls_sessions::TableStats {
        self.table.stats()
    }

    fn szx(&self) -> u8 {
        BlockValue::szx_for(self.config.block_size)
    }

    /// Handle one datagram from `from`; returns the datagram to answer with.
    pub fn handle(&self, datagram: &[u8], from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        // Not a CoAP message, or a malformed one (truncated, a long token,
        // reserved nibbles, a payload marker with no payload): silently
        // ignored, as RFC 7252 §4.2 allows for message format errors.
        crate::message::validate(datagram).ok()?;
        let Ok(request) = Packet::from_bytes(datagram) else {
            return None;
        };
        if !matches!(request.header.code, MessageClass::Request(_)) {
            return None;
        }
        let confirmable = request.header.get_type() == MessageType::Confirmable;
        let echo = request
            .get_first_option(CoapOption::Unknown(OPTION_ECHO))
            .cloned();
        let starts_flight = is_atls_path(&request)
            && request
                .get_first_option(CoapOption::Block1)
                .is_none_or(|b| BlockValue::decode(b).is_ok_and(|b| b.num == 0))
            && request
                .get_first_option(CoapOption::Block2)
                .is_none_or(|b| BlockValue::decode(b).is_ok_and(|b| b.num == 0));
        let (cached, unvalidated) = self.with_peer(from, now, |peer| {
            if !peer.validated {
                peer.bytes_in = peer.bytes_in.saturating_add(datagram.len() as u64);
                if echo.is_some() && echo == peer.echo {
                    peer.validated = true;
                }
            }
            let cached = confirmable
                .then(|| {
                    peer.recent
                        .iter()
                        .find(|(mid, at, _)| {
                            *mid == request.header.message_id && now.duration_since(*at) < DEDUP_LIFETIME
                        })
                        .map(|(_, _, cached)| cached.clone())
                })
                .flatten();
            (cached, !peer.validated)
        });
        if let Some(cached) = cached {
            // A retransmission: the same answer, within the same budget.
            return self.within_budget(&request, cached, from, now);
        }
        if unvalidated && starts_flight {
            // Before any handshake state is spent on it, the endpoint proves
            // it receives what is sent to it (as DTLS's HelloVerifyRequest
            // does): a spoofed source never opens a session.
            return self.challenge(&request, from, now);
        }
        let response = self.respond(&request, from, now, self.config.block_size);
        let bytes = response.to_bytes().ok()?;
        if confirmable {
            self.with_peer(from, now, |peer| {
                peer.recent
                    .push_back((request.header.message_id, now, bytes.clone()));
                while peer.recent.len() > RECENT_PER_ENDPOINT {
                    peer.recent.pop_front();
                }
            });
        }
        self.within_budget(&request, bytes, from, now)
    }

    /// Handle one request from a reliable transport (CoAP over TCP, RFC
    /// 8323): no deduplication, and the endpoint needs no validation (the
    /// TCP handshake did it).
    pub fn handle_reliable(&self, request: &Packet, from: SocketAddr, now: Instant) -> Option<Packet> {
        if !matches!(request.header.code, MessageClass::Request(_)) {
            return None;
        }
        self.with_peer(from, now, |peer| peer.validated = true);
        // A reliable transport carries whole messages (up to the size both
        // sides announced): no Block2 for answers.
        Some(self.respond(request, from, now, crate::tcp::MAX_MESSAGE_SIZE))
    }

    /// `whole`: the largest answer payload sent without Block2.
    fn respond(&self, request: &Packet, from: SocketAddr, now: Instant, whole: usize) -> Packet {
        if let Some(option) = crate::message::unknown_critical(request) {
            return diagnostic(
                request,
                ResponseType::BadOption,
                &format!("unknown critical option {option}"),
            );
        }
        if is_atls_path(request) {
            self.handle_flight(request, from, now, whole)
        } else if request.get_option(CoapOption::Oscore).is_some() {
            self.handle_oscore(request, from, now, whole)
        } else {
            diagnostic(
                request,
                ResponseType::Unauthorized,
                "this resource is served only through ATLS (OSCORE)",
            )
        }
    }

    /// Anti-amplification (draft §7 asks for CoAP-level DDoS protection):
    /// until an endpoint is validated, send it at most three times the
    /// bytes it sent. An answer over that budget is replaced by a 4.01
    /// carrying a fresh Echo value (RFC 9175 §2.4); a client that repeats
    /// its request with that value is validated. When even the challenge
    /// does not fit, nothing is sent.
    fn within_budget(
        &self,
        request: &Packet,
        bytes: Vec<u8>,
        from: SocketAddr,
        now: Instant,
    ) -> Option<Vec<u8>> {
        self.with_peer(from, now, |peer| {
            if peer.validated {
                return Some(bytes);
            }
            let budget = peer.bytes_in.saturating_mul(AMPLIFICATION_FACTOR);
            let answer = if peer.bytes_out.saturating_add(bytes.len() as u64) <= budget {
                bytes
            } else {
                let challenge = echo_challenge(request, peer)?;
                if peer.bytes_out.saturating_add(challenge.len() as u64) > budget {
                    return None;
                }
                challenge
            };
            peer.bytes_out = peer.bytes_out.saturating_add(answer.len() as u64);
            Some(answer)
        })
    }

    /// A 4.01 with a fresh Echo value for `request`, within the budget.
    fn challenge(&self, request: &Packet, from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        self.with_peer(from, now, |peer| {
            let challenge = echo_challenge(request, peer)?;
            let budget = peer.bytes_in.saturating_mul(AMPLIFICATION_FACTOR);
            if peer.bytes_out.saturating_add(challenge.len() as u64) > budget {
                return None;
            }
            peer.bytes_out = peer.bytes_out.saturating_add(challenge.len() as u64);
            Some(challenge)
        })
    }

    fn with_peer<R>(&self, from: SocketAddr, now: Instant, f: impl FnOnce(&mut Peer) -> R) -> R {
        let mut peers = lock(&self.peers);
        peers.with(from, now, self.config.max_endpoints, f)
    }

    fn handle_flight(&self, request: &Packet, from: SocketAddr, now: Instant, whole: usize) -> Packet {
        if request.header.code != MessageClass::Request(RequestType::Post) {
            return diagnostic(request, ResponseType::MethodNotAllowed, "ATLS flights are POSTed");
        }
        let format = request
            .get_first_option(CoapOption::ContentFormat)
            .and_then(|v| read_uint(v));
        // A Block2 follow-up asks for the rest of the last answer (its
        // payload, if a client repeats the request's, is not a new flight).
        if let Some(block2) = request.get_first_option(CoapOption::Block2) {
            let block2 = match BlockValue::decode(block2) {
                Ok(b) => b,
                Err(e) => return block_error(request, e),
            };
            if block2.num > 0 {
                let stored = self.with_peer(from, now, |peer| peer.block2.clone());
                return match stored {
                    Some(body) => self.block2_answer(request, &body, block2.num, block2.szx.min(self.szx())),
                    None => block_error(request, BlockError::Incomplete),
                };
            }
        }
        if format != Some(u64::from(self.config.content_format)) {
            return diagnostic(
                request,
                ResponseType::UnsupportedContentFormat,
                "expected the application/atls Content-Format",
            );
        }
        let flight = match request.get_first_option(CoapOption::Block1) {
            None => request.payload.clone(),
            Some(value) => {
                // Any block size (16..=1024) is taken; the configured size
                // is the one this server's own Block2 answers use.
                let block1 = match BlockValue::decode(value) {
                    Ok(b) => b,
                    Err(e) => return block_error(request, e),
                };
                let size1 = request
                    .get_first_option(CoapOption::Size1)
                    .and_then(|v| read_uint(v))
                    .map(|s| usize::try_from(s).unwrap_or(usize::MAX));
                let step = self.with_peer(from, now, |peer| {
                    let step = match (block1.num, peer.block1.as_mut()) {
                        (0, _) => {
                            Block1Assembly::start(block1, &request.payload, size1, self.config.max_flight)
                                .map(|(assembly, step)| {
                                    peer.block1 = Some(assembly);
                                    step
                                })
                        }
                        (_, Some(assembly)) => assembly.accept(block1, &request.payload),
                        (_, None) => Err(BlockError::Incomplete),
                    };
                    if !matches!(step, Ok(Block1Step::Continue)) {
                        peer.block1 = None;
                    }
                    step
                });
                match step {
                    Ok(Block1Step::Continue) => {
                        let mut p = answer(request, ResponseType::Continue);
                        p.add_option(CoapOption::Block1, block1.encode());
                        return p;
                    }
                    Ok(Block1Step::Complete(body)) => body,
                    Err(e) => return block_error(request, e),
                }
            }
        };
        let output = match self.flight(&flight, from, now) {
            Ok(output) => output,
            Err(reply) => return reply.into_packet(request),
        };
        let mut p = self.block2_answer_or_whole(request, output, from, now, whole);
        if let Some(block1) = request.get_first_option(CoapOption::Block1) {
            p.add_option(CoapOption::Block1, block1.clone());
        }
        p
    }

    /// The answer to a flight: whole, or its first Block2 block (the rest is
    /// kept for follow-ups).
    fn block2_answer_or_whole(
        &self,
        request: &Packet,
        body: Vec<u8>,
        from: SocketAddr,
        now: Instant,
        whole: usize,
    ) -> Packet {
        if body.len() <= whole {
            let mut p = answer(request, ResponseType::Changed);
            p.add_option(
                CoapOption::ContentFormat,
                uint_option(u64::from(self.config.content_format)),
            );
            p.payload = body;
            return p;
        }
        let p = self.block2_answer(request, &body, 0, self.szx());
        self.with_peer(from, now, |peer| peer.block2 = Some(body));
        p
    }

    fn block2_answer(&self, request: &Packet, body: &[u8], num: u32, szx: u8) -> Packet {
        let Some((slice, value)) = block2_slice(body, num, szx) else {
            return block_error(request, BlockError::Incomplete);
        };
        let mut p = answer(request, ResponseType::Changed);
        p.add_option(
            CoapOption::ContentFormat,
            uint_option(u64::from(self.config.content_format)),
        );
        p.add_option(CoapOption::Block2, value.encode());
        if num == 0 {
            p.add_option(CoapOption::Size2, uint_option(body.len() as u64));
        }
        p.payload = slice.to_vec();
        p
    }

    /// Run one whole flight: a ClientHello opens a session for the endpoint,
    /// anything else continues the endpoint's session.
    fn flight(&self, flight: &[u8], from: SocketAddr, now: Instant) -> Result<Vec<u8>, Reply> {
        let framing = atls_core::records::detect_framing(flight).unwrap_or(Framing::Tls);
        let first = records::classify_payload(framing, flight).map_err(|_| {
            Reply::new(
                ResponseType::BadRequest,
                "the payload is not a sequence of TLS records",
            )
        })?;
        let (half_open, established) = self.with_peer(from, now, |p| (p.half_open, p.established));
        let continuing = half_open
            .and_then(|id| self.table.get(&id, now))
            .or_else(|| established.and_then(|id| self.table.get(&id, now)));
        match (continuing, first) {
            (Some(found), _) if found.phase == Phase::HalfOpen => {
                self.continue_flight(found, flight, from, now)
            }
            (Some(found), FirstFlight::Other | FirstFlight::IncompleteClientHello) => {
                self.continue_flight(found, flight, from, now)
            }
            (_, FirstFlight::ClientHello) => self.open(flight, from, now),
            (None, FirstFlight::IncompleteClientHello) => Err(Reply::new(
                ResponseType::BadRequest,
                "the ClientHello is incomplete",
            )),
            (None, FirstFlight::Other) => Err(Reply::new(
                ResponseType::NotFound,
                "no ATLS session for this endpoint; start with a ClientHello",
            )),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_flight_len: self.config.max_flight,
            max_buffered_application_data: self.config.max_flight,
        }
    }

    fn open(&self, flight: &[u8], from: SocketAddr, now: Instant) -> Result<Vec<u8>, Reply> {
        let admission = self
            .table
            .admit(Some(ClientKey::from(from.ip())), flight, now)
            .map_err(|r| Reply::refused(&r))?;
        let id = admission.id();
        let mut session = ServerSession::accept(self.endpoint.as_ref(), &admission, self.limits(), 64 * 1024)
            .map_err(|_| Reply::new(ResponseType::InternalServerError, "cannot start an ATLS session"))?;
        let progress = session
            .push_flight(flight, now)
            .map_err(|f| Reply::failure(f.alert))?;
        if progress.output.is_empty() && !progress.established {
            return Err(Reply::new(
                ResponseType::BadRequest,
                "the TLS stack did not answer this first flight",
            ));
        }
        admission
            .insert(Mutex::new(session))
            .map_err(|r| Reply::refused(&r))?;
        self.with_peer(from, now, |p| p.half_open = Some(id));
        if progress.established {
            self.complete(id, from, now)?;
        }
        Ok(progress.output)
    }

    fn continue_flight(
        &self,
        found: atls_sessions::Found<Entry>,
        flight: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<Vec<u8>, Reply> {
        let result = lock(&found.entry).push_flight(flight, now);
        match result {
            Ok(progress) => {
                if progress.established {
                    self.complete(found.id, from, now)?;
                }
                Ok(progress.output)
            }
            Err(failure) => {
                if found.phase == Phase::HalfOpen {
                    self.table.remove(&found.id);
                    self.with_peer(from, now, |p| p.half_open = None);
                } else {
                    lock(&found.entry).abandon_records();
                }
                Err(Reply::failure(failure.alert))
            }
        }
    }

    fn complete(&self, id: SessionId, from: SocketAddr, now: Instant) -> Result<(), Reply> {
        self.table.establish(&id, now).map_err(|r| Reply::refused(&r))?;
        self.with_peer(from, now, |p| {
            p.half_open = None;
            p.established = Some(id);
            // It received every flight of a handshake: its address is real.
            p.validated = true;
        });
        Ok(())
    }

    fn handle_oscore(&self, request: &Packet, from: SocketAddr, now: Instant, whole: usize) -> Packet {
        let kid = match atls_oscore::message::oscore_option(request) {
            Ok(option) => option.kid,
            Err(e) => return oscore_error(request, &e),
        };
        let by_kid = kid
            .filter(|k| !k.is_empty())
            .and_then(|k| self.table.get_by_kid(KidKind::Oscore, &k, now));
        let found = by_kid.or_else(|| {
            let established = self.with_peer(from, now, |p| p.established);
            established.and_then(|id| self.table.get(&id, now))
        });
        let Some(found) = found.filter(|f| f.phase == Phase::Established) else {
            return oscore_error(request, &OscoreError::ContextNotFound);
        };
        let opened = {
            let mut s = lock(&found.entry);
            match s.established_mut() {
                Some(est) => atls_oscore::unprotect_request(&mut est.oscore, request),
                None => Err(OscoreError::ContextNotFound),
            }
        };
        let (inner, binding) = match opened {
            Ok(opened) => opened,
            Err(e) => return oscore_error(request, &e),
        };
        self.table.touch(&found.id, now);
        let inner_response = self.inner_exchange(&found, &inner, from, now, whole);
        let protected = {
            let mut s = lock(&found.entry);
            match s.established_mut() {
                Some(est) => atls_oscore::protect_response(&mut est.oscore, &inner_response, &binding, false),
                None => Err(OscoreError::ContextNotFound),
            }
        };
        match protected {
            Ok(mut p) => {
                let template = answer(request, ResponseType::Changed);
                p.header.set_type(template.header.get_type());
                p.header.message_id = template.header.message_id;
                p.set_token(request.get_token().to_vec());
                p
            }
            Err(e) => oscore_error(request, &e),
        }
    }
}

impl CoapServer {
    /// The inner (decrypted) exchange, with blockwise transfer inside
    /// OSCORE: Block1 request bodies are reassembled (bounded like flights)
    /// and responses larger than a block go in Block2 blocks.
    fn inner_exchange(
        &self,
        found: &atls_sessions::Found<Entry>,
        inner: &Packet,
        from: SocketAddr,
        now: Instant,
        whole: usize,
    ) -> Packet {
        let reply = |code: ResponseType| {
            let mut p = Packet::new();
            p.header.code = MessageClass::Response(code);
            p
        };
        if let Some(value) = inner.get_first_option(CoapOption::Block2) {
            let block = match BlockValue::decode(value) {
                Ok(b) => b,
                Err(_) => return reply(ResponseType::BadOption),
            };
            if block.num > 0 {
                let stored = self.with_peer(from, now, |p| p.inner_block2.clone());
                let Some((code, body)) = stored else {
                    return reply(ResponseType::RequestEntityIncomplete);
                };
                let Some((slice, value)) = block2_slice(&body, block.num, block.szx.min(self.szx())) else {
                    return reply(ResponseType::RequestEntityIncomplete);
                };
                let mut p = Packet::new();
                p.header.code = code;
                p.add_option(CoapOption::Block2, value.encode());
                p.payload = slice.to_vec();
                return p;
            }
        }
        let mut request = inner.clone();
        if let Some(value) = inner.get_first_option(CoapOption::Block1) {
            let block = match BlockValue::decode(value) {
                Ok(b) => b,
                Err(_) => return reply(ResponseType::BadOption),
            };
            let size1 = inner
                .get_first_option(CoapOption::Size1)
                .and_then(|v| read_uint(v))
                .map(|s| usize::try_from(s).unwrap_or(usize::MAX));
            let step = self.with_peer(from, now, |peer| {
                let step = match (block.num, peer.inner_block1.as_mut()) {
                    (0, _) => Block1Assembly::start(block, &inner.payload, size1, self.config.max_flight)
                        .map(|(a, step)| {
                            peer.inner_block1 = Some(a);
                            step
                        }),
                    (_, Some(a)) => a.accept(block, &inner.payload),
                    (_, None) => Err(BlockError::Incomplete),
                };
                if !matches!(step, Ok(Block1Step::Continue)) {
                    peer.inner_block1 = None;
                }
                step
            });
            match step {
                Ok(Block1Step::Continue) => {
                    let mut p = reply(ResponseType::Continue);
                    p.add_option(CoapOption::Block1, value.clone());
                    return p;
                }
                Ok(Block1Step::Complete(body)) => {
                    request.clear_option(CoapOption::Block1);
                    request.clear_option(CoapOption::Size1);
                    request.payload = body;
                }
                Err(BlockError::BadOption) => return reply(ResponseType::BadOption),
                Err(BlockError::Incomplete) => return reply(ResponseType::RequestEntityIncomplete),
                Err(BlockError::TooLarge) => return reply(ResponseType::RequestEntityTooLarge),
            }
        }
        let (info, engine) = {
            let s = lock(&found.entry);
            (s.established().map(|e| e.info.clone()), s.session().engine_name())
        };
        let mut response = app::builtin(&request, info.as_ref(), engine);
        if let Some(value) = inner.get_first_option(CoapOption::Block1) {
            response.add_option(CoapOption::Block1, value.clone());
        }
        if response.payload.len() > whole {
            let body = std::mem::take(&mut response.payload);
            if let Some((slice, value)) = block2_slice(&body, 0, self.szx()) {
                response.payload = slice.to_vec();
                response.add_option(CoapOption::Block2, value.encode());
                response.add_option(CoapOption::Size2, uint_option(body.len() as u64));
            }
            let code = response.header.code;
            self.with_peer(from, now, |p| p.inner_block2 = Some((code, body)));
        }
        response
    }
}

fn oscore_error(request: &Packet, e: &OscoreError) -> Packet {
    let (code, text) = match e.coap_error() {
        Some(((4, 1), d)) => (ResponseType::Unauthorized, d),
        Some(((4, 0), d)) => (ResponseType::BadRequest, d),
        Some((_, d)) => (ResponseType::BadOption, d),
        None => (ResponseType::InternalServerError, "protection failure"),
    };
    let mut p = diagnostic(request, code, text);
    // RFC 8613 §8.2: error responses carry Max-Age 0.
    p.add_option(CoapOption::MaxAge, Vec::new());
    p
}

/// A 4.01 Unauthorized carrying the endpoint's Echo value (RFC 9175 §2.4),
/// unpredictable and chosen the first time the endpoint is challenged.
fn echo_challenge(request: &Packet, peer: &mut Peer) -> Option<Vec<u8>> {
    // One value per endpoint until it is validated: a retransmitted request
    // and a late duplicate of the challenge then agree.
    let value = peer.echo.get_or_insert_with(|| random::<8>().to_vec()).clone();
    let mut challenge = answer(request, ResponseType::Unauthorized);
    challenge.add_option(CoapOption::Unknown(OPTION_ECHO), value);
    challenge.to_bytes().ok()
}

/// An error answer to a flight: a code with a diagnostic, or the TLS alert
/// as an ATLS payload (4.00 with the ATLS Content-Format).
struct Reply {
    code: ResponseType,
    text: &'static str,
    alert: Option<Vec<u8>>,
    max_age: Option<u64>,
}

impl Reply {
    fn new(code: ResponseType, text: &'static str) -> Self {
        Self {
            code,
            text,
            alert: None,
            max_age: None,
        }
    }

    fn failure(alert: Option<Vec<u8>>) -> Self {
        Self {
            alert: alert.filter(|a| !a.is_empty()),
            ..Self::new(ResponseType::BadRequest, "the TLS handshake failed")
        }
    }

    fn refused(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::DuplicateFirstFlight => Self::new(
                ResponseType::BadRequest,
                "this first flight is already being answered",
            ),
            Refusal::Gone => Self::new(ResponseType::NotFound, "the ATLS session ended"),
            Refusal::Random => Self::new(ResponseType::InternalServerError, "cannot start an ATLS session"),
            other => Self {
                // RFC 7252 §5.10.5: Max-Age says when to try again.
                max_age: Some(
                    other
                        .retry_after()
                        .unwrap_or(Duration::from_secs(1))
                        .as_secs()
                        .max(1),
                ),
                ..Self::new(
                    ResponseType::ServiceUnavailable,
                    "too many ATLS handshakes; try later",
                )
            },
        }
    }

    fn into_packet(self, request: &Packet) -> Packet {
        let mut p = diagnostic(request, self.code, self.text);
        if let Some(alert) = self.alert {
            p.add_option(
                CoapOption::ContentFormat,
                uint_option(u64::from(CONTENT_FORMAT_ATLS)),
            );
            p.payload = alert;
        }
        if let Some(max_age) = self.max_age {
            p.add_option(CoapOption::MaxAge, uint_option(max_age));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_endpoint_map_forgets_unvalidated_endpoints_first() {
        let t0 = Instant::now();
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut peers = Peers::default();
        peers.with(addr(1), t0, 3, |p| p.validated = true);
        for (i, port) in [2u16, 3, 4, 5].into_iter().enumerate() {
            peers.with(addr(port), t0 + Duration::from_secs(i as u64 + 1), 3, |_| ());
        }
        assert_eq!(peers.map.len(), 3);
        assert!(peers.map.contains_key(&addr(1)), "the validated endpoint stays");
        assert!(!peers.map.contains_key(&addr(2)) && !peers.map.contains_key(&addr(3)));
        assert_eq!(
            peers.order[0].len() + peers.order[1].len(),
            3,
            "the order sets follow the map"
        );
        // With only validated endpoints left, the least recently seen goes.
        let mut peers = Peers::default();
        for port in 1..=3u16 {
            peers.with(addr(port), t0 + Duration::from_secs(u64::from(port)), 2, |p| {
                p.validated = true
            });
        }
        assert!(!peers.map.contains_key(&addr(1)) && peers.map.contains_key(&addr(3)));
    }
}
